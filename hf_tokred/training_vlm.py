"""Training of the learned visual-token methods (``atp_llava``, ``dynamic_llava``) on a frozen VLM.

Only the method's small modules train; the language model, tower and projector stay frozen. The teacher is the same
model run densely (the method switched off for that pass): the loss is the KL divergence of the reduced model's
answer-token distributions from the dense model's, plus a ratio loss that pulls every learned stage's mean keep
probability toward its target. In training mode nothing is dropped: each candidate token's key is softly hidden from
the queries after it (see :class:`hf_tokred.vlm.base.LearnedInLLMConfig`).

Example:
    >>> import hf_tokred
    >>> from hf_tokred.training import train_visual_pruner
    >>> hf_tokred.apply(llava, {"method": "dynamic_llava", "keep": 0.25})          # doctest: +SKIP
    >>> losses = train_visual_pruner(llava, batches, steps=100)                     # doctest: +SKIP
    >>> llava.save_pretrained("llava-dynamic")       # predictors -> token_reduction.safetensors  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch

from .errors import TokenReductionError
from .integration.vlm import ENGINE_ATTR
from .integration.wiring import MODULES_ATTR

ANSWER_KEY = "answer_mask"


def _engine(model, name: str):
    engine = getattr(model, ENGINE_ATTR, None)
    if engine is None or not engine.learned:
        raise TokenReductionError(f"{name}: the model carries no learned visual-token method; apply one first: "
                                  "hf_tokred.apply(model, {'method': 'dynamic_llava'}) (or 'atp_llava')")
    return engine


def visual_pruner_loss(model, batch: dict, *, ratio_weight: float = 2.0, teacher_logits: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The training loss of the learned visual method attached to ``model`` on one batch.

    ``batch`` holds the model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) and ``answer_mask``
    ``(batch, length)`` marking the answer tokens: the distillation compares the distributions that predict them
    (teacher: the dense pass, computed here unless ``teacher_logits`` is given); a decoding-time predictor learns on
    them. ``ratio_weight`` scales the squared gap between each stage's kept fraction and its target.

    Example:
        >>> loss = visual_pruner_loss(model, batch)                      # doctest: +SKIP
        >>> loss.backward()                                              # doctest: +SKIP
    """
    engine = _engine(model, "visual_pruner_loss")
    inputs = {k: v for k, v in batch.items() if k != ANSWER_KEY}
    answers = batch.get(ANSWER_KEY)
    if answers is None:
        raise TokenReductionError(f"visual_pruner_loss: the batch needs {ANSWER_KEY!r} ((batch, length) bool) marking "
                                  "the answer tokens")
    answers = answers.bool()
    if answers.shape != inputs["input_ids"].shape or not bool(answers[:, 1:].any()):
        raise TokenReductionError(f"visual_pruner_loss: {ANSWER_KEY} must have the input_ids' shape and mark at least "
                                  "one answer token after the first position")
    inputs["use_cache"] = False
    if teacher_logits is None:
        with engine.dense(), torch.no_grad():
            teacher_logits = model(**inputs).logits
    engine.set_answers(answers)
    try:
        logits = model(**inputs).logits
    finally:
        engine.set_answers(None)
    predicting = answers[:, 1:]  # position t predicts token t + 1
    student = logits[:, :-1][predicting].float().log_softmax(dim=-1)
    teacher = teacher_logits[:, :-1][predicting].float().log_softmax(dim=-1)
    loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return loss + ratio_weight * visual_ratio_loss(engine.records())


def visual_ratio_loss(records) -> torch.Tensor:
    """Sum over learned stages of ``(kept fraction - target) ** 2``, where a stage's kept fraction is the mean over
    its candidates of the product of its keep probabilities and those of earlier stages on the same candidates.

    Example:
        >>> import torch
        >>> from hf_tokred.vlm.base import KeepRecord
        >>> cand = torch.ones(1, 4, dtype=torch.bool)
        >>> visual_ratio_loss([KeepRecord(1, torch.full((1, 4), 0.5), cand, 0.5)]).item()
        0.0
    """
    total = torch.zeros(())
    # Stages decide about the same candidates (every visual token: in training nothing is dropped) in tensors of
    # their own, so stages chain by equal candidate masks, not by tensor identity.
    running: list[tuple[torch.Tensor, torch.Tensor]] = []
    for record in records:
        index = next((i for i, (candidates, _) in enumerate(running)
                      if candidates.shape == record.candidates.shape and torch.equal(candidates, record.candidates)),
                     None)
        cumulative = record.keep if index is None else running[index][1] * record.keep
        if index is None:
            running.append((record.candidates, cumulative))
        else:
            running[index] = (record.candidates, cumulative)
        weight = record.candidates.to(cumulative.dtype)
        kept = (cumulative * weight).sum() / weight.sum().clamp(min=1)
        total = total.to(kept.device) + (kept.float() - record.target) ** 2
    return total


def train_visual_pruner(model, batches: list[dict], *, steps: int = 100, lr: float = 1e-3, ratio_weight: float = 2.0,
                        lr_schedule: str = "constant", shuffle: bool = True, seed: int = 0, log_every: int = 0,
                        log=print, progress: bool = True, around=None) -> list[float]:
    """Train the learned modules of the visual method attached to ``model`` (``atp_llava``, ``dynamic_llava``).

    Runs ``steps`` AdamW steps over ``batches`` (model inputs plus ``answer_mask``, see
    :func:`visual_pruner_loss`) with everything but the method's modules frozen, a fixed ``seed`` and a progress bar;
    the dense teacher's logits are computed once per batch. Leaves the model in eval mode (hard drop) and returns
    the loss of every step. Save with ``model.save_pretrained`` (modules to ``token_reduction.safetensors``).
    ``around(index)``, when given, returns a context manager every forward pass of batch ``index`` runs in (e.g. a
    hook that injects that batch's image features).

    Example:
        >>> losses = train_visual_pruner(model, batches, steps=50)                    # doctest: +SKIP
    """
    from .training import _check_loop, _optimize

    _check_loop("train_visual_pruner", batches, steps, lr, lr_schedule)
    engine = _engine(model, "train_visual_pruner")
    learned = model._modules[MODULES_ATTR][engine.config.method]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = list(learned.parameters())
    for parameter in params:
        parameter.requires_grad_(True)
    model.eval()
    around = around or (lambda index: contextlib.nullcontext())
    teachers = {}
    with engine.dense(), torch.no_grad():
        for i, batch in enumerate(batches):
            inputs = {k: v for k, v in batch.items() if k != ANSWER_KEY}
            with around(i):
                teachers[i] = model(**inputs, use_cache=False).logits
    learned.train()

    def step_loss(index: int) -> torch.Tensor:
        with around(index):
            return visual_pruner_loss(model, batches[index], ratio_weight=ratio_weight, teacher_logits=teachers[index])

    try:
        return _optimize(model, [{"params": params, "lr": lr}], step_loss, len(batches), steps=steps,
                         lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every, log=log,
                         label="step", digits=4, progress=progress, desc=f"train {engine.config.method}")
    finally:
        learned.eval()


__all__ = ["ANSWER_KEY", "visual_ratio_loss", "train_visual_pruner", "visual_pruner_loss"]
