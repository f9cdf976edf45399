"""Rotary position embeddings of decoders: rotate and un-rotate cached keys.

Keys reach the KV cache *after* RoPE. A storage that quantizes keys in their pre-RoPE basis (KVQuant,
KIVI with ``pre_rope=True``) undoes the rotation with the slots' positions and redoes it after
dequantization. Nothing here is specific to one architecture:

* ``(cos, sin)`` come from the model's own rotary module (so every RoPE scaling type the model supports is
  honoured), the module with "rotary" in its name next to the decoder's layer list (``model.rotary_emb``,
  GPT-NeoX's ``gpt_neox.rotary_emb``). A rotary module whose ``forward`` takes a ``layer_type`` (Gemma 3 in
  transformers 5.23: one ``rope_theta`` for sliding layers, another for full-attention ones) is asked for
  the layer's own type.
* They are applied by the model's own ``apply_rotary_pos_emb`` (from the module that defines the layer's
  attention class), so partial rotary (GPT-NeoX's ``rotary_pct``, Phi-3's ``partial_rotary_factor``),
  interleaved pairs (Cohere) and GPT-OSS's halves are all exact. The common layouts (``rotate_half`` over
  the first ``cos.shape[-1]`` channels) are recognised on a probe and computed directly.
* RoPE rotates channel pairs, so the inverse is the same function with ``-sin``, divided by the squared
  ``attention_scaling`` some RoPE types fold into ``cos``/``sin``.
* A layer whose attention has ``use_rope`` false (SmolLM3's and Llama 4's no-RoPE layers), or whose type is
  not among its adapter's ``rope_layer_types`` (Cohere 2's full-attention layers), caches its keys
  unrotated: its :class:`Rotary` is the identity.

A decoder without a rotary module (GPT-2's learned positions, Bloom's ALiBi) raises
:class:`~hf_tokred.errors.UnsupportedModelError`; only the storage options that need pre-RoPE keys ask.

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
    >>> rope.style
    'rotate_half'
"""

from __future__ import annotations

import inspect
import sys

import torch

from hf_tokred.errors import UnsupportedModelError

from . import find_adapter


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` over the first ``cos.shape[-1]`` channels; the others pass through."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned = x[..., :width]
    return torch.cat([turned * cos + _rotate_half(turned) * sin, x[..., width:]], dim=-1)


class Rotary:
    """The rotation a model applies to one layer's keys, as a function of per-slot positions ``(B, H, S)``.

    ``rotate`` maps pre-RoPE keys to what the model caches; ``unrotate`` is its exact inverse (up to float
    rounding), including the ``attention_scaling`` factor some RoPE types fold into cos/sin.

    Args:
        rotary_emb: the model's rotary module (``forward(x, position_ids[, layer_type])`` -> ``(cos, sin)``), or
            None for a layer without RoPE (the identity).
        apply: the model's ``apply_rotary_pos_emb(q, k, cos, sin)``, or ``"rotate_half"`` (Llama's).
        layer_type: passed to a rotary module whose ``forward`` takes one.
        head_dim: the keys' channels; when given, a model ``apply`` that is ``rotate_half`` (over all or the
            first channels) is recognised on a probe and computed directly.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig
        >>> from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        >>> rope = Rotary(LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4)), "rotate_half")
        >>> x, pos = torch.randn(1, 1, 3, 8), torch.tensor([[[0, 5, 9]]])
        >>> torch.allclose(rope.unrotate(rope.rotate(x, pos), pos), x, atol=1e-5)
        True
    """

    def __init__(self, rotary_emb: torch.nn.Module | None, apply="rotate_half", layer_type: str | None = None,
                 head_dim: int | None = None):
        self.rotary_emb = rotary_emb
        self.layer_type = layer_type
        self._apply = None if isinstance(apply, str) else apply
        self.style = "none" if rotary_emb is None else ("rotate_half" if isinstance(apply, str) else "model")
        self.scaling = None
        if rotary_emb is not None:
            attr = "attention_scaling" if layer_type is None else f"{layer_type}_attention_scaling"
            scaling = getattr(rotary_emb, attr, getattr(rotary_emb, "attention_scaling", None))
            self.scaling = None if scaling is None else float(scaling)
            if self._apply is not None and head_dim is not None and self._matches_rotate_half(head_dim):
                self._apply, self.style = None, "rotate_half"  # the same arithmetic, without the queries' half

    def _matches_rotate_half(self, head_dim: int) -> bool:
        """Whether the model's function is ``rotate_half`` over the first ``cos.shape[-1]`` channels, checked on
        a random probe of ``head_dim`` channels (the common case, computed without the function's query half)."""
        probe = torch.randn(1, 1, 7, head_dim, generator=torch.Generator().manual_seed(0))
        cos, sin = self._cos_sin(torch.arange(1, 8).view(1, 1, 7), probe)
        try:
            _, expected = self._apply(probe, probe, cos, sin)
            direct = _rotate_half_pairs(probe, cos[:, None], sin[:, None])
        except RuntimeError:  # another layout (e.g. cos over half the channels): keep the model's function
            return False
        return expected.shape == direct.shape and torch.allclose(expected, direct, atol=1e-6, rtol=1e-6)

    def _cos_sin(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` shaped ``(B, H * S, D_rot)`` for ``positions`` ``(B, H, S)``."""
        batch, heads, slots = positions.shape
        probe = like.new_empty(0, dtype=torch.float32)
        kwargs = {} if self.layer_type is None else {"layer_type": self.layer_type}
        cos, sin = self.rotary_emb(probe, positions.reshape(batch, heads * slots).to(like.device), **kwargs)
        return cos.float(), sin.float()

    def _turn(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
        batch, heads, slots, dim = x.shape
        cos, sin = self._cos_sin(positions, x)
        if inverse:
            if self.scaling is not None:
                norm = self.scaling * self.scaling
            else:  # cos^2 + sin^2 is the squared scaling, wherever the model folded it in
                norm = cos * cos + sin * sin
            cos, sin = cos / norm, -sin / norm
        flat = x.float().reshape(batch, 1, heads * slots, dim)
        if self._apply is None:
            out = _rotate_half_pairs(flat, cos[:, None], sin[:, None])
        else:
            _, out = self._apply(flat, flat, cos, sin)
        return out.reshape(batch, heads, slots, dim)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the model's RoPE at ``positions`` (computed in float32, returned in ``x``'s dtype)."""
        if self.rotary_emb is None:
            return x
        return self._turn(x, positions, inverse=False).to(x.dtype)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`rotate`: the pre-RoPE vectors (float32)."""
        if self.rotary_emb is None:
            return x.float()
        return self._turn(x, positions, inverse=True)


def _rotary_module(model: torch.nn.Module, adapter, attention: torch.nn.Module) -> torch.nn.Module | None:
    if getattr(adapter, "rotary", None):
        return model.get_submodule(adapter.rotary)
    # The rotary module sits beside the layer list (model.rotary_emb next to model.layers); older layouts keep one
    # in each attention module.
    parent = adapter.layers.rpartition(".")[0]
    holder = model.get_submodule(parent) if parent else model
    for holder_ in (holder, attention):
        for name, module in holder_.named_children():
            if "rotary" in name.lower():
                return module
    return None


def rotary_for(model, layer_idx: int | None = None) -> Rotary:
    """The :class:`Rotary` of decoder layer ``layer_idx`` (default: the first full-attention layer), or
    :class:`UnsupportedModelError` when the model has no rotary embedding hf_tokred can find.

    Example:
        >>> rotary_for(model).style                                  # doctest: +SKIP
        'rotate_half'
    """
    from .decoder import FULL_ATTENTION, decoder_layer_types

    adapter = find_adapter(model)
    name = type(model).__name__
    if adapter.kind != "decoder":
        raise UnsupportedModelError(f"{name} is a {adapter.kind} model; rotary embeddings apply to decoders")
    types, _ = decoder_layer_types(model)
    attentions = {m.layer_idx: m for m in adapter.attention_modules(model)}
    if layer_idx is None:
        layer_idx = types.index(FULL_ATTENTION) if FULL_ATTENTION in types else 0
    attention = attentions[layer_idx]
    rope_types = getattr(adapter, "rope_layer_types", None)
    if not getattr(attention, "use_rope", True) or (rope_types is not None and types[layer_idx] not in rope_types):
        return Rotary(None)  # a no-RoPE layer caches its keys unrotated
    source = sys.modules.get(type(attention).__module__)
    apply = getattr(source, "apply_rotary_pos_emb", None)
    rotary_emb = _rotary_module(model, adapter, attention)
    if apply is None or rotary_emb is None:
        missing = "a rotary module next to its decoder layers" if rotary_emb is None else (
            f"apply_rotary_pos_emb in {type(attention).__module__}")
        raise UnsupportedModelError(
            f"{name}: hf_tokred does not know its rotary position embedding (it found no {missing}); "
            "pre-RoPE keys need a decoder whose attention applies RoPE from a rotary_emb module"
        )
    takes_type = "layer_type" in inspect.signature(rotary_emb.forward).parameters
    return Rotary(rotary_emb, apply, types[layer_idx] if takes_type else None, head_dim=attention_head_dim(model, attention))


def attention_head_dim(model, attention: torch.nn.Module | None = None) -> int:
    """The head dimension of a decoder's keys: the attention module's ``head_dim`` (GPT-NeoX: ``head_size``),
    else ``config.head_dim``, else ``hidden_size // num_attention_heads``.

    Example:
        >>> attention_head_dim(model)                                # doctest: +SKIP
        16
    """
    for name in ("head_dim", "head_size"):
        value = getattr(attention, name, None)
        if isinstance(value, int) and value > 0:
            return value
    config = model.config.get_text_config(decoder=True)
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


__all__ = ["Rotary", "attention_head_dim", "rotary_for"]
