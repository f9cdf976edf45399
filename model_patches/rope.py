"""Rotary position embeddings of the supported decoders: rotate and un-rotate cached keys.

Keys reach the KV cache *after* RoPE. A storage that quantizes keys in their pre-RoPE basis (KVQuant)
undoes the rotation with the slots' positions and redoes it after dequantization. The rotation
itself comes from the model's own ``rotary_emb`` module (so every RoPE scaling type the model
supports is honoured); this file only knows where that module is and how its ``(cos, sin)`` are
applied, per adapter.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_tokred.model_patches.rope import rotary_for
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> rope = rotary_for(model)
    >>> x, pos = torch.randn(1, 2, 5, 8), torch.arange(5).expand(1, 2, 5)
    >>> torch.allclose(rope.unrotate(rope.rotate(x, pos), pos), x, atol=1e-5)
    True
"""

from __future__ import annotations

import torch

from hf_tokred.errors import UnsupportedModelError

from . import find_adapter

# adapter name -> how (cos, sin) are applied: "rotate_half" pairs channel i with channel i + dim/2
_STYLES = {"llama": "rotate_half"}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """The rotation a model applies to keys, as a function of per-slot positions ``(B, H, S)``.

    ``rotate`` maps pre-RoPE keys to what the model caches; ``unrotate`` is its exact inverse (up to
    float rounding), including the ``attention_scaling`` factor some RoPE types fold into cos/sin.
    """

    def __init__(self, rotary_emb: torch.nn.Module, style: str):
        self.rotary_emb = rotary_emb
        self.style = style
        self.scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)

    def cos_sin(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` shaped ``(B, H, S, D)`` for ``positions`` ``(B, H, S)``."""
        batch, heads, slots = positions.shape
        probe = like.new_empty(0, dtype=torch.float32)
        cos, sin = self.rotary_emb(probe, positions.reshape(batch, heads * slots).to(like.device))
        return cos.reshape(batch, heads, slots, -1), sin.reshape(batch, heads, slots, -1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the model's RoPE at ``positions`` (computed in float32, returned in ``x``'s dtype)."""
        cos, sin = self.cos_sin(positions, x)
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`rotate`: the pre-RoPE vectors (float32)."""
        cos, sin = self.cos_sin(positions, x)
        xf = x.float()
        return (xf * cos - _rotate_half(xf) * sin) / (self.scaling * self.scaling)


def rotary_for(model) -> Rotary:
    """The :class:`Rotary` of a supported decoder, or :class:`UnsupportedModelError`.

    Example:
        >>> rotary_for(model).style                                  # doctest: +SKIP
        'rotate_half'
    """
    adapter = find_adapter(model)
    style = _STYLES.get(adapter.name)
    modules = [m for name, m in model.named_modules() if name == "rotary_emb" or name.endswith(".rotary_emb")]
    if style is None or not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__}: hf_tokred does not know its rotary position embedding "
            f"(supported: {', '.join(sorted(_STYLES))} family models with a rotary_emb module)"
        )
    return Rotary(modules[0], style)


__all__ = ["Rotary", "rotary_for"]
