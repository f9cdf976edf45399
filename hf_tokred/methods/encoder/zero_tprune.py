"""Zero-TPrune: zero-shot token pruning from the attention graph (Wang et al., "Zero-TPrune: Zero-Shot Token
Pruning through Leveraging of the Attention Graph in Pre-Trained Transformers", CVPR'24, arXiv 2305.17328).

Training-free pruning in two stages per reducing block, both from that block's attention:

* **I-stage (importance).** The attention matrix is a graph: a token is important if important tokens attend
  to it. Importance is the stationary vector of a weighted PageRank, ``s <- A^T s`` from the uniform vector
  (``A`` row-stochastic, averaged over heads); the least important tokens are pruned.
* **S-stage (similarity).** The remaining tokens, ranked by importance, are split alternately into two groups;
  each token of the less important group finds its most similar token of the other group (cosine similarity
  of the keys), and the most similar ones are pruned: they duplicate a token that stays.

``similarity_share`` sets how many of a block's pruned tokens the S-stage chooses.

Where we depart from the paper:

* Heads are averaged before the PageRank (the paper's emphasizing-informative-region weighting and its
  variance-based head filter are not used); ``iterations`` power steps (30 by default) replace its
  convergence test.
* The budget is ``keep_rate`` of the unprotected tokens at the blocks in ``layers`` (default: depth 1/4, 1/2,
  3/4), like the other pruning methods here.
* The full attention map is recomputed from the block's queries and keys (SDPA does not return it): one
  extra ``QK^T`` per reducing block, which the FLOP count includes.
* Padded batches: each row prunes from its own real tokens; shorter rows get filler slots.

Example:
    >>> import torch
    >>> from hf_tokred.methods.encoder.zero_tprune import pagerank
    >>> attention = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])   # all attend token 1
    >>> pagerank(attention, iterations=3).argmax(dim=1).tolist()
    [1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from .base import KeepRateConfig, Reduction, ReductionContext, cosine_scores, keep_counts, rank_unprotected


@register_method("zero_tprune")
@dataclass(kw_only=True)
class ZeroTPruneConfig(KeepRateConfig):
    """Zero-TPrune (arXiv 2305.17328): PageRank importance on the attention graph, then similarity pruning.

    Fields:
        keep_rate: fraction of the unprotected tokens kept at each reducing block.
        layers: reducing blocks (default: depth 1/4, 1/2, 3/4).
        similarity_share: fraction of each block's pruned tokens chosen by the S-stage (the rest by importance).
        iterations: PageRank power iterations.
        prop_attn, restore_length: see :class:`~hf_tokred.methods.encoder.base.EncoderReducerConfig`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="zero_tprune", keep_rate=0.6).similarity_share
        0.5
    """

    paper = "2305.17328"
    status = "beta"
    needs = frozenset({"attention", "metric"})

    similarity_share: float = param(0.5, float, low=0.0, high=1.0,
                                    help="fraction of the pruned tokens chosen by similarity (S-stage)")
    iterations: int = param(30, int, low=1, high=1000, help="PageRank power iterations")

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """I-stage then S-stage on this block's attention; returns the kept tokens.

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> from hf_tokred.methods.encoder.base import ReductionContext
            >>> attention = torch.softmax(torch.randn(1, 2, 9, 9), dim=-1)
            >>> ctx = ReductionContext(hidden=torch.randn(1, 9, 4), size=torch.ones(1, 9, 1), valid=None,
            ...                        protected=1, class_tokens=1, block=0, num_blocks=1, amount=0.5,
            ...                        attention=attention, metric=torch.randn(1, 9, 4))
            >>> TokenReductionConfig(method="zero_tprune").plan(ctx).num_slots       # CLS + 4 of 8
            5
        """
        counts = ctx.real_counts()
        kept = keep_counts(counts, ctx.amount)
        if bool((kept == counts).all()):
            return None
        valid = ctx.valid
        attention = ctx.attention.mean(dim=1)
        if valid is not None:  # padding queries vote for nobody
            attention = attention * valid[:, :, None]
        importance = pagerank(attention, self.iterations, valid)
        keep = prune_by_importance_and_similarity(importance, ctx.metric, counts - kept, ctx.protected, valid,
                                                  self.similarity_share)
        return Reduction.from_keep_mask(keep)


def pagerank(attention: torch.Tensor, iterations: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted PageRank on an attention graph ``(B, N, N)`` (rows: queries); returns ``(B, N)`` importances.

    ``s_j <- sum_i A_ij s_i``, from the uniform vector over the real tokens, renormalised each step.

    Example:
        >>> import torch
        >>> pagerank(torch.full((1, 4, 4), 0.25), iterations=5).tolist()
        [[0.25, 0.25, 0.25, 0.25]]
    """
    batch, n, _ = attention.shape
    real = torch.ones(batch, n, device=attention.device) if valid is None else valid.float()
    score = real / real.sum(dim=1, keepdim=True).clamp_min(1.0)
    transposed = attention.float().transpose(1, 2)
    for _ in range(iterations):
        score = torch.bmm(transposed, score[..., None])[..., 0]
        score = score / score.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return score


def prune_by_importance_and_similarity(importance: torch.Tensor, metric: torch.Tensor, pruned: torch.Tensor,
                                       protected: int, valid: torch.Tensor | None,
                                       similarity_share: float) -> torch.Tensor:
    """Zero-TPrune's two stages; ``pruned[b]`` tokens leave row ``b``. Returns the ``(B, N)`` kept mask.

    Example:
        >>> import torch
        >>> importance = torch.tensor([[9.0, 4.0, 3.0, 2.0, 1.0]])
        >>> metric = torch.tensor([[[1.0, 0], [1.0, 0], [1.0, 0.01], [0, 1.0], [0.5, 0.5]]])
        >>> keep = prune_by_importance_and_similarity(importance, metric, torch.tensor([2]), 1, None, 0.5)
        >>> keep.tolist()    # token 4 least important (I-stage); token 2 duplicates token 1 (S-stage)
        [[True, True, False, True, False]]
    """
    batch, n = importance.shape
    device = importance.device
    by_similarity = torch.floor(pruned.double() * similarity_share + 0.5).long()
    ranked = rank_unprotected(importance, protected, valid)
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
    real = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid.clone()
    counts = real[:, protected:].sum(dim=1)
    # S-stage candidates are every other remaining token: at most half of what the I-stage leaves.
    remaining = counts - (pruned - by_similarity)
    by_similarity = torch.minimum(by_similarity, remaining // 2)
    by_importance = pruned - by_similarity
    keep = (rank < (protected + counts - by_importance)[:, None]) & real
    keep[:, :protected] = True
    if not bool((by_similarity > 0).any()):
        return keep
    position = rank - protected  # rank among the unprotected tokens, most important first
    candidate = keep & (position >= 0) & (position % 2 == 1)
    target = keep & (position >= 0) & (position % 2 == 0)
    similarity = cosine_scores(metric, metric).masked_fill(~target[:, None, :], -torch.inf)
    best = similarity.max(dim=2).values.masked_fill(~candidate, -torch.inf)
    order = best.argsort(dim=1, descending=True, stable=True)
    rank2 = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
    drop = candidate & (rank2 < by_similarity[:, None])
    return keep & ~drop


__all__ = ["ZeroTPruneConfig", "pagerank", "prune_by_importance_and_similarity"]
