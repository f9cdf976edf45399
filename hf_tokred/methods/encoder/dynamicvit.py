"""DynamicViT: learned token pruning with prediction modules (Rao et al., NeurIPS'21, arXiv 2106.02034).

Before a few blocks (the *stages*; by default the blocks at 1/4, 1/2 and 3/4 of the depth, the paper's
3/6/9 of 12) a small MLP, the *predictor*, scores every token from its hidden state and from the mean of
the tokens still kept, and the stage keeps a fraction ``keep_rate`` (the paper's rho) of the current
tokens, so stage ``s`` keeps ``rho**s`` of the original tokens.

* **Training** (the predictors are in training mode): every token stays in the sequence; each stage draws
  a hard keep/drop decision per token with Gumbel-softmax (straight-through), multiplies it into the
  running policy, and the dropped tokens are masked out as *keys* of every later block's attention (each
  token still attends to itself), the paper's attention masking. This goes to the wiring as a
  :class:`~hf_tokred.methods.encoder.base.SoftMask`, so gradients reach the predictors through the
  attention. The decisions are recorded for the losses of :mod:`hf_tokred.training` (ratio loss and
  distillation from the dense model).
* **Inference** (eval mode): each stage keeps, per row, the ``ceil(keep_rate * n)`` unprotected real tokens
  of highest predicted keep probability and drops the rest (hard drop, real speed-up); kept tokens keep
  their order.

The predictors are learned parts (``learned = True``): ``learned_modules`` creates them, ``apply`` attaches
them as ``model.hf_tokred_modules["dynamicvit"]``, and ``save_pretrained`` / ``push_to_hub`` write them to
``token_reduction.safetensors`` (never ``model.safetensors``); ``from_pretrained`` loads them back. Train
them with :func:`hf_tokred.training.train_dynamicvit` (a plain loop), :class:`hf_tokred.training.DynamicViTTrainer`
(``transformers.Trainer``) or :func:`hf_tokred.training.dynamicvit_loss` in your own (e.g. accelerate) loop.

Where we depart from the paper:

* The predictor is the paper's (LayerNorm, Linear(D, D), GELU; the second half of the channels averaged
  over the kept tokens and concatenated to the first half; Linear(D, D/2), GELU, Linear(D/2, D/4), GELU,
  Linear(D/4, 2)), with the last bias set so that every token starts with a keep probability of
  ``keep_rate`` (the paper starts from random scores and trains for 30 epochs with the backbone; a short
  predictor-only run starts at the target ratio instead).
* Stages sit *before* their block (``reduce_at = "input"``), as in the paper; the count kept is
  ``ceil(keep_rate * n)`` of each row's current real tokens, so padded text batches work (the paper has
  fixed-size images only) and a batch gives each row's result alone.
* Two options the paper does not have: ``predictor_dim`` narrows the predictor MLPs (fewer FLOPs), and
  ``fuse`` keeps each stage's dropped tokens as one fused token at inference (as EViT does).
* The training utilities train the predictors with the backbone frozen by default (the paper fine-tunes
  both; pass ``train_backbone=True`` and a separate ``teacher`` to do so). A second phase the paper does not
  have, :func:`hf_tokred.training.fine_tune_reduced`, fine-tunes the backbone through the hard inference
  reduction with the predictors fixed, on the embedding cosine to the dense model; with ``fuse=True`` this
  is what makes fusing pay (the backbone learns what the fused token stands for; soft-mask training cannot
  show it a fused token). The distillation terms are the
  paper's token-feature MSE on kept tokens and KL on logits when the model has logits, plus, for
  mean-pooled encoders (BERT sentence embeddings), a cosine loss between the kept-token mean and the
  dense mean, which is what an embedding model's user sees.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="dynamicvit", keep_rate=0.7)
    >>> cfg.reducing_layers(12), cfg.schedule(12)[:4]
    ([3, 6, 9], [None, None, None, 0.7])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...config import param, register_method
from ...errors import TokenReductionError, UnsupportedModelError
from .base import KeepRateConfig, SoftMask, beside_block, keep_counts, keep_top

MODULE_NAME = "dynamicvit"
RECORD_KEY = "dynamicvit"


class TokenPredictor(nn.Module):
    """DynamicViT's prediction module for one stage: keep/drop log-probabilities for every token.

    ``forward(x, policy)`` takes hidden states ``(B, N, D)`` and the running keep policy ``(B, N)`` (1 for kept
    tokens, 0 for dropped or padding) and returns ``(B, N, 2)`` log-probabilities (index 0 = drop, 1 = keep).

    Example:
        >>> import torch
        >>> p = TokenPredictor(16)
        >>> p(torch.randn(2, 5, 16), torch.ones(2, 5)).exp().sum(-1).allclose(torch.ones(2, 5))
        True
    """

    def __init__(self, dim: int, keep_rate: float = 0.9, width: int | None = None):
        super().__init__()
        width = dim if width is None else width
        if dim < 4 or width < 4:
            raise UnsupportedModelError(f"dynamicvit: the hidden size and the predictor width must be >= 4, got "
                                        f"{dim} and {width}")
        self.dim = dim
        self.width = width
        self.local = width // 2
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width // 4), nn.GELU(),
            nn.Linear(width // 4, 2),
        )
        # Start every token at the stage's keep probability, so training begins at the target ratio.
        keep = min(max(keep_rate, 0.05), 0.95)
        with torch.no_grad():
            self.out_conv[-1].bias.copy_(torch.tensor([0.0, math.log(keep / (1 - keep))]))

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        weight = policy.to(x.dtype)[..., None]
        local, rest = x[..., : self.local], x[..., self.local:]
        pooled = (rest * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1e-6)
        x = torch.cat([local, pooled.expand(-1, x.shape[1], -1)], dim=-1)
        return torch.log_softmax(self.out_conv(x), dim=-1)


class DynamicViTPredictors(nn.ModuleList):
    """The predictors of every stage (``model.hf_tokred_modules["dynamicvit"]``); ``blocks`` are their positions.

    Example:
        >>> m = DynamicViTPredictors(32, [3, 6, 9])
        >>> len(m), m.stage_of(6)
        (3, 1)
    """

    def __init__(self, dim: int, blocks: list[int], keep_rate: float = 0.9, width: int | None = None):
        super().__init__([TokenPredictor(dim, keep_rate, width) for _ in blocks])
        self.blocks = list(blocks)

    def stage_of(self, block: int) -> int:
        return self.blocks.index(block)


@dataclass
class StageRecord:
    """What one stage decided in a training forward pass (for the losses).

    Attributes:
        policy: ``(B, N)`` running keep policy after this stage (straight-through, carries gradients).
        kept_fraction: ``(B,)`` fraction of the row's unprotected real tokens kept so far.
        target: the paper's target for that fraction, ``keep_rate ** (stage + 1)``.
    """

    policy: torch.Tensor
    kept_fraction: torch.Tensor
    target: float


def _hidden_size(model, block) -> int:
    for module in block.modules():
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            return int(module.normalized_shape[0])
    config = getattr(model, "config", None)
    for holder in (config, getattr(config, "vision_config", None)):
        size = getattr(holder, "hidden_size", None)
        if isinstance(size, int):
            return size
    raise UnsupportedModelError(f"{type(model).__name__}: cannot find its hidden size (no LayerNorm in its blocks, "
                                "no hidden_size in its config): a learned part cannot be sized for it")


@register_method("dynamicvit")
@dataclass(kw_only=True)
class DynamicViTConfig(KeepRateConfig):
    """DynamicViT (arXiv 2106.02034): learned predictors prune tokens before a few blocks; see the module
    docstring for training and for where we depart from the paper.

    Fields:
        keep_rate: fraction of the current unprotected tokens each stage keeps (the paper's rho, default
            0.7: stages keep 0.7, 0.49, 0.343 of the input tokens). 1.0 keeps all: bit-identical to dense.
        layers: blocks before which a stage prunes (default: depth 1/4, 1/2, 3/4, the paper's 3/6/9 of 12).
        gumbel_tau: temperature of the Gumbel-softmax decisions in training (the paper uses 1).
        predictor_dim: width of the predictor MLPs (None: the model's hidden size, the paper's predictor). A
            narrower predictor costs fewer FLOPs: the paper's costs about 1/7 of a block's FLOPs per token it
            scores, which on a 6-block model is about 5 % of the dense FLOPs.
        fuse: at inference, fuse each stage's dropped tokens into one extra token (their mean, carrying their
            sizes; EViT's inattentive-token fusion) instead of dropping them. The soft-mask training is unchanged
            (dropped tokens are masked); :func:`hf_tokred.training.fine_tune_reduced` then trains the backbone
            with the fused token. ``prop_attn=True`` makes the fused token weigh as the tokens it holds as a key.
        restore_length, prop_attn: as for every encoder reducer.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="dynamicvit", keep_rate=0.8, layers=[2, 4]).to_dict()["layers"]
        [2, 4]
    """

    paper = "2106.02034"
    learned = True
    status = "beta"
    reduce_at = "input"

    gumbel_tau: float = param(1.0, float, low=0.0, low_open=True, help="Gumbel-softmax temperature in training")
    predictor_dim: int | None = param(None, int, low=4, optional=True,
                                      help="width of the predictor MLPs (default: the model's hidden size, the paper's)")
    fuse: bool = param(False, bool, help="fuse the dropped tokens of each stage into one token (EViT) instead of "
                                         "dropping them")

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The predictors, one per stage, on the device and dtype of the block each serves.

        Example:
            >>> modules = cfg.learned_modules(model, adapter)        # doctest: +SKIP
            >>> list(modules)                                        # doctest: +SKIP
            ['dynamicvit']
        """
        blocks = adapter.blocks(model)
        stages = self.reducing_layers(len(blocks))
        first = blocks[stages[0]] if stages else blocks[0]
        predictors = DynamicViTPredictors(_hidden_size(model, first), stages, self.keep_rate, self.predictor_dim)
        beside_block(predictors, first, model.training)
        return {MODULE_NAME: predictors}

    def schedule(self, num_blocks: int) -> list[float | None]:
        """``keep_rate`` before every stage's block, None elsewhere (all None when ``keep_rate`` is 1)."""
        return super().schedule(num_blocks)

    def plan(self, ctx):
        """One stage: Gumbel keep decisions as a soft mask (training) or a hard top-k drop (inference)."""
        if getattr(self, "_dense", False):
            return None
        predictors = ctx.learned_part(MODULE_NAME, "predictors")
        stage = predictors.stage_of(ctx.block)
        predictor = predictors[stage]
        real, candidates = ctx.real_and_candidates()
        if predictor.training:
            record = ctx.state.records.setdefault(RECORD_KEY, [])
            policy = record[-1].policy if record else real.to(ctx.hidden.dtype)
            log_probs = predictor(ctx.hidden, policy)
            decision = torch.nn.functional.gumbel_softmax(log_probs, tau=self.gumbel_tau, hard=True)[..., 1]
            decision = torch.where(candidates, decision, real.to(decision.dtype))
            policy = policy * decision
            counts = candidates.sum(dim=1).clamp_min(1)
            kept_fraction = (policy * candidates).sum(dim=1) / counts
            record.append(StageRecord(policy, kept_fraction, self.keep_rate ** (stage + 1)))
            return SoftMask(key_weight=decision, keep_self=True)
        with torch.no_grad():
            log_probs = predictor(ctx.hidden, real.to(ctx.hidden.dtype))
        score = log_probs[..., 1] - log_probs[..., 0]
        fuse_rest = torch.ones_like(score) if self.fuse else None
        return keep_top(score, keep_counts(ctx.real_counts(), ctx.amount), ctx.protected, ctx.valid, fuse_rest)


def stage_records(model) -> list[StageRecord]:
    """The stage decisions of the last training-mode forward pass (empty after an inference pass).

    Example:
        >>> records = stage_records(model)                           # doctest: +SKIP
        >>> [r.target for r in records]                              # doctest: +SKIP
        [0.7, 0.49, 0.343]
    """
    from ...integration.encoders import STATE_ATTR

    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise TokenReductionError(f"stage_records: {type(model).__name__} has no dynamicvit reduction attached")
    return list(state.records.get(RECORD_KEY, []))


def ratio_loss(records: list[StageRecord]) -> torch.Tensor:
    """The paper's keep-ratio loss: mean over stages and rows of ``(kept fraction - keep_rate**s)**2``.

    Example:
        >>> import torch
        >>> r = StageRecord(torch.ones(2, 3), torch.tensor([0.5, 0.9]), 0.7)
        >>> round(ratio_loss([r]).item(), 4)
        0.04
    """
    if not records:
        raise TokenReductionError("ratio_loss: no stage decisions recorded; run a forward pass with the predictors "
                                  "in training mode (model.train() or model.hf_tokred_modules.train())")
    losses = [(r.kept_fraction - r.target).square().mean() for r in records]
    return torch.stack(losses).mean()


def expected_keep(keep_rate: float, stage: int) -> float:
    """Fraction of the input tokens kept after ``stage + 1`` stages: ``keep_rate ** (stage + 1)``.

    Example:
        >>> round(expected_keep(0.7, 2), 3)
        0.343
    """
    return math.pow(keep_rate, stage + 1)


__all__ = ["DynamicViTConfig", "DynamicViTPredictors", "StageRecord", "TokenPredictor", "expected_keep",
           "ratio_loss", "stage_records"]
