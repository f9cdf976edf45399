"""T5-family encoder-decoders (kind ``"seq2seq"``): T5 and mT5, with ByT5 (a T5 on bytes) among them.

Covers ``T5ForConditionalGeneration``, ``T5Model`` and ``T5EncoderModel`` (model type ``t5``) and their mT5
twins (``mt5``, the same code). The encoder's blocks are ``encoder.block`` (``T5Block``), the decoder's
``decoder.block``; a block's self-attention is ``layer.0.SelfAttention`` (``T5Attention``, which calls
transformers' attention interface with the relative ``position_bias`` as a keyword).

What a sequence reducer of the encoder needs to know (transformers 5.23, ``T5Stack.forward``):

* the stack calls every block positionally, ``block(hidden, mask, position_bias, encoder_hidden,
  encoder_mask, encoder_decoder_position_bias, past_key_values=...)``; the indices are :attr:`T5Adapter.block_args`;
* the first block computes the relative position bias ``(1, heads, q, k)`` and returns it as its output's
  second item, and the stack hands that tensor to every later block (``position_bias = outputs[1]``), so a
  hook that changes a block's output ``[1]`` changes the bias of every later block;
* the mask (``create_bidirectional_mask``: None without padding, ``(B, 1, q, k)`` bool for SDPA or float for
  eager) is built once from the 2-D mask and passed unchanged to every block;
* ``T5ForConditionalGeneration``/``T5Model`` pass the *input's* 2-D ``attention_mask`` to the decoder as
  ``encoder_attention_mask``, from which the decoder stack builds its cross-attention mask.

UMT5 is not covered: each of its blocks computes its own relative bias from positions it derives itself.

Example:
    >>> from transformers import T5Config, T5EncoderModel
    >>> from hf_tokred.model_patches import find_adapter
    >>> model = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    >>> adapter = find_adapter(model)
    >>> adapter.kind, adapter.name, len(adapter.encoder_blocks(model))
    ('seq2seq', 't5', 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ModelAdapter, register_adapter


@dataclass(frozen=True)
class T5Adapter(ModelAdapter):
    """:class:`ModelAdapter` of a T5-family encoder-decoder (or its encoder alone).

    Attributes (besides those of :class:`ModelAdapter`):
        encoder: attribute path of the encoder stack (``"encoder"``).
        decoder: attribute path of the decoder stack (``"decoder"``; absent from ``T5EncoderModel``).
        stack_blocks: attribute of a stack holding its ``nn.ModuleList`` of blocks (``"block"``).
        block_args: positional index of each argument the stack passes to a block, by keyword name.
        supported_classes: model classes whose outputs keep their meaning when the encoder's output is shorter
            (the encoder alone, the bare encoder-decoder, the LM head). Heads that read the encoder's output per
            input token (token classification) are not among them.

    Example:
        >>> T5Adapter(name="demo", kind="seq2seq", match=("demo",)).arg_index("position_bias")
        2
    """

    encoder: str = "encoder"
    decoder: str = "decoder"
    stack_blocks: str = "block"
    block_args: tuple[tuple[str, int], ...] = (
        ("hidden_states", 0), ("attention_mask", 1), ("position_bias", 2), ("encoder_hidden_states", 3),
        ("encoder_attention_mask", 4), ("encoder_decoder_position_bias", 5),
    )
    supported_classes: tuple[str, ...] = ()

    def arg_index(self, name: str) -> int:
        """The positional index at which the stack passes ``name`` to a block."""
        return dict(self.block_args)[name]

    def encoder_stack(self, model: torch.nn.Module) -> torch.nn.Module:
        """The encoder stack (``model.encoder``)."""
        return model.get_submodule(self.encoder)

    def decoder_stack(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The decoder stack (``model.decoder``), or None for an encoder-only model."""
        try:
            return model.get_submodule(self.decoder)
        except AttributeError:
            return None

    def encoder_blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The encoder's blocks, in order."""
        return self.encoder_stack(model).get_submodule(self.stack_blocks)

    def decoder_blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList | None:
        """The decoder's blocks, or None for an encoder-only model."""
        stack = self.decoder_stack(model)
        return None if stack is None else stack.get_submodule(self.stack_blocks)


_CLASSES = ("T5EncoderModel", "T5Model", "T5ForConditionalGeneration")

register_adapter(T5Adapter(
    name="t5", kind="seq2seq", match=("t5",), layers="block", attention="layer.0.SelfAttention",
    supported_classes=_CLASSES, examples=_CLASSES,
))
register_adapter(T5Adapter(
    name="mt5", kind="seq2seq", match=("mt5",), layers="block", attention="layer.0.SelfAttention",
    supported_classes=tuple(c.replace("T5", "MT5", 1) for c in _CLASSES),
    examples=tuple(c.replace("T5", "MT5", 1) for c in _CLASSES),
))
