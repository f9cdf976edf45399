"""PyramidKV (Cai et al., "Pyramidal Information Funneling", arXiv 2406.02069).

SnapKV's scores with budgets that shrink with depth: lower layers, whose attention is spread wide,
keep more tokens; upper layers, whose attention funnels onto a few tokens, keep fewer. Beside the
protected window, the per-layer budgets form an arithmetic sequence from ``2 * avg - avg / beta`` at the
first layer down to ``avg / beta`` at the last, so they average to the requested budget.

Per-layer budgets leave the layers with different numbers of stored tokens, while transformers builds
one attention mask for all of them; every layer therefore rebuilds the stored part of its own mask
inside hf_tokred's attention function (kvpress 0.5.5's PyramidKV crashes on exactly this with eager
attention).

Where we depart from the paper: as for SnapKV (recomputed window attention, GQA averaging, sinks).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="pyramidkv", max_tokens=232, window_size=32, sink_tokens=0)
    >>> [cfg.layer_budget(232, i, 3) for i in (0, 1, 2)]
    [422, 232, 42]
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import param, register_method
from .snapkv import SnapKVConfig


@register_method("pyramidkv")
@dataclass(kw_only=True)
class PyramidKVConfig(SnapKVConfig):
    """SnapKV scores with budgets shrinking linearly with depth (arXiv 2406.02069)."""

    paper = "2406.02069"
    status = "beta"  # the evidence: docs/methods.md, "Why each status"

    beta: float = param(20.0, float, low=1.0, help="the last layer keeps 1/beta of the average free budget")

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int) -> int:
        protected = self.sink_tokens + self.recent_window(budget)
        free = max(budget - protected, 0)
        smallest = free / self.beta
        largest = 2 * free - smallest
        fraction = layer_idx / (num_layers - 1) if num_layers > 1 else 0.5
        return protected + max(round(largest - (largest - smallest) * fraction), 1)
