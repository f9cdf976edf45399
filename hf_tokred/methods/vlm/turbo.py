"""Turbo (Ju et al., "Turbo: Informativity-Driven Acceleration Plug-In for Vision-Language Large Models",
arXiv 2407.11717; ECCV 2024).

Before the language model, per image: tokens are ranked by their **information degree**, which combines

* **mutual redundancy**: how much a token duplicates another one, its highest cosine similarity to a token of the
  other half of a ToMe-style bipartite split (tower keys by default, ``metric="hidden"`` for the hidden states);
* **semantic value**: its contribution to the image's meaning, ``ImageTokens.importance`` normalised to mean 1
  over the image's candidate tokens.

A token's merge score is ``redundancy - alpha * semantic value``; the tokens with the highest scores (the least
informative: redundant and unimportant) are merged into their most similar partner, with size-weighted means of
hidden states (a merged token is the plain mean of the original tokens it stands for), in bipartite rounds until
exactly ``ceil(keep * n)`` tokens remain. ``alpha = 0`` is plain ToMe matching on the language model's input.

Scores: ``ImageTokens.importance``, i.e. the CLS token's attention on CLIP towers (the paper's semantic value);
on towers without a CLS token (SigLIP, Qwen2-VL, Idefics3) it is the mean attention each token *receives* from
the image's tokens. A merged token's semantic value is the sum of its members' (the attention its group gets).

Where we depart from the paper:

* The paper merges inside the vision tower, a few tokens after every layer (and, for generation, restores them
  afterwards); we merge once, on the hidden states the language model receives, down to a per-image budget
  ``ceil(keep * n)``, in as many bipartite rounds as that takes (each round merges at most half the tokens).
* The language model's attention is not size-weighted (ToMe's proportional attention): a merged token counts
  once however many tokens it stands for.
* The semantic value is normalised to mean 1 over the image, so ``alpha`` means the same at every resolution;
  the paper weighs the raw CLS attention. The default ``alpha`` is our choice.
* Only visual tokens are reduced (the paper's Turbo can also merge text tokens).
* Kept tokens keep their original positions (a merged group sits at its surviving member's position);
  protected tokens (LLaVA-NeXT's row-end newlines) are always kept, never counted and never merged.

Example:
    >>> import torch
    >>> from hf_tokred import TokenReductionConfig
    >>> from hf_tokred.vlm.base import ImageTokens
    >>> cfg = TokenReductionConfig(method="turbo", keep=0.1)
    >>> g = torch.Generator().manual_seed(0)
    >>> image = ImageTokens(torch.randn(576, 8, generator=g), torch.rand(576, generator=g),
    ...                     torch.randn(576, 4, generator=g), (24, 24), torch.zeros(576, dtype=torch.bool))
    >>> sel = cfg.select(image, cfg.kept_count(576))
    >>> sel.index.shape, sel.hidden.shape
    (torch.Size([58]), torch.Size([58, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import param, register_method
from ...vlm.base import BeforeLLMConfig, ImageTokens, Selection


@register_method("turbo")
@dataclass(kw_only=True)
class TurboConfig(BeforeLLMConfig):
    """Merge the least informative visual tokens (redundant and unimportant) before the language model
    (arXiv 2407.11717).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="turbo").params()
        {'keep': 0.25, 'alpha': 0.05, 'metric': 'keys'}
    """

    paper: ClassVar[str] = "2407.11717"
    status: ClassVar[str] = "experimental"

    alpha: float = param(0.05, float, low=0.0,
                         help="weight of the semantic value (importance, mean 1 per image) against the mutual "
                              "redundancy (cosine similarity); 0 = plain ToMe matching")
    metric: str = param("keys", str, choices=("keys", "hidden"),
                        help="what the redundancy compares: the tower's keys or the language model's input states")

    def select(self, image: ImageTokens, count: int) -> Selection:
        candidates = (~image.protected).nonzero().flatten()
        if count >= candidates.numel():
            return Selection(torch.arange(len(image), device=image.hidden.device))
        source = image.keys if self.metric == "keys" else image.hidden
        kept, hidden = informativeness_merge(source[candidates], image.hidden[candidates],
                                             image.importance[candidates], count, self.alpha)
        index = torch.cat([image.protected.nonzero().flatten(), candidates[kept]]).sort().values
        out = image.hidden.clone().index_copy_(0, candidates[kept], hidden.to(image.hidden.dtype))
        return Selection(index, out[index])


def semantic_value(importance: torch.Tensor) -> torch.Tensor:
    """Importance rescaled to mean 1 (negative values count as 0; all zero gives all ones).

    Example:
        >>> import torch
        >>> semantic_value(torch.tensor([0.1, 0.3, 0.0, 0.0])).tolist()
        [1.0, 3.0, 0.0, 0.0]
    """
    value = importance.float().clamp(min=0.0)
    mean = value.mean()
    return value / mean if bool(mean > 0) else torch.ones_like(value)


def informativeness_merge(metric: torch.Tensor, hidden: torch.Tensor, importance: torch.Tensor, count: int,
                          alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``n`` tokens down to ``count`` (``1 <= count <= n``); returns the survivors' indices ``(count,)``,
    ascending, and their hidden states ``(count, d)`` (float32): each the mean of the ``hidden`` rows it stands for.

    Each round splits the current tokens alternately (in order) into sets A and B; an A token's redundancy is its
    highest cosine similarity (on ``metric``, size-weighted mean of its members) to a B token, its score that
    minus ``alpha`` times its :func:`semantic_value` (summed over its members); the highest-scoring A tokens,
    at most all of A, merge into their most similar B token. Rounds repeat until ``count`` tokens remain.

    Example:
        >>> import torch
        >>> metric = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
        >>> hidden = torch.tensor([[1.0], [3.0], [10.0], [20.0]])
        >>> kept, merged = informativeness_merge(metric, hidden, torch.ones(4), 2, alpha=0.0)
        >>> kept.tolist(), merged.flatten().tolist()   # 0 joins 1, 2 joins 3
        ([1, 3], [2.0, 15.0])
        >>> importance = torch.tensor([1.0, 0.0, 0.0, 0.0])  # token 0 carries the meaning: it is not merged
        >>> informativeness_merge(metric, hidden, importance, 3, alpha=1.0)[0].tolist()
        [0, 1, 3]
    """
    alive = torch.arange(metric.shape[0], device=metric.device)
    sums = hidden.float().clone()
    keys = metric.float().clone()
    sizes = torch.ones(alive.numel(), device=metric.device)
    value = semantic_value(importance)
    while alive.numel() > count:
        current = alive.numel()
        a = torch.arange(0, current, 2, device=metric.device)
        b = torch.arange(1, current, 2, device=metric.device)
        normed = F.normalize(keys, dim=-1)  # keys holds sums; the direction of a sum is that of the mean
        best, partner = (normed[a] @ normed[b].T).max(dim=-1)
        score = best - alpha * value[a]
        merged = torch.argsort(score, descending=True, stable=True)[: min(current - count, a.numel())]
        src, dst = a[merged], b[partner[merged]]
        sums.index_add_(0, dst, sums[src])
        keys.index_add_(0, dst, keys[src])
        sizes.index_add_(0, dst, sizes[src])
        value.index_add_(0, dst, value[src])
        stay = torch.ones(current, dtype=torch.bool, device=metric.device)
        stay[src] = False
        alive, sums, keys, sizes, value = alive[stay], sums[stay], keys[stay], sizes[stay], value[stay]
    return alive, sums / sizes[:, None]
