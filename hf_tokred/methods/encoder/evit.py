"""EViT: keep the attentive tokens, fuse the rest (Liang et al., "Not All Patches are What You Need: Expediting
Vision Transformers via Token Reorganizations", ICLR'22, arXiv 2202.07800).

In a few blocks (the 4th, 7th and 10th of a 12-block ViT by default), after the attention, EViT ranks the
tokens by the attention the CLS token pays them (averaged over heads), keeps the top ``keep_rate`` fraction
of the non-CLS tokens and fuses all the others into one token, their average weighted by that attention.
The MLP and the later blocks run on the kept tokens plus the fused one.

Where we depart from the paper:

* The fused token is the attention-*normalised* weighted average of the inattentive tokens (also weighted by
  their sizes); the paper sums ``a_i x_i`` without dividing by ``sum a_i``. The average keeps the fused token
  at the scale of the other tokens, which matters for off-the-shelf (not fine-tuned) models.
* Kept tokens stay in their input order, followed by the fused token (the paper keeps them in rank order).
* Its size is the number of input tokens it stands for, so ``prop_attn=True`` (off by default, as in the
  paper) gives it proportional weight in later attention.
* DeiT: both the CLS and the distillation token are protected and their attention rows are averaged.
  Models without a CLS token (SigLIP) rank tokens by the attention they *receive* (averaged over heads and
  queries); see ``docs/encoders.md``.
* Padded batches (BERT): each row keeps ``ceil(keep_rate * n)`` of its own ``n`` real tokens; shorter rows
  get filler slots (size 0, masked), so each row gives what it gives alone.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="evit", keep_rate=0.5)
    >>> cfg.schedule(12)
    [None, None, None, 0.5, None, None, 0.5, None, None, 0.5, None, None]
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import param, register_method
from .base import KeepRateConfig, Reduction, ReductionContext, keep_counts, keep_top


@register_method("evit")
@dataclass(kw_only=True)
class EViTConfig(KeepRateConfig):
    """EViT (arXiv 2202.07800): keep the ``keep_rate`` most CLS-attended tokens, fuse the rest into one.

    Fields:
        keep_rate: fraction of the unprotected tokens kept at each reducing block (the paper's 0.7 default).
        layers: reducing blocks (default: depth 1/4, 1/2, 3/4, the paper's 4th/7th/10th of 12).
        fuse: fuse the inattentive tokens into one token (the paper); False drops them.
        prop_attn, restore_length: see :class:`~hf_tokred.methods.encoder.base.EncoderReducerConfig`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="evit", keep_rate=0.7, layers=[3, 6, 9]).to_dict()["fuse"]
        True
    """

    paper = "2202.07800"
    status = "beta"
    needs = frozenset({"cls_attention"})

    fuse: bool = param(True, bool, help="fuse the inattentive tokens into one token (False: drop them)")

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """Keep the top tokens by ``ctx.cls_attention``; fuse the rest (weighted by that attention).

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> from hf_tokred.methods.encoder.base import ReductionContext
            >>> ctx = ReductionContext(hidden=torch.randn(1, 11, 4), size=torch.ones(1, 11, 1), valid=None,
            ...                        protected=1, class_tokens=1, block=0, num_blocks=1, amount=0.5,
            ...                        cls_attention=torch.rand(1, 11))
            >>> TokenReductionConfig(method="evit").plan(ctx).num_slots      # CLS + 5 kept + 1 fused
            7
        """
        counts = ctx.real_counts()
        kept = keep_counts(counts, ctx.amount)
        if bool((kept == counts).all()):
            return None
        return keep_top(ctx.cls_attention, kept, ctx.protected, ctx.valid,
                        fuse_rest=ctx.cls_attention if self.fuse else None)


__all__ = ["EViTConfig"]
