"""What the documentation says agrees with the code: the methods table of docs/methods.md is the one generated
from the registry, every method's status is declared, validated and explained, and the errors of methods that
need something first (kvquant's calibration, fastgen's token ids) say what to do."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_tiny_llama, make_tiny_tokenizer

import hf_tokred
from hf_tokred.config import _REGISTRY, STATUSES, TokenReductionConfig, register_method
from hf_tokred.docs_table import END, START, methods_markdown, render_doc

METHODS_DOC = Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def _package_methods() -> dict[str, type]:
    """The methods hf_tokred itself registers (other tests register plugin methods in this process)."""
    return {k: c for k, c in hf_tokred.registered_methods().items() if c.__module__.startswith("hf_tokred.")}


# ---------------------------------------------------------------------------------------------
# docs/methods.md
# ---------------------------------------------------------------------------------------------


def test_methods_table_in_docs_is_the_generated_one():
    # A fresh interpreter: the registry of this one also holds the test suite's plugin methods.
    result = subprocess.run([sys.executable, "-m", "hf_tokred.docs_table", "--check", str(METHODS_DOC)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"docs/methods.md's methods table differs from the registry; regenerate it with "
        f"`python -m hf_tokred.docs_table`\n{result.stderr[-2000:]}"
    )


def test_render_doc_replaces_only_the_block_between_the_markers():
    doc = f"# Methods\nprose before\n{START}\n| stale | table |\n{END}\nprose after\n"
    new = render_doc(doc)
    assert new.startswith(f"# Methods\nprose before\n{START}\n") and new.endswith(f"{END}\nprose after\n")
    assert "| stale | table |" not in new and methods_markdown() in new
    assert render_doc(new) == new
    with pytest.raises(ValueError, match="marker"):
        render_doc("no markers here\n")


def test_generated_table_rows_are_the_registry():
    text = methods_markdown()
    for key, cls in _package_methods().items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[5] == cls.status, key
        assert cells[3].startswith(cls.stage), key
        assert (cls.paper or "—") in cells[2], key
    for status, meaning in STATUSES.items():
        assert f"- **{status}**: {meaning}." in text


def test_cli_markdown_prints_the_generated_table(capsys):
    from hf_tokred.cli import main

    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out == methods_markdown()


def test_every_method_has_a_status_line_with_its_registry_status():
    text = METHODS_DOC.read_text(encoding="utf-8")
    section = text[text.index("## Why each status"):]
    section = section[: section.index("\n## ", 1)]
    documented: dict[str, str] = {}
    for keys, status in re.findall(r"^- ((?:`\w+`(?:, )?)+) — \*\*(\w+)\*\*:", section, re.M):
        for key in re.findall(r"`(\w+)`", keys):
            assert key not in documented, f"{key} has two status lines"
            documented[key] = status
    expected = {key: cls.status for key, cls in _package_methods().items()}
    assert documented == expected


# ---------------------------------------------------------------------------------------------
# status: declared by every method, validated by register_method
# ---------------------------------------------------------------------------------------------


def test_every_package_method_declares_its_status():
    for key, cls in _package_methods().items():
        declared = [base for base in cls.__mro__ if base is not TokenReductionConfig and "status" in vars(base)]
        assert declared, f"{key} declares no status (it would be registered as 'experimental')"
        assert cls.status in STATUSES


def test_kv_statuses_follow_the_evidence():
    methods = hf_tokred.registered_methods()
    assert methods["streamingllm"].status == methods["kivi"].status == "stable"
    for key in ("h2o", "scissorhands", "tova", "snapkv", "pyramidkv", "fastgen", "keydiff", "kvquant"):
        assert methods[key].status == "beta", key
    assert methods["minicache"].status == "experimental"


def _register(key: str, **attrs):
    cls = dataclass(kw_only=True)(type("ProbeConfig", (TokenReductionConfig,), {"stage": "kv_policy", **attrs}))
    try:
        return register_method(key)(cls)
    finally:
        _REGISTRY.pop(key, None)  # keep the registry (and so `hf-tokred methods`) as the package's


def test_register_method_validates_the_status():
    assert _register("test_docs_undeclared").status == "experimental"  # never the base class's "stable"
    assert _register("test_docs_beta", status="beta").status == "beta"
    with pytest.raises(TypeError, match=r"status must be one of 'stable', 'beta', 'experimental', got 'production'"):
        _register("test_docs_bad", status="production")
    assert "test_docs_bad" not in hf_tokred.registered_methods()


# ---------------------------------------------------------------------------------------------
# Errors point to the fix: kvquant's calibration, fastgen's token ids
# ---------------------------------------------------------------------------------------------


WORDS = " ".join(f"w{i % 120 + 3}" for i in range(96))


def test_calibrate_is_public_and_uncalibrated_kvquant_names_it():
    assert "calibrate" in hf_tokred.__all__ and hf_tokred.calibrate.__doc__
    model = hf_tokred.apply(make_tiny_llama(), {"method": "kvquant", "bits": 3})
    with pytest.raises(hf_tokred.TokenReductionError, match=re.escape("run hf_tokred.calibrate(model, texts)")):
        hf_tokred.build_cache(model)


def test_calibrate_reads_the_tokenizer_in_the_model_folder(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path)
    make_tiny_tokenizer(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path, token_reduction={"method": "kvquant", "bits": 3})
    calibration = hf_tokred.calibrate(model, [WORDS])  # no tokenizer: the folder's
    assert int(calibration.calibrated) == 1
    hf_tokred.build_cache(model)  # no longer refused


def test_calibrate_takes_token_ids_and_finds_kvquant_in_a_composition():
    import torch

    model = hf_tokred.apply(make_tiny_llama(), hf_tokred.compose({"method": "snapkv", "keep": 0.5},
                                                                 {"method": "kvquant", "bits": 2}))
    ids = torch.arange(3, 99)
    hf_tokred.calibrate(model, [ids.tolist(), ids[None]])
    out = model.generate(ids[None, :40], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 44)


def test_calibrate_errors_name_what_is_missing():
    with pytest.raises(hf_tokred.TokenReductionError, match="carries no reduction.*attach one first"):
        hf_tokred.calibrate(make_tiny_llama(), [WORDS], make_tiny_tokenizer())
    streaming = hf_tokred.apply(make_tiny_llama(), {"method": "streamingllm", "max_tokens": 16})
    with pytest.raises(hf_tokred.TokenReductionError, match="carries 'streamingllm'"):
        hf_tokred.calibrate(streaming, [WORDS], make_tiny_tokenizer())
    model = hf_tokred.apply(make_tiny_llama(), {"method": "kvquant"})  # built in memory: no folder, no tokenizer
    with pytest.raises(hf_tokred.ConfigError, match="^tokenizer: ") as info:
        hf_tokred.calibrate(model, [WORDS])
    assert info.value.field == "tokenizer"
    with pytest.raises(hf_tokred.ConfigError, match="^texts: ") as info:
        hf_tokred.calibrate(model, [], make_tiny_tokenizer())
    assert info.value.field == "texts"


def test_fastgen_error_names_the_fields_and_the_tokenizer_folder():
    model = hf_tokred.apply(make_tiny_llama(), {"method": "fastgen", "keep": 0.5})
    with pytest.raises(hf_tokred.TokenReductionError) as info:
        hf_tokred.build_cache(model)
    message = str(info.value)
    for text in ("special_token_ids", "punctuation_token_ids", "tokenizer.save_pretrained(folder)",
                 "token_ids_from_tokenizer(tokenizer)", "model folder"):
        assert text in message, text
