"""VisionZip, PruMerge(+) and Turbo: the before-LLM visual-token methods, on synthetic images (no models)."""

from __future__ import annotations

import pytest
import torch

import hf_tokred.methods.vlm.prumerge  # noqa: F401  (registers the methods)
import hf_tokred.methods.vlm.turbo  # noqa: F401
import hf_tokred.methods.vlm.visionzip  # noqa: F401
from hf_tokred import TokenReductionConfig
from hf_tokred.errors import ConfigError
from hf_tokred.vlm.base import ImageTokens


def make_image(n=576, d=16, dk=8, grid=(24, 24), protected=None, seed=0, dtype=torch.float32) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    importance = torch.rand(n, generator=g) ** 6  # skewed, like CLS attention
    mask = torch.zeros(n, dtype=torch.bool)
    if protected is not None:
        mask[protected] = True
        importance[mask] = float("inf")  # newline tokens, as the integration marks them
    return ImageTokens(torch.randn(n, d, generator=g).to(dtype), importance, torch.randn(n, dk, generator=g),
                       grid, mask)


# Configs that return exactly ``count`` unprotected tokens.
EXACT = [
    dict(method="visionzip"),
    dict(method="visionzip", contextual_fraction=0.0),
    dict(method="visionzip", contextual_fraction=0.9),
    dict(method="prumerge", adaptive=False),
    dict(method="prumerge", plus=True),
    dict(method="prumerge", plus=True, adaptive=False),
    dict(method="prumerge", plus=True, adaptive=False, uniform_fraction=1.0),
    dict(method="turbo"),
    dict(method="turbo", alpha=0.0, metric="hidden"),
]
IMAGES = [
    dict(n=576, grid=(24, 24)),                                   # LLaVA-1.5
    dict(n=37, grid=None),                                        # odd size, no grid
    dict(n=110, grid=None, protected=list(range(10, 110, 11))),   # LLaVA-NeXT-like rows ending in a newline
]


def budget(cfg, image):
    return cfg.kept_count(int((~image.protected).sum()))


@pytest.mark.parametrize("params", EXACT, ids=lambda p: "-".join(f"{v}" for v in p.values()))
@pytest.mark.parametrize("shape", IMAGES, ids=["grid", "odd", "protected"])
@pytest.mark.parametrize("keep", [0.01, 0.25, 0.6])
def test_exact_count_protected_and_sorted(params, shape, keep):
    cfg = TokenReductionConfig(keep=keep, **params)
    image = make_image(**shape)
    count = budget(cfg, image)
    sel = cfg.check_selection(image, cfg.select(image, count), count)
    assert sel.index.numel() == count + int(image.protected.sum())
    assert bool(image.protected[sel.index].sum() == image.protected.sum())
    assert bool((sel.index[1:] > sel.index[:-1]).all())
    assert sel.hidden is None or sel.hidden.shape == (sel.index.numel(), image.hidden.shape[1])
    if sel.hidden is not None:  # protected tokens are never merged into
        kept_protected = image.protected[sel.index]
        assert torch.equal(sel.hidden[kept_protected], image.hidden[sel.index[kept_protected]])
    again = cfg.select(image, count)  # deterministic
    assert torch.equal(again.index, sel.index)
    assert (again.hidden is None) == (sel.hidden is None)
    if sel.hidden is not None:
        assert torch.equal(again.hidden, sel.hidden)


@pytest.mark.parametrize("params", EXACT + [dict(method="prumerge")],
                         ids=lambda p: "-".join(f"{v}" for v in p.values()))
def test_keep_one_is_dense(params):
    cfg = TokenReductionConfig(keep=1.0, **params)
    image = make_image(**IMAGES[2])
    sel = cfg.check_selection(image, cfg.select(image, budget(cfg, image)), budget(cfg, image))
    assert torch.equal(sel.index, torch.arange(len(image)))
    assert sel.hidden is None or torch.equal(sel.hidden, image.hidden)


@pytest.mark.parametrize("params", EXACT + [dict(method="prumerge")],
                         ids=lambda p: "-".join(f"{v}" for v in p.values()))
def test_one_token_and_half_precision(params):
    cfg = TokenReductionConfig(**params)
    image = make_image(n=64, grid=(8, 8), dtype=torch.float16)
    sel = cfg.check_selection(image, cfg.select(image, 1), 1)
    assert sel.index.numel() == 1
    assert sel.hidden is None or sel.hidden.dtype == torch.float16


def test_visionzip_by_hand():
    # 8 tokens: 0 and 5 dominate; the other 6 (1, 2, 3, 4, 6, 7) merge into targets 1 and 4 (uniform stride 3).
    importance = torch.tensor([9.0, 1, 1, 1, 1, 8, 1, 1])
    keys = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0.9, 0.1, 0], [0.1, 0.9, 0], [0, 1, 0], [0, 0, 1],
                         [1, 0.2, 0], [0.2, 1, 0]])
    hidden = torch.arange(8.0)[:, None] * torch.tensor([[1.0, -1.0]])
    image = ImageTokens(hidden, importance, keys, None, torch.zeros(8, dtype=torch.bool))
    cfg = TokenReductionConfig(method="visionzip", contextual_fraction=0.5)
    sel = cfg.check_selection(image, cfg.select(image, 4), 4)
    assert sel.index.tolist() == [0, 1, 4, 5]
    assert torch.equal(sel.hidden[[0, 3]], hidden[[0, 5]])  # dominant tokens as they were
    torch.testing.assert_close(sel.hidden[1], hidden[[1, 2, 6]].mean(0))  # target 1 with 2 and 6
    torch.testing.assert_close(sel.hidden[2], hidden[[3, 4, 7]].mean(0))  # target 4 with 3 and 7


def test_visionzip_split_follows_the_paper():
    cfg = TokenReductionConfig(method="visionzip", keep=1 / 9)
    image = make_image()
    count = cfg.kept_count(576)
    sel = cfg.select(image, count)
    dominant = torch.argsort(image.importance, descending=True, stable=True)[:54]
    assert count == 64 and bool(torch.isin(dominant, sel.index).all())
    unchanged = (sel.hidden == image.hidden[sel.index]).all(dim=-1)
    assert int(unchanged.sum()) >= 54  # the dominant tokens carry their own states; 10 contextual ones are means


def test_prumerge_by_hand():
    importance = torch.tensor([2.0, 2.0, 1.0, 1.0])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    hidden = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [6.0, 1.0]])
    image = ImageTokens(hidden, importance, keys, None, torch.zeros(4, dtype=torch.bool))
    cfg = TokenReductionConfig(method="prumerge", adaptive=False, neighbors=1)
    sel = cfg.check_selection(image, cfg.select(image, 2), 2)
    assert sel.index.tolist() == [0, 1]
    torch.testing.assert_close(sel.hidden[0], (2 * hidden[0] + 1 * hidden[2]) / 3)
    torch.testing.assert_close(sel.hidden[1], (2 * hidden[1] + 1 * hidden[3]) / 3)
    both = TokenReductionConfig(method="prumerge", adaptive=False, neighbors=5)  # every pruned token joins both
    sel = both.select(image, 2)
    torch.testing.assert_close(sel.hidden[0], (2 * hidden[0] + hidden[2] + hidden[3]) / 4)


def test_prumerge_adaptive_count_is_the_outliers_up_to_the_budget():
    image = make_image(n=100, grid=(10, 10))
    image.importance = torch.full((100,), 1.0) + torch.rand(100, generator=torch.Generator().manual_seed(1)) * 0.1
    image.importance[[3, 17, 42, 77, 90]] = 50.0
    cfg = TokenReductionConfig(method="prumerge")
    sel = cfg.check_selection(image, cfg.select(image, 25), 25)
    assert sel.index.tolist() == [3, 17, 42, 77, 90]
    assert cfg.select(image, 3).index.numel() == 3  # keep is an upper bound
    image.importance = torch.ones(100)  # no outliers: the single top token
    assert cfg.select(image, 25).index.numel() == 1


def test_prumerge_plus_spreads_over_the_grid():
    image = make_image(n=576, grid=(24, 24))
    rows = torch.arange(576) // 24
    cols = torch.arange(576) % 24
    image.importance = torch.where((rows < 6) & (cols < 6), 10.0, 1.0)  # all the attention in one corner
    image.importance[0] = 100.0
    cfg = TokenReductionConfig(method="prumerge", plus=True)
    sel = cfg.select(image, 144)
    assert sel.index.numel() == 144
    r, c = rows[sel.index], cols[sel.index]
    quadrants = {(int(a) >= 12, int(b) >= 12) for a, b in zip(r, c)}
    assert len(quadrants) == 4
    assert int(((r >= 12) & (c >= 12)).sum()) >= 20  # far from the attended corner, well covered


def test_turbo_by_hand():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [0.9, 1.0]])
    hidden = torch.tensor([[1.0], [3.0], [10.0], [20.0], [100.0], [200.0]])
    image = ImageTokens(hidden, torch.ones(6), keys, None, torch.zeros(6, dtype=torch.bool))
    cfg = TokenReductionConfig(method="turbo", alpha=0.0)
    sel = cfg.check_selection(image, cfg.select(image, 3), 3)
    assert sel.index.tolist() == [1, 3, 5]
    torch.testing.assert_close(sel.hidden.flatten(), torch.tensor([2.0, 15.0, 150.0]))
    # Two rounds: down to 2, the pairs' means merge again with size weights (the mean of 4 original rows).
    sel = cfg.select(image, 2)
    assert sel.index.numel() == 2
    means = {round(float(v), 4) for v in sel.hidden.flatten()}
    assert means in ({2.0, (10 + 20 + 100 + 200) / 4}, {(1 + 3 + 100 + 200) / 4, 15.0},
                     {(1 + 3 + 10 + 20) / 4, 150.0})


def test_turbo_semantic_value_keeps_important_tokens():
    image = make_image(n=200, grid=None)
    image.importance = torch.ones(200)
    image.importance[[0, 50, 100]] = 500.0  # A-side tokens (even places) the tower attends to
    important = torch.tensor([0, 50, 100])
    for alpha in (0.05, 1.0):  # half of the A side merges; the important tokens never do
        sel = TokenReductionConfig(method="turbo", alpha=alpha).select(image, 150)
        assert bool(torch.isin(important, sel.index).all())
    image.keys[1] = image.keys[0]  # token 0 duplicates its neighbour exactly: alpha = 0 (plain ToMe) merges it
    assert not bool(torch.isin(important[:1], TokenReductionConfig(method="turbo", alpha=0.0).select(image, 150).index))


def test_large_image_runs():
    image = make_image(n=2880, d=32, grid=(48, 60))
    for params in EXACT + [dict(method="prumerge")]:
        cfg = TokenReductionConfig(keep=0.1, **params)
        count = cfg.kept_count(2880)
        sel = cfg.check_selection(image, cfg.select(image, count), count)
        assert sel.index.numel() <= count


@pytest.mark.parametrize("params, field", [
    (dict(method="visionzip", contextual_fraction=1.0), "contextual_fraction"),
    (dict(method="visionzip", contextual_fraction=-0.1), "contextual_fraction"),
    (dict(method="visionzip", keep=0.0), "keep"),
    (dict(method="prumerge", neighbors=0), "neighbors"),
    (dict(method="prumerge", uniform_fraction=1.5), "uniform_fraction"),
    (dict(method="prumerge", adaptive="yes"), "adaptive"),
    (dict(method="prumerge", plus=1), "plus"),
    (dict(method="prumerge", keep=1.5), "keep"),
    (dict(method="turbo", alpha=-1.0), "alpha"),
    (dict(method="turbo", metric="values"), "metric"),
    (dict(method="turbo", alpha=float("nan")), "alpha"),
])
def test_bad_fields_name_the_field(params, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(**params)
    assert err.value.field == field
    assert field in str(err.value)


def test_round_trip_and_params():
    for params in EXACT:
        cfg = TokenReductionConfig(**params)
        assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.insertion == "before_llm" and cfg.stage == "visual"
