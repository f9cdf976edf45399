"""diffusers wiring: diffusion reducers on UNet/DiT denoisers, and ``from_pretrained(..., token_reduction=cfg)``.

A reduction attaches to the *denoiser* of a pipeline (``pipe.unet`` or ``pipe.transformer``) through
diffusers' own ``HookRegistry``/``ModelHook``, never by copying a block's ``forward``:

* a root hook on the denoiser (``hf_tokred_grid``) records, for every call, the token grid the
  latent makes (latent height/width divided by the DiT patch size);
* a hook on every self-attention module (``attn1``, named after the method, e.g. ``hf_tokred_todo``)
  hands the attention a reduced copy of its own input as ``encoder_hidden_states``: the queries stay
  full and the keys/values come from the reduced tokens. For the attention processors listed in
  :data:`KV_PROCESSORS` that is exactly self-attention with reduced keys/values, because the
  self-attention modules of these denoisers have no ``norm_cross``, ``group_norm`` or
  ``spatial_norm`` (which the processors would apply to one input and not the other); both are
  checked before anything is attached, and again on every call. In joint (SD3) attention the
  image keys/values are reduced at the ``to_k``/``to_v`` projections instead, and in attention that
  rotates queries and keys itself (Flux) at its ``scaled_dot_product_attention`` call, after the
  rotation (:class:`KernelKVReductionHook`);
* for ``tome_sd``, a hook on every transformer block within ``max_downsample`` computes the token
  matching from the block's image tokens, and hooks on the modules inside it (self-attention, and
  optionally cross-attention and the feed-forward) merge their input and unmerge their output
  (an attention taking a rotary table gets the table rows of each batch row's kept tokens,
  :class:`RotaryTokenMergeHook`).

Where the image tokens sit in each block class (argument, submodules, joint attention, rotary
tables, text prefixes) comes from ``hf_tokred.model_patches.diffusion_blocks``.

The config is stored as ``_token_reduction`` in the denoiser's ``config.json`` (an underscore key:
diffusers keeps it silently on load and writes it back on save, and a process without hf_tokred
loads a dense model). Learned parts (``learned_modules``) are attached as ``denoiser.hf_tokred_modules``;
the wrapped ``ModelMixin.save_pretrained`` keeps them out of the denoiser's weights file and writes them
to ``token_reduction.safetensors`` beside it (``pipe.save_pretrained`` saves each component that way). :func:`install` (run by
``import hf_tokred``) wraps ``DiffusionPipeline.from_pretrained`` and ``ModelMixin.from_pretrained``
so that ``token_reduction=cfg`` works and a saved reduction (with its learned parts) comes back on load.

Example:
    >>> import hf_tokred
    >>> import hf_tokred.methods.diffusion.todo  # noqa: F401  (registers "todo")
    >>> from diffusers import DiTTransformer2DModel
    >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
    ...                             sample_size=8, num_embeds_ada_norm=10)
    >>> dit = hf_tokred.apply(dit, {"method": "todo", "downsample_factor": 2})
    >>> dit.config["_token_reduction"]["method"]
    'todo'
    >>> sorted(dit.transformer_blocks[0].attn1._diffusers_hook.hooks)
    ['hf_tokred_todo']
    >>> _ = hf_tokred.remove(dit)
    >>> "_token_reduction" in dit.config
    False
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import FrozenDict
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorNPU,
    JointAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from ..config import WEIGHTS_NAME, TokenReductionConfig, registered_methods
from ..errors import ConfigError, MissingFileError, TokenReductionError, UnsupportedModelError
from .wiring import (
    DENSE_HINT,
    MODULES_ATTR,
    STATE_ATTR,
    AppliedReduction,
    check_request,
    config_from_saved,
    get_applied,
    guard_concurrent_calls,
    register_wiring,
    saved_config_path,
    swap_reduction,
    wiring_for,
)

CONFIG_KEY = "_token_reduction"
HOOK_PREFIX = "hf_tokred"
GRID_HOOK = f"{HOOK_PREFIX}_grid"
DENOISER_COMPONENTS = ("unet", "transformer")

# Processors that compute keys/values as ``to_k/to_v(encoder_hidden_states)`` when it is given and as
# ``to_k/to_v(hidden_states)`` otherwise, with nothing else differing (checked against diffusers 0.42).
# Exact types only: a subclass (IP-Adapter, PAG, fused QKV...) may treat encoder_hidden_states otherwise.
KV_PROCESSORS = (AttnProcessor2_0, AttnProcessor, XFormersAttnProcessor, SlicedAttnProcessor, AttnProcessorNPU)
# Processors of joint (image + text) attention that project the image keys/values as
# ``to_k/to_v(hidden_states)`` and nothing else reads the image key count (checked against diffusers 0.42).
JOINT_KV_PROCESSORS = (JointAttnProcessor2_0,)

# True while DiffusionPipeline.from_pretrained runs: its components are loaded through
# ModelMixin.from_pretrained, and the pipeline wrapper re-attaches their saved reductions itself
# (so that an error names the component's config file, and token_reduction=False reaches them all).
_LOADING_PIPELINE: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_tokred_loading_pipeline", default=False)


# ---------------------------------------------------------------------------------------------
# Token grids
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenGrid:
    """The finest token grid of the current denoiser call, written by the root hook and read by attention hooks.

    ``height x width`` is the latent size divided by the patch size (1 for UNets). UNet levels below
    it are the same grid halved (rounding up for strided convolutions, down for pooling).
    """

    height: int | None = None
    width: int | None = None
    timestep: float | None = None
    calls: int = 0


def find_token_level(height: int, width: int, num_tokens: int) -> tuple[int, int, int] | None:
    """The level (1, 2, 4, ...) at which the ``height x width`` grid, halved per level, holds ``num_tokens`` tokens.

    Returns ``(level, grid_height, grid_width)``, or None when no level matches. Halving rounds up
    (strided convolution, the diffusers UNet downsampler) or down (pooling); rounding up is tried first.

    Example:
        >>> from hf_tokred.integration.diffusers import find_token_level
        >>> find_token_level(64, 64, 64 * 64), find_token_level(64, 64, 16 * 16), find_token_level(15, 15, 8 * 8)
        ((1, 64, 64), (4, 16, 16), (2, 8, 8))
        >>> find_token_level(64, 64, 77) is None
        True
    """
    level, up, down = 1, (height, width), (height, width)
    while up[0] * up[1] >= num_tokens:
        for h, w in (up, down):
            if h * w == num_tokens:
                return level, h, w
        if up == (1, 1):
            return None
        level *= 2
        up = ((up[0] + 1) // 2, (up[1] + 1) // 2)
        down = (max(down[0] // 2, 1), max(down[1] // 2, 1))
    return None


class TokenGridHook(ModelHook):
    """Root hook on the denoiser: records the token grid of every call in a shared :class:`TokenGrid`."""

    def __init__(
        self,
        grid: TokenGrid,
        latent_argument: str,
        patch_size: int,
        timestep_argument: str | None = None,
        timestep_position: int | None = None,
        grid_of: Callable | None = None,
    ):
        super().__init__()
        self.grid = grid
        self.latent_argument = latent_argument
        self.patch_size = patch_size
        self.timestep_argument = timestep_argument
        self.timestep_position = timestep_position
        self.grid_of = grid_of

    def pre_forward(self, module, *args, **kwargs):
        if self.grid_of is not None:  # packed latents (Flux): the layout reads the grid from the call
            self.grid.height, self.grid.width = self.grid_of(module, args, kwargs)
            self.grid.timestep = self._timestep(args, kwargs)
            self.grid.calls += 1
            return args, kwargs
        latent = args[0] if args else kwargs.get(self.latent_argument)
        if not (isinstance(latent, torch.Tensor) and latent.ndim == 4):
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise UnsupportedModelError(
                f"{type(module).__name__} with a token reduction expects a 4-D latent (batch, channels, height, "
                f"width) as {self.latent_argument!r}, got {shape}"
            )
        self.grid.height = latent.shape[-2] // self.patch_size
        self.grid.width = latent.shape[-1] // self.patch_size
        self.grid.timestep = self._timestep(args, kwargs)
        self.grid.calls += 1
        return args, kwargs

    def _timestep(self, args, kwargs) -> float | None:
        """The call's timestep as a float (the first row's, when it is a tensor), or None."""
        if self.timestep_position is not None and len(args) > self.timestep_position:
            value = args[self.timestep_position]
        else:
            value = kwargs.get(self.timestep_argument) if self.timestep_argument else None
        if isinstance(value, torch.Tensor):
            # A meta tensor (shape-only runs, e.g. counting FLOPs) has no value to read.
            return float(value.flatten()[0]) if value.numel() and value.device.type != "meta" else None
        if isinstance(value, (int, float)):
            return float(value)
        return None


# ---------------------------------------------------------------------------------------------
# Self-attention with reduced keys/values
# ---------------------------------------------------------------------------------------------


def kv_reduction_problem(attn: torch.nn.Module) -> str | None:
    """Why ``attn`` cannot take reduced keys/values through ``encoder_hidden_states`` (None when it can).

    Example:
        >>> from diffusers.models.attention_processor import Attention
        >>> from hf_tokred.integration.diffusers import kv_reduction_problem
        >>> kv_reduction_problem(Attention(query_dim=16, heads=2, dim_head=8)) is None
        True
        >>> kv_reduction_problem(Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4))
        'it applies group_norm to its input before the projections, and keys/values passed in would skip it'
    """
    if not isinstance(attn, Attention):
        return f"it is a {type(attn).__name__}, not a diffusers Attention module"
    if attn.is_cross_attention:
        return "it is a cross-attention module"
    if getattr(attn, "fused_projections", False):
        return "its projections are fused (fuse_qkv_projections); call unfuse_qkv_projections() first"
    for norm in ("group_norm", "spatial_norm"):
        if getattr(attn, norm, None) is not None:
            return f"it applies {norm} to its input before the projections, and keys/values passed in would skip it"
    if getattr(attn, "norm_cross", None) is not None:
        return "it applies norm_cross to keys/values passed in, which its own self-attention keys never get"
    if type(attn.processor) not in KV_PROCESSORS:
        return (
            f"its attention processor {type(attn.processor).__name__} is not one known to take keys/values from "
            f"encoder_hidden_states unchanged ({', '.join(p.__name__ for p in KV_PROCESSORS)})"
        )
    return None


class KVReductionHook(ModelHook):
    """Hook on a self-attention module: queries stay full, keys/values come from ``reduce(hidden_states)``.

    ``reduce(hidden_states, level, grid_height, grid_width)`` gets the attention input and where it
    sits (see :func:`find_token_level`) and returns the tokens keys/values are computed from, or None
    to leave this call dense. Only self-attention calls (``encoder_hidden_states`` is None) are touched.
    """

    def __init__(self, grid: TokenGrid, method: str, reduce: Callable):
        super().__init__()
        self.grid = grid
        self.method = method
        self.reduce = reduce

    def pre_forward(self, attn, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        if context is not None:
            return args, kwargs
        problem = kv_reduction_problem(attn)
        if problem is not None:
            raise UnsupportedModelError(f"{self.method}: cannot reduce this self-attention: {problem}")
        _reject_attention_mask(self.method, args, kwargs, "the full token grid")
        _require_grid(self.grid, self.method, "self-attention")
        if hidden_states.ndim != 3:
            raise UnsupportedModelError(
                f"{self.method}: expected (batch, tokens, channels) self-attention input, got {tuple(hidden_states.shape)}"
            )
        found = find_token_level(self.grid.height, self.grid.width, hidden_states.shape[1])
        if found is None:
            raise UnsupportedModelError(
                f"{self.method}: a self-attention got {hidden_states.shape[1]} tokens, which is no level of the "
                f"{self.grid.height}x{self.grid.width} token grid of this call"
            )
        reduced = self.reduce(hidden_states, *found)
        if reduced is None:
            return args, kwargs
        if len(args) > 1:
            args = (args[0], reduced, *args[2:])
        else:
            kwargs = {**kwargs, "encoder_hidden_states": reduced}
        return args, kwargs


# ---------------------------------------------------------------------------------------------
# Per-method wiring for the "diffusion" stage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionWiring:
    """How one diffusion method attaches: ``check(denoiser, adapter, reducer)`` raises before anything is
    touched; ``attach(denoiser, adapter, reducer, applied, grid)`` registers the hooks and their undo."""

    check: Callable
    attach: Callable


_DIFFUSION_WIRING: dict[str, DiffusionWiring] = {}


def register_diffusion_wiring(method: str, *, check: Callable, attach: Callable) -> None:
    """Register how the diffusion method ``method`` attaches to a denoiser.

    Example:
        >>> from hf_tokred.integration.diffusers import register_diffusion_wiring
        >>> register_diffusion_wiring("my_method", check=lambda d, a, r: None,
        ...                           attach=lambda d, a, r, applied, grid: None)   # doctest: +SKIP
    """
    _DIFFUSION_WIRING[method] = DiffusionWiring(check, attach)


def self_attention_modules(denoiser: torch.nn.Module, adapter=None) -> list[Attention]:
    """The self-attention modules of a denoiser, from its block layout (``model_patches.diffusion_blocks``).

    ``attn1`` of every ``BasicTransformerBlock`` that self-attends (UNet, DiT, PixArt); ``attn`` (joint
    image + text attention) and, in SD3.5's dual-attention blocks, ``attn2`` of SD3's blocks.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> from hf_tokred.integration.diffusers import self_attention_modules
        >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
        ...                             sample_size=8, num_embeds_ada_norm=10)
        >>> len(self_attention_modules(dit))
        2
    """
    return [attn for _, attn, _, _ in _self_attention_targets(denoiser)]


def _self_attention_targets(denoiser) -> list[tuple[str, torch.nn.Module, object, int]]:
    """``(qualified name, attention module, block layout, level)`` of every self-attention of ``denoiser``."""
    from ..model_patches.diffusion_blocks import layout_blocks

    found = []
    for block_name, block, spec, level in layout_blocks(denoiser):
        for name, attn in spec.submodules(block, spec.self_attention):
            # Blocks built with only_cross_attention=True feed the text to attn1: those are not self-attention.
            if getattr(attn, "is_cross_attention", False):
                continue
            found.append((f"{block_name}.{name}", attn, spec, level))
    return found


def joint_kv_reduction_problem(attn: torch.nn.Module) -> str | None:
    """Why the image keys/values of a joint (SD3-style) attention cannot be reduced at ``to_k``/``to_v``.

    Example:
        >>> from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
        >>> from hf_tokred.integration.diffusers import joint_kv_reduction_problem
        >>> attn = Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=16, processor=JointAttnProcessor2_0())
        >>> joint_kv_reduction_problem(attn) is None
        True
    """
    if not isinstance(attn, Attention):
        return f"it is a {type(attn).__name__}, not a diffusers Attention module"
    if getattr(attn, "fused_projections", False):
        return "its projections are fused (fuse_qkv_projections); call unfuse_qkv_projections() first"
    if type(attn.processor) not in JOINT_KV_PROCESSORS:
        return (
            f"its attention processor {type(attn.processor).__name__} is not one known to project the image "
            f"keys/values with to_k/to_v alone ({', '.join(p.__name__ for p in JOINT_KV_PROCESSORS)})"
        )
    return None


def _check_kv_targets(denoiser, adapter, reducer) -> list[Attention]:
    targets = _self_attention_targets(denoiser)
    if not targets:
        raise UnsupportedModelError(f"{reducer.method}: {type(denoiser).__name__} has no self-attention layers")
    for name, attn, spec, _ in targets:
        if spec.kv_at_kernel:
            problem = kernel_kv_reduction_problem(attn, spec.attention_processors)
        elif spec.rotary_argument is not None:
            problem = (
                f"its processor applies one rotary table ({spec.rotary_argument}) to queries and keys alike, and the "
                "block layout names no point after the rotation where keys/values can be reduced"
            )
        elif spec.joint_attention:
            problem = joint_kv_reduction_problem(attn)
        else:
            problem = kv_reduction_problem(attn)
        if problem is not None:
            raise UnsupportedModelError(f"{reducer.method}: cannot reduce the self-attention {name}: {problem}")
    _check_levels(denoiser, reducer, sorted({level for *_, level in targets}), "self-attention")
    return [attn for _, attn, _, _ in targets]


def _check_levels(denoiser, reducer, levels: list[int], what: str) -> None:
    """Raise when ``max_downsample`` excludes every level that has ``what`` (SDXL: nothing at level 1)."""
    from ..errors import ConfigError

    if levels and levels[0] > reducer.max_downsample:
        raise ConfigError(
            f"max_downsample: {type(denoiser).__name__} has {what} only at levels {', '.join(map(str, levels))} "
            f"(1 = the finest token grid; SDXL has no attention at level 1), so max_downsample="
            f"{reducer.max_downsample} would reduce nothing; use max_downsample >= {levels[0]}",
            field="max_downsample",
        )


class ProjectionReductionHook(ModelHook):
    """Hook on the ``to_k``/``to_v`` projection of a joint attention: it projects ``reduce(image tokens)``.

    For joint (image + text) attention the text arrives as ``encoder_hidden_states``, so reduced
    image keys/values cannot be handed in there; the image key/value projections see the reduced
    tokens instead, and the text keys/values and all queries stay as they are.
    """

    def __init__(self, grid: TokenGrid, method: str, reduce: Callable, attn: Attention):
        super().__init__()
        self.grid = grid
        self.method = method
        self.reduce = reduce
        self.attn = attn

    def pre_forward(self, projection, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["input"]
        problem = joint_kv_reduction_problem(self.attn)
        if problem is not None:
            raise UnsupportedModelError(f"{self.method}: cannot reduce this joint attention: {problem}")
        found = _grid_level(self.grid, hidden_states, self.method, "joint attention")
        reduced = self.reduce(hidden_states, *found)
        if reduced is None:
            return args, kwargs
        if args:
            return (reduced, *args[1:]), kwargs
        return args, {**kwargs, "input": reduced}


def _require_grid(grid: TokenGrid, method: str, where: str) -> None:
    """The token grid of the running denoiser call; an attention called on its own has none."""
    if grid.height is None:
        raise TokenReductionError(
            f"{method}: the {where} ran outside a call of the denoiser, so the token grid is unknown"
        )


def _reject_attention_mask(method: str, args: tuple, kwargs: dict, covers: str) -> None:
    """Reduced tokens no longer match an attention mask passed to the attention (it covers ``covers``)."""
    mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
    if mask is not None:
        raise UnsupportedModelError(
            f"{method}: self-attention masks are not supported (the mask covers {covers}); "
            "call the denoiser without attention_mask or remove the reduction"
        )


def _grid_level(grid: TokenGrid, hidden_states, method: str, where: str) -> tuple[int, int, int]:
    """``(level, grid height, grid width)`` of a ``(batch, tokens, channels)`` input of this call."""
    _require_grid(grid, method, where)
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise UnsupportedModelError(f"{method}: expected (batch, tokens, channels) {where} input, got {shape}")
    found = find_token_level(grid.height, grid.width, hidden_states.shape[1])
    if found is None:
        raise UnsupportedModelError(
            f"{method}: a {where} got {hidden_states.shape[1]} tokens, which is no level of the "
            f"{grid.height}x{grid.width} token grid of this call"
        )
    return found


# Attention backends of diffusers' ``dispatch_attention_fn`` that compute attention with
# ``torch.nn.functional.scaled_dot_product_attention`` (checked against diffusers 0.42).
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


def kernel_kv_reduction_problem(attn: torch.nn.Module, processors: tuple[str, ...] = ()) -> str | None:
    """Why the image keys/values of ``attn`` cannot be reduced at its attention kernel call (None when they can).

    The reduction happens where the processor calls ``torch.nn.functional.scaled_dot_product_attention``
    (after its projections, norms and rotary embedding), so the processor must be one of ``processors``
    (class names; empty: any), must not run context-parallel, and its attention backend, when one is set
    with ``attn.set_attention_backend``, must be one of :data:`SDPA_BACKENDS`. (With no backend set,
    diffusers' active default is used; a call that never reaches SDPA is an error at run time.)

    Example:
        >>> from diffusers import FluxTransformer2DModel
        >>> from hf_tokred.integration.diffusers import kernel_kv_reduction_problem
        >>> flux = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        ...                               num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
        ...                               axes_dims_rope=(2, 2, 4))
        >>> attn = flux.transformer_blocks[0].attn
        >>> kernel_kv_reduction_problem(attn, ("FluxAttnProcessor",)) is None
        True
        >>> attn.set_attention_backend("flex")
        >>> kernel_kv_reduction_problem(attn, ("FluxAttnProcessor",))[:37]
        "its attention backend 'flex' does not"
    """
    processor = getattr(attn, "processor", None)
    if processor is None:
        return f"it is a {type(attn).__name__} without an attention processor"
    processor_name = type(processor).__name__
    if processors and processor_name not in processors:
        return (
            f"its attention processor {processor_name} is not one known to rotate queries and keys and then call "
            f"the attention kernel on [text, image] ({', '.join(processors)})"
        )
    if getattr(processor, "_parallel_config", None) is not None:
        return "it runs context-parallel (its key/value sequence is split across devices)"
    backend = getattr(processor, "_attention_backend", None)
    backend = getattr(backend, "value", backend)
    if backend is not None and backend not in SDPA_BACKENDS:
        return (
            f"its attention backend {backend!r} does not call torch.nn.functional.scaled_dot_product_attention, "
            f"where the keys/values are reduced; use one of {', '.join(SDPA_BACKENDS)}"
        )
    return None


class _KernelKVMode(torch.overrides.TorchFunctionMode):
    """Active during one attention call: hands its ``scaled_dot_product_attention`` call reduced keys/values.

    The same mechanism as diffusers' own ``AttentionScoreSkipFunctionMode`` (``diffusers.hooks.layer_skip``):
    torch routes the kernel call through this mode, so the processor itself is neither copied nor replaced.
    (A custom attention backend cannot be registered instead: ``dispatch_attention_fn`` looks backends up by
    the closed ``AttentionBackendName`` enum.)
    """

    def __init__(self, reduce_kv: Callable):
        super().__init__()
        self.reduce_kv = reduce_kv
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        args = list(args)
        names = ("query", "key", "value")
        query, key, value = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
        key, value = self.reduce_kv(query, key, value)
        for i, n, tensor in ((1, "key", key), (2, "value", value)):
            if i < len(args):
                args[i] = tensor
            else:
                kwargs[n] = tensor
        return func(*args, **kwargs)


def _reduce_image_kv(query, key, value, *, image_tokens: int, found: tuple[int, int, int], reduce: Callable, method):
    """Reduce the image part (the last ``image_tokens``) of ``(batch, heads, text + image, head_dim)`` keys/values."""
    if key.ndim != 4 or key.shape[2] != query.shape[2] or key.shape[2] < image_tokens:
        raise UnsupportedModelError(
            f"{method}: the attention kernel got queries {tuple(query.shape)} and keys {tuple(key.shape)}, not "
            f"(batch, heads, text + {image_tokens} image tokens, head_dim) self-attention"
        )
    batch, heads, tokens, head_dim = key.shape
    text = tokens - image_tokens

    def reduced(x):
        # (B, H, N, D) -> (B, N, H * D): each head's channels pooled over the grid like any other channel.
        image = x[:, :, text:].transpose(1, 2).reshape(batch, image_tokens, heads * head_dim)
        pooled = reduce(image, *found)
        if pooled is None:
            return x
        pooled = pooled.reshape(batch, pooled.shape[1], heads, head_dim).transpose(1, 2)
        return torch.cat([x[:, :, :text], pooled], dim=2)

    return reduced(key), reduced(value)


class KernelKVReductionHook(ModelHook):
    """Hook on an attention that rotates queries and keys itself (Flux): image keys/values are reduced at the kernel.

    During the attention call a :class:`torch.overrides.TorchFunctionMode` intercepts its one call of
    ``torch.nn.functional.scaled_dot_product_attention``, whose ``(batch, heads, [text, image], head_dim)``
    keys and values have been projected, normalized and rotated by the processor; the image part (the
    last ``height * width`` tokens of this call's grid) is replaced by ``reduce(image, level, height,
    width)`` and the text part and every query stay. Each kept key therefore carries the rotation of its
    own position. A call that never reaches that function (another attention backend) is an error.
    """

    def __init__(self, grid: TokenGrid, method: str, reduce: Callable, processors: tuple[str, ...] = ()):
        super().__init__()
        self.grid = grid
        self.method = method
        self.reduce = reduce
        self.processors = processors

    def new_forward(self, attn, *args, **kwargs):
        problem = kernel_kv_reduction_problem(attn, self.processors)
        if problem is not None:
            raise UnsupportedModelError(f"{self.method}: cannot reduce this self-attention: {problem}")
        _reject_attention_mask(self.method, args, kwargs, "the full key sequence")
        _require_grid(self.grid, self.method, "self-attention")
        image_tokens = self.grid.height * self.grid.width
        found = find_token_level(self.grid.height, self.grid.width, image_tokens)
        reduce_kv = functools.partial(
            _reduce_image_kv, image_tokens=image_tokens, found=found, reduce=self.reduce, method=self.method
        )
        mode = _KernelKVMode(reduce_kv)
        with mode:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if mode.calls != 1:
            backend = getattr(getattr(attn, "processor", None), "_attention_backend", None)
            raise TokenReductionError(
                f"{self.method}: the attention called torch.nn.functional.scaled_dot_product_attention {mode.calls} "
                f"times, not once (attention backend: {getattr(backend, 'value', backend) or 'diffusers default'}); "
                f"its keys/values are reduced at that call, so it needs one of the backends {', '.join(SDPA_BACKENDS)}"
            )
        return output


def _attach_todo(denoiser, adapter, reducer, applied, grid) -> None:
    from ..methods.diffusion.todo import downsample_tokens

    factor, pooling, max_level = reducer.downsample_factor, reducer.downsample_method, reducer.max_downsample
    if factor == 1:
        return  # no reduction asked for: the attention modules stay exactly as they are

    def reduce(hidden_states, level, height, width):
        if level > max_level:
            return None
        return downsample_tokens(hidden_states, height, width, factor, pooling)

    name = f"{HOOK_PREFIX}_{reducer.method}"
    for _, attn, spec, _ in _self_attention_targets(denoiser):
        if spec.kv_at_kernel:
            hook = KernelKVReductionHook(grid, reducer.method, reduce, spec.attention_processors)
            _register_hook(attn, hook, name, applied)
        elif spec.joint_attention:
            for projection in (attn.to_k, attn.to_v):
                _register_hook(projection, ProjectionReductionHook(grid, reducer.method, reduce, attn), name, applied)
        else:
            _register_hook(attn, KVReductionHook(grid, reducer.method, reduce), name, applied)


register_diffusion_wiring("todo", check=_check_kv_targets, attach=_attach_todo)


# ---------------------------------------------------------------------------------------------
# ToMe for SD: merge -> attention / MLP -> unmerge, the matching computed once per block call
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockMatching:
    """The token matching of the current call of one block, shared by the hooks inside it.

    ``text_tokens`` is the length of the text prefix in front of the image tokens in the self-attention
    input, for blocks that concatenate them (Flux's single-stream blocks), else 0.
    """

    matching: object = None
    text_tokens: int = 0


class ToMeSDState:
    """Per-denoiser state of ``tome_sd``: the generator that picks destination tokens.

    The generator is re-seeded at every block call from ``seed``, the call's timestep and the block's
    index (see :func:`call_seed`), so a block's partition depends only on those: never on what ran
    before, on the global RNG, on the batch, or on whether the block is recomputed (gradient
    checkpointing runs a block's forward again during backward).
    """

    def __init__(self, config):
        self.config = config
        self.generator = torch.Generator()

    def generator_for(self, grid: TokenGrid, block_index: int) -> torch.Generator:
        return self.generator.manual_seed(call_seed(self.config.seed, grid.timestep, block_index))


def call_seed(seed: int, timestep: float | None, block_index: int = 0) -> int:
    """The generator seed of one block call: ``seed`` mixed with the timestep (to 1/1000) and the block's index.

    Example:
        >>> from hf_tokred.integration.diffusers import call_seed
        >>> call_seed(0, 999.0) == call_seed(0, 999.0), call_seed(0, 999.0) == call_seed(0, 979.0)
        (True, False)
        >>> call_seed(0, 999.0, block_index=1) == call_seed(0, 999.0, block_index=2)
        False
    """
    key = 0 if timestep is None else int(round(timestep * 1000))
    return (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + block_index) % (2**63)


class ToMeSDBlockHook(ModelHook):
    """Hook on a transformer block: computes the matching of its image tokens for the modules inside it."""

    def __init__(self, grid: TokenGrid, state: ToMeSDState, layout, holder: BlockMatching, block_index: int = 0,
                 finest_level: int = 1):
        super().__init__()
        self.grid = grid
        self.state = state
        self.layout = layout
        self.holder = holder
        self.block_index = block_index
        self.finest_level = finest_level  # the finest level tome_sd merges at: a cell must fit its grid

    def pre_forward(self, block, *args, **kwargs):
        from ..methods.diffusion.tome_sd import bipartite_soft_matching_2d

        cfg = self.state.config
        self.holder.matching = None
        tokens = self.layout.image_tokens(args, kwargs)
        level, height, width = _grid_level(self.grid, tokens, cfg.method, "transformer block")
        if level <= cfg.max_downsample:
            if level == self.finest_level and (height < cfg.sy or width < cfg.sx):
                # bipartite_soft_matching_2d would merge nothing, at every level: refuse rather than run dense.
                field = "sx" if width < cfg.sx else "sy"
                raise ConfigError(
                    f"{field}: tome_sd's sx={cfg.sx}, sy={cfg.sy} cell does not fit the {height}x{width} (height x width) "
                    f"token grid of this call's finest merged level, so no token would be merged; use sx <= {width} "
                    f"and sy <= {height}, or a larger image",
                    field=field,
                )
            if self.layout.text_prefix is not None:
                text = _block_argument(block, self.layout.text_prefix, args, kwargs)
                self.holder.text_tokens = text.shape[1]
            generator = self.state.generator_for(self.grid, self.block_index) if cfg.use_rand else None
            r = int(tokens.shape[1] * cfg.ratio)
            self.holder.matching = bipartite_soft_matching_2d(tokens, height, width, cfg.sx, cfg.sy, r, generator)
        return args, kwargs

    def post_forward(self, block, output):
        self.holder.matching = None  # frees the index tensors between calls
        return output


def _block_argument(block, name: str, args: tuple, kwargs: dict):
    """The argument ``name`` of a block call, given by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    position = list(inspect.signature(type(block).forward).parameters).index(name) - 1  # without self
    return args[position]


class TokenMergeHook(ModelHook):
    """Hook on a module inside a merged block: merges its ``hidden_states`` input and unmerges its output.

    For a joint attention returning ``(image, text)`` only the image output is unmerged. With a text
    prefix (``holder.text_tokens``) only the image part of the input/output is merged/unmerged. An
    attention taking a rotary table gets :class:`RotaryTokenMergeHook` instead.
    """

    def __init__(self, holder: BlockMatching, method: str, what: str, self_attention: bool, layout=None):
        super().__init__()
        self.holder = holder
        self.method = method
        self.what = what
        self.self_attention = self_attention
        self.processors = getattr(layout, "attention_processors", ()) if self_attention else ()
        self.active = None
        self.text_tokens = 0

    def pre_forward(self, module, *args, **kwargs):
        matching = self.holder.matching
        self.active = None
        if matching is None:
            return args, kwargs
        if self.processors and type(getattr(module, "processor", None)).__name__ not in self.processors:
            raise UnsupportedModelError(
                f"{self.method}: the {self.what} uses the attention processor "
                f"{type(getattr(module, 'processor', None)).__name__}, not one known to take merged image tokens "
                f"({', '.join(self.processors)})"
            )
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        if self.self_attention:
            _reject_attention_mask(self.method, args, kwargs, "the unmerged tokens")
        text = self.holder.text_tokens if self.self_attention else 0
        if (
            not isinstance(hidden_states, torch.Tensor)
            or hidden_states.ndim != 3
            or hidden_states.shape[:2] != (matching.batch, text + matching.tokens)
        ):
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else None
            raise UnsupportedModelError(
                f"{self.method}: the {self.what} got input of shape {shape}, not the block's "
                f"({matching.batch}, {text + matching.tokens}, channels) tokens (feed-forward chunking, "
                "set_chunk_feed_forward / enable_forward_chunking, cannot be combined with merge_mlp)"
            )
        if text:
            merged = torch.cat([hidden_states[:, :text], matching.merge(hidden_states[:, text:])], dim=1)
        else:
            merged = matching.merge(hidden_states)
        if args:
            args = (merged, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": merged}
        self.active, self.text_tokens = matching, text
        return args, kwargs

    def post_forward(self, module, output):
        matching, self.active = self.active, None
        if matching is None:
            return output
        if isinstance(output, tuple):
            return (self._unmerge(matching, output[0]), *output[1:])
        return self._unmerge(matching, output)

    def _unmerge(self, matching, output: torch.Tensor) -> torch.Tensor:
        text = self.text_tokens
        if text:
            return torch.cat([output[:, :text], matching.unmerge(output[:, text:])], dim=1)
        return matching.unmerge(output)


class RotaryTokenMergeHook(TokenMergeHook):
    """:class:`TokenMergeHook` for a self-attention that takes a per-position rotary table (Flux's ``image_rotary_emb``).

    Each batch row keeps its own tokens (its own matching), and a kept token must be rotated by its own
    position's row of the ``[text, image]`` table. The table is one ``(positions, dim)`` tensor pair for
    the whole call, so when the rows keep the same tokens (batch 1, or equal matchings) the attention runs
    once with those rows of the table; otherwise it runs once per batch row, each with its row's table
    rows, and the outputs are stacked. A batch row therefore gives what it gives alone.
    """

    def __init__(self, holder: BlockMatching, method: str, what: str, layout):
        super().__init__(holder, method, what, True, layout)
        self.rotary_argument = layout.rotary_argument
        self.row_tables = None

    def pre_forward(self, module, *args, **kwargs):
        self.row_tables = None
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        matching = self.active
        table = _call_argument(module, self.rotary_argument, args, kwargs)
        if matching is None or table is None:
            return args, kwargs
        tables = _kept_rotary_rows(table, matching)
        if len(tables) == 1:
            return _replace_argument(module, self.rotary_argument, tables[0], args, kwargs)
        self.row_tables = tables
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        tables, self.row_tables = self.row_tables, None
        if tables is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        outputs = []
        for row, table in enumerate(tables):
            row_args, row_kwargs = _replace_argument(module, self.rotary_argument, table, args, kwargs)
            for name in ("hidden_states", "encoder_hidden_states"):
                value = _call_argument(module, name, row_args, row_kwargs)
                if isinstance(value, torch.Tensor):
                    row_args, row_kwargs = _replace_argument(module, name, value[row : row + 1], row_args, row_kwargs)
            outputs.append(self.fn_ref.original_forward(*row_args, **row_kwargs))
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts, dim=0) for parts in zip(*outputs))
        return torch.cat(outputs, dim=0)


@functools.cache
def _argument_position(module_class: type, name: str) -> int | None:
    """Positional index of ``name`` in ``module_class.forward`` (without ``self``), or None."""
    parameters = list(inspect.signature(module_class.forward).parameters)[1:]
    return parameters.index(name) if name in parameters else None


def _call_argument(module, name: str, args: tuple, kwargs: dict):
    """The argument ``name`` of a call of ``module``, given by keyword or by position (None when absent)."""
    if name in kwargs:
        return kwargs[name]
    position = _argument_position(type(module), name)
    return args[position] if position is not None and position < len(args) else None


def _replace_argument(module, name: str, value, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call of ``module`` with the argument ``name`` set to ``value``."""
    position = _argument_position(type(module), name)
    if name not in kwargs and position is not None and position < len(args):
        return (*args[:position], value, *args[position + 1 :]), kwargs
    return args, {**kwargs, name: value}


def _kept_rotary_rows(table, matching) -> list:
    """The rows of a ``[text, image]`` rotary table (a tensor or a tuple of them) that the merged tokens sit at.

    One table per batch row, or a single one when every row keeps the same tokens.
    """
    tensors = table if isinstance(table, (tuple, list)) else (table,)
    text = tensors[0].shape[0] - matching.tokens
    if text < 0:
        raise UnsupportedModelError(
            f"rotary table with {tensors[0].shape[0]} rows cannot cover {matching.tokens} image tokens"
        )
    kept = matching.kept_tokens
    # Both live on the model's device; in shape-only (meta) runs the table may come from CPU ids.
    tensors = tuple(t.to(kept.device) for t in tensors)
    # Meta tensors (e.g. counting FLOPs) cannot be compared: such a run goes per row, with the same FLOPs.
    if kept.shape[0] == 1 or (kept.device.type != "meta" and bool((kept == kept[:1]).all())):
        kept = kept[:1]
    prefix = torch.arange(text, device=kept.device)
    tables = []
    for kept_row in kept:
        rows = torch.cat([prefix, text + kept_row])
        merged = tuple(t.index_select(0, rows) for t in tensors)
        tables.append(merged if isinstance(table, (tuple, list)) else merged[0])
    return tables


def _tome_sd_targets(denoiser, reducer) -> list[tuple[torch.nn.Module, object, list[tuple[str, torch.nn.Module, bool]]]]:
    """``(block, layout, [(what, module, is_self_attention)])`` of every block ``tome_sd`` merges in."""
    from ..model_patches.diffusion_blocks import layout_blocks

    blocks = layout_blocks(denoiser)
    if not blocks:
        raise UnsupportedModelError(f"{reducer.method}: {type(denoiser).__name__} has no transformer blocks")
    _check_levels(denoiser, reducer, sorted({level for *_, level in blocks}), "transformer blocks")
    in_range = [b for b in blocks if b[3] <= reducer.max_downsample]
    found = []
    for _, block, spec, _ in in_range:
        modules = []
        if reducer.merge_attn:
            for name, attn in spec.submodules(block, spec.self_attention):
                if getattr(attn, "is_cross_attention", False):
                    continue
                processor = type(getattr(attn, "processor", None)).__name__
                if spec.attention_processors and processor not in spec.attention_processors:
                    raise UnsupportedModelError(
                        f"{reducer.method}: the self-attention {name} of {type(block).__name__} uses the attention "
                        f"processor {processor}, not one known to take merged image tokens "
                        f"({', '.join(spec.attention_processors)})"
                    )
                modules.append((f"self-attention {name}", attn, True))
        if reducer.merge_crossattn:
            for name, attn in spec.submodules(block, spec.cross_attention):
                if getattr(attn, "is_cross_attention", False):
                    modules.append((f"cross-attention {name}", attn, False))
        if reducer.merge_mlp:
            modules.extend((f"feed-forward {name}", ff, False) for name, ff in spec.submodules(block, spec.feed_forward))
        if modules:
            found.append((block, spec, modules))
    if not found:
        asked = [w for w, on in (("self-attention", reducer.merge_attn), ("cross-attention", reducer.merge_crossattn),
                                 ("feed-forward", reducer.merge_mlp)) if on]
        raise UnsupportedModelError(
            f"{reducer.method}: the blocks of {type(denoiser).__name__} at levels <= max_downsample="
            f"{reducer.max_downsample} have no {' or '.join(asked)} to merge"
        )
    return found


def _check_tome_sd(denoiser, adapter, reducer) -> None:
    _tome_sd_targets(denoiser, reducer)


def _attach_tome_sd(denoiser, adapter, reducer, applied, grid) -> None:
    if reducer.ratio == 0:
        return  # nothing is merged: the blocks stay exactly as they are
    from ..model_patches.diffusion_blocks import layout_blocks

    state = ToMeSDState(reducer)
    name = f"{HOOK_PREFIX}_{reducer.method}"
    targets = _tome_sd_targets(denoiser, reducer)
    level_of = {id(block): level for _, block, _, level in layout_blocks(denoiser)}
    finest = min(level_of[id(block)] for block, _, _ in targets)
    for index, (block, spec, modules) in enumerate(targets):
        holder = BlockMatching()
        _register_hook(block, ToMeSDBlockHook(grid, state, spec, holder, index, finest), name, applied)
        for what, module, is_self_attention in modules:
            if is_self_attention and spec.rotary_argument is not None:
                hook = RotaryTokenMergeHook(holder, reducer.method, what, spec)
            else:
                hook = TokenMergeHook(holder, reducer.method, what, is_self_attention, spec)
            _register_hook(module, hook, name, applied)


register_diffusion_wiring("tome_sd", check=_check_tome_sd, attach=_attach_tome_sd)


def _diffusion_wiring(reducer) -> DiffusionWiring:
    if reducer.method not in _DIFFUSION_WIRING:
        # A method may register its wiring in its own module, hf_tokred/integration/<method>.py, imported on
        # first use (so that ``import hf_tokred`` does not import diffusers).
        module = f"{__package__}.{reducer.method}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    try:
        return _DIFFUSION_WIRING[reducer.method]
    except KeyError:
        raise UnsupportedModelError(f"{reducer.method}: no diffusers wiring is registered for this method") from None


@register_wiring("diffusion")
def _wire_diffusion(denoiser, adapter, reducer, applied) -> None:
    from ..model_patches.diffusion_blocks import denoiser_layout

    registry = denoiser.__dict__.get("_diffusers_hook")
    grid_hook = registry.get_hook(GRID_HOOK) if registry is not None else None
    if grid_hook is None:
        parameters = list(inspect.signature(type(denoiser).forward).parameters)[1:]  # without self
        latent_argument = parameters[0]
        timestep_position = parameters.index("timestep") if "timestep" in parameters else None
        patch_size = denoiser.config.get("patch_size") or 1
        grid_hook = TokenGridHook(
            TokenGrid(), latent_argument, patch_size, "timestep" if timestep_position is not None else None,
            timestep_position, denoiser_layout(denoiser).grid_of,
        )
        _register_hook(denoiser, grid_hook, GRID_HOOK, applied)
    _diffusion_wiring(reducer).attach(denoiser, adapter, reducer, applied, grid_hook.grid)


def _register_hook(module: torch.nn.Module, hook: ModelHook, name: str, applied: AppliedReduction) -> None:
    """Register ``hook`` as ``name`` and record its removal (which also drops a registry we created)."""
    created = "_diffusers_hook" not in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    installed_forward = module.__dict__["forward"]

    def undo():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is None or name not in registry.hooks:
            return
        outermost = registry._hook_order[-1] == name
        current_forward = module.__dict__.get("forward")
        registry.remove_hook(name, recurse=False)
        if (
            outermost
            and current_forward is not installed_forward
            and module.__dict__.get("_old_forward") is installed_forward
        ):
            # accelerate (e.g. enable_model_cpu_offload) wrapped our forward after apply() and calls it as
            # module._old_forward; diffusers' remove_hook just reassigned module.forward, which would drop the
            # offload hook. Put accelerate's wrapper back around the unhooked forward.
            module._old_forward = module.forward
            module.forward = current_forward
        if created and not registry.hooks:
            # diffusers leaves the bound original forward as an instance attribute and the empty registry
            # behind; dropping both returns the module to exactly its state before apply().
            del module._diffusers_hook
            forward = module.__dict__.get("forward")
            if (
                getattr(forward, "__self__", None) is module
                and getattr(forward, "__func__", None) is type(module).forward
            ):
                del module.__dict__["forward"]

    applied.add_undo(undo)


# ---------------------------------------------------------------------------------------------
# apply / remove
# ---------------------------------------------------------------------------------------------


def _supported_denoisers() -> str:
    from ..model_patches import supported_names

    return supported_names("diffusers")


def _diffusion_methods() -> str:
    return (
        ", ".join(sorted(k for k, cls in registered_methods().items() if cls.stage == "diffusion")) or "none registered"
    )


def _model_components(pipe: DiffusionPipeline) -> list[tuple[str, ModelMixin]]:
    found = []
    for name in pipe.config.keys():
        component = getattr(pipe, name, None) if not name.startswith("_") else None
        if isinstance(component, ModelMixin):
            found.append((name, component))
    return found


def find_denoiser(obj, component: str | None = None) -> ModelMixin:
    """The denoiser a reduction attaches to: ``obj`` itself, or a pipeline's supported ``unet``/``transformer``.

    Raises :class:`UnsupportedModelError` naming the supported denoisers when there is none.

    Example:
        >>> from hf_tokred.integration.diffusers import find_denoiser
        >>> find_denoiser(pipe) is pipe.transformer       # a DiTPipeline   # doctest: +SKIP
        True
    """
    from ..model_patches import find_adapter

    if isinstance(obj, ModelMixin):
        return obj
    if not isinstance(obj, DiffusionPipeline):
        raise UnsupportedModelError(
            f"expected a diffusers DiffusionPipeline or a denoiser model, got {type(obj).__name__}; "
            f"supported denoisers: {_supported_denoisers()}"
        )
    names = (component,) if component is not None else DENOISER_COMPONENTS
    seen = []
    for name in names:
        candidate = getattr(obj, name, None)
        if candidate is None:
            continue
        try:
            find_adapter(candidate)
        except UnsupportedModelError:
            seen.append(f"{name}={type(candidate).__name__}")
            continue
        return candidate
    what = f"its {', '.join(seen)} is not supported" if seen else f"it has no {' or '.join(names)} component"
    raise UnsupportedModelError(
        f"{type(obj).__name__} has no denoiser hf_tokred can reduce: {what}. Supported denoisers: {_supported_denoisers()}"
    )


def check_supported(denoiser: ModelMixin, config: TokenReductionConfig):
    """Every check :func:`apply_to_diffusers` makes before touching the denoiser; returns its adapter.

    Example:
        >>> from hf_tokred.integration.diffusers import check_supported
        >>> check_supported(pipe.unet, {"method": "todo"}).kind          # doctest: +SKIP
        'unet'
    """
    from ..model_patches import find_adapter

    cfg = TokenReductionConfig.coerce(config)
    try:
        adapter = find_adapter(denoiser)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"{type(denoiser).__name__} is not a denoiser hf_tokred can reduce. Supported denoisers: "
            f"{_supported_denoisers()}"
        ) from None
    if adapter.library != "diffusers":
        raise UnsupportedModelError(f"{type(denoiser).__name__} is not a diffusers denoiser")
    for reducer in cfg.iter_reducers():
        if reducer.stage != "diffusion":
            raise UnsupportedModelError(
                f"{reducer.method} is a {reducer.stage!r} reducer for transformers models; diffusers denoisers take "
                f"diffusion reducers ({_diffusion_methods()})"
            )
        if adapter.kind not in reducer.model_kinds:
            raise UnsupportedModelError(
                f"{reducer.method} acts on {'/'.join(reducer.model_kinds)} denoisers; {type(denoiser).__name__} is a "
                f"{adapter.kind} ({adapter.name}). Supported denoisers: {_supported_denoisers()}"
            )
        wiring_for(reducer.wiring_key)
        _diffusion_wiring(reducer).check(denoiser, adapter, reducer)
    return adapter


def apply_to_diffusers(obj, config, *, component: str | None = None, weights_from: str | None = None,
                       weights_required: bool = False, hub_kwargs: dict | None = None):
    """Attach a diffusion reduction to a pipeline or denoiser (``hf_tokred.apply`` for diffusers) and return ``obj``.

    ``obj`` is a ``DiffusionPipeline`` (its ``unet`` or ``transformer``, or the one named by
    ``component``, is reduced) or a denoiser model. Every check runs before the model is touched;
    re-applying replaces the previous reduction, and if attaching fails half-way the previous state
    (with its learned parts) is restored.

    A reducer with learned parts (``learned_modules``) gets them attached as
    ``denoiser.hf_tokred_modules``; ``weights_from`` is a folder (or Hub repo) holding their
    ``token_reduction.safetensors`` (missing: fresh parts, unless ``weights_required``).

    Example:
        >>> import hf_tokred
        >>> pipe = hf_tokred.apply(pipe, {"method": "todo", "downsample_factor": 2})   # doctest: +SKIP
        >>> pipe.transformer.config["_token_reduction"]["downsample_factor"]         # doctest: +SKIP
        2
    """
    cfg = TokenReductionConfig.coerce(config)
    denoiser = find_denoiser(obj, component)
    adapter = check_supported(denoiser, cfg)
    weights_file = _resolve_weights(cfg, weights_from, hub_kwargs or {}, weights_required)
    modules = _build_learned_modules(denoiser, adapter, cfg, weights_file)
    swap_reduction(denoiser, _attach, remove_from_diffusers, adapter, cfg, modules)
    return obj


def _attach(denoiser, adapter, cfg, modules) -> None:
    """Attach a checked ``cfg`` with its built learned ``modules`` (or None); undone completely on failure."""
    applied = AppliedReduction(cfg, adapter)
    setattr(denoiser, STATE_ATTR, applied)
    try:
        if modules is not None:
            denoiser.add_module(MODULES_ATTR, modules)
            applied.add_undo(lambda: denoiser._modules.pop(MODULES_ATTR, None))
        for reducer in cfg.iter_reducers():
            wiring_for(reducer.wiring_key)(denoiser, adapter, reducer, applied)
        # The hooks keep the running call's token grid and matchings on the denoiser: one call at a time.
        guard_concurrent_calls(denoiser, cfg.method, applied)
        denoiser.register_to_config(**{CONFIG_KEY: cfg.to_dict()})
    except BaseException:
        remove_from_diffusers(denoiser)
        raise
    finally:
        _invalidate_registry_caches(denoiser)


def _build_learned_modules(denoiser, adapter, cfg, weights_file) -> torch.nn.ModuleDict | None:
    """The reduction's learned parts (transformers' builder), in the denoiser's mode (eval after from_pretrained)."""
    from .transformers import _build_learned_modules as build

    holder = build(denoiser, adapter, cfg, weights_file)
    return None if holder is None else holder.train(denoiser.training)


def _resolve_weights(cfg, weights_from, hub_kwargs: dict, required: bool) -> str | None:
    """The path of ``token_reduction.safetensors`` in ``weights_from`` (a folder, or ``(repo, subfolder)``), or None."""
    if not cfg.learned or weights_from is None:
        return None
    source, subfolder = weights_from if isinstance(weights_from, tuple) else (weights_from, None)
    source = os.fspath(source)
    path = None
    if os.path.isdir(source):
        candidate = os.path.join(source, subfolder or "", WEIGHTS_NAME)
        path = candidate if os.path.isfile(candidate) else None
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, WEIGHTS_NAME, subfolder=subfolder, **{
                k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None})
        except Exception:  # missing entry, offline, no such repo: treated as "no saved parts"
            path = None
    if path is None and required:
        where = os.path.join(source, subfolder) if subfolder else source
        raise MissingFileError(
            f"{WEIGHTS_NAME} is missing from {where}: the {cfg.method} reduction has learned parts saved "
            "there; restore the file, or load with token_reduction=False for the dense model"
        )
    return path


_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")


def remove_from_diffusers(obj):
    """Detach the reduction from a pipeline or denoiser and return ``obj``; outputs are then bit-identical to dense.

    Also drops ``_token_reduction`` from the denoiser's config, so a later ``save_pretrained`` writes a dense model.

    Example:
        >>> import hf_tokred
        >>> _ = hf_tokred.remove(pipe)                       # doctest: +SKIP
        >>> "_token_reduction" in pipe.transformer.config   # doctest: +SKIP
        False
    """
    if isinstance(obj, DiffusionPipeline):
        for _, component in _model_components(obj):
            remove_from_diffusers(component)
        return obj
    if not isinstance(obj, ModelMixin):
        raise UnsupportedModelError(
            f"hf_tokred.remove: expected a diffusers pipeline or model, got {type(obj).__name__}"
        )
    applied = get_applied(obj)
    if applied is not None:
        try:
            applied.run_undo()
        finally:
            delattr(obj, STATE_ATTR)
            _invalidate_registry_caches(obj)
    if CONFIG_KEY in obj.config:
        obj._internal_dict = FrozenDict({k: v for k, v in obj.config.items() if k != CONFIG_KEY})
    return obj


def _invalidate_registry_caches(denoiser) -> None:
    # Ancestor registries cache the list of child registries; hooks we added or removed stale it.
    registry = denoiser.__dict__.get("_diffusers_hook")
    if registry is not None:
        registry.invalidate_child_registries_cache()


# ---------------------------------------------------------------------------------------------
# from_pretrained
# ---------------------------------------------------------------------------------------------


def _attach_on_load(model: ModelMixin, request, config_file: str, weights_from=None, hub_kwargs=None) -> None:
    """Apply ``request``, or the reduction saved in the model's config, to a freshly loaded model.

    ``weights_from`` (a folder or repo, or ``(folder or repo, subfolder)``) holds the learned parts.
    """
    if request is False:
        remove_from_diffusers(model)
        return
    if request is not None:
        # A new reduction passed as an argument starts its learned parts fresh unless the folder holds them.
        apply_to_diffusers(model, request, weights_from=weights_from, hub_kwargs=hub_kwargs)
        return
    stored = model.config.get(CONFIG_KEY)
    if stored is None or get_applied(model) is not None:
        return
    cfg = config_from_saved(stored, config_file, CONFIG_KEY)  # a dict, or a name of the package's own presets
    if cfg is False:  # "_token_reduction": false, written by hand: the dense model
        return
    try:
        apply_to_diffusers(model, cfg, weights_from=weights_from, weights_required=True, hub_kwargs=hub_kwargs)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{config_file}: {CONFIG_KEY}: {err} ({DENSE_HINT})") from None


def _model_from_pretrained(original, cls, pretrained_model_name_or_path, *args, token_reduction=None, **kwargs):
    request = check_request(token_reduction, pretrained_model_name_or_path)
    out = original(cls, pretrained_model_name_or_path, *args, **kwargs)
    model = out[0] if isinstance(out, tuple) else out
    if request is None and _LOADING_PIPELINE.get():
        return out
    if isinstance(model, ModelMixin):
        subfolder = kwargs.get("subfolder")
        _attach_on_load(model, request, saved_config_path(pretrained_model_name_or_path, subfolder),
                        (pretrained_model_name_or_path, subfolder), kwargs)
    return out


def _pipeline_from_pretrained(original, cls, pretrained_model_name_or_path, *args, token_reduction=None, **kwargs):
    request = check_request(token_reduction, pretrained_model_name_or_path)
    marker = _LOADING_PIPELINE.set(True)
    try:
        pipe = original(cls, pretrained_model_name_or_path, *args, **kwargs)
    finally:
        _LOADING_PIPELINE.reset(marker)
    if isinstance(request, TokenReductionConfig):
        name = next((n for n in DENOISER_COMPONENTS if getattr(pipe, n, None) is find_denoiser(pipe)), None)
        apply_to_diffusers(pipe, request, weights_from=(pretrained_model_name_or_path, name), hub_kwargs=kwargs)
    else:
        for name, component in _model_components(pipe):
            _attach_on_load(component, request, saved_config_path(pretrained_model_name_or_path, name),
                            (pretrained_model_name_or_path, name), kwargs)
    return pipe


def _model_save_pretrained(original, self, save_directory, *args, **kwargs):
    # Learned parts stay out of the denoiser's own weights file (a process without hf_tokred loads a clean
    # model) and go to token_reduction.safetensors beside it; a dense save drops a stale one.
    learned = self._modules.get(MODULES_ATTR) if get_applied(self) is not None else None
    push = kwargs.pop("push_to_hub", False) if learned is not None else False
    if learned is not None:
        del self._modules[MODULES_ATTR]
    try:
        result = original(self, save_directory, *args, **kwargs)
    finally:
        if learned is not None:
            self._modules[MODULES_ATTR] = learned
    if kwargs.get("is_main_process", True):
        target = os.path.join(os.fspath(save_directory), WEIGHTS_NAME)
        if learned is not None:
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous().cpu() for k, v in learned.state_dict().items()}
            save_file(tensors, target, metadata={"format": "pt"})
        elif os.path.isfile(target) or os.path.islink(target):
            os.remove(target)
    if push:  # diffusers uploads inside save_pretrained, before the side car exists: push the whole folder now
        repo_id = kwargs.get("repo_id") or os.path.basename(os.path.normpath(os.fspath(save_directory)))
        self.push_to_hub(repo_id, **{k: kwargs[k] for k in ("token", "private", "commit_message") if k in kwargs})
    return result


def install() -> None:
    """Wrap ``DiffusionPipeline.from_pretrained`` and ``ModelMixin.from_pretrained`` (idempotent; done by ``import hf_tokred``).

    Afterwards ``from_pretrained(path, token_reduction=cfg)`` attaches ``cfg``, a saved reduction is
    re-attached without the argument, and ``token_reduction=False`` loads the dense model.

    Example:
        >>> import hf_tokred                                    # calls install()
        >>> pipe = DiffusionPipeline.from_pretrained(path, token_reduction={"method": "todo"})   # doctest: +SKIP
    """
    for owner, wrapper in ((ModelMixin, _model_from_pretrained), (DiffusionPipeline, _pipeline_from_pretrained)):
        # Checked in the class's own __dict__: a subclass must not inherit the "installed" mark.
        if owner.__dict__.get("_hf_tokred_installed", False):
            continue
        original = owner.__dict__["from_pretrained"].__func__
        owner.from_pretrained = classmethod(_wrap_from_pretrained(original, wrapper))
        owner._hf_tokred_original_from_pretrained = original
        owner._hf_tokred_installed = True
    if not ModelMixin.__dict__.get("_hf_tokred_save_installed", False):
        original_save = ModelMixin.__dict__["save_pretrained"]

        @functools.wraps(original_save)
        def save_pretrained(self, *args, **kwargs):
            return _model_save_pretrained(original_save, self, *args, **kwargs)

        ModelMixin.save_pretrained = save_pretrained
        ModelMixin._hf_tokred_original_save_pretrained = original_save
        ModelMixin._hf_tokred_save_installed = True


def _wrap_from_pretrained(original, wrapper):
    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        return wrapper(original, cls, *args, **kwargs)

    return from_pretrained


__all__ = [
    "CONFIG_KEY",
    "GRID_HOOK",
    "KV_PROCESSORS",
    "DiffusionWiring",
    "JOINT_KV_PROCESSORS",
    "BlockMatching",
    "KVReductionHook",
    "KernelKVReductionHook",
    "ProjectionReductionHook",
    "RotaryTokenMergeHook",
    "SDPA_BACKENDS",
    "ToMeSDBlockHook",
    "ToMeSDState",
    "TokenMergeHook",
    "TokenGrid",
    "TokenGridHook",
    "apply_to_diffusers",
    "call_seed",
    "check_supported",
    "find_denoiser",
    "find_token_level",
    "install",
    "joint_kv_reduction_problem",
    "kernel_kv_reduction_problem",
    "kv_reduction_problem",
    "register_diffusion_wiring",
    "remove_from_diffusers",
    "self_attention_modules",
]
