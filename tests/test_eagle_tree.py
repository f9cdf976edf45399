"""EAGLE's tree verification (``generate(..., custom_generate=hf_tokred.eagle_tree_decoding)``): one forward pass
checks a whole draft tree, the cache keeps the accepted path, and the output is the model's greedy output."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM, DynamicCache

import hf_tokred
from hf_tokred import eagle_tree_decoding
from hf_tokred.errors import TokenReductionError
from hf_tokred.integration.eagle import EagleCandidateGenerator
from hf_tokred.integration.wiring import get_applied
from hf_tokred.kv.cache import keep_newest_entries
from hf_tokred.methods.lm.eagle import select_tree, tree_verification_mask

SMALL = {"method": "eagle", "draft_vocab": 64, "depth": 4, "top_k": 3, "min_confidence": 0.0, "tree_tokens": 8}


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (1, n), generator=torch.Generator().manual_seed(seed))


def _with_head(model, settings=SMALL, seed: int = 1):
    """``model`` with an EAGLE head of random non-trivial weights (``settings`` None: the one already applied)."""
    if settings is not None:
        hf_tokred.apply(model, settings)
    head = model.hf_tokred_modules["eagle"]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial weights: a random head drafts badly but must stay exact
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _tree(model, prompt, **kwargs):
    return model.generate(prompt, do_sample=False, custom_generate=eagle_tree_decoding, **kwargs)


def test_select_tree_keeps_the_best_nodes_with_their_ancestors_breadth_first():
    toks = [torch.tensor([10, 11, 12]), torch.tensor([20, 21, 22]), torch.tensor([30, 31, 32])]
    par = [torch.tensor([0, 0, 0]), torch.tensor([0, 1, 0]), torch.tensor([2, 0, 1])]
    sc = [torch.log(torch.tensor([0.5, 0.3, 0.2])), torch.log(torch.tensor([0.3, 0.2, 0.1])),
          torch.log(torch.tensor([0.09, 0.05, 0.04]))]
    token, parent, depth = select_tree(toks, par, sc, 5)
    # 0.5 (10), 0.3 (11), 0.3 (20 under 10: the shallower 11 first), 0.2 (12), 0.2 (21 under 11)
    assert token.tolist() == [10, 11, 12, 20, 21] and parent.tolist() == [-1, -1, -1, 0, 1]
    assert depth.tolist() == [1, 1, 1, 2, 2]
    token, parent, depth = select_tree(toks, par, sc, 9)
    assert token.tolist() == [10, 11, 12, 20, 21, 22, 30, 31, 32]
    assert parent.tolist() == [-1, -1, -1, 0, 1, 0, 5, 3, 4] and depth.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert select_tree(toks, par, sc, 1)[0].tolist() == [10]


def test_tree_verification_mask_sees_the_context_the_root_and_the_ancestors():
    mask = tree_verification_mask(2, torch.tensor([-1, -1, 0, 2, 1]))[0, 0].int()
    assert mask.shape == (6, 8)
    assert mask[:, :3].eq(1).all()  # the cached context and the root, for every row
    assert mask[:, 3:].tolist() == [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                    [1, 0, 1, 1, 0], [0, 1, 0, 0, 1]]


def test_keep_newest_entries_keeps_the_accepted_rows_of_every_layer():
    cache = DynamicCache()
    keys = torch.arange(2 * 7, dtype=torch.float).reshape(1, 1, 14, 1).expand(1, 2, 14, 3).clone()
    for layer in range(2):
        cache.update(keys + layer, keys + 100 + layer, layer)
    keep_newest_entries(cache, 5, [0, 2, 3])
    assert cache.get_seq_length() == 12
    for index, layer in enumerate(cache.layers):
        assert layer.keys[0, 0, :, 0].tolist() == [float(i + index) for i in [*range(9), 9, 11, 12]]
        assert layer.values[0, 1, -3:, 0].tolist() == [109.0 + index, 111.0 + index, 112.0 + index]


@pytest.mark.parametrize("settings", [SMALL, {**SMALL, "tree_tokens": 1}, {**SMALL, "tree_tokens": 20, "depth": 6},
                                      {**SMALL, "top_k": 1, "draft_vocab": 0}])
def test_greedy_outputs_identical_to_plain_generate(settings):
    model = make_tiny_llama()
    prompts = [_prompt(n, seed=n) for n in (5, 12, 30)]
    dense = [model.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    _with_head(model, settings)
    for prompt, expected in zip(prompts, dense):
        assert torch.equal(_tree(model, prompt, max_new_tokens=24), expected)
        stats = model.hf_tokred_eagle_tree_stats
        assert stats["rounds"] > 0 and stats["verified_nodes"] <= settings["tree_tokens"] * stats["rounds"]
    assert torch.equal(model.generate(prompts[0], max_new_tokens=24, do_sample=False), dense[0])  # plain: dense


def test_eager_attention_and_lookup_drafts_stay_exact():
    model = make_tiny_llama(attn_implementation="eager")
    prompt = torch.cat([_prompt(10, 1), _prompt(10, 1), _prompt(6, 2)], -1)  # a context that repeats itself
    dense = model.generate(prompt, max_new_tokens=30, do_sample=False)
    _with_head(model, {**SMALL, "lookup_min_match": 2})
    assert torch.equal(_tree(model, prompt, max_new_tokens=30), dense)
    assert torch.equal(_tree(model, prompt, max_new_tokens=30, prompt_lookup_num_tokens=4), dense)
    assert model.hf_tokred_eagle_tree_stats["lookup_rounds"] > 0


def _drafts_with_the_right_second_branch(full):
    """A ``draft_tree`` in place of the head's: at every round a wrong first branch and, as the second, the next
    ``budget`` tokens of ``full`` (breadth-first pairs: wrong, right)."""

    def draft_tree(self, root, budget):
        done = self.fed + 1  # the verified tokens (the prompt and the accepted ones)
        right = full[0, done:done + budget]
        wrong = (right + 1) % 128
        tokens = torch.stack([wrong, right], 1).flatten()
        parent = torch.tensor([-1, -1] + [p for d in range(1, right.numel()) for p in (2 * d - 1, 2 * d - 1)])
        return tokens, parent, torch.arange(tokens.numel()) // 2 + 1

    return draft_tree


def test_a_tree_whose_second_branch_is_right_is_accepted_whole_and_the_cache_keeps_only_its_path(monkeypatch):
    """Drafts in place of the head's: at every round a wrong first branch and, as the second, the model's own greedy
    continuation (`depth` tokens): every round accepts `depth` drafts plus the model's token, the cache keeps the
    accepted path only (its length is the sequence's minus the last token, and continuing from it is exact)."""
    model = make_tiny_llama()
    prompt = _prompt(8)
    full = model.generate(prompt, max_new_tokens=21, do_sample=False)
    _with_head(model, {**SMALL, "draft_vocab": 0})

    draft_tree = _drafts_with_the_right_second_branch(full)
    monkeypatch.setattr(EagleCandidateGenerator, "draft_tree", draft_tree)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = _tree(model, prompt, max_new_tokens=21, return_dict_in_generate=True)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, full)
    # the prefill gives 1 token; then four rounds of 5 (4 drafts + the model's token)
    stats = model.hf_tokred_eagle_tree_stats
    assert len(calls) == 1 + 4 and stats["rounds"] == 4 and stats["accepted"] == 4 + 4 + 4 + 4
    assert out.past_key_values.get_seq_length() == full.shape[1] - 1
    monkeypatch.undo()
    with torch.no_grad():  # the kept cache is the dense cache of the sequence: the next logits agree
        dense_cache = DynamicCache()
        reference = model(full, past_key_values=dense_cache).logits[:, -1]
        step = model(full[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    assert torch.allclose(step, reference, atol=1e-5)


@pytest.mark.parametrize("warpers", [{}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}])
def test_sampling_draws_the_sequence_plain_sampling_draws_under_the_same_seed(warpers):
    model = make_tiny_llama()
    prompts = [_prompt(n, seed=n) for n in (6, 17)]
    plain = []
    for seed, prompt in enumerate(prompts):
        torch.manual_seed(seed)
        plain.append(model.generate(prompt, max_new_tokens=24, do_sample=True, **warpers))
    _with_head(model)
    for seed, (prompt, expected) in enumerate(zip(prompts, plain)):
        torch.manual_seed(seed)
        out = model.generate(prompt, max_new_tokens=24, do_sample=True, custom_generate=eagle_tree_decoding,
                             **warpers)
        assert torch.equal(out, expected)


def test_sampling_accepts_a_drafted_path_the_model_draws(monkeypatch):
    """The second branch drafts the very tokens plain sampling draws under the seed: each round accepts all of
    them, and the output is still that seeded sequence."""
    model = make_tiny_llama()
    prompt = _prompt(8)
    torch.manual_seed(3)
    full = model.generate(prompt, max_new_tokens=21, do_sample=True, temperature=0.5)
    _with_head(model, {**SMALL, "draft_vocab": 0})
    monkeypatch.setattr(EagleCandidateGenerator, "draft_tree", _drafts_with_the_right_second_branch(full))
    torch.manual_seed(3)
    out = model.generate(prompt, max_new_tokens=21, do_sample=True, temperature=0.5,
                         custom_generate=eagle_tree_decoding)
    assert torch.equal(out, full)
    stats = model.hf_tokred_eagle_tree_stats
    assert stats["rounds"] == 4 and stats["accepted"] == 16


def test_a_cache_holding_a_prefix_of_the_prompt_is_continued_exactly():
    """The draft head starts at the first token the target's forward pass runs (it has no entries before)."""
    model = make_tiny_llama()
    prompt = _prompt(20, 5)
    dense = model.generate(prompt, max_new_tokens=16, do_sample=False)
    _with_head(model)
    cache = DynamicCache()
    with torch.no_grad():
        model(prompt[:, :12], past_key_values=cache)
    assert torch.equal(_tree(model, prompt, max_new_tokens=16, past_key_values=cache), dense)
    cache = DynamicCache()
    with torch.no_grad():
        model(prompt[:, :12], past_key_values=cache)
    chain = model.generate(prompt, max_new_tokens=16, do_sample=False, past_key_values=cache,
                           assistant_model=hf_tokred.eagle_assistant(model))  # the chain path drafts the same way
    assert torch.equal(chain, dense)
    # transformers' assisted decoding feeds its first pass the whole prompt; the cached prefix is not fed again
    assert cache.get_seq_length() == chain.shape[1] - 1
    with pytest.raises(TokenReductionError, match="whole prompt"):
        _tree(model, prompt[:, :12], max_new_tokens=4, past_key_values=cache)  # the cache holds more than this


def test_stops_at_the_end_token_inside_an_accepted_path():
    model = make_tiny_llama()
    prompt = _prompt(9, 4)
    free = model.generate(prompt, max_new_tokens=20, do_sample=False)
    end = int(free[0, prompt.shape[1] + 6])  # a token the dense model writes 7th
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = end
    dense = model.generate(prompt, max_new_tokens=20, do_sample=False)
    _with_head(model, {**SMALL, "draft_vocab": 0, "top_k": 1})
    assert torch.equal(_tree(model, prompt, max_new_tokens=20), dense) and dense.shape[1] <= prompt.shape[1] + 7


def test_save_load_gives_the_same_tree_decoding(tmp_path):
    model = _with_head(make_tiny_llama(), {**SMALL, "tree_tokens": 5})
    prompt = _prompt(11)
    expected = _tree(model, prompt, max_new_tokens=16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_tree(loaded, prompt, max_new_tokens=16), expected)
    assert get_applied(loaded).config.get("decoding").tree_tokens == 5


def test_what_tree_verification_cannot_do_is_refused_before_it_runs():
    model = _with_head(make_tiny_llama())
    prompt = _prompt(7)
    dense = model.generate(prompt, max_new_tokens=6, do_sample=False)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    cases = [({"inputs": torch.cat([prompt, prompt])}, "batch of 2"),
             ({"num_beams": 2}, "num_beams=2"),
             ({"return_dict_in_generate": True, "output_scores": True}, "output_scores"),
             ({"attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1]])}, "padding")]
    try:
        for extra, message in cases:
            args = {"inputs": prompt, "max_new_tokens": 6, "do_sample": False, **extra}
            with pytest.raises(TokenReductionError, match=message):
                model.generate(**args, custom_generate=eagle_tree_decoding)
    finally:
        handle.remove()
    assert calls == []  # nothing ran
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), dense)
    with pytest.raises(TokenReductionError, match="no EAGLE reduction"):
        make_tiny_llama().generate(prompt, max_new_tokens=4, custom_generate=eagle_tree_decoding)


POLICIES = [{"method": "snapkv", "max_tokens": 16, "window": 4}, {"method": "pyramidkv", "max_tokens": 16, "window": 4},
            {"method": "fastgen", "keep": 0.5, "special_token_ids": [0, 1, 2], "punctuation_token_ids": [3, 4, 5]}]


@pytest.mark.parametrize("policy", POLICIES)
def test_over_a_prompt_compressing_kv_policy_the_tree_gives_the_policys_own_output(policy):
    """The policy compresses the prompt in the first forward pass; each round's tree is appended to its cache and the
    rejected nodes dropped again, so the output (greedy or seeded sampling) is the policy's own plain output and the
    cache holds what the plain decode's holds."""
    model = make_tiny_llama()
    hf_tokred.apply(model, hf_tokred.compose(SMALL, policy))
    _with_head(model, None)
    for n in (30, 41):
        prompt = _prompt(n, seed=n)
        plain_cache = hf_tokred.build_cache(model)
        plain = model.generate(prompt, max_new_tokens=24, do_sample=False, past_key_values=plain_cache)
        cache = hf_tokred.build_cache(model)
        assert torch.equal(_tree(model, prompt, max_new_tokens=24, past_key_values=cache), plain)
        assert cache.stored_lengths() == plain_cache.stored_lengths() and cache.stored_lengths()[0] < n + 24
        assert cache.get_seq_length() == plain_cache.get_seq_length()
        assert torch.equal(_tree(model, prompt, max_new_tokens=24), plain)  # generate() builds the cache itself
        repeating = torch.cat([prompt, prompt[:, -12:]], -1)  # lookup chains where the context repeats itself
        plain_repeating = model.generate(repeating, max_new_tokens=24, do_sample=False)
        assert torch.equal(_tree(model, repeating, max_new_tokens=24, prompt_lookup_num_tokens=4), plain_repeating)
        assert model.hf_tokred_eagle_tree_stats["lookup_rounds"] > 0
        torch.manual_seed(n)
        sampled = model.generate(prompt, max_new_tokens=24, do_sample=True)
        torch.manual_seed(n)
        assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=True,
                                          custom_generate=eagle_tree_decoding), sampled)


def test_over_a_kv_policy_an_accepted_tree_path_leaves_the_cache_the_plain_decode_leaves(monkeypatch):
    model = make_tiny_llama()
    hf_tokred.apply(model, hf_tokred.compose({**SMALL, "draft_vocab": 0}, POLICIES[0]))
    prompt = _prompt(30)
    plain_cache = hf_tokred.build_cache(model)
    full = model.generate(prompt, max_new_tokens=21, do_sample=False, past_key_values=plain_cache)
    monkeypatch.setattr(EagleCandidateGenerator, "draft_tree", _drafts_with_the_right_second_branch(full))
    cache = hf_tokred.build_cache(model)
    assert torch.equal(_tree(model, prompt, max_new_tokens=21, past_key_values=cache), full)
    assert model.hf_tokred_eagle_tree_stats["accepted"] == 16
    for layer, plain_layer in zip(cache.layers, plain_cache.layers):
        assert torch.equal(layer.positions, plain_layer.positions) and torch.equal(layer.valid, plain_layer.valid)
        assert layer.seen == plain_layer.seen
        assert torch.allclose(layer.keys, plain_layer.keys, atol=1e-5)
        assert torch.allclose(layer.values, plain_layer.values, atol=1e-5)


def test_a_cache_that_evicts_while_decoding_or_sliding_window_layers_are_refused():
    model = make_tiny_llama()
    hf_tokred.apply(model, hf_tokred.compose(SMALL, {"method": "streamingllm", "max_tokens": 16}))
    cache = hf_tokred.build_cache(model)
    with pytest.raises(TokenReductionError, match="cannot take tokens back.*snapkv"):
        _tree(model, _prompt(20), max_new_tokens=4, past_key_values=cache)
    assert cache.get_seq_length() == 0  # refused before anything ran
    config = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    gemma = transformers.Gemma3ForCausalLM(config).eval()
    hf_tokred.apply(gemma, {**SMALL, "draft_vocab": 0})
    with pytest.raises(TokenReductionError, match="DynamicSlidingWindowLayer"):
        _tree(gemma, _prompt(12), max_new_tokens=4)
