"""Dynamic Token Pooling (arXiv 2211.09761): an hourglass on tiny random decoders (Llama, Qwen2, Gemma3), the byte-level
recipe and the CLI at tiny settings."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors import safe_open

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError
from hf_tokred.errors import UnsupportedModelError
from hf_tokred.integration.hourglass import get_hourglass, last_pooling
from hf_tokred.methods.nlp.token_pooling import (
    BYTE_PAD_ID,
    BYTE_WHITESPACE_IDS,
    binomial_prior_loss,
    pooling_plan,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=260,
             pad_token_id=BYTE_PAD_ID, bos_token_id=257, eos_token_id=258)
BUILDERS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_hidden_layers=5)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_hidden_layers=5)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=5, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
}
TEXT = b"the cat sat on a mat and it was fine, ok then"


def make(name="llama"):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    model.generation_config.eos_token_id = None
    return model


def ids_of(text=TEXT):
    return torch.tensor([list(text)])


def pooling(boundaries="whitespace", **kw):
    params = {"pre_layers": 1, "post_layers": 1, "boundaries": boundaries}
    if boundaries == "whitespace":
        params["boundary_token_ids"] = list(BYTE_WHITESPACE_IDS)
    params.update(kw)
    return TokenReductionConfig(method="token_pooling", **params)


def randomize_predictor(model):
    """Distinct predictor weights (as if trained), centred so that about half of the tokens of TEXT end a segment."""
    torch.manual_seed(3)
    predictor = model.hf_tokred_modules["token_pooling"]
    with torch.no_grad():
        for p in predictor.parameters():
            p.normal_(0, 0.7)
        training = predictor.training
        predictor.eval()
        model(ids_of())
        predictor.train(training)
        predictor.net[-1].bias -= last_pooling(model).logits.median()


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# ---------------------------------------------------------------------------------------------
# Config and tensor functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("boundaries", "entropy"), ("boundary_rate", 0.0), ("boundary_rate", 1.5), ("pre_layers", -1),
    ("post_layers", 1.5), ("gumbel_temperature", 0.0), ("predictor_dim", 0), ("boundary_token_ids", [-1]),
    ("boundary_token_ids", "32"),
])
def test_bad_fields_name_the_field(field, value):
    kw = {"boundaries": "whitespace", "boundary_token_ids": [32]} if field == "boundary_token_ids" else {}
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="token_pooling", **{**kw, field: value})
    assert err.value.field.startswith(field)  # a list item is named with its index


def test_boundary_ids_go_with_whitespace_only():
    with pytest.raises(ConfigError, match="needs the token ids") as err:
        TokenReductionConfig(method="token_pooling", boundaries="whitespace")
    assert err.value.field == "boundary_token_ids"
    with pytest.raises(ConfigError, match="only used with boundaries='whitespace'"):
        TokenReductionConfig(method="token_pooling", boundary_token_ids=[32])
    assert pooling().learned is False and pooling("learned").learned is True


def test_pooling_plan_segments_and_causal_upsampling():
    b = torch.tensor([[0., 1., 0., 0., 1., 0.], [1., 0., 0., 0., 0., 0.]])
    real = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    plan = pooling_plan(b, real)
    assert plan.counts.tolist() == [2, 0]  # the second row's boundary sits on padding
    assert plan.ends[0].tolist() == [1, 4] and plan.valid.tolist() == [[True, True], [False, False]]
    assert plan.pool[0].sum(-1).tolist() == [1.0, 1.0] and plan.pool[1].abs().sum() == 0
    # A token receives the last segment that ended at or before it, never a later one.
    receives = [int(r.argmax()) if r.sum() else None for r in plan.upsample[0]]
    assert receives == [None, 0, 0, 0, 1, 1]
    for t, s in enumerate(receives):
        assert s is None or plan.ends[0, s] <= t


def test_prior_loss_is_smallest_at_the_rate():
    losses = []
    for k in range(9):
        b = torch.zeros(1, 8)
        b[0, :k] = 1
        losses.append(binomial_prior_loss(b, None, 0.25).item())
    assert min(range(9), key=losses.__getitem__) == 2


# ---------------------------------------------------------------------------------------------
# Dense equivalence, errors, model untouched
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    {"pre_layers": 2, "post_layers": 3}, {"boundary_rate": 1.0},
])
def test_no_op_settings_are_bit_identical(config):
    model = make()
    ids = ids_of()
    dense = logits(model, ids)
    hf_tokred.apply(model, pooling("learned", **config))
    assert torch.equal(logits(model, ids), dense)
    assert model.__dict__.get("_hf_tokred_hourglass") is None  # nothing installed


def test_every_token_its_own_segment_runs_dense():
    model = make()
    ids = torch.tensor([[32, 10, 32, 9, 32, 32]])
    dense = logits(model, ids)
    hf_tokred.apply(model, pooling())
    assert torch.equal(logits(model, ids), dense)
    assert last_pooling(model).counts.tolist() == [6]


def test_apply_remove_bit_identical():
    model = make("qwen2")
    ids = ids_of()
    dense = logits(model, ids)
    hf_tokred.apply(model, pooling())
    pooled = logits(model, ids)
    assert not torch.allclose(pooled, dense, atol=1e-4)
    hf_tokred.remove(model)
    assert torch.equal(logits(model, ids), dense)
    assert "generate" not in model.__dict__ and "_hf_tokred_hourglass" not in model.__dict__


@pytest.mark.parametrize("config, match", [
    ({"pre_layers": 3, "post_layers": 3}, "exceed the model's 5 decoder layers"),
    ({"pre_layers": 9, "post_layers": 0}, "exceed"),
])
def test_layer_counts_beyond_depth_leave_model_untouched(config, match):
    model = make()
    ids = ids_of()
    dense = logits(model, ids)
    with pytest.raises(ConfigError, match=match):
        hf_tokred.apply(model, pooling(**config))
    assert hf_tokred.integration.wiring.get_applied(model) is None and "hf_tokred_modules" not in model._modules
    assert torch.equal(logits(model, ids), dense)


def test_bert_is_refused_untouched():
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        dense = bert(ids).last_hidden_state
    with pytest.raises(UnsupportedModelError, match="decoder"):
        hf_tokred.apply(bert, pooling())
    assert hf_tokred.integration.wiring.get_applied(bert) is None
    with torch.no_grad():
        assert torch.equal(bert(ids).last_hidden_state, dense)


# ---------------------------------------------------------------------------------------------
# Causality, segments, padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("boundaries", ["whitespace", "learned"])
def test_later_tokens_never_change_earlier_logits(name, boundaries):
    model = make(name)
    hf_tokred.apply(model, pooling(boundaries))
    if boundaries == "learned":
        randomize_predictor(model)
    ids = ids_of()
    cut = 20
    changed = ids.clone()
    changed[0, cut:] = torch.tensor(list(b"zq xw " * 10))[: ids.shape[1] - cut]
    before, after = logits(model, ids), logits(model, changed)
    counts = last_pooling(model).counts.item()
    boundaries_before_cut = int(last_pooling(model).boundaries[0, :cut].sum())
    assert 0 < boundaries_before_cut < cut and counts < ids.shape[1]  # real pooling happened before the cut
    torch.testing.assert_close(after[:, :cut], before[:, :cut], rtol=0, atol=1e-5)
    assert (after[:, cut:] - before[:, cut:]).abs().max() > 1e-3


def test_training_mode_gumbel_boundaries_are_causal_and_train_the_predictor():
    model = make()
    hf_tokred.apply(model, pooling("learned"))
    randomize_predictor(model)
    model.train()
    ids = ids_of()
    changed = ids.clone()
    changed[0, 25:] = 120
    torch.manual_seed(7)
    first = model(ids).logits
    torch.manual_seed(7)
    second = model(changed).logits
    torch.testing.assert_close(second[:, :25], first[:, :25], rtol=0, atol=1e-5)
    # The LM loss alone reaches the predictor through the straight-through boundaries.
    torch.manual_seed(7)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grad = model.hf_tokred_modules["token_pooling"].net[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    prior = last_pooling(model).prior_loss()
    assert prior.requires_grad and prior.item() > 0


def test_whitespace_segment_counts_and_pooled_length_in_the_middle_layers():
    model = make()
    hf_tokred.apply(model, pooling(pre_layers=2, post_layers=1))
    lengths = {}
    handles = [block.register_forward_pre_hook(
        lambda m, a, k, i=i: lengths.__setitem__(i, (a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
        for i, block in enumerate(model.model.layers)]
    text = b"ab cd\nefg  h ij"  # whitespace at 2, 5, 9, 10, 12 -> 5 complete segments, "ij" incomplete
    logits(model, ids_of(text))
    for h in handles:
        h.remove()
    record = last_pooling(model)
    assert record.counts.tolist() == [5]
    assert get_hourglass(model).layers == [2, 3]
    assert lengths == {0: 15, 1: 15, 2: 5, 3: 5, 4: 15}
    assert record.shorten_factor == 3.0


@pytest.mark.parametrize("name, boundaries", [("llama", "whitespace"), ("qwen2", "learned")])
def test_left_padded_batch_equals_rows_alone(name, boundaries):
    model = make(name)
    hf_tokred.apply(model, pooling(boundaries))
    if boundaries == "learned":
        randomize_predictor(model)
    short, long = ids_of(TEXT[:30]), ids_of(TEXT[:38])
    batch = torch.cat([torch.cat([torch.full((1, 8), BYTE_PAD_ID), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :8] = 0
    together = logits(model, batch, attention_mask=mask)
    torch.testing.assert_close(together[0, 8:], logits(model, short)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(together[1], logits(model, long)[0], rtol=0, atol=1e-5)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, 8:], model.generate(short, max_new_tokens=4, do_sample=False)[0])
    assert torch.equal(out[1], model.generate(long, max_new_tokens=4, do_sample=False)[0])


# ---------------------------------------------------------------------------------------------
# Generation and the KV cache
# ---------------------------------------------------------------------------------------------


def test_generate_recomputes_exactly_and_refuses_a_cache():
    model = make()
    hf_tokred.apply(model, pooling())
    ids = ids_of(TEXT[:20])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    # Greedy by hand: argmax of the full recomputation at every step.
    manual = ids
    for _ in range(5):
        manual = torch.cat([manual, logits(model, manual)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, manual)
    with pytest.raises(TokenReductionError, match="cannot use a KV cache.*use_cache=False"):
        model.generate(ids, max_new_tokens=2, use_cache=True)
    with pytest.raises(TokenReductionError, match="cannot use a KV cache"):
        model(ids, use_cache=True)
    with pytest.raises(TokenReductionError, match="cannot use a KV cache"):
        model(ids, past_key_values=transformers.DynamicCache())
    assert model(ids).past_key_values is None  # the default call runs without a cache


def test_whitespace_boundaries_need_input_ids():
    model = make()
    hf_tokred.apply(model, pooling())
    with pytest.raises(TokenReductionError, match="passed none"):
        model(inputs_embeds=model.get_input_embeddings()(ids_of()))


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------


def test_save_load_identical_and_reattached(tmp_path):
    model = make()
    hf_tokred.apply(model, pooling("learned", boundary_rate=0.3))
    randomize_predictor(model)
    ids = ids_of()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "token_reduction.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["token_pooling.net.0.bias", "token_pooling.net.0.weight",
                                    "token_pooling.net.2.bias", "token_pooling.net.2.weight"]
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert not any("hf_tokred" in k or "token_pooling" in k for k in f.keys())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()  # no token_reduction= argument
    assert hf_tokred.integration.wiring.get_applied(loaded).config.boundary_rate == 0.3
    assert torch.equal(logits(loaded, ids), expected)
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path, token_reduction=False)
    assert hf_tokred.integration.wiring.get_applied(dense) is None


def test_whitespace_save_load_needs_no_side_car(tmp_path):
    model = make("gemma3")
    hf_tokred.apply(model, pooling())
    ids = ids_of()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert not os.path.exists(os.path.join(tmp_path, "token_reduction.safetensors"))
    loaded = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, ids), expected)


# ---------------------------------------------------------------------------------------------
# Recipe and CLI (tiny settings)
# ---------------------------------------------------------------------------------------------

TINY = dict(layers=3, hidden_size=16, heads=2, seq_len=24, batch_size=2, steps=4, lr=1e-2, warmup=1, progress=False)
TEXTS = ["the quick brown fox jumps over the lazy dog " * 6, "pack my box with five dozen liquor jugs " * 6]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_recipe_reproducible_and_resumable(tmp_path, monkeypatch):
    from hf_tokred import training

    config = {"method": "token_pooling", "boundaries": "learned", "pre_layers": 1, "post_layers": 1}
    first = training.train_token_pooling(TEXTS, reduction=config, **TINY)
    again = training.train_token_pooling(TEXTS, reduction=config, **TINY)
    assert first.train_losses == again.train_losses and len(first.train_losses) == 4
    reference = _weights(first)
    assert all(torch.equal(v, _weights(again)[k]) for k, v in reference.items())
    assert any("hf_tokred_modules.token_pooling" in k for k in reference)

    original = training._save_checkpoint

    def interrupted(folder, model, optimizer, params, state):
        original(folder, model, optimizer, params, state)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train_token_pooling(TEXTS, reduction=config, output_dir=tmp_path, save_every=2, **TINY)
    monkeypatch.setattr(training, "_save_checkpoint", original)
    resumed = training.train_token_pooling(TEXTS, reduction=config, output_dir=tmp_path, save_every=2, **TINY)
    assert resumed.train_losses == first.train_losses
    assert all(torch.equal(v, _weights(resumed)[k]) for k, v in reference.items())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([list(b"the quick brown")])
    assert torch.equal(logits(loaded, ids), logits(resumed, ids))
    assert os.path.isfile(os.path.join(tmp_path, "README.md"))
    with pytest.raises(ConfigError, match="another run"):
        training.train_token_pooling(TEXTS, reduction=config, output_dir=tmp_path, **{**TINY, "lr": 5e-3})


def test_baseline_is_the_same_loop_without_pooling():
    from hf_tokred.recipes.token_pooling import bits_per_byte, train_token_pooling

    baseline = train_token_pooling(TEXTS, reduction=None, **TINY)
    assert hf_tokred.integration.wiring.get_applied(baseline) is None
    hourglass = train_token_pooling(TEXTS, reduction="whitespace", **{**TINY, "layers": 5})
    assert last_pooling(hourglass).shorten_factor > 3
    assert 0 < bits_per_byte(hourglass, TEXTS, seq_len=24) < 8.5
    with pytest.raises(ConfigError) as err:
        train_token_pooling(TEXTS, reduction="whitespace", **TINY)  # 2 + 2 full layers exceed a depth of 3
    assert err.value.field == "pre_layers"


def test_cli_train_and_bench(tmp_path, capsys):
    from hf_tokred.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 3), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "token_pooling", "--steps", "2", "--layers", "5", "--output", str(out), "--corpus",
                 str(corpus), "--no-progress"]) == 0
    assert os.path.isfile(out / "config.json") and "saved to" in capsys.readouterr().out
    report = tmp_path / "bench.json"
    assert main(["nlp-bench", "token_pooling", "--steps", "2", "--layers", "5", "--hidden-size", "16", "--seq-len",
                 "32", "--batch-size", "2", "--eval-windows", "2", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "hourglass vs vanilla of equal compute" in printed and "vanilla, equal depth" in printed
    import json

    result = json.loads(report.read_text())
    assert result["models"]["hourglass"]["shorten_factor"] > 1 and result["budget"]["steps"] == 2
