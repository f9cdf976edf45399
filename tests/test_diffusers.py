"""ToDo on diffusers denoisers, and the diffusers wiring (hooks, apply/remove, save/load), on tiny CPU models."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import realigned
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import hf_tokred
import hf_tokred.methods.diffusion.todo  # noqa: F401  (registers "todo")
from hf_tokred import ConfigError, TokenReductionConfig, UnknownMethodError, UnsupportedModelError
from hf_tokred.bench.diffusion import build_dit, build_unet
from hf_tokred.integration import diffusers as hf_diffusers
from hf_tokred.integration.diffusers import CONFIG_KEY, KVReductionHook, TokenGrid, find_token_level
from hf_tokred.methods.diffusion.todo import ToDoConfig, downsample_tokens, downsampled_size

# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


def tiny_unet() -> UNet2DConditionModel:
    """SD1.5-shaped UNet: self-attention at level 1 (down 0, up 1) and level 2 (mid block); the benchmark's tiny one."""
    return build_unet("tiny")


def tiny_dit() -> DiTTransformer2DModel:
    return build_dit("tiny")


def tiny_dit_pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()
    pipe = DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(batch: int = 2, height: int = 16, width: int = 16):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    text = torch.randn(batch, 5, 32, generator=generator)
    return sample, torch.tensor([10] * batch), text


def run_unet(unet, inputs=None) -> torch.Tensor:
    sample, timestep, text = inputs if inputs is not None else unet_inputs()
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=text).sample


def dit_inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([10] * batch), torch.arange(batch)


def run_dit(dit, inputs=None) -> torch.Tensor:
    latent, timestep, labels = inputs if inputs is not None else dit_inputs()
    with torch.no_grad():
        return dit(latent, timestep=timestep, class_labels=labels).sample


def run_pipeline(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        class_labels=[0], num_inference_steps=2, guidance_scale=1.0, generator=generator, output_type="pt"
    ).images


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


class KVProbe:
    """Counts the tokens each self-attention projects to keys (the input length of ``attn1.to_k``).

    A plain torch forward hook on ``to_k``, independent of hf_tokred's diffusers hooks.
    """

    def __init__(self, model):
        self.tokens: dict[str, int] = {}
        self.queries: dict[str, int] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith("attn1"):
                self.handles.append(module.to_k.register_forward_hook(self._keys(name)))
                self.handles.append(module.to_q.register_forward_hook(self._queries(name)))

    def _keys(self, name):
        return lambda module, args, output: self.tokens.__setitem__(name, args[0].shape[1])

    def _queries(self, name):
        return lambda module, args, output: self.queries.__setitem__(name, args[0].shape[1])

    def close(self):
        for handle in self.handles:
            handle.remove()


def hooked_modules(model) -> list[str]:
    """Modules that carry a diffusers hook registry or an instance-level ``forward`` (i.e. were touched)."""
    return [n for n, m in model.named_modules() if "_diffusers_hook" in m.__dict__ or "forward" in m.__dict__]


def assert_untouched(model, reference: torch.Tensor, run) -> None:
    assert hooked_modules(model) == []
    assert CONFIG_KEY not in model.config
    assert hf_diffusers.get_applied(model) is None
    assert torch.equal(run(model), reference)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    cfg = TokenReductionConfig(method="todo")
    assert isinstance(cfg, ToDoConfig)
    assert (cfg.downsample_factor, cfg.downsample_method, cfg.max_downsample) == (2, "nearest", 1)
    assert cfg.stage == "diffusion" and cfg.model_kinds == ("unet", "dit") and cfg.paper == "2402.13573"
    assert TokenReductionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"downsample_factor": 0}, "downsample_factor"),
        ({"downsample_factor": 2.5}, "downsample_factor"),
        ({"downsample_factor": "x"}, "downsample_factor"),
        ({"downsample_factor": True}, "downsample_factor"),
        ({"downsample_method": "bicubic"}, "downsample_method"),
        ({"max_downsample": 0}, "max_downsample"),
        ({"ratio": 0.5}, "ratio"),
    ],
)
def test_config_rejects_bad_fields(fields, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="todo", **fields)
    assert err.value.field == field
    assert field in str(err.value)


def test_config_error_names_allowed_methods():
    with pytest.raises(ConfigError, match="'nearest', 'avg', 'linear'"):
        TokenReductionConfig(method="todo", downsample_method="cubic")


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


def test_downsample_tokens_nearest_and_avg_on_a_known_grid():
    grid = torch.arange(16.0).view(1, 16, 1)  # 4 x 4, value = y * 4 + x
    assert downsample_tokens(grid, 4, 4, 2, "nearest").flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    assert downsample_tokens(grid, 4, 4, 2, "avg").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    linear = downsample_tokens(grid, 4, 4, 2, "linear")
    assert linear.shape == (1, 4, 1) and not torch.equal(linear, downsample_tokens(grid, 4, 4, 2, "avg"))


def test_downsample_tokens_non_square_and_non_divisible_grids():
    height, width = 5, 3  # token y * 3 + x
    grid = torch.arange(15.0).view(1, 15, 1)
    assert downsampled_size(height, width, 2) == (3, 2)
    nearest = downsample_tokens(grid, height, width, 2, "nearest").view(3, 2)
    # Row/column geometry: every kept token comes from the right row and column band.
    assert [int(v) // width for v in nearest[:, 0]] == [0, 2, 4]
    # The partial cells at the edge average only the tokens they hold.
    avg = downsample_tokens(grid, height, width, 2, "avg").view(3, 2)
    assert avg[0, 1].item() == (2 + 5) / 2 and avg[2, 1].item() == 14.0


@pytest.mark.parametrize("method", ["nearest", "avg", "linear"])
def test_downsample_tokens_rows_are_independent_and_factor_one_is_identity(method):
    x = torch.randn(3, 6 * 4, 8)
    out = downsample_tokens(x, 6, 4, 2, method)
    assert out.shape == (3, 3 * 2, 8)
    for row in range(3):
        torch.testing.assert_close(out[row : row + 1], downsample_tokens(x[row : row + 1], 6, 4, 2, method))
    assert downsample_tokens(x, 6, 4, 1, method) is x


def test_downsample_tokens_half_precision_on_cpu():
    x = torch.randn(1, 64, 4).to(torch.bfloat16)
    for method in ("nearest", "avg", "linear"):
        assert downsample_tokens(x, 8, 8, 2, method).dtype == torch.bfloat16


def test_downsample_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        downsample_tokens(torch.zeros(1, 4, 1), 2, 2, 2, "cubic")
    with pytest.raises(ValueError, match="factor"):
        downsample_tokens(torch.zeros(1, 4, 1), 2, 2, 0)
    with pytest.raises(ValueError, match="hidden_states"):
        downsample_tokens(torch.zeros(1, 5, 1), 2, 2, 2)


def test_find_token_level():
    assert find_token_level(64, 48, 64 * 48) == (1, 64, 48)
    assert find_token_level(64, 48, 32 * 24) == (2, 32, 24)
    assert find_token_level(64, 48, 8 * 6) == (8, 8, 6)
    assert find_token_level(15, 12, 8 * 6) == (2, 8, 6)  # strided convolutions round up
    assert find_token_level(15, 15, 7 * 7) == (2, 7, 7)  # pooling rounds down
    assert find_token_level(64, 64, 77) is None


def test_hook_is_exactly_attention_with_downsampled_keys_and_values():
    """Queries stay full; keys/values are the projections of the downsampled tokens, nothing else changes."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    height, width = 6, 4  # non-square, so a swapped height/width would pick other tokens
    x = torch.randn(2, height * width, 16)
    grid = TokenGrid(height, width)
    hook = KVReductionHook(grid, "todo", lambda h, level, gh, gw: downsample_tokens(h, gh, gw, 2, "nearest"))
    hf_diffusers.HookRegistry.check_if_exists_or_initialize(attn).register_hook(hook, "hf_tokred_test")
    with torch.no_grad():
        out = attn(x)
        kept = downsample_tokens(x, height, width, 2, "nearest")
        q = attn.to_q(x).view(2, -1, 2, 8).transpose(1, 2)
        k = attn.to_k(kept).view(2, -1, 2, 8).transpose(1, 2)
        v = attn.to_v(kept).view(2, -1, 2, 8).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        reference = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, -1, 16))
    assert k.shape[2] == 3 * 2
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# UNet2DConditionModel
# ---------------------------------------------------------------------------------------------


def test_unet_factor_one_is_bit_identical():
    unet = tiny_unet()
    dense = run_unet(unet)
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 1})
    assert unet.config[CONFIG_KEY]["downsample_factor"] == 1
    assert torch.equal(run_unet(unet), dense)


def test_unet_factor_two_reduces_only_level_one_keys_and_stays_close():
    unet = tiny_unet()
    probe = KVProbe(unet)
    dense = run_unet(unet)
    dense_tokens = dict(probe.tokens)
    assert set(dense_tokens.values()) == {256, 64}  # level 1: 16 x 16, level 2: 8 x 8

    hf_tokred.apply(unet, TokenReductionConfig(method="todo", downsample_factor=2))
    reduced = run_unet(unet)
    for name, tokens in dense_tokens.items():
        expected = tokens // 4 if tokens == 256 else tokens  # max_downsample=1: the mid block is left alone
        assert probe.tokens[name] == expected, name
        assert probe.queries[name] == tokens, name  # queries stay full
    error = relative_error(reduced, dense)
    assert 0 < error < 0.25, error


def test_unet_max_downsample_two_also_reduces_the_mid_block():
    unet = tiny_unet()
    probe = KVProbe(unet)
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2, "max_downsample": 2})
    run_unet(unet)
    assert probe.tokens["mid_block.attentions.0.transformer_blocks.0.attn1"] == 16
    assert probe.tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 64


def test_unet_odd_latent_keys_follow_the_true_grid():
    """A 15 x 12 latent: level 2 is 8 x 6 (rounded up); the kept keys are the centre tokens of each cell."""
    unet = tiny_unet()
    inputs = unet_inputs(1, 15, 12)
    seen = {}
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    attn.to_k.register_forward_pre_hook(lambda m, args: seen.__setitem__("keys", args[0]))
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2, "max_downsample": 2})
    run_unet(unet, inputs)
    assert seen["input"].shape[1] == 8 * 6
    torch.testing.assert_close(seen["keys"], downsample_tokens(seen["input"], 8, 6, 2, "nearest"))


@pytest.mark.parametrize("method", ["avg", "linear"])
def test_unet_other_pooling_methods(method):
    unet = tiny_unet()
    dense = run_unet(unet)
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2, "downsample_method": method})
    error = relative_error(run_unet(unet), dense)
    assert 0 < error < 0.25, error


def test_unet_cfg_batch_equals_rows_run_alone():
    unet = tiny_unet()
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2})
    sample, timestep, text = unet_inputs(2)
    batched = run_unet(unet, (sample, timestep, text))
    for row in range(2):
        alone = run_unet(unet, (sample[row : row + 1], timestep[row : row + 1], text[row : row + 1]))
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-4, atol=1e-5)


def test_unet_remove_restores_bit_identical_outputs_and_state():
    unet = tiny_unet()
    dense = run_unet(unet)
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2})
    assert len(hooked_modules(unet)) == 5  # the root + four attn1
    assert not torch.equal(run_unet(unet), dense)
    assert hf_tokred.remove(unet) is unet
    assert_untouched(unet, dense, run_unet)
    hf_tokred.remove(unet)  # removing twice is a no-op


def test_reapplying_replaces_the_previous_reduction():
    unet = tiny_unet()
    probe = KVProbe(unet)
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2})
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 4})
    registry = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1._diffusers_hook
    assert list(registry.hooks) == ["hf_tokred_todo"]
    assert list(unet._diffusers_hook.hooks) == ["hf_tokred_grid"]
    run_unet(unet)
    assert probe.tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 16
    assert unet.config[CONFIG_KEY]["downsample_factor"] == 4


def test_failure_while_attaching_restores_the_previous_reduction(monkeypatch):
    unet = tiny_unet()
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2})
    before = run_unet(unet)
    original = hf_diffusers._DIFFUSION_WIRING["todo"]

    def attach_then_fail(denoiser, adapter, reducer, applied, grid):
        original.attach(denoiser, adapter, reducer, applied, grid)
        if reducer.downsample_factor == 4:  # fails half-way, after its hooks are registered
            raise RuntimeError("boom")

    monkeypatch.setitem(
        hf_diffusers._DIFFUSION_WIRING, "todo", hf_diffusers.DiffusionWiring(original.check, attach_then_fail)
    )
    with pytest.raises(RuntimeError, match="boom"):
        hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 4})
    monkeypatch.setitem(hf_diffusers._DIFFUSION_WIRING, "todo", original)
    assert unet.config[CONFIG_KEY]["downsample_factor"] == 2
    assert torch.equal(run_unet(unet), before)
    hf_tokred.remove(unet)
    assert hooked_modules(unet) == []


def test_processor_swapped_after_apply():
    unet = tiny_unet()
    probe = KVProbe(unet)
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2})
    unet.set_attn_processor(AttnProcessor())  # the classic processor also takes K/V from encoder_hidden_states
    run_unet(unet)
    assert probe.tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 64

    class CustomProcessor(AttnProcessor2_0):
        pass

    unet.set_attn_processor(CustomProcessor())
    with pytest.raises(UnsupportedModelError, match="CustomProcessor"):
        run_unet(unet)


def test_fused_projections_are_rejected_before_touching():
    unet = tiny_unet()
    unet.fuse_qkv_projections()
    dense = run_unet(unet)
    with pytest.raises(UnsupportedModelError, match="unfuse_qkv_projections"):
        hf_tokred.apply(unet, {"method": "todo"})
    assert_untouched(unet, dense, run_unet)


# ---------------------------------------------------------------------------------------------
# DiTTransformer2DModel and DiTPipeline
# ---------------------------------------------------------------------------------------------


def test_dit_patch_grid_is_level_one():
    dit = tiny_dit()
    probe = KVProbe(dit)
    dense = run_dit(dit)
    assert set(probe.tokens.values()) == {16}  # 8 x 8 latent, patch 2: a 4 x 4 token grid
    hf_tokred.apply(dit, {"method": "todo", "downsample_factor": 2})
    reduced = run_dit(dit)
    assert set(probe.tokens.values()) == {4} and set(probe.queries.values()) == {16}
    error = relative_error(reduced, dense)
    assert 0 < error < 0.5, error
    hf_tokred.remove(dit)
    assert_untouched(dit, dense, run_dit)


def test_dit_factor_one_is_bit_identical_and_batch_rows_match():
    dit = tiny_dit()
    dense = run_dit(dit)
    hf_tokred.apply(dit, {"method": "todo", "downsample_factor": 1})
    assert torch.equal(run_dit(dit), dense)
    hf_tokred.apply(dit, {"method": "todo", "downsample_factor": 2})
    latent, timestep, labels = dit_inputs(2)
    batched = run_dit(dit, (latent, timestep, labels))
    for row in range(2):
        alone = run_dit(dit, (latent[row : row + 1], timestep[row : row + 1], labels[row : row + 1]))
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-4, atol=1e-5)


def test_apply_on_pipeline_reduces_its_transformer():
    pipe = tiny_dit_pipeline()
    dense = run_pipeline(pipe)
    probe = KVProbe(pipe.transformer)
    assert hf_tokred.apply(pipe, {"method": "todo", "downsample_factor": 2}) is pipe
    assert pipe.transformer.config[CONFIG_KEY]["method"] == "todo"
    reduced = run_pipeline(pipe)
    assert set(probe.tokens.values()) == {4}
    assert not torch.equal(reduced, dense)
    hf_tokred.remove(pipe)
    assert torch.equal(run_pipeline(pipe), dense)
    assert hooked_modules(pipe.transformer) == [] and CONFIG_KEY not in pipe.transformer.config


def test_pipeline_save_and_reload_round_trip(tmp_path):
    pipe = tiny_dit_pipeline()
    dense = run_pipeline(pipe)
    pipe.save_pretrained(tmp_path / "dense")

    loaded = realigned(DiffusionPipeline.from_pretrained(tmp_path / "dense", token_reduction={"method": "todo"}))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, DiTPipeline)
    assert hf_diffusers.get_applied(loaded.transformer) is not None
    reduced = run_pipeline(loaded)
    assert not torch.equal(reduced, dense)

    loaded.save_pretrained(tmp_path / "reduced")
    with open(tmp_path / "reduced" / "transformer" / "config.json") as fh:
        assert json.load(fh)[CONFIG_KEY] == TokenReductionConfig(method="todo").to_dict()

    again = realigned(DiffusionPipeline.from_pretrained(tmp_path / "reduced"))  # the saved reduction comes back
    again.set_progress_bar_config(disable=True)
    assert hf_diffusers.get_applied(again.transformer).config == TokenReductionConfig(method="todo")
    assert torch.equal(run_pipeline(again), reduced)

    dense_again = realigned(DiffusionPipeline.from_pretrained(tmp_path / "reduced", token_reduction=False))
    dense_again.set_progress_bar_config(disable=True)
    assert hf_diffusers.get_applied(dense_again.transformer) is None
    assert CONFIG_KEY not in dense_again.transformer.config and hooked_modules(dense_again.transformer) == []
    assert torch.equal(run_pipeline(dense_again), dense)


def test_pipeline_from_pretrained_with_a_different_config_replaces_the_saved_one(tmp_path):
    pipe = tiny_dit_pipeline()
    hf_tokred.apply(pipe, {"method": "todo", "downsample_factor": 2})
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, token_reduction={"method": "todo", "downsample_factor": 4})
    assert loaded.transformer.config[CONFIG_KEY]["downsample_factor"] == 4
    assert list(loaded.transformer.transformer_blocks[0].attn1._diffusers_hook.hooks) == ["hf_tokred_todo"]


def test_malformed_saved_config_names_the_file(tmp_path):
    pipe = tiny_dit_pipeline()
    pipe.save_pretrained(tmp_path)
    config_file = tmp_path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config[CONFIG_KEY] = {"method": "todo", "downsample_factor": 0}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        DiffusionPipeline.from_pretrained(tmp_path)
    assert str(config_file) in str(err.value) and "token_reduction=False" in str(err.value)
    assert err.value.field == "downsample_factor"

    config[CONFIG_KEY] = {"method": "no_such_method"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnknownMethodError, match="token_reduction=False"):
        DiffusionPipeline.from_pretrained(tmp_path)

    dense = DiffusionPipeline.from_pretrained(tmp_path, token_reduction=False)
    assert CONFIG_KEY not in dense.transformer.config and hooked_modules(dense.transformer) == []


def test_bad_token_reduction_argument_fails_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="downsample_factor"):
        DiffusionPipeline.from_pretrained(
            tmp_path / "missing", token_reduction={"method": "todo", "downsample_factor": 0}
        )
    with pytest.raises(ConfigError, match="False"):
        UNet2DConditionModel.from_pretrained(tmp_path / "missing", token_reduction=True)


# ---------------------------------------------------------------------------------------------
# Denoiser-level from_pretrained
# ---------------------------------------------------------------------------------------------


def test_denoiser_from_pretrained(tmp_path):
    unet = tiny_unet()
    dense = run_unet(unet)
    unet.save_pretrained(tmp_path / "dense")

    reduced_unet = UNet2DConditionModel.from_pretrained(tmp_path / "dense", token_reduction={"method": "todo"})
    reduced = run_unet(reduced_unet)
    assert not torch.equal(reduced, dense)
    reduced_unet.save_pretrained(tmp_path / "reduced")

    again = UNet2DConditionModel.from_pretrained(tmp_path / "reduced")
    assert hf_diffusers.get_applied(again) is not None
    assert torch.equal(run_unet(again), reduced)

    dense_again = UNet2DConditionModel.from_pretrained(tmp_path / "reduced", token_reduction=False)
    assert_untouched(dense_again, dense, run_unet)

    config_file = tmp_path / "reduced" / "config.json"
    config = json.loads(config_file.read_text())
    config[CONFIG_KEY] = ["not", "a", "dict"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=str(config_file).replace("\\", "\\\\")):
        UNet2DConditionModel.from_pretrained(tmp_path / "reduced")


def test_denoiser_from_pretrained_rejects_an_unsupported_model(tmp_path):
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel"):
        UNet2DModel.from_pretrained(tmp_path, token_reduction={"method": "todo"})


# ---------------------------------------------------------------------------------------------
# Bad input leaves the model untouched
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"method": "no_such_method"}, UnknownMethodError),
        ({"method": "todo", "downsample_factor": 0}, ConfigError),
        ({"method": "todo", "downsample_factor": 2.5}, ConfigError),
        ({"method": "todo", "downsample_factor": "x"}, ConfigError),
        ({"method": "todo", "downsample_method": "bicubic"}, ConfigError),
        ({"method": "streamingllm", "max_tokens": 8}, UnsupportedModelError),
        ("not/a/preset", hf_tokred.TokenReductionError),
    ],
)
def test_bad_input_on_a_pipeline_leaves_it_untouched(config, error):
    pipe = tiny_dit_pipeline()
    dense = run_dit(pipe.transformer)
    with pytest.raises(error):
        hf_tokred.apply(pipe, config)
    assert_untouched(pipe.transformer, dense, run_dit)


def test_kv_policy_on_a_pipeline_names_the_diffusion_methods():
    pipe = tiny_dit_pipeline()
    with pytest.raises(UnsupportedModelError, match="diffusion reducers .*todo"):
        hf_tokred.apply(pipe, {"method": "streamingllm", "max_tokens": 8})


def test_bad_input_on_a_reduced_unet_keeps_the_current_reduction():
    unet = tiny_unet()
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2})
    before = run_unet(unet)
    with pytest.raises(ConfigError):
        hf_tokred.apply(unet, {"method": "todo", "downsample_factor": -1})
    assert unet.config[CONFIG_KEY]["downsample_factor"] == 2
    assert torch.equal(run_unet(unet), before)


def test_unsupported_denoisers_are_rejected_and_untouched():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler())
    sample = torch.randn(1, 3, 8, 8)

    def run(model):
        with torch.no_grad():
            return model(sample, 10).sample

    dense = run(unet)
    for target in (pipe, unet):
        with pytest.raises(UnsupportedModelError, match="Supported denoisers") as err:
            hf_tokred.apply(target, {"method": "todo"})
        for name in ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"):
            assert name in str(err.value)
        assert_untouched(unet, dense, run)


def test_pipeline_without_a_denoiser_is_rejected():
    class VaeOnlyPipeline(DiffusionPipeline):
        def __init__(self, vae):
            super().__init__()
            self.register_modules(vae=vae)

    pipe = VaeOnlyPipeline(vae=tiny_dit_pipeline().vae)
    with pytest.raises(UnsupportedModelError, match="no unet or transformer component"):
        hf_diffusers.apply_to_diffusers(pipe, {"method": "todo"})
    with pytest.raises(UnsupportedModelError, match="vae=AutoencoderKL is not supported"):
        hf_tokred.apply(tiny_dit_pipeline(), {"method": "todo"}, component="vae")
    assert hooked_modules(pipe.vae) == []


def test_remove_on_a_pipeline_without_reduction_is_a_no_op():
    pipe = tiny_dit_pipeline()
    assert hf_tokred.remove(pipe) is pipe
    assert hooked_modules(pipe.transformer) == []


def test_install_is_idempotent():
    wrapped = DiffusionPipeline.__dict__["from_pretrained"]
    hf_tokred.install()
    assert DiffusionPipeline.__dict__["from_pretrained"] is wrapped
    from hf_tokred.integration.wiring import saved_config_path

    assert os.path.basename(saved_config_path("org/repo", "unet")) == "config.json"


def test_remove_keeps_an_accelerate_hook_added_after_apply():
    """enable_model_cpu_offload wraps the denoiser's forward with accelerate hooks after our hooks."""
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module

    class CountCalls(AccelerateHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    unet = tiny_unet()
    dense = run_unet(unet)
    hf_tokred.apply(unet, {"method": "todo", "downsample_factor": 2})
    add_hook_to_module(unet, CountCalls())
    run_unet(unet)
    hf_tokred.remove(unet)
    assert torch.equal(run_unet(unet), dense)
    assert CountCalls.calls == 2
    assert "_diffusers_hook" not in unet.__dict__


def test_composed_diffusion_config_round_trips_and_mixed_stages_are_rejected(tmp_path):
    unet = tiny_unet()
    hf_tokred.apply(unet, hf_tokred.compose({"method": "todo", "downsample_factor": 2}))
    reduced = run_unet(unet)
    unet.save_pretrained(tmp_path)
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    assert hf_diffusers.get_applied(again).config.method == "composed"
    assert torch.equal(run_unet(again), reduced)

    dense_unet = tiny_unet()
    dense = run_unet(dense_unet)
    mixed = hf_tokred.compose({"method": "todo"}, {"method": "streamingllm", "max_tokens": 8})
    with pytest.raises(UnsupportedModelError, match="streamingllm"):
        hf_tokred.apply(dense_unet, mixed)
    assert_untouched(dense_unet, dense, run_unet)
