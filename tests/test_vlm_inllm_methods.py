"""SparseVLM and IVTP, the text-guided in-LLM visual-token methods, on synthetic attention (no model).

Each row's layout is [system text | visual span | instruction text]; batches are left-padded. The engine's part
(keeping each row's top ``ceil(keep * n)`` visual tokens, carriers from ``recycle``) is emulated in a few lines.
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_tokred.methods.vlm.ivtp  # noqa: F401  (registers "ivtp")
import hf_tokred.methods.vlm.sparsevlm  # noqa: F401  (registers "sparsevlm")
from hf_tokred import TokenReductionConfig
from hf_tokred.errors import ConfigError
from hf_tokred.methods.vlm.ivtp import group_ranks, rollout_step
from hf_tokred.methods.vlm.sparsevlm import (
    cluster_tokens,
    instruction_queries,
    recycle_tokens,
    select_raters,
)
from hf_tokred.vlm.base import LayerAttention

HEADS, KV_HEADS, DIM, WIDTH = 4, 2, 8, 6


def _row(length: int, span: tuple[int, int], seed: int) -> dict:
    """One row's tensors: random post-RoPE query/key and hidden states, visual tokens at ``span``."""
    gen = torch.Generator().manual_seed(seed)
    visual = torch.zeros(length, dtype=torch.bool)
    visual[span[0]:span[1]] = True
    return {"query": torch.randn(HEADS, length, DIM, generator=gen) * 2,
            "key": torch.randn(KV_HEADS, length, DIM, generator=gen) * 2,
            "hidden": torch.randn(length, WIDTH, generator=gen), "visual": visual}


def _batch(rows: list[dict]) -> tuple[LayerAttention, torch.Tensor]:
    """Left-pad ``rows`` into one causal LayerAttention (padding holds random junk that must not matter); also
    returns the ``(batch, k)`` mask of real tokens."""
    k = max(r["visual"].numel() for r in rows)
    gen = torch.Generator().manual_seed(1234)
    query = torch.randn(len(rows), HEADS, k, DIM, generator=gen)
    key = torch.randn(len(rows), KV_HEADS, k, DIM, generator=gen)
    hidden = torch.randn(len(rows), k, WIDTH, generator=gen)
    visual = torch.zeros(len(rows), k, dtype=torch.bool)
    valid = torch.zeros(len(rows), k, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = r["visual"].numel()
        query[b, :, k - n:], key[b, :, k - n:], hidden[b, k - n:] = r["query"], r["key"], r["hidden"]
        visual[b, k - n:], valid[b, k - n:] = r["visual"], True
    visible = torch.ones(k, k, dtype=torch.bool).tril()[None] & valid[:, None, :]
    return LayerAttention(query, key, DIM ** -0.5, visible, visual, valid & ~visual, hidden), valid


def _rows():
    return [_row(20, (3, 15), seed=0), _row(14, (2, 10), seed=1), _row(25, (5, 21), seed=2)]


def _keep_top(scores: torch.Tensor, visual: torch.Tensor, keep: float) -> torch.Tensor:
    """The engine's choice: each row's top ``ceil(keep * n)`` visual tokens (ties: earlier first)."""
    kept = torch.zeros_like(visual)
    for b in range(scores.shape[0]):
        n = int(visual[b].sum())
        count = min(n, max(1, math.ceil(round(keep * n, 6))))
        ranked = torch.where(visual[b], scores[b].float(), -torch.inf)
        kept[b, ranked.argsort(descending=True, stable=True)[:count]] = True
    return kept


# ---------------------------------------------------------------------------------------------
# SparseVLM
# ---------------------------------------------------------------------------------------------


def test_sparsevlm_scores_shape_finite_and_row_independent():
    rows = _rows()
    cfg = TokenReductionConfig(method="sparsevlm")
    batched, valid = _batch(rows)
    scores = cfg.score(batched, 2, {})
    assert scores.shape == batched.visual.shape
    assert torch.isfinite(scores[batched.visual]).all() and (scores[batched.visual] >= 0).all()
    for b, row in enumerate(rows):
        alone, _ = _batch([row])
        n = row["visual"].numel()
        torch.testing.assert_close(scores[b, -n:], cfg.score(alone, 2, {})[0], rtol=1e-5, atol=1e-7)
        assert torch.equal(select_raters(batched)[b, -n:], select_raters(alone)[0])
    assert (scores[~valid] == 0).all()  # nobody attends to padding


def test_sparsevlm_raters_are_instruction_text_above_the_mean():
    attention, valid = _batch(_rows())
    raters = select_raters(attention)
    assert not (raters & ~attention.text).any()  # text tokens only, never visual or padding
    candidates = instruction_queries(attention)
    assert torch.equal(candidates, attention.text & (attention.visual.long().cumsum(-1) > 0))  # text after the image
    assert (raters & ~candidates).sum() == 0 and raters.any(dim=-1).all()
    for b in range(raters.shape[0]):  # the rule by hand: attention mass on the image >= the candidates' mean
        index = candidates[b].nonzero().flatten()
        mass = (attention.query_attention(index)[b] * attention.visual[b]).sum(-1)
        assert torch.equal(raters[b, index], mass >= mass.mean() * (1 - 1e-6))
        assert 0 < int(raters[b].sum()) < index.numel()
    # the score is the raters' attention, averaged over heads and raters
    torch.testing.assert_close(TokenReductionConfig(method="sparsevlm").score(attention, 0, {}),
                               attention.attention_from(raters))


def test_sparsevlm_row_without_text_after_the_image_uses_its_last_token():
    row = _row(10, (4, 10), seed=3)  # the prompt ends on the image
    attention, _ = _batch([row])
    assert select_raters(attention)[0].nonzero().flatten().tolist() == [9]


def test_sparsevlm_recycling_by_hand():
    # 12 tokens; 0 and 1 are kept, 2..11 dropped. Fraction 1.0 recycles all 10 -> 10 // 10 + 1 = 2 clusters.
    hidden = torch.tensor([[0.0, 0.0], [0.0, 0.0],
                           [10.0, 0.0], [0.0, 1.0], [11.0, 0.0], [0.0, 2.0], [12.0, 0.0],
                           [0.0, 3.0], [10.0, 1.0], [1.0, 0.0], [11.0, 1.0], [1.0, 1.0]])
    scores = torch.tensor([9.0, 9.0, 0.5, 0.9, 0.4, 0.3, 0.2, 0.1, 0.15, 0.25, 0.05, 0.35])
    dropped = torch.arange(12) >= 2
    carriers, carried = recycle_tokens(hidden, scores, dropped, fraction=1.0)
    near = [3, 5, 7, 9, 11]  # around (0, 2); its best is token 3 (0.9)
    far = [2, 4, 6, 8, 10]   # around (11, 0.4); its best is token 2 (0.5)
    assert carriers.tolist() == [2, 3]
    torch.testing.assert_close(carried, torch.stack([hidden[far].mean(0), hidden[near].mean(0)]))
    # fraction 0.3 of 10 dropped -> the best 3 (3, 2, 4) in one cluster, carried by 3
    carriers, carried = recycle_tokens(hidden, scores, dropped, fraction=0.3)
    assert carriers.tolist() == [3]
    torch.testing.assert_close(carried, hidden[[3, 2, 4]].mean(0, keepdim=True))


def test_sparsevlm_recycle_through_the_config():
    attention, _ = _batch([_row(60, (5, 55), seed=4)])
    cfg = TokenReductionConfig(method="sparsevlm", keep=0.2)
    scores = cfg.score(attention, 2, {})
    dropped = attention.visual & ~_keep_top(scores, attention.visual, 0.6)
    carriers, carried = cfg.recycle(attention.hidden[0], scores[0], dropped[0])
    # 20 dropped -> the best 6 recycled -> 1 cluster carried by the best-scored dropped token
    assert dropped[0, carriers].all() and carriers.numel() == 1
    best6 = torch.where(dropped[0], scores[0], -torch.inf).argsort(descending=True)[:6]
    assert carriers.tolist() == [int(best6[0])]
    torch.testing.assert_close(carried[0], attention.hidden[0, best6].mean(0))
    again = cfg.recycle(attention.hidden[0], scores[0], dropped[0])  # deterministic
    assert torch.equal(again[0], carriers) and torch.equal(again[1], carried)
    assert TokenReductionConfig(method="sparsevlm", recycling=False).recycle(
        attention.hidden[0], scores[0], dropped[0]) is None
    assert cfg.recycle(attention.hidden[0], scores[0], torch.zeros_like(dropped[0])) is None


def test_cluster_tokens_groups_nearest_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen) + 20])
    points = points[torch.randperm(16, generator=gen)]
    labels = cluster_tokens(points, 2)
    far = points[:, 0] > 10
    assert len(set(labels[far].tolist())) == 1 and len(set(labels[~far].tolist())) == 1
    assert labels[far][0] != labels[~far][0]
    assert torch.equal(labels, cluster_tokens(points, 2))


def test_sparsevlm_schedules():
    cfg = TokenReductionConfig(method="sparsevlm", keep=0.2)
    assert cfg.resolve_schedule(32) == [(2, 0.6), (6, 0.4), (15, 0.2)]  # the paper's layers 2, 6, 15 of 32
    assert cfg.observed_layers(32) == [2, 6, 15]
    assert TokenReductionConfig(method="sparsevlm", keep=0.4).resolve_schedule(32) == [(6, 0.8), (15, 0.4)]
    assert TokenReductionConfig(method="sparsevlm", keep=1.0).resolve_schedule(32) == []
    assert TokenReductionConfig(method="sparsevlm", schedule=[[1.0 / 3, 1.0]]).resolve_schedule(12) == []
    explicit = TokenReductionConfig(method="sparsevlm", schedule=[[1, 0.5], [0.75, 0.1]])
    assert explicit.resolve_schedule(8) == [(1, 0.5), (5, 0.1)]
    again = TokenReductionConfig.from_dict(explicit.to_dict())
    assert again == explicit and TokenReductionConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, field", [
    ({"schedule": [[2, 0.5], [1, 0.2]]}, "schedule"),          # not going deeper
    ({"schedule": [[2, 0.2], [6, 0.5]]}, "schedule"),          # keep increasing
    ({"schedule": [[2, 1.5]]}, "schedule"),
    ({"schedule": [[1.5, 0.5]]}, "schedule"),
    ({"schedule": [[-1, 0.5]]}, "schedule"),
    ({"schedule": [[2]]}, "schedule"),
    ({"schedule": "2:0.5"}, "schedule"),
    ({"keep": 0.0}, "keep"),
    ({"recycle_fraction": 0.0}, "recycle_fraction"),
    ({"recycling": "yes"}, "recycling"),
    ({"cluster_iterations": -1}, "cluster_iterations"),
])
def test_sparsevlm_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="sparsevlm", **kwargs)
    assert err.value.field == field


def test_sparsevlm_refuses_a_layer_past_the_depth():
    cfg = TokenReductionConfig(method="sparsevlm", schedule=[[2, 0.5], [31, 0.2]])
    assert cfg.resolve_schedule(33) == [(2, 0.5), (31, 0.2)]
    with pytest.raises(ConfigError, match="out of range") as err:
        cfg.resolve_schedule(32)
    assert err.value.field == "schedule"
    with pytest.raises(ConfigError) as err:
        cfg.check_schedule([(40, 0.5)], 32)
    assert err.value.field == "schedule"


# ---------------------------------------------------------------------------------------------
# IVTP
# ---------------------------------------------------------------------------------------------


def _run_rollout(cfg, attention_per_layer, num_layers=16):
    memory, scores = {}, None
    for layer, attention in zip(cfg.observed_layers(num_layers), attention_per_layer):
        scores = cfg.score(attention, layer, memory)
    return scores, memory


def test_ivtp_scores_shape_finite_and_row_independent():
    cfg = TokenReductionConfig(method="ivtp", layer=2, rollout_layers=3, group_size=4)
    assert cfg.observed_layers(16) == [0, 1, 2]
    seeds = [[0, 1, 2], [10, 11, 12], [20, 21, 22]]
    layouts = [(20, (3, 15)), (14, (2, 10)), (25, (5, 21))]
    per_layer = [[_row(n, span, seeds[b][layer]) for b, (n, span) in enumerate(layouts)] for layer in range(3)]
    batched = [_batch(rows)[0] for rows in per_layer]
    scores, memory = _run_rollout(cfg, batched)
    visual = batched[0].visual
    assert scores.shape == visual.shape and torch.isfinite(scores).all()
    assert (scores[visual] > 0).all() and (scores[~visual] == 0).all()
    assert memory["ivtp.rollout"].shape == (3, 25, 25)
    for b, (n, _) in enumerate(layouts):
        alone, _ = _run_rollout(cfg, [_batch([rows[b]])[0] for rows in per_layer])
        torch.testing.assert_close(scores[b, -n:], alone[0])


def test_ivtp_rollout_by_hand():
    rows = [[_row(12, (2, 9), seed=s)] for s in (5, 6)]
    first, second = (_batch(r)[0] for r in rows)
    visual = first.visual[0]
    eye = torch.eye(12)

    def mixed(attention):  # full head-averaged attention, residual added
        return 0.5 * attention.query_attention(torch.arange(12))[0] + 0.5 * eye

    expected = mixed(second) @ mixed(first) @ torch.diag(visual.float())
    torch.testing.assert_close(rollout_step(second, rollout_step(first))[0], expected)
    assert (expected[:, ~visual] == 0).all()
    instruction = instruction_queries(second)[0]
    importance = expected[instruction].mean(0)
    cfg = TokenReductionConfig(method="ivtp", layer=1, rollout_layers=2, group_size=100, keep=0.5)
    scores, _ = _run_rollout(cfg, [first, second])
    # one group: the code orders the visual tokens as the importance does
    order = torch.where(visual, importance, -torch.inf).argsort(descending=True)[: int(visual.sum())]
    assert torch.equal(scores[0].argsort(descending=True)[: int(visual.sum())], order)
    # rollout_layers=1: the instruction's attention at the pruning layer alone
    single = TokenReductionConfig(method="ivtp", layer=1, rollout_layers=1, group_size=100)
    assert single.observed_layers(16) == [1]
    plain = second.attention_from(instruction_queries(second))[0]
    order = torch.where(visual, plain, -torch.inf).argsort(descending=True)[: int(visual.sum())]
    assert torch.equal(single.score(second, 1, {})[0].argsort(descending=True)[: int(visual.sum())], order)


def test_ivtp_keeps_every_groups_share():
    visual = torch.zeros(2, 40, dtype=torch.bool)
    visual[0, 4:36] = True  # 32 visual tokens: 4 groups of 8
    visual[1, 10:40] = True  # 30: groups of 8, 8, 8, 6
    importance = torch.rand(2, 40, generator=torch.Generator().manual_seed(0))
    importance[:, :20] += 10.0  # the first half of the image looks far more important
    code = group_ranks(importance, visual, 8)
    kept = _keep_top(code, visual, 0.25)
    slot = visual.long().cumsum(-1) - 1
    counts0 = [int((kept[0] & visual[0] & (slot[0] // 8 == g)).sum()) for g in range(4)]
    assert counts0 == [2, 2, 2, 2]
    counts1 = [int((kept[1] & visual[1] & (slot[1] // 8 == g)).sum()) for g in range(4)]
    assert sum(counts1) == 8 and min(counts1) >= 1 and max(counts1) <= 3  # 8 of 30: shares of 2, 2, 2, 1.5
    # within a group, the most important tokens are the ones kept
    for g in range(4):
        members = (visual[0] & (slot[0] // 8 == g)).nonzero().flatten()
        best = members[importance[0, members].argsort(descending=True)[:2]]
        assert kept[0, best].all()
    # a single group is plain top-k
    whole = _keep_top(group_ranks(importance, visual, 1000), visual, 0.25)
    assert torch.equal(whole, _keep_top(importance, visual, 0.25))


def test_ivtp_schedules():
    cfg = TokenReductionConfig(method="ivtp")
    assert cfg.params() == {"keep": 0.25, "layer": 2, "group_size": 24, "rollout_layers": 3}
    assert cfg.resolve_schedule(32) == [(2, 0.25)] and cfg.observed_layers(32) == [0, 1, 2]
    assert TokenReductionConfig(method="ivtp", layer=0.5).resolve_schedule(32) == [(15, 0.25)]
    assert TokenReductionConfig(method="ivtp", keep=1.0).resolve_schedule(32) == []
    assert TokenReductionConfig(method="ivtp", keep=1.0).observed_layers(32) == []
    fraction = TokenReductionConfig(method="ivtp", layer=0.25, keep=0.1)
    assert TokenReductionConfig.from_dict(fraction.to_dict()) == fraction


@pytest.mark.parametrize("kwargs, field", [
    ({"layer": -1}, "layer"),
    ({"layer": 1.0}, "layer"),
    ({"layer": 0.0}, "layer"),
    ({"layer": True}, "layer"),
    ({"layer": "2"}, "layer"),
    ({"layer": 2**40}, "layer"),
    ({"group_size": 0}, "group_size"),
    ({"rollout_layers": 0}, "rollout_layers"),
    ({"keep": 1.5}, "keep"),
])
def test_ivtp_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="ivtp", **kwargs)
    assert err.value.field == field


def test_ivtp_refuses_a_layer_past_the_depth():
    cfg = TokenReductionConfig(method="ivtp", layer=30)
    assert cfg.resolve_schedule(32) == [(30, 0.25)]
    for depth in (31, 8):
        with pytest.raises(ConfigError, match="out of range") as err:
            cfg.resolve_schedule(depth)
        assert err.value.field == "layer"
    with pytest.raises(ConfigError):
        cfg.observed_layers(8)
