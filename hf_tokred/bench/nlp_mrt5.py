"""mrt5: a byte-level T5 with MrT5's delete gate against the same T5 without it, trained from scratch at equal steps.

There are no pretrained ByT5 weights here, so two ByT5-shaped T5ForConditionalGeneration models (6 encoder and
2 decoder blocks, d_model 128, 384 byte ids; hf_tokred.recipes.mrt5.byte_t5) are trained from the same seed on
the same batches: span corruption (15 % of the bytes in spans of 20 bytes on average) of random 256-byte windows
of the Python documentation shipped with the standard library (training split). One trains with the delete gate
after encoder layer --gate-layer (soft deletion; a PI controller steers the deletion rate to --target-deletion
once the first third of the steps is over), the other without (the baseline).

Measured on the held-out split (fixed 256-byte windows, fixed corruption): the span-corruption loss of both
(MrT5 in eval mode, deleting for real), the deletion rate (fraction of the inputs' bytes removed), the loss
ratio (target <= 1.10), and the MrT5 encoder's FLOPs (torch FlopCounterMode) and time (median of --repeats
after a warm-up) on one held-out batch with and without deletion (the same model at threshold = gate_scale,
which deletes nothing). Times are wall-clock on this machine's CPU threads.

examples:
  hf-tokred nlp-bench mrt5                        ~12 min on 2 quiet CPU cores (2 x 300 steps)
  hf-tokred nlp-bench mrt5 --steps 1000 --target-deletion 0.6
"""

from __future__ import annotations

import statistics
import time

import torch

from ..recipes.mrt5 import DEFAULT_GATE_LAYER, DEFAULT_SIZES, evaluate_span_loss, heldout_batches, train_mrt5

LOSS_TARGET = 1.10


def add_bench_arguments(parser) -> None:
    """The settings of ``hf-tokred nlp-bench mrt5``.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["nlp-bench", "mrt5"]).steps
        300
    """
    from ..cli import _float_in, _positive_int

    parser.add_argument("--steps", type=_positive_int, default=300, help="training steps of each model (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs (default: 0)")
    parser.add_argument("--target-deletion", type=_float_in(0.0, 0.95), default=0.5,
                        help="deletion rate the gate is trained for (default: 0.5)")
    parser.add_argument("--gate-layer", type=_positive_int, default=DEFAULT_GATE_LAYER,
                        help=f"encoder blocks before the gate (default: {DEFAULT_GATE_LAYER} of 6)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="training batch (default: 8)")
    parser.add_argument("--length", type=_positive_int, default=256, help="bytes per window (default: 256)")
    parser.add_argument("--size", choices=("default", "tiny"), default="default",
                        help="model size: default (d_model 128, 6+2 blocks) or tiny (d_model 32, 3+1 blocks, for "
                             "smoke tests)")
    parser.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats of the encoder (default: 5)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


TINY = {"d_model": 32, "d_ff": 64, "num_heads": 4, "num_layers": 3, "num_decoder_layers": 1}


def _encoder_cost(model, batch: dict, repeats: int) -> tuple[float, float]:
    """``(FLOPs, median seconds)`` of one encoder pass over ``batch`` (eval mode, no gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = model.get_encoder()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            encoder(**inputs)
        encoder(**inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            encoder(**inputs)
            times.append(time.perf_counter() - start)
    return float(counter.get_total_flops()), statistics.median(times)


def run_bench(args) -> dict:
    """Train both models, evaluate the held-out split, measure the encoder; every number in a dict.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> run_bench(build_parser().parse_args(["nlp-bench", "mrt5", "--steps", "4", "--size", "tiny"]))["steps"]  # doctest: +SKIP
        4
    """
    from ..integration.wiring import get_applied
    from ..training import stdlib_corpus

    sizes = dict(TINY if args.size == "tiny" else DEFAULT_SIZES)
    common = dict(steps=args.steps, seed=args.seed, batch_size=args.batch_size, length=args.length, sizes=sizes,
                  progress=not args.no_progress)
    texts = stdlib_corpus("train")
    started = time.perf_counter()
    mrt5 = train_mrt5(texts, delete=True, gate_layer=args.gate_layer, target_deletion=args.target_deletion, **common)
    mrt5_seconds = time.perf_counter() - started
    started = time.perf_counter()
    dense = train_mrt5(texts, delete=False, **common)
    dense_seconds = time.perf_counter() - started

    batches = heldout_batches(stdlib_corpus("heldout"), batch_size=8, length=args.length)
    reduced = evaluate_span_loss(mrt5, batches)
    baseline = evaluate_span_loss(dense, batches)

    config = get_applied(mrt5).config
    flops_deleting, seconds_deleting = _encoder_cost(mrt5, batches[0], args.repeats)
    threshold = config.threshold
    config.threshold = config.gate_scale  # the same model deleting nothing (the hooks stay; the gate does not run)
    try:
        flops_full, seconds_full = _encoder_cost(mrt5, batches[0], args.repeats)
    finally:
        config.threshold = threshold
    batch_mask = batches[0]["attention_mask"]
    encoded = mrt5.get_encoder()(input_ids=batches[0]["input_ids"], attention_mask=batch_mask)
    log = mrt5.train_log
    tail = log["deletion"][-20:]
    ratio = reduced["loss"] / baseline["loss"]
    return {
        "method": "mrt5", "steps": args.steps, "seed": args.seed, "batch_size": args.batch_size,
        "length_bytes": args.length, "sizes": sizes, "gate_layer": args.gate_layer,
        "target_deletion": args.target_deletion, "train_seconds": {"mrt5": mrt5_seconds, "baseline": dense_seconds},
        "heldout_windows": sum(int(b["input_ids"].shape[0]) for b in batches),
        "loss": {"mrt5": reduced["loss"], "baseline": baseline["loss"]},
        "loss_ratio": ratio, "loss_target": LOSS_TARGET, "loss_target_met": ratio <= LOSS_TARGET,
        "deletion_rate": reduced["deletion_rate"], "train_deletion_rate_last20": sum(tail) / max(len(tail), 1),
        "input_bytes": reduced["input_tokens"], "kept_bytes": reduced["kept_tokens"],
        "timed_batch": {"windows": int(batch_mask.shape[0]), "bytes": int(batch_mask.sum()),
                        "kept": int(encoded.attention_mask.sum())},
        "encoder_flops": {"deleting": flops_deleting, "full": flops_full,
                          "saved": 1.0 - flops_deleting / max(flops_full, 1.0)},
        "encoder_seconds": {"deleting": seconds_deleting, "full": seconds_full,
                            "saved": 1.0 - seconds_deleting / max(seconds_full, 1e-12)},
        "repeats": args.repeats,
    }


def format_bench(result) -> str:
    """The printed report: a table of the two models and the encoder cost, then the target's verdict.

    Example:
        >>> print(format_bench(result))                                     # doctest: +SKIP
    """
    from ..cli import format_table

    loss, flops, secs = result["loss"], result["encoder_flops"], result["encoder_seconds"]
    rows = [
        ["held-out span-corruption loss (nats/byte)", f"{loss['baseline']:.4f}", f"{loss['mrt5']:.4f}"],
        ["deletion rate (held-out bytes removed)", "0", f"{result['deletion_rate']:.3f}"],
        ["encoder GFLOPs, one held-out batch", f"{flops['full'] / 1e9:.2f}", f"{flops['deleting'] / 1e9:.2f}"],
        ["encoder time, one held-out batch (ms, median)", f"{secs['full'] * 1e3:.1f}", f"{secs['deleting'] * 1e3:.1f}"],
        ["training time (s)", f"{result['train_seconds']['baseline']:.0f}", f"{result['train_seconds']['mrt5']:.0f}"],
    ]
    sizes = result["sizes"]
    verdict = "met" if result["loss_target_met"] else "MISSED"
    return "\n".join([
        f"mrt5: byte-level T5 (d_model {sizes['d_model']}, {sizes['num_layers']}+{sizes['num_decoder_layers']} blocks) "
        f"trained from scratch, {result['steps']} steps x {result['batch_size']} windows of {result['length_bytes']} "
        f"bytes, seed {result['seed']}; gate after encoder layer {result['gate_layer']}, trained for "
        f"{result['target_deletion']:.2f} deletion",
        format_table(["held-out (" + str(result["heldout_windows"]) + " windows)", "baseline", "mrt5"], rows,
                     right={1, 2}),
        f"loss ratio mrt5/baseline: {result['loss_ratio']:.3f} (target <= {result['loss_target']:.2f}: {verdict}) at "
        f"{result['deletion_rate']:.1%} deletion; encoder FLOPs saved {flops['saved']:.1%}, time saved "
        f"{secs['saved']:.1%} (the same MrT5 model with deletion off as reference)",
    ])
