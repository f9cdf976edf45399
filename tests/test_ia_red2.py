"""IA-RED² (multi-head interpreters, REINFORCE): tiny ViT and BERT, threshold and top-k drops, interpretable keep
probabilities, sampled actions in training, the trainer, save/load of the interpreters."""

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
from hf_tokred.methods.encoder.ia_red2 import (
    IARed2Config,
    MultiHeadInterpreter,
    keep_probabilities,
    kept_tokens,
    policy_stages,
)
from hf_tokred.recipes.ia_red2 import add_train_command, ia_red2_loss, train_ia_red2

LAYERS = 4





def nets_of(model):
    return model.hf_tokred_modules["ia_red2"]


def randomize(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in nets_of(model).parameters():
            p.normal_(0, 0.5)


def test_config_fields_and_errors():
    cfg = TokenReductionConfig(method="ia_red2", keep_rate=0.6, select="top_k")
    assert isinstance(cfg, IARed2Config) and cfg.learned and cfg.paper == "2106.12620"
    assert cfg.reducing_layers(12) == [3, 6, 9] and cfg.schedule(4) == [None, 0.6, 0.6, 0.6]
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    for field, bad in (("keep_rate", 0.0), ("select", "random"), ("threshold", 1.0), ("interpreter_dim", 0),
                       ("heads", 0), ("layers", [1, 1]), ("interpreter_dim", 30)):
        with pytest.raises(ConfigError) as info:
            TokenReductionConfig(method="ia_red2", **{field: bad})
        assert info.value.field == field
    model = make_vit()
    with pytest.raises(ConfigError, match="layers: block 9 does not exist"):
        hf_tokred.apply(model, {"method": "ia_red2", "layers": [9]})
    assert not hasattr(model, "hf_tokred_modules")


def test_interpreter_heads_average_and_start_at_keep_rate():
    torch.manual_seed(0)
    net = MultiHeadInterpreter(32, width=16, heads=4, keep_rate=0.7)
    logits, per_head = net(torch.randn(2, 9, 32))
    torch.testing.assert_close(logits, per_head.mean(-1))
    assert (torch.sigmoid(logits) - 0.7).abs().max() < 0.25


def test_keep_rate_one_is_bit_identical_and_remove_restores(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "ia_red2", "keep_rate": 1.0})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        hf_tokred.apply(model, {"method": "ia_red2", "keep_rate": 0.5, "select": "top_k"})
        assert model(pixel_values=images).last_hidden_state.shape[1] < dense.shape[1]
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)


def test_top_k_counts_and_interpretable_probabilities(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "ia_red2", "keep_rate": 0.5, "select": "top_k", "layers": [1, 2]})
    randomize(model)
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
    assert token_counts(model) == [65, 33, 17, 17] and out.shape[1] == 17
    probs = keep_probabilities(model)
    assert len(probs) == 2 and probs[0].shape == (3, 65) and (probs[0][:, 0] == 1).all()
    kept = kept_tokens(model)
    assert kept.sum(dim=1).tolist() == [17, 17, 17]
    assert torch.equal(kept, model.__dict__[STATE_ATTR].origin >= 0)  # the tokens that reach the output
    # stage 1 saw only the tokens stage 0 kept; the kept ones are the most probable of them
    assert ((probs[1] > 0) <= (probs[0] >= probs[0][:, 1:].topk(32, dim=1).values[:, -1:])).all()
    for row in range(3):
        chosen = probs[1][row, 1:][kept[row, 1:]]
        rejected = probs[1][row, 1:][(probs[1][row, 1:] > 0) & ~kept[row, 1:]]
        assert chosen.min() >= rejected.max()


def test_threshold_keeps_exactly_the_probable_tokens_and_batch_equals_rows(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "ia_red2", "layers": [1], "threshold": 0.5})
    randomize(model)
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
        probs = keep_probabilities(model)[0]
        sizes = token_sizes(model)
        expected = (probs > 0.5).sum(dim=1)
        assert sizes.sum(dim=1).tolist() == expected.float().tolist()
        assert len(set(expected.tolist())) > 1  # rows keep different numbers of tokens (filler slots)
        for row in range(3):
            alone = model(pixel_values=images[row:row + 1]).last_hidden_state[0]
            real = sizes[row] > 0
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("select", ["top_k", "threshold"])
def test_squeeze_keeps_the_same_tokens_and_carries_the_dropped_ones(images, select):
    model = make_vit()
    # one stage: a later stage would see the squeezed states and may choose differently
    setting = {"method": "ia_red2", "keep_rate": 0.5, "select": select, "layers": [1]}
    hf_tokred.apply(model, setting)
    randomize(model)
    state = nets_of(model).state_dict()
    with torch.no_grad():
        dropped_out = model(pixel_values=images).last_hidden_state
        dropped_counts, dropped_kept = token_counts(model), kept_tokens(model)
        hf_tokred.apply(model, {**setting, "squeeze": True})
        nets_of(model).load_state_dict(state)
        out = model(pixel_values=images).last_hidden_state
        assert token_counts(model) == dropped_counts and torch.equal(kept_tokens(model), dropped_kept)
        assert (token_sizes(model).sum(dim=1) == 65).all()  # every token is carried by a kept one
        assert not torch.allclose(out, dropped_out)
        real = token_sizes(model) > 0
        for row in range(3):
            alone = model(pixel_values=images[row:row + 1]).last_hidden_state[0]
            torch.testing.assert_close(out[row][real[row]], alone, rtol=1e-5, atol=1e-5)


def test_padded_bert_batch_equals_each_row_alone():
    model = make_bert()
    hf_tokred.apply(model, {"method": "ia_red2", "keep_rate": 0.6, "layers": [1, 3], "select": "top_k"})
    randomize(model)
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        sizes = token_sizes(model)
        probs = keep_probabilities(model)[0]
        assert (probs[:, 17:][batch["attention_mask"][:, 17:] == 0] == 0).all()  # padding is never kept
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            real = sizes[row] > 0
            assert alone.shape[0] == int(real.sum()) == 1 + -(-3 * -(-3 * (length - 1) // 5) // 5)
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


def test_training_samples_actions_masks_keys_and_reinforce_reaches_the_interpreters():
    model = make_bert()
    hf_tokred.apply(model, {"method": "ia_red2", "keep_rate": 0.5, "layers": [1, 2]})
    batch = padded_batch()
    nets_of(model).train()
    for p in nets_of(model).parameters():
        p.requires_grad_(True)
    torch.manual_seed(0)
    loss, parts = ia_red2_loss(model, batch, surrogate_weight=0.0, return_parts=True)
    assert model.__dict__[STATE_ATTR].token_counts == [30] * LAYERS
    stages = policy_stages(model)
    assert [s.target for s in stages] == [0.5, 0.25]
    assert set(stages[0].action.unique().tolist()) <= {0.0, 1.0}
    assert not (stages[1].deciding & (stages[0].action == 0) & stages[0].deciding).any()  # dropped stays dropped
    assert set(parts) == {"cos", "ratio", "reinforce", "reward"}
    loss.backward()  # pure REINFORCE: the gradient comes from the log-probabilities of the actions
    grads = [p.grad for p in nets_of(model).parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    nets_of(model).eval()
    with pytest.raises(TokenReductionError, match="eval mode"):
        ia_red2_loss(model, batch)


def test_trainer_errors_and_train_save_load_identical(tmp_path):
    model = make_bert()
    with pytest.raises(TokenReductionError, match="no ia_red2 reduction"):
        train_ia_red2(model, [padded_batch()], steps=1, progress=False)
    config = {"method": "ia_red2", "keep_rate": 0.6, "layers": [1, 2]}
    hf_tokred.apply(model, config)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    before = {k: v.clone() for k, v in nets_of(model).state_dict().items()}
    teacher = make_bert()
    batches = [padded_batch(s) for s in range(3)]
    losses = train_ia_red2(model, batches, teacher=teacher, steps=6, lr=1e-2, shuffle=True, progress=False)
    assert len(losses) == 6 and all(v == v for v in losses)
    after = nets_of(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    other = make_bert()
    hf_tokred.apply(other, config)
    assert train_ia_red2(other, batches, teacher=teacher, steps=6, lr=1e-2, shuffle=True, progress=False) == losses
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(f"ia_red2.{k}" for k in after)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**test).last_hidden_state, out)
    assert torch.equal(keep_probabilities(loaded)[0], keep_probabilities(model)[0])


def test_train_command_is_parsed():
    sub = argparse.ArgumentParser().add_subparsers()
    add_train_command(sub)
    args = sub.choices["ia_red2"].parse_args(["--keep-rate", "0.5", "--select", "threshold", "--surrogate-weight", "0"])
    assert (args.keep_rate, args.select, args.surrogate_weight, args.layers) == (0.5, "threshold", 0.0, [2])
