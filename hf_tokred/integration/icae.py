"""Wiring of ICAE (``icae``): the LoRA encoder that runs only inside ``compress_context``, and the frozen decoder.

``hf_tokred.apply(model, {"method": "icae", ...})`` (or ``from_pretrained`` of a folder saved with it) attaches
the learned part (LoRA, memory-token and ``<AE>`` embeddings at ``model.hf_tokred_modules["icae"]``) and installs
nothing on the model: plain ``forward`` and ``generate`` stay the dense model's, bit for bit, and ``remove()``
has nothing to undo but the learned part.

:func:`hf_tokred.compress_context` (registered here for ``icae``) then

1. cuts every row's real tokens (``attention_mask == 1``; left-, right- or unpadded) into
   ``cfg.chunk_lengths(L)`` chunks; all rows must need the same number of chunks (a clear error otherwise:
   compress such rows separately), which holds for every batch of contexts of at most ``chunk_tokens`` tokens;
2. encodes each chunk (batched over rows) with the LoRA hooks attached for that call only: the chunk's
   tokens, left-padded, then the memory tokens. ``slot_form="kv"`` (the default): the positions put chunk ``j``'s
   memory tokens at ``j * m .. j * m + m - 1`` (its tokens before them, negative positions included), and the
   keys and values of every layer at the memory positions are the chunk's slots, already cache entries.
   ``slot_form="hidden"`` (the paper's): positions from 0 for every row, and the final-norm hidden states at the
   memory positions are the chunk's slots;
3. builds a fresh ``DynamicCache`` of ``S = chunks * memory_slots`` entries per layer: the ``kv`` slots in chunk
   order, or the frozen decoder's KV of the ``hidden`` slots fed as ``inputs_embeds`` at positions ``0..S-1``.
   Every row has the same ``S`` entries, so no padding and no mask are needed afterwards and each row gives the
   same result as alone.

``prefix_ids`` are ``S`` copies of a placeholder id (the first id that is no pad, end or start token), so
``generate`` sees no padding in them. Ask with
``model.generate(torch.cat([ctx.prefix_ids, question_ids], -1), past_key_values=ctx.fresh_cache())``: the question
then sits at positions ``S, S+1, ...`` as in training. :func:`reconstruct` decodes the context back from the
slots (the autoencoding task), :func:`icae_losses` are the training objectives of the recipe.

The LoRA hooks are registered on the model for the duration of one ``compress_context`` call: a plain forward of
the same model running in another thread at that moment would see them, so serialize such calls (or give each
thread its own model).

Example:
    >>> model = hf_tokred.apply(model, {"method": "icae"}, weights_from="smollm2-icae")     # doctest: +SKIP
    >>> ctx = hf_tokred.compress_context(model, context_ids)                               # doctest: +SKIP
    >>> ctx.entries                                                                        # doctest: +SKIP
    128
"""

from __future__ import annotations

import contextlib

import torch

from ..compat import CACHE_KWARG
from ..errors import TokenReductionError, UnsupportedModelError
from ..methods.lm.icae import MODULE_NAME, ICAEConfig, encoder_inputs
from .transformers import install_prefix_slicing
from .wiring import MODULES_ATTR, CompressedContext, attached_reducer, register_context_compressor, register_wiring


@register_wiring("icae")
def wire_icae(model, adapter, reducer, applied) -> None:
    """Check the learned part fits the model; let assisted decoding continue a compressed context
    (:func:`~hf_tokred.integration.transformers.install_prefix_slicing`). The LoRA runs only inside
    ``compress_context``."""
    if reducer.slot_form == "kv" and getattr(model.config.get_text_config(), "rope_parameters", None) is None:
        raise UnsupportedModelError(
            f"icae: slot_form='kv' places each chunk's slots by shifting its rotary positions, and "
            f"{type(model).__name__} has no rotary position embeddings (config.rope_parameters is unset); use "
            "slot_form='hidden' (the paper's slots) for it")
    parts = model._modules[MODULES_ATTR][MODULE_NAME]
    hidden = model.get_input_embeddings().weight.shape[1]
    if parts.memory.shape != (reducer.memory_slots, hidden):
        raise TokenReductionError(f"icae: the memory embeddings have shape {tuple(parts.memory.shape)}, expected "
                                  f"({reducer.memory_slots}, {hidden}) for memory_slots={reducer.memory_slots} and "
                                  f"{type(model).__name__}'s hidden size {hidden}")
    install_prefix_slicing(model, applied)  # assisted decoding over ctx.fresh_cache() feeds the question only


def _attached(model) -> tuple[ICAEConfig, torch.nn.Module]:
    reducer = attached_reducer(model, "context", ICAEConfig, "hf_tokred.apply(model, {'method': 'icae', ...})")
    return reducer, model._modules[MODULES_ATTR][MODULE_NAME]


@contextlib.contextmanager
def encoder_mode(model):
    """The LoRA hooks attached for the duration of the block (the encoder); removed afterwards even on error."""
    _, parts = _attached(model)
    handles = parts.lora.attach(model)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_inputs(model, input_ids, attention_mask) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TokenReductionError("icae: the context must be token ids, a (batch, length) LongTensor; got "
                                  f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0:
        raise TokenReductionError("icae: the context is empty (0 tokens); there is nothing to compress")
    vocab = model.get_input_embeddings().num_embeddings
    if bool((input_ids < 0).any()) or bool((input_ids >= vocab).any()):
        raise TokenReductionError(f"icae: context token ids must be in [0, {vocab})")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise TokenReductionError(f"icae: attention_mask has shape {tuple(getattr(attention_mask, 'shape', ()))}, "
                                  f"input_ids {tuple(input_ids.shape)}; they must match")
    return attention_mask.bool()


def chunk_rows(cfg: ICAEConfig, input_ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's real tokens cut by ``cfg.chunk_lengths``: a list (one per chunk) of ``(ids, mask)`` batches,
    right-padded. Every row must need the same number of chunks."""
    rows = [input_ids[b][mask[b]] for b in range(input_ids.shape[0])]
    if any(r.numel() == 0 for r in rows):
        raise TokenReductionError("icae: a row of the context has no tokens (its attention_mask is all 0)")
    cuts = [cfg.chunk_lengths(int(r.numel())) for r in rows]
    counts = sorted({len(c) for c in cuts})
    if len(counts) > 1:
        raise TokenReductionError(
            f"icae: the rows need different numbers of {cfg.chunk_tokens}-token chunks ({counts}: lengths "
            f"{[int(r.numel()) for r in rows]}), so they would get different numbers of memory slots; compress them "
            "in separate calls (rows of at most chunk_tokens tokens always batch)")
    chunks = []
    for j in range(counts[0]):
        pieces = []
        for r, c in zip(rows, cuts):
            start = sum(c[:j])
            pieces.append(r[start:start + c[j]])
        width = max(p.numel() for p in pieces)
        ids = torch.zeros(len(pieces), width, dtype=torch.long, device=input_ids.device)
        m = torch.zeros(len(pieces), width, dtype=torch.bool, device=input_ids.device)
        for b, p in enumerate(pieces):
            ids[b, :p.numel()] = p
            m[b, :p.numel()] = True
        chunks.append((ids, m))
    return chunks


def encode_chunk(model, parts, ids: torch.Tensor, mask: torch.Tensor, form: str = "hidden", first_slot: int = 0):
    """One chunk per row -> its ``memory_slots`` slots (the LoRA must be attached: :func:`encoder_mode`): for
    ``form="hidden"`` a ``(batch, memory_slots, hidden)`` tensor; for ``form="kv"`` a list with one ``(keys,
    values)`` pair per layer, ``(batch, kv_heads, memory_slots, head_dim)`` each, the keys rotated for positions
    ``first_slot .. first_slot + memory_slots - 1``. Keeps the autograd graph (the recipe trains through it)."""
    from transformers import DynamicCache

    m = parts.memory.shape[0]
    embeds = model.get_input_embeddings()(ids)
    inputs, attention, positions = encoder_inputs(embeds, mask, parts.memory)
    if form == "hidden":
        out = model.base_model(inputs_embeds=inputs, attention_mask=attention, position_ids=positions,
                               use_cache=False)
        return out.last_hidden_state[:, -m:]
    # RoPE attention sees only relative positions: shifting a row's positions changes nothing but the rotation of
    # its keys, which then sit at the slots' positions in the decoder
    positions = positions - positions[:, -m:-m + 1] + first_slot
    cache = DynamicCache(config=model.config)
    model.base_model(inputs_embeds=inputs, attention_mask=attention, position_ids=positions, **{CACHE_KWARG: cache},
                     use_cache=True)
    return [(layer.keys[:, :, -m:], layer.values[:, :, -m:]) for layer in cache.layers]


def _join(slots: list):
    """Chunk slots in order: hidden states concatenated, or each layer's keys and values concatenated."""
    if isinstance(slots[0], torch.Tensor):
        return torch.cat(slots, 1)
    return [(torch.cat([s[i][0] for s in slots], 2), torch.cat([s[i][1] for s in slots], 2))
            for i in range(len(slots[0]))]


def _encode_chunks(model, cfg: ICAEConfig, parts, chunks: list):
    """Every chunk of :func:`chunk_rows` through the encoder (LoRA attached for the call), slots joined in order."""
    with encoder_mode(model):
        return _join([encode_chunk(model, parts, ids, m, cfg.slot_form, j * cfg.memory_slots)
                      for j, (ids, m) in enumerate(chunks)])


def encode(model, input_ids: torch.Tensor, attention_mask=None):
    """The memory slots of a batch of contexts, chunk slots in order: ``(batch, chunks * memory_slots, hidden)``
    hidden states (``slot_form="hidden"``) or one ``(keys, values)`` pair per layer with ``chunks * memory_slots``
    entries (``slot_form="kv"``; see :func:`encode_chunk`).

    Example:
        >>> slots = encode(model, context_ids)                      # doctest: +SKIP
        >>> slot_count(slots)                                       # doctest: +SKIP
        128
    """
    cfg, parts = _attached(model)
    mask = _check_inputs(model, input_ids, attention_mask)
    return _encode_chunks(model, cfg, parts, chunk_rows(cfg, input_ids, mask))


def slot_count(slots) -> int:
    """Memory slots (cache entries) per row of what :func:`encode` returned, in either form."""
    return int(slots.shape[1]) if isinstance(slots, torch.Tensor) else int(slots[0][0].shape[2])


def slots_cache(model, slots):
    """A ``DynamicCache`` holding the slots: the ``kv`` form's keys and values as they are, or the frozen decoder's
    KV of ``hidden`` slots fed as input embeddings at positions ``0..S-1``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if not isinstance(slots, torch.Tensor):
        for layer, (keys, values) in enumerate(slots):
            cache.update(keys, values, layer)
        return cache
    batch, count, _ = slots.shape
    positions = torch.arange(count, device=slots.device).unsqueeze(0).expand(batch, -1)
    model.base_model(inputs_embeds=slots.to(model.get_input_embeddings().weight.dtype), position_ids=positions,
                     **{CACHE_KWARG: cache}, use_cache=True)
    return cache


@register_context_compressor("icae")
def compress_icae(model, reducer, input_ids, attention_mask=None) -> CompressedContext:
    """``hf_tokred.compress_context`` for ICAE: the contexts' memory slots as the decoder's KV cache."""
    mask = _check_inputs(model, input_ids, attention_mask)
    with torch.no_grad():
        slots = encode(model, input_ids, mask)
        cache = slots_cache(model, slots)
    return CompressedContext.of(model, cache, slot_count(slots), input_ids, mask, "icae")


def reconstruct(model, ctx: CompressedContext, max_new_tokens: int) -> torch.Tensor:
    """Greedy autoencoding: the decoder, given the slots and ``<AE>``, writes the context back; ``(batch, max_new_tokens)``.

    Example:
        >>> ctx = hf_tokred.compress_context(model, context_ids)          # doctest: +SKIP
        >>> (reconstruct(model, ctx, context_ids.shape[1]) == context_ids).float().mean()   # doctest: +SKIP
    """
    _, parts = _attached(model)
    cache = ctx.fresh_cache()
    batch, start = ctx.prefix_ids.shape
    embedding = model.get_input_embeddings()
    step = parts.ae.to(embedding.weight.dtype).unsqueeze(0).expand(batch, -1, -1)
    out = []
    with torch.no_grad():
        for i in range(max_new_tokens):
            positions = torch.full((batch, 1), start + i, device=step.device, dtype=torch.long)
            logits = model(inputs_embeds=step, position_ids=positions, **{CACHE_KWARG: cache}, use_cache=True).logits
            token = logits[:, -1].argmax(-1)
            out.append(token)
            step = embedding(token).unsqueeze(1)
    return torch.stack(out, 1)


def icae_losses(model, context: torch.Tensor, continuation: torch.Tensor | None = None):
    """The pretraining objectives for a batch of full chunks ``context`` (``(batch, L)``, no padding; several
    chunks when ``L > chunk_tokens``, cut as at inference): returns ``(ae_loss, ae_accuracy)`` for the
    autoencoding (decoder given ``[slots, <AE>, context[:-1]]`` predicts ``context``) or, with ``continuation``,
    ``(lm_loss, lm_accuracy)`` for language modelling (decoder given ``[slots, continuation[:-1]]`` predicts
    ``continuation``). Losses keep the graph (the LoRA and the embeddings get gradients; the model is frozen)."""
    cfg, parts = _attached(model)
    slots = _encode_chunks(model, cfg, parts, chunk_rows(cfg, context, torch.ones_like(context, dtype=torch.bool)))
    if continuation is None:
        return decoder_loss(model, slots, context, autoencode=True)
    return decoder_loss(model, slots, continuation, autoencode=False)


def decoder_loss(model, slots, targets: torch.Tensor, *, autoencode: bool):
    """Teacher-forced ``(loss, accuracy)`` of the frozen decoder reading ``slots`` (what :func:`encode` returns):
    reconstructing ``targets`` after ``<AE>`` (``autoencode``) or continuing with them. Hidden slots come first in
    the decoder's input (the last one predicts the continuation's first token); ``kv`` slots are its cache, so the
    continuation is predicted from its second token on."""
    _, parts = _attached(model)
    embedding = model.get_input_embeddings()
    batch, count = targets.shape[0], slot_count(slots)
    ae = [parts.ae.unsqueeze(0).expand(batch, -1, -1).to(embedding.weight.dtype)] if autoencode else []
    if isinstance(slots, torch.Tensor):
        inputs = torch.cat([slots] + ae + [embedding(targets[:, :-1])], 1)
        first = count if autoencode else count - 1  # the position whose logits predict targets[0]
        positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand(batch, -1)
        logits = model(inputs_embeds=inputs, position_ids=positions, use_cache=False,
                       logits_to_keep=inputs.shape[1] - first).logits
    else:
        inputs = torch.cat(ae + [embedding(targets[:, :-1])], 1)
        positions = count + torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand(batch, -1)
        logits = model(inputs_embeds=inputs, position_ids=positions, **{CACHE_KWARG: slots_cache(model, slots)},
                       use_cache=True).logits
        if not autoencode:
            targets = targets[:, 1:]
    logits = logits[:, : targets.shape[1]]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    accuracy = float((logits.argmax(-1) == targets).float().mean())
    return loss, accuracy


__all__ = ["compress_icae", "decoder_loss", "encode", "encoder_mode", "icae_losses", "reconstruct", "slot_count",
           "slots_cache"]
