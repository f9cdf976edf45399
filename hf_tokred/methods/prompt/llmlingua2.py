"""LLMLingua-2: task-agnostic prompt compression by token classification (Pan et al., ACL 2024 Findings,
arXiv 2403.12968).

The paper distils an LLM's extractive compressions (GPT-4 on MeetingBank) into a bidirectional encoder
with a two-label token-classification head (XLM-RoBERTa-large or multilingual BERT); label 1 is "keep".
To compress, every token gets ``p(keep)``, a word's probability is the mean over its tokens (the
reference code's ``token_to_word="mean"``; ``"first"`` is its other option), and the most probable words
are kept, in their original order, until the requested rate is met — so the result is always a
subsequence of the prompt. Texts longer than the encoder's window (512 tokens) are cut into chunks,
which are classified in batches.

The classifier is any ``*ForTokenClassification`` model with two labels and a fast tokenizer: Microsoft's
published checkpoints (``microsoft/llmlingua-2-xlm-roberta-large-meetingbank``,
``microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank``: ``XLMRobertaForTokenClassification`` /
``BertForTokenClassification``) from a local folder, or one trained on your own texts with
:func:`hf_tokred.training.train_llmlingua2` (labels from this package's ``llmlingua``). Nothing is
downloaded; safetensors weights only. A folder is loaded once per process. The keep label is the one
``config.id2label`` names ``keep`` (or ``preserve``/``retain``), else label 1, as in the published
checkpoints (whose labels are ``LABEL_0``/``LABEL_1`` and whose reference code reads ``probs[..., 1]``).

LLMLingua-2 has no question conditioning and no dynamic ratio (the reference code ignores those
arguments): the question and the instruction are kept verbatim, like the other methods' protected spans,
and the documents are classified on their own. No causal-LM scorer is loaded.

Where we depart from the paper:

* **selection**: the paper keeps words whose ``p(keep)`` exceeds a percentile threshold at the requested
  rate (the reference code weights each word by its tiktoken GPT-3.5 length and thresholds each 512-token
  chunk on its own); we rank every unprotected word of every document by ``p(keep)`` in one global ranking
  and settle the count on the *target* tokenizer (default the classifier's; pass ``target_tokenizer=``
  for the LLM you prompt), which is the same rule — the top words by ``p(keep)`` up to the rate — with
  the budget held within 2% and without tiktoken;
* **words** are the package's units (a word with the whitespace before it), so punctuation attached to a
  word shares its fate; the reference code's words are the classifier tokenizer's (``▁``/``##`` pieces),
  where a BERT tokenizer makes ``.`` a word of its own;
* **chunks** end at a sentence end (``.!?;:`` or a line break) in their second half or, failing that, at a word
  boundary, never inside a word; the reference code cuts at ``.``/``\\n`` tokens;
* ``force_tokens``, ``keep_digits`` (the reference code's ``force_reserve_digit``) and ``<keep>`` regions
  are protected by the shared base class rather than by mapping force tokens to new special tokens of
  the classifier; ``drop_consecutive`` is not offered;
* the optional document-level filter (``context_filter``, the reference code's
  ``use_context_level_filter``: documents ranked by their mean word ``p(keep)``) keeps documents until
  they hold ``granularity`` times the remaining budget, as the other methods' coarse stage does, rather
  than at a percentile of the documents.

Example:
    >>> import hf_tokred
    >>> out = hf_tokred.compress_prompt(["A long document ...", "Another one ..."], question="Why?",
    ...                                 method="llmlingua2", classifier="llmlingua2-folder",
    ...                                 rate=0.33)                                         # doctest: +SKIP
    >>> out["compressed_prompt"].endswith("Why?")                                          # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...config import param, register_method
from ...errors import ConfigError, MissingFileError
from ...prompt.base import PromptCompressorConfig, PromptJob, Scorer, _check_tokenizer, pad_batch, saved_tokenizer

KEEP_NAMES = ("keep", "preserve", "preserved", "retain")
# Where a chunk may end: after one of these characters (a sentence end) or before a line break.
_SENTENCE_END = ".!?;:"


def classifier_help() -> str:
    """How to provide an LLMLingua-2 classifier (used in error messages).

    Example:
        >>> from hf_tokred.methods.prompt.llmlingua2 import classifier_help
        >>> "train_llmlingua2" in classifier_help()
        True
    """
    return ("pass classifier= a local folder holding a two-label token classifier with safetensors weights and a "
            "fast tokenizer (e.g. microsoft/llmlingua-2-xlm-roberta-large-meetingbank, fetched beforehand with "
            "`huggingface-cli download microsoft/llmlingua-2-xlm-roberta-large-meetingbank --local-dir DIR`), or a "
            "loaded *ForTokenClassification model with tokenizer=, or train one on your own texts with "
            "hf_tokred.training.train_llmlingua2(texts, output_dir=DIR); nothing is downloaded")


@dataclass
class Classifier(Scorer):
    """A two-label token classifier and its fast tokenizer, with what chunking and scoring need.

    ``keep_index`` is the label meaning "keep"; ``max_tokens`` the text tokens one chunk holds (the window
    less the special tokens the tokenizer adds), ``before``/``after`` those special token ids.
    """

    keep_index: int = 1
    max_tokens: int = 510
    before: list = field(default_factory=list)
    after: list = field(default_factory=list)


_CLASSIFIERS: dict[str, Classifier] = {}
_CLASSIFIERS_LOCK = threading.Lock()


def _position_limit(model) -> int | None:
    """Longest input the model's position embeddings take (RoBERTa-style ones reserve padding_idx + 1 slots)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    padding = getattr(positions, "padding_idx", None)
    return limit - padding - 1 if isinstance(padding, int) else limit


def _keep_index(config) -> int:
    names = {int(k): str(v).strip().lower() for k, v in (getattr(config, "id2label", None) or {}).items()}
    for index, name in names.items():
        if name in KEEP_NAMES:
            return index
    return 1


def check_classifier(model, tokenizer, window: int = 512) -> Classifier:
    """Check that ``model`` is a two-label token classifier with a fast ``tokenizer`` and wrap them.

    Raises :class:`~hf_tokred.errors.ConfigError` naming ``classifier`` (not a ``*ForTokenClassification``
    model, ``num_labels != 2``) or ``tokenizer`` (missing, slow, or larger than the model's vocabulary).

    Example:
        >>> from hf_tokred.methods.prompt.llmlingua2 import check_classifier
        >>> clf = check_classifier(model, tokenizer)                                      # doctest: +SKIP
        >>> clf.keep_index, clf.max_tokens                                                # doctest: +SKIP
        (1, 510)
    """
    name = type(model).__name__
    if not isinstance(model, torch.nn.Module) or not name.endswith("ForTokenClassification"):
        raise ConfigError(f"classifier: expected a token-classification model (XLMRobertaForTokenClassification, "
                          f"BertForTokenClassification, ...), got {name}; " + classifier_help(), field="classifier")
    labels = getattr(model.config, "num_labels", None)
    if labels != 2:
        raise ConfigError(f"classifier: LLMLingua-2 needs two labels (drop, keep), {name} has num_labels={labels}",
                          field="classifier")
    _check_tokenizer(model, tokenizer, role="classifier")
    limits = [window]
    position = _position_limit(model)
    if position is not None:
        limits.append(position)
    if isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length < 1 << 20:
        limits.append(tokenizer.model_max_length)
    # the special tokens the tokenizer puts around one text ([CLS] ... [SEP], <s> ... </s>)
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
    before, after = list(full[:at]), list(full[at + len(bare):])
    max_tokens = min(limits) - len(before) - len(after)
    if max_tokens < 1:
        raise ConfigError(f"window: {min(limits)} tokens leave no room for text beside the classifier's "
                          f"{len(before) + len(after)} special tokens", field="window")
    return Classifier(model, tokenizer, keep_index=_keep_index(model.config), max_tokens=max_tokens,
                      before=before, after=after)


def load_classifier(classifier=None, tokenizer=None, window: int = 512) -> Classifier:
    """The :class:`Classifier` for ``classifier``: a local folder (loaded once per process), or a loaded model.

    A folder must hold a ``*ForTokenClassification`` config with two labels, ``model.safetensors`` (pickle
    weights are refused) and a fast tokenizer; remote code is never run. A model object is used with
    ``tokenizer`` (or the tokenizer saved in its ``name_or_path`` folder). ``None`` raises
    :class:`~hf_tokred.errors.ConfigError` saying how to provide one; a path that is no folder
    :class:`~hf_tokred.errors.MissingFileError`.

    Example:
        >>> from hf_tokred.methods.prompt.llmlingua2 import load_classifier
        >>> clf = load_classifier("~/.cache/hf_tokred/llmlingua2-minilm")                 # doctest: +SKIP
        >>> load_classifier("~/.cache/hf_tokred/llmlingua2-minilm") is clf                # doctest: +SKIP
        True
    """
    if isinstance(classifier, Classifier):
        return classifier if tokenizer is None else check_classifier(classifier.model, tokenizer, window)
    if classifier is None:
        raise ConfigError("classifier: llmlingua2 needs a token classifier and none was given; " + classifier_help(),
                          field="classifier")
    if isinstance(classifier, (str, os.PathLike)):
        folder = os.path.abspath(os.path.expanduser(os.fspath(classifier)))
        key = f"{folder}|{window}"
        with _CLASSIFIERS_LOCK:
            cached = _CLASSIFIERS.get(key)
            if cached is None:
                cached = _load_folder(folder, window)
                _CLASSIFIERS[key] = cached
        if tokenizer is not None and tokenizer is not cached.tokenizer:
            return check_classifier(cached.model, tokenizer, window)
        return cached
    if not isinstance(classifier, torch.nn.Module):
        raise ConfigError(f"classifier: expected a local folder or a token-classification model, got "
                          f"{type(classifier).__name__}; " + classifier_help(), field="classifier")
    return check_classifier(classifier, tokenizer if tokenizer is not None else saved_tokenizer(classifier), window)


def _load_folder(folder: str, window: int) -> Classifier:
    from transformers import AutoConfig, AutoModelForTokenClassification

    if not os.path.isdir(folder):
        raise MissingFileError(f"classifier: {folder!r} is not a local folder; " + classifier_help())
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MissingFileError(f"classifier: {folder!r} holds no loadable config.json ({err}); "
                               + classifier_help()) from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForTokenClassification") for a in architectures):
        raise ConfigError(f"classifier: {folder!r} holds a {', '.join(architectures) or 'model of unknown class'}, "
                          "not a token classifier; hf_tokred.training.train_llmlingua2(texts, base=folder) builds "
                          "one from an encoder", field="classifier")
    if config.num_labels != 2:
        raise ConfigError(f"classifier: LLMLingua-2 needs two labels (drop, keep), {folder!r} has "
                          f"num_labels={config.num_labels}", field="classifier")
    tokenizer = saved_tokenizer(folder)
    try:
        model = AutoModelForTokenClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise MissingFileError(f"classifier: {folder!r} holds no loadable safetensors weights ({err}); pickle "
                               "weights (pytorch_model.bin) are refused; " + classifier_help()) from None
    return check_classifier(model.eval(), tokenizer, window)


# ---------------------------------------------------------------------------------------------
# Chunking and classification
# ---------------------------------------------------------------------------------------------


def _word_start(text: str, offsets, b: int) -> bool:
    """Whether token ``b`` starts a new whitespace-separated word (a chunk may begin there)."""
    s = offsets[b][0]
    return (s > 0 and text[s - 1].isspace()) or (s < len(text) and text[s].isspace()) or s > offsets[b - 1][1]


def chunk_spans(text: str, offsets, max_tokens: int) -> list[tuple[int, int]]:
    """Cut a text's tokens (their character ``offsets`` in ``text``) into runs of at most ``max_tokens``.

    A run ends, by preference, after a sentence end (``.!?;:`` or before a line break) in its second half,
    else at the last word boundary, and only inside a word when one word is longer than ``max_tokens``.

    Example:
        >>> from hf_tokred.methods.prompt.llmlingua2 import chunk_spans
        >>> text = "One two. Three four five."
        >>> offsets = [(0, 3), (4, 7), (7, 8), (9, 14), (15, 19), (20, 24), (24, 25)]
        >>> chunk_spans(text, offsets, 4)
        [(0, 3), (3, 7)]
    """
    n = len(offsets)
    spans, a = [], 0
    while a < n:
        if n - a <= max_tokens:
            spans.append((a, n))
            break
        limit = a + max_tokens
        word = sentence = None
        for b in range(limit, a, -1):  # the run is tokens a..b-1
            if not _word_start(text, offsets, b):
                continue
            if word is None:
                word = b
            if b - a < max_tokens // 2:
                break
            end = offsets[b - 1][1]
            if (end > 0 and text[end - 1] in _SENTENCE_END) or "\n" in text[end:offsets[b][0] + 1]:
                sentence = b
                break
        b = sentence or word or limit
        spans.append((a, b))
        a = b
    return spans


def token_keep_probabilities(classifier: Classifier, texts: list[str], *,
                             batch_size: int = 16) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """``p(keep)`` of every token of every text (the classifier's tokens, no special tokens) and their offsets.

    Texts are cut into chunks of at most ``classifier.max_tokens`` tokens (:func:`chunk_spans`); chunks of
    all texts are sorted by length and classified ``batch_size`` at a time under ``torch.no_grad()``.

    Example:
        >>> from hf_tokred.methods.prompt.llmlingua2 import load_classifier, token_keep_probabilities
        >>> clf = load_classifier("llmlingua2-folder")                                     # doctest: +SKIP
        >>> [(probs, offsets)] = token_keep_probabilities(clf, ["The grass is green."])     # doctest: +SKIP
        >>> probs.shape[0] == len(offsets)                                                 # doctest: +SKIP
        True
    """
    if not texts:
        return []
    tokenizer, model = classifier.tokenizer, classifier.model
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    items = []  # (text index, first token, end token)
    for t, (text, offsets) in enumerate(zip(texts, enc["offset_mapping"])):
        items += [(t, a, b) for a, b in chunk_spans(text, offsets, classifier.max_tokens)]
    out = [torch.zeros(len(ids)) for ids in enc["input_ids"]]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda i: items[i][2] - items[i][1])
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [items[i] for i in order[start:start + batch_size]]
            ids, mask = pad_batch([classifier.before + list(enc["input_ids"][t][a:b]) + classifier.after
                                   for t, a, b in batch], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            keep = logits.float().softmax(-1)[..., classifier.keep_index].cpu()
            for row, (t, a, b) in enumerate(batch):
                out[t][a:b] = keep[row, len(classifier.before):len(classifier.before) + b - a]
    return [(probs, [tuple(o) for o in offsets]) for probs, offsets in zip(out, enc["offset_mapping"])]


def token_units(ends: list[int], offsets) -> torch.Tensor:
    """The word each token belongs to (the one it starts in): indices into the words whose character spans end at
    ``ends``, one per token of ``offsets``.

    Example:
        >>> token_units([3, 9], [(0, 3), (4, 7), (7, 9)]).tolist()
        [0, 1, 1]
    """
    token_starts = torch.tensor([s for s, _ in offsets], dtype=torch.long)
    return torch.searchsorted(torch.tensor(ends, dtype=torch.long), token_starts, right=True).clamp(max=len(ends) - 1)


def unit_probabilities(starts: list[int], ends: list[int], probs: torch.Tensor, offsets, mode: str = "mean",
                       ) -> torch.Tensor:
    """A word's ``p(keep)`` from its tokens': their mean (``"mean"``) or the first one's (``"first"``).

    ``starts``/``ends`` are the words' character spans, ``probs`` and ``offsets`` the tokens' ``p(keep)``
    and character spans (a token belongs to the word it starts in). A word no token falls in gets the
    mean of the others.

    Example:
        >>> import torch
        >>> from hf_tokred.methods.prompt.llmlingua2 import unit_probabilities
        >>> unit_probabilities([0, 3], [3, 9], torch.tensor([0.2, 0.9, 0.5]), [(0, 3), (4, 7), (7, 9)]).tolist()
        [0.20000000298023224, 0.699999988079071]
    """
    n = len(starts)
    if n == 0:
        return torch.zeros(0)
    if not offsets:
        return torch.full((n,), 0.5)
    unit = token_units(ends, offsets)
    count = torch.zeros(n).index_add_(0, unit, torch.ones(len(offsets)))
    if mode == "first":
        first = torch.full((n,), len(offsets), dtype=torch.long)
        first = first.scatter_reduce(0, unit, torch.arange(len(offsets)), reduce="amin")
        scores = probs.float()[first.clamp(max=len(offsets) - 1)]
    else:
        scores = torch.zeros(n).index_add_(0, unit, probs.float()) / count.clamp(min=1)
    covered = count > 0
    if not covered.all():
        scores[~covered] = scores[covered].mean() if covered.any() else 0.5
    return scores


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@register_method("llmlingua2")
@dataclass(kw_only=True)
class LLMLingua2Config(PromptCompressorConfig):
    """LLMLingua-2: keep the words a token classifier gives the highest p(keep) (arXiv 2403.12968).

    ``classifier`` is a local folder (saved in the config), a loaded ``*ForTokenClassification`` model
    (with ``tokenizer=`` at the call) or a ``(model, tokenizer)`` pair; ``window`` is the classifier's chunk
    length in tokens (capped at its position limit, 512). The target tokenizer the budget is counted in
    defaults to the classifier's; pass ``target_tokenizer=`` for the LLM you prompt.

    Example:
        >>> import hf_tokred
        >>> out = hf_tokred.compress_prompt("Some long text ...", method="llmlingua2",
        ...                                 classifier="llmlingua2-folder", rate=0.5)      # doctest: +SKIP
    """

    paper = "2403.12968"
    status = "experimental"  # not measured against the published checkpoints yet
    uses_scorer: ClassVar[bool] = False

    classifier: Any = field(default=None, metadata={
        "help": "the token classifier: a local folder, a loaded *ForTokenClassification model, or (model, tokenizer)"})
    token_to_word: str = param("mean", str, choices=("mean", "first"),
                               help="a word's p(keep): the mean over its tokens (the paper's) or its first token's")
    batch_size: int = param(16, int, low=1, high=4096, help="chunks per classifier forward pass")
    context_filter: bool = param(False, bool,
                                 help="drop whole documents of low mean p(keep) first (keeping granularity times "
                                      "the remaining budget)")

    def validate(self) -> None:
        super().validate()
        value = self.classifier
        if isinstance(value, os.PathLike):
            self.classifier = value = os.fspath(value)
        if isinstance(value, (tuple, list)):
            if len(value) != 2 or not isinstance(value[0], torch.nn.Module):
                raise ConfigError("classifier: a pair must be (model, tokenizer)", field="classifier")
        elif not (value is None or isinstance(value, (str, torch.nn.Module, Classifier))):
            raise ConfigError(f"classifier: expected a local folder, a token-classification model or "
                              f"(model, tokenizer), got {type(value).__name__}", field="classifier")
        if isinstance(value, str) and not value:
            raise ConfigError("classifier: expected a non-empty folder path", field="classifier")
        if getattr(self, "scorer", "embedded") != "embedded":
            raise ConfigError(f"scorer: llmlingua2 scores words with its token classifier (classifier=), not a "
                              f"causal LM; scorer={self.scorer!r} does not apply", field="scorer")

    def to_dict(self) -> dict[str, Any]:
        if not (self.classifier is None or isinstance(self.classifier, str)):
            raise ConfigError("classifier: a loaded model cannot be written into a config; save it "
                              "(model.save_pretrained(folder), tokenizer.save_pretrained(folder)) and pass "
                              "classifier=folder", field="classifier")
        return super().to_dict()

    def load_model(self, scorer=None, tokenizer=None) -> Classifier:
        """The classifier (``self.classifier``, with ``tokenizer`` if given); no causal LM is loaded.

        Example:
            >>> cfg = TokenReductionConfig(method="llmlingua2", classifier="llmlingua2-folder")  # doctest: +SKIP
            >>> cfg.load_model().keep_index                                                   # doctest: +SKIP
            1
        """
        if scorer is not None:
            raise ConfigError(f"scorer: llmlingua2 scores words with its token classifier, not a causal LM; pass "
                              f"classifier= instead of scorer= (got {type(scorer).__name__})", field="scorer")
        source = self.classifier
        if isinstance(source, (tuple, list)):
            source, paired = source
            tokenizer = paired if tokenizer is None else tokenizer
        return load_classifier(source, tokenizer, window=self.window)

    def priorities(self, job: PromptJob) -> list[torch.Tensor]:
        docs = job.contexts
        classifier = job.scorer
        if not isinstance(classifier, Classifier):
            classifier = check_classifier(classifier.model, classifier.tokenizer, self.window)
        results = token_keep_probabilities(classifier, [seg.text for seg in docs], batch_size=self.batch_size)
        scores = []
        for seg, (probs, offsets) in zip(docs, results):
            job.scored_tokens += len(offsets)
            scores.append(unit_probabilities(seg.starts, seg.ends, probs, offsets, self.token_to_word))
        if self.context_filter and len(docs) > 1:
            mean = [float(s.mean()) if s.numel() else 0.0 for s in scores]
            cost = [float(seg.costs[~seg.protected].sum()) for seg in docs]
            kept, _ = self.coarse_keep(sorted(range(len(docs)), key=lambda d: -mean[d]), cost, job.available)
            for d in range(len(docs)):
                if d not in kept:
                    scores[d] = torch.full((len(docs[d]),), float("-inf"))
            job.notes["document_keep_probability"] = mean
        return scores
