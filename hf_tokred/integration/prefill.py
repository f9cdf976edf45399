"""Wiring of the prefill stage (``lazyllm``): progressive pruning of the prompt between decoder layers.

:func:`wire_prefill` (registered for the ``"prefill"`` stage) installs plain torch hooks, found through the
decoder adapter (``adapter.blocks``/``adapter.attention_modules``), never a copied ``forward``:

* a forward pre-hook on the first decoder layer opens a *pass* (per thread): a prompt fed to an empty cache (or
  any multi-token call without a cache) is pruned; a single decoding step may revive tokens (``revive``);
  anything else (a later prompt chunk, a decoding step with nothing to revive) runs unchanged;
* an :class:`~hf_tokred.attention.AttentionObserver` on each pruning layer's attention module computes the
  importance of every key from the post-RoPE query of the last position
  (:func:`~hf_tokred.methods.prompt.lazyllm.last_token_importance`);
* a forward hook on each pruning layer gathers its output down to the kept tokens (their original order, the
  last token last) and puts the dropped tokens' hidden states in the aux cache;
* a forward pre-hook on every later layer gathers that layer's per-token arguments -- ``attention_mask`` (rows
  and columns), ``position_embeddings`` ``(cos, sin)``, ``position_ids`` -- to the kept tokens, so kept tokens
  keep their ORIGINAL positions (nothing is renumbered), and tells the layer's cache slot the tokens' positions
  (:class:`~hf_tokred.kv.cache.ReducingLayer`'s ``incoming``);
* a forward hook on the last layer gives the output the input's length again (a dropped token's output is its
  hidden state where it was dropped), so ``logits[:, -1]`` and ``logits_to_keep`` work as for the dense model.

The cache: every layer after the first pruning one stores only part of the prompt, so it must be a slot-tracking
:class:`~hf_tokred.kv.cache.ReducingLayer`. A :class:`~hf_tokred.kv.cache.TokenReductionCache` built for a model
carrying lazyllm makes them so (``generate()`` builds one per call, alone or composed with a KV policy, which then
sees the pruned prompt; :func:`hf_tokred.build_cache` builds one by hand). A cache that cannot hold a pruned prompt
(a plain ``DynamicCache``) is refused with an error. The aux cache of each pruning layer rides on the next layer's
cache slot (``extras``), so beam search reorders it with the cache.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> model = hf_tokred.apply(model, {"method": "lazyllm", "schedule": [[1, 0.5]], "sink_tokens": 1})
    >>> cache = hf_tokred.build_cache(model)
    >>> out = model.generate(torch.arange(1, 21)[None], max_new_tokens=3, past_key_values=cache, do_sample=False)
    >>> cache.stored_lengths()       # layers 2 and 3 computed 10 of the 20 prompt tokens (+ 2 decoded)
    [22, 22, 12, 12]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..attention import STOCK_IMPLEMENTATIONS, AttentionObserver, add_observer, mask_keep, mask_like, remove_observer
from ..compat import CACHE_KWARGS, cache_in
from ..errors import TokenReductionError, UnsupportedModelError
from ..kv.cache import ReducingLayer, TokenReductionCache
from ..kv.layers import CHUNKED_ATTENTION, kv_layer_types
from ..methods.prompt.lazyllm import LazyLLMConfig, last_token_importance, revival_candidates, select_kept
from .transformers import install_generate
from .wiring import register_wiring

# Names of the aux cache's tensors in the ``extras`` of the cache slot after each pruning layer.
AUX_HIDDEN, AUX_POSITIONS, AUX_POSITION_IDS, AUX_VALID = "lazyllm_hidden", "lazyllm_positions", "lazyllm_ids", "lazyllm_valid"
# Per-token layer arguments gathered to the kept tokens (anything else shaped like the sequence is refused).
# Set on a cache that is not a TokenReductionCache once a prompt was pruned into it.
_PARTIAL = "_hf_tokred_pruned_prompt"
_HANDLED = ("hidden_states", "attention_mask", "position_embeddings", "position_ids", *CACHE_KWARGS)


@dataclass
class _Pass:
    """State of one forward pass through the decoder (one thread's)."""

    mode: str  # "prune" (a prompt) or "revive" (a decoding step)
    length: int  # tokens of this call
    past: int  # tokens the cache held before it
    cache: TokenReductionCache | None
    position_ids: torch.Tensor  # (batch, length) the call's position ids
    rows: torch.Tensor  # (batch, rows) position of each current hidden row
    valid: torch.Tensor  # (batch, rows) rows other tokens may attend to
    changed: bool = False  # rows are no longer this call's tokens in order
    real_length: torch.Tensor | None = None
    sink_end: torch.Tensor | None = None
    full: torch.Tensor | None = None  # (batch, length, hidden): outputs of the dropped tokens
    scores: dict = field(default_factory=dict)  # pruning layer -> (batch, keys) importance
    gathered: dict = field(default_factory=dict)  # id of a full argument -> (it, its gathered version)
    cache_ok: bool = True  # the cache can hold a pruned prompt (or there is none)
    row_ids: torch.Tensor | None = None  # revive: (batch, rows) position ids of the rows


class _Importance(AttentionObserver):
    """Records the last query's attention over the keys of one pruning layer during an active pass."""

    def __init__(self, owner: LazyPrefill, layer: int):
        self.owner, self.layer = owner, layer

    def observe(self, module, query, key, value, attention_mask) -> None:
        state = self.owner.current()
        if state is None:
            return
        with torch.no_grad():
            window = self.owner.config.query_window if state.mode == "prune" else 1
            visible = None
            if attention_mask is not None:
                visible = mask_keep(attention_mask)[:, 0, -window:, :]
                visible = visible.expand(query.shape[0], -1, -1)
            scores = last_token_importance(
                query, key, getattr(module, "scaling", None) or query.shape[-1] ** -0.5, visible,
                getattr(module, "attn_logit_softcapping", None), getattr(module, "sinks", None), window=window,
                kernel_size=self.owner.config.kernel_size if state.mode == "prune" else 1)
            positions = None
            if state.mode == "revive":  # where the scored keys sit, before a composed policy evicts any
                positions = _slot_positions(state.cache.layers[self.layer], query.shape[0], key.shape[-2])
            state.scores[self.layer] = (scores, positions)


class LazyPrefill:
    """The hooks of one model carrying a lazyllm reduction (see the module docstring)."""

    def __init__(self, model, adapter, config: LazyLLMConfig):
        types_, _ = kv_layer_types(model, config.method)
        self.model, self.config = model, config
        self.blocks = adapter.blocks(model)
        if CHUNKED_ATTENTION in types_:
            raise UnsupportedModelError(f"{config.method}: {type(model).__name__} has chunked-attention layers, whose "
                                        "chunk mask hf_tokred's cache cannot rebuild for a pruned prompt")
        self.num_layers = len(types_)
        if len(self.blocks) != self.num_layers:
            raise UnsupportedModelError(f"{config.method}: {type(model).__name__} has {len(self.blocks)} decoder blocks "
                                        f"and {self.num_layers} layer types; hf_tokred cannot tell which block is which")
        self.stages = dict(self._resolve_stages())
        self.first = min(self.stages) if self.stages else None
        self.revive = getattr(config, "revive", False)
        self.attention = {m.layer_idx: m for m in adapter.attention_modules(model)}
        self.eager = STOCK_IMPLEMENTATIONS.get(model.config._attn_implementation,
                                               model.config._attn_implementation) == "eager"
        self._states: dict[int, _Pass] = {}
        self._rotary: dict[int, object] = {}

    # -- pass bookkeeping ------------------------------------------------------------------

    def _resolve_stages(self) -> list[tuple[int, float]]:
        """``[(layer, keep), ...]``: the layers after which tokens are pruned (-1: before the first layer)."""
        return self.config.resolve_schedule(self.num_layers)

    def current(self) -> _Pass | None:
        return self._states.get(threading.get_ident())

    def install(self, applied) -> None:
        handles = [self.blocks[0].register_forward_pre_hook(self._start, with_kwargs=True)]
        handles += self._install_scoring(applied)
        for j in range(self.first + 1, self.num_layers):
            handles.append(self.blocks[j].register_forward_pre_hook(self._make_enter(j), with_kwargs=True))
        handles.append(self.blocks[-1].register_forward_hook(self._finish, with_kwargs=True, always_call=True))
        for handle in handles:
            applied.add_undo(handle.remove)

    def _install_scoring(self, applied) -> list:
        """Observers scoring the tokens at each pruning layer and the hooks pruning after it; returns the hooks'
        handles (they run after the first layer's pass-opening pre-hook, before the later layers' gathering)."""
        handles = []
        for p in self.stages:
            handles.append(self.blocks[p].register_forward_hook(self._make_prune(p), with_kwargs=True))
            observer = _Importance(self, p)
            add_observer(self.attention[p], observer)
            applied.add_undo(lambda m=self.attention[p], o=observer: remove_observer(m, o))
        return handles

    def _begin(self, state: _Pass, kwargs: dict) -> None:
        """Called when a pass opens (a subclass records what it needs about the call)."""

    def _start(self, module, args, kwargs):
        self._states.pop(threading.get_ident(), None)
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[:2]
        cache = cache_in(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0 and getattr(cache, _PARTIAL, False):
            raise TokenReductionError(
                f"{self.config.method}: this {type(cache).__name__} holds a pruned prompt (layers {self.first + 1}.."
                f"{self.num_layers - 1} computed only part of it) and cannot track which tokens it holds, so decoding "
                "with it would be wrong; let generate() build the cache, or pass hf_tokred.build_cache(model)")
        mode = None
        if length > 1 and past == 0:
            mode = "prune"
        elif length == 1 and past > 0 and self.revive and isinstance(cache, TokenReductionCache):
            mode = "revive"
        if mode is None:
            return None
        device = hidden.device
        position_ids = kwargs.get("position_ids")
        index = torch.arange(length, device=device).expand(batch, length)
        position_ids = index + past if position_ids is None else position_ids.to(device).expand(batch, length)
        mask = kwargs.get("attention_mask")
        if mask is None or mode == "revive":
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:  # padding sees nothing, not even itself
            valid = mask_keep(mask)[:, 0, -length:, -length:].diagonal(dim1=-2, dim2=-1).expand(batch, length)
        state = _Pass(mode, length, past, cache, position_ids, index + past, valid)
        if mode == "prune":
            state.cache_ok = self._cache_ok(cache)
            state.real_length = valid.sum(dim=-1)
            first_real = torch.where(valid, index, length).amin(dim=-1)
            state.sink_end = first_real + getattr(self.config, "sink_tokens", 0)
        else:
            state.row_ids = position_ids
        self._states[threading.get_ident()] = state
        self._begin(state, kwargs)
        return None

    def _cache_ok(self, cache) -> bool:
        """Whether ``cache`` can hold a pruned prompt: every layer after the first pruning one tracks its slots."""
        return cache is None or (isinstance(cache, TokenReductionCache) and all(
            isinstance(cache.layers[j], ReducingLayer) for j in range(self.first + 1, self.num_layers)))

    # -- pruning layers --------------------------------------------------------------------

    def _make_prune(self, layer: int):
        def hook(module, args, kwargs, output):
            state = self.current()
            if state is None:
                return None
            scored = state.scores.pop(layer, None)
            if scored is None:
                raise TokenReductionError(
                    f"{self.config.method}: layer {layer}'s attention did not run through hf_tokred's attention function, "
                    "so no token could be scored; keep the attn_implementation hf_tokred.apply set")
            hidden = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                hidden = self._prune(state, layer, scored[0], hidden) if state.mode == "prune" else \
                    self._revive(state, layer, *scored, hidden)
            if hidden is None:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _prune(self, state: _Pass, layer: int, scores: torch.Tensor, hidden: torch.Tensor):
        if scores.shape[-1] != state.rows.shape[-1]:
            raise TokenReductionError(f"{self.config.method}: layer {layer} scored {scores.shape[-1]} keys for "
                                      f"{state.rows.shape[-1]} tokens")
        index, index_valid = self._select(state, layer, scores, hidden)
        return self._drop(state, layer, index, index_valid, hidden)

    def _select(self, state: _Pass, layer: int, scores: torch.Tensor, hidden: torch.Tensor):
        """``(index, index_valid)`` of the slots that go on after ``layer`` (see :func:`select_kept`)."""
        keep = self.stages[layer]
        counts = torch.tensor([self.config.kept_count(keep, int(n)) for n in state.real_length.tolist()],
                              device=hidden.device)
        return select_kept(scores, state.rows, state.valid, counts, state.sink_end, recent=self.config.query_window)

    def _drop(self, state: _Pass, layer: int, index: torch.Tensor, index_valid: torch.Tensor, hidden: torch.Tensor):
        """Gather ``hidden`` down to the slots ``index`` (None when nothing changes); the dropped slots' hidden
        states become their outputs."""
        slots = state.rows.shape[-1]
        if index.shape[-1] == slots and bool(index_valid.eq(state.valid).all()):
            return None  # every row keeps what it has: nothing changes
        dropped = state.valid & ~torch.zeros_like(state.valid).scatter(-1, index, index_valid)
        batch, _, width = hidden.shape
        if state.full is None:
            state.full = hidden.new_zeros(batch, state.length, width)
        # Slots physically dropped (as many in every row): their output is their hidden state here.
        gone = torch.ones_like(state.valid).scatter(-1, index, False)
        gone = gone.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[:, : slots - index.shape[-1]]
        state.full.scatter_(1, _rows(state.rows.gather(-1, gone), width), hidden.gather(1, _rows(gone, width)))
        cache = state.cache
        if cache is not None and not state.cache_ok:
            setattr(cache, _PARTIAL, True)  # usable for this call's logits, refused for decoding (see _start)
        elif cache is not None and self.revive:
            self._store_aux(cache.layers[layer + 1], state, dropped, hidden)
        state.rows, state.valid = state.rows.gather(-1, index), index_valid
        state.changed = True
        state.gathered = {}
        return hidden.gather(1, _rows(index, width))

    def _store_aux(self, slot: ReducingLayer, state: _Pass, dropped: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep the hidden states of the tokens this layer dropped (and where they are) for revival."""
        count = int(dropped.sum(dim=-1).max())
        order = dropped.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[:, :count]
        slot.extras = {
            AUX_HIDDEN: hidden.gather(1, _rows(order, hidden.shape[-1])),
            AUX_POSITIONS: state.rows.gather(-1, order),
            AUX_POSITION_IDS: state.position_ids.gather(-1, state.rows.gather(-1, order) - state.past),
            AUX_VALID: dropped.gather(-1, order),
        }

    def _revive(self, state: _Pass, layer: int, scores: torch.Tensor, key_positions: torch.Tensor,
                hidden: torch.Tensor):
        cache = state.cache
        after = cache.layers[layer + 1]
        aux = after.extras
        if not aux or not bool(aux[AUX_VALID].any()):
            return None
        batch, width = hidden.shape[0], hidden.shape[-1]
        # The new token's attention by position (-1: not held by this layer, e.g. evicted by a composed policy).
        dense = scores.new_full((batch, state.past + 1), -1.0).scatter_(-1, key_positions, scores)
        kept = dense.gather(-1, after.positions[:, 0])
        floor = torch.where(after.valid[:, 0] & (kept >= 0), kept, torch.inf).amin(dim=-1)
        aux_scores = dense.gather(-1, aux[AUX_POSITIONS])
        index, chosen = revival_candidates(aux_scores, floor, aux[AUX_VALID] & (aux_scores >= 0),
                                           self.config.revive_limit)
        if index.shape[-1] == 0:
            return None
        if self._rotary_missing(layer):
            raise TokenReductionError(f"{self.config.method}: revive=True needs the model's rotary embedding to place "
                                      "revived tokens at their positions; set revive=False for this model")
        after.extras = {**aux, AUX_VALID: aux[AUX_VALID].scatter(-1, index, aux[AUX_VALID].gather(-1, index) & ~chosen)}
        new_position = state.past  # the decoding step's token
        positions = torch.where(chosen, aux[AUX_POSITIONS].gather(-1, index), new_position)
        ids = torch.where(chosen, aux[AUX_POSITION_IDS].gather(-1, index), state.row_ids[:, -1:])
        revived = aux[AUX_HIDDEN].gather(1, _rows(index, width))
        # Rows sorted by position, the new token last (unchosen padding rows sit at its position, invalid).
        rows = torch.cat([positions, state.rows], dim=-1)
        valid = torch.cat([chosen, state.valid], dim=-1)
        is_new = torch.zeros_like(valid)
        is_new[:, -1] = True
        order = (rows * 2 + is_new.long()).argsort(dim=-1, stable=True)
        state.rows, state.valid = rows.gather(-1, order), valid.gather(-1, order)
        state.row_ids = torch.cat([ids, state.row_ids], dim=-1).gather(-1, order)
        state.changed = True
        state.gathered = {}
        return torch.cat([revived.to(hidden.dtype), hidden], dim=1).gather(1, _rows(order, width))

    def _rotary_missing(self, layer: int) -> bool:
        from ..model_patches.rope import rotary_for

        for j in range(layer + 1, self.num_layers):
            if j not in self._rotary:
                try:
                    self._rotary[j] = rotary_for(self.model, j)
                except UnsupportedModelError:
                    self._rotary[j] = None
        return any(self._rotary[j] is None for j in range(layer + 1, self.num_layers))

    # -- later layers --------------------------------------------------------------------

    def _make_enter(self, layer: int):
        def hook(module, args, kwargs):
            state = self.current()
            if state is None or not state.changed:
                return None
            with torch.no_grad():
                if state.mode == "prune":
                    self._enter_pruned(state, layer, kwargs)
                else:
                    self._enter_revived(state, layer, kwargs)
            return args, kwargs
        return hook

    def _gather(self, state: _Pass, tensor: torch.Tensor, fn):
        known = state.gathered.get(id(tensor))
        if known is None or known[0] is not tensor:
            known = state.gathered[id(tensor)] = (tensor, fn(tensor))
        return known[1]

    def _enter_pruned(self, state: _Pass, layer: int, kwargs: dict) -> None:
        rows, length = state.rows, state.length
        batch, count = rows.shape
        for name, value in kwargs.items():
            if name not in _HANDLED and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length:
                raise UnsupportedModelError(f"{self.config.method}: decoder layer {layer} takes a per-token argument "
                                            f"{name!r} that hf_tokred does not know how to prune")
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = self._gather(state, mask, lambda m: _gather_mask(m, rows, state.valid))
        elif not bool(state.valid.all()):  # no mask, but rows that keep fewer tokens carry masked-out fillers
            causal = rows[:, None, :, None] >= rows[:, None, None, :]
            keep = causal & state.valid[:, None, None, :]
            keep = keep | torch.eye(count, dtype=torch.bool, device=rows.device)  # a filler still sees itself
            kwargs["attention_mask"] = mask_like(keep, None if not self.eager else torch.empty(0))
        embeddings = kwargs.get("position_embeddings")
        if isinstance(embeddings, tuple):
            kwargs["position_embeddings"] = tuple(
                self._gather(state, t, lambda t: t.expand(batch, *t.shape[1:]).gather(1, _rows(rows, t.shape[-1])))
                for t in embeddings)
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = state.position_ids.gather(-1, rows - state.past)
        cache = state.cache
        if cache is not None and isinstance(cache.layers[layer], ReducingLayer):
            cache.layers[layer].incoming = (rows, length)

    def _enter_revived(self, state: _Pass, layer: int, kwargs: dict) -> None:
        cache = state.cache
        slot = cache.layers[layer]
        rows, valid = state.rows, state.valid
        batch, q = rows.shape
        stored_pos, stored_valid = slot.positions, slot.valid  # (batch, kv_heads, slots)
        query_pos = rows[:, None, :, None]
        visible = stored_valid[:, :, None, :] & (stored_pos[:, :, None, :] <= query_pos)
        new = valid[:, None, None, :] & (rows[:, None, None, :] <= query_pos)
        window = slot.sliding_window
        if window is not None:
            visible = visible & (stored_pos[:, :, None, :] > query_pos - window)
            new = new & (rows[:, None, None, :] > query_pos - window)
        if bool((visible == visible[:, :1]).all()):
            visible = visible[:, :1]
        else:
            heads = self.attention[layer].config.num_attention_heads
            visible = visible.repeat_interleave(heads // visible.shape[1], dim=1)
        new = new.expand(batch, visible.shape[1], q, q)
        keep = torch.cat([visible, new], dim=-1)
        reference = kwargs.get("attention_mask")
        if reference is None and self.eager:
            reference = torch.empty(0, dtype=self.model.dtype)
        kwargs["attention_mask"] = mask_like(keep, reference)
        embeddings = kwargs.get("position_embeddings")
        rotary = self._rotary.get(layer)
        if isinstance(embeddings, tuple) and rotary is not None and rotary.rotary_emb is not None:
            extra = {} if rotary.layer_type is None else {"layer_type": rotary.layer_type}
            probe = embeddings[0]
            cos, sin = rotary.rotary_emb(probe, state.row_ids, **extra)
            kwargs["position_embeddings"] = (cos.to(probe.dtype), sin.to(embeddings[1].dtype))
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = state.row_ids
        slot.incoming = (rows, 1)

    def _finish(self, module, args, kwargs, output):
        state = self._states.pop(threading.get_ident(), None)
        if state is None or not state.changed or output is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if state.mode == "prune":
            full = state.full
            full.scatter_(1, _rows(state.rows, full.shape[-1]), hidden.to(full.dtype))
            hidden = full
        else:
            hidden = hidden[:, -1:]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _rows(index: torch.Tensor, width: int) -> torch.Tensor:
    return index[..., None].expand(*index.shape, width)


def _slot_positions(slot, batch: int, keys: int) -> torch.Tensor:
    """Positions ``(batch, keys)`` of the keys a cache layer returned for this step (a plain layer's, full or
    sliding, are the last ``keys`` positions seen)."""
    if isinstance(slot, ReducingLayer):
        return slot.positions[:, 0]
    seen = slot.get_seq_length()
    return torch.arange(seen - keys, seen, device=slot.keys.device).expand(batch, keys)


def _gather_mask(mask: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The ``(batch, heads, q, k)`` mask of the kept rows (rows and columns gathered), hiding invalid columns."""
    batch, count = rows.shape
    mask = mask.expand(batch, *mask.shape[1:])
    heads, length = mask.shape[1], mask.shape[-1]
    picked = mask.gather(2, rows[:, None, :, None].expand(batch, heads, count, length))
    picked = picked.gather(3, rows[:, None, None, :].expand(batch, heads, count, count))
    if bool(valid.all()):
        return picked
    keep = mask_keep(picked) & valid[:, None, None, :]
    return mask_like(keep, picked)


@register_wiring("prefill")
def wire_prefill(model, adapter, reducer, applied) -> None:
    """Attach a prefill-stage reducer (``lazyllm``): hooks on the decoder layers and a ``generate`` that builds a
    cache able to hold the pruned prompt. A schedule that prunes nothing installs nothing (the dense model).

    Example:
        >>> model = hf_tokred.apply(model, {"method": "lazyllm"})      # doctest: +SKIP
    """
    if not isinstance(reducer, LazyLLMConfig):
        raise UnsupportedModelError(f"{reducer.method}: no prefill wiring for this reducer")
    prefill = LazyPrefill(model, adapter, reducer)
    if prefill.first is None:
        return
    prefill.install(applied)
    install_generate(model, applied)


__all__ = ["LazyPrefill", "wire_prefill"]
