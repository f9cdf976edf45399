"""TokenSkip: controllable chain-of-thought compression (Xia et al., EMNLP 2025, arXiv 2502.12067).

TokenSkip teaches a causal LM to write *shorter* reasoning on request. Its training data are the model's own
step-by-step solutions, each compressed by token importance (LLMLingua-2) to a ratio ``gamma`` in
{0.5, ..., 0.9} (the final answer is never compressed; digits are always kept); every training example draws a
``gamma`` (1.0 = the uncompressed trace) and carries it as a control after the question. A LoRA fine-tuned on
these examples then follows the control at inference: the user picks ``ratio`` and the model's reasoning
shrinks accordingly.

Here the reduction is a config attached to the model like every other (``hf_tokred.apply``,
``from_pretrained(..., token_reduction=...)``) holding three things:

* ``ratio``, the compression the model is asked for, which must be one of ``ratios``, the ratios the
  adapter was trained with;
* ``control_ids``, the control token ids of every trained ratio (one list per entry of ``ratios``), stored in
  the config as data so that inference needs no tokenizer. :func:`build_controls` makes them from a tokenizer:
  ``eos + str(ratio) + eos``, the paper's ``<|eot_id|>γ<|eot_id|>`` with the model's own end token;
* the LoRA itself (``rank``, ``alpha``, ``target_modules``): a learned part, saved to
  ``token_reduction.safetensors``; ``model.safetensors`` keeps exactly the base model's weights under their
  own names, so a process without hf_tokred loads the plain base model from the same folder.

With the reduction attached, ``generate()`` (and so ``pipeline("text-generation")``) appends the control of
``ratio`` right after every row's prompt (the prompt as given, chat template and assistant header included)
and returns the caller's prompt ids followed by the new tokens, as a dense ``generate()`` does; the control
ids are not part of the returned sequences. See :mod:`hf_tokred.integration.tokenskip`.

The LoRA is peft's (``lora_A`` Kaiming-uniform, ``lora_B`` zeros, ``scaling = alpha / rank``, no dropout,
``delta = lora_B(lora_A(x)) * scaling`` added to the Linear's output; weights kept in float32 for a half-precision
model, as peft's default ``autocast_adapter_dtype``), run by forward hooks on the targeted ``nn.Linear``
layers instead of module replacement, so the base model's modules and state dict are untouched and ``remove()``
restores it exactly. :func:`export_peft_adapter` writes the adapter in peft's own format
(``adapter_config.json`` + ``adapter_model.safetensors``): ``peft.PeftModel.from_pretrained(base, folder)``
gives the same logits as the hooked model.

**No-op**: a fresh adapter (``lora_B`` is zero, as peft initialises it) and an empty control
(``control_ids=[]``) leave every output bit-identical to the dense model.

Train it with :func:`hf_tokred.training.train_tokenskip` (``hf-tokred train tokenskip``), which generates
arithmetic word problems with Python-checked step-by-step solutions, compresses them and fine-tunes the LoRA.

Where we depart from the paper:

* **traces**: the paper compresses the target model's own correct GSM8K/MATH solutions; we generate
  arithmetic word problems with step-by-step solutions written and checked by Python (the 135M models here
  solve too few GSM8K problems to filter), so the model learns both the task and its compression;
* **scorer**: LLMLingua-2 (``xlm-roberta-large-meetingbank``) in the paper; ours is the package's ``llmlingua2``
  when a classifier is given or found (``hf-tokred train llmlingua2``), else ``llmlingua`` scored by the
  embedded SmolLM2, both with digits, ``Step`` and ``=`` protected (the paper's
  ``force_tokens=['Step', ':'], force_reserve_digit=True``); each example is compressed at its own drawn
  ratio only (the paper compresses every trace at every ratio, then draws one);
* **control placement**: the paper puts ``<|eot_id|>γ<|eot_id|>`` after the question *inside* the user turn;
  we append ``eos γ eos`` after the whole prompt (after the assistant header of a chat template), so the
  control works with any prompt layout and needs no knowledge of the chat template;
* **LoRA**: rank 8, alpha 16 on every Linear layer of the decoder blocks (LLaMA-Factory's ``lora_target all``),
  as in the paper; no dropout (LLaMA-Factory's default is 0 too); learning rate and steps are the recipe's
  (the paper: 5e-5 for 3 epochs on 7.5k examples with 7B-14B models).

Example:
    >>> import hf_tokred
    >>> from hf_tokred.methods.nlp.tokenskip import build_controls
    >>> cfg = hf_tokred.TokenReductionConfig(method="tokenskip", ratio=0.6,
    ...                                      control_ids=build_controls(tokenizer))          # doctest: +SKIP
    >>> model = hf_tokred.apply(model, cfg)          # fresh LoRA: train it with train_tokenskip  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("smollm2-tokenskip")   # adapter + ratio re-attached  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from ...config import MAX_INT, param, register_method
from ...errors import ConfigError, UnsupportedModelError
from ..lora import LoRAConfig, LoRALayers

MODULE_NAME = "tokenskip"
# The ratios of the paper: gamma in {0.5, ..., 0.9}, and 1.0 for the uncompressed trace.
PAPER_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Two ratios closer than this are the same ratio (0.6 and 0.6000000001 from a JSON round trip).
RATIO_TOLERANCE = 1e-6


def build_controls(tokenizer, ratios=PAPER_RATIOS, template: str = "{eos}{ratio}{eos}") -> list[list[int]]:
    """The control token ids of every ratio: ``template`` formatted with the tokenizer's end token and the ratio.

    The default is the paper's ``<|eot_id|>γ<|eot_id|>`` with the model's own end token (SmolLM2's
    ``<|im_end|>0.6<|im_end|>``). The controls must differ between ratios (a tokenizer that maps every digit to
    its unknown token would make them equal): :class:`~hf_tokred.errors.ConfigError` otherwise.

    Example:
        >>> from hf_tokred.methods.nlp.tokenskip import build_controls
        >>> build_controls(tokenizer, [0.6, 1.0])                                  # doctest: +SKIP
        [[2, 32, 30, 38, 2], [2, 33, 30, 32, 2]]
    """
    eos = getattr(tokenizer, "eos_token", None)
    if "{eos}" in template and not eos:
        raise ConfigError("tokenizer: build_controls needs the tokenizer's eos_token for the template "
                          f"{template!r}; pass template= without '{{eos}}'", field="tokenizer")
    controls = []
    for ratio in ratios:
        text = template.format(eos=eos or "", ratio=float(ratio))
        controls.append([int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]])
    _check_controls(controls, [float(r) for r in ratios])
    return controls


def _check_controls(controls: list, ratios: list[float]) -> None:
    if not isinstance(controls, (list, tuple)):
        raise ConfigError(f"control_ids: expected a list of token-id lists (one per ratio), got "
                          f"{type(controls).__name__}", field="control_ids")
    if not controls:
        return
    if len(controls) != len(ratios):
        raise ConfigError(f"control_ids: expected one token-id list per ratio ({len(ratios)} for ratios "
                          f"{ratios}), got {len(controls)}", field="control_ids")
    seen: dict[tuple, float] = {}
    for i, (ids, ratio) in enumerate(zip(controls, ratios)):
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT for t in ids):
            raise ConfigError(f"control_ids[{i}]: expected a non-empty list of token ids (ints >= 0) for ratio "
                              f"{ratio}, got {ids!r}"[:200], field="control_ids")
        key = tuple(ids)
        if key in seen:
            raise ConfigError(f"control_ids: ratios {seen[key]} and {ratio} have the same control ids {list(key)}; "
                              "the model could not tell them apart (does the tokenizer know the digits?)",
                              field="control_ids")
        seen[key] = ratio


@register_method("tokenskip")
@dataclass(kw_only=True)
class TokenSkipConfig(LoRAConfig):
    """TokenSkip (arXiv 2502.12067): a LoRA that makes a causal LM's chain of thought shorter at a chosen ``ratio``.

    ``ratio`` is the compression asked for, one of ``ratios`` (the ratios the adapter was trained with);
    ``control_ids`` holds the control token ids of every trained ratio (see :func:`build_controls`; empty: no
    control, a plain LoRA); ``rank``, ``alpha`` and ``target_modules`` shape the LoRA. Where we depart from the
    paper: see :mod:`hf_tokred.methods.nlp.tokenskip`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="tokenskip", ratio=0.6, ratios=[0.6, 1.0],
        ...                            control_ids=[[2, 32, 30, 38, 2], [2, 33, 30, 32, 2]])
        >>> cfg.control(), cfg.rank, cfg.scaling
        ([2, 32, 30, 38, 2], 8, 2.0)
    """

    stage: ClassVar[str] = "prompt"  # it rewrites what the model is prompted with: one prompt reducer at a time
    wiring: ClassVar[str] = "tokenskip"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    learned: ClassVar[bool] = True
    paper: ClassVar[str] = "2502.12067"
    status: ClassVar[str] = "experimental"  # SmolLM2-135M on the CPU budget: see docs/nlp.md

    ratio: float = param(0.6, float, low=0.0, high=1.0, low_open=True,
                         help="the compression asked for: one of `ratios` (1.0 = the uncompressed reasoning)")
    ratios: list = param(list(PAPER_RATIOS), float, low=0.0, high=1.0, low_open=True, sequence=True,
                         help="the ratios the adapter was trained with (one control per ratio)")
    control_ids: list = field(default_factory=list, metadata={
        "help": "the control token ids of every ratio in `ratios` (a list of int lists, see build_controls), "
                "appended after the prompt; empty: no control (a plain LoRA)"})

    def validate(self) -> None:
        if not self.ratios:
            raise ConfigError("ratios: expected at least one ratio", field="ratios")
        for i, r in enumerate(self.ratios):
            if any(abs(r - other) < RATIO_TOLERANCE for other in self.ratios[:i]):
                raise ConfigError(f"ratios: {r} is listed twice in {self.ratios}", field="ratios")
        if self.ratio_index(self.ratio) is None:
            raise ConfigError(f"ratio: {self.ratio} is not one of the ratios the adapter was trained with "
                              f"({', '.join(str(r) for r in self.ratios)}); pick one of them", field="ratio")
        _check_controls(self.control_ids, list(self.ratios))
        self.control_ids = [[int(t) for t in ids] for ids in self.control_ids]
        super().validate()

    def ratio_index(self, ratio: float) -> int | None:
        """The index of ``ratio`` in ``ratios`` (None when the adapter was not trained with it)."""
        return next((i for i, r in enumerate(self.ratios) if abs(r - ratio) < RATIO_TOLERANCE), None)

    def control(self, ratio: float | None = None) -> list[int]:
        """The control token ids appended after the prompt for ``ratio`` (default ``self.ratio``); [] without controls.

        Example:
            >>> cfg = TokenReductionConfig(method="tokenskip", ratio=1.0, ratios=[0.5, 1.0], control_ids=[[7], [8]])
            >>> cfg.control(), cfg.control(0.5)
            ([8], [7])
        """
        ratio = self.ratio if ratio is None else ratio
        index = self.ratio_index(ratio)
        if index is None:
            raise ConfigError(f"ratio: {ratio} is not one of the trained ratios "
                              f"({', '.join(str(r) for r in self.ratios)})", field="ratio")
        return list(self.control_ids[index]) if self.control_ids else []

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The LoRA of every targeted Linear layer (see :class:`LoRALayers`), fresh (``lora_B`` zero).

        Checks, before anything is attached, that the model can generate, that every control id is in its
        vocabulary and that the targets exist. ``lora_A`` is drawn from a generator seeded with 0, so applying the
        reduction leaves the global random state alone (the recipe draws it again from its own seed).

        Example:
            >>> modules = cfg.learned_modules(model, adapter)        # doctest: +SKIP
            >>> list(modules)                                        # doctest: +SKIP
            ['tokenskip']
        """
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise UnsupportedModelError(
                f"tokenskip: {type(model).__name__} cannot generate; TokenSkip attaches to a causal LM "
                "(an ...ForCausalLM model) whose generate() writes the shortened reasoning")
        vocab = model.get_input_embeddings().num_embeddings
        for i, ids in enumerate(self.control_ids):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ConfigError(f"control_ids[{i}]: token id {bad[0]} is outside the vocabulary of "
                                  f"{type(model).__name__} ({vocab} tokens): the controls were built with another "
                                  "tokenizer", field="control_ids")
        return {MODULE_NAME: self.lora_layers(model, adapter)}


# ---------------------------------------------------------------------------------------------
# peft's format
# ---------------------------------------------------------------------------------------------

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def _attached(model) -> tuple[TokenSkipConfig, LoRALayers]:
    from ...integration.wiring import MODULES_ATTR, attached_reducer

    reducer = attached_reducer(model, "prompt", TokenSkipConfig, "hf_tokred.apply(model, {'method': 'tokenskip', ...})")
    return reducer, model._modules[MODULES_ATTR][MODULE_NAME]


def export_peft_adapter(model, folder) -> str:
    """Write the attached TokenSkip LoRA in peft's format to ``folder``; returns the folder.

    ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``, the exact module paths as
    ``target_modules``, no dropout) and ``adapter_model.safetensors`` (``base_model.model.<path>.lora_A.weight``...),
    so ``peft.PeftModel.from_pretrained(base_model, folder)`` adapts the dense model exactly as the hooks do. The
    control tokens are not part of a peft adapter: append ``cfg.control()`` to the prompt yourself.

    Example:
        >>> from hf_tokred.methods.nlp.tokenskip import export_peft_adapter
        >>> export_peft_adapter(model, "tokenskip-peft")                                     # doctest: +SKIP
        >>> peft_model = peft.PeftModel.from_pretrained(dense_model, "tokenskip-peft")       # doctest: +SKIP
    """
    from safetensors.torch import save_file

    reducer, lora = _attached(model)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": getattr(model, "name_or_path", None),
        "r": reducer.rank, "lora_alpha": reducer.alpha, "lora_dropout": 0.0, "target_modules": list(lora.paths),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "inference_mode": True,
    }
    with open(os.path.join(folder, PEFT_CONFIG_NAME), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    tensors = {}
    for path in lora.paths:
        layer = lora.lora(path)
        tensors[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    save_file(tensors, os.path.join(folder, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def tokenskip_lora(model) -> LoRALayers:
    """The :class:`LoRALayers` attached to ``model`` (``model.hf_tokred_modules["tokenskip"]``).

    Example:
        >>> sum(p.numel() for p in tokenskip_lora(model).parameters())                     # doctest: +SKIP
        2442240
    """
    return _attached(model)[1]


__all__ = ["TokenSkipConfig", "build_controls", "export_peft_adapter", "tokenskip_lora"]
