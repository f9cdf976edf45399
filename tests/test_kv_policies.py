"""Every KV eviction policy on tiny Llama models: budgets, padding, decoding modes, attention backends."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_left_padded_batch_equals_rows_alone, make_tiny_llama
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import hf_tokred
from hf_tokred.errors import ConfigError

POLICIES = ["streamingllm", "h2o", "scissorhands", "snapkv", "pyramidkv", "tova", "fastgen", "keydiff"]
PREFILL_ONCE = {"snapkv", "pyramidkv", "fastgen"}


def _config(method, **extra):
    base = {"method": method, "sink_tokens": 2}
    if method in ("snapkv", "pyramidkv"):
        base.update(window_size=4, kernel_size=3)
    if method == "scissorhands":
        base.update(history_window=4, compress_every=2)
    if method == "fastgen":
        base.update(profile_window=4, special_token_ids=[1], punctuation_token_ids=[5, 6, 7], recovery=0.6)
    if method == "streamingllm" and "keep" not in extra:
        extra = {"max_tokens": extra.pop("max_tokens", 12), **extra}
    base.update(extra)
    return base


def _prompt(n=24, batch=1, seed=0):
    return torch.randint(3, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


def _layer_budgets(model, method, budget):
    cfg = hf_tokred.TokenReductionConfig.coerce(_config(method, max_tokens=budget))
    layers = model.config.num_hidden_layers
    return [cfg.layer_budget(budget, i, layers) for i in range(layers)]


@pytest.mark.parametrize("method", POLICIES)
def test_keep_one_is_bit_identical_to_dense(method):
    model = make_tiny_llama()
    prompt = _prompt()
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    dense = model.generate(prompt, past_key_values=DynamicCache(), **kwargs)
    hf_tokred.apply(model, _config(method, keep=1.0))
    reduced = model.generate(prompt, **kwargs)
    assert isinstance(reduced.past_key_values, hf_tokred.TokenReductionCache)
    assert torch.equal(reduced.sequences, dense.sequences)
    for a, b in zip(reduced.scores, dense.scores):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", POLICIES)
def test_budget_is_kept_at_every_step(method):
    model = make_tiny_llama(num_hidden_layers=3)
    hf_tokred.apply(model, _config(method, max_tokens=12))
    cache = hf_tokred.build_cache(model)
    budgets = _layer_budgets(model, method, 12)
    seen = []

    class Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(cache.stored_lengths())
            return scores

    model.generate(_prompt(30), max_new_tokens=10, do_sample=False, past_key_values=cache,
                   logits_processor=LogitsProcessorList([Watch()]))
    assert cache.get_seq_length() == 39
    if method in PREFILL_ONCE:
        # compressed once after the prompt to each layer's budget, then every generated token is appended
        assert seen[0] == [min(b, 30) for b in budgets]
        assert cache.stored_lengths() == [min(b, 30) + 9 for b in budgets]
    else:
        assert all(max(s) <= 12 for s in seen)
    if method == "pyramidkv":
        assert budgets[0] > budgets[1] > budgets[2]


@pytest.mark.parametrize("method", POLICIES)
@pytest.mark.parametrize("budget", [{"max_tokens": 12}, {"keep": 0.5}])
def test_left_padded_batch_equals_rows_alone(method, budget):
    model = make_tiny_llama()
    hf_tokred.apply(model, _config(method, **budget))
    assert_left_padded_batch_equals_rows_alone(model)  # the same real tokens held, at the same logical positions


@pytest.mark.parametrize("method", [p for p in POLICIES if p != "streamingllm"])
def test_pooling_never_borrows_a_score_from_padding(method):
    """With ``kernel_size`` > 1 a left-padded row still keeps what it keeps alone: the first real token must
    not take a padding slot's score (KeyDiff scores padding keys, which are distinct, highest; SnapKV's mean
    counted padding as zeros). No sink tokens: they would keep the tokens next to the padding anyway."""
    model = make_tiny_llama()
    hf_tokred.apply(model, _config(method, max_tokens=10, kernel_size=5, sink_tokens=0))
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in (25, 14)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    alone = model.generate(rows[1][None], **kwargs)
    pad = width - len(rows[1])
    for layer_b, layer_a in zip(batched.past_key_values.layers, alone.past_key_values.layers):
        held_b = torch.where(layer_b.valid[1], layer_b.positions[1] - pad, -1).sort(dim=-1).values
        held_a = torch.where(layer_a.valid[0], layer_a.positions[0], -1).sort(dim=-1).values
        assert torch.equal(held_b[held_b >= 0], held_a[held_a >= 0])
    assert torch.equal(batched.sequences[1, width:], alone.sequences[0, len(rows[1]):])


@pytest.mark.parametrize("method", POLICIES)
def test_sdpa_and_eager_agree(method):
    outs = []
    for attn in ("sdpa", "eager"):
        model = make_tiny_llama(attn_implementation=attn)
        hf_tokred.apply(model, _config(method, max_tokens=12))
        out = model.generate(_prompt(), max_new_tokens=10, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        outs.append(out)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[0].scores), torch.stack(outs[1].scores), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", POLICIES)
def test_sampling_and_beam_search_reorder_buffers(method):
    model = make_tiny_llama()
    hf_tokred.apply(model, _config(method, max_tokens=12))
    prompt = _prompt(20, batch=2, seed=7)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=10, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (4, 30)
    out = model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False, return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert out.sequences.shape == (2, 30) and layer.positions.shape[0] == 6
    for name, buffer in layer.buffers.items():
        assert buffer.shape[:3] == layer.valid.shape, name


def test_beam_reorder_moves_history_with_slots():
    model = make_tiny_llama()
    hf_tokred.apply(model, _config("h2o", max_tokens=12))
    cache = hf_tokred.build_cache(model)
    with torch.no_grad():
        model(_prompt(20, batch=2), past_key_values=cache)
    layer = cache.layers[0]
    keys, history = layer.keys.clone(), layer.buffers["accumulated"].clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, keys.flip(0)) and torch.equal(layer.buffers["accumulated"], history.flip(0))


def test_h2o_accumulates_at_every_decoding_step():
    model = make_tiny_llama()
    hf_tokred.apply(model, _config("h2o", max_tokens=40))
    cache = hf_tokred.build_cache(model)
    prompt = _prompt(20)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
        after_prefill = cache.layers[0].buffers["accumulated"].sum().item()
        model(torch.tensor([[5]]), past_key_values=cache)
    # every query's attention sums to one per query head: 20 prompt queries, then one more
    heads = model.config.num_attention_heads
    assert after_prefill == pytest.approx(20 * heads, rel=1e-4)
    assert cache.layers[0].buffers["accumulated"].sum().item() == pytest.approx(21 * heads, rel=1e-4)


def test_tova_keeps_the_tokens_the_last_query_attends_to():
    model = make_tiny_llama()
    hf_tokred.apply(model, _config("tova", max_tokens=10, sink_tokens=0))
    cache = hf_tokred.build_cache(model)
    prompt = _prompt(24)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
    with torch.no_grad():  # the same weights with eager attention, which returns its weights
        out = make_tiny_llama(attn_implementation="eager")(prompt, output_attentions=True)
    for index, layer in enumerate(cache.layers):
        last = out.attentions[index][0, :, -1].mean(dim=0)  # the last query, averaged over the heads
        expected = set(last.topk(10).indices.tolist())
        assert set(layer.positions[0, 0].tolist()) == expected


def test_snapkv_query_agnostic_mode():
    model = make_tiny_llama()
    hf_tokred.apply(model, _config("snapkv", max_tokens=12))
    context, question = _prompt(30), _prompt(5, seed=9)
    cache = hf_tokred.compress_context(model, context)
    assert cache.stored_lengths() == [12, 12] and cache.get_seq_length() == 30
    full = torch.cat([context, question], dim=-1)
    out = model.generate(full, past_key_values=copy.deepcopy(cache), max_new_tokens=6, do_sample=False,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 41)
    assert out.past_key_values.stored_lengths() == [12 + 5 + 5] * 2  # question and answer appended
    # the question never changed what the context kept
    held = cache.layers[0].positions.sort(dim=-1).values
    assert torch.equal(out.past_key_values.layers[0].positions[..., :12].sort(dim=-1).values, held)


def test_merge_option_conserves_token_mass():
    model = make_tiny_llama()
    hf_tokred.apply(model, _config("tova", max_tokens=10, evicted="merge"))
    cache = hf_tokred.build_cache(model)
    model.generate(_prompt(25), max_new_tokens=6, do_sample=False, past_key_values=cache)
    for layer in cache.layers:
        mass = (layer.buffers["mass"] * layer.valid).sum(dim=-1)
        assert torch.allclose(mass, torch.full_like(mass, 30.0))  # every token seen is in some slot
    dropped = hf_tokred.build_cache(model, _config("tova", max_tokens=10))
    model.generate(_prompt(25), max_new_tokens=6, do_sample=False, past_key_values=dropped)
    assert not torch.equal(cache.layers[1].values, dropped.layers[1].values)


def test_kv_bytes_follow_the_budget():
    model = make_tiny_llama()
    dense = model.generate(_prompt(64), max_new_tokens=4, do_sample=False, past_key_values=DynamicCache(),
                           return_dict_in_generate=True).past_key_values
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    hf_tokred.apply(model, _config("tova", keep=0.25))
    cache = model.generate(_prompt(64), max_new_tokens=4, do_sample=False,
                           return_dict_in_generate=True).past_key_values
    assert cache.stored_lengths() == [16, 16]
    assert cache.kv_bytes() <= (0.25 + 0.05) * dense_bytes


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"method": "snapkv", "keep": 0.5, "kernel_size": 4}, "kernel_size"),
        ({"method": "snapkv", "keep": 0.5, "compress_every": 4}, "compress_every"),
        ({"method": "h2o", "max_tokens": 3}, "max_tokens"),
        ({"method": "tova", "keep": 0.5, "evicted": "average"}, "evicted"),
        ({"method": "pyramidkv", "keep": 0.5, "beta": 0.5}, "beta"),
        ({"method": "scissorhands", "keep": 0.5, "history_window": 0}, "history_window"),
        ({"method": "tova"}, "max_tokens"),
    ],
)
def test_bad_values_name_the_field(cfg, field):
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig.from_dict(cfg)
    assert err.value.field == field


def test_fastgen_gives_heads_their_own_budgets():
    model = make_tiny_llama(num_attention_heads=8, num_key_value_heads=8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[:8] *= 40  # head 0 (head_dim 8) attends sharply, the others diffusely
    hf_tokred.apply(model, _config("fastgen", max_tokens=30, recovery=0.45, frequent_ratio=0.1, local_ratio=0.1))
    prompt = _prompt(40)
    prompt[0, ::5] = 5  # punctuation every fifth token
    cache = hf_tokred.compress_context(model, prompt)
    kept = torch.stack([layer.valid.sum(dim=-1)[0] for layer in cache.layers])  # (layers, heads)
    assert cache.stored_lengths() == [30, 30]
    # head 0 needs only sinks, punctuation and 4 heavy hitters (2 + 8 + 4); the others fill the whole budget
    assert kept[:, 0].tolist() == [14, 14] and bool((kept[:, 1:] == 30).all())
    # the next step's attention masks each head's unused slots: same logits with sdpa and eager
    step = torch.tensor([[9]])
    with torch.no_grad():
        sdpa = model(step, past_key_values=copy.deepcopy(cache)).logits
        model.set_attn_implementation("hf_tokred_eager")
        eager = model(step, past_key_values=copy.deepcopy(cache)).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_fastgen_reads_token_ids_from_the_tokenizer_beside_the_model(tmp_path):
    from conftest import make_tiny_tokenizer

    from hf_tokred.methods.kv.fastgen import token_ids_from_tokenizer

    model = make_tiny_llama()
    model.save_pretrained(tmp_path)
    tokenizer = make_tiny_tokenizer(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, token_reduction={"method": "fastgen", "keep": 0.5})
    cache = hf_tokred.build_cache(reloaded)
    assert cache.policy.special_token_ids == token_ids_from_tokenizer(tokenizer)["special_token_ids"] == [0, 1, 2, 127]
    bare = make_tiny_llama()
    hf_tokred.apply(bare, {"method": "fastgen", "keep": 0.5})
    with pytest.raises(hf_tokred.TokenReductionError, match="special_token_ids"):
        hf_tokred.build_cache(bare)


@pytest.mark.parametrize("reference", ["keys", "values"])
def test_keydiff_keeps_the_distinctive_tokens(reference):
    from types import SimpleNamespace

    cfg = hf_tokred.TokenReductionConfig(method="keydiff", max_tokens=4, sink_tokens=0, reference=reference)
    common = torch.tensor([1.0, 0.0, 0.0, 0.0])
    vectors = torch.stack([common + 0.01 * i for i in range(6)] + [torch.tensor([0.0, 1.0, 0.0, 0.0])])
    vectors = vectors.expand(1, 1, 7, 4)
    layer = SimpleNamespace(keys=vectors, values=vectors, valid=torch.ones(1, 1, 7, dtype=torch.bool),
                            positions=torch.arange(7).expand(1, 1, 7))
    scores = cfg.score(layer, None, None)
    assert scores[0, 0].argmax().item() == 6  # the one key unlike the mean is the most worth keeping


def test_scissorhands_counts_rank_first_and_attention_share_breaks_ties():
    from types import SimpleNamespace

    cfg = hf_tokred.TokenReductionConfig(method="scissorhands", max_tokens=40, history_window=4)
    shares = torch.tensor([[0.0, 0.0, 2.0, 0.1],  # important once
                           [0.9, 0.9, 0.9, 0.9],  # never important, but close every time
                           [0.1, 0.0, 0.0, 0.0],  # never important, barely attended
                           [3.0, 3.0, 3.0, 3.0]])  # important for every remembered query
    layer = SimpleNamespace(buffers={"attention_share": shares[None, None]}, positions=torch.arange(4).expand(1, 1, 4),
                            valid=torch.ones(1, 1, 4, dtype=torch.bool))
    scores = cfg.score(layer, None, None)[0, 0]
    assert scores.argsort(descending=True).tolist() == [3, 0, 1, 2]
    assert scores[0].floor() == 1 and scores[1].floor() == 0  # the count is the integer part


def test_fastgen_cuts_an_over_budget_head_by_attention_not_by_token_kind():
    from types import SimpleNamespace

    cfg = hf_tokred.TokenReductionConfig(method="fastgen", max_tokens=6, sink_tokens=1, recovery=0.999,
                                         profile_window=1, special_token_ids=[1], punctuation_token_ids=[5])
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 12, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    query = (20 * (keys[:, :, 7] + keys[:, :, 9]))[:, :, None]  # the last query attends to tokens 7 and 9
    token_ids = torch.tensor([[1, 5, 20, 5, 21, 5, 22, 23, 5, 24, 5, 25]])  # punctuation (5) everywhere
    layer = SimpleNamespace(keys=keys, positions=torch.arange(12).expand(1, 1, 12), seen=12, scratch={},
                            valid=torch.ones(1, 1, 12, dtype=torch.bool), shared={"token_ids": token_ids})
    scores = cfg.score(layer, SimpleNamespace(scaling=1.0), query)
    top = set(scores[0, 0].topk(3).indices.tolist())
    assert top == {0, 7, 9}  # the sink, then the attended tokens ahead of any punctuation


@pytest.mark.parametrize("method", ["scissorhands", "tova", "keydiff"])  # h2o and fastgen keep runs already here
def test_kernel_size_keeps_the_neighbours_of_what_scores_highest(method):
    model = make_tiny_llama()
    prompt = _prompt(30)
    kept = {}
    for kernel in (1, 5):
        hf_tokred.apply(model, _config(method, max_tokens=12, sink_tokens=0, window=0, kernel_size=kernel))
        cache = hf_tokred.compress_context(model, prompt)
        layer = cache.layers[1]
        positions = layer.positions[0][layer.valid[0]].view(-1).tolist()
        kept[kernel] = set(positions)
        hf_tokred.remove(model)
    # pooled scores keep runs of neighbours: more kept positions sit next to another kept one
    def neighbours(held):
        return sum(1 for p in held if p - 1 in held or p + 1 in held)
    assert neighbours(kept[5]) > neighbours(kept[1])


@pytest.mark.parametrize("seed", range(4))
def test_one_slot_eviction_picks_what_the_sorting_path_picks(seed):
    """A decoding step evicts one slot by an O(slots) search; it must pick the slot the two-sort path picks
    (lowest score, the earliest position among ties, never a sink or a recent token, padding first)."""
    from hf_tokred.kv.cache import select_slots

    torch.manual_seed(seed)
    batch, heads, slots = 3, 2, 40
    positions = torch.stack([torch.randperm(slots) for _ in range(batch * heads)]).view(batch, heads, slots)
    valid = torch.rand(batch, heads, slots) > 0.2
    scores = torch.randint(0, 4, (batch, heads, slots)).float()  # many ties
    fast = select_slots(scores, positions, valid, slots - 1, 3, 5, slots)
    sorted_path = select_slots(scores, positions, valid, slots - 1, 3, 5, slots,
                               head_budgets=torch.full((batch, heads), slots - 1))
    assert torch.equal(fast[0], sorted_path[0]) and torch.equal(fast[1], sorted_path[1])


@pytest.mark.parametrize("method", ["tova", "h2o", "keydiff"])
def test_moving_the_last_slot_equals_filling_holes(method, monkeypatch):
    from hf_tokred.kv.cache import ReducingLayer

    model = make_tiny_llama()
    ids = torch.randint(2, 120, (2, 30))
    hf_tokred.apply(model, {"method": method, "max_tokens": 16})
    kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    fast = model.generate(ids, **kwargs)
    monkeypatch.setattr(ReducingLayer, "_move_last_slot", ReducingLayer._fill_holes)
    slow = model.generate(ids, **kwargs)
    assert torch.equal(fast.sequences, slow.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.scores, slow.scores))
