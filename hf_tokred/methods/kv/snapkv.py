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

import torch

from ...config import param, register_method
from ...errors import ConfigError
from ...kv.policy import KVPolicyConfig
from ...kv.scoring import attention_received


@register_method("snapkv")
@dataclass(kw_only=True)
class SnapKVConfig(KVPolicyConfig):
    """Observation-window attention, pooled, top-k per KV head, once after the prompt (arXiv 2404.14469)."""

    paper = "2404.14469"
    compression = "prefill"

    window_size: int = param(32, int, low=1, help="last prompt queries whose attention scores the prompt")
    kernel_size: int = param(7, int, low=1, help="width of the pooling along the sequence (odd)")
    pooling: str = param("avg", str, choices=("avg", "max"), help="pooling of the window's attention")

    def validate(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: expected an odd int >= 1, got {self.kernel_size}", field="kernel_size")
        super().validate()

    def recent_window(self, budget: int) -> int:
        return self.window if self.window is not None else self.window_size

    def score(self, layer, module, query):
        received = attention_received(module, query, layer, last=self.window_size)
        return pool_along_slots(received, self.kernel_size, self.pooling)


def pool_along_slots(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Smooth ``(batch, heads, slots)`` scores along the slots (which must be in position order).

    Example:
        >>> pool_along_slots(torch.tensor([[[0.0, 3.0, 0.0, 0.0]]]), 3, "max").tolist()
        [[[3.0, 3.0, 3.0, 0.0]]]
    """
    if kernel_size == 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pad = kernel_size // 2
    if pooling == "max":
        pooled = torch.nn.functional.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        pooled = torch.nn.functional.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return pooled.reshape(scores.shape)
