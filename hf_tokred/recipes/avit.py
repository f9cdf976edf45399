"""``hf-tokred train avit``: train A-ViT's halting heads (arXiv 2112.07658) on an encoder, backbone frozen.

:func:`avit_loss` is the loss of one batch (distillation to the dense model through the ACT output, the ponder
loss and the distributional prior); :func:`train_avit` is the plain loop (reachable as
``hf_tokred.training.train_avit``). The helpers :func:`dense_reference`, :func:`train_heads` and
:func:`add_encoder_train_command` are shared with the IA-RED² recipe (:mod:`hf_tokred.recipes.ia_red2`).

Example:
    >>> import hf_tokred
    >>> from hf_tokred.recipes.avit import train_avit
    >>> hf_tokred.apply(model, {"method": "avit", "target_depth": 0.7, "restore_length": True})  # doctest: +SKIP
    >>> losses = train_avit(model, batches, steps=60)                                           # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..errors import TokenReductionError
from ..integration.wiring import MODULES_ATTR, get_applied
from ..methods.encoder.base import SELECTS

DESCRIPTION = """\
{method}: train the learned parts of {paper} on all-MiniLM-L6-v2 (the embedded copy, nothing downloads), backbone
frozen, distilled from the dense model on the corpus (default: the Python documentation shipped with the standard
library, training split); then, with --finetune-steps, fine-tune the backbone through the hard reduction
(hf_tokred.training.fine_tune_reduced). The folder loads with AutoModel.from_pretrained(DIR) (the reduction
re-attaches; the learned parts are in token_reduction.safetensors).

examples:
  hf-tokred train {method}
  hf-tokred train {method} --steps 200 --finetune-steps 300 --output ./minilm-{method}
"""


def learned_part(model, method: str) -> torch.nn.Module:
    """The learned part ``method`` attached to ``model`` (``model.hf_tokred_modules[method]``), or a clear error.

    Example:
        >>> heads = learned_part(model, "avit")                      # doctest: +SKIP
    """
    applied = get_applied(model)
    reducer = None if applied is None else applied.config.get("sequence")
    modules = model._modules.get(MODULES_ATTR)
    if reducer is None or reducer.method != method or modules is None or method not in modules:
        raise TokenReductionError(f"{type(model).__name__} has no {method} reduction attached; apply one first: "
                                  f"hf_tokred.apply(model, {{'method': {method!r}}})")
    return modules[method]


def _last_hidden(outputs) -> torch.Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs.hidden_states[-1]
    return hidden


def dense_reference(model, inputs: dict, teacher=None):
    """The dense model's outputs for ``inputs`` (no gradients): ``teacher`` if given, else ``model`` in a dense pass.

    Returns ``(outputs, pooled)``: the outputs and the attention-masked mean of ``last_hidden_state``.

    Example:
        >>> outputs, pooled = dense_reference(model, batch)          # doctest: +SKIP
    """
    from ..training import dense_pass

    with torch.no_grad():
        if teacher is None:
            with dense_pass(model):
                outputs = model(**inputs)
        else:
            outputs = teacher(**inputs)
    hidden = _last_hidden(outputs)
    real = _real(inputs, hidden)
    pooled = (hidden * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp_min(1e-6)
    return outputs, pooled


def _real(inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    return mask.to(hidden.dtype)


def logits_kl(outputs, reference) -> torch.Tensor | None:
    """KL of the student's logits from the dense model's, when both have logits (ViT classifiers), else None."""
    student, dense = getattr(outputs, "logits", None), getattr(reference, "logits", None)
    if student is None or dense is None:
        return None
    return torch.nn.functional.kl_div(student.float().log_softmax(-1), dense.float().log_softmax(-1),
                                      reduction="batchmean", log_target=True)


def train_heads(model, learned: torch.nn.Module, step_loss, batch_count: int, *, steps: int, lr: float,
                lr_schedule: str, shuffle: bool, seed: int, log_every: int, log, name: str,
                progress: bool = True) -> list[float]:
    """The shared loop: AdamW on ``learned`` only (backbone frozen, in eval mode; ``learned`` in training mode),
    ``step_loss(batch_index)`` per step, a tqdm bar unless ``log_every`` or ``progress=False``. Leaves the model in
    eval mode (hard reduction) and every parameter frozen; returns the loss of every step.

    Example:
        >>> losses = train_heads(model, heads, loss_of, 4, steps=10, lr=1e-3, lr_schedule="constant",
        ...                      shuffle=False, seed=0, log_every=0, log=print, name="avit")  # doctest: +SKIP
    """
    from ..training import _check_loop, _optimize

    _check_loop(f"train_{name}", list(range(batch_count)), steps, lr, lr_schedule)
    trainable = list(learned.parameters())
    ids = {id(p) for p in trainable}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in ids)
    model.eval()
    learned.train()
    try:
        return _optimize(model, [{"params": trainable, "lr": lr}], step_loss, batch_count, steps=steps,
                         lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every, log=log,
                         label=f"{name} step", digits=4, progress=progress, desc=f"train {name}")
    finally:
        learned.eval()


# ---------------------------------------------------------------------------------------------
# A-ViT
# ---------------------------------------------------------------------------------------------


def avit_loss(model, inputs: dict, *, teacher=None, ponder_weight: float = 0.01, prior_weight: float = 1.0,
              distill_weight: float = 1.0, return_parts: bool = False):
    """The A-ViT training loss of one batch; the halting heads must be in training mode.

    ``distill_weight * (1 - cos)`` of the student's sentence embedding to the dense one, read out as inference does
    (with ``restore_length`` every token at its state when it halted, else the mean of the tokens still running at
    the end), straight-through on the smooth halting probabilities so the heads get gradients; plus the logits' KL
    when the model has logits. ``ponder_weight`` times the ponder cost (ACT: halting blocks run plus the remainder,
    as a fraction of the halting blocks, mean over tokens). ``prior_weight`` times the distributional prior
    KL(prior || the batch's halting-depth distribution), the prior a Gaussian over depths centred at
    ``target_depth`` of the model's blocks (the FLOPs knob).

    Example:
        >>> learned_part(model, "avit").train()                     # doctest: +SKIP
        >>> avit_loss(model, batch).backward()                       # doctest: +SKIP
    """
    from ..methods.encoder.avit import halting_record

    heads = learned_part(model, "avit")
    if not heads.training:
        raise TokenReductionError("avit_loss: the halting heads are in eval mode (hard halting); call "
                                  "model.hf_tokred_modules['avit'].train() first")
    reducer = get_applied(model).config.get("sequence")
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    reference, dense = dense_reference(model, inputs, teacher)
    outputs = model(**inputs)
    record = halting_record(model)
    last = _last_hidden(outputs)
    real = _real(inputs, last)
    stages = record.stages
    if not stages:
        raise TokenReductionError("avit_loss: no halting block ran; check the config's layers")
    candidates = (stages[0].running > 0).to(last.dtype)
    # Smooth halting probabilities per outcome (halt before each halting block, or run to the end): the decrease of
    # the smooth survival; their hard (0/1) counterparts are what inference does. Straight-through: hard forward,
    # smooth gradient backward.
    survival = [torch.ones_like(candidates)] + [s.survival for s in stages]
    soft_halt = [(survival[i] - survival[i + 1]).clamp_min(0.0) for i in range(len(stages))] + [survival[-1]]
    hard_halt = [s.halted.to(last.dtype) for s in stages] + [record.running.to(last.dtype)]
    indicator = [h + p - p.detach() for h, p in zip(hard_halt, soft_halt)]
    if reducer.restore_length:
        # Inference returns each halted token with its state at halting (the input of the block it skipped).
        tokens = last * (indicator[-1] * candidates + (1.0 - candidates))[..., None]
        for stage, weight in zip(stages, indicator):
            tokens = tokens + stage.hidden * (weight * candidates)[..., None]
        weight = real
    else:  # inference keeps only the tokens still running at the end
        tokens = last
        weight = real * (indicator[-1] * candidates + (1.0 - candidates))
    pooled = (tokens * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp_min(1e-6)
    parts = {"cos": 1.0 - torch.nn.functional.cosine_similarity(pooled.float(), dense.float(), dim=-1).mean()}
    kl = logits_kl(outputs, reference)
    if kl is not None:
        parts["logits_kl"] = kl
    # Ponder cost per token (ACT): halting blocks it ran through, plus its remainder (the differentiable part).
    end_mass = record.running.to(last.dtype) * (1.0 - record.cumulative)
    remainder = end_mass + sum(torch.where(s.halted, s.mass, torch.zeros_like(s.mass)) for s in stages)
    ran = sum(s.running for s in stages)
    count = candidates.sum().clamp_min(1.0)
    parts["ponder"] = ((ran + remainder) * candidates).sum() / count / (len(stages) + 1)
    # Distributional prior: KL(prior || the batch's halting-depth distribution).
    target, _ = reducer.target_distribution(_num_blocks(model))
    halting = torch.stack([(p * candidates).sum() for p in soft_halt]) / count
    halting = (halting.float() / halting.float().sum().clamp_min(1e-8)).clamp_min(1e-8)
    target = target.to(halting.device)
    parts["prior_kl"] = (target * (target.log() - halting.log())).sum()
    loss = distill_weight * (parts["cos"] + parts.get("logits_kl", 0.0)) + ponder_weight * parts["ponder"] \
        + prior_weight * parts["prior_kl"]
    if return_parts:
        return loss, {k: float(torch.as_tensor(v).detach()) for k, v in parts.items()}
    return loss


def _num_blocks(model) -> int:
    from ..integration.encoders import STATE_ATTR

    return len(model.__dict__[STATE_ATTR].schedule)


def train_avit(model, batches: list[dict], *, teacher=None, steps: int = 60, lr: float = 5e-3,
               lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0, log=print,
               ponder_weight: float = 0.01, prior_weight: float = 1.0, distill_weight: float = 1.0,
               progress: bool = True) -> list[float]:
    """Train the A-ViT halting heads of ``model`` (already reduced with ``avit``) on ``batches``, backbone frozen.

    ``batches`` are dicts of model inputs (tokenizer outputs, or ``pixel_values``); ``teacher`` a separate frozen
    dense model (None: ``model`` itself in a dense pass). AdamW at ``lr`` with the ``lr_schedule`` decay, a seeded
    batch order (``shuffle``), a tqdm bar (or a log line every ``log_every`` steps). The loss is :func:`avit_loss`.
    Leaves the model in eval mode (hard halting); returns the loss of every step.

    Example:
        >>> hf_tokred.apply(model, {"method": "avit", "target_depth": 0.7, "restore_length": True})  # doctest: +SKIP
        >>> losses = train_avit(model, batches, steps=60)                                           # doctest: +SKIP
        >>> model.save_pretrained("minilm-avit")    # heads -> token_reduction.safetensors           # doctest: +SKIP
    """
    heads = learned_part(model, "avit")

    def step_loss(index: int) -> torch.Tensor:
        return avit_loss(model, batches[index], teacher=teacher, ponder_weight=ponder_weight,
                         prior_weight=prior_weight, distill_weight=distill_weight)

    return train_heads(model, heads, step_loss, len(batches), steps=steps, lr=lr, lr_schedule=lr_schedule,
                       shuffle=shuffle, seed=seed, log_every=log_every, log=log, name="avit", progress=progress)


# ---------------------------------------------------------------------------------------------
# The command line (shared with ia_red2)
# ---------------------------------------------------------------------------------------------


def add_encoder_train_command(subparsers, method: str, *, paper: str, steps: int, lr: float, options, run,
                              config_options) -> None:
    """Add ``hf-tokred train METHOD`` for a learned encoder method trained on the embedded MiniLM.

    ``options(parser)`` adds the method's config options; ``config_options(args)`` turns them into the config dict;
    ``run(model, batches, args, teacher)`` trains and returns the losses.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "avit", "--steps", "3"]).steps      # doctest: +SKIP
        3
    """
    from ..cli import _positive_int
    from . import add_recipe_parser

    parser = add_recipe_parser(subparsers, method, help=f"train {method}'s learned parts on MiniLM",
                               description=DESCRIPTION.format(method=method, paper=paper), output=f"minilm-{method}",
                               steps=steps, corpus=True)
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate of the learned parts (default: {lr})")
    parser.add_argument("--texts", type=_positive_int, default=1900, help="training texts (default: 1900)")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="then fine-tune the backbone through the hard reduction for this many steps (default: 0)")
    parser.add_argument("--finetune-lr", type=float, default=1e-4, help="learning rate of that fine-tuning (1e-4)")
    options(parser)
    parser.set_defaults(handler=lambda args: _run_command(args, method, run, config_options))


def _run_command(args, method: str, run, config_options) -> int:
    import copy

    import hf_tokred
    from hf_tokred.bench.encoders import DEFAULT_BATCH, text_batches
    from hf_tokred.embedded import load_minilm

    from ..training import fine_tune_reduced
    from . import recipe_output, recipe_texts

    model, tokenizer = load_minilm()
    texts = recipe_texts(args)[: args.texts]
    samples = [t for t in _samples(tokenizer, texts)]
    batches = text_batches(tokenizer, samples, DEFAULT_BATCH)
    teacher = copy.deepcopy(model)
    hf_tokred.apply(model, {"method": method, **config_options(args)})
    losses = run(model, batches, args, teacher)
    print(f"{method}: trained {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if args.finetune_steps > 0:
        tuned = fine_tune_reduced(model, batches, teacher=teacher, steps=args.finetune_steps, lr=args.finetune_lr,
                                  seed=args.seed, progress=not args.no_progress)
        print(f"{method}: fine-tuned the backbone {len(tuned)} steps, loss {tuned[0]:.5f} -> {tuned[-1]:.5f}")
    output = recipe_output(args, f"minilm-{method}")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"saved to {output}")
    return 0


def _samples(tokenizer, texts: list[str]):
    """Texts as benchmark samples: each truncated to the largest benchmark length it fills (64..256 tokens)."""
    from hf_tokred.bench.encoders import TEXT_LENGTHS, TextSample

    for text in texts:
        count = len(tokenizer(text, truncation=False)["input_ids"])
        fitting = [n for n in TEXT_LENGTHS if n <= count]
        if fitting:
            yield TextSample(fitting[-1], text)


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train avit`` (halting heads on MiniLM, then optionally the backbone through the halting).

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_train_command(sub)
    """

    def options(parser):
        parser.add_argument("--target-depth", type=float, default=0.7, help="mean fraction of the blocks a token runs "
                                                                            "through (default: 0.7)")
        parser.add_argument("--layers", type=int, nargs="*", default=None, help="blocks before which tokens may halt")
        parser.add_argument("--no-restore", action="store_true", help="drop halted tokens from last_hidden_state")
        parser.add_argument("--select", choices=SELECTS, default="top_k",
                            help="inference halting: top_k halts the prior's share of every row (default, the better "
                                 "on MiniLM: docs/encoders.md), threshold the paper's 1 - eps rule")

    def config_options(args):
        options = {"target_depth": args.target_depth, "restore_length": not args.no_restore, "select": args.select}
        if args.layers is not None:
            options["layers"] = args.layers
        return options

    def run(model, batches, args, teacher):
        return train_avit(model, batches, teacher=teacher, steps=args.steps, lr=args.lr, shuffle=True, seed=args.seed,
                          progress=not args.no_progress)

    add_encoder_train_command(subparsers, "avit", paper="A-ViT (arXiv 2112.07658)", steps=200, lr=5e-3,
                              options=options, run=run, config_options=config_options)


__all__ = ["add_encoder_train_command", "add_train_command", "avit_loss", "dense_reference", "learned_part",
           "logits_kl", "train_avit", "train_heads"]
