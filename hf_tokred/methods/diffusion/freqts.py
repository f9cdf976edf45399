"""FreqTS: frequency-aware token selection across denoising steps (FreqTS, AAAI 2025; no arXiv id found).

Consecutive denoising steps change a token's block output little, and they change it least where the
image is smooth: low-frequency content is fixed early in sampling, while edges and texture (the
high-frequency part of the token grid) keep being refined. FreqTS therefore recomputes, at each step,
only the tokens with the most high-frequency content and lets the others reuse what the previous
steps computed. It needs no training.

How it works here, for every transformer block of the reduced levels:

* every ``full_every``-th denoising step (and the first ``warmup_steps`` steps of a run) the block
  runs on all its tokens, as in the dense model, and its residual update ``output - input`` of
  every token is cached;
* on the other steps each token is scored by the energy of the high-pass part of the block's input
  grid (the token minus the mean of its ``kernel_size x kernel_size`` neighbourhood,
  :func:`high_frequency_scores`); the top ``1 - r`` of the tokens of every batch row (their count is
  the same for every row) go through the whole block (self-attention among the selected tokens,
  cross-attention, feed-forward), and every other token gets the cheap update
  ``input + cached update``; the selected tokens' cached updates are refreshed;
* ``r`` follows the timestep (:func:`step_ratio`): with ``schedule="u_shaped"`` it is
  ``ratio * 4 s (1 - s)`` with ``s = timestep / 1000``, so the first (noisiest) and last steps
  recompute more tokens than the middle of sampling, where ``ratio`` applies in full.

``ratio=0`` (or ``full_every=1``) attaches nothing: outputs are bit-identical to the dense model.

Where we depart from the paper:

* The paper's exact scoring and schedule are not public as code (none was found); we score by the
  spatial high-pass energy of the block input (a box-filter low-pass, not an FFT split) and use
  a fixed ``4 s (1 - s)`` timestep profile rather than a tuned per-step table.
* Non-selected tokens reuse the *residual update* of the block from the last step that computed
  them (added to their current input), not a cached attention map or feature; the selected tokens
  attend only among themselves in the block's self-attention.
* The selection is made per block (from that block's input) and per batch row, so classifier-free
  guidance halves of a batch select their own tokens.
* A step is a denoiser call: a call whose timestep is higher than the previous call's starts a new
  run (full recompute). Pipelines that call the denoiser twice per step (conditional and
  unconditional separately) would mix the two calls' caches; the diffusers pipelines of the
  supported denoisers batch them.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> import hf_tokred.methods.diffusion.freqts  # noqa: F401  (registers "freqts")
    >>> cfg = TokenReductionConfig(method="freqts", ratio=0.5)
    >>> type(cfg).__name__, cfg.full_every, cfg.schedule
    ('FreqTSConfig', 3, 'u_shaped')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import TokenReductionConfig, param, register_method

SCHEDULES = ("constant", "u_shaped")
# Timesteps of the supported schedulers run from about 1000 (pure noise) down to 0; flow-matching
# denoisers (SD3) are called with sigma * 1000.
TIMESTEP_SCALE = 1000.0


@register_method("freqts")
@dataclass(kw_only=True)
class FreqTSConfig(TokenReductionConfig):
    """Frequency-aware token selection across denoising steps on UNet and DiT-family denoisers (FreqTS, AAAI'25).

    ``ratio`` is the fraction of a reduced block's image tokens that reuse their cached update on a
    partial step (0: nothing is reduced, outputs bit-identical to dense). ``full_every`` recomputes
    every token every that many steps (1: every step, i.e. dense); ``warmup_steps`` runs the first
    steps of a run dense. ``schedule`` scales ``ratio`` with the timestep (``"u_shaped"``: less at the
    noisiest and the last steps). ``kernel_size`` is the side of the low-pass window the high-frequency
    score subtracts. ``max_downsample`` limits the reduction to the finest token grids (UNet levels
    1, 2, 4, 8; DiT-family denoisers have one level).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> import hf_tokred.methods.diffusion.freqts  # noqa: F401
        >>> cfg = TokenReductionConfig(method="freqts", ratio=0.6, full_every=4)
        >>> cfg.to_dict()["ratio"], cfg.warmup_steps, cfg.kernel_size
        (0.6, 1, 3)
    """

    stage: ClassVar[str] = "diffusion"
    model_kinds: ClassVar[tuple[str, ...]] = ("unet", "dit")
    paper: ClassVar[str] = "FreqTS (AAAI 2025)"
    # Works and is tested on UNet, DiT, PixArt and SD3; experimental because its output error is measured on
    # random weights only, where it trails tome_sd/todo at equal FLOPs (step-to-step reuse needs real weights).
    status: ClassVar[str] = "experimental"
    # Flux is refused: its rotary tables follow the full sequence
    supported_adapters: ClassVar[tuple[str, ...]] = ("unet2d_condition", "dit", "pixart", "sd3")

    ratio: float = param(
        0.5, float, low=0.0, high=1.0, high_open=True,
        help="fraction of a reduced block's image tokens that reuse their cached update on a partial step",
    )
    full_every: int = param(3, int, low=1, help="recompute every token every this many denoising steps (1 = dense)")
    warmup_steps: int = param(1, int, low=0, help="the first steps of a run that recompute every token")
    schedule: str = param("u_shaped", str, choices=SCHEDULES,
                          help="how the ratio follows the timestep (u_shaped: less at the first and last steps)")
    kernel_size: int = param(3, int, low=3, high=15,
                             help="side of the low-pass window subtracted to score high frequencies (odd)")
    max_downsample: int = param(
        1, int, low=1, help="reduce only token grids at most this much coarser than the finest one (UNet levels 1, 2, 4, 8)"
    )

    def validate(self) -> None:
        from ...errors import ConfigError

        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: expected an odd window side, got {self.kernel_size!r}", field="kernel_size")


def high_frequency_scores(tokens: torch.Tensor, height: int, width: int, kernel_size: int = 3) -> torch.Tensor:
    """The high-frequency energy of every token of a row-major ``height x width`` grid.

    ``tokens`` is ``(batch, height * width, channels)``; returns ``(batch, height * width)``, the
    squared L2 norm of ``token - mean of its kernel_size x kernel_size neighbourhood`` (the window
    is cut at the grid's edge, the mean covers only real tokens), computed in float32. Rows are
    independent. A constant grid scores zero everywhere.

    Example:
        >>> import torch
        >>> from hf_tokred.methods.diffusion.freqts import high_frequency_scores
        >>> grid = torch.zeros(1, 9, 1)
        >>> grid[0, 4, 0] = 9.0                         # one spike in the middle of a 3 x 3 grid
        >>> scores = high_frequency_scores(grid, 3, 3)
        >>> int(scores.argmax()), scores[0, 4].item()
        (4, 64.0)
    """
    if tokens.ndim != 3 or tokens.shape[1] != height * width:
        raise ValueError(f"tokens: expected (batch, {height} * {width}, channels), got {tuple(tokens.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd int >= 1, got {kernel_size!r}")
    batch, _, channels = tokens.shape
    grid = tokens.float().reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    low = F.avg_pool2d(grid, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)
    return (grid - low).square().sum(dim=1).reshape(batch, height * width)


def select_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices ``(batch, keep)`` of the ``keep`` highest-scoring tokens of every row, in ascending order.

    Example:
        >>> import torch
        >>> from hf_tokred.methods.diffusion.freqts import select_tokens
        >>> select_tokens(torch.tensor([[0.1, 5.0, 0.3, 2.0]]), 2).tolist()
        [[1, 3]]
    """
    if not 0 < keep <= scores.shape[1]:
        raise ValueError(f"keep: expected 1..{scores.shape[1]}, got {keep!r}")
    return scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


def step_ratio(ratio: float, timestep: float | None, schedule: str = "u_shaped") -> float:
    """The fraction of tokens that reuse their cached update at ``timestep``.

    ``"constant"``: ``ratio``. ``"u_shaped"``: ``ratio * 4 s (1 - s)`` with ``s = timestep / 1000``
    clipped to [0, 1], the full ``ratio`` mid-way through sampling and less towards its ends.

    Example:
        >>> from hf_tokred.methods.diffusion.freqts import step_ratio
        >>> step_ratio(0.5, 500.0), step_ratio(0.5, 900.0), step_ratio(0.5, 900.0, "constant")
        (0.5, 0.18, 0.5)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    if schedule == "constant" or timestep is None:
        return ratio
    s = min(max(timestep / TIMESTEP_SCALE, 0.0), 1.0)
    return round(ratio * 4.0 * s * (1.0 - s), 12)


def kept_tokens(num_tokens: int, ratio: float) -> int:
    """How many of ``num_tokens`` tokens a partial step recomputes (at least one).

    Example:
        >>> from hf_tokred.methods.diffusion.freqts import kept_tokens
        >>> kept_tokens(64, 0.5), kept_tokens(64, 0.0), kept_tokens(4, 0.99)
        (32, 64, 1)
    """
    return max(num_tokens - math.floor(num_tokens * ratio), 1)


def is_full_step(step: int, full_every: int, warmup_steps: int) -> bool:
    """Whether denoising step ``step`` (0-based within a run) recomputes every token.

    Example:
        >>> from hf_tokred.methods.diffusion.freqts import is_full_step
        >>> [is_full_step(k, 3, 1) for k in range(7)]
        [True, False, False, True, False, False, True]
    """
    return step < warmup_steps or step % full_every == 0


def computed_fraction(config: FreqTSConfig, timesteps) -> float:
    """The mean fraction of a reduced block's tokens computed per step over a run with these ``timesteps``.

    For FLOP estimates over a whole run (one step of the reduced model computes every token or
    :func:`kept_tokens` of them, depending on the step).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> from hf_tokred.methods.diffusion.freqts import computed_fraction
        >>> cfg = TokenReductionConfig(method="freqts", ratio=0.5, schedule="constant", full_every=2, warmup_steps=0)
        >>> computed_fraction(cfg, [750, 500, 250, 0])
        0.75
    """
    timesteps = [float(t) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps: expected at least one")
    total = 0.0
    for step, timestep in enumerate(timesteps):
        if config.ratio == 0 or is_full_step(step, config.full_every, config.warmup_steps):
            total += 1.0
        else:
            total += 1.0 - step_ratio(config.ratio, timestep, config.schedule)
    return total / len(timesteps)


__all__ = [
    "SCHEDULES",
    "FreqTSConfig",
    "computed_fraction",
    "high_frequency_scores",
    "is_full_step",
    "kept_tokens",
    "select_tokens",
    "step_ratio",
]
