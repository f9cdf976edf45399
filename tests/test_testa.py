"""TESTA (arXiv 2310.19060) on VideoMAE: temporal then spatial aggregation, token counts, sizes, frame grouping,
no-op and remove(), batched == per-row, restore_length, and clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import TimesformerConfig, TimesformerModel, VideoMAEConfig, VideoMAEModel

import hf_tokred
from hf_tokred import ConfigError
from hf_tokred.errors import UnsupportedModelError
from hf_tokred.integration.encoders import source_map, token_counts, token_sizes
from hf_tokred.methods.encoder.testa import spatial_merge, temporal_merge


def videomae(frames=8):
    torch.manual_seed(0)
    return VideoMAEModel(VideoMAEConfig(image_size=16, patch_size=4, num_frames=frames, tubelet_size=2, hidden_size=32,
                                        num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)).eval()


def test_temporal_merge_folds_the_most_similar_adjacent_frame():
    torch.manual_seed(0)
    base = torch.randn(1, 3, 8)
    frames = torch.stack([base[0], base[0] + 0.01, torch.randn(3, 8), torch.randn(3, 8)])  # frames 0 and 1 alike
    red = temporal_merge(frames.reshape(1, 12, 8), frames=4, r=1)
    assert red.keep.tolist() == [[0, 1, 2, 6, 7, 8, 9, 10, 11]]
    assert red.src.tolist() == [[3, 4, 5]] and red.dst.tolist() == [[0, 1, 2]]
    x, size = red.apply(frames.reshape(1, 12, 8), torch.ones(1, 12, 1))
    assert size.flatten().tolist() == [2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert torch.allclose(x[0, 0], (frames[0, 0] + frames[1, 0]) / 2)


def test_spatial_merge_stays_within_frames():
    red = spatial_merge(torch.randn(2, 3 * 8, 4), frames=3, r=2)
    frame_of_slot = red.keep // 8
    assert frame_of_slot.tolist() == [[f for f in range(3) for _ in range(6)]] * 2
    assert torch.equal(red.src // 8, frame_of_slot.gather(1, red.dst))  # a token merges within its frame


def test_videomae_counts_sizes_frames_and_batching():
    model = videomae()  # 4 tube slots x 16 patches = 64 tokens
    x = torch.randn(3, 8, 3, 16, 16)
    with torch.no_grad():
        dense = model(x).last_hidden_state
    hf_tokred.apply(model, {"method": "testa", "temporal_r": 1, "spatial_r": 2})
    with torch.no_grad():
        out = model(x).last_hidden_state
    # block 0: 4 -> 3 frames (48), -2/frame (42); block 1: 3 -> 2 frames (28), -2/frame (24);
    # block 2: 2 -> 1 frame (12), -2 (10); block 3 (last) dense
    assert token_counts(model) == [42, 24, 10, 10]
    assert out.shape == (3, 10, 32)
    assert token_sizes(model).sum(1).flatten().tolist() == [64.0] * 3
    assert int(source_map(model).min()) >= 0  # merging keeps every input token
    with torch.no_grad():
        for row in range(3):
            assert torch.allclose(model(x[row: row + 1]).last_hidden_state, out[row: row + 1], atol=1e-5)
    hf_tokred.apply(model, {"method": "testa", "temporal_r": 1, "spatial_r": 2, "restore_length": True,
                            "prop_attn": True})
    with torch.no_grad():
        assert model(x).last_hidden_state.shape == (3, 64, 32)
    hf_tokred.apply(model, {"method": "testa", "temporal_r": 0, "spatial_r": 0})
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, dense)
    hf_tokred.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, dense)


def test_spatial_only_and_temporal_only_and_layers():
    model = videomae()
    x = torch.randn(1, 8, 3, 16, 16)
    hf_tokred.apply(model, {"method": "testa", "temporal_r": 0, "spatial_r": 4, "layers": [1]})
    with torch.no_grad():
        model(x)
    assert token_counts(model) == [64, 48, 48, 48]
    hf_tokred.apply(model, {"method": "testa", "temporal_r": 2, "spatial_r": 0, "layers": [0, 1]})
    with torch.no_grad():
        model(x)
    assert token_counts(model) == [32, 16, 16, 16]  # 4 -> 2 -> 1 frames


def test_errors_are_clear_and_leave_the_model_untouched():
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="testa", spatial_r=-1)
    assert err.value.field == "spatial_r"
    model = videomae()
    x = torch.randn(1, 8, 3, 16, 16)
    with torch.no_grad():
        dense = model(x).last_hidden_state
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "testa", "layers": [4]})
    assert err.value.field == "layers"
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, dense)
    assert "_hf_tokred_applied" not in model.__dict__
    torch.manual_seed(0)
    timesformer = TimesformerModel(TimesformerConfig(image_size=16, patch_size=4, num_frames=2, hidden_size=32,
                                                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="joint space-time"):
        hf_tokred.apply(timesformer, {"method": "testa"})
    from conftest import make_tiny_vit

    with pytest.raises(UnsupportedModelError, match="testa cannot act on ViTModel"):
        hf_tokred.apply(make_tiny_vit(), {"method": "testa"})


def test_video_bench_counts_flops_and_tokens():
    from hf_tokred.bench.video import format_video, run_video

    record = run_video(size="tiny", repeats=1)
    rows = {(r["model"], r["name"]): r for r in record["rows"]}
    dense = rows[("videomae", "dense")]
    assert dense["flops_saved"] == 0.0 and dense["tokens_out"] == 32
    assert rows[("videomae", "tokenlearner 8/frame @6")]["tokens_out"] == 16  # 2 tube slots x 8
    assert rows[("videomae", "tokenlearner 8/frame @6")]["flops_saved"] > 0.1
    assert rows[("videomae", "tokenlearner 8/frame @6 + fuser")]["tokens_out"] == 32
    assert rows[("videomae", "testa t1 s16 @1,3,5,7,9")]["flops_saved"] > 0.3
    assert rows[("timesformer", "dense")]["tokens_out"] == 65
    assert all(r["seconds"] > 0 for r in record["rows"])
    assert format_video(record).count("\n") == len(record["rows"]) + 1


def test_xclip_is_refused_with_the_reason():
    from transformers import XCLIPConfig, XCLIPModel

    torch.manual_seed(0)
    model = XCLIPModel(XCLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=8, mit_hidden_size=32, mit_intermediate_size=64, num_frames=2),
        projection_dim=16, prompt_layers=1, prompt_attention_heads=2))
    for config in ({"method": "testa"}, {"method": "tome", "r": 1}, {"method": "tokenlearner"}):
        with pytest.raises(UnsupportedModelError, match="XCLIPModel"):
            hf_tokred.apply(model, config)
        assert "_hf_tokred_applied" not in model.__dict__
