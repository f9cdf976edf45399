"""MrT5 (method "mrt5"): the delete gate on T5 models, its outputs, generate(), save/load, errors, the recipe and CLIs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from hf_tokred.model_patches import find_adapter
from transformers import BertConfig, BertModel, T5Config, T5EncoderModel, T5ForConditionalGeneration

import hf_tokred
from hf_tokred.errors import ConfigError, TokenReductionError, UnsupportedModelError
from hf_tokred.methods.nlp.mrt5 import deletion_rate, keep_decisions, kept_mask, pack_kept
from hf_tokred.recipes.mrt5 import byte_ids

SPACE = byte_ids(" ")[0]
EOS = 1
GATE_LAYER = 2


def t5_config(**overrides) -> T5Config:
    params = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=2, num_heads=4,
                  dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                  eos_token_id=EOS, decoder_start_token_id=0)
    params.update(overrides)
    return T5Config(**params)


def make_seq2seq(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(t5_config(**overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None  # generation lengths exact
    return model


def make_encoder(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(t5_config()).eval()


def mark_tokens(model, ids, gate_layer: int = GATE_LAYER) -> None:
    """Make residual channel 0 say "this token is one of ``ids``": the embedding's channel 0 is 100 for them and 0
    for every other token, and the blocks before the gate do not write channel 0."""
    with torch.no_grad():
        model.shared.weight[:, 0] = 0.0
        for token in ids:
            model.shared.weight[token, 0] = 100.0
        for block in model.encoder.block[:gate_layer]:
            block.layer[0].SelfAttention.o.weight[0, :] = 0.0
            block.layer[-1].DenseReluDense.wo.weight[0, :] = 0.0


def set_space_gate(model) -> None:
    """The attached gate deletes exactly the marked tokens (G = -30) and keeps the others (G ~ 0)."""
    gate = model.hf_tokred_modules["mrt5"]
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[0, 0] = -10.0
        gate.proj.bias.fill_(20.0)


def mrt5(model, mark=(SPACE,), **fields):
    mark_tokens(model, mark, fields.get("gate_layer", GATE_LAYER))
    hf_tokred.apply(model, {"method": "mrt5", "gate_layer": GATE_LAYER, **fields})
    set_space_gate(model)
    return model


def encode(texts):
    rows = [byte_ids(t) + [EOS] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, (ids != 0).long()


TEXTS = ["ab cd e", "x y", "hello world and more"]


# ---------------------------------------------------------------------------------------------
# adapter, tensor functions
# ---------------------------------------------------------------------------------------------


def test_adapter_recognises_t5_family_and_leaves_others(tiny_llama):
    from transformers import MT5Config, MT5ForConditionalGeneration

    assert find_adapter(make_seq2seq()).kind == "seq2seq"
    assert find_adapter(make_encoder()).name == "t5"
    mt5 = MT5ForConditionalGeneration(MT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4))
    assert find_adapter(mt5).name == "mt5"
    assert find_adapter(tiny_llama).kind == "decoder"
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    assert find_adapter(bert).kind == "encoder"


def test_keep_and_pack():
    gate = torch.tensor([[-20.0, -1.0, -20.0, -20.0], [-20.0, -20.0, -20.0, -20.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    keep = keep_decisions(gate, -15.0, valid, torch.tensor([[False, False, False, True], [False] * 4]))
    assert keep.tolist() == [[False, True, False, True], [False, False, True, False]]  # row 2 keeps its last real
    index, kept = pack_kept(keep)
    assert index.tolist() == [[1, 3], [2, 0]] and kept.tolist() == [[True, True], [True, False]]
    # strict "<": a gate exactly at the threshold keeps
    assert keep_decisions(torch.tensor([[-15.0]]), -15.0).tolist() == [[True]]


# ---------------------------------------------------------------------------------------------
# inference: exact counts, protected tokens, no-op
# ---------------------------------------------------------------------------------------------


def test_exact_kept_positions_per_row():
    model = mrt5(make_encoder())
    ids, mask = encode(TEXTS)
    out = model(input_ids=ids, attention_mask=mask)
    expected = [[i for i, t in enumerate(row.tolist()) if t not in (0, SPACE)] for row in ids]
    assert out.last_hidden_state.shape[1] == max(len(e) for e in expected)
    for row, positions in enumerate(expected):
        got = out.kept_positions[row].tolist()
        assert got[:len(positions)] == positions and all(p == -1 for p in got[len(positions):])
        assert kept_mask(out)[row].tolist() == [1] * len(positions) + [0] * (out.attention_mask.shape[1] - len(positions))
    assert out.delete_gate.shape == ids.shape
    assert deletion_rate(out, mask) == pytest.approx(1 - sum(map(len, expected)) / int(mask.sum()))


def test_eos_is_never_deleted_and_every_row_keeps_a_token():
    model = mrt5(make_encoder(), mark=(SPACE, EOS))  # the gate scores </s> as deleted too
    ids, mask = encode(["a b", "   "])
    out = model(input_ids=ids, attention_mask=mask)
    eos_at = [row.tolist().index(EOS) for row in ids]
    assert out.kept_positions.tolist() == [[0, 2, eos_at[0]], [eos_at[1], -1, -1]]
    # without </s> in the input (inputs_embeds), a row whose every token is deleted keeps its last one
    spaces = torch.full((1, 4), SPACE)
    out = model(inputs_embeds=model.shared(spaces))
    assert out.kept_positions.tolist() == [[3]]


@pytest.mark.parametrize("train_mode", [False, True])
def test_no_op_threshold_is_bit_identical(train_mode):
    dense = make_seq2seq()
    mark_tokens(dense, (SPACE,))
    model = copy.deepcopy(dense)
    hf_tokred.apply(model, {"method": "mrt5", "gate_layer": GATE_LAYER, "threshold": -30.0})
    set_space_gate(model)
    ids, mask = encode(TEXTS)
    decoder_ids = torch.tensor([[0, 5, 6, 7]] * len(TEXTS))
    dense.train(train_mode)
    model.train(train_mode)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                       dense(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits)
    assert torch.equal(model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state,
                       dense.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state)
    if not train_mode:
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(**kwargs), dense.generate(**kwargs))
        assert torch.equal(model.generate(num_beams=3, **kwargs), dense.generate(num_beams=3, **kwargs))


def test_fresh_gate_keeps_every_token_and_remove_restores_dense():
    dense = make_seq2seq()
    model = copy.deepcopy(dense)
    hf_tokred.apply(model, {"method": "mrt5"})
    ids, mask = encode(TEXTS)
    decoder_ids = torch.tensor([[0, 5, 6]] * len(TEXTS))
    assert model.get_encoder()(input_ids=ids, attention_mask=mask).attention_mask.tolist() == mask.tolist()
    assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                       dense(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits)
    set_space_gate(model)
    with torch.no_grad():
        model.hf_tokred_modules["mrt5"].proj.bias.fill_(-20.0)  # now every token but </s> is deleted
    assert model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.shape[1] == 1
    hf_tokred.remove(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                       dense(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits)
    assert not hasattr(model, "hf_tokred_modules")


# ---------------------------------------------------------------------------------------------
# correctness of hard deletion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hard_deletion_equals_masking_deleted_keys(attn):
    """Deleting tokens after the gate == keeping them, at their positions, but masked as keys of every later block
    and of the decoder's cross-attention."""
    dense = make_seq2seq()
    dense.set_attn_implementation(attn)
    mark_tokens(dense, (SPACE,))
    model = copy.deepcopy(dense)
    mrt5(model)
    ids, mask = encode(TEXTS)
    keep = mask.bool() & (ids != SPACE)
    minimum = torch.finfo(torch.float32).min
    key_mask = torch.where(keep, 0.0, minimum)[:, None, None, :]

    def mask_keys(module, args, kwargs):
        return (args[0], key_mask, *args[2:]), kwargs

    def cross_mask(module, args, kwargs):
        kwargs["encoder_attention_mask"] = keep.long()
        return args, kwargs

    handles = [b.register_forward_pre_hook(mask_keys, with_kwargs=True) for b in dense.encoder.block[GATE_LAYER:]]
    handles.append(dense.decoder.register_forward_pre_hook(cross_mask, with_kwargs=True))
    decoder_ids = torch.tensor([[0, 5, 6, 7]] * len(TEXTS))
    reference_hidden = dense.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    reference = dense(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    for h in handles:
        h.remove()
    out = model.get_encoder()(input_ids=ids, attention_mask=mask)
    for row in range(len(TEXTS)):
        kept = out.attention_mask[row].bool()
        torch.testing.assert_close(out.last_hidden_state[row][kept],
                                   reference_hidden[row][out.kept_positions[row][kept]], atol=1e-5, rtol=1e-4)
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_batch_with_padding_equals_rows_alone():
    model = mrt5(make_seq2seq())
    ids, mask = encode(TEXTS)
    decoder_ids = torch.tensor([[0, 5, 6, 7]] * len(TEXTS))
    batch_enc = model.get_encoder()(input_ids=ids, attention_mask=mask)
    batch_logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=3)
    for row, text in enumerate(TEXTS):
        one, one_mask = encode([text])
        alone = model.get_encoder()(input_ids=one, attention_mask=one_mask)
        width = alone.last_hidden_state.shape[1]
        assert batch_enc.kept_positions[row, :width].tolist() == alone.kept_positions[0].tolist()
        torch.testing.assert_close(batch_enc.last_hidden_state[row, :width], alone.last_hidden_state[0],
                                   atol=1e-5, rtol=1e-4)
        logits = model(input_ids=one, attention_mask=one_mask, decoder_input_ids=decoder_ids[:1]).logits
        torch.testing.assert_close(batch_logits[row:row + 1], logits, atol=1e-4, rtol=1e-4)
        kwargs = dict(input_ids=one, attention_mask=one_mask, max_new_tokens=6, do_sample=False)
        assert greedy[row].tolist() == model.generate(**kwargs)[0].tolist()
        assert beams[row].tolist() == model.generate(num_beams=3, **kwargs)[0].tolist()


def test_loss_with_labels_and_encoder_outputs_routes():
    model = mrt5(make_seq2seq())
    ids, mask = encode(TEXTS)
    labels = torch.tensor([[259, 5, 6, 1]] * len(TEXTS))
    direct = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    assert encoded.last_hidden_state.shape[1] < ids.shape[1]
    via_outputs = model(encoder_outputs=encoded, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(direct, via_outputs)
    # a tuple of the last call (return_dict=False) is recognised by its hidden states
    as_tuple = model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=False)
    torch.testing.assert_close(model(encoder_outputs=as_tuple, attention_mask=mask, labels=labels).loss, direct)
    # a shortened encoder output the model cannot match to a mask is refused with the fix
    foreign = (encoded.last_hidden_state.clone(),)
    with pytest.raises(TokenReductionError, match="encoder_outputs.attention_mask"):
        model(encoder_outputs=foreign, attention_mask=mask, labels=labels)


# ---------------------------------------------------------------------------------------------
# training: soft deletion
# ---------------------------------------------------------------------------------------------


def test_soft_deletion_adds_the_gate_to_later_attention_logits_and_trains_the_gate():
    model = mrt5(make_seq2seq())
    with torch.no_grad():
        model.hf_tokred_modules["mrt5"].proj.bias.fill_(5.0)  # deleted tokens at G = -30, others near -0.2
    model.train()
    ids, mask = encode(TEXTS)
    seen = {}

    def capture(name):
        def hook(module, args, kwargs):
            seen[name] = args[2]
        return hook

    handles = [model.encoder.block[i].register_forward_pre_hook(capture(i), with_kwargs=True)
               for i in (GATE_LAYER - 1, GATE_LAYER)]
    out = model.get_encoder()(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    gate = out.delete_gate
    assert out.last_hidden_state.shape[1] == ids.shape[1]  # nothing removed in training
    assert bool((gate[ids == SPACE] < -29).all()) and bool((gate[ids == EOS] == 0).all())
    torch.testing.assert_close(seen[GATE_LAYER], seen[GATE_LAYER - 1] + gate[:, None, None, :])
    labels = torch.tensor([[259, 5, 6, 1]] * len(TEXTS))
    loss = model(encoder_outputs=out, attention_mask=mask, labels=labels).loss + gate[mask.bool()].mean()
    loss.backward()
    grad = model.hf_tokred_modules["mrt5"].proj.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)


# ---------------------------------------------------------------------------------------------
# save / load / errors
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    model = mrt5(make_seq2seq())
    ids, mask = encode(TEXTS)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path)
    side = load_file(os.path.join(tmp_path, "token_reduction.safetensors"))
    assert sorted(side) == ["mrt5.norm.bias", "mrt5.norm.weight", "mrt5.proj.bias", "mrt5.proj.weight"]
    assert not any("hf_tokred" in k for k in load_file(os.path.join(tmp_path, "model.safetensors")))
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    loaded.generation_config.eos_token_id = None
    assert loaded._hf_tokred_applied.config.gate_layer == GATE_LAYER
    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), expected)
    dense = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, token_reduction=False)
    assert not hasattr(dense, "hf_tokred_modules")


def test_errors_leave_the_model_untouched():
    model = make_seq2seq()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "mrt5", "gate_layer": 4})  # 4 encoder blocks: at most 3
    assert err.value.field == "gate_layer"
    for bad, field in (({"threshold": -31.0}, "threshold"), ({"threshold": 0.5}, "threshold"),
                       ({"gate_layer": 0}, "gate_layer"), ({"gate_scale": 0.0}, "gate_scale"),
                       ({"target_deletion": 1.0}, "target_deletion")):
        with pytest.raises(ConfigError) as err:
            hf_tokred.apply(model, {"method": "mrt5", **bad})
        assert err.value.field == field
    assert not hasattr(model, "hf_tokred_modules") and not hasattr(model, "_hf_tokred_applied")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.encoder.block[1]._forward_hooks and not model._forward_pre_hooks
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="seq2seq"):
        hf_tokred.apply(bert, {"method": "mrt5"})
    assert not hasattr(bert, "_hf_tokred_applied")
    from transformers import T5ForTokenClassification

    tagger = T5ForTokenClassification(t5_config())
    with pytest.raises(UnsupportedModelError, match="T5ForTokenClassification"):
        hf_tokred.apply(tagger, {"method": "mrt5"})
    assert not hasattr(tagger, "hf_tokred_modules")


# ---------------------------------------------------------------------------------------------
# recipe and CLI
# ---------------------------------------------------------------------------------------------

TINY = {"d_model": 32, "d_ff": 64, "num_heads": 4, "num_layers": 3, "num_decoder_layers": 1}
RECIPE = dict(sizes=TINY, length=64, batch_size=2, gate_layer=1, regularizer_delay=1, progress=False, warmup=2)


def test_recipe_is_reproducible_and_resumes(tmp_path, monkeypatch):
    from hf_tokred.recipes import mrt5 as recipe
    from hf_tokred.training import stdlib_corpus, train_mrt5

    texts = stdlib_corpus("train")[:20]
    first = train_mrt5(texts, steps=4, **RECIPE)
    second = train_mrt5(texts, steps=4, **RECIPE)
    assert first.train_log == second.train_log and first.train_log["alpha"][1] != 0
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    out = tmp_path / "run"
    original = recipe.training_batch

    def interrupted(stream, step, **kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return original(stream, step, **kwargs)

    monkeypatch.setattr(recipe, "training_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mrt5(texts, steps=4, output_dir=out, save_every=1, **RECIPE)
    monkeypatch.setattr(recipe, "training_batch", original)
    resumed = train_mrt5(texts, steps=4, output_dir=out, save_every=1, **RECIPE)
    assert resumed.train_log == first.train_log
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), resumed.state_dict().values()))
    saved = json.loads((out / "mrt5_training.json").read_text())
    assert saved["step"] == 4 and (out / "token_reduction.safetensors").is_file() and (out / "README.md").is_file()
    baseline = train_mrt5(texts, steps=2, delete=False, **RECIPE)
    assert not hasattr(baseline, "hf_tokred_modules")
    with pytest.raises(ConfigError) as err:
        train_mrt5(texts, steps=2, output_dir=out, **{**RECIPE, "length": 32})  # another run in that folder
    assert err.value.field == "output_dir"


def test_cli_train_and_bench(tmp_path, capsys):
    from hf_tokred.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["Some text about bytes and gates. " * 20] * 3), encoding="utf-8")
    out = tmp_path / "model"
    assert main(["train", "mrt5", "--steps", "1", "--corpus", str(corpus), "--output", str(out), "--no-progress"]) == 0
    assert (out / "token_reduction.safetensors").is_file()
    report = tmp_path / "bench.json"
    assert main(["nlp-bench", "mrt5", "--steps", "2", "--size", "tiny", "--gate-layer", "1", "--length", "64",
                 "--repeats", "1", "--no-progress", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["steps"] == 2 and 0.0 <= result["deletion_rate"] <= 1.0 and result["loss"]["baseline"] > 0
    assert "loss ratio mrt5/baseline" in capsys.readouterr().out
