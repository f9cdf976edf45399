"""ToMe for SD (``tome_sd``) on diffusers denoisers, side by side with tomesd 0.1.3, on tiny CPU models."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from hf_tokred.model_patches.diffusion_blocks import layout_blocks

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, UnsupportedModelError
from hf_tokred.integration import diffusers as hf_diffusers
from hf_tokred.integration.diffusers import CONFIG_KEY, call_seed
from hf_tokred.methods.diffusion.tome_sd import (
    ToMeSDConfig,
    bipartite_soft_matching_2d,
    grid_partition,
    merged_count,
)

try:
    import tomesd
except ImportError:  # the side-by-side tests need the test extra; everything else runs without it
    tomesd = None
needs_tomesd = pytest.mark.skipif(tomesd is None, reason="needs tomesd==0.1.3 (pip install -e .[test])")


# ---------------------------------------------------------------------------------------------
# Tiny models and helpers
# ---------------------------------------------------------------------------------------------


def tiny_unet(sdxl: bool = False) -> UNet2DConditionModel:
    """SD1.5-shaped: self-attention at level 1 (down 0, up 1) and level 2 (mid). SDXL-shaped: none at level 1."""
    torch.manual_seed(0)
    if sdxl:
        return UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        ).eval()
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2, height: int = 16, width: int = 16, timestep: int = 10):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    text = torch.randn(batch, 5, 32, generator=generator)
    return sample, torch.tensor([timestep] * batch), text


def run_unet(unet, inputs=None) -> torch.Tensor:
    sample, timestep, text = inputs if inputs is not None else unet_inputs()
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=text).sample


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=8,
    ).eval()


def run_dit(dit, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(batch, 4, 8, 8, generator=generator)
    with torch.no_grad():
        return dit(latent, timestep=torch.tensor([10] * batch), class_labels=torch.arange(batch)).sample


def tiny_pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2, norm_num_groups=8,
        use_additional_conditions=False,
    ).eval()


def run_pixart(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 12, generator=generator)
    with torch.no_grad():
        return model(latent, encoder_hidden_states=text, timestep=torch.tensor([10, 10]),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def tiny_sd3() -> SD3Transformer2DModel:
    """SD3.5-style: block 0 has dual attention (a second, image-only self-attention ``attn2``) and RMS qk-norm."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def run_sd3(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 12, generator=generator)
    pooled = torch.randn(2, 10, generator=generator)
    with torch.no_grad():
        return model(latent, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.tensor([10, 10])).sample


def tiny_dit_pipeline() -> DiTPipeline:
    vae_seed = torch.manual_seed(0)
    del vae_seed
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4,
        layers_per_block=1, sample_size=16,
    ).eval()
    pipe = DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, guidance_scale: float = 4.0):
    """Classifier-free guidance (guidance_scale > 1): the transformer sees a cond + uncond batch."""
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[0], num_inference_steps=2, guidance_scale=guidance_scale, generator=generator,
                output_type="pt").images


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def hooked_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if "_diffusers_hook" in m.__dict__ or "forward" in m.__dict__]


def assert_untouched(model, reference, run) -> None:
    assert hooked_modules(model) == []
    assert CONFIG_KEY not in model.config
    assert hf_diffusers.get_applied(model) is None
    assert torch.equal(run(model), reference)


class QueryProbe:
    """Tokens each attention module's ``to_q`` projects, recorded by plain torch hooks (independent of ours)."""

    def __init__(self, model, suffixes=("attn1", "attn2", "attn")):
        self.tokens: dict[str, int] = {}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in suffixes and hasattr(module, "to_q"):
                module.to_q.register_forward_hook(self._record(name))

    def _record(self, name):
        return lambda module, args, output: self.tokens.__setitem__(name, args[0].shape[1])


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_follow_tomesd_and_round_trip():
    cfg = TokenReductionConfig(method="tome_sd")
    assert isinstance(cfg, ToMeSDConfig)
    assert (cfg.ratio, cfg.max_downsample, cfg.sx, cfg.sy, cfg.use_rand) == (0.5, 1, 2, 2, True)
    assert (cfg.merge_attn, cfg.merge_crossattn, cfg.merge_mlp, cfg.seed) == (True, False, False, 0)
    assert cfg.stage == "diffusion" and cfg.model_kinds == ("unet", "dit") and cfg.paper == "2303.17604"
    assert TokenReductionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"ratio": 0.8}, "ratio"),  # above 1 - 1/(2*2)
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": "half"}, "ratio"),
        ({"sx": 1, "sy": 1}, "sx"),
        ({"sx": 0}, "sx"),
        ({"sy": 2.5}, "sy"),
        ({"max_downsample": 0}, "max_downsample"),
        ({"use_rand": "yes"}, "use_rand"),
        ({"seed": -1}, "seed"),
        ({"merge_attn": False}, "merge_attn"),  # nothing left to merge
        ({"downsample_factor": 2}, "downsample_factor"),
    ],
)
def test_config_rejects_bad_fields(fields, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="tome_sd", **fields)
    assert err.value.field == field
    assert field in str(err.value)


def test_ratio_limit_follows_the_cell_size():
    assert TokenReductionConfig(method="tome_sd", ratio=0.85, sx=3, sy=3).ratio == 0.85
    with pytest.raises(ConfigError, match=r"\[0, 0.5\]"):
        TokenReductionConfig(method="tome_sd", ratio=0.6, sx=2, sy=1)


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


def test_grid_partition_top_left_and_random_cells():
    dst, src = grid_partition(4, 6, 2, 2)
    assert dst.tolist() == [0, 2, 4, 12, 14, 16]
    assert sorted(dst.tolist() + src.tolist()) == list(range(24)) and src.tolist() == sorted(src.tolist())
    generator = torch.Generator().manual_seed(3)
    dst, _ = grid_partition(4, 6, 2, 2, generator)
    for cell, token in enumerate(dst.tolist()):  # one token inside each 2 x 2 cell
        row, col = divmod(token, 6)
        assert (row // 2, col // 2) == divmod(cell, 3)
    # A grid that does not divide: the leftover row and column hold sources only.
    dst, src = grid_partition(5, 5, 2, 2)
    assert dst.tolist() == [0, 2, 10, 12] and len(src) == 21


def test_matching_merges_means_and_unmerges_copies():
    torch.manual_seed(0)
    x = torch.randn(2, 36, 8)
    matching = bipartite_soft_matching_2d(x, 6, 6, 2, 2, r=18)
    merged = matching.merge(x)
    assert merged.shape == (2, 18, 8)
    restored = matching.unmerge(merged)
    assert restored.shape == x.shape
    # Every token reads back the value of its slot: kept tokens themselves, merged ones their destination's mean.
    dst, _ = grid_partition(6, 6, 2, 2)
    for row in range(2):
        kept_same = (restored[row] == x[row]).all(-1)
        assert int(kept_same.sum()) >= 36 - 18 - len(dst)  # unmerged sources come back exactly
        for token in dst.tolist():
            group = (restored[row] == restored[row, token]).all(-1).nonzero().flatten()
            torch.testing.assert_close(restored[row, token], x[row, group].mean(0))


def test_matching_rows_are_independent_and_r_is_capped():
    torch.manual_seed(0)
    x = torch.randn(3, 64, 4)
    batched = bipartite_soft_matching_2d(x, 8, 8, 2, 2, r=40)
    for row in range(3):
        alone = bipartite_soft_matching_2d(x[row : row + 1], 8, 8, 2, 2, r=40)
        torch.testing.assert_close(batched.merge(x)[row : row + 1], alone.merge(x[row : row + 1]))
    capped = bipartite_soft_matching_2d(x, 8, 8, 2, 2, r=1000)
    assert capped.merge(x).shape[1] == 16 == 64 - merged_count(64, 0.9, 8, 8, 2, 2)
    assert bipartite_soft_matching_2d(x, 8, 8, 2, 2, r=0) is None
    assert bipartite_soft_matching_2d(x[:, :1], 1, 1, 2, 2, r=1) is None


@needs_tomesd
def test_matching_equals_tomesd_functions():
    from tomesd.merge import bipartite_soft_matching_random2d

    torch.manual_seed(0)
    metric, values = torch.randn(2, 10 * 12, 16), torch.randn(2, 10 * 12, 16)
    for r in (1, 30, 60, 90):
        merge, unmerge = bipartite_soft_matching_random2d(metric, 12, 10, 2, 2, r, no_rand=True)
        ours = bipartite_soft_matching_2d(metric, 10, 12, 2, 2, r)
        torch.testing.assert_close(ours.unmerge(ours.merge(values)), unmerge(merge(values)), rtol=0, atol=1e-6)


def test_matching_rejects_a_wrong_shape():
    x = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="metric"):
        bipartite_soft_matching_2d(x, 4, 5, 2, 2, 4)
    matching = bipartite_soft_matching_2d(x, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match=r"\(1, 16, channels\)"):
        matching.merge(torch.randn(1, 15, 4))


# ---------------------------------------------------------------------------------------------
# UNet: side by side with tomesd 0.1.3
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"ratio": 0.5},
        {"ratio": 0.3, "merge_crossattn": True, "merge_mlp": True},
        {"ratio": 0.45, "max_downsample": 2, "sx": 2, "sy": 1},
    ],
)
@needs_tomesd
def test_unet_equals_tomesd_without_randomness(params):
    unet = tiny_unet()
    dense = run_unet(unet)
    tomesd.apply_patch(unet, use_rand=False, **params)
    theirs = run_unet(unet)
    tomesd.remove_patch(unet)
    hf_tokred.apply(unet, {"method": "tome_sd", "use_rand": False, **params})
    ours = run_unet(unet)
    assert relative_error(ours, dense) > 0.01  # the reduction does something ...
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # ... and the same thing as tomesd
    hf_tokred.remove(unet)
    assert torch.equal(run_unet(unet), dense)


def test_unet_ratio_zero_is_bit_identical():
    unet = tiny_unet()
    dense = run_unet(unet)
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.0})
    assert torch.equal(run_unet(unet), dense)


def test_unet_merges_only_level_one_self_attention():
    unet = tiny_unet()
    probe = QueryProbe(unet)
    run_unet(unet)
    dense_tokens = dict(probe.tokens)
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5})
    run_unet(unet)
    for name, tokens in dense_tokens.items():
        level_one_self = tokens == 256 and name.endswith("attn1")
        assert probe.tokens[name] == (128 if level_one_self else tokens), name


def test_unet_merge_crossattn_and_mlp_shrink_those_too():
    unet = tiny_unet()
    seen = {}
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.ff.register_forward_pre_hook(lambda m, args: seen.__setitem__("ff", args[0].shape[1]))
    probe = QueryProbe(unet)
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.25, "merge_crossattn": True, "merge_mlp": True})
    run_unet(unet)
    assert probe.tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 192
    # torch's forward pre-hook sees the call's input, before our diffusers hook merges it; the merged count
    # reaches the first layer inside.
    assert seen["ff"] == 256
    inner = {}
    block.ff.net[0].register_forward_pre_hook(lambda m, args: inner.__setitem__("ff", args[0].shape[1]))
    run_unet(unet)
    assert inner["ff"] == 192


def test_unet_cfg_batch_equals_rows_run_alone_with_random_partitions():
    """Every row of a batch gets the same seeded partition, so a CFG batch row equals that row run alone."""
    unet = tiny_unet()
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "use_rand": True})
    sample, timestep, text = unet_inputs(3)
    batched = run_unet(unet, (sample, timestep, text))
    for row in range(3):
        alone = run_unet(unet, (sample[row : row + 1], timestep[row : row + 1], text[row : row + 1]))
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-4, atol=1e-5)


def test_unet_random_partitions_are_seeded_per_call_and_leave_the_global_rng_alone():
    unet = tiny_unet()
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "use_rand": True, "seed": 7})
    state = torch.get_rng_state()
    first = run_unet(unet)
    assert torch.equal(torch.get_rng_state(), state)
    run_unet(unet, unet_inputs(timestep=500))  # another call in between changes nothing
    assert torch.equal(run_unet(unet), first)
    assert not torch.equal(run_unet(unet, unet_inputs(timestep=500)), run_unet(unet, unet_inputs(timestep=501)))
    fixed = tiny_unet()
    hf_tokred.apply(fixed, {"method": "tome_sd", "ratio": 0.5, "use_rand": False})
    assert not torch.equal(run_unet(fixed), first)  # the random partition is not the top-left one
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "use_rand": True, "seed": 8})
    assert not torch.equal(run_unet(unet), first)
    assert call_seed(7, 10.0) != call_seed(8, 10.0)


def test_unet_odd_latent_size_merges_the_true_grid():
    unet = tiny_unet()
    probe = QueryProbe(unet)
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "max_downsample": 2})
    run_unet(unet, unet_inputs(1, 15, 12))
    assert probe.tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 180 - 90
    assert probe.tokens["mid_block.attentions.0.transformer_blocks.0.attn1"] == 48 - 24  # 8 x 6 grid


def test_unet_remove_restores_bit_identical_outputs_and_state():
    unet = tiny_unet()
    dense = run_unet(unet)
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "merge_crossattn": True, "merge_mlp": True})
    # root + 3 level-1 blocks (down 0, and up 1's two), each with attn1, attn2 and ff
    assert len(hooked_modules(unet)) == 1 + 3 * 4
    assert not torch.equal(run_unet(unet), dense)
    assert hf_tokred.remove(unet) is unet
    assert_untouched(unet, dense, lambda m: run_unet(m))


def test_sdxl_shaped_unet_without_level_one_attention_is_a_clear_error():
    unet = tiny_unet(sdxl=True)
    dense = run_unet(unet)
    assert sorted({level for *_, level in layout_blocks(unet)}) == [2, 4]
    with pytest.raises(ConfigError, match="levels 2, 4.*max_downsample >= 2") as err:
        hf_tokred.apply(unet, {"method": "tome_sd"})
    assert err.value.field == "max_downsample"
    assert_untouched(unet, dense, lambda m: run_unet(m))
    probe = QueryProbe(unet)
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "max_downsample": 2})
    run_unet(unet)
    assert probe.tokens["down_blocks.1.attentions.0.transformer_blocks.0.attn1"] == 32  # 8 x 8 grid, halved
    assert probe.tokens["down_blocks.2.attentions.0.transformer_blocks.0.attn1"] == 16  # level 4: left alone


def test_self_attention_mask_and_chunked_mlp_are_clear_errors():
    unet = tiny_unet()
    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5})
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    hook = attn._diffusers_hook.get_hook("hf_tokred_tome_sd")
    hook.holder.matching = bipartite_soft_matching_2d(torch.randn(1, 16, 32), 4, 4, 2, 2, 8)
    with pytest.raises(UnsupportedModelError, match="attention_mask"):
        attn(torch.randn(1, 16, 32), attention_mask=torch.zeros(1, 16, 16))
    hook.holder.matching = None

    hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "merge_mlp": True})
    for block in unet.down_blocks[0].attentions[0].transformer_blocks:
        block.set_chunk_feed_forward(64, dim=1)
    with pytest.raises(UnsupportedModelError, match="chunking"):
        run_unet(unet)


# ---------------------------------------------------------------------------------------------
# DiT, PixArt, SD3
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "run", "attention"),
    [
        (tiny_dit, run_dit, "transformer_blocks.0.attn1"),
        (tiny_pixart, run_pixart, "transformer_blocks.0.attn1"),
        (tiny_sd3, run_sd3, "transformer_blocks.0.attn"),
    ],
    ids=["dit", "pixart", "sd3"],
)
@pytest.mark.parametrize("method", ["tome_sd", "todo"])
def test_transformer_denoisers(build, run, attention, method):
    model = build()
    probe = QueryProbe(model)
    dense = run(model)
    assert probe.tokens[attention] == 16  # 8 x 8 latent, patch 2: a 4 x 4 grid
    cfg = {"method": "tome_sd", "ratio": 0.5} if method == "tome_sd" else {"method": "todo", "downsample_factor": 2}
    hf_tokred.apply(model, cfg)
    reduced = run(model)
    assert 0 < relative_error(reduced, dense) < 0.5
    assert probe.tokens[attention] == (8 if method == "tome_sd" else 16)  # todo keeps every query
    hf_tokred.remove(model)
    assert_untouched(model, dense, run)


def test_sd3_todo_reduces_image_keys_only_and_tome_sd_merges_both_attentions():
    model = tiny_sd3()
    keys = {}
    attn = model.transformer_blocks[0].attn
    attn.to_k.register_forward_hook(lambda m, args, out: keys.__setitem__("image", out.shape[1]))
    attn.add_k_proj.register_forward_hook(lambda m, args, out: keys.__setitem__("text", out.shape[1]))
    hf_tokred.apply(model, {"method": "todo", "downsample_factor": 2})
    run_sd3(model)
    assert keys == {"image": 4, "text": 5}
    probe = QueryProbe(model)
    hf_tokred.apply(model, {"method": "tome_sd", "ratio": 0.25})
    run_sd3(model)
    assert probe.tokens["transformer_blocks.0.attn"] == 12 and probe.tokens["transformer_blocks.0.attn2"] == 12
    assert probe.tokens["transformer_blocks.1.attn"] == 12


def test_dit_cross_attention_only_is_rejected_and_batch_rows_match():
    dit = tiny_dit()
    dense = run_dit(dit)
    with pytest.raises(UnsupportedModelError, match="no cross-attention"):
        hf_tokred.apply(dit, {"method": "tome_sd", "merge_attn": False, "merge_crossattn": True})
    assert_untouched(dit, dense, run_dit)
    hf_tokred.apply(dit, {"method": "tome_sd", "ratio": 0.5, "merge_mlp": True})
    batched = run_dit(dit, 2)
    alone = run_dit(dit, 1)
    torch.testing.assert_close(batched[:1], alone, rtol=1e-4, atol=1e-5)


def test_unsupported_denoiser_is_a_clear_error():
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    other = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8, norm_num_groups=8)
    with pytest.raises(UnsupportedModelError, match="Transformer2DModel is not a denoiser") as err:
        hf_tokred.apply(other, {"method": "tome_sd"})
    for name in ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                 "FluxTransformer2DModel"):
        assert name in str(err.value)
    assert hooked_modules(other) == []


# ---------------------------------------------------------------------------------------------
# Pipelines: CFG, seeded reproducibility, save/load
# ---------------------------------------------------------------------------------------------


def test_seeded_cfg_pipeline_call_is_reproducible():
    pipe = tiny_dit_pipeline()
    dense = run_pipeline(pipe)
    hf_tokred.apply(pipe, {"method": "tome_sd", "ratio": 0.5, "use_rand": True})
    first = run_pipeline(pipe)
    assert not torch.equal(first, dense)
    run_pipeline(pipe, guidance_scale=1.0)  # an unrelated call in between
    torch.manual_seed(1234)  # and a different global RNG state
    assert torch.equal(run_pipeline(pipe), first)
    hf_tokred.remove(pipe)
    assert torch.equal(run_pipeline(pipe), dense)


def test_pipeline_save_and_reload_round_trip(tmp_path):
    pipe = tiny_dit_pipeline()
    pipe.save_pretrained(tmp_path / "dense")
    cfg = TokenReductionConfig(method="tome_sd", ratio=0.4, merge_mlp=True, seed=3)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "dense", token_reduction=cfg)
    loaded.set_progress_bar_config(disable=True)
    reduced = run_pipeline(loaded)
    loaded.save_pretrained(tmp_path / "reduced")
    with open(tmp_path / "reduced" / "transformer" / "config.json") as fh:
        assert json.load(fh)[CONFIG_KEY] == cfg.to_dict()
    again = DiffusionPipeline.from_pretrained(tmp_path / "reduced")
    again.set_progress_bar_config(disable=True)
    assert hf_diffusers.get_applied(again.transformer).config == cfg
    assert torch.equal(run_pipeline(again), reduced)
    dense = DiffusionPipeline.from_pretrained(tmp_path / "reduced", token_reduction=False)
    assert hooked_modules(dense.transformer) == [] and CONFIG_KEY not in dense.transformer.config


def test_unet_from_pretrained_and_bad_saved_config(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "dense")
    reduced_unet = UNet2DConditionModel.from_pretrained(tmp_path / "dense", token_reduction={"method": "tome_sd"})
    reduced = run_unet(reduced_unet)
    reduced_unet.save_pretrained(tmp_path / "reduced")
    assert torch.equal(run_unet(UNet2DConditionModel.from_pretrained(tmp_path / "reduced")), reduced)
    config_file = tmp_path / "reduced" / "config.json"
    config = json.loads(config_file.read_text())
    config[CONFIG_KEY] = {"method": "tome_sd", "ratio": 0.9}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="token_reduction=False") as err:
        UNet2DConditionModel.from_pretrained(tmp_path / "reduced")
    assert err.value.field == "ratio"


def test_sdxl_saved_config_that_merges_nothing_names_the_file(tmp_path):
    unet = tiny_unet(sdxl=True)
    hf_tokred.apply(unet, {"method": "tome_sd", "max_downsample": 2})
    unet.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config[CONFIG_KEY]["max_downsample"] = 1
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="max_downsample"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    assert hooked_modules(UNet2DConditionModel.from_pretrained(tmp_path, token_reduction=False)) == []


def test_todo_on_sdxl_without_level_one_attention_is_a_clear_error():
    unet = tiny_unet(sdxl=True)
    dense = run_unet(unet)
    with pytest.raises(ConfigError, match="max_downsample >= 2") as err:
        hf_tokred.apply(unet, {"method": "todo"})
    assert err.value.field == "max_downsample"
    assert_untouched(unet, dense, lambda m: run_unet(m))
    hf_tokred.apply(unet, {"method": "todo", "max_downsample": 2})
    assert relative_error(run_unet(unet), dense) > 0


# Flux (per-row matchings with their own rotary rows, ToDo after the rotary embedding): tests/test_diffusion_flux.py


def test_random_partitions_survive_gradient_checkpointing():
    """A checkpointed block runs again during backward; it must draw the same partition, so gradients match."""

    def gradients(checkpointing: bool) -> torch.Tensor:
        unet = tiny_unet().train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        hf_tokred.apply(unet, {"method": "tome_sd", "ratio": 0.5, "use_rand": True, "merge_mlp": True})
        sample, timestep, text = unet_inputs(2)
        unet(sample, timestep, encoder_hidden_states=text).sample.square().mean().backward()
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad

    torch.testing.assert_close(gradients(True), gradients(False), rtol=1e-4, atol=1e-6)
