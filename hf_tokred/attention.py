"""The reduction-aware attention functions.

``hf_tokred_sdpa`` and ``hf_tokred_eager`` are registered with transformers' ``AttentionInterface``
*and* ``AttentionMaskInterface`` (without the mask entry transformers builds no padding mask for an
unknown implementation and padded batches silently go wrong). Each delegates to the stock function
(``sdpa_attention_forward``, or the model's own ``eager_attention_forward``) and returns exactly its
output. Only when a reducer has attached an :class:`AttentionObserver` to the attention module does
anything else happen: observers may adjust the mask before the call (a KV cache whose stored slots no
longer map to contiguous positions; ToMe's proportional-attention bias) and see the post-RoPE queries
and keys after it (to score tokens). With no observer the result is bit-identical to plain SDPA.

Example:
    >>> import hf_tokred
    >>> from transformers import AttentionInterface
    >>> "hf_tokred_sdpa" in AttentionInterface._global_mapping
    True
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .errors import UnsupportedModelError

HF_TOKRED_SDPA = "hf_tokred_sdpa"
HF_TOKRED_EAGER = "hf_tokred_eager"
# stock implementation -> our wrapper of it
REDUCED_IMPLEMENTATIONS = {"sdpa": HF_TOKRED_SDPA, "eager": HF_TOKRED_EAGER}
STOCK_IMPLEMENTATIONS = {v: k for k, v in REDUCED_IMPLEMENTATIONS.items()}

_OBSERVERS = "_hf_tokred_observers"
# Transient observers belong to the call that set them, not to the module: two threads generating with
# one model each bind their own cache's layer, so the pending observer of each attention module is kept
# per thread (and weakly, so a module that is gone leaves nothing behind).
_TRANSIENT = threading.local()


def _pending_transient() -> weakref.WeakKeyDictionary:
    pending = getattr(_TRANSIENT, "observers", None)
    if pending is None:
        pending = _TRANSIENT.observers = weakref.WeakKeyDictionary()
    return pending


class AttentionObserver:
    """Something that wants to bias or watch one attention module's calls.

    Override either method. ``prepare`` returns the (possibly new) attention mask handed to the stock
    function; ``observe`` sees the call's inputs after it ran. Queries are ``(batch, heads, q, dim)``,
    keys/values ``(batch, kv_heads, kv, dim)`` (GQA not expanded), post-RoPE.

    Example:
        >>> class CountCalls(AttentionObserver):
        ...     calls = 0
        ...     def observe(self, module, query, key, value, attention_mask):
        ...         self.calls += 1
    """

    def prepare(self, module, query, key, value, attention_mask):
        return attention_mask

    def observe(self, module, query, key, value, attention_mask) -> None:
        return None


def add_observer(module: torch.nn.Module, observer: AttentionObserver) -> None:
    """Attach a persistent observer to an attention module (kept until :func:`remove_observer`)."""
    module.__dict__[_OBSERVERS] = (*module.__dict__.get(_OBSERVERS, ()), observer)


def remove_observer(module: torch.nn.Module, observer: AttentionObserver) -> None:
    """Detach an observer added by :func:`add_observer`; a no-op if it is not attached."""
    remaining = tuple(o for o in module.__dict__.get(_OBSERVERS, ()) if o is not observer)
    if remaining:
        module.__dict__[_OBSERVERS] = remaining
    else:
        module.__dict__.pop(_OBSERVERS, None)


def set_transient_observer(module: torch.nn.Module, observer: AttentionObserver) -> None:
    """Attach an observer for this thread's next call of ``module`` only (a KV-cache layer binds itself on every ``update``).

    The binding is per thread, so threads sharing a model each reach their own observer.
    """
    _pending_transient()[module] = observer


def _eager_function(module):
    # The model's own eager attention, found in the module that defines its attention class, so that
    # eager outputs stay exactly the model's.
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}; "
            f"use attn_implementation='sdpa' with hf_tokred"
        )
    return fn


def _make_attention(stock: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        base = sdpa_attention_forward if stock == "sdpa" else _eager_function(module)
        transient = _pending_transient().pop(module, None)
        observers = module.__dict__.get(_OBSERVERS, ())
        if transient is None and not observers:
            return base(module, query, key, value, attention_mask, **kwargs)
        active = (*observers, transient) if transient is not None else observers
        for observer in active:
            attention_mask = observer.prepare(module, query, key, value, attention_mask)
        output = base(module, query, key, value, attention_mask, **kwargs)
        for observer in active:
            observer.observe(module, query, key, value, attention_mask)
        return output

    attention.__name__ = f"hf_tokred_{stock}_attention"
    attention.__doc__ = f"Reduction-aware wrapper of transformers' {stock} attention (see hf_tokred.attention)."
    return attention


hf_tokred_sdpa_attention = _make_attention("sdpa")
hf_tokred_eager_attention = _make_attention("eager")


def register() -> None:
    """Register both functions and their mask builders (idempotent; run by ``import hf_tokred``)."""
    AttentionInterface.register(HF_TOKRED_SDPA, hf_tokred_sdpa_attention)
    AttentionInterface.register(HF_TOKRED_EAGER, hf_tokred_eager_attention)
    AttentionMaskInterface.register(HF_TOKRED_SDPA, sdpa_mask)
    AttentionMaskInterface.register(HF_TOKRED_EAGER, eager_mask)


def mask_keep(mask: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" view of a bool (SDPA) or additive float (eager) attention mask."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def mask_like(keep: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """Turn a boolean keep-mask into the representation ``reference`` uses (bool, or additive float)."""
    if reference is None or reference.dtype == torch.bool:
        return keep
    zero = torch.zeros((), dtype=reference.dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(reference.dtype).min)
