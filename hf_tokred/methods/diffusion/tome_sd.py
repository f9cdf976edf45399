"""ToMe for Stable Diffusion: merge redundant image tokens around attention (Bolya & Hoffman, arXiv 2303.17604).

Before a transformer block's self-attention, the image tokens are split into *destination* tokens
(one per ``sx x sy`` cell of the token grid) and *source* tokens (the rest). Every source token is
matched to its most similar destination token (cosine similarity of the block's input), the ``r``
best-matched sources are averaged into their destinations, and the attention runs on the ``N - r``
tokens left. Its output is then *unmerged*: every merged source token gets a copy of its
destination's output, so the block's residual stream keeps all ``N`` tokens and nothing downstream
changes shape. Optionally the same merge/unmerge wraps cross-attention and the feed-forward.

The merge and unmerge are plain index operations (:class:`GridMatching`): the merge is one
``index_select`` of the kept tokens plus one ``index_add_`` of the merged ones (a mean, as in the
paper), the unmerge one ``index_select``. The wiring (which module is merged, how the token grid
and the level of a block are found) lives in ``hf_tokred.integration.diffusers`` and
``hf_tokred.model_patches``.

Where we depart from the paper and from tomesd 0.1.3:

* The random choice of destination tokens (``use_rand``) comes from a generator re-seeded at every
  block call from ``seed``, the call's timestep and the block's index. A seeded pipeline call is
  therefore reproducible whatever ran before it, every row of a batch gets the same partition, a
  classifier-free-guidance batch gives each row exactly what it gives that row alone, and a block
  recomputed by gradient checkpointing draws the same partition again. tomesd forks the global RNG
  once and keeps advancing it, and turns ``use_rand`` off for odd batch sizes so that separately run
  cond/uncond halves do not get different partitions; neither is needed here.
* The token grid of a block is read from the call (latent size / patch size, halved per UNet
  level), so odd latent sizes and patch-size-2 DiTs are merged at the right grid; tomesd derives it
  from ``sqrt(N)`` and never merges a patch-2 DiT with ``max_downsample=1``.
* A denoiser where no block would be merged is an error at ``apply`` time (tomesd does nothing,
  silently, on SDXL, whose first UNet level has no attention).
* On denoisers whose attention takes a per-position rotary table (Flux's ``image_rotary_emb``, one
  ``(positions, dim)`` table for the whole batch), a merged destination token keeps its own position's
  rotation: the attention gets the table rows of the tokens it keeps. Every batch row has its own
  matching, as everywhere else, so when the rows keep different tokens the Flux attention runs once per
  batch row with that row's table rows (the paper does not cover rotary embeddings; the FLOPs are the
  same, in ``batch`` smaller attention calls). A batch row therefore equals that row run alone.

With ``use_rand=False`` the outputs equal tomesd's to float rounding (``tests/test_tome_sd.py``).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> import hf_tokred.methods.diffusion.tome_sd  # noqa: F401  (registers "tome_sd")
    >>> cfg = TokenReductionConfig(method="tome_sd", ratio=0.5)
    >>> type(cfg).__name__, cfg.max_downsample, cfg.sx, cfg.sy, cfg.use_rand
    ('ToMeSDConfig', 1, 2, 2, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError

# Largest sx/sy a config accepts. Token grids of today's denoisers are at most 128 wide (SDXL's 1024px latent);
# a cell as wide as the grid already leaves one destination per row of cells.
MAX_STRIDE = 128


@register_method("tome_sd")
@dataclass(kw_only=True)
class ToMeSDConfig(TokenReductionConfig):
    """Token merging around the attention of UNet and DiT denoisers (ToMe for SD, arXiv 2303.17604).

    ``ratio`` is the fraction of a merged block's image tokens removed by merging (0: nothing is
    merged and outputs are bit-identical to the dense model; at most ``1 - 1 / (sx * sy)``, when
    every source token is merged). ``max_downsample`` limits merging to the finest token grids
    (1: only the highest-resolution UNet level, where attention costs the most; DiT-family
    denoisers have one level). ``sx``/``sy`` are the width/height of the grid cells that each
    hold one destination token (at most :data:`MAX_STRIDE`; a denoiser call whose finest merged token
    grid is smaller than one cell raises :class:`~hf_tokred.errors.ConfigError` instead of merging nothing). ``use_rand`` picks the destination token of each cell at random
    (from a generator seeded by ``seed``, the timestep and the block) instead of the top-left one.
    ``merge_attn``, ``merge_crossattn`` and ``merge_mlp`` choose what runs on the merged tokens:
    self-attention (the default), cross-attention to the text, the feed-forward.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> import hf_tokred.methods.diffusion.tome_sd  # noqa: F401
        >>> cfg = TokenReductionConfig(method="tome_sd", ratio=0.3, use_rand=False)
        >>> cfg.to_dict()["ratio"], cfg.merge_attn, cfg.merge_mlp
        (0.3, True, False)
    """

    stage: ClassVar[str] = "diffusion"
    model_kinds: ClassVar[tuple[str, ...]] = ("unet", "dit")
    paper: ClassVar[str] = "2303.17604"
    status: ClassVar[str] = "beta"

    ratio: float = param(
        0.5, float, low=0.0, high=1.0, high_open=True, help="fraction of a merged block's image tokens merged away"
    )
    max_downsample: int = param(
        1, int, low=1, help="merge only token grids at most this much coarser than the finest one (UNet levels 1, 2, 4, 8)"
    )
    # Bounded by MAX_STRIDE here; whether a cell fits the token grid is checked on every denoiser call, where
    # the grid is known (a cell larger than the grid would merge nothing, silently).
    sx: int = param(2, int, low=1, high=MAX_STRIDE,
                    help="width of the grid cells that each hold one destination token (must fit the token grid)")
    sy: int = param(2, int, low=1, high=MAX_STRIDE,
                    help="height of the grid cells that each hold one destination token (must fit the token grid)")
    use_rand: bool = param(True, bool, help="pick each cell's destination token at random (else its top-left token)")
    seed: int = param(
        0, int, low=0, help="seed of the generator that picks destination tokens (with the timestep and block index)"
    )
    merge_attn: bool = param(True, bool, help="run self-attention on the merged tokens")
    merge_crossattn: bool = param(False, bool, help="run cross-attention on the merged tokens")
    merge_mlp: bool = param(False, bool, help="run the feed-forward on the merged tokens")

    def validate(self) -> None:
        cell = self.sx * self.sy
        if cell < 2:
            raise ConfigError(
                f"sx: sx * sy must be at least 2 (each cell needs a token to merge), got sx={self.sx}, sy={self.sy}",
                field="sx",
            )
        limit = 1 - 1 / cell
        if self.ratio > limit + 1e-12:
            raise ConfigError(
                f"ratio: expected a number in [0, {limit:g}] for sx={self.sx}, sy={self.sy} (one token of every "
                f"{cell} is a destination and cannot be merged away), got {self.ratio!r}",
                field="ratio",
            )
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ConfigError(
                "merge_attn: at least one of merge_attn, merge_crossattn, merge_mlp must be true", field="merge_attn"
            )


def grid_partition(
    height: int, width: int, sx: int, sy: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a row-major ``height x width`` token grid into destination and source token indices.

    Each full ``sy x sx`` cell (cells are laid from the top-left; rows/columns left over at the
    bottom/right hold only sources) contributes one destination token: its top-left token, or a
    random one drawn from ``generator``. Returns ``(dst, src)``, 1-D int64 CPU tensors; ``dst`` is
    in cell order, ``src`` ascending.

    Example:
        >>> from hf_tokred.methods.diffusion.tome_sd import grid_partition
        >>> dst, src = grid_partition(4, 4, 2, 2)
        >>> dst.tolist()
        [0, 2, 8, 10]
        >>> len(src)
        12
    """
    cells_y, cells_x = height // sy, width // sx
    if generator is None:
        offset_y = torch.zeros(cells_y, cells_x, dtype=torch.long)
        offset_x = torch.zeros(cells_y, cells_x, dtype=torch.long)
    else:
        offsets = torch.randint(sy * sx, (cells_y, cells_x), generator=generator, device=generator.device).cpu()
        offset_y, offset_x = offsets // sx, offsets % sx
    rows = torch.arange(cells_y).view(-1, 1) * sy + offset_y
    cols = torch.arange(cells_x).view(1, -1) * sx + offset_x
    dst = (rows * width + cols).flatten()
    is_src = torch.ones(height * width, dtype=torch.bool)
    is_src[dst] = False
    return dst, is_src.nonzero().flatten()


@dataclass
class GridMatching:
    """A merge of ``r`` source tokens into destination tokens, for every row of a batch, and its inverse.

    Built by :func:`bipartite_soft_matching_2d`. ``merge`` maps ``(batch, tokens, C)`` to
    ``(batch, tokens - merged, C)``: the unmerged source tokens, then the destination tokens, each
    the mean of itself and the sources merged into it. ``unmerge`` maps it back, every merged source
    reading its destination's value. Any tensor with the same leading shape can be merged (the
    matching is computed once, from the block input, and reused for attention/MLP inputs).
    """

    batch: int
    tokens: int
    merged: int
    unmerged_src: int
    keep_index: torch.Tensor  # (batch * kept,) rows of the flattened input kept, [unmerged src, dst] per row
    src_index: torch.Tensor  # (batch * merged,) rows of the flattened input merged away
    src_target: torch.Tensor  # (batch * merged,) rows of the flattened output each merged source is added to
    dst_size: torch.Tensor  # (batch, dst, 1) tokens averaged into each destination (itself included)
    restore_index: torch.Tensor  # (batch * tokens,) row of the flattened merged tensor each token reads back
    kept_tokens: torch.Tensor  # (batch, kept) grid index of the token each merged row stands at

    @property
    def kept(self) -> int:
        return self.tokens - self.merged

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Average the merged source tokens into their destinations: ``(B, N, C) -> (B, N - r, C)``."""
        self._check(x, self.tokens)
        channels = x.shape[-1]
        flat = x.reshape(self.batch * self.tokens, channels)
        out = flat.index_select(0, self.keep_index)
        out.index_add_(0, self.src_target, flat.index_select(0, self.src_index))
        out = out.view(self.batch, self.kept, channels)
        dst = out[:, self.unmerged_src :]
        dst.div_(self.dst_size.to(out.dtype))
        return out

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Give every token its slot's value back: ``(B, N - r, C) -> (B, N, C)``."""
        self._check(x, self.kept)
        channels = x.shape[-1]
        flat = x.reshape(self.batch * self.kept, channels)
        return flat.index_select(0, self.restore_index).view(self.batch, self.tokens, channels)

    def _check(self, x: torch.Tensor, tokens: int) -> None:
        if x.ndim != 3 or x.shape[0] != self.batch or x.shape[1] != tokens:
            raise ValueError(f"expected a ({self.batch}, {tokens}, channels) tensor, got {tuple(x.shape)}")


def bipartite_soft_matching_2d(
    metric: torch.Tensor,
    height: int,
    width: int,
    sx: int,
    sy: int,
    r: int,
    generator: torch.Generator | None = None,
) -> GridMatching | None:
    """Match ``r`` source tokens of each row to their most similar destination tokens (ToMe for SD).

    ``metric`` is ``(batch, height * width, C)`` in row-major grid order. Destinations are chosen by
    :func:`grid_partition` (the same for every row); each source's best destination is its highest
    cosine similarity, and the ``r`` sources with the highest best-similarity are merged (``r`` is
    capped at the number of sources). Returns None when nothing can be merged (``r <= 0``, or the
    grid is smaller than one cell). Every row is matched on its own.

    Example:
        >>> import torch
        >>> from hf_tokred.methods.diffusion.tome_sd import bipartite_soft_matching_2d
        >>> x = torch.randn(2, 16, 8)
        >>> m = bipartite_soft_matching_2d(x, 4, 4, 2, 2, r=8)
        >>> m.merge(x).shape, m.unmerge(m.merge(x)).shape
        (torch.Size([2, 8, 8]), torch.Size([2, 16, 8]))
    """
    batch, tokens, _ = metric.shape
    if tokens != height * width:
        raise ValueError(f"metric: expected (batch, {height} * {width}, C), got {tuple(metric.shape)}")
    if r <= 0 or height < sy or width < sx:
        return None
    device = metric.device
    dst_tokens, src_tokens = grid_partition(height, width, sx, sy, generator)
    dst_tokens, src_tokens = dst_tokens.to(device), src_tokens.to(device)
    num_dst, num_src = dst_tokens.numel(), src_tokens.numel()
    r = min(r, num_src)
    with torch.no_grad():
        # Select first, then normalize the copies in place: one pass less over the (B, N, C) metric.
        src_metric = metric.index_select(1, src_tokens)
        dst_metric = metric.index_select(1, dst_tokens)
        src_metric.div_(src_metric.norm(dim=-1, keepdim=True))
        dst_metric.div_(dst_metric.norm(dim=-1, keepdim=True))
        scores = src_metric @ dst_metric.transpose(-1, -2)
        del src_metric, dst_metric
        best_score, best_dst = scores.max(dim=-1)  # (B, src)
        del scores
        order = best_score.argsort(dim=-1, descending=True)
        merged_src, unmerged_src = order[:, :r], order[:, r:]
        target_dst = best_dst.gather(1, merged_src)  # (B, r), indices into dst_tokens

        n_unm = num_src - r
        kept = n_unm + num_dst
        rows = torch.arange(batch, device=device).view(-1, 1)
        keep_tokens = torch.cat([src_tokens[unmerged_src], dst_tokens.expand(batch, num_dst)], dim=1)
        keep_index = (keep_tokens + rows * tokens).flatten()
        src_index = (src_tokens[merged_src] + rows * tokens).flatten()
        target_slot = n_unm + target_dst
        src_target = (target_slot + rows * kept).flatten()
        dst_size = torch.ones(batch, num_dst, device=device)
        dst_size.scatter_add_(1, target_dst, torch.ones(batch, r, device=device))
        # restore[b, token] = slot of the merged row that token reads back on unmerge.
        restore = torch.empty(batch, tokens, dtype=torch.long, device=device)
        restore.scatter_(1, keep_tokens, torch.arange(kept, device=device).expand(batch, kept))
        restore.scatter_(1, src_tokens[merged_src], target_slot)
        restore_index = (restore + rows * kept).flatten()
    return GridMatching(
        batch=batch,
        tokens=tokens,
        merged=r,
        unmerged_src=n_unm,
        keep_index=keep_index,
        src_index=src_index,
        src_target=src_target,
        dst_size=dst_size.unsqueeze(-1),
        restore_index=restore_index,
        kept_tokens=keep_tokens,
    )


def merged_count(tokens: int, ratio: float, height: int, width: int, sx: int, sy: int) -> int:
    """How many of ``tokens`` tokens a block merges away: ``int(tokens * ratio)``, capped at the source count.

    Example:
        >>> from hf_tokred.methods.diffusion.tome_sd import merged_count
        >>> merged_count(4096, 0.5, 64, 64, 2, 2), merged_count(4096, 0.9, 64, 64, 2, 2)
        (2048, 3072)
    """
    if height < sy or width < sx:
        return 0
    return min(int(tokens * ratio), tokens - (height // sy) * (width // sx))


__all__ = ["GridMatching", "ToMeSDConfig", "bipartite_soft_matching_2d", "grid_partition", "merged_count"]
