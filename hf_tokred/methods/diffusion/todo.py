"""ToDo: token downsampling of keys and values (Smith, Saxena & Saha, arXiv 2402.13573).

Self-attention in a diffusion denoiser spends most of its time on the highest-resolution token grid,
where neighbouring tokens are nearly redundant. ToDo keeps every query but lets it attend to a
spatially downsampled copy of the grid: with ``downsample_factor=2`` each query sees a quarter of the
keys and values, so the attention costs about a quarter as much and the output keeps its full length
(no unmerge step, no similarity matching as in ToMe for SD). It needs no training.

Where we depart from the paper:

* We downsample the attention *input* tokens and let the attention project them to keys and values.
  The paper downsamples the keys and values themselves; the two are the same because the key/value
  projections act on each token alone and every downsampling method here averages with weights that
  sum to one (``nearest`` picks one token, so it is exact; ``avg``/``linear`` agree up to rounding).
  Projecting fewer tokens also saves the projection FLOPs.
* ``nearest`` picks the token nearest to the centre of every ``factor x factor`` cell
  (``F.interpolate(mode="nearest-exact")``), so grids that do not divide by the factor still work;
  ``linear`` is an antialiased bilinear filter, so that it differs from ``avg`` at factor 2.
* Only self-attention (``attn1``) is reduced; cross-attention to the text is left alone, as in the paper.
  In SD3's joint attention only the image keys/values are downsampled (at ``to_k``/``to_v``); the text
  keys/values and every query stay.
* On Flux (``FluxTransformer2DModel``) the attention processor projects, RMS-normalizes and rotates
  (RoPE, one table row per position of ``[text, image]``) queries and keys itself, so the input tokens
  cannot be downsampled there: a reduced input would get the rotations of the wrong positions. Instead
  the image part of the keys and values is downsampled at the attention kernel call, *after* the
  rotation (the text keys/values and every query stay). With ``nearest`` a kept key is exactly the key
  of its own grid position, rotated by its own position, as if the grid had been subsampled before the
  attention. With ``avg``/``linear`` a pooled key is the (weighted) mean of its cell's *rotated* keys: a
  query's logit against it is the same mean of its logits against the cell's keys, but it is not the key
  of any one position (pooling before the rotation would instead rotate a mixture of the cell's keys by
  one position's angles, and pooling the input would also mix the tokens before the per-head RMS norm).
  The key/value projections run on every token there, so only the attention itself is cheaper. This
  departs from the paper, which predates RoPE denoisers.
* ``max_downsample`` follows tomesd: the finest token grid is level 1 (the latent for UNets, the
  patch grid for DiTs), UNet levels are 1, 2, 4, 8, and only levels ``<= max_downsample`` are reduced.
  The paper's reference code also switches the factor at timestep thresholds; we use one factor for
  every step.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> import hf_tokred.methods.diffusion.todo  # noqa: F401  (registers "todo")
    >>> cfg = TokenReductionConfig(method="todo", downsample_factor=2)
    >>> type(cfg).__name__, cfg.downsample_method, cfg.max_downsample
    ('ToDoConfig', 'nearest', 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import TokenReductionConfig, param, register_method

METHODS = ("nearest", "avg", "linear")


@register_method("todo")
@dataclass(kw_only=True)
class ToDoConfig(TokenReductionConfig):
    """Token downsampling of self-attention keys/values in UNet and DiT-family denoisers (arXiv 2402.13573).

    ``downsample_factor`` shrinks each side of the token grid the keys/values come from (2: a quarter
    of the tokens; 1: no reduction, outputs bit-identical to the dense model). ``downsample_method``
    (``"nearest"``, ``"avg"`` or ``"linear"``) is how a cell of tokens is pooled; it is not called
    ``method`` because that key names the reduction method itself. ``max_downsample`` limits the
    reduction to the finest token grids (1, the default: only the highest-resolution UNet level,
    where attention costs the most).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> import hf_tokred.methods.diffusion.todo  # noqa: F401
        >>> cfg = TokenReductionConfig(method="todo", downsample_factor=3, downsample_method="avg")
        >>> cfg.to_dict()
        {'method': 'todo', 'downsample_factor': 3, 'downsample_method': 'avg', 'max_downsample': 1}
    """

    stage: ClassVar[str] = "diffusion"
    model_kinds: ClassVar[tuple[str, ...]] = ("unet", "dit")
    paper: ClassVar[str] = "2402.13573"
    # UNet (SD1.5/SDXL layouts), DiT, PixArt, SD3 and Flux (keys/values reduced after RoPE) work and are tested.
    status: ClassVar[str] = "beta"

    downsample_factor: int = param(
        2, int, low=1, help="each side of the key/value token grid is divided by this (1 = no reduction)"
    )
    # Not called ``method``: that name is the registry key of every config.
    downsample_method: str = param("nearest", str, choices=METHODS, help="how a cell of tokens is pooled")
    max_downsample: int = param(
        1,
        int,
        low=1,
        help="reduce only token grids at most this much coarser than the finest one (UNet levels 1, 2, 4, 8)",
    )


def downsampled_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """The grid ``(height, width)`` becomes ``(ceil(height / factor), ceil(width / factor))``.

    Example:
        >>> from hf_tokred.methods.diffusion.todo import downsampled_size
        >>> downsampled_size(64, 63, 2)
        (32, 32)
    """
    return math.ceil(height / factor), math.ceil(width / factor)


def downsample_tokens(
    hidden_states: torch.Tensor, height: int, width: int, factor: int, method: str = "nearest"
) -> torch.Tensor:
    """Downsample a row-major ``height x width`` token grid by ``factor`` on each side.

    ``hidden_states`` is ``(batch, height * width, channels)`` with token ``y * width + x`` at row
    ``y``, column ``x`` (the layout of diffusers' UNet and DiT attention inputs). Returns
    ``(batch, ceil(height / factor) * ceil(width / factor), channels)`` in the same layout; every row
    of the batch is pooled on its own. ``factor=1`` returns ``hidden_states`` itself.

    ``method``: ``"nearest"`` keeps the token nearest the centre of each ``factor x factor`` cell,
    ``"avg"`` averages the tokens of the cell (a partial cell at the edge averages what it holds),
    ``"linear"`` applies an antialiased bilinear filter.

    Example:
        >>> import torch
        >>> from hf_tokred.methods.diffusion.todo import downsample_tokens
        >>> grid = torch.arange(16.0).view(1, 16, 1)          # a 4 x 4 grid, one channel
        >>> downsample_tokens(grid, 4, 4, 2, "nearest").flatten().tolist()
        [5.0, 7.0, 13.0, 15.0]
        >>> downsample_tokens(grid, 4, 4, 2, "avg").flatten().tolist()
        [2.5, 4.5, 10.5, 12.5]
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: expected an int >= 1, got {factor!r}")
    if hidden_states.ndim != 3 or hidden_states.shape[1] != height * width:
        raise ValueError(
            f"hidden_states: expected (batch, {height} * {width}, channels), got {tuple(hidden_states.shape)}"
        )
    if factor == 1:
        return hidden_states
    batch, _, channels = hidden_states.shape
    new_height, new_width = downsampled_size(height, width, factor)
    # (B, h*w, C) -> (B, C, h, w): a view when the tokens are laid out row by row (a copy otherwise).
    grid = hidden_states.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    if method == "nearest":
        pooled = F.interpolate(grid, size=(new_height, new_width), mode="nearest-exact")
    elif method == "avg":
        # ceil_mode keeps the partial cells at the right/bottom edge; their mean counts only real tokens.
        pooled = F.avg_pool2d(grid, kernel_size=factor, stride=factor, ceil_mode=True)
    else:
        # The antialiased kernel has no half/bfloat16 CPU implementation; filter in float32 there.
        upcast = grid.device.type == "cpu" and grid.dtype in (torch.float16, torch.bfloat16)
        source = grid.float() if upcast else grid
        pooled = F.interpolate(
            source, size=(new_height, new_width), mode="bilinear", align_corners=False, antialias=True
        ).to(grid.dtype)
    return pooled.permute(0, 2, 3, 1).reshape(batch, new_height * new_width, channels)


__all__ = ["METHODS", "ToDoConfig", "downsample_tokens", "downsampled_size"]
