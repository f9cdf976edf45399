"""Wiring of MrT5's delete gate (``method="mrt5"``) into T5-family models, with hooks only.

What :func:`wire_delete_gate` installs (the T5 facts it relies on are in :mod:`hf_tokred.model_patches.t5`):

* a forward **pre-hook on the encoder stack** reads the call's 2-D attention mask and which tokens are
  ``</s>`` (protected), and a forward **hook** on it turns the stack's output into a :class:`MrT5EncoderOutput`
  carrying the mask of the returned tokens (``attention_mask``), their input positions (``kept_positions``) and
  the gate values (``delete_gate``);
* a forward **hook on encoder block** ``gate_layer - 1`` (the ``gate_layer``-th) runs the gate on the block's output. In training mode it
  adds ``G`` over the keys to the position bias the block returns, which T5's stack hands to every later block
  (soft deletion). In eval mode it packs each row's kept tokens to the left (hard deletion), returns the
  shortened hidden states and the relative position bias gathered at the kept tokens' original positions,
  and builds, with transformers' own ``create_bidirectional_mask``, the mask of the packed rows for the
  current attention implementation; **pre-hooks on the later blocks** hand them that mask instead of the one
  built for the input's length;
* for encoder-decoders, a forward **pre-hook on the model** replaces ``attention_mask`` by the mask carried by
  ``encoder_outputs`` when they are given (``generate()`` passes them at every step, expanded for beam search
  with everything else), and a **pre-hook on the decoder stack** gives the cross-attention the mask of the
  encoder output it receives (found by identity when the encoder ran inside this ``forward``). In training
  mode the soft gate also goes to the cross-attention, as the first decoder block's
  ``encoder_decoder_position_bias`` (the stack shares it with the later blocks). An encoder output of another
  length than the mask handed with it is refused with an error naming the fix.

Nothing runs when the reduction deletes nothing (``threshold == gate_scale``) but the output's extra fields:
outputs are bit-identical to the dense model. Every handle is undone by ``hf_tokred.remove``.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import T5Config, T5EncoderModel
    >>> model = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)).eval()
    >>> _ = hf_tokred.apply(model, {"method": "mrt5", "gate_layer": 1})
    >>> out = model(input_ids=torch.tensor([[72, 108, 108, 1]]))
    >>> type(out).__name__, out.attention_mask.tolist()      # a fresh gate keeps every token
    ('MrT5EncoderOutput', [[1, 1, 1, 1]])
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.utils import ModelOutput

from ..errors import TokenReductionError
from ..methods.nlp.mrt5 import MODULE_NAME, gather_position_bias, gather_tokens, keep_decisions, pack_kept
from .wiring import MODULES_ATTR, register_wiring

STATE_ATTR = "_hf_tokred_mrt5_state"


@dataclass
class MrT5EncoderOutput(BaseModelOutputWithPastAndCrossAttentions):
    """The output of an encoder reduced with ``mrt5``: transformers' encoder output plus three fields.

    Attributes (besides ``last_hidden_state`` and the others of ``BaseModelOutputWithPastAndCrossAttentions``):
        attention_mask: ``(B, Lk)``, 1 for the tokens ``last_hidden_state`` holds, 0 for padding slots (in the
            dtype of the input's mask, long without one). ``Lk`` is the longest row after deletion.
        kept_positions: ``(B, Lk)`` long, the input position of every returned token, -1 in padding slots.
        delete_gate: ``(B, L)`` the gate values ``G`` at the input's length (None when the gate did not run).

    It is a ``BaseModelOutput``, so ``T5ForConditionalGeneration(encoder_outputs=...)`` and ``generate()`` take it
    as it is; ``generate()`` expands its tensors for beam search like the others.

    Example:
        >>> out = model.get_encoder()(input_ids=ids, attention_mask=mask)      # doctest: +SKIP
        >>> out.last_hidden_state.shape[1] == out.attention_mask.shape[1]        # doctest: +SKIP
        True
    """

    attention_mask: torch.Tensor | None = None
    kept_positions: torch.LongTensor | None = None
    delete_gate: torch.FloatTensor | None = None


@dataclass
class _EncoderCall:
    """What one encoder call decided, between the stack's pre-hook and its hook."""

    input_mask: torch.Tensor | None
    valid: torch.Tensor | None
    protected: torch.Tensor | None
    gate: torch.Tensor | None = None
    index: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    block_mask: object = None


@dataclass
class _Record:
    """An encoder output the decoder may receive: its hidden states (weakly), their mask and the gate values."""

    hidden: weakref.ref
    mask: torch.Tensor
    gate: torch.Tensor | None
    shortened: bool

    def matches(self, hidden) -> bool:
        return hidden is not None and self.hidden() is hidden


def _get_arg(args, kwargs, name: str, index: int | None):
    if name in kwargs:
        return kwargs[name]
    if index is not None and index < len(args):
        return args[index]
    return None


def _set_arg(args, kwargs, name: str, index: int | None, value):
    if name in kwargs or index is None or index >= len(args):
        kwargs[name] = value
        return tuple(args), kwargs
    args = list(args)
    args[index] = value
    return tuple(args), kwargs


def _positional_index(fn, name: str) -> int | None:
    """Index of ``name`` among the positional parameters of a bound ``forward`` (None if keyword-only or absent)."""
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    return names.index(name) if name in names else None


class DeleteGateState:
    """The hooks of one reduced model and the state of its running call (``model._hf_tokred_mrt5_state``)."""

    def __init__(self, model, adapter, reducer, gate):
        self.reducer = reducer
        self.gate = gate
        self.adapter = adapter
        self.encoder = adapter.encoder_stack(model)
        eos = getattr(model.config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = torch.tensor([e for e in eos if isinstance(e, int)], dtype=torch.long)
        self.call: _EncoderCall | None = None
        self.last: _Record | None = None  # the encoder's latest output
        self.given: _Record | None = None  # encoder_outputs handed to the model's forward
        self.cross_bias: torch.Tensor | None = None
        forward = self.encoder.forward
        self.encoder_ids = _positional_index(forward, "input_ids")
        self.encoder_mask = _positional_index(forward, "attention_mask")
        self.block_mask = adapter.arg_index("attention_mask")
        self.block_cross_bias = adapter.arg_index("encoder_decoder_position_bias")
        self.block_encoder_hidden = adapter.arg_index("encoder_hidden_states")
        decoder = adapter.decoder_stack(model)
        self.decoder_hidden = None if decoder is None else _positional_index(decoder.forward, "encoder_hidden_states")
        self.decoder_mask = None if decoder is None else _positional_index(decoder.forward, "encoder_attention_mask")
        self.model_outputs = _positional_index(model.forward, "encoder_outputs")
        self.model_mask = _positional_index(model.forward, "attention_mask")

    # -- encoder -------------------------------------------------------------------------------

    def encoder_begin(self, module, args, kwargs):
        ids = _get_arg(args, kwargs, "input_ids", self.encoder_ids)
        mask = _get_arg(args, kwargs, "attention_mask", self.encoder_mask)
        if mask is not None and mask.dim() != 2:
            raise TokenReductionError(
                f"mrt5: the encoder's attention_mask must be 2-D (batch, tokens), got shape {tuple(mask.shape)}"
            )
        protected = None
        if isinstance(ids, torch.Tensor) and self.eos.numel():
            protected = torch.isin(ids, self.eos.to(ids.device))
        self.call = _EncoderCall(mask, None if mask is None else mask.bool(), protected)

    def after_gate_block(self, module, args, kwargs, output):
        call = self.call
        if call is None or self.reducer.deletes_nothing:
            return None
        hidden, position_bias = output[0], output[1]
        gate = self.gate(hidden)
        if call.protected is not None:
            # Protected tokens are never deleted, so their gate is 0. In training this makes </s> an attention sink
            # with a fixed logit bias: lowering every other token's G together then moves attention to </s> (and
            # costs loss) instead of changing nothing, as it would in a plain softmax (the paper's softmax1 plays
            # that part).
            gate = torch.where(call.protected, torch.zeros((), dtype=gate.dtype, device=gate.device), gate)
        call.gate = gate
        if module.training:  # soft deletion: G biases every later block's attention logits over the keys
            bias = position_bias + gate.to(position_bias.dtype)[:, None, None, :]
            return (hidden, bias, *output[2:])
        keep = keep_decisions(gate.detach(), self.reducer.threshold, call.valid, call.protected)
        real = call.valid if call.valid is not None else torch.ones_like(keep)
        if bool((keep == real).all()):
            return None  # nothing deleted: the model runs exactly as without the gate
        index, kept = pack_kept(keep)
        shortened = gather_tokens(hidden, index, kept)
        call.index, call.kept = index, kept
        call.block_mask = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=shortened,
                                                    attention_mask=kept)
        return (shortened, gather_position_bias(position_bias, index), *output[2:])

    def later_block(self, module, args, kwargs):
        call = self.call
        if call is None or call.index is None:
            return None
        return _set_arg(args, kwargs, "attention_mask", self.block_mask, call.block_mask)

    def encoder_end(self, module, args, kwargs, output):
        call, self.call = self.call, None
        if call is None or output is None:
            return None
        hidden = output[0]
        batch, length = hidden.shape[:2]
        dtype = call.input_mask.dtype if call.input_mask is not None else torch.long
        if call.index is not None:
            mask = call.kept.to(dtype)
            positions = torch.where(call.kept, call.index, -1)
        else:
            mask = call.input_mask if call.input_mask is not None else torch.ones(batch, length, dtype=dtype,
                                                                                  device=hidden.device)
            positions = torch.arange(length, device=hidden.device).expand(batch, length)
            if call.valid is not None:
                positions = torch.where(call.valid, positions, -1)
        self.last = _Record(weakref.ref(hidden), mask, call.gate, call.index is not None)
        if not isinstance(output, ModelOutput):
            return None  # return_dict=False: the decoder still finds the mask by the hidden states' identity
        return MrT5EncoderOutput(**dict(output), attention_mask=mask, kept_positions=positions, delete_gate=call.gate)

    # -- encoder-decoder -------------------------------------------------------------------------

    def model_begin(self, module, args, kwargs):
        given = _get_arg(args, kwargs, "encoder_outputs", self.model_outputs)
        mask = getattr(given, "attention_mask", None) if isinstance(given, ModelOutput) else None
        if mask is None:
            self.given = None
            return None
        gate = getattr(given, "delete_gate", None)
        shortened = gate is None or gate.shape[-1] != given[0].shape[1]
        self.given = _Record(weakref.ref(given[0]), mask, gate, shortened)
        return _set_arg(args, kwargs, "attention_mask", self.model_mask, mask)

    def model_end(self, module, args, kwargs, output):
        self.given = None
        self.last = None
        self.cross_bias = None
        return None

    def decoder_begin(self, module, args, kwargs):
        self.cross_bias = None
        hidden = _get_arg(args, kwargs, "encoder_hidden_states", self.decoder_hidden)
        if not isinstance(hidden, torch.Tensor):
            return None
        record = next((r for r in (self.given, self.last) if r is not None and r.matches(hidden)), None)
        if record is None:
            mask = _get_arg(args, kwargs, "encoder_attention_mask", self.decoder_mask)
            if isinstance(mask, torch.Tensor) and mask.shape[-1] != hidden.shape[1]:
                raise TokenReductionError(
                    f"mrt5: the decoder got an encoder output of {hidden.shape[1]} tokens with an attention mask of "
                    f"{mask.shape[-1]}: the delete gate shortened the encoder output, so pass the mask that came with "
                    "it (encoder_outputs.attention_mask, or hf_tokred.methods.nlp.mrt5.kept_mask(encoder_outputs)), "
                    "or pass the MrT5EncoderOutput itself as encoder_outputs="
                )
            return None
        if module.training and record.gate is not None and not record.shortened \
                and tuple(record.gate.shape) == tuple(hidden.shape[:2]):
            self.cross_bias = record.gate[:, None, None, :]
        return _set_arg(args, kwargs, "encoder_attention_mask", self.decoder_mask, record.mask)

    def decoder_first_block(self, module, args, kwargs):
        bias = self.cross_bias
        if bias is None or _get_arg(args, kwargs, "encoder_hidden_states", self.block_encoder_hidden) is None:
            return None
        if _get_arg(args, kwargs, "encoder_decoder_position_bias", self.block_cross_bias) is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        return _set_arg(args, kwargs, "encoder_decoder_position_bias", self.block_cross_bias, bias.to(hidden.dtype))

    def decoder_end(self, module, args, kwargs, output):
        self.cross_bias = None
        return None


@register_wiring("mrt5")
def wire_delete_gate(model, adapter, reducer, applied) -> None:
    """Attach MrT5's delete gate (``model.hf_tokred_modules["mrt5"]``) to a T5-family model (see the module docstring).

    Example:
        >>> hf_tokred.apply(model, {"method": "mrt5", "gate_layer": 3})      # calls this  # doctest: +SKIP
    """
    modules = model._modules.get(MODULES_ATTR)
    if modules is None or MODULE_NAME not in modules:
        raise TokenReductionError("mrt5: the model has no delete gate (model.hf_tokred_modules['mrt5']); attach the "
                                  "reduction with hf_tokred.apply or from_pretrained")
    state = DeleteGateState(model, adapter, reducer, modules[MODULE_NAME])
    model.__dict__[STATE_ATTR] = state
    applied.add_undo(lambda: model.__dict__.pop(STATE_ATTR, None))

    def add(handle):
        applied.add_undo(handle.remove)

    encoder = state.encoder
    add(encoder.register_forward_pre_hook(state.encoder_begin, with_kwargs=True))
    add(encoder.register_forward_hook(state.encoder_end, with_kwargs=True, always_call=True))
    blocks = adapter.encoder_blocks(model)
    add(blocks[reducer.gate_layer - 1].register_forward_hook(state.after_gate_block, with_kwargs=True))
    for block in blocks[reducer.gate_layer:]:
        add(block.register_forward_pre_hook(state.later_block, with_kwargs=True))
    decoder = adapter.decoder_stack(model)
    if decoder is None:
        return
    add(model.register_forward_pre_hook(state.model_begin, with_kwargs=True))
    add(model.register_forward_hook(state.model_end, with_kwargs=True, always_call=True))
    add(decoder.register_forward_pre_hook(state.decoder_begin, with_kwargs=True))
    add(decoder.register_forward_hook(state.decoder_end, with_kwargs=True, always_call=True))
    add(adapter.decoder_blocks(model)[0].register_forward_pre_hook(state.decoder_first_block, with_kwargs=True))
