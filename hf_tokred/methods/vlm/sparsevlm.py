"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", arXiv 2410.04417).

Inside the language model, text-guided: at a few decoder layers the text tokens that are relevant to the image
are chosen as **raters**, and each visual token is scored by the attention the raters pay it (averaged over heads
and raters); only the best-scored visual tokens go on to the later layers. Text tokens are never dropped. Part of
what a layer drops is **recycled**: the best-scored ``recycle_fraction`` of the dropped tokens are grouped into
``n // 10 + 1`` clusters (``n`` recycled tokens), and each cluster goes on as one carrier token holding the mean of
its members' hidden states (``recycling=False`` drops them all). Wiring: :mod:`hf_tokred.integration.vlm`.

Raters: a text token's relevance is the attention mass it puts on the row's visual tokens at the pruning layer
(averaged over heads); the raters are the text tokens that can see the image (those after its first token) whose
relevance is at least the mean relevance of those tokens. Scores: ``attention_from(raters)``, the raters' attention
probabilities to each key averaged over heads and raters. A row without such text tokens (a prompt ending on the
image) is rated by its last token, as FastV does.

Schedule: after layer ``where`` only the cumulative fraction ``keep`` of each row's visual tokens goes on
(``[[where, keep], ...]`` pairs validated and resolved exactly as :mod:`lazyllm's schedule
<hf_tokred.methods.prompt.lazyllm>`: an int ``where`` is a layer index, a float in (0, 1) a fraction of the depth).
By default (``schedule=None``) it is the paper's shape scaled by ``keep``: the paper prunes after layers 2, 6 and 15
of LLaVA's 32 (depth fractions 3/32, 7/32 and 1/2) keeping, for its 192-token budget, 300, 200 and 110 of 576
tokens (about 3 : 2 : 1); we keep ``3 * keep``, ``2 * keep`` and ``keep`` (each at most 1.0, entries keeping 1.0
left out). ``keep`` is thus the fraction that goes on to the last layers; the default 0.2 gives 346, 231 and 116 of
576 tokens. ``keep=1.0`` is the dense model. An explicit ``schedule`` gives its own fractions (``keep`` is then not
used).

Where we depart from the paper:

* Raters: the paper measures a text token's relevance by a softmax of visual-text hidden-state similarity; we use
  the layer's own attention from the text token to the visual tokens, which ignores the massive activations of a
  few hidden-state dimensions and leaves out text before the image (it cannot attend to it, so it cannot rate it).
* The attention is recomputed from the layer's post-RoPE queries and keys, so SDPA works (the paper reads eager
  attention maps); GQA query heads are averaged. The paper's later version (v2, "SparseVLM+") selects heads and
  divides by a RoPE bias; we average all heads as v1 does.
* The number of tokens each layer drops is fixed by the schedule; the paper adapts it per layer from the rank of
  the attention matrix. Carriers go on in addition to ``keep`` (about 3% of the dropped tokens).
* Recycling groups the recycled tokens with a few k-means iterations on their hidden states (``cluster_iterations``;
  centres start at the best-scored tokens, so it is deterministic) rather than the paper's own clustering; a
  carrier is the best-scored member of its cluster and keeps that member's original position.
* Kept tokens and carriers keep their original positions (the paper's v1 renumbers them; its v2 keeps them too),
  and batches of any size with padding work, each row keeping ``ceil(keep * its visual tokens)`` per stage (the
  paper's code runs batch size 1).
* Pruning happens once, in prefill; layers after a cut cache only the tokens that go on.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="sparsevlm", keep=0.2)
    >>> cfg.resolve_schedule(32)
    [(2, 0.6), (6, 0.4), (15, 0.2)]
    >>> TokenReductionConfig(method="sparsevlm", keep=1.0).resolve_schedule(32)
    []
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

import torch

from ...config import param, register_method
from ...vlm.base import InLLMConfig, LayerAttention
from ..prompt.lazyllm import LazyLLMConfig

# The paper's pruning layers (2, 6, 15 of 32) as depth fractions, and the keep of each relative to the last one.
DEFAULT_DEPTHS = (3 / 32, 7 / 32, 1 / 2)
DEFAULT_SHAPE = (3.0, 2.0, 1.0)


@register_method("sparsevlm")
@dataclass(kw_only=True)
class SparseVLMConfig(InLLMConfig):
    """Text-guided visual token pruning inside the language model, with recycling (arXiv 2410.04417).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="sparsevlm", schedule=[[2, 0.5], [0.5, 0.25]])
        >>> cfg.resolve_schedule(32)
        [(2, 0.5), (15, 0.25)]
        >>> cfg.params()["recycling"], cfg.params()["recycle_fraction"]
        (True, 0.3)
    """

    paper: ClassVar[str] = "2410.04417"
    status: ClassVar[str] = "experimental"
    layer_field: ClassVar[str] = "schedule"

    keep: float = param(0.2, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of each row's visual tokens that go on after the last pruning layer; the "
                             "earlier ones keep 3x and 2x that (when schedule is None)")
    schedule: list | None = field(default=None, metadata={
        "help": "[[where, keep], ...] as lazyllm's: after layer `where` (an int layer index, or a float in (0, 1) = "
                "fraction of the depth) only the fraction `keep` of each row's visual tokens goes on; None = the "
                "paper's layers 2, 6, 15 of 32 keeping 3*keep, 2*keep, keep"})
    # Not named `recycle`: that is the method the engine calls.
    recycling: bool = param(True, bool, help="fold the best-scored dropped tokens into carrier tokens (the paper's "
                                             "recycling)")
    recycle_fraction: float = param(0.3, float, low=0.0, high=1.0, low_open=True,
                                    help="fraction of each layer's dropped visual tokens (the best-scored) that are "
                                         "recycled into n // 10 + 1 carriers")
    cluster_iterations: int = param(3, int, low=0, high=100,
                                    help="k-means iterations grouping the recycled tokens (0 = nearest-centre "
                                         "grouping around the best-scored ones)")

    def validate(self) -> None:
        if self.schedule is not None:
            LazyLLMConfig.validate(self)  # the same [[where, keep], ...] rules, errors naming `schedule`

    def entries(self) -> list[list]:
        """The ``[[where, keep], ...]`` schedule in use: the explicit one, or the paper's shape scaled by ``keep``.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="sparsevlm", keep=0.4).entries()
            [[0.09375, 1.0], [0.21875, 0.8], [0.5, 0.4]]
        """
        if self.schedule is not None:
            return [list(entry) for entry in self.schedule]
        return [[where, min(1.0, round(shape * self.keep, 6))] for where, shape in zip(DEFAULT_DEPTHS, DEFAULT_SHAPE)]

    def resolve_schedule(self, num_layers: int) -> list[tuple[int, float]]:
        """``[(layer, keep), ...]`` for a decoder of ``num_layers`` layers (lazyllm's rule: depth fractions
        landing on one layer merge, entries keeping 1.0 are left out; a layer past the depth raises
        :class:`ConfigError` naming ``schedule``).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="sparsevlm", keep=0.25).resolve_schedule(24)
            [(1, 0.75), (4, 0.5), (11, 0.25)]
        """
        resolved = LazyLLMConfig.resolve_schedule(SimpleNamespace(schedule=self.entries()), num_layers)
        return self.check_schedule(resolved, num_layers)

    def score(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        return attention.attention_from(select_raters(attention))

    def recycle(self, hidden: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.recycling:
            return None
        return recycle_tokens(hidden, scores, dropped, self.recycle_fraction, self.cluster_iterations)


# ---------------------------------------------------------------------------------------------
# Plain tensor functions
# ---------------------------------------------------------------------------------------------


def instruction_queries(attention: LayerAttention) -> torch.Tensor:
    """``(batch, q)`` bool: the text queries that can see at least one of their row's visual keys (the text after
    the row's first visual token, in a causal model). Queries are the last ``q`` keys (``q == k`` in prefill).

    Example:
        >>> import torch
        >>> from hf_tokred.vlm.base import LayerAttention
        >>> visual = torch.tensor([[False, True, True, False, False]])
        >>> attn = LayerAttention(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 1.0,
        ...                       torch.ones(5, 5, dtype=torch.bool).tril()[None], visual, ~visual, torch.zeros(1, 5, 8))
        >>> instruction_queries(attn).tolist()
        [[False, False, False, True, True]]
    """
    q = attention.query.shape[2]
    return attention.text[:, -q:] & (attention.visible & attention.visual[:, None, :]).any(dim=-1)


def select_raters(attention: LayerAttention) -> torch.Tensor:
    """``(batch, q)`` bool: each row's raters, the text queries relevant to the image.

    The candidates are the :func:`instruction_queries` (text that can see the image); a candidate's relevance is
    the attention mass (averaged over heads) it puts on the row's visual keys, and the raters are the candidates
    whose relevance is at least the candidates' mean. A row without candidates is rated by its last query.

    Example:
        >>> import torch
        >>> from hf_tokred.vlm.base import LayerAttention
        >>> key = torch.zeros(1, 1, 5, 2); key[0, 0, 1:3, 0] = 4.0        # the visual keys 1, 2
        >>> query = torch.zeros(1, 1, 5, 2); query[0, 0, 3, 0] = 1.0      # query 3 looks at them, query 4 does not
        >>> visual = torch.tensor([[False, True, True, False, False]])
        >>> attn = LayerAttention(query, key, 1.0, torch.ones(5, 5, dtype=torch.bool).tril()[None], visual,
        ...                       ~visual, torch.zeros(1, 5, 8))
        >>> select_raters(attn).tolist()       # token 0 comes before the image: never a candidate
        [[False, False, False, True, False]]
    """
    candidates = instruction_queries(attention)
    picked = candidates.any(dim=0).nonzero().flatten()
    raters = torch.zeros_like(candidates)
    if picked.numel():
        relevance = (attention.query_attention(picked) * attention.visual[:, None, :]).sum(dim=-1)  # (batch, picked)
        chosen = candidates[:, picked]
        mean = (relevance * chosen).sum(dim=-1, keepdim=True) / chosen.sum(dim=-1, keepdim=True).clamp(min=1)
        raters[:, picked] = chosen & (relevance >= mean * (1 - 1e-6))
    unrated = ~raters.any(dim=-1, keepdim=True)
    return torch.where(unrated, attention.last_position(), raters)


def cluster_tokens(hidden: torch.Tensor, clusters: int, iterations: int = 3) -> torch.Tensor:
    """``(n,)`` cluster index of each of ``n`` hidden states (``(n, width)``, ordered best first): k-means on
    Euclidean distance whose ``clusters`` centres start at the first ``clusters`` rows, for ``iterations`` steps
    (0: every row joins its nearest starting centre). Deterministic; a cluster may end up empty.

    Example:
        >>> import torch
        >>> hidden = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.5, 0.0], [9.0, 1.0], [1.0, 1.0]])
        >>> cluster_tokens(hidden, 2).tolist()
        [0, 1, 0, 1, 0]
    """
    points = hidden.float()
    clusters = max(1, min(clusters, points.shape[0]))
    centres = points[:clusters]
    labels = torch.cdist(points, centres).argmin(dim=-1)
    for _ in range(iterations):
        onehot = torch.nn.functional.one_hot(labels, clusters).to(points.dtype)  # (n, clusters)
        counts = onehot.sum(dim=0)
        means = (onehot.T @ points) / counts.clamp(min=1)[:, None]
        centres = torch.where(counts[:, None] > 0, means, centres)  # an empty cluster keeps its centre
        labels = torch.cdist(points, centres).argmin(dim=-1)
    return labels


def recycle_tokens(hidden: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor, fraction: float = 0.3,
                   iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SparseVLM's recycling of one row's dropped tokens: the best-scored ``ceil(fraction * dropped)`` of them are
    grouped into ``n // 10 + 1`` clusters (``n`` of them; :func:`cluster_tokens`), and each non-empty cluster goes
    on as its best-scored member carrying the mean of the members' hidden states.

    ``hidden`` is ``(k, width)``, ``scores`` and ``dropped`` ``(k,)``. Returns ``(carriers, carrier_hidden)``:
    ascending indices of the carriers (dropped tokens) and their new hidden states, or None when nothing is
    dropped. Ties in score go to the earlier token.

    Example:
        >>> import torch
        >>> hidden = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
        >>> scores = torch.tensor([0.9, 0.1, 0.4, 0.3, 0.2])
        >>> dropped = torch.tensor([False, True, True, True, True])
        >>> carriers, carried = recycle_tokens(hidden, scores, dropped, fraction=0.5)   # recycles 2, 3
        >>> carriers.tolist(), carried.tolist()
        ([2], [[3.5]])
    """
    index = dropped.nonzero().flatten()
    if index.numel() == 0:
        return None
    count = min(index.numel(), max(1, math.ceil(round(fraction * index.numel(), 6))))
    # Best first; a stable sort keeps the earlier token first among equal scores.
    order = scores[index].float().sort(descending=True, stable=True).indices[:count]
    members = index[order]
    labels = cluster_tokens(hidden[members], count // 10 + 1, iterations)
    clusters = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, clusters).to(torch.float32)  # (count, clusters)
    sizes = onehot.sum(dim=0)
    means = (onehot.T @ hidden[members].float()) / sizes.clamp(min=1)[:, None]
    # The carrier of a cluster is its first member (members are ordered best first).
    rank = torch.arange(count, device=labels.device)
    first = torch.full((clusters,), count, dtype=torch.long, device=labels.device).scatter_reduce(
        0, labels, rank, reduce="amin")
    live = sizes > 0
    carriers, position = members[first[live]].sort()
    return carriers, means[live][position].to(hidden.dtype)


__all__ = ["SparseVLMConfig", "cluster_tokens", "instruction_queries", "recycle_tokens",
           "select_raters"]
