"""How a :class:`~hf_tokred.kv.cache.TokenReductionCache` layer *stores* its keys and values.

An eviction policy (stage ``"kv_policy"``) decides *which* tokens stay; a storage (stage
``"kv_storage"``) decides *how* the kept ones are held between decoding steps: packed low-bit codes
(KIVI, KVQuant) or one merged copy shared by adjacent layers (MiniCache). The two compose: the cache
asks the store for the step's keys/values, runs attention, lets the store drop its transient copies,
and then evicts by asking the store to keep a subset of its slots.

A storage's ``layers`` option says which decoder layers it holds (by default the full-attention ones; see
:mod:`hf_tokred.kv.layers`); the other layers keep transformers' own cache layer.

The contract (one store per layer acted on, created by :meth:`KVStorageConfig.make_stores`):

* ``append(keys, values)`` adds this step's ``(B, H_kv, n, D)`` keys/values and returns *all* of them in
  the compute dtype for this step's attention. Old slots may come back dequantized (lossy); the ``n``
  new ones come back exactly as given, as in the papers (the prompt's attention is full precision).
* ``release()`` is called right after the step's attention and drops transient full-precision copies.
* ``gather(index)`` keeps slots ``index`` ``(B, H_kv, K)`` (sorted ascending per row and head),
  ``select_batch(index)`` / ``repeat_batch(n)`` reorder or repeat the batch (beam search).
* ``length`` is the number of slots held, ``nbytes()`` the resident bytes between steps (what the
  tensors the store holds take), ``step_peak_bytes`` the most bytes a single ``append`` held at once
  (resident + the returned full-precision tensors + the largest dequantization chunk's scratch), and
  ``max_transient_bytes`` the transient part alone.

The low-bit stores dequantize in chunks of ``chunk_tokens`` slots straight into the output tensors, so
the transient peak of a step is the returned keys/values plus one chunk, never several full-size
float intermediates.

Example:
    >>> import torch
    >>> from hf_tokred.kv.storage import DenseStore
    >>> store = DenseStore()
    >>> k, v = store.append(torch.ones(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    >>> store.length, store.nbytes()
    (3, 384)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import TokenReductionConfig, param
from ..errors import ConfigError
from .layers import check_layers, layers_param

SCALE_DTYPE = torch.float16  # scales, zero points and sparse outliers, as in the papers (fp16)


def tensor_bytes(*tensors) -> int:
    """Bytes taken by the given tensors (``None`` entries count 0).

    Example:
        >>> import torch
        >>> tensor_bytes(torch.zeros(4, dtype=torch.uint8), None, torch.zeros(2))
        12
    """
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------
# Bit packing: 8 codes of ``bits`` bits -> ``bits`` bytes, along the last dimension
# ---------------------------------------------------------------------------------------------

PACKABLE_BITS = (1, 2, 3, 4, 8)


def packed_width(dim: int, bits: int) -> int:
    """Bytes that ``dim`` codes of ``bits`` bits take once packed.

    Example:
        >>> packed_width(64, 3)
        24
    """
    return dim * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension into ``uint8``.

    Every run of 8 codes becomes ``bits`` bytes (little-endian bit order), so 3-bit codes pack
    without waste. The last dimension must be a multiple of 8.

    Example:
        >>> import torch
        >>> codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
        >>> pack_codes(codes, 2).tolist()
        [[228, 27]]
        >>> torch.equal(unpack_codes(pack_codes(codes, 2), 2), codes)
        True
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits: expected one of {PACKABLE_BITS}, got {bits}")
    if bits == 8:
        return codes.to(torch.uint8)
    dim = codes.shape[-1]
    if dim % 8:
        raise ValueError(f"pack_codes: the last dimension ({dim}) must be a multiple of 8")
    runs = codes.reshape(*codes.shape[:-1], dim // 8, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (runs << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = (word >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], dim // 8 * bits)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` codes, last dimension ``packed.shape[-1] * 8 // bits``.

    Example:
        >>> import torch
        >>> unpack_codes(torch.tensor([[228, 27]], dtype=torch.uint8), 2).tolist()
        [[0, 1, 2, 3, 3, 2, 1, 0]]
    """
    if bits == 8:
        return packed
    width = packed.shape[-1]
    if 8 % bits == 0:  # whole codes per byte, code i at bits (i % per_byte) * bits of byte i // per_byte
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], width * 8 // bits)
    runs = packed.reshape(*packed.shape[:-1], width // bits, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (runs << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], width // bits * 8)


# ---------------------------------------------------------------------------------------------
# Uniform asymmetric quantization (KIVI)
# ---------------------------------------------------------------------------------------------


def clip_candidates(smallest: float) -> tuple[float, ...]:
    """The ranges a clipping search tries: 1.0, 0.95, ... down to ``smallest`` (fractions of min/max).

    Example:
        >>> clip_candidates(0.85)
        (1.0, 0.95, 0.9, 0.85)
        >>> clip_candidates(1.0)
        (1.0,)
    """
    return tuple(round(1.0 - 0.05 * i, 2) for i in range(int((1.0 - smallest) / 0.05 + 1e-6) + 1))


RANGE_SHRINKS = clip_candidates(0.7)  # 1.0, 0.95, ..., 0.7: the default clipping search


def quantize_uniform(x: torch.Tensor, bits: int, dim: int, ignore: torch.Tensor | None = None,
                     shrinks: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of ``x`` over dimension ``dim`` (the group).

    Elements where the boolean ``ignore`` (broadcastable to ``x``) is True do not widen the group's
    range (they are held exactly elsewhere); their codes are clamped into it.

    ``shrinks`` are candidate ranges as fractions of the min/max range (shrunk around its midpoint);
    each group keeps the candidate whose dequantized values have the lowest squared error over the
    non-ignored elements (a clipping search: a few extreme values no longer spread the few levels of
    a 2-bit group). The default ``(1.0,)`` is plain min/max.

    Returns ``(codes, scale, zero)``: ``uint8`` codes shaped like ``x`` and fp16 ``scale``/``zero`` with
    ``dim`` kept as size 1, such that ``codes * scale + zero`` approximates ``x``. The rounding uses the
    fp16-rounded scale and zero that are stored, so dequantization is consistent.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> codes, scale, zero = quantize_uniform(x, 2, dim=-1)
        >>> codes.tolist(), dequantize_uniform(codes, scale, zero, torch.float32).tolist()
        ([[0, 1, 2, 3]], [[0.0, 1.0, 2.0, 3.0]])
        >>> x = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 3.0]])  # one extreme value
        >>> _, wide, _ = quantize_uniform(x, 2, dim=-1)
        >>> _, searched, _ = quantize_uniform(x, 2, dim=-1, shrinks=RANGE_SHRINKS)
        >>> bool(searched < wide)
        True
    """
    if not shrinks:
        raise ValueError("quantize_uniform: shrinks must hold at least one candidate")
    levels = (1 << bits) - 1
    xf = x.float()
    if ignore is None:
        low = xf.amin(dim=dim, keepdim=True)
        high = xf.amax(dim=dim, keepdim=True)
    else:
        low = torch.where(ignore, torch.inf, xf).amin(dim=dim, keepdim=True)
        high = torch.where(ignore, -torch.inf, xf).amax(dim=dim, keepdim=True)
        everything = torch.isinf(low)  # a group made only of ignored elements
        low = torch.where(everything, 0.0, low)
        high = torch.where(everything, 0.0, high)
    middle, half = (high + low) / 2, (high - low) / 2
    best = best_error = None
    for shrink in shrinks:
        if shrink == 1.0:
            candidate_low, candidate_high = low, high
        else:
            candidate_low, candidate_high = middle - shrink * half, middle + shrink * half
        scale = ((candidate_high - candidate_low) / levels).to(SCALE_DTYPE)
        zero = candidate_low.to(SCALE_DTYPE)
        scale_f = scale.float()
        safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
        codes = ((xf - zero.float()) / safe).round_().clamp_(0, levels)
        if len(shrinks) == 1:
            return codes.to(torch.uint8), scale, zero
        error = (codes * scale_f + zero.float() - xf).square_()
        if ignore is not None:
            error = error.masked_fill_(ignore, 0.0)
        error = error.sum(dim=dim, keepdim=True)
        if best is None:
            best, best_error = [codes, scale, zero], error
        else:
            better = error < best_error
            best = [torch.where(better, codes, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, zero, best[2])]
            best_error = torch.where(better, error, best_error)
    return best[0].to(torch.uint8), best[1], best[2]


def range_outliers(x: torch.Tensor, count: int, dim: int, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (``int64``, along ``dim``) of the ``count`` elements of each group whose removal shrinks the
    group's min/max range the most (the dense-and-sparse split of a uniform quantizer).

    Removing ``j`` of the smallest and ``count - j`` of the largest elements is optimal for the best ``j``,
    so every ``j`` in ``0..count`` is tried on the sorted group. Elements where the boolean ``ignore``
    (broadcastable to ``x``) is True are never picked (they are held exactly elsewhere). The result has
    the shape of ``x`` with ``dim`` of size ``count``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 9.0, 0.2, -5.0, 0.1, 0.3]])
        >>> range_outliers(x, 1, dim=-1).tolist(), sorted(range_outliers(x, 2, dim=-1)[0].tolist())
        ([[1]], [1, 3])
    """
    size = x.shape[dim]
    if not 0 < count < size:
        raise ValueError(f"range_outliers: count must be in [1, {size - 1}], got {count}")
    xf = x.float()
    if ignore is not None:
        ignore = ignore.expand_as(xf)
        kept = (~ignore).sum(dim, keepdim=True).clamp(min=1)
        centre = torch.where(ignore, 0.0, xf).sum(dim, keepdim=True) / kept  # inside the kept range
        xf = torch.where(ignore, centre, xf)
    xf = xf.movedim(dim, -1)
    ordered, order = xf.sort(dim=-1)
    spans = torch.stack([ordered[..., size - 1 - (count - j)] - ordered[..., j] for j in range(count + 1)], dim=-1)
    best = spans.argmin(dim=-1)
    table = torch.tensor([[*range(j), *range(size - count + j, size)] for j in range(count + 1)], device=x.device)
    return order.gather(-1, table[best]).movedim(-1, dim)


RESIDUAL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "model": None}


def residual_torch_dtype(name: str) -> torch.dtype | None:
    """The dtype of a ``residual_dtype`` setting (None for ``"model"``: the dtype the keys arrive in).

    Example:
        >>> residual_torch_dtype("bfloat16"), residual_torch_dtype("model")
        (torch.bfloat16, None)
    """
    if name not in RESIDUAL_DTYPES:
        raise ConfigError(f"residual_dtype: expected one of {sorted(RESIDUAL_DTYPES)}, got {name!r}",
                          field="residual_dtype")
    return RESIDUAL_DTYPES[name]


def slots_after_eviction(index: torch.Tensor, old_length: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Where each of ``old_length`` slots goes when an eviction keeps slots ``index`` ``(B, H, K)``.

    Returns ``(B, H, old_length + 1)``: the new slot of every kept old slot, -1 for evicted ones, and -1 at
    the extra last entry, so that entries that point nowhere can be looked up as slot ``old_length``.

    Example:
        >>> slots_after_eviction(torch.tensor([[[0, 2]]]), 3).tolist()
        [[[0, -1, 1, -1]]]
    """
    new_slot = torch.full((*index.shape[:2], old_length + 1), -1, dtype=dtype, device=index.device)
    return new_slot.scatter_(2, index, torch.arange(index.shape[-1], dtype=dtype, device=index.device).expand_as(index))


def dequantize_uniform(codes, scale, zero, dtype) -> torch.Tensor:
    """``codes * scale + zero`` in ``dtype`` (computed in float32).

    Example:
        >>> import torch
        >>> dequantize_uniform(torch.tensor([3], dtype=torch.uint8), torch.tensor([0.5]), torch.tensor([1.0]), torch.float32)
        tensor([2.5000])
    """
    return (codes.float() * scale.float() + zero.float()).to(dtype)


# ---------------------------------------------------------------------------------------------
# Non-uniform codebooks (KVQuant)
# ---------------------------------------------------------------------------------------------


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted 1-D ``codebook`` for every element of ``x`` (``uint8``).

    Example:
        >>> import torch
        >>> nearest_code(torch.tensor([-0.9, 0.1, 0.6]), torch.tensor([-1.0, 0.0, 0.5, 1.0])).tolist()
        [0, 1, 2]
    """
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(x.float().contiguous(), midpoints.float().contiguous()).to(torch.uint8)


def fit_codebook(samples: torch.Tensor, entries: int, iterations: int = 25, max_samples: int = 200_000,
                 seed: int = 0) -> torch.Tensor:
    """A sorted 1-D codebook of ``entries`` values fitted to ``samples`` by Lloyd's k-means.

    Starts from the samples' evenly spaced quantiles, so the result is deterministic; at most
    ``max_samples`` randomly drawn samples are used.

    Example:
        >>> import torch
        >>> book = fit_codebook(torch.cat([torch.zeros(100) - 1, torch.ones(100)]), 2)
        >>> book.tolist()
        [-1.0, 1.0]
    """
    flat = samples.detach().float().flatten()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        raise ValueError("fit_codebook: no finite samples")
    if flat.numel() > max_samples:
        generator = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=generator)[:max_samples].to(flat.device)]
    flat, _ = flat.sort()
    quantiles = (torch.arange(entries, dtype=torch.float32) + 0.5) / entries
    centers = flat[(quantiles * (flat.numel() - 1)).round().long().to(flat.device)].clone()
    for _ in range(iterations):
        assign = torch.bucketize(flat, (centers[1:] + centers[:-1]) / 2)
        sums = torch.zeros(entries).index_add_(0, assign.cpu(), flat.cpu())
        counts = torch.zeros(entries).index_add_(0, assign.cpu(), torch.ones_like(flat).cpu())
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centers.cpu())
        updated, _ = updated.sort()
        if torch.allclose(updated, centers.cpu()):
            centers = updated
            break
        centers = updated
    return centers.sort().values


# ---------------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------------


class KVStore(abc.ABC):
    """One layer's key/value storage (see the module docstring for the contract).

    Subclasses implement :meth:`append`, :meth:`gather`, :meth:`select_batch`, :meth:`repeat_batch`,
    :attr:`length` and :meth:`nbytes`. ``step_peak_bytes`` records the largest number of bytes one
    ``append`` held at once.

    Example:
        >>> import torch
        >>> store = DenseStore()
        >>> _ = store.append(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))
        >>> store.gather(torch.tensor([[[1]]]))
        >>> store.length
        1
    """

    step_peak_bytes: int = 0
    max_transient_bytes: int = 0

    @abc.abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys/values; return all of them for the step's attention."""

    def release(self) -> None:
        return None

    @abc.abstractmethod
    def gather(self, index: torch.Tensor) -> None:
        """Keep slots ``index`` ``(B, H_kv, K)``, sorted ascending."""

    @abc.abstractmethod
    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder or select along the batch."""

    @abc.abstractmethod
    def repeat_batch(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Slots held."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Resident bytes between steps."""

    def _record_peak(self, transient: int) -> None:
        """Note the bytes of the transient tensors one ``append`` held on top of the resident ones."""
        self.max_transient_bytes = max(self.max_transient_bytes, int(transient))
        self.step_peak_bytes = max(self.step_peak_bytes, self.nbytes() + int(transient))


def _gather_slots(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """``tensor[b, h, index[b, h, k], ...]`` for a ``(B, H, S, ...)`` tensor."""
    if tensor is None:
        return None
    # One row lookup per slot over the flattened (B * H * S, ...) tensor: gather() would need the index expanded to
    # every element of the trailing dimensions, which costs more than the copy itself.
    batch, heads, length = tensor.shape[:3]
    offsets = torch.arange(batch * heads, device=index.device).reshape(batch, heads, 1) * length
    rows = tensor.reshape(batch * heads * length, *tensor.shape[3:]).index_select(0, (index + offsets).reshape(-1))
    return rows.reshape(*index.shape, *tensor.shape[3:])


class DenseStore(KVStore):
    """Full-precision storage: ``torch.cat`` on append, exactly like ``DynamicLayer``.

    It is the reference the compressed stores are measured against, and what a no-op setting (for
    example ``kivi`` with ``bits=16``) uses, so outputs are bit-identical to the dense cache.

    Example:
        >>> import torch
        >>> store = DenseStore()
        >>> k, v = store.append(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
        >>> k.shape, store.nbytes()
        (torch.Size([1, 2, 3, 4]), 192)
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys, values):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        self._record_peak(0)
        return self.keys, self.values

    def gather(self, index):
        self.keys = _gather_slots(self.keys, index)
        self.values = _gather_slots(self.values, index)

    def select_batch(self, index):
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def repeat_batch(self, repeats):
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


@dataclass(kw_only=True)
class KVStorageConfig(TokenReductionConfig):
    """Base of the KV storage methods (stage ``"kv_storage"``): they say how kept tokens are held.

    Subclasses implement :meth:`make_stores`. ``chunk_tokens`` bounds the per-step transient memory of
    dequantization (slots dequantized at a time).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="kivi", bits=2).stage
        'kv_storage'
    """

    stage: ClassVar[str] = "kv_storage"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    composes_with_eviction: ClassVar[bool] = True  # may hold the slots of a kv_policy that evicts

    chunk_tokens: int = param(1024, int, low=1, help="slots dequantized at a time (bounds the per-step peak)")
    layers: str | None = layers_param()

    def check_model(self, model) -> None:
        """Raise :class:`ConfigError` if the storage cannot serve ``model`` (run by ``apply`` before it
        touches the model). The base checks the layer kinds and the ``layers`` choice; storages extend it."""
        check_layers(self, model)

    def layer_indices(self, model) -> list[int]:
        """The decoder layers of ``model`` this storage holds (see ``layers``).

        Example:
            >>> TokenReductionConfig(method="kivi", bits=4).layer_indices(model)          # doctest: +SKIP
            [0, 1]
        """
        return check_layers(self, model)

    def make_stores(self, layers: list[int], model) -> list[KVStore]:
        """One :class:`KVStore` for each decoder layer index in ``layers`` (in that order; cross-layer stores may
        share state).

        The base gives every layer a full-precision :class:`DenseStore`; storages override it."""
        return [DenseStore() for _ in layers]

    @staticmethod
    def head_dim(model) -> int:
        """The attention head dimension of a decoder ``model`` (its attention modules' ``head_dim``, else the
        config's; GPT-NeoX has neither and uses ``hidden_size // num_attention_heads``)."""
        from ..model_patches import find_adapter
        from ..model_patches.rope import attention_head_dim

        modules = find_adapter(model).attention_modules(model)
        return attention_head_dim(model, modules[0] if modules else None)

    @staticmethod
    def kv_heads(model) -> int:
        """Key/value heads of a decoder ``model`` (``num_key_value_heads``, else ``num_attention_heads``)."""
        config = model.config.get_text_config(decoder=True)
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def check_head_dim(self, head_dim: int, group_size: int | None = None) -> None:
        """Raise :class:`ConfigError` when the model's head dimension cannot be packed or grouped."""
        if head_dim % 8:
            raise ConfigError(
                f"method: {self.method} packs 8 codes at a time and needs a head dimension divisible by 8; "
                f"the model's is {head_dim}",
                field="method",
            )
        if group_size is not None and head_dim % group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ConfigError(
                f"group_size: must divide the head dimension {head_dim} (one of {divisors}), got {group_size}",
                field="group_size",
            )


__all__ = [
    "RANGE_SHRINKS",
    "RESIDUAL_DTYPES",
    "DenseStore",
    "KVStorageConfig",
    "KVStore",
    "clip_candidates",
    "dequantize_uniform",
    "fit_codebook",
    "nearest_code",
    "pack_codes",
    "packed_width",
    "quantize_uniform",
    "range_outliers",
    "residual_torch_dtype",
    "slots_after_eviction",
    "tensor_bytes",
    "unpack_codes",
]
