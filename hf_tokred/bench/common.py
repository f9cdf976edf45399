"""Pieces shared by the benchmark harnesses: running a prompt through ``generate()`` with a dense or
compressed KV cache (query-aware or query-agnostic), timing prefill and decode, and measuring the cache.

Two ways to feed a prompt that is split into a *context* and a *query* (the question and the start of
the answer):

* ``"aware"``: the whole prompt is prefilled in one call, so a KV policy compresses it knowing the
  question (as SnapKV's paper evaluates);
* ``"agnostic"``: the context alone is prefilled and compressed first (``hf_tokred.compress_context``),
  then ``generate()`` is given the full prompt and the compressed cache, and feeds only the query
  tokens the cache has not seen (as when one document serves many questions).

Example:
    >>> from hf_tokred.bench.common import run_prompt
    >>> from hf_tokred.embedded import load_smollm2
    >>> model, tokenizer = load_smollm2()                                              # doctest: +SKIP
    >>> ids = tokenizer("Hello there", return_tensors="pt").input_ids                  # doctest: +SKIP
    >>> run = run_prompt(model, ids, context_tokens=1, mode="agnostic", max_new_tokens=4)  # doctest: +SKIP
    >>> run.prefill_s > 0                                                              # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..compat import CACHE_KWARG
from ..kv.cache import layer_kv_bytes, layer_stored_length

MODES = ("aware", "agnostic")


class StepClock:
    """A ``generate()`` streamer that timestamps the prompt and every generated token.

    ``put()`` #0 is the prompt, #1 the token the prefill produced, then one per decode step.

    Example:
        >>> from hf_tokred.bench.common import StepClock
        >>> clock = StepClock()
        >>> clock.put(None); clock.end(); len(clock.times)
        2
    """

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
        >>> from hf_tokred.bench.common import cache_kv_bytes
        >>> cache = DynamicCache()
        >>> _ = cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
        >>> cache_kv_bytes(cache)
        320
    """
    return sum(layer_kv_bytes(layer) for layer in cache.layers)


def cache_kv_bytes_by_type(cache) -> dict[str, int]:
    """:func:`cache_kv_bytes` split into ``"full_attention"`` and ``"sliding_attention"`` layers (a hybrid model such
    as Gemma 3 has both; its sliding layers hold at most their window, reduced or dense).

    Example:
        >>> import torch
        >>> from transformers import DynamicCache
        >>> cache = DynamicCache()
        >>> _ = cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
        >>> cache_kv_bytes_by_type(cache)
        {'full_attention': 320}
    """
    totals: dict[str, int] = {}
    for layer in cache.layers:
        kind = "sliding_attention" if getattr(layer, "is_sliding", False) else "full_attention"
        totals[kind] = totals.get(kind, 0) + layer_kv_bytes(layer)
    return totals


def cache_stored_lengths(cache) -> list[int]:
    """Tokens each layer of a cache holds now (``stored_lengths()`` of a ``TokenReductionCache``).

    Example:
        >>> import torch
        >>> from transformers import DynamicCache
        >>> from hf_tokred.bench.common import cache_stored_lengths
        >>> cache = DynamicCache()
        >>> _ = cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
        >>> cache_stored_lengths(cache)
        [5]
    """
    return [int(layer_stored_length(layer)) for layer in cache.layers]


def new_cache(model, config=None):
    """A fresh cache: for dense runs (``config=None``) the ``DynamicCache`` that ``generate()`` itself builds for
    ``model`` (sliding-window layers keep their window), else ``hf_tokred.build_cache``.

    Example:
        >>> from hf_tokred.bench.common import new_cache
        >>> type(new_cache(None)).__name__
        'DynamicCache'
    """
    if config is None:
        from transformers import DynamicCache

        return DynamicCache(config=getattr(model, "config", None))
    import hf_tokred

    return hf_tokred.build_cache(model, config)


def prefill_context(model, context_ids: torch.Tensor, config=None):
    """Prefill (and, with a KV policy, compress) ``context_ids``; returns the cache.

    Uses ``hf_tokred.compress_context`` when the package provides it, else a plain forward through a
    fresh cache (which evicts down to the policy's budget as the attention runs).

    Example:
        >>> cache = prefill_context(model, context_ids, config=cfg)      # doctest: +SKIP
        >>> cache.get_seq_length() == context_ids.shape[-1]              # doctest: +SKIP
        True
    """
    import hf_tokred

    with torch.no_grad():
        if config is not None and hasattr(hf_tokred, "compress_context"):
            return hf_tokred.compress_context(model, context_ids, config=config)
        cache = new_cache(model, config)
        model(context_ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        return cache


def tokenize_parts(tokenizer, context: str, query: str) -> tuple[torch.Tensor, int]:
    """Token ids ``(1, n)`` of ``context + query`` and how many of them belong to the context.

    The text is tokenized whole (so both modes see the same ids) without special tokens (chat templates
    hold their own); the context is the prefix of tokens that end inside ``context``.

    Example:
        >>> ids, n_context = tokenize_parts(tokenizer, "Some text.", "\\nQuestion?")    # doctest: +SKIP
        >>> 0 < n_context < ids.shape[-1]                                              # doctest: +SKIP
        True
    """
    encoded = tokenizer(context + query, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
    ends = encoded["offset_mapping"][0, :, 1]
    return encoded["input_ids"], int((ends <= len(context)).sum())


@dataclass
class PromptRun:
    """What :func:`run_prompt` measured for one prompt."""

    new_tokens: torch.Tensor
    prefill_s: float  # from the start to the first generated token (context compression included)
    decode_s: float  # the remaining generated tokens
    cache: object

    @property
    def decode_tokens(self) -> int:
        return max(int(self.new_tokens.shape[-1]) - 1, 0)


ANSWERS = ("free", "digits")


def digit_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that spell only digits (an optional leading space allowed), for ``answer="digits"``.

    Example:
        >>> ids = digit_token_ids(tokenizer)                                            # doctest: +SKIP
        >>> tokenizer.decode(ids[:3])                                                   # doctest: +SKIP
        '012'
    """
    found = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text.strip().isdigit() and text.lstrip(" ") == text.strip():
            found.append(token_id)
    return found


class _OnlyTokens:
    """A logits processor that lets greedy decoding pick only ``allowed`` tokens."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        index = self.allowed.to(scores.device)
        return masked.index_copy_(-1, index, scores.index_select(-1, index))


def run_prompt(model, input_ids: torch.Tensor, *, config=None, mode: str = "aware", context_tokens: int | None = None,
               max_new_tokens: int = 8, min_new_tokens: int | None = None,
               allowed_token_ids: torch.Tensor | None = None) -> PromptRun:
    """Greedy generation of one prompt (batch 1), dense (``config=None``) or with the attached KV policy.

    ``mode="aware"`` prefills the whole prompt in ``generate()``; ``mode="agnostic"`` first prefills
    and compresses ``input_ids[:, :context_tokens]`` (:func:`prefill_context`), then lets
    ``generate()`` feed the rest. The model must carry ``config`` (``hf_tokred.apply``) when one is given.
    ``allowed_token_ids`` restricts every generated token to those ids (``answer="digits"``).

    Example:
        >>> run = run_prompt(model, ids, config=cfg, mode="aware", max_new_tokens=8)   # doctest: +SKIP
        >>> run.cache.kv_bytes() > 0                                                    # doctest: +SKIP
        True
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    clock = StepClock()
    attention_mask = torch.ones_like(input_ids)
    extra = {} if min_new_tokens is None else {"min_new_tokens": min_new_tokens}
    if allowed_token_ids is not None:
        from transformers import LogitsProcessorList

        extra["logits_processor"] = LogitsProcessorList([_OnlyTokens(allowed_token_ids)])
    with torch.no_grad():
        start = time.perf_counter()
        if mode == "agnostic":
            if context_tokens is None or not 0 < context_tokens < input_ids.shape[-1]:
                raise ValueError(f"context_tokens: expected 0 < n < {input_ids.shape[-1]}, got {context_tokens!r}")
            cache = prefill_context(model, input_ids[:, :context_tokens], config)
        else:
            cache = new_cache(model, config)
        output = model.generate(
            input_ids, attention_mask=attention_mask, **{CACHE_KWARG: cache}, max_new_tokens=max_new_tokens,
            do_sample=False, streamer=clock, pad_token_id=model.generation_config.pad_token_id, **extra,
        )
    first = clock.times[1] if len(clock.times) > 2 else clock.times[-1]
    return PromptRun(output[0, input_ids.shape[-1]:], first - start, clock.times[-1] - first, cache)


@dataclass(frozen=True)
class Prompt:
    """One generation sample: the prompt ``ids`` ``(1, n)``, how many of them form the context, the
    ``expected`` text that a correct answer contains, and ``meta`` (JSON-ready facts kept per sample).

    Example:
        >>> import torch
        >>> from hf_tokred.bench.common import Prompt
        >>> Prompt(torch.tensor([[1, 2, 3]]), 2, "42").prompt_tokens
        3
    """

    ids: torch.Tensor
    context_tokens: int
    expected: str
    max_new_tokens: int = 8
    meta: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return int(self.ids.shape[-1])


def run_prompts(model, tokenizer, prompts: list[Prompt], *, config=None, mode: str = "aware", warmup: bool = True,
                progress: bool = True, desc: str | None = None, bar=None, answer: str = "free") -> dict:
    """Generate greedily for every prompt, dense (``config=None``) or with a KV policy, and measure it.

    The reduction is attached for the run (``hf_tokred.apply``) when the model carries none and removed
    afterwards; each prompt gets a fresh cache. A sample is correct when its ``expected`` text appears
    in the decoded answer. ``bar`` is a tqdm bar to advance by one per prompt (else one is made when
    ``progress``). Returns a JSON-ready dict: ``accuracy``, ``correct``, ``per_sample`` (the prompt's
    ``meta``, the answer, tokens, bytes and times), and the means ``mean_prompt_tokens``, ``kv_bytes``,
    ``kv_tokens`` (tokens a layer holds, mean over layers and samples), ``prefill_s``, ``decode_s``,
    ``decode_tokens``, plus ``prefill_tokens_per_s`` and ``decode_tokens_per_s`` (totals over samples).
    ``answer="digits"`` lets the answer's tokens be digits only (every task's answer is a number): a base model
    that drifts into prose (" the secret code ...") then shows whether it still retrieves the number.

    Example:
        >>> result = run_prompts(model, tokenizer, prompts, config=cfg, mode="agnostic")   # doctest: +SKIP
        >>> 0.0 <= result["accuracy"] <= 1.0                                               # doctest: +SKIP
        True
    """
    import hf_tokred

    if answer not in ANSWERS:
        raise ValueError(f"answer: expected one of {ANSWERS}, got {answer!r}")
    cfg = None if config is None else hf_tokred.TokenReductionConfig.coerce(config)
    allowed = torch.tensor(digit_token_ids(tokenizer)) if answer == "digits" else None
    prompts = list(prompts)
    label = desc or ("dense" if cfg is None else cfg.method)
    per_sample = []
    own_bar = None
    if bar is None and progress:
        from tqdm.auto import tqdm

        bar = own_bar = tqdm(total=len(prompts), desc=label, unit="sample", leave=True)
    try:
        with Reduction(model, cfg):
            if warmup and prompts:
                run_prompt(model, prompts[0].ids[:, :32].to(model.device), config=cfg, max_new_tokens=2)
            for prompt in prompts:
                run = run_prompt(model, prompt.ids.to(model.device), config=cfg, mode=mode,
                                 context_tokens=prompt.context_tokens, max_new_tokens=prompt.max_new_tokens,
                                 allowed_token_ids=allowed)
                answer = tokenizer.decode(run.new_tokens, skip_special_tokens=True)
                lengths = cache_stored_lengths(run.cache)
                per_sample.append({
                    **prompt.meta,
                    "expected": prompt.expected,
                    "answer": answer,
                    "correct": prompt.expected in answer,
                    "prompt_tokens": prompt.prompt_tokens,
                    "context_tokens": prompt.context_tokens,
                    "generated_tokens": int(run.new_tokens.shape[-1]),
                    "decode_tokens": run.decode_tokens,
                    "kv_bytes": cache_kv_bytes(run.cache),
                    "kv_bytes_by_type": cache_kv_bytes_by_type(run.cache),
                    "kv_tokens": max(lengths or [0]),
                    "kv_tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0,
                    "prefill_s": run.prefill_s,
                    "decode_s": run.decode_s,
                })
                del run
                if bar is not None:
                    bar.update(1)
    finally:
        if own_bar is not None:
            own_bar.close()
    return summarize(per_sample, cfg, mode)


def summarize(per_sample: list[dict], cfg, mode: str) -> dict:
    """The JSON-ready summary of :func:`run_prompts` from its per-sample records."""

    def mean(key):
        return sum(r[key] for r in per_sample) / len(per_sample) if per_sample else 0.0

    def total(key):
        return sum(r[key] for r in per_sample)

    correct = [bool(r["correct"]) for r in per_sample]
    return {
        "mode": mode,
        "method": "dense" if cfg is None else cfg.method,
        "config": None if cfg is None else cfg.to_dict(),
        "samples": len(per_sample),
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "correct": correct,
        "mean_prompt_tokens": mean("prompt_tokens"),
        "kv_bytes": int(round(mean("kv_bytes"))),
        "kv_bytes_by_type": {kind: int(round(sum(r["kv_bytes_by_type"].get(kind, 0) for r in per_sample)
                                             / len(per_sample)))
                             for kind in sorted({k for r in per_sample for k in r["kv_bytes_by_type"]})},
        "kv_tokens": mean("kv_tokens"),
        "kv_tokens_mean": mean("kv_tokens_mean"),
        "prefill_s": mean("prefill_s"),
        "decode_s": mean("decode_s"),
        "decode_tokens": mean("decode_tokens"),
        "prefill_tokens_per_s": tokens_per_second(total("prompt_tokens"), total("prefill_s")),
        "decode_tokens_per_s": tokens_per_second(total("decode_tokens"), total("decode_s")),
        "per_sample": per_sample,
    }


def tokens_per_second(tokens: float, seconds: float) -> float:
    """``tokens / seconds``, NaN when no time was measured."""
    return tokens / seconds if seconds > 0 else float("nan")


class Reduction:
    """Context manager: attach ``config`` for the run when the model carries no reduction, then remove it.

    Example:
        >>> with Reduction(model, cfg):                                   # doctest: +SKIP
        ...     model.generate(ids)
    """

    def __init__(self, model, config, owned: bool = False):
        # owned: the reduction is already attached (e.g. trained in place) and is removed on exit
        self.model, self.config, self.attached = model, config, owned

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


def median(values: list[float]) -> float:
    """The median (mean of the middle two for even counts); NaN for no values.

    Example:
        >>> from hf_tokred.bench.common import median
        >>> median([3.0, 1.0, 2.0]), median([1.0, 2.0, 3.0, 10.0])
        (2.0, 2.5)
    """
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


__all__ = [
    "MODES",
    "Prompt",
    "PromptRun",
    "Reduction",
    "StepClock",
    "cache_kv_bytes",
    "cache_kv_bytes_by_type",
    "cache_stored_lengths",
    "median",
    "new_cache",
    "prefill_context",
    "run_prompt",
    "run_prompts",
    "summarize",
    "tokenize_parts",
]
