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

from ...config import register_method
from .base import KeepRateConfig, Reduction, ReductionContext, keep_counts, keep_top, squeeze_slots


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
        return keep_top(ctx.cls_attention, kept_counts, ctx.protected, ctx.valid, squeeze_into=ctx.hidden)


__all__ = ["TPSConfig", "squeeze_slots"]  # squeeze_slots lives in base (SPViT squeezes too)
