"""Token pruning for state-space models that keeps the scan order (after Zhan et al., "Exploring Token Pruning in
Vision State Space Models", NeurIPS'24, arXiv 2409.18962), on transformers' Mamba and Mamba-2.

A Mamba block scans its tokens in sequence order, so a pruned sequence must stay a sequence: at each pruning
block the ``keep`` fraction of the current tokens with the highest importance is kept **in its original order**
and the remaining blocks scan only those tokens. The importance of a token (``score``) is what the blocks before
the pruning block did to it: by default the norm of the last block's update of its hidden state (``"delta"``,
the mixer's per-token contribution to the residual stream; the embedding's norm before block 0), the sum of the
positive channels of that update (``"clipped"``, the paper's aggregation of clipped channel values), or the norm
of its hidden state (``"norm"``). The first ``protect_first`` and last ``protect_last`` tokens of each row are
always kept (the last one gives the next-token logits and ends the scan whose state a cache keeps).

Pruned tokens are not lost from the output: their hidden state from the pruning block is carried unchanged
through the later blocks (their residual stream, with every later block's update taken as zero) and put back
at their positions after the last block, so ``last_hidden_state`` and the logits keep the input's length.

Where we depart from the paper:

* The paper's pruning-aware *hidden-state alignment* keeps the pruned positions in the recurrence so that the
  kept tokens see the state decay of the dense sequence; we drop those steps from the scan (the recurrence sees
  the shorter sequence, consecutive kept tokens are adjacent) and *align* only the residual stream: pruned
  tokens keep the state they had at the pruning block, so every position of the output holds a consistent
  state. This is what makes the later blocks cheaper on every backend (the slow torch scan and the fused
  kernels alike), with no change to the model's code.
* The importance score is read from the residual stream (the previous block's update), not from the SSM's
  output inside the mixer as in the paper; ``score="clipped"`` applies the paper's aggregation (the sum of the
  clipped, i.e. positive, channel values) to it, the default ``"delta"`` takes its norm. Neither needs a hook
  inside the mixer.
* The paper targets vision SSMs (ViM, PlainMamba) and fine-tunes after pruning; we act on causal language
  models, training-free.

With a cache (``generate``): the prompt is pruned in the prefill; the cache of a pruned block then holds the
state of the scan over the kept tokens (the state is fixed-size, so nothing else changes), and decoding steps
(fewer than ``min_tokens`` tokens) run dense on it. Padded batches (left padding, as Mamba generates) keep
``ceil(keep * n)`` of each row's own ``n`` real tokens; shorter rows are left-padded with masked filler slots.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=4)).eval()
    >>> _ = hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [2]})
    >>> model(torch.randint(0, 64, (1, 12))).logits.shape[1]          # the full length again after the last block
    12
    >>> from hf_tokred.integration.ssm import last_pruning
    >>> last_pruning(model).kept.sum().item()                           # ceil(0.5 * 12) tokens scanned by blocks 2, 3
    6
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError

SCORES = ("delta", "clipped", "norm")


@register_method("ssm_prune")
@dataclass(kw_only=True)
class SSMPruneConfig(TokenReductionConfig):
    """SSM token pruning (arXiv 2409.18962): keep the ``keep`` most important tokens, in scan order, at ``layers``.

    Fields:
        keep: fraction of the current tokens kept at each pruning block (1.0 keeps all: the dense model exactly).
        layers: indices of the blocks before which tokens are pruned (ascending; each prunes the sequence left
            by the previous one). An empty list prunes nothing.
        score: ``"delta"`` (norm of the previous block's update of a token, the default), ``"clipped"`` (sum of
            the positive channels of that update: the paper's clipped-channel aggregation) or ``"norm"`` (norm of
            the token's hidden state).
        protect_first: leading real tokens of each row always kept (a BOS / first token).
        protect_last: trailing tokens always kept (the last gives the next-token prediction).
        min_tokens: a call whose sequence at a pruning block is shorter than this runs that block dense
            (decoding steps of one token).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="ssm_prune", keep=0.6, layers=[8, 16]).to_dict()["score"]
        'delta'
    """

    stage: ClassVar[str] = "sequence"
    wiring: ClassVar[str] = "ssm_prune"
    model_kinds: ClassVar[tuple[str, ...]] = ("ssm",)
    paper: ClassVar[str] = "2409.18962"
    status: ClassVar[str] = "beta"

    keep: float = param(0.7, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of the current tokens kept at each pruning block")
    layers: list = param([4], int, low=0, sequence=True, help="blocks before which tokens are pruned")
    score: str = param("delta", str, choices=SCORES, help="importance: 'delta' (norm of the previous block's update), 'clipped' or 'norm'")
    protect_first: int = param(1, int, low=0, help="leading real tokens of each row always kept")
    protect_last: int = param(1, int, low=0, help="trailing tokens of each row always kept")
    min_tokens: int = param(2, int, low=1, help="shorter sequences run the pruning block dense")

    def validate(self) -> None:
        if list(self.layers) != sorted(set(self.layers)):
            raise ConfigError(f"layers: expected distinct block indices in ascending order, got {self.layers}",
                              field="layers")

    def check_depth(self, num_blocks: int) -> None:
        """Raise :class:`ConfigError` when a pruning block is beyond the model's ``num_blocks`` blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="ssm_prune", layers=[2]).check_depth(4)
        """
        beyond = [i for i in self.layers if i >= num_blocks]
        if beyond:
            raise ConfigError(f"layers: block {beyond[0]} does not exist, the model has {num_blocks} blocks "
                              f"(0..{num_blocks - 1})", field="layers")


def token_scores(hidden: torch.Tensor, previous: torch.Tensor | None, score: str) -> torch.Tensor:
    """Importance of each token (``(batch, tokens)``, float32): the norm of ``hidden - previous`` (``"delta"``; of
    ``hidden`` when there is no ``previous``), the sum of its positive channels (``"clipped"``), or the norm of
    ``hidden`` (``"norm"``).

    Example:
        >>> h = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
        >>> token_scores(h, torch.zeros_like(h), "delta").tolist()
        [[5.0, 1.0]]
        >>> token_scores(torch.tensor([[[3.0, -4.0]]]), None, "clipped").tolist()
        [[3.0]]
    """
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    update = hidden if score == "norm" or previous is None else hidden - previous.to(hidden.dtype)
    if score == "clipped":  # the paper's aggregation of clipped channel values
        return update.float().clamp(min=0).sum(dim=-1)
    return update.float().norm(dim=-1)


def keep_count(n: int, keep: float, protected: int) -> int:
    """Tokens a row of ``n`` real tokens keeps: ``ceil(keep * n)``, at least its ``protected`` ones, at most ``n``.

    Example:
        >>> keep_count(10, 0.5, 1), keep_count(3, 0.1, 2), keep_count(0, 0.5, 1)
        (5, 2, 0)
    """
    return min(n, max(math.ceil(keep * n - 1e-9), protected))


@dataclass
class Selection:
    """The tokens a pruning block keeps, in the coordinates of its input sequence.

    Attributes:
        index: ``(batch, K)`` positions kept, ascending in each row (original order); a row keeping fewer than
            ``K`` tokens starts with filler slots (left padding) pointing at distinct pruned positions.
        valid: ``(batch, K)`` bool, False at filler slots.
        padded: some row has filler slots.
    """

    index: torch.Tensor
    valid: torch.Tensor
    padded: bool


def select_tokens(scores: torch.Tensor, valid: torch.Tensor | None, keep: float, protect_first: int,
                  protect_last: int) -> Selection | None:
    """Choose the kept tokens of each row from ``scores`` (``(batch, tokens)``); None when every row keeps all.

    ``valid`` masks real tokens (False at padding); each row keeps ``keep_count(n, keep, protected)`` of its own
    ``n`` real tokens: its first ``protect_first`` and last ``protect_last`` real tokens, then the highest scores
    (ties go to the earlier token), always in their original order.

    Example:
        >>> s = select_tokens(torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0]]), None, 0.6, 1, 0)
        >>> s.index.tolist(), s.padded
        ([[0, 1, 3]], False)
    """
    batch, n = scores.shape
    device = scores.device
    if valid is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    real = valid.sum(1)
    rank = valid.long().cumsum(1) - 1  # rank of each real token in its row
    protected = valid & ((rank < protect_first) | (rank >= (real - protect_last).unsqueeze(1)))
    counts = [keep_count(int(r), keep, int(p)) for r, p in zip(real.tolist(), protected.sum(1).tolist())]
    if all(c == n for c in counts):
        return None
    ranked = torch.where(protected, torch.inf, torch.where(valid, scores.float(), -torch.inf))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    position_rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
    counts_t = torch.tensor(counts, device=device)
    chosen = (position_rank < counts_t.unsqueeze(1)) & valid
    positions = torch.arange(n, device=device).expand(batch, n)
    # Chosen tokens sort after all others and in position order; the last K slots are the kept tokens, left-padded.
    width = max(counts)
    key = torch.sort(torch.where(chosen, positions + n, positions), dim=1).values[:, n - width:]
    slot_valid = key >= n
    index = torch.where(slot_valid, key - n, key)
    return Selection(index=index, valid=slot_valid, padded=bool((~slot_valid).any()))


# The wiring registers itself on import; the method file imports it so that the method always has its wiring.
from ...integration import ssm as _wiring  # noqa: E402,F401
