"""`TokenReductionCache`: a `transformers.Cache` whose layers evict by a KV policy.

Each layer follows transformers' ``DynamicSlidingWindowLayer`` contract: ``update()`` appends and
returns the full keys/values for this step's attention, ``get_seq_length()`` is the number of tokens
*seen* (so RoPE positions stay absolute), and ``get_mask_sizes(q)`` returns ``(stored + q, seen -
stored)``. Eviction happens right after the step's attention, inside hf_tokred's registered attention
function, where the layer also learns which new tokens are padding.

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

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import STOCK_IMPLEMENTATIONS, AttentionObserver, mask_keep, mask_like, set_transient_observer
from ..errors import TokenReductionError, UnsupportedModelError
from .policy import KVPolicyConfig


class ReducingLayer(DynamicLayer, AttentionObserver):
    """One layer of a :class:`TokenReductionCache`: a ``DynamicLayer`` that evicts by a policy."""

    is_croppable = False  # evicted tokens cannot be restored, so assisted decoding cannot crop

    def __init__(self, policy: KVPolicyConfig, layer_idx: int):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self._reset_counters()

    def _reset_counters(self):
        self.seen = 0  # logical tokens seen, padding included
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, stored) logical position of each slot
        self.valid: torch.Tensor | None = None  # (batch, kv_heads, stored) False for padding
        self.budget: int | None = None
        self.compacted = False  # stored slots are no longer the contiguous run 0..seen-1
        self.awaiting_attention = False

    # -- transformers' layer contract ------------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting_attention:
            raise TokenReductionError(
                f"layer {self.layer_idx}: the previous step's attention did not run through hf_tokred's attention "
                "function, so the cache could not evict; keep the model's attn_implementation set by hf_tokred "
                f"(one of {sorted(STOCK_IMPLEMENTATIONS)})"
            )
        first = not self.is_initialized or self.keys.numel() == 0
        keys, values = super().update(key_states, value_states)
        batch, heads, new = key_states.shape[:3]
        step = torch.arange(self.seen, self.seen + new, device=key_states.device).expand(batch, heads, new)
        ones = torch.ones(batch, heads, new, dtype=torch.bool, device=key_states.device)
        if first:
            self.positions, self.valid = step, ones
            self.budget = self.policy.budget(new)
        else:
            self.positions = torch.cat([self.positions, step], dim=-1)
            self.valid = torch.cat([self.valid, ones], dim=-1)
        self.seen += new
        self.awaiting_attention = True
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1 if self.budget is None else self.budget

    def stored_length(self) -> int:
        """Slots this layer holds now."""
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self._reset_counters()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices, ...]
            self.valid = self.valid[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        raise TokenReductionError(
            f"{self.policy.method}: an evicting cache cannot be cropped (assisted decoding and other crop users "
            "are not supported); use the dense cache for them"
        )

    # -- attention observer --------------------------------------------------------------------

    def prepare(self, module, query, key, value, attention_mask):
        q = query.shape[-2]
        if attention_mask is not None:
            # The last query of every row sees every real key, so its mask row marks the new padding.
            new_valid = mask_keep(attention_mask)[:, 0, -1, -q:]
            self.valid[..., -q:] = new_valid[:, None, :].expand(self.valid.shape[0], -1, -1)
        if not self.compacted:
            return attention_mask  # slots still map to the contiguous positions the mask describes
        old_valid = self.valid[..., :-q]
        if attention_mask is None and bool(old_valid.all()):
            return None
        return self._stored_slot_mask(old_valid, attention_mask, query)

    def _stored_slot_mask(self, old_valid, attention_mask, query):
        batch, heads, q = query.shape[0], query.shape[1], query.shape[-2]
        kv_heads = old_valid.shape[1]
        if bool((old_valid == old_valid[:, :1]).all()):
            stored = old_valid[:, :1]
        else:  # per-head selections: expand KV heads to the query heads they serve (GQA)
            stored = old_valid.repeat_interleave(heads // kv_heads, dim=1)
        stored = stored[:, :, None, :].expand(batch, stored.shape[1], q, stored.shape[-1])
        if attention_mask is not None:
            new = mask_keep(attention_mask)[..., -q:]
        else:
            new = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()[None, None]
        new = new.expand(batch, stored.shape[1] if new.shape[1] == 1 else new.shape[1], q, q)
        if new.shape[1] != stored.shape[1]:
            width = max(new.shape[1], stored.shape[1])
            new, stored = new.expand(batch, width, q, q), stored.expand(batch, width, q, stored.shape[-1])
        return mask_like(torch.cat([stored, new], dim=-1), attention_mask)

    def observe(self, module, query, key, value, attention_mask) -> None:
        self.awaiting_attention = False
        if self.budget is None or self.stored_length() <= self.budget:
            return
        with torch.no_grad():
            scores = self.policy.score(self.positions, query, self.keys).float()
            self.evict(scores, self.budget)

    def evict(self, scores: torch.Tensor, budget: int) -> None:
        """Keep ``budget`` slots per row and head: sinks and the recent window first, padding last,
        the rest by ``scores`` (higher kept)."""
        keep = select_slots(
            scores, self.positions, self.valid, budget, self.policy.sink_tokens,
            self.policy.recent_window(budget), self.seen,
        )
        index = keep[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, index)
        self.values = self.values.gather(2, index)
        self.positions = self.positions.gather(2, keep)
        self.valid = self.valid.gather(2, keep)
        self.compacted = True


def select_slots(scores, positions, valid, budget, sink_tokens, window, seen):
    """Indices (sorted by position) of the ``budget`` slots to keep, per row and head.

    Protected slots (the first ``sink_tokens`` real tokens of each row and the last ``window``
    positions) outrank every scored slot, and padding ranks below everything.

    Example:
        >>> import torch
        >>> pos = torch.arange(10).expand(1, 1, 10)
        >>> valid = torch.ones(1, 1, 10, dtype=torch.bool)
        >>> select_slots(torch.zeros(1, 1, 10), pos, valid, 5, 2, 3, 10).tolist()
        [[[0, 1, 7, 8, 9]]]
    """
    sinks = valid & (valid.cumsum(-1) <= sink_tokens)
    recent = valid & (positions >= seen - window)
    ranked = torch.where(valid, scores, torch.finfo(scores.dtype).min)
    ranked = torch.where(sinks | recent, torch.inf, ranked)
    # Among equal scores keep the later slot, so ties resolve towards recency deterministically.
    order = torch.arange(ranked.shape[-1], device=ranked.device, dtype=ranked.dtype) * 1e-9
    keep = (ranked + order).topk(budget, dim=-1).indices
    return keep.sort(dim=-1).values


class TokenReductionCache(Cache):
    """A ``transformers.Cache`` that keeps at most a policy's budget of tokens per layer.

    Build it with :func:`hf_tokred.build_cache` (``generate()`` does so by itself when a KV policy is
    attached). It needs the model's attention to run through hf_tokred's registered function, which
    ``hf_tokred.apply`` sets.

    Example:
        >>> cache = hf_tokred.build_cache(model)                        # doctest: +SKIP
        >>> model.generate(**inputs, past_key_values=cache)             # doctest: +SKIP
        >>> cache.kv_bytes()                                            # doctest: +SKIP
    """

    def __init__(self, model, policy: KVPolicyConfig):
        from ..model_patches import find_adapter

        adapter = find_adapter(model)
        if not adapter.has_kv_cache:
            raise UnsupportedModelError(f"{type(model).__name__} has no KV cache; {policy.method} needs one")
        attn = model.config._attn_implementation
        if attn not in STOCK_IMPLEMENTATIONS:
            raise TokenReductionError(
                f"{policy.method}: the model's attn_implementation is {attn!r}; a TokenReductionCache needs "
                f"hf_tokred's attention ({', '.join(sorted(STOCK_IMPLEMENTATIONS))}); use hf_tokred.apply(model, cfg)"
            )
        text_config = model.config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(
                f"{policy.method}: layers of types {sorted(set(layer_types) - {'full_attention'})} are not supported; "
                "only full-attention layers can evict"
            )
        modules = adapter.attention_modules(model)
        self._attention_modules = {m.layer_idx: m for m in modules}
        self.policy = policy
        super().__init__(layers=[ReducingLayer(policy, i) for i in range(text_config.num_hidden_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        module = self._attention_modules.get(layer_idx)
        if module is not None:
            set_transient_observer(module, self.layers[layer_idx])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stored_lengths(self) -> list[int]:
        """Slots each layer holds now (the physical cache size; ``get_seq_length()`` is tokens seen)."""
        return [layer.stored_length() for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes of the key/value tensors the cache holds now."""
        total = 0
        for layer in self.layers:
            if layer.stored_length():
                total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        return total
