"""ATS: Adaptive Token Sampling (Fayyaz et al., "Adaptive Token Sampler For Efficient Vision Transformers",
ECCV'22, arXiv 2111.15667).

In a reducing block, after the attention, every non-CLS token gets a significance score: the attention the
CLS token pays it times the norm of its value vector, normalised over the tokens. ATS then samples ``K``
tokens by *inverse transform sampling*: the cumulative distribution of the scores (tokens sorted by score) is
read at ``K`` evenly spaced points ``(k + 0.5) / K``; a token whose score spans several points is picked once.
So each image keeps an *adaptive* number of tokens, at most ``K``: fewer when a few tokens dominate.

Rows of a batch keep different numbers of tokens. hf_tokred pads them (the "padded mode"): every row has the
batch's largest count, the surplus slots are fillers with size 0, masked out of every later attention and
reported by ``token_sizes``/``row_counts``. A row in a batch therefore gives exactly what it gives alone.

Where we depart from the paper:

* ``K = ceil(keep_rate * n)`` of the row's ``n`` unprotected tokens, in the reducing blocks given by
  ``layers`` (default: depth 1/4, 1/2, 3/4, as EViT), rather than a fixed ``K`` per stage.
* The sampling points are the deterministic ones (the paper's inference mode); there is no stochastic
  training mode.
* The paper samples rows of its attention matrix inside the attention; here the sampled tokens' states after
  the full attention are kept (the same values: each kept row attended to every key), and the MLP runs on them.
* CLS attention is averaged over heads and multiplied by the norm of the value vector over all heads. Without a
  CLS token (SigLIP) the attention each token receives is used (``docs/encoders.md``).

Example:
    >>> import torch
    >>> from hf_tokred.methods.encoder.ats import inverse_transform_sample
    >>> score = torch.tensor([[0.0, 0.7, 0.1, 0.1, 0.1]])       # token 0 is protected (score ignored)
    >>> inverse_transform_sample(score, torch.tensor([4]), protected=1).long().tolist()
    [[1, 1, 0, 1, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import register_method
from .base import KeepRateConfig, Reduction, ReductionContext, keep_counts


@register_method("ats")
@dataclass(kw_only=True)
class ATSConfig(KeepRateConfig):
    """Adaptive Token Sampling (arXiv 2111.15667): at most ``ceil(keep_rate * n)`` tokens per row, adaptive.

    Fields:
        keep_rate: the sampling budget ``K`` as a fraction of the row's unprotected tokens.
        layers: reducing blocks (default: depth 1/4, 1/2, 3/4).
        prop_attn, restore_length: see :class:`~hf_tokred.methods.encoder.base.EncoderReducerConfig`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="ats", keep_rate=0.5, layers=[2]).schedule(4)
        [None, None, 0.5, None]
    """

    paper = "2111.15667"
    status = "beta"
    needs = frozenset({"cls_attention", "value_norm"})

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """Sample tokens by significance (CLS attention x value norm); rows keep different counts.

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> from hf_tokred.methods.encoder.base import ReductionContext
            >>> ctx = ReductionContext(hidden=torch.randn(1, 9, 4), size=torch.ones(1, 9, 1), valid=None,
            ...                        protected=1, class_tokens=1, block=0, num_blocks=1, amount=0.5,
            ...                        cls_attention=torch.rand(1, 9), value_norm=torch.rand(1, 9))
            >>> TokenReductionConfig(method="ats").plan(ctx).num_slots <= 1 + 4
            True
        """
        counts = ctx.real_counts()
        budget = keep_counts(counts, ctx.amount)
        if bool((budget == counts).all()):
            return None
        score = ctx.cls_attention * ctx.value_norm
        kept = inverse_transform_sample(score, budget, ctx.protected, ctx.valid)
        return Reduction.from_keep_mask(kept)


def inverse_transform_sample(score: torch.Tensor, budget: torch.Tensor, protected: int,
                             valid: torch.Tensor | None = None) -> torch.Tensor:
    """ATS's deterministic inverse transform sampling; returns the ``(B, N)`` bool mask of kept tokens.

    Per row, the unprotected real tokens' scores are normalised and sorted (ascending, as the reference code);
    the cumulative distribution is read at ``(k + 0.5) / budget[b]`` for ``k < budget[b]``, and every token hit
    at least once is kept. Protected tokens are always kept; padding never.

    Example:
        >>> import torch
        >>> inverse_transform_sample(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([2]), 0).tolist()
        [[True, False, True, False]]
    """
    batch, n = score.shape
    device = score.device
    eligible = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid.clone()
    eligible[:, :protected] = False
    weight = torch.where(eligible, score.float().clamp_min(0), 0.0)
    # A row whose scores are all zero samples uniformly among its tokens.
    flat = weight.sum(dim=1, keepdim=True) <= 0
    weight = torch.where(flat & eligible, 1.0, weight)
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    # Non-eligible tokens sort first with zero width, so they are never hit.
    key = torch.where(eligible, weight, -1.0)
    order = key.argsort(dim=1, stable=True)
    cdf = weight.gather(1, order).cumsum(dim=1)
    k_max = int(budget.max().item()) if batch else 0
    steps = torch.arange(k_max, device=device, dtype=torch.float32)[None]
    points = (steps + 0.5) / budget.clamp_min(1)[:, None].float()
    in_budget = steps < budget[:, None]
    hit = torch.searchsorted(cdf, points.contiguous(), right=False).clamp(max=n - 1)
    hit = torch.where(in_budget, hit, n - 1)
    picked = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
    picked.scatter_(1, torch.where(in_budget, order.gather(1, hit), n), True)
    kept = picked[:, :n] & eligible
    kept[:, :protected] = True
    return kept


__all__ = ["ATSConfig", "inverse_transform_sample"]
