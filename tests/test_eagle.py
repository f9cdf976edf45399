"""EAGLE (arXiv 2401.15077): the draft head as a learned part, drafting through transformers' assisted generation."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import (
    assert_assisted_decoding_continues_a_cache_as_plain_generate,
    assert_loads_without_hf_tokred,
    make_tiny_llama,
    make_tiny_tokenizer,
)
from transformers import AutoModelForCausalLM

import hf_tokred
from hf_tokred.errors import ConfigError, TokenReductionError
from hf_tokred.integration import eagle as eagle_wiring
from hf_tokred.integration.eagle import EagleCandidateGenerator, eagle_assistant
from hf_tokred.integration.wiring import get_applied
from hf_tokred.methods.lm.eagle import (
    EagleHead,
    best_chain,
    causal_mask,
    eagle_loss,
    expand_beams,
    frequent_tokens,
    lookup_continuation,
    tree_mask,
    unroll_mask,
    unrolled_features,
)

SMALL = {"method": "eagle", "draft_vocab": 64, "depth": 4, "top_k": 3, "min_confidence": 0.0}


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def generators(monkeypatch):
    """The EagleCandidateGenerators built during the test (to read their stats)."""
    built = []
    original = EagleCandidateGenerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(EagleCandidateGenerator, "__init__", init)
    return built


def _trained_like(model, seed: int = 1):
    """Give the head non-trivial weights (a random, untrained head drafts badly but must stay exact)."""
    head = model.hf_tokred_modules["eagle"]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return head


# ---------------------------------------------------------------------------------------------
# plain functions
# ---------------------------------------------------------------------------------------------


def test_masks_beams_chain_vocabulary_and_loss():
    assert causal_mask(2, 2).int()[0, 0].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    anc = torch.tensor([[True, False, False], [False, False, True]])
    assert tree_mask(1, anc).int()[0, 0].tolist() == [[1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 1]]
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    parent, column, score = expand_beams(torch.log(torch.tensor([0.6, 0.4])), lp, 3)
    assert parent.tolist() == [1, 0, 0] and column.tolist() == [2, 0, 1]  # 0.32, 0.30, 0.18
    assert torch.allclose(score.exp(), torch.tensor([0.32, 0.30, 0.18]))
    toks = [torch.tensor([5, 6]), torch.tensor([7, 8]), torch.tensor([9])]
    par = [torch.tensor([0, 0]), torch.tensor([1, 0]), torch.tensor([1])]
    sc = [torch.log(torch.tensor([0.6, 0.3])), torch.log(torch.tensor([0.25, 0.2])), torch.log(torch.tensor([0.1]))]
    assert best_chain(toks, par, sc, 0.0) == [5, 8, 9]  # the deepest best beam, traced back
    assert best_chain(toks, par, sc, 0.2) == [6, 7]  # cut where the cumulative probability drops below 0.2
    assert best_chain(toks, par, sc, 0.99) == [5]  # at least one token
    ids = torch.tensor([4, 4, 4, 2, 2, 9])
    assert frequent_tokens(ids, 2, 10).tolist() == [2, 4]
    assert frequent_tokens(ids, 3, 10, always=[7]).tolist() == [2, 4, 7]
    with pytest.raises(ConfigError):
        frequent_tokens(ids, 11, 10)
    f = torch.randn(3, 8)
    loss, reg, cls = eagle_loss(f, f, torch.randn(3, 5), torch.randn(3, 5))
    assert reg.item() == 0.0 and cls.item() > 0 and torch.isclose(loss, 0.1 * cls)
    mask = torch.tensor([1.0, 0.0, 0.0])
    _, reg_masked, _ = eagle_loss(f, f + torch.tensor([[0.0], [5.0], [5.0]]), torch.zeros(3, 5), torch.zeros(3, 5), mask)
    assert reg_masked.item() == 0.0  # masked positions do not count


def test_unroll_mask_sees_what_a_draft_step_at_that_depth_sees():
    assert torch.equal(unroll_mask(4, 1), causal_mask(0, 4))
    rows = unroll_mask(4, 3).int()[0, 0].tolist()  # pass-1 entries up to j - 2, pass 2's at j - 1, itself
    assert rows == [[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
                    [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]


def test_training_time_test_passes_equal_the_inference_draft_steps():
    """Pass d of `unrolled_features` at row j + d - 1 is what the candidate generator computes when it drafts d
    tokens ahead after verified features up to j (the same cache entries, positions and inputs)."""
    from transformers import DynamicCache

    model = make_tiny_llama()
    hf_tokred.apply(model, SMALL)
    head = _trained_like(model)
    rotary = model.__dict__["_hf_tokred_eagle_rotary"]
    n, j = 9, 4
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1, n, 64, generator=gen)
    embeds = model.get_input_embeddings()(torch.randint(3, 120, (1, n), generator=gen))
    pos = torch.arange(n)[None]
    with torch.no_grad():
        passes = unrolled_features(head, feats, embeds, rotary(feats, pos), pos, 3)
        assert len(passes) == 3 and all(p.shape == feats.shape for p in passes)
        assert torch.allclose(passes[0], head(feats, embeds, rotary(feats, pos), position_ids=pos), atol=1e-6)
        cache = DynamicCache()
        p = pos[:, :j + 1]
        out = head(feats[:, :j + 1], embeds[:, :j + 1], rotary(feats, p), position_ids=p, cache=cache,
                   attention_mask=causal_mask(0, j + 1))[:, -1:]
        for d in (1, 2):  # drafting d + 1 tokens ahead: the previous step's feature, the next token, one position on
            p = pos[:, j + d:j + d + 1]
            out = head(out, embeds[:, j + d:j + d + 1], rotary(out, p), position_ids=p, cache=cache,
                       attention_mask=causal_mask(j + d, 1))
            assert torch.allclose(out[0, 0], passes[d][0, j + d], atol=1e-5)


def test_config_defaults_and_bad_values():
    cfg = hf_tokred.TokenReductionConfig(method="eagle")
    assert (cfg.stage, cfg.depth, cfg.top_k, cfg.draft_vocab, cfg.learned) == ("decoding", 6, 4, 8192, True)
    for field, value in (("depth", 0), ("top_k", 0), ("min_confidence", 1.5), ("draft_vocab", -1),
                         ("lookup_min_match", 0), ("lookup_min_match", 33)):
        with pytest.raises(ConfigError) as err:
            hf_tokred.TokenReductionConfig(method="eagle", **{field: value})
        assert err.value.field == field
    model = make_tiny_llama()
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "eagle", "draft_vocab": 500})  # the tiny vocabulary has 128 tokens
    assert err.value.field == "draft_vocab" and get_applied(model) is None


# ---------------------------------------------------------------------------------------------
# generation: lossless, the transformers way
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [SMALL, {**SMALL, "top_k": 1, "draft_vocab": 0},
                                      {**SMALL, "min_confidence": 0.3, "depth": 6}])
def test_greedy_outputs_identical_to_plain_generate(settings, generators):
    model = make_tiny_llama()
    prompts = [_prompt(n, seed=n) for n in (5, 12, 30)]
    dense = [model.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    hf_tokred.apply(model, settings)
    _trained_like(model)
    for prompt, expected in zip(prompts, dense):
        assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), expected)  # plain: dense
        got = model.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=eagle_assistant(model))
        assert torch.equal(got, expected)
    assert len(generators) == len(prompts)
    for generator in generators:
        assert generator.stats["rounds"] > 0 and generator.stats["drafted"] >= generator.stats["rounds"]
        assert generator.stats["drafted"] <= settings["depth"] * generator.stats["rounds"]


def test_drafts_the_target_agrees_with_are_accepted(generators):
    """With drafts the target agrees with (its own greedy continuation, put in place of the tree search), every
    drafted token is accepted: depth + 1 new tokens per verification, and the output is unchanged."""
    model = make_tiny_llama()
    hf_tokred.apply(model, {**SMALL, "draft_vocab": 0, "top_k": 1})
    prompt = _prompt(8)
    full = model.generate(prompt, max_new_tokens=20, do_sample=False)
    original = EagleCandidateGenerator._tree_chain

    def tree_chain(self, root, budget):
        done = self.fed + 1  # the tokens verified so far (the prompt and the accepted ones)
        return full[0, done:done + budget].tolist() or original(self, root, budget)

    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    EagleCandidateGenerator._tree_chain = tree_chain
    try:
        got = model.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=eagle_assistant(model))
    finally:
        EagleCandidateGenerator._tree_chain = original
        handle.remove()
    assert torch.equal(got, full)
    # the prefill gives 1 token; then 5, 5, 5 (4 drafts + the target's token) and 4 (the length budget)
    assert len(calls) == 1 + 4 and generators[0].stats["drafted"] == 4 + 4 + 4 + 3


def test_sampling_returns_draft_logits_over_the_draft_vocabulary(generators):
    model = make_tiny_llama()
    hf_tokred.apply(model, SMALL)
    _trained_like(model)
    head = eagle_assistant(model)
    prompt = _prompt(10)
    torch.manual_seed(3)
    first = model.generate(prompt, max_new_tokens=20, do_sample=True, top_k=50, assistant_model=head)
    torch.manual_seed(3)
    second = model.generate(prompt, max_new_tokens=20, do_sample=True, top_k=50, assistant_model=head)
    assert first.shape == (1, 30) and torch.equal(first, second)
    # one round by hand: the candidates come with their logits, -inf outside the draft vocabulary
    generator = generators[0]
    generator.cache.crop(-generator.cache.get_seq_length()) if generator.cache.get_seq_length() else None
    generator.fed = generator.held = 0
    with torch.no_grad():
        out = model(prompt, output_hidden_states=-1)
    candidates, logits = generator.get_candidates(prompt, model_outputs=out, is_first_iteration=False)
    drafted = candidates.shape[1] - prompt.shape[1]
    assert 1 <= drafted <= SMALL["depth"] and logits.shape == (1, drafted, 128)
    outside = torch.ones(128, dtype=torch.bool)
    outside[head.vocab_ids] = False
    assert torch.isinf(logits[0][:, outside]).all() and torch.isfinite(logits[0][:, ~outside]).any()
    assert all(t in head.vocab_ids.tolist() for t in candidates[0, prompt.shape[1]:].tolist())


def test_batch_of_more_rows_is_a_clear_error_and_other_assistants_still_work():
    model = make_tiny_llama()
    hf_tokred.apply(model, SMALL)
    batch = torch.cat([_prompt(6, 1), _prompt(6, 2)])
    with pytest.raises(TokenReductionError, match="batch 1 only"):
        model.generate(batch, max_new_tokens=4, assistant_model=eagle_assistant(model))
    prompt = _prompt(12)
    dense = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3), dense)


def test_remove_restores_the_model_and_a_detached_head_says_so():
    model = make_tiny_llama()
    prompt = _prompt(9)
    with torch.no_grad():
        dense = model(prompt).logits
    hf_tokred.apply(model, SMALL)
    head = eagle_assistant(model)
    assert "_get_candidate_generator" in model.__dict__
    other = make_tiny_llama(seed=0)
    with pytest.raises(TokenReductionError, match="another model|attached to"):
        other.generate(prompt, max_new_tokens=3, assistant_model=head)
    hf_tokred.remove(model)
    assert "_get_candidate_generator" not in model.__dict__ and not hasattr(model, "hf_tokred_modules")
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, dense)
    with pytest.raises(TokenReductionError, match="attached to"):
        model.generate(prompt, max_new_tokens=3, assistant_model=head)
    with pytest.raises(TokenReductionError, match="no EAGLE reduction"):
        eagle_assistant(model)


# ---------------------------------------------------------------------------------------------
# save / load, base-model checks
# ---------------------------------------------------------------------------------------------


def test_save_load_identical_and_a_process_without_hf_tokred_loads_the_base_model(tmp_path):
    model = make_tiny_llama()
    prompt = _prompt(11)
    with torch.no_grad():
        dense = model(prompt).logits
    hf_tokred.apply(model, {**SMALL, "base_hidden_size": 64, "base_vocab_size": 128, "base_num_layers": 2})
    head = _trained_like(model)
    with torch.no_grad():
        head.vocab_ids.copy_(torch.arange(64, 128))
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=head)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.generation_config.eos_token_id = None
    again = eagle_assistant(loaded)
    assert isinstance(again, EagleHead) and torch.equal(again.vocab_ids, head.vocab_ids)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), head.state_dict().values()))
    assert torch.equal(loaded.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=again), expected)
    assert_loads_without_hf_tokred(tmp_path, prompt, dense)


def test_a_head_trained_for_another_base_model_is_refused(tmp_path):
    model = make_tiny_llama()
    hf_tokred.apply(model, {**SMALL, "base_hidden_size": 64, "base_vocab_size": 128, "base_num_layers": 2,
                            "base_model": "tiny-a"})
    model.save_pretrained(tmp_path)
    saved = model.config.token_reduction
    wider = make_tiny_llama(hidden_size=96)
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(wider, saved, weights_from=tmp_path)
    assert err.value.field == "base_hidden_size" and "tiny-a" in str(err.value) and get_applied(wider) is None
    deeper = make_tiny_llama(num_hidden_layers=3)
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(deeper, saved, weights_from=tmp_path)
    assert err.value.field == "base_num_layers"
    other = make_tiny_llama(seed=7)  # same shapes, other weights: the fingerprint differs
    prompt = _prompt(6)
    with torch.no_grad():
        before = other(prompt).logits
    with pytest.raises(TokenReductionError, match="base_signature"):
        hf_tokred.apply(other, saved, weights_from=tmp_path)
    assert get_applied(other) is None and not hasattr(other, "hf_tokred_modules")
    assert "_get_candidate_generator" not in other.__dict__
    with torch.no_grad():
        assert torch.equal(other(prompt).logits, before)
    same = make_tiny_llama()
    hf_tokred.apply(same, saved, weights_from=tmp_path)  # the model it was trained for
    assert isinstance(eagle_assistant(same), EagleHead)


def test_bf16_copy_of_the_base_model_keeps_the_fingerprint(tmp_path):
    model = make_tiny_llama()
    hf_tokred.apply(model, SMALL)
    model.save_pretrained(tmp_path)
    half = make_tiny_llama().to(torch.bfloat16)
    hf_tokred.apply(half, model.config.token_reduction, weights_from=tmp_path)
    assert eagle_assistant(half).fc.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# training recipe, CLI
# ---------------------------------------------------------------------------------------------


def test_recipe_trains_saves_and_resumes(tmp_path):
    from hf_tokred.training import train_eagle

    model, tokenizer = make_tiny_llama(), make_tiny_tokenizer()
    out = tmp_path / "out"
    kwargs = dict(prompts=0, windows=6, window_length=24, batch_size=2, draft_vocab=32, data_dir=tmp_path / "data",
                  output_dir=out, progress=False, save_every=2)
    train_eagle(model, tokenizer, steps=4, **kwargs)
    losses = model.train_losses
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    cfg = model.config.token_reduction
    assert (cfg["base_hidden_size"], cfg["base_vocab_size"], cfg["base_num_layers"]) == (64, 128, 2)
    assert {"token_reduction.safetensors", "README.md", "eagle_training.json"} <= set(os.listdir(out))
    assert os.path.isfile(tmp_path / "data" / "features.safetensors")
    head = eagle_assistant(model)
    assert head.vocab_ids.numel() == 32 and tokenizer.eos_token_id in head.vocab_ids.tolist()
    # resuming the same run from its checkpoint to more steps gives the same weights as one longer run
    resumed = make_tiny_llama()
    train_eagle(resumed, tokenizer, steps=4, **kwargs)  # finished: loads the checkpoint, trains nothing
    assert torch.equal(eagle_assistant(resumed).fc.weight, head.fc.weight)


def test_recipe_training_time_test_continues_a_saved_head(tmp_path):
    from hf_tokred.training import train_eagle

    model, tokenizer = make_tiny_llama(), make_tiny_tokenizer()
    first = tmp_path / "first"
    data = dict(prompts=0, windows=6, window_length=24, batch_size=2, data_dir=tmp_path / "data", progress=False)
    train_eagle(model, tokenizer, steps=2, draft_vocab=32, depth=3, output_dir=first, **data)
    trained = eagle_assistant(model)
    more = make_tiny_llama()
    train_eagle(more, tokenizer, steps=2, unroll=3, init_from=first, lr=1e-9, output_dir=tmp_path / "more", **data)
    head = eagle_assistant(more)
    assert len(more.train_losses) == 2 and all(torch.isfinite(torch.tensor(more.train_losses)))
    assert torch.equal(head.vocab_ids, trained.vocab_ids)  # the saved head's draft vocabulary, not a new one
    assert torch.allclose(head.fc.weight, trained.fc.weight, atol=1e-6)  # it started from the saved head
    assert more.config.token_reduction["depth"] == 3  # and kept its settings
    assert more.eagle_training["fingerprint"]["unroll"] == 3
    card = (tmp_path / "more" / "README.md").read_text()
    assert "training-time test" in card and str(first) in card
    other = tmp_path / "other"  # a folder holding another method's reduction
    hf_tokred.TokenReductionConfig(method="snapkv", keep=0.5).save_pretrained(other)
    untouched = make_tiny_llama()
    hf_tokred.apply(untouched, SMALL)
    with pytest.raises(ConfigError, match="init_from"):
        train_eagle(untouched, tokenizer, steps=1, init_from=other, **data)
    assert get_applied(untouched).config.method == "eagle"  # refused before the model was touched
    with pytest.raises(ConfigError, match="unroll"):
        train_eagle(make_tiny_llama(), tokenizer, steps=1, unroll=0, **data)


def test_cli_parsers():
    from hf_tokred.cli import build_parser

    args = build_parser().parse_args(["train", "eagle"])
    assert (args.prompts, args.windows, args.draft_vocab, args.steps) == (160, 32, 8192, 300)
    bench = build_parser().parse_args(["learned-lm", "eagle", "--samples", "2"])
    assert (bench.samples, bench.max_new_tokens, bench.weights) == (2, 256, None)


# ---------------------------------------------------------------------------------------------
# EAGLE + lookup drafts (SAM-Decoding's retrieval draft)
# ---------------------------------------------------------------------------------------------


def test_lookup_continuation_takes_the_longest_then_most_recent_match():
    ids = torch.tensor([7, 1, 2, 3, 9, 5, 1, 2, 3, 8, 4, 1, 2, 3])
    assert lookup_continuation(ids, 3, 2) == [8, 4]  # the more recent of two 3-token matches
    assert lookup_continuation(ids, 4, 2) == []  # no earlier 4-token match
    ids = torch.tensor([6, 1, 2, 3, 9, 4, 2, 3, 5, 1, 2, 3])
    assert lookup_continuation(ids, 2, 3) == [9, 4, 2]  # the longest match wins over a more recent shorter one
    assert lookup_continuation(ids, 2, 0) == [] and lookup_continuation(ids[:1], 1, 3) == []
    assert lookup_continuation(torch.tensor([5, 5, 5, 5]), 1, 3) == [5]  # overlapping; stops at the sequence's end
    ids = torch.tensor([1, 2, 9, 2, 1, 2])
    assert lookup_continuation(ids, 1, 2) == [9, 2]  # "1 2" matched at the start
    assert lookup_continuation(ids, 1, 2, max_match=1) == [1, 2]  # compared on 1 token: the most recent "2"


def _one_round(model, prompt, **generate_kwargs):
    """The candidates and logits of the first drafting round of a generation like ``generate(prompt, ...)``."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_length=prompt.shape[1] + 16, do_sample=False, **generate_kwargs)
    generator = model._get_candidate_generator(config, prompt, prompt, None, {}, assistant_model=eagle_assistant(model))
    with torch.no_grad():
        out = model(prompt, output_hidden_states=-1)
    candidates, logits = generator.get_candidates(prompt, model_outputs=out, is_first_iteration=False)
    return candidates[0, prompt.shape[1]:].tolist(), logits, generator.stats


def test_a_repeating_context_drafts_by_lookup_and_a_new_one_by_the_head():
    model = make_tiny_llama()
    hf_tokred.apply(model, {**SMALL, "lookup_min_match": 3})
    _trained_like(model)
    block = _prompt(8, seed=4)[0].tolist()
    repeating = torch.tensor([block + [7, 8, 9] + block[:5]])
    drafted, logits, stats = _one_round(model, repeating, prompt_lookup_num_tokens=4)
    assert drafted == block[5:8] + [7] and logits is None and stats["lookup_rounds"] == 1
    fresh = torch.arange(3, 23)[None]  # no token repeats: nothing to look up
    drafted, _, stats = _one_round(model, fresh, prompt_lookup_num_tokens=4)
    assert 1 <= len(drafted) <= SMALL["depth"] and stats["lookup_rounds"] == 0 and stats["rounds"] == 1
    drafted, _, stats = _one_round(model, repeating)  # without prompt_lookup_num_tokens: EAGLE alone
    assert stats["lookup_rounds"] == 0 and len(drafted) <= SMALL["depth"]


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "top_k": 1}])
def test_eagle_with_lookup_drafts_stays_exact(sampling, generators):
    """The same output as plain greedy, with lookup rounds and head rounds both drafting; also through the sampling
    path (top_k=1 makes sampling greedy), where lookup rounds draft without logits and the head's with them."""
    model = make_tiny_llama()
    hf_tokred.apply(model, {**SMALL, "lookup_min_match": 2})
    _trained_like(model)
    block = _prompt(12, seed=6)
    prompt = torch.cat([block, _prompt(4, seed=7), block[:, :6]], -1)
    plain = model.generate(prompt, max_new_tokens=30, do_sample=False)
    got = model.generate(prompt, max_new_tokens=30, assistant_model=eagle_assistant(model),
                         prompt_lookup_num_tokens=5, **sampling)
    assert torch.equal(got, plain)
    stats = generators[0].stats
    assert 1 <= stats["lookup_rounds"] < stats["rounds"]


def test_eagle_with_lookup_refuses_max_matching_ngram_size():
    model = make_tiny_llama()
    hf_tokred.apply(model, SMALL)
    with pytest.raises(TokenReductionError, match="max_matching_ngram_size does not apply.*lookup_min_match"):
        model.generate(_prompt(10), max_new_tokens=4, assistant_model=eagle_assistant(model),
                       prompt_lookup_num_tokens=3, max_matching_ngram_size=2)


# ---------------------------------------------------------------------------------------------
# the trained head on SmolLM2 (when `hf-tokred train eagle` has run)
# ---------------------------------------------------------------------------------------------


def test_trained_smollm2_head_drafts_accepted_tokens(generators):
    from hf_tokred.bench.lm_eagle import default_weights

    weights = default_weights()
    if not os.path.isfile(os.path.join(weights, "token_reduction.safetensors")):
        pytest.skip("no trained EAGLE head (hf-tokred train eagle)")
    from transformers import AutoTokenizer

    from hf_tokred.recipes.lm_data import chat_ids, instruction_prompts

    model = AutoModelForCausalLM.from_pretrained(weights).eval()
    tokenizer = AutoTokenizer.from_pretrained(weights)
    ids = torch.tensor([chat_ids(tokenizer, instruction_prompts("heldout", 1)[0])])
    dense = model.generate(ids, max_new_tokens=24, do_sample=False)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = model.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=eagle_assistant(model))
    finally:
        handle.remove()
    assert torch.equal(got, dense)
    assert (got.shape[1] - ids.shape[1] - 1) / (len(calls) - 1) > 1.1  # drafts get accepted
    calls.clear()
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:  # the tree verified in one forward pass per round
        tree = model.generate(ids, max_new_tokens=24, do_sample=False, custom_generate=hf_tokred.eagle_tree_decoding)
    finally:
        handle.remove()
    assert torch.equal(tree, dense)
    assert (tree.shape[1] - ids.shape[1] - 1) / (len(calls) - 1) > 1.1
    torch.manual_seed(0)  # sampled, the tree draws the sequence seeded plain sampling draws
    sampled = model.generate(ids, max_new_tokens=24, do_sample=True, temperature=0.7)
    torch.manual_seed(0)
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=True, temperature=0.7,
                                      custom_generate=hf_tokred.eagle_tree_decoding), sampled)


def test_wiring_module_names_the_stage():
    assert eagle_wiring.wire_eagle is hf_tokred.integration.wiring.wiring_for("decoding")


# ---------------------------------------------------------------------------------------------
# with a reduced KV cache underneath
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [{"method": "snapkv", "max_tokens": 16, "window": 4},
                                    {"method": "pyramidkv", "max_tokens": 16, "window": 4},
                                    {"method": "fastgen", "keep": 0.5, "special_token_ids": [0, 1, 2],
                                     "punctuation_token_ids": [3, 4, 5]}])
def test_a_prompt_compressing_kv_policy_drafts_on_its_own_cache_losslessly(policy, generators):
    """A policy that compresses the prompt once keeps the decoded tokens as they come, so assisted decoding can take
    rejected drafts back (Cache.crop): EAGLE's and prompt lookup's greedy outputs equal the same policy's plain
    greedy output, and the cache holds the compressed prompt plus the accepted tokens only."""
    model = make_tiny_llama()
    hf_tokred.apply(model, hf_tokred.compose({**SMALL, "lookup_min_match": 1}, policy))
    _trained_like(model)
    for n in (30, 41):
        prompt = _prompt(n, seed=n)
        plain_cache = hf_tokred.build_cache(model)
        plain = model.generate(prompt, max_new_tokens=24, do_sample=False, past_key_values=plain_cache)
        cache = hf_tokred.build_cache(model)
        got = model.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=eagle_assistant(model),
                             past_key_values=cache)
        assert torch.equal(got, plain)
        assert cache.stored_lengths() == plain_cache.stored_lengths() and cache.stored_lengths()[0] < n + 24
        assert cache.get_seq_length() == plain_cache.get_seq_length()
        lookup = model.generate(prompt, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=3)
        assert torch.equal(lookup, plain)
        other = model.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=make_tiny_llama(seed=3))
        assert torch.equal(other, plain)  # a separate assistant model drafts over the same cache
        cache = hf_tokred.build_cache(model)
        both = model.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=eagle_assistant(model),
                              prompt_lookup_num_tokens=3, past_key_values=cache)  # EAGLE + lookup drafts
        assert torch.equal(both, plain) and cache.stored_lengths() == plain_cache.stored_lengths()
    assert generators[-1].stats["drafted"] > generators[-1].stats["rounds"] - 1
    assert all(g.stats["lookup_rounds"] == 0 for g in generators[::2])  # EAGLE alone
    assert all(0 < g.stats["lookup_rounds"] < g.stats["rounds"] for g in generators[1::2])  # both drafters


def test_assisted_decoding_continues_a_compressed_context_as_plain_generate_does():
    """A context compressed once (compress_context) and a question after it: transformers' assisted decoding feeds
    its first pass the whole sequence, context included; only the question may reach the cache, or the context
    would be fed again on top of its compressed copy. EAGLE (chain and tree), prompt lookup and an assistant model
    then give plain generate()'s output over a copy of the same cache."""
    model = make_tiny_llama()
    hf_tokred.apply(model, hf_tokred.compose(SMALL, {"method": "snapkv", "max_tokens": 16, "window": 4}))
    _trained_like(model)
    context, question = _prompt(30, seed=3), _prompt(6, seed=4)
    compressed = hf_tokred.compress_context(model, context)
    extras = [{"assistant_model": eagle_assistant(model)}, {"prompt_lookup_num_tokens": 3},
              {"assistant_model": make_tiny_llama(seed=3)}, {"custom_generate": hf_tokred.eagle_tree_decoding}]
    assert_assisted_decoding_continues_a_cache_as_plain_generate(
        model, torch.cat([context, question], -1), lambda: copy.deepcopy(compressed), extras, max_new_tokens=20)


@pytest.mark.parametrize("order", ["gist first", "eagle first"])
def test_eagle_composed_with_gist_continues_the_gist_cache_with_every_assistant(order):
    """Both reductions wrap the candidate-generator factory; whichever is wired last hands the other's assistants on,
    so EAGLE, prompt lookup and an assistant model all continue ``ctx.fresh_cache()`` as plain generate() does."""
    gist = {"method": "gist", "num_gist": 4, "rank": 4}
    model = make_tiny_llama()
    hf_tokred.apply(model, hf_tokred.compose(*((gist, SMALL) if order == "gist first" else (SMALL, gist))))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial gist and head weights
        for p in model.hf_tokred_modules.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    ctx = hf_tokred.compress_context(model, _prompt(11, seed=2))
    full = torch.cat([ctx.prefix_ids, _prompt(5, seed=6)], -1)
    extras = [{"assistant_model": eagle_assistant(model)}, {"prompt_lookup_num_tokens": 3},
              {"assistant_model": make_tiny_llama(seed=3)}]
    assert_assisted_decoding_continues_a_cache_as_plain_generate(model, full, ctx.fresh_cache, extras)
    hf_tokred.remove(model)
    assert "_get_candidate_generator" not in model.__dict__


def test_a_cache_that_evicts_while_decoding_refuses_assisted_decoding_before_it_runs():
    model = make_tiny_llama()
    hf_tokred.apply(model, hf_tokred.compose(SMALL, {"method": "streamingllm", "max_tokens": 16}))
    prompt = _prompt(20)
    for extra in ({"assistant_model": eagle_assistant(model)}, {"prompt_lookup_num_tokens": 3}):
        with pytest.raises(TokenReductionError, match="compresses the prompt once"):
            model.generate(prompt, max_new_tokens=8, do_sample=False, **extra)
    cache = hf_tokred.build_cache(model)
    with pytest.raises(TokenReductionError, match="snapkv"):
        model.generate(prompt, max_new_tokens=8, past_key_values=cache, prompt_lookup_num_tokens=3)
    assert cache.get_seq_length() == 0  # refused before anything ran


def test_crop_takes_back_only_tokens_appended_after_the_compression():
    model = make_tiny_llama()
    hf_tokred.apply(model, {"method": "snapkv", "max_tokens": 8, "window": 2})
    cache = hf_tokred.build_cache(model)
    with torch.no_grad():
        model(_prompt(20), past_key_values=cache)
        stored = cache.stored_lengths()
        with pytest.raises(TokenReductionError, match="after the prompt was compressed"):
            cache.crop(-1)  # the prompt itself
        model(_prompt(3, seed=5), past_key_values=cache)
        keys = cache.layers[0].keys.clone()
    cache.crop(-2)
    assert cache.get_seq_length() == 21 and cache.stored_lengths() == [s + 1 for s in stored]
    assert torch.equal(cache.layers[0].keys, keys[..., :-2, :])
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    with pytest.raises(TokenReductionError, match="after the prompt was compressed"):
        cache.crop(-2)  # one appended token is left


@pytest.mark.real_model
def test_smollm2_prompt_lookup_over_a_snapkv_cache_answers_as_plain_snapkv():
    """The embedded SmolLM2 with SnapKV at a quarter of a passkey prompt: prompt lookup's greedy answer is plain
    SnapKV's, token for token, and drafts were accepted (the passkey is copied from the prompt)."""
    from hf_tokred.bench.passkey import PasskeySample, prompt_ids
    from hf_tokred.embedded import load_smollm2

    model, tokenizer = load_smollm2({"method": "snapkv", "keep": 0.25})
    input_ids, _ = prompt_ids(tokenizer, PasskeySample(key=73914, depth=0.4))
    plain = model.generate(input_ids, max_new_tokens=24, do_sample=False)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        lookup = model.generate(input_ids, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
    finally:
        handle.remove()
    assert torch.equal(lookup, plain)
    assert len(calls) < 1 + (plain.shape[1] - input_ids.shape[1])  # fewer forward passes than tokens


@pytest.fixture
def bench_folder(tmp_path):
    """A folder as `hf-tokred train eagle` saves it, for a tiny model and tokenizer."""
    model, tokenizer = make_tiny_llama(), make_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'][:200] }}{% endfor %}"
    hf_tokred.apply(model, SMALL)
    _trained_like(model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def test_bench_decodes_over_a_snapkv_cache_with_the_policys_own_output(bench_folder):
    """`hf-tokred learned-lm eagle --policy snapkv`: greedy, prompt lookup and EAGLE (chain and tree) run again over
    SnapKV's cache, and each of those rows gives SnapKV's own greedy output (the dense rows give the dense model's)."""
    from hf_tokred.bench.lm_eagle import format_result, run_bench

    result = run_bench(bench_folder, samples=2, max_new_tokens=10, progress=False, policy="snapkv", keep=0.25)
    suffix = " + snapkv@0.25"
    names = ["greedy", "prompt lookup", "eagle", "eagle + lookup", "eagle tree", "eagle tree + lookup"]
    assert list(result["rows"]) == names + [n + suffix for n in names]
    assert result["tree_tokens"] == hf_tokred.TokenReductionConfig(method="eagle").tree_tokens  # the default
    for name, row in result["rows"].items():
        assert row["identical"] == 2, name
        assert row["reference"] == ("greedy" + suffix if name.endswith(suffix) else "greedy")
        assert row["decode_tokens"] == 2 * 9
    assert [r["method"] for r in result["reduction"]["reducers"]] == ["eagle", "snapkv"]
    assert "that policy's own greedy" in format_result(result)


def test_bench_samples_under_a_seed_per_prompt_and_the_tree_rows_draw_plain_samplings_sequences(bench_folder):
    from hf_tokred.bench.lm_eagle import format_result, run_bench
    from hf_tokred.errors import TokenReductionError

    result = run_bench(bench_folder, samples=2, max_new_tokens=10, progress=False, temperature=1.0)
    assert list(result["rows"]) == ["sampling", "prompt lookup", "eagle", "eagle + lookup", "eagle tree",
                                    "eagle tree + lookup"]
    assert result["temperature"] == 1.0
    for name in ("sampling", "eagle tree", "eagle tree + lookup"):
        assert result["rows"][name]["identical"] == 2, name
    assert "identical to its sampling" in format_result(result)
    with pytest.raises(TokenReductionError, match="temperature"):
        run_bench(bench_folder, samples=1, max_new_tokens=4, progress=False, temperature=-1.0)


@pytest.mark.parametrize("policy, keep, message", [("h2o", 0.5, "h2o evicts while decoding.*snapkv"),
                                                   ("nope", 0.5, "unknown KV policy 'nope'.*snapkv"),
                                                   ("snapkv", 0.0, "--keep")])
def test_bench_refuses_a_policy_it_cannot_draft_over(policy, keep, message):
    from hf_tokred.bench.lm_eagle import policy_config
    from hf_tokred.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        policy_config(policy, keep)
