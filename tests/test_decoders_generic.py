"""KV policies and storages on decoders found by what they do (generic detection), hybrid sliding/full layers.

Tiny random models built from transformers 5.23 config classes: Gemma 2 (soft-capped logits, alternating
sliding and full layers, eager attention), Gemma 3 (two sliding then two full layers, per-layer-type RoPE),
GPT-OSS (learned attention sinks, alternating layers), Phi-3 (partial rotary), OLMo 2, GPT-NeoX (partial
rotary, no ``num_key_value_heads``), Mixtral (MoE), Granite (attention multiplier), GPT-2 (learned positions)
and Mistral with a uniform sliding window; Bloom, Mamba and T5 as models that cannot work, with the reason.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from hf_tokred.model_patches import find_adapter
from hf_tokred.model_patches.decoder import decoder_layer_types
from hf_tokred.model_patches.rope import rotary_for
from test_kv_policies import POLICIES, PREFILL_ONCE, _config
from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicSlidingWindowLayer

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, UnsupportedModelError, compose
from hf_tokred.kv.cache import ReducingLayer
from hf_tokred.methods.kv.kvquant import calibrate

WINDOW = 8  # sliding_window of the hybrid models: shorter than the prompts, so it matters
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=128, pad_token_id=0,
             bos_token_id=1, eos_token_id=127)
GQA = dict(SMALL, num_key_value_heads=2)
HYBRID = ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

BUILDERS = {
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **GQA, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0,
        query_pre_attn_scalar=8, layer_types=ALTERNATING)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **GQA, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW, layer_types=HYBRID)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **GQA, num_hidden_layers=2, partial_rotary_factor=0.5)),
    "olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**GQA, num_hidden_layers=2)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL, num_hidden_layers=2)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **GQA, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
    "granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **GQA, num_hidden_layers=2, attention_multiplier=0.2, embedding_multiplier=2.0)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=127)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **GQA, num_hidden_layers=2, sliding_window=WINDOW)),
    "gpt_oss": lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **GQA, num_hidden_layers=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
}
ROTARY = ["gemma2", "gemma3", "phi3", "olmo2", "gpt_neox", "mixtral", "granite", "gpt_oss"]  # RoPE decoders
ALL_POLICY_MODELS = ["gemma2", "gemma3", "gpt_neox"]  # every policy runs on these; one each on the others
ONE_POLICY = {"phi3": "snapkv", "olmo2": "h2o", "mixtral": "tova", "granite": "pyramidkv", "gpt2": "keydiff",
              "mistral": "scissorhands", "gpt_oss": "streamingllm"}
KIVI = {"method": "kivi", "bits": 2, "group_size": 8, "residual": 8}
KVQUANT = {"method": "kvquant", "bits": 3, "outlier_fraction": 0.1}


def make(name: str):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    model.generation_config.eos_token_id = None  # generation lengths must be exact
    return model


def _ids(n=30, batch=1, seed=0):
    return torch.randint(3, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, attention_mask=None, new=6, **kwargs):
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=attention_mask, max_new_tokens=new, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


@functools.cache
def _dense(name: str):
    """Greedy generation with transformers' own cache (DynamicCache(config=...), built by generate)."""
    out = _generate(make(name), _ids())
    return out.sequences, torch.stack(out.scores)


def _layer_types(model) -> list[str]:
    return decoder_layer_types(model)[0]


def _full_layers(model) -> list[int]:
    return [i for i, t in enumerate(_layer_types(model)) if t == "full_attention"]


def _calibrated(model, config):
    hf_tokred.apply(model, config)
    calibrate(model, [_ids(64, seed=3)[0]])
    return model


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, layers, attention", [
    ("gemma2", "model.layers", "self_attn"), ("gemma3", "model.layers", "self_attn"),
    ("gpt_neox", "gpt_neox.layers", "attention"), ("gpt2", "transformer.h", "attn"),
    ("mixtral", "model.layers", "self_attn"),
])
def test_decoders_are_found_by_what_they_do(name, layers, attention):
    model = make(name)
    adapter = find_adapter(model)
    assert (adapter.kind, adapter.layers, adapter.attention, adapter.has_kv_cache) == ("decoder", layers, attention, True)
    modules = adapter.attention_modules(model)
    assert [m.layer_idx for m in modules] == list(range(model.config.get_text_config().num_hidden_layers))


@pytest.mark.parametrize("build, why", [
    (lambda: transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=64)),
     r"its attention \(BloomAttention\) is computed in place instead of through transformers' attention interface"),
])
def test_decoders_that_cannot_work_say_why(build, why):
    model = build()
    attn = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=why) as err:
        hf_tokred.apply(model, {"method": "streamingllm", "max_tokens": 8})
    assert "Supported architectures: " in str(err.value) and "any decoder (LlamaForCausalLM" in str(err.value)
    assert not hasattr(model, "_hf_tokred_applied") and model.config._attn_implementation == attn


def test_a_kv_policy_refuses_a_state_space_model_by_kind():
    # Mamba keeps a recurrent state, no KV cache; it has an adapter of kind "ssm" (for ssm_prune), so a KV policy
    # refuses it by kind, naming what it is.
    model = transformers.MambaForCausalLM(transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"MambaForCausalLM is a ssm model \(mamba\)"):
        hf_tokred.apply(model, {"method": "streamingllm", "max_tokens": 8})
    assert not hasattr(model, "_hf_tokred_applied")


def test_seq2seq_models_are_refused_by_decoder_methods():
    # T5 has an adapter of its own (kind seq2seq, for MrT5): a KV policy names the kinds it acts on instead
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64))
    attn = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=r"streamingllm acts on decoder models \(any decoder .*"
                                                    r"T5ForConditionalGeneration is a seq2seq model \(t5\)"):
        hf_tokred.apply(model, {"method": "streamingllm", "max_tokens": 8})
    assert not hasattr(model, "_hf_tokred_applied") and model.config._attn_implementation == attn


def test_pre_rope_storage_on_learned_positions_is_a_clear_error():
    model = make("gpt2")  # learned absolute positions: no rotary embedding to undo
    with pytest.raises(UnsupportedModelError, match="kvquant quantizes pre-RoPE keys.*GPT2LMHeadModel.*rotary"):
        hf_tokred.apply(model, KVQUANT)
    with pytest.raises(ConfigError, match="pre_rope: .*rotary") as err:
        hf_tokred.apply(model, {**KIVI, "pre_rope": True})
    assert err.value.field == "pre_rope" and not hasattr(model, "_hf_tokred_applied")
    hf_tokred.apply(model, KIVI)  # storage that needs no RoPE works
    assert _generate(model, _ids()).sequences.shape == (1, 36)


# ---------------------------------------------------------------------------------------------
# Every policy: keep=1.0 is dense, budgets hold on full layers, sliding layers are transformers' own
# ---------------------------------------------------------------------------------------------

CASES = [(m, p) for m in ALL_POLICY_MODELS for p in POLICIES] + list(ONE_POLICY.items())


@pytest.mark.parametrize("name, method", CASES)
def test_keep_one_is_bit_identical_to_dense(name, method):
    sequences, scores = _dense(name)
    model = make(name)
    hf_tokred.apply(model, _config(method, keep=1.0))
    out = _generate(model, _ids())
    assert isinstance(out.past_key_values, hf_tokred.TokenReductionCache)
    assert torch.equal(out.sequences, sequences) and torch.equal(torch.stack(out.scores), scores)


@pytest.mark.parametrize("name, method", CASES)
def test_budget_holds_on_the_layers_the_policy_acts_on(name, method):
    model = make(name)
    hf_tokred.apply(model, _config(method, max_tokens=12))
    cache = hf_tokred.build_cache(model)
    types = _layer_types(model)
    acted = _full_layers(model) or list(range(len(types)))  # a model whose every layer slides: all of them
    cfg = TokenReductionConfig.coerce(_config(method, max_tokens=12))
    budgets = {layer: cfg.layer_budget(12, rank, len(acted)) for rank, layer in enumerate(acted)}
    seen = []

    class Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(cache.stored_lengths())
            return scores

    model.generate(_ids(), max_new_tokens=8, do_sample=False, past_key_values=cache,
                   logits_processor=LogitsProcessorList([Watch()]))
    assert cache.get_seq_length() == 37
    for index, layer in enumerate(cache.layers):
        if index not in acted:  # transformers' own window layer, holding exactly its window
            assert type(layer) is DynamicSlidingWindowLayer and cache.stored_lengths()[index] == WINDOW - 1
            continue
        assert isinstance(layer, ReducingLayer) and layer.rank == acted.index(index)
        if method in PREFILL_ONCE:
            assert seen[0][index] == min(budgets[index], 30) and cache.stored_lengths()[index] == min(budgets[index], 30) + 7
        else:
            assert max(step[index] for step in seen) <= 12
    by_type = cache.kv_bytes_by_type()
    assert sum(by_type.values()) == cache.kv_bytes() and set(by_type) == set(types)


@pytest.mark.parametrize("name, method", [("gemma3", p) for p in POLICIES] + [("gemma2", "snapkv"), ("gemma2", "h2o"),
                                                                             ("gpt_neox", "tova"), ("mistral", "tova")])
def test_left_padded_batch_equals_rows_alone(name, method):
    model = make(name)
    hf_tokred.apply(model, _config(method, keep=0.5))
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in (26, 9, 17)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    batched = _generate(model, ids, mask, new=8)
    cfg = TokenReductionConfig.coerce(_config(method, keep=0.5))
    for layer in batched.past_key_values.layers:  # budgets from each row's real prompt length, windows or not
        if isinstance(layer, ReducingLayer):
            expected = [cfg.layer_budget(cfg.budget(len(r)), layer.rank, layer.num_layers) for r in rows]
            assert layer.row_budgets.tolist() == expected
    for i, row in enumerate(rows):
        alone = _generate(model, row[None], new=8)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row):]), f"row {i}"
        for step_b, step_a in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_b[i], step_a[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, method", [("gemma3", p) for p in POLICIES] + list(ONE_POLICY.items()) +
                         [("gemma2", "fastgen"), ("gpt_neox", "streamingllm")])
def test_sampling_and_beam_search_run(name, method):
    model = make(name)
    hf_tokred.apply(model, _config(method, max_tokens=12))
    prompt = _ids(20, batch=2, seed=7)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=8, do_sample=True, num_return_sequences=2)
    beams = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, return_dict_in_generate=True)
    assert sampled.shape == (4, 28) and beams.sequences.shape == (2, 28)
    for layer in beams.past_key_values.layers:
        if isinstance(layer, ReducingLayer):
            assert layer.positions.shape[0] == 6 and layer.valid.shape == layer.positions.shape


# ---------------------------------------------------------------------------------------------
# Masks of hybrid models: exact against a masked full-attention reference
# ---------------------------------------------------------------------------------------------

RECENT = 4


def _allowed(length: int, prompt: int, chunk: int, window: int | None, sinks: int | None) -> torch.Tensor:
    """Teacher-forced reference mask: causal, inside ``window`` when given, and (``sinks`` not None) after the
    prompt only the first ``sinks`` tokens and the last RECENT before each query; the queries of a chunk fed
    from position ``chunk`` on all see what the cache held before it (the last RECENT) and the chunk itself."""
    t, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = j <= t
    if window is not None:
        allowed &= t - j < window
    if sinks is not None:
        recent_from = torch.where(t >= chunk, chunk - RECENT, t - RECENT)
        allowed &= (t < prompt) | (j < sinks) | (j >= recent_from)
    return allowed[None, None]


def _additive(mask: torch.Tensor, eager: bool) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) if eager else mask


@pytest.mark.parametrize("name, layers", [("gemma2", None), ("gemma3", None), ("gemma3", "all"), ("gemma2", "all"),
                                          ("mistral", None)])
def test_streaming_on_hybrid_layers_matches_a_masked_reference(name, layers):
    """Full-attention layers keep sinks and a recent window; sliding layers keep their window, and when reduced
    too (``layers="all"``, or Mistral whose every layer slides) the recent window inside it. Sinks only where no
    sliding layer is reduced: a sliding layer's sinks leave with its window and their budget goes to recent tokens."""
    model = make(name)
    sequence, prompt, chunk = _ids(26, seed=1), 12, 20  # the prompt, single steps, then a 6-token chunk
    eager = model.config._attn_implementation == "eager"
    reduces_sliding = layers == "all" or name == "mistral"
    sinks = 0 if reduces_sliding else 2
    full = _additive(_allowed(26, prompt, chunk, None, sinks), eager)
    sliding = _additive(_allowed(26, prompt, chunk, WINDOW, sinks if reduces_sliding else None), eager)
    with torch.no_grad():
        if name == "mistral":  # every layer slides: one mask
            reference = model(sequence, attention_mask=sliding).logits
        else:
            reference = model(sequence, attention_mask={"full_attention": full, "sliding_attention": sliding}).logits
        dense = model(sequence).logits
    hf_tokred.apply(model, {"method": "streamingllm", "sink_tokens": sinks, "window": RECENT, "layers": layers})
    cache = hf_tokred.build_cache(model)
    logits = []
    with torch.no_grad():
        logits.append(model(sequence[:, :prompt], past_key_values=cache).logits)
        for t in range(prompt, chunk):
            logits.append(model(sequence[:, t:t + 1], past_key_values=cache).logits)
        # the chunk's later queries no longer see the oldest held token, which is inside the earlier ones' window
        logits.append(model(sequence[:, chunk:], past_key_values=cache).logits)
    got = torch.cat(logits, dim=1)
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=0)
    assert (got - dense).abs().max() > 1e-3  # the reduction really changed attention
    reduced = [isinstance(layer, ReducingLayer) for layer in cache.layers]
    if reduces_sliding:
        assert all(reduced) and any(layer.is_sliding for layer in cache.layers)
    else:
        assert reduced == [t == "full_attention" for t in _layer_types(model)]


def test_a_reduced_sliding_layer_loses_its_sinks_with_its_window():
    model = make("gemma3")
    hf_tokred.apply(model, {"method": "streamingllm", "sink_tokens": 2, "window": RECENT, "layers": "all"})
    cache = hf_tokred.build_cache(model)
    model.generate(_ids(12), max_new_tokens=16, do_sample=False, past_key_values=cache)
    for layer in cache.layers:
        held = sorted(layer.positions[0, 0].tolist())
        if layer.is_sliding:  # the sinks left with the window, and no later token was protected in their place
            assert held == list(range(27 - 2 - RECENT, 27)) and layer.sliding_window == WINDOW
        else:
            assert held == [0, 1, *range(27 - RECENT, 27)]


def test_sliding_layers_keep_the_dense_caches_keys_and_values():
    model = make("gemma3")  # layers 0 and 1 slide and come before any reduced layer: identical inputs
    hf_tokred.apply(model, _config("tova", max_tokens=12))
    sequence = _ids(30, seed=2)
    reduced, dense = hf_tokred.build_cache(model), DynamicCache(config=model.config)
    with torch.no_grad():
        for cache in (reduced, dense):
            model(sequence[:, :20], past_key_values=cache)
            for t in range(20, 30):
                model(sequence[:, t:t + 1], past_key_values=cache)
    for index in (0, 1):
        assert type(reduced.layers[index]) is DynamicSlidingWindowLayer
        assert torch.equal(reduced.layers[index].keys, dense.layers[index].keys)
        assert torch.equal(reduced.layers[index].values, dense.layers[index].values)
    assert reduced.stored_lengths() == [WINDOW - 1, WINDOW - 1, 12, 12] and dense.layers[2].keys.shape[-2] == 30
    assert reduced.is_sliding == [True, True, False, False]


# ---------------------------------------------------------------------------------------------
# Recomputed attention scores follow the model's eager attention (scaling, soft-capping)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, feature", [("gemma2", "attn_logit_softcapping"), ("gpt_oss", "sinks")])
def test_recomputed_scores_follow_the_models_eager_attention(name, feature):
    """Gemma 2: soft-capped logits and query_pre_attn_scalar scaling; GPT-OSS: learned sink logits that take a
    share of every softmax. The probabilities policies score with equal the model's own eager attention."""
    from hf_tokred.attention import AttentionObserver, add_observer
    from hf_tokred.kv.scoring import iter_attention_probs

    model = make(name)
    module = model.model.layers[1].self_attn  # a full-attention layer
    with torch.no_grad():
        if name == "gemma2":
            module.q_proj.weight *= 60  # logits far beyond the cap of 5, so capping changes them
        else:
            module.sinks.fill_(2.0)  # the sinks take most of the attention
    ids = _ids(16)
    with torch.no_grad():
        expected = model(ids, output_attentions=True).attentions[1]  # (1, heads, 16, 16)
    hf_tokred.apply(model, _config("tova", keep=1.0))
    captured = {}

    class Capture(AttentionObserver):
        def observe(self, module, query, key, value, attention_mask):
            captured["query"] = query

    add_observer(module, Capture())
    cache = hf_tokred.build_cache(model)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer = cache.layers[1]

    def probs():
        return torch.cat(list(iter_attention_probs(module, captured["query"], layer)), dim=3).flatten(1, 2)

    torch.testing.assert_close(probs(), expected, atol=1e-5, rtol=1e-4)
    setattr(module, feature, None)
    assert (probs() - expected).abs().max() > 1e-2  # without the feature the scores would be wrong


# ---------------------------------------------------------------------------------------------
# Rotary: pre-RoPE keys through the model's own rotary module and apply function
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROTARY)
def test_rotary_matches_the_models_own_rope(name):
    """RoPE attention is shift-invariant, so the same tokens at positions shifted by 7 give the same pre-RoPE
    keys: un-rotating both caches with their positions must agree, and re-rotating lands on the other cache."""
    model = make(name)
    ids, caches = _ids(12), []
    for shift in (0, 7):
        cache = DynamicCache()
        with torch.no_grad():
            model(ids, position_ids=torch.arange(12)[None] + shift, past_key_values=cache)
        caches.append(cache)
    for index in range(len(caches[0].layers)):
        rotary = rotary_for(model, index)
        k0, k7 = caches[0].layers[index].keys, caches[1].layers[index].keys
        positions = torch.arange(12).expand(*k0.shape[:2], 12)
        torch.testing.assert_close(rotary.unrotate(k0, positions), rotary.unrotate(k7, positions + 7), atol=2e-5, rtol=0)
        torch.testing.assert_close(rotary.rotate(rotary.unrotate(k0, positions), positions + 7), k7, atol=2e-5, rtol=0)
        assert not torch.allclose(k0, k7, atol=1e-3)  # the positions really rotate these keys


def test_rotary_knows_gemma3_layer_types_and_cohere2_nope_layers():
    gemma3 = make("gemma3")
    assert [rotary_for(gemma3, i).layer_type for i in range(4)] == HYBRID
    cohere2 = transformers.Cohere2ForCausalLM(transformers.Cohere2Config(
        **GQA, num_hidden_layers=2, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]))
    assert [rotary_for(cohere2, i).style for i in range(2)] == ["model", "none"]  # interleaved pairs; NoPE


# ---------------------------------------------------------------------------------------------
# Storages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_precision_storage_is_bit_identical(name):
    model = make(name)
    dense = _generate(model, _ids())
    hf_tokred.apply(model, {"method": "kivi", "bits": 16})
    out = _generate(model, _ids())
    assert torch.equal(out.sequences, dense.sequences) and torch.equal(torch.stack(out.scores), torch.stack(dense.scores))


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "gpt2"])
@pytest.mark.parametrize("storage", ["kivi", "kvquant", "kivi_pre_rope"])
def test_storages_run_greedy_sampling_and_beams(name, storage):
    model = make(name)
    if storage == "kvquant":
        _calibrated(model, KVQUANT)
    else:
        hf_tokred.apply(model, {**KIVI, "pre_rope": storage == "kivi_pre_rope"})
    dense_sequences, dense_scores = _dense(name) if name in ("gemma3", "gpt_neox", "phi3") else (None, None)
    greedy = _generate(model, _ids())
    torch.manual_seed(0)
    sampled = _generate(model, _ids(), do_sample=True, top_k=5)
    beams = _generate(model, _ids(), num_beams=2)
    assert greedy.sequences.shape == sampled.sequences.shape == beams.sequences.shape == (1, 36)
    cache = greedy.past_key_values
    acted = set(_full_layers(model) or range(len(cache.layers)))
    assert {i for i, layer in enumerate(cache.layers) if isinstance(layer, ReducingLayer)} == acted
    assert all(layer.store is not None for layer in cache.layers if isinstance(layer, ReducingLayer))
    if dense_scores is not None:  # quantization noise only, over the steps that saw the same tokens
        same = [torch.equal(greedy.sequences[:, :31 + s], dense_sequences[:, :31 + s]) for s in range(5)]
        steps = 1 + (same.index(False) if False in same else 5)
        assert float((torch.stack(greedy.scores)[:steps] - dense_scores[:steps]).abs().max()) < 0.5


def test_storage_on_all_layers_compresses_the_sliding_windows_too():
    sizes = {}
    for layers in (None, "all"):
        model = make("gemma3")
        hf_tokred.apply(model, {**KIVI, "key_group_size": 4, "residual": 0, "sink_tokens": 0, "layers": layers})
        cache = hf_tokred.build_cache(model)
        out = model.generate(_ids(40), max_new_tokens=4, do_sample=False, past_key_values=cache)
        assert out.shape == (1, 44) and cache.stored_lengths()[:2] == [WINDOW - 1] * 2
        sizes[layers] = cache.kv_bytes_by_type()
        assert all(isinstance(layer, ReducingLayer) == (layers == "all" or i >= 2) for i, layer in enumerate(cache.layers))
    assert sizes["all"]["full_attention"] == sizes[None]["full_attention"]
    assert sizes["all"]["sliding_attention"] < 0.7 * sizes[None]["sliding_attention"]


def test_policy_on_full_layers_and_storage_on_all_layers_compose():
    model = make("gemma3")
    hf_tokred.apply(model, compose(_config("snapkv", max_tokens=12), {**KIVI, "layers": "all"}))
    cache = hf_tokred.build_cache(model)
    model.generate(_ids(), max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert [layer.policy.method for layer in cache.layers] == ["streamingllm", "streamingllm", "snapkv", "snapkv"]
    assert [layer.budget for layer in cache.layers] == [None, None, 12, 12]  # sliding layers: storage only
    assert cache.stored_lengths() == [WINDOW - 1, WINDOW - 1, 15, 15]


def test_minicache_merges_adjacent_full_layers_only():
    model = make("gemma3")  # full-attention layers 2 and 3 are adjacent
    dense = _generate(model, _ids())
    hf_tokred.apply(model, {"method": "minicache"})
    cache = _generate(model, _ids()).past_key_values
    stores = [type(getattr(layer, "store", None)).__name__ for layer in cache.layers]
    assert stores == ["NoneType", "NoneType", "MergedLayerStore", "MergedLayerStore"]
    assert cache.layers[2].store.pair is cache.layers[3].store.pair
    assert cache.kv_bytes_by_type()["full_attention"] < dense.past_key_values.layers[2].keys.nbytes * 4
    alternating = make("gemma2")  # no two full-attention layers are adjacent
    with pytest.raises(ConfigError, match=r"start_layer: minicache merges adjacent full-attention layers.*\[1, 3\]") as err:
        hf_tokred.apply(alternating, {"method": "minicache", "start_layer": 0})
    assert err.value.field == "start_layer"
    with pytest.raises(ConfigError, match="cannot hold the sliding-window layers") as err:
        hf_tokred.apply(model, {"method": "minicache", "layers": "all"})
    assert err.value.field == "layers"


# ---------------------------------------------------------------------------------------------
# The `layers` option
# ---------------------------------------------------------------------------------------------


def test_layers_option_is_validated_and_round_trips():
    for method, extra in (("snapkv", {"keep": 0.5}), ("kivi", {}), ("kvquant", {})):
        cfg = TokenReductionConfig(method=method, layers="all", **extra)
        assert TokenReductionConfig.from_dict(cfg.to_dict()).layers == "all"
        on_disk = json.loads(cfg.to_json_string())
        assert on_disk["layers"] == "all" and TokenReductionConfig.from_dict(on_disk) == cfg
        with pytest.raises(ConfigError, match=r"layers: expected one of 'full', 'all' or None, got 'sliding'") as err:
            TokenReductionConfig(method=method, layers="sliding", **extra)
        assert err.value.field == "layers"
    assert TokenReductionConfig(method="tova", keep=0.5).layers is None


def test_full_layers_only_on_a_model_whose_every_layer_slides_is_an_error():
    model = make("mistral")
    with pytest.raises(ConfigError, match="layers: MistralForCausalLM has no full-attention layer") as err:
        hf_tokred.apply(model, {"method": "tova", "keep": 0.5, "layers": "full"})
    assert err.value.field == "layers" and not hasattr(model, "_hf_tokred_applied")


def test_pyramid_budgets_are_spread_over_the_full_layers():
    model = make("gemma2")  # full-attention layers 1 and 3
    hf_tokred.apply(model, _config("pyramidkv", max_tokens=12))
    cache = hf_tokred.compress_context(model, _ids())
    cfg = TokenReductionConfig.coerce(_config("pyramidkv", max_tokens=12))
    assert cache.stored_lengths() == [WINDOW - 1, cfg.layer_budget(12, 0, 2), WINDOW - 1, cfg.layer_budget(12, 1, 2)]
    assert cache.stored_lengths()[1] > cache.stored_lengths()[3]


# ---------------------------------------------------------------------------------------------
# save_pretrained -> from_pretrained
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, config", [
    ("gemma3", _config("snapkv", keep=0.5, layers="full")), ("gpt_neox", _config("h2o", max_tokens=12)),
    ("phi3", compose(_config("tova", max_tokens=12), KIVI)), ("gemma2", {**KIVI, "layers": "all"}),
])
def test_save_and_load_give_identical_generations(name, config, tmp_path):
    make(name).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", token_reduction=config)
    model.generation_config.eos_token_id = None
    first = _generate(model, _ids())
    model.save_pretrained(tmp_path / "reduced")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "reduced")
    again.generation_config.eos_token_id = None
    assert again._hf_tokred_applied.config.to_dict() == model._hf_tokred_applied.config.to_dict()
    second = _generate(again, _ids())
    assert torch.equal(first.sequences, second.sequences) and torch.equal(torch.stack(first.scores),
                                                                          torch.stack(second.scores))


def test_kvquant_calibration_of_a_hybrid_model_saves_and_loads(tmp_path):
    model = _calibrated(make("gemma3"), KVQUANT)
    calibration = model.hf_tokred_modules["kvquant"]
    # the full-attention layers (2, 3) are calibrated, the sliding ones keep their initial ranges
    assert bool((calibration.key_half[:2] == 1).all()) and not bool((calibration.key_half[2:] == 1).all())
    first = _generate(model, _ids())
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    again.generation_config.eos_token_id = None
    assert torch.equal(_generate(again, _ids()).sequences, first.sequences)


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "gpt_neox"])
def test_assisted_decoding_runs_on_a_prompt_compressing_cache(name):
    """Prompt lookup (transformers' assisted decoding) over a SnapKV cache: the greedy output equals plain
    generate() with the same policy; the sliding-window layers left to transformers roll back as transformers'
    own; a policy that evicts while decoding refuses before it runs."""
    model = make(name)
    hf_tokred.apply(model, {"method": "snapkv", "max_tokens": 12, "window": 4})
    ids = torch.cat([_ids(20), _ids(20)[:, :12]], dim=1)  # repeats, so prompt lookup finds drafts
    plain = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=4), plain)
    hf_tokred.remove(model)
    hf_tokred.apply(model, {"method": "h2o", "max_tokens": 12})
    with pytest.raises(hf_tokred.TokenReductionError, match="compresses the prompt once"):
        model.generate(ids, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=4)
