"""The reproducible text and self-generated answers that the learned LM reducers train and are measured on."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

import hf_tokred
from hf_tokred.errors import ConfigError
from hf_tokred.recipes.lm_data import dense_generations, instruction_prompts, lm_texts, token_windows


def test_splits_are_disjoint_deterministic_and_prose():
    train, heldout = lm_texts("train"), lm_texts("heldout")
    assert len(train) > 1000 and len(heldout) > 200
    assert not set(train) & set(heldout)
    assert train == lm_texts("train")
    assert all(len(t.split()) >= 12 and "\n" not in t for t in heldout)
    with pytest.raises(ConfigError, match="split"):
        lm_texts("test")


def test_token_windows_cut_exact_lengths_and_refuse_too_few():
    tokenizer = make_tiny_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 120}" for j in range(50)) for i in range(10)]  # 51 ids each with eos
    windows = token_windows(tokenizer, texts, 16, seed=1)
    assert windows.shape == (510 // 16, 16) and windows.dtype == torch.long
    assert torch.equal(windows, token_windows(tokenizer, texts, 16, seed=1))
    assert not torch.equal(windows, token_windows(tokenizer, texts, 16, seed=2))
    assert token_windows(tokenizer, texts, 16, count=4).shape == (4, 16)
    with pytest.raises(ConfigError, match="count"):
        token_windows(tokenizer, texts, 16, count=1000)
    with pytest.raises(ConfigError, match="length"):
        token_windows(tokenizer, texts, 1)


def test_instruction_prompts_are_seeded_and_from_their_split():
    prompts = instruction_prompts("heldout", 20, seed=3)
    assert len(prompts) == 20 and prompts == instruction_prompts("heldout", 20, seed=3)
    heldout = set(lm_texts("heldout"))
    assert all(any(t in p for t in heldout) for p in prompts)


def test_dense_generations_are_cached_by_key_and_need_the_dense_model(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model = make_tiny_llama()
    prompts = ["w1 w2 w3", "w4 w5"]
    cache = tmp_path / "answers.json"
    answers = dense_generations(model, tokenizer, prompts, max_new_tokens=5, cache_file=str(cache), progress=False)
    assert [len(a) for a in answers] == [5, 5]  # the tiny model never stops early (no eos)
    alone = dense_generations(model, tokenizer, prompts[1:], max_new_tokens=5, progress=False)
    assert alone[0] == answers[1]  # left-padded batch == the row alone

    def refuse(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    model.generate = refuse
    assert dense_generations(model, tokenizer, prompts, max_new_tokens=5, cache_file=str(cache)) == answers
    with pytest.raises(AssertionError, match="generated again"):  # another key regenerates
        dense_generations(model, tokenizer, prompts, max_new_tokens=4, cache_file=str(cache))
    del model.generate
    hf_tokred.apply(model, {"method": "streamingllm", "max_tokens": 64})
    with pytest.raises(ConfigError, match="dense model"):
        dense_generations(model, tokenizer, prompts, max_new_tokens=5)
