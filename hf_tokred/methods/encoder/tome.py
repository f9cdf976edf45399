"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR'23, arXiv 2210.09461).

After the attention of every block, ToMe merges the ``r`` most similar pairs of tokens, so a ViT with
``L`` blocks ends with ``N - r*L`` tokens. Matching is *bipartite soft matching*: the tokens are split
alternately into sets A and B, every A token finds its most similar B token (cosine similarity of the
block's keys averaged over heads), and the ``r`` A tokens with the most similar partners are merged into
them by a size-weighted average. Every token carries a *size* (how many input tokens it stands for);
*proportional attention* adds ``log(size)`` to the attention logits so a merged token counts as many.
The CLS token is never merged and stays at index 0.

Where we depart from the paper:

* **Merge point.** As in the paper, tokens merge between a block's attention and its MLP, so the MLP runs
  on the merged tokens. Without copying a ``forward``: the wiring merges the input of the norm before the
  MLP, expands the MLP branch back to the block's length for the block's own residual add, and returns the
  merged residual plus the MLP branch, which is the paper's arithmetic (see ``integration/encoders.py``).
  Post-norm BERT merges the attention sub-layer's output (after its LayerNorm).
* **Token order.** Like the paper, a merge keeps the protected tokens (CLS) first, then the unmerged
  A tokens, then the B tokens. In padded batches we then move padding after every real token, and a
  left-padded batch is re-ordered real-tokens-first before the first merge, so a padded row sees the
  same A/B split as the row run alone.
* **Padding** (BERT batches with an attention mask; the paper has none). Padding has size 0. A real
  token is never merged into padding, and padding never changes a real token: scores rank real/real
  pairs (cosine in [-1, 1]) above padding/padding (-2), above padding into a real token (-3, weight 0,
  which leaves the real token's value as it was), above a real token into padding (-4, only reachable
  when a row has a single mergeable real token and a second protected token). So a padded row gives
  the same real tokens as the row run alone whenever the row itself allows ``r`` merges.
* **The clamp.** ``r`` is clamped per block to ``(N - protected) // 2`` where ``N`` is the current
  (padded) length, as in the paper, and is the same for every row so the batch stays rectangular. A
  row with fewer real tokens than that merges all it can among its real tokens (exactly as when run
  alone) and makes up the difference by merging padding.
* ``(r, inflect)`` is stored as two fields (``r`` and ``inflect``) so that it survives JSON; a tuple
  ``r=(16, -0.5)`` is accepted and split.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="tome", r=4)
    >>> cfg.schedule(3), TokenReductionConfig(method="tome", r=[8, 4]).schedule(3)
    ([4, 4, 4], [8, 4, 0])
    >>> TokenReductionConfig(method="tome", r=(8, -1.0)).schedule(5)     # decreasing schedule
    [16, 12, 8, 4, 0]
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from ...config import param, register_method
from ...errors import ConfigError
from .base import EncoderReducerConfig, Reduction, ReductionContext

METRICS = ("keys", "hidden")
_R_HELP = ("tokens merged in every block (an int >= 0), an (r, inflect) pair with inflect in [-1, 1], "
           "or a list of ints >= 0 with one value per block")

# Scores given to pairs that involve padding (cosine similarities lie in [-1, 1]); see the module docstring.
_PAD_PAD = -2.0
_PAD_INTO_REAL = -3.0
_REAL_INTO_PAD = -4.0
_CAPPED = -3.5  # a real pair beyond its row's cap (ratio on padded batches): after padding pairs


@register_method("tome")
@dataclass(kw_only=True)
class ToMeConfig(EncoderReducerConfig):
    """Token Merging (arXiv 2210.09461) for encoders; see the module docstring for where we depart from the paper.

    Fields:
        r: tokens merged per block: an int >= 0 for every block; an ``(r, inflect)`` pair (the paper's
            schedule: linear from ``r * (1 - inflect)`` in the first block to ``2r - r * (1 - inflect)`` in
            the last, so ``inflect=-1`` decreases, ``0`` is constant, ``+1`` increases); or a list of ints with
            one value per block (shorter lists are padded with zeros; a longer list is rejected on apply).
        inflect: the schedule's slope, in [-1, 1] (set from an ``(r, inflect)`` pair; ignored with a list).
        ratio: instead of ``r``, the fraction (at most 0.5) of each row's unprotected real tokens merged in every
            block: ``floor(ratio * n)``, so texts of different lengths lose the same share. In a padded batch
            each row merges its own count (the rest of the batch's merges pair padding with padding).
        metric: ``"keys"`` (the paper: the block's keys averaged over heads) or ``"hidden"`` (the block's
            post-attention hidden states; no attention statistics needed).
        prop_attn: add ``log(size)`` to the attention logits (proportional attention; the paper's default for
            off-the-shelf models). It needs a float attention mask, which keeps SDPA off its flash kernel.
        restore_length: return ``last_hidden_state`` at the input length (every input token gets the state
            of the merged token it went into).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="tome", r=16, prop_attn=False)
        >>> cfg.to_dict()
        {'method': 'tome', 'restore_length': False, 'prop_attn': False, 'r': 16, 'inflect': 0.0, 'ratio': None, 'metric': 'keys'}
    """

    paper = "2210.09461"
    status = "beta"

    prop_attn: bool = param(True, bool, help="proportional attention: add log(size) to the attention logits")
    r: int | list[int] | None = field(default=None, metadata={"help": _R_HELP + " (default 8 unless ratio is set)"})
    inflect: float = param(0.0, float, low=-1.0, high=1.0, help="slope of the (r, inflect) schedule")
    ratio: float | None = param(None, float, low=0.0, high=0.5, optional=True,
                                help="instead of r: fraction of each row's unprotected tokens merged per block")
    metric: str = param("keys", str, choices=METRICS,
                        help="similarity for matching: the block's keys (paper) or its hidden states")

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """Attention statistics the wiring computes: the keys, unless matching on hidden states."""
        return frozenset({"metric"}) if self.metric == "keys" else frozenset()

    def validate(self) -> None:
        def fail(name, value):
            return ConfigError(
                f"{name}: expected {_R_HELP}, got {value!r}" if name == "r" else
                f"{name}: expected an int >= 0 (tokens merged in that block), got {value!r}",
                field=name,
            )

        def check(name, value):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise fail(name, value)
            return int(value)

        if self.ratio is not None:
            if self.r is not None:
                raise ConfigError(f"ratio: give r or ratio, not both (got r={self.r!r}, ratio={self.ratio!r})",
                                  field="ratio")
            if self.inflect != 0.0:
                raise ConfigError("inflect: the (r, inflect) schedule needs an int r, not ratio", field="inflect")
            return
        if self.r is None:
            self.r = 8
        if isinstance(self.r, tuple):
            if len(self.r) != 2 or isinstance(self.r[1], bool) or not isinstance(self.r[1], numbers.Real):
                raise fail("r", self.r)
            r, inflect = self.r
            self.r = check("r", r)
            if not -1.0 <= float(inflect) <= 1.0:
                raise ConfigError(f"inflect: expected a number in [-1, 1], got {inflect!r}", field="inflect")
            self.inflect = float(inflect)
        elif isinstance(self.r, list):
            self.r = [check(f"r[{i}]", v) for i, v in enumerate(self.r)]
        else:
            self.r = check("r", self.r)

    def schedule(self, num_blocks: int) -> list[int]:
        """Tokens to merge in each of ``num_blocks`` blocks.

        Raises :class:`ConfigError` when ``r`` is a list longer than the model has blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="tome", r=[2, 1]).schedule(4)
            [2, 1, 0, 0]
        """
        if self.ratio is not None:
            return [self.ratio] * num_blocks
        if isinstance(self.r, list):
            if len(self.r) > num_blocks:
                raise ConfigError(
                    f"r: the list has {len(self.r)} values but the model has {num_blocks} blocks; "
                    f"give at most {num_blocks} values",
                    field="r",
                )
            return list(self.r) + [0] * (num_blocks - len(self.r))
        if self.inflect == 0.0 or num_blocks == 1:
            return [self.r] * num_blocks
        first = int(self.r * (1.0 - self.inflect))
        last = 2 * self.r - first
        step = (last - first) / (num_blocks - 1)
        return [max(int(first + step * i), 0) for i in range(num_blocks)]

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """Bipartite soft matching on the block's keys; merges ``ctx.amount`` pairs (see :func:`bipartite_soft_matching`).

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> from hf_tokred.methods.encoder.base import ReductionContext
            >>> x = torch.randn(1, 9, 8)
            >>> ctx = ReductionContext(hidden=x, size=torch.ones(1, 9, 1), valid=None, protected=1, class_tokens=1,
            ...                        block=0, num_blocks=1, amount=2, metric=x)
            >>> r = TokenReductionConfig(method="tome", r=2).plan(ctx)
            >>> r.apply(x, ctx.size)[1].sum().item(), r.num_slots
            (9.0, 7)
        """
        metric = ctx.metric if self.metric == "keys" else ctx.hidden.detach()
        row_r = None
        if isinstance(ctx.amount, float):  # ratio: each row merges its own share, the batch stays rectangular
            row_r = torch.floor(ctx.real_counts().double() * ctx.amount).long()
            r = int(row_r.max())
            row_r = row_r if ctx.valid is not None and bool((row_r != r).any()) else None
        else:
            r = ctx.amount
        merge = bipartite_soft_matching(metric, r, protected=ctx.protected, valid_mask=ctx.valid, row_r=row_r)
        return merge.to_reduction() if merge.r else None

    def reduce_tokens(self, x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protected: int,
                      valid_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ToMe step on plain tensors: match on ``metric``, merge ``r`` tokens of ``x``; returns ``(x, size)``.

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> cfg = TokenReductionConfig(method="tome", r=2)
            >>> x = torch.randn(1, 9, 8)
            >>> x2, size = cfg.reduce_tokens(x, torch.ones(1, 9, 1), x, r=2, protected=1)
            >>> x2.shape, size.sum().item()
            (torch.Size([1, 7, 8]), 9.0)
        """
        merge = bipartite_soft_matching(metric, r, protected=protected, valid_mask=valid_mask)
        return merge_wavg(merge, x, size)


# ---------------------------------------------------------------------------------------------
# Plain tensor functions
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenMerge:
    """The outcome of :func:`bipartite_soft_matching` for a batch: which tokens merge into which, and the new order.

    Attributes:
        src: ``(B, r)`` indices of the tokens merged away (all from set A).
        dst: ``(B, r)`` index of the token each of them is merged into (from set B).
        order: ``(B, N - r)`` indices of the tokens that remain, in output order.
        num_tokens: ``N``, the number of tokens before the merge.

    Example:
        >>> import torch
        >>> m = bipartite_soft_matching(torch.randn(2, 7, 4), r=2, protected=1)
        >>> m.src.shape, m.order.shape, m.merge(torch.randn(2, 7, 3)).shape
        (torch.Size([2, 2]), torch.Size([2, 5]), torch.Size([2, 5, 3]))
    """

    src: torch.Tensor
    dst: torch.Tensor
    order: torch.Tensor
    num_tokens: int

    @property
    def r(self) -> int:
        """The number of tokens this merge removes."""
        return self.src.shape[1]

    def to_reduction(self) -> Reduction:
        """The same merge as a :class:`~hf_tokred.methods.encoder.base.Reduction` (what the wiring applies).

        Example:
            >>> import torch
            >>> m = bipartite_soft_matching(torch.randn(2, 7, 4), r=2, protected=1)
            >>> m.to_reduction().keep.shape
            torch.Size([2, 5])
        """
        batch, m = self.order.shape
        position = torch.empty(batch, self.num_tokens, dtype=torch.long, device=self.order.device)
        position.scatter_(1, self.order, torch.arange(m, device=self.order.device).expand(batch, m))
        if self.r == 0:
            return Reduction(keep=self.order, num_tokens=self.num_tokens)
        position.scatter_(1, self.src, 0)  # merged-away tokens are not in the order; their slot is their dst's
        return Reduction(keep=self.order, num_tokens=self.num_tokens, src=self.src, dst=position.gather(1, self.dst))

    def merge(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Apply the merge to ``x`` of shape ``(B, N, C)``: reduce each source into its destination, then reorder.

        ``mode`` is a ``torch.scatter_reduce`` reduction (``"sum"``, ``"mean"``, ``"amax"``, ``"amin"``,
        ``"prod"``); the destination's own value takes part. Returns ``(B, N - r, C)``.

        Example:
            >>> import torch
            >>> m = bipartite_soft_matching(torch.randn(1, 5, 4), r=1)
            >>> m.merge(torch.ones(1, 5, 1)).sum().item()
            5.0
        """
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"TokenMerge.merge: expected {self.num_tokens} tokens, got {x.shape[1]}")
        if self.r == 0:
            return x
        channels = x.shape[-1]
        src = x.gather(1, self.src[..., None].expand(-1, -1, channels))
        x = x.scatter_reduce(1, self.dst[..., None].expand(-1, -1, channels), src, reduce=mode, include_self=True)
        return x.gather(1, self.order[..., None].expand(-1, -1, channels))


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0,
                            valid_mask: torch.Tensor | None = None, row_r: torch.Tensor | None = None) -> TokenMerge:
    """ToMe's bipartite soft matching on ``metric`` ``(B, N, C)`` (the paper uses keys averaged over heads).

    Tokens at even indices form set A, odd indices set B. Each A token is paired with its most similar B
    token (cosine similarity); the ``r`` best-matched A tokens are merged into their partners. The first
    ``protected`` tokens (CLS) are never merged and stay first. ``r`` is clamped to ``(N - protected) // 2``.

    ``valid_mask`` ``(B, N)`` marks real tokens (``False`` for padding): pairs involving padding are ranked
    below every real pair, padding is never merged into a real token except with weight zero (see
    :func:`merge_wavg` with size 0), a real token never into padding, and real tokens come before padding
    in the output order. The matching runs without gradients, as in the paper.

    ``row_r`` ``(B,)`` caps the merges between real tokens per row (``ToMe(ratio=...)`` on padded batches):
    a row's real pairs beyond its cap rank below its padding pairs, so it merges padding instead.

    Example:
        >>> import torch
        >>> metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 1.0]]])
        >>> m = bipartite_soft_matching(metric, r=1, protected=1)
        >>> m.src.tolist(), m.dst.tolist(), m.order.tolist()   # token 2 merges into token 3
        ([[2]], [[3]], [[0, 4, 1, 3]])
    """
    if metric.dim() != 3:
        raise ValueError(f"bipartite_soft_matching: metric must be (batch, tokens, channels), got {tuple(metric.shape)}")
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise ValueError(f"bipartite_soft_matching: r must be an int >= 0, got {r!r}")
    batch, n, _ = metric.shape
    device = metric.device
    r = min(int(r), max((n - protected) // 2, 0))
    if r == 0:
        order = torch.arange(n, device=device).expand(batch, n)
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return TokenMerge(empty, empty, order, n)

    with torch.no_grad():
        metric = torch.nn.functional.normalize(metric.float(), dim=-1)
        a_idx = torch.arange(0, n, 2, device=device)
        b_idx = torch.arange(1, n, 2, device=device)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|), A/B as strided views
        if valid_mask is not None:
            va = valid_mask[:, a_idx, None]
            vb = valid_mask[:, None, b_idx]
            tier = torch.where(va, _REAL_INTO_PAD, torch.where(vb, _PAD_INTO_REAL, _PAD_PAD))
            scores = torch.where(va & vb, scores, tier.to(scores.dtype))
        if protected:
            scores[:, : (protected + 1) // 2, :] = -torch.inf  # A tokens 0, 2, ... below `protected`
            scores[:, :, : protected // 2] = -torch.inf  # B tokens 1, 3, ... below `protected`

        best, partner = scores.max(dim=-1)  # each A token's most similar B token
        ranked = best.argsort(dim=-1, descending=True, stable=True)
        if row_r is not None:
            position = torch.empty_like(ranked).scatter_(
                1, ranked, torch.arange(ranked.shape[1], device=device).expand_as(ranked))
            capped = (best > _PAD_PAD) & (position >= row_r[:, None])
            best = best.masked_fill(capped, _CAPPED)
            ranked = best.argsort(dim=-1, descending=True, stable=True)
        src_rows = ranked[:, :r]
        src = a_idx[src_rows]
        dst = b_idx[partner.gather(1, src_rows)]

        # Output order: protected tokens, unmerged A tokens, B tokens (each by index), padding last.
        position = torch.arange(n, device=device)
        group = torch.where(position < protected, 0, torch.where(position % 2 == 0, 1, 2))
        key = (group * n + position).expand(batch, n).clone()
        if valid_mask is not None:
            valid = valid_mask.to(torch.uint8)
            valid = valid.scatter_reduce(1, dst, valid.gather(1, src), reduce="amax", include_self=True)
            key += (valid == 0).long() * (3 * n)
        key.scatter_(1, src, 6 * n)
        order = key.argsort(dim=-1)[:, : n - r]
    return TokenMerge(src, dst, order, n)


def merge_wavg(merge: TokenMerge, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` ``(B, N, C)`` by size-weighted average; returns ``(x, size)`` with ``N - r`` tokens.

    ``size`` ``(B, N, 1)`` counts the input tokens each token stands for (ones when None; 0 for padding,
    whose values then never reach a real token). Sizes are summed, so they always add up to the number
    of real input tokens. Tokens of size 0 come out as zeros.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 9, 16)
        >>> m = bipartite_soft_matching(x, r=3, protected=1)
        >>> y, size = merge_wavg(m, x)
        >>> y.shape, size.sum(dim=1).flatten().tolist()
        (torch.Size([2, 6, 16]), [9.0, 9.0])
    """
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    if merge.r == 0:
        return x, size
    weight = size.to(x.dtype)
    x = merge.merge(x * weight, "sum")
    size = merge.merge(size, "sum")
    denominator = size.to(x.dtype)
    x = x / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return x, size


__all__ = ["TokenMerge", "ToMeConfig", "bipartite_soft_matching", "merge_wavg"]
