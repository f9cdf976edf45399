"""The KV-policy evaluation harness (``hf-tokred kv``): prompts, protocols, measurements, CLI."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from conftest import exit_code

import hf_tokred
from hf_tokred.bench import kv, longctx, passkey
from hf_tokred.bench.common import run_prompts, tokenize_parts
from hf_tokred.cli import main
from hf_tokred.errors import ConfigError, MissingDependencyError


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama over SmolLM2's tokenizer (what ``--model tiny`` loads)."""
    model, tokenizer, _ = kv.load_model("tiny")
    return model, tokenizer


# -- configs and settings ---------------------------------------------------------------------


def test_params_apply_to_every_policy_or_to_the_named_one():
    assert kv.make_config("streamingllm", 0.5, [("sink_tokens", 8)]).sink_tokens == 8
    assert kv.make_config("streamingllm", 0.5, [("h2o.sink_tokens", 8)]).sink_tokens == 4
    assert kv.make_config("streamingllm", 0.25, [("streamingllm.sink_tokens", 2)]).sink_tokens == 2
    assert kv.make_config("streamingllm", 0.25, []).keep == 0.25


@pytest.mark.parametrize(
    "policy, params, field",
    [
        ("no_such_policy", [], "policy"),
        ("tome", [], "policy"),  # a registered method, but not a KV policy
        ("streamingllm", [("keep", 0.3)], "keep"),
        ("streamingllm", [("method", "tova")], "method"),
        ("streamingllm", [("sink_tokens", -1)], "sink_tokens"),
    ],
)
def test_bad_configs_name_the_field(policy, params, field):
    with pytest.raises(ConfigError) as err:
        kv.make_config(policy, 0.5, params)
    assert err.value.field == field


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(tasks=("passkey", "nonsense")), "task"),
        (dict(modes=("sideways",)), "mode"),
        (dict(keeps=(0.0,)), "keep"),
        (dict(keeps=(1.5,)), "keep"),
        (dict(depths=(1.2,)), "depth"),
        (dict(params=(("snapkv.window", 4),)), "param"),  # names a policy that is not selected
        (dict(context_length=8), "context_length"),
    ],
)
def test_check_settings_rejects_bad_choices(changes, field):
    with pytest.raises(ConfigError) as err:
        kv.check_settings(kv.KVBenchSettings(policies=("streamingllm",), **changes))
    assert err.value.field == field


def test_default_policies_are_every_training_free_kv_policy():
    settings = kv.check_settings(kv.KVBenchSettings(keeps=(0.5,)))
    expected = sorted(k for k, c in hf_tokred.registered_methods().items() if c.stage == "kv_policy" and not c.learned)
    assert list(settings.policies) == expected and "streamingllm" in expected and "dcp" not in expected
    assert set(settings.configs) == {(p, 0.5) for p in expected}


def test_winners_pick_the_best_policy_with_ties_and_lower_perplexity():
    rows = [
        dict(task="passkey", mode="aware", policy="dense", keep=None, metric="accuracy", value=0.9),
        dict(task="passkey", mode="aware", policy="a", keep=0.5, metric="accuracy", value=0.8),
        dict(task="passkey", mode="aware", policy="b", keep=0.5, metric="accuracy", value=0.8),
        dict(task="passkey", mode="aware", policy="c", keep=0.5, metric="accuracy", value=0.4),
        dict(task="ppl", mode="agnostic", policy="dense", keep=None, metric="ppl", value=10.0),
        dict(task="ppl", mode="agnostic", policy="a", keep=0.5, metric="ppl", value=12.0),
        dict(task="ppl", mode="agnostic", policy="c", keep=0.5, metric="ppl", value=11.0),
    ]
    best = {(w["task"], w["keep"]): w for w in kv.winners(rows)}
    assert best[("passkey", 0.5)]["policies"] == ["a", "b"] and best[("passkey", 0.5)]["dense"] == 0.9
    assert best[("ppl", 0.5)]["policies"] == ["c"] and best[("ppl", 0.5)]["best"] == 11.0
    text = kv.format_winners(kv.winners(rows))
    assert "a, b 0.80" in text and "c 11.00" in text


# -- prompts ----------------------------------------------------------------------------------


def test_insert_at_depth_uses_sentence_boundaries():
    text = "One. Two. Three."
    assert longctx.insert_at_depth(text, "X.", 0.0) == "X. One. Two. Three."
    assert longctx.insert_at_depth(text, "X.", 0.5) == "One. Two. X. Three."
    assert longctx.insert_at_depth(text, "X.", 1.0) == "One. Two. Three. X."


def test_tokenize_parts_splits_the_whole_prompt(tiny):
    _, tokenizer = tiny
    context, query = "Some documentation text. It ends here.", "\nWhat is it?<|im_end|>\nThe answer is"
    ids, n_context = tokenize_parts(tokenizer, context, query)
    assert ids[0].tolist() == tokenizer(context + query, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids[0, :n_context]) == context
    assert tokenizer.decode(ids[0, n_context:]) == query


def test_needle_prompts_hide_the_fact_at_each_depth(tiny):
    _, tokenizer = tiny
    prompts = longctx.needle_prompts(tokenizer, 5, seed=3, context_length=300)
    assert [p.meta["depth"] for p in prompts] == [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = []
    for p in prompts:
        assert abs(p.prompt_tokens - 300) <= 8
        context = tokenizer.decode(p.ids[0, :p.context_tokens])
        query = tokenizer.decode(p.ids[0, p.context_tokens:])
        sentence = longctx.NEEDLE_SENTENCE.format(city=p.meta["city"], number=p.meta["number"])
        assert p.expected == str(p.meta["number"]) and context.count(sentence) == 1
        assert f"What is the special magic number for {p.meta['city']}?" in query
        assert query.endswith(f"The special magic number for {p.meta['city']} is") and p.expected not in query
        haystack_start = context.index(longctx.NEEDLE_INSTRUCTION) + len(longctx.NEEDLE_INSTRUCTION)
        positions.append((context.index(sentence) - haystack_start) / (len(context) - haystack_start))
    assert positions == sorted(positions) and positions[0] < 0.05 and positions[-1] > 0.9
    again = longctx.needle_prompts(tokenizer, 5, seed=3, context_length=300)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(prompts, again))


def test_multikey_prompts_ask_for_one_of_several_keys(tiny):
    _, tokenizer = tiny
    (prompt,) = longctx.multikey_prompts(tokenizer, 1, seed=1, context_length=400, keys=4)
    context = tokenizer.decode(prompt.ids[0, :prompt.context_tokens])
    meta = prompt.meta
    assert len(set(meta["cities"])) == 4 and meta["asked"] in meta["cities"]
    for city, number in zip(meta["cities"], meta["numbers"]):
        assert longctx.NEEDLE_SENTENCE.format(city=city, number=number) in context
    assert prompt.expected == str(meta["numbers"][meta["cities"].index(meta["asked"])])


def test_passkey_task_is_the_issue_task(tiny):
    _, tokenizer = tiny
    prompts = kv.task_prompts(tokenizer, "passkey", kv.KVBenchSettings(samples=20))
    rng = random.Random(0)
    for prompt in prompts:
        key = rng.randint(10000, 99999)
        depth = rng.random()
        assert prompt.expected == str(key) and prompt.meta["depth"] == depth and prompt.max_new_tokens == 8
    text = tokenizer.decode(prompts[0].ids[0])
    assert text.count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.") == 40
    assert text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    assert tokenizer.decode(prompts[0].ids[0, prompts[0].context_tokens:]).startswith("\nWhat is the pass key?")


# -- protocols and measurements ---------------------------------------------------------------


def test_dense_perplexity_equals_one_full_forward(tiny):
    model, tokenizer = tiny
    (sequence,) = longctx.ppl_sequences(tokenizer, 1, seed=0, length=100)
    result = kv.run_perplexity(model, [sequence], context_tokens=60, chunk=7, warmup=False)
    with torch.no_grad():
        logits = model(sequence).logits.float()
    # continuation tokens 61..99 are scored, each from the logits one position before
    reference = torch.nn.functional.cross_entropy(logits[0, 60:-1], sequence[0, 61:])
    assert result["per_sample"][0]["scored_tokens"] == 39
    assert math.isclose(result["nll"], float(reference), rel_tol=1e-4)
    assert math.isclose(result["ppl"], math.exp(float(reference)), rel_tol=1e-4)


def test_perplexity_through_a_policy_cache(tiny):
    model, tokenizer = tiny
    sequences = longctx.ppl_sequences(tokenizer, 2, seed=0, length=96)
    dense = kv.run_perplexity(model, sequences, context_tokens=64, chunk=8)
    full = kv.run_perplexity(model, sequences, context_tokens=64, chunk=8, config=kv.make_config("streamingllm", 1.0))
    half = kv.run_perplexity(model, sequences, context_tokens=64, chunk=8, config=kv.make_config("streamingllm", 0.5))
    assert full["ppl"] == dense["ppl"]  # keep=1.0 is the dense cache
    assert half["ppl"] != dense["ppl"]
    assert half["kv_tokens"] == 32 and dense["kv_tokens"] == 96
    assert hf_tokred.integration.wiring.get_applied(model) is None  # removed after the run


@pytest.mark.parametrize("mode", ["aware", "agnostic"])
def test_generation_runs_measure_the_cache(tiny, mode):
    model, tokenizer = tiny
    prompts = kv.task_prompts(tokenizer, "needle", kv.KVBenchSettings(samples=1, context_length=96))
    dense = run_prompts(model, tokenizer, prompts, mode=mode, progress=False)
    full = run_prompts(model, tokenizer, prompts, mode=mode, progress=False, config=kv.make_config("streamingllm", 1.0))
    half = run_prompts(model, tokenizer, prompts, mode=mode, progress=False, config=kv.make_config("streamingllm", 0.5))
    assert [r["answer"] for r in full["per_sample"]] == [r["answer"] for r in dense["per_sample"]]
    layers, kv_heads, head_dim = 2, 2, 16
    for prompt, record in zip(prompts, half["per_sample"]):
        # the budget is half of what the first (prefill) call saw: the prompt, or the context alone
        seen = prompt.prompt_tokens if mode == "aware" else prompt.context_tokens
        assert record["kv_tokens"] == math.ceil(0.5 * seen)
        slot_bytes = layers * 2 * kv_heads * head_dim * 4
        # resident storage may keep spare capacity: at most the slots appended before an eviction (the
        # question in agnostic mode) plus one
        budget = math.ceil(0.5 * seen)
        assert budget * slot_bytes <= record["kv_bytes"] <= (budget + prompt.prompt_tokens - seen + 1) * slot_bytes
        assert record["generated_tokens"] == longctx.NEEDLE_MAX_NEW_TOKENS
    for record in dense["per_sample"]:
        assert record["kv_tokens"] == record["prompt_tokens"] + record["generated_tokens"] - 1
    assert half["kv_bytes"] < 0.6 * dense["kv_bytes"]
    assert dense["prefill_tokens_per_s"] > 0 and dense["decode_tokens_per_s"] > 0


def test_speed_interleaves_and_compares_with_dense(tiny):
    model, tokenizer = tiny
    rows = kv.run_speed(model, tokenizer, [kv.make_config("streamingllm", 0.25)], context_length=64,
                        decode_tokens=4, repeats=2)
    dense, policy = rows
    assert dense["method"] == "dense" and policy["method"] == "streamingllm"
    assert len(dense["repeats_prefill_s"]) == len(policy["repeats_decode_s"]) == 2
    assert dense["decode_tokens"] == policy["decode_tokens"] == 3
    assert dense["kv_tokens"] == 64 + 3 and policy["kv_tokens"] == 16
    assert dense["decode_speedup"] == 1.0 and dense["prefill_overhead"] == 0.0
    assert 16 / 67 <= policy["kv_ratio"] <= 17 / 67  # resident storage may hold one spare slot
    assert policy["decode_speedup"] > 0 and "decode vs dense" in kv.format_speed(rows)


# -- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["kv", "--keep", "0"],
        ["kv", "--keep", "1.5"],
        ["kv", "--keep", "half"],
        ["kv", "--task", "nonsense"],
        ["kv", "--mode", "sideways"],
        ["kv", "--depth", "2"],
        ["kv", "--samples", "0"],
        ["kv", "--param", "window"],
        ["kv", "--json", "/no/such/folder/out.json"],
        ["kv", "--plot", "/no/such/folder/out.png"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["kv", "--policy", "no_such_policy"], "error: policy: 'no_such_policy' is not a KV policy"),
        (["kv", "--policy", "streamingllm", "--param", "colour=3"], "error: colour: not a field"),
        (["kv", "--policy", "streamingllm", "--param", "snapkv.window=3"], "error: param: 'snapkv.window' names"),
    ],
)
def test_rejected_choices_exit_1_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(kv, "load_model", lambda name: pytest.fail("loaded a model for a bad request"))
    assert exit_code(argv) == 1
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(kv, "load_model", lambda name: pytest.fail("loaded a model"))
    assert exit_code(["kv", "--policy", "streamingllm", "--plot", str(tmp_path / "p.png")]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err
    with pytest.raises(MissingDependencyError):
        kv.write_plot({"rows": []}, str(tmp_path / "p.png"))


def test_cli_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out_json, out_png = tmp_path / "kv.json", tmp_path / "kv.png"
    argv = ["kv", "--model", "tiny", "--policy", "streamingllm", "--keep", "0.5", "--keep", "0.25", "--samples", "1",
            "--task", "needle", "--task", "multikey", "--task", "ppl", "--task", "speed", "--context-length", "96",
            "--ppl-tokens", "16", "--ppl-chunk", "8", "--speed-context", "64", "--decode-tokens", "3", "--repeats",
            "1", "--param", "sink_tokens=2", "--json", str(out_json), "--plot", str(out_png), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("acc/ppl", "KV cache", "vs dense", "prefill tok/s", "decode tok/s", "Which policy wins where",
                 "Wins per policy", "prefill vs dense", "decode vs dense"):
        assert text in out
    record = json.loads(out_json.read_text())
    rows = record["rows"]
    combos = {(r["task"], r["mode"], r["policy"], r["keep"]) for r in rows}
    for task in ("needle", "multikey"):
        for mode in ("aware", "agnostic"):
            assert {(task, mode, "dense", None), (task, mode, "streamingllm", 0.5),
                    (task, mode, "streamingllm", 0.25)} <= combos
    assert {(r["mode"], r["keep"]) for r in rows if r["task"] == "ppl"} == {("agnostic", None), ("agnostic", 0.5),
                                                                             ("agnostic", 0.25)}
    assert len(rows) == 2 * 2 * 3 + 3
    dense_tokens = {(r["task"], r["mode"]): r["kv_tokens"] for r in rows if r["policy"] == "dense"}
    for r in rows:
        assert r["samples"] == 1 and r["kv_bytes"] > 0
        if r["policy"] == "dense":
            assert r["kv_ratio"] == 1.0
            continue
        assert r["result"]["config"]["sink_tokens"] == 2
        assert r["kv_tokens"] < dense_tokens[(r["task"], r["mode"])] and r["kv_ratio"] < 1.0
        if r["mode"] == "aware":
            assert r["kv_ratio"] <= r["keep"] + 0.06
    assert [s["method"] for s in record["speed"]] == ["dense", "streamingllm", "streamingllm"]
    assert len(record["winners"]) == (2 * 2 + 1) * 2  # (2 tasks x 2 modes, and ppl) x 2 keeps
    assert record["model"] == "tiny-random-llama" and record["command"].startswith("hf-tokred kv --model tiny")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the real model ------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_smollm2_passkey_both_modes():
    from hf_tokred.embedded import load_smollm2

    model, tokenizer = load_smollm2()
    settings = kv.KVBenchSettings(tasks=("passkey",), policies=("streamingllm",), keeps=(0.5,), samples=1,
                                  progress=False)
    record = kv.run_benchmark(model, tokenizer, settings)
    rows = {(r["mode"], r["policy"]): r for r in record["rows"]}
    for mode in ("aware", "agnostic"):
        dense, policy = rows[(mode, "dense")], rows[(mode, "streamingllm")]
        assert dense["value"] == 1.0  # sample 0 (key 60494) is found with the full cache
        assert 1040 < dense["prompt_tokens"] < 1060
        assert dense["result"]["per_sample"][0]["answer"].strip().startswith("60494")
        assert 0.45 < policy["kv_ratio"] < 0.55
    assert "passkey" in kv.format_results(record)


def test_model_path_and_passkey_filler(tiny, tmp_path, capsys):
    """``--model PATH`` measures a user's own checkpoint; a tokenizer without a chat template (a base
    model) gets the plain prompt layout, led by its BOS token."""
    model, tokenizer = tiny
    folder = tmp_path / "my-checkpoint"
    model.save_pretrained(folder)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None  # as a base model's tokenizer
    plain.save_pretrained(folder)
    argv = ["kv", "--model", str(folder), "--task", "passkey", "--policy", "streamingllm", "--keep", "0.5",
            "--samples", "1", "--passkey-filler", "6", "--mode", "aware", "--json", str(tmp_path / "r.json"),
            "--no-progress"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["model"] == "my-checkpoint" and record["settings"]["passkey_filler"] == 6
    dense = next(r for r in record["rows"] if r["policy"] == "dense")
    assert 150 < dense["prompt_tokens"] < 250  # 6 filler repeats, not the default 40
    context, query = passkey.build_prompt_parts(plain, passkey.PasskeySample(key=12345, depth=0.5, filler_repeats=6))
    assert query == "\nWhat is the pass key?\nThe pass key is" and "<|im_start|>" not in context
    assert exit_code(["kv", "--model", str(tmp_path / "missing"), "--policy", "streamingllm"]) == 1


def test_digits_answer_restricts_generation_to_digit_tokens(tiny):
    """--answer digits: a base model that drifts into prose is scored on the number it retrieves."""
    from hf_tokred.bench.common import digit_token_ids

    model, tokenizer = tiny
    digits = digit_token_ids(tokenizer)
    assert {tokenizer.decode([i]) for i in digits} >= set("0123456789")
    assert all(tokenizer.decode([i]).strip().isdigit() for i in digits)
    prompts = kv.task_prompts(tokenizer, "passkey", kv.KVBenchSettings(samples=1, passkey_filler=3))
    free = run_prompts(model, tokenizer, prompts, progress=False)
    constrained = run_prompts(model, tokenizer, prompts, progress=False, answer="digits")
    assert constrained["per_sample"][0]["answer"].replace(" ", "").isdigit()
    assert not free["per_sample"][0]["answer"].replace(" ", "").isdigit()  # a random model writes anything
    with pytest.raises(ConfigError, match="answer"):
        kv.check_settings(kv.KVBenchSettings(answer="letters"))
