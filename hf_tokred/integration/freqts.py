"""diffusers wiring of ``freqts``: frequency-aware token selection across denoising steps.

A hook on every transformer block of the reduced levels (``max_downsample``) runs the block, on a
partial step, on the image tokens with the most high-frequency content only, and gives every other
token its current input plus the residual update the block last computed for it (see
:mod:`hf_tokred.methods.diffusion.freqts`). The hooks of one denoiser share a :class:`FreqTSState`
that counts denoising steps from the root grid hook's calls and timesteps.

Blocks whose layout rotates queries and keys by position (Flux) or prefixes text to the image tokens
are not supported: their tables and prefixes follow the full token sequence. Blocks with a
positional embedding applied inside the block (``BasicTransformerBlock.pos_embed``) are refused too.

Importing this module registers the wiring; ``hf_tokred.integration.diffusers`` imports it on the
first use of the method.

Example:
    >>> import hf_tokred
    >>> import hf_tokred.methods.diffusion.freqts  # noqa: F401  (registers "freqts")
    >>> from diffusers import DiTTransformer2DModel
    >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
    ...                             sample_size=8, num_embeds_ada_norm=10)
    >>> dit = hf_tokred.apply(dit, {"method": "freqts", "ratio": 0.5})
    >>> sorted(dit.transformer_blocks[0]._diffusers_hook.hooks)
    ['hf_tokred_freqts']
    >>> _ = hf_tokred.remove(dit)
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from ..errors import UnsupportedModelError
from .diffusers import (
    HOOK_PREFIX,
    TokenGrid,
    _check_levels,
    _grid_level,
    _register_hook,
    register_diffusion_wiring,
)


class FreqTSState:
    """Denoising-step bookkeeping shared by the block hooks of one denoiser.

    A new denoiser call (the grid hook's ``calls`` changed) is the next step of the current run,
    unless its timestep is higher than the previous call's: then a new run starts at step 0 (and every
    block recomputes all its tokens). A call without a readable timestep continues the run.
    """

    def __init__(self, config):
        self.config = config
        self.calls_seen = -1
        self.run = 0
        self.step = 0
        self.timestep: float | None = None

    def observe(self, grid: TokenGrid) -> tuple[int, int]:
        """``(run, step)`` of the current denoiser call."""
        if grid.calls != self.calls_seen:
            first = self.calls_seen < 0
            self.calls_seen = grid.calls
            timestep = grid.timestep
            # An unknown timestep (a meta-device call, e.g. counting FLOPs) continues the run, so that a
            # second shape-only call counts a partial step.
            if first or (timestep is not None and self.timestep is not None and timestep > self.timestep):
                self.run += 1
                self.step = 0
            else:
                self.step += 1
            if timestep is not None:
                self.timestep = timestep
        return self.run, self.step

    def reset(self) -> None:
        self.calls_seen = -1
        self.timestep = None
        self.run += 1
        self.step = 0


class FreqTSBlockHook(ModelHook):
    """Hook on one transformer block: full steps run it on every token and cache each token's update;
    partial steps run it on the highest-frequency tokens and give the others ``input + cached update``."""

    _is_stateful = True

    def __init__(self, grid: TokenGrid, state: FreqTSState, layout, image_output: int | None):
        super().__init__()
        self.grid = grid
        self.state = state
        self.layout = layout
        self.image_output = image_output  # index of the image tokens in a tuple output (SD3), None: a tensor
        self.cache: torch.Tensor | None = None  # (batch, tokens, channels): each token's last block update
        self.cache_run = -1

    def reset_state(self, module):
        self.state.reset()
        self.cache = None
        self.cache_run = -1
        return module

    def _image(self, output):
        return output if self.image_output is None else output[self.image_output]

    def _with_image(self, output, image):
        if self.image_output is None:
            return image
        output = list(output)
        output[self.image_output] = image
        return tuple(output)

    def new_forward(self, block, *args, **kwargs):
        from ..methods.diffusion.freqts import (
            high_frequency_scores,
            is_full_step,
            kept_tokens,
            select_tokens,
            step_ratio,
        )

        cfg = self.state.config
        forward = self.fn_ref.original_forward
        tokens = self.layout.image_tokens(args, kwargs)
        _, height, width = _grid_level(self.grid, tokens, cfg.method, "transformer block")
        run, step = self.state.observe(self.grid)
        num_tokens = tokens.shape[1]
        keep = kept_tokens(num_tokens, step_ratio(cfg.ratio, self.grid.timestep, cfg.schedule))
        cache = self.cache
        if (
            is_full_step(step, cfg.full_every, cfg.warmup_steps)
            or keep >= num_tokens
            or cache is None
            or self.cache_run != run
            or cache.shape != tokens.shape
            or cache.dtype != tokens.dtype
            or cache.device != tokens.device
        ):
            output = forward(*args, **kwargs)
            self.cache = (self._image(output) - tokens).detach()
            self.cache_run = run
            return output

        index = select_tokens(high_frequency_scores(tokens, height, width, cfg.kernel_size), keep)
        gather_index = index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        selected = tokens.gather(1, gather_index)
        args, kwargs = _replace_image_tokens(block, self.layout, selected, args, kwargs)
        output = forward(*args, **kwargs)
        computed = self._image(output)
        # Every token first takes its cached update, then the recomputed ones overwrite theirs.
        image = (tokens + cache).scatter(1, gather_index, computed)
        self.cache = cache.scatter(1, gather_index, (computed - selected).detach())
        return self._with_image(output, image)


def _replace_image_tokens(block, layout, tokens, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block call's ``(args, kwargs)`` with its image tokens replaced by ``tokens``."""
    if len(args) > layout.position:
        args = (*args[: layout.position], tokens, *args[layout.position + 1 :])
    else:
        kwargs = {**kwargs, layout.hidden_states: tokens}
    return args, kwargs


def _freqts_targets(denoiser, reducer) -> list[tuple[torch.nn.Module, object]]:
    """``(block, layout)`` of every block ``freqts`` reduces; raises on blocks it cannot reduce."""
    from ..model_patches.diffusion_blocks import layout_blocks

    blocks = layout_blocks(denoiser)
    if not blocks:
        raise UnsupportedModelError(f"{reducer.method}: {type(denoiser).__name__} has no transformer blocks")
    _check_levels(denoiser, reducer, sorted({level for *_, level in blocks}), "transformer blocks")
    found = []
    for name, block, spec, level in blocks:
        if level > reducer.max_downsample:
            continue
        if spec.rotary_argument is not None or spec.text_prefix is not None or spec.kv_at_kernel:
            raise UnsupportedModelError(
                f"{reducer.method}: the blocks of {type(denoiser).__name__} ({type(block).__name__}) index their "
                "rotary tables or text prefix by position in the full token sequence, which a token subset breaks"
            )
        if getattr(block, "pos_embed", None) is not None:
            raise UnsupportedModelError(
                f"{reducer.method}: {name} ({type(block).__name__}) adds a positional embedding by token index "
                "inside the block, which a token subset would shift"
            )
        found.append((block, spec))
    return found


def _check_freqts(denoiser, adapter, reducer) -> None:
    _freqts_targets(denoiser, reducer)


def _attach_freqts(denoiser, adapter, reducer, applied, grid) -> None:
    if reducer.ratio == 0 or reducer.full_every == 1:
        return  # every step recomputes every token: the blocks stay exactly as they are
    state = FreqTSState(reducer)
    name = f"{HOOK_PREFIX}_{reducer.method}"
    for block, spec in _freqts_targets(denoiser, reducer):
        # SD3's JointTransformerBlock returns (text, image); the other blocks return the image tokens.
        image_output = 1 if spec.joint_attention else None
        _register_hook(block, FreqTSBlockHook(grid, state, spec, image_output), name, applied)


register_diffusion_wiring("freqts", check=_check_freqts, attach=_attach_freqts)

__all__ = ["FreqTSBlockHook", "FreqTSState"]
