"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

Once, right after the prompt, each layer scores its prompt tokens by the attention they receive from
the prompt's last ``window_size`` queries (the observation window), smoothed along the sequence by a
1-D pooling of width ``kernel_size`` (so neighbours of an important token survive with it), and keeps
the top tokens per KV head plus the observation window itself. Generated tokens are appended
afterwards. In query-aware use the question sits in the observation window; in query-agnostic use
(:func:`hf_tokred.compress_context`) the window is the end of the context.

Where we depart from the paper: the attention of the window is recomputed from its queries (SDPA
works; the paper's code patches eager attention); query heads sharing a KV head are averaged (the
paper predates GQA); the sinks shared by every hf_tokred policy are protected too.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="snapkv", keep=0.25)
    >>> cfg.window_size, cfg.kernel_size, cfg.recent_window(300)
    (32, 7, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import param, register_method
from ...kv.policy import KVPolicyConfig
from ...kv.scoring import attention_received


@register_method("snapkv")
@dataclass(kw_only=True)
class SnapKVConfig(KVPolicyConfig):
    """Observation-window attention, pooled, top-k per KV head, once after the prompt (arXiv 2404.14469)."""

    paper = "2404.14469"
    status = "beta"  # the evidence: docs/methods.md, "Why each status"
    compression = "prefill"

    window_size: int = param(32, int, low=1, help="last prompt queries whose attention scores the prompt")
    kernel_size: int = param(7, int, low=1, help="odd width of the pooling of the window's attention along positions")
    pooling: str = param("avg", str, choices=("avg", "max"), help="pooling of the window's attention")

    def recent_window(self, budget: int) -> int:
        return self.window if self.window is not None else self.window_size

    def score(self, layer, module, query):
        received = attention_received(module, query, layer, last=self.window_size)
        return self.pooled(layer, received, self.pooling)
