"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR'23, arXiv 2210.09461).

After the attention of every block, ToMe merges the ``r`` most similar pairs of tokens, so a ViT with
``L`` blocks ends with ``N - r*L`` tokens. Matching is *bipartite soft matching*: the tokens are split
alternately into sets A and B, every A token finds its most similar B token (cosine similarity of the
block's keys averaged over heads), and the ``r`` A tokens with the most similar partners are merged into
them by a size-weighted average. Every token carries a *size* (how many input tokens it stands for);
*proportional attention* adds ``log(size)`` to the attention logits so a merged token counts as many.
The CLS token is never merged and stays at index 0.

Where we depart from the paper:

* **Merge point.** The paper merges between a block's attention and its MLP. hf_tokred never copies a
  model's ``forward``, and the residual stream inside a transformers block cannot be shortened from
  outside, so we merge at the block's output (after the MLP), with the metric from the same block's
  attention. Token counts per block are the paper's (``N - r``, ``N - 2r``, ...); the MLP of each block
  runs on the tokens before that block's merge (a little less speed-up), and the merged value is the
  size-weighted average of the block's outputs rather than of its post-attention states.
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
* The ``(r, inflect)`` schedule of the reference code is not offered; pass a list of per-block values.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="tome", r=4)
    >>> cfg.schedule(3), TokenReductionConfig(method="tome", r=[8, 4]).schedule(3)
    ([4, 4, 4], [8, 4, 0])
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError

_R_HELP = "tokens merged in every block (an int >= 0), or a list of ints >= 0 with one value per block"

# Scores given to pairs that involve padding (cosine similarities lie in [-1, 1]); see the module docstring.
_PAD_PAD = -2.0
_PAD_INTO_REAL = -3.0
_REAL_INTO_PAD = -4.0


@register_method("tome")
@dataclass(kw_only=True)
class ToMeConfig(TokenReductionConfig):
    """Token Merging (arXiv 2210.09461) for ViT/BERT encoders; see the module docstring for where we depart from
    the paper.

    Fields:
        r: tokens merged per block: an int >= 0 for every block, or a list of ints with one value per block
            (shorter lists are padded with zeros, as in the paper's code; a longer list is rejected on apply).
        prop_attn: add ``log(size)`` to the attention logits (proportional attention; the paper's default for
            off-the-shelf models). It needs a float attention mask, which keeps SDPA off its flash kernel.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="tome", r=16, prop_attn=False)
        >>> cfg.to_dict()
        {'method': 'tome', 'r': 16, 'prop_attn': False}
    """

    stage = "sequence"
    model_kinds = ("encoder",)
    paper = "2210.09461"
    # ViT and BERT work and are tested; (r, inflect) schedules, restore_length, DeiT/CLIP/SigLIP/DINOv2 and
    # the speed targets are still to come.
    status = "beta"

    r: int | list[int] = field(default=8, metadata={"help": _R_HELP})
    prop_attn: bool = param(True, bool, help="proportional attention: add log(size) to the attention logits")

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

        if isinstance(self.r, (list, tuple)):
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
        if isinstance(self.r, int):
            return [self.r] * num_blocks
        if len(self.r) > num_blocks:
            raise ConfigError(
                f"r: the list has {len(self.r)} values but the model has {num_blocks} blocks; "
                f"give at most {num_blocks} values",
                field="r",
            )
        return list(self.r) + [0] * (num_blocks - len(self.r))

    def reduce_tokens(self, x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protected: int,
                      valid_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ToMe step: match on ``metric`` and merge ``r`` tokens of ``x`` (size-weighted); returns ``(x, size)``.

        This is what the encoder wiring calls after every block.

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
                            valid_mask: torch.Tensor | None = None) -> TokenMerge:
    """ToMe's bipartite soft matching on ``metric`` ``(B, N, C)`` (the paper uses keys averaged over heads).

    Tokens at even indices form set A, odd indices set B. Each A token is paired with its most similar B
    token (cosine similarity); the ``r`` best-matched A tokens are merged into their partners. The first
    ``protected`` tokens (CLS) are never merged and stay first. ``r`` is clamped to ``(N - protected) // 2``.

    ``valid_mask`` ``(B, N)`` marks real tokens (``False`` for padding): pairs involving padding are ranked
    below every real pair, padding is never merged into a real token except with weight zero (see
    :func:`merge_wavg` with size 0), a real token never into padding, and real tokens come before padding
    in the output order. The matching runs without gradients, as in the paper.

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
        scores = metric[:, a_idx] @ metric[:, b_idx].transpose(1, 2)  # (B, |A|, |B|)
        if valid_mask is not None:
            va = valid_mask[:, a_idx, None]
            vb = valid_mask[:, None, b_idx]
            tier = torch.where(va, _REAL_INTO_PAD, torch.where(vb, _PAD_INTO_REAL, _PAD_PAD))
            scores = torch.where(va & vb, scores, tier.to(scores.dtype))
        scores[:, a_idx < protected, :] = -torch.inf
        scores[:, :, b_idx < protected] = -torch.inf

        best, partner = scores.max(dim=-1)  # each A token's most similar B token
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
