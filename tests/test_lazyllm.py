"""LazyLLM (arXiv 2407.14057): progressive prompt pruning inside prefill, on tiny random decoders."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, compose
from hf_tokred.errors import TokenReductionError
from hf_tokred.integration.prefill import AUX_VALID

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             pad_token_id=0, bos_token_id=1, eos_token_id=127)
BUILDERS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_hidden_layers=6)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_hidden_layers=6)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=6, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)),
}
SCHEDULE = [[1, 0.5], [3, 0.25]]


def make(name="llama"):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    model.generation_config.eos_token_id = None
    return model


def ids(n=40, batch=1, seed=0):
    return torch.randint(3, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, attention_mask=None, new=6, **kwargs):
    kwargs.setdefault("do_sample", False)
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new, **kwargs)


def lazy(**kw):
    return TokenReductionConfig(method="lazyllm", **{"schedule": SCHEDULE, "sink_tokens": 2, **kw})


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, match", [
    ([[1, 0.0]], "keep must be a fraction in \\(0, 1\\]"),
    ([[1, 1.5]], "keep must be a fraction"),
    ([[1, 0.5], [3, 0.7]], "never increases"),
    ([[3, 0.5], [1, 0.25]], "does not come after"),
    ([[1.5, 0.5]], "outside \\(0, 1\\)"),
    ([[-1, 0.5]], "negative"),
    ([[1, 0.5, 3]], "pair"),
    ("0.5", "list of \\[where, keep\\] pairs"),
])
def test_bad_schedules_are_config_errors(schedule, match):
    with pytest.raises(ConfigError, match=match) as err:
        lazy(schedule=schedule)
    assert err.value.field == "schedule"


def test_layer_out_of_range_is_refused_at_apply_and_leaves_the_model_dense():
    model = make()
    with pytest.raises(ConfigError, match="layer 5 is out of range") as err:
        hf_tokred.apply(model, lazy(schedule=[[5, 0.5]]))
    assert err.value.field == "schedule"
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__


def test_schedule_resolution_and_counts():
    cfg = TokenReductionConfig(method="lazyllm")
    assert cfg.resolve_schedule(30) == [(18, 0.2), (23, 0.05)]
    assert lazy(schedule=[[0.5, 0.5], [0.6, 0.3]]).resolve_schedule(4) == [(1, 0.3)]  # same layer: smaller keep
    assert cfg.kept_count(0.7, 10) == 7 and cfg.kept_count(0.01, 10) == 5  # sinks + last token
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# no-op settings, remove()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"schedule": [[1, 1.0], [3, 1.0]]}, {"schedule": []},
                                      {"schedule": [[1, 0.5]], "sink_tokens": 64}])
def test_no_op_settings_are_bit_identical(settings):
    model, x = make(), ids()
    logits = model(x).logits
    dense = greedy(model, x)
    hf_tokred.apply(model, lazy(**settings))
    assert torch.equal(model(x).logits, logits)
    assert torch.equal(greedy(model, x), dense)


def test_remove_restores_bit_identical_outputs():
    model, x = make(), ids()
    logits, dense = model(x).logits, greedy(model, x)
    hf_tokred.apply(model, lazy())
    assert not torch.equal(model(x, use_cache=False).logits[:, -1], logits[:, -1])
    hf_tokred.remove(model)
    assert torch.equal(model(x).logits, logits) and torch.equal(greedy(model, x), dense)


# ---------------------------------------------------------------------------------------------
# what is kept
# ---------------------------------------------------------------------------------------------


def test_kept_counts_per_layer_and_last_token_kept():
    model, x = make(), ids(40)
    hf_tokred.apply(model, lazy(revive=False))
    cache = hf_tokred.build_cache(model)
    out = model(x, past_key_values=cache, use_cache=True)
    assert out.logits.shape == (1, 40, 128)
    assert cache.stored_lengths() == [40, 40, 20, 20, 10, 10]  # 2 layers x 40, 2 x 50%, 2 x 25%
    assert cache.get_seq_length() == 40
    kept = cache.layers[5].positions[0, 0].tolist()
    assert kept == sorted(kept) and {0, 1, 39} <= set(kept)  # sinks and the last token, original positions


def test_query_window_keeps_and_scores_with_the_last_tokens_and_pooling_spreads_scores():
    from hf_tokred.methods.prompt.lazyllm import last_token_importance

    model, x = make(), ids(40)
    hf_tokred.apply(model, lazy(revive=False, query_window=8, kernel_size=5))
    cache = hf_tokred.build_cache(model)
    model(x, past_key_values=cache, use_cache=True)
    assert cache.stored_lengths() == [40, 40, 20, 20, 10, 10]  # 25% of 40 = 10 = 2 sinks + the 8-token window
    kept = set(cache.layers[5].positions[0, 0].tolist())
    assert set(range(32, 40)) <= kept and {0, 1} <= kept  # the query window and the sinks
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    one = last_token_importance(q, k, 0.5)
    assert torch.allclose(one.sum(-1), torch.ones(1))
    several = last_token_importance(q, k, 0.5, visible=torch.ones(1, 3, 6).tril(3).bool(), window=3)
    assert torch.allclose(several.sum(-1), torch.ones(1))
    pooled = last_token_importance(q, k, 0.5, kernel_size=3)
    assert torch.equal(pooled[0, 1:-1], one[0].unfold(0, 3, 1).amax(-1))


def test_pruned_logits_match_a_manual_gather_of_the_dense_last_layer():
    # One pruning after the last-but-one layer: the last layer sees the kept tokens at their own positions, so its
    # last-token output equals the dense model fed only those tokens' hidden states with their original RoPE.
    model, x = make(), ids(30)
    hf_tokred.apply(model, lazy(schedule=[[4, 0.5]], revive=False))
    cache = hf_tokred.build_cache(model)
    pruned = model(x, past_key_values=cache, use_cache=True).logits[:, -1]
    kept = cache.layers[5].positions[0, 0]
    hf_tokred.remove(model)
    captured = {}
    handle = model.model.layers[5].register_forward_pre_hook(
        lambda m, a, k: captured.update(hidden=a[0] if a else k["hidden_states"], kwargs=k), with_kwargs=True)
    model(x)
    handle.remove()
    kw = captured["kwargs"]
    cos, sin = kw["position_embeddings"]
    hidden = model.model.layers[5](captured["hidden"][:, kept], attention_mask=None,
                                   position_embeddings=(cos[:, kept], sin[:, kept]), position_ids=kept[None])
    manual = model.lm_head(model.model.norm(hidden))[:, -1]
    torch.testing.assert_close(pruned, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("revive", [True, False])
def test_padded_batch_equals_each_row_alone(name, revive):
    model = make(name)
    hf_tokred.apply(model, lazy(revive=revive))
    rows = [ids(40, seed=1)[0], ids(29, seed=2)[0]]
    width = max(len(r) for r in rows)
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - len(r):], mask[i, width - len(r):] = r, 1
    together = greedy(model, batch, mask, new=6)
    for i, r in enumerate(rows):
        alone = greedy(model, r[None], torch.ones(1, len(r), dtype=torch.long), new=6)
        assert together[i, width:].tolist() == alone[0, len(r):].tolist(), (name, i)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_greedy_sampling_and_beam_search_run(name):
    model, x = make(name), ids(40)
    hf_tokred.apply(model, lazy(revive=True))
    assert greedy(model, x).shape == (1, 46)
    torch.manual_seed(0)
    first = greedy(model, x, do_sample=True, top_k=20)
    torch.manual_seed(0)
    assert torch.equal(first, greedy(model, x, do_sample=True, top_k=20))
    beams = greedy(model, ids(40, batch=2), num_beams=3, num_return_sequences=2)
    assert beams.shape == (4, 46)
    assert greedy(model, x, use_cache=False).shape == (1, 46)  # without a cache every pass prunes anew


def test_revival_brings_back_pruned_tokens_once():
    model, x = make(), ids(40)
    hf_tokred.apply(model, lazy(revive=True, revive_limit=2))
    cache = hf_tokred.build_cache(model)
    greedy(model, x, past_key_values=cache, new=4)
    stored = cache.stored_lengths()
    assert stored[:2] == [43, 43]  # the prompt and the three tokens fed back
    # each of the three decoding steps appended its token and revived up to 2 tokens per pruning layer
    assert 20 + 3 < stored[2] <= 20 + 3 + 3 * 2 and stored[2] == stored[3]
    revived_first = int((~cache.layers[2].extras[AUX_VALID]).sum())
    revived_second = int((~cache.layers[4].extras[AUX_VALID]).sum())
    assert stored[2] == 23 + revived_first and stored[4] == 13 + revived_first + revived_second
    for layer in (2, 4):
        real = cache.layers[layer].positions[0, 0][cache.layers[layer].valid[0, 0]].tolist()
        assert len(real) == len(set(real))  # each token computed at most once per layer


def test_composes_with_a_kv_policy_that_sees_the_pruned_prompt():
    model, x = make(), ids(40)
    cfg = compose(lazy(revive=False), {"method": "tova", "keep": 0.5, "sink_tokens": 2})
    hf_tokred.apply(model, cfg)
    cache = hf_tokred.build_cache(model)
    model(x, past_key_values=cache, use_cache=True)
    assert cache.stored_lengths() == [20, 20, 10, 10, 5, 5]  # TOVA keeps half of what each layer was given
    assert greedy(model, x).shape == (1, 46)
    hf_tokred.apply(model, compose({"method": "tova", "keep": 0.5}, lazy()))  # either order
    assert greedy(model, x).shape == (1, 46)


def test_a_plain_cache_gets_logits_but_cannot_decode_a_pruned_prompt():
    model, x = make(), ids(40)
    hf_tokred.apply(model, lazy())
    cache = DynamicCache(config=model.config)
    model(x, past_key_values=cache, use_cache=True)
    with pytest.raises(TokenReductionError, match="holds a pruned prompt"):
        model(x[:, :1], past_key_values=cache, use_cache=True)
    with pytest.raises(TokenReductionError, match="holds a pruned prompt"):
        greedy(model, x, past_key_values=DynamicCache(config=model.config))


def test_save_and_load_round_trip(tmp_path):
    model, x = make(), ids(40)
    hf_tokred.apply(model, lazy())
    expected = greedy(model, x)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded.generation_config.eos_token_id = None
    assert loaded.config.token_reduction["method"] == "lazyllm"
    assert torch.equal(greedy(loaded, x), expected)


# ---------------------------------------------------------------------------------------------
# the real SmolLM2
# ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_answers_a_passkey_prompt_at_the_default_schedule():
    from hf_tokred.bench.passkey import PasskeySample, is_correct, prompt_ids
    from hf_tokred.embedded import load_smollm2

    model, tokenizer = load_smollm2({"method": "lazyllm"})
    sample = PasskeySample(key=73914, depth=0.4)
    input_ids, _ = prompt_ids(tokenizer, sample)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, input_ids.shape[-1]:])
    assert is_correct(sample, answer), answer
