"""SPViT: soft token pruning with a package token (Kong et al., "SPViT: Enabling Faster Vision Transformers via
Latency-aware Soft Token Pruning", ECCV'22, arXiv 2112.13890).

Before a few blocks (the *stages*) a small learned *token selector* scores every token from its hidden state and
from the mean of the tokens still kept, and the stage keeps the tokens it scores highest. The pruned tokens are
not thrown away: they are *packaged* into one extra token, their average weighted by their keep scores, which
carries their sizes (so the size-weighted sentence embedding still counts them) and goes on through the later
blocks. The selectors train against a computation budget (the paper's latency-aware loss).

* **Training** (selectors in training mode): every token stays; each stage draws hard keep/prune decisions with
  Gumbel-softmax (straight-through) and the pruned tokens are masked out as keys of every later block
  (:class:`~hf_tokred.methods.encoder.base.SoftMask`). The decisions are recorded for the losses of
  :func:`hf_tokred.recipes.spvit.train_spvit`: the budget loss compares the FLOPs the kept fractions would cost
  (linear and quadratic terms of every block, from the model's widths and the sequence length) with the FLOPs of
  the configured keep rates, instead of one ratio per stage.
* **Inference** (eval mode): each stage keeps ``ceil(keep_rate * n)`` of each row's unprotected real tokens (the
  highest keep scores, in their order) and packages the rest into one token appended after them (``keep_top``
  with ``fuse_rest`` set to the keep probabilities).

Where we depart from the paper:

* The paper's latency-aware loss uses latencies measured on the target device (a lookup table per token count);
  we use FLOPs per block (``linear * n + attention * n**2``, from the hidden size, MLP width and sequence length),
  which needs no device and is what the benchmark reports. The budget is the FLOPs of the configured keep rates.
* In training the paper appends the package token to the sequence; our soft-mask training keeps every token and
  only masks the pruned ones as keys, so the package token first appears at inference; the embedding loss in
  training counts every token (the package token holds the pruned ones at inference). A second phase,
  :func:`hf_tokred.training.fine_tune_reduced`, trains the backbone with the real package token.
* The selector is DynamicViT's predictor MLP (:class:`~hf_tokred.methods.encoder.dynamicvit.TokenPredictor`) at a
  narrow width (``selector_dim``), started at the stage's keep rate; the paper's selector also scores tokens from
  their features with a global context term, trained with the backbone.
* Stages sit before their block (``reduce_at = "input"``); counts are per row, so padded BERT batches work.
* ``squeeze=True`` (ours, off by default) replaces the one package token with TPS's squeezing (Wei et al., CVPR'23,
  arXiv 2304.10716, which applies to any pruner's decision): each pruned token folds into its most similar kept
  token (:func:`~hf_tokred.methods.encoder.base.squeeze`), so the stage keeps ``ceil(keep_rate * n)`` tokens
  and no package token. The selectors and their training are unchanged.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="spvit", keep_rate=0.5, layers=[2])
    >>> cfg.schedule(6)
    [None, None, 0.5, None, None, None]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError
from .base import KeepRateConfig, SoftMask, beside_block, keep_counts, keep_top
from .dynamicvit import TokenPredictor

MODULE_NAME = "spvit"
RECORD_KEY = "spvit"


class TokenSelectors(nn.ModuleList):
    """The token selectors of every stage (``model.hf_tokred_modules["spvit"]``); ``blocks`` are their positions.

    ``linear_flops`` and ``attention_flops`` are a block's FLOPs per token and per token squared (from the model's
    widths; for the budget loss, not saved).

    Example:
        >>> s = TokenSelectors(32, [2], keep_rate=0.5, width=16)
        >>> len(s), s.stage_of(2)
        (1, 0)
    """

    def __init__(self, dim: int, blocks: list[int], keep_rate: float, width: int, mlp_dim: int | None = None):
        super().__init__([TokenPredictor(dim, keep_rate, width) for _ in blocks])
        self.blocks = list(blocks)
        mlp_dim = 4 * dim if mlp_dim is None else mlp_dim
        self.linear_flops = 2.0 * (4 * dim * dim + 2 * dim * mlp_dim)
        self.attention_flops = 4.0 * dim

    def stage_of(self, block: int) -> int:
        return self.blocks.index(block)


@dataclass
class StageDecision:
    """What one stage decided in a training pass: the running keep ``policy`` ``(B, N)`` (straight-through, with
    gradients), the fraction ``kept`` ``(B,)`` of each row's unprotected real tokens kept so far, and ``tokens``, the
    sequence length at the stage."""

    policy: torch.Tensor
    kept: torch.Tensor
    tokens: int


def _widths(model, block) -> tuple[int, int | None]:
    """The block's hidden size (its first 1-d LayerNorm, else the config) and MLP width (widest linear output)."""
    dim = None
    for module in block.modules():
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            dim = int(module.normalized_shape[0])
            break
    if dim is None:
        config = getattr(model, "config", None)
        for holder in (config, getattr(config, "vision_config", None)):
            if isinstance(getattr(holder, "hidden_size", None), int):
                dim = holder.hidden_size
                break
    if dim is None:
        raise UnsupportedModelError(f"spvit: cannot find the hidden size of {type(model).__name__}")
    outs = [m.out_features for m in block.modules() if isinstance(m, nn.Linear)]
    return dim, (max(outs) if outs else None)


def cost_fraction(selectors: TokenSelectors, fractions: list[torch.Tensor], num_blocks: int, tokens: int,
                  ) -> torch.Tensor:
    """FLOPs of the blocks at the given kept ``fractions`` (one per stage, tensors or floats) over the dense FLOPs.

    A block before the first stage runs all ``tokens``; a block at or after stage ``s`` runs ``fractions[s]`` of
    them, costing ``linear * f * n + attention * (f * n)**2``.

    Example:
        >>> s = TokenSelectors(32, [2], keep_rate=0.5, width=16)
        >>> round(float(cost_fraction(s, [torch.tensor(0.5)], 4, 10)), 3)
        0.744
    """
    lin, att = selectors.linear_flops, selectors.attention_flops

    def block_cost(f):
        return lin * f * tokens + att * (f * tokens) ** 2

    total = 0.0
    stage = -1
    for block in range(num_blocks):
        if stage + 1 < len(selectors.blocks) and block >= selectors.blocks[stage + 1]:
            stage += 1
        total = total + (block_cost(1.0) if stage < 0 else block_cost(fractions[stage]))
    return total / (num_blocks * block_cost(1.0))


@register_method("spvit")
@dataclass(kw_only=True)
class SPViTConfig(KeepRateConfig):
    """SPViT (arXiv 2112.13890): learned token selectors keep the top tokens and package the rest into one token;
    see the module docstring for training and for where we depart from the paper.

    Fields:
        keep_rate: fraction of the current unprotected tokens each stage keeps (1.0: bit-identical to dense).
        layers: blocks before which a stage prunes (default: depth 1/4, 1/2, 3/4).
        selector_dim: width of the selector MLPs (narrow: the selectors' FLOPs count too).
        package: package the pruned tokens into one token (the paper); False drops them.
        squeeze: fold each pruned token into its most similar kept token instead (TPS's squeezing; not the paper).
        gumbel_tau: temperature of the Gumbel-softmax decisions in training.
        restore_length, prop_attn: as for every encoder reducer (``prop_attn=True`` makes the package token weigh
            as the tokens it holds as a key).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="spvit", keep_rate=0.6, layers=[1]).to_dict()["selector_dim"]
        96
    """

    paper = "2112.13890"
    learned = True
    status = "beta"
    reduce_at = "input"

    selector_dim: int = param(96, int, low=4, help="width of the token selector MLPs")
    package: bool = param(True, bool, help="package the pruned tokens of each stage into one token (the paper)")
    squeeze: bool = param(False, bool, help="fold each pruned token into its most similar kept token (TPS) instead "
                                            "of one package token")
    gumbel_tau: float = param(1.0, float, low=0.0, low_open=True, help="Gumbel-softmax temperature in training")

    def validate(self) -> None:
        super().validate()
        if self.squeeze and not self.package:
            raise ConfigError("squeeze: squeezing keeps the pruned tokens' information, package=False drops it; "
                              "set package=True (the default) with squeeze=True", field="squeeze")

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The token selectors, one per stage, on the device and dtype of the blocks.

        Example:
            >>> list(cfg.learned_modules(model, adapter))             # doctest: +SKIP
            ['spvit']
        """
        blocks = adapter.blocks(model)
        stages = self.reducing_layers(len(blocks))
        first = blocks[stages[0]] if stages else blocks[0]
        dim, mlp_dim = _widths(model, first)
        if dim < 4:
            raise UnsupportedModelError(f"spvit: the hidden size must be >= 4, got {dim}")
        selectors = TokenSelectors(dim, stages, self.keep_rate, self.selector_dim, mlp_dim)
        beside_block(selectors, first, model.training)
        return {MODULE_NAME: selectors}

    def plan(self, ctx):
        """One stage: Gumbel keep decisions as a soft mask (training) or keep top-k and package the rest (inference)."""
        selectors = ctx.learned_part(MODULE_NAME, "token selectors")
        selector = selectors[selectors.stage_of(ctx.block)]
        n = ctx.num_tokens
        real, candidates = ctx.real_and_candidates()
        if selector.training:
            record = ctx.state.records.setdefault(RECORD_KEY, [])
            policy = record[-1].policy if record else real.to(ctx.hidden.dtype)
            log_probs = selector(ctx.hidden, policy)
            decision = torch.nn.functional.gumbel_softmax(log_probs, tau=self.gumbel_tau, hard=True)[..., 1]
            decision = torch.where(candidates, decision, real.to(decision.dtype))
            policy = policy * decision
            kept = (policy * candidates).sum(dim=1) / candidates.sum(dim=1).clamp_min(1)
            record.append(StageDecision(policy, kept, n))
            return SoftMask(key_weight=decision, keep_self=True)
        with torch.no_grad():
            log_probs = selector(ctx.hidden, real.to(ctx.hidden.dtype))
        score = log_probs[..., 1] - log_probs[..., 0]
        counts = keep_counts(ctx.real_counts(), ctx.amount)
        if self.squeeze:
            return keep_top(score, counts, ctx.protected, ctx.valid, squeeze_into=ctx.hidden)
        package = log_probs[..., 1].exp() if self.package else None
        return keep_top(score, counts, ctx.protected, ctx.valid, package)


def stage_decisions(model) -> list[StageDecision]:
    """The stage decisions of the last training-mode forward pass of a model reduced with ``spvit``.

    Example:
        >>> [d.kept.mean().item() for d in stage_decisions(model)]     # doctest: +SKIP
        [0.52]
    """
    from ...integration.encoders import STATE_ATTR

    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise TokenReductionError(f"stage_decisions: {type(model).__name__} has no spvit reduction attached")
    return list(state.records.get(RECORD_KEY, []))


def budget_loss(selectors: TokenSelectors, decisions: list[StageDecision], keep_rate: float,
                num_blocks: int) -> torch.Tensor:
    """The budget (latency-aware) loss: mean over rows of ``(cost of the kept fractions - cost of the keep rates)**2``,
    costs as fractions of the dense FLOPs (:func:`cost_fraction`).

    Example:
        >>> s = TokenSelectors(32, [2], keep_rate=0.5, width=16)
        >>> d = StageDecision(torch.ones(1, 10), torch.tensor([0.5]), 10)
        >>> budget_loss(s, [d], 0.5, 4).item()
        0.0
    """
    if not decisions:
        raise TokenReductionError("budget_loss: no stage decisions recorded; run a forward pass with the selectors in "
                                  "training mode (model.hf_tokred_modules.train())")
    tokens = decisions[0].tokens
    fractions = [d.kept for d in decisions]
    targets = [keep_rate ** (s + 1) for s in range(len(decisions))]
    cost = cost_fraction(selectors, fractions, num_blocks, tokens)
    target = cost_fraction(selectors, targets, num_blocks, tokens)
    return (cost - target).square().mean()


__all__ = ["SPViTConfig", "StageDecision", "TokenSelectors", "budget_loss", "cost_fraction", "stage_decisions"]
