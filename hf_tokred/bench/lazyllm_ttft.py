"""Time to first token, dense vs LazyLLM's prefill pruning (:mod:`hf_tokred.methods.prompt.lazyllm`).

:func:`measure_ttft` prefills prompts of given lengths (offline text from ``pydoc_data.topics``) and times the
call that produces the first token -- one forward pass over the prompt into a fresh cache, ``logits_to_keep=1``,
under ``torch.inference_mode`` -- dense and with lazyllm, interleaved (dense, lazyllm, dense, ...) after one
warm-up pair, and reports the medians. Beside the wall time it reports the tokens x layers each computed (the sum
over layers of the tokens a layer processed: deterministic, and what the saving is made of; on a small CPU model
the wall time also carries fixed overheads).

Example:
    >>> from hf_tokred.embedded import load_smollm2
    >>> from hf_tokred.bench.lazyllm_ttft import measure_ttft
    >>> model, tokenizer = load_smollm2()                                               # doctest: +SKIP
    >>> rows = measure_ttft(model, tokenizer, prompt_lengths=(2048,), repeats=2)         # doctest: +SKIP
    >>> sorted(rows[0])                                                                   # doctest: +SKIP
    ['computed_fraction', 'dense_s', 'dense_token_layers', 'lazyllm_s', 'lazyllm_token_layers', ...]
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache

from ..compat import CACHE_KWARG
from ..config import TokenReductionConfig
from ..kv.cache import layer_stored_length


def _prompt_ids(tokenizer, length: int) -> torch.Tensor:
    from .longctx import corpus_ids

    ids = corpus_ids(tokenizer)
    if ids.shape[-1] < length:
        raise ValueError(f"prompt_lengths: the offline text has {ids.shape[-1]} tokens, fewer than {length}")
    return ids[None, :length]


def measure_ttft(model, tokenizer, prompt_lengths=(2048, 4096), config=None, repeats: int = 2) -> list[dict]:
    """Median time to first token, dense and with lazyllm, per prompt length; one dict per length.

    ``config`` is the lazyllm config (default ``{"method": "lazyllm"}``); ``model`` is given back with the
    reduction it carried before. Each dict holds ``prompt_tokens``, ``dense_s``, ``lazyllm_s``, ``speedup``,
    ``dense_token_layers``, ``lazyllm_token_layers``, ``computed_fraction``, ``kept_per_layer`` and
    ``same_first_token`` (whether both produced the same first token).

    Example:
        >>> rows = measure_ttft(model, tokenizer, prompt_lengths=(2048, 4096))         # doctest: +SKIP
        >>> [round(r["speedup"], 2) for r in rows]                                     # doctest: +SKIP
        [1.45, 1.52]
    """
    import hf_tokred

    from .. import build_cache
    from ..integration.wiring import get_applied

    cfg = TokenReductionConfig.coerce(config if config is not None else {"method": "lazyllm"})
    if cfg.get("prefill") is None:
        raise ValueError(f"config: expected a lazyllm (prefill-stage) config, got {cfg.method}")
    previous = get_applied(model)
    previous_config = previous.config if previous is not None else None
    device = next(model.parameters()).device
    rows = []
    try:
        for length in prompt_lengths:
            ids = _prompt_ids(tokenizer, length).to(device)
            times: dict[str, list[float]] = {"dense": [], "lazyllm": []}
            tokens: dict[str, int] = {}
            kept: list[int] = []
            for repeat in range(repeats + 1):  # the first pair warms up
                for variant in ("dense", "lazyllm"):
                    hf_tokred.remove(model)
                    if variant == "lazyllm":
                        hf_tokred.apply(model, cfg)
                        cache = build_cache(model)
                    else:
                        cache = DynamicCache(config=model.config)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    with torch.inference_mode():
                        out = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
                        token = int(out.logits[0, -1].argmax())
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                    if repeat:
                        times[variant].append(elapsed)
                    tokens[variant] = token
                    if variant == "lazyllm":
                        kept = [layer_stored_length(layer) for layer in cache.layers]
            dense_s, lazy_s = statistics.median(times["dense"]), statistics.median(times["lazyllm"])
            dense_work = length * len(kept)
            rows.append({
                "prompt_tokens": length,
                "dense_s": dense_s,
                "lazyllm_s": lazy_s,
                "speedup": dense_s / lazy_s,
                "dense_token_layers": dense_work,
                "lazyllm_token_layers": sum(kept),
                "computed_fraction": sum(kept) / dense_work,
                "kept_per_layer": kept,
                "same_first_token": tokens["dense"] == tokens["lazyllm"],
            })
    finally:
        hf_tokred.remove(model)
        if previous_config is not None:
            hf_tokred.apply(model, previous_config)
    return rows


__all__ = ["measure_ttft"]
