"""Evo-ViT (slow-fast token evolution): tiny ViT and BERT; full-length outputs, the fast path's shared residual
update, batched == per-row, training the backbone and save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_bert as make_bert
from conftest import make_tiny_vit as make_vit
from conftest import padded_bert_batch as padded_batch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig
from hf_tokred.integration.encoders import STATE_ATTR, token_counts, token_sizes
from hf_tokred.recipes.evo_vit import train_evo_vit


def flops(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_config_schedule_and_errors():
    cfg = TokenReductionConfig(method="evo_vit", keep_rate=0.5)
    assert cfg.schedule(12) == [None] * 3 + [0.5] * 9
    assert cfg.restore_after(12) == list(range(3, 12))
    assert TokenReductionConfig(method="evo_vit", keep_rate=1.0).restore_after(6) == []
    with pytest.raises(ConfigError, match="layers"):
        TokenReductionConfig(method="evo_vit", layers=[0, 2])
    with pytest.raises(ConfigError, match="keep_rate"):
        TokenReductionConfig(method="evo_vit", keep_rate=0.0)
    with pytest.raises(ConfigError, match="ema"):
        TokenReductionConfig(method="evo_vit", ema=1.0)
    model = make_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="layers"):
        hf_tokred.apply(model, {"method": "evo_vit", "layers": [7]})
    assert STATE_ATTR not in model.__dict__ and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_keep_rate_one_is_bit_identical_and_remove_restores(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 1.0})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.5})
        out = model(pixel_values=images).last_hidden_state
        assert out.shape == dense.shape and not torch.allclose(out, dense)
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)


def test_slow_tokens_run_the_block_and_placeholders_share_the_representative_update(images):
    model = make_vit(layers=3)
    hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.25, "layers": [2]})
    seen = {}
    model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("in", o[0] if isinstance(o, tuple) else o))
    model.layers[2].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(pixel_values=images)
    assert token_counts(model) == [65, 65, 65] and (token_sizes(model) == 1).all()
    record = model.__dict__[STATE_ATTR].records["evo_vit"]
    slot_of = record["slot_of"]
    assert (slot_of[:, 0] == 0).all()  # CLS on the slow path, in place
    fused = slot_of.max(dim=1).values  # the representative is the last slot: 1 + 16 slow tokens
    assert (fused == 17).all()
    update = seen["out"] - seen["in"]
    for row in range(3):
        placeholders = update[row][slot_of[row] == fused[row]]
        assert placeholders.shape[0] == 64 - 16
        torch.testing.assert_close(placeholders, placeholders[:1].expand_as(placeholders), rtol=1e-5, atol=1e-5)
        slow = update[row][(slot_of[row] < fused[row])]
        assert not torch.allclose(slow[1:], slow[1:2].expand_as(slow[1:]))
    # the slow tokens' outputs are the block run on slow tokens + representative: fewer FLOPs than dense
    dense = make_vit(layers=3)
    assert flops(lambda: model(pixel_values=images)) < 0.85 * flops(lambda: dense(pixel_values=images))


def test_post_norm_placeholders_get_the_representative_branches_before_each_layer_norm():
    # BERT's block is out = LN2(h + mlp(h)), h = LN1(x + attn(x)): a placeholder t gets the representative's
    # attention branch before LN1 and its MLP branch before LN2 (the pre-norm update x + rep_out - rep_in would
    # add post-norm outputs to a pre-norm state).
    model = make_bert(layers=3)
    hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.3, "layers": [2]})
    block = model.encoder.layer[2]
    seen = {}
    model.encoder.layer[1].register_forward_hook(lambda m, a, o: seen.__setitem__("in", o[0] if isinstance(o, tuple) else o))
    block.attention.output.dense.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o))
    block.output.dense.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))
    block.output.LayerNorm.register_forward_hook(lambda m, a, o: seen.__setitem__("reduced_out", o))
    block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    ids = torch.randint(5, 64, (2, 25), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
    slot_of = model.__dict__[STATE_ATTR].records["evo_vit"]["slot_of"]
    assert seen["attn"].shape[1] == 1 + 8 + 1  # CLS + ceil(0.3 * 24) slow tokens + the representative
    ln1, ln2 = block.attention.output.LayerNorm, block.output.LayerNorm
    reduced_out = seen["reduced_out"]  # (calling ln2 below runs the hook again)
    for row in range(2):
        rep = int(slot_of[row].max())
        placeholders = (slot_of[row] == rep).nonzero()[:, 0]
        assert len(placeholders) == 24 - 8
        with torch.no_grad():
            expected = ln2(ln1(seen["in"][row, placeholders] + seen["attn"][row, rep]) + seen["mlp"][row, rep])
        torch.testing.assert_close(seen["out"][row, placeholders], expected, rtol=1e-5, atol=1e-5)
        slow = (slot_of[row] < rep).nonzero()[:, 0]  # the slow tokens come back exactly as the block computed them
        assert torch.equal(seen["out"][row, slow], reduced_out[row, slot_of[row, slow]])
        assert not torch.allclose(seen["out"][row, placeholders[0]], seen["out"][row, placeholders[1]])


def test_global_attention_is_a_running_average_over_blocks(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.5, "layers": [1, 2, 3], "ema": 0.5})
    with torch.no_grad():
        model(pixel_values=images)
    record = model.__dict__[STATE_ATTR].records["evo_vit"]
    assert record["global"].shape == (3, 65) and (record["global"][:, 1:] >= 0).all()
    assert token_counts(model) == [65] * 4


def test_padded_bert_batch_equals_each_row_alone():
    model = make_bert()
    hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.5, "layers": [1, 2, 3]})
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        assert out.shape[:2] == batch["input_ids"].shape
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            torch.testing.assert_close(out[row, :length], alone, rtol=1e-5, atol=1e-5)


def test_train_backbone_then_save_load_is_identical(tmp_path):
    model = make_bert()
    hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.5, "layers": [1, 2]})
    batches = [padded_batch(seed) for seed in range(3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_evo_vit(model, batches, steps=4, lr=1e-3, progress=False)
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)
    with pytest.raises(hf_tokred.TokenReductionError, match="evo_vit"):
        train_evo_vit(make_bert(), batches, steps=1, progress=False)


def test_keep_rates_give_each_reducing_block_its_own_slow_path_count(images):
    cfg = TokenReductionConfig(method="evo_vit", layers=[1, 2, 3], keep_rates=[0.5, 1.0, 0.25])
    assert cfg.schedule(4) == [None, 0.5, None, 0.25] and cfg.restore_after(4) == [1, 3]
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    model = make_vit()
    widths = {}
    for index, layer in enumerate(model.layers):  # the width each block's attention runs on
        layer.attention.register_forward_hook(
            lambda m, a, o, index=index: widths.__setitem__(index, (o[0] if isinstance(o, tuple) else o).shape[1]))
    hf_tokred.apply(model, cfg)
    with torch.no_grad():
        model(pixel_values=images)
    # CLS + ceil(rate * 64) slow tokens + the representative; block 2 (rate 1.0) and block 0 see every token
    assert widths == {0: 65, 1: 1 + 32 + 1, 2: 65, 3: 1 + 16 + 1}
    assert token_counts(model) == [65] * 4
    with pytest.raises(ConfigError, match="keep_rates"):
        TokenReductionConfig(method="evo_vit", layers=[1, 2], keep_rates=[0.5])
    with pytest.raises(ConfigError, match=r"keep_rates\[0\]"):
        TokenReductionConfig(method="evo_vit", keep_rates=[1.5])
    fresh = make_vit()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ConfigError, match=r"keep_rates: expected one rate per reducing block \(3: \[1, 2, 3\]\)"):
        hf_tokred.apply(fresh, {"method": "evo_vit", "keep_rates": [0.5, 0.5]})  # default layers: blocks 1-3
    assert STATE_ATTR not in fresh.__dict__ and all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_train_command_applies_the_keep_rates_schedule(tmp_path, capsys):
    from hf_tokred.cli import main

    out = tmp_path / "evo"
    assert main(["train", "evo_vit", "--steps", "1", "--texts", "16", "--keep-rates", "0.9,0.5", "--start", "4",
                 "--ema", "0.25", "--output", str(out), "--no-progress"]) == 0
    saved = TokenReductionConfig.from_pretrained(out)
    assert (saved.layers, saved.keep_rates, saved.ema) == ([4, 5], [0.9, 0.5], 0.25)
    assert main(["train", "evo_vit", "--steps", "1", "--texts", "16", "--keep-rate", "0.5",
                 "--output", str(tmp_path / "uniform"), "--no-progress"]) == 0
    uniform = TokenReductionConfig.from_pretrained(tmp_path / "uniform")
    assert (uniform.layers, uniform.keep_rate, uniform.keep_rates, uniform.ema) == ([2, 3, 4, 5], 0.5, None, 0.0)
    capsys.readouterr()
    assert main(["train", "evo_vit", "--ema", "1.0", "--output", str(tmp_path / "bad")]) != 0  # refused, nothing written
    assert "ema: expected a number in [0, 1), got 1.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):  # a rate outside (0, 1] is refused by the parser
        main(["train", "evo_vit", "--keep-rates", "0.9,1.5"])
    assert "fractions in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one schedule or one rate, not both
        main(["train", "evo_vit", "--keep-rates", "0.9,0.5", "--keep-rate", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err
