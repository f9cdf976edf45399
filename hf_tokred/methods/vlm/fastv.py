"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

Inside the language model: after layer ``K - 1`` has run, each row's visual tokens are ranked by the attention
the last prompt token pays them at that layer (averaged over heads), and only the top ``keep`` of them go on to
layers ``K`` and later (the paper's ``R`` is ``1 - keep``; its setting K=2, R=50% is the default). Text tokens
are never dropped. Wiring: :mod:`hf_tokred.integration.vlm`.

Where we depart from the paper:

* The attention row is recomputed from the layer's post-RoPE queries and keys, so SDPA works (the paper reads
  eager attention maps and needs ``attn_implementation="eager"``); GQA query heads are averaged.
* The paper's code finds the image span from hard-coded indices and runs batch size 1; here every row's visual
  tokens are found from its placeholder ids, so batches with different image counts and padding work, each row
  keeping ``ceil(keep * its visual tokens)``.
* Pruning happens once, in prefill ("static KV-cache pruning", the FastV README's mode with a cache): layers
  ``>= K`` cache only the kept tokens and decoding attends to those. Kept tokens keep their original positions.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="fastv", k=2, keep=0.5)
    >>> cfg.resolve_schedule(30)
    [(1, 0.5)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...config import param, register_method
from ...vlm.base import InLLMConfig, LayerAttention


@register_method("fastv")
@dataclass(kw_only=True)
class FastVConfig(InLLMConfig):
    """Drop the visual tokens the last token attends to least, after layer ``k - 1`` (arXiv 2403.06764).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="fastv").params()
        {'keep': 0.5, 'k': 2}
    """

    paper: ClassVar[str] = "2403.06764"
    status: ClassVar[str] = "experimental"

    keep: float = param(0.5, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of each row's visual tokens kept from layer k on (the paper's 1 - R)")
    k: int = param(2, int, low=1, help="the first layer that sees only the kept visual tokens (layer k-1 scores)")

    def resolve_schedule(self, num_layers: int) -> list[tuple[int, float]]:
        return [] if self.keep >= 1.0 else self.check_schedule([(self.k - 1, self.keep)], num_layers)

    def score(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        return last_token_attention(attention)


def last_token_attention(attention: LayerAttention) -> torch.Tensor:
    """``(batch, keys)``: the attention each key receives from the row's last query, averaged over heads.

    Example:
        >>> import torch
        >>> from hf_tokred.vlm.base import LayerAttention
        >>> attn = LayerAttention(torch.zeros(1, 2, 2, 4), torch.randn(1, 1, 2, 4), 0.5,
        ...                       torch.ones(1, 2, 2, dtype=torch.bool), torch.tensor([[True, False]]),
        ...                       torch.tensor([[False, True]]), torch.zeros(1, 2, 8))
        >>> last_token_attention(attn).tolist()
        [[0.5, 0.5]]
    """
    return attention.attention_from(attention.last_position())
