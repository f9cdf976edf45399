"""Scissorhands: persistence of importance (Liu et al., NeurIPS'23, arXiv 2305.17118).

The paper observes that tokens which were important (received more than average attention) in the
recent past stay important. Every token carries a counter of how many of the last ``history_window``
queries gave it more attention than a uniform share (``1 / visible tokens``); when the cache reaches its
budget, the tokens with the lowest counts are dropped, ``compress_every`` at a time (the paper's batched
compression), so the budget is a hard cap.

Where we depart from the paper: tokens with equal counts are ranked by the mean attention share they
received over the window (the paper leaves ties unresolved, and on a long prompt most tokens tie at zero);
counts are kept per KV head (averaging the attention of the query heads
that share it); tokens younger than the history window are protected by the recent window rather than
by the paper's count normalisation; the sinks shared by every hf_tokred policy are protected too.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="scissorhands", keep=0.5)
    >>> cfg.history_window, cfg.compress_every, cfg.recent_window(100)
    (32, 8, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...kv.policy import KVPolicyConfig
from ...kv.scoring import iter_attention_probs


@register_method("scissorhands")
@dataclass(kw_only=True)
class ScissorhandsConfig(KVPolicyConfig):
    """Drop the tokens least often important over a history window (arXiv 2305.17118)."""

    paper = "2305.17118"
    status = "beta"  # the evidence: docs/methods.md, "Why each status"
    compression = "step"
    buffers = ("attention_share",)

    history_window: int = param(32, int, low=1, help="recent queries whose attention decides importance")
    compress_every: int = param(8, int, low=1, help="tokens dropped at once when the cache reaches its budget")

    def recent_window(self, budget: int) -> int:
        return self.window if self.window is not None else self.history_window

    def accumulate(self, layer, module, query):
        history = layer.buffers["attention_share"]
        if history.dim() == 3:  # first call: one column per remembered query
            history = history[..., None].expand(-1, -1, -1, self.history_window).clone()
        columns = []
        for probs in iter_attention_probs(module, query, layer, last=self.history_window):
            probs = probs.mean(dim=2)  # (batch, kv_heads, queries, slots)
            visible = (probs > 0).sum(dim=-1, keepdim=True).clamp_min(1)
            columns.append((probs * visible).transpose(-1, -2))  # attention as a multiple of a uniform share
        fresh = torch.cat(columns, dim=-1)
        layer.buffers["attention_share"] = torch.cat([history, fresh], dim=-1)[..., -self.history_window:]

    def score(self, layer, module, query):
        shares = layer.buffers["attention_share"]
        # The paper's count of queries that found the token important, with the mean (capped) share as a
        # tie-break below one count: with integer counts alone, the many tokens no recent query found important
        # all tie and recency decides, which evicts an early fact however close it came.
        return self.pooled(layer, (shares > 1.0).sum(dim=-1) + shares.clamp(max=1.0).mean(dim=-1) * (1 - 1e-3))
