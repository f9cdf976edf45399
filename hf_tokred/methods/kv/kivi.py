"""KIVI: tuning-free asymmetric 2-bit KV-cache quantization (Liu et al., ICML'24, arXiv 2402.02750).

Keys are quantized **per channel** (one scale and zero point per channel for each group of
``group_size`` consecutive tokens), values **per token** (one scale and zero point per group of
``group_size`` channels), both with asymmetric min/max rounding to ``bits`` bits. The most recent
``residual`` to ``residual + group_size - 1`` tokens stay in full precision; whenever the
full-precision tail grows past that, its oldest whole groups are quantized. The paper's settings are
``group_size=32, residual=128``; the defaults here are groups of 64 and ``residual=128`` (below). Codes are
stored **packed** (four 2-bit or two 4-bit codes per byte), scales and zero points in fp16.

Where we depart from the paper:

* The paper fuses dequantization into its attention kernels. Here each step dequantizes the stored
  codes (in chunks of ``chunk_tokens`` slots, straight into the tensors attention reads) and hands
  full-precision keys/values to the model's stock attention; the resident memory is the packed
  codes, the per-step transient is one full-precision copy, as in transformers' ``QuantizedCache``.
* Unlike transformers' ``QuantizedCache`` (which quantizes keys and values per channel and
  re-quantizes the whole cache whenever its residual fills), values are per token, as in the paper,
  and every token is quantized exactly once.
* Eviction (a ``kv_policy`` composed with ``kivi``) keeps packed codes without re-quantizing them:
  a key group that loses tokens keeps its scale, groups that lose every token are dropped. When the
  kept quantized slots differ in number between heads, the surplus of the heads that kept more is
  moved (losslessly, as their dequantized values) into the full-precision tail.
* ``sink_tokens`` (default 1) keeps the first tokens of each sequence exactly (full precision, on the
  side) and leaves them out of their key group's range. The paper quantizes them like any token; on
  SmolLM2-135M the 2-bit keys of the attention-sink token alone raise perplexity by several percent
  (KVQuant's later revisions and IntactKV keep the sink exact for the same reason). ``sink_tokens=0``
  is the paper's behaviour. With left padding the first stored slots are padding, so their exact copy
  is wasted and the row's real first token is quantized.
* ``key_clip=0.7`` (default): each key group's per-channel range is picked among 7 candidates
  (the min/max range shrunk around its midpoint to 100%, 95%, ..., 70%) as the one with the lowest
  squared error; values keep min/max. The paper uses min/max (``key_clip=1.0``). On
  SmolLM2-135M at 4,096 tokens, 2-bit keys alone cost +10.1% perplexity with min/max and +3.6%
  with the search: a few extreme tokens per 32-token group otherwise spread the four levels.
* ``key_group_size`` (default: ``group_size``) sets the tokens per key group apart from the channels
  per value group; the full-precision tail then holds ``residual`` to ``residual + key_group_size - 1``
  tokens. The paper uses one group size for both.
* ``residual_dtype="bfloat16"`` (default) holds the full-precision tail and the exact sink copies in
  bfloat16 rather than the compute dtype (``"model"``): the memory target is a bfloat16 cache, and a
  float32 tail of 128 tokens alone costs 1 bit per element at 4,096 tokens. The step's new tokens
  still reach attention exactly; from the next step on they come back rounded to bfloat16. Slots that
  eviction moves from the codes into the tail are rounded to ``residual_dtype`` too.
* ``key_outliers`` (0 = the paper; default None: 3 per 64-token key group at 2 bits, none at 4 bits,
  where the range is already fine) keeps, per channel of every key group, the elements whose
  removal shrinks the channel's min/max range the most exactly in fp16, with their position in the
  group (``uint8``); the rest of the group is quantized over the tighter range (dense-and-sparse, as
  KVQuant does per vector). One outlier costs 24 bits per channel and key group: 0.75 bit per key
  element at ``key_group_size=32``. Outliers follow their tokens through eviction; an evicted one is
  dropped. They keep the tokens that stretch a channel's range (e.g. a passkey's) exact while the
  clipping search tightens the range for the rest: on SmolLM2-135M, 2-bit, groups of 64, three
  outliers per channel and group give +2.71% perplexity and passkey 0.90; with min/max ranges instead
  of the search, outliers alone do not suffice (+9.3% with one per 32-token group).
* ``pre_rope=True`` (default False = the paper) quantizes keys in their pre-RoPE basis, as KVQuant
  does: the tail is un-rotated with each slot's position (``hf_tokred.model_patches.rope``) when it is
  quantized and re-rotated after dequantization. Positions are implicit (slot ``i`` is token ``i``)
  until the first eviction, which stores them (``int32`` per slot and head). On SmolLM2-135M it gains
  little (2 bits, groups of 32: +4.46% vs +4.76% perplexity; with one outlier +2.80% vs +2.86%), so it
  stays off by default.
* Groups of 64 by default (``group_size=None``: 64 tokens per key group, and per value group 64 channels
  or, for a head dimension that 64 does not divide, its largest divisor below 64; the paper's 32 is a
  setting away): on SmolLM2-135M (head dimension 64)
  at 4,096 tokens, 4-bit KIVI costs +0.14% perplexity at 0.304x the dense bfloat16 cache with groups
  of 64 (+0.12% at 0.335x with 32); at 2 bits, with the default ``key_outliers`` (3 per 64-token key
  group), +2.71% at 0.217x and passkey 0.90 (dense 0.95), against +4.76%, 0.214x and passkey 0.70 for
  groups of 32 without outliers.
* ``bits=16`` stores full precision (a no-op, bit-identical to the dense cache), and so does a
  ``residual`` longer than the sequence with ``residual_dtype="model"``.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="kivi", bits=2, group_size=32, residual=128)
    >>> cfg.bits, cfg.residual
    (2, 128)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...errors import ConfigError
from ...kv.storage import (
    SCALE_DTYPE,
    DenseStore,
    KVStorageConfig,
    KVStore,
    _gather_slots,
    clip_candidates,
    dequantize_uniform,
    pack_codes,
    packed_width,
    quantize_uniform,
    range_outliers,
    residual_torch_dtype,
    slots_after_eviction,
    tensor_bytes,
    unpack_codes,
)


@register_method("kivi")
@dataclass(kw_only=True)
class KIVIConfig(KVStorageConfig):
    """KIVI storage: ``bits`` (2 or 4; 16 = full precision), ``group_size`` (tokens per key group and
    channels per value group; must divide the head dimension; None: 64 tokens, and 64 channels or the head
    dimension's largest divisor below 64), the full-precision ``residual`` and the exact ``key_outliers``
    per channel of each key group (None: 3 per 64 tokens at 2 bits, 0 at 4 bits).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="kivi", bits=2)
        >>> cfg.tokens_per_key_group, cfg.channels_per_value_group(64), cfg.channels_per_value_group(96)
        (64, 64, 48)
        >>> cfg.outliers_per_key_group()
        3
    """

    paper = "2402.02750"
    status = "stable"  # the evidence: docs/methods.md, "Why each status"

    bits: int = param(2, int, choices=(2, 4, 16), help="bits per stored key/value element (16 = no quantization)")
    group_size: int | None = param(None, int, low=1, optional=True,
                                   help="channels per value group and tokens per key group (None = 64 tokens, and 64 "
                                        "channels or the head dimension's largest divisor below 64)")
    key_group_size: int | None = param(None, int, low=1, optional=True,
                                       help="tokens per key group (None = group_size)")
    residual: int = param(128, int, low=0, help="most recent tokens kept in full precision")
    sink_tokens: int = param(1, int, low=0, help="first tokens kept exactly (attention sinks; 0 = as in the paper)")
    key_clip: float = param(0.7, float, low=0.0, high=1.0, low_open=True,
                            help="smallest key range tried by the clipping search, as a fraction of min/max "
                                 "(1.0 = the paper's min/max)")
    residual_dtype: str = param("bfloat16", str, choices=("bfloat16", "float16", "model"),
                                help="dtype of the full-precision tail and sink copies (model = as computed)")
    key_outliers: int | None = param(None, int, low=0, optional=True,
                                     help="elements per channel of each key group kept exactly in fp16 (dense-and-"
                                          "sparse; 0 = as in the paper; None = 3 per 64 tokens at 2 bits, else 0)")
    pre_rope: bool = param(False, bool, help="quantize keys in their pre-RoPE basis (KVQuant's finding; False = "
                                             "as in the paper)")

    def validate(self) -> None:
        if self.key_outliers is not None:
            check_key_outliers(self.key_outliers, self.tokens_per_key_group)

    @property
    def tokens_per_key_group(self) -> int:
        """``key_group_size``, else ``group_size``, else 64."""
        if self.key_group_size is not None:
            return self.key_group_size
        return DEFAULT_GROUP if self.group_size is None else self.group_size

    def channels_per_value_group(self, head_dim: int) -> int:
        """``group_size``, or when it is None the largest divisor of ``head_dim`` up to 64."""
        if self.group_size is not None:
            return self.group_size
        return max(d for d in range(1, min(DEFAULT_GROUP, head_dim) + 1) if head_dim % d == 0)

    def outliers_per_key_group(self) -> int:
        """``key_outliers``, or its default when None: 3 per 64 tokens of a key group at 2 bits (none for key
        groups over 255 tokens, whose positions would not fit a byte), 0 otherwise.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="kivi", bits=2).outliers_per_key_group()
            3
            >>> TokenReductionConfig(method="kivi", bits=2, key_group_size=32).outliers_per_key_group()
            1
            >>> TokenReductionConfig(method="kivi", bits=4).outliers_per_key_group()
            0
        """
        if self.key_outliers is not None:
            return self.key_outliers
        if self.bits != 2 or self.tokens_per_key_group > NO_OUTLIER:  # uint8 positions: groups of <= 255 tokens
            return 0
        return 3 * self.tokens_per_key_group // 64

    def check_model(self, model) -> None:
        """Raise :class:`ConfigError` if the model's head dimension does not fit ``group_size``, or, with
        ``pre_rope``, if the rotary embedding of a layer it holds is unknown."""
        super().check_model(model)
        if self.bits != 16:
            self.check_head_dim(self.head_dim(model), self.group_size)  # None: a divisor is picked
            if self.pre_rope:
                for layer in self.layer_indices(model):
                    self._rotary(model, layer)

    def _rotary(self, model, layer: int):
        from ...errors import UnsupportedModelError
        from ...model_patches.rope import rotary_for

        try:
            return rotary_for(model, layer)
        except UnsupportedModelError as err:
            raise ConfigError(f"pre_rope: {err}; use pre_rope=False", field="pre_rope") from err

    def make_stores(self, layers: list[int], model) -> list[KVStore]:
        self.check_model(model)
        if self.bits == 16:
            return [DenseStore() for _ in layers]
        channels = self.channels_per_value_group(self.head_dim(model))
        return [KIVIStore(self.bits, channels, self.residual, self.chunk_tokens, self.sink_tokens,
                          key_group_size=self.tokens_per_key_group, key_clip=self.key_clip,
                          residual_dtype=self.residual_dtype, key_outliers=self.outliers_per_key_group(),
                          rotary=self._rotary(model, layer) if self.pre_rope else None)
                for layer in layers]


DEFAULT_GROUP = 64  # tokens per key group and (at most) channels per value group when group_size is None
NO_OUTLIER = 255  # position of an outlier whose token was evicted (positions in a group are 0..254)


def check_key_outliers(key_outliers: int, key_group_size: int) -> None:
    """Raise :class:`ConfigError` (field ``key_outliers``) unless ``0 <= key_outliers < key_group_size``
    and, with outliers, ``key_group_size <= 255`` (their positions are stored as ``uint8``).

    Example:
        >>> check_key_outliers(1, 32)
        >>> check_key_outliers(32, 32)
        Traceback (most recent call last):
        ...
        hf_tokred.errors.ConfigError: key_outliers: expected 0 to 31 exact elements per channel of a 32-token key group, got 32
    """
    if isinstance(key_outliers, bool) or not isinstance(key_outliers, int) or not 0 <= key_outliers < key_group_size:
        raise ConfigError(f"key_outliers: expected 0 to {key_group_size - 1} exact elements per channel of a "
                          f"{key_group_size}-token key group, got {key_outliers!r}", field="key_outliers")
    if key_outliers and key_group_size > NO_OUTLIER:
        raise ConfigError(f"key_outliers: outlier positions are stored as uint8, so key groups may hold at most "
                          f"{NO_OUTLIER} tokens with key_outliers > 0; key_group_size is {key_group_size}",
                          field="key_outliers")


def _group_of_slots(counts: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Key-group index of each slot, from the tokens per group ``counts`` ``(B, H, G)``."""
    bounds = counts.cumsum(-1).contiguous()
    return torch.searchsorted(bounds, slots.contiguous(), right=True).clamp_(max=max(counts.shape[-1] - 1, 0))


class KIVIStore(KVStore):
    """One layer's KIVI storage (see the module docstring).

    Holds packed key codes with per-channel scales for groups of ``key_group_size`` tokens
    (``key_counts`` says how many slots each group covers), packed value codes with per-token scales
    for groups of ``group_size`` channels, and a full-precision tail held in ``residual_dtype``
    (``"bfloat16"``, ``"float16"`` or ``"model"``: the dtype the keys arrive in). ``key_clip < 1``
    picks each key group's range by :func:`~hf_tokred.kv.storage.quantize_uniform`'s clipping search
    over :func:`~hf_tokred.kv.storage.clip_candidates`; ``1.0`` is the paper's min/max. ``key_outliers``
    elements per channel of each key group are held exactly (``key_outlier_values`` in fp16,
    ``key_outlier_pos`` their ``uint8`` position in the group, picked by
    :func:`~hf_tokred.kv.storage.range_outliers`); ``rotary`` (a ``model_patches.rope.Rotary``) makes
    the keys quantized in their pre-RoPE basis.

    Example:
        >>> import torch
        >>> store = KIVIStore(bits=2, group_size=4, residual=2)
        >>> k, v = store.append(torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8))
        >>> store.quantized_length, store.residual_length
        (8, 4)
    """

    def __init__(self, bits: int, group_size: int, residual: int, chunk_tokens: int = 1024, sink_tokens: int = 0, *,
                 key_group_size: int | None = None, key_clip: float = 1.0, residual_dtype: str = "model",
                 key_outliers: int = 0, rotary=None):
        if not 0.0 < key_clip <= 1.0:
            raise ConfigError(f"key_clip: expected a fraction in (0, 1], got {key_clip!r}", field="key_clip")
        self.copy_dtype = residual_torch_dtype(residual_dtype)  # tail and sink copies; None: the keys' dtype
        self.bits, self.group_size, self.residual, self.chunk_tokens = bits, group_size, residual, chunk_tokens
        self.key_group_size = group_size if key_group_size is None else key_group_size
        check_key_outliers(key_outliers, self.key_group_size)
        self.key_outliers = key_outliers
        # dense-and-sparse keys: per key group and channel, `key_outliers` exact fp16 values and their
        # position in the group (NO_OUTLIER once evicted); shaped (B, H, groups, key_outliers, D)
        self.key_outlier_pos = self.key_outlier_values = None
        # pre-RoPE keys: `rotary` (model_patches.rope.Rotary) un-rotates keys before quantization and
        # re-rotates them after; slot i holds position i until the first eviction stores `positions`
        # (B, H, length) int32 for every slot, codes and tail alike
        self.rotary, self.positions = rotary, None
        self.sink_tokens, self.key_shrinks = sink_tokens, clip_candidates(key_clip)
        self.key_codes = self.key_scale = self.key_zero = self.key_counts = None
        self.value_codes = self.value_scale = self.value_zero = None
        self.tail_keys = self.tail_values = None
        self.seen = 0  # tokens appended so far (the next token's position)
        # exact copies of the first `sink_tokens` slots: their current slot (-1 once evicted) and vectors
        self.exact_slots = self.exact_keys = self.exact_values = None

    # -- shape helpers -----------------------------------------------------------------------

    @property
    def quantized_length(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.shape[2]

    @property
    def residual_length(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    @property
    def length(self) -> int:
        return self.quantized_length + self.residual_length

    def nbytes(self) -> int:
        return tensor_bytes(*(getattr(self, name) for name in self._tensors()))

    def _init(self, keys: torch.Tensor) -> None:
        batch, heads, _, dim = keys.shape
        if dim % self.group_size or dim % 8:
            raise ConfigError(
                f"group_size: must divide the head dimension {dim} (and the head dimension must be a multiple "
                f"of 8), got {self.group_size}",
                field="group_size",
            )
        device = keys.device
        width = packed_width(dim, self.bits)
        self.dim, self.dtype = dim, keys.dtype
        self.tail_dtype = self.copy_dtype or keys.dtype
        self.key_codes = torch.empty(batch, heads, 0, width, dtype=torch.uint8, device=device)
        self.value_codes = torch.empty(batch, heads, 0, width, dtype=torch.uint8, device=device)
        self.key_scale = torch.empty(batch, heads, 0, dim, dtype=SCALE_DTYPE, device=device)
        self.key_zero = torch.empty_like(self.key_scale)
        self.key_counts = torch.empty(batch, heads, 0, dtype=torch.int32, device=device)
        if self.key_outliers:
            self.key_outlier_pos = torch.empty(batch, heads, 0, self.key_outliers, dim, dtype=torch.uint8, device=device)
            self.key_outlier_values = torch.empty(batch, heads, 0, self.key_outliers, dim, dtype=SCALE_DTYPE,
                                                  device=device)
        self.value_scale = torch.empty(batch, heads, 0, dim // self.group_size, dtype=SCALE_DTYPE, device=device)
        self.value_zero = torch.empty_like(self.value_scale)
        self.tail_keys = keys.new_empty(batch, heads, 0, dim, dtype=self.tail_dtype)
        self.tail_values = keys.new_empty(batch, heads, 0, dim, dtype=self.tail_dtype)
        self.exact_slots = torch.empty(batch, heads, 0, dtype=torch.int32, device=device)
        self.exact_keys = keys.new_empty(batch, heads, 0, dim, dtype=self.tail_dtype)
        self.exact_values = keys.new_empty(batch, heads, 0, dim, dtype=self.tail_dtype)

    # -- dequantization ----------------------------------------------------------------------

    def _dequantize_keys(self, slots: torch.Tensor, outliers_in_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Keys of quantized ``slots`` ``(B, H, n)`` in the compute dtype.

        The exact outliers are looked up slot by slot (any ``slots``: eviction moves a few), or, when ``slots`` are
        the range ``outliers_in_range = (start, end)`` of every row and head (each decoding step), written into the
        range by position: the same values, without gathering every outlier of a group for each of its slots.
        """
        codes = unpack_codes(_gather_slots(self.key_codes, slots), self.bits)
        group = _group_of_slots(self.key_counts, slots)
        scale = _gather_slots(self.key_scale, group)
        zero = _gather_slots(self.key_zero, group)
        keys = dequantize_uniform(codes, scale, zero, torch.float32)
        if self.key_outlier_pos is not None and outliers_in_range is not None:
            self._put_outliers(keys, *outliers_in_range)
        elif self.key_outlier_pos is not None:
            start = self.key_counts.cumsum(-1) - self.key_counts
            offset = (slots - _gather_slots(start, group))[..., None, None]  # each slot's position in its group
            hit = _gather_slots(self.key_outlier_pos, group).long() == offset  # (B, H, n, key_outliers, D)
            exact = torch.where(hit, _gather_slots(self.key_outlier_values, group), 0).sum(3)
            keys = torch.where(hit.any(3), exact.float(), keys)
        if self.rotary is not None:
            keys = self.rotary.rotate(keys, self._positions_of(slots))
        return keys.to(self.dtype)

    def _put_outliers(self, keys: torch.Tensor, start: int, end: int) -> None:
        """Write the exact outliers of slots ``start..end-1`` into their dequantized ``keys`` ``(B, H, end - start,
        D)``."""
        counts = self.key_counts.long()
        position = self.key_outlier_pos.long()  # (B, H, groups, key_outliers, D); NO_OUTLIER once evicted
        slot = (counts.cumsum(-1) - counts)[..., None, None] + position
        # an evicted outlier's NO_OUTLIER is past its group's end (groups hold at most NO_OUTLIER tokens)
        inside = (position < counts[..., None, None]) & (slot >= start) & (slot < end)
        b, h, g, o, d = inside.nonzero(as_tuple=True)
        keys[b, h, slot[b, h, g, o, d] - start, d] = self.key_outlier_values[b, h, g, o, d].float()

    def _positions_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Token positions ``(B, H, n)`` of ``slots`` (the slot index until an eviction stored them)."""
        return slots if self.positions is None else self.positions.gather(2, slots).long()

    def _dequantize_key_range(self, start: int, end: int) -> torch.Tensor:
        batch, heads = self.key_codes.shape[:2]
        slots = torch.arange(start, end, device=self.key_codes.device).expand(batch, heads, end - start)
        return self._dequantize_keys(slots, outliers_in_range=(start, end))

    def _dequantize_values(self, codes_packed, scale, zero) -> torch.Tensor:
        codes = unpack_codes(codes_packed, self.bits)
        shape = codes.shape
        grouped = codes.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        return dequantize_uniform(grouped, scale[..., None], zero[..., None], self.dtype).reshape(shape)

    # -- the store contract ------------------------------------------------------------------

    def append(self, keys, values):
        if self.key_codes is None:
            self._init(keys)
        quantized, tail, new = self.quantized_length, self.residual_length, keys.shape[2]
        if quantized == 0 and tail == 0:
            out_keys, out_values = keys, values
            transient = 0
        else:
            batch, heads, _, dim = keys.shape
            out_keys = keys.new_empty(batch, heads, quantized + tail + new, dim)
            out_values = values.new_empty(batch, heads, quantized + tail + new, dim)
            scratch = 0
            for start in range(0, quantized, self.chunk_tokens):
                end = min(start + self.chunk_tokens, quantized)
                chunk_k = self._dequantize_key_range(start, end)
                chunk_v = self._dequantize_values(self.value_codes[:, :, start:end], self.value_scale[:, :, start:end],
                                                  self.value_zero[:, :, start:end])
                # unpacking: shifted and masked bytes (1, 2 and 4 bits) or int64 words (8 bytes per code), then
                # float32 products; outliers: each one's position and slot (int64) and whether it is in the chunk
                unpack_bytes = 2 if 8 % self.bits == 0 else 8
                outlier_scratch = 0 if self.key_outlier_pos is None else self.key_outlier_pos.numel() * (8 + 8 + 1)
                rotation_scratch = 0 if self.rotary is None else chunk_k.numel() * 4 * 4  # cos, sin, two products
                scratch = max(scratch, tensor_bytes(chunk_k, chunk_v) + chunk_k.numel() * 2 * (unpack_bytes + 4)
                              + outlier_scratch + rotation_scratch)
                out_keys[:, :, start:end] = chunk_k
                out_values[:, :, start:end] = chunk_v
                del chunk_k, chunk_v
            out_keys[:, :, quantized:quantized + tail] = self.tail_keys
            out_values[:, :, quantized:quantized + tail] = self.tail_values
            out_keys[:, :, quantized + tail:] = keys
            out_values[:, :, quantized + tail:] = values
            transient = tensor_bytes(out_keys, out_values) + scratch
            self._restore_exact(out_keys, out_values)
        taken = self.exact_slots.shape[-1]
        if taken < self.sink_tokens and new:
            count = min(self.sink_tokens - taken, new)
            first = quantized + tail
            slots = torch.arange(first, first + count, dtype=torch.int32, device=keys.device)
            self.exact_slots = torch.cat([self.exact_slots, slots.expand(*keys.shape[:2], count)], dim=2)
            self.exact_keys = torch.cat([self.exact_keys, keys[:, :, :count].to(self.tail_dtype, copy=True)], dim=2)
            self.exact_values = torch.cat([self.exact_values, values[:, :, :count].to(self.tail_dtype, copy=True)], dim=2)
        if new and self.positions is not None:
            seen = self.seen + torch.arange(new, device=keys.device, dtype=torch.int32)
            self.positions = torch.cat([self.positions, seen.expand(*keys.shape[:2], new)], dim=2)
        self.seen += new
        if new:
            self.tail_keys = torch.cat([self.tail_keys, keys.to(self.tail_dtype)], dim=2)
            self.tail_values = torch.cat([self.tail_values, values.to(self.tail_dtype)], dim=2)
            self._flush()
        self._record_peak(transient)
        return out_keys, out_values

    def _restore_exact(self, out_keys, out_values) -> None:
        """Write the exact copies of sink slots over their dequantized values."""
        if self.exact_slots is None or not self.exact_slots.shape[-1]:
            return
        b, h, e = (self.exact_slots >= 0).nonzero(as_tuple=True)
        slots = self.exact_slots[b, h, e].long()
        out_keys[b, h, slots] = self.exact_keys[b, h, e].to(out_keys.dtype)
        out_values[b, h, slots] = self.exact_values[b, h, e].to(out_values.dtype)

    def _exact_mask(self, start: int, end: int) -> torch.Tensor | None:
        """``(B, H, end - start)``: which tail slots ``start..end`` are held exactly."""
        if self.exact_slots is None or not self.exact_slots.shape[-1]:
            return None
        first = self.quantized_length + start
        slots = torch.arange(first, first + end - start, device=self.exact_slots.device)
        return (self.exact_slots[..., None, :] == slots[:, None]).any(-1)

    def _flush(self) -> None:
        """Quantize the oldest whole key groups of the tail while it holds ``residual + key_group_size`` or more."""
        tail, group, channels = self.residual_length, self.key_group_size, self.group_size
        count = (tail - self.residual) // group * group if tail >= self.residual + group else 0
        if count == 0:
            return
        step = max(self.chunk_tokens // group, 1) * group
        key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = [], [], [], [], [], []
        outlier_pos, outlier_values = [], []
        for start in range(0, count, step):
            end = min(start + step, count)
            block_k = self.tail_keys[:, :, start:end]
            batch, heads, n, dim = block_k.shape
            if self.rotary is not None:
                first = self.quantized_length + start
                slots = torch.arange(first, first + n, device=block_k.device).expand(batch, heads, n)
                block_k = self.rotary.unrotate(block_k, self._positions_of(slots))
            exact = self._exact_mask(start, end)
            ignore = None if exact is None else exact.reshape(batch, heads, n // group, group, 1)
            grouped = block_k.reshape(batch, heads, n // group, group, dim)
            if self.key_outliers:
                # dense-and-sparse: the elements that stretch each channel's range most stay exact (fp16)
                # and leave the range; the sink's exact copy is never picked
                position = range_outliers(grouped, self.key_outliers, dim=3, ignore=ignore)
                outlier_pos.append(position.to(torch.uint8))
                outlier_values.append(grouped.gather(3, position).to(SCALE_DTYPE))
                sparse = torch.zeros_like(grouped, dtype=torch.bool).scatter_(3, position, True)
                ignore = sparse if ignore is None else sparse | ignore
            codes, scale, zero = quantize_uniform(grouped, self.bits, dim=3, ignore=ignore, shrinks=self.key_shrinks)
            key_codes.append(pack_codes(codes.reshape(batch, heads, n, dim), self.bits))
            key_scale.append(scale.squeeze(3))
            key_zero.append(zero.squeeze(3))
            block_v = self.tail_values[:, :, start:end].reshape(batch, heads, n, dim // channels, channels)
            codes, scale, zero = quantize_uniform(block_v, self.bits, dim=-1)
            value_codes.append(pack_codes(codes.reshape(batch, heads, n, dim), self.bits))
            value_scale.append(scale.squeeze(-1))
            value_zero.append(zero.squeeze(-1))
        batch, heads = self.key_codes.shape[:2]
        groups = count // group
        self.key_codes = torch.cat([self.key_codes, *key_codes], dim=2)
        self.key_scale = torch.cat([self.key_scale, *key_scale], dim=2)
        self.key_zero = torch.cat([self.key_zero, *key_zero], dim=2)
        if self.key_outliers:
            self.key_outlier_pos = torch.cat([self.key_outlier_pos, *outlier_pos], dim=2)
            self.key_outlier_values = torch.cat([self.key_outlier_values, *outlier_values], dim=2)
        counts = torch.full((batch, heads, groups), group, dtype=torch.int32, device=self.key_counts.device)
        self.key_counts = torch.cat([self.key_counts, counts], dim=2)
        self.value_codes = torch.cat([self.value_codes, *value_codes], dim=2)
        self.value_scale = torch.cat([self.value_scale, *value_scale], dim=2)
        self.value_zero = torch.cat([self.value_zero, *value_zero], dim=2)
        self.tail_keys = self.tail_keys[:, :, count:].clone()
        self.tail_values = self.tail_values[:, :, count:].clone()

    def gather(self, index):
        if self.key_codes is None:
            return
        quantized, old_length = self.quantized_length, self.length
        index = index.to(self.key_codes.device)
        kept_quantized = int((index < quantized).sum(-1).min()) if index.shape[-1] else 0
        head = index[..., :kept_quantized]
        rest = index[..., kept_quantized:]
        # Kept slots that leave the quantized part (heads that kept more of it than the fewest did, and
        # the old tail) become the new full-precision tail; dequantized values move there losslessly.
        from_codes = rest < quantized
        code_slot = rest.clamp(max=max(quantized - 1, 0))
        tail_slot = (rest - quantized).clamp(min=0, max=max(self.residual_length - 1, 0))
        if quantized and bool(from_codes.any()):
            moved_k = self._dequantize_keys(code_slot).to(self.tail_dtype)
            moved_v = self._dequantize_values(_gather_slots(self.value_codes, code_slot),
                                              _gather_slots(self.value_scale, code_slot),
                                              _gather_slots(self.value_zero, code_slot)).to(self.tail_dtype)
        else:
            moved_k = moved_v = None
        if self.residual_length:
            kept_k = _gather_slots(self.tail_keys, tail_slot)
            kept_v = _gather_slots(self.tail_values, tail_slot)
            if moved_k is not None:
                kept_k = torch.where(from_codes[..., None], moved_k, kept_k)
                kept_v = torch.where(from_codes[..., None], moved_v, kept_v)
        else:
            kept_k, kept_v = moved_k, moved_v
        if kept_k is None:
            kept_k = self.tail_keys[:, :, :0]
            kept_v = self.tail_values[:, :, :0]
        # Quantized part: codes and per-token value scales follow their slots; a key group keeps its
        # scale as long as one of its tokens is kept.
        if quantized:
            group = _group_of_slots(self.key_counts, head)
            counts = torch.zeros_like(self.key_counts).scatter_add_(2, group, torch.ones_like(group, dtype=torch.int32))
            order = torch.sort((counts == 0).to(torch.uint8), dim=-1, stable=True).indices
            groups = int((counts > 0).sum(-1).max()) if head.shape[-1] else 0
            order = order[..., :groups]
            if self.key_outliers:
                self._gather_outliers(head, order, counts.gather(2, order))
            self.key_counts = counts.gather(2, order)
            self.key_scale = _gather_slots(self.key_scale, order)
            self.key_zero = _gather_slots(self.key_zero, order)
            self.key_codes = _gather_slots(self.key_codes, head)
            self.value_codes = _gather_slots(self.value_codes, head)
            self.value_scale = _gather_slots(self.value_scale, head)
            self.value_zero = _gather_slots(self.value_zero, head)
        self.tail_keys, self.tail_values = kept_k.contiguous(), kept_v.contiguous()
        if self.rotary is not None:  # kept slots keep their tokens' positions for the re-rotation
            if self.positions is None:
                self.positions = torch.arange(old_length, dtype=torch.int32, device=index.device).expand(
                    *index.shape[:2], old_length)
            self.positions = self.positions.gather(2, index).contiguous()
        if self.exact_slots.shape[-1]:
            new_slot = slots_after_eviction(index, old_length)
            old = torch.where(self.exact_slots >= 0, self.exact_slots, new_slot.shape[-1] - 1).long()
            self.exact_slots = new_slot.gather(2, old)

    def _gather_outliers(self, head: torch.Tensor, order: torch.Tensor, new_counts: torch.Tensor) -> None:
        """Let the key outliers follow eviction: ``head`` are the kept quantized slots, ``order`` the kept
        groups (before :attr:`key_counts` is updated) and ``new_counts`` their new token counts. An outlier
        whose token is evicted becomes :data:`NO_OUTLIER`; the others get their token's new position."""
        batch, heads, groups, count, dim = self.key_outlier_pos.shape
        quantized = self.quantized_length
        position = self.key_outlier_pos.long()
        start = (self.key_counts.cumsum(-1) - self.key_counts).long()
        old_slot = (start[..., None, None] + position).masked_fill_(position == NO_OUTLIER, quantized)
        new_slot = slots_after_eviction(head, quantized, torch.long)
        moved = new_slot.gather(2, old_slot.reshape(batch, heads, -1)).reshape(batch, heads, groups, count, dim)
        moved = _gather_slots(moved, order)
        new_start = (new_counts.cumsum(-1) - new_counts).long()
        position = torch.where(moved < 0, NO_OUTLIER, moved - new_start[..., None, None])
        self.key_outlier_pos = position.to(torch.uint8)
        self.key_outlier_values = _gather_slots(self.key_outlier_values, order)

    def _tensors(self) -> list[str]:
        return ["key_codes", "key_scale", "key_zero", "key_counts", "key_outlier_pos", "key_outlier_values",
                "value_codes", "value_scale", "value_zero", "tail_keys", "tail_values", "exact_slots", "exact_keys",
                "exact_values", "positions"]

    def select_batch(self, index):
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))

    def repeat_batch(self, repeats):
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.repeat_interleave(repeats, dim=0))


__all__ = ["KIVIConfig", "KIVIStore"]
