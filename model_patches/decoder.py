"""Decoders, recognised by what they do rather than by a list of names.

A transformers model is a decoder hf_tokred can reduce when:

* its self-attention modules call transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``), so that
  ``hf_tokred.apply`` can route them through its own registered function (which sees the post-RoPE
  queries, scores tokens and evicts right after each step's attention);
* they write keys and values to the cache with ``past_key_values.update(k, v, self.layer_idx)`` and hold
  a ``layer_idx``, so a :class:`~hf_tokred.kv.cache.TokenReductionCache` receives every layer's keys;
* they are causal (an encoder's bidirectional attention has no KV cache to reduce) and the model is not an
  encoder-decoder (whose cross-attention cache is a separate object);
* every block of one ``nn.ModuleList`` holds such a module at the same path (``model.layers[i].self_attn``,
  GPT-NeoX's ``gpt_neox.layers[i].attention``, GPT-2's ``transformer.h[i].attn``).

:func:`detect_decoder` checks exactly this on the model it is given (the attention class's ``forward``
source is read once per class) and returns a :class:`DecoderAdapter` whose ``layers``/``attention`` paths
are the ones it found, or a sentence saying why the model cannot work (for example Bloom's attention,
which computes ALiBi attention itself, or Mamba, whose layers keep a recurrent state instead of a KV
cache). ``model_patches/`` keeps declarative :class:`DecoderAdapter` records only for the exceptions:
architectures whose layers or rotary module detection cannot find (none are needed in transformers 5.23);
a registered record with the model's ``model_type`` in ``match`` wins over detection.

Which layers are full-attention and which slide comes from transformers itself
(:func:`decoder_layer_types`, the reading ``DynamicCache(config=...)`` uses).

Example:
    >>> from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    >>> from hf_tokred.model_patches import find_adapter
    >>> model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                          num_attention_heads=4, vocab_size=100))
    >>> adapter = find_adapter(model)
    >>> adapter.kind, adapter.layers, adapter.attention
    ('decoder', 'gpt_neox.layers', 'attention')
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from . import ModelAdapter, register_adapter, register_detector

# transformers' ``config.layer_types`` vocabulary: the full-attention type, and the types of layers that keep a
# recurrent state instead of (or beside) a KV cache.
FULL_ATTENTION = "full_attention"
RECURRENT_LAYER_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding")


@dataclass(frozen=True)
class DecoderAdapter(ModelAdapter):
    """:class:`ModelAdapter` of a decoder with a KV cache.

    Attributes (besides those of :class:`ModelAdapter`; ``layers`` is the full dotted path of the list of
    decoder blocks, ``attention`` the path inside a block of the module that calls the attention interface):
        rotary: dotted path, from the model, of the rotary-embedding module whose ``(cos, sin)`` the attention
            applies (None: the module with "rotary" in its name next to the ``layers`` list).
        rope_layer_types: the layer types whose attention applies RoPE (None: every layer whose attention does
            not set ``use_rope`` false); keys of the other layers reach the cache unrotated.
        notes: why an explicit record exists for this architecture (exceptions only).
    """

    rotary: str | None = None
    rope_layer_types: tuple[str, ...] | None = None
    notes: str = ""


# The record that stands for every detected decoder in listings and error messages.
GENERIC_DECODER = register_adapter(
    DecoderAdapter(
        name="any decoder",
        kind="decoder",
        match=(),
        layers="model.layers",
        attention="self_attn",
        has_kv_cache=True,
        examples=("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                  "GPTNeoXForCausalLM", "... whose attention calls transformers' attention interface"),
        notes="found on the model by detect_decoder",
    )
)


@functools.cache
def _forward_source(cls: type) -> str:
    """Source of the ``forward`` that runs for ``cls`` (and of the parents it defers to with ``super()``)."""
    sources = []
    for klass in cls.__mro__:
        if klass in (torch.nn.Module, object):
            break
        forward = klass.__dict__.get("forward")
        if forward is None:
            continue
        try:
            source = inspect.getsource(forward)
        except (OSError, TypeError):  # no source on disk: fall back to what the defining module imports
            module = inspect.getmodule(klass)
            source = "ALL_ATTENTION_FUNCTIONS .update( layer_idx" if hasattr(module, "ALL_ATTENTION_FUNCTIONS") else ""
        sources.append(source)
        if "super().forward" not in source:
            break
    return "\n".join(sources)


def calls_attention_interface(cls: type) -> bool:
    """Whether modules of class ``cls`` dispatch attention through transformers' ``ALL_ATTENTION_FUNCTIONS``.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer
        >>> calls_attention_interface(LlamaAttention), calls_attention_interface(LlamaDecoderLayer)
        (True, False)
    """
    return "ALL_ATTENTION_FUNCTIONS" in _forward_source(cls)


def writes_kv_cache(cls: type) -> bool:
    """Whether modules of class ``cls`` write their keys/values with ``<cache>.update(..., self.layer_idx)``.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaAttention
        >>> writes_kv_cache(LlamaAttention)
        True
    """
    source = _forward_source(cls)
    return ".update(" in source and "layer_idx" in source


def decoder_layer_types(model) -> tuple[list[str], list[dict]]:
    """Each decoder layer's type and cache-layer arguments, read as transformers reads them for a
    ``DynamicCache(config=model.config)`` (``config.layer_types``, or the ``sliding_window`` settings).

    Example:
        >>> from transformers import Gemma2Config, Gemma2ForCausalLM
        >>> model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
        ...                           sliding_window=8))
        >>> decoder_layer_types(model)
        (['sliding_attention', 'full_attention'], [{'sliding_window': 8}, {}])
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))


def _block_path(model: torch.nn.Module, name: str) -> tuple[str, int, str] | None:
    """Split ``model.layers.3.self_attn`` into the innermost ``nn.ModuleList`` holding it, the block index and
    the path inside the block (None when no list holds the module)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), torch.nn.ModuleList):
            return ".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1:])
    return None


def detect_decoder(model) -> DecoderAdapter | str | None:
    """A :class:`DecoderAdapter` for a transformers decoder hf_tokred can reduce, else why not (a sentence),
    or None for objects that are not transformers models.

    Example:
        >>> from transformers import MambaConfig, MambaForCausalLM
        >>> print(detect_decoder(MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=32))))
        its layers (MambaBlock, MambaMixer) keep a recurrent state (layer types linear_attention) instead of a KV cache, so there is no KV cache to reduce
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(model_type, str) or not model_type:
        return None
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        return ("it is an encoder-decoder model; hf_tokred reduces the KV cache of decoder-only models (an "
                "encoder-decoder keeps a separate cross-attention cache)")
    owners = [(n, m) for n, m in model.named_modules()
              if isinstance(getattr(m, "layer_idx", None), int) and not isinstance(m.layer_idx, bool)]
    attention = [(n, m) for n, m in owners if calls_attention_interface(type(m))]
    if not attention:
        classes = ", ".join(sorted({type(m).__name__ for _, m in owners})) or "none of its modules"
        types = set(decoder_layer_types(model)[0]) if owners else set()
        recurrent = sorted(types & set(RECURRENT_LAYER_TYPES))
        if recurrent:
            return (f"its layers ({classes}) keep a recurrent state (layer types {', '.join(recurrent)}) "
                    "instead of a KV cache, so there is no KV cache to reduce")
        if owners:
            return (f"its attention ({classes}) is computed in place instead of through transformers' attention "
                    "interface (ALL_ATTENTION_FUNCTIONS), so hf_tokred cannot install the attention function that "
                    "scores and evicts cached tokens")
        return "no module holds a layer_idx and calls transformers' attention interface (no KV cache)"
    causal = [(n, m) for n, m in attention
              if getattr(m, "is_causal", True) and not getattr(m, "is_cross_attention", False)]
    if not causal:
        return "its attention is bidirectional (an encoder, is_causal=False), with no KV cache to reduce"
    writers = [(n, m) for n, m in causal if writes_kv_cache(type(m))]
    if not writers:
        classes = ", ".join(sorted({type(m).__name__ for _, m in causal}))
        return (f"its attention ({classes}) does not write keys/values through cache.update(..., "
                "layer_idx), which hf_tokred's cache relies on")
    groups: dict[str, list[tuple[int, str, torch.nn.Module]]] = {}
    for module_name, module in writers:
        where = _block_path(model, module_name)
        if where is not None:
            groups.setdefault(where[0], []).append((where[1], where[2], module))
    if not groups:
        return "its attention modules are not held in an nn.ModuleList of decoder blocks"
    text_config = config.get_text_config(decoder=True)
    expected = set(range(getattr(text_config, "num_hidden_layers", -1)))
    # The decoder's own list is the one whose modules number the cache layers 0..n-1 (a VLM's vision tower or an
    # extra prediction head has its own list).
    path = max(groups, key=lambda p: ({m.layer_idx for _, _, m in groups[p]} == expected, len(groups[p])))
    members = groups[path]
    inner = {where for _, where, _ in members}
    blocks = len(model.get_submodule(path))
    if len(inner) != 1 or len(members) != blocks:
        return (f"only {len(members)} of the {blocks} blocks in {path} hold a cache-writing attention module "
                f"at one path ({', '.join(sorted(inner))}); hybrid stacks mixing attention with other layer kinds "
                "are not supported")
    return DecoderAdapter(
        name=model_type,
        kind="decoder",
        match=(model_type,),
        layers=path,
        attention=inner.pop(),
        has_kv_cache=True,
        examples=(name,),
        notes=GENERIC_DECODER.notes,
    )


register_detector(detect_decoder)

__all__ = [
    "FULL_ATTENTION",
    "GENERIC_DECODER",
    "RECURRENT_LAYER_TYPES",
    "DecoderAdapter",
    "calls_attention_interface",
    "decoder_layer_types",
    "detect_decoder",
    "writes_kv_cache",
]
