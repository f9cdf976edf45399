"""KVQuant: non-uniform, pre-RoPE, dense-and-sparse KV-cache quantization (Hooper et al., NeurIPS'24,
arXiv 2401.18079).

* **Keys per channel, before RoPE.** Keys arrive post-RoPE; the store undoes the rotation with each
  slot's position (``hf_tokred.model_patches.rope``), normalizes every channel by a range calibrated
  offline, quantizes, and re-applies the rotation after dequantization.
* **Values per token**, normalized online by each token's own min/max.
* **Non-uniform codebooks** (``2**bits`` levels per layer, one for keys, one for values), fitted by
  k-means on calibration text with :func:`calibrate`. They are learned artefacts: they live in
  ``model.hf_tokred_modules["kvquant"]`` and save to / load from ``token_reduction.safetensors``.
* **Dense-and-sparse outliers**: the ``ceil(outlier_fraction * head_dim)`` largest-magnitude elements
  of every key and value vector (in normalized units) are kept exactly in fp16 with their channel
  index, and excluded from the normalization range.
* Codes are packed (eight 3-bit codes in three bytes).

Where we depart from the paper: the codebooks come from plain k-means (the paper weights it by
Fisher-information sensitivity, which needs gradients); outliers are a fixed number per vector (the
paper uses a global threshold, so the count per token varies) so that storage stays rectangular
and eviction is a plain gather; dequantization happens per step in chunks rather than in a fused
kernel. For left-padded rows the un-rotation uses the slot's index in the row (padding included), a
fixed rotation offset per row that the un-rotate/re-rotate round trip cancels exactly. The first
``sink_tokens`` (default 1) are kept exactly, as the paper's later revision does for the attention
sink: on SmolLM2-135M the sink's pre-RoPE keys lie far outside the calibrated channel ranges (relative
error above 100% in deep layers when quantized).

Further departures, both off by default except the dtype:

* ``residual`` (default 0 = the paper) also keeps the most recent ``residual`` tokens exactly on the
  side (KIVI's full-precision window, borrowed): their codes stay stored, but attention reads the
  exact copies until ``residual`` newer tokens have arrived. On SmolLM2-135M at 4,096 tokens,
  ``residual=128`` takes 3-bit keys from +2.2% to +1.4% perplexity.
* ``residual_dtype`` (default ``"bfloat16"``) is the dtype of the exact sink and window copies;
  ``"model"`` keeps the compute dtype. A window longer than the sequence with ``"model"`` is a no-op
  (bit-identical to the dense cache).
* Slot positions for the re-rotation are implicit (slot ``i`` holds token ``i``) until the first
  eviction, which stores them (``int32`` per slot and head).

Measured and not adopted: Fisher-weighted k-means (the paper's sensitivity weighting, squared
gradients of the calibration loss w.r.t. the pre-RoPE keys) gave +5.1% (+3.4% without the sink
token's gradients) against +2.2% for plain k-means on SmolLM2-135M, 3-bit keys only; per-channel
instead of per-layer codebooks gave +2.3%.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="kvquant", bits=3)
    >>> cfg.outlier_fraction
    0.01
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...compat import CACHE_KWARG
from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError
from ...kv.storage import (
    SCALE_DTYPE,
    KVStorageConfig,
    KVStore,
    _gather_slots,
    fit_codebook,
    nearest_code,
    pack_codes,
    residual_torch_dtype,
    slots_after_eviction,
    tensor_bytes,
    unpack_codes,
)

MODULE_NAME = "kvquant"


@register_method("kvquant")
@dataclass(kw_only=True)
class KVQuantConfig(KVStorageConfig):
    """KVQuant storage: ``bits`` (2, 3 or 4) and the ``outlier_fraction`` of each vector kept exactly.
    Needs :func:`calibrate` once per model (the result saves with ``save_pretrained``)."""

    paper = "2401.18079"
    status = "beta"
    learned = True

    bits: int = param(3, int, choices=(2, 3, 4), help="bits per stored key/value element")
    outlier_fraction: float = param(0.01, float, low=0.0, high=0.5, high_open=True,
                                    help="fraction of each key/value vector kept exactly (dense-and-sparse)")
    sink_tokens: int = param(1, int, low=0, help="first tokens kept exactly (attention sinks, as in the paper's v4)")
    residual: int = param(0, int, low=0, help="most recent tokens also kept in full precision (0 = as in the paper)")
    residual_dtype: str = param("bfloat16", str, choices=("bfloat16", "float16", "model"),
                                help="dtype of the exact sink and recent-window copies (model = as computed)")

    def outliers(self, head_dim: int) -> int:
        """Outliers kept per vector for a head dimension."""
        return math.ceil(self.outlier_fraction * head_dim - 1e-9)

    def check_model(self, model) -> None:
        """Raise if the head dimension cannot be packed or the rotary embedding of a layer it holds is unknown
        (KVQuant quantizes pre-RoPE keys)."""
        from ...errors import UnsupportedModelError
        from ...model_patches.rope import rotary_for

        super().check_model(model)
        self.check_head_dim(self.head_dim(model))
        for layer in self.layer_indices(model):
            try:
                rotary_for(model, layer)
            except UnsupportedModelError as err:
                raise UnsupportedModelError(f"kvquant quantizes pre-RoPE keys: {err}") from err

    def learned_modules(self, model, adapter):
        self.check_model(model)
        config = model.config.get_text_config(decoder=True)
        device = next(model.parameters()).device
        # one row per decoder layer (indexed by the model's layer index), whether or not the storage holds it
        return {MODULE_NAME: KVQuantCalibration(config.num_hidden_layers, self.kv_heads(model), self.head_dim(model),
                                                self.bits).to(device)}

    def make_stores(self, layers: list[int], model) -> list[KVStore]:
        from ...model_patches.rope import rotary_for

        self.check_model(model)
        calibration = getattr(model, "hf_tokred_modules", {})
        calibration = calibration[MODULE_NAME] if MODULE_NAME in calibration else None
        if calibration is None:
            raise TokenReductionError("kvquant: the model carries no kvquant calibration; attach it with hf_tokred.apply")
        if not bool(calibration.calibrated):
            raise TokenReductionError(
                "kvquant: the codebooks are not calibrated yet; run hf_tokred.calibrate(model, texts) once, with "
                "representative texts (and tokenizer=... unless the model folder holds one; save_pretrained keeps the result)"
            )
        if calibration.key_codebook.shape[-1] != 1 << self.bits:
            raise ConfigError(
                f"bits: the calibration holds {calibration.key_codebook.shape[-1]}-level codebooks, bits={self.bits} "
                f"needs {1 << self.bits}; calibrate again",
                field="bits",
            )
        outliers = self.outliers(self.head_dim(model))
        return [KVQuantStore(calibration, layer, rotary_for(model, layer), self.bits, outliers, self.chunk_tokens,
                             self.sink_tokens, residual=self.residual, residual_dtype=self.residual_dtype)
                for layer in layers]


class KVQuantCalibration(torch.nn.Module):
    """The learned part of KVQuant: per-layer codebooks and pre-RoPE per-channel key ranges.

    Buffers (saved to ``token_reduction.safetensors``): ``key_center``/``key_half`` ``(layers, kv_heads,
    head_dim)`` (pre-RoPE channel centre and half-range), ``key_codebook``/``value_codebook``
    ``(layers, 2**bits)`` (sorted levels in ``[-1, 1]``) and ``calibrated`` (1 once calibrated).

    Example:
        >>> KVQuantCalibration(2, 1, 8, 3).key_codebook.shape
        torch.Size([2, 8])
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, bits: int):
        super().__init__()
        levels = torch.linspace(-1, 1, 1 << bits).expand(layers, -1).clone()
        self.register_buffer("key_center", torch.zeros(layers, kv_heads, head_dim))
        self.register_buffer("key_half", torch.ones(layers, kv_heads, head_dim))
        self.register_buffer("key_codebook", levels)
        self.register_buffer("value_codebook", levels.clone())
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.uint8))


def _top_outliers(normalized: torch.Tensor, count: int) -> torch.Tensor:
    """Channel index (``int64``) of the ``count`` largest-magnitude elements of each vector."""
    return normalized.abs().topk(count, dim=-1).indices


def quantize_keys(pre_rope: torch.Tensor, center, half, codebook, bits: int, outliers: int):
    """Quantize pre-RoPE keys ``(B, H, n, D)``: packed codes, outlier channels, exact outlier values.

    Example:
        >>> import torch
        >>> keys = torch.randn(1, 1, 4, 8)
        >>> codes, index, exact = quantize_keys(keys, torch.zeros(1, 8), torch.ones(1, 8) * 3,
        ...                                     torch.linspace(-1, 1, 8), 3, 1)
        >>> codes.shape, index.shape, exact.dtype
        (torch.Size([1, 1, 4, 3]), torch.Size([1, 1, 4, 1]), torch.float16)
    """
    normalized = (pre_rope.float() - center[None, :, None, :]) / half[None, :, None, :]
    if outliers:
        index = _top_outliers(normalized, outliers)
        exact = pre_rope.float().gather(-1, index).to(SCALE_DTYPE)
        normalized = normalized.scatter(-1, index, 0.0)
    else:
        index = exact = None
    codes = pack_codes(nearest_code(normalized.clamp_(-1, 1), codebook), bits)
    return codes, None if index is None else index.to(torch.uint8), exact


def dequantize_keys(codes, index, exact, center, half, codebook, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: float32 pre-RoPE keys."""
    levels = codebook.float()[unpack_codes(codes, bits).long()]
    keys = levels * half[None, :, None, :] + center[None, :, None, :]
    if index is not None:
        keys.scatter_(-1, index.long(), exact.float())
    return keys


def quantize_values(values: torch.Tensor, codebook, bits: int, outliers: int):
    """Quantize values ``(B, H, n, D)`` per token: packed codes, fp16 ``(centre, half-range)``, outliers.

    Example:
        >>> import torch
        >>> codes, scale, index, exact = quantize_values(torch.randn(1, 1, 4, 8), torch.linspace(-1, 1, 8), 3, 1)
        >>> scale.shape
        torch.Size([1, 1, 4, 2])
    """
    vf = values.float()
    inlier = torch.ones_like(vf, dtype=torch.bool)
    if outliers:
        index = _top_outliers(vf - vf.median(dim=-1, keepdim=True).values, outliers)
        exact = vf.gather(-1, index).to(SCALE_DTYPE)
        inlier.scatter_(-1, index, False)
    else:
        index = exact = None
    high = torch.where(inlier, vf, -torch.inf).amax(-1, keepdim=True)
    low = torch.where(inlier, vf, torch.inf).amin(-1, keepdim=True)
    scale = torch.cat([(high + low) / 2, (high - low) / 2], dim=-1).to(SCALE_DTYPE)
    center, half = scale.float().unbind(-1)
    half = torch.where(half > 0, half, torch.ones_like(half))
    normalized = ((vf - center[..., None]) / half[..., None]).clamp_(-1, 1)
    codes = pack_codes(nearest_code(normalized, codebook), bits)
    return codes, scale, None if index is None else index.to(torch.uint8), exact


def dequantize_values(codes, scale, index, exact, codebook, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_values` (float32)."""
    levels = codebook.float()[unpack_codes(codes, bits).long()]
    center, half = scale.float().unbind(-1)
    values = levels * half[..., None] + center[..., None]
    if index is not None:
        values.scatter_(-1, index.long(), exact.float())
    return values


class ExactCopies:
    """Exact copies of some stored slots, on the side: ``slots`` ``(B, H, E)`` (``-1`` = unused entry)
    and their ``keys``/``values`` ``(B, H, E, D)`` in ``dtype``. Used for the attention sinks and the
    recent window; they follow eviction (:meth:`remap`) and batch reordering.

    Example:
        >>> import torch
        >>> copies = ExactCopies(torch.float32)
        >>> copies.add(0, torch.ones(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))
        >>> copies.remap(torch.tensor([[[1, 2]]]), old_length=3)
        >>> copies.slots.tolist()
        [[[0]]]
    """

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self.slots = self.keys = self.values = None

    @property
    def count(self) -> int:
        """Entries per row and head (some may be unused)."""
        return 0 if self.slots is None else self.slots.shape[-1]

    def nbytes(self) -> int:
        return tensor_bytes(self.slots, self.keys, self.values)

    def add(self, first_slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy ``keys``/``values`` ``(B, H, n, D)`` of slots ``first_slot .. first_slot + n - 1``."""
        batch, heads, n, _ = keys.shape
        if n == 0:
            return
        dtype = self.dtype or keys.dtype
        slots = torch.arange(first_slot, first_slot + n, dtype=torch.int32, device=keys.device).expand(batch, heads, n)
        pieces = (slots, keys.to(dtype, copy=True), values.to(dtype, copy=True))
        if self.slots is None:
            self.slots, self.keys, self.values = pieces
        else:
            self.slots, self.keys, self.values = (torch.cat([old, piece], dim=2) for old, piece in
                                                  zip((self.slots, self.keys, self.values), pieces))

    def restore(self, out_keys: torch.Tensor, out_values: torch.Tensor) -> None:
        """Write the exact copies over their (dequantized) slots of ``out_keys``/``out_values``."""
        if not self.count:
            return
        b, h, e = (self.slots >= 0).nonzero(as_tuple=True)
        slots = self.slots[b, h, e].long()
        out_keys[b, h, slots] = self.keys[b, h, e].to(out_keys.dtype)
        out_values[b, h, slots] = self.values[b, h, e].to(out_values.dtype)

    def remap(self, index: torch.Tensor, old_length: int) -> None:
        """Follow an eviction that kept slots ``index`` ``(B, H, K)`` of ``old_length``."""
        if not self.count:
            return
        new_slot = slots_after_eviction(index, old_length)
        old = torch.where(self.slots >= 0, self.slots, old_length).long()
        self.slots = new_slot.gather(2, old)
        self._compact()

    def drop_before(self, first_kept: int) -> None:
        """Forget the copies of slots before ``first_kept``."""
        if not self.count:
            return
        self.slots = torch.where(self.slots >= first_kept, self.slots, -1)
        self._compact()

    def _compact(self) -> None:
        """Move unused entries to the end and cut the columns no row or head uses."""
        used = self.slots >= 0
        width = int(used.sum(-1).max()) if used.numel() else 0
        if width == self.count and bool(used.all()):
            return
        order = torch.sort((~used).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
        self.slots = self.slots.gather(2, order)
        self.keys = _gather_slots(self.keys, order)
        self.values = _gather_slots(self.values, order)

    def map_batch(self, fn) -> None:
        if self.slots is not None:
            self.slots, self.keys, self.values = fn(self.slots), fn(self.keys), fn(self.values)


class KVQuantStore(KVStore):
    """One layer's KVQuant storage. Every slot is quantized independently (keys by calibrated channel
    ranges, values by their own range), so eviction and batch reordering are plain gathers.

    The first ``sink_tokens`` slots and the last ``residual`` slots are also held exactly on the side
    (:class:`ExactCopies`, in ``residual_dtype``) and returned instead of their dequantized values.
    Slot positions (for the re-rotation) are implicit (slot ``i`` is token ``i``) until the first
    eviction, which stores them as ``int32``.

    Example:
        >>> store = KVQuantStore(calibration, 0, rotary, bits=3, outliers=1)       # doctest: +SKIP
    """

    _TENSORS = ("key_codes", "key_index", "key_exact", "value_codes", "value_scale", "value_index", "value_exact",
                "positions")

    def __init__(self, calibration: KVQuantCalibration, layer: int, rotary, bits: int, outliers: int,
                 chunk_tokens: int = 1024, sink_tokens: int = 0, *, residual: int = 0, residual_dtype: str = "model"):
        copy_dtype = residual_torch_dtype(residual_dtype)
        self.calibration, self.layer, self.rotary = calibration, layer, rotary
        self.bits, self.outliers, self.chunk_tokens, self.sink_tokens = bits, outliers, chunk_tokens, sink_tokens
        self.residual = residual
        for name in self._TENSORS:
            setattr(self, name, None)
        self.sinks = ExactCopies(copy_dtype)
        self.window = ExactCopies(copy_dtype)
        self.sinks_taken = 0
        self.seen = 0

    def _params(self, device):
        c = self.calibration
        return (c.key_center[self.layer].float().to(device), c.key_half[self.layer].float().to(device),
                c.key_codebook[self.layer].float().to(device), c.value_codebook[self.layer].float().to(device))

    @property
    def length(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.shape[2]

    def nbytes(self) -> int:
        return tensor_bytes(*(getattr(self, name) for name in self._TENSORS)) + self.sinks.nbytes() + self.window.nbytes()

    def _quantize(self, keys, values, positions):
        center, half, key_book, value_book = self._params(keys.device)
        pre = self.rotary.unrotate(keys, positions)
        key_codes, key_index, key_exact = quantize_keys(pre, center, half, key_book, self.bits, self.outliers)
        value_codes, value_scale, value_index, value_exact = quantize_values(values, value_book, self.bits, self.outliers)
        return {"key_codes": key_codes, "key_index": key_index, "key_exact": key_exact, "value_codes": value_codes,
                "value_scale": value_scale, "value_index": value_index, "value_exact": value_exact,
                "positions": None if self.positions is None else positions.to(torch.int32)}

    def _slot_positions(self, start: int, end: int, like: torch.Tensor) -> torch.Tensor:
        """``(B, H, end - start)`` positions of stored slots ``start .. end - 1``."""
        if self.positions is not None:
            return self.positions[:, :, start:end].long()
        return torch.arange(start, end, device=like.device).expand(*like.shape[:2], end - start)

    def _dequantize(self, start: int, end: int, dtype):
        center, half, key_book, value_book = self._params(self.key_codes.device)
        part = {name: None if getattr(self, name) is None else getattr(self, name)[:, :, start:end] for name in self._TENSORS}
        pre = dequantize_keys(part["key_codes"], part["key_index"], part["key_exact"], center, half, key_book, self.bits)
        keys = self.rotary.rotate(pre, self._slot_positions(start, end, self.key_codes))
        values = dequantize_values(part["value_codes"], part["value_scale"], part["value_index"], part["value_exact"],
                                   value_book, self.bits)
        return keys.to(dtype), values.to(dtype), tensor_bytes(pre) * 4  # pre, cos, sin, rotated keys

    def append(self, keys, values):
        batch, heads, new, dim = keys.shape
        if dim % 8:
            raise ConfigError(f"method: kvquant needs a head dimension divisible by 8, got {dim}", field="method")
        stored = self.length
        positions = torch.arange(self.seen, self.seen + new, device=keys.device).expand(batch, heads, new)
        self.seen += new
        if stored == 0:
            out_keys, out_values, transient = keys, values, 0
        else:
            out_keys = keys.new_empty(batch, heads, stored + new, dim)
            out_values = values.new_empty(batch, heads, stored + new, dim)
            scratch = 0
            for start in range(0, stored, self.chunk_tokens):
                end = min(start + self.chunk_tokens, stored)
                chunk_k, chunk_v, extra = self._dequantize(start, end, keys.dtype)
                scratch = max(scratch, extra + tensor_bytes(chunk_k, chunk_v))
                out_keys[:, :, start:end] = chunk_k
                out_values[:, :, start:end] = chunk_v
                del chunk_k, chunk_v
            out_keys[:, :, stored:] = keys
            out_values[:, :, stored:] = values
            transient = tensor_bytes(out_keys, out_values) + scratch
            self.sinks.restore(out_keys, out_values)
            self.window.restore(out_keys, out_values)
        if self.sinks_taken < self.sink_tokens and new:
            count = min(self.sink_tokens - self.sinks_taken, new)
            self.sinks.add(stored, keys[:, :, :count], values[:, :, :count])
            self.sinks_taken += count
        if new:
            parts = [self._quantize(keys[:, :, s:s + self.chunk_tokens], values[:, :, s:s + self.chunk_tokens],
                                    positions[:, :, s:s + self.chunk_tokens]) for s in range(0, new, self.chunk_tokens)]
            for name in self._TENSORS:
                pieces = [p[name] for p in parts]
                if pieces[0] is None:
                    continue
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, *pieces], dim=2) if old is not None else torch.cat(pieces, dim=2))
            if self.residual:
                recent = min(new, self.residual)
                self.window.add(stored + new - recent, keys[:, :, new - recent:], values[:, :, new - recent:])
                self.window.drop_before(stored + new - self.residual)
        self._record_peak(transient)
        return out_keys, out_values

    def gather(self, index):
        if self.key_codes is None:
            return
        old_length = self.length
        index = index.to(self.key_codes.device)
        self.sinks.remap(index, old_length)
        self.window.remap(index, old_length)
        if self.positions is None:  # positions stop being the slot index: store them
            batch, heads = self.key_codes.shape[:2]
            self.positions = torch.arange(old_length, dtype=torch.int32,
                                          device=index.device).expand(batch, heads, old_length).contiguous()
        for name in self._TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, _gather_slots(tensor, index))

    def select_batch(self, index):
        def select(tensor):
            return tensor.index_select(0, index.to(tensor.device))

        self._map_batch(select)

    def repeat_batch(self, repeats):
        self._map_batch(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def _map_batch(self, fn) -> None:
        for name in self._TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        self.sinks.map_batch(fn)
        self.window.map_batch(fn)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def _token_batches(texts, tokenizer, max_length: int):
    if isinstance(texts, (str, torch.Tensor)):
        texts = [texts]
    for text in texts:
        if isinstance(text, str):
            if tokenizer is None:
                raise ConfigError("tokenizer: calibrate() needs a tokenizer for text inputs", field="tokenizer")
            ids = tokenizer(text, return_tensors="pt").input_ids
        else:
            ids = torch.as_tensor(text, dtype=torch.long)
            ids = ids[None] if ids.dim() == 1 else ids
        if ids.shape[-1] == 0:
            continue
        yield ids[:, :max_length]


@torch.no_grad()
def calibrate(model, texts, tokenizer=None, *, max_length: int = 2048, max_tokens_per_layer: int = 32768):
    """Fit KVQuant's key channel ranges and codebooks on ``texts`` (strings, or token-id lists/tensors).

    The model must carry a ``kvquant`` reduction (``hf_tokred.apply`` or ``from_pretrained(...,
    token_reduction=...)``). Each text (cut to ``max_length`` tokens) runs once through the model; the
    cached keys are un-rotated to their pre-RoPE basis. Per layer, key channels get the range between
    their ``outlier_fraction / 2`` and ``1 - outlier_fraction / 2`` quantiles; then the per-vector
    outliers are set aside and a ``2**bits``-level codebook is fitted by k-means to the normalized keys,
    and another to the values normalized per token. Returns the calibration module (also kept on
    ``model.hf_tokred_modules["kvquant"]``, so ``save_pretrained`` writes it).

    Example:
        >>> from hf_tokred.methods.kv.kvquant import calibrate
        >>> model = hf_tokred.apply(model, {"method": "kvquant", "bits": 3})      # doctest: +SKIP
        >>> calibrate(model, ["some representative text ..."], tokenizer)          # doctest: +SKIP
    """
    from transformers import DynamicCache

    from ...integration.wiring import get_applied
    from ...model_patches.rope import rotary_for

    applied = get_applied(model)
    config = None if applied is None else applied.config.get("kv_storage")
    modules = getattr(model, "hf_tokred_modules", None)
    if not isinstance(config, KVQuantConfig) or modules is None or MODULE_NAME not in modules:
        raise TokenReductionError("calibrate: attach a kvquant reduction first (hf_tokred.apply(model, {'method': 'kvquant'}))")
    calibration = modules[MODULE_NAME]
    layers = config.layer_indices(model)  # the layers the storage holds; the other rows stay as they are
    rotaries = {layer: rotary_for(model, layer) for layer in layers}
    keys_seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    values_seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    device = next(model.parameters()).device
    for ids in _token_batches(texts, tokenizer, max_length):
        cache = DynamicCache()  # no config: every layer keeps all its keys, sliding-window layers too
        model(input_ids=ids.to(device), **{CACHE_KWARG: cache}, use_cache=True)
        for layer in layers:
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
            batch, heads, slots, _ = keys.shape
            positions = torch.arange(slots, device=keys.device).expand(batch, heads, slots)
            pre_rope = rotaries[layer].unrotate(keys, positions)
            keys_seen[layer].append(pre_rope.transpose(1, 2).reshape(-1, heads, keys.shape[-1]))
            values_seen[layer].append(values.float().transpose(1, 2).reshape(-1, heads, values.shape[-1]))
    if not keys_seen[layers[0]]:
        raise ConfigError("texts: calibrate() needs at least one non-empty text", field="texts")
    outliers = config.outliers(calibration.key_center.shape[-1])
    entries = calibration.key_codebook.shape[-1]
    quantile = config.outlier_fraction / 2
    for layer in layers:
        keys = torch.cat(keys_seen[layer])[:max_tokens_per_layer]  # (tokens, heads, dim)
        values = torch.cat(values_seen[layer])[:max_tokens_per_layer]
        flat = keys.permute(1, 2, 0).reshape(-1, keys.shape[0]).float()
        low = torch.quantile(flat.cpu(), quantile, dim=1).reshape(keys.shape[1:]).to(keys.device)
        high = torch.quantile(flat.cpu(), 1 - quantile, dim=1).reshape(keys.shape[1:]).to(keys.device)
        center = (high + low) / 2
        half = ((high - low) / 2).clamp_min(1e-6)
        normalized = (keys - center) / half
        if outliers:
            normalized = normalized.scatter(-1, _top_outliers(normalized, outliers), float("nan"))
        calibration.key_codebook[layer] = fit_codebook(normalized.clamp(-1, 1), entries).to(calibration.key_codebook)
        calibration.key_center[layer] = center.to(calibration.key_center)
        calibration.key_half[layer] = half.to(calibration.key_half)
        vf = values
        inlier = torch.ones_like(vf, dtype=torch.bool)
        if outliers:
            inlier.scatter_(-1, _top_outliers(vf - vf.median(dim=-1, keepdim=True).values, outliers), False)
        high_v = torch.where(inlier, vf, -torch.inf).amax(-1, keepdim=True)
        low_v = torch.where(inlier, vf, torch.inf).amin(-1, keepdim=True)
        normalized_v = (vf - (high_v + low_v) / 2) / ((high_v - low_v) / 2).clamp_min(1e-6)
        normalized_v = torch.where(inlier, normalized_v, float("nan"))
        calibration.value_codebook[layer] = fit_codebook(normalized_v.clamp(-1, 1), entries).to(calibration.value_codebook)
    calibration.calibrated.fill_(1)
    return calibration


__all__ = ["ExactCopies", "KVQuantCalibration", "KVQuantConfig", "KVQuantStore", "calibrate", "dequantize_keys",
           "dequantize_values", "quantize_keys", "quantize_values"]
