"""ATC: Agglomerative Token Clustering (Haurum et al., "Agglomerative Token Clustering", ECCV'24,
arXiv 2409.11923).

In a reducing block, after the attention, the unprotected tokens are clustered bottom-up: starting from
one cluster per token, the two closest clusters (cosine distance of the block's keys, averaged over heads)
are joined until ``ceil(keep_rate * n)`` clusters are left; each cluster becomes one token, the size-weighted
average of its members (the merge of ToMe, with sizes and optional proportional attention). Unlike ToMe's
bipartite matching, a cluster may gather any number of tokens, and far-apart tokens are never forced together.

Linkage (distance between clusters, updated with the Lance-Williams formulas):
``"average"`` (size-weighted mean of the member distances; the default), ``"complete"`` (largest), ``"single"``
(smallest).

Where we depart from the paper:

* The reducing blocks and budget follow the other pruning methods here (``keep_rate`` at ``layers``, default
  depth 1/4, 1/2, 3/4); average linkage weighs each current token by its size (input tokens it stands for).
* Clustering runs batched on the GPU/CPU with one merge per step for all rows (a Python loop of
  ``n - ceil(keep_rate * n)`` steps of O(N) updates plus one O(N^2) arg-min), not with SciPy.
* Padded batches: padding never joins a cluster and is dropped; rows keep their own numbers of clusters
  (filler slots for shorter rows).

Example:
    >>> import torch
    >>> from hf_tokred.methods.encoder.atc import agglomerative_clusters
    >>> metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1]]])
    >>> agglomerative_clusters(metric, torch.ones(1, 4), torch.tensor([2]), protected=0).tolist()
    [[0, 1, 1, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from .base import KeepRateConfig, Reduction, ReductionContext, cosine_scores, keep_counts

LINKAGES = ("average", "complete", "single")


@register_method("atc")
@dataclass(kw_only=True)
class ATCConfig(KeepRateConfig):
    """Agglomerative Token Clustering (arXiv 2409.11923): cluster the tokens bottom-up, merge each cluster into one.

    Fields:
        keep_rate: clusters kept, as a fraction of the unprotected tokens, at each reducing block.
        layers: reducing blocks (default: depth 1/4, 1/2, 3/4).
        linkage: ``"average"``, ``"complete"`` or ``"single"``.
        prop_attn: proportional attention for the merged tokens (on by default, as ToMe).
        restore_length: see :class:`~hf_tokred.methods.encoder.base.EncoderReducerConfig`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="atc", linkage="complete").linkage
        'complete'
    """

    paper = "2409.11923"
    status = "beta"
    needs = frozenset({"metric"})

    prop_attn: bool = param(True, bool, help="proportional attention: add log(size) to the attention logits")
    linkage: str = param("average", str, choices=LINKAGES, help="cluster distance: average, complete or single")

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """Cluster the unprotected real tokens into ``ceil(amount * n)`` clusters per row and merge each.

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> from hf_tokred.methods.encoder.base import ReductionContext
            >>> ctx = ReductionContext(hidden=torch.randn(2, 9, 4), size=torch.ones(2, 9, 1), valid=None,
            ...                        protected=1, class_tokens=1, block=0, num_blocks=1, amount=0.5,
            ...                        metric=torch.randn(2, 9, 4))
            >>> TokenReductionConfig(method="atc").plan(ctx).num_slots        # CLS + 4 clusters
            5
        """
        counts = ctx.real_counts()
        clusters = keep_counts(counts, ctx.amount)
        if bool((clusters == counts).all()):
            return None
        root = agglomerative_clusters(ctx.metric, ctx.size[..., 0], clusters, ctx.protected, ctx.valid,
                                      self.linkage)
        position = torch.arange(root.shape[1], device=root.device)
        is_root = root == position
        if ctx.valid is not None:
            is_root &= ctx.valid
        slot_of_root = is_root.long().cumsum(dim=1) - 1
        slot = slot_of_root.gather(1, root)
        if ctx.valid is not None:
            slot = torch.where(ctx.valid, slot, -1)
        return Reduction.from_slots(slot)


def agglomerative_clusters(metric: torch.Tensor, size: torch.Tensor, clusters: torch.Tensor, protected: int,
                           valid: torch.Tensor | None = None, linkage: str = "average") -> torch.Tensor:
    """Cluster each row's unprotected real tokens into ``clusters[b]`` groups; returns ``(B, N)`` roots.

    The root of a token is the smallest index in its cluster; protected tokens and padding are their own
    roots. Distances are cosine distances of ``metric``; ``size`` ``(B, N)`` weighs tokens in average linkage.

    Example:
        >>> import torch
        >>> metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
        >>> agglomerative_clusters(metric, torch.ones(1, 3), torch.tensor([1]), protected=1).tolist()
        [[0, 1, 1]]
    """
    if linkage not in LINKAGES:
        raise ValueError(f"agglomerative_clusters: linkage must be one of {LINKAGES}, got {linkage!r}")
    batch, n, _ = metric.shape
    device = metric.device
    eligible = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid.clone()
    eligible[:, :protected] = False
    steps = (eligible.sum(dim=1) - clusters).clamp(min=0)
    root = torch.arange(n, device=device).expand(batch, n).clone()
    total = int(steps.max().item()) if batch else 0
    if total == 0:
        return root
    inf = torch.tensor(torch.inf, device=device)
    distance = 1.0 - cosine_scores(metric, metric)
    pair = eligible[:, :, None] & eligible[:, None, :]
    pair &= ~torch.eye(n, dtype=torch.bool, device=device)
    distance = torch.where(pair, distance, inf)
    weight = size.float().clone()
    rows = torch.arange(batch, device=device)
    # Images: every row merges the same number of times, so no step needs a per-row "still merging" mask.
    uniform = bool((steps == total).all())
    for step in range(total):
        active = None if uniform else step < steps
        flat = distance.view(batch, -1).argmin(dim=1)
        i, j = flat // n, flat % n
        a, b = torch.minimum(i, j), torch.maximum(i, j)
        d_a, d_b = distance[rows, a], distance[rows, b]
        if linkage == "average":
            # Unavailable pairs are inf in both rows and stay inf; the weights of mergeable tokens are > 0.
            w_a, w_b = weight[rows, a], weight[rows, b]
            joined = (w_a[:, None] * d_a + w_b[:, None] * d_b) / (w_a + w_b)[:, None]
        elif linkage == "complete":
            joined = torch.maximum(d_a, d_b)
        else:
            joined = torch.minimum(d_a, d_b)
        joined[rows, a] = inf
        joined[rows, b] = inf
        gone = inf.expand(batch, n)
        if active is not None:
            joined = torch.where(active[:, None], joined, d_a)
            gone = torch.where(active[:, None], gone, d_b)
        distance[rows, a] = joined
        distance[rows, :, a] = joined
        distance[rows, b] = gone
        distance[rows, :, b] = gone
        moved = weight[rows, b] if active is None else torch.where(active, weight[rows, b], 0.0)
        weight[rows, a] += moved
        weight[rows, b] -= moved
        joins = root == b[:, None]
        if active is not None:
            joins &= active[:, None]
        root = torch.where(joins, a[:, None], root)
    return root


__all__ = ["ATCConfig", "LINKAGES", "agglomerative_clusters"]
