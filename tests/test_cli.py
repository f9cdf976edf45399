"""The ``hf-tokred`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import exit_code

from hf_tokred import embedded
from hf_tokred.bench.demo import DEFAULT_RUNS, crossing_length
from hf_tokred.cli import _choices, _fractions, _param, format_table, main

DEFAULT_PRESET = "HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512"

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
    assert "--samples" in out and "--speed-context" in out and "HF_TOKRED_CACHE" in out
    assert all(run.rsplit("/", 1)[-1] in out for run in DEFAULT_RUNS)


def test_methods_lists_streamingllm_with_decoders(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("streamingllm "))
    assert "kv_policy" in row and "decoder: any decoder" in row and row.endswith("arXiv 2309.17453")
    freqts = next(line for line in out.splitlines() if line.startswith("freqts "))
    assert freqts.endswith(" FreqTS (AAAI 2025)")  # no preprint: the venue as written, not "arXiv FreqTS ..."
    assert "streamingllm: keep, max_tokens, sink_tokens, window" in out


def test_methods_shows_the_registry_status_and_the_architectures(capsys):
    import hf_tokred

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for key in ("streamingllm", "minicache", "tova"):
        row = next(line for line in lines if line.startswith(key + " "))
        assert row.split()[-3] == hf_tokred.registered_methods()[key].status, row  # then "arXiv <id>"
    assert next(line for line in lines if line.startswith("minicache ")).split()[-3] == "experimental"
    architectures = "\n".join(lines[lines.index("architectures (the adapters of each model kind, and the model classes "
                                                 "they cover):"):])
    assert "LlamaForCausalLM" in architectures and "ViTForImageClassification" in architectures


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
        ["demo", "--speed-context", "10"],  # 0 skips it; a context needs >= 64 tokens
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


@pytest.mark.parametrize("argv, message", [
    (["prompt-bench", "--rates", "0.5,0"], "expected fractions in (0, 1], got '0'"),
    (["vlm-bench", "--keeps", "1/0"], "expected fractions such as 0.5,0.25 or 1/2,1/4, got '1/0'"),
    (["train", "evo_vit", "--keep-rates", ","], "expected fractions such as"),
    (["vlm-bench", "--methods", "fastv,h2o"], "expected methods among fastv,"),
    (["prompt-bench", "--methods", ""], "expected methods among "),
    (["kv-storage", "--runs", "kivi-2,nope"], "expected runs among "),
])
def test_comma_lists_are_checked_when_parsed(argv, message, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_comma_lists_parse_decimals_ratios_and_names():
    assert _fractions("0.8, 0.6,") == (0.8, 0.6)
    assert _fractions("1/2,1/4,1") == (0.5, 0.25, 1.0)
    assert _choices({"a": 1, "b": 2}, "runs")(" b ,a") == ("b", "a")


def test_format_table_aligns():
    assert format_table(["a", "b"], [["xx", "1"]], right={1}).splitlines() == ["a   b", "--  -", "xx  1"]


def test_where_faster_says_when_the_crossing_is_past_the_context_window():
    from hf_tokred.bench.demo import where_faster

    assert "from about 4913 tokens" in where_faster("tova-50", 4913, 1047, 4096, window=8192)
    assert "between the two lengths" in where_faster("tova-50", 2000, 1047, 4096, window=8192)
    beyond = where_faster("tova-50", 183467, 1047, 4096, window=8192)
    assert beyond.startswith("tova-50: not faster than dense at 1047 or 4096 tokens") and "8192-token" in beyond
    assert "from about 183467 tokens" in where_faster("tova-50", 183467, 1047, 4096)  # window unknown
    assert "at both 1047 and 4096" in where_faster("x", 0, 1047, 4096)
    assert "saves memory" in where_faster("x", None, 1047, 4096)


def test_crossing_length_of_two_lines():
    # dense 40 -> 130 ms/token from 1k to 4k tokens, reduced 50 -> 80: equal at 1.5k
    assert crossing_length((1000, 40.0), (4000, 130.0), (1000, 50.0), (4000, 80.0)) == 1500
    assert crossing_length((1000, 40.0), (4000, 130.0), (1000, 50.0), (4000, 160.0)) is None  # grows faster
    assert crossing_length((1000, 40.0), (1000, 130.0), (1000, 50.0), (4000, 80.0)) is None  # one length only


@pytest.mark.real_model
def test_demo_end_to_end(tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))  # converts once (~20 s)
    out_json = tmp_path_factory.mktemp("out") / "demo.json"
    assert main(["demo", "--samples", "2", "--speed-context", "256", "--json", str(out_json), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    for column in ("accuracy", "KV cache", "prefill", "decode"):
        assert column in header
    labels = [run.rsplit("/", 1)[-1] for run in DEFAULT_RUNS]
    dense_row = next(line for line in lines if line.startswith("dense "))
    reduced_rows = [next(line for line in lines if line.startswith(label + " ")) for label in labels]
    assert "/2)" in dense_row and all("/2)" in row and "MiB" in row for row in reduced_rows)
    assert "2 samples" in out and "Decode speed at 256 tokens" in out
    assert all(any(line.startswith(label + ": ") for line in lines) for label in labels)  # where it gets faster

    record = json.loads(out_json.read_text())
    assert record["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [r["label"] for r in record["runs"]] == labels
    assert record["runs"][0]["config"]["method"] == "tova" and record["runs"][0]["config"]["keep"] == 0.5
    assert [r["method"] for r in record["runs"][1]["config"]["reducers"]] == ["tova", "kivi"]
    dense = record["passkey"]["dense"]
    policy, composed = (record["passkey"][label] for label in labels)
    assert dense["samples"] == policy["samples"] == composed["samples"] == 2
    assert len(dense["per_sample"]) == 2 and len(dense["correct"]) == 2
    assert 1000 < dense["mean_prompt_tokens"] < 1100
    assert dense["kv_tokens"] > 1000 and policy["kv_tokens"] < 0.55 * dense["kv_tokens"]
    assert policy["kv_bytes"] < 0.6 * dense["kv_bytes"] and composed["kv_bytes"] < 0.5 * policy["kv_bytes"]
    assert dense["prefill_s"] > 0 and policy["decode_s"] > 0
    assert dense["accuracy"] >= 0.5  # the full-cache model finds most keys at ~1k tokens
    assert [row["label"] for row in record["speed"]] == ["dense", *labels]
    assert set(record["faster_from"]) == set(labels) and record["context_window"] == 8192


def test_demo_with_one_method(tmp_path, monkeypatch, capsys):
    """--method replaces the default runs (StreamingLLM stays one flag away)."""
    from hf_tokred.bench import demo

    seen = {}

    def fake_run(model, tokenizer, runs, **kwargs):
        seen["runs"], seen["kwargs"] = runs, kwargs
        raise KeyboardInterrupt  # stop before the long runs

    monkeypatch.setattr(demo, "run_demo", fake_run)
    monkeypatch.setattr(embedded, "load_smollm2", lambda: (_tiny_causal_lm(), None))
    assert main(["demo", "--method", "streamingllm", "--param", "max_tokens=512", "--speed-context", "0"]) == 130
    (label, cfg), = seen["runs"]
    assert label == "streamingllm" and cfg.max_tokens == 512 and seen["kwargs"]["speed_context"] == 0


def _tiny_causal_lm():
    from conftest import make_tiny_llama

    return make_tiny_llama()


def test_train_has_one_subcommand_per_trainable_method(capsys):
    from hf_tokred.cli import TRAINABLE, build_parser

    assert exit_code(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TRAINABLE)
    assert {"llmlingua2", "mrt5", "token_pooling", "token_dropping", "tokenskip"} <= set(TRAINABLE)
    assert build_parser().parse_args(["train", "llmlingua2", "--rate", "0.4"]).rate == 0.4
    assert exit_code(["train"]) == 2  # a method is required
    assert exit_code(["train", "no_such_method"]) == 2


def test_a_recipe_corpus_that_cannot_be_read_is_a_clear_error(tmp_path):
    from hf_tokred.errors import MissingFileError
    from hf_tokred.training import read_paragraphs

    (tmp_path / "docs.txt").write_text("first paragraph\nstill first\n\n\nsecond\n\n", encoding="utf-8")
    assert read_paragraphs(str(tmp_path / "docs.txt")) == ["first paragraph\nstill first", "second"]
    with pytest.raises(MissingFileError, match="--corpus: cannot read .*missing.txt"):
        read_paragraphs(str(tmp_path / "missing.txt"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MissingFileError, match="--corpus"):
        read_paragraphs(str(tmp_path / "binary.txt"))
