"""token_pooling: bits per byte of a byte-level hourglass against unpooled decoders of equal compute and equal depth.

There are no pretrained byte-level or hourglass weights here, so three byte-level LlamaForCausalLM decoders are
trained from scratch with the same steps, seed, batches and learning-rate schedule on the Python documentation shipped
with the standard library (``stdlib_corpus("train")``), and evaluated on its held-out split (``"heldout"``):

- ``hourglass``: --layers layers, 2 at full resolution, the middle ones on segments that end at whitespace bytes
  (--boundaries whitespace, the paper's best) or where a learned boundary predictor says (--boundaries learned, with
  the Binomial prior at rate 0.2), then 2 at full resolution (Dynamic Token Pooling, arXiv 2211.09761);
- ``vanilla, equal compute``: an unpooled decoder whose layer count gives the forward FLOPs per byte closest to the
  hourglass's (measured with torch's FlopCounterMode on training windows, the hourglass at its shortening there);
- ``vanilla, equal depth``: an unpooled decoder with the hourglass's layer count (more compute).

Reported: held-out bits per byte, the measured shorten factor (real bytes per segment of the middle layers), forward
GFLOPs per training batch (FlopCounterMode) and the forward time of a training batch (median of repeats after warm-up,
no gradients), with the speed-up of the hourglass over the equal-depth decoder. Times come from a CPU that may be
shared; FLOPs do not depend on it.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..recipes import mean_ends

DEFAULTS = {"steps": 200, "layers": 8, "hidden_size": 128, "seq_len": 128, "batch_size": 8, "eval_windows": 96}


def add_bench_arguments(parser) -> None:
    """The bench's settings (the dispatcher adds ``--json``).

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); add_bench_arguments(p)
        >>> p.parse_args([]).steps
        200
    """
    from ..cli import _positive_int

    parser.add_argument("--steps", type=_positive_int, default=DEFAULTS["steps"],
                        help=f"training steps of every model (default: {DEFAULTS['steps']})")
    parser.add_argument("--boundaries", choices=("whitespace", "learned"), default="whitespace",
                        help="segment ends of the hourglass (default: whitespace)")
    parser.add_argument("--layers", type=_positive_int, default=DEFAULTS["layers"],
                        help=f"hourglass depth: 2 full, layers-4 pooled, 2 full (default: {DEFAULTS['layers']})")
    parser.add_argument("--hidden-size", type=_positive_int, default=DEFAULTS["hidden_size"],
                        help=f"hidden size of every model (default: {DEFAULTS['hidden_size']})")
    parser.add_argument("--seq-len", type=_positive_int, default=DEFAULTS["seq_len"],
                        help=f"bytes per training and evaluation window (default: {DEFAULTS['seq_len']})")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"],
                        help=f"windows per step (default: {DEFAULTS['batch_size']})")
    parser.add_argument("--eval-windows", type=_positive_int, default=DEFAULTS["eval_windows"],
                        help=f"held-out windows evaluated (default: {DEFAULTS['eval_windows']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model and of the batches (default: 0)")


def _forward_flops(model, ids: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    return float(counter.get_total_flops())


def _forward_seconds(model, ids: torch.Tensor, repeats: int = 5) -> float:
    times = []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer_count_for(flops: float, hidden_size: int, seq_len: int, ids: torch.Tensor, heads: int) -> tuple[int, dict]:
    """The unpooled layer count whose forward FLOPs on ``ids`` are closest to ``flops`` (FLOPs are affine in depth)."""
    from transformers import LlamaForCausalLM

    from ..recipes.token_pooling import byte_lm_config

    measured = {}
    for layers in (1, 2):
        model = LlamaForCausalLM(byte_lm_config(layers, hidden_size, heads, max_length=max(1024, 2 * seq_len))).eval()
        measured[layers] = _forward_flops(model, ids)
    per_layer = measured[2] - measured[1]
    base = measured[1] - per_layer
    layers = max(1, round((flops - base) / per_layer))
    return layers, {"per_layer_gflops": per_layer / 1e9, "embedding_and_head_gflops": base / 1e9}


def run_bench(args) -> dict:
    """Train the three models and measure them; returns every number (JSON-serialisable).

    Example:
        >>> from hf_tokred.cli import main
        >>> main(["nlp-bench", "token_pooling", "--steps", "200"])      # doctest: +SKIP
        0
    """
    from ..cli import _log
    from ..methods.nlp.token_pooling import BYTE_BOS_ID
    from ..recipes.token_pooling import bits_per_byte, byte_stream, default_reduction, train_token_pooling
    from ..training import stdlib_corpus

    heads = 4
    train_texts, heldout = stdlib_corpus("train"), stdlib_corpus("heldout")
    settings = {"hidden_size": args.hidden_size, "heads": heads, "seq_len": args.seq_len,
                "batch_size": args.batch_size, "steps": args.steps, "seed": args.seed, "progress": False}
    reduction = default_reduction(args.boundaries)
    reduction.pooled_layers(args.layers)
    stream = byte_stream(train_texts)
    g = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, stream.numel() - args.seq_len, (args.batch_size,), generator=g)
    probe = torch.cat([torch.full((args.batch_size, 1), BYTE_BOS_ID),
                       stream[starts[:, None] + torch.arange(args.seq_len)[None, :]]], dim=1)

    results, models = {}, {}
    _log(f"token_pooling bench: hourglass ({args.boundaries}), {args.layers} layers, {args.steps} steps")
    start = time.perf_counter()
    models["hourglass"] = train_token_pooling(train_texts, reduction=reduction, layers=args.layers, **settings)
    results["hourglass"] = {"layers": args.layers, "train_seconds": time.perf_counter() - start}
    hourglass_flops = _forward_flops(models["hourglass"], probe)
    from ..integration.hourglass import last_pooling

    shorten = last_pooling(models["hourglass"]).shorten_factor
    equal_layers, flop_model = _layer_count_for(hourglass_flops, args.hidden_size, args.seq_len, probe, heads)
    plan = [("vanilla, equal compute", equal_layers), ("vanilla, equal depth", args.layers)]
    for name, layers in plan:
        if any(r["layers"] == layers and n != "hourglass" for n, r in results.items()):
            continue  # the same model (equal compute may need the full depth)
        _log(f"token_pooling bench: {name}: {layers} layers, {args.steps} steps")
        start = time.perf_counter()
        models[name] = train_token_pooling(train_texts, reduction=None, layers=layers, **settings)
        results[name] = {"layers": layers, "train_seconds": time.perf_counter() - start}
    for name, model in models.items():
        _log(f"token_pooling bench: evaluating {name}")
        row = results[name]
        row["heldout_bpb"] = bits_per_byte(model, heldout, seq_len=args.seq_len, batch_size=args.batch_size,
                                           max_windows=args.eval_windows)
        row["final_train_loss"] = mean_ends(model.train_state["lm_losses"])[1]
        row["forward_gflops"] = _forward_flops(model, probe) / 1e9
        row["forward_seconds"] = _forward_seconds(model, probe)
    depth = results["vanilla, equal depth"] if "vanilla, equal depth" in results else results["vanilla, equal compute"]
    hourglass = results["hourglass"]
    hourglass["shorten_factor"] = shorten
    summary = {
        "speedup_vs_equal_depth": depth["forward_seconds"] / hourglass["forward_seconds"],
        "flops_ratio_vs_equal_depth": hourglass["forward_gflops"] / depth["forward_gflops"],
        "bpb_delta_vs_equal_compute": hourglass["heldout_bpb"] - results.get(
            "vanilla, equal compute", depth)["heldout_bpb"],
        "bpb_delta_vs_equal_depth": hourglass["heldout_bpb"] - depth["heldout_bpb"],
    }
    return {"method": "token_pooling", "boundaries": args.boundaries, "reduction": reduction.to_dict(),
            "models": results, "summary": summary, "flop_model": flop_model,
            "budget": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "hidden_size": args.hidden_size, "seed": args.seed, "eval_windows": args.eval_windows,
                       "train_seconds": sum(r["train_seconds"] for r in results.values()),
                       "train_bytes_per_model": args.steps * args.batch_size * args.seq_len}}


def format_bench(result: dict) -> str:
    """The printed report: one row per model, then the comparison.

    Example:
        >>> print(format_bench(result))                                   # doctest: +SKIP
    """
    from ..cli import format_table

    rows = []
    for name, r in result["models"].items():
        rows.append([name, str(r["layers"]), f"{r.get('shorten_factor', 1.0):.2f}", f"{r['heldout_bpb']:.4f}",
                     f"{r['final_train_loss']:.4f}", f"{r['forward_gflops']:.2f}", f"{r['forward_seconds'] * 1000:.1f}",
                     f"{r['train_seconds']:.0f}"])
    table = format_table(["model", "layers", "shorten", "held-out bpb", "train loss (nats)", "fwd GFLOPs",
                          "fwd ms", "train s"], rows, right={1, 2, 3, 4, 5, 6, 7})
    s, b = result["summary"], result["budget"]
    verdict = ("better" if s["bpb_delta_vs_equal_compute"] < -0.01 else
               "worse" if s["bpb_delta_vs_equal_compute"] > 0.01 else "equal (within 0.01)")
    return (f"token_pooling ({result['boundaries']} boundaries): byte-level Llama decoders trained from scratch, "
            f"{b['steps']} steps x {b['batch_size']} x {b['seq_len']} bytes each (seed {b['seed']}), held-out split "
            f"({b['eval_windows']} windows)\n{table}\n"
            f"hourglass vs vanilla of equal compute: {s['bpb_delta_vs_equal_compute']:+.4f} bits/byte ({verdict})\n"
            f"hourglass vs vanilla of equal depth: {s['bpb_delta_vs_equal_depth']:+.4f} bits/byte, "
            f"{s['flops_ratio_vs_equal_depth']:.2f}x the FLOPs, forward speed-up {s['speedup_vs_equal_depth']:.2f}x\n"
            "(forward: one training batch, no gradients, median of 5 after warm-up, on a possibly shared CPU)")
