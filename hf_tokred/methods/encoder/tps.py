"""TPS: Joint Token Pruning and Squeezing (Wei et al., "Joint Token Pruning and Squeezing Towards More
Aggressive Compression of Vision Transformers", CVPR'23, arXiv 2304.10716).

Pruning alone throws the pruned tokens' information away; TPS *squeezes* it into the tokens that stay. In a
reducing block, after the attention, the tokens are split into kept and pruned by an importance score (here
CLS attention, as EViT; the paper works with any pruner's decision). Each pruned token finds its most similar
kept token, its *host* (cosine similarity of the hidden states), and every host becomes a weighted average of
itself and the tokens squeezed into it, with weights growing with the similarity.

Where we depart from the paper:

* Weights: the host counts ``size``, a squeezed token ``size * exp(cos - 1)`` (so an identical token weighs as
  much as the host and an orthogonal one ``e^-1`` as much); the paper's temperature-scaled softmax over the
  host's similarities is replaced by this fixed form, which needs no tuning.
* Protected tokens (CLS) never host. Without a CLS token (SigLIP) tokens are ranked by the attention they
  receive (``docs/encoders.md``).
* Budget and placement as the other pruning methods here: ``keep_rate`` at ``layers`` (default depth 1/4, 1/2,
  3/4); padded rows keep their own counts (filler slots).

Example:
    >>> import torch
    >>> from hf_tokred.methods.encoder.tps import squeeze_slots
    >>> hidden = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]])
    >>> kept = torch.tensor([[True, True, True, False]])
    >>> squeeze_slots(hidden, kept, protected=1)[0].tolist()    # token 3 squeezes into token 1 (slot 1)
    [[0, 1, 2, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import register_method
from .base import KeepRateConfig, Reduction, ReductionContext, cosine_scores, keep_counts, rank_unprotected


@register_method("tps")
@dataclass(kw_only=True)
class TPSConfig(KeepRateConfig):
    """Token Pruning and Squeezing (arXiv 2304.10716): prune by CLS attention, squeeze pruned tokens into hosts.

    Fields:
        keep_rate: fraction of the unprotected tokens kept at each reducing block.
        layers: reducing blocks (default: depth 1/4, 1/2, 3/4).
        prop_attn, restore_length: see :class:`~hf_tokred.methods.encoder.base.EncoderReducerConfig`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="tps", keep_rate=0.5).keep_rate
        0.5
    """

    paper = "2304.10716"
    status = "beta"
    needs = frozenset({"cls_attention"})

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """Keep the top tokens by CLS attention; squeeze every other real token into its most similar kept one.

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> from hf_tokred.methods.encoder.base import ReductionContext
            >>> x = torch.randn(1, 9, 4)
            >>> ctx = ReductionContext(hidden=x, size=torch.ones(1, 9, 1), valid=None, protected=1, class_tokens=1,
            ...                        block=0, num_blocks=1, amount=0.5, cls_attention=torch.rand(1, 9))
            >>> r = TokenReductionConfig(method="tps").plan(ctx)
            >>> r.num_slots, r.apply(x, ctx.size)[1].sum().item()        # every token's size is kept
            (5, 9.0)
        """
        counts = ctx.real_counts()
        kept_counts = keep_counts(counts, ctx.amount)
        if bool((kept_counts == counts).all()):
            return None
        n = ctx.num_tokens
        ranked = rank_unprotected(ctx.cls_attention, ctx.protected, ctx.valid)
        order = ranked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(n, device=order.device).expand(ctx.batch_size, n))
        kept = rank < (ctx.protected + kept_counts)[:, None]
        if ctx.valid is not None:
            kept &= ctx.valid
        kept[:, : ctx.protected] = True
        slot, weight = squeeze_slots(ctx.hidden.detach(), kept, ctx.protected, ctx.valid)
        return Reduction.from_slots(slot, weight)


def squeeze_slots(hidden: torch.Tensor, kept: torch.Tensor, protected: int,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots for TPS: kept tokens keep their own (in input order), pruned real tokens go to their host's.

    Returns ``(slot, weight)``: ``slot`` ``(B, N)`` (-1 for padding) and the value weights ``(B, N)``
    (1 for kept tokens, ``exp(cos - 1)`` for squeezed ones).

    Example:
        >>> import torch
        >>> slot, weight = squeeze_slots(torch.eye(3)[None], torch.tensor([[True, True, False]]), protected=0)
        >>> slot.tolist(), [round(w, 3) for w in weight[0].tolist()]
        ([[0, 1, 0]], [1.0, 1.0, 0.368])
    """
    hosts = kept.clone()
    hosts[:, :protected] = False
    similarity = cosine_scores(hidden, hidden).masked_fill(~hosts[:, None, :], -torch.inf)
    best, host = similarity.max(dim=2)
    own_slot = kept.long().cumsum(dim=1) - 1
    real = torch.ones_like(kept) if valid is None else valid
    pruned = real & ~kept
    slot = torch.where(kept, own_slot, torch.where(pruned, own_slot.gather(1, host), -1))
    weight = torch.where(pruned, torch.exp(best.clamp(-1.0, 1.0) - 1.0), 1.0)
    return slot, weight


__all__ = ["TPSConfig", "squeeze_slots"]
