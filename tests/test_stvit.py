"""STViT (semantic tokens stand for the rest in the middle blocks, every token recovered for the last blocks): tiny
ViT and BERT; token counts, recovery, batched == per-row, training the backbone and save/load."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import make_tiny_vit as make_vit
from test_evo_vit import flops, make_bert, padded_batch
from transformers import AutoModel

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig
from hf_tokred.integration.encoders import STATE_ATTR, token_counts, token_sizes
from hf_tokred.methods.encoder.stvit import semantic_slots
from hf_tokred.recipes.stvit import add_train_command, train_stvit


def test_config_stage_and_errors():
    cfg = TokenReductionConfig(method="stvit", ratio=0.25)
    assert cfg.stage_blocks(12) == (3, 11) and cfg.schedule(12)[3] == 0.25 and cfg.restore_after(12) == [10]
    with pytest.raises(ConfigError, match="end"):
        TokenReductionConfig(method="stvit", start=3, end=3)
    with pytest.raises(ConfigError, match="ratio"):
        TokenReductionConfig(method="stvit", ratio=1.5)
    model = make_vit()
    with pytest.raises(ConfigError, match="start"):
        hf_tokred.apply(model, {"method": "stvit", "start": 4})
    assert STATE_ATTR not in model.__dict__


def test_semantic_slots_keep_protected_and_padding_out():
    hidden = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    counts = torch.tensor([3, 2])
    slot, weight = semantic_slots(hidden, valid[..., None].float(), valid, 1, counts)
    assert (slot[:, 0] == 0).all() and (slot[1, 6:] == -1).all()
    assert slot[0, 1:].max() <= 3 and slot[1, 1:6].max() <= 2 and (slot[:, 1:6] >= 1).all()
    assert ((weight > 0) & (weight <= 1)).all()


def test_ratio_one_is_bit_identical_and_remove_restores(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "stvit", "ratio": 1.0})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        hf_tokred.apply(model, {"method": "stvit", "ratio": 0.25, "start": 1, "end": 3})
        assert model(pixel_values=images).last_hidden_state.shape == dense.shape
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)


def test_counts_recovery_and_flops(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "stvit", "ratio": 0.25, "start": 1, "end": 3})
    with torch.no_grad():
        out = model(pixel_values=images)
    counts = token_counts(model)
    assert counts[0] == 65 and 2 <= counts[1] <= 17 and counts[2] == counts[3] == 65
    assert out.last_hidden_state.shape[1] == 65 and (token_sizes(model) == 1).all()
    dense = make_vit()
    assert flops(lambda: model(pixel_values=images)) < 0.8 * flops(lambda: dense(pixel_values=images))
    with torch.no_grad():
        rows = torch.cat([model(pixel_values=images[i:i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(rows, out.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_stage_through_the_last_block_recovers_after_it(images):
    # end = num_blocks (the benchmark's MiniLM setting): every block from start on runs on the semantic tokens and
    # the recovery happens after the last block, so the output still has every token
    model = make_vit()
    hf_tokred.apply(model, {"method": "stvit", "ratio": 0.25, "start": 2, "end": 4})
    assert model.__dict__[STATE_ATTR].reducer.restore_after(4) == [3]
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
    counts = token_counts(model)  # per block output: the last block's is the recovered sequence
    assert counts[:2] == [65, 65] and 2 <= counts[2] <= 17 and counts[3] == 65 and out.shape[1] == 65
    shorter = make_vit()  # the same stage recovered before the last block
    hf_tokred.apply(shorter, {"method": "stvit", "ratio": 0.25, "start": 2, "end": 3})
    assert flops(lambda: model(pixel_values=images)) < 0.85 * flops(lambda: shorter(pixel_values=images))
    cli = argparse.ArgumentParser().add_subparsers()
    add_train_command(cli)
    args = cli.choices["stvit"].parse_args([])
    assert (args.ratio, args.start, args.end, args.iterations) == (0.5, 2, 6, 3)


def test_padded_bert_batch_equals_each_row_alone():
    model = make_bert()
    hf_tokred.apply(model, {"method": "stvit", "ratio": 0.3, "start": 1, "end": 3})
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            torch.testing.assert_close(out[row, :length], alone, rtol=1e-5, atol=1e-5)


def test_train_backbone_then_save_load_is_identical(tmp_path):
    model = make_bert()
    hf_tokred.apply(model, {"method": "stvit", "ratio": 0.3, "start": 1, "end": 3})
    batches = [padded_batch(seed) for seed in range(3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_stvit(model, batches, steps=3, lr=1e-3, progress=False)
    assert len(losses) == 3 and any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)
