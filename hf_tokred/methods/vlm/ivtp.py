"""IVTP: instruction-guided visual token pruning for large vision-language models (Huang et al., "IVTP:
Instruction-guided Visual Token Pruning for Large Vision-Language Models", ECCV 2024, doi:10.1007/978-3-031-72643-9_13;
no arXiv version).

Inside the language model, instruction-guided and group-wise: visual tokens are scored by the attention the
instruction pays them, accumulated over the ``rollout_layers`` decoder layers up to the pruning layer with
**attention rollout**; after that layer (``layer``) only ``keep`` of each row's visual tokens go on, chosen **group
by group**: the row's visual tokens, in order, are cut into groups of ``group_size`` consecutive tokens and every
group keeps its share by score, so every region of the image keeps tokens. Text tokens are never dropped. Wiring:
:mod:`hf_tokred.integration.vlm`.

What is computed, exactly. At each rolled-out layer ``l`` (queries = keys in prefill) let ``A_l`` be the layer's
attention probabilities averaged over heads (``(k, k)`` per row) and ``Â_l = (A_l + I) / 2`` (the residual
stream, as in Abnar & Zuidema's rollout). The rollout restricted to visual sources is
``R_l = Â_l R_{l-1}`` with ``R_{-1} = diag(visual)``: ``R_l[i, j]`` is the share of token ``i``'s state after
layer ``l`` that flows from visual token ``j``'s input to the first rolled-out layer, over every path (through
text and visual tokens alike); columns of non-visual tokens are not tracked. The importance of visual token ``j``
is the mean of ``R_L[i, j]`` over the instruction tokens ``i`` (the text tokens that can see the image, i.e. after
its first token; a row without any uses its last token) at the pruning layer ``L``. The state lives in the
forward pass's ``memory``; ``rollout_layers=1`` is plain instruction attention at layer ``L``.

Group-wise selection. The engine keeps each row's top ``ceil(keep * n)`` scores, so :meth:`IVTPConfig.score`
returns a rank code (:func:`group_ranks`) under which that top-k is the group-wise choice: a token's level is
``(its rank by importance within its group + 1) / group size``, and tokens are ordered by level, then importance.
Equal groups thus keep equal counts (the remainder goes to the groups whose next token scores best) and a smaller
last group keeps its proportional share.

Where we depart from the paper:

* The paper prunes in two places: group-wise token pruning with attention rollout *inside the vision encoder*,
  then an instruction-guided filter inside the LLM (scored through a pseudo-CLS token). Here both ideas act once,
  inside the LLM: the rollout runs over the decoder layers before the cut, the instruction's attention replaces
  the CLS token, and the groups are runs of consecutive visual tokens (a strip of a raster-ordered image; groups
  run across image boundaries). Combine with a before-LLM method for a two-stage pipeline.
* The attention is recomputed from each observed layer's post-RoPE queries and keys, so SDPA works; GQA query
  heads are averaged.
* Kept tokens keep their original positions; batches of any size with padding work, each row keeping
  ``ceil(keep * its visual tokens)``. Pruning happens once, in prefill; layers after the cut cache only the kept
  tokens. In a forward pass whose queries are not its keys (a decoding step) the rollout is skipped.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="ivtp", keep=0.25, layer=2, rollout_layers=3)
    >>> cfg.resolve_schedule(32), cfg.observed_layers(32)
    ([(2, 0.25)], [0, 1, 2])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...config import param, register_method
from ...errors import ConfigError
from ...vlm.base import InLLMConfig, LayerAttention
from .sparsevlm import instruction_queries

MEMORY_KEY = "ivtp.rollout"


@register_method("ivtp")
@dataclass(kw_only=True)
class IVTPConfig(InLLMConfig):
    """Instruction-guided, group-wise visual token pruning with attention rollout (ECCV 2024).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="ivtp", layer=0.25, rollout_layers=2)
        >>> cfg.resolve_schedule(32), cfg.observed_layers(32)
        ([(7, 0.25)], [6, 7])
    """

    paper: ClassVar[str] = "IVTP (ECCV 2024)"  # doi:10.1007/978-3-031-72643-9_13 (not on arXiv)
    status: ClassVar[str] = "experimental"
    layer_field: ClassVar[str] = "layer"

    keep: float = param(0.25, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of each row's visual tokens kept after `layer` (each group keeps its share)")
    layer: int | float = field(default=2, metadata={
        "help": "the layer whose rollout scores the visual tokens and after which they are pruned: an int layer "
                "index, or a float in (0, 1) = fraction of the depth (the first round(layer * depth) layers see "
                "every token)"})
    group_size: int = param(24, int, low=1,
                            help="consecutive visual tokens per group; every group keeps its share (24 = one row "
                                 "of LLaVA-1.5's 24x24 grid)")
    rollout_layers: int = param(3, int, low=1, high=1024,
                                help="layers whose attention is rolled out, ending at `layer` (1 = that layer's "
                                     "attention alone)")

    def validate(self) -> None:
        where = self.layer
        if isinstance(where, bool) or not isinstance(where, (int, float)):
            raise ConfigError(f"layer: expected an int layer index or a float fraction of the depth in (0, 1), got "
                              f"{where!r:.40}", field="layer")
        if isinstance(where, int) and where < 0:
            raise ConfigError(f"layer: layer index {where} is negative; layer indices start at 0", field="layer")
        if isinstance(where, float) and not (0.0 < where < 1.0):
            raise ConfigError(f"layer: depth fraction {where!r} is outside (0, 1) (use an int for a layer index)",
                              field="layer")

    def resolve_schedule(self, num_layers: int) -> list[tuple[int, float]]:
        """``[(layer, keep)]`` for a decoder of ``num_layers`` layers (``[]`` for ``keep=1.0``). A depth fraction
        resolves as in lazyllm's schedule (``round(layer * num_layers) - 1``, within 0 .. ``num_layers`` - 2);
        an int layer past that raises :class:`ConfigError` naming ``layer``.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="ivtp", layer=0.5, keep=0.4).resolve_schedule(24)
            [(11, 0.4)]
        """
        if self.keep >= 1.0:
            return []
        where = self.layer
        layer = where if isinstance(where, int) else min(max(math.floor(where * num_layers + 0.5) - 1, 0),
                                                         num_layers - 2)
        return self.check_schedule([(layer, self.keep)], num_layers)

    def observed_layers(self, num_layers: int) -> list[int]:
        """The rolled-out layers: the last ``rollout_layers`` layers up to and including the pruning layer.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="ivtp", layer=1, rollout_layers=4).observed_layers(24)
            [0, 1]
        """
        stages = self.resolve_schedule(num_layers)
        if not stages:
            return []
        layer = stages[0][0]
        return list(range(max(0, layer - self.rollout_layers + 1), layer + 1))

    def score(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        """Advance the rollout held in ``memory`` by this layer and return the group rank code of the
        instruction's rolled-out attention (at every observed layer; the engine uses the pruning layer's)."""
        instruction = instruction_queries(attention)
        instruction = torch.where(instruction.any(dim=-1, keepdim=True), instruction, attention.last_position())
        if attention.query.shape[2] != attention.key.shape[2]:  # a decoding step: no rollout
            memory.pop(MEMORY_KEY, None)
            importance = attention.attention_from(instruction)
        else:
            previous = memory.get(MEMORY_KEY)
            rollout = rollout_step(attention, previous)
            memory[MEMORY_KEY] = rollout
            importance = (rollout * instruction[..., None]).sum(dim=1) / instruction.sum(dim=-1, keepdim=True)
        return group_ranks(importance, attention.visual, self.group_size)


# ---------------------------------------------------------------------------------------------
# Plain tensor functions
# ---------------------------------------------------------------------------------------------


def rollout_step(attention: LayerAttention, previous: torch.Tensor | None = None) -> torch.Tensor:
    """One layer of attention rollout restricted to visual sources: ``(batch, k, k)`` ``R = (A + I) / 2 @ previous``
    with ``A`` the layer's head-averaged attention probabilities (queries = keys) and ``previous`` the rollout so far
    (None or of another shape: ``diag(visual)``, so only visual columns are ever non-zero).

    Example:
        >>> import torch
        >>> from hf_tokred.vlm.base import LayerAttention
        >>> visual = torch.tensor([[True, True, False]])
        >>> attn = LayerAttention(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 1.0,
        ...                       torch.ones(3, 3, dtype=torch.bool).tril()[None], visual, ~visual, torch.zeros(1, 3, 4))
        >>> rollout_step(attn)[0, 2].tolist()       # the text token: half its own state, a sixth from each token
        [0.1666666716337204, 0.1666666716337204, 0.0]
    """
    k = attention.key.shape[2]
    visual = attention.visual
    if previous is None or tuple(previous.shape) != (visual.shape[0], k, k):
        previous = torch.diag_embed(visual.float())
    probs = attention.query_attention(torch.arange(k, device=visual.device))
    mixed = 0.5 * probs + 0.5 * torch.eye(k, device=probs.device)
    return mixed @ previous.to(mixed.device)


def group_ranks(importance: torch.Tensor, visual: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(batch, k)`` rank code whose top ``m`` over a row's visual keys is the group-wise choice of ``m`` tokens.

    A row's visual tokens, in order, form groups of ``group_size`` (the last may be smaller). A token's level is
    ``(its rank by importance in its group + 1) / its group's size``; tokens are ordered by level, then importance,
    then position, and the ``r``-th of the row's ``n`` visual tokens gets ``1 - r / n`` (non-visual keys get 0).

    Example:
        >>> import torch
        >>> importance = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.0]])
        >>> visual = torch.tensor([[True, True, True, True, True, False]])
        >>> code = group_ranks(importance, visual, 2)     # groups {0, 1}, {2, 3}, {4}
        >>> code.argsort(descending=True)[0, :5].tolist()   # levels 1/2: tokens 0, 2; levels 1: tokens 1, 4, 3
        [0, 2, 1, 4, 3]
    """
    batch, k = importance.shape
    count = visual.sum(dim=-1, keepdim=True)
    slot = visual.long().cumsum(dim=-1) - 1  # index among the row's visual tokens
    group = torch.where(visual, slot // group_size, k)  # non-visual keys last
    size = (count - group * group_size).clamp(max=group_size).clamp(min=1)
    ranked = torch.where(visual, importance.float(), -torch.inf)
    # By importance (ties: earlier first), then stably by group: each group's tokens in a run, best first.
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    order = order.gather(-1, group.gather(-1, order).argsort(dim=-1, stable=True))
    start = (group * group_size).gather(-1, order)
    in_group = torch.arange(k, device=importance.device).expand(batch, k) - start
    rank_in_group = torch.empty_like(in_group).scatter_(-1, order, in_group)
    level = torch.where(visual, (rank_in_group + 1).double() / size.double(), math.inf)
    # By importance (ties: earlier first), then stably by level.
    by_score = ranked.argsort(dim=-1, descending=True, stable=True)
    final = by_score.gather(-1, level.gather(-1, by_score).argsort(dim=-1, stable=True))
    rank = torch.empty_like(final).scatter_(-1, final, torch.arange(k, device=importance.device).expand(batch, k))
    code = 1.0 - rank.float() / count.clamp(min=1).float()
    return torch.where(visual, code, 0.0)


__all__ = ["IVTPConfig", "group_ranks", "rollout_step"]
