"""DiffRate (prune by CLS attention + merge into the most similar important token, per-block schedule):
config, tensor functions, tiny ViT/DeiT/BERT, save/load of the schedule, calibration for a FLOPs target."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_vit as make_vit
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
)

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError
from hf_tokred.integration.encoders import source_map, token_counts, token_sizes
from hf_tokred.methods.encoder.diffrate import (
    DiffRateConfig,
    calibrate,
    diffrate_reductions,
    expected_flops,
    kept_after,
    measure_sensitivity,
    merge_into_important,
)

IMAGE, PATCH, LAYERS = 32, 4, 4
TOKENS = (IMAGE // PATCH) ** 2 + 1  # 64 patches + CLS


def make_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def padded_batch():
    g = torch.Generator().manual_seed(2)
    lengths = [30, 17, 9]
    ids = torch.randint(5, 64, (3, max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids[:, 0] = 2
    return ids, mask, lengths


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, bad", [("prune", [-1]), ("prune", [1.0]), ("merge", [0.5, "x"]), ("merge", [True]),
                                        ("prune", 3), ("merge", [float("nan")])])
def test_bad_schedule_values_are_rejected_naming_the_field(field, bad):
    with pytest.raises(ConfigError) as info:
        TokenReductionConfig(method="diffrate", **{field: bad, ("merge" if field == "prune" else "prune"): [0]})
    assert info.value.field == field


def test_an_empty_schedule_is_an_error_that_points_to_calibrate():
    with pytest.raises(ConfigError, match="calibrate") as info:
        TokenReductionConfig(method="diffrate")
    assert info.value.field == "prune"
    with pytest.raises(ConfigError, match="flops_target"):
        TokenReductionConfig(method="diffrate", prune=[1], flops_target=1.5)


def test_schedule_round_trip_and_too_long():
    cfg = TokenReductionConfig(method="diffrate", prune=[4, 0.25], merge=[0, 2, 0.1], flops_target=0.7)
    assert isinstance(cfg, DiffRateConfig) and cfg.paper == "2305.17997"
    assert cfg.schedule(4) == [(4, 0), (0.25, 2), (0, 0.1), None]
    again = TokenReductionConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.prune[0], int) and isinstance(again.prune[1], float)
    with pytest.raises(ConfigError, match="merge: the list has 3 values but the model has 2 blocks"):
        cfg.schedule(2)


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


def test_kept_after_counts_and_fractions():
    counts = torch.tensor([64, 5, 1, 0])
    assert kept_after(counts, 8).tolist() == [56, 1, 1, 0]
    assert kept_after(counts, 0.25).tolist() == [48, 4, 1, 0]
    assert kept_after(counts, 0).tolist() == counts.tolist()


def test_merge_goes_to_the_most_similar_important_token_and_protected_tokens_stay():
    importance = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0]])  # CLS's own score does not matter
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.2, 1.0], [1.0, 0.1]]])
    r = merge_into_important(importance, metric, torch.tensor([2]), protected=1)
    # tokens 1 and 3 stay (most important); token 2 joins 3 (similar), token 4 joins 1; CLS stays alone
    assert r.slot_of().tolist() == [[0, 1, 2, 2, 1]]
    x = torch.tensor([[[10.0], [1.0], [2.0], [4.0], [3.0]]])
    y, size = r.apply(x, torch.ones(1, 5, 1))
    assert y.flatten().tolist() == [10.0, 2.0, 3.0] and size.flatten().tolist() == [1.0, 2.0, 2.0]


def test_prune_then_merge_counts_per_row_with_padding():
    g = torch.Generator().manual_seed(0)
    importance, metric = torch.rand(2, 12, generator=g), torch.randn(2, 12, 4, generator=g)
    valid = torch.arange(12)[None] < torch.tensor([[12], [7]])
    reductions = diffrate_reductions(importance, metric, 0.5, 2, protected=1, valid=valid)
    size = valid.float()[..., None]
    x = torch.randn(2, 12, 3, generator=g)
    for r in reductions:
        x, size = r.apply(x, size)
    real = (size[..., 0] > 0).sum(dim=1).tolist()
    assert real == [1 + 6 - 2, 1 + 3 - 2]  # CLS + ceil(0.5 * 11) - 2 ; CLS + ceil(0.5 * 6) - 2
    assert diffrate_reductions(importance, metric, 0, 0.0, protected=1) == []


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_zero_schedule_is_bit_identical_and_remove_restores(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "diffrate", "prune": [0], "merge": [0, 0.0]})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        hf_tokred.apply(model, {"method": "diffrate", "prune": [8] * LAYERS, "merge": [4] * LAYERS})
        assert not torch.equal(model(pixel_values=images)[0][:, :1], dense[:, :1])
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)


def test_exact_token_counts_cls_kept_and_batch_equals_rows(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "diffrate", "prune": [8, 4, 0, 2], "merge": [4, 0.125, 6, 0]})
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
        # 65 -> 65-8-4 = 53 -> prune 4 (48 unprotected left), merge 48 - ceil(0.875 * 48) = 6 -> 43 -> 37 -> 35
        assert token_counts(model) == [53, 43, 37, 35]
        assert out.shape == (3, 35, 64)
        origin = source_map(model)
        assert origin[:, 0, 0].all() and origin[:, 0].sum(dim=-1).eq(1).all()  # CLS alone, first
        # a token's size is the number of input tokens it carries; pruned tokens (and what they carried) are gone
        assert torch.equal(token_sizes(model), origin.sum(dim=-1).float())
        assert (token_sizes(model).sum(dim=1) <= TOKENS - 8 - 4 - 2).all()
        rows = torch.cat([model(pixel_values=images[i:i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(rows, out, rtol=1e-5, atol=1e-5)


def test_deit_keeps_both_class_tokens():
    torch.manual_seed(0)
    config = DeiTConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=64, num_hidden_layers=LAYERS,
                        num_attention_heads=4, intermediate_size=128, num_labels=3)
    config._attn_implementation = "sdpa"
    model = DeiTForImageClassificationWithTeacher(config).eval()
    hf_tokred.apply(model, {"method": "diffrate", "prune": [0.3] * LAYERS, "merge": [0.2] * LAYERS})
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    origin = source_map(model)
    assert logits.shape == (2, 3)
    assert origin[:, 0, 0].all() and origin[:, 1, 1].all() and origin[:, :2].sum(dim=-1).eq(1).all()


def test_padded_bert_batch_equals_each_row_alone():
    model = make_bert()
    ids, mask, lengths = padded_batch()
    hf_tokred.apply(model, {"method": "diffrate", "prune": [0.2, 0.1], "merge": [0.1, 0.2, 0.3]})
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        sizes = token_sizes(model)
        for row, length in enumerate(lengths):
            alone = model(input_ids=ids[row:row + 1, :length]).last_hidden_state[0]
            real = sizes[row] > 0
            assert alone.shape[0] == int(real.sum())
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


def test_schedule_saves_and_loads_with_the_model(tmp_path, images):
    model = make_vit()
    cfg = TokenReductionConfig(method="diffrate", prune=[6, 0.1], merge=[0, 4, 0.2], flops_target=0.8)
    hf_tokred.apply(model, cfg)
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert hf_tokred.integration.wiring.get_applied(again).config == cfg
    with torch.no_grad():
        assert torch.equal(again(pixel_values=images).last_hidden_state, out)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def _flops(model, batch):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**batch)
    return counter.get_total_flops()


def test_calibrate_meets_the_flops_target_and_leaves_the_model_dense():
    model = make_bert()
    ids, mask, _ = padded_batch()
    batches = [{"input_ids": ids, "attention_mask": mask}]
    with torch.no_grad():
        dense = model(**batches[0]).last_hidden_state
    sensitivity = measure_sensitivity(model, batches)
    assert sensitivity.distortion.shape == (LAYERS, 2, 11) and (sensitivity.distortion[..., 0] == 0).all()
    assert sensitivity.distortion[..., -1].sum() > 0
    assert hf_tokred.integration.wiring.get_applied(model) is None
    for target in (0.8, 0.6):
        cfg = calibrate(model, flops_target=target, sensitivity=sensitivity)
        assert isinstance(cfg, DiffRateConfig) and cfg.flops_target == target
        assert len(cfg.prune) == len(cfg.merge) == LAYERS
        keep = 1 - torch.tensor([cfg.prune, cfg.merge]).T
        predicted = expected_flops(keep, sensitivity.tokens, 64, 128).item()
        assert target - 0.03 <= predicted <= target + 0.01
        # the counted FLOPs of the model (with padding and matching) follow the target
        full = torch.ones(1, 30, dtype=torch.long)
        single = {"input_ids": ids[:1], "attention_mask": full}
        dense_flops = _flops(model, single)
        hf_tokred.apply(model, cfg)
        ratio = _flops(model, single) / dense_flops
        hf_tokred.remove(model)
        assert abs(ratio - target) < 0.12, (ratio, target)
    # end to end from batches (a coarse rate grid keeps it quick); deterministic
    coarse = calibrate(model, batches, flops_target=0.7, rates=(0.0, 0.25, 0.5))
    assert set(coarse.prune + coarse.merge) <= {0.0, 0.25, 0.5}
    assert coarse == calibrate(model, batches, flops_target=0.7, rates=(0.0, 0.25, 0.5))
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).last_hidden_state, dense)


def test_calibrate_rejects_bad_input():
    model = make_bert()
    ids, mask, _ = padded_batch()
    batches = [{"input_ids": ids, "attention_mask": mask}]
    with pytest.raises(ConfigError, match="flops_target"):
        calibrate(model, batches, flops_target=1.5)
    with pytest.raises(TokenReductionError, match="batches is empty"):
        calibrate(model, [], flops_target=0.5)
    hf_tokred.apply(model, {"method": "tome", "r": 2})
    with pytest.raises(TokenReductionError, match="already carries a reduction"):
        calibrate(model, batches, flops_target=0.5)
