"""Wiring of ``ssm_prune`` (token pruning that keeps the scan order) into Mamba / Mamba-2 models.

Plain torch hooks on the blocks (``adapter.blocks(model)``), recorded in ``applied`` for ``remove()``:

* a forward pre-hook on every block: block 0 starts the call's record; the block before a pruning block
  remembers its input (for the ``"delta"`` and ``"clipped"`` scores); a pruning block scores the tokens, keeps the
  chosen ones in order (:func:`hf_tokred.methods.ssm.ssm_prune.select_tokens`) and hands the later blocks the
  shorter sequence and its attention mask (the kept tokens' mask; filler slots of short rows masked), which
  replaces the input-length mask the model hands every block;
* a forward hook on the last block puts the kept tokens' outputs back among the carried states of the pruned
  tokens, so the final norm and the LM head see the full sequence.

A block called with a cache (``cache_params``; ``cache`` from transformers 5.24) updates the cache's state with
the kept tokens' scan, which is what the later decoding steps continue from.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import Mamba2Config, Mamba2Model
    >>> cfg = Mamba2Config(vocab_size=64, hidden_size=16, state_size=8, num_hidden_layers=3, head_dim=8, num_heads=4,
    ...                    n_groups=1, chunk_size=8)
    >>> model = hf_tokred.apply(Mamba2Model(cfg).eval(), {"method": "ssm_prune", "keep": 0.5, "layers": [1]})
    >>> model(torch.randint(0, 64, (2, 10))).last_hidden_state.shape
    torch.Size([2, 10, 16])
    >>> last_pruning(model).kept.sum(1).tolist()
    [5, 5]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TokenReductionError, UnsupportedModelError
from .wiring import get_applied, register_wiring

STATE_ATTR = "_hf_tokred_ssm_prune"


class _PruneCall:
    """What the hooks of one pruned model know about the running forward pass."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.full: torch.Tensor | None = None  # (batch, n, d) carried states, original positions
        self.index: torch.Tensor | None = None  # (batch, k) original positions of the current tokens
        self.valid: torch.Tensor | None = None  # (batch, k) False at filler slots
        self.previous: torch.Tensor | None = None  # input of the block before a pruning block
        self.mask: torch.Tensor | None = None  # attention mask of the current (pruned) sequence
        self.input_length = 0
        self.batch = 0
        self.kept_per_block: dict[int, torch.Tensor] = {}


@dataclass
class PruneRecord:
    """What the last forward pass of a pruned model kept (see :func:`last_pruning`).

    Attributes:
        kept: ``(batch, n)`` bool over the input positions: True where the last block scanned the token (all
            True when the call pruned nothing).
        tokens_per_block: number of sequence slots each block ran on (filler slots of padded rows included).
    """

    kept: torch.Tensor
    tokens_per_block: list[int]


def _block_call(args, kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden, kwargs.get("attention_mask")


def _replace(args, kwargs, hidden, mask, mask_given):
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs = {**kwargs, "hidden_states": hidden}
    if mask_given or mask is not None:
        kwargs = {**kwargs, "attention_mask": mask}
    return args, kwargs


@register_wiring("ssm_prune")
def wire_ssm_prune(model, adapter, reducer, applied) -> None:
    """Attach ``ssm_prune`` to a Mamba / Mamba-2 model; every check runs before the first hook.

    Example:
        >>> model = hf_tokred.apply(mamba, {"method": "ssm_prune", "keep": 0.5, "layers": [12]})  # doctest: +SKIP
    """
    if adapter.kind != "ssm":
        raise UnsupportedModelError(f"ssm_prune acts on state-space models (Mamba, Mamba-2); {type(model).__name__} "
                                    f"is a {adapter.kind} model")
    blocks = adapter.blocks(model)
    if not blocks:
        raise UnsupportedModelError(f"ssm_prune: found no blocks ({adapter.layers}) in {type(model).__name__}")
    reducer.check_depth(len(blocks))
    prune_at = set(reducer.layers)
    record_at = {i - 1 for i in prune_at if i > 0} if reducer.score != "norm" else set()
    call = _PruneCall()
    setattr(model, STATE_ATTR, call)
    applied.add_undo(lambda: model.__dict__.pop(STATE_ATTR, None))
    if not prune_at:
        return

    def pre_hook(index):
        def hook(module, args, kwargs):
            hidden, mask = _block_call(args, kwargs)
            if module.training and getattr(module, "gradient_checkpointing", False) and torch.is_grad_enabled():
                # The recomputation in backward would run these hooks again on the call's changed state.
                raise TokenReductionError("ssm_prune does not support activation (gradient) checkpointing; call "
                                          "model.activation_checkpointing_disable() or train the dense model")
            if index == 0:
                call.reset()
                call.input_length, call.batch = hidden.shape[1], hidden.shape[0]
            call.kept_per_block[index] = hidden.shape[1]
            if call.full is not None:  # pruned earlier in this call: the model hands every block its input's mask
                mask = call.mask
            changed = None
            if index in prune_at and not getattr(reducer, "_dense", False) and hidden.shape[1] >= reducer.min_tokens:
                changed = _prune(call, reducer, hidden, mask, index)
            if index in record_at:
                call.previous = hidden if changed is None else changed[0]
            if changed is None:
                if call.full is None:
                    return None
                return _replace(args, kwargs, hidden, mask, "attention_mask" in kwargs)
            new_hidden, new_mask = changed
            call.kept_per_block[index] = new_hidden.shape[1]
            return _replace(args, kwargs, new_hidden, new_mask, "attention_mask" in kwargs)

        return hook

    def restore(module, args, kwargs, output):
        if call.full is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = _scatter(call.full.to(hidden.dtype), call.index, call.valid, hidden)
        call.full = call.previous = call.mask = None  # keep no activations past the call (the record keeps index)
        return (full, *output[1:]) if isinstance(output, tuple) else full

    handles = [blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(len(blocks))]
    handles.append(blocks[-1].register_forward_hook(restore, with_kwargs=True))
    for handle in handles:
        applied.add_undo(handle.remove)


def _scatter(full: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``full`` with the valid slots of ``hidden`` written at their original positions ``index`` (out of place)."""
    expanded = index.unsqueeze(-1).expand(-1, -1, full.shape[-1])
    current = full.gather(1, expanded)
    return full.scatter(1, expanded, torch.where(valid.unsqueeze(-1), hidden, current))


def _prune(call: _PruneCall, reducer, hidden: torch.Tensor, mask, block: int):
    from ..methods.ssm.ssm_prune import select_tokens, token_scores

    batch, n, _ = hidden.shape
    if mask is not None:
        if mask.dim() != 2 or mask.shape != (batch, n):
            raise TokenReductionError(f"ssm_prune: block {block} got an attention mask of shape {tuple(mask.shape)} "
                                      f"for {n} tokens; pass a (batch, tokens) mask of the input ids")
        valid = mask.to(torch.bool)
    else:
        valid = call.valid
    previous = call.previous if call.previous is not None and call.previous.shape == hidden.shape else None
    scores = token_scores(hidden, previous, reducer.score)
    chosen = select_tokens(scores, valid, reducer.keep, reducer.protect_first, reducer.protect_last)
    if chosen is None:
        return None
    if call.full is None:
        call.full = hidden
        call.index = torch.arange(n, device=hidden.device).expand(batch, n)
        call.valid = valid if valid is not None else torch.ones(batch, n, dtype=torch.bool, device=hidden.device)
    else:  # the tokens pruned here keep the state they reached
        call.full = _scatter(call.full.to(hidden.dtype), call.index, call.valid, hidden)
    call.index = call.index.gather(1, chosen.index)
    call.valid = chosen.valid
    kept = hidden.gather(1, chosen.index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    if mask is not None or chosen.padded:
        dtype = mask.dtype if mask is not None else torch.long
        new_mask = chosen.valid.to(dtype)
    else:
        new_mask = None
    call.mask = new_mask
    return kept, new_mask


def last_pruning(model) -> PruneRecord:
    """What the last forward pass of a model reduced with ``ssm_prune`` kept.

    Example:
        >>> record = last_pruning(model)                       # doctest: +SKIP
        >>> record.kept.sum(1), record.tokens_per_block        # doctest: +SKIP
        (tensor([6]), [12, 12, 6, 6])
    """
    call = model.__dict__.get(STATE_ATTR) if get_applied(model) is not None else None
    if call is None:
        raise TokenReductionError(f"last_pruning: {type(model).__name__} has no ssm_prune reduction attached "
                                  "(hf_tokred.apply(model, {'method': 'ssm_prune', ...}))")
    if call.input_length == 0:
        raise TokenReductionError("last_pruning: the model has not run a forward pass since ssm_prune was attached")
    tokens = [call.kept_per_block[i] for i in sorted(call.kept_per_block)]
    if call.index is None:
        return PruneRecord(kept=torch.ones(call.batch, call.input_length, dtype=torch.bool), tokens_per_block=tokens)
    batch = call.index.shape[0]
    kept = torch.zeros(batch, call.input_length, dtype=torch.bool, device=call.index.device)
    kept.scatter_(1, call.index, call.valid)
    return PruneRecord(kept=kept, tokens_per_block=tokens)
