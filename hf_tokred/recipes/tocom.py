"""Training ToCom's plug-in (``hf-tokred train tocom``): self-distillation from the tuned-for degree to the one used.

:func:`train_tocom` trains the low-rank deltas of a model reduced with ``method="tocom"`` (everything else
frozen): the student is the model with ToMe at the target degree and the plug-in on, the teacher the same
model as it was tuned (ToMe at ``source_r`` / ``source_ratio`` with the plug-in off, or a separate dense
``teacher`` model when the source is dense), the loss 1 - cosine of their size-weighted mean embeddings.

Example:
    >>> import hf_tokred
    >>> from hf_tokred.recipes.tocom import train_tocom
    >>> hf_tokred.apply(model, {"method": "tocom", "ratio": 0.15, "metric": "hidden"})   # doctest: +SKIP
    >>> losses = train_tocom(model, batches, steps=200)                                  # doctest: +SKIP
    >>> model.save_pretrained("minilm-tocom")        # plug-in -> token_reduction.safetensors  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..errors import TokenReductionError

DESCRIPTION = """Train a ToCom plug-in (arXiv 2408.06798) for all-MiniLM-L6-v2 (embedded copy): ToMe merging on the
hidden states at --ratio (a degree the model was not tuned for; it was tuned dense, or at --source-ratio), low-rank
deltas on every linear layer distilled from the model at the source degree. Saves the model with the plug-in in
token_reduction.safetensors."""


def _pooled(model, inputs: dict) -> torch.Tensor:
    """The size-weighted mean of ``last_hidden_state`` (a merged token weighs as the tokens it holds)."""
    from ..integration.encoders import token_sizes
    from ..training import _last_hidden, _real_mask

    hidden = _last_hidden(model(**inputs))
    real = _real_mask(inputs, hidden)
    try:  # the sizes of the pass just run (ones, or 0 for padding, when nothing merged)
        sizes = token_sizes(model).to(hidden.dtype)
    except TokenReductionError:  # a dense teacher model without a reduction
        sizes = real
    if sizes.shape != hidden.shape[:2]:
        sizes = real
    return (hidden * sizes[..., None]).sum(dim=1) / sizes.sum(dim=1, keepdim=True).clamp_min(1e-6)


def teacher_embedding(model, inputs: dict, teacher=None) -> torch.Tensor:
    """The teacher's embedding of ``inputs``: ``teacher`` (a separate dense model) when the source degree is dense,
    else ``model`` itself at the source degree with the plug-in off (no gradients).

    Example:
        >>> target = teacher_embedding(model, batch)                   # doctest: +SKIP
    """
    from ..integration.tocom import source_pass
    from ..integration.wiring import get_applied
    from ..training import _model_inputs, dense_pass

    inputs = _model_inputs(inputs)
    reducer = get_applied(model).config.get("sequence")
    blocks = len(get_applied(model).adapter.blocks(model))
    dense_source = not any(reducer.source_schedule(blocks))
    with torch.no_grad():
        if dense_source and teacher is not None and teacher is not model:
            return _pooled(teacher, inputs)
        context = dense_pass(model) if dense_source else source_pass(model)
        with context:
            return _pooled(model, inputs)


def train_tocom(model, batches: list[dict], *, teacher=None, steps: int = 60, lr: float = 2e-3,
                lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0,
                log=print, weight_decay: float = 0.0, progress: bool = True) -> list[float]:
    """Train the ToCom plug-in of ``model`` (already reduced with ``method="tocom"``) on ``batches``; returns the losses.

    ``steps`` AdamW steps at ``lr`` (``lr_schedule``: constant, linear or cosine decay; ``shuffle``: a seeded new
    batch order every pass) on 1 - cosine between the student's embedding (ToMe at the target degree, plug-in on,
    the model in eval mode: exactly the inference graph) and :func:`teacher_embedding`, cached per batch. Only the
    plug-in trains; the model's weights stay as they were. A tqdm bar unless ``progress=False`` or ``log_every``.
    Leaves every parameter frozen and the model in eval mode.

    Example:
        >>> hf_tokred.apply(model, {"method": "tocom", "r": 16, "source_r": 8})      # doctest: +SKIP
        >>> losses = train_tocom(model, batches, steps=100)                         # doctest: +SKIP
    """
    from ..methods.encoder.tocom import compensator
    from ..training import _check_loop, _model_inputs, _optimize

    _check_loop("train_tocom", batches, steps, lr, lr_schedule)
    if weight_decay < 0:
        raise TokenReductionError(f"train_tocom: weight_decay must be >= 0, got {weight_decay}")
    plug = compensator(model)
    trainable = {id(p) for p in plug.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    model.eval()
    targets: dict[int, torch.Tensor] = {}

    def step_loss(index: int) -> torch.Tensor:
        inputs = _model_inputs(batches[index])
        if index not in targets:
            targets[index] = teacher_embedding(model, inputs, teacher)
        student = _pooled(model, inputs)
        return 1 - torch.nn.functional.cosine_similarity(student.float(), targets[index].float(), dim=-1).mean()

    return _optimize(model, [{"params": list(plug.parameters()), "lr": lr, "weight_decay": weight_decay}], step_loss,
                     len(batches), steps=steps, lr_schedule=lr_schedule, shuffle=shuffle, seed=seed,
                     log_every=log_every, log=log, label="tocom step", digits=5, progress=progress,
                     desc="train tocom")


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train tocom`` to the ``train`` subparsers.

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_train_command(sub)
        >>> sub.choices["tocom"].parse_args(["--ratio", "0.2"]).ratio
        0.2
    """
    from ..cli import _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "tocom", help="a ToCom plug-in: ToMe at a degree the model was not tuned "
                              "for, compensated by low-rank deltas", description=DESCRIPTION, output="minilm-tocom",
                              steps=300)
    train.add_argument("--ratio", type=float, default=0.15, help="ToMe ratio used at inference (default: 0.15)")
    train.add_argument("--source-ratio", type=float, default=0.0,
                       help="ratio the model was tuned for (default: 0, dense)")
    train.add_argument("--rank", type=_positive_int, default=4, help="rank of the deltas (default: 4)")
    train.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 2e-3)")
    train.add_argument("--texts", type=_positive_int, default=1024, help="training texts (default: 1024)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train on MiniLM with the corpus texts and save the model with its plug-in to the output folder."""
    from . import run_minilm_recipe

    config = {"method": "tocom", "ratio": args.ratio, "source_ratio": args.source_ratio, "rank": args.rank,
              "metric": "hidden"}
    return run_minilm_recipe(args, "tocom", config, train_tocom)


__all__ = ["add_train_command", "teacher_embedding", "train_tocom"]
