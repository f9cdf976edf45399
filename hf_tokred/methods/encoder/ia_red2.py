"""IA-RED²: interpretability-aware redundancy reduction (Pan et al., NeurIPS 2021, arXiv 2106.12620).

The encoder is split into groups of blocks; before the first block of each group (the *stages*, by default at
1/4, 1/2 and 3/4 of the depth) a light *multi-head interpreter* scores every token: the token's normalised state
goes through a narrow linear layer and GELU, is split into heads, each head gives a logit, and the mean of the
heads' logits through a sigmoid is the token's keep probability. Tokens judged redundant are dropped for the rest
of the encoder. The keep probabilities are the method's interpretation of the input: after a forward pass
:func:`keep_probabilities` gives them per stage at the input positions, and :func:`kept_tokens` the final mask.

* **Inference** (interpreters in eval mode): with ``select="threshold"`` (the paper's) each stage keeps the tokens
  whose keep probability exceeds ``threshold``, so rows keep different numbers of tokens (filler slots); with
  ``select="top_k"`` it keeps ``ceil(keep_rate * n)`` per row (fixed FLOPs, as DynamicViT).
* **Training** (interpreters in training mode): each stage samples keep/drop actions from the Bernoulli policy;
  dropped tokens stay in the sequence but are masked out as keys of the later blocks' attention, and the actions
  and their log-probabilities are recorded for the REINFORCE loss of :mod:`hf_tokred.recipes.ia_red2`, whose
  reward is high when the reduced model's output matches the dense model's and the kept fraction matches the
  target ``keep_rate ** stage``.

The interpreters are learned parts (``model.hf_tokred_modules["ia_red2"]``, saved to
``token_reduction.safetensors``); train them with :func:`hf_tokred.recipes.ia_red2.train_ia_red2`.

Where we depart from the paper:

* The paper trains the policy with REINFORCE alone (reward ``1 - kept_fraction**2`` for a correct prediction,
  a penalty otherwise), then fine-tunes the backbone, on ImageNet classification. Our reward is the cosine of the
  reduced model's sentence embedding (or logits' agreement) to the dense model's minus a penalty on the distance to
  the target kept fraction (``keep_rate`` per stage), so the FLOPs are a setting; and by default a differentiable
  surrogate is added to the policy gradient (straight-through actions in the attention masks, the expected kept
  fraction), which converges in far fewer steps; ``surrogate_weight=0`` in the trainer gives pure REINFORCE.
* The interpreter is narrower than the paper's (``interpreter_dim``, default 64 channels split into ``heads``), so
  that its FLOPs stay small on small encoders; protected tokens (CLS, registers) are always kept and at least one
  token stays in every row. ``select="top_k"`` is our addition.
* ``squeeze=True`` (ours, off by default) folds each dropped token into its most similar kept token instead of
  discarding it (TPS's squeezing, Wei et al., CVPR'23, arXiv 2304.10716, which applies to any pruner's decision;
  :func:`~hf_tokred.methods.encoder.base.squeeze`). The same tokens are kept, so the masks and the FLOPs do not
  change; the interpreters and their training are unchanged.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="ia_red2", keep_rate=0.7, layers=[2])
    >>> cfg.schedule(6)
    [None, None, 0.7, None, None, None]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError
from .base import SELECTS, KeepRateConfig, Reduction, SoftMask, beside_block, keep_counts, keep_top, squeeze
from .dynamicvit import _hidden_size

MODULE_NAME = "ia_red2"
RECORD_KEY = "ia_red2"


class MultiHeadInterpreter(nn.Module):
    """One stage's policy network: ``(B, N, D)`` states to ``(B, N)`` keep logits (mean of the heads' logits).

    Example:
        >>> import torch
        >>> net = MultiHeadInterpreter(32, width=16, heads=4, keep_rate=0.7)
        >>> logits, per_head = net(torch.randn(2, 5, 32))
        >>> logits.shape, per_head.shape
        (torch.Size([2, 5]), torch.Size([2, 5, 4]))
    """

    def __init__(self, dim: int, width: int = 64, heads: int = 4, keep_rate: float = 0.7):
        super().__init__()
        if width % heads:
            raise UnsupportedModelError(f"ia_red2: interpreter_dim ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.inner = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU())
        self.head_weight = nn.Parameter(torch.randn(heads, width // heads) * (heads / width) ** 0.5)
        keep = min(max(keep_rate, 0.05), 0.95)
        # Every token starts at the stage's keep probability, so training starts at the target ratio.
        self.head_bias = nn.Parameter(torch.full((heads,), math.log(keep / (1 - keep))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.inner(x)
        inner = inner.unflatten(-1, (self.heads, -1))
        per_head = (inner * self.head_weight).sum(-1) + self.head_bias
        return per_head.mean(-1), per_head


class Interpreters(nn.ModuleList):
    """The interpreters of every stage (``model.hf_tokred_modules["ia_red2"]``); ``blocks`` are their positions.

    Example:
        >>> m = Interpreters(32, [1, 3], width=16, heads=2)
        >>> len(m), m.stage_of(3)
        (2, 1)
    """

    def __init__(self, dim: int, blocks: list[int], width: int = 64, heads: int = 4, keep_rate: float = 0.7):
        super().__init__([MultiHeadInterpreter(dim, width, heads, keep_rate) for _ in blocks])
        self.blocks = list(blocks)

    def stage_of(self, block: int) -> int:
        return self.blocks.index(block)


@dataclass
class PolicyStage:
    """One stage of a training forward pass (for the REINFORCE loss).

    Attributes:
        probability: ``(B, N)`` keep probabilities (carry gradients).
        action: ``(B, N)`` float 0/1 sampled actions (1 = keep).
        deciding: ``(B, N)`` bool: the tokens this stage decided on (unprotected, real, not dropped before).
        kept_fraction: ``(B,)`` fraction of the row's unprotected real tokens kept after this stage.
        target: the target of that fraction, ``keep_rate ** (stage + 1)``.
    """

    probability: torch.Tensor
    action: torch.Tensor
    deciding: torch.Tensor
    kept_fraction: torch.Tensor
    target: float


@dataclass
class InterpretRecord:
    """Per-call record (``state.records["ia_red2"]``).

    Attributes:
        probabilities: per stage, ``(B, N_in)`` keep probabilities at the input positions (1 for protected tokens,
            0 for tokens dropped at an earlier stage or padding).
        kept: ``(B, N_in)`` bool, the input tokens still in the sequence after the last stage.
        stages: training only: one :class:`PolicyStage` per stage.
        policy: training only: ``(B, N)`` running 0/1 keep policy (straight-through).
    """

    probabilities: list[torch.Tensor] = field(default_factory=list)
    kept: torch.Tensor | None = None
    stages: list[PolicyStage] = field(default_factory=list)
    policy: torch.Tensor | None = None


@register_method("ia_red2")
@dataclass(kw_only=True)
class IARed2Config(KeepRateConfig):
    """IA-RED² (arXiv 2106.12620): multi-head interpreters drop redundant tokens; see the module docstring.

    Fields:
        keep_rate: target fraction of the current unprotected tokens each stage keeps (training target; the count
            kept with ``select="top_k"``). 1.0 keeps every token: bit-identical to dense.
        layers: blocks before which a stage drops tokens (default: depth 1/4, 1/2, 3/4).
        select: ``"threshold"`` (keep tokens whose probability exceeds ``threshold``; the paper) or ``"top_k"``.
        threshold: keep probability above which a token is kept with ``select="threshold"``.
        interpreter_dim: width of the interpreter (split into ``heads``).
        heads: heads of the multi-head interpreter.
        squeeze: fold each dropped token into its most similar kept token (TPS's squeezing; not the paper).
        restore_length, prop_attn: as for every encoder reducer.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="ia_red2", select="top_k").reducing_layers(12)
        [3, 6, 9]
    """

    paper = "2106.12620"
    learned = True
    status = "beta"
    reduce_at = "input"

    select: str = param("threshold", str, choices=SELECTS, help="threshold (the paper) or top_k")
    threshold: float = param(0.5, float, low=0.0, high=1.0, low_open=True, high_open=True,
                             help="keep probability above which a token is kept (select='threshold')")
    interpreter_dim: int = param(64, int, low=1, help="width of the multi-head interpreter")
    heads: int = param(4, int, low=1, help="heads of the multi-head interpreter")
    squeeze: bool = param(False, bool, help="fold each dropped token into its most similar kept token (TPS)")

    def validate(self) -> None:
        super().validate()
        if self.interpreter_dim % self.heads:
            raise ConfigError(f"interpreter_dim: must be divisible by heads ({self.heads}), got {self.interpreter_dim}",
                              field="interpreter_dim")

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The interpreters, one per stage, on the device and dtype of the first stage's block.

        Example:
            >>> list(cfg.learned_modules(model, adapter))             # doctest: +SKIP
            ['ia_red2']
        """
        blocks = adapter.blocks(model)
        stages = self.reducing_layers(len(blocks))
        first = blocks[stages[0]] if stages else blocks[0]
        nets = Interpreters(_hidden_size(model, first), stages, self.interpreter_dim, self.heads, self.keep_rate)
        beside_block(nets, first, model.training)
        return {MODULE_NAME: nets}

    def plan(self, ctx):
        """One stage: sampled keep actions as a soft mask (training) or a hard drop (inference)."""
        nets = ctx.learned_part(MODULE_NAME, "interpreters")
        stage = nets.stage_of(ctx.block)
        n = ctx.num_tokens
        device = ctx.hidden.device
        real, candidates = ctx.real_and_candidates()
        record = ctx.state.records.get(RECORD_KEY)
        if record is None:
            record = ctx.state.records[RECORD_KEY] = InterpretRecord()
        if nets.training:
            return self._sample(ctx, nets[stage], stage, record, real, candidates)
        with torch.no_grad():
            probability = torch.sigmoid(nets[stage](ctx.hidden)[0].float())
        _note(record, ctx.state, probability, real, candidates)
        if self.select == "top_k":
            reduction = keep_top(probability, keep_counts(ctx.real_counts(), ctx.amount), ctx.protected, ctx.valid,
                                 squeeze_into=ctx.hidden if self.squeeze else None)
            record.kept = _kept_inputs(ctx.state, reduction)
            return reduction
        kept = real & ~(candidates & (probability <= self.threshold))
        if ctx.protected == 0:
            # At least one token stays in every row: its most probable one.
            empty = ~kept.any(dim=1)
            if bool(empty.any()):
                best = probability.masked_fill(~real, -1.0).argmax(dim=1)
                kept = kept | (empty[:, None] & (torch.arange(n, device=device) == best[:, None]))
        if bool((kept == real).all()):
            record.kept = _kept_inputs(ctx.state, None)
            return None
        reduction = (squeeze(ctx.hidden, kept, ctx.protected, ctx.valid) if self.squeeze
                     else Reduction.from_keep_mask(kept))
        record.kept = _kept_inputs(ctx.state, reduction)
        return reduction

    def _sample(self, ctx, net, stage, record, real, candidates):
        logits = net(ctx.hidden)[0]
        probability = torch.sigmoid(logits)
        policy = record.policy if record.policy is not None else real.to(probability.dtype)
        deciding = candidates & (policy.detach() > 0)
        action = torch.bernoulli(probability.detach()).to(probability.dtype)
        # Straight-through: the sampled 0/1 action forward, the keep probability's gradient backward (the surrogate;
        # REINFORCE itself uses only the recorded actions and log-probabilities).
        decision = action + probability - probability.detach()
        decision = torch.where(deciding, decision, torch.ones_like(decision))
        policy = policy * decision
        counts = candidates.sum(dim=1).clamp_min(1)
        kept_fraction = (policy * candidates).sum(dim=1) / counts
        record.stages.append(PolicyStage(probability, action, deciding, kept_fraction, self.keep_rate ** (stage + 1)))
        record.policy = policy
        _note(record, ctx.state, probability.detach().float(), real, candidates)
        return SoftMask(key_weight=decision, keep_self=True)


def _note(record: InterpretRecord, state, probability: torch.Tensor, real: torch.Tensor, candidates: torch.Tensor):
    """Record a stage's keep probabilities at the input positions (filler slots share anchors: the largest wins,
    and fillers write 0)."""
    value = torch.where(candidates, probability, real.to(probability.dtype))
    out = torch.zeros(state.origin.shape, dtype=probability.dtype, device=probability.device)
    record.probabilities.append(out.scatter_reduce(1, state.anchor, value, reduce="amax", include_self=True))


def _kept_inputs(state, reduction: Reduction | None) -> torch.Tensor:
    """``(B, N_in)`` bool: the input tokens still in the sequence after ``reduction``."""
    valid = state.valid()
    current = torch.ones(state.anchor.shape, dtype=torch.bool, device=state.anchor.device) if valid is None else valid
    anchor = state.anchor
    if reduction is not None:
        current = current.gather(1, reduction.keep)
        if reduction.slot_valid is not None:
            current = current & reduction.slot_valid
        anchor = anchor.gather(1, reduction.keep)
    out = torch.zeros(state.origin.shape, dtype=torch.uint8, device=anchor.device)
    return out.scatter_reduce(1, anchor, current.to(torch.uint8), reduce="amax", include_self=True).bool()


def _record(model) -> InterpretRecord:
    from ...integration.encoders import STATE_ATTR

    state = model.__dict__.get(STATE_ATTR)
    if state is None or RECORD_KEY not in state.records:
        raise TokenReductionError(f"ia_red2: {type(model).__name__} has no IA-RED² record; apply an ia_red2 reduction "
                                  "and run a forward pass first")
    return state.records[RECORD_KEY]


def keep_probabilities(model) -> list[torch.Tensor]:
    """The interpretation of the last forward pass: per stage, ``(B, N_in)`` keep probabilities at the input
    positions (1 for protected tokens; 0 for padding and for tokens an earlier stage dropped).

    Example:
        >>> model(pixel_values=images); probs = keep_probabilities(model)   # doctest: +SKIP
        >>> probs[0][0, 1:].reshape(14, 14)        # a heat map of the first image            # doctest: +SKIP
    """
    return [p.clone() for p in _record(model).probabilities]


def kept_tokens(model) -> torch.Tensor:
    """``(B, N_in)`` bool: the input tokens that survived every stage of the last inference pass.

    Example:
        >>> model(**batch); kept_tokens(model).sum(dim=1)           # doctest: +SKIP
        tensor([41, 17])
    """
    kept = _record(model).kept
    if kept is None:
        raise TokenReductionError("ia_red2: kept_tokens needs an inference pass (interpreters in eval mode)")
    return kept.clone()


def policy_stages(model) -> list[PolicyStage]:
    """The sampled actions of the last training-mode forward pass (empty after an inference pass).

    Example:
        >>> [s.target for s in policy_stages(model)]                # doctest: +SKIP
        [0.7, 0.49, 0.343]
    """
    return list(_record(model).stages)


__all__ = ["IARed2Config", "InterpretRecord", "Interpreters", "MultiHeadInterpreter", "PolicyStage",
           "keep_probabilities", "kept_tokens", "policy_stages"]
