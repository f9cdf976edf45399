"""ICAE: the In-context Autoencoder (Ge et al., ICLR 2024, arXiv 2307.06945).

ICAE compresses a context into a few *memory slots* that the frozen language model reads in place of the
context. The **encoder** is the same language model with a LoRA: the context followed by ``m`` learned
*memory-token* embeddings goes through it, and the last layer's hidden states (after the final norm) at the ``m``
memory positions are the slots. The **decoder** is the frozen model without the LoRA: it reads the slots as input
embeddings, so a question asked after them is answered from the slots alone. ICAE is pretrained with two
objectives on plain text, both through the frozen decoder:

* **autoencoding** (AE): the decoder, given ``[slots, <AE>]`` (``<AE>`` a learned embedding), reconstructs the
  context, teacher-forced;
* **language modelling** (LM): the decoder, given the slots, continues the text after the context.

Only the LoRA, the ``m`` memory-token embeddings and the ``<AE>`` embedding are trained (about 1% of the model);
they are this reduction's learned part, saved to ``token_reduction.safetensors``.

**Slot form** (``slot_form``). The paper's decoder reads the slots as *input embeddings*: the encoder's last-layer
hidden states at the memory positions (``slot_form="hidden"``). By default (``slot_form="kv"``) the decoder reads
the encoder's *keys and values* at the memory positions in every layer instead, as 500xCompressor (Li et al.,
arXiv 2408.03094) does: the slots are then cache entries from the start, the decoder needs no pass over them, and
the pathway starts where the frozen decoder already reads well (the keys and values of the context itself, which it
copies from at 0.96 token accuracy), whereas hidden states given as embeddings are outside anything SmolLM2 was
trained to read (uncompressed, they give 0.000: ``docs/learned_lm.md``). In the ``kv`` form the encoder runs each
chunk at positions that put its memory tokens where their slots sit in the decoder (RoPE attention depends only on
relative positions, so the encoder's result is unchanged and the keys come out rotated for the decoder).

Here the reduction is a config attached like every other (``hf_tokred.apply``, ``from_pretrained``) with stage
``"context"``: plain ``forward``/``generate`` stay exactly the dense model's (the LoRA is switched on only inside
:func:`hf_tokred.compress_context`), and ``compress_context(model, context_ids, attention_mask)`` returns a
:class:`~hf_tokred.integration.wiring.CompressedContext` whose cache is the decoder's KV of the slots (``m``
entries per layer and chunk) and whose ``prefix_ids`` are as many placeholder ids. See
:mod:`hf_tokred.integration.icae`.

**Chunks.** The slots are trained for contexts of at most ``chunk_tokens`` tokens (``memory_slots`` slots each,
a compression ``ratio = chunk_tokens / memory_slots``). A longer context is cut into ``n = ceil(L / chunk_tokens)``
chunks of equal length (within one token), each encoded on its own (positions from 0) into its own
``memory_slots`` slots, and the slots are concatenated in order: ``n * memory_slots`` cache entries. This is the
paper's multi-span handling (ICAE v2 encodes a long input as 512-token spans, 128 slots each); e.g. with the
defaults (128 tokens -> 32 slots) a 512-token context becomes 4 chunks and 128 slots.

The LoRA is peft's LoRA (:mod:`hf_tokred.methods.lora`: ``lora_B(lora_A(x)) * alpha / rank`` added to each
targeted Linear layer's output) run by forward hooks that exist only while encoding; :func:`export_peft_adapter`
writes it in peft's format, and ``peft.PeftModel.from_pretrained(base, folder)`` then encodes to the same slots.

Where we depart from the paper:

* **scale**: the paper trains Llama-7B / Mistral-7B (LoRA rank 128-512 on ``q_proj``/``v_proj``, 512-token
  spans -> 128 slots, pretraining on the Pile for many GPU-days, then instruction fine-tuning on PwC). We train
  SmolLM2-135M-Instruct on an hour of CPU: LoRA rank 16 on the four attention projections by default (the
  paper's ``q_proj``/``v_proj`` with ``target_modules``; in the ``kv`` form the key and value projections write the
  slots themselves, and the four did better on validation text, ``docs/learned_lm.md``), 128-token
  chunks -> 32 slots (the same 4x ratio), the package's standard-library text (``lm_data``), a few hundred
  steps, and **no instruction fine-tuning**: so asking questions about the slots (passkey) relies on the
  pretraining alone. The training budget is recorded in the model card and ``docs/learned_lm.md``;
* **AE / LM mix**: the paper draws AE or LM per example; the recipe does the same with ``lm_ratio`` (default
  0.5), the LM continuation being the next ``chunk_tokens`` tokens of the same text window;
* **memory embeddings**: initialised as the mean input embedding plus small noise (the paper's are random);
* **inference** reuses the slots' KV (computed once) for every question, instead of feeding the slots again as
  ``inputs_embeds`` with each prompt (the result is the same: the slots sit at positions ``0..n*m-1`` and the
  question after them, as in training);
* **slot form**: ``kv`` by default (500xCompressor's), above; ``slot_form="hidden", target_modules=["q_proj",
  "v_proj"]`` is the paper's. In the ``kv``
  form no logits come from the slots, so the LM objective predicts the continuation from its second token on.

Example:
    >>> import hf_tokred, torch
    >>> model = hf_tokred.apply(model, {"method": "icae", "memory_slots": 32, "chunk_tokens": 128})   # doctest: +SKIP
    >>> ctx = hf_tokred.compress_context(model, context_ids)          # 512 tokens -> 128 slots       # doctest: +SKIP
    >>> out = model.generate(torch.cat([ctx.prefix_ids, question_ids], -1), past_key_values=ctx.fresh_cache(),
    ...                      max_new_tokens=20)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError
from ..lora import TARGETS_HELP, LoRAConfig, LoRALayers, lora_targets

MODULE_NAME = "icae"
# The paper's LoraConfig leaves the targets unset (peft's default for Llama/Mistral: q_proj, v_proj). Ours: in the
# kv slot form the key and value projections write the slots themselves; on validation windows the
# four attention projections gave 0.453 reconstruction after 300 steps against q/v's 0.419 (floor 0.372).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# What the decoder reads of the encoder at the memory positions: every layer's keys and values (500xCompressor),
# or the last layer's hidden states fed as input embeddings (the paper's).
SLOT_FORMS = ("kv", "hidden")


class ICAEParts(nn.Module):
    """ICAE's learned part: the encoder's LoRA (``lora``), the memory-token embeddings (``memory``, ``(m, hidden)``)
    and the ``<AE>`` embedding (``ae``, ``(1, hidden)``) that asks the decoder to reconstruct.

    The embeddings start as the model's mean input embedding plus noise (std 0.02 of its norm), drawn from a
    generator seeded with ``seed``; the LoRA starts as peft's (``lora_B`` zero).

    Example:
        >>> parts = ICAEParts(lora_targets(model, adapter, ["q_proj"]), embedding, 32, 16, 32.0)   # doctest: +SKIP
        >>> parts.memory.shape                                                                     # doctest: +SKIP
        torch.Size([32, 576])
    """

    def __init__(self, targets: dict[str, nn.Linear], embedding: nn.Embedding, memory_slots: int, rank: int,
                 scaling: float, seed: int = 0):
        super().__init__()
        self.lora = LoRALayers(targets, rank, scaling, seed=seed)
        weight = embedding.weight.detach()
        dtype = weight.dtype if weight.is_floating_point() and weight.element_size() >= 4 else torch.float32
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        self.memory = nn.Parameter(torch.zeros(memory_slots, weight.shape[1], dtype=dtype, device=device))
        self.ae = nn.Parameter(torch.zeros(1, weight.shape[1], dtype=dtype, device=device))
        if weight.device.type != "meta":
            self.reset_embeddings(weight, seed)

    def reset_embeddings(self, weight: torch.Tensor, seed: int = 0) -> None:
        """Mean input embedding plus noise for the memory tokens and ``<AE>`` (seeded)."""
        generator = torch.Generator().manual_seed(seed)
        mean = weight.float().mean(0)
        scale = 0.02 * float(weight.float().norm(dim=1).mean())
        with torch.no_grad():
            for p in (self.memory, self.ae):
                noise = torch.randn(p.shape, generator=generator) * scale / math.sqrt(p.shape[1])
                p.copy_((mean + noise).to(p.dtype))


@register_method("icae")
@dataclass(kw_only=True)
class ICAEConfig(LoRAConfig):
    """ICAE (arXiv 2307.06945): a LoRA encoder compresses each ``chunk_tokens``-token chunk of a context into
    ``memory_slots`` memory slots read by the frozen model. Where we depart from the paper: see
    :mod:`hf_tokred.methods.lm.icae`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="icae", memory_slots=32, chunk_tokens=128)
        >>> cfg.ratio, cfg.slots_for(512), cfg.chunk_lengths(300)
        (4.0, 128, [100, 100, 100])
    """

    stage: ClassVar[str] = "context"
    wiring: ClassVar[str] = "icae"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    learned: ClassVar[bool] = True
    paper: ClassVar[str] = "2307.06945"
    status: ClassVar[str] = "experimental"  # SmolLM2-135M on a CPU budget: see docs/learned_lm.md

    memory_slots: int = param(32, int, low=1, high=65536,
                              help="memory slots per chunk (the paper: 128 per 512-token span)")
    chunk_tokens: int = param(128, int, low=1, high=1 << 20,
                              help="most context tokens per chunk; a longer context is cut into equal chunks, each "
                                   "compressed into its own memory_slots slots")
    rank: int = param(16, int, low=1, high=4096, help="LoRA rank r of the encoder")
    alpha: float = param(32.0, float, low=0.0, high=1e6, low_open=True, help="LoRA alpha; scaling = alpha / rank")
    target_modules: list = param(list(DEFAULT_TARGETS), str, sequence=True,
                                 help=TARGETS_HELP)
    slot_form: str = param("kv", str, choices=SLOT_FORMS,
                           help="what the decoder reads at the memory positions: kv (the encoder's keys and values "
                                "in every layer, 500xCompressor) or hidden (the last layer's hidden states as input "
                                "embeddings, the paper's)")

    def validate(self) -> None:
        if self.memory_slots > self.chunk_tokens:
            raise ConfigError(f"memory_slots: {self.memory_slots} slots for chunks of {self.chunk_tokens} tokens "
                              "would expand the context; use at most chunk_tokens slots", field="memory_slots")
        super().validate()

    @property
    def ratio(self) -> float:
        """The compression of a full chunk: ``chunk_tokens / memory_slots``."""
        return self.chunk_tokens / self.memory_slots

    def chunk_lengths(self, length: int) -> list[int]:
        """How a context of ``length`` tokens is cut: ``ceil(length / chunk_tokens)`` chunks of equal length (the
        first ones one token longer when it does not divide)."""
        if length < 1:
            raise TokenReductionError(f"icae: a context needs at least one token to compress, got {length}")
        n = -(-length // self.chunk_tokens)
        base, extra = divmod(length, n)
        return [base + 1] * extra + [base] * (n - extra)

    def slots_for(self, length: int) -> int:
        """Memory slots (cache entries) for a context of ``length`` tokens."""
        return len(self.chunk_lengths(length)) * self.memory_slots

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """ICAE's learned part (:class:`ICAEParts`), fresh: LoRA ``lora_B`` zero, embeddings from the model's mean
        embedding (seeded, so the global random state is left alone).

        Example:
            >>> list(cfg.learned_modules(model, adapter))        # doctest: +SKIP
            ['icae']
        """
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise UnsupportedModelError(f"icae: {type(model).__name__} cannot generate; ICAE attaches to a causal LM "
                                        "(an ...ForCausalLM model) that decodes from the memory slots")
        embedding = model.get_input_embeddings()
        if not isinstance(embedding, nn.Embedding):
            raise UnsupportedModelError(f"icae: {type(model).__name__}'s input embeddings are no nn.Embedding")
        targets = lora_targets(model, adapter, self.target_modules, method=self.method_key)
        return {MODULE_NAME: ICAEParts(targets, embedding, self.memory_slots, self.rank, self.scaling)}


# ---------------------------------------------------------------------------------------------
# plain tensor functions (the encoder's inputs, the training objectives)
# ---------------------------------------------------------------------------------------------


def encoder_inputs(embeds: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor):
    """The encoder's inputs for a batch of (left- or right-padded) chunks: each row's real tokens, left-padded,
    then the memory tokens. Returns ``(inputs_embeds, attention_mask, position_ids)``; the memory tokens are the
    last ``m`` positions of every row, at positions ``L_b .. L_b + m - 1`` (``L_b`` the row's real tokens).

    Example:
        >>> e, m, p = encoder_inputs(torch.ones(2, 3, 4), torch.tensor([[1, 1, 1], [0, 1, 1]]), torch.zeros(2, 4))
        >>> e.shape, m.tolist(), p.tolist()
        (torch.Size([2, 5, 4]), [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])
    """
    batch, length, hidden = embeds.shape
    mask = mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise TokenReductionError("icae: a row of the context has no tokens (attention_mask all 0)")
    # left-align: stable sort puts padding first, real tokens in order after it
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
    tokens = torch.gather(embeds, 1, order.unsqueeze(-1).expand(-1, -1, hidden))
    token_mask = torch.gather(mask, 1, order)
    m = memory.shape[0]
    inputs = torch.cat([tokens, memory.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)], 1)
    attention = torch.cat([token_mask, torch.ones(batch, m, dtype=torch.bool, device=mask.device)], 1)
    positions = (attention.long().cumsum(1) - 1).clamp(min=0)
    return inputs, attention.long(), positions


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of ``targets`` equal to the argmax of ``logits`` (``(..., vocab)`` against ``(...)``)."""
    return float((logits.argmax(-1) == targets).float().mean())


# ---------------------------------------------------------------------------------------------
# peft's format
# ---------------------------------------------------------------------------------------------

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def export_peft_adapter(model, folder: str) -> str:
    """Write the encoder's LoRA of a model with ICAE attached in peft's format (``adapter_config.json`` +
    ``adapter_model.safetensors``): ``peft.PeftModel.from_pretrained(base, folder)`` is then the encoder
    (its ``hidden_states`` at the memory positions are the same slots). The memory embeddings are not part of a
    peft adapter; they stay in ``token_reduction.safetensors``.

    Example:
        >>> export_peft_adapter(model, "icae-encoder-lora")          # doctest: +SKIP
        'icae-encoder-lora'
    """
    from safetensors.torch import save_file

    from ...integration.wiring import MODULES_ATTR, get_applied

    applied = get_applied(model)
    cfg = applied.config.get("context") if applied is not None else None
    if cfg is None or cfg.method_key != "icae":
        raise TokenReductionError("export_peft_adapter: the model has no icae reduction attached")
    parts = model._modules[MODULES_ATTR][MODULE_NAME]
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for path in parts.lora.paths:
        lora = parts.lora.lora(path)
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora.lora_A.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora.lora_B.weight.detach().cpu().contiguous()
    save_file(tensors, os.path.join(folder, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": list(parts.lora.paths), "fan_in_fan_out": False,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "inference_mode": True,
              "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None}
    with open(os.path.join(folder, PEFT_CONFIG_NAME), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)
    return folder


__all__ = ["ICAEConfig", "ICAEParts", "encoder_inputs", "export_peft_adapter", "token_accuracy"]
