"""The ``hf-tokred`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import exit_code

from hf_tokred import embedded
from hf_tokred.cli import DEFAULT_PRESET, _param, format_table, main

SCRIPT = os.path.join(os.path.dirname(sys.executable), "hf-tokred")


def run_script(*args, env=None):
    assert os.path.isfile(SCRIPT), "the hf-tokred console script is not installed (pip install -e .)"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env)


def test_help_shows_commands_and_examples():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for text in ("demo", "methods", "presets", "examples:", "hf-tokred demo --method streamingllm --param"):
        assert text in result.stdout


def test_demo_help(capsys):
    assert exit_code(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--samples" in out and DEFAULT_PRESET in out and "HF_TOKRED_CACHE" in out


def test_methods_lists_streamingllm_with_llama(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("streamingllm "))
    assert "kv_policy" in row and "llama" in row and "2309.17453" in row
    assert "streamingllm: keep, max_tokens, sink_tokens, window" in out


def test_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(DEFAULT_PRESET + " "))
    assert "streamingllm" in row and "max_tokens=512" in row


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["demo", "--samples", "0"],
        ["demo", "--samples", "many"],
        ["demo", "--seed", "x"],
        ["demo", "--param", "max_tokens=64"],  # --param without --method
        ["demo", "--method", "streamingllm", "--param", "max_tokens"],  # no '='
        ["demo", "--method", "streamingllm", "--param", "max_tokens=64", "--param", "max_tokens=32"],
        ["demo", "--method", "streamingllm", "--config", DEFAULT_PRESET],
        ["demo", "--method", "streamingllm", "--param", "max_tokens=64", "--json", "/no/such/folder/out.json"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--method", "streamingllm", "--param", "max_tokens=-5"], "error: max_tokens: expected an int"),
        (["demo", "--method", "streamingllm", "--param", "window=abc"], "error: window: expected an int"),
        (["demo", "--method", "streamingllm", "--param", "colour=3"], "error: colour: not a field of method 'streamingllm'"),
        (["demo", "--method", "no_such_method"], "error: method: unknown method 'no_such_method'"),
    ],
)
def test_rejected_config_exits_1_with_message(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert "Traceback" not in err


def test_rejected_config_from_the_console_script_has_no_traceback():
    result = run_script("demo", "--method", "streamingllm", "--param", "max_tokens=0")
    assert result.returncode == 1
    assert result.stderr.startswith("error: max_tokens:"), result.stderr
    assert "Traceback" not in result.stderr


def test_param_values_are_read_as_json():
    assert _param("max_tokens=512") == ("max_tokens", 512)
    assert _param("keep=0.25") == ("keep", 0.25)
    assert _param("window=null") == ("window", None)
    assert _param("name=text") == ("name", "text")


def test_format_table_aligns():
    assert format_table(["a", "b"], [["xx", "1"]], right={1}).splitlines() == ["a   b", "--  -", "xx  1"]


@pytest.mark.real_model
def test_demo_end_to_end(tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))  # converts once (~20 s)
    out_json = tmp_path_factory.mktemp("out") / "demo.json"
    assert main(["demo", "--samples", "2", "--json", str(out_json), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    for column in ("accuracy", "KV cache", "prefill", "decode"):
        assert column in header
    dense_row = next(line for line in lines if line.startswith("dense "))
    reduced_row = next(line for line in lines if line.startswith("streamingllm-512 "))
    assert "/2)" in dense_row and "/2)" in reduced_row and "MiB" in reduced_row
    assert "2 samples" in out

    record = json.loads(out_json.read_text())
    assert record["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["config"]["method"] == "streamingllm" and record["config"]["max_tokens"] == 512
    dense, reduced = record["dense"], record["reduced"]
    assert dense["samples"] == reduced["samples"] == 2
    assert len(dense["per_sample"]) == 2 and len(dense["correct"]) == 2
    assert 1000 < dense["mean_prompt_tokens"] < 1100
    assert reduced["kv_tokens"] == 512 and dense["kv_tokens"] > 1000
    assert reduced["kv_bytes"] < 0.6 * dense["kv_bytes"]
    assert dense["prefill_s"] > 0 and reduced["decode_s"] > 0
    assert dense["accuracy"] >= 0.5  # the full-cache model finds most keys at ~1k tokens
