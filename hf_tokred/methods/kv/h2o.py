"""H2O: Heavy-Hitter Oracle (Zhang et al., NeurIPS'23, arXiv 2306.14048).

Every token's score is the attention it has received, accumulated over every query that has seen it:
all prompt queries at prefill, then one more query at **every decoding step** (the paper's greedy
algorithm, not a prefill-only approximation). The cache keeps the heavy hitters and a recent window
and evicts the rest, step by step, so it never exceeds its budget. Scores are per KV head (summed over
the query heads that share it), so each head keeps its own heavy hitters.

Where we depart from the paper: the paper splits the budget evenly between heavy hitters and recent
tokens; that is our default (``window=None`` protects half the budget), and an explicit ``window`` sets
the recent part. The sinks shared by every hf_tokred policy are protected too (``sink_tokens=0`` restores
the paper). Attention is recomputed in chunks for the scores, so SDPA works.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> TokenReductionConfig(method="h2o", max_tokens=256).recent_window(256)
    128
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import register_method
from ...kv.policy import KVPolicyConfig
from ...kv.scoring import iter_attention_probs


@register_method("h2o")
@dataclass(kw_only=True)
class H2OConfig(KVPolicyConfig):
    """Heavy hitters by attention accumulated at every step, plus a recent window (arXiv 2306.14048)."""

    paper = "2306.14048"
    status = "beta"  # the evidence: docs/methods.md, "Why each status"
    compression = "step"
    buffers = ("accumulated",)

    def min_budget(self) -> int:
        if self.window is None:  # half the budget is the recent window
            return 2 * (self.sink_tokens + self.compress_every)
        return super().min_budget()

    def recent_window(self, budget: int) -> int:
        return self.window if self.window is not None else budget // 2

    def accumulate(self, layer, module, query):
        for probs in iter_attention_probs(module, query, layer):
            layer.buffers["accumulated"] += probs.sum(dim=(2, 3))

    def score(self, layer, module, query):
        return self.pooled(layer, layer.buffers["accumulated"])
