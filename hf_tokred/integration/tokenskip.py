"""Wiring of TokenSkip (``tokenskip``): the LoRA's forward hooks, and a ``generate()`` that appends the control.

``hf_tokred.apply(model, {"method": "tokenskip", ...})`` (or ``from_pretrained`` of a folder saved with it)

* registers one forward hook per targeted ``nn.Linear`` (the LoRA update added to its output; the modules and
  weights of the model are not replaced, so ``model.safetensors`` keeps the base model's names and ``remove()``
  restores the dense model exactly);
* replaces ``model.generate`` (an instance attribute, as for the other prompt-stage reducers) with one that
  appends the control ids of ``ratio`` (``cfg.control()``) right after each row's prompt. Each row's real tokens
  (``attention_mask == 1``; without a mask, the tokens that are not the pad token) are followed by the control
  and the batch is left-padded again, so left-padded, right-padded and unpadded batches all work and a row gives
  the same tokens in a batch as alone. The returned sequences are the caller's ``input_ids`` as given, then the
  new tokens: ``output[:, input_ids.shape[1]:]`` are the new tokens, as with a dense model, and the text-generation
  pipeline's post-processing works unchanged. The control ids are not in the output.

A KV policy or storage composed with TokenSkip (``hf_tokred.compose``) works on the prompt with its control:
this ``generate()`` calls the one that builds the reduced cache. Without control ids (``control_ids=[]``) the
prompt is passed through untouched.

Example:
    >>> model = hf_tokred.apply(model, {"method": "tokenskip", "ratio": 0.6, "control_ids": controls})  # doctest: +SKIP
    >>> out = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=64)  # doctest: +SKIP
"""

from __future__ import annotations

import types

import torch

from ..errors import TokenReductionError
from ..methods.nlp.tokenskip import MODULE_NAME
from ..prompt.base import pad_batch
from .prompt import with_caller_prompt
from .wiring import MODULES_ATTR, get_applied, register_wiring


@register_wiring("tokenskip")
def wire_tokenskip(model, adapter, reducer, applied) -> None:
    """Hook the LoRA onto its Linear layers and make ``generate()`` append the control of ``reducer.ratio``."""
    lora = model._modules[MODULES_ATTR][MODULE_NAME]
    for handle in lora.attach(model):
        applied.add_undo(handle.remove)
    model.generate = types.MethodType(_generate_with_control, model)


def _generate_with_control(self, *args, **kwargs):
    from .transformers import _generate_with_reduction

    applied = get_applied(self)
    reducer = applied.config.get("prompt")
    control = reducer.control()
    # then the generate() that builds the cache a composed KV / prefill reducer needs (dense without one)
    if not control:
        return _generate_with_reduction(self, *args, **kwargs)
    args = list(args)
    inputs = args.pop(0) if args else kwargs.pop("inputs", None)
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TokenReductionError(
            "tokenskip: generate() needs the prompt as token ids (a (batch, length) LongTensor) to append the "
            f"control of ratio {reducer.ratio} to it; inputs_embeds and other inputs are not supported")
    if kwargs.get("inputs_embeds") is not None:
        raise TokenReductionError("tokenskip: generate(inputs_embeds=...) is not supported; pass input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    generation_config = kwargs.get("generation_config") or self.generation_config
    mask = _real_tokens(input_ids, attention_mask, generation_config)
    rows = [input_ids[b][mask[b]].tolist() + control for b in range(input_ids.shape[0])]
    new_ids, new_mask = (t.to(input_ids.device) for t in pad_batch(rows, _pad_id(generation_config), left=True))
    output = _generate_with_reduction(self, new_ids, *args, attention_mask=new_mask, **kwargs)
    return with_caller_prompt(output, input_ids, new_ids.shape[1])


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _real_tokens(input_ids: torch.Tensor, attention_mask, generation_config) -> torch.Tensor:
    """Which positions of each row are prompt tokens: the mask's ones, or (no mask) every token but the pad token,
    as transformers infers the mask (a pad token that is also the end token counts as real)."""
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise TokenReductionError(f"tokenskip: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                                      f"{tuple(input_ids.shape)}")
        return attention_mask.bool()
    pad = _ids(getattr(generation_config, "pad_token_id", None))
    eos = _ids(getattr(generation_config, "eos_token_id", None))
    if pad and pad[0] not in eos:
        return input_ids.ne(pad[0])
    return torch.ones_like(input_ids, dtype=torch.bool)


def _pad_id(generation_config) -> int:
    for value in (getattr(generation_config, "pad_token_id", None), getattr(generation_config, "eos_token_id", None)):
        ids = _ids(value)
        if ids:
            return ids[0]
    return 0
