"""TokenReductionConfig: registry, validation, JSON round trip, presets, composition."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError, UnknownMethodError, compose
from hf_tokred.config import param, register_method
from hf_tokred.methods.kv.streamingllm import StreamingLLMConfig


def test_factory_returns_registered_subclass():
    cfg = TokenReductionConfig(method="streamingllm", sink_tokens=4, window=60)
    assert type(cfg) is StreamingLLMConfig
    assert cfg.max_tokens == 64
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    assert StreamingLLMConfig(max_tokens=64) == cfg


def test_to_dict_is_json_and_roundtrips(tmp_path):
    cfg = TokenReductionConfig(method="streamingllm", keep=0.5, sink_tokens=2)
    text = json.dumps(cfg.to_dict())
    assert TokenReductionConfig.from_dict(json.loads(text)) == cfg
    cfg.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "token_reduction_config.json").read_text())
    assert on_disk["hf_tokred_version"] == hf_tokred.__version__
    assert TokenReductionConfig.from_pretrained(tmp_path) == cfg
    assert TokenReductionConfig.from_pretrained(tmp_path / "token_reduction_config.json") == cfg


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(UnknownMethodError, match="registered methods are: .*streamingllm") as err:
        TokenReductionConfig(method="snapkvv", keep=0.5)
    assert err.value.field == "method"


@pytest.mark.parametrize(
    "kwargs, field, message",
    [
        ({"window": 0}, "window", ">= 1"),
        ({"window": -3}, "window", r"in \[0, inf\)"),
        ({"window": 2.5}, "window", "an int"),
        ({"window": "8"}, "window", "an int"),
        ({"window": True}, "window", "an int"),
        ({"keep": 0.0}, "keep", r"in \(0, 1\]"),
        ({"keep": 1.5}, "keep", r"in \(0, 1\]"),
        ({"keep": float("nan")}, "keep", "a number"),
        ({"max_tokens": 4, "sink_tokens": 4}, "max_tokens", "exceed sink_tokens"),
        ({"max_tokens": 10, "window": 3}, "max_tokens", "must equal sink_tokens \\+ window"),
        ({"keep": 0.5, "window": 3}, "keep", "not both"),
        ({}, "window", "needs one of window, max_tokens or keep"),
        ({"sink_tokens": -1, "window": 3}, "sink_tokens", r"in \[0, inf\)"),
        ({"windw": 3}, "windw", "allowed fields: compress_every, evicted, keep, kernel_size, layers, max_tokens, sink_tokens, window"),
    ],
)
def test_bad_fields_name_the_field_and_allowed_values(kwargs, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        TokenReductionConfig(method="streamingllm", **kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_positional_arguments_rejected():
    with pytest.raises(ConfigError, match="keyword arguments only"):
        TokenReductionConfig("streamingllm")


def test_mutation_is_revalidated_by_check():
    cfg = TokenReductionConfig(method="streamingllm", window=8)
    cfg.sink_tokens = -2
    with pytest.raises(ConfigError, match="sink_tokens"):
        cfg.check()


def test_composition_and_conflicts():
    @register_method("test_other_kv")
    @dataclass(kw_only=True)
    class OtherKV(StreamingLLMConfig):
        pass

    combo = compose({"method": "streamingllm", "max_tokens": 32})
    assert combo.get("kv_policy").max_tokens == 32
    assert TokenReductionConfig.from_dict(combo.to_dict()) == combo
    with pytest.raises(ConfigError, match="both act at stage 'kv_policy'"):
        compose({"method": "streamingllm", "max_tokens": 32}, OtherKV(max_tokens=16))
    with pytest.raises(ConfigError, match=r"reducers\[1\]\.window") as err:
        compose({"method": "streamingllm", "max_tokens": 32}, {"method": "streamingllm", "window": -1})
    assert err.value.field == "reducers[1].window"
    with pytest.raises(ConfigError, match="nested"):
        compose(combo)
    with pytest.raises(ConfigError, match="non-empty list"):
        compose()


def test_register_method_rejects_bad_classes():
    with pytest.raises(TypeError, match="stage"):

        @register_method("test_bad_stage")
        @dataclass(kw_only=True)
        class BadStage(TokenReductionConfig):
            stage = "nowhere"

    with pytest.raises(ValueError, match="already registered"):

        @register_method("streamingllm")
        @dataclass(kw_only=True)
        class Clash(TokenReductionConfig):
            stage = "kv_policy"

    @register_method("test_plugin")
    @dataclass(kw_only=True)
    class Plugin(TokenReductionConfig):
        stage = "sequence"
        strength: float = param(0.5, float, low=0.0, high=1.0, help="how hard")

    assert TokenReductionConfig(method="test_plugin", strength=1).strength == 1.0
    assert "test_plugin" in hf_tokred.registered_methods()


def test_presets_all_validate():
    names = hf_tokred.list_presets()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512" in names
    for name in names:
        cfg = TokenReductionConfig.from_pretrained(name)
        assert cfg.method in hf_tokred.registered_methods() or cfg.method == "composed"
        # a preset is named after its first reducer (a composition: "tova-50-kivi2")
        assert name.split("/")[-1].startswith(cfg.iter_reducers()[0].method)
    assert TokenReductionConfig.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512").max_tokens == 512


def test_from_pretrained_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hf_tokred.MissingFileError, match="holds no token_reduction_config.json"):
        TokenReductionConfig.from_pretrained(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON"):
        TokenReductionConfig.from_pretrained(bad)
    bad.write_text(json.dumps(["streamingllm"]))
    with pytest.raises(ConfigError, match="expected a dict"):
        TokenReductionConfig.from_pretrained(bad)
    with pytest.raises(hf_tokred.MissingFileError, match="presets are: .*HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-1024"):
        TokenReductionConfig.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-999")
    with pytest.raises(hf_tokred.MissingFileError, match="not a preset"):
        TokenReductionConfig.from_pretrained("nobody/no-such-repo-hf-tokred", local_files_only=True)


def test_coerce_rejects_other_types():
    with pytest.raises(ConfigError, match="expected a TokenReductionConfig, a dict"):
        TokenReductionConfig.coerce(3)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_keys = st.sampled_from(["method", "keep", "max_tokens", "sink_tokens", "window", "reducers", "hf_tokred_version", "x"])
_methods = st.sampled_from(["streamingllm", "composed", "nope", "", None, 3])


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        _json,
        st.dictionaries(_keys, _json, max_size=5),
        st.builds(lambda m, d: {**d, "method": m}, _methods, st.dictionaries(_keys, _json, max_size=5)),
        st.builds(
            lambda d: {"method": "composed", "reducers": [d]},
            st.dictionaries(_keys, _json | st.integers(-3, 600), max_size=4),
        ),
    )
)
def test_from_dict_fuzz_only_raises_package_errors(data):
    try:
        cfg = TokenReductionConfig.from_dict(data)
    except TokenReductionError:
        return
    # anything accepted must round-trip exactly
    assert TokenReductionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
