"""DyDiT (learned timestep-wise heads/MLP groups and token-wise MLP skipping) on tiny DiT and PixArt denoisers:
no-op exactness, head/group/token skipping against dense references, batch == rows, save/load of the routers
(token_reduction.safetensors, also through a pipeline), training, errors, the CLI recipe."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import realigned
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError
from hf_tokred.errors import MissingFileError, UnsupportedModelError
from hf_tokred.integration.dydit import forced_dense, kept_flops_ratio
from hf_tokred.methods.diffusion.dydit import DyDiTConfig, block_flops, straight_through_mask
from hf_tokred.recipes.dydit import evaluate_dydit, small_dit, train_dydit

HEADS, HEAD_DIM = 2, 8
DIM = HEADS * HEAD_DIM


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_num_groups=8).eval()


def tiny_pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                    out_channels=8, num_layers=2, cross_attention_dim=16, caption_channels=12,
                                    sample_size=8, patch_size=2, norm_num_groups=8,
                                    use_additional_conditions=False).eval()


def dit_inputs(batch: int = 3, timesteps=(10, 500, 990)):
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(batch, 4, 8, 8, generator=generator)
    return latent, torch.tensor(list(timesteps)[:batch]), torch.arange(batch)


def run_dit(dit, inputs=None) -> torch.Tensor:
    latent, timestep, labels = inputs if inputs is not None else dit_inputs()
    with torch.no_grad():
        return dit(latent, timestep=timestep, class_labels=labels).sample


def run_pixart(model, rows=slice(None)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 12, generator=generator)
    with torch.no_grad():
        return model(latent[rows], encoder_hidden_states=text[rows], timestep=torch.tensor([10, 900])[rows],
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def randomize_routers(model, seed: int = 3, bias: float = 0.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.hf_tokred_modules["dydit"]:
            for layer in (router.width, router.token):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
                layer.bias.fill_(bias)


def set_routes(model, *, heads=None, groups=None, keep_tokens=True) -> None:
    """Routers that ignore their input: ``heads``/``groups`` are the 0/1 decisions of every block and row."""
    with torch.no_grad():
        for router in model.hf_tokred_modules["dydit"]:
            router.width.weight.zero_()
            router.token.weight.zero_()
            decisions = list(heads or [1] * router.heads) + list(groups or [1] * router.groups)
            router.width.bias.copy_(torch.tensor([4.0 if d else -4.0 for d in decisions]))
            router.token.bias.fill_(4.0 if keep_tokens else -4.0)


def hooks_of(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if "_diffusers_hook" in m.__dict__)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    cfg = TokenReductionConfig(method="dydit")
    assert isinstance(cfg, DyDiTConfig) and cfg.learned and cfg.stage == "diffusion"
    assert cfg.to_dict() == {"method": "dydit", "flops_ratio": 0.7, "mlp_groups": 0, "width_routing": True,
                             "token_routing": True, "gumbel_tau": 1.0}
    assert TokenReductionConfig.coerce(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fields, field", [({"flops_ratio": 0.0}, "flops_ratio"), ({"flops_ratio": 1.5}, "flops_ratio"),
                                            ({"mlp_groups": -1}, "mlp_groups"), ({"gumbel_tau": 0.0}, "gumbel_tau")])
def test_config_rejects_bad_fields(fields, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig.coerce({"method": "dydit", **fields})
    assert err.value.field == field


def test_groups_not_dividing_the_mlp_and_unets_are_rejected_without_touching_the_model():
    dit = tiny_dit()
    reference = run_dit(dit)
    with pytest.raises(ConfigError, match="mlp_groups") as err:
        hf_tokred.apply(dit, {"method": "dydit", "mlp_groups": 5})  # MLP width 64
    assert err.value.field == "mlp_groups"
    assert hooks_of(dit) == [] and "hf_tokred_modules" not in dit._modules
    assert torch.equal(run_dit(dit), reference)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    with pytest.raises(UnsupportedModelError, match="dit"):
        hf_tokred.apply(unet, {"method": "dydit"})
    assert hooks_of(unet) == []


def test_straight_through_mask_is_hard_forward_and_soft_backward():
    logits = torch.tensor([-2.0, 3.0], requires_grad=True)
    assert straight_through_mask(logits, 1.0, training=False).tolist() == [0.0, 1.0]
    mask = straight_through_mask(logits, 1.0, training=True, noise=0.0)
    assert mask.tolist() == [0.0, 1.0]
    mask.sum().backward()
    assert torch.allclose(logits.grad, torch.sigmoid(logits) * (1 - torch.sigmoid(logits)))


# ---------------------------------------------------------------------------------------------
# No-op settings, remove
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"flops_ratio": 1.0}, {"mlp_groups": 8}, {"token_routing": False}])
def test_untrained_routers_are_bit_identical_to_dense(params):
    dit = tiny_dit()
    reference = run_dit(dit)
    hf_tokred.apply(dit, {"method": "dydit", **params})
    assert not dit.hf_tokred_modules.training  # follows the denoiser's eval mode
    assert torch.equal(run_dit(dit), reference)
    assert kept_flops_ratio(dit).tolist() == [1.0, 1.0, 1.0]


def test_forced_dense_and_remove_are_bit_identical():
    dit = tiny_dit()
    reference = run_dit(dit)
    hf_tokred.apply(dit, {"method": "dydit"})
    randomize_routers(dit)
    assert not torch.equal(run_dit(dit), reference)
    with forced_dense(dit):
        assert torch.equal(run_dit(dit), reference)
    hf_tokred.remove(dit)
    assert torch.equal(run_dit(dit), reference)
    assert hooks_of(dit) == [] and "hf_tokred_modules" not in dit._modules and "_token_reduction" not in dit.config


# ---------------------------------------------------------------------------------------------
# What is skipped
# ---------------------------------------------------------------------------------------------


def test_skipped_head_equals_a_dense_model_whose_head_is_zeroed():
    dit = tiny_dit()
    reference_model = tiny_dit()
    with torch.no_grad():  # value rows of head 1 zero: the head adds nothing
        for block in reference_model.transformer_blocks:
            block.attn1.to_v.weight[HEAD_DIM:] = 0
            block.attn1.to_v.bias[HEAD_DIM:] = 0
    hf_tokred.apply(dit, {"method": "dydit"})
    set_routes(dit, heads=[1, 0])
    torch.testing.assert_close(run_dit(dit), run_dit(reference_model), rtol=0, atol=1e-5)
    attention, mlp = block_flops(16, DIM, DIM, 4 * DIM)
    expected = (attention * 0.5 + mlp) / (attention + mlp)
    torch.testing.assert_close(kept_flops_ratio(dit), torch.full((3,), expected))


def test_skipped_mlp_group_equals_a_dense_model_whose_group_is_zeroed():
    dit = tiny_dit()
    reference_model = tiny_dit()
    with torch.no_grad():  # group 0 of 2 (channels 0..31): gelu(0) = 0, so it adds nothing
        for block in reference_model.transformer_blocks:
            block.ff.net[0].proj.weight[:32] = 0
            block.ff.net[0].proj.bias[:32] = 0
    hf_tokred.apply(dit, {"method": "dydit"})
    set_routes(dit, groups=[0, 1])
    torch.testing.assert_close(run_dit(dit), run_dit(reference_model), rtol=0, atol=1e-5)


def test_mlp_runs_on_exactly_the_kept_tokens_and_skipped_tokens_get_zero():
    dit = tiny_dit()
    hf_tokred.apply(dit, {"method": "dydit", "width_routing": False})
    randomize_routers(dit, bias=0.5)
    run_dit(dit)  # records this call's timestep embeddings
    ff, router = dit.transformer_blocks[0].ff, dit.hf_tokred_modules["dydit"][0]
    x = torch.randn(3, 16, DIM, generator=torch.Generator().manual_seed(5))
    keep = router.token(x).squeeze(-1) > 0
    kept = int(keep.sum())
    assert 0 < kept < 3 * 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = ff(x)
    # The router scores every token (one output); the two MLP projections run on the kept tokens only.
    assert counter.get_total_flops() == 2 * 3 * 16 * DIM + 2 * (2 * kept * DIM * 4 * DIM)
    with torch.no_grad():
        dense = ff.net[2](ff.net[0](x))
    torch.testing.assert_close(out[keep], dense[keep], rtol=0, atol=1e-6)
    assert bool(out[~keep].eq(0).all())


def test_no_head_and_no_group_leaves_only_the_output_biases():
    dit = tiny_dit()
    hf_tokred.apply(dit, {"method": "dydit"})
    set_routes(dit, heads=[0, 0], groups=[0, 0])
    out = run_dit(dit)
    assert torch.isfinite(out).all()
    assert kept_flops_ratio(dit).tolist() == [0.0, 0.0, 0.0]


def test_batch_with_different_timesteps_equals_rows_alone():
    dit = tiny_dit()
    hf_tokred.apply(dit, {"method": "dydit"})
    randomize_routers(dit, bias=0.2)
    inputs = dit_inputs()
    batched = run_dit(dit, inputs)
    ratios = kept_flops_ratio(dit)
    assert len(set(ratios.tolist())) > 1  # rows route differently
    for row in range(3):
        alone = run_dit(dit, tuple(t[row:row + 1] for t in inputs))
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(kept_flops_ratio(dit), ratios[row:row + 1])


def test_pixart_shared_timestep_embedding_routes_too():
    model = tiny_pixart()
    reference = run_pixart(model)
    hf_tokred.apply(model, {"method": "dydit"})
    assert torch.equal(run_pixart(model), reference)
    randomize_routers(model, bias=0.2)
    batched = run_pixart(model)
    assert not torch.equal(batched, reference)
    for row in range(2):
        torch.testing.assert_close(batched[row:row + 1], run_pixart(model, slice(row, row + 1)), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_the_routers(tmp_path):
    dit = tiny_dit()
    reference = run_dit(dit)
    hf_tokred.apply(dit, {"method": "dydit", "flops_ratio": 0.6})
    randomize_routers(dit)
    routed = run_dit(dit)
    dit.save_pretrained(tmp_path)
    with safe_open(tmp_path / "token_reduction.safetensors", "pt") as f:
        assert sorted(f.keys())[0] == "dydit.0.token.bias"
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert not any(k.startswith("hf_tokred") for k in f.keys())
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config["_token_reduction"]["flops_ratio"] == 0.6
    assert torch.equal(run_dit(loaded), routed)
    dense = DiTTransformer2DModel.from_pretrained(tmp_path, token_reduction=False)
    assert torch.equal(run_dit(dense), reference)
    # A dense save into the same folder drops the routers of before.
    hf_tokred.remove(loaded)
    loaded.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / "token_reduction.safetensors")


def test_missing_or_damaged_side_car_is_a_clear_error(tmp_path):
    dit = tiny_dit()
    hf_tokred.apply(dit, {"method": "dydit"})
    dit.save_pretrained(tmp_path)
    (tmp_path / "token_reduction.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TokenReductionError, match="token_reduction.safetensors"):
        DiTTransformer2DModel.from_pretrained(tmp_path)
    os.remove(tmp_path / "token_reduction.safetensors")
    with pytest.raises(MissingFileError, match="token_reduction=False"):
        DiTTransformer2DModel.from_pretrained(tmp_path)


def test_pipeline_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), norm_num_groups=8,
                        latent_channels=4, layers_per_block=1, sample_size=16).eval()
    pipe = DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    hf_tokred.apply(pipe, {"method": "dydit"})
    randomize_routers(pipe.transformer)

    def generate(p):
        return p(class_labels=[0], num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images

    images = generate(pipe)
    pipe.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "transformer" / "token_reduction.safetensors")
    loaded = realigned(DiTPipeline.from_pretrained(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded), images)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_training_moves_the_routers_only_is_seeded_and_saves_flops():
    def trained(seed):
        dit = hf_tokred.apply(small_dit(layers=2, heads=2, head_dim=8, sample_size=8), {"method": "dydit"})
        backbone = {k: v.clone() for k, v in dit.state_dict().items() if not k.startswith("hf_tokred")}
        losses = train_dydit(dit, steps=40, lr=5e-2, flops_ratio=0.5, batch_size=2, seed=seed, progress=False)
        assert all(torch.equal(v, dit.state_dict()[k]) for k, v in backbone.items())
        assert not dit.hf_tokred_modules.training  # hard decisions again
        assert all(p.requires_grad for p in dit.hf_tokred_modules.parameters())  # flags restored
        return dit, losses

    dit, losses = trained(0)
    assert trained(0)[1] == losses
    result = evaluate_dydit(dit, samples=4)
    assert result["kept_flops"] < 0.95 and result["relative_l2"] > 0


def test_training_mode_masks_give_router_gradients():
    dit = hf_tokred.apply(tiny_dit(), {"method": "dydit"})
    randomize_routers(dit, bias=0.3)
    dit.hf_tokred_modules.train()
    latent, timestep, labels = dit_inputs()
    out = dit(latent, timestep=timestep, class_labels=labels).sample
    (out.square().mean() + kept_flops_ratio(dit).mean()).backward()
    for router in dit.hf_tokred_modules["dydit"]:
        assert router.width.weight.grad.abs().sum() > 0 and router.token.weight.grad.abs().sum() > 0


def test_train_requires_dydit_applied():
    with pytest.raises(TokenReductionError, match="apply"):
        train_dydit(tiny_dit(), steps=1, progress=False)


def test_cli_recipe_trains_and_saves_a_loadable_model(tmp_path):
    import argparse

    from hf_tokred.recipes.dydit import add_train_command

    subparsers = argparse.ArgumentParser().add_subparsers()
    add_train_command(subparsers)
    args = subparsers.choices["dydit"].parse_args(
        ["--steps", "2", "--layers", "1", "--heads", "2", "--head-dim", "8", "--sample-size", "8",
         "--batch-size", "2", "--no-progress", "--output", str(tmp_path)])
    assert args.handler(args) == 0
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config["_token_reduction"]["method"] == "dydit"
    assert os.path.isfile(tmp_path / "token_reduction.safetensors")


def test_preset_routes_fix_the_kept_heads_groups_and_token_fraction():
    from hf_tokred.recipes.dydit import preset_routes, random_dit_inputs

    dit = hf_tokred.apply(tiny_dit(), {"method": "dydit"})
    inputs = random_dit_inputs(dit, 2, torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as dense_counter, forced_dense(dit):
        dit(**inputs)
    preset_routes(dit, inputs, heads=0.5, groups=0.5, tokens=0.5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dit(**inputs)
    attention, mlp = block_flops(16, DIM, DIM, 4 * DIM)
    torch.testing.assert_close(kept_flops_ratio(dit).mean(), torch.tensor((attention / 2 + mlp / 4) / (attention + mlp)))
    assert counter.get_total_flops() < dense_counter.get_total_flops()
    with pytest.raises(ValueError, match="tokens"):
        preset_routes(dit, inputs, tokens=1.5)


def test_dit_family_denoisers_without_basic_blocks_are_rejected():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    with pytest.raises(UnsupportedModelError, match="BasicTransformerBlock"):
        hf_tokred.apply(sd3, {"method": "dydit"})
    assert hooks_of(sd3) == [] and "hf_tokred_modules" not in sd3._modules


def test_push_to_hub_uploads_the_routers(tmp_path):
    from types import SimpleNamespace
    from unittest import mock

    from diffusers.utils.hub_utils import PushToHubMixin

    uploaded = {}

    def fake_upload(self, working_dir, repo_id, **kwargs):
        uploaded[repo_id] = sorted(os.listdir(working_dir))

    dit = hf_tokred.apply(tiny_dit(), {"method": "dydit"})
    with mock.patch("diffusers.utils.hub_utils.create_repo", lambda repo_id, **k: SimpleNamespace(repo_id=repo_id)), \
            mock.patch("diffusers.utils.hub_utils.load_or_create_model_card", lambda *a, **k: mock.MagicMock()), \
            mock.patch("diffusers.utils.hub_utils.populate_model_card", lambda card, *a, **k: card), \
            mock.patch.object(PushToHubMixin, "_upload_folder", fake_upload):
        dit.push_to_hub("me/dit-dydit")
        dit.save_pretrained(tmp_path / "dit-dydit2", push_to_hub=True)
    assert "token_reduction.safetensors" in uploaded["me/dit-dydit"]
    assert "token_reduction.safetensors" in uploaded["dit-dydit2"]


def test_kept_flops_count_attention_and_mlp_whichever_router_is_off():
    dit = hf_tokred.apply(tiny_dit(), {"method": "dydit", "width_routing": False})
    set_routes(dit, keep_tokens=False)
    run_dit(dit)
    attention, mlp = block_flops(16, DIM, DIM, 4 * DIM)
    torch.testing.assert_close(kept_flops_ratio(dit), torch.full((3,), attention / (attention + mlp)))
    with forced_dense(dit):
        run_dit(dit)
    assert kept_flops_ratio(dit).tolist() == [1.0]


def test_failed_reapply_restores_the_previous_reduction_with_its_routers(monkeypatch):
    from hf_tokred.integration import diffusers as wiring

    dit = hf_tokred.apply(tiny_dit(), {"method": "dydit"})
    randomize_routers(dit)
    routed = run_dit(dit)
    routers = dit.hf_tokred_modules

    def failing_attach(*args):
        raise RuntimeError("boom")

    monkeypatch.setitem(wiring._DIFFUSION_WIRING, "todo", wiring.DiffusionWiring(lambda *a: None, failing_attach))
    with pytest.raises(RuntimeError, match="boom"):
        hf_tokred.apply(dit, {"method": "todo"})
    assert dit.hf_tokred_modules is routers and dit.config["_token_reduction"]["method"] == "dydit"
    assert torch.equal(run_dit(dit), routed)
