"""StreamingLLM on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import hf_tokred

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from hf_tokred.embedded import load_smollm2

    return load_smollm2()


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def test_generates_4000_tokens_within_budget(smollm2):
    model, tokenizer = smollm2
    budget = 256
    hf_tokred.apply(model, {"method": "streamingllm", "sink_tokens": 4, "max_tokens": budget})
    try:
        cache = hf_tokred.build_cache(model)
        largest = []

        class WatchCache(LogitsProcessor):
            def __call__(self, input_ids, scores):
                largest.append(max(cache.stored_lengths()))
                return scores

        inputs = _chat(tokenizer, "Write a very long story about a lighthouse keeper.")
        prompt_length = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4000, min_new_tokens=4000,
                             do_sample=False, repetition_penalty=1.1,
                             logits_processor=LogitsProcessorList([WatchCache()]))
        assert out.shape[1] == prompt_length + 4000
        assert len(largest) == 4000 and max(largest) <= budget
        assert cache.stored_lengths() == [budget] * model.config.num_hidden_layers
        assert cache.get_seq_length() == prompt_length + 3999
        # layers, k+v, kv heads, slots (the budget plus the one spare slot each step appends into), head dim, fp32
        assert cache.kv_bytes() == 30 * 2 * (1 * 3 * (budget + 1) * 64) * 4
    finally:
        hf_tokred.remove(model)


def test_zero_reduction_is_bit_identical_on_smollm2(smollm2):
    model, tokenizer = smollm2
    inputs = _chat(tokenizer, "What is the capital of France?")
    kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    dense = model.generate(**inputs, **kwargs)
    hf_tokred.apply(model, {"method": "streamingllm", "keep": 1.0})
    try:
        reduced = model.generate(**inputs, **kwargs)
    finally:
        hf_tokred.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(reduced.scores, dense.scores))
    assert "Paris" in tokenizer.decode(reduced.sequences[0, inputs["input_ids"].shape[1]:])
