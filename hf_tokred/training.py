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
import json
import math
import os

import torch
from transformers import Trainer

from .errors import ConfigError, TokenReductionError
from .integration.wiring import MODULES_ATTR, get_applied
from .recipes import mean_ends

# The learned sequence reducers the shared helpers below serve, with the config the error message suggests.
_SEQUENCE_EXAMPLES = {"dynamicvit": "{'method': 'dynamicvit', 'keep_rate': 0.7}",
                      "madtp": "{'method': 'madtp', 'keep': 0.5}"}


def _reducer(model, method: str = "dynamicvit"):
    """The attached sequence-stage reducer ``method`` (dynamicvit or madtp), or a TokenReductionError saying how to
    attach one."""
    applied = get_applied(model)
    reducer = None if applied is None else applied.config.get("sequence")
    if reducer is None or reducer.method != method:
        raise TokenReductionError(
            f"{type(model).__name__} has no {method} reduction attached; apply one first: "
            f"hf_tokred.apply(model, {_SEQUENCE_EXAMPLES[method]})"
        )
    return reducer


def predictors(model) -> torch.nn.Module:
    """The DynamicViT predictors attached to ``model`` (``model.hf_tokred_modules["dynamicvit"]``).

    Example:
        >>> params = predictors(model).parameters()                   # doctest: +SKIP
    """
    _reducer(model)
    return model._modules[MODULES_ATTR]["dynamicvit"]


def _sequence_reducer(model, what: str):
    """The attached sequence-stage reducer, or a TokenReductionError saying how to attach one."""
    applied = get_applied(model)
    reducer = None if applied is None else applied.config.get("sequence")
    if reducer is None:
        raise TokenReductionError(f"{what}: {type(model).__name__} has no sequence reduction attached; apply one first, "
                                  "e.g. hf_tokred.apply(model, {'method': 'dynamicvit', 'keep_rate': 0.7})")
    return reducer


@contextlib.contextmanager
def dense_pass(model):
    """Within this block the attached sequence reducer (any encoder method: DynamicViT, MADTP, ToMe, ...) does
    nothing: the model runs densely (the teacher of a distillation loss).

    Example:
        >>> with dense_pass(model), torch.no_grad():                  # doctest: +SKIP
        ...     teacher_out = model(**batch)
    """
    reducer = _sequence_reducer(model, "dense_pass")
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
                     shuffle: bool = False, seed: int = 0, log_every: int = 0, log=print,
                     progress: bool = True) -> list[float]:
    """Train the DynamicViT predictors of ``model`` (already reduced with ``dynamicvit``) on ``batches``.

    Runs ``steps`` AdamW steps, cycling through ``batches`` (dicts of model inputs; with ``shuffle`` through a new
    seeded permutation of them every pass), at a learning rate that stays constant or decays to 0
    (``lr_schedule``: ``"constant"``, ``"linear"``, ``"cosine"``, for every parameter group).
    With the backbone frozen (default) only the predictors train and the teacher is
    the same model run densely. With ``train_backbone=True`` the backbone trains too, at ``backbone_lr``
    (default ``lr / 100``, the paper's ratio of backbone to predictor learning rate), distilled from ``teacher``,
    a separate frozen dense model (e.g. a copy made before ``apply``); the changed weights then save to
    ``model.safetensors`` as usual. The backbone's modules stay in eval mode either way (no dropout: the
    targets are a deterministic teacher's). A tqdm bar shows the steps unless ``progress=False`` or ``log_every``
    logs a line every ``log_every`` steps. Leaves the model in eval mode (hard drop) and returns the loss of
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
                     seed=seed, log_every=log_every, log=log, label="step", digits=4, progress=progress,
                     desc="train dynamicvit")


def _optimize(model, groups: list[dict], step_loss, batch_count: int, *, steps: int, lr_schedule: str, shuffle: bool,
              seed: int, log_every: int, log, label: str, digits: int, progress: bool = True,
              desc: str | None = None) -> list[float]:
    """The AdamW loop every step-based trainer shares: ``steps`` steps of ``step_loss(batch_index)`` over ``groups``
    with the ``lr_schedule`` decay and the batch order of :func:`_batch_order`, under ``seed`` (the global RNG is
    restored afterwards); a tqdm bar named ``desc`` (default ``label``) with the last loss, unless ``progress`` is
    False or ``log_every`` logs a line every ``log_every`` steps instead. Leaves every parameter frozen and the model
    in eval mode. Returns the loss of every step."""
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=desc or label, unit="step", disable=not progress or bool(log_every))
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
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.{digits}f}", refresh=False)
            if log_every and (step + 1) % log_every == 0:
                log(f"{label} {step + 1}/{steps}: loss {losses[-1]:.{digits}f}")
    finally:
        bar.close()
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
    # each output token weighs as the input tokens it holds (0 for padding); without a sequence state (a reducer
    # with its own wiring) the attention mask, when there is one
    try:
        sizes = token_sizes(model).to(hidden.dtype)
    except TokenReductionError:
        sizes = None
    if sizes is None or sizes.shape != hidden.shape[:2]:
        sizes = _real_mask(model_inputs, hidden)
    pooled = (hidden * sizes[..., None]).sum(dim=1) / sizes.sum(dim=1, keepdim=True).clamp_min(1e-6)
    return 1 - torch.nn.functional.cosine_similarity(pooled.float(), dense.float(), dim=-1).mean()


def fine_tune_reduced(model, batches: list[dict], *, teacher, steps: int = 100, lr: float = 3e-5,
                      lr_schedule: str = "linear", shuffle: bool = True, seed: int = 0, log_every: int = 0,
                      log=print, progress: bool = True) -> list[float]:
    """Fine-tune the backbone of a reduced ``model`` through its *hard* reduction (learned parts fixed).

    Works for every encoder sequence reducer: the learned parts (``model.hf_tokred_modules``: DynamicViT's
    predictors, A-ViT's halting heads, ...) stay frozen in eval mode, so every step runs exactly the inference
    graph (each stage drops, fuses or merges what it would at inference), and the backbone (AdamW at ``lr``,
    ``lr_schedule`` decay, no weight decay) learns to give the sentence embedding of the reduced sequence
    (:func:`pooled_cosine_loss`) the direction of the dense ``teacher``'s (a separate frozen model, e.g. a copy
    made before ``hf_tokred.apply``). For a learned method run it after the method's own trainer (e.g.
    :func:`train_dynamicvit`); for a training-free one (ToMe) it adapts the backbone to the reduction. The
    size of a fused or merged token weighs in the loss as it does at inference. ``batches`` are visited in a
    new seeded order every pass (``shuffle``); a tqdm bar unless ``progress=False`` or ``log_every``. Leaves every
    parameter frozen and the model in eval mode; returns the loss of every step.

    Example:
        >>> teacher = copy.deepcopy(model)                                                 # doctest: +SKIP
        >>> hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5, "fuse": True})  # doctest: +SKIP
        >>> train_dynamicvit(model, batches, steps=200)                                    # doctest: +SKIP
        >>> losses = fine_tune_reduced(model, batches, teacher=teacher, steps=300)         # doctest: +SKIP
    """
    _check_loop("fine_tune_reduced", batches, steps, lr, lr_schedule)
    _sequence_reducer(model, "fine_tune_reduced")
    learned = model._modules.get(MODULES_ATTR) or torch.nn.ModuleDict()
    if teacher is None or teacher is model:
        raise TokenReductionError("fine_tune_reduced: needs a separate frozen dense teacher model (e.g. "
                                  "copy.deepcopy(model) made before hf_tokred.apply)")
    learned_ids = {id(p) for p in learned.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in learned_ids]
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in learned_ids)
    model.eval()  # the backbone without dropout, the learned parts in eval mode: the hard reduction of inference
    dense: dict[int, torch.Tensor] = {}  # the frozen teacher's embeddings, computed once per batch

    def step_loss(index: int) -> torch.Tensor:
        inputs = _model_inputs(batches[index])
        if index not in dense:
            dense[index] = _dense_embedding(teacher, inputs)
        return _pooled_cosine(model, inputs, dense[index])

    return _optimize(model, [{"params": backbone, "lr": lr, "weight_decay": 0.0}], step_loss, len(batches),
                     steps=steps, lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every, log=log,
                     label="fine-tune step", digits=5, progress=progress, desc="fine-tune backbone")


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


# ---------------------------------------------------------------------------------------------
# LLMLingua-2 (arXiv 2403.12968): a token classifier distilled from a compressor's keep/drop decisions
# ---------------------------------------------------------------------------------------------
#
# The paper labels MeetingBank words with GPT-4's extractive compressions and fine-tunes XLM-RoBERTa-large
# on them. The recipe here labels *your* texts with this package's own ``llmlingua`` (or any registered
# prompt compressor; default scorer the embedded SmolLM2) and fine-tunes, by default, the embedded
# all-MiniLM-L6-v2 as a two-label ``BertForTokenClassification``. The folder it writes is what
# ``compress_prompt(method="llmlingua2", classifier=folder)`` loads, and pushes to the Hub like any model.

LLMLINGUA2_LABELS = {0: "drop", 1: "keep"}
LLMLINGUA2_STATE = "llmlingua2_training.json"
_CHECKPOINT = "checkpoint"


def read_paragraphs(path: str) -> list[str]:
    """The paragraphs (separated by blank lines) of a UTF-8 text file, for a recipe's ``--corpus``.

    Raises :class:`~hf_tokred.errors.MissingFileError` naming the file when it cannot be read.

    Example:
        >>> from hf_tokred.training import read_paragraphs
        >>> read_paragraphs("notes.txt")[:1]                                    # doctest: +SKIP
        ['The first paragraph.']
    """
    from .errors import MissingFileError

    try:
        with open(path, encoding="utf-8") as f:
            return [p.strip() for p in f.read().split("\n\n") if p.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise MissingFileError(f"--corpus: cannot read {path!r} ({getattr(err, 'strerror', None) or err})") from None


def stdlib_corpus(split: str = "train", *, min_words: int = 30, max_words: int = 250,
                  heldout_fraction: float = 0.2) -> list[str]:
    """Prose paragraphs of the Python documentation shipped with the standard library (``pydoc_data.topics``).

    Paragraphs (blank-line separated) of every topic, whitespace collapsed to single spaces, kept when they
    hold ``min_words`` to ``max_words`` words and are prose (not indented code, not ``>>>`` sessions),
    without duplicates, in topic order. A paragraph belongs to ``"heldout"`` when the SHA-256 of its text
    falls in the first ``heldout_fraction`` of the hash range, else to ``"train"``: deterministic on every
    machine, and a paragraph never changes split when others are added or removed. About 360 paragraphs
    at the defaults (the exact count depends on the Python version's documentation).

    Example:
        >>> from hf_tokred.training import stdlib_corpus
        >>> train, heldout = stdlib_corpus("train"), stdlib_corpus("heldout")
        >>> len(train) > len(heldout) > 0 and not set(train) & set(heldout)
        True
    """
    import hashlib
    import re
    from pydoc_data.topics import topics

    from .errors import ConfigError

    if split not in ("train", "heldout"):
        raise ConfigError(f"split: expected 'train' or 'heldout', got {split!r}", field="split")
    if not (isinstance(min_words, int) and isinstance(max_words, int) and 1 <= min_words <= max_words):
        raise ConfigError(f"min_words, max_words: expected ints with 1 <= min_words <= max_words, got {min_words}, "
                          f"{max_words}", field="min_words")
    if not (isinstance(heldout_fraction, (int, float)) and 0.0 < heldout_fraction < 1.0):
        raise ConfigError(f"heldout_fraction: expected a number in (0, 1), got {heldout_fraction!r}",
                          field="heldout_fraction")
    out, seen = [], set()
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.splitlines()
            if not lines or any(line.startswith((" ", "\t")) for line in lines) or ">>>" in block:
                continue
            text = " ".join(block.split())
            words = len(text.split())
            if not min_words <= words <= max_words or text in seen:
                continue
            seen.add(text)
            letters = sum(c.isalpha() for c in text)
            if letters < 0.6 * len(text):
                continue
            position = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64
            if (position < heldout_fraction) == (split == "heldout"):
                out.append(text)
    return out


def _unit_spans(text: str) -> list[tuple[int, int]]:
    from .prompt.base import _UNIT

    return [(m.start(), m.end()) for m in _UNIT.finditer(text)]


def _align_kept(text: str, compressed: str) -> list[int]:
    """Keep (1) / drop (0) per unit of ``text``: the units whose words make up ``compressed``, in order.

    The compressed text is a subsequence of the units, so each of its words is matched to the next unit of
    ``text`` with the same word (the earliest one when a word repeats).
    """
    from .errors import TokenReductionError

    words = [text[s:e].strip() for s, e in _unit_spans(text)]
    kept = [compressed[s:e].strip() for s, e in _unit_spans(compressed)]
    labels, u = [0] * len(words), 0
    for word in kept:
        while u < len(words) and words[u] != word:
            u += 1
        if u == len(words):
            raise TokenReductionError(f"llmlingua2_labels: the compressed text is not a subsequence of the original "
                                      f"(no match for {word!r}); the labelling method must be extractive")
        labels[u] = 1
        u += 1
    return labels


def llmlingua2_labels(texts: list[str], rate: float = 0.5, method="llmlingua", scorer=None, *, tokenizer=None,
                      progress: bool = False, **method_params) -> list[dict]:
    """Keep/drop labels for every word of ``texts`` from a prompt compressor's decisions (LLMLingua-2's data).

    Each text is compressed on its own with ``hf_tokred.compress_prompt(text, rate=rate, method=method,
    scorer=scorer, tokenizer=tokenizer, **method_params)`` (default: ``llmlingua`` on the embedded
    SmolLM2-135M-Instruct, ``<keep>`` markers read as plain text; a config as ``method`` brings its own
    rate and fields), and the words of the original that
    survive in the compressed prompt are labelled 1. Words are the package's units (a word with the
    whitespace before it); a repeated word's survival is credited to its earliest possible occurrence.
    Returns one dict per text: ``text``, ``words`` (the units without their whitespace), ``labels`` (0/1
    per word) and ``source`` (how the labels were made; :func:`train_llmlingua2` writes it in its model
    card).

    Example:
        >>> from hf_tokred.training import llmlingua2_labels
        >>> [item] = llmlingua2_labels(["The pass key is 12345. Remember it."], rate=0.5)   # doctest: +SKIP
        >>> list(zip(item["words"], item["labels"]))[:3]                                   # doctest: +SKIP
        [('The', 0), ('pass', 1), ('key', 1)]
    """
    import dataclasses

    from .errors import ConfigError
    from .prompt.base import PromptCompressorConfig, compress_prompt, load_scorer

    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise ConfigError("texts: expected a non-empty list of strings", field="texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"texts[{i}]: expected a non-empty string, got {type(text).__name__}", field="texts")
    if isinstance(method, PromptCompressorConfig):  # a config brings its own rate and fields
        if method_params:
            raise ConfigError("method: pass either a config or method parameters, not both", field="method")
        method = dataclasses.replace(method, keep_markers=False)
        rate = method.rate
    else:
        method_params = {"keep_markers": False, **method_params}
    loaded = load_scorer(scorer, tokenizer)
    name = getattr(method, "method_key", method)
    scorer_name = getattr(loaded.model, "name_or_path", "") or type(loaded.model).__name__
    source = f"{name} at rate {rate} (scorer {scorer_name})"
    from tqdm.auto import tqdm

    out = []
    for text in tqdm(texts, desc="llmlingua2 labels", disable=not progress):
        if isinstance(method, PromptCompressorConfig):
            result = method.compress(text, scorer=loaded)
        else:
            result = compress_prompt(text, rate=rate, method=method, scorer=loaded, **method_params)
        labels = _align_kept(text, result["compressed_prompt"])
        words = [text[s:e].strip() for s, e in _unit_spans(text)]
        out.append({"text": text, "words": words, "labels": labels, "source": source})
    return out


def _check_labelled(items) -> list[dict]:
    from .errors import ConfigError

    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or "labels" not in item:
            raise ConfigError(f"texts_or_labelled[{i}]: expected a dict with 'text' and 'labels' (from "
                              "llmlingua2_labels) or a string", field="texts_or_labelled")
        units, labels = len(_unit_spans(item["text"])), list(item["labels"])
        if len(labels) != units or any(label not in (0, 1, True, False) for label in labels):
            raise ConfigError(f"texts_or_labelled[{i}]: expected one 0/1 label per word ({units} words), got "
                              f"{len(labels)} labels", field="texts_or_labelled")
        if units == 0:
            raise ConfigError(f"texts_or_labelled[{i}]: the text holds no words", field="texts_or_labelled")
    return list(items)


def _llmlingua2_examples(classifier, items: list[dict], subtokens: str) -> tuple[list[tuple[list, list]], int]:
    """Token ids (with the special tokens) and token labels of every chunk of every labelled text, and the
    number of text tokens. A token takes its word's label (``subtokens="all"``) or only a word's first token
    does (``"first"``; the others, like the special tokens, are -100)."""
    from .methods.prompt.llmlingua2 import chunk_spans, token_units

    tokenizer = classifier.tokenizer
    texts = [item["text"] for item in items]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    examples, tokens = [], 0
    for item, ids, offsets in zip(items, enc["input_ids"], enc["offset_mapping"]):
        text = item["text"]
        unit = token_units([e for _, e in _unit_spans(text)], offsets).tolist()
        word_labels = [int(v) for v in item["labels"]]
        token_labels = []
        for t, u in enumerate(unit):
            first = t == 0 or unit[t - 1] != u
            token_labels.append(word_labels[u] if subtokens == "all" or first else -100)
        tokens += len(ids)
        for a, b in chunk_spans(text, offsets, classifier.max_tokens):
            # a word cut by a chunk end (only when one word is longer than a chunk) starts again in the next chunk
            labels = list(token_labels[a:b])
            if subtokens == "first" and labels and labels[0] == -100:
                labels[0] = word_labels[unit[a]]
            examples.append((classifier.before + list(ids[a:b]) + classifier.after,
                             [-100] * len(classifier.before) + labels + [-100] * len(classifier.after)))
    return examples, tokens


def _llmlingua2_model(base, tokenizer, seed: int):
    """A two-label token classifier, its tokenizer and a name for the model card, from ``base``."""
    import os

    from transformers import AutoConfig, AutoModelForTokenClassification

    from .errors import ConfigError, MissingFileError
    from .prompt.base import saved_tokenizer

    labels = {"num_labels": 2, "id2label": dict(LLMLINGUA2_LABELS),
              "label2id": {v: k for k, v in LLMLINGUA2_LABELS.items()}}
    torch.manual_seed(seed)  # the new head's initialization
    if base is None or isinstance(base, (str, os.PathLike)):
        if base is None:
            from .embedded import MINILM_HUB_ID, minilm_path

            folder, name = minilm_path(), MINILM_HUB_ID
        else:
            folder = os.path.abspath(os.path.expanduser(os.fspath(base)))
            name = folder
            if not os.path.isdir(folder):
                raise MissingFileError(f"base: {folder!r} is not a local folder holding an encoder (config.json, "
                                       "model.safetensors, tokenizer files); nothing is downloaded")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        is_classifier = any(a.endswith("ForTokenClassification") for a in (config.architectures or []))
        if is_classifier and config.num_labels != 2:
            raise ConfigError(f"base: {folder!r} is a token classifier with num_labels={config.num_labels}; "
                              "LLMLingua-2 needs two (drop, keep)", field="base")
        try:
            model = AutoModelForTokenClassification.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, **({} if is_classifier else labels))
        except (OSError, ValueError) as err:
            raise MissingFileError(f"base: {folder!r} holds no loadable safetensors encoder ({err})") from None
        return model, tokenizer if tokenizer is not None else saved_tokenizer(folder), name
    if not isinstance(base, torch.nn.Module) or not hasattr(base, "config"):
        raise ConfigError(f"base: expected None (the embedded all-MiniLM-L6-v2), a local folder or a transformers "
                          f"encoder, got {type(base).__name__}", field="base")
    name = getattr(base, "name_or_path", "") or type(base).__name__
    if tokenizer is None:
        tokenizer = saved_tokenizer(base)
    if type(base).__name__.endswith("ForTokenClassification"):
        if base.config.num_labels != 2:
            raise ConfigError(f"base: {type(base).__name__} has num_labels={base.config.num_labels}; LLMLingua-2 "
                              "needs two (drop, keep)", field="base")
        return base, tokenizer, name
    config = base.config.__class__.from_dict({**base.config.to_dict(), **labels})
    try:
        model = AutoModelForTokenClassification.from_config(config)
    except ValueError as err:
        raise ConfigError(f"base: {type(base).__name__} has no token-classification head in transformers ({err})",
                          field="base") from None
    missing, _ = model.base_model.load_state_dict(base.state_dict(), strict=False)
    if missing:
        raise ConfigError(f"base: {type(base).__name__}'s weights do not fit {type(model).__name__}.base_model "
                          f"(missing {missing[:3]})", field="base")
    return model, tokenizer, name


def _fingerprint(items: list[dict], **settings) -> dict:
    import hashlib
    import json

    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item["text"], [int(v) for v in item["labels"]]]).encode("utf-8"))
    return {"data_sha256": digest.hexdigest(), **settings}


def decay_groups(params, weight_decay: float) -> tuple[list[dict], list]:
    """AdamW parameter groups with weight decay on the matrices only (not on biases and norm weights), and the
    parameters in the groups' order (the order the checkpoints store their AdamW moments in).

    Example:
        >>> import torch
        >>> from hf_tokred.training import decay_groups
        >>> groups, params = decay_groups(torch.nn.Linear(4, 2).parameters(), 0.1)
        >>> [g["weight_decay"] for g in groups], [tuple(p.shape) for p in params]
        ([0.1, 0.0], [(2, 4), (2,)])
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], decay + no_decay


def save_trained(output_dir: str, model, tokenizer, state_name: str, state: dict, card: str | None = None) -> None:
    """Write a trained model folder: ``save_pretrained`` of ``model`` and of ``tokenizer`` (unless None), the training
    ``state`` as JSON in ``state_name``, and ``card`` (unless None) as its ``README.md``: the end of every recipe.

    Example:
        >>> save_trained("smollm2-icae", model, tokenizer, "icae_training.json", state, card)  # doctest: +SKIP
    """
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, state_name), "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=1)
    if card is not None:
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(card)


def _save_checkpoint(folder: str, model, optimizer, params: list, state: dict) -> None:
    """Weights, AdamW moments and the RNG state (safetensors) plus the step and losses (JSON), written to a
    temporary folder that then replaces ``folder``: an interrupted save never leaves half a checkpoint."""
    import json
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file, save_model

    parent = os.path.dirname(folder)
    work = tempfile.mkdtemp(prefix=".checkpoint-", dir=parent)
    os.chmod(work, 0o755)  # mkdtemp's 0o700 would make the checkpoint private to its writer
    save_model(model, os.path.join(work, "model.safetensors"), force_contiguous=True)  # tied weights (shared tensors) are stored once
    tensors = {"rng.torch": torch.get_rng_state()}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"adamw.{i}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    save_file(tensors, os.path.join(work, "optimizer.safetensors"))
    with open(os.path.join(work, "trainer_state.json"), "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=1)
    old = folder + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(work, folder)
    shutil.rmtree(old, ignore_errors=True)


def _prepare_checkpoint(output_dir, resume: bool, module, optimizer, params: list, state: dict):
    """``(output_dir, checkpoint folder)`` of a resumable training loop (both None without ``output_dir``): the
    folder is created, and with ``resume`` a checkpoint there of the same run (``state["fingerprint"]``) is loaded
    into ``module``'s ``params`` and the optimizer, and its step and losses into ``state``; one of another run is a
    ConfigError naming the settings that differ."""
    if output_dir is None:
        return None, None
    output_dir = os.path.abspath(os.path.expanduser(os.fspath(output_dir)))
    os.makedirs(output_dir, exist_ok=True)
    checkpoint = os.path.join(output_dir, _CHECKPOINT)
    if resume and os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
        fingerprint = state["fingerprint"]
        if saved.get("fingerprint") != fingerprint:
            differ = sorted(k for k in fingerprint if saved.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ConfigError(f"output_dir: {output_dir!r} holds a checkpoint of another run ({', '.join(differ)} "
                              "differ); pass resume=False to start over, or another output_dir", field="output_dir")
        _load_checkpoint(checkpoint, module, optimizer, params)
        state.update(step=saved["step"], losses=saved["losses"])
    return output_dir, checkpoint


def _resumable_step(loss, optimizer, params: list, state: dict, bar, checkpoint, module, save_every: int, steps: int,
                    max_grad_norm: float | None = None) -> None:
    """One optimizer step of a resumable training loop: backward, optional gradient clipping, step; the loss and
    the step count go into ``state``, the progress bar moves, and every ``save_every`` steps (and at the last one)
    ``module``'s trained ``params`` and the optimizer are checkpointed to ``checkpoint`` (a folder, or None)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    state["losses"].append(round(loss.item(), 6))
    state["step"] += 1
    bar.update(1)
    bar.set_postfix(loss=f"{state['losses'][-1]:.4f}")
    if checkpoint is not None and (state["step"] % save_every == 0 or state["step"] == steps):
        _save_checkpoint(checkpoint, module, optimizer, params, state)


def _load_checkpoint(folder: str, model, optimizer, params: list) -> None:
    import os

    from safetensors.torch import load_file, load_model

    load_model(model, os.path.join(folder, "model.safetensors"), strict=True)
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        optimizer.state[params[int(index)]][key] = value


def _model_card(name: str, state: dict, sources: list[str]) -> str:
    fp = state["fingerprint"]
    losses = state["losses"]
    final = mean_ends(losses)[1]
    import re

    label_lines = "\n".join(f"  - {s}" for s in sources) or "  - supplied by the caller"
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None  # not a local path or a class name
    return f"""---
library_name: transformers
pipeline_tag: token-classification
tags:
- prompt-compression
- llmlingua2
- hf_tokred
{f"base_model: {name}{chr(10)}" if hub_id else ""}---

# LLMLingua-2 token classifier (hf_tokred)

A two-label token classifier (0 = drop, 1 = keep) for LLMLingua-2 prompt compression (Pan et al., arXiv
2403.12968), fine-tuned from `{name}` with `hf_tokred.training.train_llmlingua2`. Use it with

```python
import hf_tokred
out = hf_tokred.compress_prompt(text, method="llmlingua2", classifier="<this folder>", rate=0.5)
```

## Training

- data: {state["texts"]} texts, {state["words"]} words, {state["tokens"]} classifier tokens, {state["examples"]} chunks
- labels (keep/drop per word):
{label_lines}
- keep fraction of the labels: {state["keep_fraction"]:.3f}
- steps: {state["step"]}, batch size {fp["batch_size"]}, learning rate {fp["lr"]} ({fp["lr_schedule"]}), weight decay {fp["weight_decay"]}, seed {fp["seed"]}
- labelled sub-tokens: {fp["subtokens"]}; chunk length {fp["max_length"]} tokens
- final training loss (mean of the last {min(10, len(losses))} steps): {final:.4f}
- data fingerprint (SHA-256 of texts and labels): `{fp["data_sha256"]}`

`checkpoint/` (optimizer state, for resuming) is not needed for inference; leave it out when pushing
(`huggingface_hub.upload_folder(..., ignore_patterns=["checkpoint/*"])`).
"""


def train_llmlingua2(texts_or_labelled, *, base=None, tokenizer=None, steps: int = 300, lr: float = 5e-5,
                     batch_size: int = 16, seed: int = 0, output_dir=None, resume: bool = True, progress: bool = True,
                     rate: float = 0.5, scorer=None, max_length: int = 512, subtokens: str = "all",
                     lr_schedule: str = "linear", weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                     save_every: int = 100):
    """Train an LLMLingua-2 token classifier (arXiv 2403.12968) on keep/drop word labels; returns ``(model, tokenizer)``.

    ``texts_or_labelled`` is a list of strings (labelled first with :func:`llmlingua2_labels` at ``rate``
    with ``scorer``) or of dicts from :func:`llmlingua2_labels` (``text``, ``labels``). ``base`` is the
    encoder to fine-tune: None for the embedded all-MiniLM-L6-v2 (a ``BertModel``, given a new two-label
    head: ``BertForTokenClassification``), a local folder (an encoder, or a two-label token classifier to
    train further), or a loaded model (with ``tokenizer``). Texts are tokenized and cut into chunks of at
    most ``max_length`` tokens as at inference; each token takes its word's label (``subtokens="all"``, as
    the reference ``train_roberta.py`` does, which suits the mean over a word's tokens at inference) or
    only a word's first token does (``"first"``, others -100).

    A plain PyTorch loop: AdamW at ``lr`` with a ``lr_schedule`` decay over ``steps`` (``"constant"``,
    ``"linear"``, ``"cosine"``), batches of ``batch_size`` chunks drawn in a fresh seeded order every pass,
    gradients clipped to ``max_grad_norm``, dropout on, a tqdm bar (``progress``). Everything is seeded
    (``seed``; the global RNG is restored afterwards). With ``output_dir``, every ``save_every`` steps and
    at the end a checkpoint goes to ``output_dir/checkpoint`` — weights, the AdamW moments and the RNG
    state in safetensors, the step and losses in JSON (no pickle) — and with ``resume`` a later call with
    the same data and settings continues from it exactly (a call with more ``steps`` trains on; with
    ``steps`` at most the saved step it returns the saved model). The finished classifier is saved to
    ``output_dir`` with ``save_pretrained`` (safetensors), its tokenizer, ``llmlingua2_training.json`` and
    a model card (``README.md``: data size, steps, final loss), ready for
    ``compress_prompt(method="llmlingua2", classifier=output_dir)`` or ``push_to_hub``. The returned model
    is in eval mode; the loss of every step (from step 0, resumed runs included) is ``model.train_losses``.

    Example:
        >>> from hf_tokred.training import llmlingua2_labels, stdlib_corpus, train_llmlingua2
        >>> labelled = llmlingua2_labels(stdlib_corpus("train"), rate=0.5, progress=True)   # doctest: +SKIP
        >>> model, tokenizer = train_llmlingua2(labelled, steps=300, output_dir="llmlingua2-minilm")  # doctest: +SKIP
    """

    from tqdm.auto import tqdm

    from .errors import ConfigError
    from .methods.prompt.llmlingua2 import check_classifier

    if isinstance(texts_or_labelled, str) or not isinstance(texts_or_labelled, (list, tuple)) or not texts_or_labelled:
        raise ConfigError("texts_or_labelled: expected a non-empty list of strings or of labelled dicts",
                          field="texts_or_labelled")
    for name, value, ok in (("steps", steps, isinstance(steps, int) and steps >= 1),
                            ("lr", lr, isinstance(lr, (int, float)) and lr > 0),
                            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                            ("seed", seed, isinstance(seed, int)),
                            ("max_length", max_length, isinstance(max_length, int) and max_length >= 8),
                            ("save_every", save_every, isinstance(save_every, int) and save_every >= 1),
                            ("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0),
                            ("max_grad_norm", max_grad_norm, isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0),
                            ("subtokens", subtokens, subtokens in ("all", "first")),
                            ("lr_schedule", lr_schedule, lr_schedule in LR_SCHEDULES)):
        if not ok:
            raise ConfigError(f"{name}: got {value!r}; see train_llmlingua2's docstring for the allowed values",
                              field=name)
    if all(isinstance(t, str) for t in texts_or_labelled):
        items = llmlingua2_labels(list(texts_or_labelled), rate=rate, scorer=scorer, progress=progress)
    else:
        items = _check_labelled(texts_or_labelled)

    rng_state = torch.random.get_rng_state()
    try:
        model, tokenizer, name = _llmlingua2_model(base, tokenizer, seed)
        classifier = check_classifier(model, tokenizer, window=max_length)
        examples, tokens = _llmlingua2_examples(classifier, items, subtokens)
        fingerprint = _fingerprint(items, base=name, lr=lr, batch_size=batch_size, seed=seed, max_length=max_length,
                                   subtokens=subtokens, lr_schedule=lr_schedule, weight_decay=weight_decay,
                                   max_grad_norm=max_grad_norm)
        labels_flat = [int(v) for item in items for v in item["labels"]]
        state = {"step": 0, "losses": [], "fingerprint": fingerprint, "texts": len(items),
                 "words": len(labels_flat), "tokens": tokens, "examples": len(examples),
                 "keep_fraction": sum(labels_flat) / max(len(labels_flat), 1)}
        groups, params = decay_groups(model.parameters(), weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr)
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, model, optimizer, params, state)
        order = _batch_order(len(examples), steps * batch_size, True, torch.Generator().manual_seed(seed))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        device = next(model.parameters()).device
        model.train()
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train llmlingua2", disable=not progress)
        for step in range(state["step"], steps):
            batch = [examples[i] for i in order[step * batch_size:(step + 1) * batch_size]]
            length = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), length), pad, dtype=torch.long)
            labels = torch.full((len(batch), length), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, (seq, lab) in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                labels[row, :len(lab)] = torch.tensor(lab)
                mask[row, :len(seq)] = 1
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(lr_schedule, step, steps)
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, model, save_every, steps,
                            max_grad_norm=max_grad_norm)
        bar.close()
        model.eval()
        if output_dir is not None:
            sources = sorted({item["source"] for item in items if isinstance(item.get("source"), str)})
            save_trained(output_dir, model, tokenizer, LLMLINGUA2_STATE, state, _model_card(name, state, sources))
    finally:
        torch.random.set_rng_state(rng_state)
    model.train_losses = list(state["losses"])
    return model, tokenizer


def evaluate_llmlingua2(classifier, labelled: list[dict], *, tokenizer=None, batch_size: int = 16) -> dict:
    """How well a classifier reproduces keep/drop word labels (e.g. :func:`llmlingua2_labels` of held-out texts).

    Token level (every classifier token carries its word's label; predicted keep when ``p(keep) > 0.5``):
    ``token_accuracy``, ``token_precision``, ``token_recall``, ``token_f1`` (of the keep label) and
    ``token_majority_accuracy`` (always predicting the more frequent label). Word level (a word's
    ``p(keep)`` is the mean over its tokens, as ``llmlingua2`` ranks them): ``word_accuracy``, ``word_f1``,
    and ``word_f1_at_rate``: per text, the words with the highest ``p(keep)``, as many as the labels keep,
    against the labels (a threshold-free measure of the ranking). Also ``tokens`` and ``words``.

    Example:
        >>> from hf_tokred.training import evaluate_llmlingua2, llmlingua2_labels, stdlib_corpus
        >>> heldout = llmlingua2_labels(stdlib_corpus("heldout"))                          # doctest: +SKIP
        >>> evaluate_llmlingua2("llmlingua2-minilm", heldout)["token_f1"]                 # doctest: +SKIP
        0.71
    """
    from .methods.prompt.llmlingua2 import load_classifier, token_keep_probabilities, unit_probabilities

    items = _check_labelled(labelled)
    clf = load_classifier(classifier, tokenizer)
    results = token_keep_probabilities(clf, [item["text"] for item in items], batch_size=batch_size)
    token_true, token_pred, word_true, word_pred, rate_pred = [], [], [], [], []
    for item, (probs, offsets) in zip(items, results):
        spans = _unit_spans(item["text"])
        labels = torch.tensor([int(v) for v in item["labels"]])
        ends = torch.tensor([e for _, e in spans], dtype=torch.long)
        starts = torch.tensor([s for s, _ in offsets], dtype=torch.long)
        unit = torch.searchsorted(ends, starts, right=True).clamp(max=len(spans) - 1)
        token_true.append(labels[unit])
        token_pred.append((probs > 0.5).long())
        words = unit_probabilities([s for s, _ in spans], [e for _, e in spans], probs, offsets)
        word_true.append(labels)
        word_pred.append((words > 0.5).long())
        top = torch.zeros_like(labels)
        top[torch.sort(words, descending=True, stable=True).indices[:int(labels.sum())]] = 1
        rate_pred.append(top)

    def scores(true, pred):
        true, pred = torch.cat(true), torch.cat(pred)
        tp = int(((pred == 1) & (true == 1)).sum())
        precision = tp / max(int(pred.sum()), 1)
        recall = tp / max(int(true.sum()), 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        accuracy = float((pred == true).float().mean())
        majority = max(float(true.float().mean()), 1 - float(true.float().mean()))
        return accuracy, precision, recall, f1, majority, true.numel()

    t_acc, t_p, t_r, t_f1, t_major, n_tokens = scores(token_true, token_pred)
    w_acc, _, _, w_f1, _, n_words = scores(word_true, word_pred)
    _, _, _, rate_f1, _, _ = scores(word_true, rate_pred)
    return {"token_accuracy": t_acc, "token_precision": t_p, "token_recall": t_r, "token_f1": t_f1,
            "token_majority_accuracy": t_major, "word_accuracy": w_acc, "word_f1": w_f1,
            "word_f1_at_rate": rate_f1, "tokens": n_tokens, "words": n_words}


__all__ += ["decay_groups", "evaluate_llmlingua2", "llmlingua2_labels", "read_paragraphs", "stdlib_corpus", "train_llmlingua2"]


# The recipes of the learned visual-token methods and of MADTP live in their own modules (which import helpers from
# this one); they are part of this module's API, resolved on first use.
_RECIPES = {"train_madtp": "training_madtp", "madtp_loss": "training_madtp", "train_visual_pruner": "training_vlm",
            "visual_pruner_loss": "training_vlm", "visual_ratio_loss": "training_vlm",
            "train_token_pooling": "recipes.token_pooling",
            "train_token_dropping": "recipes.token_dropping", "TokenDroppingCallback": "recipes.token_dropping",
            "train_tokenskip": "recipes.tokenskip",
            "train_mrt5": "recipes.mrt5", "train_dydit": "recipes.dydit", "train_tokenlearner": "recipes.tokenlearner",
            "train_avit": "recipes.avit", "avit_loss": "recipes.avit", "train_ia_red2": "recipes.ia_red2",
            "ia_red2_loss": "recipes.ia_red2", "train_evo_vit": "recipes.evo_vit", "train_stvit": "recipes.stvit",
            "train_spvit": "recipes.spvit", "train_tocom": "recipes.tocom",
            "train_eagle": "recipes.eagle", "train_gist": "recipes.gist", "train_icae": "recipes.icae",
            "train_dcp": "recipes.dcp"}


def __getattr__(name: str):
    module = _RECIPES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{module}"), name)
