"""Training utilities for learned reductions: DynamicViT predictors (arXiv 2106.02034).

Three ways to train, all sharing :func:`dynamicvit_loss`:

* :func:`train_dynamicvit`: a plain PyTorch loop over a list of batches (what ``hf-tokred encoders`` uses);
* :class:`DynamicViTTrainer`: a ``transformers.Trainer`` whose ``compute_loss`` is :func:`dynamicvit_loss`;
* your own loop (e.g. with ``accelerate``): call :func:`dynamicvit_loss` and backpropagate.

After the predictors, :func:`fine_tune_reduced` can fine-tune the backbone through the *hard* reduction
(predictors fixed, exactly the inference graph, fused tokens included) on :func:`pooled_cosine_loss`, the
cosine of the size-weighted sentence embedding to the dense one.

The loss is the paper's, computed against the **dense model** as teacher:

``loss = ratio_weight * ratio + distill_weight * (token MSE [+ KL on logits]) + pooled_weight * (1 - cos)
[+ task loss when the batch has labels]``

* *ratio*: mean over stages of ``(kept fraction - keep_rate**s)**2`` (the paper's ratio loss);
* *token MSE*: mean squared error between the student's and the teacher's last hidden states on the
  tokens the student keeps (the paper's token distillation); with ``restore_length=True`` on every real
  token, a dropped token contributing the state it had when dropped (what ``restore_length`` returns);
* *KL on logits*: when the model returns ``logits`` (e.g. ``ViTForImageClassification``), KL divergence of
  the student's from the teacher's (the paper's output distillation);
* *pooled cosine*: 1 - cosine similarity of the kept-token mean (with ``restore_length``: the mean of the
  restored sequence) of the student's last hidden state and the dense masked mean (for mean-pooled sentence encoders such as all-MiniLM-L6-v2; weight 0 turns it off).

The teacher is the same model run densely (the reduction skipped for that pass, predictors untouched),
which is right when the backbone is frozen (the default of :func:`train_dynamicvit`). When you train the
backbone too, pass a frozen copy as ``teacher``.

Example:
    >>> import hf_tokred
    >>> from hf_tokred.training import train_dynamicvit
    >>> model = hf_tokred.apply(bert, {"method": "dynamicvit", "keep_rate": 0.7})            # doctest: +SKIP
    >>> losses = train_dynamicvit(model, batches, steps=50)                                   # doctest: +SKIP
    >>> model.eval()(**batches[0]).last_hidden_state.shape[1] < batches[0]["input_ids"].shape[1]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import Trainer

from .errors import TokenReductionError
from .integration.wiring import MODULES_ATTR, get_applied


def _reducer(model):
    applied = get_applied(model)
    reducer = None if applied is None else applied.config.get("sequence")
    if reducer is None or reducer.method != "dynamicvit":
        raise TokenReductionError(
            f"{type(model).__name__} has no dynamicvit reduction attached; apply one first: "
            "hf_tokred.apply(model, {'method': 'dynamicvit', 'keep_rate': 0.7})"
        )
    return reducer


def predictors(model) -> torch.nn.Module:
    """The DynamicViT predictors attached to ``model`` (``model.hf_tokred_modules["dynamicvit"]``).

    Example:
        >>> params = predictors(model).parameters()                   # doctest: +SKIP
    """
    _reducer(model)
    return model._modules[MODULES_ATTR]["dynamicvit"]


@contextlib.contextmanager
def dense_pass(model):
    """Within this block the attached DynamicViT reduction does nothing: the model runs densely (the teacher).

    Example:
        >>> with dense_pass(model), torch.no_grad():                  # doctest: +SKIP
        ...     teacher_out = model(**batch)
    """
    reducer = _reducer(model)
    previous = getattr(reducer, "_dense", False)
    reducer._dense = True
    try:
        yield model
    finally:
        reducer._dense = previous


def _last_hidden(outputs) -> torch.Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        states = getattr(outputs, "hidden_states", None)
        if not states:
            raise TokenReductionError("dynamicvit_loss: the model output has neither last_hidden_state nor hidden_states")
        hidden = states[-1]
    return hidden


def _model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "labels"}


def dynamicvit_loss(model, inputs: dict, *, teacher=None, ratio_weight: float = 2.0, distill_weight: float = 0.5,
                    pooled_weight: float = 1.0, return_outputs: bool = False):
    """The DynamicViT training loss of one batch (see the module docstring); the predictors must be in training mode.

    ``inputs`` are the model's keyword inputs; ``labels`` (if present) add the model's own task loss.
    Returns the loss, or ``(loss, outputs)`` with ``return_outputs``. ``outputs.loss_parts`` is not set;
    the parts are returned in ``outputs["loss_parts"]`` when ``return_outputs`` is True.

    Example:
        >>> predictors(model).train()                                  # doctest: +SKIP
        >>> loss = dynamicvit_loss(model, batch)                       # doctest: +SKIP
        >>> loss.backward()                                            # doctest: +SKIP
    """
    from .methods.encoder.dynamicvit import ratio_loss, stage_records

    if not predictors(model).training:
        raise TokenReductionError("dynamicvit_loss: the predictors are in eval mode (hard drop); call model.train() "
                                  "or predictors(model).train() first")
    model_inputs = _model_inputs(inputs)
    want_hidden = {"output_hidden_states": True}
    with torch.no_grad():
        if teacher is None:
            with dense_pass(model):
                reference = model(**model_inputs, **want_hidden)
        else:
            reference = teacher(**model_inputs, **want_hidden)
    outputs = model(**inputs, **want_hidden)
    records = stage_records(model)
    ratio = ratio_loss(records)
    policy = records[-1].policy
    student, target = _last_hidden(outputs), _last_hidden(reference).detach()
    if student.shape != target.shape:
        raise TokenReductionError("dynamicvit_loss: student and teacher hidden states differ in shape; the teacher must "
                                  "be the same architecture and the student must run in training mode (soft masks)")
    mask = inputs.get("attention_mask")
    real = torch.ones_like(policy) if mask is None or mask.dim() != 2 else mask.to(policy.dtype)
    if _reducer(model).restore_length:
        # What restore_length returns at inference: a token dropped before block b keeps its state at b's input.
        states = outputs.hidden_states
        blocks = predictors(model).blocks
        kept = policy[..., None]
        restored = student * kept
        previous = torch.ones_like(policy)
        for record, block in zip(records, blocks):
            dropped_here = (previous - record.policy)[..., None]
            restored = restored + states[block] * dropped_here
            previous = record.policy
        student = restored
        weight = real[..., None]
    else:
        weight = (policy * real)[..., None]
    token = ((student - target).square() * weight).sum() / (weight.sum() * student.shape[-1]).clamp_min(1.0)
    parts = {"ratio": ratio, "token_mse": token}
    loss = ratio_weight * ratio + distill_weight * token
    student_logits, teacher_logits = getattr(outputs, "logits", None), getattr(reference, "logits", None)
    if student_logits is not None and teacher_logits is not None:
        kl = torch.nn.functional.kl_div(student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1),
                                        reduction="batchmean", log_target=True)
        parts["logits_kl"] = kl
        loss = loss + distill_weight * kl
    if pooled_weight:
        pooled = (student * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-6)
        dense = (target * real[..., None]).sum(dim=1) / real[..., None].sum(dim=1).clamp_min(1e-6)
        cosine = torch.nn.functional.cosine_similarity(pooled.float(), dense.float(), dim=-1)
        parts["pooled_cos"] = 1 - cosine.mean()
        loss = loss + pooled_weight * parts["pooled_cos"]
    task = getattr(outputs, "loss", None)
    if task is not None and "labels" in inputs:
        parts["task"] = task
        loss = loss + task
    if return_outputs:
        outputs["loss_parts"] = {k: v.detach() for k, v in parts.items()}
        return loss, outputs
    return loss


def freeze_backbone(model) -> list[torch.nn.Parameter]:
    """Freeze every parameter of ``model`` but the DynamicViT predictors; returns the trainable ones.

    Example:
        >>> params = freeze_backbone(model)                            # doctest: +SKIP
    """
    learned = predictors(model)
    trainable = {id(p) for p in learned.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    return list(learned.parameters())


LR_SCHEDULES = ("constant", "linear", "cosine")


def _check_schedule(name: str, lr_schedule: str) -> None:
    if lr_schedule not in LR_SCHEDULES:
        raise TokenReductionError(f"{name}: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")


def lr_factor(lr_schedule: str, step: int, steps: int) -> float:
    """The learning-rate multiplier of ``step`` (0-based) of ``steps``: 1 (constant), a linear or a cosine decay to 0.

    Example:
        >>> from hf_tokred.training import lr_factor
        >>> [round(lr_factor("linear", s, 4), 2) for s in range(4)], lr_factor("cosine", 0, 4)
        ([1.0, 0.75, 0.5, 0.25], 1.0)
    """
    _check_schedule("lr_factor", lr_schedule)
    if lr_schedule == "linear":
        return 1.0 - step / steps
    if lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return 1.0


def _batch_order(count: int, steps: int, shuffle: bool, generator: torch.Generator) -> list[int]:
    """Which batch each step uses: cycling in order, or through a fresh seeded permutation every pass."""
    if not shuffle:
        return [step % count for step in range(steps)]
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(count, generator=generator).tolist()
    return order[:steps]


def _check_loop(name: str, batches, steps: int, lr: float, lr_schedule: str) -> None:
    if not batches:
        raise TokenReductionError(f"{name}: batches is empty")
    if steps < 1:
        raise TokenReductionError(f"{name}: steps must be >= 1, got {steps}")
    if not lr > 0:
        raise TokenReductionError(f"{name}: lr must be > 0, got {lr}")
    _check_schedule(name, lr_schedule)


def train_dynamicvit(model, batches: list[dict], *, steps: int = 100, lr: float = 3e-3, train_backbone: bool = False,
                     teacher=None, backbone_lr: float | None = None, ratio_weight: float = 2.0,
                     distill_weight: float = 0.5, pooled_weight: float = 1.0, lr_schedule: str = "constant",
                     shuffle: bool = False, seed: int = 0, log_every: int = 0, log=print) -> list[float]:
    """Train the DynamicViT predictors of ``model`` (already reduced with ``dynamicvit``) on ``batches``.

    Runs ``steps`` AdamW steps, cycling through ``batches`` (dicts of model inputs; with ``shuffle`` through a new
    seeded permutation of them every pass), at a learning rate that stays constant or decays to 0
    (``lr_schedule``: ``"constant"``, ``"linear"``, ``"cosine"``, for every parameter group).
    With the backbone frozen (default) only the predictors train and the teacher is
    the same model run densely. With ``train_backbone=True`` the backbone trains too, at ``backbone_lr``
    (default ``lr / 100``, the paper's ratio of backbone to predictor learning rate), distilled from ``teacher``,
    a separate frozen dense model (e.g. a copy made before ``apply``); the changed weights then save to
    ``model.safetensors`` as usual. The backbone's modules stay in eval mode either way (no dropout: the
    targets are a deterministic teacher's). Leaves the model in eval mode (hard drop) and returns the loss of
    every step.

    Example:
        >>> import hf_tokred
        >>> from hf_tokred.training import train_dynamicvit
        >>> hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.7})          # doctest: +SKIP
        >>> losses = train_dynamicvit(model, batches, steps=60)                         # doctest: +SKIP
        >>> model.save_pretrained("minilm-dynamicvit")     # predictors -> token_reduction.safetensors  # doctest: +SKIP
    """
    _check_loop("train_dynamicvit", batches, steps, lr, lr_schedule)
    if backbone_lr is not None and not (train_backbone and backbone_lr > 0):
        raise TokenReductionError(f"train_dynamicvit: backbone_lr must be > 0 and needs train_backbone=True, got "
                                  f"backbone_lr={backbone_lr}, train_backbone={train_backbone}")
    learned = predictors(model)
    groups = [{"params": freeze_backbone(model), "lr": lr}]
    if train_backbone:
        if teacher is None or teacher is model:
            raise TokenReductionError("train_dynamicvit: training the backbone needs a separate frozen teacher model "
                                      "(e.g. copy.deepcopy(model) made before hf_tokred.apply)")
        trainable = {id(p) for p in groups[0]["params"]}
        backbone = [p for p in model.parameters() if id(p) not in trainable]
        for parameter in backbone:
            parameter.requires_grad_(True)
        groups.append({"params": backbone, "lr": lr / 100 if backbone_lr is None else backbone_lr, "weight_decay": 0.0})
    model.eval()
    learned.train()

    def step_loss(index: int) -> torch.Tensor:
        return dynamicvit_loss(model, batches[index], teacher=teacher, ratio_weight=ratio_weight,
                               distill_weight=distill_weight, pooled_weight=pooled_weight)

    return _optimize(model, groups, step_loss, len(batches), steps=steps, lr_schedule=lr_schedule, shuffle=shuffle,
                     seed=seed, log_every=log_every, log=log, label="step", digits=4)


def _optimize(model, groups: list[dict], step_loss, batch_count: int, *, steps: int, lr_schedule: str, shuffle: bool,
              seed: int, log_every: int, log, label: str, digits: int) -> list[float]:
    """The AdamW loop both trainers share: ``steps`` steps of ``step_loss(batch_index)`` over ``groups`` with the
    ``lr_schedule`` decay and the batch order of :func:`_batch_order`, under ``seed`` (the global RNG is restored
    afterwards); leaves every parameter frozen and the model in eval mode. Returns the loss of every step."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(groups)
    base = [group["lr"] for group in optimizer.param_groups]
    order = _batch_order(batch_count, steps, shuffle, torch.Generator().manual_seed(seed))
    losses = []
    try:
        for step in range(steps):
            for group, group_lr in zip(optimizer.param_groups, base):
                group["lr"] = group_lr * lr_factor(lr_schedule, step, steps)
            loss = step_loss(order[step])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                log(f"{label} {step + 1}/{steps}: loss {losses[-1]:.{digits}f}")
    finally:
        torch.random.set_rng_state(generator_state)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return losses


def pooled_cosine_loss(model, inputs: dict, teacher) -> torch.Tensor:
    """1 - mean cosine of the reduced model's sentence embeddings to the dense ``teacher``'s, through the hard reduction.

    The student's embedding is what the benchmark and sentence-transformers compute at inference: the mean of
    ``last_hidden_state`` weighted by :func:`~hf_tokred.integration.encoders.token_sizes` (a fused token counts
    once per token it holds, a dropped one not at all); the teacher's is the attention-masked mean.

    Example:
        >>> loss = pooled_cosine_loss(model, batch, teacher)           # doctest: +SKIP
        >>> loss.backward()                                            # doctest: +SKIP
    """
    model_inputs = _model_inputs(inputs)
    return _pooled_cosine(model, model_inputs, _dense_embedding(teacher, model_inputs))


def _real_mask(model_inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
    mask = model_inputs.get("attention_mask")
    return torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if mask is None else mask.to(hidden.dtype)


def _dense_embedding(teacher, model_inputs: dict) -> torch.Tensor:
    """The teacher's attention-masked mean of ``last_hidden_state`` (no gradients)."""
    with torch.no_grad():
        dense = _last_hidden(teacher(**model_inputs))
        real = _real_mask(model_inputs, dense)
        return (dense * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp_min(1e-6)


def _pooled_cosine(model, model_inputs: dict, dense: torch.Tensor) -> torch.Tensor:
    from .integration.encoders import token_sizes

    hidden = _last_hidden(model(**model_inputs))
    real = _real_mask(model_inputs, hidden)
    # nothing reduced (e.g. keep_rate=1.0): the masked mean; else each output token weighs as the tokens it holds
    sizes = real if hidden.shape[1] == real.shape[1] else token_sizes(model).to(hidden.dtype)
    pooled = (hidden * sizes[..., None]).sum(dim=1) / sizes.sum(dim=1, keepdim=True).clamp_min(1e-6)
    return 1 - torch.nn.functional.cosine_similarity(pooled.float(), dense.float(), dim=-1).mean()


def fine_tune_reduced(model, batches: list[dict], *, teacher, steps: int = 100, lr: float = 3e-5,
                      lr_schedule: str = "linear", shuffle: bool = True, seed: int = 0, log_every: int = 0,
                      log=print) -> list[float]:
    """Fine-tune the backbone of a DynamicViT-reduced ``model`` through its *hard* reduction (predictors fixed).

    The predictors stay in eval mode, so every step runs exactly the inference graph: each stage drops (or,
    with ``fuse=True``, fuses) the tokens its predictor ranks lowest, and the backbone (AdamW at ``lr``,
    ``lr_schedule`` decay, no weight decay) learns to give the sentence embedding of the remaining tokens
    (:func:`pooled_cosine_loss`) the direction of the dense ``teacher``'s (a separate frozen model, e.g. a
    copy made before ``hf_tokred.apply``). Run it after :func:`train_dynamicvit` has trained the predictors.
    This is the fuse-aware part: the fused token's size weighs in the loss as it does at inference.
    ``batches`` are visited in a new seeded order every pass (``shuffle``). Leaves every parameter frozen
    and the model in eval mode; returns the loss of every step.

    Example:
        >>> teacher = copy.deepcopy(model)                                                 # doctest: +SKIP
        >>> hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5, "fuse": True})  # doctest: +SKIP
        >>> train_dynamicvit(model, batches, steps=200)                                    # doctest: +SKIP
        >>> losses = fine_tune_reduced(model, batches, teacher=teacher, steps=300)         # doctest: +SKIP
    """
    _check_loop("fine_tune_reduced", batches, steps, lr, lr_schedule)
    learned = predictors(model)
    if teacher is None or teacher is model:
        raise TokenReductionError("fine_tune_reduced: needs a separate frozen dense teacher model (e.g. "
                                  "copy.deepcopy(model) made before hf_tokred.apply)")
    trainable = {id(p) for p in learned.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in trainable]
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in trainable)
    model.eval()  # the backbone without dropout, the predictors in eval mode: the hard drop of inference
    dense: dict[int, torch.Tensor] = {}  # the frozen teacher's embeddings, computed once per batch

    def step_loss(index: int) -> torch.Tensor:
        inputs = _model_inputs(batches[index])
        if index not in dense:
            dense[index] = _dense_embedding(teacher, inputs)
        return _pooled_cosine(model, inputs, dense[index])

    return _optimize(model, [{"params": backbone, "lr": lr, "weight_decay": 0.0}], step_loss, len(batches),
                     steps=steps, lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every, log=log,
                     label="fine-tune step", digits=5)


class DynamicViTTrainer(Trainer):
    """A ``transformers.Trainer`` that trains DynamicViT predictors with :func:`dynamicvit_loss`.

    Extra keyword arguments: ``teacher`` (a frozen dense model; default: the same model run densely,
    right when only the predictors train), ``ratio_weight``, ``distill_weight``, ``pooled_weight``.
    Freeze the backbone first (:func:`freeze_backbone`) to train only the predictors. Save with
    ``trainer.save_model()`` / ``model.save_pretrained``: the predictors go to ``token_reduction.safetensors``.

    Example:
        >>> from hf_tokred.training import DynamicViTTrainer, freeze_backbone
        >>> freeze_backbone(model)                                                  # doctest: +SKIP
        >>> trainer = DynamicViTTrainer(model=model, args=args, train_dataset=ds)    # doctest: +SKIP
        >>> trainer.train()                                                         # doctest: +SKIP
    """

    def __init__(self, *args, teacher=None, ratio_weight: float = 2.0, distill_weight: float = 0.5,
                 pooled_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.loss_weights = {"ratio_weight": ratio_weight, "distill_weight": distill_weight,
                             "pooled_weight": pooled_weight}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return dynamicvit_loss(self.accelerator.unwrap_model(model), inputs, teacher=self.teacher,
                               return_outputs=return_outputs, **self.loss_weights)


__all__ = ["LR_SCHEDULES", "DynamicViTTrainer", "dense_pass", "dynamicvit_loss", "fine_tune_reduced", "freeze_backbone",
           "lr_factor", "pooled_cosine_loss", "predictors", "train_dynamicvit"]
