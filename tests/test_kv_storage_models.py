"""Compressed KV storage (kivi, kvquant, minicache) through generate() on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_tokred
from hf_tokred import ConfigError, TokenReductionError, compose
from hf_tokred.methods.kv.kvquant import calibrate

KIVI4 = {"method": "kivi", "bits": 4, "group_size": 8, "residual": 8}
KIVI2 = {"method": "kivi", "bits": 2, "group_size": 8, "residual": 8}
SNAP = {"method": "snapkv", "keep": 0.5}


def _ids(n=40, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (batch, n), generator=generator)


def _generate(config, ids, attention_mask=None, **kwargs):
    model = make_tiny_llama()
    if config is not None:
        hf_tokred.apply(model, config)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=attention_mask, max_new_tokens=6, return_dict_in_generate=True,
                          output_scores=True, **kwargs)


def _max_score_diff(a, b):
    """Largest logit difference over the steps both runs reached with the same tokens."""
    worst, prompt = 0.0, a.sequences.shape[-1] - len(a.scores)
    for step, (x, y) in enumerate(zip(a.scores, b.scores)):
        if not torch.equal(a.sequences[:, :prompt + step], b.sequences[:, :prompt + step]):
            break
        worst = max(worst, float((x - y).abs().max()))
    return worst


@pytest.mark.parametrize("config", [{"method": "kivi", "bits": 16}, {"method": "minicache", "start_layer": 2}])
def test_no_op_settings_are_bit_identical_to_dense(config):
    ids = _ids()
    dense, reduced = _generate(None, ids), _generate(config, ids)
    assert torch.equal(dense.sequences, reduced.sequences)
    assert _max_score_diff(dense, reduced) == 0.0


def test_full_precision_windows_covering_every_token_are_bit_identical_to_dense():
    ids = _ids()
    dense = _generate(None, ids)
    kivi = _generate({"method": "kivi", "bits": 2, "group_size": 8, "residual": 64, "residual_dtype": "model"}, ids)
    assert torch.equal(dense.sequences, kivi.sequences) and _max_score_diff(dense, kivi) == 0.0
    model = make_tiny_llama()
    hf_tokred.apply(model, {"method": "kvquant", "bits": 3, "residual": 64, "residual_dtype": "model"})
    calibrate(model, [_ids(64, seed=3)[0]])
    kvquant = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(dense.sequences, kvquant.sequences) and _max_score_diff(dense, kvquant) == 0.0


def test_kvquant_window_composes_with_eviction_and_beam_search():
    ids = _ids(60)
    model = make_tiny_llama()
    hf_tokred.apply(model, compose(SNAP, {"method": "kvquant", "bits": 3, "residual": 8}))
    calibrate(model, [_ids(64, seed=3)[0]])
    cache = hf_tokred.build_cache(model)
    out = model.generate(ids, max_new_tokens=4, past_key_values=cache, do_sample=False, num_beams=2)
    assert out.shape == (1, 64) and max(cache.stored_lengths()) < 60
    store = cache.layers[0].store
    assert store.positions is not None and store.window.count <= 8


def test_policy_with_full_precision_storage_matches_the_policy_alone():
    ids = _ids(60)
    alone = _generate(SNAP, ids)
    stored = _generate(compose(SNAP, {"method": "kivi", "bits": 16}), ids)
    assert torch.equal(alone.sequences, stored.sequences) and _max_score_diff(alone, stored) == 0.0


def test_snapkv_with_2bit_kivi_keeps_the_budget_and_shrinks_memory():
    ids = _ids(60)
    results = {}
    for name, config in (("policy", SNAP), ("both", compose(SNAP, KIVI2))):
        model = make_tiny_llama()
        hf_tokred.apply(model, config)
        cache = hf_tokred.build_cache(model)
        model.generate(ids, max_new_tokens=4, past_key_values=cache, do_sample=False, num_beams=2)
        results[name] = (cache.stored_lengths(), cache.kv_bytes())
    assert results["both"][0] == results["policy"][0] and max(results["both"][0]) < 60  # evicted to the budget
    assert results["both"][1] < results["policy"][1]


@pytest.mark.parametrize("config", [KIVI4, KIVI2, {"method": "minicache", "start_layer": 0},
                                    {"method": "minicache", "start_layer": 0, "quantize": KIVI4}])
def test_greedy_sampling_and_beam_search_run(config):
    ids = _ids(50)
    dense = _generate(None, ids)
    greedy = _generate(config, ids)
    assert greedy.sequences.shape == dense.sequences.shape
    if config["method"] == "kivi":  # quantization noise only
        assert _max_score_diff(dense, greedy) < (0.05 if config["bits"] == 4 else 0.3)
    torch.manual_seed(0)
    sampled = _generate(config, ids, do_sample=True, top_k=5)
    beams = _generate(config, ids, num_beams=3)
    assert sampled.sequences.shape == beams.sequences.shape == dense.sequences.shape


def test_left_padded_batch_rows_match_their_solo_runs():
    long, short = _ids(48, seed=1), _ids(40, seed=2)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 8, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    batched = _generate(KIVI4, ids, attention_mask=mask)
    for row, solo_ids in enumerate((long, short)):
        solo = _generate(KIVI4, solo_ids)
        dense = _generate(None, solo_ids)
        noise = _max_score_diff(solo, dense)
        diff = max(float((b[row] - s[0]).abs().max()) for b, s in zip(batched.scores, solo.scores))
        # the padded row is quantized in other groups than alone, so only quantization noise differs
        assert diff <= 3 * noise + 1e-4, (row, diff, noise)
        assert torch.equal(batched.sequences[row, -6:], solo.sequences[0, -6:])


def test_invalid_bits_and_group_sizes_are_clear_errors(tiny_llama):
    with pytest.raises(ConfigError, match="bits") as err:
        hf_tokred.TokenReductionConfig(method="kivi", bits=3)
    assert err.value.field == "bits"
    with pytest.raises(ConfigError, match="bits"):
        hf_tokred.TokenReductionConfig(method="kvquant", bits=5)
    with pytest.raises(ConfigError, match=r"group_size: must divide the head dimension 16") as err:
        hf_tokred.apply(tiny_llama, {"method": "kivi", "bits": 2, "group_size": 12})
    assert err.value.field == "group_size"
    assert tiny_llama.config._attn_implementation == "sdpa" and not hasattr(tiny_llama, "_hf_tokred_applied")
    with pytest.raises(ConfigError, match="quantize"):
        hf_tokred.TokenReductionConfig(method="minicache", quantize={"method": "snapkv", "keep": 0.5})
    for method, field, value in (("kivi", "key_clip", 0.0), ("kivi", "key_clip", 1.5), ("kivi", "residual_dtype", "float32"),
                                 ("kivi", "key_group_size", 0), ("kivi", "key_outliers", -1),
                                 ("kivi", "key_outliers", 64), ("kvquant", "residual", -1),
                                 ("kvquant", "residual_dtype", "int8")):
        with pytest.raises(ConfigError, match=field) as err:
            hf_tokred.TokenReductionConfig(method=method, **{field: value})
        assert err.value.field == field


def test_minicache_does_not_compose_with_eviction(tiny_llama):
    with pytest.raises(ConfigError, match="minicache"):
        hf_tokred.apply(tiny_llama, compose(SNAP, {"method": "minicache", "start_layer": 0}))


def test_minicache_with_kivi_is_smaller_than_minicache_alone():
    ids = _ids(80)
    sizes = []
    for config in ({"method": "minicache", "start_layer": 0},
                   {"method": "minicache", "start_layer": 0, "quantize": {**KIVI4, "residual": 0}}):
        model = make_tiny_llama()
        hf_tokred.apply(model, config)
        cache = hf_tokred.build_cache(model)
        model(ids, past_key_values=cache)
        sizes.append(cache.kv_bytes())
    dense_bytes = 2 * 2 * 80 * 2 * 16 * 4  # layers, K+V, tokens, kv heads, head dim, fp32
    assert sizes[0] < 0.6 * dense_bytes and sizes[1] < 0.5 * sizes[0]


def test_kvquant_calibration_saves_and_loads(tiny_llama_dir, tmp_path):
    config = {"method": "kvquant", "bits": 3, "outlier_fraction": 0.1}
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=config)
    model.generation_config.eos_token_id = None
    ids = _ids(30)
    with pytest.raises(TokenReductionError, match="calibrate"):
        model.generate(ids, max_new_tokens=2)
    calibrate(model, [_ids(64, seed=3)[0], _ids(32, seed=4)])
    learned = {k: v.clone() for k, v in model.hf_tokred_modules.state_dict().items()}
    assert not torch.equal(learned["kvquant.key_codebook"][0], torch.linspace(-1, 1, 8))
    first = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(learned)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    again.generation_config.eos_token_id = None
    for k, v in again.hf_tokred_modules.state_dict().items():
        assert torch.equal(v, learned[k])
    assert torch.equal(again.generate(ids, max_new_tokens=4, do_sample=False), first)
    # close to the dense model: 3-bit keys/values with 10% exact outliers
    dense = make_tiny_llama()
    reduced = _generate(None, ids)
    with torch.no_grad():
        cache = hf_tokred.build_cache(again)
        again(ids[:, :20], past_key_values=cache)
        step = again(ids[:, 20:], past_key_values=cache).logits
        full = dense(ids).logits[:, 20:]
    assert float((step - full).abs().max()) < 0.1 and reduced.sequences.shape[-1] == 36


def test_kivi_defaults_pick_outliers_by_bit_width(tiny_llama):
    make = hf_tokred.TokenReductionConfig
    assert make(method="kivi", bits=2).outliers_per_key_group() == 3  # 3 per 64-token key group
    assert make(method="kivi", bits=2, key_group_size=32).outliers_per_key_group() == 1
    assert make(method="kivi", bits=2, key_outliers=0).outliers_per_key_group() == 0
    assert make(method="kivi", bits=4).outliers_per_key_group() == 0
    assert make(method="kivi", bits=2, key_group_size=512).outliers_per_key_group() == 0
    # an explicit group of 64 channels does not fit the tiny model's head dimension of 16: a clear error
    with pytest.raises(ConfigError, match=r"group_size: must divide the head dimension 16.*got 64") as err:
        hf_tokred.apply(tiny_llama, {"method": "kivi", "bits": 2, "group_size": 64})
    assert err.value.field == "group_size" and not hasattr(tiny_llama, "_hf_tokred_applied")
    # the default fits any head dimension: value groups of the largest divisor up to 64, key groups of 64 tokens
    cfg = make(method="kivi", bits=2)
    assert [cfg.channels_per_value_group(d) for d in (16, 64, 80, 96, 128)] == [16, 64, 40, 48, 64]
    hf_tokred.apply(tiny_llama, cfg)
    cache = hf_tokred.build_cache(tiny_llama)
    tiny_llama(_ids(200), past_key_values=cache)
    store = cache.layers[0].store
    assert (store.group_size, store.key_group_size, store.key_outliers) == (16, 64, 3)
    assert store.key_codes.shape[2] == 64  # one key group quantized: 200 tokens minus a 136-token tail


def test_kivi_key_outliers_compose_with_eviction_and_save_and_load(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="key_outliers: expected 0 to 7") as err:
        hf_tokred.TokenReductionConfig(method="kivi", group_size=8, key_outliers=8)
    assert err.value.field == "key_outliers"
    with pytest.raises(ConfigError, match="key_outliers"):
        hf_tokred.TokenReductionConfig(method="kivi", key_group_size=512, key_outliers=1)
    ids = _ids(60)
    sparse = {**KIVI2, "key_outliers": 2}
    sizes = {}
    for name, config in (("plain", compose(SNAP, KIVI2)), ("sparse", compose(SNAP, sparse))):
        model = make_tiny_llama()
        hf_tokred.apply(model, config)
        cache = hf_tokred.build_cache(model)
        out = model.generate(ids, max_new_tokens=4, past_key_values=cache, do_sample=False, num_beams=2)
        assert out.shape == (1, 64) and max(cache.stored_lengths()) < 60
        sizes[name] = cache.kv_bytes()
        store = cache.layers[0].store
        if name == "sparse":
            assert store.key_outlier_pos.shape[2:] == (store.key_scale.shape[2], 2, 16)
    assert sizes["plain"] < sizes["sparse"]
    # the setting round-trips through save_pretrained
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=sparse)
    model.generation_config.eos_token_id = None
    first = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    again.generation_config.eos_token_id = None
    assert again._hf_tokred_applied.config.get("kv_storage").key_outliers == 2
    assert torch.equal(again.generate(ids, max_new_tokens=4, do_sample=False), first)
