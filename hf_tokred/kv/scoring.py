"""Attention probabilities recomputed for scoring, without eager attention.

Scoring policies need the attention weights of a few queries (the last one for TOVA, an observation
window for SnapKV, every query for H2O). The model's attention may be SDPA, which never materialises
them, so we recompute ``softmax(q k^T * scaling)`` for just the queries needed, in chunks so the peak
stays bounded. Which slot a query may see comes from the cache's own bookkeeping (a slot is visible
when it is real, not padding, not later than the query, and, in a sliding-window layer, inside the
query's window), so this is right for evicted, non-contiguous caches and left-padded batches alike.

The logits follow the model's own eager attention: ``module.scaling`` (Gemma's
``query_pre_attn_scalar ** -0.5``, Granite's ``attention_multiplier``), soft-capping
``tanh(logits / cap) * cap`` when the module has ``attn_logit_softcapping`` (Gemma 2), and learned
per-head sink logits that take a share of the softmax when the module has ``sinks`` (GPT-OSS).

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> layer = SimpleNamespace(keys=torch.randn(1, 1, 4, 8), positions=torch.arange(4).expand(1, 1, 4),
    ...                         valid=torch.ones(1, 1, 4, dtype=torch.bool), seen=4)
    >>> probs = next(iter_attention_probs(SimpleNamespace(scaling=8 ** -0.5), torch.randn(1, 2, 4, 8), layer))
    >>> probs.shape, bool(probs[0, 0, 0, 0, 1:].eq(0).all())     # (batch, kv_heads, group, queries, slots)
    (torch.Size([1, 1, 2, 4, 4]), True)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

QUERY_CHUNK = 256


def iter_attention_probs(module, query: torch.Tensor, layer, last: int | None = None,
                         chunk: int = QUERY_CHUNK) -> Iterator[torch.Tensor]:
    """Yield float32 attention probabilities ``(batch, kv_heads, group, c, slots)`` of this call's queries.

    ``query`` is ``(batch, heads, q, dim)`` post-RoPE; ``last`` keeps only the last ``last`` queries.
    Query heads are grouped by the KV head they share (GQA). Padding queries give all-zero rows.

    Example:
        >>> total = sum(p.sum(dim=(2, 3)) for p in iter_attention_probs(module, query, layer))  # doctest: +SKIP
    """
    batch, heads, q, dim = query.shape
    keys = layer.keys
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    first = q - (q if last is None else min(last, q))
    scaling = getattr(module, "scaling", None) or dim ** -0.5
    softcap = getattr(module, "attn_logit_softcapping", None)
    sinks = getattr(module, "sinks", None)
    if isinstance(sinks, torch.Tensor) and sinks.numel() == heads:  # (kv_heads, group, 1, 1) next to the logits
        sinks = sinks.detach().float().view(kv_heads, group, 1, 1)
    else:
        sinks = None
    window = getattr(layer, "sliding_window", None)
    grouped = query.view(batch, kv_heads, group, q, dim)
    # (batch, kv_heads, dim, slots): the group's queries are stacked into one matrix per KV head below, so the
    # product is one batched matmul over the keys as stored (a broadcast over the group would copy them).
    keys_t = keys.float().transpose(-1, -2)
    slot_pos = layer.positions[:, :, None, None, :]
    slot_valid = layer.valid[:, :, None, None, :]
    for start in range(first, q, chunk):
        stop = min(start + chunk, q)
        stacked = grouped[:, :, :, start:stop].float().reshape(batch, kv_heads, group * (stop - start), dim)
        logits = (stacked @ keys_t).view(batch, kv_heads, group, stop - start, -1) * scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        query_pos = torch.arange(layer.seen - q + start, layer.seen - q + stop, device=query.device)[:, None]
        visible = slot_valid & (slot_pos <= query_pos)
        if window is not None:
            visible = visible & (slot_pos > query_pos - window)
        logits = logits.masked_fill(~visible, float("-inf"))
        if sinks is None:
            probs = logits.softmax(dim=-1)
        else:  # the sink's share is dropped, as in the model's eager attention
            sink = sinks.expand(*logits.shape[:-1], 1).to(logits.device)
            probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
        yield probs.nan_to_num_(0.0)  # a padding query sees no real slot


def pool_along_positions(scores: torch.Tensor, positions: torch.Tensor, kernel_size: int,
                         pooling: str = "max", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth ``(batch, heads, slots)`` scores over each slot's ``kernel_size`` neighbours in position order.

    A slot then ranks as high as (``"max"``) or with the mean of (``"avg"``) its neighbours, so the tokens
    around an important one are kept with it. Slots may be stored in any order (``positions`` says where
    each belongs); after an eviction the neighbours are the nearest *kept* positions. Slots where ``valid``
    is False (padding, slots a head does not use) lend nothing to their neighbours and keep their own
    score: a left-padded row ranks its tokens as it does alone.

    Example:
        >>> import torch
        >>> scores, positions = torch.tensor([[[0.0, 3.0, 0.0, 0.0]]]), torch.tensor([[[2, 0, 1, 3]]])
        >>> pool_along_positions(scores, positions, 3).tolist()   # slot 1 (position 0) lends its score to slot 2
        [[[0.0, 3.0, 3.0, 0.0]]]
        >>> valid = torch.tensor([[[True, False, True, True]]])
        >>> pool_along_positions(scores, positions, 3, valid=valid).tolist()   # ...unless it is padding
        [[[0.0, 3.0, 0.0, 0.0]]]
    """
    if kernel_size == 1:
        return scores
    order = positions.argsort(dim=-1)
    flat = scores.gather(-1, order).reshape(-1, 1, scores.shape[-1])
    mask = None if valid is None or bool(valid.all()) else valid.gather(-1, order).reshape(flat.shape)
    pad = kernel_size // 2
    if pooling == "max":
        if mask is not None:
            flat = flat.masked_fill(~mask, float("-inf"))
        pooled = torch.nn.functional.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    elif mask is None:
        pooled = torch.nn.functional.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    else:  # the mean over the valid neighbours only
        weights = mask.to(flat.dtype)
        total = torch.nn.functional.avg_pool1d(flat * weights, kernel_size, stride=1, padding=pad)
        count = torch.nn.functional.avg_pool1d(weights, kernel_size, stride=1, padding=pad)
        pooled = total / count.clamp(min=1e-12)
    pooled = torch.empty_like(scores).scatter_(-1, order, pooled.reshape(scores.shape))
    return pooled if valid is None else torch.where(valid, pooled, scores)


def attention_received(module, query: torch.Tensor, layer, last: int | None = None) -> torch.Tensor:
    """Attention each slot received, summed over this call's (last ``last``) queries and averaged over the
    query heads of each KV head: ``(batch, kv_heads, slots)``.

    Example:
        >>> scores = attention_received(module, query, layer, last=32)   # SnapKV's window   # doctest: +SKIP
    """
    total = None
    for probs in iter_attention_probs(module, query, layer, last):
        part = probs.sum(dim=3).mean(dim=2)
        total = part if total is None else total + part
    return total
