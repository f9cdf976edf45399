"""Training utilities for learned reductions: DynamicViT predictors (arXiv 2106.02034).

Three ways to train, all sharing :func:`dynamicvit_loss`:

* :func:`train_dynamicvit`: a plain PyTorch loop over a list of batches (what ``hf-tokred encoders`` uses);
* :class:`DynamicViTTrainer`: a ``transformers.Trainer`` whose ``compute_loss`` is :func:`dynamicvit_loss`;
* your own loop (e.g. with ``accelerate``): call :func:`dynamicvit_loss` and backpropagate.

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


def train_dynamicvit(model, batches: list[dict], *, steps: int = 100, lr: float = 3e-3, train_backbone: bool = False,
                     teacher=None, backbone_lr: float | None = None, ratio_weight: float = 2.0,
                     distill_weight: float = 0.5, pooled_weight: float = 1.0, seed: int = 0, log_every: int = 0,
                     log=print) -> list[float]:
    """Train the DynamicViT predictors of ``model`` (already reduced with ``dynamicvit``) on ``batches``.

    Runs ``steps`` AdamW steps at a constant learning rate, cycling through ``batches`` (dicts of model inputs).
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
    if not batches:
        raise TokenReductionError("train_dynamicvit: batches is empty")
    if steps < 1:
        raise TokenReductionError(f"train_dynamicvit: steps must be >= 1, got {steps}")
    if not lr > 0:
        raise TokenReductionError(f"train_dynamicvit: lr must be > 0, got {lr}")
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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(groups)
    losses = []
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            loss = dynamicvit_loss(model, batch, teacher=teacher, ratio_weight=ratio_weight,
                                   distill_weight=distill_weight, pooled_weight=pooled_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                log(f"step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    finally:
        torch.random.set_rng_state(generator_state)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return losses


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


__all__ = ["DynamicViTTrainer", "dense_pass", "dynamicvit_loss", "freeze_backbone", "predictors", "train_dynamicvit"]
