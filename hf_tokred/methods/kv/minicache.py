"""MiniCache: KV-cache compression across depth (Liu et al., NeurIPS'24, arXiv 2405.14366).

From ``start_layer`` on, adjacent layers ``(l, l + 1)`` share one cache. Every token's key (and value)
in the two layers is split into a magnitude and a direction; the two directions are merged by
spherical linear interpolation (SLERP, weight ``interpolation`` towards the deeper layer) and stored
once, while both magnitudes are kept, so each layer restores ``magnitude_l * merged_direction``.
Tokens whose directions disagree most stay unmerged: a token is *retained* when its angular distance
``d = angle / pi`` (the larger of the key's and the value's) exceeds
``d_min + (1 - retention_threshold) * (d_max - d_min)``, with ``d_min``/``d_max`` the running range seen
by that row and head; a retained token stores the shallower layer's own direction in the shared cache
and the deeper layer's exact vectors on the side, so both layers restore it exactly.

Composition with quantization: ``quantize={"method": "kivi", "bits": 4}`` stores the merged
directions (and the layers outside the merged range) with KIVI, i.e. MiniCache is a storage that
wraps a quantizing store, as in the paper's 4-bit MiniCache. Eviction policies cannot be combined:
the two layers of a pair would evict different tokens of one shared cache.

On models mixing layer kinds (Gemma 2/3, Cohere 2, GPT-OSS: ``config.layer_types``) only adjacent
full-attention layers are merged, and sliding-window layers keep transformers' own window cache: a window
drops tokens, which a shared cache cannot. A model whose full-attention layers are never adjacent from
``start_layer`` on (Gemma 2's alternating layers) is a :class:`~hf_tokred.errors.ConfigError`, as is
``layers="all"`` on a model with sliding-window layers.

Where we depart from the paper: the paper merges after prefill and at fixed intervals during decoding
and defines the retention threshold on a normalized distance per merge; we merge every step's new
tokens as soon as the deeper layer of the pair has computed them (the shallower layer attends to its
exact new tokens, then to merged ones from the next step on) and keep a running distance range so
that one-token decoding steps can retain tokens too. ``start_layer`` at or beyond the number of
layers merges nothing (a no-op: outputs are bit-identical to the dense cache).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="minicache", start_layer=12, retention_threshold=0.05)
    >>> cfg.interpolation
    0.6
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError, TokenReductionError
from ...kv.storage import SCALE_DTYPE, DenseStore, KVStorageConfig, KVStore, tensor_bytes


@register_method("minicache")
@dataclass(kw_only=True)
class MiniCacheConfig(KVStorageConfig):
    """MiniCache storage: ``start_layer`` (first merged layer; default: half the depth),
    ``interpolation`` (SLERP weight) and ``retention_threshold`` (share of the distance range whose
    tokens stay unmerged); ``quantize`` optionally holds a ``kivi`` config for the stored vectors."""

    paper = "2405.14366"
    status = "experimental"  # the evidence: docs/methods.md, "Why each status"
    composes_with_eviction = False  # the two layers of a pair would evict different tokens of one cache

    start_layer: int | None = param(None, int, low=0, optional=True,
                                    help="first layer merged with its successor (None = half the depth)")
    interpolation: float = param(0.6, float, low=0.0, high=1.0, help="SLERP weight of the deeper layer's direction")
    retention_threshold: float = param(0.05, float, low=0.0, high=1.0,
                                       help="top share of the angular-distance range kept unmerged")
    quantize: dict | None = param(None, dict, optional=True,
                                  help='a kivi config for the stored vectors, e.g. {"method": "kivi", "bits": 4}')

    def validate(self) -> None:
        if self.quantize is not None:
            try:
                inner = TokenReductionConfig.from_dict(self.quantize)
            except ConfigError as err:
                raise ConfigError(f"quantize.{err}", field=f"quantize.{err.field or ''}".rstrip(".")) from None
            if inner.method != "kivi":
                raise ConfigError(f"quantize: expected a kivi config, got method {inner.method!r}", field="quantize")
            self.quantize = inner.to_dict()

    def inner_config(self):
        """The KIVI config of ``quantize`` (None = full precision)."""
        return None if self.quantize is None else TokenReductionConfig.from_dict(self.quantize)

    def first_layer(self, num_layers: int) -> int:
        return num_layers // 2 if self.start_layer is None else self.start_layer

    def check_model(self, model) -> None:
        """Raise if the inner KIVI config does not fit ``model``, if the selected layers include sliding-window
        ones (their windows drop tokens, which a pair's shared cache cannot), or if a model mixing layer kinds
        has no two adjacent full-attention layers to merge from ``start_layer`` on."""
        from ...kv.layers import FULL_ATTENTION, kv_layer_types

        super().check_model(model)
        inner = self.inner_config()
        if inner is not None:
            inner.check_model(model)
        types, _ = kv_layer_types(model, self.method)
        selected = self.layer_indices(model)
        name = type(model).__name__
        windowed = [i for i in selected if types[i] != FULL_ATTENTION]
        if windowed:
            fix = ("use layers='full'" if FULL_ATTENTION in types
                   else f"{name} has no full-attention layer, so minicache cannot serve it")
            raise ConfigError(
                f"layers: minicache shares one cache between adjacent layers and cannot drop tokens, so it cannot hold "
                f"the sliding-window layers {windowed} of {name}; {fix}",
                field="layers",
            )
        first = self.first_layer(len(types))
        if first < len(types) and len(selected) < len(types) and not self.pairs(selected, len(types)):
            raise ConfigError(
                f"start_layer: minicache merges adjacent full-attention layers, and {name} has none from layer {first} "
                f"on (its full-attention layers are {selected}; the others slide)",
                field="start_layer",
            )

    def pairs(self, layers: list[int], num_layers: int) -> list[tuple[int, int]]:
        """The merged pairs ``(l, l + 1)`` among ``layers`` (the layers held), from ``start_layer`` on.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="minicache", start_layer=1).pairs([0, 1, 2, 3, 4], 5)
            [(1, 2), (3, 4)]
        """
        held, found, layer = set(layers), [], self.first_layer(num_layers)
        while layer + 1 < num_layers:
            if layer in held and layer + 1 in held:
                found.append((layer, layer + 1))
                layer += 2
            else:
                layer += 1
        return found

    def make_stores(self, layers: list[int], model) -> list[KVStore]:
        from ...integration.wiring import get_applied

        self.check_model(model)
        applied = get_applied(model)
        policy = None if applied is None else applied.config.get("kv_policy")
        if policy is not None:
            raise ConfigError(
                f"method: minicache shares one cache between adjacent layers, which cannot evict different tokens; "
                f"it does not compose with the eviction policy {policy.method!r} (use kivi or kvquant storage)",
                field="method",
            )
        inner = self.inner_config()
        stores: dict[int, KVStore] = {}
        for shallow, deep in self.pairs(layers, model.config.get_text_config(decoder=True).num_hidden_layers):
            pair = MergedPair(DenseStore() if inner is None else inner.make_stores([shallow], model)[0],
                              self.interpolation, self.retention_threshold)
            stores[shallow], stores[deep] = MergedLayerStore(pair, 0), MergedLayerStore(pair, 1)
        for layer in layers:
            if layer not in stores:
                stores[layer] = DenseStore() if inner is None else inner.make_stores([layer], model)[0]
        return [stores[layer] for layer in layers]


def slerp_merge(first: torch.Tensor, second: torch.Tensor, t: float):
    """Split two ``(..., D)`` tensors into norms and directions and merge the directions by SLERP.

    Returns ``(direction, norm_first, norm_second, distance)`` with ``distance = angle / pi`` in
    ``[0, 1]``; all float32.

    Example:
        >>> import torch
        >>> d, n1, n2, dist = slerp_merge(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]]), 0.5)
        >>> [round(x, 4) for x in d[0].tolist()], n1.item(), n2.item(), dist.item()
        ([0.7071, 0.7071], 2.0, 3.0, 0.5)
    """
    a, b = first.float(), second.float()
    norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
    unit_a = a / norm_a.clamp_min(1e-12)[..., None]
    unit_b = b / norm_b.clamp_min(1e-12)[..., None]
    cos = (unit_a * unit_b).sum(-1).clamp(-1.0, 1.0)
    angle = torch.arccos(cos)
    sin = torch.sin(angle)
    small = sin < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    w_a = torch.where(small, torch.full_like(sin, 1 - t), torch.sin((1 - t) * angle) / safe)
    w_b = torch.where(small, torch.full_like(sin, t), torch.sin(t * angle) / safe)
    merged = w_a[..., None] * unit_a + w_b[..., None] * unit_b
    merged = merged / merged.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return merged, norm_a, norm_b, angle / torch.pi


class MergedPair:
    """Shared state of two merged layers: the directions (in an inner store), per-layer magnitudes
    ``(B, H, S, 4)`` (key and value norms of each layer, fp16), and the deeper layer's exact vectors of
    retained tokens (``retained_slots`` ``(B, H, R)``, ``-1`` = unused entry)."""

    def __init__(self, inner: KVStore, interpolation: float, retention_threshold: float):
        self.inner, self.t, self.gamma = inner, interpolation, retention_threshold
        self.magnitudes = self.distance_range = None
        self.retained_slots = self.retained_keys = self.retained_values = None
        self.pending = None

    @property
    def length(self) -> int:
        return self.inner.length

    def nbytes(self) -> int:
        return self.inner.nbytes() + tensor_bytes(self.magnitudes, self.distance_range, self.retained_slots,
                                                  self.retained_keys, self.retained_values)

    def restore(self, directions, values_dir, layer: int, dtype, count: int):
        """Layer ``layer``'s first ``count`` stored vectors from the directions the inner store returned."""
        keys = values = None
        if count:
            mags = self.magnitudes[:, :, :count].float()
            keys = (directions[:, :, :count].float() * mags[..., layer, None]).to(dtype)
            values = (values_dir[:, :, :count].float() * mags[..., 2 + layer, None]).to(dtype)
            if layer == 1 and self.retained_slots is not None and self.retained_slots.shape[-1]:
                slots = self.retained_slots
                b, h, r = ((slots >= 0) & (slots < count)).nonzero(as_tuple=True)
                slots = self.retained_slots[b, h, r].long()
                keys[b, h, slots] = self.retained_keys[b, h, r].to(dtype)
                values[b, h, slots] = self.retained_values[b, h, r].to(dtype)
        return keys, values

    def merge(self, keys_a, values_a, keys_b, values_b):
        """Merge the new tokens of both layers; returns the directions to append to the inner store."""
        if keys_a.shape[2] == 0:
            return keys_a, values_a
        dir_k, ka, kb, dist_k = slerp_merge(keys_a, keys_b, self.t)
        dir_v, va, vb, dist_v = slerp_merge(values_a, values_b, self.t)
        distance = torch.maximum(dist_k, dist_v)  # (B, H, n)
        low, high = distance.amin(-1), distance.amax(-1)
        if self.distance_range is None:
            self.distance_range = torch.stack([low, high], dim=-1)
        else:
            self.distance_range = torch.stack([torch.minimum(self.distance_range[..., 0], low),
                                               torch.maximum(self.distance_range[..., 1], high)], dim=-1)
        low, high = self.distance_range.unbind(-1)
        retained = distance > (low + (1 - self.gamma) * (high - low))[..., None]
        # a retained token keeps the shallower layer's own direction in the shared cache
        unit_a_k = keys_a.float() / ka.clamp_min(1e-12)[..., None]
        unit_a_v = values_a.float() / va.clamp_min(1e-12)[..., None]
        dir_k = torch.where(retained[..., None], unit_a_k, dir_k)
        dir_v = torch.where(retained[..., None], unit_a_v, dir_v)
        mags = torch.stack([ka, kb, va, vb], dim=-1).to(SCALE_DTYPE)
        start = self.length
        self.magnitudes = mags if self.magnitudes is None else torch.cat([self.magnitudes, mags], dim=2)
        self._retain(retained, keys_b, values_b, start)
        return dir_k.to(keys_a.dtype), dir_v.to(values_a.dtype)

    def _retain(self, retained, keys_b, values_b, start: int) -> None:
        batch, heads, n, dim = keys_b.shape
        width = int(retained.sum(-1).max()) if n else 0
        if self.retained_slots is None:
            self.retained_slots = torch.full((batch, heads, 0), -1, dtype=torch.int32, device=keys_b.device)
            self.retained_keys = keys_b.new_empty(batch, heads, 0, dim)
            self.retained_values = values_b.new_empty(batch, heads, 0, dim)
        if width == 0:
            return
        order = torch.sort((~retained).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
        used = retained.gather(2, order)
        slots = torch.where(used, order + start, torch.full_like(order, -1)).to(torch.int32)
        index = order[..., None].expand(-1, -1, -1, dim)
        self.retained_slots = torch.cat([self.retained_slots, slots], dim=2)
        self.retained_keys = torch.cat([self.retained_keys, keys_b.gather(2, index)], dim=2)
        self.retained_values = torch.cat([self.retained_values, values_b.gather(2, index)], dim=2)
        self._compact()

    def _compact(self) -> None:
        """Move unused side entries (slot -1) to the end and cut them off."""
        used = self.retained_slots >= 0
        width = int(used.sum(-1).max()) if used.numel() else 0
        order = torch.sort((~used).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
        self.retained_slots = self.retained_slots.gather(2, order)
        index = order[..., None].expand(-1, -1, -1, self.retained_keys.shape[-1])
        self.retained_keys = self.retained_keys.gather(2, index)
        self.retained_values = self.retained_values.gather(2, index)

    def map_batch(self, fn) -> None:
        for name in ("magnitudes", "distance_range", "retained_slots", "retained_keys", "retained_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))


class MergedLayerStore(KVStore):
    """The view of one layer (``which`` 0 = shallower, 1 = deeper) on a :class:`MergedPair`.

    The shallower layer's new tokens wait (full precision) until the deeper layer of the same forward
    pass brings its own; then both are merged. The pair's memory is counted once, on the shallower view.
    """

    def __init__(self, pair: MergedPair, which: int):
        self.pair, self.which = pair, which

    @property
    def length(self) -> int:
        pending = self.pair.pending
        return self.pair.length + (pending[0].shape[2] if pending is not None and self.which == 0 else 0)

    def nbytes(self) -> int:
        return self.pair.nbytes() if self.which == 0 else 0

    def append(self, keys, values):
        pair = self.pair
        empty = keys[:, :, :0]
        if self.which == 0:
            if pair.pending is not None:
                raise TokenReductionError("minicache: a layer ran twice before its merged partner layer")
            directions = pair.inner.append(empty, values[:, :, :0]) if pair.length else (None, None)
            old_k, old_v = pair.restore(*directions, 0, keys.dtype, pair.length)
            pair.pending = (keys, values)
        else:
            if pair.pending is None or pair.pending[0].shape[2] != keys.shape[2]:
                raise TokenReductionError("minicache: the deeper layer of a merged pair ran without its shallower partner")
            keys_a, values_a = pair.pending
            pair.pending = None
            old = pair.length
            dir_k, dir_v = pair.merge(keys_a, values_a, keys, values)
            directions = pair.inner.append(dir_k, dir_v)
            old_k, old_v = pair.restore(*directions, 1, keys.dtype, old)
        if old_k is None:
            out_k, out_v = keys, values
        else:
            out_k, out_v = torch.cat([old_k, keys], dim=2), torch.cat([old_v, values], dim=2)
        # the directions the inner store returned, the restored vectors and the concatenated output
        restored = tensor_bytes(old_k, old_v)
        self._record_peak(tensor_bytes(out_k, out_v) + 2 * restored)
        return out_k, out_v

    def release(self) -> None:
        self.pair.inner.release()

    def gather(self, index):
        raise TokenReductionError("minicache: merged layers share their slots and cannot evict (no kv_policy with minicache)")

    def select_batch(self, index):
        if self.which == 0:
            self.pair.inner.select_batch(index)
            self.pair.map_batch(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_batch(self, repeats):
        if self.which == 0:
            self.pair.inner.repeat_batch(repeats)
            self.pair.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


__all__ = ["MergedLayerStore", "MergedPair", "MiniCacheConfig", "slerp_merge"]
