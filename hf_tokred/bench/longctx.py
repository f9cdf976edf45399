"""Long-context tasks over Python's own documentation text (``pydoc_data.topics``, shipped with CPython).

Nothing is downloaded: the haystack and the perplexity text are the help topics of the running
Python (about 465,000 characters, 110,000 SmolLM2 tokens on 3.11), joined in sorted topic order.

* **Needle in a haystack** (:func:`needle_prompts`): one sentence carrying a fact, "The special magic
  number for Oslo is 4816203.", is inserted at a relative depth (at the next sentence boundary) into
  a slice of the documentation sized so that the whole prompt is about ``context_length`` tokens; the
  question asks for the number, and the assistant turn starts with "The special magic number for
  Oslo is". Correct when the 7 digits appear in the next 12 generated tokens.
* **Multi-key** (:func:`multikey_prompts`): ``keys`` such sentences for different cities at random
  depths; the question asks for one of them (RULER's ``niah_multikey``, laid out for a chat model).
* **Perplexity** (:func:`ppl_sequences`): token slices of the same text; the first ``context_tokens``
  are the compressed context, the rest is scored teacher-forced (see :mod:`hf_tokred.bench.kv`).

Every sample is reproducible from ``random.Random(seed)``; the slice of documentation each sample uses
starts at a random token offset.

Example:
    >>> from hf_tokred.bench.longctx import stdlib_text, insert_at_depth
    >>> len(stdlib_text()) > 100_000
    True
    >>> insert_at_depth("One. Two. Three.", "X.", 0.5)
    'One. Two. X. Three.'
"""

from __future__ import annotations

import functools
import random
import re

import torch

from .common import Prompt, tokenize_parts

NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden inside the following text. Find them and memorize them. "
                      "I will ask you about one of them afterwards.")
NEEDLE_SENTENCE = "The special magic number for {city} is {number}."
NEEDLE_QUESTION = "What is the special magic number for {city}?"
NEEDLE_ANSWER_PREFIX = "The special magic number for {city} is"
NEEDLE_MAX_NEW_TOKENS = 12
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_SENTENCE_END = re.compile(r"[.!?:]\s")
CITIES = (
    "Oslo", "Lima", "Cairo", "Tokyo", "Paris", "Nairobi", "Madrid", "Toronto", "Sydney", "Delhi", "Berlin",
    "Dublin", "Seoul", "Lisbon", "Prague", "Quito", "Havana", "Warsaw", "Athens", "Vienna",
)


@functools.lru_cache(maxsize=1)
def stdlib_text() -> str:
    """The help topics of ``pydoc_data.topics``, joined by blank lines in sorted topic order.

    Example:
        >>> from hf_tokred.bench.longctx import stdlib_text
        >>> "assert" in stdlib_text()
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


_CORPUS_IDS: dict[int, tuple[object, torch.Tensor]] = {}


def corpus_ids(tokenizer) -> torch.Tensor:
    """:func:`stdlib_text` tokenized (1-D ids, no special tokens), computed once per tokenizer.

    Example:
        >>> corpus_ids(tokenizer).shape[0] > 50_000                                     # doctest: +SKIP
        True
    """
    cached = _CORPUS_IDS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        ids = tokenizer(stdlib_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
        cached = _CORPUS_IDS[id(tokenizer)] = (tokenizer, ids)
    return cached[1]


def haystack_text(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """About ``n_tokens`` tokens of documentation from a random offset, starting at a line start.

    Example:
        >>> import random
        >>> text = haystack_text(tokenizer, 200, random.Random(0))                       # doctest: +SKIP
    """
    ids = corpus_ids(tokenizer)
    if n_tokens < 1:
        return ""
    if n_tokens >= ids.shape[0]:
        raise ValueError(f"context_length: the documentation text holds {ids.shape[0]} tokens, asked for {n_tokens}")
    # a little extra so that trimming to a line start still leaves about n_tokens
    extra = min(64, ids.shape[0] - n_tokens)
    offset = rng.randrange(0, ids.shape[0] - n_tokens - extra + 1)
    text = tokenizer.decode(ids[offset:offset + n_tokens + extra])
    newline = text.find("\n")
    if 0 <= newline < len(text) // 4:
        text = text[newline + 1:]
    trimmed = tokenizer(text, add_special_tokens=False).input_ids[:n_tokens]
    return tokenizer.decode(trimmed).strip()


def insert_at_depth(text: str, sentence: str, depth: float) -> str:
    """Insert ``sentence`` at the first sentence boundary at or after ``depth`` (0 = start, 1 = end).

    Example:
        >>> from hf_tokred.bench.longctx import insert_at_depth
        >>> insert_at_depth("A b. C d.", "N.", 0.0), insert_at_depth("A b. C d.", "N.", 1.0)
        ('N. A b. C d.', 'A b. C d. N.')
    """
    position = _boundary(text, depth)
    before, after = text[:position].rstrip(), text[position:].lstrip()
    return " ".join(part for part in (before, sentence, after) if part)


def _boundary(text: str, depth: float) -> int:
    if depth <= 0.0:
        return 0
    start = int(depth * len(text))
    if start >= len(text):
        return len(text)
    match = _SENTENCE_END.search(text, start)
    return match.start() + 1 if match else len(text)


def chat_prompt_parts(tokenizer, instruction: str, haystack: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """``(context, query)`` text of a chat prompt whose user turn is instruction, haystack and question.

    The context ends with the haystack; the query is the question, the end of the user turn, the
    assistant header and ``answer_prefix``. Tokenizers without a chat template (base models) get a plain
    layout: their BOS token when they add one by themselves (the text is tokenized without special tokens,
    and a base model such as Gemma 3 degrades without it), the user turn, a newline, ``answer_prefix``.

    Example:
        >>> context, query = chat_prompt_parts(tokenizer, "Read.", "Some text.", "Q?", "A:")   # doctest: +SKIP
    """
    user = f"{instruction}\n{haystack}\n{question}"
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True)
    else:
        templated = f"{_leading_bos(tokenizer)}{user}\n"
    text = templated + answer_prefix
    cut = text.rindex(haystack) + len(haystack)
    return text[:cut], text[cut:]


def _leading_bos(tokenizer) -> str:
    """The BOS token's text when ``tokenizer`` puts one in front of what it encodes, else ``""``."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""


def _needle_prompt(tokenizer, rng: random.Random, context_length: int, needles: list[tuple[str, int, float]],
                   asked: int, meta: dict) -> Prompt:
    """One haystack prompt of about ``context_length`` tokens with ``needles`` (city, number, depth)."""
    city = needles[asked][0]
    question = NEEDLE_QUESTION.format(city=city)
    prefix = NEEDLE_ANSWER_PREFIX.format(city=city)
    sentences = [NEEDLE_SENTENCE.format(city=c, number=n) for c, n, _ in needles]
    bare_context, bare_query = chat_prompt_parts(tokenizer, NEEDLE_INSTRUCTION, " ".join(sentences), question, prefix)
    overhead = tokenize_parts(tokenizer, bare_context, bare_query)[0].shape[-1]
    text = haystack_text(tokenizer, context_length - overhead, rng)
    # insert the deepest first so that earlier positions stay where they were computed
    for sentence, (_, _, depth) in sorted(zip(sentences, needles), key=lambda pair: -pair[1][2]):
        text = insert_at_depth(text, sentence, depth)
    ids, n_context = tokenize_parts(tokenizer, *chat_prompt_parts(tokenizer, NEEDLE_INSTRUCTION, text, question, prefix))
    number = str(needles[asked][1])
    return Prompt(ids, n_context, number, NEEDLE_MAX_NEW_TOKENS, meta)


def needle_prompts(tokenizer, n: int, *, seed: int = 0, context_length: int = 1024,
                   depths: tuple[float, ...] = DEFAULT_DEPTHS) -> list[Prompt]:
    """``n`` needle-in-a-haystack prompts; sample ``i`` hides its needle at ``depths[i % len(depths)]``.

    Per sample, ``random.Random(seed)`` draws the city, the 7-digit number and the haystack offset.

    Example:
        >>> prompts = needle_prompts(tokenizer, 5, context_length=1024)                  # doctest: +SKIP
        >>> [p.meta["depth"] for p in prompts]                                           # doctest: +SKIP
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    _check_count(n)
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths: expected values in [0, 1], got {depths!r}")
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        depth = float(depths[i % len(depths)])
        city = rng.choice(CITIES)
        number = rng.randint(1_000_000, 9_999_999)
        meta = {"city": city, "number": number, "depth": depth}
        prompts.append(_needle_prompt(tokenizer, rng, context_length, [(city, number, depth)], 0, meta))
    return prompts


def multikey_prompts(tokenizer, n: int, *, seed: int = 0, context_length: int = 1024, keys: int = 4) -> list[Prompt]:
    """``n`` prompts with ``keys`` needles each (distinct cities, random depths); one city is asked.

    Example:
        >>> prompts = multikey_prompts(tokenizer, 2, keys=4)                             # doctest: +SKIP
        >>> len(prompts[0].meta["cities"])                                               # doctest: +SKIP
        4
    """
    _check_count(n)
    if not isinstance(keys, int) or not 1 <= keys <= len(CITIES):
        raise ValueError(f"keys: expected an int in [1, {len(CITIES)}], got {keys!r}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        cities = rng.sample(CITIES, keys)
        needles = [(city, rng.randint(1_000_000, 9_999_999), rng.random()) for city in cities]
        asked = rng.randrange(keys)
        meta = {"cities": cities, "numbers": [x[1] for x in needles], "depths": [x[2] for x in needles],
                "asked": cities[asked], "depth": needles[asked][2]}
        prompts.append(_needle_prompt(tokenizer, rng, context_length, needles, asked, meta))
    return prompts


def ppl_sequences(tokenizer, n: int, *, seed: int = 0, length: int = 1536) -> list[torch.Tensor]:
    """``n`` slices of ``length`` tokens of the documentation text (``(1, length)`` each), random offsets.

    Example:
        >>> [s.shape for s in ppl_sequences(tokenizer, 2, length=64)]                     # doctest: +SKIP
        [torch.Size([1, 64]), torch.Size([1, 64])]
    """
    _check_count(n)
    ids = corpus_ids(tokenizer)
    if length >= ids.shape[0]:
        raise ValueError(f"context_length: the documentation text holds {ids.shape[0]} tokens, asked for {length}")
    rng = random.Random(seed)
    return [ids[None, start:start + length].clone() for start in
            (rng.randrange(0, ids.shape[0] - length) for _ in range(n))]


def _check_count(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")


__all__ = [
    "CITIES",
    "DEFAULT_DEPTHS",
    "chat_prompt_parts",
    "corpus_ids",
    "haystack_text",
    "insert_at_depth",
    "multikey_prompts",
    "needle_prompts",
    "ppl_sequences",
    "stdlib_text",
]
