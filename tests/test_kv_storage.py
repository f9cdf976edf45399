"""Compressed KV storage on plain tensors: packing, quantization, stores' gather/select, SLERP merging."""

from __future__ import annotations

import pytest
import torch

from hf_tokred.errors import ConfigError
from hf_tokred.kv.storage import (
    RANGE_SHRINKS,
    DenseStore,
    dequantize_uniform,
    fit_codebook,
    nearest_code,
    pack_codes,
    quantize_uniform,
    range_outliers,
    tensor_bytes,
    unpack_codes,
)
from hf_tokred.methods.kv.kivi import NO_OUTLIER, KIVIStore
from hf_tokred.methods.kv.kvquant import (
    KVQuantCalibration,
    KVQuantStore,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)
from hf_tokred.methods.kv.minicache import MergedLayerStore, MergedPair, slerp_merge


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    # packing is per slot: gathering packed slots equals packing gathered codes
    index = torch.tensor([4, 0, 2])
    assert torch.equal(packed[:, :, index], pack_codes(codes[:, :, index], bits))


def test_pack_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(1, 12, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_quantization_error_is_half_a_step(bits):
    x = torch.randn(4, 32, 16) * 3
    codes, scale, zero = quantize_uniform(x, bits, dim=1)
    assert codes.max() <= 2**bits - 1
    error = (dequantize_uniform(codes, scale, zero, torch.float32) - x).abs()
    assert bool((error <= scale.float() / 2 + 1e-2).all())
    # ignored elements do not widen the range
    ignore = torch.zeros(4, 32, 1, dtype=torch.bool)
    ignore[:, 0] = True
    x[:, 0] = 1000.0
    _, scale_ignored, _ = quantize_uniform(x, bits, dim=1, ignore=ignore)
    assert float(scale_ignored.float().max()) < 10


def test_range_search_is_never_worse_than_min_max():
    torch.manual_seed(7)
    x = torch.randn(3, 4, 16, 8)
    x[0, 0, 3] = 12.0  # one extreme token per channel in one group
    plain = quantize_uniform(x, 2, dim=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, quantize_uniform(x, 2, dim=2, shrinks=(1.0,))))
    searched = quantize_uniform(x, 2, dim=2, shrinks=RANGE_SHRINKS)

    def error(result):
        return (dequantize_uniform(*result, torch.float32) - x).square().sum(2)

    assert bool((error(searched) <= error(plain) + 1e-4).all())
    assert float(error(searched).sum()) < 0.9 * float(error(plain).sum())
    # ignored elements neither widen the range nor count in the error
    ignore = torch.zeros(3, 4, 16, 1, dtype=torch.bool)
    ignore[:, :, 0] = True
    x[:, :, 0] = 1000.0
    _, scale, _ = quantize_uniform(x, 2, dim=2, ignore=ignore, shrinks=RANGE_SHRINKS)
    assert float(scale.float().max()) < 10
    with pytest.raises(ValueError, match="shrinks"):
        quantize_uniform(x, 2, dim=2, shrinks=())


def test_codebook_fit_and_nearest_code():
    samples = torch.cat([torch.full((500,), -0.5), torch.full((500,), 0.25), torch.full((10,), 0.9)])
    book = fit_codebook(samples, 4)
    assert torch.equal(book, book.sort().values)
    assert {-0.5, 0.25} <= {round(v, 4) for v in book.tolist()}
    assert book[nearest_code(torch.tensor([-0.49, 0.26, 0.8]), book).long()].tolist() == pytest.approx([-0.5, 0.25, 0.9])


def _fill(store, keys, values, prefill):
    out = store.append(keys[:, :, :prefill], values[:, :, :prefill])
    for t in range(prefill, keys.shape[2]):
        out = store.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    return out


def test_kivi_store_layout_error_and_packed_bytes():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 300, 64), torch.randn(2, 3, 300, 64)
    store = KIVIStore(bits=2, group_size=32, residual=64, sink_tokens=0)
    first, _ = store.append(keys[:, :, :200], values[:, :, :200])
    assert torch.equal(first, keys[:, :, :200])  # the prompt attends in full precision
    for t in range(200, 300):
        out_k, out_v = store.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    # the tail keeps between residual and residual + group_size - 1 tokens; the rest is quantized in whole groups
    assert store.length == 300 and store.quantized_length % 32 == 0
    assert 64 <= store.residual_length < 64 + 32
    assert torch.equal(out_k[:, :, -store.residual_length:], keys[:, :, -store.residual_length:])
    assert torch.equal(out_k[:, :, -1], keys[:, :, -1])  # the step's new token comes back exactly
    error = (out_k[:, :, :store.quantized_length] - keys[:, :, :store.quantized_length]).abs().mean()
    assert 0.05 < float(error) < 0.5
    # two-bit codes: four per byte
    assert store.key_codes.shape[-1] == 16 and store.key_codes.dtype == torch.uint8
    dense_bytes = tensor_bytes(keys, values)
    assert store.nbytes() < 0.5 * dense_bytes


def test_kivi_key_groups_apart_from_value_groups_and_a_bfloat16_tail():
    torch.manual_seed(8)
    keys, values = torch.randn(2, 3, 300, 64), torch.randn(2, 3, 300, 64)
    store = KIVIStore(bits=2, group_size=32, residual=64, sink_tokens=1, key_group_size=16, key_clip=0.7,
                      residual_dtype="bfloat16")
    out_k, out_v = _fill(store, keys, values, 200)
    # keys flush in groups of 16 tokens, values keep groups of 32 channels
    assert store.quantized_length % 16 == 0 and 64 <= store.residual_length < 64 + 16
    assert store.key_scale.shape[2] == store.quantized_length // 16 and store.value_scale.shape[-1] == 2
    assert store.tail_keys.dtype == store.exact_keys.dtype == torch.bfloat16 and out_k.dtype == torch.float32
    # the step's new token comes back exactly; older tail slots and the sink as bfloat16
    assert torch.equal(out_k[:, :, -1], keys[:, :, -1]) and torch.equal(out_v[:, :, -1], values[:, :, -1])
    tail = slice(store.quantized_length, 299)
    assert torch.equal(out_k[:, :, tail], keys[:, :, tail].bfloat16().float())
    assert torch.equal(out_k[:, :, 0], keys[:, :, 0].bfloat16().float())
    wide = KIVIStore(bits=2, group_size=32, residual=64, sink_tokens=1, key_group_size=16, residual_dtype="model")
    _fill(wide, keys, values, 200)
    assert store.nbytes() < wide.nbytes() and wide.tail_keys.dtype == torch.float32
    for field, kwargs in (("key_clip", {"key_clip": 0.0}), ("residual_dtype", {"residual_dtype": "float64"})):
        with pytest.raises(ConfigError, match=field) as err:
            KIVIStore(2, 32, 64, **kwargs)
        assert err.value.field == field


def test_kivi_chunked_dequantization_is_identical_and_bounded():
    torch.manual_seed(1)
    keys, values = torch.randn(1, 2, 400, 16), torch.randn(1, 2, 400, 16)
    small, large = KIVIStore(4, 8, 16, chunk_tokens=24), KIVIStore(4, 8, 16, chunk_tokens=4096)
    a, b = _fill(small, keys, values, 300), _fill(large, keys, values, 300)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert small.max_transient_bytes < large.max_transient_bytes


def _evict_ragged_keeping_the_sink(store) -> torch.Tensor:
    """Keep slot 0 and 149 random others of a 300-slot store with (2, 3) heads of 64 channels, each row and head its
    own; check that the kept slots read back exactly what they read before; return the keys after."""
    empty = torch.empty(2, 3, 0, 64)
    before_k, before_v = store.append(empty, empty)
    index = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(299)[:149].sort().values]) for _ in range(6)])
    index = index.reshape(2, 3, 150)
    store.gather(index)
    after_k, after_v = store.append(empty, empty)
    expand = index[..., None].expand(-1, -1, -1, 64)
    assert torch.equal(after_k, before_k.gather(2, expand)) and torch.equal(after_v, before_v.gather(2, expand))
    return after_k


def test_kivi_gather_keeps_packed_codes_exactly():
    torch.manual_seed(2)
    keys, values = torch.randn(2, 3, 300, 64), torch.randn(2, 3, 300, 64)
    keys[:, :, 0] *= 40  # an attention-sink-like outlier token, held exactly
    store = KIVIStore(bits=2, group_size=32, residual=64, sink_tokens=1)
    _fill(store, keys, values, 250)
    assert torch.equal(store.append(keys[:, :, :0], values[:, :, :0])[0][:, :, 0], keys[:, :, 0])
    # per-row, per-head selections of different sizes in the quantized part (ragged) keep the sink
    _evict_ragged_keeping_the_sink(store)
    assert store.length == 150
    # evicting the sink slot drops its exact copy
    store.gather(torch.arange(1, 150).expand(2, 3, 149))
    assert bool((store.exact_slots == -1).all())


def test_range_outliers_are_the_removal_that_shrinks_the_range_most():
    import itertools

    torch.manual_seed(9)
    x = torch.randn(40, 8) * torch.rand(40, 1) * 5
    for count in (1, 2, 3):
        picked = range_outliers(x, count, dim=-1)
        assert picked.shape == (40, count)
        kept = torch.ones_like(x, dtype=torch.bool).scatter_(-1, picked, False)
        span = torch.where(kept, x, -torch.inf).amax(-1) - torch.where(kept, x, torch.inf).amin(-1)
        for row in range(40):  # brute force over every choice of `count` elements
            best = min(float(x[row, list(rest)].max() - x[row, list(rest)].min())
                       for rest in itertools.combinations(range(8), 8 - count))
            assert float(span[row]) == pytest.approx(best)
    # along another dimension, and ignored elements are never picked even when they are the most extreme
    y = torch.randn(2, 16, 3)
    y[:, 4] = 100.0
    ignore = torch.zeros(2, 16, 1, dtype=torch.bool)
    ignore[:, 4] = True
    picked = range_outliers(y, 2, dim=1, ignore=ignore)
    assert picked.shape == (2, 2, 3) and not bool((picked == 4).any())
    with pytest.raises(ValueError, match="count"):
        range_outliers(y, 16, dim=1)


def test_kivi_key_outliers_restore_extreme_tokens_exactly():
    torch.manual_seed(10)
    keys, values = torch.randn(1, 2, 200, 32), torch.randn(1, 2, 200, 32)
    keys[:, :, 70] = 30 * keys[:, :, 70].sign()  # an extreme token (e.g. the passkey's) in the group of tokens 64..95
    keys[:, :, 100, 3] = -40.0  # one extreme element in the next group
    keys = keys.half().float()  # fp16-representable, so outliers come back exactly
    plain = KIVIStore(bits=2, group_size=32, residual=32, sink_tokens=0)
    sparse = KIVIStore(bits=2, group_size=32, residual=32, sink_tokens=0, key_outliers=1)
    plain_k, plain_v = _fill(plain, keys, values, 150)
    sparse_k, sparse_v = _fill(sparse, keys, values, 150)
    assert sparse.quantized_length == 160 and sparse.key_outlier_pos.shape == (1, 2, 5, 1, 32)
    assert torch.equal(sparse_k[:, :, 70], keys[:, :, 70]) and float(sparse_k[0, 0, 100, 3]) == -40.0
    assert not torch.equal(plain_k[:, :, 70], keys[:, :, 70])
    # the rest of those groups is quantized over a tight range: far smaller error than min/max
    group = slice(64, 128)
    assert float((sparse_k[:, :, group] - keys[:, :, group]).abs().mean()) < \
        0.25 * float((plain_k[:, :, group] - keys[:, :, group]).abs().mean())
    assert torch.equal(sparse_v, plain_v)  # values are untouched
    # cost: one fp16 value and one uint8 position per channel and key group
    groups = sparse.key_scale.shape[2]
    assert sparse.nbytes() - plain.nbytes() == 2 * groups * 32 * (2 + 1)
    # with k outliers, every group element that is exact is one of the k that stretch the range most
    two = KIVIStore(bits=2, group_size=32, residual=32, sink_tokens=0, key_outliers=2)
    two_k, _ = _fill(two, keys, values, 150)
    assert torch.equal(two_k[:, :, 70], keys[:, :, 70]) and float(two_k[0, 0, 100, 3]) == -40.0
    assert float((two_k[:, :, :160] - keys[:, :, :160]).square().sum()) < \
        float((sparse_k[:, :, :160] - keys[:, :, :160]).square().sum())


def test_kivi_key_outliers_skip_the_sink_and_follow_eviction():
    torch.manual_seed(11)
    keys, values = torch.randn(2, 3, 300, 64).half().float(), torch.randn(2, 3, 300, 64)
    keys[:, :, 0] *= 40  # the sink: held exactly on the side, never spent as an outlier
    keys[:, :, 70] = 20 * keys[:, :, 70].sign()
    store = KIVIStore(bits=2, group_size=32, residual=64, sink_tokens=1, key_outliers=2, key_clip=0.7)
    _fill(store, keys, values, 250)
    assert not bool((store.key_outlier_pos[:, :, 0] == 0).any())
    assert torch.equal(store.append(keys[:, :, :0], values[:, :, :0])[0][:, :, 70], keys[:, :, 70])
    # ragged per-head selections: outliers move with their slots, evicted ones are dropped
    after_k = _evict_ragged_keeping_the_sink(store)
    assert bool((store.key_outlier_pos == NO_OUTLIER).any()) and bool((store.key_outlier_pos != NO_OUTLIER).any())
    # a second eviction, then new tokens flushed into new groups
    second = torch.stack([torch.randperm(150)[:90].sort().values for _ in range(6)]).reshape(2, 3, 90)
    store.gather(second)
    again_k, _ = store.append(keys[:, :, :0], values[:, :, :0])
    assert torch.equal(again_k, after_k.gather(2, second[..., None].expand(-1, -1, -1, 64)))
    quantized = store.quantized_length
    more_k = torch.randn(2, 3, 80, 64)
    more_k[:, :, 0] = 30 * more_k[:, :, 0].sign()
    for t in range(80):
        out_k, _ = store.append(more_k[:, :, t:t + 1], values[:, :, t:t + 1])
    assert quantized < 90 < store.quantized_length
    assert torch.equal(out_k[:, :, 90], more_k[:, :, 0])  # quantized now, and exact
    # batch reordering carries the outliers too
    full_k, _ = store.append(keys[:, :, :0], values[:, :, :0])
    store.select_batch(torch.tensor([1, 0]))
    store.repeat_batch(2)
    moved_k, _ = store.append(keys[:, :, :0].repeat(2, 1, 1, 1), values[:, :, :0].repeat(2, 1, 1, 1))
    assert torch.equal(moved_k[0], full_k[1]) and torch.equal(moved_k[3], full_k[0])


def test_kivi_outliers_written_by_range_equal_the_per_slot_lookup_and_chunking():
    # each step writes a range's outliers by position; eviction looks them up slot by slot: the same keys, before
    # and after a ragged eviction, whole or in chunks that cut key groups
    torch.manual_seed(12)
    keys, values = torch.randn(2, 3, 700, 64), torch.randn(2, 3, 700, 64)
    keys[:, :, 70] = 20 * keys[:, :, 70].sign()
    small = KIVIStore(bits=2, group_size=32, residual=64, sink_tokens=1, key_outliers=2, chunk_tokens=24)
    large = KIVIStore(bits=2, group_size=32, residual=64, sink_tokens=1, key_outliers=2, chunk_tokens=4096)
    for store in (small, large):
        _fill(store, keys, values, 650)
    # more than 255 quantized slots after it: an evicted outlier's NO_OUTLIER position must not land on one
    index = torch.stack([torch.randperm(700)[:500].sort().values for _ in range(6)]).reshape(2, 3, 500)
    for evicted in (False, True):
        if evicted:
            small.gather(index)
            large.gather(index)
        quantized = small.quantized_length
        slots = torch.arange(quantized).expand(2, 3, quantized)
        per_slot = small._dequantize_keys(slots)
        assert torch.equal(small._dequantize_keys(slots, outliers_in_range=(0, quantized)), per_slot)
        part = small._dequantize_keys(slots[..., 40:100], outliers_in_range=(40, 100))
        assert torch.equal(part, per_slot[..., 40:100, :])
        empty = keys[:, :, :0]
        assert torch.equal(small.append(empty, empty)[0], large.append(empty, empty)[0])
    assert bool((small.key_outlier_pos == NO_OUTLIER).any())  # the eviction dropped some outliers


def test_kivi_key_outliers_are_checked():
    for kwargs in ({"key_outliers": -1}, {"key_outliers": 32}, {"key_outliers": 4, "key_group_size": 4},
                   {"key_outliers": 1, "key_group_size": 256}):
        with pytest.raises(ConfigError, match="key_outliers") as err:
            KIVIStore(2, 32, 64, **kwargs)
        assert err.value.field == "key_outliers"
    assert KIVIStore(2, 32, 64, key_group_size=256).key_outliers == 0  # no outliers: no uint8 limit


def test_kivi_pre_rope_keys_follow_eviction_and_new_tokens():
    from conftest import make_tiny_llama
    from hf_tokred.model_patches.rope import rotary_for

    rotary = rotary_for(make_tiny_llama())
    torch.manual_seed(12)
    pre = torch.randn(2, 2, 300, 16)
    pre[..., :3] += 8.0  # large, nearly constant pre-RoPE channels that RoPE turns into fast oscillations
    keys = rotary.rotate(pre, torch.arange(300).expand(2, 2, 300))
    values = torch.randn(2, 2, 300, 16)
    post = KIVIStore(2, 8, 32, key_group_size=32, sink_tokens=0, key_outliers=1)
    store = KIVIStore(2, 8, 32, key_group_size=32, sink_tokens=0, key_outliers=1, rotary=rotary)
    post_k, _ = _fill(post, keys, values, 200)
    pre_k, pre_v = _fill(store, keys, values, 200)
    quantized = store.quantized_length
    assert quantized == post.quantized_length == 256 and store.positions is None  # positions implicit so far
    assert torch.equal(pre_k[:, :, quantized:], keys[:, :, quantized:])  # the tail is exact

    def error(out):
        return float((out[:, :, :quantized] - keys[:, :, :quantized]).square().mean())

    assert error(pre_k) < 0.3 * error(post_k)
    before_k, before_v = store.append(keys[:, :, :0], values[:, :, :0])
    # ragged eviction: the re-rotation uses each kept slot's own position
    index = torch.stack([torch.randperm(300)[:150].sort().values for _ in range(4)]).reshape(2, 2, 150)
    store.gather(index)
    assert torch.equal(store.positions, index.to(torch.int32))
    after_k, after_v = store.append(keys[:, :, :0], values[:, :, :0])
    expand = index[..., None].expand(-1, -1, -1, 16)
    assert torch.allclose(after_k, before_k.gather(2, expand), atol=1e-5) and torch.equal(after_v, before_v.gather(2, expand))
    # tokens appended after the eviction get positions 300.. and are un-rotated with them when flushed
    more_pre = torch.randn(2, 2, 80, 16)
    more_pre[..., :3] += 8.0
    more = rotary.rotate(more_pre, torch.arange(300, 380).expand(2, 2, 80))
    for t in range(80):
        store.append(more[:, :, t:t + 1], values[:, :, t:t + 1])
    out_k, _ = store.append(keys[:, :, :0], values[:, :, :0])
    assert store.positions.shape == (2, 2, 230) and store.positions[0, 0, -1] == 379
    reference = torch.cat([keys.gather(2, expand), more], dim=2)
    assert store.quantized_length > 150
    assert float((out_k - reference).square().mean()) < 0.3 * error(post_k)


def test_kivi_batch_select_and_repeat():
    torch.manual_seed(3)
    keys, values = torch.randn(2, 2, 100, 16), torch.randn(2, 2, 100, 16)
    store = KIVIStore(4, 8, 8)
    full_k, _ = _fill(store, keys, values, 90)
    store.select_batch(torch.tensor([1, 0]))
    store.repeat_batch(2)
    out_k, _ = store.append(keys[:, :, :0].repeat(2, 1, 1, 1), values[:, :, :0].repeat(2, 1, 1, 1))
    assert torch.equal(out_k[0], full_k[1]) and torch.equal(out_k[1], full_k[1]) and torch.equal(out_k[2], full_k[0])


def test_kvquant_key_and_value_round_trip_with_exact_outliers():
    torch.manual_seed(4)
    keys = torch.randn(1, 2, 10, 16)
    keys[0, 0, 3, 5] = 50.0
    center, half = torch.zeros(2, 16), torch.full((2, 16), 2.5)
    book = torch.linspace(-1, 1, 8)
    codes, index, exact = quantize_keys(keys, center, half, book, 3, 1)
    assert codes.shape == (1, 2, 10, 6)
    restored = dequantize_keys(codes, index, exact, center, half, book, 3)
    assert restored[0, 0, 3, 5] == 50.0  # the outlier is stored exactly (fp16)
    inlier = keys.abs() < 2.5
    assert float((restored - keys).abs()[inlier].max()) <= 2.5 / 7 + 1e-3
    values = torch.randn(1, 2, 10, 16)
    codes, scale, index, exact = quantize_values(values, book, 3, 1)
    restored = dequantize_values(codes, scale, index, exact, book, 3)
    assert float((restored - values).abs().max()) < 0.5


def _kvquant_store(**kwargs):
    from hf_tokred.model_patches.rope import Rotary
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    calibration = KVQuantCalibration(1, 3, 16, 3)
    calibration.key_half.fill_(2.5)
    calibration.calibrated.fill_(1)
    rotary = Rotary(LlamaRotaryEmbedding(LlamaConfig(hidden_size=48, num_attention_heads=3)), "rotate_half")
    return KVQuantStore(calibration, 0, rotary, bits=3, outliers=1, **kwargs)


def test_kvquant_recent_window_sink_and_eviction():
    torch.manual_seed(9)
    keys, values = torch.randn(2, 3, 100, 16), torch.randn(2, 3, 100, 16)
    store = _kvquant_store(sink_tokens=1, residual=16, residual_dtype="bfloat16")
    _fill(store, keys, values, 60)
    out_k, out_v = store.append(keys[:, :, :0], values[:, :, :0])
    # the last 16 slots and the sink come back as their bfloat16 copies, the rest dequantized
    assert torch.equal(out_k[:, :, 84:], keys[:, :, 84:].bfloat16().float())
    assert torch.equal(out_v[:, :, 0], values[:, :, 0].bfloat16().float())
    assert store.window.count == 16 and store.window.keys.dtype == torch.bfloat16
    middle = (out_k[:, :, 1:84] - keys[:, :, 1:84]).abs()
    assert 0 < float(middle.mean()) < 0.5
    # positions stay implicit until an eviction stores them; gather on codes equals gathering the outputs
    assert store.positions is None
    index = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(99)[:59].sort().values]) for _ in range(6)])
    index = index.reshape(2, 3, 60)
    store.gather(index)
    assert store.positions.dtype == torch.int32 and store.length == 60
    after_k, after_v = store.append(keys[:, :, :0], values[:, :, :0])
    expand = index[..., None].expand(-1, -1, -1, 16)
    assert torch.equal(after_k, out_k.gather(2, expand)) and torch.equal(after_v, out_v.gather(2, expand))
    # new tokens push the window on: only the last 16 stored slots keep their copies
    store.append(keys[:, :, :4], values[:, :, :4])
    used = store.window.slots[store.window.slots >= 0]
    assert int(used.min()) >= 64 - 16 and store.window.count <= 16
    plain = _kvquant_store(sink_tokens=0)
    _fill(plain, keys, values, 60)
    assert plain.window.count == plain.sinks.count == 0 and plain.nbytes() < store.nbytes()
    with pytest.raises(ConfigError, match="residual_dtype"):
        _kvquant_store(residual_dtype="float64")


def test_slerp_merge_keeps_directions_on_the_sphere():
    a, b = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    merged, norm_a, norm_b, distance = slerp_merge(a, b, 0.5)
    assert torch.allclose(merged.norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(norm_a, a.norm(dim=-1)) and bool(((distance >= 0) & (distance <= 1)).all())
    same, _, _, zero = slerp_merge(a, 2 * a, 0.3)
    assert torch.allclose(same, a / a.norm(dim=-1, keepdim=True), atol=1e-5) and float(zero.max()) < 1e-3


def test_minicache_pair_restores_magnitudes_and_retained_tokens():
    torch.manual_seed(5)
    pair = MergedPair(DenseStore(), 0.5, retention_threshold=0.3)
    shallow, deep = MergedLayerStore(pair, 0), MergedLayerStore(pair, 1)
    k1, v1, k2, v2 = (torch.randn(1, 2, 20, 8) for _ in range(4))
    k2[:, :, :10] = 3 * k1[:, :, :10]  # half the tokens agree in direction across the two layers
    v2[:, :, :10] = 2 * v1[:, :, :10]
    assert shallow.append(k1, v1)[0] is k1 and deep.append(k2, v2)[0] is k2
    assert shallow.length == deep.length == 20 and deep.nbytes() == 0 < shallow.nbytes()
    a_k, a_v = shallow.append(k1[:, :, :0], v1[:, :, :0])
    b_k, b_v = deep.append(k2[:, :, :0], v2[:, :, :0])
    # agreeing tokens come back exactly (up to fp16 magnitudes) in both layers
    assert torch.allclose(a_k[:, :, :10], k1[:, :, :10], rtol=2e-3, atol=2e-3)
    assert torch.allclose(b_k[:, :, :10], k2[:, :, :10], rtol=2e-3, atol=2e-3)
    retained = pair.retained_slots[pair.retained_slots >= 0]
    assert retained.numel() > 0 and bool((retained >= 10).all())
    # a retained token is exact in both layers
    b, h = (pair.retained_slots >= 0).nonzero()[0].tolist()[:2]
    slot = int(pair.retained_slots[b, h][pair.retained_slots[b, h] >= 0][0])
    assert torch.allclose(b_k[b, h, slot], k2[b, h, slot]) and torch.allclose(a_k[b, h, slot], k1[b, h, slot], atol=2e-3)
    # merged (non-retained) disagreeing tokens are changed
    merged = [s for s in range(10, 20) if s not in pair.retained_slots[0, 0].tolist()]
    assert merged and not torch.allclose(b_k[0, 0, merged], k2[0, 0, merged])
