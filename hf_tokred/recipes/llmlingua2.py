"""``hf-tokred train llmlingua2``: the keep/drop token classifier of LLMLingua-2 on this machine's text."""

from __future__ import annotations

DESCRIPTION = """\
llmlingua2: a keep/drop token classifier (BertForTokenClassification) fine-tuned from the embedded
all-MiniLM-L6-v2 on labels that our llmlingua (scored by the embedded SmolLM2) produces on the corpus at
--rate. The folder it writes loads with compress_prompt(method="llmlingua2", classifier=DIR) and
pushes to the Hub like any model. With the default corpus the held-out split is evaluated at the end.

examples:
  hf-tokred train llmlingua2                          ~40 min on 2 CPU cores (labels, then 300 steps)
  hf-tokred train llmlingua2 --corpus my_docs.txt --output ./llmlingua2-mine --steps 500
"""


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train llmlingua2`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "llmlingua2"]).rate
        0.5
    """
    from ..cli import _float_in, _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "llmlingua2", help="LLMLingua-2's keep/drop token classifier on "
                              "all-MiniLM-L6-v2", description=DESCRIPTION, output="llmlingua2-minilm", steps=300)
    train.add_argument("--lr", type=_float_in(1e-7, 1.0), default=1e-4, help="learning rate (default: 1e-4)")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="chunks per step (default: 16)")
    train.add_argument("--rate", type=_float_in(0.01, 1.0), default=0.5,
                       help="rate at which llmlingua labels the corpus (keep/drop per word; default: 0.5)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Label the corpus, train the classifier, save it and (default corpus) evaluate the held-out split."""
    from ..cli import _log, format_table
    from ..training import evaluate_llmlingua2, llmlingua2_labels, stdlib_corpus, train_llmlingua2
    from . import recipe_output, recipe_texts

    texts = recipe_texts(args)
    output = recipe_output(args, "llmlingua2-minilm")
    _log(f"llmlingua2: labelling {len(texts)} paragraphs with llmlingua at rate {args.rate}, then {args.steps} steps")
    train_llmlingua2(texts, rate=args.rate, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     output_dir=output, progress=not args.no_progress)
    print(f"saved to {output}: compress_prompt(..., method='llmlingua2', classifier={output!r})")
    if not args.corpus:
        heldout = llmlingua2_labels(stdlib_corpus("heldout"), rate=args.rate)
        metrics = evaluate_llmlingua2(output, heldout)
        print(format_table(["held-out", "value"], [[k, f"{v:.3f}" if isinstance(v, float) else str(v)]
                                                    for k, v in metrics.items()], right={1}))
    return 0
