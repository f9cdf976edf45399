"""KeyDiff: key similarity-based eviction (Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for
Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364).

Attention-free and query-agnostic: tokens whose keys point in the same direction as the average key are
the least distinctive, and the attention they would get is well covered by the others, so they are
evicted first; distinctive tokens stay. It needs no attention weights at all, so it costs one pass over
the keys and compresses a document well before any question is known.

Where we depart from the paper: ``reference="values"`` (an addition) scores by values instead of keys
(values carry no rotary rotation, so repeated text shows up as repeated values at any distance); the
sinks and recent window shared by every hf_tokred policy are protected; scores are per KV head.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> TokenReductionConfig(method="keydiff", keep=0.5).compression
    'step'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...kv.policy import KVPolicyConfig


@register_method("keydiff")
@dataclass(kw_only=True)
class KeyDiffConfig(KVPolicyConfig):
    """Evict the keys most similar to the mean key (arXiv 2504.15364)."""

    paper = "2504.15364"
    status = "beta"  # the evidence: docs/methods.md, "Why each status"
    compression = "step"

    reference: str = param("keys", str, choices=("keys", "values"), help="vectors compared with their mean")

    def score(self, layer, module, query):
        vectors = (layer.keys if self.reference == "keys" else layer.values).float()
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        weights = layer.valid[..., None].float()
        anchor = (vectors * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True).clamp_min(1)
        anchor = torch.nn.functional.normalize(anchor, dim=-1)
        return self.pooled(layer, -(vectors * anchor).sum(dim=-1))
