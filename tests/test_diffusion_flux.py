"""Flux (``FluxTransformer2DModel``): ``todo`` with keys/values reduced after the rotary embedding, and ``tome_sd``
with one matching per batch row, on a tiny random Flux (packed latents, a rotary table over ``[text, image]``,
one two-stream and one single-stream block)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor as DiffusersFluxProcessor

import hf_tokred
import hf_tokred.methods.diffusion.todo  # noqa: F401  (registers "todo")
import hf_tokred.methods.diffusion.tome_sd  # noqa: F401  (registers "tome_sd")
from hf_tokred import TokenReductionConfig, TokenReductionError, UnsupportedModelError
from hf_tokred.integration import diffusers as hf_diffusers
from hf_tokred.integration.diffusers import CONFIG_KEY

TEXT, HEIGHT, WIDTH = 5, 6, 8
IMAGE = HEIGHT * WIDTH


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4),
    ).eval()


def image_ids(height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.zeros(rows.numel()), rows.flatten(), cols.flatten()], dim=-1)


def flux_inputs(rows=(0, 1)) -> dict:
    """Inputs of the batch rows ``rows`` (row ``i`` is the same tensor whatever else is in the batch)."""
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(3, IMAGE, 16, generator=generator)
    text = torch.randn(3, TEXT, 12, generator=generator)
    pooled = torch.randn(3, 10, generator=generator)
    index = torch.tensor(rows)
    return dict(hidden_states=latent[index], encoder_hidden_states=text[index], pooled_projections=pooled[index],
                timestep=torch.tensor([0.5] * len(rows)), img_ids=image_ids(), txt_ids=torch.zeros(TEXT, 3))


def run_flux(model, rows=(0, 1), **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**flux_inputs(rows), **extra).sample


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def hooked_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if "_diffusers_hook" in m.__dict__ or "forward" in m.__dict__]


def assert_untouched(model, reference) -> None:
    assert hooked_modules(model) == []
    assert CONFIG_KEY not in model.config
    assert hf_diffusers.get_applied(model) is None
    assert torch.equal(run_flux(model), reference)


def assert_rows_equal_rows_alone(model, batched: torch.Tensor) -> None:
    """Every row of a batch-3 call equals that row run alone (float rounding of batched matmuls only)."""
    for row in range(batched.shape[0]):
        alone = run_flux(model, rows=(row,))
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=2e-6)


class KernelProbe(torch.overrides.TorchFunctionMode):
    """Records the queries/keys/values of every ``scaled_dot_product_attention`` call (independent of hf_tokred).

    Entered around the whole model call, it sits below the reduction's own mode, so it sees what the kernel
    really gets: ``(batch, heads, tokens, head_dim)`` tensors after projection, norm and rotary embedding.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            self.calls.append(tuple(
                (args[i] if i < len(args) else kwargs[name]).detach().clone() for i, name in enumerate(names)
            ))
        return func(*args, **kwargs)


def probe(model, **extra):
    with KernelProbe() as kernel:
        out = run_flux(model, **extra)
    return out, kernel.calls


# ---------------------------------------------------------------------------------------------
# todo: image keys/values downsampled after the rotary embedding
# ---------------------------------------------------------------------------------------------


def test_todo_factor_one_attaches_nothing_and_is_bit_identical():
    model = tiny_flux()
    dense = run_flux(model)
    hf_tokred.apply(model, {"method": "todo", "downsample_factor": 1})
    assert model.config[CONFIG_KEY]["downsample_factor"] == 1
    attentions = [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn]
    assert all("_diffusers_hook" not in attn.__dict__ for attn in attentions)
    assert torch.equal(run_flux(model), dense)
    hf_tokred.remove(model)
    assert_untouched(model, dense)


def test_todo_nearest_keeps_the_rotated_keys_of_the_cell_centres():
    model = tiny_flux()
    dense, dense_calls = probe(model)
    hf_tokred.apply(model, {"method": "todo", "downsample_factor": 2})
    reduced, calls = probe(model)
    assert 0 < relative_error(reduced, dense) < 0.5
    # Two attentions (two-stream, single-stream): every query stays; keys/values are the 5 text tokens and
    # the 6x8 image grid downsampled to 3x4.
    assert len(calls) == 2
    for query, key, value in calls:
        assert query.shape == (2, 2, TEXT + IMAGE, 8)
        assert key.shape == value.shape == (2, 2, TEXT + 12, 8)
    # The first attention sees the same input as in the dense run, so its reduced keys/values are exactly the
    # dense ones (projected, normalized, *rotated*) of the kept positions: the nearest-exact cell centres.
    (dense_query, dense_key, dense_value), (query, key, value) = dense_calls[0], calls[0]
    kept = [TEXT + y * WIDTH + x for y in (1, 3, 5) for x in (1, 3, 5, 7)]
    assert torch.equal(query, dense_query)
    for full, short in ((dense_key, key), (dense_value, value)):
        assert torch.equal(short[:, :, :TEXT], full[:, :, :TEXT])
        assert torch.equal(short[:, :, TEXT:], full[:, :, kept])
    hf_tokred.remove(model)
    assert_untouched(model, dense)


@pytest.mark.parametrize("pooling", ["avg", "linear"])
def test_todo_avg_and_linear_pool_the_rotated_keys(pooling):
    model = tiny_flux()
    _, dense_calls = probe(model)
    hf_tokred.apply(model, {"method": "todo", "downsample_factor": 2, "downsample_method": pooling})
    _, calls = probe(model)
    (_, dense_key, dense_value), (_, key, value) = dense_calls[0], calls[0]
    for full, short in ((dense_key, key), (dense_value, value)):
        assert torch.equal(short[:, :, :TEXT], full[:, :, :TEXT])
        grid = full[:, :, TEXT:].reshape(2, 2, HEIGHT, WIDTH, 8).permute(0, 1, 4, 2, 3).reshape(2, 16, HEIGHT, WIDTH)
        if pooling == "avg":  # each pooled key is the mean of its 2x2 cell's rotated keys
            pooled = F.avg_pool2d(grid, 2)
        else:
            pooled = F.interpolate(grid, size=(3, 4), mode="bilinear", align_corners=False, antialias=True)
        expected = pooled.reshape(2, 2, 8, 12).permute(0, 1, 3, 2)
        torch.testing.assert_close(short[:, :, TEXT:], expected, rtol=1e-5, atol=1e-6)


def test_todo_factor_three_on_a_grid_it_does_not_divide_and_batch_rows_equal_rows_alone():
    model = tiny_flux()
    hf_tokred.apply(model, {"method": "todo", "downsample_factor": 3, "downsample_method": "avg"})
    batched, calls = probe(model, rows=(0, 1, 2))
    assert [key.shape[2] for _, key, _ in calls] == [TEXT + 2 * 3] * 2  # 6x8 -> ceil: 2x3
    assert_rows_equal_rows_alone(model, batched)


def test_todo_save_and_reload_round_trip(tmp_path):
    model = tiny_flux()
    dense = run_flux(model)
    model.save_pretrained(tmp_path / "dense")
    cfg = TokenReductionConfig(method="todo", downsample_factor=2, downsample_method="avg")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "dense", token_reduction=cfg)
    reduced = run_flux(loaded)
    assert relative_error(reduced, dense) > 0
    loaded.save_pretrained(tmp_path / "reduced")
    with open(tmp_path / "reduced" / "config.json") as fh:
        assert json.load(fh)[CONFIG_KEY] == cfg.to_dict()
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "reduced")
    assert hf_diffusers.get_applied(again).config == cfg
    assert torch.equal(run_flux(again), reduced)
    plain = FluxTransformer2DModel.from_pretrained(tmp_path / "reduced", token_reduction=False)
    assert hooked_modules(plain) == [] and CONFIG_KEY not in plain.config
    assert torch.equal(run_flux(plain), dense)


def test_todo_unknown_processor_and_non_sdpa_backend_are_clear_errors():
    model = tiny_flux()
    dense = run_flux(model)

    class OtherProcessor(DiffusersFluxProcessor):
        pass

    model.single_transformer_blocks[0].attn.set_processor(OtherProcessor())
    with pytest.raises(UnsupportedModelError, match="OtherProcessor"):
        hf_tokred.apply(model, {"method": "todo"})
    assert_untouched(model, dense)
    model.single_transformer_blocks[0].attn.set_processor(DiffusersFluxProcessor())

    model.transformer_blocks[0].attn.set_attention_backend("flex")  # not run here: it is slow on CPU
    with pytest.raises(UnsupportedModelError, match="backend 'flex'"):
        hf_tokred.apply(model, {"method": "todo"})
    assert hooked_modules(model) == [] and CONFIG_KEY not in model.config

    # Set after apply: caught at the call, before the attention runs.
    model.transformer_blocks[0].attn.set_attention_backend("native")
    hf_tokred.apply(model, {"method": "todo"})
    model.transformer_blocks[0].attn.set_attention_backend("flex")
    with pytest.raises(UnsupportedModelError, match="backend 'flex'"):
        run_flux(model)
    model.transformer_blocks[0].attn.set_attention_backend("native")
    hf_tokred.remove(model)
    assert_untouched(model, dense)


def test_todo_attention_that_never_reaches_sdpa_and_masks_are_clear_errors():
    model = tiny_flux()

    class FluxAttnProcessor(DiffusersFluxProcessor):  # same name, but computes attention without the kernel
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            value = attn.to_v(hidden_states)
            return value if encoder_hidden_states is None else (value, attn.add_v_proj(encoder_hidden_states))

    hf_tokred.apply(model, {"method": "todo"})
    mask = torch.ones(2, TEXT + IMAGE, dtype=torch.bool)
    with pytest.raises(UnsupportedModelError, match="masks are not supported"):
        run_flux(model, joint_attention_kwargs={"attention_mask": mask})
    model.transformer_blocks[0].attn.set_processor(FluxAttnProcessor())
    with pytest.raises(TokenReductionError, match="scaled_dot_product_attention 0 times"):
        run_flux(model)


def test_reference_image_tokens_are_a_clear_error():
    """Flux Kontext appends reference-image tokens whose ids overlap the target grid: no single token grid."""
    model = tiny_flux()
    hf_tokred.apply(model, {"method": "todo"})
    inputs = flux_inputs()
    reference = image_ids()
    reference[:, 0] = 1
    inputs["img_ids"] = torch.cat([image_ids(), reference])
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], inputs["hidden_states"]], dim=1)
    with pytest.raises(UnsupportedModelError, match="not one 6x8 token grid"), torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("cfg", [{"method": "todo", "downsample_method": "avg"}, {"method": "tome_sd", "merge_mlp": True}])
def test_gradients_flow_and_survive_gradient_checkpointing(cfg):
    """A checkpointed block runs its attention again during backward, through the same reduction."""

    def gradient(checkpointing: bool) -> torch.Tensor:
        model = tiny_flux().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        hf_tokred.apply(model, cfg)
        model(**flux_inputs()).sample.square().mean().backward()
        return model.single_transformer_blocks[0].attn.to_k.weight.grad

    plain = gradient(False)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(gradient(True), plain, rtol=1e-4, atol=1e-6)


def test_shape_only_meta_runs_count_the_same_flops():
    """The benchmark counts FLOPs on a meta-device copy; the Flux hooks must run there (ids stay on the CPU)."""
    from hf_tokred.bench.diffusion import count_flops

    model = tiny_flux()
    with torch.device("meta"):
        shapes_only = tiny_flux()

    def meta_step():
        inputs = flux_inputs()
        for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            inputs[name] = inputs[name].to("meta")
        return shapes_only(**inputs).sample

    for cfg in ({"method": "todo"}, {"method": "tome_sd"}):
        hf_tokred.apply(model, cfg)
        hf_tokred.apply(shapes_only, cfg)
        real, _ = count_flops(lambda: run_flux(model))
        shape_only, _ = count_flops(meta_step)
        assert shape_only == real
        hf_tokred.remove(model)
        hf_tokred.remove(shapes_only)


# ---------------------------------------------------------------------------------------------
# tome_sd: one matching per batch row, rotary rows of each row's kept tokens
# ---------------------------------------------------------------------------------------------


class RecordingFluxProcessor(DiffusersFluxProcessor):
    """diffusers' processor, recording the tokens and rotary table of every call and the block's matching."""

    calls: list

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        matching = attn._diffusers_hook.get_hook("hf_tokred_tome_sd").holder.matching
        self.calls.append((hidden_states.shape, image_rotary_emb, matching))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


RecordingFluxProcessor.__name__ = "FluxAttnProcessor"  # accepted as diffusers' processor by the layout


def test_tome_sd_matches_each_row_alone_with_its_own_rotary_rows():
    model = tiny_flux()
    dense = run_flux(model, rows=(0, 1, 2))
    with torch.no_grad():
        full_rotary = model.pos_embed(torch.cat([torch.zeros(TEXT, 3), image_ids()], dim=0))
    hf_tokred.apply(model, {"method": "tome_sd", "ratio": 0.5, "merge_mlp": True})
    recorder = RecordingFluxProcessor()
    recorder.calls = []
    for block in (model.transformer_blocks[0], model.single_transformer_blocks[0]):
        block.attn.set_processor(recorder)
    reduced = run_flux(model, rows=(0, 1, 2))
    assert 0 < relative_error(reduced, dense) < 0.5
    # The rows keep different tokens, so each attention runs once per row (batch 1), with that row's rows of
    # the [text, image] table: text rows, then the rows of the 24 tokens the row keeps (48 image tokens, half
    # merged; a merged destination keeps its own position).
    assert len(recorder.calls) == 6
    for call, (shape, rotary, matching) in enumerate(recorder.calls):
        row = call % 3
        single_stream = call >= 3
        assert shape[:2] == (1, (TEXT if single_stream else 0) + 24)
        kept = matching.kept_tokens[row]
        for merged_table, table in zip(rotary, full_rotary):
            assert merged_table.shape[0] == TEXT + 24
            assert torch.equal(merged_table[:TEXT], table[:TEXT])
            assert torch.equal(merged_table[TEXT:], table[TEXT + kept])
    kept = recorder.calls[0][2].kept_tokens
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
    for block in (model.transformer_blocks[0], model.single_transformer_blocks[0]):
        block.attn.set_processor(DiffusersFluxProcessor())
    assert_rows_equal_rows_alone(model, reduced)
    hf_tokred.remove(model)
    assert torch.equal(run_flux(model, rows=(0, 1, 2)), dense)
    assert hooked_modules(model) == []


def test_tome_sd_rows_that_keep_the_same_tokens_share_one_attention_call():
    model = tiny_flux()
    hf_tokred.apply(model, {"method": "tome_sd", "ratio": 0.5, "use_rand": False})
    recorder = RecordingFluxProcessor()
    recorder.calls = []
    model.transformer_blocks[0].attn.set_processor(recorder)
    batched = run_flux(model, rows=(0, 0))  # two equal rows: equal matchings
    assert [shape[0] for shape, _, _ in recorder.calls] == [2]
    # equal up to the CPU's rounding: on some CPUs (AMD EPYC) the dense model's two equal rows differ by 2e-7 too
    torch.testing.assert_close(batched[0], batched[1], rtol=0, atol=1e-5)
    recorder.calls.clear()
    run_flux(model, rows=(0,))
    assert [shape[0] for shape, _, _ in recorder.calls] == [1]


def test_tome_sd_save_and_reload_round_trip(tmp_path):
    model = tiny_flux()
    cfg = TokenReductionConfig(method="tome_sd", ratio=0.4, seed=3)
    hf_tokred.apply(model, cfg)
    reduced = run_flux(model)
    model.save_pretrained(tmp_path)
    again = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert hf_diffusers.get_applied(again).config == cfg
    assert torch.equal(run_flux(again), reduced)


def test_tome_sd_unknown_processor_is_a_clear_error():
    model = tiny_flux()
    dense = run_flux(model)

    class OtherProcessor(DiffusersFluxProcessor):
        pass

    model.transformer_blocks[0].attn.set_processor(OtherProcessor())
    with pytest.raises(UnsupportedModelError, match="OtherProcessor"):
        hf_tokred.apply(model, {"method": "tome_sd"})
    assert hooked_modules(model) == []
    model.transformer_blocks[0].attn.set_processor(DiffusersFluxProcessor())
    assert_untouched(model, dense)
