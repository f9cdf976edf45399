"""Wiring of sequence reducers (stage ``"sequence"``, e.g. ToMe) into transformers encoders (ViT, BERT).

The sequence shrinks *between* blocks; nothing inside a block or its attention function changes shape.
For every block of the encoder (``adapter.blocks(model)``) we install:

* a forward **pre-hook** (``with_kwargs=True``). On the first block it resets the per-call state, reads
  the key-padding pattern from the mask the model built (and re-orders a left-padded batch so real
  tokens come first). On later blocks, once tokens have been merged, it replaces the attention mask the
  model passes to the block (positional argument 1 in ``ViTModel`` and ``BertEncoder`` of transformers
  5.23, built once by ``create_bidirectional_mask`` for the full length) with one for the current
  tokens: padding masked out, plus the proportional-attention bias ``log(size)`` when the reducer asks.
  Putting the bias into the block's arguments (rather than computing it inside the attention call)
  keeps it right when gradient checkpointing recomputes a block during the backward pass;
* an :class:`~hf_tokred.attention.AttentionObserver` on the block's attention module that keeps the
  keys averaged over heads (ToMe's similarity metric), detached, for the blocks that merge;
* a forward **hook** that merges the block's output with the reducer (``reducer.reduce_tokens``) and
  tracks each token's size (how many input tokens it stands for; 0 for padding).

Both hooks are prepended, so hooks registered before ``apply`` (and ``output_hidden_states``) see the
merged block outputs too.

Every handle and observer is recorded with ``applied.add_undo`` so ``hf_tokred.remove`` restores the
model exactly. After a forward pass, :func:`token_sizes` gives the size of every output token (use it
for size-weighted pooling of a reduced BERT's ``last_hidden_state``).

Example:
    >>> import hf_tokred, torch
    >>> from transformers import ViTConfig, ViTModel
    >>> vit = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
    ...                          num_attention_heads=4, intermediate_size=128)).eval()
    >>> _ = hf_tokred.apply(vit, {"method": "tome", "r": 4})
    >>> vit(torch.randn(1, 3, 32, 32)).last_hidden_state.shape[1]          # 65 - 4 * 4
    49
    >>> token_sizes(vit).sum().item()
    65.0
"""

from __future__ import annotations

import torch

from ..attention import AttentionObserver, add_observer, mask_keep, remove_observer
from ..errors import TokenReductionError, UnsupportedModelError
from .wiring import get_applied, register_wiring

STATE_ATTR = "_hf_tokred_sequence_state"

# Heads that predict one output per input token: merged (fewer, re-ordered) tokens make their outputs meaningless.
_PER_TOKEN_HEADS = (
    "ForMaskedLM",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMaskedImageModeling",
    "ForPreTraining",
    "LMHeadModel",
    "ForCausalLM",
)


class SequenceState:
    """Per-call state of one reduced encoder, shared by the hooks of all its blocks.

    Attributes (valid after a forward pass):
        size: ``(B, N, 1)`` float32 token sizes (0 for padding), or None before any merge in this call.
        valid: ``(B, N)`` bool real-token mask from the model's attention mask, or None without padding.
        token_counts: sequence length after each block of the last call.
    """

    def __init__(self, reducer, schedule: list[int], protected: int):
        self.reducer = reducer
        self.schedule = schedule
        self.protected = protected
        self.prop_attn = bool(getattr(reducer, "prop_attn", False))
        self.reset()

    def reset(self) -> None:
        """Forget everything about the previous call (run by the first block's pre-hook)."""
        self.size: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.mask_dtype: torch.dtype | None = None
        self.metric: torch.Tensor | None = None
        self.capture: int | None = None
        self.token_counts: list[int] = []

    def initial_size(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.valid is not None:
            return self.valid.to(torch.float32)[..., None]
        return torch.ones(*hidden.shape[:2], 1, dtype=torch.float32, device=hidden.device)

    def build_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The ``(B, 1, 1, N)`` attention mask for the current tokens: padding out, plus ``log(size)`` if asked."""
        size = self.size[..., 0]
        keep = size > 0 if self.valid is not None else None
        if self.prop_attn:
            bias = size.log()
            if keep is not None:
                bias = torch.where(keep, bias, torch.finfo(dtype).min)
            return bias.to(dtype)[:, None, None, :]
        if keep is None:
            return None
        keep = keep[:, None, None, :]
        if self.mask_dtype is None or self.mask_dtype == torch.bool:
            return keep
        zero = torch.zeros((), dtype=self.mask_dtype, device=keep.device)
        return torch.where(keep, zero, torch.finfo(self.mask_dtype).min)


class _KeyMetric(AttentionObserver):
    """Keeps the keys averaged over heads (ToMe's metric) of one block while that block is running."""

    def __init__(self, state: SequenceState, index: int):
        self.state = state
        self.index = index

    def observe(self, module, query, key, value, attention_mask) -> None:
        if self.state.capture == self.index:
            self.state.metric = key.detach().mean(dim=1)


def _hidden_and_mask(args, kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    return hidden, mask


def _with_hidden_and_mask(args, kwargs, hidden, mask):
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs = {**kwargs, "hidden_states": hidden}
    if len(args) > 1:
        args = (args[0], mask, *args[2:])
    else:
        kwargs = {**kwargs, "attention_mask": mask}
    return args, kwargs


def _key_padding(mask: torch.Tensor, batch: int, n: int) -> torch.Tensor | None:
    """Real-token mask ``(B, N)`` of a bidirectional padding mask, or None when every token is real."""
    keep = mask_keep(mask)
    if keep.dim() != 4 or keep.shape[-1] != n or keep.shape[-2] not in (1, n):
        raise TokenReductionError(
            f"sequence reduction expects a (batch, 1, {n}, {n}) attention mask, got {tuple(mask.shape)}"
        )
    keep = keep.expand(batch, -1, -1, -1)
    valid = keep.any(dim=-2).all(dim=1)
    consistent = (keep == valid[:, None, None, :]) | ~valid[:, None, : keep.shape[-2], None]
    if not bool(consistent.all()):
        raise TokenReductionError(
            "sequence reduction supports padding masks only (every real token sees every real token); "
            "the model's attention mask has another pattern"
        )
    return None if bool(valid.all()) else valid


def _attention_module(block, adapter, index):
    try:
        return block.get_submodule(adapter.attention)
    except AttributeError:
        raise UnsupportedModelError(
            f"block {index} ({type(block).__name__}) has no attention module at {adapter.attention!r} "
            f"(adapter {adapter.name})"
        ) from None


def _check_model(model, adapter, reducer) -> None:
    name = type(model).__name__
    for suffix in _PER_TOKEN_HEADS:
        if name.endswith(suffix):
            raise UnsupportedModelError(
                f"{reducer.method} merges tokens, so its output has fewer tokens than the input; {name} predicts one "
                f"output per input token and cannot use it. Use the base model or a pooled head "
                f"({', '.join(adapter.examples)})"
            )
    if getattr(model.config, "is_decoder", False):
        raise UnsupportedModelError(
            f"{reducer.method} acts on bidirectional encoders; {name} is configured as a decoder (is_decoder=True)"
        )
    for attr in ("schedule", "reduce_tokens"):
        if not callable(getattr(reducer, attr, None)):
            raise UnsupportedModelError(f"{reducer.method}: a sequence reducer must define {attr}()")


@register_wiring("sequence")
def wire_sequence_reducer(model, adapter, reducer, applied) -> None:
    """Install a sequence reducer (``reducer.schedule`` / ``reducer.reduce_tokens``) on every block of an encoder.

    Called by ``hf_tokred.apply`` for reducers of stage ``"sequence"``; all checks run before any hook is
    installed, and every hook is recorded in ``applied`` for ``remove()``.

    Example:
        >>> import hf_tokred
        >>> model = hf_tokred.apply(bert_model, {"method": "tome", "r": 2})   # doctest: +SKIP
    """
    _check_model(model, adapter, reducer)
    blocks = adapter.blocks(model)
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__}: no blocks found at {adapter.layers!r} (adapter {adapter.name})")
    schedule = reducer.schedule(len(blocks))
    attentions = [_attention_module(block, adapter, i) for i, block in enumerate(blocks)]

    state = SequenceState(reducer, schedule, adapter.protected_tokens)
    setattr(model, STATE_ATTR, state)
    applied.add_undo(lambda: model.__dict__.pop(STATE_ATTR, None))
    last = len(blocks) - 1

    def make_pre_hook(index):
        def pre_hook(module, args, kwargs):
            hidden, mask = _hidden_and_mask(args, kwargs)
            if index == 0:
                state.reset()
                state.mask_dtype = None if mask is None else mask.dtype
                if mask is not None:
                    state.valid = _key_padding(mask, hidden.shape[0], hidden.shape[1])
                if state.valid is not None and any(schedule):
                    hidden = _real_tokens_first(state, hidden)
            state.capture = index if schedule[index] > 0 else None
            if state.size is None:  # nothing merged or moved yet: the model's own mask is right
                return None
            return _with_hidden_and_mask(args, kwargs, hidden, state.build_mask(hidden.dtype))

        return pre_hook

    def make_hook(index):
        def hook(module, args, output):
            metric, state.metric, state.capture = state.metric, None, None
            hidden = output[0] if isinstance(output, tuple) else output
            changed = False
            if schedule[index] > 0:
                if metric is None:
                    raise TokenReductionError(
                        f"{reducer.method}: the attention of block {index} did not report its keys; the model's "
                        f"attention implementation is {model.config._attn_implementation!r}, hf_tokred needs "
                        "'hf_tokred_sdpa' or 'hf_tokred_eager' (set by hf_tokred.apply)"
                    )
                size = state.size if state.size is not None else state.initial_size(hidden)
                valid = size[..., 0] > 0 if state.valid is not None else None
                hidden, state.size = reducer.reduce_tokens(hidden, size, metric, schedule[index], state.protected, valid)
                changed = True
            state.token_counts.append(hidden.shape[1])
            if index == last and state.size is None:
                state.size = state.initial_size(hidden)
            if not changed:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    for index, (block, attention) in enumerate(zip(blocks, attentions)):
        pre = block.register_forward_pre_hook(make_pre_hook(index), with_kwargs=True, prepend=True)
        applied.add_undo(pre.remove)
        post = block.register_forward_hook(make_hook(index), prepend=True)
        applied.add_undo(post.remove)
        observer = _KeyMetric(state, index)
        add_observer(attention, observer)
        applied.add_undo(lambda attention=attention, observer=observer: remove_observer(attention, observer))


def _real_tokens_first(state: SequenceState, hidden: torch.Tensor) -> torch.Tensor:
    """Move padding after the real tokens (left-padded batches) so that rows split into A/B as when run alone."""
    valid = state.valid
    prefix = torch.arange(valid.shape[1], device=valid.device) < valid.sum(dim=1, keepdim=True)
    if torch.equal(prefix, valid):
        return hidden
    permutation = (~valid).to(torch.uint8).argsort(dim=1, stable=True)
    state.valid = prefix
    state.size = state.initial_size(hidden)
    return hidden.gather(1, permutation[..., None].expand(-1, -1, hidden.shape[-1]))


def token_sizes(model) -> torch.Tensor:
    """Sizes ``(B, N_out)`` of the output tokens of the last forward pass of a model reduced by a sequence reducer.

    A size counts the input tokens a merged token stands for (0 for padding); each row sums to its number of real
    input tokens. Use it for size-weighted pooling: ``(h * s[..., None]).sum(1) / s.sum(1, keepdim=True)``.

    Example:
        >>> out = model(**batch).last_hidden_state                               # doctest: +SKIP
        >>> s = token_sizes(model)                                               # doctest: +SKIP
        >>> pooled = (out * s[..., None]).sum(1) / s.sum(1, keepdim=True)        # doctest: +SKIP
    """
    state = model.__dict__.get(STATE_ATTR) if get_applied(model) is not None else None
    if state is None:
        raise TokenReductionError(f"token_sizes: {type(model).__name__} has no sequence reduction (e.g. tome) attached")
    if state.size is None:
        raise TokenReductionError("token_sizes: run a forward pass first")
    return state.size[..., 0]


__all__ = ["SequenceState", "token_sizes", "wire_sequence_reducer"]
