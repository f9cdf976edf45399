"""transformers wiring: apply/remove, from_pretrained/save_pretrained, generate, pipelines, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, tiny_llama_config
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM, pipeline

import hf_tokred
from hf_tokred import ConfigError, MissingFileError, TokenReductionCache, TokenReductionConfig, UnsupportedModelError
from hf_tokred.config import param, register_method
from hf_tokred.integration.wiring import get_applied
from hf_tokred.methods.kv.streamingllm import StreamingLLMConfig

STREAM = {"method": "streamingllm", "sink_tokens": 2, "window": 6}


def _ids(batch=1, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (batch, length), generator=g)


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _untouched(model, reference_logits, ids):
    assert get_applied(model) is None
    assert "token_reduction" not in model.config.__dict__
    assert "generate" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, ids), reference_logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_is_bit_identical_without_observers_on_left_padded_batch(attn):
    model = make_tiny_llama(attn_implementation=attn)
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    dense = _logits(model, ids, attention_mask=mask)
    hf_tokred.apply(model, StreamingLLMConfig(max_tokens=1000))
    assert model.config._attn_implementation == f"hf_tokred_{attn}"
    assert torch.equal(_logits(model, ids, attention_mask=mask), dense)
    hf_tokred.remove(model)
    assert model.config._attn_implementation == attn
    assert torch.equal(_logits(model, ids, attention_mask=mask), dense)


def test_mask_registration_matters_for_padding():
    """The padded row must match the row run alone; without the mask entry it would not."""
    model = hf_tokred.apply(make_tiny_llama(), StreamingLLMConfig(max_tokens=1000))
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    batched = _logits(model, ids, attention_mask=mask)
    alone = _logits(model, ids[:1, 4:])
    torch.testing.assert_close(batched[0, 4:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [StreamingLLMConfig(max_tokens=1000), StreamingLLMConfig(keep=1.0)])
def test_zero_reduction_generate_is_bit_identical(config):
    model = make_tiny_llama()
    ids = _ids()
    kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    dense = model.generate(ids, **kwargs)
    hf_tokred.apply(model, config)
    reduced = model.generate(ids, **kwargs)
    assert isinstance(reduced.past_key_values, TokenReductionCache)
    assert torch.equal(reduced.sequences, dense.sequences)
    assert all(torch.equal(a, b) for a, b in zip(reduced.scores, dense.scores))
    hf_tokred.remove(model)
    again = model.generate(ids, **kwargs)
    assert not isinstance(again.past_key_values, TokenReductionCache)
    assert all(torch.equal(a, b) for a, b in zip(again.scores, dense.scores))


def test_generate_builds_a_fresh_cache_per_call_and_build_cache_works(tiny_llama):
    hf_tokred.apply(tiny_llama, STREAM)
    ids = _ids()
    kwargs = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    first = tiny_llama.generate(ids, **kwargs).past_key_values
    second = tiny_llama.generate(ids, **kwargs).past_key_values
    assert isinstance(first, TokenReductionCache) and first is not second
    assert first.stored_lengths() == [8, 8] and first.get_seq_length() == 21  # the last token is never fed back
    explicit = hf_tokred.build_cache(tiny_llama)
    out = tiny_llama.generate(ids, past_key_values=explicit, **kwargs)
    assert out.past_key_values is explicit
    # layers * (k, v) * elements * fp32; 8 slots plus one spare the next step appends into
    assert explicit.kv_bytes() == 2 * 2 * (1 * 2 * 9 * 16) * 4
    dense = tiny_llama.generate(ids, past_key_values=__import__("transformers").DynamicCache(), **kwargs)
    assert dense.past_key_values.get_seq_length() == 21


def test_assisted_decoding_raises_clearly(tiny_llama):
    hf_tokred.apply(tiny_llama, STREAM)
    with pytest.raises(hf_tokred.TokenReductionError, match="assisted decoding"):
        tiny_llama.generate(_ids(), assistant_model=make_tiny_llama(), max_new_tokens=4)


def test_build_cache_errors(tiny_llama):
    with pytest.raises(hf_tokred.TokenReductionError, match="no reduction attached"):
        hf_tokred.build_cache(tiny_llama)
    with pytest.raises(hf_tokred.TokenReductionError, match="apply the reduction first"):
        hf_tokred.build_cache(tiny_llama, STREAM)


@pytest.mark.parametrize("auto", [AutoModelForCausalLM, LlamaForCausalLM, AutoModel])
def test_from_pretrained_kwarg_save_and_reload(tiny_llama_dir, tmp_path, auto):
    ids = _ids()
    cfg = TokenReductionConfig(**STREAM)
    model = auto.from_pretrained(tiny_llama_dir, token_reduction=cfg)
    assert get_applied(model).config == cfg
    assert model.config._attn_implementation == "hf_tokred_sdpa"
    if auto is AutoModel:
        # a base model cannot generate(); it uses the policy through an explicit cache
        cache = hf_tokred.build_cache(model)
        with torch.no_grad():
            model(ids, past_key_values=cache)
            model(ids[:, :1], past_key_values=cache)
        assert cache.stored_lengths() == [8, 8] and cache.get_seq_length() == 13
        return
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    written = json.loads((saved / "config.json").read_text())
    assert written["token_reduction"] == cfg.to_dict()
    assert TokenReductionConfig.from_pretrained(saved) == cfg
    assert not (saved / "token_reduction.safetensors").exists()
    # reload without the kwarg: re-attached, same outputs
    again = auto.from_pretrained(saved)
    assert get_applied(again).config == cfg
    assert torch.equal(again.generate(ids, max_new_tokens=10, do_sample=False), out)
    # override on reload
    other = auto.from_pretrained(saved, token_reduction={"method": "streamingllm", "max_tokens": 20})
    assert get_applied(other).config.max_tokens == 20
    # opt out
    dense = auto.from_pretrained(saved, token_reduction=False)
    assert get_applied(dense) is None and "token_reduction" not in dense.config.to_dict()
    fresh = make_tiny_llama()
    assert torch.equal(_logits(dense, ids), _logits(fresh, ids))


def test_process_without_hf_tokred_loads_dense(tiny_llama_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=STREAM)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    script = textwrap.dedent(
        f"""
        import logging, sys, torch
        import transformers
        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        transformers.logging.set_verbosity_warning()
        records = []
        handler = logging.Handler(); handler.emit = records.append
        transformers.logging.get_logger().addHandler(handler)
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r})
        ref = LlamaForCausalLM.from_pretrained({str(tiny_llama_dir)!r})
        assert "hf_tokred" not in sys.modules
        assert model.config._attn_implementation == "sdpa"
        assert isinstance(model.config.token_reduction, dict)
        ids = torch.arange(3, 15)[None]
        assert torch.equal(model(ids).logits, ref(ids).logits)
        bad = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        assert not bad, bad
        print("clean")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "clean" in result.stdout


def test_malformed_config_json_entry(tiny_llama_dir):
    config_path = tiny_llama_dir / "config.json"
    data = json.loads(config_path.read_text())
    for bad, message in [
        ({"method": "streamingllm", "window": -5}, "window"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ("streamingllm-512", "could not find"),
        ([1, 2], "expected a TokenReductionConfig"),
    ]:
        config_path.write_text(json.dumps({**data, "token_reduction": bad}))
        with pytest.raises((ConfigError, MissingFileError), match=message):
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=False)
        assert get_applied(dense) is None


def test_bad_input_leaves_model_untouched(tiny_llama):
    ids = _ids()
    reference = _logits(tiny_llama, ids)
    for bad, error in [
        ({"method": "nope"}, hf_tokred.UnknownMethodError),
        ({"method": "streamingllm", "window": 0}, ConfigError),
        ("not/a-preset", MissingFileError),
        (12, ConfigError),
    ]:
        with pytest.raises(error):
            hf_tokred.apply(tiny_llama, bad)
        _untouched(tiny_llama, reference, ids)


def test_unsupported_architecture_names_supported_ones():
    from transformers import BloomConfig, BloomForCausalLM

    # Bloom computes its (ALiBi) attention itself instead of calling transformers' attention interface
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"BloomForCausalLM \(model_type 'bloom'\).*attention interface"
                                                    r".*decoder \(LlamaForCausalLM"):
        hf_tokred.apply(model, STREAM)
    assert get_applied(model) is None


def test_kv_policy_on_vit_is_refused():
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64)).eval()
    pixels = torch.randn(1, 3, 16, 16)
    before = vit(pixel_values=pixels).logits
    with pytest.raises(UnsupportedModelError, match="streamingllm acts on decoder models .*vit is an encoder|streamingllm acts on decoder models"):
        hf_tokred.apply(vit, STREAM)
    assert get_applied(vit) is None and vit.config._attn_implementation == "sdpa"
    assert torch.equal(vit(pixel_values=pixels).logits, before)


def test_reapply_replaces_previous_reduction(tiny_llama):
    hf_tokred.apply(tiny_llama, STREAM)
    hf_tokred.apply(tiny_llama, {"method": "streamingllm", "max_tokens": 20})
    assert get_applied(tiny_llama).config.max_tokens == 20
    hf_tokred.remove(tiny_llama)
    assert get_applied(tiny_llama) is None and "generate" not in tiny_llama.__dict__


def test_text_generation_pipeline_with_model_kwargs(tiny_llama_dir):
    make_tiny_tokenizer(tiny_llama_dir)
    generator = pipeline("text-generation", model=str(tiny_llama_dir), model_kwargs={"token_reduction": STREAM})
    assert get_applied(generator.model).config == TokenReductionConfig(**STREAM)
    built = []
    original = TokenReductionCache.__init__

    def spy(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    TokenReductionCache.__init__ = spy
    try:
        text = generator("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10", max_new_tokens=12, do_sample=False)
    finally:
        TokenReductionCache.__init__ = original
    assert text[0]["generated_text"].startswith("w1 w2")
    assert len(built) == 1 and built[0].stored_lengths() == [8, 8]


# --- learned parts: a plugin method registered by the test, through the public API -----------------


@register_method("test_learned_kv")
@dataclass(kw_only=True)
class LearnedKVConfig(StreamingLLMConfig):
    """A KV policy with a learned key scorer; exercises token_reduction.safetensors."""

    learned = True
    hidden: int = param(4, int, low=1, help="scorer width")

    def learned_modules(self, model, adapter):
        head_dim = model.config.head_dim
        return {"key_scorer": torch.nn.Sequential(torch.nn.Linear(head_dim, self.hidden), torch.nn.Linear(self.hidden, 1))}


def test_learned_parts_go_to_the_side_car_and_come_back(tiny_llama_dir, tmp_path):
    cfg = LearnedKVConfig(max_tokens=16)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=cfg)
    with torch.no_grad():
        for p in model.hf_tokred_modules.parameters():
            p.normal_()
    trained = {k: v.clone() for k, v in model.hf_tokred_modules.state_dict().items()}
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    with safe_open(saved / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "hf_tokred" in k]
    with safe_open(saved / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(trained)
    again = AutoModelForCausalLM.from_pretrained(saved)
    for k, v in again.hf_tokred_modules.state_dict().items():
        assert torch.equal(v, trained[k])
    hf_tokred.remove(again)
    assert not hasattr(again, "hf_tokred_modules")
    # a missing side-car is a clear error, and token_reduction=False still loads the dense model
    (saved / "token_reduction.safetensors").unlink()
    with pytest.raises(MissingFileError, match="token_reduction.safetensors is missing"):
        AutoModelForCausalLM.from_pretrained(saved)
    assert get_applied(AutoModelForCausalLM.from_pretrained(saved, token_reduction=False)) is None


def test_missing_side_car_in_apply_leaves_model_untouched(tiny_llama, tmp_path):
    ids = _ids()
    reference = _logits(tiny_llama, ids)
    with pytest.raises(MissingFileError):
        hf_tokred.integration.transformers.apply_to_model(tiny_llama, LearnedKVConfig(max_tokens=16), weights_from=tmp_path)
    _untouched(tiny_llama, reference, ids)


def test_model_tags_are_added_and_removed(tiny_llama):
    hf_tokred.apply(tiny_llama, STREAM)
    assert {"token-reduction", "hf_tokred", "hf_tokred-streamingllm"} <= set(tiny_llama.model_tags)
    hf_tokred.remove(tiny_llama)
    assert not tiny_llama.model_tags


def test_tiny_config_helper_is_llama():
    assert tiny_llama_config().model_type == "llama"


# --- composition on a model: a KV policy plus a reducer of another stage ------------------------------


@register_method("test_decoding_probe")
@dataclass(kw_only=True)
class DecodingProbeConfig(TokenReductionConfig):
    """A stand-in for a second stage (e.g. a drafter), wired through the public wiring registry."""

    stage = "decoding"
    model_kinds = ("decoder",)
    tag: str = param("probe", str, help="label written on the model")


@register_method("test_own_wiring")
@dataclass(kw_only=True)
class OwnWiringProbeConfig(TokenReductionConfig):
    """A sequence reducer attached by a wiring of its own (as MrT5's delete gate is), not the encoders' one."""

    stage = "sequence"
    wiring = "test_own_wiring"
    model_kinds = ("decoder",)


def test_a_method_may_name_its_own_wiring(tiny_llama, monkeypatch):
    from hf_tokred.integration import wiring

    def wire_probe(model, adapter, reducer, applied):
        model.own_wiring_probe = reducer.method
        applied.add_undo(lambda: delattr(model, "own_wiring_probe"))

    monkeypatch.setitem(wiring._WIRING, "test_own_wiring", wire_probe)
    cfg = OwnWiringProbeConfig()
    assert cfg.wiring_key == "test_own_wiring" and TokenReductionConfig(**STREAM).wiring_key == "kv_policy"
    hf_tokred.apply(tiny_llama, cfg)
    assert tiny_llama.own_wiring_probe == "test_own_wiring"
    hf_tokred.remove(tiny_llama)
    assert not hasattr(tiny_llama, "own_wiring_probe")
    # it still acts at its stage: it cannot be composed with another sequence reducer
    with pytest.raises(ConfigError, match="both act at stage 'sequence'"):
        hf_tokred.compose(cfg, {"method": "tome", "r": 2})


def test_composition_attaches_every_part_and_remove_undoes_all(tiny_llama, monkeypatch):
    from hf_tokred.integration import wiring

    def wire_probe(model, adapter, reducer, applied):
        model.decoding_probe = reducer.tag
        applied.add_undo(lambda: delattr(model, "decoding_probe"))

    monkeypatch.setitem(wiring._WIRING, "decoding", wire_probe)  # EAGLE's wiring comes back after the test

    ids = _ids()
    reference = _logits(tiny_llama, ids)
    cfg = hf_tokred.compose(STREAM, DecodingProbeConfig(tag="on"))
    hf_tokred.apply(tiny_llama, cfg)
    assert tiny_llama.decoding_probe == "on"
    out = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.stored_lengths() == [8, 8]
    assert tiny_llama.config.token_reduction == cfg.to_dict()
    hf_tokred.remove(tiny_llama)
    assert not hasattr(tiny_llama, "decoding_probe")
    _untouched(tiny_llama, reference, ids)
    # a part that does not fit the model rejects the whole composition before anything is attached
    with pytest.raises(UnsupportedModelError, match="tome acts on encoder models"):
        hf_tokred.apply(tiny_llama, hf_tokred.compose(STREAM, {"method": "tome", "r": 2}))
    _untouched(tiny_llama, reference, ids)
