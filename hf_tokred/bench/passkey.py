"""Passkey retrieval: find a 5-digit key hidden in ~1,000 tokens of repeated filler text.

The task of Mohtashami & Jaggi (Landmark Attention, arXiv 2305.16300), as used by StreamingLLM and
LongLoRA, laid out for a chat model. The user turn is three pieces joined by newlines::

    There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.
    The grass is green. ... There and back again. The pass key is 12345. Remember it. 12345 is the pass key. The grass ...
    What is the pass key?

The middle line (the haystack) is the filler sentence group repeated 40 times with the key sentence
inserted after ``int(40 * depth)`` repeats; every sentence is followed by one space and the line's
trailing space is stripped. The prompt is that user turn in the model's chat template with the
generation prompt, followed by the start of the answer, ``"The pass key is"``. A sample is correct when
the key's five digits appear in the next 8 greedily generated tokens. On SmolLM2-135M-Instruct the
prompt is 1,047 tokens (its chat template adds a default system prompt of about 20 tokens to the
~1,025 of the task) and the full-cache model scores 0.95 on the 20 samples of seed 0.

Samples are reproducible: ``random.Random(seed)`` draws, per sample, ``key = randint(10000, 99999)``
and then ``depth = random()``.

:func:`run_passkey` runs the samples dense or with a KV policy and measures accuracy, the KV cache's
resident bytes and the prefill/decode time. The prompt is split into a *context* (everything up to the
end of the haystack) and a *query* (the question and the answer prefix) by :func:`build_prompt_parts`,
so that a query-agnostic variant (compress the context before the question is seen) can reuse it.

Example:
    >>> from hf_tokred.bench.passkey import make_passkey_samples
    >>> [(s.key, round(s.depth, 3)) for s in make_passkey_samples(2)]
    [(60494, 0.758), (65125, 0.04)]
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from .common import Prompt, cache_kv_bytes, run_prompts, tokenize_parts

INSTRUCTION = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it."
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLER_REPEATS = 40
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class PasskeySample:
    """One passkey sample: the 5-digit ``key`` and the relative ``depth`` (0 = start) where it hides.

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample
        >>> PasskeySample(key=12345, depth=0.5).filler_before
        20
    """

    key: int
    depth: float
    filler_repeats: int = FILLER_REPEATS

    @property
    def filler_before(self) -> int:
        """Filler repeats placed before the key sentence."""
        return int(self.filler_repeats * self.depth)

    def haystack(self) -> str:
        """The filler text with the key sentence inserted (one line, no trailing space).

        Example:
            >>> from hf_tokred.bench.passkey import PasskeySample
            >>> PasskeySample(key=12345, depth=0.0, filler_repeats=1).haystack()[:60]
            'The pass key is 12345. Remember it. 12345 is the pass key. T'
        """
        before = self.filler_before
        text = FILLER * before + KEY_SENTENCE.format(key=self.key) + " " + FILLER * (self.filler_repeats - before)
        return text.rstrip()

    def user_message(self) -> str:
        """The user turn: instruction, haystack and question, one per line.

        Example:
            >>> from hf_tokred.bench.passkey import PasskeySample
            >>> PasskeySample(key=12345, depth=0.5).user_message().splitlines()[-1]
            'What is the pass key?'
        """
        return f"{INSTRUCTION}\n{self.haystack()}\n{QUESTION}"


def make_passkey_samples(n: int, seed: int = 0, *, filler_repeats: int = FILLER_REPEATS) -> list[PasskeySample]:
    """``n`` reproducible samples: per sample ``key = rng.randint(10000, 99999)`` then ``depth = rng.random()``.

    Example:
        >>> from hf_tokred.bench.passkey import make_passkey_samples
        >>> samples = make_passkey_samples(3, seed=0)
        >>> len(samples), all(10000 <= s.key <= 99999 for s in samples)
        (3, True)
        >>> make_passkey_samples(3, seed=0) == samples
        True
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        key = rng.randint(10000, 99999)
        depth = rng.random()
        samples.append(PasskeySample(key=key, depth=depth, filler_repeats=filler_repeats))
    return samples


def build_prompt_parts(tokenizer, sample: PasskeySample) -> tuple[str, str]:
    """The prompt text split into ``(context, query)``: ``context + query == build_prompt(...)``.

    The context ends with the haystack; the query is the question, the end of the user turn, the
    assistant header and the answer prefix ``"The pass key is"``. A tokenizer without a chat template
    (a base model such as Gemma 3 270M) gets the plain layout: the user turn, a newline, the prefix.

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample, build_prompt_parts
        >>> context, query = build_prompt_parts(tokenizer, PasskeySample(key=12345, depth=0.5))  # doctest: +SKIP
        >>> query                                                                               # doctest: +SKIP
        '\\nWhat is the pass key?<|im_end|>\\n<|im_start|>assistant\\nThe pass key is'
    """
    from .longctx import chat_prompt_parts

    return chat_prompt_parts(tokenizer, INSTRUCTION, sample.haystack(), QUESTION, ANSWER_PREFIX)


def build_prompt(tokenizer, sample: PasskeySample) -> str:
    """The full prompt text: the user turn in the chat template (if any), then ``"The pass key is"``.

    Tokenize it with ``add_special_tokens=False`` (the template already holds the special tokens).

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample, build_prompt
        >>> text = build_prompt(tokenizer, PasskeySample(key=12345, depth=0.5))    # doctest: +SKIP
        >>> text.endswith("<|im_start|>assistant\\nThe pass key is")              # doctest: +SKIP
        True
    """
    return "".join(build_prompt_parts(tokenizer, sample))


def is_correct(sample: PasskeySample, answer: str) -> bool:
    """Whether the generated ``answer`` contains the sample's key.

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample, is_correct
        >>> is_correct(PasskeySample(key=12345, depth=0.1), " 12345. Remember")
        True
    """
    return str(sample.key) in answer


# ---------------------------------------------------------------------------------------------
# Running (the shared machinery lives in hf_tokred.bench.common)
# ---------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, sample: PasskeySample) -> tuple[torch.Tensor, int]:
    """Token ids ``(1, n)`` of the full prompt and the number of them that form the context.

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample, prompt_ids
        >>> ids, n_context = prompt_ids(tokenizer, PasskeySample(key=12345, depth=0.5))   # doctest: +SKIP
        >>> ids.shape[-1] - n_context                                                    # doctest: +SKIP
        17
    """
    return tokenize_parts(tokenizer, *build_prompt_parts(tokenizer, sample))


def run_passkey(model, tokenizer, samples: list[PasskeySample], *, config=None, progress: bool = True,
                desc: str | None = None, warmup: bool = True, mode: str = "aware") -> dict:
    """Run passkey retrieval, dense (``config=None``) or with a KV policy, and measure it.

    With a config, each sample decodes with a fresh ``hf_tokred.build_cache(model, config)``; the
    reduction is attached for the run (``hf_tokred.apply``) when the model carries none and removed
    afterwards. Dense runs pass a ``transformers.DynamicCache``. Returns a JSON-ready dict:

    * ``accuracy``, ``correct`` (per sample), ``per_sample`` (key, depth, answer, tokens, bytes, times);
    * ``mean_prompt_tokens``;
    * ``kv_bytes``: mean bytes of the key/value tensors the cache holds after the prompt and the
      generated tokens (``cache.kv_bytes()`` for reduced caches), and ``kv_tokens``: tokens a layer holds;
    * ``prefill_s`` and ``decode_s``: mean wall seconds per sample (the first generated token is
      counted in the prefill), ``decode_tokens``: mean decode steps timed.

    ``desc`` labels the progress bar. ``warmup`` first runs one short, untimed generation so that
    one-time start-up costs do not land on the first sample's times. ``mode="agnostic"`` compresses
    the context before the question is fed (see :mod:`hf_tokred.bench.common`); the default
    ``"aware"`` prefills the whole prompt.

    Example:
        >>> from hf_tokred.embedded import load_smollm2
        >>> from hf_tokred.bench.passkey import make_passkey_samples, run_passkey
        >>> model, tokenizer = load_smollm2()                                          # doctest: +SKIP
        >>> samples = make_passkey_samples(5)
        >>> dense = run_passkey(model, tokenizer, samples)                             # doctest: +SKIP
        >>> cfg = "HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512"
        >>> reduced = run_passkey(model, tokenizer, samples, config=cfg)                # doctest: +SKIP
        >>> reduced["kv_bytes"] < dense["kv_bytes"]                                    # doctest: +SKIP
        True
    """
    import hf_tokred

    method = "dense" if config is None else hf_tokred.TokenReductionConfig.coerce(config).method
    prompts = []
    for sample in samples:
        ids, n_context = prompt_ids(tokenizer, sample)
        prompts.append(Prompt(ids, n_context, str(sample.key), MAX_NEW_TOKENS, asdict(sample)))
    result = run_prompts(model, tokenizer, prompts, config=config, mode=mode, warmup=warmup, progress=progress,
                         desc=f"passkey [{desc or method}]")
    return {"task": "passkey", **result}


__all__ = [
    "ANSWER_PREFIX",
    "FILLER",
    "INSTRUCTION",
    "KEY_SENTENCE",
    "QUESTION",
    "PasskeySample",
    "build_prompt",
    "build_prompt_parts",
    "cache_kv_bytes",
    "is_correct",
    "make_passkey_samples",
    "prompt_ids",
    "run_passkey",
]
