"""FreqTS (frequency-aware token selection across denoising steps) on tiny UNet, DiT, PixArt and SD3 denoisers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_diffusion_flux import tiny_flux
from test_tome_sd import tiny_dit, tiny_dit_pipeline, tiny_pixart, tiny_sd3, tiny_unet

import hf_tokred
import hf_tokred.methods.diffusion.freqts  # noqa: F401  (registers "freqts")
from hf_tokred import ConfigError, TokenReductionConfig, UnsupportedModelError
from hf_tokred.integration import diffusers as hf_diffusers
from hf_tokred.integration.diffusers import CONFIG_KEY
from hf_tokred.methods.diffusion.freqts import (
    FreqTSConfig,
    computed_fraction,
    high_frequency_scores,
    is_full_step,
    kept_tokens,
    select_tokens,
    step_ratio,
)

TIMESTEPS = (900, 700, 500, 300)  # four denoising steps of one run


# ---------------------------------------------------------------------------------------------
# Inputs: each batch row is the same tensor whatever else is in the batch; the latent drifts per step
# ---------------------------------------------------------------------------------------------


def _rows(tensor: torch.Tensor, rows) -> torch.Tensor:
    return tensor[torch.tensor(rows)]


def _latent(step: int, channels: int = 4, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(2, channels, size, size, generator=generator)
    drift = torch.randn(2, channels, size, size, generator=generator)
    return base + 0.1 * step * drift


def run_unet(model, step: int, timestep: int, rows=(0, 1)) -> torch.Tensor:
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(_rows(_latent(step, size=16), rows), torch.tensor([timestep] * len(rows)),
                     encoder_hidden_states=_rows(text, rows)).sample


def run_dit(model, step: int, timestep: int, rows=(0, 1)) -> torch.Tensor:
    with torch.no_grad():
        return model(_rows(_latent(step), rows), timestep=torch.tensor([timestep] * len(rows)),
                     class_labels=torch.tensor(rows)).sample


def run_pixart(model, step: int, timestep: int, rows=(0, 1)) -> torch.Tensor:
    text = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(_rows(_latent(step), rows), encoder_hidden_states=_rows(text, rows),
                     timestep=torch.tensor([timestep] * len(rows)),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def run_sd3(model, step: int, timestep: int, rows=(0, 1)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(2, 5, 12, generator=generator)
    pooled = torch.randn(2, 10, generator=generator)
    with torch.no_grad():
        return model(_rows(_latent(step), rows), encoder_hidden_states=_rows(text, rows),
                     pooled_projections=_rows(pooled, rows), timestep=torch.tensor([timestep] * len(rows))).sample


MODELS = {"unet": (tiny_unet, run_unet), "dit": (tiny_dit, run_dit), "pixart": (tiny_pixart, run_pixart),
          "sd3": (tiny_sd3, run_sd3)}


def run_steps(model, run, rows=(0, 1), timesteps=TIMESTEPS) -> list[torch.Tensor]:
    return [run(model, step, t, rows) for step, t in enumerate(timesteps)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def hooked_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if "_diffusers_hook" in m.__dict__ or "forward" in m.__dict__]


class QueryProbe:
    """Tokens each self-attention's ``to_q`` projects per call, by plain torch hooks (independent of ours)."""

    def __init__(self, model, suffixes=("attn1", "attn")):
        self.tokens: dict[str, int] = {}
        self.handles = [
            module.to_q.register_forward_hook(self._record(name))
            for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in suffixes and hasattr(module, "to_q")
        ]

    def _record(self, name):
        return lambda module, args, output: self.tokens.__setitem__(name, args[0].shape[1])

    def close(self):
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Config and tensor functions
# ---------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    cfg = TokenReductionConfig(method="freqts")
    assert isinstance(cfg, FreqTSConfig)
    assert (cfg.ratio, cfg.full_every, cfg.warmup_steps, cfg.schedule, cfg.kernel_size, cfg.max_downsample) == (
        0.5, 3, 1, "u_shaped", 3, 1)
    assert cfg.stage == "diffusion" and cfg.model_kinds == ("unet", "dit") and not cfg.learned
    assert TokenReductionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"full_every": 0}, "full_every"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"schedule": "linear"}, "schedule"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 1}, "kernel_size"),
        ({"max_downsample": 0}, "max_downsample"),
    ],
)
def test_config_rejects_bad_fields(fields, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="freqts", **fields)
    assert err.value.field == field


def test_high_frequency_scores_find_detail_and_ignore_smooth_regions():
    # A smooth ramp has no high-pass energy away from the edges; a spike has the most.
    ramp = torch.arange(36.0).view(1, 36, 1)
    interior = torch.tensor([y * 6 + x for y in range(1, 5) for x in range(1, 5)])
    assert torch.allclose(high_frequency_scores(ramp, 6, 6)[0, interior], torch.zeros(16), atol=1e-9)
    spike = torch.zeros(1, 36, 3)
    spike[0, 14] = 5.0
    assert int(high_frequency_scores(spike, 6, 6).argmax()) == 14
    constant = torch.full((2, 35, 4), 3.0)
    assert torch.equal(high_frequency_scores(constant, 5, 7), torch.zeros(2, 35))


def test_high_frequency_scores_rows_are_independent_and_input_is_checked():
    x = torch.randn(3, 24, 5)
    batched = high_frequency_scores(x, 4, 6, 5)
    for row in range(3):
        torch.testing.assert_close(batched[row : row + 1], high_frequency_scores(x[row : row + 1], 4, 6, 5))
    with pytest.raises(ValueError, match="tokens"):
        high_frequency_scores(x, 5, 5)
    with pytest.raises(ValueError, match="kernel_size"):
        high_frequency_scores(x, 4, 6, 2)


def test_selection_schedule_and_counts():
    assert select_tokens(torch.tensor([[3.0, 1.0, 2.0], [0.0, 9.0, 8.0]]), 2).tolist() == [[0, 2], [1, 2]]
    with pytest.raises(ValueError, match="keep"):
        select_tokens(torch.zeros(1, 3), 0)
    assert step_ratio(0.6, 500.0) == 0.6 and step_ratio(0.6, 0.0) == 0.0 and step_ratio(0.6, 1000.0) == 0.0
    assert step_ratio(0.6, 100.0) < step_ratio(0.6, 300.0) < step_ratio(0.6, 500.0)
    assert step_ratio(0.6, 100.0, "constant") == 0.6 and step_ratio(0.6, None) == 0.6
    assert [kept_tokens(64, r) for r in (0.0, 0.25, 0.5, 0.999)] == [64, 48, 32, 1]
    assert [is_full_step(k, 2, 3) for k in range(6)] == [True, True, True, False, True, False]
    cfg = TokenReductionConfig(method="freqts", ratio=0.5, full_every=4, warmup_steps=0, schedule="constant")
    assert computed_fraction(cfg, range(8)) == (2 * 1.0 + 6 * 0.5) / 8


# ---------------------------------------------------------------------------------------------
# No-op settings, remove(), exact behaviour of a partial step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{"ratio": 0.0}, {"ratio": 0.7, "full_every": 1}])
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_no_op_settings_are_bit_identical_and_attach_nothing(kind, fields):
    build, run = MODELS[kind]
    model = build()
    dense = run_steps(model, run)
    hf_tokred.apply(model, {"method": "freqts", **fields})
    assert [n for n in hooked_modules(model) if n] == []  # only the root grid hook
    assert all(torch.equal(a, b) for a, b in zip(run_steps(model, run), dense))


@pytest.mark.parametrize("kind", ["unet", "dit", "pixart", "sd3"])
def test_reduced_steps_stay_close_and_remove_is_bit_identical(kind):
    build, run = MODELS[kind]
    model = build()
    dense = run_steps(model, run)
    hf_tokred.apply(model, {"method": "freqts", "ratio": 0.5, "full_every": 2, "warmup_steps": 1})
    reduced = run_steps(model, run)
    # Steps 0 and 2 recompute everything (warm-up, full_every) from the same inputs: exactly dense.
    assert torch.equal(reduced[0], dense[0]) and torch.equal(reduced[2], dense[2])
    for step in (1, 3):
        error = relative_error(reduced[step], dense[step])
        assert 0 < error < 0.25, (kind, step, error)
    hf_tokred.remove(model)
    assert hooked_modules(model) == [] and CONFIG_KEY not in model.config
    assert hf_diffusers.get_applied(model) is None
    assert all(torch.equal(a, b) for a, b in zip(run_steps(model, run), dense))


def test_exact_token_counts_per_block_follow_the_schedule_and_levels():
    unet = tiny_unet()
    hf_tokred.apply(unet, {"method": "freqts", "ratio": 0.6, "full_every": 3, "warmup_steps": 1})
    probe = QueryProbe(unet)
    seen = []
    for step, t in enumerate((900, 500, 300, 200)):
        run_unet(unet, step, t)
        seen.append(dict(probe.tokens))
    probe.close()
    full = seen[0]
    finest = max(full.values())  # 16 x 16 latent: 256 tokens at level 1, 64 in the mid block (level 2)
    assert finest == 256 and sorted(set(full.values())) == [64, 256]
    for step, t in enumerate((900, 500, 300, 200)):
        for name, count in seen[step].items():
            if full[name] != finest or is_full_step(step, 3, 1):
                assert count == full[name], (step, name)  # full steps, and the mid block (max_downsample=1)
            else:
                assert count == kept_tokens(finest, step_ratio(0.6, float(t))), (step, name)


def test_partial_step_is_the_block_on_selected_tokens_plus_cached_updates_for_the_rest():
    dit = tiny_dit()
    dense = copy.deepcopy(dit)
    hf_tokred.apply(dit, {"method": "freqts", "ratio": 0.5, "schedule": "constant", "full_every": 4})
    block, dense_block = dit.transformer_blocks[1], dense.transformer_blocks[1]
    calls = []
    block.register_forward_pre_hook(lambda m, a, k: calls.append([a, k]), with_kwargs=True)
    block.register_forward_hook(lambda m, a, k, out: calls[-1].append(out), with_kwargs=True)
    run_dit(dit, 0, 500)
    run_dit(dit, 1, 400)
    (args0, kwargs0, out0), (args1, kwargs1, out1) = calls
    tokens0, tokens1 = args0[0] if args0 else kwargs0["hidden_states"], args1[0] if args1 else kwargs1["hidden_states"]
    index = select_tokens(high_frequency_scores(tokens1, 4, 4), kept_tokens(16, 0.5))
    assert index.shape == (2, 8)
    gather = index.unsqueeze(-1).expand(-1, -1, tokens1.shape[-1])
    rest = torch.ones(2, 16, dtype=torch.bool).scatter(1, index, False)
    # Not selected: this step's input plus the update the full step 0 computed.
    assert torch.equal(out1[rest], (tokens1 + (out0 - tokens0))[rest])
    # Selected: the dense block run on the selected tokens alone.
    call_kwargs = {k: v for k, v in kwargs1.items() if k != "hidden_states"}
    with torch.no_grad():
        alone = dense_block(tokens1.gather(1, gather), *args1[1:], **call_kwargs)
    torch.testing.assert_close(out1.gather(1, gather), alone, rtol=1e-5, atol=1e-6)


def test_a_higher_timestep_starts_a_new_run_with_a_full_step():
    dit = tiny_dit()
    dense_model = copy.deepcopy(dit)
    dense = run_dit(dit, 0, 900)
    hf_tokred.apply(dit, {"method": "freqts", "ratio": 0.5, "full_every": 10})
    first = run_steps(dit, run_dit)
    assert torch.equal(first[0], dense)
    # 900 > 300: the second run starts afresh (a full step), so it repeats the first exactly.
    assert all(torch.equal(a, b) for a, b in zip(run_steps(dit, run_dit), first))
    # An equal timestep continues the run (step 1 of 10: a partial step).
    assert not torch.equal(run_dit(dit, 3, 300), run_dit(dense_model, 3, 300))


@pytest.mark.parametrize("kind", ["unet", "dit", "sd3"])
def test_cfg_batch_equals_rows_run_alone(kind):
    build, run = MODELS[kind]
    config = {"method": "freqts", "ratio": 0.5, "full_every": 3}
    model = hf_tokred.apply(build(), config)
    batched = run_steps(model, run)
    for row in (0, 1):
        alone = run_steps(hf_tokred.apply(build(), config), run, rows=(row,))
        for step, out in enumerate(alone):
            torch.testing.assert_close(batched[step][row : row + 1], out, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Pipelines and errors
# ---------------------------------------------------------------------------------------------


def _pipeline_images(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[0], num_inference_steps=5, guidance_scale=4.0, generator=generator,
                output_type="pt").images


def test_pipeline_run_save_and_reload(tmp_path):
    pipe = tiny_dit_pipeline()
    dense = _pipeline_images(pipe)
    hf_tokred.apply(pipe, {"method": "freqts", "ratio": 0.5, "full_every": 2, "schedule": "constant"})
    reduced = _pipeline_images(pipe)
    assert not torch.equal(reduced, dense) and relative_error(reduced, dense) < 0.5  # random weights
    assert torch.equal(_pipeline_images(pipe), reduced)  # a new call of the pipeline is a new run
    pipe.save_pretrained(tmp_path)
    again = type(pipe).from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert again.transformer.config[CONFIG_KEY]["method"] == "freqts"
    assert torch.equal(_pipeline_images(again), reduced)
    hf_tokred.remove(pipe)
    assert torch.equal(_pipeline_images(pipe), dense)


def test_flux_is_rejected_and_left_untouched():
    flux = tiny_flux()
    with pytest.raises(UnsupportedModelError, match="rotary"):
        hf_tokred.apply(flux, {"method": "freqts", "ratio": 0.5})
    assert hooked_modules(flux) == [] and CONFIG_KEY not in flux.config


def test_sdxl_shaped_unet_without_level_one_attention_is_a_clear_error():
    unet = tiny_unet(sdxl=True)
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(unet, {"method": "freqts", "ratio": 0.5})
    assert err.value.field == "max_downsample"
    assert hooked_modules(unet) == []
    hf_tokred.apply(unet, {"method": "freqts", "ratio": 0.5, "max_downsample": 2})
    assert any(n for n in hooked_modules(unet))


def test_shape_only_calls_continue_the_run_so_a_partial_step_can_be_counted():
    from hf_tokred.bench.diffusion import count_flops

    with torch.device("meta"):
        dit = tiny_dit()
        latent = torch.empty(2, 4, 8, 8)
    labels = torch.tensor([0, 1], device="meta")

    def step():
        return dit(latent, timestep=torch.full((2,), 500, device="meta"), class_labels=labels).sample

    dense, _ = count_flops(step)
    hf_tokred.apply(dit, {"method": "freqts", "ratio": 0.5, "full_every": 3})
    counts = [count_flops(step)[0] for _ in range(4)]
    assert counts[0] == counts[3] == dense  # steps 0 and 3 recompute every token
    assert counts[1] == counts[2] < dense
