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
import time
from dataclasses import asdict, dataclass

import torch

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
    assistant header and the answer prefix ``"The pass key is"``.

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample, build_prompt_parts
        >>> context, query = build_prompt_parts(tokenizer, PasskeySample(key=12345, depth=0.5))  # doctest: +SKIP
        >>> query                                                                               # doctest: +SKIP
        '\\nWhat is the pass key?<|im_end|>\\n<|im_start|>assistant\\nThe pass key is'
    """
    text = build_prompt(tokenizer, sample)
    cut = text.rindex(sample.haystack()) + len(sample.haystack())
    return text[:cut], text[cut:]


def build_prompt(tokenizer, sample: PasskeySample) -> str:
    """The full prompt text: the user turn in the chat template, then ``"The pass key is"``.

    Tokenize it with ``add_special_tokens=False`` (the template already holds the special tokens).

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample, build_prompt
        >>> text = build_prompt(tokenizer, PasskeySample(key=12345, depth=0.5))    # doctest: +SKIP
        >>> text.endswith("<|im_start|>assistant\\nThe pass key is")              # doctest: +SKIP
        True
    """
    messages = [{"role": "user", "content": sample.user_message()}]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return templated + ANSWER_PREFIX


def is_correct(sample: PasskeySample, answer: str) -> bool:
    """Whether the generated ``answer`` contains the sample's key.

    Example:
        >>> from hf_tokred.bench.passkey import PasskeySample, is_correct
        >>> is_correct(PasskeySample(key=12345, depth=0.1), " 12345. Remember")
        True
    """
    return str(sample.key) in answer


# ---------------------------------------------------------------------------------------------
# Running: shared by generation tasks (one prompt, greedy answer, cache measured at the end)
# ---------------------------------------------------------------------------------------------


class _StepClock:
    """A ``generate()`` streamer that timestamps the prompt and every generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def cache_kv_bytes(cache) -> int:
    """Bytes of the key/value tensors a cache holds now (a ``TokenReductionCache`` or any layered Cache).

    Example:
        >>> import torch
        >>> from transformers import DynamicCache
        >>> from hf_tokred.bench.passkey import cache_kv_bytes
        >>> cache = DynamicCache()
        >>> _ = cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
        >>> cache_kv_bytes(cache)
        320
    """
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _stored_tokens(cache) -> int:
    """Tokens the first layer holds now (what the budget caps)."""
    if hasattr(cache, "stored_lengths"):
        return max(cache.stored_lengths() or [0])
    keys = getattr(cache.layers[0], "keys", None) if cache.layers else None
    return 0 if not isinstance(keys, torch.Tensor) or keys.dim() < 3 else keys.shape[-2]


def _generate_one(model, input_ids, cache, max_new_tokens: int):
    """Greedy generation of one prompt; returns new token ids, prefill seconds, decode seconds."""
    clock = _StepClock()
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        start = time.perf_counter()
        output = model.generate(
            input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=max_new_tokens,
            do_sample=False, streamer=clock, pad_token_id=model.generation_config.pad_token_id,
        )
    # put() #0 is the prompt, put() #1 the token that the prefill produced, then one per decode step.
    first = clock.times[1] if len(clock.times) > 2 else clock.times[-1]
    return output[0, input_ids.shape[-1]:], first - start, clock.times[-1] - first


class _Reduction:
    """Context manager: attach ``config`` for the run when the model carries no reduction, then remove it."""

    def __init__(self, model, config):
        self.model, self.config, self.attached = model, config, False

    def __enter__(self):
        import hf_tokred
        from hf_tokred.integration.wiring import get_applied

        if self.config is not None and get_applied(self.model) is None:
            hf_tokred.apply(self.model, self.config)
            self.attached = True
        return self

    def __exit__(self, *exc):
        if self.attached:
            import hf_tokred

            hf_tokred.remove(self.model)
        return False


def run_passkey(model, tokenizer, samples: list[PasskeySample], *, config=None, progress: bool = True,
                desc: str | None = None, warmup: bool = True) -> dict:
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
    one-time start-up costs do not land on the first sample's times.

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
    from transformers import DynamicCache

    import hf_tokred

    cfg = None if config is None else hf_tokred.TokenReductionConfig.coerce(config)
    samples = list(samples)
    label = desc or ("dense" if cfg is None else cfg.method)
    per_sample = []
    with _Reduction(model, cfg):
        if warmup and samples:
            ids = tokenizer(build_prompt(tokenizer, samples[0]), return_tensors="pt", add_special_tokens=False).input_ids
            cache = DynamicCache() if cfg is None else hf_tokred.build_cache(model, cfg)
            _generate_one(model, ids[:, :32].to(model.device), cache, 2)
        iterator = samples
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(samples, desc=f"passkey [{label}]", unit="sample", leave=True)
        for sample in iterator:
            ids = tokenizer(build_prompt(tokenizer, sample), return_tensors="pt", add_special_tokens=False).input_ids
            ids = ids.to(model.device)
            cache = DynamicCache() if cfg is None else hf_tokred.build_cache(model, cfg)
            new_tokens, prefill_s, decode_s = _generate_one(model, ids, cache, MAX_NEW_TOKENS)
            answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
            per_sample.append({
                **asdict(sample),
                "answer": answer,
                "correct": is_correct(sample, answer),
                "prompt_tokens": int(ids.shape[-1]),
                "generated_tokens": int(new_tokens.shape[-1]),
                "decode_tokens": max(int(new_tokens.shape[-1]) - 1, 0),
                "kv_bytes": cache_kv_bytes(cache),
                "kv_tokens": _stored_tokens(cache),
                "prefill_s": prefill_s,
                "decode_s": decode_s,
            })
            del cache

    def mean(key):
        return sum(r[key] for r in per_sample) / len(per_sample) if per_sample else 0.0

    correct = [r["correct"] for r in per_sample]
    return {
        "task": "passkey",
        "method": "dense" if cfg is None else cfg.method,
        "config": None if cfg is None else cfg.to_dict(),
        "samples": len(per_sample),
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "correct": correct,
        "mean_prompt_tokens": mean("prompt_tokens"),
        "kv_bytes": int(round(mean("kv_bytes"))),
        "kv_tokens": mean("kv_tokens"),
        "prefill_s": mean("prefill_s"),
        "decode_s": mean("decode_s"),
        "decode_tokens": mean("decode_tokens"),
        "per_sample": per_sample,
    }


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
    "run_passkey",
]
