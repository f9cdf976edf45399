"""SPViT (learned token selectors, Gumbel soft masks in training, keep top-k + one package token at inference): tiny
ViT and BERT, exact counts, package sizes, per-row batches, the budget loss, training, save/load of the selectors."""

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
from hf_tokred.integration.encoders import STATE_ATTR, source_map, token_counts, token_sizes
from hf_tokred.methods.encoder.base import squeeze_slots
from hf_tokred.methods.encoder.spvit import StageDecision, TokenSelectors, budget_loss, cost_fraction, stage_decisions
from hf_tokred.recipes.spvit import add_train_command, spvit_loss, train_spvit

LAYERS = 4





def selectors(model):
    return model.hf_tokred_modules["spvit"]


def randomize(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in selectors(model).parameters():
            p.normal_(0, 0.5)


def test_config_fields_and_errors():
    cfg = TokenReductionConfig(method="spvit", keep_rate=0.5, layers=[2])
    assert (cfg.selector_dim, cfg.package, cfg.learned, cfg.paper) == (96, True, True, "2112.13890")
    assert TokenReductionConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    for bad, name in [({"keep_rate": 0.0}, "keep_rate"), ({"selector_dim": 2}, "selector_dim"),
                      ({"gumbel_tau": 0.0}, "gumbel_tau"), ({"layers": [1, 1]}, "layers"),
                      ({"squeeze": True, "package": False}, "squeeze")]:
        with pytest.raises(ConfigError) as err:
            TokenReductionConfig(method="spvit", **bad)
        assert err.value.field == name


def test_keep_rate_one_is_bit_identical_and_remove_restores(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "spvit", "keep_rate": 1.0, "selector_dim": 16})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.5, "layers": [1], "selector_dim": 16})
        assert model(pixel_values=images).last_hidden_state.shape[1] < dense.shape[1]
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
    assert not hasattr(model, "hf_tokred_modules")
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "spvit", "layers": [9]})
    assert err.value.field == "layers" and not hasattr(model, "hf_tokred_modules")


def test_keep_top_and_package_counts_sizes_and_batch_equals_rows(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.5, "layers": [1, 2], "selector_dim": 16})
    randomize(model)
    assert not selectors(model).training
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
        # CLS + 32 kept + 1 package, then CLS + ceil(0.5 * 33) = 17 kept + 1 package
        assert token_counts(model) == [65, 34, 19, 19]
        sizes = token_sizes(model)
        # the last slot is the second stage's package; the first stage's package may have been kept by it
        assert (sizes.sum(dim=1) == 65).all() and (sizes[:, -1] > 1).all() and ((sizes > 1).sum(dim=1) <= 2).all()
        origin = source_map(model)
        assert (origin.sum(dim=1) == 1).all() and origin[:, 0, 0].all()  # every patch is carried; CLS in slot 0
        rows = torch.cat([model(pixel_values=images[i:i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(rows, out, rtol=1e-5, atol=1e-5)
    hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.5, "layers": [1], "selector_dim": 16, "package": False})
    with torch.no_grad():
        model(pixel_values=images)
    assert token_counts(model) == [65, 33, 33, 33]


def test_squeeze_folds_each_pruned_token_into_its_most_similar_kept_token(images):
    model = make_vit()
    setting = {"method": "spvit", "keep_rate": 0.5, "layers": [1], "selector_dim": 16}
    hf_tokred.apply(model, setting)
    randomize(model)
    state = model.hf_tokred_modules.state_dict()
    with torch.no_grad():
        model(pixel_values=images)
        packaged_anchors = model.__dict__[STATE_ATTR].anchor.clone()
        hf_tokred.apply(model, {**setting, "squeeze": True})
        model.hf_tokred_modules.load_state_dict(state)
        out = model(pixel_values=images).last_hidden_state
        assert token_counts(model) == [65, 33, 33, 33]  # CLS + 32 kept, no package token
        anchors = model.__dict__[STATE_ATTR].anchor
        assert torch.equal(anchors, packaged_anchors[:, :33])  # the same tokens kept, each anchoring its own slot
        origin = source_map(model)
        assert (origin.sum(dim=1) == 1).all() and (token_sizes(model).sum(dim=1) == 65).all()
        hf_tokred.remove(model)
        dense_in = model(pixel_values=images, output_hidden_states=True).hidden_states[1]  # block 1's input
        kept = torch.zeros(3, 65, dtype=torch.bool).scatter_(1, anchors, True)
        expected, _ = squeeze_slots(dense_in, kept, protected=1)
        assert torch.equal(origin.int().argmax(dim=1), expected)
        hf_tokred.apply(model, {**setting, "squeeze": True})
        model.hf_tokred_modules.load_state_dict(state)
        rows = torch.cat([model(pixel_values=images[i:i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(rows, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("squeeze", [False, True])
def test_padded_bert_batch_equals_each_row_alone(squeeze):
    model = make_bert()
    hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.6, "layers": [1], "selector_dim": 16, "squeeze": squeeze})
    randomize(model)
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        sizes = token_sizes(model)
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            real = sizes[row] > 0
            # CLS, kept, and the package token unless the pruned tokens were squeezed into the kept ones
            assert alone.shape[0] == int(real.sum()) == 1 + -(-3 * (length - 1) // 5) + (not squeeze)
            assert sizes[row].sum() == length
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


def test_cost_fraction_and_budget_loss():
    s = TokenSelectors(32, [1, 3], keep_rate=0.5, width=16)
    assert float(cost_fraction(s, [1.0, 1.0], 4, 50)) == pytest.approx(1.0)
    lin, att, n = s.linear_flops, s.attention_flops, 50
    by_hand = ((lin * n + att * n * n) + 2 * (lin * 0.5 * n + att * (0.5 * n) ** 2) + lin * 0.25 * n
               + att * (0.25 * n) ** 2) / (4 * (lin * n + att * n * n))  # block 0 dense, 1-2 at 0.5, 3 at 0.25
    assert float(cost_fraction(s, [0.5, 0.25], 4, 50)) == pytest.approx(by_hand)
    on_target = [StageDecision(torch.ones(1, 50), torch.tensor([0.5]), 50),
                 StageDecision(torch.ones(1, 50), torch.tensor([0.25]), 50)]
    assert budget_loss(s, on_target, 0.5, 4).item() == pytest.approx(0.0, abs=1e-12)
    over = [StageDecision(torch.ones(1, 50), torch.tensor([0.9], requires_grad=True), 50), on_target[1]]
    loss = budget_loss(s, over, 0.5, 4)
    loss.backward()
    assert loss.item() > 0 and over[0].kept.grad.item() > 0
    with pytest.raises(TokenReductionError, match="no stage decisions"):
        budget_loss(s, [], 0.5, 4)


def test_training_mode_keeps_every_token_and_records_decisions():
    model = make_bert()
    hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.5, "layers": [1, 2], "selector_dim": 16})
    selectors(model).train()
    batch = padded_batch()
    out = model(**batch).last_hidden_state
    assert out.shape[1] == 30
    decisions = stage_decisions(model)
    assert len(decisions) == 2 and decisions[1].policy.requires_grad
    assert ((decisions[1].policy <= decisions[0].policy) | (batch["attention_mask"] == 0)).all()
    assert (decisions[0].policy[:, 0] == 1).all()  # CLS always kept
    with pytest.raises(TokenReductionError, match="training mode"):
        selectors(model).eval()
        spvit_loss(model, batch)


def test_train_then_save_load_gives_identical_outputs(tmp_path):
    model = make_bert()
    hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.6, "layers": [1], "selector_dim": 16})
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    before = {k: v.clone() for k, v in selectors(model).state_dict().items()}
    losses = train_spvit(model, [padded_batch(seed) for seed in range(3)], steps=10, lr=3e-3, shuffle=True)
    assert len(losses) == 10 and all(v == v for v in losses)
    after = selectors(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    assert not model.training and not selectors(model).training
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(f"spvit.{k}" for k in after)
    again = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)


def test_trainer_errors_and_cli():
    model = make_bert()
    with pytest.raises(TokenReductionError, match="no spvit reduction"):
        train_spvit(model, [padded_batch()], steps=1)
    sub = argparse.ArgumentParser().add_subparsers()
    add_train_command(sub)
    args = sub.choices["spvit"].parse_args(["--keep-rate", "0.4", "--layer", "1"])
    assert (args.keep_rate, args.layer, args.steps) == (0.4, 1, 300)
