"""TOVA: Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104).

At every step, once the cache is over its budget, TOVA evicts the tokens the *current* query attends to
least. The attention of the last query is averaged over all heads of the layer, so one set of tokens is
kept per layer (the paper's choice: it found head-wise selection no better). After a prompt longer than
the budget, the prompt's last query scores it and the cache drops to the budget at once.

Where we depart from the paper: the sinks and recent window (``sink_tokens``, ``window``) shared by every
hf_tokred policy are always protected (the paper protects nothing; ``sink_tokens=0`` restores that); the
scores come from a recomputation of the last query's attention, so SDPA works.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> TokenReductionConfig(method="tova", keep=0.25).compression
    'step'
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import register_method
from ...kv.policy import KVPolicyConfig
from ...kv.scoring import attention_received


@register_method("tova")
@dataclass(kw_only=True)
class TOVAConfig(KVPolicyConfig):
    """Evict what the current query attends to least, averaged over the layer's heads (arXiv 2401.06104)."""

    paper = "2401.06104"
    status = "beta"  # the evidence: docs/methods.md, "Why each status"
    compression = "step"

    def score(self, layer, module, query):
        received = attention_received(module, query, layer, last=1)
        return self.pooled(layer, received.mean(dim=1, keepdim=True).expand_as(received))
