"""``hf-tokred learned-lm METHOD``: the benchmarks of the learned language-model reducers on the embedded SmolLM2.

One subcommand per method, each in its own module (``hf_tokred.bench.lm_<method>``, which adds it with
``add_command(subparsers)``):

* ``eagle``: accepted tokens per verification and decode tokens/s against plain greedy and prompt-lookup decoding;
* ``gist``: answers through 8 gist tokens against the dense model's, KV bytes and time to first token of a reused prompt;
* ``icae``: reconstruction and passkey accuracy through memory slots at 4x context compression;
* ``dcp``: held-out perplexity at a dropped fraction of the context, and decode throughput at 2k context.

Each trains nothing: it loads the artefact that ``hf-tokred train METHOD`` saved (``--weights``), and states the
training budget recorded with it. The figures and commands are in ``docs/learned_lm.md``.
"""

from __future__ import annotations

import argparse
import importlib

# The methods of `hf-tokred learned-lm`, and the module holding each one's subcommand.
LEARNED_LM_BENCHES: dict[str, str] = {name: f"hf_tokred.bench.lm_{name}" for name in ("eagle", "gist", "icae", "dcp")}


def add_command(subparsers) -> None:
    """Add ``hf-tokred learned-lm METHOD`` to the CLI.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_command(parser.add_subparsers())
        >>> parser.parse_args(["learned-lm", "eagle", "--help"])          # doctest: +SKIP
    """
    bench = subparsers.add_parser("learned-lm", help="benchmarks of EAGLE, Gist tokens, ICAE and DCP on SmolLM2",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = bench.add_subparsers(dest="method", metavar="METHOD", title="methods")
    methods.required = True
    for module in LEARNED_LM_BENCHES.values():
        importlib.import_module(module).add_command(methods)
