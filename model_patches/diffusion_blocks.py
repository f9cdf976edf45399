"""Where the image tokens sit in the transformer blocks of diffusion denoisers: one record per block class.

Diffusion reducers hook a block (its input is the merge metric), the modules inside it that attend
over the image tokens, and optionally its cross-attention and feed-forward. Which argument of the
block carries the image tokens, which submodules those are, and whether the self-attention is
*joint* (it also takes the text as ``encoder_hidden_states`` and returns ``(image, text)``, as in
SD3) differ per block class; that knowledge lives here, never in a method or a copied ``forward``.

Each denoiser adapter (``unet.py``, ``dit.py``, ``pixart.py``, ``sd3.py``, ``flux.py``) registers a
:class:`DenoiserLayout`: its block classes and, for UNets, the resolution level of every block
(1 = the finest token grid), known from the model's structure before any call.

Example:
    >>> from diffusers import DiTTransformer2DModel
    >>> from hf_tokred.model_patches.diffusion_blocks import denoiser_layout
    >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
    ...                             sample_size=8, num_embeds_ada_norm=10)
    >>> layout = denoiser_layout(dit)
    >>> layout.block(dit.transformer_blocks[0]).self_attention, layout.level(dit, "transformer_blocks.0")
    (('attn1',), 1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hf_tokred.errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockLayout:
    """Where the image tokens are in one transformer-block class.

    Attributes:
        block_class: the class name (matched against the block's MRO).
        hidden_states: the forward argument carrying the image tokens ``(batch, tokens, channels)``.
        position: its positional index in ``forward``.
        self_attention: submodules attending over the image tokens, called with them as ``hidden_states``.
        joint_attention: the self-attention also takes the text as ``encoder_hidden_states`` and returns
            ``(image, text)`` (SD3's ``JointTransformerBlock``); image keys/values are then reduced at the
            ``to_k``/``to_v`` projections.
        cross_attention: submodules whose queries are the image tokens and whose keys are the text.
        feed_forward: the feed-forward submodules applied to the image tokens.
        rotary_argument: keyword argument of the self-attention carrying a rotary table with one row per
            position of the ``[text, image]`` sequence (Flux's ``image_rotary_emb``); merged image tokens
            take their own rows.
        text_prefix: block argument whose token count is the length of a text prefix in front of the image
            tokens in the self-attention's input (Flux's single-stream blocks concatenate them).
        attention_processors: names of the attention processor classes known to work with merged image
            tokens or reduced keys/values (empty: any).
        kv_at_kernel: the self-attention's processor rotates queries and keys itself (``rotary_argument``) and
            then calls ``torch.nn.functional.scaled_dot_product_attention`` (through diffusers'
            ``dispatch_attention_fn`` and a PyTorch-native backend) on ``[text, image]`` keys/values: reduced
            image keys/values are taken there, after the rotation, so every key keeps its own position's
            rotation (Flux). The image tokens are the last ``height * width`` of that sequence.
    """

    block_class: str
    hidden_states: str = "hidden_states"
    position: int = 0
    self_attention: tuple[str, ...] = ("attn1",)
    joint_attention: bool = False
    cross_attention: tuple[str, ...] = ("attn2",)
    feed_forward: tuple[str, ...] = ("ff",)
    rotary_argument: str | None = None
    text_prefix: str | None = None
    attention_processors: tuple[str, ...] = ()
    kv_at_kernel: bool = False

    def image_tokens(self, args: tuple, kwargs: dict):
        """The image tokens from a call's ``(args, kwargs)``."""
        if len(args) > self.position:
            return args[self.position]
        return kwargs.get(self.hidden_states)

    def submodules(self, block: torch.nn.Module, names: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
        """``(name, module)`` for each of ``names`` the block has (and is not None)."""
        found = []
        for name in names:
            module = getattr(block, name, None)
            if isinstance(module, torch.nn.Module):
                found.append((name, module))
        return found


def _single_level(model, block_name: str) -> int:
    return 1


@dataclass(frozen=True)
class DenoiserLayout:
    """The transformer blocks of one denoiser class.

    Attributes:
        adapter: name of the denoiser's ``ModelAdapter``.
        blocks: the block classes reducers may hook.
        level_of: ``level_of(model, block_name)``: the resolution level of the block named ``block_name``
            (qualified name inside the model), 1 for the finest token grid, doubling per downsampler.
        block_lists: names of the ``nn.ModuleList`` s of blocks (default: the adapter's ``layers``).
        grid_of: ``grid_of(model, args, kwargs) -> (height, width)``: the token grid of a denoiser call whose
            latent is not a 4-D ``(batch, channels, height, width)`` first argument (Flux's packed latents).
    """

    adapter: str
    blocks: tuple[BlockLayout, ...]
    level_of: Callable[[torch.nn.Module, str], int] = field(default=_single_level)
    block_lists: tuple[str, ...] = ()
    grid_of: Callable | None = None

    def block(self, module: torch.nn.Module) -> BlockLayout | None:
        """The layout of ``module``'s class, or None when it is not a known block."""
        names = {cls.__name__ for cls in type(module).__mro__}
        return next((b for b in self.blocks if b.block_class in names), None)

    def level(self, model: torch.nn.Module, block_name: str) -> int:
        """The resolution level (1, 2, 4, ...) of the block named ``block_name``."""
        return self.level_of(model, block_name)


_LAYOUTS: dict[str, DenoiserLayout] = {}


def register_denoiser_layout(layout: DenoiserLayout) -> DenoiserLayout:
    """Register the block layout of a denoiser adapter (replacing one for the same adapter).

    Example:
        >>> from hf_tokred.model_patches.diffusion_blocks import (BASIC_TRANSFORMER_BLOCK, DenoiserLayout,
        ...                                                      register_denoiser_layout)
        >>> register_denoiser_layout(DenoiserLayout(adapter="dit", blocks=(BASIC_TRANSFORMER_BLOCK,))).adapter
        'dit'
    """
    _LAYOUTS[layout.adapter] = layout
    return layout


def denoiser_layout(model: torch.nn.Module) -> DenoiserLayout:
    """The :class:`DenoiserLayout` of a supported denoiser; raises :class:`UnsupportedModelError` otherwise.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> from hf_tokred.model_patches.diffusion_blocks import denoiser_layout
        >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
        ...                             sample_size=8, num_embeds_ada_norm=10)
        >>> denoiser_layout(dit).adapter
        'dit'
    """
    from . import find_adapter

    adapter = find_adapter(model)
    try:
        return _LAYOUTS[adapter.name]
    except KeyError:
        raise UnsupportedModelError(f"{type(model).__name__}: no transformer-block layout is registered") from None


def layout_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, BlockLayout, int]]:
    """``(qualified name, block, layout, level)`` of every known transformer block of ``model``, in order.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> from hf_tokred.model_patches.diffusion_blocks import layout_blocks
        >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
        ...                             sample_size=8, num_embeds_ada_norm=10)
        >>> [(name, level) for name, _, _, level in layout_blocks(dit)]
        [('transformer_blocks.0', 1), ('transformer_blocks.1', 1)]
    """
    from . import find_adapter

    layout = denoiser_layout(model)
    if layout.block_lists:
        lists = [(name, getattr(model, name)) for name in layout.block_lists if hasattr(model, name)]
    else:
        lists = find_adapter(model).block_lists(model)
    found = []
    for list_name, blocks in lists:
        for index, block in enumerate(blocks):
            spec = layout.block(block)
            if spec is not None:
                name = f"{list_name}.{index}"
                found.append((name, block, spec, layout.level(model, name)))
    return found


BASIC_TRANSFORMER_BLOCK = BlockLayout(block_class="BasicTransformerBlock")

__all__ = [
    "BASIC_TRANSFORMER_BLOCK",
    "BlockLayout",
    "DenoiserLayout",
    "denoiser_layout",
    "layout_blocks",
    "register_denoiser_layout",
]
