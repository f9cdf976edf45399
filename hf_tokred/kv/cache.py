"""`TokenReductionCache`: a `transformers.Cache` whose layers evict by a KV policy.

Each layer follows transformers' ``DynamicSlidingWindowLayer`` contract: ``update()`` appends and
returns the full keys/values for this step's attention, ``get_seq_length()`` is the number of tokens
*seen* (so RoPE positions stay absolute), and ``get_mask_sizes(q)`` returns ``(stored + q, seen -
stored)``. Eviction happens right after the step's attention, inside hf_tokred's registered attention
function, where the layer also learns which new tokens are padding.

Layers the reduction does not act on (by default the sliding-window layers of hybrid models such as Gemma 2/3;
see :mod:`hf_tokred.kv.layers`) are transformers' own cache layers for their type, built as
``DynamicCache(config=...)`` builds them, so their keys, values and masks stay exactly the dense cache's.
transformers builds one mask per layer type, sized from the first layer of that type
(``Cache.get_mask_sizes``, ``Cache.is_sliding``): the reduced layers report their own sizes and rebuild the
stored part of their mask when eviction made it differ. A reduced sliding-window layer (``layers="all"``)
also drops what leaves its window, as transformers does, and applies the window in the masks it rebuilds.

Stored slots carry their logical position per row and head, and a validity flag (False for padding).
Once eviction has made the stored slots a non-contiguous set of positions, transformers' shared mask
no longer describes them, so the layer rebuilds the stored part of the mask itself. Padding is always
evicted before any real token, and the sinks of a left-padded row are its first *real* tokens.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2, vocab_size=100)
    >>> model = hf_tokred.apply(LlamaForCausalLM(cfg), hf_tokred.TokenReductionConfig(method="streamingllm", max_tokens=8))
    >>> cache = hf_tokred.build_cache(model)
    >>> out = model.generate(torch.arange(1, 13)[None], max_new_tokens=5, past_key_values=cache, do_sample=False)
    >>> cache.stored_lengths(), cache.get_seq_length()
    ([8, 8], 16)
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer

from ..attention import STOCK_IMPLEMENTATIONS, AttentionObserver, mask_keep, mask_like, set_transient_observer
from ..config import TokenReductionConfig
from ..errors import TokenReductionError, UnsupportedModelError
from .layers import SLIDING_ATTENTION, check_layers, kv_layer_types
from .policy import KVPolicyConfig, prompt_once_policies

# Spare slots kept after an eviction, so the next steps append without copying the cache: a per-step policy
# needs room for the tokens it adds before it evicts again; a prefill-once policy grows by this many at a time.
PREFILL_POLICY_HEADROOM = 16


class ReducingLayer(DynamicLayer, AttentionObserver):
    """One layer of a :class:`TokenReductionCache`: a ``DynamicLayer`` that evicts by a policy.

    Attributes a policy reads: ``keys``/``values`` ``(batch, kv_heads, slots, dim)``, ``positions`` (logical
    position of each slot) and ``valid`` (False for padding and empty slots) ``(batch, kv_heads, slots)``,
    ``buffers`` (per-slot history tensors named by ``policy.buffers``), ``seen`` (tokens seen),
    ``layer_idx`` (the model's layer index), ``rank`` and ``num_layers`` (this layer's rank among the layers the
    policy acts on, and their number: what per-layer budgets are computed from), ``sliding_window`` (None for a
    full-attention layer) and ``budget`` (this layer's budget, None = never evict).

    A caller that feeds a layer only some of a step's tokens (LazyLLM's prefill pruning,
    :mod:`hf_tokred.integration.prefill`) sets ``incoming = (positions, advance)`` before the layer's update:
    ``positions`` ``(batch, new)`` are the original positions of the tokens it brings and ``advance`` the tokens
    the step stands for (``seen`` grows by it). The caller then also supplies that call's attention mask, which
    ``prepare`` passes on as given (reading the new tokens' padding from its diagonal). ``extras`` holds per-row
    tensors ``(batch, ...)`` of such a caller that travel with the batch (beam search reorders them).
    """

    def __init__(self, policy: KVPolicyConfig, layer_idx: int, num_layers: int = 1, store=None,
                 label: str | None = None, shared: dict | None = None, rank: int | None = None,
                 sliding_window: int | None = None, croppable: bool = False):
        super().__init__()
        self.policy = policy
        # Whether the newest tokens can be taken back exactly (assisted decoding's rollback): only when nothing
        # the layer holds depends on them. A policy that evicts while decoding, a window that drops what leaves
        # it, a quantizing store or a layer fed part of the prompt all change older slots because of them.
        self.is_croppable = croppable  # shadows DynamicLayer's class-wide True
        self.rank = layer_idx if rank is None else rank
        # A sliding-window layer keeps only the last `sliding_window` positions visible; transformers sizes the
        # sliding layers' shared mask from the first layer that says it slides.
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.shared = {} if shared is None else shared  # state of the whole cache (the input ids it has seen)
        self.scratch: dict = {}  # what a policy's score() leaves for its head_budgets() in the same step
        self.label = label or policy.method  # the reduction's name in error messages
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.store = store  # a KVStore (hf_tokred.kv.storage) holding the slots compressed, or None
        self._reset_counters()

    def _reset_counters(self):
        self.seen = 0  # logical tokens seen, padding included
        self.calls = 0  # attention calls (chunks) so far; the first is the prefill
        self.prefill_seen = 0  # tokens the first call (the prefill) brought
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.budget: int | None = None  # this layer's budget (the largest row's), None = never evict
        self.row_budgets: torch.Tensor | None = None  # (batch,) budget of each row
        self.sink_end: torch.Tensor | None = None  # (batch, 1, 1) first position after each row's sinks
        self.compacted = False  # stored slots are no longer the contiguous run 0..seen-1
        self.awaiting_attention = False
        self.incoming: tuple[torch.Tensor, int] | None = None  # positions and advance of the next update's tokens
        self._caller_mask = False  # this step's mask came with `incoming`: prepare passes it on as given
        self.extras: dict[str, torch.Tensor] = {}
        self._key_buffer: torch.Tensor | None = None  # capacity buffers self.keys/values are views of
        self._value_buffer: torch.Tensor | None = None

    def _buffer_names(self) -> tuple[str, ...]:
        return (*self.policy.buffers, "mass") if self.policy.evicted == "merge" else self.policy.buffers

    # -- transformers' layer contract ------------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting_attention:
            raise TokenReductionError(
                f"layer {self.layer_idx}: the previous step's attention did not run through hf_tokred's attention "
                "function, so the cache could not evict; keep the model's attn_implementation set by hf_tokred "
                f"(one of {sorted(STOCK_IMPLEMENTATIONS)})"
            )
        batch, heads, new = key_states.shape[:3]
        incoming, self.incoming = self.incoming, None
        first = self.seen == 0
        if first:  # None means never evict; the per-row budgets are set once the padding is known (observe)
            budget = self.policy.budget(new)
            self.budget = None if budget is None else self.policy.layer_budget(budget, self.rank, self.num_layers)
        if self.store is not None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self.store.append(key_states, value_states)
            self.keys, self.values = keys, values  # transient full-precision copies, released after attention
        elif self.compacted:
            keys, values = self._append(key_states, value_states)
        else:
            keys, values = super().update(key_states, value_states)
        device = key_states.device
        if incoming is not None:  # a subset of this step's tokens, at their own positions
            step = incoming[0].to(device)[:, None, :].expand(batch, heads, new)
            self._caller_mask = self.compacted = True
        else:
            step = torch.arange(self.seen, self.seen + new, device=device).expand(batch, heads, new)
        ones = torch.ones(batch, heads, new, dtype=torch.bool, device=device)
        if first:
            self.positions, self.valid = step, ones
        else:
            self.positions = torch.cat([self.positions, step], dim=-1)
            self.valid = torch.cat([self.valid, ones], dim=-1)
        for name in self._buffer_names():
            fill = torch.ones if name == "mass" else torch.zeros
            old = self.buffers.get(name)
            shape = (batch, heads, new, *(() if old is None else old.shape[3:]))
            fresh = fill(shape, dtype=torch.float32, device=device)
            self.buffers[name] = fresh if old is None else torch.cat([old, fresh], dim=2)
        self.seen += new if incoming is None else incoming[1]
        self.calls += 1
        if first:
            self.prefill_seen = self.seen
        self.awaiting_attention = True
        return keys, values

    def _append(self, key_states, value_states):
        """Write new slots into the spare capacity (no copy of the stored cache, unlike ``torch.cat``)."""
        stored, new = self.stored_length(), key_states.shape[-2]
        if not self._holds_buffer() or self._key_buffer.shape[-2] < stored + new:
            self._allocate(stored + new + self._headroom())
        self._key_buffer[..., stored : stored + new, :] = key_states
        self._value_buffer[..., stored : stored + new, :] = value_states
        self.keys = self._key_buffer[..., : stored + new, :]
        self.values = self._value_buffer[..., : stored + new, :]
        return self.keys, self.values

    def _headroom(self) -> int:
        return PREFILL_POLICY_HEADROOM if self.policy.compression == "prefill" else self.policy.compress_every

    def _allocate(self, capacity: int) -> None:
        stored = self.stored_length()
        for name in ("keys", "values"):
            current = getattr(self, name)
            buffer = current.new_empty(*current.shape[:2], capacity, current.shape[-1])
            buffer[..., :stored, :] = current
            setattr(self, f"_{name[:-1]}_buffer", buffer)
            setattr(self, name, buffer[..., :stored, :])

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1 if self.budget is None else self.budget

    def stored_length(self) -> int:
        """Slots this layer holds now."""
        if self.store is not None:
            return self.store.length
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def kv_bytes(self) -> int:
        """Bytes of the key/value tensors this layer holds, spare capacity included."""
        if self.store is not None:
            return self.store.nbytes()
        if not self.stored_length():
            return 0
        held = (self._key_buffer, self._value_buffer) if self._holds_buffer() else (self.keys, self.values)
        return sum(t.numel() * t.element_size() for t in held)

    def _holds_buffer(self) -> bool:
        return self._key_buffer is not None and self.keys.data_ptr() == self._key_buffer.data_ptr()

    def reset(self) -> None:
        super().reset()
        self._reset_counters()

    def _map_slot_state(self, fn) -> None:
        """Apply a batch-dimension operation to the bookkeeping that travels with the slots."""
        if self.positions is not None:
            self.positions, self.valid = fn(self.positions), fn(self.valid)
            self.buffers = {name: fn(t) for name, t in self.buffers.items()}
        if self.row_budgets is not None:
            self.row_budgets, self.sink_end = fn(self.row_budgets), fn(self.sink_end)
        self.extras = {name: fn(t) for name, t in self.extras.items()}
        self._key_buffer = self._value_buffer = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store is not None:
            self.store.select_batch(beam_idx)
        else:
            super().reorder_cache(beam_idx)
        self._map_slot_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.store.repeat_batch(repeats)
        else:
            super().batch_repeat_interleave(repeats)
        self._map_slot_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            self.store.select_batch(indices)
        else:
            super().batch_select_indices(indices)
        self._map_slot_state(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the newest ``-tokens_to_remove`` tokens (transformers' convention: a negative count), exactly
        as if they had never been fed. Only a croppable layer (a policy that compresses the prompt once, no
        window, no compressed store) can, and only tokens appended after its compression."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        self.keep_newest(-tokens_to_remove, [])

    def keep_newest(self, count: int, rows: list[int]) -> None:
        """Of the newest ``count`` tokens keep only ``rows`` (ascending indices among them), exactly as if only
        those had been fed, in that order (a tree verification's accepted path; ``rows=[]`` is :meth:`crop`). The
        same layers and tokens as :meth:`crop` can."""
        if count == 0:
            return
        if not self.is_croppable:
            raise TokenReductionError(
                f"{self.label}: this cache cannot be cropped (assisted decoding and other crop users): it evicts or "
                "compresses tokens while decoding, so older slots already depend on the tokens to take back; "
                f"use a policy that compresses the prompt once ({', '.join(prompt_once_policies())}) or the dense cache"
            )
        if self.positions is None:
            return
        stored = self.stored_length()
        newest = torch.arange(self.seen - count, self.seen, device=self.positions.device)
        if (count > stored or self.seen - count < self.prefill_seen
                or not bool((self.positions[..., stored - count:] == newest).all())):
            raise TokenReductionError(
                f"{self.label}: crop can take back only tokens appended after the prompt was compressed; "
                f"{count} of the {self.seen} tokens seen were asked for"
            )
        start, kept = stored - count, len(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.keys.device)
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            if kept:  # in place, so capacity buffers stay in use
                tensor[..., start:start + kept, :] = tensor[..., start:, :].index_select(-2, index)
            setattr(self, name, tensor[..., : start + kept, :])
        slots = {name: torch.cat([t[:, :, :start], t[:, :, start:].index_select(2, index.to(t.device))], dim=2)
                 for name, t in self._slot_tensors().items()}
        slots["positions"][..., start:] = newest[:kept]  # the kept tokens take the first positions, in turn
        self._set_slot_tensors(slots)
        self.seen -= count - kept

    # -- attention observer --------------------------------------------------------------------

    def prepare(self, module, query, key, value, attention_mask):
        q = query.shape[-2]
        if attention_mask is not None:
            # Every real key is visible to the query at its own position (causal, inside any window) and padding
            # to none, so the diagonal of the new block marks the new padding.
            new_valid = mask_keep(attention_mask)[:, 0, :, -q:].diagonal(dim1=-2, dim2=-1)
            self.valid[..., -q:] = new_valid[:, None, :].expand(self.valid.shape[0], -1, -1)
        if self._caller_mask:  # the caller that fed a subset of the step's tokens built this mask for them
            self._caller_mask = False
            return attention_mask
        if not self.compacted and (attention_mask is None or attention_mask.shape[-1] == key.shape[-2]):
            return attention_mask  # slots still map to the contiguous positions the mask describes
        old_valid = self.valid[..., :-q]
        if attention_mask is None and self.sliding_window is None and bool(old_valid.all()):
            return None
        return self._stored_slot_mask(old_valid, attention_mask, query)

    def _stored_slot_mask(self, old_valid, attention_mask, query):
        batch, heads, q = query.shape[0], query.shape[1], query.shape[-2]
        kv_heads = old_valid.shape[1]
        visible = old_valid[:, :, None, :]
        if self.sliding_window is not None:  # a stored slot leaves the window of the later queries first
            query_pos = torch.arange(self.seen - q, self.seen, device=query.device)
            old_pos = self.positions[..., :-q]
            visible = visible & (old_pos[:, :, None, :] > query_pos[:, None] - self.sliding_window)
        if bool((visible == visible[:, :1]).all()):
            stored = visible[:, :1]
        else:  # per-head selections: expand KV heads to the query heads they serve (GQA)
            stored = visible.repeat_interleave(heads // kv_heads, dim=1)
        stored = stored.expand(batch, stored.shape[1], q, stored.shape[-1])
        if attention_mask is not None:
            new = mask_keep(attention_mask)[..., -q:]
        else:
            new = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
            if self.sliding_window is not None:
                new = new.triu(1 - self.sliding_window)
            new = new[None, None]
        new = new.expand(batch, stored.shape[1] if new.shape[1] == 1 else new.shape[1], q, q)
        if new.shape[1] != stored.shape[1]:
            width = max(new.shape[1], stored.shape[1])
            new, stored = new.expand(batch, width, q, q), stored.expand(batch, width, q, stored.shape[-1])
        return mask_like(torch.cat([stored, new], dim=-1), attention_mask)

    def observe(self, module, query, key, value, attention_mask) -> None:
        self.awaiting_attention = False
        try:
            self._evict_if_over_budget(module, query)
        finally:
            if self.store is not None:
                self.store.release()
                self.keys = self.values = None

    def _evict_if_over_budget(self, module, query) -> None:
        with torch.no_grad():
            if self.budget is not None:
                if self.calls == 1:
                    self._set_row_budgets()  # from the prompt's real lengths, before any window cut
                self.policy.accumulate(self, module, query)
            # A sliding-window layer first drops what left its window, as transformers does: the policy's budget
            # then goes to tokens later queries can still see. (Its scores renormalize over those.)
            self._drop_expired()
            if self.budget is not None:
                self._evict_by_policy(module, query)

    def _evict_by_policy(self, module, query) -> None:
        policy = self.policy
        if policy.compression == "prefill" and self.calls > 1:
            return  # compressed once after the prompt; later tokens are appended
        slack = 0 if policy.compression == "prefill" else policy.compress_every - 1
        targets = (self.row_budgets - slack)[:, None]  # (batch, 1)
        over = (self.valid.sum(dim=-1) > targets).any(dim=-1, keepdim=True)  # rows over their budget
        if not bool(over.any()):
            return
        physical = min(int(targets.max()), self.stored_length())
        scores = policy.score(self, module, query).float()
        limits = targets.expand(self.valid.shape[:2])
        head_budgets = policy.head_budgets(self, module, query, physical)
        if head_budgets is not None:
            limits = torch.minimum(limits, head_budgets)
        # A row within its budget keeps everything, as it would alone.
        limits = torch.where(over, limits, physical)
        # A prompt chunk fed after the first (a question appended to a compressed context) is kept whole:
        # only older tokens make room for it. Single decoding steps follow the policy as is.
        chunk = query.shape[-2] if self.calls > 1 and query.shape[-2] > 1 else 0
        windows = [max(policy.recent_window(int(t)), min(chunk, int(t) - policy.sink_tokens - 1))
                   for t in targets[:, 0].tolist()]
        self.evict(scores, physical, None if bool((limits >= physical).all()) else limits,
                   torch.tensor(windows, device=targets.device)[:, None, None])

    def _drop_expired(self) -> None:
        """A sliding-window layer drops the slots no later query can see (positions at or before ``seen -
        sliding_window``), as ``DynamicSlidingWindowLayer`` does: while the slots are still a contiguous run,
        by cutting off the oldest ones (so transformers' mask keeps describing them), afterwards by a gather."""
        if self.sliding_window is None or self.positions is None:
            return
        live = self.positions > self.seen - self.sliding_window
        if bool(live.all()):
            return
        if not self.compacted:  # the same contiguous run in every row and head
            start = int((~live[0, 0]).sum())
            if self.store is not None:
                index = torch.arange(start, self.stored_length(), device=live.device).expand(*live.shape[:2], -1)
                self.store.gather(index)
            else:
                self.keys, self.values = self.keys[..., start:, :], self.values[..., start:, :]
            self._set_slot_tensors({k: t[:, :, start:] for k, t in self._slot_tensors().items()})
            return
        count = int(live.sum(dim=-1).max())
        keep = live.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., :count].sort(dim=-1).values
        self.valid = self.valid & live  # rows and heads with fewer live slots keep masked-out ones
        if self.store is not None:
            self.store.gather(keep)
            self._gather_slot_state(keep)
        else:
            self._gather(keep)

    def _set_row_budgets(self) -> None:
        """Budgets per row from each row's real prompt length (padding excluded), so that a row keeps as
        many tokens in a padded batch as when run alone."""
        lengths = self.valid[:, 0].sum(dim=-1).tolist()
        budgets = {n: self.policy.layer_budget(self.policy.budget(n), self.rank, self.num_layers) for n in set(lengths)}
        self.row_budgets = torch.tensor([budgets[n] for n in lengths], device=self.valid.device)
        self.budget = int(self.row_budgets.max())
        # The sinks are each row's first real tokens. A sliding-window layer loses them with its window; the
        # position bound keeps the tokens that are oldest *now* from being protected in their place.
        first_real = torch.where(self.valid[:, 0], self.positions[:, 0], self.seen).amin(dim=-1)
        self.sink_end = (first_real + self.policy.sink_tokens)[:, None, None]

    def evict(self, scores: torch.Tensor, budget: int, head_budgets: torch.Tensor | None = None,
              window: torch.Tensor | int | None = None) -> None:
        """Keep ``budget`` slots per row and head: sinks and the recent window first, padding last, the rest by
        ``scores`` (higher kept). With ``head_budgets`` ``(batch, kv_heads)``, a row/head keeps only its own number
        of slots valid (the others stay as masked-out padding so every head has ``budget`` slots). ``window``
        (an int or a ``(batch, 1, 1)`` tensor) defaults to the policy's recent window for ``budget``."""
        window = self.policy.recent_window(budget) if window is None else window
        keep, keep_valid = select_slots(
            scores, self.positions, self.valid, budget, self.policy.sink_tokens, window, self.seen, head_budgets,
            sink_end=self.sink_end if self.sliding_window is not None else None,
        )
        if head_budgets is not None:  # slots beyond a head's own budget stay as masked-out padding
            self.valid = self.valid.scatter(2, keep, keep_valid)
        if self.policy.evicted == "merge":
            self._merge_evicted(keep)
        evicted = self.stored_length() - budget
        if evicted == 0:
            pass  # only validity changed (per-row or per-head budgets below the physical size)
        elif self.store is not None:
            self.store.gather(keep)
            self._gather_slot_state(keep)
        elif self._holds_buffer() and evicted == 1:
            self._move_last_slot(keep, budget)
        elif self._holds_buffer() and evicted <= budget:
            self._fill_holes(keep, budget)
        else:
            self._gather(keep)
        self.compacted = True

    def _slot_tensors(self) -> dict[str, torch.Tensor]:
        return {"positions": self.positions, "valid": self.valid, **{f"buffer:{k}": v for k, v in self.buffers.items()}}

    def _set_slot_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.positions, self.valid = tensors.pop("positions"), tensors.pop("valid")
        self.buffers = {k[len("buffer:"):]: v for k, v in tensors.items()}

    def _gather(self, keep: torch.Tensor) -> None:
        """Copy the kept slots (in ``keep`` order) into fresh buffers with spare capacity."""
        self.keys, self.values = _gather_slots(self.keys, keep), _gather_slots(self.values, keep)
        self._allocate(keep.shape[-1] + self._headroom())
        self._gather_slot_state(keep)

    def _gather_slot_state(self, keep: torch.Tensor) -> None:
        self._set_slot_tensors({k: _gather_slots(t, keep) for k, t in self._slot_tensors().items()})

    def _move_last_slot(self, keep: torch.Tensor, budget: int) -> None:
        """Evict one slot per row and head in place: the last slot moves into the evicted one (what
        :meth:`_fill_holes` does for one slot, without its sorts)."""
        # `keep` is ascending and skips one index per row and head: the count of leading matches is that index.
        hole = (keep == torch.arange(budget, device=keep.device)).sum(dim=-1, keepdim=True)
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            last = tensor[..., budget : budget + 1, :]
            tensor.scatter_(2, hole[..., None].expand_as(last), last.clone())
            setattr(self, name, tensor[..., :budget, :])
        moved = {}
        for key, tensor in self._slot_tensors().items():
            tensor = tensor.clone()
            last = tensor[:, :, budget : budget + 1].clone()
            tensor.scatter_(2, _expand_index(hole, tensor), last)
            moved[key] = tensor[:, :, :budget]
        self._set_slot_tensors(moved)

    def _fill_holes(self, keep: torch.Tensor, budget: int) -> None:
        """Evict in place: kept slots beyond ``budget`` move into the evicted slots below it, so only the
        moved slots are copied (slot order then no longer follows position; nothing depends on it)."""
        stored = self.stored_length()
        evicted = stored - budget
        kept = torch.zeros_like(self.valid).scatter_(2, keep, True)
        # Slots below `budget` that are evicted (holes) and slots at or above it that are kept (movers) come
        # in equal numbers per row and head; pair them in slot order, padding unused pairs with a no-op copy
        # of the last slot onto itself (it is cut off below).
        holes = (~kept[..., :budget]).to(torch.uint8).sort(dim=-1, descending=True, stable=True)
        movers = kept[..., budget:].to(torch.uint8).sort(dim=-1, descending=True, stable=True)
        hole_index = holes.indices[..., :evicted]
        paired = holes.values[..., :evicted].bool()
        last = torch.full_like(hole_index, stored - 1)
        source = torch.where(paired, movers.indices + budget, last)
        target = torch.where(paired, hole_index, last)
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            index = source[..., None].expand(-1, -1, -1, tensor.shape[-1])
            tensor.scatter_(2, target[..., None].expand_as(index), tensor.gather(2, index))
            setattr(self, name, tensor[..., :budget, :])
        moved = {}
        for key, tensor in self._slot_tensors().items():
            tensor = tensor.clone()
            index = _expand_index(source, tensor)
            tensor.scatter_(2, _expand_index(target, tensor), tensor.gather(2, index))
            moved[key] = tensor[:, :, :budget]
        self._set_slot_tensors(moved)

    def _merge_evicted(self, keep: torch.Tensor) -> None:
        """Average every evicted real slot into the kept slot (same row and head) whose key is most similar,
        weighted by ``mass`` (how many tokens each slot stands for)."""
        stored, budget = self.stored_length(), keep.shape[-1]
        kept = torch.zeros_like(self.valid).scatter_(2, keep, True)
        dropped = (~kept).to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., : stored - budget]
        mass = self.buffers["mass"] * self.valid
        keys, values = self.keys.float(), self.values.float()
        kept_keys, dropped_keys = _gather_slots(keys, keep), _gather_slots(keys, dropped)
        similarity = torch.nn.functional.normalize(dropped_keys, dim=-1) @ torch.nn.functional.normalize(
            kept_keys, dim=-1).transpose(-1, -2)
        similarity = similarity.masked_fill(~_gather_slots(self.valid, keep)[:, :, None, :], float("-inf"))
        partner = similarity.argmax(dim=-1)  # (batch, kv_heads, dropped) index into keep
        dropped_mass = _gather_slots(mass, dropped)
        kept_mass = _gather_slots(mass, keep)
        total = kept_mass.scatter_add(2, partner, dropped_mass)
        for name, full in (("keys", keys), ("values", values)):
            weighted = _gather_slots(full, keep) * kept_mass[..., None]
            index = partner[..., None].expand(-1, -1, -1, full.shape[-1])
            weighted = weighted.scatter_add(2, index, _gather_slots(full, dropped) * dropped_mass[..., None])
            merged = torch.where(total[..., None] > 0, weighted / total.clamp_min(1e-12)[..., None],
                                 _gather_slots(full, keep))
            tensor = getattr(self, name)
            tensor.scatter_(2, keep[..., None].expand(-1, -1, -1, tensor.shape[-1]), merged.to(tensor.dtype))
        self.buffers["mass"] = self.buffers["mass"].scatter(2, keep, torch.where(total > 0, total, kept_mass))


def partial_prompt_reducer(config: TokenReductionConfig) -> TokenReductionConfig | None:
    """The reducer of ``config`` after which some decoder layers hold only part of the prompt (a prefill reducer,
    lazyllm, or a visual-token method), or None; it says which layers with ``subset_layers(model)``.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> partial_prompt_reducer(TokenReductionConfig(method="fastv")).method
        'fastv'
    """
    return config.get("prefill") or config.get("visual")


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.view(*index.shape, *([1] * (like.dim() - 3))).expand(*index.shape, *like.shape[3:])


def _gather_slots(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, h, index[b, h, i], ...]`` for a ``(batch, kv_heads, slots, ...)`` tensor."""
    return tensor.gather(2, _expand_index(index, tensor))


def select_slots(scores, positions, valid, budget, sink_tokens, window, seen, head_budgets=None, sink_end=None):
    """Indices (ascending) of the ``budget`` slots to keep per row and head, and which of them stay valid.

    Protected slots (the ``sink_tokens`` earliest real tokens of each row, or with ``sink_end`` ``(batch, 1,
    1)`` the real tokens before that position, and the last ``window`` positions) outrank every scored slot,
    padding ranks below everything, and ties go to the later position. With ``head_budgets`` ``(batch,
    kv_heads)`` only each head's best ``head_budgets`` kept slots stay valid. Slot order does not matter
    (positions say where each slot belongs).

    Example:
        >>> import torch
        >>> pos = torch.arange(10).expand(1, 1, 10)
        >>> valid = torch.ones(1, 1, 10, dtype=torch.bool)
        >>> keep, keep_valid = select_slots(torch.zeros(1, 1, 10), pos, valid, 5, 2, 3, 10)
        >>> keep.tolist()
        [[[0, 1, 7, 8, 9]]]
    """
    if sink_end is not None:
        sinks = valid & (positions < sink_end)
    elif sink_tokens > 0:
        real_positions = torch.where(valid, positions, torch.iinfo(positions.dtype).max)
        last_sink = real_positions.topk(min(sink_tokens, positions.shape[-1]), dim=-1, largest=False).values[..., -1:]
        sinks = valid & (positions <= last_sink)
    else:
        sinks = torch.zeros_like(valid)
    recent = valid & (positions >= seen - window)
    ranked = torch.where(valid, scores, torch.finfo(scores.dtype).min)
    ranked = torch.where(sinks | recent, torch.inf, ranked)
    slots = positions.shape[-1]
    if slots - budget == 1 and head_budgets is None:
        # One slot out (a decoding step of a per-step policy): the lowest score, the earliest position among
        # equal ones -- the slot the sorts below would leave last -- found in O(slots) instead of two sorts.
        lowest = ranked == ranked.amin(dim=-1, keepdim=True)
        victim = torch.where(lowest, positions, torch.iinfo(positions.dtype).max).argmin(dim=-1, keepdim=True)
        index = torch.arange(budget, device=positions.device)
        keep = index + (index >= victim).to(index.dtype)
        return keep, valid.gather(-1, keep)
    # Later positions first, then a stable sort by score: equal scores keep the later token.
    by_position = positions.argsort(dim=-1, descending=True)
    order = ranked.gather(-1, by_position).sort(dim=-1, descending=True, stable=True).indices
    chosen = by_position.gather(-1, order[..., :budget])
    keep, rank = chosen.sort(dim=-1)
    keep_valid = valid.gather(-1, keep)
    if head_budgets is not None:
        keep_valid = keep_valid & (rank < head_budgets[..., None])
    return keep, keep_valid


class TokenReductionCache(Cache):
    """A ``transformers.Cache`` that keeps at most a policy's budget of tokens per layer.

    Build it with :func:`hf_tokred.build_cache` (``generate()`` does so by itself when a KV policy is
    attached). It needs the model's attention to run through hf_tokred's registered function, which
    ``hf_tokred.apply`` sets. The layers the policy and storage act on (their ``layers`` option) are
    :class:`ReducingLayer`; the others are transformers' own layer for their type (``layer_types`` lists
    each layer's type). ``stored_lengths()``, ``kv_bytes()`` and ``kv_bytes_by_type()`` cover both kinds.

    Example:
        >>> cache = hf_tokred.build_cache(model)                        # doctest: +SKIP
        >>> model.generate(**inputs, past_key_values=cache)             # doctest: +SKIP
        >>> cache.kv_bytes()                                            # doctest: +SKIP
    """

    def __init__(self, model, policy: KVPolicyConfig | None = None, storage=None):
        from ..integration.wiring import get_applied
        from ..model_patches import find_adapter

        # apply() found the adapter once; generate() builds a cache per call, so it is not detected again
        applied = get_applied(model)
        # A prefill reducer attached to the model (LazyLLM) feeds later layers only part of the prompt: those layers
        # track their slots' positions (ReducingLayer, evicting nothing unless a policy acts on them too).
        prefill = partial_prompt_reducer(applied.config) if applied is not None else None
        subset = prefill.subset_layers(model) if prefill is not None else []
        if policy is None and storage is None and not subset:
            raise TokenReductionError("TokenReductionCache needs a KV policy, a KV storage, or both")
        label = "+".join(c.method for c in (prefill, policy, storage) if c is not None)
        adapter = applied.adapter if applied is not None else find_adapter(model)
        if not adapter.has_kv_cache:
            raise UnsupportedModelError(f"{type(model).__name__} has no KV cache; {label} needs one")
        attn = model.config._attn_implementation
        if attn not in STOCK_IMPLEMENTATIONS:
            raise TokenReductionError(
                f"{label}: the model's attn_implementation is {attn!r}; a TokenReductionCache needs "
                f"hf_tokred's attention ({', '.join(sorted(STOCK_IMPLEMENTATIONS))}); use hf_tokred.apply(model, cfg)"
            )
        types, type_kwargs = kv_layer_types(model, label)
        modules = adapter.attention_modules(model)
        self._attention_modules = {m.layer_idx: m for m in modules}
        never = TokenReductionConfig(method="streamingllm", keep=1.0)  # what storage-only layers run: no eviction
        policy_layers = check_layers(policy, model) if policy is not None else []
        storage_layers = check_layers(storage, model) if storage is not None else []
        policy = never if policy is None else policy.bind(model)
        self.policy, self.storage, self.label = policy, storage, label
        self.shared: dict = {"token_ids": None}
        self.layer_types = types
        stores = dict(zip(storage_layers, storage.make_stores(storage_layers, model))) if storage is not None else {}
        ranks = {layer: rank for rank, layer in enumerate(policy_layers)}
        layers = []
        for index, (layer_type, kwargs) in enumerate(zip(types, type_kwargs)):
            if index in ranks or index in stores or index in subset:
                window = kwargs.get("sliding_window") if layer_type == SLIDING_ATTENTION else None
                croppable = (index not in stores and index not in subset and window is None
                             and (index not in ranks or policy.compression == "prefill"))
                layers.append(ReducingLayer(policy if index in ranks else never, index, max(len(ranks), 1),
                                            stores.get(index), label, self.shared, rank=ranks.get(index, 0),
                                            sliding_window=window, croppable=croppable))
            else:  # a layer the reduction leaves alone: transformers' own, exactly as DynamicCache(config) builds it
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the newest ``-tokens_to_remove`` tokens in every layer (assisted decoding's rollback); see
        :meth:`ReducingLayer.crop` for when a reduced layer can.

        Example:
            >>> cache.crop(-3)                       # doctest: +SKIP
        """
        known = self.shared["token_ids"]
        refusing = self._uncroppable_layer()
        if refusing is not None and tokens_to_remove < 0:
            refusing.crop(tokens_to_remove)  # raises its error before any layer has changed
        super().crop(tokens_to_remove)
        if known is not None and tokens_to_remove < 0:
            self.shared["token_ids"] = known[:, :tokens_to_remove]

    def keep_newest(self, count: int, rows: list[int]) -> None:
        """Of the newest ``count`` tokens of every layer keep only ``rows`` (ascending indices among them), as if
        only those had been fed (a tree verification's accepted path); the layers and tokens :meth:`crop` can take
        back. Refused before any layer changes when a reduced layer cannot.

        Example:
            >>> cache.keep_newest(9, [0, 1, 4])     # the root and two accepted nodes of a tree of 8   # doctest: +SKIP
        """
        if count == 0:
            return
        refusing = layer_refusing_keep_newest(self)
        if isinstance(refusing, ReducingLayer):
            refusing.keep_newest(count, rows)  # raises its error before any layer has changed
        if refusing is not None:
            raise TokenReductionError(f"{self.label}: keep_newest needs full-attention layers; this cache has a "
                                      f"{type(refusing).__name__}, whose dropped tokens cannot be taken back exactly")
        for layer in self.layers:
            if isinstance(layer, ReducingLayer):
                layer.keep_newest(count, rows)
            else:
                _keep_newest_in_layer(layer, count, rows)
        known = self.shared["token_ids"]
        if known is not None:
            newest = known[:, known.shape[1] - count:][:, rows]
            self.shared["token_ids"] = torch.cat([known[:, : known.shape[1] - count], newest], dim=-1)

    def _uncroppable_layer(self) -> ReducingLayer | None:
        return next((layer for layer in self.layers if isinstance(layer, ReducingLayer) and not layer.is_croppable),
                    None)

    def record_input_ids(self, input_ids: torch.Tensor) -> None:
        """Remember the token ids fed to the model (policies with ``needs_token_ids`` read them)."""
        known = self.shared["token_ids"]
        self.shared["token_ids"] = input_ids if known is None else torch.cat([known, input_ids.to(known.device)], -1)

    def __deepcopy__(self, memo):
        # A copy (one compressed context reused for several questions) binds to the same model: share the
        # attention modules instead of copying them.
        memo[id(self._attention_modules)] = self._attention_modules
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            setattr(copied, name, copy.deepcopy(value, memo))
        return copied

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        module = self._attention_modules.get(layer_idx)
        layer = self.layers[layer_idx]
        if module is not None and isinstance(layer, ReducingLayer):
            set_transient_observer(module, layer)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stored_lengths(self) -> list[int]:
        """Slots each layer holds now (the physical cache size; ``get_seq_length()`` is tokens seen), for the
        reduced layers and those left to transformers alike."""
        return [layer_stored_length(layer) for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes of the key/value tensors the cache holds now (every layer)."""
        return sum(layer_kv_bytes(layer) for layer in self.layers)

    def kv_bytes_by_type(self) -> dict[str, int]:
        """:meth:`kv_bytes` split by layer type, e.g. ``{"full_attention": n, "sliding_attention": m}``.

        Example:
            >>> cache.kv_bytes_by_type()                                    # doctest: +SKIP
            {'sliding_attention': 3584, 'full_attention': 1536}
        """
        totals: dict[str, int] = {}
        for layer_type, layer in zip(self.layer_types, self.layers):
            totals[layer_type] = totals.get(layer_type, 0) + layer_kv_bytes(layer)
        return totals


def keep_newest_entries(cache, count: int, rows: list[int]) -> None:
    """Keep, of the newest ``count`` entries of every layer of ``cache`` (a :class:`TokenReductionCache` whose reduced
    layers can be cropped, or transformers' ``DynamicCache``), only ``rows`` (ascending indices among those
    ``count``): a tree verification's accepted path, as if only those tokens had been fed.

    Example:
        >>> keep_newest_entries(cache, 9, [0, 1, 4])   # the root and two accepted nodes of 8   # doctest: +SKIP
    """
    if isinstance(cache, TokenReductionCache):
        cache.keep_newest(count, rows)
        return
    for layer in cache.layers:
        _keep_newest_in_layer(layer, count, rows)


def layer_refusing_keep_newest(cache):
    """The first layer of ``cache`` whose newest tokens cannot be taken back exactly, or None: a reduced layer that
    evicts, compresses or slides a window (not croppable), or a transformers layer other than a full-attention
    ``DynamicLayer`` (a sliding window drops what leaves it).

    Example:
        >>> from transformers import DynamicCache
        >>> layer_refusing_keep_newest(DynamicCache()) is None
        True
    """
    for layer in cache.layers:
        if (not layer.is_croppable) if isinstance(layer, ReducingLayer) else type(layer) is not DynamicLayer:
            return layer
    return None


def _keep_newest_in_layer(layer, count: int, rows: list[int]) -> None:
    """``keep_newest`` for one of transformers' full-attention ``DynamicLayer`` (its length is its keys')."""
    if not layer.is_initialized or count == 0:
        return
    index = torch.tensor(rows, dtype=torch.long, device=layer.keys.device)
    newest_keys, newest_values = layer.keys[..., -count:, :], layer.values[..., -count:, :]
    layer.keys = torch.cat([layer.keys[..., :-count, :], newest_keys.index_select(-2, index)], dim=-2)
    layer.values = torch.cat([layer.values[..., :-count, :], newest_values.index_select(-2, index)], dim=-2)


def layer_stored_length(layer) -> int:
    """Slots one cache layer holds: a :class:`ReducingLayer`'s, or a transformers layer's (``DynamicLayer``,
    ``DynamicSlidingWindowLayer``) keys along the sequence (0 before its first update).

    Example:
        >>> import torch
        >>> from transformers.cache_utils import DynamicLayer
        >>> layer = DynamicLayer()
        >>> _ = layer.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
        >>> layer_stored_length(layer), layer_kv_bytes(layer)
        (5, 320)
    """
    if isinstance(layer, ReducingLayer):
        return layer.stored_length()
    return 0 if not layer.is_initialized or layer.keys is None else layer.keys.shape[-2]


def layer_kv_bytes(layer) -> int:
    """Bytes of the key/value tensors one cache layer holds (a :class:`ReducingLayer` counts its compressed
    store or spare capacity; see :meth:`ReducingLayer.kv_bytes`)."""
    if isinstance(layer, ReducingLayer):
        return layer.kv_bytes()
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
