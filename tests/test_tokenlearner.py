"""TokenLearner (arXiv 2106.11297) on ViT, CLIP, VideoMAE and TimeSformer: token counts, layouts, TokenFuser,
no-op and remove(), training, save/load of the learned maps, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_vit
from safetensors import safe_open
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    TimesformerConfig,
    TimesformerModel,
    VideoMAEConfig,
    VideoMAEModel,
)

import hf_tokred
from hf_tokred import ConfigError
from hf_tokred.errors import TokenReductionError, UnsupportedModelError
from hf_tokred.methods.encoder.tokenlearner import fuse_tokens, learn_tokens
from hf_tokred.recipes.tokenlearner import train_tokenlearner
from hf_tokred.training import dense_pass


def videomae(frames=4):
    torch.manual_seed(0)
    return VideoMAEModel(VideoMAEConfig(image_size=16, patch_size=4, num_frames=frames, tubelet_size=2, hidden_size=32,
                                        num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)).eval()


def timesformer(frames=4):
    torch.manual_seed(0)
    return TimesformerModel(TimesformerConfig(image_size=16, patch_size=4, num_frames=frames, hidden_size=32,
                                              num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)).eval()


def clip_vision():
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4,
                                            num_attention_heads=2, intermediate_size=64)).eval()


def randomize(model):
    """Make the learned maps non-trivial (fresh ones start near uniform)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.hf_tokred_modules["tokenlearner"].parameters():
            p.add_(torch.randn_like(p) * 0.5)


def test_learned_tokens_are_weighted_averages():
    x = torch.randn(2, 3, 5, 4)
    logits = torch.randn(2, 3, 5, 2)
    out = learn_tokens(x, logits)
    w = logits.softmax(2)
    assert torch.allclose(out[1, 2, 0], (w[1, 2, :, 0, None] * x[1, 2]).sum(0), atol=1e-6)
    assert torch.allclose(learn_tokens(x, torch.zeros(2, 3, 5, 1))[..., 0, :], x.mean(2), atol=1e-6)
    fused = fuse_tokens(out, x, torch.full((2, 3, 5, 2), -1e4))
    assert torch.equal(fused, x)  # closed gates: the original tokens


@pytest.mark.parametrize("make, inputs, expected", [
    (make_tiny_vit, lambda: torch.randn(2, 3, 32, 32), 1 + 6),
    (clip_vision, lambda: torch.randn(2, 3, 32, 32), 1 + 6),
])
def test_image_models_run_on_protected_plus_learned_tokens(make, inputs, expected):
    model = make()
    x = inputs()
    with torch.no_grad():
        dense = model(x, output_hidden_states=True)
    hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 6, "layer": 2})
    randomize(model)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    lengths = [h.shape[1] for h in out.hidden_states]
    n = dense.last_hidden_state.shape[1]
    assert lengths == [n, n, n, expected, expected]  # embeddings, blocks 0-1 dense, blocks 2-3 reduced
    assert torch.equal(out.hidden_states[2], dense.hidden_states[2])
    # The CLS token is kept and is the first token; the learned tokens are averages of the block-2 inputs.
    module = model.hf_tokred_modules["tokenlearner"]
    h = dense.hidden_states[2]
    learned = module.learn(h[:, None, 1:])[:, 0]
    block = (model.vit.layers if hasattr(model, "vit") else model.layers if hasattr(model, "layers")
             else model.encoder.layers)[2]
    with torch.no_grad():
        short = torch.cat([h[:, :1], learned], 1)
        manual = block.forward(short, None) if "CLIP" in type(block).__name__ else block.forward(short)
    manual = manual[0] if isinstance(manual, tuple) else manual
    assert torch.allclose(out.hidden_states[3], manual, atol=1e-5)
    # batched == per-row
    with torch.no_grad():
        row = model(x[1:]).last_hidden_state
    assert torch.allclose(out.last_hidden_state[1:], row, atol=1e-5)
    hf_tokred.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, dense.last_hidden_state)


def test_no_op_is_bit_identical_and_dense_pass_is_dense():
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x).last_hidden_state
        hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 0})
        assert torch.equal(model(x).last_hidden_state, dense)
        hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 4})
        assert model(x).last_hidden_state.shape[1] == 5
        with dense_pass(model):
            assert torch.equal(model(x).last_hidden_state, dense)


def test_token_fuser_returns_input_length():
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 4, "layer": 1, "fuse": True})
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 65, 5, 5, 65]
    # the fused patch tokens are the block-1 inputs plus gated mixtures of the learned tokens
    module = model.hf_tokred_modules["tokenlearner"]
    with torch.no_grad():
        block = model.layers[3] if hasattr(model, "layers") else model.encoder.layer[3]
        last = block.forward(out.hidden_states[3])
        last = last[0] if isinstance(last, tuple) else last
        expected = module.fuse_back(last[:, None, 1:], out.hidden_states[1][:, None, 1:])[:, 0]
    assert torch.allclose(out.hidden_states[4][:, 1:], expected, atol=1e-5)  # before the final layernorm
    assert torch.equal(out.hidden_states[4][:, 0], last[:, 0])
    assert out.last_hidden_state.shape[1] == 65


def test_videomae_per_frame_and_space_time_counts_and_layout():
    model = videomae()  # 4 frames, tubelet 2 -> 2 tube slots of 16 patches: 32 tokens, frame-major
    x = torch.randn(2, 4, 3, 16, 16)
    with torch.no_grad():
        dense = model(x, output_hidden_states=True)
    hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 3, "layer": 2})
    randomize(model)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [32, 32, 32, 6, 6]
    module = model.hf_tokred_modules["tokenlearner"]
    h = dense.hidden_states[2]
    # frame t's learned tokens come from frame t's patches only, frame-major
    learned = module.learn(h.reshape(2, 2, 16, 32))
    with torch.no_grad():
        manual = model.encoder.layer[2].forward(learned.reshape(2, 6, 32))
    manual = manual[0] if isinstance(manual, tuple) else manual
    assert torch.allclose(out.hidden_states[3], manual, atol=1e-5)
    hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 5, "layer": 2, "per_frame": False})
    with torch.no_grad():
        assert model(x).last_hidden_state.shape[1] == 5
    hf_tokred.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, dense.last_hidden_state)


def test_timesformer_per_frame_keeps_the_divided_attention_layout():
    model = timesformer()  # CLS + 4x4 patches x 4 frames (frame index fastest), rows of 4 tokens
    x = torch.randn(2, 4, 3, 16, 16)
    with torch.no_grad():
        dense = model(x, output_hidden_states=True)
    hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 4, "layer": 1, "fuse": True})
    randomize(model)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 65, 17, 17, 65]
    module = model.hf_tokred_modules["tokenlearner"]
    h = dense.hidden_states[1]
    by_frame = h[:, 1:].reshape(2, 16, 4, 32).transpose(1, 2)  # (B, T, P, C)
    learned = module.learn(by_frame)  # (B, T, S, C)
    short = torch.cat([h[:, :1], learned.transpose(1, 2).reshape(2, 16, 32)], 1)
    with torch.no_grad():
        manual = model.encoder.layer[1].forward(short)[0]
    assert torch.allclose(out.hidden_states[2], manual, atol=1e-5)
    # a batch gives each row's result alone
    with torch.no_grad():
        assert torch.allclose(model(x[:1]).last_hidden_state, out.last_hidden_state[:1], atol=1e-5)
    hf_tokred.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, dense.last_hidden_state)


def test_errors_are_clear_and_leave_the_model_untouched():
    model = timesformer()
    x = torch.randn(1, 4, 3, 16, 16)
    with torch.no_grad():
        dense = model(x).last_hidden_state
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 3})
    assert err.value.field == "num_tokens"
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 4, "per_frame": False})
    assert err.value.field == "per_frame"
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "tokenlearner", "layer": 4})
    assert err.value.field == "layer"
    with pytest.raises(UnsupportedModelError, match="divided space-time"):
        hf_tokred.apply(model, {"method": "tome", "r": 1})
    assert "_hf_tokred_applied" not in model.__dict__
    assert "hf_tokred_modules" not in model._modules
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, dense)
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="tokenlearner", num_tokens=-1)
    assert err.value.field == "num_tokens"
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="text encoders"):
        hf_tokred.apply(bert, {"method": "tokenlearner"})
    with pytest.raises(TokenReductionError, match="no tokenlearner reduction"):
        train_tokenlearner(make_tiny_vit(), [{"pixel_values": torch.randn(1, 3, 32, 32)}])


def test_train_then_save_load_gives_identical_outputs(tmp_path):
    model = make_tiny_vit()
    teacher = make_tiny_vit()
    batches = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s))} for s in range(3)]
    test = {"pixel_values": torch.randn(4, 3, 32, 32)}
    hf_tokred.apply(model, {"method": "tokenlearner", "num_tokens": 8, "layer": 2, "fuse": True})
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    before = {k: v.clone() for k, v in model.hf_tokred_modules["tokenlearner"].state_dict().items()}
    losses = train_tokenlearner(model, batches, teacher=teacher, steps=25, lr=3e-3, progress=False)
    assert len(losses) == 25 and losses[-1] < losses[0]
    after = model.hf_tokred_modules["tokenlearner"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    assert not model.training
    # the same losses without a separate teacher (dense_pass), seeded
    model2 = make_tiny_vit()
    hf_tokred.apply(model2, {"method": "tokenlearner", "num_tokens": 8, "layer": 2, "fuse": True})
    model2.hf_tokred_modules["tokenlearner"].load_state_dict(before)
    again_losses = train_tokenlearner(model2, batches, steps=25, lr=3e-3, progress=False)
    assert again_losses == pytest.approx(losses, abs=1e-5)
    # the recipe leaves the model frozen; a loaded model's parameters require grad, and on some CPUs (AMD EPYC) that
    # flag alone changes a linear layer's rounding, even under no_grad
    model.requires_grad_(True)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "hf_tokred" in k]
    with safe_open(tmp_path / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(f"tokenlearner.{k}" for k in after)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**test).last_hidden_state, out)
