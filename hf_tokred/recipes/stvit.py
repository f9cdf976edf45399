"""Training STViT (``hf-tokred train stvit``): the backbone learns to run with the semantic-token stage.

Our STViT builds its semantic tokens without parameters (see :mod:`hf_tokred.methods.encoder.stvit`), so
:func:`train_stvit` fine-tunes the backbone through the stage (the inference path) toward the dense sentence
embedding, with the loop of :func:`hf_tokred.recipes.evo_vit.train_backbone`.

Example:
    >>> import hf_tokred
    >>> from hf_tokred.recipes.stvit import train_stvit
    >>> hf_tokred.apply(model, {"method": "stvit", "ratio": 0.5, "start": 2})             # doctest: +SKIP
    >>> losses = train_stvit(model, batches, teacher=dense_copy, steps=200)              # doctest: +SKIP
"""

from __future__ import annotations

from . import run_minilm_recipe
from .evo_vit import train_backbone

DESCRIPTION = """Fine-tune all-MiniLM-L6-v2 (embedded copy) to run with STViT (arXiv 2303.11273): blocks --start to
--end - 1 see --ratio semantic tokens per token, then every token is recovered. Distilled from the dense model;
saves the model and its token_reduction config to the output folder."""


def train_stvit(model, batches: list[dict], *, teacher=None, steps: int = 60, lr: float = 1e-4,
                lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0,
                log=print, progress: bool = True) -> list[float]:
    """Fine-tune the backbone of a model reduced with ``method="stvit"`` through the semantic-token stage. See
    :func:`hf_tokred.recipes.evo_vit.train_backbone`.

    Example:
        >>> losses = train_stvit(model, batches, teacher=teacher, steps=200)                # doctest: +SKIP
    """
    return train_backbone(model, batches, method="stvit", teacher=teacher, steps=steps, lr=lr,
                          lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every, log=log,
                          progress=progress)


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train stvit`` to the ``train`` subparsers.

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_train_command(sub)
        >>> sub.choices["stvit"].parse_args(["--ratio", "0.4"]).ratio
        0.4
        >>> sub.choices["stvit"].parse_args([]).end           # the stage runs through MiniLM's last block
        6
    """
    from ..cli import _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "stvit", help="STViT (fine-tune the backbone with semantic tokens)",
                              description=DESCRIPTION, output="minilm-stvit", steps=300)
    train.add_argument("--ratio", type=float, default=0.5, help="semantic tokens per token (default: 0.5)")
    train.add_argument("--start", type=int, default=2, help="first block of the stage (default: 2)")
    train.add_argument("--end", type=int, default=6,
                       help="first block seeing every token again (default: 6, after MiniLM's last block)")
    train.add_argument("--iterations", type=int, default=3, help="refinements of the semantic tokens (default: 3)")
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    train.add_argument("--texts", type=_positive_int, default=1024, help="training texts (default: 1024)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train on MiniLM and save the model with its token_reduction config to the output folder."""
    config = {"method": "stvit", "ratio": args.ratio, "start": args.start, "end": args.end,
              "iterations": args.iterations}
    return run_minilm_recipe(args, "stvit", config, train_stvit)


__all__ = ["add_train_command", "train_stvit"]
