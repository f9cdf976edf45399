"""ToCom: Token Compensator (Jie et al., "Token Compensator: Altering Inference Cost of Vision Transformer
without Re-Tuning", ECCV'24, arXiv 2408.06798).

A model is tuned (or calibrated) for one token-merging degree, the *source* (e.g. ToMe ``r=8``, or no
merging at all for an off-the-shelf model), and then used at another, the *target* (``r=16``). Its
accuracy drops more than the merging alone explains, because the layers never saw sequences merged that
hard. ToCom is a small plug-in that closes this gap without re-tuning the model: low-rank deltas (as in
LoRA) added to the outputs of the linear layers of every block, trained by self-distillation from the
model at the source degree (teacher) to the model at the target degree with the plug-in (student). The
model's own weights are never changed: ``remove()`` gives back the dense model bit for bit, and the
plug-in is a learned part saved in ``token_reduction.safetensors``.

The merging is ToMe's (:func:`hf_tokred.methods.encoder.tome.bipartite_soft_matching`): this config *is*
a ToMe config (``r`` / ``ratio`` / ``inflect`` / ``metric`` / ``prop_attn`` are the target's) with the source
degree and the plug-in's rank added. The wiring (``hf_tokred/integration/tocom.py``) installs ToMe's
sequence wiring and one forward hook per linear layer that adds ``(x @ A^T) @ B^T * alpha / rank``.

Where we depart from the paper:

* The paper trains one compensator on the pre-training data for many (source, target) pairs at once and
  combines compensators arithmetically to move between degrees; here a plug-in serves one (source, target)
  pair, trained on whatever text or images the user gives (:func:`hf_tokred.recipes.tocom.train_tocom`).
* The distillation loss is the cosine between the size-weighted mean of the last hidden states of student
  and teacher (the sentence embedding of a text encoder, which is what the MiniLM benchmark measures; the
  paper distils classification logits). The teacher's embedding comes from the same model: dense (source 0,
  or a separate ``teacher`` model) or with ToMe at the source degree and the plug-in switched off.
* The delta's ``B`` starts at zero (LoRA's initialization), so an untrained plug-in is exactly ToMe at the
  target degree; the paper does not say how it initializes.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="tocom", ratio=0.15, source_ratio=0.0, rank=4, metric="hidden")
    >>> cfg.schedule(3), cfg.source_schedule(3)
    ([0.15, 0.15, 0.15], [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError
from .base import ReductionContext
from .tome import ToMeConfig

MODULE_NAME = "tocom"


class LowRankDelta(nn.Module):
    """One linear layer's compensation: ``delta(x) = (x @ A^T) @ B^T * scale`` (LoRA-shaped), ``B`` starting at 0.

    Example:
        >>> import torch
        >>> delta = LowRankDelta(8, 6, rank=2)
        >>> delta(torch.randn(3, 8)).abs().max().item()        # B is zero: no change before training
        0.0
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down.to(x.dtype).T) @ (self.up.to(x.dtype).T * self.scale)


class TokenCompensator(nn.ModuleDict):
    """The plug-in of a model (``model.hf_tokred_modules["tocom"]``): one :class:`LowRankDelta` per linear layer.

    Keys are ``"<block>__<path with dots as _>"``; ``paths`` maps each key to ``(block index, module path in the
    block)``. ``enabled`` switches the plug-in off without detaching it (the teacher pass of training).

    Example:
        >>> import torch
        >>> blocks = [nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))]
        >>> plug = TokenCompensator.for_blocks(blocks, rank=2, alpha=2.0)
        >>> sorted(plug.keys()), plug.paths["1__0"]
        (['0__0', '1__0'], (1, '0'))
    """

    def __init__(self, deltas: dict[str, LowRankDelta], paths: dict[str, tuple[int, str]]):
        super().__init__(deltas)
        self.paths = dict(paths)
        self.enabled = True

    @classmethod
    def for_blocks(cls, blocks, rank: int, alpha: float, targets: list[str] | None = None) -> TokenCompensator:
        """A delta for every ``nn.Linear`` of every block whose path ends with one of ``targets`` (all when None)."""
        deltas, paths = {}, {}
        for index, block in enumerate(blocks):
            for path, module in block.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                if targets is not None and not any(path == t or path.endswith("." + t) for t in targets):
                    continue
                key = f"{index}__{path.replace('.', '_')}"
                deltas[key] = LowRankDelta(module.in_features, module.out_features, rank, alpha / rank)
                paths[key] = (index, path)
        if not deltas:
            raise UnsupportedModelError(
                "tocom: no linear layer of the model's blocks matches targets="
                f"{targets!r}; give suffixes of the blocks' nn.Linear paths (e.g. 'query' or 'output.dense' on BERT, 'o_proj' or 'mlp.fc2' on ViT)")
        return cls(deltas, paths)


def _check_amount(name: str, value, ratio: bool):
    if ratio:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 0.5:
            raise ConfigError(f"{name}: expected a fraction in [0, 0.5] (the ratio the model was tuned for), "
                              f"got {value!r}", field=name)
        return float(value)
    if isinstance(value, list):
        return [_check_amount(f"{name}[{i}]", v, False) for i, v in enumerate(value)]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name}: expected an int >= 0 or a list of them (tokens merged per block at the degree "
                          f"the model was tuned for), got {value!r}", field=name)
    return int(value)


@register_method("tocom")
@dataclass(kw_only=True)
class ToComConfig(ToMeConfig):
    """ToCom (arXiv 2408.06798): ToMe at a degree the model was not tuned for, plus a learned low-rank plug-in that
    compensates it; see the module docstring for where we depart from the paper.

    Fields (besides ToMe's, which give the *target* degree used at inference):
        source_r: tokens merged per block at the degree the model was tuned for (an int or a list per block; 0,
            the default, means the model was tuned dense). Use with ``r``.
        source_ratio: the same as a fraction of each row's tokens (use with ``ratio``).
        rank: rank of every linear layer's delta.
        alpha: the deltas are scaled by ``alpha / rank`` (LoRA's convention).
        targets: suffixes of the paths of the blocks' linear layers that get a delta (None: every linear layer).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="tocom", r=16, source_r=8).source_schedule(2)
        [8, 8]
    """

    paper = "2408.06798"
    learned = True
    status = "beta"
    wiring = "tocom"

    source_r: int | list[int] | None = field(default=None, metadata={
        "help": "tokens merged per block at the degree the model was tuned for (default 0: dense)"})
    source_ratio: float | None = param(None, float, low=0.0, high=0.5, optional=True,
                                       help="the tuned-for degree as a fraction of each row's tokens (with ratio)")
    rank: int = param(4, int, low=1, high=1024, help="rank of each linear layer's low-rank delta")
    alpha: float = param(4.0, float, low=0.0, low_open=True, help="the deltas are scaled by alpha / rank")
    targets: list[str] | None = param(None, str, sequence=True, optional=True,
                                      help="suffixes of the linear layers that get a delta (default: all)")

    def validate(self) -> None:
        super().validate()
        if self.ratio is not None:
            if self.source_r is not None:
                raise ConfigError("source_r: with ratio give the tuned-for degree as source_ratio", field="source_r")
            self.source_ratio = _check_amount("source_ratio", 0.0 if self.source_ratio is None else self.source_ratio,
                                              True)
            if self.source_ratio > self.ratio:
                raise ConfigError(f"source_ratio: the tuned-for ratio ({self.source_ratio}) must not exceed the ratio "
                                  f"used ({self.ratio})", field="source_ratio")
        else:
            if self.source_ratio is not None:
                raise ConfigError("source_ratio: with r give the tuned-for degree as source_r", field="source_ratio")
            self.source_r = _check_amount("source_r", 0 if self.source_r is None else self.source_r, False)
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise ConfigError(f"targets: expected a non-empty list of layer-path suffixes, got {self.targets!r}",
                              field="targets")

    def source_schedule(self, num_blocks: int) -> list:
        """Tokens (or the fraction) merged per block at the tuned-for degree; each entry at most the target's.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="tocom", r=[4, 4], source_r=[2]).source_schedule(3)
            [2, 0, 0]
        """
        if self.ratio is not None:
            return [self.source_ratio] * num_blocks
        source = self.source_r
        if isinstance(source, list):
            if len(source) > num_blocks:
                raise ConfigError(f"source_r: the list has {len(source)} values but the model has {num_blocks} blocks",
                                  field="source_r")
            source = source + [0] * (num_blocks - len(source))
        else:
            source = [source] * num_blocks
        target = self.schedule(num_blocks)
        for index, (s, t) in enumerate(zip(source, target)):
            if s > t:
                raise ConfigError(f"source_r: block {index} merges {s} tokens at the tuned-for degree but only {t} at "
                                  "the one used; ToCom compensates more merging, not less", field="source_r")
        return source

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The plug-in: a zero-initialized low-rank delta per linear layer of every block, on the blocks' device.

        Example:
            >>> list(cfg.learned_modules(model, adapter))            # doctest: +SKIP
            ['tocom']
        """
        blocks = adapter.blocks(model)
        self.source_schedule(len(blocks))  # a clear error before anything is attached
        plug = TokenCompensator.for_blocks(blocks, self.rank, self.alpha, self.targets)
        parameter = next(blocks[0].parameters(), None) if blocks else None
        if parameter is not None:
            plug.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else None)
        return {MODULE_NAME: plug}

    def plan(self, ctx: ReductionContext):
        """ToMe's merge at the target degree, or at the source degree in :func:`source_pass` (the teacher)."""
        if getattr(self, "_source_pass", False):
            amount = self.source_schedule(ctx.num_blocks)[ctx.block]
            if not amount:
                return None
            ctx = replace(ctx, amount=amount)
        return super().plan(ctx)


def compensator(model) -> TokenCompensator:
    """The ToCom plug-in attached to ``model`` (``model.hf_tokred_modules["tocom"]``).

    Example:
        >>> params = list(compensator(model).parameters())      # doctest: +SKIP
    """
    from ...integration.wiring import MODULES_ATTR

    modules = model._modules.get(MODULES_ATTR)
    if modules is None or MODULE_NAME not in modules:
        raise TokenReductionError(f"{type(model).__name__} has no tocom reduction attached; apply one first: "
                                  "hf_tokred.apply(model, {'method': 'tocom', 'r': 16, 'source_r': 8})")
    return modules[MODULE_NAME]


__all__ = ["LowRankDelta", "ToComConfig", "TokenCompensator", "compensator"]

from ...integration import tocom as _wiring  # noqa: E402, F401  (registers the "tocom" wiring)
