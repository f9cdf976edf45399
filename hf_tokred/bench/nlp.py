"""``hf-tokred nlp-bench METHOD``: train and measure the NLP sequence reducers on this machine's text.

There are no pretrained byte-level or hourglass weights here, so ``mrt5`` and ``token_pooling`` train
small models from scratch on the Python documentation shipped with the standard library; ``token_dropping``
continues the MLM pretraining of the embedded all-MiniLM-L6-v2 and ``tokenskip`` fine-tunes a LoRA on the
embedded SmolLM2-135M-Instruct. Every method trains on the training split and reports the held-out split,
against a baseline trained with the same budget; each module below says what it measures:

- ``mrt5``: :mod:`hf_tokred.bench.nlp_mrt5`
- ``token_pooling``: :mod:`hf_tokred.bench.nlp_token_pooling`
- ``token_dropping``: :mod:`hf_tokred.bench.nlp_token_dropping`
- ``tokenskip``: :mod:`hf_tokred.bench.nlp_tokenskip`

Each of those modules defines ``add_bench_arguments(parser)`` (its few settings), ``run_bench(args) -> dict``
(every number, JSON-serialisable) and ``format_bench(result) -> str`` (the printed report).

Example:
    >>> from hf_tokred.cli import main
    >>> main(["nlp-bench", "mrt5", "--steps", "20"])                                # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform

import torch

BENCHES = {
    "mrt5": "hf_tokred.bench.nlp_mrt5",
    "token_pooling": "hf_tokred.bench.nlp_token_pooling",
    "token_dropping": "hf_tokred.bench.nlp_token_dropping",
    "tokenskip": "hf_tokred.bench.nlp_tokenskip",
}

DESCRIPTION = __doc__.split("\n\n")[0] + """

Each method trains a small budget on the standard-library text (training split), then reports the
held-out split beside its baseline trained with the same budget. hf-tokred nlp-bench METHOD --help
lists a method's settings.

examples:
  hf-tokred nlp-bench mrt5
  hf-tokred nlp-bench tokenskip --json tokenskip.json
"""


def add_command(subparsers) -> None:
    """Add ``hf-tokred nlp-bench METHOD`` to the CLI.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["nlp-bench", "mrt5"]).bench
        'mrt5'
    """
    bench = subparsers.add_parser("nlp-bench", help="NLP sequence reducers: train and measure against a baseline",
                                  description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = bench.add_subparsers(dest="bench", metavar="METHOD", title="methods")
    methods.required = True
    for name, module in BENCHES.items():
        bench_module = importlib.import_module(module)
        parser = methods.add_parser(name, help=bench_module.__doc__.strip().split("\n")[0],
                                    description=bench_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        bench_module.add_bench_arguments(parser)
        parser.add_argument("--json", metavar="OUT", help="also write every number to this file")
        parser.set_defaults(handler=_run, bench_module=module)


def _run(args) -> int:
    module = importlib.import_module(args.bench_module)
    result = module.run_bench(args)
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    print(module.format_bench(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
