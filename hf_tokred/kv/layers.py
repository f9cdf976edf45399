"""Which decoder layers a KV policy or storage acts on: the ``layers`` option.

Decoders mix layer kinds (``config.layer_types``): full-attention layers attend to every earlier token,
sliding-window layers (Gemma 2/3, Cohere 2, GPT-OSS, Qwen2 with ``use_sliding_window``, Mistral 7B v0.1)
to the last ``sliding_window`` ones, and chunked layers (Llama 4) to their chunk. A sliding layer's cache
is already bounded by its window; the full-attention layers are the ones that grow with the context.

``layers`` (a field of every KV policy and storage) says which layers the method acts on:

* ``None`` (default): the full-attention layers; on a model with no full-attention layer (every layer
  slides, e.g. Mistral 7B v0.1) every layer.
* ``"full"``: the full-attention layers only (a :class:`~hf_tokred.errors.ConfigError` on a model that has
  none).
* ``"all"``: every attention layer. A sliding layer then still drops what leaves its window, exactly as
  transformers does, and the policy evicts (or the storage compresses) within the window: useful for
  quantized storage (a model with five sliding layers per full one holds most of its short-context cache
  in sliding layers) and for uniform-window models whose window exceeds the budget. Chunked layers are
  never reduced (their chunk mask is not a window), so ``"all"`` on a model with chunked layers is an error.

Layers a method does not act on keep transformers' own cache layer for their type
(``DynamicSlidingWindowLayer`` for sliding and chunked layers, built as ``DynamicCache(config=...)`` builds
them), so their keys, values and masks are identical to the dense cache's. Budgets of per-layer policies
(PyramidKV) are spread over the layers the policy acts on.

Example:
    >>> select_layers(None, ["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    [1, 3]
    >>> select_layers("all", ["sliding_attention", "full_attention"])
    [0, 1]
    >>> select_layers(None, ["sliding_attention", "sliding_attention"])   # every layer slides (Mistral 7B v0.1)
    [0, 1]
"""

from __future__ import annotations

from ..config import param
from ..errors import ConfigError, UnsupportedModelError

LAYER_CHOICES = ("full", "all")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
CHUNKED_ATTENTION = "chunked_attention"
KV_LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION, CHUNKED_ATTENTION)


def layers_param():
    """The ``layers`` field shared by KV policies and storages."""
    return param(None, str, choices=LAYER_CHOICES, optional=True,
                 help="decoder layers acted on: None = full-attention layers (every layer when all slide), "
                      "'full' = full-attention layers only, 'all' = sliding-window layers too (within their window)")


def select_layers(option: str | None, layer_types: list[str], what: str = "the model") -> list[int]:
    """Indices of the layers a method with ``layers=option`` acts on, for a model with ``layer_types``.

    Raises :class:`ConfigError` (field ``layers``) when the option selects nothing or a layer kind it cannot
    reduce. ``what`` names the model in messages.

    Example:
        >>> select_layers("full", ["full_attention", "sliding_attention"])
        [0]
    """
    full = [i for i, t in enumerate(layer_types) if t == FULL_ATTENTION]
    if option is None:
        chosen = full or [i for i, t in enumerate(layer_types) if t == SLIDING_ATTENTION]
        if not chosen:
            raise ConfigError(f"layers: {what} has no full-attention or sliding-window layer to reduce (its layers "
                              f"are {sorted(set(layer_types))})", field="layers")
        return chosen
    if option == "full":
        if not full:
            raise ConfigError(
                f"layers: {what} has no full-attention layer (its layers are {sorted(set(layer_types))}); use "
                "layers='all' (or None) to reduce its sliding-window layers within their window",
                field="layers",
            )
        return full
    if option == "all":
        if CHUNKED_ATTENTION in layer_types:
            raise ConfigError(
                f"layers: {what} has chunked-attention layers, which cannot be reduced (their chunk mask is not a "
                "window); use layers='full' (or None)",
                field="layers",
            )
        return list(range(len(layer_types)))
    raise ConfigError(f"layers: expected one of {', '.join(map(repr, LAYER_CHOICES))} or None, got {option!r}",
                      field="layers")


def kv_layer_types(model, label: str = "KV reduction") -> tuple[list[str], list[dict]]:
    """Each decoder layer's type and transformers' cache-layer arguments for it (``sliding_window``), or
    :class:`UnsupportedModelError` for layer kinds that keep no plain KV cache (recurrent, shared, indexed).

    Example:
        >>> kv_layer_types(model)                                   # doctest: +SKIP
        (['sliding_attention', 'full_attention'], [{'sliding_window': 512}, {}])
    """
    from ..model_patches.decoder import decoder_layer_types

    types, kwargs = decoder_layer_types(model)
    other = sorted(set(types) - set(KV_LAYER_TYPES))
    if other:
        raise UnsupportedModelError(
            f"{label}: {type(model).__name__} has layers of types {other}; hf_tokred reduces KV caches made of "
            f"{', '.join(KV_LAYER_TYPES)} layers"
        )
    return types, kwargs


def check_layers(config, model) -> list[int]:
    """The layers ``config`` (a KV policy or storage) acts on in ``model``; raises the errors of
    :func:`kv_layer_types` and :func:`select_layers`.

    Example:
        >>> check_layers(TokenReductionConfig(method="snapkv", keep=0.5), model)   # doctest: +SKIP
        [1, 3]
    """
    types, _ = kv_layer_types(model, config.method)
    return select_layers(config.layers, types, type(model).__name__)


__all__ = ["KV_LAYER_TYPES", "LAYER_CHOICES", "check_layers", "kv_layer_types", "layers_param", "select_layers"]
