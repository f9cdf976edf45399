"""StreamingLLM as a TokenReductionCache: exactness against a masked reference, padding, decoding modes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from transformers import LogitsProcessor, LogitsProcessorList

import hf_tokred
from hf_tokred.kv.cache import select_slots

SINKS, WINDOW = 2, 6


def _streaming_mask(length: int, prompt: int, sinks: int, window: int, pad: int = 0) -> torch.Tensor:
    """Teacher-forced reference: prompt tokens attend causally in full; every later token t attends to
    the first `sinks` real tokens and positions [t - window, t]. `pad` leading positions are padding."""
    t = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    causal = j <= t
    streaming = (j < pad + sinks) | (j >= t - window)
    allowed = causal & torch.where(t < prompt, True, streaming) & (j >= pad)
    return allowed[None, None]


def _teacher_forced(model, sequence, prompt):
    cache = hf_tokred.build_cache(model)
    logits = []
    with torch.no_grad():
        logits.append(model(sequence[:, :prompt], past_key_values=cache).logits)
        for t in range(prompt, sequence.shape[1]):
            logits.append(model(sequence[:, t : t + 1], past_key_values=cache).logits)
            assert max(cache.stored_lengths()) <= SINKS + WINDOW
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prompt", [5, 12])
def test_matches_masked_full_attention_reference(attn, prompt):
    model = make_tiny_llama(attn_implementation=attn)
    sequence = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(0))
    allowed = _streaming_mask(40, prompt, SINKS, WINDOW)
    if attn == "eager":  # a 4-D mask goes to the attention function as is: eager adds it
        allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    reference = model(sequence, attention_mask=allowed).logits
    full = model(sequence).logits
    hf_tokred.apply(model, {"method": "streamingllm", "sink_tokens": SINKS, "window": WINDOW})
    got, cache = _teacher_forced(model, sequence, prompt)
    assert cache.get_seq_length() == 40
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    assert (got - full).abs().max() > 1e-2  # the reduction really changed attention


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_decoders(family):
    import transformers

    config_class = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
                    "qwen3": transformers.Qwen3Config}[family]
    model_class = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "qwen3": transformers.Qwen3ForCausalLM}[family]
    torch.manual_seed(0)
    model = model_class(config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=128)).eval()
    sequence = torch.randint(3, 120, (1, 30), generator=torch.Generator().manual_seed(0))
    reference = model(sequence, attention_mask=_streaming_mask(30, 6, SINKS, WINDOW)).logits
    hf_tokred.apply(model, {"method": "streamingllm", "sink_tokens": SINKS, "window": WINDOW})
    got, _ = _teacher_forced(model, sequence, 6)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_generate_matches_reference_and_never_exceeds_budget(tiny_llama):
    prompt = torch.randint(3, 120, (1, 9), generator=torch.Generator().manual_seed(3))
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "sink_tokens": SINKS, "window": WINDOW})
    cache = hf_tokred.build_cache(tiny_llama)
    sizes = []

    class Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sizes.append(max(cache.stored_lengths()))
            return scores

    out = tiny_llama.generate(prompt, max_new_tokens=30, do_sample=False, past_key_values=cache,
                              logits_processor=LogitsProcessorList([Watch()]))
    assert max(sizes[1:]) == SINKS + WINDOW  # after the first decode step the cache holds exactly its budget
    hf_tokred.remove(tiny_llama)
    with torch.no_grad():
        reference = tiny_llama(out, attention_mask=_streaming_mask(out.shape[1], 9, SINKS, WINDOW)).logits
    # greedy tokens are the argmax of the reference at every generated position
    assert torch.equal(reference[0, 8:-1].argmax(-1), out[0, 9:])


def test_left_padded_batch_equals_rows_alone(tiny_llama):
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "sink_tokens": SINKS, "window": WINDOW})
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in (11, 4, 7)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    kwargs = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batched = tiny_llama.generate(ids, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        alone = tiny_llama.generate(row[None], **kwargs)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row):])
        for step_b, step_a in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_b[i], step_a[0], atol=1e-5, rtol=1e-5)
    # early on the 4-token row held padding (masked); by now every row has more real tokens than the
    # budget, and padding is always evicted first
    assert bool(batched.past_key_values.layers[0].valid.all())


def test_padding_is_evicted_before_real_tokens():
    positions = torch.arange(10).expand(1, 1, 10)
    valid = torch.tensor([[[False] * 4 + [True] * 6]])
    keep, _ = select_slots(torch.zeros(1, 1, 10), positions, valid, 5, 2, 2, 10)
    # sinks are the first real tokens (4, 5), then the window (8, 9), then the best other real token
    assert keep.tolist() == [[[4, 5, 7, 8, 9]]]


def test_sampling_and_beam_search(tiny_llama):
    prompt = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(7))
    dense_beam = tiny_llama.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False)
    torch.manual_seed(0)
    dense_sample = tiny_llama.generate(prompt, max_new_tokens=12, do_sample=True, num_return_sequences=2)
    # zero reduction: identical to the dense cache
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "max_tokens": 1000})
    assert torch.equal(tiny_llama.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False), dense_beam)
    torch.manual_seed(0)
    assert torch.equal(
        tiny_llama.generate(prompt, max_new_tokens=12, do_sample=True, num_return_sequences=2), dense_sample
    )
    # with eviction: beam search reorders positions/validity with the keys
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "sink_tokens": SINKS, "window": WINDOW})
    out = tiny_llama.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert out.sequences.shape == (2, 22) and cache.stored_lengths() == [8, 8]
    layer = cache.layers[0]
    assert layer.positions.shape[0] == 6  # batch 2 x 3 beams
    assert (layer.positions.sort(dim=-1).values[..., :SINKS] == torch.arange(SINKS)).all()


def test_reorder_cache_moves_positions_with_keys(tiny_llama):
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "sink_tokens": 1, "window": 3})
    cache = hf_tokred.build_cache(tiny_llama)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        tiny_llama(ids, attention_mask=mask, past_key_values=cache)
        tiny_llama(torch.tensor([[10], [10]]), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                   past_key_values=cache)
    layer = cache.layers[1]
    keys, positions = layer.keys.clone(), layer.positions.clone()
    # slots are evicted in place, so compare the set of positions each row holds
    held = positions.sort(dim=-1).values
    assert held[0, 0].tolist() == [2, 5, 6, 7] and held[1, 0].tolist() == [0, 5, 6, 7]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, keys.flip(0)) and torch.equal(layer.positions, positions.flip(0))


def test_crop_is_a_clear_error(tiny_llama):
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "max_tokens": 8})
    cache = hf_tokred.build_cache(tiny_llama)
    assert not cache.is_croppable
    with pytest.raises(hf_tokred.TokenReductionError, match="cannot be cropped"):
        cache.layers[0].crop(-1)


def test_keep_fraction_sets_budget_from_prompt(tiny_llama):
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "sink_tokens": 2, "keep": 0.5})
    cache = hf_tokred.build_cache(tiny_llama)
    tiny_llama.generate(torch.randint(3, 120, (1, 20)), max_new_tokens=5, past_key_values=cache, do_sample=False)
    assert cache.stored_lengths() == [10, 10] and cache.get_max_length() == 10


def test_attention_must_stay_hf_tokred(tiny_llama):
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "max_tokens": 8})
    cache = hf_tokred.build_cache(tiny_llama)
    tiny_llama.config._attn_implementation = "sdpa"  # user switched attention behind our back
    for sub in tiny_llama.modules():
        if hasattr(sub, "config"):
            sub.config._attn_implementation = "sdpa"
    with pytest.raises(hf_tokred.TokenReductionError, match="did not run through hf_tokred's attention"):
        with torch.no_grad():
            tiny_llama(torch.randint(3, 120, (1, 12)), past_key_values=cache)
            tiny_llama(torch.randint(3, 120, (1, 1)), past_key_values=cache)
