"""A-ViT: adaptive tokens by per-token halting (Yin et al., CVPR 2022, arXiv 2112.07658), for encoder sequences.

Before every *halting block* (by default every block after the first) a halting head gives each token a halting
score ``h`` in (0, 1) from its hidden state; scores add up per token over the blocks (the cumulative halting
score ``H``, adaptive computation time), and a token *halts* when ``H`` reaches ``1 - eps``: it leaves the
sequence and runs no further block. Tokens halt at different depths and rows keep different numbers of
tokens (rows with fewer tokens get filler slots, which later blocks mask out).

* **Inference** (halting heads in eval mode): halted tokens are dropped (hard drop, real speed-up). With
  ``select="top_k"`` (our addition) each halting block halts a fixed share of every row instead of thresholding:
  the share the distributional prior gives that block (:meth:`AViTConfig.target_distribution`), taken from the
  tokens with the highest cumulative halting scores, so every row saves the same FLOPs (as IA-RED²'s
  ``select="top_k"`` and DynamicViT). With ``restore_length=True`` a halted token comes back in
  ``last_hidden_state`` with the state it had when it halted, as in the paper, where a halted token's last state
  is its output (on MiniLM's mean-pooled sentence embeddings those early states do worse than dropping the token:
  docs/encoders.md).
* **Training** (heads in training mode): every token stays in the sequence; a halted token is masked out as a
  *key* of the later blocks' attention (straight-through, so gradients reach the heads through the attention),
  and each stage records its halting scores for the losses of :mod:`hf_tokred.recipes.avit`: the ponder loss
  (the remainders of ACT), the paper's distributional prior (KL from a Gaussian over halting depths centred
  at ``target_depth`` to the batch's halting-depth distribution) and distillation from the dense model.

The halting heads are learned parts (``learned = True``): ``apply`` attaches them as
``model.hf_tokred_modules["avit"]``; ``save_pretrained`` / ``push_to_hub`` write them to
``token_reduction.safetensors`` and ``from_pretrained`` loads them. Train them with
:func:`hf_tokred.recipes.avit.train_avit` (or ``hf-tokred train avit``).

Where we depart from the paper:

* The paper reserves one embedding channel of a ViT trained with A-ViT from the start (``h = sigmoid(gamma *
  t_e + beta)``, gamma=5, beta=-10). Our backbones are pretrained without halting, so each halting block gets a
  tiny learned head instead: ``h = sigmoid(w . LayerNorm(x) + b)`` (``D + 1`` weights per block, no affine
  LayerNorm), its bias started so that tokens halt near ``target_depth`` from the first step.
* Halting sits *before* a block (on the previous block's output), so block 0 always runs on every token, and
  protected tokens (CLS, registers) never halt; at least one token stays in every row.
* Training fine-tunes only the halting heads by default (the paper trains the whole ViT for 100 epochs);
  :func:`hf_tokred.training.fine_tune_reduced` can then adapt the backbone through the hard halting. The
  distillation target is the dense model's sentence embedding (and its logits, when the model has any) rather
  than the paper's classification loss, and the student is read out as at inference (state at halting, or the
  tokens still running) with straight-through gradients through a smooth halting indicator
  (``sigmoid((1 - eps - H) / 0.05)``), instead of the paper's ACT-weighted mean of each token's states. The
  distributional prior is taken over that smooth halting-depth distribution (the paper's over the mean halting
  scores per layer), so that its centre predicts the hard halting depth, hence the FLOPs.
* ``target_depth`` (the mean fraction of the blocks a token runs through, the prior's centre) is the FLOPs knob:
  about ``1 - target_depth`` of the block FLOPs are saved once trained.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="avit", target_depth=0.7)
    >>> cfg.halting_blocks(6), cfg.schedule(4)
    ([1, 2, 3, 4, 5], [None, True, True, True])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError
from .base import SELECTS, EncoderReducerConfig, Reduction, beside_block, keep_counts, top_mask
from .dynamicvit import _hidden_size

MODULE_NAME = "avit"
# Temperature of the smooth halting indicator used in training (in units of the cumulative halting score).
SURVIVAL_TEMPERATURE = 0.05
RECORD_KEY = "avit"


class HaltingHeads(nn.Module):
    """A-ViT's halting scores: one head ``sigmoid(w . LayerNorm(x) + b)`` per halting block.

    ``forward(x, stage)`` maps hidden states ``(B, N, D)`` to halting scores ``(B, N)`` in (0, 1).

    Example:
        >>> import torch
        >>> heads = HaltingHeads(16, [1, 2], initial_score=0.25)
        >>> h = heads(torch.randn(2, 5, 16), heads.stage_of(2))
        >>> h.shape, bool(((h > 0.2) & (h < 0.3)).all())
        (torch.Size([2, 5]), True)
    """

    def __init__(self, dim: int, blocks: list[int], initial_score: float = 0.25):
        super().__init__()
        self.blocks = list(blocks)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in blocks)
        score = min(max(initial_score, 0.02), 0.98)
        with torch.no_grad():
            for head in self.heads:
                head.weight.normal_(0.0, 0.02)  # small: tokens start near the initial score, training spreads them
                head.bias.fill_(math.log(score / (1 - score)))

    def stage_of(self, block: int) -> int:
        return self.blocks.index(block)

    def forward(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        return torch.sigmoid(self.heads[stage](self.norm(x)).squeeze(-1))


@dataclass
class HaltingStage:
    """What one halting block decided in a training forward pass (for the losses).

    Attributes:
        block: the block before which the tokens halted.
        hidden: ``(B, N, D)`` the tokens' states there (the block's input).
        mass: ``(B, N)`` ACT probability mass of this state in each token's output: ``h`` for a token that goes on,
            the remainder ``1 - H_prev`` for one that halts here, 0 for one that halted before (carries gradients).
        running: ``(B, N)`` float 0/1: the token was still running when it reached this block.
        halted: ``(B, N)`` bool: the token halts here.
        survival: ``(B, N)`` smooth "still running after this block" ``sigmoid((1 - eps - H) / SURVIVAL_TEMPERATURE)``
            (carries gradients; its decrease from one halting block to the next is the token's halting probability).
    """

    block: int
    hidden: torch.Tensor
    mass: torch.Tensor
    running: torch.Tensor
    halted: torch.Tensor
    survival: torch.Tensor


@dataclass
class HaltingRecord:
    """The per-call halting state (``state.records["avit"]``).

    Attributes:
        cumulative: ``(B, N)`` cumulative halting scores of the current tokens (current layout).
        running: ``(B, N)`` bool: still running (training; at inference halted tokens are gone).
        depth: ``(B, N_in)`` long: blocks each input token ran through (input positions; the model depth for
            tokens that never halt).
        stages: training only: one :class:`HaltingStage` per halting block.
    """

    cumulative: torch.Tensor | None = None
    running: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    stages: list[HaltingStage] = field(default_factory=list)


@register_method("avit")
@dataclass(kw_only=True)
class AViTConfig(EncoderReducerConfig):
    """A-ViT (arXiv 2112.07658): per-token halting (adaptive computation time); see the module docstring.

    Fields:
        target_depth: mean fraction of the blocks a token should run through (the centre of the distributional
            prior of training, and the initial halting rate): the FLOPs knob, about ``1 - target_depth`` of the
            block FLOPs saved. Changing it needs a new training.
        layers: blocks before which tokens may halt (default: every block but the first). ``[]`` never halts
            (bit-identical to dense).
        eps: a token halts when its cumulative halting score reaches ``1 - eps`` (the paper's 0.01).
        prior_std: standard deviation, in blocks, of the Gaussian target distribution of halting depths.
        select: ``"threshold"`` (the paper: a token halts when its cumulative score reaches ``1 - eps``, rows
            save different FLOPs) or ``"top_k"`` (each halting block halts the prior's share of every row, the
            tokens of highest cumulative score; the FLOPs of :meth:`expected_depth`). Inference only: the
            heads train the same way for both.
        restore_length, prop_attn: as for every encoder reducer (``restore_length=True`` returns each halted
            token with its state at halting, the paper's output).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="avit", layers=[2, 4]).halting_blocks(6)
        [2, 4]
    """

    paper = "2112.07658"
    learned = True
    status = "beta"  # held-out MiniLM cosine 0.9731 at 30.1 % saved with select="top_k" (docs/methods.md)
    reduce_at = "input"

    target_depth: float = param(0.7, float, low=0.0, high=1.0, low_open=True,
                                help="mean fraction of the blocks a token runs through (FLOPs knob of training)")
    layers: list[int] | None = param(None, int, low=0, sequence=True, optional=True,
                                     help="blocks before which tokens may halt (default: every block but the first)")
    eps: float = param(0.01, float, low=0.0, high=1.0, low_open=True, high_open=True,
                       help="a token halts when its cumulative halting score reaches 1 - eps")
    prior_std: float = param(1.0, float, low=0.0, low_open=True,
                             help="std (blocks) of the Gaussian target distribution of halting depths")
    select: str = param("threshold", str, choices=SELECTS,
                        help="threshold (the paper) or top_k (the prior's share of every row halts)")

    def validate(self) -> None:
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers: expected distinct block indices, got {self.layers!r}", field="layers")
        if self.layers is not None and 0 in self.layers:
            raise ConfigError("layers: tokens cannot halt before block 0 (halting reads a block's output)",
                              field="layers")

    def halting_blocks(self, num_blocks: int) -> list[int]:
        """The blocks before which tokens may halt in a model with ``num_blocks`` blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="avit").halting_blocks(4)
            [1, 2, 3]
        """
        if self.layers is None:
            return list(range(1, num_blocks))
        bad = [i for i in self.layers if i >= num_blocks]
        if bad:
            raise ConfigError(f"layers: block {bad[0]} does not exist; the model has {num_blocks} blocks "
                              f"(0..{num_blocks - 1})", field="layers")
        return sorted(self.layers)

    def schedule(self, num_blocks: int) -> list[bool | None]:
        """True before every halting block, None elsewhere.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="avit", layers=[1]).schedule(3)
            [None, True, None]
        """
        blocks = set(self.halting_blocks(num_blocks))
        return [True if i in blocks else None for i in range(num_blocks)]

    def initial_score(self, num_blocks: int) -> float:
        """The halting score every token starts with: cumulative scores reach ``1 - eps`` at the last halting block
        within ``target_depth`` of the blocks (tokens start by all running about ``target_depth * num_blocks`` blocks).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="avit", target_depth=0.5).initial_score(6)
            0.33
        """
        within = [b for b in self.halting_blocks(num_blocks) if b <= self.target_depth * num_blocks + 1e-9]
        return (1.0 - self.eps) / max(len(within), 1)

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The halting heads, one per halting block, on the device and dtype of the first block.

        Example:
            >>> list(cfg.learned_modules(model, adapter))              # doctest: +SKIP
            ['avit']
        """
        blocks = adapter.blocks(model)
        stages = self.halting_blocks(len(blocks))
        first = blocks[stages[0]] if stages else blocks[0]
        heads = HaltingHeads(_hidden_size(model, first), stages, self.initial_score(len(blocks)))
        beside_block(heads, first, model.training)
        return {MODULE_NAME: heads}

    def target_distribution(self, num_blocks: int) -> tuple[torch.Tensor, list[int]]:
        """The prior over halting outcomes: halting before each halting block, or running all ``num_blocks``.

        Returns ``(probabilities, depths)``: a discretised Gaussian centred at ``target_depth * num_blocks`` blocks
        with ``prior_std``, and the blocks run for each outcome.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> p, depths = TokenReductionConfig(method="avit", target_depth=0.5).target_distribution(4)
            >>> depths, round(float(p.sum()), 4)
            ([1, 2, 3, 4], 1.0)
        """
        depths = [*self.halting_blocks(num_blocks), num_blocks]
        centre = self.target_depth * num_blocks
        logits = torch.tensor([-0.5 * ((d - centre) / self.prior_std) ** 2 for d in depths], dtype=torch.float64)
        return torch.softmax(logits, dim=0).float(), depths

    def expected_depth(self, num_blocks: int) -> float:
        """The mean fraction of the blocks a token runs through under the prior: with ``select="top_k"`` the
        share of the block FLOPs every row keeps (``1 - expected_depth`` is saved, up to rounding per row).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> cfg = TokenReductionConfig(method="avit", target_depth=0.73, layers=[2], prior_std=3.0)
            >>> round(cfg.expected_depth(6), 3)
            0.695
        """
        probabilities, depths = self.target_distribution(num_blocks)
        return float((probabilities.double() * torch.tensor(depths, dtype=torch.float64)).sum()) / num_blocks

    def _top_k_halts(self, ctx, stage: int, cumulative: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` bool: the tokens that halt before halting block ``stage`` with ``select="top_k"``: of the
        tokens still running, the prior's share for this block (relative to what is still running), those with the
        highest cumulative halting score."""
        probabilities, _ = self.target_distribution(ctx.num_blocks)
        before = float(probabilities[:stage].sum())
        after = float(probabilities[: stage + 1].sum())
        share_kept = (1.0 - after) / max(1.0 - before, 1e-12)
        kept = keep_counts(ctx.real_counts(), min(max(share_kept, 0.0), 1.0))
        return candidates & ~top_mask(-cumulative, kept, ctx.protected, ctx.valid)

    def plan(self, ctx):
        """One halting block: soft key masks of the halted tokens (training) or a hard drop (inference)."""
        heads = ctx.learned_part(MODULE_NAME, "halting heads")
        stage = heads.stage_of(ctx.block)
        n = ctx.num_tokens
        device = ctx.hidden.device
        real, candidates = ctx.real_and_candidates()
        record = ctx.state.records.get(RECORD_KEY)
        if record is None:
            record = ctx.state.records[RECORD_KEY] = HaltingRecord()
        if record.depth is None:
            record.depth = torch.full(ctx.state.origin.shape, ctx.num_blocks, dtype=torch.long, device=device)
        if heads.training:
            return self._soft(ctx, heads, stage, record, candidates)
        with torch.no_grad():
            score = heads(ctx.hidden, stage).float()
            previous = record.cumulative if record.cumulative is not None else torch.zeros_like(score)
            cumulative = previous + score
            if self.select == "top_k":
                halted = self._top_k_halts(ctx, stage, cumulative, candidates)
            else:
                halted = candidates & (cumulative >= 1.0 - self.eps)
            if ctx.protected == 0:
                # At least one token stays in every row: the one furthest from halting, if all would halt.
                all_halt = (halted | ~real).all(dim=1)
                if bool(all_halt.any()):
                    stay = cumulative.masked_fill(~real, math.inf).argmin(dim=1)
                    halted = halted & ~(all_halt[:, None] & (torch.arange(n, device=device) == stay[:, None]))
            if not bool(halted.any()):
                record.cumulative = cumulative
                return None
            _note_depth(record, ctx.state.anchor, halted, ctx.block, ctx.num_blocks)
            reduction = Reduction.from_keep_mask(real & ~halted)
            record.cumulative = cumulative.gather(1, reduction.keep)
            return reduction

    def _soft(self, ctx, heads, stage, record, candidates):
        from .base import SoftMask

        score = heads(ctx.hidden, stage)
        running = record.running if record.running is not None else candidates
        previous = record.cumulative if record.cumulative is not None else torch.zeros_like(score)
        go = running.to(score.dtype)
        cumulative = previous + score * go
        halted = running & (cumulative >= 1.0 - self.eps)
        mass = torch.where(halted, 1.0 - previous, score * go)
        still = running & ~halted
        survival = torch.sigmoid((1.0 - self.eps - cumulative) / SURVIVAL_TEMPERATURE)
        record.stages.append(HaltingStage(ctx.block, ctx.hidden, mass, go, halted, survival))
        record.cumulative, record.running = cumulative, still
        _note_depth(record, ctx.state.anchor, halted, ctx.block, ctx.num_blocks)
        # Straight-through key weight: 0/1 forward, the gradient of the smooth survival backward; tokens that
        # halted earlier (or never ran: protected, padding) keep factor 1 (the earlier mask already holds them).
        hard = still.to(score.dtype)
        factor = torch.where(running, hard + survival - survival.detach(), torch.ones_like(survival))
        return SoftMask(key_weight=factor, keep_self=True)


def _note_depth(record: HaltingRecord, anchors: torch.Tensor, halted: torch.Tensor, block: int, num_blocks: int):
    """Write ``block`` as the depth of the input tokens that halt here (filler slots share anchors with real
    tokens: the smallest depth wins, so a filler never overwrites a real token's)."""
    depth = torch.where(halted, block, num_blocks)
    record.depth.scatter_reduce_(1, anchors, depth, reduce="amin", include_self=True)


def halting_record(model) -> HaltingRecord:
    """The halting state of the last forward pass of an A-ViT model.

    Example:
        >>> halting_record(model).depth                             # doctest: +SKIP
        tensor([[6, 3, 2, 6, ...]])
    """
    from ...integration.encoders import STATE_ATTR

    state = model.__dict__.get(STATE_ATTR)
    if state is None or RECORD_KEY not in state.records:
        raise TokenReductionError(f"avit: {type(model).__name__} has no A-ViT halting record; apply an avit reduction "
                                  "and run a forward pass first")
    return state.records[RECORD_KEY]


def halting_depths(model) -> torch.Tensor:
    """``(B, N_in)`` long: the number of blocks each input token ran through in the last forward pass (input
    positions; protected tokens and tokens that never halted ran all blocks).

    Example:
        >>> model(**batch); halting_depths(model)[0, :8].tolist()    # doctest: +SKIP
        [6, 2, 6, 3, 3, 6, 4, 6]
    """
    return halting_record(model).depth.clone()


__all__ = ["AViTConfig", "HaltingHeads", "HaltingRecord", "HaltingStage", "halting_depths", "halting_record"]
