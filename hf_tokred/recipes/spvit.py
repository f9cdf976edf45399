"""Training SPViT's token selectors (``hf-tokred train spvit``).

:func:`train_spvit` trains the selectors of a model reduced with ``method="spvit"`` (backbone frozen, in eval mode)
with the soft-mask forward pass (Gumbel decisions, pruned tokens masked as keys) on three terms: the embedding
loss (1 - cosine of the mean of every real token's last hidden state, which the package token keeps at
inference, to the dense embedding), a token loss (1 - cosine of each kept token's last hidden state to the dense
model's, averaged over kept tokens) and the budget loss of :func:`hf_tokred.methods.encoder.spvit.budget_loss`.

Example:
    >>> import hf_tokred
    >>> from hf_tokred.recipes.spvit import train_spvit
    >>> hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.5, "layers": [2]})     # doctest: +SKIP
    >>> losses = train_spvit(model, batches, steps=200)                                  # doctest: +SKIP
    >>> model.save_pretrained("minilm-spvit")        # selectors -> token_reduction.safetensors  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..errors import TokenReductionError

DESCRIPTION = """Train SPViT token selectors (arXiv 2112.13890) for all-MiniLM-L6-v2 (embedded copy): one stage before
--layer keeps --keep-rate of the tokens and packages the rest into one token. Saves the model with the selectors in
token_reduction.safetensors."""


def _selectors(model):
    from ..integration.wiring import MODULES_ATTR

    modules = model._modules.get(MODULES_ATTR)
    if modules is None or "spvit" not in modules:
        raise TokenReductionError(f"{type(model).__name__} has no spvit reduction attached; apply one first: "
                                  "hf_tokred.apply(model, {'method': 'spvit', 'keep_rate': 0.5, 'layers': [2]})")
    return modules["spvit"]


def spvit_loss(model, inputs: dict, *, teacher=None, token_weight: float = 0.5, budget_weight: float = 2.0,
               dense: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """SPViT's training loss of one batch (selectors in training mode); see the module docstring.

    ``dense`` is the teacher's ``(last_hidden_state, embedding)`` when already computed.

    Example:
        >>> spvit_loss(model, batch).backward()                        # doctest: +SKIP
    """
    from ..integration.wiring import get_applied
    from ..methods.encoder.spvit import budget_loss, stage_decisions
    from ..training import _last_hidden, _model_inputs, _real_mask

    selectors = _selectors(model)
    if not selectors.training:
        raise TokenReductionError("spvit_loss: the selectors must be in training mode (model.hf_tokred_modules.train())")
    inputs = _model_inputs(inputs)
    if dense is None:
        dense = dense_targets(model, inputs, teacher)
    dense_hidden, dense_embedding = dense
    hidden = _last_hidden(model(**inputs))
    real = _real_mask(inputs, hidden)
    pooled = (hidden * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp_min(1e-6)
    loss = 1 - torch.nn.functional.cosine_similarity(pooled.float(), dense_embedding.float(), dim=-1).mean()
    decisions = stage_decisions(model)
    if token_weight:
        kept = decisions[-1].policy * real if decisions else real
        distance = 1 - torch.nn.functional.cosine_similarity(hidden.float(), dense_hidden.float(), dim=-1)
        loss = loss + token_weight * (distance * kept).sum() / kept.sum().clamp_min(1)
    reducer = get_applied(model).config.get("sequence")
    blocks = len(get_applied(model).adapter.blocks(model))
    return loss + budget_weight * budget_loss(selectors, decisions, reducer.keep_rate, blocks)


def dense_targets(model, inputs: dict, teacher=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's ``(last_hidden_state, masked-mean embedding)`` of ``inputs`` (``teacher`` or the model in a
    dense pass), without gradients.

    Example:
        >>> hidden, embedding = dense_targets(model, batch)            # doctest: +SKIP
    """
    from ..training import _last_hidden, _model_inputs, _real_mask, dense_pass

    inputs = _model_inputs(inputs)
    with torch.no_grad():
        if teacher is not None and teacher is not model:
            hidden = _last_hidden(teacher(**inputs))
        else:
            with dense_pass(model):
                hidden = _last_hidden(model(**inputs))
        real = _real_mask(inputs, hidden)
        return hidden, (hidden * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp_min(1e-6)


def train_spvit(model, batches: list[dict], *, teacher=None, steps: int = 60, lr: float = 3e-3,
                lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0, log=print,
                token_weight: float = 0.5, budget_weight: float = 2.0, progress: bool = True) -> list[float]:
    """Train the SPViT selectors of ``model`` (already reduced with ``spvit``) on ``batches``; returns the losses.

    ``steps`` AdamW steps at ``lr`` (``lr_schedule`` decay; ``shuffle``: a seeded new batch order every pass); the
    backbone is frozen and in eval mode, the selectors train with Gumbel soft masks; ``teacher`` is a separate dense
    model (None: the model itself in a dense pass); a tqdm bar unless ``progress=False`` or ``log_every``. Leaves the
    model in eval mode (keep top-k and package).

    Example:
        >>> hf_tokred.apply(model, {"method": "spvit", "keep_rate": 0.5, "layers": [2]})   # doctest: +SKIP
        >>> losses = train_spvit(model, batches, steps=100)                               # doctest: +SKIP
    """
    from ..training import _check_loop, _model_inputs, _optimize

    _check_loop("train_spvit", batches, steps, lr, lr_schedule)
    selectors = _selectors(model)
    trainable = {id(p) for p in selectors.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    model.eval()
    selectors.train()
    targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step_loss(index: int) -> torch.Tensor:
        inputs = _model_inputs(batches[index])
        if index not in targets:
            selectors.eval()
            targets[index] = dense_targets(model, inputs, teacher)
            selectors.train()
        return spvit_loss(model, inputs, token_weight=token_weight, budget_weight=budget_weight,
                          dense=targets[index])

    try:
        return _optimize(model, [{"params": list(selectors.parameters()), "lr": lr}], step_loss, len(batches),
                         steps=steps, lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every,
                         log=log, label="spvit step", digits=4, progress=progress, desc="train spvit")
    finally:
        selectors.eval()


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train spvit`` to the ``train`` subparsers.

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_train_command(sub)
        >>> sub.choices["spvit"].parse_args(["--keep-rate", "0.4"]).keep_rate
        0.4
    """
    from ..cli import _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "spvit", help="SPViT token selectors (keep top tokens, package the rest)",
                              description=DESCRIPTION, output="minilm-spvit", steps=300)
    train.add_argument("--keep-rate", type=float, default=0.5, help="fraction kept by the stage (default: 0.5)")
    train.add_argument("--layer", type=int, default=2, help="block before which the stage prunes (default: 2)")
    train.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: 3e-3)")
    train.add_argument("--texts", type=_positive_int, default=1024, help="training texts (default: 1024)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train on MiniLM with the corpus texts and save the model with its selectors to the output folder."""
    from . import run_minilm_recipe

    config = {"method": "spvit", "keep_rate": args.keep_rate, "layers": [args.layer]}
    return run_minilm_recipe(args, "spvit", config, train_spvit)


__all__ = ["add_train_command", "dense_targets", "spvit_loss", "train_spvit"]
