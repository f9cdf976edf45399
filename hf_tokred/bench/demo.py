"""``hf-tokred demo``: the first run a new user sees, on the embedded SmolLM2-135M-Instruct.

Two measurements of the same reductions against the dense cache:

1. **Accuracy and memory**: passkey retrieval (:mod:`hf_tokred.bench.passkey`, ~1k tokens, 20 samples
   of seed 0): accuracy, the KV cache's bytes after the answer, and the prefill / decode time.
2. **Decode speed at a long context**: one prompt of ``--speed-context`` tokens of documentation text
   (:func:`hf_tokred.bench.kv.run_speed`), decode ms/token for dense and each reduction.

From the two context lengths the demo states where each reduction starts to decode faster than the
dense cache: the decode time per token grows about linearly with the tokens attended, so a line
through the two measurements of each run gives the crossing length (an estimate, said to be one).

The default runs are what the KV benchmarks recommend at half the cache (``docs/kv.md``): TOVA at
keep 0.5 (the best policy there, as accurate as dense on this task), and TOVA composed with 2-bit
KIVI storage (a quarter of that again). ``--config`` / ``--method`` run one reduction of the user's
choice instead (StreamingLLM: ``--method streamingllm --param max_tokens=512``).

Example:
    >>> from hf_tokred.bench.demo import crossing_length
    >>> crossing_length((1000, 40.0), (4000, 130.0), (1000, 50.0), (4000, 80.0))   # dense vs reduced, ms/token
    1500
"""

from __future__ import annotations

import argparse
import json
import os
import time

DEFAULT_RUNS = (
    "HuggingFaceTB/SmolLM2-135M-Instruct/tova-50",
    "HuggingFaceTB/SmolLM2-135M-Instruct/tova-50-kivi2",
)
DEFAULT_SAMPLES = 20
DEFAULT_SPEED_CONTEXT = 4096
SPEED_DECODE_TOKENS = 16
SPEED_REPEATS = 2  # interleaved (dense, each run, dense, ...), medians: one run each is at the mercy of load

DESCRIPTION = f"""\
Passkey retrieval on the embedded SmolLM2-135M-Instruct: a 5-digit key hidden at a random depth in
~1,000 tokens of filler text; the model must repeat it. Each sample runs with the full (dense) KV cache
and with each reduction; a table compares accuracy, KV-cache size and time. Then one long prompt
(--speed-context tokens) measures decode speed, and the demo says from which context length each
reduction decodes faster than the dense cache.

Default reductions (presets; see hf-tokred presets): {', '.join(r.rsplit('/', 1)[-1] for r in DEFAULT_RUNS)}
(TOVA keeping half the cache, and the same composed with 2-bit KIVI storage).

The first run converts the model once to a cache folder (about 20 s, ~520 MB in ~/.cache/hf_tokred;
set HF_TOKRED_CACHE to move it).

examples:
  hf-tokred demo                                      the default comparison (about 3-4 minutes on 2 cores)
  hf-tokred demo --samples 5 --speed-context 0        a quick accuracy-only run
  hf-tokred demo --method streamingllm --param max_tokens=512
  hf-tokred demo --config HuggingFaceTB/SmolLM2-135M-Instruct/snapkv-50 --json out.json
"""


def crossing_length(dense_short, dense_long, reduced_short, reduced_long) -> int | None:
    """Context length where the reduced cache's decode time per token meets the dense one's.

    Each argument is ``(context tokens, ms per token)``; a straight line through each run's two points
    is intersected. Returns None when the lines do not cross at a positive length ahead (parallel, or the
    reduction is slower and grows at least as fast).

    Example:
        >>> crossing_length((1000, 40.0), (4000, 130.0), (1000, 50.0), (4000, 80.0))
        1500
        >>> crossing_length((1000, 40.0), (4000, 130.0), (1000, 50.0), (4000, 150.0)) is None
        True
    """
    (x1, d1), (x2, d2) = dense_short, dense_long
    (u1, r1), (u2, r2) = reduced_short, reduced_long
    if x2 == x1 or u2 == u1:
        return None
    dense_slope, reduced_slope = (d2 - d1) / (x2 - x1), (r2 - r1) / (u2 - u1)
    if dense_slope <= reduced_slope:
        return None
    # d1 + dense_slope * (x - x1) == r1 + reduced_slope * (x - u1)
    x = (r1 - d1 + dense_slope * x1 - reduced_slope * u1) / (dense_slope - reduced_slope)
    return max(int(round(x)), 1)


def _ms_per_token(result: dict) -> float:
    tokens = result.get("decode_tokens") or 0
    return 1000.0 * result["decode_s"] / tokens if tokens else float("nan")


def demo_configs(args, parser) -> list[tuple[str, object, str]]:
    """``(label, config, source)`` of every reduction the demo compares, validated before any model loads."""
    from hf_tokred import TokenReductionConfig, list_presets
    from hf_tokred.errors import ConfigError

    if args.param and not args.method:
        parser.error("--param needs --method (a preset or file given with --config sets its own parameters)")
    if args.method:
        params = {}
        for key, value in args.param:
            if key in params:
                parser.error(f"--param {key} given twice")
            params[key] = value
        if "method" in params:
            parser.error("--param method=... is not a parameter; use --method")
        cfg = TokenReductionConfig(method=args.method, **params)
        runs = [(cfg.method, cfg, f"--method {args.method}")]
    else:
        presets = set(list_presets())
        runs = []
        for source in [args.config] if args.config else DEFAULT_RUNS:
            cfg = TokenReductionConfig.from_pretrained(source)
            runs.append((source.rsplit("/", 1)[-1] if source in presets else cfg.method, cfg, source))
    for _, cfg, _ in runs:
        if cfg.get("kv_policy") is None and cfg.get("kv_storage") is None:
            raise ConfigError(
                f"demo: the passkey demo compares KV caches, and {cfg.method!r} acts at stage {cfg.stage!r}; "
                "choose a method of stage 'kv_policy' or 'kv_storage' (see: hf-tokred methods)",
                field="method",
            )
    return runs


def run_demo(model, tokenizer, runs, *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
             speed_context: int = DEFAULT_SPEED_CONTEXT, progress: bool = True) -> dict:
    """Passkey accuracy for dense and every run, then (``speed_context > 0``) decode speed at that length.

    ``runs`` is a list of ``(label, config)``. Returns a JSON-ready record: ``passkey`` (dense and one
    result per label, as :func:`hf_tokred.bench.passkey.run_passkey` returns), ``speed`` (rows of
    :func:`hf_tokred.bench.kv.run_speed`, dense first), ``faster_from`` (label -> estimated context
    length from which the run decodes faster than dense, None when it does not within the measured trend) and
    ``context_window`` (the model's ``max_position_embeddings``, or None).

    Example:
        >>> from hf_tokred.embedded import load_smollm2
        >>> model, tokenizer = load_smollm2()                                                 # doctest: +SKIP
        >>> record = run_demo(model, tokenizer, [("tova", {"method": "tova", "keep": 0.5})], samples=2)  # doctest: +SKIP
        >>> record["passkey"]["tova"]["accuracy"]                                             # doctest: +SKIP
        1.0
    """
    from .kv import run_speed
    from .passkey import make_passkey_samples, run_passkey

    passkey_samples = make_passkey_samples(samples, seed=seed)
    passkey = {"dense": run_passkey(model, tokenizer, passkey_samples, progress=progress, desc="dense")}
    for label, cfg in runs:
        passkey[label] = run_passkey(model, tokenizer, passkey_samples, config=cfg, progress=progress, desc=label)
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    record = {"passkey": passkey, "speed": [], "faster_from": {},
              "context_window": window if isinstance(window, int) else None}
    if speed_context <= 0:
        return record
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=SPEED_REPEATS * (1 + len(runs)), unit="run", desc=f"decode speed at {speed_context} tokens",
                   leave=True)
    try:
        speed = run_speed(model, tokenizer, [cfg for _, cfg in runs], context_length=speed_context,
                          decode_tokens=SPEED_DECODE_TOKENS, repeats=SPEED_REPEATS, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    for row, (label, _) in zip(speed[1:], runs):
        row["label"] = label
    speed[0]["label"] = "dense"
    record["speed"] = speed
    dense_short = (passkey["dense"]["mean_prompt_tokens"], _ms_per_token(passkey["dense"]))
    dense_long = (speed_context, 1000.0 / speed[0]["decode_tokens_per_s"])
    for row, (label, _) in zip(speed[1:], runs):
        reduced_short = (passkey["dense"]["mean_prompt_tokens"], _ms_per_token(passkey[label]))
        reduced_long = (speed_context, 1000.0 / row["decode_tokens_per_s"])
        if reduced_long[1] <= dense_long[1] and reduced_short[1] <= dense_short[1]:
            record["faster_from"][label] = 0  # faster at both lengths
        else:
            record["faster_from"][label] = crossing_length(dense_short, dense_long, reduced_short, reduced_long)
    return record


def format_demo(record: dict, runs, *, seed: int, threads: int) -> str:
    """The demo's report: the passkey table, the speed table and one line per run on where it gets faster."""
    from hf_tokred.cli import _format_bytes, _format_params, format_table

    passkey = record["passkey"]
    dense = passkey["dense"]
    header = ["run", "accuracy", "KV cache", "vs dense", "KV tokens/layer", "prefill s/sample", "decode ms/token"]
    rows = []
    for label, result in passkey.items():
        hits = sum(result["correct"])
        rows.append([
            label,
            f"{result['accuracy']:.2f} ({hits}/{result['samples']})",
            _format_bytes(result["kv_bytes"]),
            f"{result['kv_bytes'] / dense['kv_bytes']:.2f}x" if dense["kv_bytes"] else "-",
            f"{result['kv_tokens']:.0f}",
            f"{result['prefill_s']:.2f}",
            f"{_ms_per_token(result):.0f}",
        ])
    lines = [
        "",
        f"Passkey retrieval, SmolLM2-135M-Instruct: {dense['samples']} samples (seed {seed}), "
        f"{dense['mean_prompt_tokens']:.0f} prompt tokens, 8 new tokens, CPU ({threads} threads)",
        *[f"  {label}: {' + '.join(f'{r.method} ({_format_params(r)})' for r in cfg.iter_reducers())} from {source}"
          for label, cfg, source in runs],
        "",
        format_table(header, rows, right={1, 2, 3, 4, 5, 6}),
        "",
        "KV cache: bytes of keys and values held after the prompt and the generated tokens.",
    ]
    speed = record["speed"]
    if speed:
        context = speed[0]["context_tokens"]
        dense_ms = 1000.0 / speed[0]["decode_tokens_per_s"]
        rows = []
        for row in speed:
            ms = 1000.0 / row["decode_tokens_per_s"]
            rows.append([row["label"], f"{row['prefill_s']:.1f}", f"{ms:.0f}", f"{dense_ms / ms:.2f}x",
                         _format_bytes(row["kv_bytes"]), f"{row['kv_ratio']:.2f}x"])
        lines += [
            "",
            f"Decode speed at {context} tokens of documentation text ({SPEED_DECODE_TOKENS} new tokens, median of "
            f"{SPEED_REPEATS} interleaved runs)",
            "",
            format_table(["run", "prefill s", "decode ms/token", "speed-up", "KV cache", "vs dense"], rows,
                         right={1, 2, 3, 4, 5}),
            "",
        ]
        short = dense["mean_prompt_tokens"]
        lines += [where_faster(label, length, short, context, record.get("context_window"))
                  for label, length in record["faster_from"].items()]
    return "\n".join(lines)


def where_faster(label: str, length: int | None, short: float, context: int, window: int | None = None) -> str:
    """The demo's line on where a run decodes faster than dense: ``length`` from :func:`crossing_length` (0: at both
    measured lengths, None: not ahead), ``short`` and ``context`` the two measured lengths, ``window`` the model's
    context window (a crossing past it is out of reach).

    Example:
        >>> where_faster("tova-50", 4913, 1047, 4096)[:57]
        'tova-50: decodes faster than dense from about 4913 tokens'
        >>> where_faster("tova-50", 183467, 1047, 4096, window=8192)[:60]
        'tova-50: not faster than dense at 1047 or 4096 tokens; the t'
    """
    if length == 0:
        return f"{label}: decodes faster than dense at both {short:.0f} and {context} tokens."
    if length is None:
        return (f"{label}: not faster than dense at {short:.0f} or {context} tokens, and its decode time grows at "
                "least as fast as dense's: it saves memory, not time, here.")
    if window is not None and length > window:
        return (f"{label}: not faster than dense at {short:.0f} or {context} tokens; the two lines would cross only "
                f"at about {length} tokens, past the model's {window}-token context window: it saves memory, not "
                "time, here.")
    where = "between the two lengths" if length <= context else "beyond the measured lengths"
    return (f"{label}: decodes faster than dense from about {length} tokens of context (estimated from the two "
            f"lengths; {where}).")


def _cmd_demo(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    import hf_tokred
    from hf_tokred import __version__
    from hf_tokred.cli import _log
    from hf_tokred.embedded import SMOLLM2_HUB_ID, load_smollm2

    parser = args.parser
    runs = demo_configs(args, parser)
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json: folder {folder} does not exist")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-load bars; ours are the demo's
    try:
        _log(f"Loading {SMOLLM2_HUB_ID} (embedded) ...")
        start = time.perf_counter()
        model, tokenizer = load_smollm2()
        for _, cfg, _ in runs:  # every check of each reduction against the model, before the long runs
            hf_tokred.remove(hf_tokred.apply(model, cfg))
        record = run_demo(model, tokenizer, [(label, cfg) for label, cfg, _ in runs], samples=args.samples,
                          seed=args.seed, speed_context=args.speed_context, progress=not args.no_progress)
        elapsed = time.perf_counter() - start
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    threads = torch.get_num_threads()
    print(format_demo(record, runs, seed=args.seed, threads=threads))
    if args.json:
        record.update({
            "hf_tokred_version": __version__,
            "command": "hf-tokred " + " ".join(args.argv),
            "model": SMOLLM2_HUB_ID,
            "task": "passkey",
            "samples": args.samples,
            "seed": args.seed,
            "speed_context": args.speed_context,
            "runs": [{"label": label, "source": source, "config": cfg.to_dict()} for label, cfg, source in runs],
            "device": str(model.device),
            "torch_threads": threads,
            "wall_s": elapsed,
        })
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
        _log(f"wrote {args.json}")
    return 0


def add_command(subparsers) -> None:
    """Add ``hf-tokred demo`` to the CLI.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["demo", "--samples", "3"]).samples
        3
    """
    from hf_tokred.cli import _param, _positive_int

    demo = subparsers.add_parser(
        "demo", help="passkey retrieval and decode speed on SmolLM2: dense vs KV-cache reductions",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = demo.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="PRESET_OR_PATH",
                        help="one reduction instead of the defaults: a preset name (hf-tokred presets), a JSON file "
                             "or a folder holding token_reduction_config.json")
    source.add_argument("--method", metavar="M", help="one reduction instead of the defaults: a registered method "
                                                      "(hf-tokred methods); set its parameters with --param")
    demo.add_argument("--param", metavar="KEY=VALUE", type=_param, action="append", default=[],
                      help="a parameter of --method, repeatable; values are read as JSON (512, 0.25, true)")
    demo.add_argument("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N",
                      help=f"passkey samples per run (default: {DEFAULT_SAMPLES})")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the keys and depths (default: 0)")
    demo.add_argument("--speed-context", type=_non_negative_int, default=DEFAULT_SPEED_CONTEXT, metavar="N",
                      help=f"tokens of the decode-speed prompt (default: {DEFAULT_SPEED_CONTEXT}; 0 skips it)")
    demo.add_argument("--json", metavar="OUT", help="also write the results (with per-sample answers) to this JSON file")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(handler=_cmd_demo, parser=demo)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0 or 0 < value < 64:
        raise argparse.ArgumentTypeError(f"expected 0 (skip) or an integer >= 64, got {text!r}")
    return value


__all__ = ["DEFAULT_RUNS", "add_command", "crossing_length", "demo_configs", "format_demo", "run_demo"]
