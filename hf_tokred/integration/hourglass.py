"""Wiring of ``token_pooling``: an hourglass on the layers of a transformers decoder, with hooks only.

:func:`wire_token_pooling` (registered as the ``"token_pooling"`` wiring) installs plain torch hooks found through
the decoder adapter (``adapter.blocks``), never a copied ``forward``:

* a forward pre-hook on the decoder's base model (the module holding the layer list) opens a *pass* (per thread):
  it records the call's ``input_ids`` and 2-D ``attention_mask`` (which tokens are padding), turns the default
  ``use_cache`` off and refuses a KV cache (see below);
* a forward pre-hook on the first pooled layer computes each row's boundaries (the learned predictor on the hidden
  states, or the whitespace ids), the segments (:func:`~hf_tokred.methods.nlp.token_pooling.pooling_plan`) and the
  mean-pooled hidden states, which replace the layer's input;
* a forward pre-hook on every pooled layer gives it the pooled versions of its per-token arguments: the
  ``attention_mask`` (rows and columns of each segment's last token; a tensor, None, or a dict of them),
  ``position_embeddings`` ``(cos, sin)`` and ``position_ids`` at each segment's last token;
* a forward hook on the last pooled layer upsamples: every token gets the full-resolution hidden state it had
  before pooling plus the middle layers' update of the last segment that ended at or before it, so the later layers
  run at full length with the model's own mask and positions.

A batch whose every real token ends its own segment runs the dense layers unchanged (bit-identical); so do
``pre_layers + post_layers == depth`` and ``boundary_rate == 1`` (nothing is installed).

KV cache: a segment grows as tokens arrive, so the pooled layers' keys of earlier steps change, and a KV cache of
them would be wrong. While the reduction is attached, a call that does not say ``use_cache`` runs without a cache,
``generate()`` recomputes the sequence at every step (``use_cache=False``: exact, and what the paper does), and an
explicit ``use_cache=True`` or a cache is a :class:`~hf_tokred.errors.TokenReductionError`.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300)).eval()
    >>> model = hf_tokred.apply(model, {"method": "token_pooling", "boundaries": "whitespace", "pre_layers": 1,
    ...                                 "post_layers": 1, "boundary_token_ids": [32]})
    >>> ids = torch.tensor([list(b"the cat sat on it")])
    >>> model(ids).logits.shape, hf_tokred.integration.hourglass.last_pooling(model).counts.tolist()
    (torch.Size([1, 17, 300]), [4])
"""

from __future__ import annotations

import inspect
import threading
import types
from dataclasses import dataclass, field

import torch

from ..attention import STOCK_IMPLEMENTATIONS, mask_keep, mask_like
from ..compat import CACHE_KWARGS, cache_in
from ..errors import ConfigError, TokenReductionError, UnsupportedModelError
from ..methods.nlp.token_pooling import (
    MODULE_NAME,
    PoolingPlan,
    TokenPoolingConfig,
    binomial_prior_loss,
    gumbel_sigmoid_boundaries,
    pooling_plan,
    whitespace_boundaries,
)
from .wiring import MODULES_ATTR, register_wiring

HOURGLASS_ATTR = "_hf_tokred_hourglass"
# Layer arguments the pooled layers get in pooled form; any other per-token tensor is refused.
_HANDLED = ("hidden_states", "attention_mask", "position_embeddings", "position_ids", *CACHE_KWARGS, "use_cache")
_NO_CACHE = ("token_pooling: the pooled middle layers cannot use a KV cache (a segment grows as tokens arrive, so "
             "their keys for earlier tokens change); call the model with use_cache=False (the default while the "
             "reduction is attached) -- generate() then recomputes the sequence at every step, exactly -- or "
             "hf_tokred.remove(model) for the dense model")


@dataclass
class PoolingRecord:
    """What the last forward pass pooled (``last_pooling(model)``).

    Attributes:
        boundaries: ``(B, L)`` the 0/1 boundaries used (straight-through in training: carries gradients).
        real: ``(B, L)`` real (non-padding) tokens.
        counts: ``(B,)`` complete segments per row.
        logits: ``(B, L)`` the predictor's boundary logits (None for whitespace boundaries).
        rate: the config's ``boundary_rate`` (the prior).
    """

    boundaries: torch.Tensor
    real: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor | None
    rate: float

    @property
    def shorten_factor(self) -> float:
        """Real tokens per complete segment over the batch (the measured shortening of the middle layers)."""
        return float(self.real.sum()) / max(float(self.counts.sum()), 1.0)

    def prior_loss(self) -> torch.Tensor:
        """The paper's Binomial prior loss of these boundaries toward ``rate`` (:func:`binomial_prior_loss`)."""
        return binomial_prior_loss(self.boundaries, self.real, self.rate)


@dataclass
class _Pass:
    """State of one forward pass (one thread's)."""

    input_ids: torch.Tensor | None
    mask2d: torch.Tensor | None
    plan: PoolingPlan | None = None
    residual: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    skip: bool = False
    gathered: dict = field(default_factory=dict)


class Hourglass:
    """The hooks of one model carrying a ``token_pooling`` reduction (see the module docstring)."""

    def __init__(self, model, adapter, config: TokenPoolingConfig):
        self.model, self.config = model, config
        self.blocks = adapter.blocks(model)
        self.layers = config.pooled_layers(len(self.blocks))
        base_path = adapter.layers.rpartition(".")[0]
        self.base = model.get_submodule(base_path) if base_path else model
        implementation = model.config._attn_implementation
        self.eager = STOCK_IMPLEMENTATIONS.get(implementation, implementation) == "eager"
        self._states: dict[int, _Pass] = {}
        self.last: PoolingRecord | None = None

    def predictor(self):
        modules = self.model._modules.get(MODULES_ATTR)
        if modules is None or MODULE_NAME not in modules:
            raise TokenReductionError("token_pooling: the model has no boundary predictor "
                                      "(model.hf_tokred_modules['token_pooling']); attach the reduction with "
                                      "hf_tokred.apply or from_pretrained")
        return modules[MODULE_NAME]

    def install(self, applied) -> None:
        first, last = self.layers[0], self.layers[-1]
        handles = [self.base.register_forward_pre_hook(self._start, with_kwargs=True),
                   self.base.register_forward_hook(self._end, with_kwargs=True, always_call=True),
                   self.blocks[first].register_forward_pre_hook(self._pool, with_kwargs=True)]
        for layer in self.layers:
            handles.append(self.blocks[layer].register_forward_pre_hook(self._make_enter(layer), with_kwargs=True))
        handles.append(self.blocks[last].register_forward_hook(self._upsample, with_kwargs=True))
        for handle in handles:
            applied.add_undo(handle.remove)

    def current(self) -> _Pass | None:
        return self._states.get(threading.get_ident())

    # -- the pass ----------------------------------------------------------------------------

    def _start(self, module, args, kwargs):
        if kwargs.get("use_cache") is True or cache_in(kwargs) is not None:
            raise TokenReductionError(_NO_CACHE)
        if "use_cache" in kwargs or "use_cache" in _parameters(module):
            kwargs["use_cache"] = False  # the model's default (config.use_cache) would build a cache
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        mask = kwargs.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._states[threading.get_ident()] = _Pass(input_ids, mask2d)
        return args, kwargs

    def _end(self, module, args, kwargs, output):
        self._states.pop(threading.get_ident(), None)
        return None

    def _pool(self, module, args, kwargs):
        state = self.current()
        if state is None:
            raise TokenReductionError("token_pooling: a pooled decoder layer ran outside its model's forward; call the "
                                      f"model ({type(self.base).__name__} or the model holding it)")
        if cache_in(kwargs) is not None:
            raise TokenReductionError(_NO_CACHE)
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[:2]
        real = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        if state.mask2d is not None:
            real = state.mask2d[:, -length:].to(device=hidden.device).bool().expand(batch, length)
        boundaries, logits = self._boundaries(state, hidden, real)
        boundaries = boundaries * real.to(boundaries.dtype)
        plan = pooling_plan(boundaries, real)
        self.last = PoolingRecord(boundaries, real, plan.counts, logits, self.config.boundary_rate)
        if not boundaries.requires_grad and bool((boundaries.bool() == real).all()):
            state.skip = True  # every real token is its own segment: the dense computation, unchanged
            return None
        pooled = torch.bmm(plan.pool.to(hidden.dtype), hidden)
        state.plan, state.residual, state.pooled = plan, hidden, pooled
        if args:
            args = (pooled, *args[1:])
        else:
            kwargs["hidden_states"] = pooled
        return args, kwargs

    def _boundaries(self, state: _Pass, hidden: torch.Tensor, real: torch.Tensor):
        config = self.config
        if config.boundaries == "whitespace":
            ids = state.input_ids
            if ids is None or tuple(ids.shape[-2:]) != tuple(hidden.shape[:2]):
                raise TokenReductionError("token_pooling: boundaries='whitespace' reads the token ids, and this call "
                                          "passed none (inputs_embeds); pass input_ids, or use boundaries='learned'")
            return whitespace_boundaries(ids.to(hidden.device), config.boundary_token_ids), None
        predictor = self.predictor()
        if predictor.training:
            logits = predictor(hidden).float()
            return gumbel_sigmoid_boundaries(logits, config.gumbel_temperature), logits
        with torch.no_grad():
            logits = predictor(hidden).float()
        return (logits > 0).float(), logits  # probability > 0.5

    def _make_enter(self, layer: int):
        def hook(module, args, kwargs):
            state = self.current()
            if state is None or state.skip or state.plan is None:
                return None
            self._enter(state, layer, kwargs, hidden_length=state.residual.shape[1])
            return args, kwargs
        return hook

    def _enter(self, state: _Pass, layer: int, kwargs: dict, hidden_length: int) -> None:
        plan = state.plan
        for name, value in kwargs.items():
            if name not in _HANDLED and isinstance(value, torch.Tensor) and value.dim() >= 2 \
                    and value.shape[1] == hidden_length:
                raise UnsupportedModelError(f"token_pooling: decoder layer {layer} takes a per-token argument "
                                            f"{name!r} that hf_tokred does not know how to pool")
        if "attention_mask" in kwargs:
            mask = kwargs["attention_mask"]
            if isinstance(mask, dict):
                kwargs["attention_mask"] = {k: self._pooled_mask(state, v) for k, v in mask.items()}
            else:
                kwargs["attention_mask"] = self._pooled_mask(state, mask)
        ends = plan.ends
        batch, slots = ends.shape
        embeddings = kwargs.get("position_embeddings")
        if isinstance(embeddings, tuple):
            kwargs["position_embeddings"] = tuple(
                self._cached(state, t, lambda t: t.expand(batch, *t.shape[1:]).gather(
                    1, ends[..., None].expand(batch, slots, t.shape[-1]))) for t in embeddings)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
            kwargs["position_ids"] = self._cached(state, position_ids,
                                                  lambda p: p.expand(batch, p.shape[-1]).gather(1, ends))

    def _cached(self, state: _Pass, tensor: torch.Tensor, fn):
        known = state.gathered.get(id(tensor))
        if known is None or known[0] is not tensor:
            known = state.gathered[id(tensor)] = (tensor, fn(tensor))
        return known[1]

    def _pooled_mask(self, state: _Pass, mask):
        plan = state.plan
        ends, valid = plan.ends, plan.valid
        batch, slots = ends.shape
        eye = torch.eye(slots, dtype=torch.bool, device=ends.device)
        if mask is None:
            if bool(valid.all()):
                return None  # causal over segments, as over tokens (segment ends are increasing)
            causal = torch.ones(slots, slots, dtype=torch.bool, device=ends.device).tril()
            keep = (causal & valid[:, None, None, :]) | eye  # a padding slot sees itself only
            return mask_like(keep, torch.empty(0, dtype=state.residual.dtype) if self.eager else None)
        if not isinstance(mask, torch.Tensor):
            raise UnsupportedModelError(f"token_pooling: the decoder passes its layers an attention mask of type "
                                        f"{type(mask).__name__}, which hf_tokred cannot pool")

        def gather(m):
            m = m.expand(batch, *m.shape[1:])
            heads, keys = m.shape[1], m.shape[-1]
            picked = m.gather(2, ends[:, None, :, None].expand(batch, heads, slots, keys))
            picked = picked.gather(3, ends[:, None, None, :].expand(batch, heads, slots, slots))
            if bool(valid.all()):
                return picked
            return mask_like((mask_keep(picked) & valid[:, None, None, :]) | eye, picked)
        return self._cached(state, mask, gather)

    def _upsample(self, module, args, kwargs, output):
        state = self.current()
        if state is None or state.skip or state.plan is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        update = hidden - state.pooled
        full = state.residual + torch.bmm(state.plan.upsample.to(update.dtype), update)
        state.plan = state.residual = state.pooled = None
        state.gathered = {}
        return (full, *output[1:]) if isinstance(output, tuple) else full


def _parameters(module) -> set:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _generate_without_cache(self, *args, **kwargs):
    if kwargs.get("use_cache") is True or cache_in(kwargs) is not None:
        raise TokenReductionError(_NO_CACHE)
    for name in ("assistant_model", "prompt_lookup_num_tokens"):
        if kwargs.get(name) is not None:
            raise TokenReductionError(f"token_pooling: {name} (assisted decoding) needs a KV cache; {_NO_CACHE}")
    kwargs["use_cache"] = False
    return type(self).generate(self, *args, **kwargs)


def get_hourglass(model) -> Hourglass:
    """The :class:`Hourglass` attached to ``model``, or a TokenReductionError saying how to attach one.

    Example:
        >>> get_hourglass(model).layers                               # doctest: +SKIP
        [2, 3, 4, 5, 6, 7, 8, 9]
    """
    hourglass = model.__dict__.get(HOURGLASS_ATTR)
    if hourglass is None:
        raise TokenReductionError(f"{type(model).__name__} has no token_pooling reduction that pools any layer; apply "
                                  "one first: hf_tokred.apply(model, {'method': 'token_pooling', ...})")
    return hourglass


def last_pooling(model) -> PoolingRecord:
    """What the model's last forward pass pooled: boundaries, segment counts, and the prior loss for training.

    Example:
        >>> out = model(input_ids, labels=input_ids)                  # doctest: +SKIP
        >>> loss = out.loss + last_pooling(model).prior_loss()        # doctest: +SKIP
    """
    record = get_hourglass(model).last
    if record is None:
        raise TokenReductionError("token_pooling: no forward pass has pooled yet")
    return record


@register_wiring("token_pooling")
def wire_token_pooling(model, adapter, reducer, applied) -> None:
    """Attach a ``token_pooling`` hourglass: hooks on the decoder (see the module docstring) and a ``generate()`` that
    runs without a KV cache. A config that pools no layer installs nothing (the dense model).

    Example:
        >>> model = hf_tokred.apply(model, {"method": "token_pooling", "pre_layers": 2, "post_layers": 2})  # doctest: +SKIP
    """
    if not isinstance(reducer, TokenPoolingConfig):
        raise UnsupportedModelError(f"{reducer.method}: no token_pooling wiring for this reducer")
    for stage in ("kv_policy", "kv_storage", "prefill"):
        if applied.config.get(stage) is not None:
            raise ConfigError(f"method: token_pooling runs its decoder without a KV cache and cannot be composed with "
                              f"the {stage} reducer {applied.config.get(stage).method}", field="method")
    hourglass = Hourglass(model, adapter, reducer)
    if not hourglass.layers:
        return
    hourglass.install(applied)
    model.__dict__[HOURGLASS_ATTR] = hourglass
    applied.add_undo(lambda: model.__dict__.pop(HOURGLASS_ATTR, None))
    if hasattr(model, "generate") and callable(getattr(model, "can_generate", None)) and model.can_generate():
        model.generate = types.MethodType(_generate_without_cache, model)
        applied.add_undo(lambda: model.__dict__.pop("generate", None))


__all__ = ["Hourglass", "PoolingRecord", "get_hourglass", "last_pooling", "wire_token_pooling"]
