"""The video part of the encoder benchmark: FLOPs and time of dense vs TokenLearner vs TESTA on video encoders.

:func:`run_video` builds ``VideoMAEModel`` and ``TimesformerModel`` with random weights from their base
configurations (ViT-B/16 blocks: 12 x 768, 224 px, 16 frames; VideoMAE's tubelet of 2 gives 8 x 196 = 1568 tokens,
TimeSformer has 1 + 16 x 196 = 3137), runs every variant on one random clip batch, and records the FLOPs of one
forward pass (``torch.utils.flop_counter``), the tokens after the last block, and the median wall time over
``repeats`` interleaved repetitions. The learned TokenLearner maps are untrained (fresh): FLOPs and time do not
depend on their values. :func:`format_video` renders the record as a markdown table.

Example:
    >>> from hf_tokred.bench.video import format_video, run_video
    >>> record = run_video(size="tiny", repeats=0)
    >>> sorted({row["model"] for row in record["rows"]})
    ['timesformer', 'videomae']
"""

from __future__ import annotations

import statistics
import time

import torch

# (model, label, method, params); the per-model settings of the docs (see docs/encoders.md, "Video").
VIDEO_VARIANTS = [
    ("videomae", "dense", None, {}),
    ("videomae", "tokenlearner 8/frame @6", "tokenlearner", {"num_tokens": 8, "layer": 6}),
    ("videomae", "tokenlearner 8/frame @6 + fuser", "tokenlearner", {"num_tokens": 8, "layer": 6, "fuse": True}),
    ("videomae", "testa t1 s16 @1,3,5,7,9", "testa", {"temporal_r": 1, "spatial_r": 16, "layers": [1, 3, 5, 7, 9]}),
    ("timesformer", "dense", None, {}),
    ("timesformer", "tokenlearner 14/frame @6", "tokenlearner", {"num_tokens": 14, "layer": 6}),
]

SIZES = {
    # ViT-B/16 blocks at 224 px, 16 frames (the checkpoints' configurations)
    "base": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, num_frames=16),
    # for tests: 4 x 4 patches, 4 frames
    "tiny": dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                 intermediate_size=64, num_frames=4),
}


def video_model(name: str, size: str = "base"):
    """A seeded random ``VideoMAEModel`` / ``TimesformerModel`` of ``size`` (``"base"`` or ``"tiny"``), SDPA, eval.

    Example:
        >>> video_model("videomae", "tiny").config.num_frames
        4
    """
    from transformers import TimesformerConfig, TimesformerModel, VideoMAEConfig, VideoMAEModel

    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    torch.manual_seed(0)
    if name == "videomae":
        config = VideoMAEConfig(**SIZES[size], tubelet_size=2)
        config._attn_implementation = "sdpa"
        return VideoMAEModel(config).eval()
    if name == "timesformer":
        kwargs = dict(SIZES[size])
        if size == "tiny":
            kwargs["num_frames"] = 4
        return TimesformerModel(TimesformerConfig(**kwargs)).eval()
    raise ValueError(f"model: expected 'videomae' or 'timesformer', got {name!r}")


def _forward(model, pixels):
    with torch.inference_mode():
        return model(pixel_values=pixels).last_hidden_state


def run_video(models: tuple[str, ...] = ("videomae", "timesformer"), *, size: str = "base", batch: int = 1,
              repeats: int = 3, variants: list | None = None, log=None) -> dict:
    """FLOPs, output tokens and median wall time of every variant; returns the record (see :func:`format_video`).

    ``variants`` are ``(model, label, method, params)`` (default :data:`VIDEO_VARIANTS`); ``repeats=0`` skips the
    timing (FLOPs only). Per-block ``layers`` lists beyond the model's depth are cut, and TimeSformer's
    ``num_tokens`` is rounded to whole patch rows at sizes whose row width does not divide it.

    Example:
        >>> record = run_video(("videomae",), size="tiny", repeats=0)
        >>> record["rows"][0]["name"], record["rows"][0]["flops_saved"]
        ('dense', 0.0)
    """
    from torch.utils.flop_counter import FlopCounterMode

    import hf_tokred

    log = log or (lambda message: None)
    rows = []
    for name in models:
        model = video_model(name, size)
        config = model.config
        pixels = torch.randn(batch, config.num_frames, 3, config.image_size, config.image_size,
                             generator=torch.Generator().manual_seed(0))
        chosen = [v for v in (variants or VIDEO_VARIANTS) if v[0] == name]
        runs = []
        for _, label, method, params in chosen:
            depth = config.num_hidden_layers
            params = {k: ([i for i in v if i < depth] if isinstance(v, list) else v) for k, v in params.items()}
            if "layer" in params:
                params["layer"] = min(params["layer"], depth - 1)
            width = config.image_size // config.patch_size
            if name == "timesformer" and params.get("num_tokens", 0) % width:  # whole rows (smaller test sizes)
                params["num_tokens"] = width * max(1, round(params["num_tokens"] / width))
            candidate = video_model(name, size) if method else model
            if method:
                hf_tokred.apply(candidate, {"method": method, **params})
            with FlopCounterMode(display=False) as counter:
                out = _forward(candidate, pixels)
            runs.append((label, method, params, candidate, counter.get_total_flops(), out.shape[1]))
            log(f"{name} {label}: {counter.get_total_flops() / 1e9:.1f} GFLOPs, {out.shape[1]} tokens out")
        times: dict[str, list[float]] = {label: [] for label, *_ in runs}
        for _ in range(repeats):
            for label, _, _, candidate, _, _ in runs:
                start = time.perf_counter()
                _forward(candidate, pixels)
                times[label].append(time.perf_counter() - start)
        dense_flops = runs[0][4]
        dense_time = statistics.median(times[runs[0][0]]) if repeats else None
        for label, method, params, _, flops, tokens in runs:
            seconds = statistics.median(times[label]) if repeats else None
            rows.append({"model": name, "name": label, "method": method or "-", "params": params, "flops": flops,
                         "flops_saved": round(1 - flops / dense_flops, 4), "tokens_out": tokens, "seconds": seconds,
                         "speedup": (dense_time / seconds) if seconds else None,
                         "flop_speedup": dense_flops / flops})
    return {"size": size, "batch": batch, "repeats": repeats, "frames": SIZES[size]["num_frames"], "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def format_video(record: dict) -> str:
    """The record of :func:`run_video` as a markdown table.

    Example:
        >>> print(format_video(run_video(("videomae",), size="tiny", repeats=0)).splitlines()[0])
        | model | variant | GFLOPs | FLOPs saved | tokens out | time (s) | speed-up | FLOP-predicted |
    """
    lines = ["| model | variant | GFLOPs | FLOPs saved | tokens out | time (s) | speed-up | FLOP-predicted |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in record["rows"]:
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.3f}"
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        lines.append(f"| {row['model']} | {row['name']} | {row['flops'] / 1e9:.1f} | {100 * row['flops_saved']:.1f} % | "
                     f"{row['tokens_out']} | {seconds} | {speedup} | {row['flop_speedup']:.2f}x |")
    return "\n".join(lines)


__all__ = ["VIDEO_VARIANTS", "format_video", "run_video", "video_model"]
