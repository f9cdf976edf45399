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
