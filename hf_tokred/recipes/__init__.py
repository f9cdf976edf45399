"""The ``hf-tokred train`` subcommands: one module per trainable method.

Each module defines ``add_train_command(subparsers)``, which adds ``hf-tokred train METHOD`` with the
method's options and sets ``handler`` to a function taking the parsed arguments and returning the exit
status. The training functions themselves are plain functions of :mod:`hf_tokred.training` (or of the
method's recipe module, reached through it), usable without the command line.

Example:
    >>> from hf_tokred.cli import build_parser
    >>> build_parser().parse_args(["train", "llmlingua2", "--steps", "5"]).steps
    5
"""

from __future__ import annotations

import argparse
import os

CORPUS_HELP = ("training text, paragraphs separated by blank lines (default: the Python documentation shipped with "
               "the standard library, training split)")


def mean_ends(losses: list[float], count: int = 10) -> tuple[float, float]:
    """The mean of the first ``count`` and of the last ``count`` of ``losses`` (0.0 for none): a training run's loss
    at its start and its end, as the recipes' model cards, summaries and benches report them.

    Example:
        >>> mean_ends([4.0, 2.0, 1.0, 0.5], 2)
        (3.0, 0.75)
    """
    return (sum(losses[:count]) / max(len(losses[:count]), 1), sum(losses[-count:]) / max(len(losses[-count:]), 1))


def add_recipe_parser(subparsers, name: str, *, help: str, description: str, output: str, steps: int,
                      corpus: bool = True) -> argparse.ArgumentParser:
    """Add ``hf-tokred train NAME`` with the options every recipe shares and return its parser for the method's own.

    The shared options: ``--corpus FILE`` (when the recipe trains on text; see :func:`recipe_texts`), ``--output DIR``
    (default ``~/.cache/hf_tokred/<output>``; an interrupted run resumes from its checkpoint there), ``--steps``,
    ``--seed`` and ``--no-progress``. The caller adds its options and ``set_defaults(handler=...)``.

    Example:
        >>> import argparse
        >>> subparsers = argparse.ArgumentParser().add_subparsers()
        >>> parser = add_recipe_parser(subparsers, "mine", help="h", description="d", output="mine", steps=10)
        >>> parser.parse_args([]).steps, parser.parse_args(["--steps", "3"]).steps
        (10, 3)
    """
    from ..cli import _positive_int

    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    if corpus:
        parser.add_argument("--corpus", metavar="FILE", help=CORPUS_HELP)
    parser.add_argument("--output", metavar="DIR", help=f"output folder (default: ~/.cache/hf_tokred/{output}); an "
                                                        "interrupted run resumes from its checkpoint there")
    parser.add_argument("--steps", type=_positive_int, default=steps, help=f"optimizer steps (default: {steps})")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def recipe_texts(args) -> list[str]:
    """The training texts of a recipe's command: the ``--corpus`` file's paragraphs, else the standard library's
    documentation (training split).

    Example:
        >>> import argparse
        >>> len(recipe_texts(argparse.Namespace(corpus=None))) > 100
        True
    """
    from ..training import read_paragraphs, stdlib_corpus

    return read_paragraphs(args.corpus) if getattr(args, "corpus", None) else stdlib_corpus("train")


def recipe_output(args, default: str) -> str:
    """``--output``, else ``~/.cache/hf_tokred/<default>``.

    Example:
        >>> import argparse
        >>> recipe_output(argparse.Namespace(output="here"), "mine")
        'here'
    """
    from ..embedded import cache_dir

    return args.output or os.path.join(cache_dir(), default)


def minilm_batches(tokenizer, args, skip: int = 192) -> list[dict]:
    """The batches of a recipe command: ``--corpus`` paragraphs, else the benchmark's text lengths after its 192
    evaluation texts (``--texts`` of them, batches of 16).

    Example:
        >>> batches = minilm_batches(tokenizer, args)                    # doctest: +SKIP
    """
    from ..bench.encoders import stdlib_texts, text_batches

    if getattr(args, "corpus", None):
        paragraphs = recipe_texts(args)[: args.texts]
        return [dict(tokenizer(paragraphs[i:i + 16], truncation=True, max_length=256, padding=True,
                               return_tensors="pt")) for i in range(0, len(paragraphs), 16)]
    return text_batches(tokenizer, stdlib_texts(tokenizer, args.texts, skip=skip), 16)


def run_minilm_recipe(args, method: str, config: dict, trainer, **train_options) -> int:
    """Load MiniLM, apply ``config``, train with ``trainer`` (``train_options`` besides steps, lr, seed and the progress
    bar of ``--no-progress``) and save to the output folder (``save_pretrained``): the ``run`` of the encoder
    recipes' commands.

    Example:
        >>> run_minilm_recipe(args, "evo_vit", {"method": "evo_vit"}, train_evo_vit)    # doctest: +SKIP
        0
    """
    import hf_tokred

    from ..embedded import load_minilm
    output = recipe_output(args, f"minilm-{method.replace('_', '-')}")
    hf_tokred.TokenReductionConfig.coerce(config)  # a clear error before loading the model
    model, tokenizer = load_minilm()
    batches = minilm_batches(tokenizer, args)
    hf_tokred.apply(model, config)
    losses = trainer(model, batches, steps=args.steps, lr=args.lr, shuffle=True, seed=args.seed,
                     progress=not args.no_progress, **train_options)
    print(f"{method}: loss {losses[0]:.5f} -> {losses[-1]:.5f} over {len(losses)} steps")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"saved to {output}")
    return 0
