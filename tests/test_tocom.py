"""ToCom (ToMe at a degree the model was not tuned for + a learned low-rank plug-in): tiny ViT and BERT, exactness of the
untrained plug-in and of remove(), per-row batches, the source-degree teacher, training, save/load of the plug-in."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import make_tiny_bert as make_bert
from conftest import make_tiny_vit as make_vit
from conftest import padded_bert_batch as padded_batch
from safetensors import safe_open
from transformers import AutoModel

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError, UnsupportedModelError
from hf_tokred.integration.encoders import token_counts, token_sizes
from hf_tokred.integration.tocom import plugin_off, source_pass
from hf_tokred.methods.encoder.tocom import LowRankDelta, compensator
from hf_tokred.recipes.tocom import add_train_command, teacher_embedding, train_tocom
from hf_tokred.training import dense_pass

LAYERS = 4





def randomize(model):
    """Give the plug-in distinct non-zero deltas (as if trained)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in compensator(model).parameters():
            p.normal_(0, 0.2)


def test_config_fields_and_errors():
    cfg = TokenReductionConfig(method="tocom", r=16, source_r=8)
    assert (cfg.rank, cfg.source_r, cfg.source_schedule(2), cfg.learned, cfg.paper) == (4, 8, [8, 8], True, "2408.06798")
    assert TokenReductionConfig(method="tocom", ratio=0.2).source_ratio == 0.0
    assert TokenReductionConfig(method="tocom").source_r == 0
    assert TokenReductionConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    for bad, name in [({"ratio": 0.2, "source_r": 2}, "source_r"), ({"r": 4, "source_ratio": 0.1}, "source_ratio"),
                      ({"ratio": 0.1, "source_ratio": 0.2}, "source_ratio"), ({"r": 4, "source_r": -1}, "source_r"),
                      ({"r": 4, "source_r": "8"}, "source_r"), ({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"),
                      ({"targets": []}, "targets")]:
        with pytest.raises(ConfigError) as err:
            TokenReductionConfig(method="tocom", **bad)
        assert err.value.field == name


def test_source_above_target_and_unmatched_targets_leave_the_model_untouched(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "tocom", "r": [4, 2], "source_r": [2, 4]})
    assert err.value.field == "source_r" and "block 1" in str(err.value)
    with pytest.raises(UnsupportedModelError, match="targets"):
        hf_tokred.apply(model, {"method": "tocom", "r": 4, "targets": ["no_such_layer"]})
    assert not hasattr(model, "hf_tokred_modules") and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)


def test_untrained_plugin_is_exactly_tome_and_r0_is_dense(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "tome", "r": 6, "metric": "hidden"})
        tome = model(pixel_values=images).last_hidden_state
        tome_counts = token_counts(model)
        hf_tokred.apply(model, {"method": "tocom", "r": 6, "source_r": 2, "metric": "hidden", "rank": 3})
        assert len(compensator(model)) == LAYERS * 6  # query, key, value, attention output, intermediate, output
        assert torch.equal(model(pixel_values=images).last_hidden_state, tome)
        assert token_counts(model) == tome_counts == [59, 53, 47, 41]
        hf_tokred.apply(model, {"method": "tocom", "r": 0})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)


def test_trained_plugin_changes_outputs_plugin_off_is_tome_and_remove_is_dense(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "tome", "r": 6})
        tome = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "tocom", "r": 6, "targets": ["o_proj", "mlp.fc2"]})
        assert len(compensator(model)) == LAYERS * 2
        randomize(model)
        compensated = model(pixel_values=images).last_hidden_state
        assert compensated.shape == tome.shape and not torch.allclose(compensated, tome)
        with plugin_off(model):
            assert torch.equal(model(pixel_values=images).last_hidden_state, tome)
        with dense_pass(model):  # the teacher pass: no merging, no deltas
            assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
    assert not any(m._forward_hooks for m in model.modules())


def test_padded_bert_batch_equals_each_row_alone():
    model = make_bert()
    hf_tokred.apply(model, {"method": "tocom", "ratio": 0.25, "metric": "hidden"})
    randomize(model)
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        sizes = token_sizes(model)
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            real = sizes[row] > 0
            assert alone.shape[0] == int(real.sum())
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


def test_source_pass_is_tome_at_the_source_degree(images):
    model = make_vit()
    with torch.no_grad():
        hf_tokred.apply(model, {"method": "tome", "r": 2})
        at_source = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "tocom", "r": 6, "source_r": 2})
        randomize(model)
        with source_pass(model):
            assert torch.equal(model(pixel_values=images).last_hidden_state, at_source)
            assert token_counts(model) == [63, 61, 59, 57]
            sizes = token_sizes(model)[..., None]
        model(pixel_values=images)
        assert token_counts(model) == [59, 53, 47, 41]  # back at the target degree afterwards
    expected = (at_source * sizes).sum(dim=1) / sizes.sum(dim=1)
    torch.testing.assert_close(teacher_embedding(model, {"pixel_values": images}), expected, rtol=1e-5, atol=1e-6)


def test_train_then_save_load_gives_identical_outputs(tmp_path):
    model = make_bert()
    teacher = make_bert()
    hf_tokred.apply(model, {"method": "tocom", "ratio": 0.3, "metric": "hidden", "rank": 2})
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    batches = [padded_batch(seed) for seed in range(3)]
    test = padded_batch(7)

    def cosine_loss():
        with torch.no_grad():
            return [1 - torch.nn.functional.cosine_similarity(
                teacher_embedding(model, batch, teacher), _student(model, batch), dim=-1).mean().item()
                for batch in batches]

    before = cosine_loss()
    losses = train_tocom(model, batches, teacher=teacher, steps=30, lr=1e-2, shuffle=True, seed=1)
    assert len(losses) == 30 and all(v == v for v in losses)
    assert sum(cosine_loss()) < sum(before)  # the plug-in compensates the merging on its training data
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())  # the model itself unchanged
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    trained = compensator(model).state_dict()
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "hf_tokred" in k or "tocom" in k]
    with safe_open(tmp_path / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(f"tocom.{k}" for k in trained)
    again = AutoModel.from_pretrained(tmp_path).eval()
    for k, v in compensator(again).state_dict().items():
        assert torch.equal(v, trained[k])
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)


def _student(model, batch):
    from hf_tokred.recipes.tocom import _pooled

    return _pooled(model, batch)


def test_training_needs_a_tocom_model_and_a_valid_loop():
    model = make_bert()
    with pytest.raises(TokenReductionError, match="no tocom reduction"):
        train_tocom(model, [padded_batch()], steps=1)
    hf_tokred.apply(model, {"method": "tocom", "r": 2})
    with pytest.raises(TokenReductionError, match="steps"):
        train_tocom(model, [padded_batch()], steps=0)
    with pytest.raises(TokenReductionError, match="empty"):
        train_tocom(model, [], steps=1)


def test_low_rank_delta_starts_at_zero_and_cli_parses():
    delta = LowRankDelta(8, 6, rank=2, scale=2.0)
    assert torch.equal(delta(torch.randn(4, 8)), torch.zeros(4, 6))
    sub = argparse.ArgumentParser().add_subparsers()
    add_train_command(sub)
    args = sub.choices["tocom"].parse_args(["--ratio", "0.2", "--rank", "8", "--steps", "5"])
    assert (args.ratio, args.rank, args.steps, args.source_ratio) == (0.2, 8, 5, 0.0)
