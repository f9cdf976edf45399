"""``hf-tokred diffusion``: one denoising step, dense vs ToMe for SD (ours and tomesd 0.1.3) vs ToDo.

The denoiser is built from its published configuration with random weights (nothing is
downloaded): ``unet`` is Stable Diffusion 1.5's ``UNet2DConditionModel`` (64x64 latents = 512x512
images, 77 text tokens), ``dit`` is DiT-XL/2 (``DiTTransformer2DModel``, 32x32 latents = 256x256
images). Every variant runs the same classifier-free-guidance batch (2 rows: cond and uncond).

For each variant the command reports:

* the median time of one denoiser step over ``--repeats`` repetitions, interleaved (dense, variant
  1, variant 2, ..., dense, variant 1, ...) so that load from other processes hits all alike, and
  the speed-up against the dense median; both wall time and the process's CPU time
  (``time.process_time``), which other processes on a shared machine disturb much less (with
  ``--threads 1`` it is the step's own compute; with more threads it includes OpenMP spin-waiting);
* the FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions, attention; index operations are free) on a meta-device copy of the model (shapes
  only, so counting costs no arithmetic), and the speed-up they predict; the ratio of the measured
  to the predicted speed-up says how much of the saved arithmetic turns into time;
* the relative error of the denoiser output against dense (a quality proxy; with random weights it
  is no image-quality figure);
* where the time goes: the time spent inside the transformer blocks of the finest token grid (the
  blocks ToMe merges with ``max_downsample=1``; hooks around each block call, the matching included)
  and in the rest of the step, which is the same code for every ToMe variant;
* ours against tomesd round by round: in each round the two run back to back, and the order of the
  variants is reversed every other round, so the per-round ratio ours/tomesd cancels the load and
  drift that a comparison of two medians keeps.

``tomesd`` (the reference implementation, ``pip install tomesd==0.1.3``) runs on the UNet only: it
patches ``BasicTransformerBlock`` by copying an old ``forward`` that does not handle DiT's
``ada_norm_zero`` blocks, and derives the grid from ``sqrt(tokens)``, so it would not merge a
patch-2 DiT anyway. ``--profile`` adds a ``torch.profiler`` table of the operators that take the
time, per variant.

Example:
    >>> from hf_tokred.cli import build_parser
    >>> args = build_parser().parse_args(["diffusion", "--model", "unet", "--ratio", "0.5", "--repeats", "3"])
    >>> args.model, args.ratio, args.repeats
    (['unet'], [0.5], 3)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODELS = ("unet", "dit")
SIZES = ("full", "tiny")
DEFAULT_RATIOS = (0.3, 0.5, 0.7)
DEFAULT_TODO_FACTORS = (2,)
METHODS = ("tome_sd", "tomesd", "todo", "freqts", "dydit")
# FreqTS recomputes every token every third step; the bench times one of its partial steps (a run averages
# 1 full + 2 partial steps).
FREQTS_FULL_EVERY = 3
# DyDiT on the DiT only (its paper's target): (heads, MLP groups, tokens through the MLP) kept, fixed routes on random
# weights, about the paper's DyDiT-XL at lambda 0.7 (29 % saved) and 0.5 (51 %).
DYDIT_PRESETS = ((0.875, 0.875, 0.8), (0.625, 0.625, 0.7))

COMMAND_DESCRIPTION = """\
One denoising step of a Stable Diffusion 1.5 UNet (64x64 latents) and of a DiT-XL/2 transformer
(32x32 latents), both with random weights and a classifier-free-guidance batch of 2: dense, ToMe for
SD (hf_tokred's tome_sd and the reference tomesd 0.1.3, UNet only) at each ratio, and ToDo. Reports the
median step time over interleaved repetitions, the speed-up, the speed-up the FLOP count predicts, and
the relative error of the output against dense.

examples:
  hf-tokred diffusion                               both models, ratios 0.3 0.5 0.7, 3 repetitions
  hf-tokred diffusion --model unet --repeats 5      the UNet only, more repetitions
  hf-tokred diffusion --model dit --ratio 0.5 --todo-factor 2 --todo-factor 4
  hf-tokred diffusion --method tome_sd --method tomesd --profile
                                                    only the two ToMe implementations, with a
                                                    torch.profiler table per variant
  hf-tokred diffusion --json diffusion.json         also write every number to a JSON file
"""


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


def build_unet(size: str = "full"):
    """Stable Diffusion 1.5's UNet configuration (``size="tiny"``: the same layout, tiny widths), random weights.

    Example:
        >>> from hf_tokred.bench.diffusion import build_unet
        >>> build_unet("tiny").config.cross_attention_dim
        32
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if size == "full":
        # diffusers' defaults are SD 1.x's (320/640/1280/1280 channels, 8 heads, 2 layers per block)
        # except the text width, CLIP ViT-L's 768.
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def build_dit(size: str = "full"):
    """DiT-XL/2's configuration (``size="tiny"``: 2 small layers), random weights.

    Example:
        >>> from hf_tokred.bench.diffusion import build_dit
        >>> build_dit("tiny").config.patch_size
        2
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    if size == "full":
        return DiTTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
        ).eval()
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=8,
    ).eval()


def step_inputs(name: str, model, batch: int = 2) -> dict:
    """The fixed random inputs of one step of ``model`` (the CFG batch), as keyword arguments of its forward."""
    generator = torch.Generator().manual_seed(1)
    size = model.config.sample_size
    latent = torch.randn(batch, model.config.in_channels, size, size, generator=generator)
    timestep = torch.full((batch,), 500)
    if name == "unet":
        text = torch.randn(batch, 77, model.config.cross_attention_dim, generator=generator)
        return {"sample": latent, "timestep": timestep, "encoder_hidden_states": text}
    labels = torch.tensor([i % model.config.num_embeds_ada_norm for i in range(batch)])
    labels[batch // 2 :] = model.config.num_embeds_ada_norm  # the null class of the uncond half
    return {"hidden_states": latent, "timestep": timestep, "class_labels": labels}


def model_inputs(name: str, model, batch: int = 2) -> Callable[[], torch.Tensor]:
    """A function running one step of ``model`` on :func:`step_inputs` and returning its output."""
    inputs = step_inputs(name, model, batch)
    if name == "unet":  # sample and timestep positional: tomesd's hooks read them from args
        sample, timestep, text = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]

        def step():
            return model(sample, timestep, encoder_hidden_states=text).sample
    else:

        def step():
            return model(**inputs).sample

    return step


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way to run the denoiser: ``attach(model)`` before a step, ``detach(model)`` after."""

    method: str
    setting: str
    attach: Callable
    detach: Callable
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    block_times: list[float] = field(default_factory=list)
    flops: int = 0
    output: torch.Tensor | None = None
    # FLOPs that depend on the values (a learned router's choices): counted on the real model, not the meta copy.
    data_dependent: bool = False
    # Untimed calls after attach: a cross-step method (freqts) fills its cache on its first call, a full step; the
    # timed and counted call is then one of its partial steps.
    prime: int = 0


def _tomesd():
    try:
        import tomesd
    except ImportError:
        from hf_tokred.errors import MissingDependencyError

        raise MissingDependencyError(
            "the tomesd variant needs tomesd 0.1.3: pip install tomesd==0.1.3 (or leave out --method tomesd)"
        ) from None
    return tomesd


def build_variants(model_name: str, methods, ratios, todo_factors) -> list[Variant]:
    """Dense first, then every (method, setting) asked for; tomesd only on the UNet."""
    import hf_tokred

    def ours(cfg):
        return lambda model: hf_tokred.apply(model, cfg)

    variants = [Variant("dense", "-", lambda model: None, lambda model: None)]
    tomesd = _tomesd() if "tomesd" in methods and model_name == "unet" else None
    for ratio in ratios:
        if tomesd is not None:
            variants.append(Variant("tomesd 0.1.3", f"ratio={ratio:g}",
                                    lambda model, r=ratio: tomesd.apply_patch(model, ratio=r), tomesd.remove_patch))
        if "tome_sd" in methods:
            variants.append(Variant("tome_sd (ours)", f"ratio={ratio:g}",
                                    ours({"method": "tome_sd", "ratio": ratio}), hf_tokred.remove))
    if "todo" in methods:
        for factor in todo_factors:
            variants.append(Variant("todo (ours)", f"downsample_factor={factor}",
                                    ours({"method": "todo", "downsample_factor": factor}), hf_tokred.remove))
    if "freqts" in methods:
        for ratio in ratios:
            cfg = {"method": "freqts", "ratio": ratio, "full_every": FREQTS_FULL_EVERY}
            if model_name == "unet":
                cfg["max_downsample"] = 8  # every UNet level: level 1 alone saves little (convolutions dominate)
            variants.append(Variant("freqts (ours, partial step)", f"ratio={ratio:g} full_every={FREQTS_FULL_EVERY}",
                                    ours(cfg), hf_tokred.remove, prime=1))
    if "dydit" in methods and model_name == "dit":
        variants.extend(_dydit_variant(*preset) for preset in DYDIT_PRESETS)
    return variants


def _dydit_variant(heads: float, groups: float, tokens: float) -> Variant:
    """DyDiT with fixed routes (an untrained DyDiT is dense): set once on the step's input, reloaded on every attach."""
    import hf_tokred
    from hf_tokred.recipes.dydit import preset_routes

    routes = {}

    def attach(model):
        hf_tokred.apply(model, {"method": "dydit"})
        if not routes:
            with torch.no_grad():
                preset_routes(model, step_inputs("dit", model), heads=heads, groups=groups, tokens=tokens)
            routes.update({k: v.clone() for k, v in model.hf_tokred_modules.state_dict().items()})
        else:
            model.hf_tokred_modules.load_state_dict(routes)

    return Variant("dydit (ours)", f"heads={heads:g} groups={groups:g} tokens={tokens:g}", attach, hf_tokred.remove,
                   data_dependent=True)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(step: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """``(FLOPs, output)`` of one call of ``step``, counted by ``torch.utils.flop_counter``.

    torch 2.13's counter has no formula for the CPU flash-attention kernel that
    ``F.scaled_dot_product_attention`` runs on CPU (``aten._scaled_dot_product_flash_attention_for_cpu``),
    so attention would count as free; it is given the formula of the other SDPA kernels.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_flash: _cpu_flash_attention_flops})
    with counter, torch.no_grad():
        output = step()
    return counter.get_total_flops(), output


def profile_table(step: Callable[[], torch.Tensor], rows: int = 12) -> str:
    """A ``torch.profiler`` table of the operators of one call of ``step``, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


class FinestBlockTimer:
    """Wall time spent inside the finest-grid transformer blocks of one step (the ones ToMe merges).

    Torch forward hooks on every ``BasicTransformerBlock`` of the model (found before any variant is
    attached: tomesd swaps the block class, the hooks stay on the instances) time each call and note
    its number of input tokens; ``finest()`` sums the calls with the most tokens since ``reset()``.
    The hooks sit outside the variants' own wrapping, so a block's time includes its matching.

    Example:
        >>> from hf_tokred.bench.diffusion import FinestBlockTimer, build_dit, model_inputs
        >>> model = build_dit("tiny")
        >>> timer = FinestBlockTimer(model)
        >>> _ = model_inputs("dit", model)()
        >>> len(timer.calls), timer.finest() > 0
        (2, True)
        >>> timer.close()
    """

    def __init__(self, model: torch.nn.Module):
        from diffusers.models.attention import BasicTransformerBlock

        self.calls: list[tuple[int, float]] = []
        self._started: list[float] = []
        self._handles = []
        for module in model.modules():
            if isinstance(module, BasicTransformerBlock):
                self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post))

    def _pre(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.calls.append((hidden_states.shape[1], 0.0))
        self._started.append(time.perf_counter())

    def _post(self, module, args, output):
        tokens, _ = self.calls[-1]
        self.calls[-1] = (tokens, time.perf_counter() - self._started.pop())

    def reset(self) -> None:
        self.calls.clear()

    def finest(self) -> float:
        if not self.calls:
            return 0.0
        most = max(tokens for tokens, _ in self.calls)
        return sum(seconds for tokens, seconds in self.calls if tokens == most)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _round_order(variants: list[Variant], round_index: int) -> list[Variant]:
    """Dense first, then the variants, in reverse on every other round (no variant always runs right after another)."""
    return variants if round_index % 2 == 0 else [variants[0], *variants[:0:-1]]


def paired_ratios(ours: Variant, theirs: Variant, key: str = "cpu_times") -> list[float]:
    """Per-round ratios ours / theirs of one time list (``cpu_times``, ``times`` or ``block_times``).

    Example:
        >>> from hf_tokred.bench.diffusion import Variant, paired_ratios
        >>> a, b = Variant("a", "-", None, None, cpu_times=[1.0, 2.0]), Variant("b", "-", None, None, cpu_times=[2.0, 2.0])
        >>> paired_ratios(a, b)
        [0.5, 1.0]
    """
    return [mine / other for mine, other in zip(getattr(ours, key), getattr(theirs, key))]


def _build(model_name: str, size: str):
    return build_unet(size) if model_name == "unet" else build_dit(size)


def run_model(model_name: str, size: str, variants: list[Variant], repeats: int, batch: int = 2,
              profile: bool = False, log: Callable[[str], None] = print) -> dict:
    """FLOPs of every variant (on a meta-device copy: shapes only, no arithmetic), one warm-up step,
    then ``repeats`` interleaved timed rounds; the outputs for the error column come from the first round."""
    with torch.device("meta"):
        shapes_only = _build(model_name, size)
        meta_step = model_inputs(model_name, shapes_only, batch)
    for variant in variants:
        if variant.data_dependent:
            continue
        variant.attach(shapes_only)
        try:
            for _ in range(variant.prime):
                meta_step()
            variant.flops, _ = count_flops(meta_step)
        finally:
            variant.detach(shapes_only)
    del shapes_only, meta_step

    model = _build(model_name, size)
    step = model_inputs(model_name, model, batch)
    for variant in variants:
        if variant.data_dependent:
            variant.attach(model)
            try:
                with torch.no_grad():
                    for _ in range(variant.prime):
                        step()
                    variant.flops, _ = count_flops(step)
            finally:
                variant.detach(model)
    with torch.no_grad():
        step()  # warm-up: one-time allocations and kernel choices land on no variant
    profiles = {}
    timer = FinestBlockTimer(model)
    try:
        for round_index in range(repeats):
            for variant in _round_order(variants, round_index):
                variant.attach(model)
                try:
                    with torch.no_grad():
                        for _ in range(variant.prime):
                            step()
                    timer.reset()
                    with torch.no_grad():
                        start, cpu_start = time.perf_counter(), time.process_time()
                        output = step()
                        variant.times.append(time.perf_counter() - start)
                        variant.cpu_times.append(time.process_time() - cpu_start)
                    variant.block_times.append(timer.finest())
                    if variant.output is None:
                        variant.output = output
                finally:
                    variant.detach(model)
            log(f"  {model_name}: round {round_index + 1}/{repeats} done")
    finally:
        timer.close()
    if profile:
        for variant in variants:
            variant.attach(model)
            try:
                profiles[f"{variant.method} {variant.setting}"] = profile_table(step)
            finally:
                variant.detach(model)
    dense = variants[0]
    dense_time = statistics.median(dense.times)
    dense_cpu = statistics.median(dense.cpu_times)
    dense_blocks = statistics.median(dense.block_times)
    by_key = {(v.method, v.setting): v for v in variants}
    results = []
    for variant in variants:
        median = statistics.median(variant.times)
        cpu_median = statistics.median(variant.cpu_times)
        blocks = statistics.median(variant.block_times)
        theirs = by_key.get(("tomesd 0.1.3", variant.setting)) if variant.method == "tome_sd (ours)" else None
        paired = {
            f"vs_tomesd_{key}": paired_ratios(variant, theirs, key)
            for key in ("times", "cpu_times", "block_times")
        } if theirs is not None else {}
        speedup = dense_time / median
        predicted = dense.flops / variant.flops if variant.flops else float("nan")
        error = ((variant.output - dense.output).norm() / dense.output.norm()).item()
        results.append({
            "method": variant.method,
            "setting": variant.setting,
            "median_s": median,
            "times_s": variant.times,
            "speedup": speedup,
            "cpu_median_s": cpu_median,
            "cpu_times_s": variant.cpu_times,
            "cpu_speedup": dense_cpu / cpu_median,
            "gflops": variant.flops / 1e9,
            "flop_speedup": predicted,
            "achieved_of_predicted": speedup / predicted,
            "cpu_achieved_of_predicted": dense_cpu / cpu_median / predicted,
            "relative_error": error,
            "finest_blocks_s": blocks,
            "finest_blocks_times_s": variant.block_times,
            "finest_blocks_speedup": dense_blocks / blocks if blocks else float("nan"),
            "rest_s": median - blocks,
            **paired,
        })
    return {"model": model_name, "size": size, "batch": batch, "results": results, "profiles": profiles}


def checks(run: dict) -> list[str]:
    """The pass/fail lines of one model's run: ours >= tomesd at every ratio (the median of the per-round
    ratios ours/tomesd <= 1) on wall time, CPU time and the time inside the finest-grid blocks, and every
    speed-up >= 0.85x the one its FLOP count predicts (wall and CPU)."""
    lines = []
    by_key = {(r["method"], r["setting"]): r for r in run["results"]}
    for clock, time_key, achieved_key, paired_key in (
        ("wall", "median_s", "achieved_of_predicted", "vs_tomesd_times"),
        ("CPU", "cpu_median_s", "cpu_achieved_of_predicted", "vs_tomesd_cpu_times"),
        ("blocks", "finest_blocks_s", None, "vs_tomesd_block_times"),
    ):
        for (method, setting), result in by_key.items():
            if method == "tome_sd (ours)" and ("tomesd 0.1.3", setting) in by_key:
                theirs = by_key[("tomesd 0.1.3", setting)]
                ratios = result[paired_key]
                paired = statistics.median(ratios)
                ok = paired <= 1
                lines.append(f"{'PASS' if ok else 'FAIL'} [{clock}] {setting}: ours/tomesd per round, median "
                             f"{paired:.3f} (ours faster in {sum(r < 1 for r in ratios)}/{len(ratios)} rounds; "
                             f"medians ours {result[time_key]:.3f} s, tomesd {theirs[time_key]:.3f} s)")
        if achieved_key is None:
            continue
        for result in run["results"]:
            if result["method"] == "dense":
                continue
            ok = result[achieved_key] >= 0.85
            lines.append(f"{'PASS' if ok else 'FAIL'} [{clock}] {result['method']} {result['setting']}: "
                         f"{result[achieved_key]:.2f} of the FLOP-predicted {result['flop_speedup']:.3f}x "
                         "(>= 0.85 wanted)")
    return lines


def format_run(run: dict) -> str:
    """The table of one model's run."""
    from hf_tokred.cli import format_table

    header = ["method", "setting", "s/step", "speed-up", "CPU s/step", "CPU speed-up", "GFLOP", "FLOP speed-up",
              "achieved/FLOP (wall, CPU)", "finest blocks s", "blocks speed-up", "rest s", "rel. error"]
    rows = [
        [r["method"], r["setting"], f"{r['median_s']:.3f}", f"{r['speedup']:.3f}x", f"{r['cpu_median_s']:.3f}",
         f"{r['cpu_speedup']:.3f}x", f"{r['gflops']:.1f}", f"{r['flop_speedup']:.3f}x",
         f"{r['achieved_of_predicted']:.2f}, {r['cpu_achieved_of_predicted']:.2f}", f"{r['finest_blocks_s']:.3f}",
         f"{r['finest_blocks_speedup']:.3f}x", f"{r['rest_s']:.3f}", f"{r['relative_error']:.4f}"]
        for r in run["results"]
    ]
    return format_table(header, rows, right=set(range(2, 13)))


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_command(subparsers) -> None:
    """Add ``hf-tokred diffusion`` to the CLI.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["diffusion", "--method", "todo", "--todo-factor", "4"]).todo_factor
        [4]
    """
    from hf_tokred.cli import _float_in, _positive_int

    parser = subparsers.add_parser(
        "diffusion", help="one denoising step (SD1.5 UNet, DiT-XL/2): dense vs ToMe for SD vs tomesd vs ToDo",
        description=COMMAND_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", action="append", choices=MODELS, metavar="M",
                        help="unet (SD 1.5, 64x64 latents) or dit (DiT-XL/2, 32x32 latents), repeatable (default: both)")
    parser.add_argument("--method", action="append", choices=METHODS, metavar="M",
                        help=f"variants besides dense, repeatable: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--ratio", action="append", type=_float_in(0, 0.75, " (sx = sy = 2)"), metavar="R",
                        help=f"tome_sd/tomesd ratio, repeatable (default: {' '.join(map(str, DEFAULT_RATIOS))})")
    parser.add_argument("--todo-factor", action="append", type=_positive_int, metavar="F",
                        help=f"todo downsample_factor, repeatable (default: {' '.join(map(str, DEFAULT_TODO_FACTORS))})")
    parser.add_argument("--repeats", type=_positive_int, default=3, metavar="N",
                        help="timed rounds, interleaved across variants (default: 3)")
    parser.add_argument("--batch", type=_positive_int, default=2, metavar="N",
                        help="batch size (default: 2, a classifier-free-guidance batch)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per variant")
    parser.add_argument("--json", metavar="OUT", help="also write every number to this file")
    parser.add_argument("--size", default="full", choices=SIZES, help=argparse.SUPPRESS)  # tiny: the test hook
    parser.set_defaults(handler=_cmd_diffusion)


def _cmd_diffusion(args) -> int:
    import hf_tokred  # noqa: F401  (registers the methods and the diffusers wiring)

    if args.threads:
        torch.set_num_threads(args.threads)
    models = list(dict.fromkeys(args.model or MODELS))
    methods = list(dict.fromkeys(args.method or METHODS))
    ratios = list(dict.fromkeys(args.ratio or DEFAULT_RATIOS))
    factors = list(dict.fromkeys(args.todo_factor or DEFAULT_TODO_FACTORS))
    report = {"threads": torch.get_num_threads(), "load_before": _load(), "torch": torch.__version__, "runs": []}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {report['load_before']}")
    for model_name in models:
        variants = build_variants(model_name, methods, ratios, factors)
        run = run_model(model_name, args.size, variants, args.repeats, args.batch, args.profile)
        report["runs"].append(run)
        title = "SD 1.5 UNet, 64x64 latents" if model_name == "unet" else "DiT-XL/2, 32x32 latents"
        if args.size != "full":
            title = f"tiny {model_name}"
        print(f"\n{title}, batch {args.batch}, median of {args.repeats} interleaved rounds")
        print(format_run(run))
        for line in checks(run):
            print("  " + line)
        for name, table in run["profiles"].items():
            print(f"\nprofile: {model_name} {name}\n{table}")
    report["load_after"] = _load()
    print(f"\nload average after: {report['load_after']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


__all__ = [
    "FinestBlockTimer",
    "Variant",
    "add_command",
    "build_dit",
    "build_unet",
    "build_variants",
    "checks",
    "count_flops",
    "format_run",
    "model_inputs",
    "paired_ratios",
    "profile_table",
    "run_model",
]
