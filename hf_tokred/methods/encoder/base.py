"""The interface every encoder sequence reducer implements, and the tensor helpers they share.

A sequence reducer (stage ``"sequence"``) shortens the token sequence of a bidirectional encoder (ViT,
DeiT, CLIP/SigLIP vision towers, DINOv2, BERT) inside some of its blocks. The wiring
(``hf_tokred/integration/encoders.py``) owns everything model-specific: hooks, masks, token sizes,
padding, source maps and ``restore_length``. A method owns only the decision, written as one function::

    plan(ctx: ReductionContext) -> Reduction | SoftMask | list[Reduction] | None

called once per reducing block with what that block saw (its hidden states at the reduction point, the
sizes, the padding, and the attention statistics the method asked for in ``needs``). A
:class:`Reduction` says, for one batch, which input token anchors each output slot and which tokens fold
into which slot; the wiring applies it (size-weighted average) to the hidden states, to the sizes, and
to the source maps. A :class:`SoftMask` keeps every token but down-weights some as keys of the later
blocks' attention (differentiable; for training learned pruners such as DynamicViT).

Example (a toy method that keeps the first half of the unprotected tokens)::

    >>> import torch
    >>> from dataclasses import dataclass
    >>> from hf_tokred.config import register_method
    >>> from hf_tokred.methods.encoder.base import EncoderReducerConfig, keep_top, Reduction
    >>> @register_method("toy_first_half")
    ... @dataclass(kw_only=True)
    ... class FirstHalf(EncoderReducerConfig):
    ...     def schedule(self, num_blocks):
    ...         return [True] + [None] * (num_blocks - 1)
    ...     def plan(self, ctx):
    ...         score = -torch.arange(ctx.num_tokens, dtype=torch.float32).expand(ctx.batch_size, -1)
    ...         return keep_top(score, ctx.real_counts() // 2, ctx.protected, ctx.valid)
    >>> r = keep_top(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), torch.tensor([2]), protected=1)
    >>> r.keep.tolist(), r.num_slots
    ([[0, 1, 3]], 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...config import TokenReductionConfig, param
from ...errors import ConfigError, TokenReductionError

# Attention statistics a reducer may ask for (``needs``); the wiring computes only these, only in the
# blocks that reduce, from the queries/keys/values the attention function already has.
STATISTICS = ("metric", "cls_attention", "attention", "value_norm")
# Where a reducer acts inside a block: after the block's attention (between attention and MLP, or at the
# block output on architectures whose adapter names no hook point), or on the block's input.
REDUCE_AT = ("attention", "input")
# How a carried token's state is rebuilt when the sequence is restored (``restore_update``).
RESTORE_UPDATES = ("copy", "residual")


@dataclass(kw_only=True)
class EncoderReducerConfig(TokenReductionConfig):
    """Base class of encoder sequence reducers (not a method itself; subclasses are registered).

    Subclasses set the class attributes ``needs`` (a subset of :data:`STATISTICS`) and, rarely,
    ``reduce_at`` (``"attention"``, the default: after the block's attention; ``"input"``: before the
    block runs, e.g. DynamicViT's predictors), and implement :meth:`schedule` and :meth:`plan`.

    Fields every encoder reducer accepts:
        restore_length: give ``last_hidden_state`` back at the input length: each input token gets the
            final state of the token that carries it (a merged token's state for all its sources); a token
            dropped without a carrier keeps the state it had when dropped. Padding positions come back too.
        prop_attn: proportional attention: add ``log(size)`` to the attention logits, so a token standing
            for ``s`` input tokens counts ``s`` times (ToMe's paper). Needs a float mask, which keeps SDPA off
            its flash kernel.
    """

    stage = "sequence"
    model_kinds = ("encoder",)
    needs: ClassVar[frozenset[str]] = frozenset()
    reduce_at: ClassVar[str] = "attention"
    # How a token carried by another one (merged, fused, summarised) gets its state when the sequence comes back
    # at the input length (``restore_length``, ``restore_block``, ``restore_after``): "copy" takes the carrier's
    # state; "residual" takes the token's own state at the reduction point plus the update its carrier received
    # since (``h_t + (carrier_now - carrier_then)``; Evo-ViT's fast path, STViT's recovery). See RESTORE_UPDATES.
    restore_update: ClassVar[str] = "copy"

    restore_length: bool = param(False, bool, help="return last_hidden_state at the input length (unmerge)")
    prop_attn: bool = param(False, bool, help="proportional attention: add log(size) to the attention logits")

    def schedule(self, num_blocks: int) -> list[Any]:
        """One entry per block: what the block should do (passed as ``ctx.amount``), falsy for nothing.

        Raise :class:`ConfigError` (naming the field) when the config does not fit ``num_blocks``.
        Blocks whose entry is falsy run exactly as in the dense model.
        """
        raise NotImplementedError(f"{type(self).__name__} must define schedule()")

    def plan(self, ctx: ReductionContext) -> Reduction | SoftMask | list[Reduction] | None:
        """Decide the reduction of one block (see :class:`ReductionContext`); None leaves the block dense."""
        raise NotImplementedError(f"{type(self).__name__} must define plan()")

    def restore_after(self, num_blocks: int) -> list[int]:
        """Blocks after whose output the sequence comes back at the input length and order (none by default).

        Unlike ``restore_length`` (the last block's output) and ``restore_block`` (one block's input, with
        ``restore_length``), this is part of the method: e.g. Evo-ViT restores after every reducing block (the
        sequence keeps its full length between blocks), STViT after the last block of its semantic-token stage.
        Each restored token gets its state as :attr:`restore_update` says; a token dropped without a carrier
        keeps the state it had when dropped. The next blocks run at the input length with the model's own mask.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="tome", r=2).restore_after(4)
            []
        """
        return []


@dataclass(kw_only=True)
class KeepRateConfig(EncoderReducerConfig):
    """Base of pruning-style reducers: keep a fraction of the unprotected tokens at a few blocks.

    Fields:
        keep_rate: fraction of the current unprotected real tokens each reducing block keeps
            (``ceil(keep_rate * n)`` per row; 1.0 keeps everything and is bit-identical to dense).
        layers: indices of the blocks that reduce; None for the EViT placement: the blocks at 1/4, 1/2 and
            3/4 of the depth (4th, 7th and 10th of 12).
    """

    keep_rate: float = param(0.7, float, low=0.0, high=1.0, low_open=True,
                             help="fraction of the unprotected tokens each reducing block keeps")
    layers: list[int] | None = param(None, int, low=0, sequence=True, optional=True,
                                     help="indices of the reducing blocks (default: depth 1/4, 1/2, 3/4)")

    def validate(self) -> None:
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers: expected distinct block indices, got {self.layers!r}", field="layers")

    def reducing_layers(self, num_blocks: int) -> list[int]:
        """The block indices that reduce in a model with ``num_blocks`` blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="evit").reducing_layers(12)
            [3, 6, 9]
        """
        if self.layers is None:
            return sorted({max(num_blocks * k // 4, 0) for k in (1, 2, 3)} & set(range(num_blocks)))
        bad = [i for i in self.layers if i >= num_blocks]
        if bad:
            raise ConfigError(
                f"layers: block {bad[0]} does not exist; the model has {num_blocks} blocks (0..{num_blocks - 1})",
                field="layers",
            )
        return sorted(self.layers)

    def schedule(self, num_blocks: int) -> list[float | None]:
        """``keep_rate`` at the reducing blocks, None elsewhere (all None when ``keep_rate`` is 1).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="evit", keep_rate=0.5, layers=[1]).schedule(3)
            [None, 0.5, None]
        """
        layers = set(self.reducing_layers(num_blocks))
        return [self.keep_rate if (i in layers and self.keep_rate < 1.0) else None for i in range(num_blocks)]


# ---------------------------------------------------------------------------------------------
# What a method sees
# ---------------------------------------------------------------------------------------------


@dataclass
class ReductionContext:
    """What the wiring hands to :meth:`EncoderReducerConfig.plan` for one reducing block.

    Attributes:
        hidden: ``(B, N, C)`` hidden states at the reduction point (post-attention residual stream for
            ``reduce_at="attention"``, block input for ``"input"``); carries gradients in training.
        size: ``(B, N, 1)`` float32 token sizes: input tokens each token stands for; 0 for padding.
        valid: ``(B, N)`` bool real-token mask, or None when every token is real.
        protected: leading tokens that must stay, in place (CLS, distillation, register tokens).
        class_tokens: leading tokens whose attention rows rank the others (0: no CLS, e.g. SigLIP).
        block, num_blocks: index of this block and the number of blocks.
        amount: this block's schedule entry.
        training: the block is in training mode.
        metric: ``(B, N, D)`` keys averaged over heads, detached (``"metric"`` in ``needs``).
        cls_attention: ``(B, N)`` float32 attention from the class tokens (averaged over heads and class
            tokens); without class tokens, the attention each token receives averaged over heads and real
            queries (``"cls_attention"``). Detached.
        attention: ``(B, H, N, N)`` float32 attention probabilities, detached (``"attention"``).
        value_norm: ``(B, N)`` float32 norm of each token's value vector over all heads (``"value_norm"``).
        modules: the model's ``hf_tokred_modules`` (learned parts, see ``learned_modules``), or None.
        state: the per-call :class:`~hf_tokred.integration.encoders.SequenceState` (e.g. to record decisions
            for a training loss in ``state.records``).
    """

    hidden: torch.Tensor
    size: torch.Tensor
    valid: torch.Tensor | None
    protected: int
    class_tokens: int
    block: int
    num_blocks: int
    amount: Any
    training: bool = False
    metric: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    value_norm: torch.Tensor | None = None
    modules: Any = None
    state: Any = None

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    def learned_part(self, name: str, what: str) -> Any:
        """The learned part ``model.hf_tokred_modules[name]`` (``what`` names it in the error when it is missing).

        Example:
            >>> predictors = ctx.learned_part("dynamicvit", "predictors")      # doctest: +SKIP
        """
        if self.modules is None or name not in self.modules:
            raise TokenReductionError(f"{name}: the model has no {what} (model.hf_tokred_modules['{name}']); attach the "
                                      "reduction with hf_tokred.apply or from_pretrained")
        return self.modules[name]

    def real_and_candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N)`` bool masks: the real tokens, and those of them a stage may drop (the unprotected ones)."""
        real = self.valid
        if real is None:
            real = torch.ones(self.batch_size, self.num_tokens, dtype=torch.bool, device=self.hidden.device)
        candidates = real.clone()
        candidates[:, : self.protected] = False
        return real, candidates

    def real_counts(self) -> torch.Tensor:
        """``(B,)`` long: real (non-padding) unprotected tokens per row."""
        return real_counts(self.valid, self.batch_size, self.num_tokens, self.protected, self.hidden.device)


def real_counts(valid, batch: int, n: int, protected: int, device=None) -> torch.Tensor:
    """Real unprotected tokens per row, ``(B,)`` long.

    Example:
        >>> import torch
        >>> real_counts(torch.tensor([[True, True, True, False]]), 1, 4, 1).tolist()
        [2]
    """
    if valid is None:
        return torch.full((batch,), max(n - protected, 0), dtype=torch.long, device=device)
    return valid[:, protected:].sum(dim=1)


def keep_counts(counts: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Tokens kept out of ``counts`` at ``keep_rate``: ``ceil(keep_rate * count)`` (at least 1 when count > 0).

    Example:
        >>> import torch
        >>> keep_counts(torch.tensor([196, 10, 0]), 0.7).tolist()
        [138, 7, 0]
    """
    kept = torch.ceil(counts.double() * keep_rate - 1e-9).long()
    return torch.minimum(torch.clamp(kept, min=1), counts)


# ---------------------------------------------------------------------------------------------
# What a method returns
# ---------------------------------------------------------------------------------------------


@dataclass
class Reduction:
    """A hard reduction of one batch from ``N`` tokens to ``M`` output slots.

    Each output slot ``m`` is *anchored* by input token ``keep[:, m]`` and may receive more input tokens
    (``src``, folded into slot ``dst``). The slot's value is the average of its members weighted by
    ``size * weight`` (weights default to 1), its size the sum of the members' sizes. Input tokens that
    are neither kept nor sources are dropped. A slot with ``slot_valid`` False is padding (size 0, masked
    out of later attention): rows of a batch may keep different numbers of tokens.

    Attributes:
        keep: ``(B, M)`` long, the anchor of every slot (slots in output order).
        src: ``(B, R)`` long input tokens folded into another slot, or None.
        dst: ``(B, R)`` long slot index (in ``0..M-1``) each source folds into, or None.
        src_valid: ``(B, R)`` bool, False for filler entries of rows with fewer sources, or None.
        keep_weight, src_weight: ``(B, M)`` / ``(B, R)`` value weights (besides size), or None.
        slot_valid: ``(B, M)`` bool, or None when every slot is real.
        num_tokens: ``N``.

    Example:
        >>> import torch
        >>> r = Reduction(keep=torch.tensor([[0, 2]]), src=torch.tensor([[1]]), dst=torch.tensor([[1]]), num_tokens=3)
        >>> x, size = r.apply(torch.tensor([[[1.0], [2.0], [6.0]]]), torch.ones(1, 3, 1))
        >>> x.flatten().tolist(), size.flatten().tolist()
        ([1.0, 4.0], [1.0, 2.0])
        >>> r.slot_of().tolist()
        [[0, 1, 1]]
    """

    keep: torch.Tensor
    num_tokens: int
    src: torch.Tensor | None = None
    dst: torch.Tensor | None = None
    src_valid: torch.Tensor | None = None
    keep_weight: torch.Tensor | None = None
    src_weight: torch.Tensor | None = None
    slot_valid: torch.Tensor | None = None

    def __post_init__(self):
        if self.src is not None and self.src.shape[1] == 0:
            self.src = self.dst = self.src_valid = self.src_weight = None

    @property
    def num_slots(self) -> int:
        return self.keep.shape[1]

    def apply(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce ``x`` ``(B, N, C)`` and ``size`` ``(B, N, 1)``; returns ``(x, size)`` with ``M`` tokens.

        Only the slots that receive sources are re-weighted; the rest are a gather, so a pure pruning
        costs one gather.
        """
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"Reduction.apply: expected {self.num_tokens} tokens, got {x.shape[1]}")
        channels = x.shape[-1]
        y = x.gather(1, self.keep[..., None].expand(-1, -1, channels))
        kept_size = size.gather(1, self.keep[..., None])
        if self.slot_valid is not None:
            kept_size = kept_size * self.slot_valid[..., None]
        if self.src is None:
            return y, kept_size
        src_size = size.gather(1, self.src[..., None])
        if self.src_valid is not None:
            src_size = src_size * self.src_valid[..., None]
        dst = self.dst[..., None]
        new_size = kept_size.scatter_add(1, dst, src_size)
        kept_w = kept_size if self.keep_weight is None else kept_size * self.keep_weight[..., None]
        src_w = src_size if self.src_weight is None else src_size * self.src_weight[..., None]
        total = kept_w.scatter_add(1, dst, src_w).clamp_min(torch.finfo(torch.float32).tiny)
        # Rescale the receiving slots' anchors, then add their sources (duplicates in dst write equal values).
        total_dst = total.gather(1, dst)
        dst_c = dst.expand(-1, -1, channels)
        anchor = y.gather(1, dst_c) * (kept_w.gather(1, dst) / total_dst).to(x.dtype)
        sources = x.gather(1, self.src[..., None].expand(-1, -1, channels)) * (src_w / total_dst).to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or src_w.requires_grad or kept_w.requires_grad):
            return y.scatter(1, dst_c, anchor).scatter_add(1, dst_c, sources), new_size
        # y is our own gather output: update it in place (saves two copies of the reduced sequence per block).
        return y.scatter_(1, dst_c, anchor).scatter_add_(1, dst_c, sources), new_size

    def slot_of(self) -> torch.Tensor:
        """``(B, N)`` long: the output slot carrying each input token, -1 for dropped tokens."""
        batch, m = self.keep.shape
        slots = torch.arange(m, device=self.keep.device).expand(batch, m)
        if self.slot_valid is not None:
            slots = torch.where(self.slot_valid, slots, -1)
        out = torch.full((batch, self.num_tokens), -1, dtype=torch.long, device=self.keep.device)
        if self.slot_valid is not None:
            # Filler slots may reuse anchors of real slots: write them first so real slots win.
            order = self.slot_valid.to(torch.uint8).argsort(dim=1, stable=True)
            out.scatter_(1, self.keep.gather(1, order), slots.gather(1, order))
        else:
            out.scatter_(1, self.keep, slots)
        if self.src is not None:
            dst = self.dst if self.src_valid is None else torch.where(self.src_valid, self.dst, out.gather(1, self.src))
            out.scatter_(1, self.src, dst)
        return out

    def expand(self, y: torch.Tensor, slot_of: torch.Tensor | None = None) -> torch.Tensor:
        """Back to ``N`` tokens: every input token gets its slot's value (dropped tokens get slot 0's)."""
        slot_of = self.slot_of() if slot_of is None else slot_of
        return y.gather(1, slot_of.clamp(min=0)[..., None].expand(-1, -1, y.shape[-1]))

    # -- builders -------------------------------------------------------------------------------

    @classmethod
    def from_slots(cls, slot: torch.Tensor, weight: torch.Tensor | None = None,
                   anchors: torch.Tensor | None = None) -> Reduction:
        """Build a reduction from the slot of every input token (``(B, N)`` long, -1 = dropped).

        Slot ids must be ``0..M_b-1`` per row, in output order; ``M`` is the largest; rows with fewer slots
        get filler slots. Each slot's anchor is its first member, or with ``anchors`` (``(B, N)`` bool) its
        first member marked there (a slot with none marked falls back to its first member), so that a token
        folded into a kept token takes the kept token's position. ``weight`` ``(B, N)`` are value weights.

        Example:
            >>> import torch
            >>> r = Reduction.from_slots(torch.tensor([[0, 1, 1, -1, 2]]))
            >>> r.keep.tolist(), r.src.tolist(), r.dst.tolist()
            ([[0, 1, 4]], [[2]], [[1]])
            >>> Reduction.from_slots(torch.tensor([[0, 1, 1]]), anchors=torch.tensor([[True, False, True]])).keep.tolist()
            [[0, 2]]
        """
        batch, n = slot.shape
        device = slot.device
        m = int(slot.max().item()) + 1 if slot.numel() else 0
        m = max(m, 1)
        position = torch.arange(n, device=device).expand(batch, n)
        # The smallest rank in a slot anchors it; unmarked members rank after every marked one.
        rank = position if anchors is None else torch.where(anchors, position, position + n)
        first = torch.full((batch, m + 1), 2 * n, dtype=torch.long, device=device)
        first = first.scatter_reduce(1, torch.where(slot >= 0, slot, m), rank, reduce="amin", include_self=True)
        first = first[:, :m]
        slot_valid = first < 2 * n
        keep = torch.where(slot_valid, first % n, 0)
        is_anchor = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
        is_anchor.scatter_(1, torch.where(slot_valid, keep, n), True)
        is_src = (slot >= 0) & ~is_anchor[:, :n]
        counts = is_src.sum(dim=1)
        r = int(counts.max().item()) if batch else 0
        src = dst = src_valid = src_weight = None
        if r > 0:
            src = torch.where(is_src, position, n + position).argsort(dim=1)[:, :r]
            src_valid = torch.arange(r, device=device)[None] < counts[:, None]
            src = torch.where(src_valid, src, keep[:, :1])
            dst = slot.gather(1, src).clamp(min=0)
            dst = torch.where(src_valid, dst, 0)
            if weight is not None:
                src_weight = weight.gather(1, src)
        return cls(
            keep=keep,
            num_tokens=n,
            src=src,
            dst=dst,
            src_valid=None if src_valid is None or bool(src_valid.all()) else src_valid,
            keep_weight=None if weight is None else weight.gather(1, keep),
            src_weight=src_weight,
            slot_valid=None if bool(slot_valid.all()) else slot_valid,
        )

    @classmethod
    def from_keep_mask(cls, kept: torch.Tensor) -> Reduction:
        """Keep the tokens where ``kept`` ``(B, N)`` is True (in input order), drop the rest.

        Rows keeping fewer tokens than the longest row get filler slots at the end.

        Example:
            >>> import torch
            >>> r = Reduction.from_keep_mask(torch.tensor([[True, False, True], [True, True, True]]))
            >>> r.keep.tolist(), r.slot_valid.tolist()
            ([[0, 2, 0], [0, 1, 2]], [[True, True, False], [True, True, True]])
        """
        counts = kept.sum(dim=1)
        if bool((counts == counts[0]).all()):
            m = int(counts[0])
            keep = torch.where(kept, torch.arange(kept.shape[1], device=kept.device), kept.shape[1])
            return cls(keep=keep.sort(dim=1).values[:, :m], num_tokens=kept.shape[1])
        return cls.from_slots(torch.where(kept, kept.long().cumsum(dim=1) - 1, -1))


@dataclass
class SoftMask:
    """A differentiable reduction: keep every token, but weight it as a key of the later blocks' attention.

    ``key_weight`` ``(B, N)`` in [0, 1] multiplies the weight every token gets as a key in every later
    block (it is folded into the attention mask as ``log(key_weight + eps)``, multiplied with the weights of
    earlier soft masks); with ``keep_self`` a token still attends to itself (DynamicViT's attention masking
    in training). Gradients flow into ``key_weight``.

    Example:
        >>> import torch
        >>> SoftMask(key_weight=torch.ones(2, 5)).key_weight.shape
        torch.Size([2, 5])
    """

    key_weight: torch.Tensor
    keep_self: bool = True
    eps: float = 1e-6


# ---------------------------------------------------------------------------------------------
# Tensor helpers shared by the methods
# ---------------------------------------------------------------------------------------------


def rank_unprotected(score: torch.Tensor, protected: int, valid: torch.Tensor | None) -> torch.Tensor:
    """``score`` with protected tokens at +inf and padding at -inf, as float32 (for top-k selection)."""
    score = score.float().clone()
    if valid is not None:
        score = score.masked_fill(~valid, -math.inf)
    score[:, :protected] = math.inf
    return score


# How a stage picks the tokens it keeps (IA-RED², A-ViT): the paper's threshold on a score, or a fixed share per row.
SELECTS = ("threshold", "top_k")


def top_mask(score: torch.Tensor, counts: torch.Tensor, protected: int,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, N)`` bool: the protected tokens and, per row, the ``counts[b]`` unprotected real tokens of highest
    ``score`` (ties: the earlier token); what :func:`keep_top` keeps.

    Example:
        >>> import torch
        >>> top_mask(torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0]]), torch.tensor([2]), protected=1).tolist()
        [[True, False, True, False, True]]
    """
    batch, n = score.shape
    device = score.device
    ranked = rank_unprotected(score, protected, valid)
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
    real = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid.clone()
    real[:, :protected] = True
    return (rank < (counts[:, None] + protected)) & real


def keep_top(score: torch.Tensor, counts: torch.Tensor, protected: int, valid: torch.Tensor | None = None,
             fuse_rest: torch.Tensor | None = None, squeeze_into: torch.Tensor | None = None) -> Reduction:
    """Keep the protected tokens and, per row, the ``counts[b]`` unprotected real tokens of highest ``score``.

    Kept tokens stay in their input order. With ``fuse_rest`` (``(B, N)`` value weights, e.g. EViT's CLS
    attention) the other real tokens of each row are fused into one extra slot after the kept ones (a
    weighted average), instead of being dropped. With ``squeeze_into`` (the hidden states ``(B, N, D)``) each
    of them is instead folded into its most similar kept token (:func:`squeeze_slots`, TPS). Rows that keep
    fewer tokens get filler slots at the end.

    Example:
        >>> import torch
        >>> score = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0]])
        >>> r = keep_top(score, torch.tensor([2]), protected=1, fuse_rest=torch.ones(1, 5))
        >>> r.keep.tolist(), r.slot_of().tolist()
        ([[0, 2, 4, 1]], [[0, 3, 1, 3, 2]])
    """
    if fuse_rest is not None and squeeze_into is not None:
        raise TokenReductionError("keep_top: pass fuse_rest or squeeze_into, not both")
    kept = top_mask(score, counts, protected, valid)
    if squeeze_into is not None:
        return squeeze(squeeze_into, kept, protected, valid)
    if fuse_rest is not None:
        slot = torch.where(kept, kept.long().cumsum(dim=1) - 1, -1)
        rest = ~kept if valid is None else valid & ~kept  # protected tokens are always kept
        fused_slot = kept.sum(dim=1, keepdim=True)
        slot = torch.where(rest, fused_slot.expand_as(slot), slot)
        return Reduction.from_slots(slot, fuse_rest.float() if bool(rest.any()) else None)
    return Reduction.from_keep_mask(kept)


def squeeze_slots(hidden: torch.Tensor, kept: torch.Tensor, protected: int,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots for TPS's squeezing (arXiv 2304.10716): kept tokens keep their own (in input order), pruned real
    tokens go to their host's, the most similar kept token (cosine of ``hidden``; protected tokens never host).

    Returns ``(slot, weight)``: ``slot`` ``(B, N)`` (-1 for padding) and the value weights ``(B, N)``
    (1 for kept tokens, ``exp(cos - 1)`` for squeezed ones).

    Example:
        >>> import torch
        >>> slot, weight = squeeze_slots(torch.eye(3)[None], torch.tensor([[True, True, False]]), protected=0)
        >>> slot.tolist(), [round(w, 3) for w in weight[0].tolist()]
        ([[0, 1, 0]], [1.0, 1.0, 0.368])
    """
    hosts = kept.clone()
    hosts[:, :protected] = False
    similarity = cosine_scores(hidden, hidden).masked_fill(~hosts[:, None, :], -torch.inf)
    best, host = similarity.max(dim=2)
    own_slot = kept.long().cumsum(dim=1) - 1
    real = torch.ones_like(kept) if valid is None else valid
    pruned = real & ~kept
    slot = torch.where(kept, own_slot, torch.where(pruned, own_slot.gather(1, host), -1))
    weight = torch.where(pruned, torch.exp(best.clamp(-1.0, 1.0) - 1.0), 1.0)
    return slot, weight


def squeeze(hidden: torch.Tensor, kept: torch.Tensor, protected: int,
            valid: torch.Tensor | None = None) -> Reduction:
    """Keep the tokens where ``kept`` ``(B, N)`` is True and fold every other real token into its most similar kept
    one (TPS's squeezing, :func:`squeeze_slots`; no gradient through the choice); kept tokens anchor their slots.

    Example:
        >>> import torch
        >>> r = squeeze(torch.eye(3)[None], torch.tensor([[False, True, True]]), protected=0)
        >>> r.keep.tolist(), r.slot_of().tolist()
        ([[1, 2]], [[0, 0, 1]])
    """
    slot, weight = squeeze_slots(hidden.detach(), kept, protected, valid)
    return Reduction.from_slots(slot, weight, anchors=kept)


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, Na, Nb)`` cosine similarities of the rows of ``a`` ``(B, Na, D)`` and ``b`` ``(B, Nb, D)`` (float32).

    Example:
        >>> import torch
        >>> cosine_scores(torch.tensor([[[0.0, 2.0], [3.0, 0.0]]]), torch.tensor([[[1.0, 0.0]]])).flatten().tolist()
        [0.0, 1.0]
    """
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.transpose(1, 2)


def beside_block(module: torch.nn.Module, block: torch.nn.Module, training: bool) -> torch.nn.Module:
    """``module`` (a method's learned part) in ``training`` mode, on the device and floating dtype of ``block``.

    An eval-mode model's learned parts start in eval mode, so it reduces from its first call on.

    Example:
        >>> import torch
        >>> part = beside_block(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double(), training=False)
        >>> part.weight.dtype, part.training
        (torch.float64, False)
    """
    module.train(training)
    parameter = next(block.parameters(), None)
    if parameter is not None:
        module.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else None)
    return module


__all__ = [
    "REDUCE_AT",
    "SELECTS",
    "beside_block",
    "RESTORE_UPDATES",
    "STATISTICS",
    "EncoderReducerConfig",
    "KeepRateConfig",
    "Reduction",
    "ReductionContext",
    "SoftMask",
    "squeeze",
    "squeeze_slots",
    "cosine_scores",
    "keep_counts",
    "keep_top",
    "rank_unprotected",
    "real_counts",
    "top_mask",
]
