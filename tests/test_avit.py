"""A-ViT (per-token halting): tiny ViT and BERT, hard halting at inference, soft masks and losses in training,
the trainer, save/load of the halting heads."""

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
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError
from hf_tokred.integration.encoders import STATE_ATTR, token_counts, token_sizes
from hf_tokred.methods.encoder.avit import AViTConfig, HaltingHeads, halting_depths, halting_record
from hf_tokred.recipes.avit import add_train_command, avit_loss, train_avit
from hf_tokred.training import dense_pass

LAYERS = 4





def heads_of(model):
    return model.hf_tokred_modules["avit"]


def randomize(model, std=0.5):
    """Distinct random head weights (as if trained): tokens halt at different depths."""
    torch.manual_seed(5)
    with torch.no_grad():
        for head in heads_of(model).heads:
            head.weight.normal_(0, std)


def test_config_fields_and_errors():
    cfg = TokenReductionConfig(method="avit", target_depth=0.5)
    assert isinstance(cfg, AViTConfig) and cfg.learned and cfg.paper == "2112.07658"
    assert cfg.halting_blocks(4) == [1, 2, 3] and cfg.schedule(4) == [None, True, True, True]
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    prior, depths = cfg.target_distribution(4)
    assert depths == [1, 2, 3, 4] and int(prior.argmax()) == 1  # centred at 0.5 * 4 = 2 blocks
    for field, bad in (("target_depth", 0.0), ("target_depth", 1.5), ("eps", 0.0), ("eps", 1.0), ("prior_std", 0.0),
                       ("layers", [1, 1]), ("layers", [0, 2])):
        with pytest.raises(ConfigError) as info:
            TokenReductionConfig(method="avit", **{field: bad})
        assert info.value.field == field
    model = make_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="layers: block 7 does not exist"):
        hf_tokred.apply(model, {"method": "avit", "layers": [7]})
    assert not hasattr(model, "hf_tokred_modules") and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_halting_heads_start_at_the_initial_score():
    heads = HaltingHeads(16, [1, 2, 3], initial_score=0.3)
    h = heads(torch.randn(2, 7, 16), 0)
    assert torch.allclose(h, torch.full_like(h, 0.3), atol=0.05)
    assert AViTConfig(target_depth=1.0).initial_score(4) == 0.99 / 3
    assert AViTConfig(target_depth=0.5, layers=[2, 3], eps=0.5).initial_score(8) == 0.25


def test_no_halting_is_bit_identical_and_remove_restores(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "avit", "layers": []})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        # heads that never reach 1 - eps: nothing halts, nothing changes
        hf_tokred.apply(model, {"method": "avit", "target_depth": 1.0, "layers": [3]})
        heads_of(model).heads[0].bias.fill_(-10.0)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        assert (halting_depths(model) == LAYERS).all()
        hf_tokred.apply(model, {"method": "avit", "target_depth": 0.5})
        assert model(pixel_values=images).last_hidden_state.shape[1] < dense.shape[1]
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        assert not hasattr(model, "hf_tokred_modules")


def test_tokens_halt_at_different_depths_counts_match_cls_kept_batch_equals_rows(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "avit", "target_depth": 0.6})
    randomize(model)
    assert not heads_of(model).training
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
        depth = halting_depths(model)
        state = model.__dict__[STATE_ATTR]
        assert (depth[:, 0] == LAYERS).all()  # CLS never halts
        assert len(set(depth[:, 1:].flatten().tolist())) >= 3  # tokens stop at different depths
        for block, counts in enumerate(state.row_counts):
            # a token runs block b iff it halted after it: depth > b
            assert counts.tolist() == (depth > block).sum(dim=1).tolist()
        assert token_counts(model)[-1] == out.shape[1] == int((depth == LAYERS).sum(dim=1).max())
        sizes = token_sizes(model)
        assert sizes.sum(dim=1).tolist() == (depth == LAYERS).sum(dim=1).float().tolist()
        rows = [model(pixel_values=images[i:i + 1]).last_hidden_state[0] for i in range(3)]
        for row, alone in enumerate(rows):
            real = sizes[row] > 0
            assert alone.shape[0] == int(real.sum())
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


def test_padded_bert_batch_equals_each_row_alone_and_restore_length():
    model = make_bert()
    hf_tokred.apply(model, {"method": "avit", "target_depth": 0.5, "restore_length": True})
    randomize(model)
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        depth = halting_depths(model)
        assert out.shape == (3, 30, 64) and torch.isfinite(out).all()
        assert (depth[:, 1:] < LAYERS).any()
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            assert halting_depths(model)[0].tolist() == depth[row, :length].tolist()
            torch.testing.assert_close(out[row, :length], alone, rtol=1e-5, atol=1e-5)


def test_top_k_halts_the_prior_share_of_every_row_by_cumulative_score():
    cfg = TokenReductionConfig(method="avit", target_depth=0.6, layers=[1, 2, 3], select="top_k")
    prior, depths = cfg.target_distribution(LAYERS)
    assert cfg.expected_depth(LAYERS) == pytest.approx(float((prior * torch.tensor(depths)).sum()) / LAYERS, abs=1e-6)
    with pytest.raises(ConfigError) as info:
        TokenReductionConfig(method="avit", select="topk")
    assert info.value.field == "select"
    model = make_bert()
    hf_tokred.apply(model, cfg)
    randomize(model)
    batch = padded_batch()
    lengths = (30, 17, 9)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        depth = halting_depths(model)
        kept_in_batch = token_sizes(model) > 0
        # exact counts: before each halting block a row keeps ceil(share * running candidates) of them
        state = model.__dict__[STATE_ATTR]
        for row, length in enumerate(lengths):
            running = length - 1  # [CLS] is protected
            for stage, block in enumerate(cfg.halting_blocks(LAYERS)):
                share = (1 - float(prior[: stage + 1].sum())) / (1 - float(prior[:stage].sum()))
                running = max(1, int(torch.ceil(torch.tensor(running * share - 1e-9))))
                assert int(state.row_counts[block][row]) == running + 1
            assert depth[row, 0] == LAYERS  # protected
        # the first halting block halts the candidates of highest halting score (its input is block 0's output)
        with dense_pass(model):
            first_input = model(**batch, output_hidden_states=True).hidden_states[1]
        score = heads_of(model)(first_input, 0)
        for row, length in enumerate(lengths):
            halted = depth[row, 1:length] == 1
            assert 0 < int(halted.sum()) < length - 1
            assert score[row, 1:length][halted].min() >= score[row, 1:length][~halted].max()
        for row, length in enumerate(lengths):  # batched == each row alone
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            assert halting_depths(model)[0].tolist() == depth[row, :length].tolist()
            assert alone.shape[0] == int(kept_in_batch[row].sum())
            torch.testing.assert_close(out[row][kept_in_batch[row]], alone, rtol=1e-5, atol=1e-5)


def test_training_mode_keeps_every_token_masks_halted_keys_and_the_loss_reaches_the_heads():
    model = make_bert()
    hf_tokred.apply(model, {"method": "avit", "target_depth": 0.5})
    randomize(model, std=0.2)
    batch = padded_batch()
    heads_of(model).train()
    loss, parts = avit_loss(model, batch, return_parts=True)
    assert set(parts) == {"cos", "ponder", "prior_kl"} and all(v == v for v in parts.values())
    record = halting_record(model)
    assert len(record.stages) == LAYERS - 1
    assert model.__dict__[STATE_ATTR].token_counts == [30] * LAYERS  # nothing dropped in training
    # the ACT masses of every candidate token sum to 1
    candidates = record.stages[0].running > 0
    total = sum(s.mass for s in record.stages) + record.running.float() * (1 - record.cumulative)
    torch.testing.assert_close(total[candidates], torch.ones(int(candidates.sum())))
    for p in heads_of(model).parameters():
        p.requires_grad_(True)
    loss.backward()
    grads = [p.grad for p in heads_of(model).parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    heads_of(model).eval()
    with pytest.raises(TokenReductionError, match="eval mode"):
        avit_loss(model, batch)


def test_trainer_errors_and_train_save_load_identical(tmp_path):
    model = make_bert()
    with pytest.raises(TokenReductionError, match="no avit reduction"):
        train_avit(model, [padded_batch()], steps=1, progress=False)
    hf_tokred.apply(model, {"method": "avit", "target_depth": 0.6, "restore_length": True})
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    before = {k: v.clone() for k, v in heads_of(model).state_dict().items()}
    teacher = make_bert()
    losses = train_avit(model, [padded_batch(s) for s in range(3)], teacher=teacher, steps=6, lr=2e-2,
                        shuffle=True, progress=False)
    assert len(losses) == 6 and all(v == v for v in losses)
    after = heads_of(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    assert not model.training and not heads_of(model).training
    again_losses = train_avit(make_bert_with({"method": "avit", "target_depth": 0.6, "restore_length": True}),
                              [padded_batch(s) for s in range(3)], teacher=teacher, steps=6, lr=2e-2, shuffle=True,
                              progress=False)
    assert again_losses == losses  # seeded
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(f"avit.{k}" for k in after)
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "avit" in k]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**test).last_hidden_state, out)


def make_bert_with(config):
    model = make_bert()
    hf_tokred.apply(model, config)
    return model


def test_train_command_is_parsed():
    sub = argparse.ArgumentParser().add_subparsers()
    add_train_command(sub)
    args = sub.choices["avit"].parse_args(["--steps", "3", "--target-depth", "0.6", "--layers", "2", "3"])
    assert (args.steps, args.target_depth, args.layers, args.no_restore, args.select) == (3, 0.6, [2, 3], False, "top_k")
    assert sub.choices["avit"].parse_args(["--select", "threshold"]).select == "threshold"
    assert callable(args.handler)
