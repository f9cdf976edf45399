"""Wiring of the ``prompt`` stage: ``generate()`` (and so ``pipeline("text-generation")``) compresses the prompt.

A prompt compressor attached to a causal LM (``hf_tokred.apply(model, {"method": "llmlingua", "rate": 0.5})``
or ``from_pretrained(..., token_reduction=...)``) replaces the model's ``generate`` with one that, for every
row of the batch, decodes the prompt, compresses the text between ``<context>`` and ``</context>`` (the
question after it kept, see :mod:`hf_tokred.prompt.layout`), tokenizes the result and generates from it. The
returned sequences start with the caller's *original* prompt ids, followed by the new tokens, so slicing
``output[:, input_ids.shape[1]:]`` and the text-generation pipeline's own post-processing work unchanged.
``rate=1.0`` (no ``target_token``) passes the prompt through untouched.

The budget (``rate`` or ``target_token``) applies to the marked context, counted in the model's own
tokenizer; the rest of the prompt is kept. The tokenizer is the one passed as ``generate(tokenizer=...)``
(transformers' own argument; a text-generation pipeline passes its own, see :func:`install`) or the one
saved in the model's folder. The scorer is the embedded
SmolLM2-135M-Instruct (``scorer="embedded"``, loaded once per process and moved to the device of the model's
input embeddings) or the model itself (``scorer="self"``). A KV policy composed with the compressor
(``hf_tokred.compose``) works on the compressed prompt. :func:`last_compression` returns the statistics of
the last call (per row, as ``compress_prompt`` returns them).

Example:
    >>> import hf_tokred                                                                    # doctest: +SKIP
    >>> model = hf_tokred.apply(model, {"method": "longllmlingua", "rate": 0.5})            # doctest: +SKIP
    >>> prompt = "<context>" + long_document + "</context>\\nWhat is the pass key?"          # doctest: +SKIP
    >>> ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
    ...                                     return_tensors="pt")                           # doctest: +SKIP
    >>> out = model.generate(ids, max_new_tokens=10, tokenizer=tokenizer)                   # doctest: +SKIP
    >>> hf_tokred.integration.prompt.last_compression(model)[0]["compressed_tokens"]        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
import weakref

import torch

from ..errors import ConfigError, TokenReductionError, UnsupportedModelError
from ..prompt.base import SEPARATOR, count_tokens, load_scorer, pad_batch, saved_tokenizer
from ..prompt.layout import split_prompt
from .wiring import get_applied, register_wiring

_LAST = threading.local()  # per thread: {model: [result per row]} of the last generate() call


@register_wiring("prompt")
def wire_prompt_compressor(model, adapter, reducer, applied) -> None:
    """Make ``model.generate`` compress the marked context of every prompt before generating."""
    if not model.can_generate():
        raise UnsupportedModelError(
            f"{reducer.method}: {type(model).__name__} cannot generate; a prompt compressor attaches to a causal LM "
            "(an ...ForCausalLM model) whose generate() it feeds. To compress text alone, use "
            f"hf_tokred.compress_prompt(context, question=..., method={reducer.method!r})")
    if reducer.scorer == "self" and applied.config.get("prefill") is not None:
        raise ConfigError(
            f"scorer: 'self' scores the prompt with the model, whose prefill {applied.config.get('prefill').method} "
            "prunes; use scorer='embedded' with a prefill reducer", field="scorer")
    model.generate = types.MethodType(_generate_compressing_prompt, model)


def last_compression(model) -> list[dict] | None:
    """What the last ``generate()`` of ``model`` in this thread did to each prompt (None before the first).

    One dict per row, as :func:`hf_tokred.compress_prompt` returns it (``origin_tokens`` and
    ``compressed_tokens`` count the marked context and the question), or ``None`` for a row passed through.

    Example:
        >>> stats = last_compression(model)[0]                                               # doctest: +SKIP
        >>> stats["origin_tokens"], stats["compressed_tokens"]                               # doctest: +SKIP
    """
    store = getattr(_LAST, "results", None)
    return None if store is None else store.get(model)


def _generate_compressing_prompt(self, *args, **kwargs):
    from .transformers import _generate_with_reduction

    applied = get_applied(self)
    reducer = applied.config.get("prompt")
    # then the generate() that builds the cache the composed KV / prefill reducers need (dense without them)
    inner = _generate_with_reduction
    if reducer.target_token is None and reducer.rate >= 1.0:
        return inner(self, *args, **kwargs)
    args = list(args)
    inputs = args.pop(0) if args else kwargs.pop("inputs", None)
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TokenReductionError(
            f"{reducer.method}: generate() needs the prompt as token ids (a (batch, length) LongTensor) to compress "
            "it; inputs_embeds and other inputs cannot be compressed as text")
    attention_mask = kwargs.get("attention_mask")
    tokenizer = _tokenizer(self, applied, kwargs.get("tokenizer"))
    rows, results = _compress_rows(self, reducer, tokenizer, input_ids, attention_mask)
    store = getattr(_LAST, "results", None)
    if store is None:
        store = _LAST.results = weakref.WeakKeyDictionary()
    store[self] = results
    new_ids, new_mask = (t.to(input_ids.device) for t in pad_batch(rows, _pad_id(self, tokenizer), left=True))
    kwargs["attention_mask"] = new_mask
    return with_caller_prompt(inner(self, new_ids, *args, **kwargs), input_ids, new_ids.shape[1])


def with_caller_prompt(output, input_ids: torch.Tensor, rewritten_length: int):
    """``generate()``'s ``output`` for a rewritten prompt of ``rewritten_length`` tokens, with the caller's own
    ``input_ids`` in front of the new tokens instead: what ``generate()`` returns for the prompt it was given
    (rows repeated for beams and ``num_return_sequences``). A tensor or a ``GenerateOutput`` (changed in place).

    Example:
        >>> import torch
        >>> with_caller_prompt(torch.tensor([[7, 8, 9, 5]]), torch.tensor([[1, 2]]), 3).tolist()
        [[1, 2, 5]]
    """
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = input_ids.to(sequences.device).repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    sequences = torch.cat([prompt, sequences[:, rewritten_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return sequences
    output.sequences = sequences
    return output


def _compress_rows(model, reducer, tokenizer, input_ids, attention_mask):
    scorer = _scorer(model, reducer, tokenizer)
    specials = list(getattr(tokenizer, "all_special_tokens", []))
    rows, results = [], []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        layout = split_prompt(text, specials)
        docs = layout.documents
        context = SEPARATOR.join(d for d in docs if d.strip())
        if not context.strip():
            rows.append(tokenizer(layout.join(docs), add_special_tokens=False)["input_ids"])
            results.append(None)
            continue
        context_tokens = count_tokens(tokenizer, context)
        question = layout.question
        around = count_tokens(tokenizer, SEPARATOR.join([context, question])) - context_tokens if question else 0
        budget = reducer.target_token if reducer.target_token is not None else round(reducer.rate * context_tokens)
        job = dataclasses.replace(reducer, target_token=max(1, budget + around))
        result = job.compress(docs, question or None, scorer=scorer, target_tokenizer=tokenizer)
        # in the method's output order (LongLLMLingua reorders): the blocks receive the documents in that order
        rows.append(tokenizer(layout.join(result["compressed_documents"]), add_special_tokens=False)["input_ids"])
        results.append(result)
    return rows, results


def _scorer(model, reducer, tokenizer):
    if not reducer.uses_scorer:  # llmlingua2 scores with its own token classifier (its config names it)
        return None
    if reducer.scorer == "self":
        return load_scorer(model, tokenizer)
    scorer = load_scorer(None)
    device = model.get_input_embeddings().weight.device
    if device.type != "meta" and scorer.device != device:
        scorer.model.to(device)  # beside the model: one copy per process, on the device of the last model served
    return scorer


def _tokenizer(model, applied, given):
    if given is not None:
        return given
    cached = getattr(applied, "prompt_tokenizer", None)
    if cached is not None:
        return cached
    tokenizer = saved_tokenizer(model)
    if tokenizer is None:
        folder = getattr(model, "name_or_path", "") or ""
        raise TokenReductionError(
            f"{applied.config.method}: compressing the prompt needs the model's tokenizer, and none is saved in "
            f"{folder or 'the model folder'!r}; pass it as generate(..., tokenizer=tokenizer)")
    applied.prompt_tokenizer = tokenizer
    return tokenizer


def _pad_id(model, tokenizer) -> int:
    for value in (getattr(model.generation_config, "pad_token_id", None), tokenizer.pad_token_id,
                  getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def install() -> None:
    """Let text-generation pipelines hand their tokenizer to a prompt-compressing ``generate()`` (idempotent).

    ``TextGenerationPipeline`` calls ``model.generate(input_ids=..., attention_mask=..., **kwargs)`` without its
    tokenizer; for a model with a prompt compressor attached the wrapper adds ``tokenizer=pipeline.tokenizer``
    (transformers' own generate() argument), which the compressor needs to read and rewrite the prompt. Other
    models are called exactly as before.
    """
    from transformers.pipelines.text_generation import TextGenerationPipeline

    if getattr(TextGenerationPipeline, "_hf_tokred_installed", False):
        return
    original = TextGenerationPipeline._forward

    @functools.wraps(original)
    def _forward(self, model_inputs, **generate_kwargs):
        applied = get_applied(self.model)
        if applied is not None and applied.config.get("prompt") is not None and "tokenizer" not in generate_kwargs:
            generate_kwargs["tokenizer"] = self.tokenizer
        return original(self, model_inputs, **generate_kwargs)

    TextGenerationPipeline._forward = _forward
    TextGenerationPipeline._hf_tokred_installed = True
