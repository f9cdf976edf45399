"""``hf-tokred learned-lm dcp``: held-out perplexity with half the context dropped, and decode throughput at 2k context.

Model: the embedded SmolLM2-135M-Instruct (fp32, CPU) with the DCP gates ``hf-tokred train dcp`` saved
(``--weights``, default ``~/.cache/hf_tokred/smollm2-dcp``). Data: held-out text (:func:`hf_tokred.recipes.lm_data.
lm_texts` ``("heldout")``, cut into windows of ``--context`` + 128 tokens). Each window's first ``--context`` tokens
are prefilled into the cache (and compressed), then the rest is fed teacher-forced in chunks of 32 tokens through
the same cache (:func:`hf_tokred.bench.kv.run_perplexity`); the perplexity is that of the continuation. Rows: the
dense cache, DCP at ``--sparsity`` and training-free TOVA and H2O at the same budget (``keep = 1 - sparsity``).
Then decode throughput at 2,048 context tokens (:func:`hf_tokred.bench.kv.run_speed`; timings on a shared machine
are indicative). The training budget recorded with the weights is printed with the figures.

Example:
    >>> from hf_tokred.cli import build_parser
    >>> build_parser().parse_args(["learned-lm", "dcp", "--samples", "4"]).samples
    4
"""

from __future__ import annotations

import json
import os

CONTINUATION = 128
SPEED_CONTEXT = 2048
BASELINES = ("tova", "h2o")
TARGET = 0.05  # DCP's perplexity within +5% of dense


def default_weights() -> str:
    from ..embedded import cache_dir
    from ..recipes.dcp import DEFAULT_OUTPUT

    return os.path.join(cache_dir(), DEFAULT_OUTPUT)


def run_dcp_bench(weights: str, *, samples: int = 8, context: int = 1024, sparsity: float = 0.5, speed: bool = True,
                  progress: bool = True) -> dict:
    """Perplexity rows (dense, dcp, the baselines) and speed rows; see the module docstring."""
    from tqdm.auto import tqdm

    import hf_tokred

    from ..embedded import load_smollm2
    from ..recipes.dcp import STATE_FILE, training_budget
    from ..recipes.lm_data import lm_texts, token_windows
    from .kv import run_perplexity, run_speed

    model, tokenizer = load_smollm2()
    dcp = hf_tokred.TokenReductionConfig(method="dcp", sparsity=sparsity)
    hf_tokred.apply(model, dcp, weights_from=weights)
    budget = None
    state_file = os.path.join(weights, STATE_FILE)
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as fh:
            budget = training_budget(json.load(fh))
    sequences = token_windows(tokenizer, lm_texts("heldout"), context + CONTINUATION, count=samples, seed=0)
    sequences = [row[None] for row in sequences]
    configs = [("dense", None), ("dcp", dcp)] + [
        (name, hf_tokred.TokenReductionConfig(method=name, keep=1.0 - sparsity)) for name in BASELINES]
    bar = tqdm(total=samples * len(configs), desc="perplexity", disable=not progress)
    rows = []
    # The DCP gates stay attached throughout: a dense run uses a plain DynamicCache, a baseline its own cache.
    for name, cfg in configs:
        result = run_perplexity(model, sequences, context_tokens=context, config=cfg, bar=bar)
        rows.append({"method": name, "config": result["config"], "ppl": result["ppl"], "kv_tokens": result["kv_tokens"],
                     "kv_bytes": result["kv_bytes"]})
    bar.close()
    dense = rows[0]["ppl"]
    for row in rows:
        row["vs_dense"] = row["ppl"] / dense - 1.0
    record = {"weights": weights, "training": budget, "samples": samples, "context_tokens": context,
              "continuation_tokens": CONTINUATION, "sparsity": sparsity, "perplexity": rows,
              "target_met": rows[1]["vs_dense"] <= TARGET}
    if speed:
        record["speed"] = run_speed(model, tokenizer, [dcp, configs[2][1]], context_length=SPEED_CONTEXT,
                                    decode_tokens=32, repeats=1)
    return record


def format_record(record: dict) -> str:
    from ..cli import _format_bytes, format_table

    body = [[r["method"], "-" if r["config"] is None else f"{1 - record['sparsity']:.2f}", f"{r['kv_tokens']:.0f}",
             _format_bytes(r["kv_bytes"]), f"{r['ppl']:.3f}", f"{100 * r['vs_dense']:+.2f}%"] for r in record["perplexity"]]
    text = (f"Held-out perplexity of {record['continuation_tokens']} continuation tokens after {record['context_tokens']} "
            f"context tokens ({record['samples']} windows of lm_texts('heldout')), {100 * record['sparsity']:.0f}% of the "
            "context dropped:\n"
            + format_table(["cache", "keep", "KV tokens", "KV cache", "perplexity", "vs dense"], body, right={1, 2, 3, 4, 5}))
    dcp = record["perplexity"][1]
    text += (f"\nTarget (dcp within +{100 * TARGET:.0f}% of dense): {'met' if record['target_met'] else 'missed'} "
             f"({100 * dcp['vs_dense']:+.2f}%)")
    if record.get("speed"):
        from .kv import format_speed

        text += "\n\n" + format_speed(record["speed"])
    text += f"\n\nTraining budget: {record['training'] or 'not recorded with the weights'}"
    return text


def add_command(subparsers) -> None:
    """Add ``hf-tokred learned-lm dcp``."""
    from ..cli import _float_in, _positive_int

    parser = subparsers.add_parser("dcp", help="DCP: perplexity with half the context dropped, decode speed at 2k",
                                   description=__doc__.split("\n\nExample:")[0])
    parser.add_argument("--weights", metavar="DIR", default=None,
                        help="folder saved by `hf-tokred train dcp` (default: ~/.cache/hf_tokred/smollm2-dcp)")
    parser.add_argument("--samples", type=_positive_int, default=8, help="held-out windows (default: 8)")
    parser.add_argument("--sparsity", type=_float_in(0.0, 0.95), default=0.5,
                        help="fraction of the context dropped (default: 0.5)")
    parser.add_argument("--no-speed", action="store_true", help="skip the decode-throughput runs at 2k context")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=_cmd)


def _cmd(args) -> int:
    weights = args.weights or default_weights()
    if not os.path.isdir(weights):
        print(f"error: {weights} is not a folder; train the gates first: hf-tokred train dcp")
        return 2
    record = run_dcp_bench(weights, samples=args.samples, sparsity=args.sparsity, speed=not args.no_speed,
                           progress=not args.no_progress)
    print(format_record(record))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1, default=str)
    return 0
