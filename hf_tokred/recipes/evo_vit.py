"""Training Evo-ViT (``hf-tokred train evo_vit``): the backbone learns to run with the slow-fast token evolution.

Evo-ViT has no modules of its own: the paper trains the whole vision transformer with the slow-fast update.
:func:`train_evo_vit` fine-tunes the backbone of a model reduced with ``method="evo_vit"`` through the reduction
(the inference path, model in eval mode) so that the size-weighted mean of its ``last_hidden_state`` (the
sentence embedding) points as the dense teacher's: loss ``1 - cosine`` (``hf_tokred.training.pooled_cosine_loss``).
The same loop, :func:`train_backbone`, serves STViT (``hf_tokred.recipes.stvit``).

Example:
    >>> import hf_tokred
    >>> from hf_tokred.recipes.evo_vit import train_evo_vit
    >>> hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.6})                # doctest: +SKIP
    >>> losses = train_evo_vit(model, batches, teacher=dense_copy, steps=200)            # doctest: +SKIP
    >>> model.save_pretrained("minilm-evo-vit")                                         # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..errors import TokenReductionError

DESCRIPTION = """Fine-tune all-MiniLM-L6-v2 (embedded copy) to run with Evo-ViT (arXiv 2108.01390): from block
--start on, the top tokens by global CLS attention (--keep-rates, one fraction per block) take the slow path, the
rest share one representative's update. Distilled from the dense model (1 - cosine of the sentence embeddings);
saves the model and its token_reduction config to the output folder."""


def train_backbone(model, batches: list[dict], *, method: str, teacher=None, steps: int = 60, lr: float = 1e-4,
                   lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0,
                   log=print, progress: bool = True) -> list[float]:
    """Fine-tune the backbone of ``model`` (reduced with ``method``) through its hard reduction toward the dense
    embeddings; every parameter of ``model.hf_tokred_modules`` stays frozen. Returns the loss of every step.

    ``teacher`` is a separate frozen dense model; when None the dense embeddings of every batch are computed
    once, before the first step, with :func:`hf_tokred.training.dense_pass` on ``model`` itself (the teacher is
    the model as it was before training). A tqdm bar shows the steps unless ``log_every`` or ``progress=False``.

    Example:
        >>> losses = train_backbone(model, batches, method="stvit", steps=10)        # doctest: +SKIP
    """
    from ..integration.encoders import STATE_ATTR
    from ..integration.wiring import MODULES_ATTR
    from ..training import _check_loop, _dense_embedding, _model_inputs, _optimize, _pooled_cosine, dense_pass

    name = f"train_{method}"
    _check_loop(name, batches, steps, lr, lr_schedule)
    if getattr(model.__dict__.get(STATE_ATTR), "reducer", None) is None or \
            model.__dict__[STATE_ATTR].reducer.method != method:
        raise TokenReductionError(f"{name}: {type(model).__name__} has no {method} reduction attached; apply one "
                                  f"first, e.g. hf_tokred.apply(model, {{'method': '{method}'}})")
    if teacher is model:  # the benchmark passes the model itself when it trains in place: its dense pass, now
        teacher = None
    dense: dict[int, torch.Tensor] = {}
    if teacher is None:
        with dense_pass(model):
            model.eval()
            for index, batch in enumerate(batches):
                dense[index] = _dense_embedding(model, _model_inputs(batch))
    learned = model._modules.get(MODULES_ATTR) or torch.nn.ModuleDict()
    learned_ids = {id(p) for p in learned.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in learned_ids]
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in learned_ids)
    model.eval()  # the inference path: no dropout, the hard reduction
    def step_loss(index: int) -> torch.Tensor:
        inputs = _model_inputs(batches[index])
        if index not in dense:
            dense[index] = _dense_embedding(teacher, inputs)
        return _pooled_cosine(model, inputs, dense[index])

    return _optimize(model, [{"params": backbone, "lr": lr, "weight_decay": 0.0}], step_loss, len(batches),
                     steps=steps, lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every,
                     log=log, label=f"{method} step", digits=5, progress=progress, desc=name)


def train_evo_vit(model, batches: list[dict], *, teacher=None, steps: int = 60, lr: float = 1e-4,
                  lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0,
                  log=print, progress: bool = True) -> list[float]:
    """Fine-tune the backbone of a model reduced with ``method="evo_vit"`` through the slow-fast update (the paper
    trains the whole model; Evo-ViT has no modules of its own). See :func:`train_backbone`.

    Example:
        >>> import copy, hf_tokred
        >>> teacher = copy.deepcopy(model)                                                 # doctest: +SKIP
        >>> hf_tokred.apply(model, {"method": "evo_vit", "keep_rate": 0.6})                # doctest: +SKIP
        >>> losses = train_evo_vit(model, batches, teacher=teacher, steps=200)             # doctest: +SKIP
    """
    return train_backbone(model, batches, method="evo_vit", teacher=teacher, steps=steps, lr=lr,
                          lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every, log=log,
                          progress=progress)


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train evo_vit`` to the ``train`` subparsers.

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_train_command(sub)
        >>> sub.choices["evo_vit"].parse_args(["--keep-rate", "0.6"]).keep_rate
        0.6
        >>> args = sub.choices["evo_vit"].parse_args([])    # blocks 2-5 of MiniLM, falling (docs/encoders.md)
        >>> args.start, args.keep_rates, args.ema, args.lr
        (2, (0.7, 0.6, 0.45, 0.4), 0.0, 5e-05)
    """
    from ..cli import _fractions, _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "evo_vit", help="Evo-ViT (fine-tune the backbone with the slow-fast update)",
                              description=DESCRIPTION, output="minilm-evo-vit", steps=300)
    rates = train.add_mutually_exclusive_group()  # both given would silently drop one of them
    rates.add_argument("--keep-rates", type=_fractions, default=(0.7, 0.6, 0.45, 0.4),
                       help="slow-path fraction of each reducing block from --start on (default: 0.7,0.6,0.45,0.4, "
                       "30 %% of MiniLM's FLOPs saved)")
    rates.add_argument("--keep-rate", type=float, default=None,
                       help="one slow-path fraction for every reducing block, instead of --keep-rates")
    train.add_argument("--start", type=int, default=2, help="first reducing block (default: 2)")
    train.add_argument("--ema", type=float, default=0.0,
                       help="weight of the running global attention (default: 0, each block ranks by the previous "
                       "block's attention alone, the best on MiniLM's validation texts; the config's default is 0.5)")
    train.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: 5e-5)")
    train.add_argument("--texts", type=_positive_int, default=1024, help="training texts (default: 1024)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train on MiniLM and save the model with its token_reduction config to the output folder."""
    from . import run_minilm_recipe

    rates = {"keep_rate": args.keep_rate} if args.keep_rate is not None else {"keep_rates": list(args.keep_rates)}
    config = {"method": "evo_vit", "layers": list(range(args.start, 6)), "ema": args.ema, **rates}
    return run_minilm_recipe(args, "evo_vit", config, train_evo_vit)


__all__ = ["add_train_command", "train_backbone", "train_evo_vit"]
