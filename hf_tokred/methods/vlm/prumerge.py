"""LLaVA-PruMerge and PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv 2403.15388).

Before the language model, per image:

1. **Select** the tokens whose importance is an outlier by the interquartile-range rule (above
   ``Q3 + 1.5 * (Q3 - Q1)``), so the count adapts to the image (``adaptive=True``, the paper's PruMerge); with
   ``adaptive=False`` the top ``ceil(keep * n)`` tokens by importance.
2. **PruMerge+** (``plus=True``) adds spatially uniform samples among the remaining tokens until the budget is
   full: points of a regular sub-grid when the tokens form one raster grid, else a uniform stride over the token
   order. The paper adds about three uniform samples per outlier, reaching about 25% of the tokens.
3. **Merge**: each kept token absorbs its ``neighbors`` nearest pruned tokens (cosine similarity of the tower's
   keys; a pruned token may serve several kept ones): its hidden state becomes the importance-weighted mean of
   itself and those neighbours.

Scores: ``ImageTokens.importance``, i.e. the CLS token's attention on CLIP towers (the paper's signal); on towers
without a CLS token (SigLIP, Qwen2-VL, Idefics3) it is the mean attention each token *receives* from the image's
tokens. Keys: the tower's keys at that layer averaged over heads.

What ``keep`` means: the number of tokens asked for is ``count = ceil(keep * n)``. With ``adaptive=True`` and
``plus=False`` it is an **upper bound** (the IQR outliers, at most ``count`` of them, at least one; the paper
reports about 5.5% of the tokens on average, so the default ``keep=0.25`` rarely binds). With ``plus=True`` the
budget is always filled, exactly ``count`` tokens (the default 0.25 is the paper's PruMerge+ ratio); with
``adaptive=False`` always exactly ``count`` tokens, of which ``uniform_fraction`` are uniform samples under
``plus=True``.

Where we depart from the paper:

* The paper recomputes single-head attention of CLIP-L/336's layer 23 from hooked ``q_proj``/``k_proj``; we use the
  importance and keys the integration reads from the tower (heads averaged), on any tower.
* The merged token is a weighted *mean* (weights: importance, the kept token's own included), so merged tokens keep
  the scale of the others; the paper's code adds the attention-weighted neighbours to the kept token.
* Merging acts on the hidden states the language model receives (after the projector), not on the tower's
  features before it.
* The paper's extra token summarising all pruned tokens is not added: it has no position in the original layout.
* Kept tokens keep their original positions; protected tokens (LLaVA-NeXT's row-end newlines) are always kept,
  never counted, never scored and never merged into. Everything is batched tensor code (the paper loops in Python
  over images and kept tokens).
* ``adaptive=False`` (a fixed count) and ``uniform_fraction`` are our additions. The paper's PruMerge+ adds a
  number of uniform samples that follows its outlier count, so its total varies per image (about 25% on
  average); ours fills the ``keep`` budget exactly.

Example:
    >>> import torch
    >>> from hf_tokred import TokenReductionConfig
    >>> from hf_tokred.vlm.base import ImageTokens
    >>> cfg = TokenReductionConfig(method="prumerge", plus=True)
    >>> g = torch.Generator().manual_seed(0)
    >>> image = ImageTokens(torch.randn(576, 8, generator=g), torch.rand(576, generator=g) ** 8,
    ...                     torch.randn(576, 4, generator=g), (24, 24), torch.zeros(576, dtype=torch.bool))
    >>> cfg.select(image, cfg.kept_count(576)).index.numel()
    144
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import param, register_method
from ...vlm.base import BeforeLLMConfig, ImageTokens, Selection


@register_method("prumerge")
@dataclass(kw_only=True)
class PruMergeConfig(BeforeLLMConfig):
    """Keep the importance outliers (plus uniform samples for PruMerge+) and merge pruned tokens into their nearest
    kept ones (arXiv 2403.15388).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="prumerge").params()
        {'keep': 0.25, 'adaptive': True, 'plus': False, 'neighbors': 32, 'uniform_fraction': 0.75}
    """

    paper: ClassVar[str] = "2403.15388"
    status: ClassVar[str] = "experimental"

    keep: float = param(0.25, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of each image's visual tokens asked for: an upper bound with adaptive=True "
                             "(plus=False), the exact count otherwise; 1.0 = the dense model")
    adaptive: bool = param(True, bool, help="pick the importance outliers by the IQR rule (PruMerge); "
                                            "False = the top ceil(keep * n) tokens")
    plus: bool = param(False, bool, help="PruMerge+: fill the budget with spatially uniform samples")
    neighbors: int = param(32, int, low=1, help="pruned tokens (nearest by key cosine) merged into each kept token")
    uniform_fraction: float = param(0.75, float, low=0.0, high=1.0,
                                    help="with plus=True and adaptive=False: share of the budget taken by uniform "
                                         "samples (the rest by importance)")

    def select(self, image: ImageTokens, count: int) -> Selection:
        candidates = (~image.protected).nonzero().flatten()
        device = image.hidden.device
        if count >= candidates.numel():
            return Selection(torch.arange(len(image), device=device))
        importance = image.importance[candidates].float()
        order = torch.argsort(importance, descending=True, stable=True)
        if self.adaptive:
            top = min(count, max(1, int(iqr_outliers(importance).sum())))
        elif self.plus:
            top = max(1, count - int(round(count * self.uniform_fraction)))
        else:
            top = count
        chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=device)
        chosen[order[:top]] = True
        if self.plus and top < count:
            grid = image.grid
            rows_cols = None
            if grid is not None and grid[0] * grid[1] == len(image) and not bool(image.protected.any()):
                rows_cols = grid
            chosen[spatial_samples(chosen, count - top, rows_cols)] = True
        kept = chosen.nonzero().flatten()
        hidden = knn_merge(image.keys[candidates], image.hidden[candidates], importance, chosen, self.neighbors)
        index = torch.cat([image.protected.nonzero().flatten(), candidates[kept]]).sort().values
        out = image.hidden.clone().index_copy_(0, candidates[kept], hidden.to(image.hidden.dtype))
        return Selection(index, out[index])


def iqr_outliers(scores: torch.Tensor, scale: float = 1.5) -> torch.Tensor:
    """``(n,)`` bool: the scores above the upper fence ``Q3 + scale * (Q3 - Q1)`` (Tukey's rule, the paper's IQR).

    Example:
        >>> import torch
        >>> iqr_outliers(torch.tensor([1.0, 2.0, 2.0, 3.0, 2.0, 30.0, 1.0, 2.0])).tolist()
        [False, False, False, False, False, True, False, False]
    """
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return scores > q3 + scale * (q3 - q1)


def spatial_samples(chosen: torch.Tensor, need: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Indices of ``need`` tokens not yet ``chosen`` (``(n,)`` bool), spread uniformly over the image.

    With ``grid = (rows, cols)`` (the tokens form that raster, ``rows * cols == n``) the free points of a regular
    sub-grid of stride ``floor(sqrt(n / need))`` come first, spread evenly when there are more than needed, and any
    shortfall is taken evenly from the other free tokens; without a grid, an even stride over the free tokens in
    order. Needs ``need <= (~chosen).sum()``; returns ascending indices.

    Example:
        >>> import torch
        >>> chosen = torch.zeros(16, dtype=torch.bool)
        >>> chosen[5] = True
        >>> spatial_samples(chosen, 4, (4, 4)).tolist()   # the stride-2 sub-grid 5, 7, 13, 15 (5 taken), then 8
        [7, 8, 13, 15]
        >>> spatial_samples(chosen, 3).tolist()
        [2, 8, 13]
    """
    free = ~chosen
    if need <= 0:
        return free.nonzero().flatten()[:0]
    if grid is None:
        return _evenly(free.nonzero().flatten(), need)
    rows, cols = grid
    stride = max(1, math.isqrt(chosen.numel() // need))
    r = torch.arange(rows, device=chosen.device)[:, None]
    c = torch.arange(cols, device=chosen.device)[None, :]
    on_grid = ((r % stride == stride // 2) & (c % stride == stride // 2)).flatten()
    preferred = (free & on_grid).nonzero().flatten()
    if preferred.numel() >= need:
        return _evenly(preferred, need)
    extra = _evenly((free & ~on_grid).nonzero().flatten(), need - preferred.numel())
    return torch.cat([preferred, extra]).sort().values


def _evenly(indices: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of ``indices`` (``count <= len``), at the centres of ``count`` equal bins: distinct, in order."""
    total = indices.numel()
    pick = ((2 * torch.arange(count, device=indices.device) + 1) * total) // (2 * count)
    return indices[pick]


def knn_merge(keys: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor,
              neighbors: int) -> torch.Tensor:
    """New hidden states ``(k, d)`` (float32) of the ``kept`` tokens (``(n,)`` bool; ``k`` of them, in order).

    Each kept token's state becomes the ``weights``-weighted mean of its own row and the rows of its ``neighbors``
    most key-cosine-similar pruned tokens (a pruned token may join several kept ones). Negative weights count as
    0; a kept token whose group weighs 0 keeps its own row.

    Example:
        >>> import torch
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
        >>> hidden = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
        >>> weights = torch.tensor([2.0, 2.0, 1.0, 1.0])
        >>> merged = knn_merge(keys, hidden, weights, torch.tensor([True, True, False, False]), 1)
        >>> [round(x, 4) for x in merged.flatten().tolist()]   # (2*1 + 1*3) / 3 and (2*2 + 1*6) / 3
        [1.6667, 3.3333]
    """
    kept_index = kept.nonzero().flatten()
    pruned_index = (~kept).nonzero().flatten()
    h = hidden.float()
    w = weights.float().clamp(min=0.0)
    own = h[kept_index] * w[kept_index, None]
    total = w[kept_index].clone()
    k = min(neighbors, pruned_index.numel())
    if k > 0:
        normed = F.normalize(keys.float(), dim=-1)
        similarity = normed[kept_index] @ normed[pruned_index].T
        nearest = similarity.topk(k, dim=-1).indices
        spread = torch.zeros_like(similarity).scatter_(1, nearest, w[pruned_index][nearest])
        own = own + spread @ h[pruned_index]
        total = total + spread.sum(dim=-1)
    return torch.where(total[:, None] > 0, own / total.clamp(min=1e-30)[:, None], h[kept_index])
