"""Wiring of Gist tokens (``gist``): the LoRA's gated hooks and the compression of a prompt into k cache entries.

``hf_tokred.apply(model, {"method": "gist", "num_gist": 8})`` (or ``from_pretrained`` of a folder saved with it)
registers one forward hook per targeted ``nn.Linear``. A hook adds the LoRA update only while the gist tokens are
being computed (inside :func:`gist_cache`); at any other time it returns nothing, so ``forward``/``generate`` of the
model are exactly the dense model's, and ``remove()`` takes the hooks away. Nothing else of the model changes.

:func:`compress_gist` (what ``hf_tokred.compress_context`` calls) runs

1. the prompt through the base model at positions ``-L..-1`` (``L`` the row's real length; left, right or no
   padding: the attention mask says which tokens are real), into a fresh cache, without gradient;
2. the ``num_gist`` gist embeddings after it at positions ``0..k-1``, with the LoRA on (RoPE depends only on
   position differences, so they see the prompt as at natural positions ``L..L+k-1``);

and keeps only the gist tokens' keys and values: a ``DynamicCache`` of exactly k entries per layer and row, with no
padding, since every row has k gist tokens. Later tokens come at ``k, k+1, ...``, the positions ``generate`` gives
after a k-entry cache with an all-ones mask, which is also what training uses (:func:`continuation_logits`): the
recipe calls the very same :func:`gist_cache`, with gradient for the gist pass.

Example:
    >>> model = hf_tokred.apply(model, {"method": "gist", "num_gist": 8}, weights_from=folder)    # doctest: +SKIP
    >>> ctx = hf_tokred.compress_context(model, prompt_ids, attention_mask)                      # doctest: +SKIP
    >>> ctx.entries                                                                             # doctest: +SKIP
    8
    >>> out = model.generate(torch.cat([ctx.prefix_ids, question_ids], -1),                      # doctest: +SKIP
    ...                      past_key_values=ctx.fresh_cache(), max_new_tokens=64)
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ..compat import CACHE_KWARG
from ..errors import TokenReductionError
from ..methods.lm.gist import EMBEDDINGS_NAME, LORA_NAME, GistConfig
from .transformers import install_prefix_slicing
from .wiring import MODULES_ATTR, CompressedContext, attached_reducer, register_context_compressor, register_wiring

_ACTIVE = "gist_active"  # plain attribute of the LoRALayers module: True only during the gist pass


@register_wiring("gist")
def wire_gist(model, adapter, reducer, applied) -> None:
    """Hook the LoRA onto its Linear layers, gated: it adds its update only during the gist pass; let assisted
    decoding continue a compressed context (:func:`~hf_tokred.integration.transformers.install_prefix_slicing`)."""
    lora = model._modules[MODULES_ATTR][LORA_NAME]
    lora.__dict__[_ACTIVE] = False
    for path in lora.paths:
        handle = model.get_submodule(path).register_forward_hook(_gated(lora, lora.lora(path)))
        applied.add_undo(handle.remove)
    install_prefix_slicing(model, applied)  # assisted decoding over ctx.fresh_cache() feeds the question only


def _gated(layers, lora):
    def hook(module, args, output):
        if not layers.__dict__.get(_ACTIVE, False):
            return None
        return lora.hook(module, args, output)

    return hook


@contextlib.contextmanager
def _lora_on(layers):
    previous = layers.__dict__.get(_ACTIVE, False)
    layers.__dict__[_ACTIVE] = True
    try:
        yield
    finally:
        layers.__dict__[_ACTIVE] = previous


def _attached(model) -> GistConfig:
    return attached_reducer(model, "context", GistConfig,
                            "hf_tokred.apply(model, {'method': 'gist', 'num_gist': 8}, weights_from=folder)")


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


def gist_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, grad: bool = False):
    """The gist tokens' KV for each row's prompt: a ``DynamicCache`` with exactly ``num_gist`` entries per layer.

    ``grad=True`` keeps the graph of the gist pass (the prompt's pass never needs one: the base model reads it),
    so a loss on a continuation through the cache trains the gist embeddings and the LoRA. Inference
    (:func:`compress_gist`) and training call this same function.

    Example:
        >>> cache = gist_cache(model, prompt_ids, attention_mask)          # doctest: +SKIP
        >>> cache.get_seq_length()                                         # doctest: +SKIP
        8
    """
    reducer = _attached(model)
    holder = model._modules[MODULES_ATTR]
    embeddings, lora = holder[EMBEDDINGS_NAME], holder[LORA_NAME]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TokenReductionError("gist: the prompt must be token ids, a (batch, length) LongTensor; got "
                                  f"{type(input_ids).__name__} {getattr(input_ids, 'shape', '')}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise TokenReductionError(f"gist: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                                  f"{tuple(input_ids.shape)}")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    lengths = mask.sum(1)
    if int(lengths.min()) == 0:
        raise TokenReductionError("gist: a row of the prompt has no real token (its attention_mask is all zeros)")
    batch, k = input_ids.shape[0], reducer.num_gist
    # 1. the prompt, base model, positions -L..-1 per row (pads get positions below -L; they are masked anyway)
    positions = mask.cumsum(1) - lengths[:, None] - 1
    cache = _new_cache(model)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: cache},
              use_cache=True, **kwargs)
    # 2. the gist tokens, LoRA on, positions 0..k-1
    dtype = model.get_input_embeddings().weight.dtype
    gist = embeddings(batch, dtype if dtype.is_floating_point else torch.float32).to(input_ids.device)
    gist_positions = torch.arange(k, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    full_mask = torch.cat([mask, mask.new_ones(batch, k)], dim=1)
    with torch.set_grad_enabled(grad), _lora_on(lora):
        model(inputs_embeds=gist, attention_mask=full_mask, position_ids=gist_positions, **{CACHE_KWARG: cache},
              use_cache=True, **kwargs)
    # keep only the gist entries
    kept = _new_cache(model)
    for index, layer in enumerate(cache.layers):
        kept.update(layer.keys[:, :, -k:], layer.values[:, :, -k:], index)
    return kept


def continuation_logits(model, cache, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``ids`` read after a gist ``cache`` (teacher forcing), at positions ``k, k+1, ...`` as ``generate``.

    ``attention_mask`` (batch, len(ids)) marks real tokens of right-padded rows. Training takes the cross-entropy of
    the answer from these logits; gradients flow into the cache and so into the gist embeddings and the LoRA.

    Example:
        >>> logits = continuation_logits(model, gist_cache(model, p, grad=True), answer_ids)   # doctest: +SKIP
    """
    k = cache.get_seq_length()
    batch, length = ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    mask = torch.cat([attention_mask.new_ones(batch, k), attention_mask], dim=1)
    positions = (k + torch.arange(length, device=ids.device)).unsqueeze(0).expand(batch, -1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: cache},
                 use_cache=True).logits


@register_context_compressor("gist")
def compress_gist(model, reducer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """``hf_tokred.compress_context`` for gist tokens: the prompt becomes ``num_gist`` cache entries per layer.

    ``prefix_ids`` (``num_gist`` copies of :func:`~hf_tokred.integration.wiring.placeholder_id`) stand for the gist
    entries in ``generate``'s ``input_ids``.
    """
    cache = gist_cache(model, input_ids, attention_mask)
    return CompressedContext.of(model, cache, reducer.num_gist, input_ids, attention_mask, "gist")


__all__ = ["compress_gist", "continuation_logits", "gist_cache", "wire_gist"]
