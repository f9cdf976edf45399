"""Failures found by an adversarial pass, one section per finding: each test failed before its fix.

1. a TokenReductionConfig object overriding a saved reduction through AutoModel*/pipeline;
2. a failed re-apply keeps the previous reduction; 3. token_reduction.safetensors is checked;
4. save_pretrained removes stale side-car files; 5. threads sharing a reduced model;
6. strings in a checkpoint's config are never followed as paths or repo ids; 7. config bounds;
8. a used TokenReductionCache and cache_implementation; 9. tome_sd strides.
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
from dataclasses import dataclass

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, make_tiny_vit
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM, pipeline

import hf_tokred
from hf_tokred import ConfigError, MissingFileError, TokenReductionConfig, TokenReductionError, compose
from hf_tokred.config import MAX_DEPTH, MAX_INT, param, register_method
from hf_tokred.errors import ArgumentError, SideCarError
from hf_tokred.integration import wiring
from hf_tokred.integration.wiring import get_applied

STREAM = {"method": "streamingllm", "sink_tokens": 2, "window": 6}
SNAP = {"method": "snapkv", "keep": 0.5, "window_size": 4}
KVQUANT = {"method": "kvquant", "bits": 3, "outlier_fraction": 0.1}
PRESET = "HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512"


def _ids(batch=1, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (batch, length), generator=g)


def _generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=8, do_sample=False, **kwargs)


@pytest.fixture
def reduced_dir(tmp_path):
    """A tiny Llama saved with a StreamingLLM reduction in its config.json."""
    model = hf_tokred.apply(make_tiny_llama(), STREAM)
    path = tmp_path / "reduced"
    model.save_pretrained(path)
    return path


@pytest.fixture
def kvquant_dir(tmp_path):
    """A tiny Llama saved with KVQuant: calibration buffers (float and uint8) in token_reduction.safetensors."""
    model = hf_tokred.apply(make_tiny_llama(), KVQUANT)
    path = tmp_path / "kvquant"
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. A config object overriding a saved reduction through AutoModel* and pipeline()
# ---------------------------------------------------------------------------------------------


def test_auto_from_pretrained_overrides_a_saved_reduction_with_a_config_object(reduced_dir):
    cfg = TokenReductionConfig(method="streamingllm", max_tokens=20)
    model = AutoModelForCausalLM.from_pretrained(reduced_dir, token_reduction=cfg)
    assert get_applied(model).config == cfg
    assert json.loads(model.config.to_json_string())["token_reduction"] == cfg.to_dict()
    # a string of the user's own (a preset, a folder) still works where config.json holds a reduction
    assert get_applied(AutoModelForCausalLM.from_pretrained(reduced_dir, token_reduction=PRESET)).config.max_tokens == 512
    assert get_applied(AutoModelForCausalLM.from_pretrained(reduced_dir, token_reduction=False)) is None
    # token_reduction=None means "not given", as for a model class: the saved reduction applies
    assert get_applied(AutoModelForCausalLM.from_pretrained(reduced_dir, token_reduction=None)).config.window == 6


def test_pipeline_model_kwargs_override_a_saved_reduction_with_a_config_object(reduced_dir):
    make_tiny_tokenizer(reduced_dir)
    cfg = TokenReductionConfig(method="streamingllm", max_tokens=20)
    generator = pipeline("text-generation", model=str(reduced_dir), model_kwargs={"token_reduction": cfg})
    assert get_applied(generator.model).config == cfg
    assert generator("w1 w2 w3", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("w1 w2 w3")


# ---------------------------------------------------------------------------------------------
# 2. A failed re-apply leaves the model exactly as it was
# ---------------------------------------------------------------------------------------------


@register_method("test_hardening_probe")
@dataclass(kw_only=True)
class ProbeConfig(TokenReductionConfig):
    """A reducer of another stage whose wiring the tests make fail half-way."""

    stage = "decoding"
    model_kinds = ("decoder",)
    tag: str = param("probe", str, help="label")


def _state(model):
    applied = get_applied(model)
    learned = model._modules.get("hf_tokred_modules")
    return (applied.config, model.config._attn_implementation, model.config.token_reduction, list(model.model_tags),
            None if learned is None else {k: v.clone() for k, v in learned.state_dict().items()})


def _assert_same_state(model, before, ids, outputs):
    config, attn, stored, tags, learned = before
    assert get_applied(model).config == config and model.config._attn_implementation == attn
    assert model.config.token_reduction == stored and list(model.model_tags) == tags
    if learned is not None:
        now = model.hf_tokred_modules.state_dict()
        assert sorted(now) == sorted(learned) and all(torch.equal(now[k], v) for k, v in learned.items())
    assert torch.equal(_generate(model, ids), outputs)


def test_failed_reapply_with_a_corrupt_side_car_keeps_the_previous_reduction(kvquant_dir, tmp_path):
    model = hf_tokred.apply(make_tiny_llama(), STREAM)
    ids = _ids()
    before, outputs = _state(model), _generate(model, ids)
    (kvquant_dir / "token_reduction.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SideCarError):
        hf_tokred.apply(model, KVQUANT, weights_from=kvquant_dir)
    _assert_same_state(model, before, ids, outputs)


def test_failure_while_attaching_restores_the_previous_reduction_and_its_learned_parts(kvquant_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(kvquant_dir)
    model.generation_config.eos_token_id = None
    from hf_tokred.methods.kv.kvquant import calibrate

    calibrate(model, [_ids(48, seed=3)[0]])
    ids = _ids(length=20)
    before, outputs = _state(model), _generate(model, ids)

    def wire_then_fail(model, adapter, reducer, applied):
        model.half_wired = True
        applied.add_undo(lambda: delattr(model, "half_wired"))
        raise RuntimeError("boom")

    monkeypatch.setitem(wiring._WIRING, "decoding", wire_then_fail)  # undone after the test
    with pytest.raises(RuntimeError, match="boom"):
        hf_tokred.apply(model, compose(STREAM, ProbeConfig()))
    assert not hasattr(model, "half_wired")
    _assert_same_state(model, before, ids, outputs)


def test_when_the_previous_reduction_cannot_be_put_back_the_model_is_left_dense(tiny_llama, monkeypatch):
    model = tiny_llama
    ids = _ids(length=20)
    dense = _generate(model, ids)
    hf_tokred.apply(model, STREAM)

    def fail(model, adapter, reducer, applied):
        raise RuntimeError("boom")

    for key in ("kv_policy", "decoding"):  # the new reduction and the old one's re-attach both fail
        monkeypatch.setitem(wiring._WIRING, key, fail)
    with pytest.raises(RuntimeError, match="boom"):
        hf_tokred.apply(model, compose(STREAM, ProbeConfig()))
    assert get_applied(model) is None and "token_reduction" not in model.config.__dict__
    assert torch.equal(_generate(model, ids), dense)


# ---------------------------------------------------------------------------------------------
# 3. token_reduction.safetensors is checked: names, shapes, dtypes, values, readability
# ---------------------------------------------------------------------------------------------


def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "change, tensor, message",
    [
        (lambda t: t.update({"kvquant.key_codebook": t["kvquant.key_codebook"][:1]}), "kvquant.key_codebook", "shape"),
        (lambda t: t.update({"kvquant.key_half": torch.ones(3)}), "kvquant.key_half", "shape"),
        (lambda t: t.update({"kvquant.key_center": t["kvquant.key_center"].long()}), "kvquant.key_center",
         "floating-point"),
        (lambda t: t.update({"kvquant.calibrated": torch.tensor(1.0)}), "kvquant.calibrated", "integer"),
        (lambda t: t.update({"kvquant.calibrated": torch.tensor(300)}), "kvquant.calibrated", "outside the range"),
        (lambda t: t["kvquant.key_half"].__setitem__((0, 0, 0), float("nan")), "kvquant.key_half", "NaN or infinite"),
        (lambda t: t.pop("kvquant.value_codebook"), "kvquant.value_codebook", "missing"),
        (lambda t: t.update({"kvquant.extra": torch.zeros(2)}), "kvquant.extra", "unexpected"),
    ],
    ids=["broadcastable-shape", "wrong-shape", "int-for-float", "float-for-int", "int-out-of-range", "nan",
         "missing", "extra"],
)
def test_side_car_tensors_are_checked(kvquant_dir, change, tensor, message):
    side_car = kvquant_dir / "token_reduction.safetensors"
    _rewrite(side_car, change)
    with pytest.raises(SideCarError, match=message) as err:
        AutoModelForCausalLM.from_pretrained(kvquant_dir)
    assert str(side_car) in str(err.value) and tensor in str(err.value) and err.value.field == tensor
    assert get_applied(AutoModelForCausalLM.from_pretrained(kvquant_dir, token_reduction=False)) is None


@pytest.mark.parametrize("damage", [b"", b"\x00" * 3, b"garbage that is not safetensors", "truncated"])
def test_unreadable_side_car_names_the_file(kvquant_dir, damage):
    side_car = kvquant_dir / "token_reduction.safetensors"
    data = side_car.read_bytes()
    side_car.write_bytes(data[: len(data) // 2] if damage == "truncated" else damage)
    with pytest.raises(SideCarError, match="not a readable safetensors file") as err:
        AutoModelForCausalLM.from_pretrained(kvquant_dir)
    assert str(side_car) in str(err.value)


def test_side_car_saved_in_bfloat16_loads_into_a_float32_model(kvquant_dir):
    side_car = kvquant_dir / "token_reduction.safetensors"
    _rewrite(side_car, lambda t: t.update({k: v.bfloat16() for k, v in t.items() if v.is_floating_point()}))
    model = AutoModelForCausalLM.from_pretrained(kvquant_dir)
    assert model.hf_tokred_modules["kvquant"].key_half.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# 4. save_pretrained owns its files
# ---------------------------------------------------------------------------------------------


def _reused_folder(kvquant_dir, tmp_path):
    # A folder that already holds a learned reduction's files (a copy: the model loaded from kvquant_dir may
    # still map its weights file, which must not be rewritten under it).
    reused = tmp_path / "reused"
    shutil.copytree(kvquant_dir, reused)
    return reused


def test_saving_a_reduction_without_learned_parts_removes_an_old_side_car(kvquant_dir, tmp_path):
    reused = _reused_folder(kvquant_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(kvquant_dir, token_reduction=STREAM)
    model.save_pretrained(reused)
    assert not (reused / "token_reduction.safetensors").exists()
    assert get_applied(AutoModelForCausalLM.from_pretrained(reused)).config == TokenReductionConfig(**STREAM)


def test_dense_save_after_remove_removes_the_reduction_files(kvquant_dir, tmp_path):
    reused = _reused_folder(kvquant_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(kvquant_dir)
    hf_tokred.remove(model)
    model.save_pretrained(reused)
    assert not (reused / "token_reduction_config.json").exists()
    assert not (reused / "token_reduction.safetensors").exists()
    assert "token_reduction" not in json.loads((reused / "config.json").read_text())
    with pytest.raises(MissingFileError, match="holds no token_reduction_config.json"):
        hf_tokred.apply(model, reused)
    assert get_applied(model) is None


# ---------------------------------------------------------------------------------------------
# 5. Threads sharing one reduced model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [STREAM, SNAP], ids=["streamingllm", "snapkv"])
def test_two_threads_generating_on_one_model_get_what_each_gets_alone(config):
    model = hf_tokred.apply(make_tiny_llama(), config)
    prompts = [_ids(1, 30, seed=1), _ids(2, 23, seed=2)]
    alone = [_generate(model, ids) for ids in prompts]
    barrier = threading.Barrier(2)
    results, errors = [[], []], []

    def run(index):
        try:
            barrier.wait()
            for _ in range(4):
                results[index].append(_generate(model, prompts[index]))
        except Exception as err:  # reported below, with the thread's error
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index in range(2):
        assert len(results[index]) == 4 and all(torch.equal(out, alone[index]) for out in results[index])


def _vit_with_tome():
    vit = hf_tokred.apply(make_tiny_vit(), {"method": "tome", "r": 4})
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return vit, vit.layers[1], lambda: vit(pixel_values=pixels).last_hidden_state


def _dit_with_tome_sd():
    from test_diffusers import dit_inputs, tiny_dit

    dit = hf_tokred.apply(tiny_dit(), {"method": "tome_sd", "ratio": 0.5, "use_rand": False})
    latent, timestep, labels = dit_inputs()
    return dit, dit.transformer_blocks[1], lambda: dit(latent, timestep=timestep, class_labels=labels).sample


@pytest.mark.parametrize("build", [_vit_with_tome, _dit_with_tome_sd], ids=["encoder-tome", "diffusion-tome_sd"])
def test_concurrent_forward_of_a_reduction_with_per_call_state_is_a_clear_error(build):
    model, block, run = build()
    with torch.no_grad():
        alone = run()
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):  # keeps the worker's call inside the model while the main thread calls it
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(30)

    handle = block.register_forward_pre_hook(hold)
    outputs = []

    def work():
        with torch.no_grad():
            outputs.append(run())

    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert inside.wait(30)
        with torch.no_grad(), pytest.raises(TokenReductionError, match="concurrent calls .* not supported"):
            run()
    finally:
        release.set()
        worker.join()
    handle.remove()
    assert torch.equal(outputs[0], alone)
    with torch.no_grad():  # the refused call left nothing behind: the next call runs
        assert torch.equal(run(), alone)
    hf_tokred.remove(model)
    assert not model._forward_hooks and not model._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# 6. Strings in a checkpoint's config are never followed
# ---------------------------------------------------------------------------------------------


def _write_stored(folder, key, value, file="config.json"):
    path = folder / file
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


def test_saved_string_is_not_a_path_or_repo_id(reduced_dir, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe"
    TokenReductionConfig(method="streamingllm", max_tokens=9).save_pretrained(recipe)
    monkeypatch.chdir(tmp_path)
    downloads = []
    monkeypatch.setattr("hf_tokred.config._download", lambda *a, **k: downloads.append(a) or "/nonexistent")
    for stored in ("recipe", str(recipe), str(recipe / "token_reduction_config.json"), "/etc/passwd", "me/repo"):
        _write_stored(reduced_dir, "token_reduction", stored)
        with pytest.raises(ConfigError, match="could not find .* among hf_tokred's presets") as err:
            AutoModelForCausalLM.from_pretrained(reduced_dir)
        assert str(reduced_dir / "config.json") in str(err.value)
    assert downloads == []
    # the user's own argument may still be a folder
    assert get_applied(LlamaForCausalLM.from_pretrained(reduced_dir, token_reduction=str(recipe))).config.max_tokens == 9


def test_saved_preset_name_is_the_package_preset_never_a_local_folder(reduced_dir, tmp_path, monkeypatch):
    TokenReductionConfig(method="streamingllm", max_tokens=7).save_pretrained(tmp_path / PRESET)
    monkeypatch.chdir(tmp_path)
    _write_stored(reduced_dir, "token_reduction", PRESET)
    assert get_applied(AutoModelForCausalLM.from_pretrained(reduced_dir)).config.max_tokens == 512


def test_diffusers_saved_string_is_not_a_path(tmp_path, monkeypatch):
    from diffusers import DiTTransformer2DModel
    from test_diffusers import tiny_dit

    TokenReductionConfig(method="todo", downsample_factor=2).save_pretrained(tmp_path / "recipe")
    tiny_dit().save_pretrained(tmp_path / "dit")
    monkeypatch.chdir(tmp_path)
    _write_stored(tmp_path / "dit", "_token_reduction", "recipe")
    with pytest.raises(ConfigError, match="_token_reduction: could not find 'recipe'"):
        DiTTransformer2DModel.from_pretrained(tmp_path / "dit")


# ---------------------------------------------------------------------------------------------
# 7. Config bounds: only ConfigError, naming the field and the allowed range
# ---------------------------------------------------------------------------------------------


def _nested_composition(depth):
    data = dict(STREAM)
    for _ in range(depth):
        data = {"method": "composed", "reducers": [data]}
    return data


@pytest.mark.parametrize(
    "build, field, message",
    [
        (lambda: TokenReductionConfig(method="streamingllm", keep=10**400), "keep", r"a number in \(0, 1\]"),
        (lambda: TokenReductionConfig(method="streamingllm", max_tokens=10**5000), "max_tokens",
         r"an int in \[1, 2147483647\] or None, got an int of about 5001 digits"),
        (lambda: TokenReductionConfig(method="streamingllm", max_tokens=2**63), "max_tokens", "MAX_INT"),
        (lambda: TokenReductionConfig(method="streamingllm", window=[[[[[[[[[[1]]]]]]]]]]), "window", "nest at most"),
        (lambda: TokenReductionConfig(method="tome", r=10**5000), "r", "MAX_INT"),
        (lambda: TokenReductionConfig(method="diffrate", prune=[10**5000]), "prune", "MAX_INT"),
        (lambda: TokenReductionConfig.from_dict(_nested_composition(300)), "token_reduction", "nest at most"),
        (lambda: compose(compose(STREAM)), "reducers[0]", "cannot be nested"),
        (lambda: TokenReductionConfig.from_dict(_nested_composition(2)), "reducers[0]", "cannot be nested"),
    ],
    ids=["float-overflow", "int-too-long-to-print", "int64-overflow", "deep-list", "tome-r", "diffrate-prune",
         "deep-composition", "composed-object", "composed-dict"],
)
def test_config_bounds_raise_config_errors(build, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        build()
    assert err.value.field == field


def test_int_bound_is_usable_and_deep_json_file_is_a_config_error(tmp_path):
    assert TokenReductionConfig(method="streamingllm", max_tokens=MAX_INT).max_tokens == MAX_INT
    assert MAX_DEPTH >= 2  # a composition (a list of dicts) fits
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="deep.json: not a readable JSON"):
        TokenReductionConfig.from_pretrained(deep)


def test_apply_with_an_unknown_keyword_names_it_and_the_allowed_ones(tiny_llama):
    with pytest.raises(ArgumentError, match="'foo'.* weights_from, hub_kwargs, weights_required") as err:
        hf_tokred.apply(tiny_llama, STREAM, foo=1)
    assert isinstance(err.value, TypeError) and err.value.field == "foo"
    assert get_applied(tiny_llama) is None


# ---------------------------------------------------------------------------------------------
# 8. A used cache, and cache_implementation
# ---------------------------------------------------------------------------------------------


def test_reusing_a_cache_after_generate_is_a_clear_error(tiny_llama):
    hf_tokred.apply(tiny_llama, STREAM)
    ids = _ids()
    cache = hf_tokred.build_cache(tiny_llama)
    _generate(tiny_llama, ids, past_key_values=cache)
    with pytest.raises(TokenReductionError, match="already used .*hf_tokred.build_cache.*copy.deepcopy"):
        _generate(tiny_llama, ids, past_key_values=cache)
    with pytest.raises(TokenReductionError, match="already used"):  # a copy of a used cache is used too
        _generate(tiny_llama, ids, past_key_values=copy.deepcopy(cache))


def test_compressed_context_serves_one_generate_per_copy(tiny_llama):
    hf_tokred.apply(tiny_llama, SNAP)
    context, question = _ids(1, 24, seed=3), _ids(1, 4, seed=4)
    full = torch.cat([context, question], dim=-1)
    compressed = hf_tokred.compress_context(tiny_llama, context)
    first = _generate(tiny_llama, full, past_key_values=copy.deepcopy(compressed))
    second = _generate(tiny_llama, full, past_key_values=copy.deepcopy(compressed))
    assert torch.equal(first, second)
    assert torch.equal(_generate(tiny_llama, full, past_key_values=compressed), first)
    with pytest.raises(TokenReductionError, match="already used"):
        _generate(tiny_llama, full, past_key_values=compressed)


def test_cache_implementation_on_a_reduced_model_is_a_clear_error(tiny_llama):
    hf_tokred.apply(tiny_llama, STREAM)
    ids = _ids()
    with pytest.raises(TokenReductionError, match="builds its own cache.*hf_tokred.remove.*DynamicCache"):
        _generate(tiny_llama, ids, cache_implementation="static")
    # the dense ways out both work
    assert _generate(tiny_llama, ids, past_key_values=DynamicCache()).shape == (1, 20)
    hf_tokred.remove(tiny_llama)
    assert _generate(tiny_llama, ids, cache_implementation="static").shape == (1, 20)


# ---------------------------------------------------------------------------------------------
# 9. tome_sd strides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [10**30, 0, -1, 1000])
def test_tome_sd_stride_out_of_range_is_a_config_error(stride):
    with pytest.raises(ConfigError, match="sx: expected an int in") as err:
        TokenReductionConfig(method="tome_sd", sx=stride)
    assert err.value.field == "sx"


def test_tome_sd_stride_larger_than_the_token_grid_is_an_error_at_call_time():
    from test_diffusers import dit_inputs, run_dit, tiny_dit

    dit = tiny_dit()  # 8x8 latent, patch 2: a 4x4 token grid
    reference = run_dit(dit)
    hf_tokred.apply(dit, {"method": "tome_sd", "ratio": 0.5, "sx": 8, "sy": 2, "use_rand": False})
    with pytest.raises(ConfigError, match=r"sx=8, sy=2 cell does not fit the 4x4 .*sx <= 4") as err:
        run_dit(dit)
    assert err.value.field == "sx"
    hf_tokred.apply(dit, {"method": "tome_sd", "ratio": 0.5, "sx": 4, "sy": 4, "use_rand": False})
    assert not torch.equal(run_dit(dit, dit_inputs()), reference)  # a cell that fits merges
