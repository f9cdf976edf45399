"""Training TokenLearner (arXiv 2106.11297): distill the learned maps (and TokenFuser) to the dense model.

:func:`train_tokenlearner` trains only ``model.hf_tokred_modules["tokenlearner"]`` (the backbone stays frozen)
so that the reduced model's pooled output matches the dense model's: the loss is ``1 - cos`` of the mean of
``last_hidden_state`` over its tokens (reduced vs dense) plus, on models with a class token, ``1 - cos`` of
the class token's final state. The teacher is a separate frozen dense model, or the same model inside
:func:`hf_tokred.training.dense_pass`. Batches are dicts of model inputs (``pixel_values``), as an image
processor or video processor makes them.

TokenLearner acts on image and video encoders only (its maps are spatial), so there is no MiniLM
``hf-tokred train tokenlearner`` command: train it on your own images or clips with this function.

Example:
    >>> import hf_tokred, torch
    >>> from hf_tokred.recipes.tokenlearner import train_tokenlearner
    >>> hf_tokred.apply(vit, {"method": "tokenlearner", "num_tokens": 8})              # doctest: +SKIP
    >>> losses = train_tokenlearner(vit, [{"pixel_values": torch.randn(8, 3, 224, 224)}], steps=60)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import TokenReductionError
from ..integration.wiring import MODULES_ATTR, get_applied


def _module(model) -> torch.nn.Module:
    applied = get_applied(model)
    modules = model._modules.get(MODULES_ATTR)
    if applied is None or applied.config.method != "tokenlearner" or modules is None or "tokenlearner" not in modules:
        raise TokenReductionError(f"train_tokenlearner: {type(model).__name__} has no tokenlearner reduction attached; "
                                  "apply one first: hf_tokred.apply(model, {'method': 'tokenlearner', 'num_tokens': 8})")
    return modules["tokenlearner"]


def _last_hidden(outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, class_tokens: int) -> torch.Tensor:
    """``1 - cos`` of the token means of two last hidden states, plus ``1 - cos`` of the first ``class_tokens``.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 5, 4)
        >>> round(distillation_loss(x, x, 1).item(), 6)
        0.0
    """
    cos = torch.nn.functional.cosine_similarity
    loss = 1 - cos(student.float().mean(1), teacher.float().mean(1), dim=-1).mean()
    if class_tokens:
        loss = loss + 1 - cos(student[:, :class_tokens].float(), teacher[:, :class_tokens].float(), dim=-1).mean()
    return loss


def train_tokenlearner(model, batches: list[dict], *, teacher=None, steps: int = 60, lr: float = 1e-3,
                       lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0,
                       log=print, progress: bool = True) -> list[float]:
    """Train ``model``'s TokenLearner (already applied) on ``batches``, backbone frozen; returns each step's loss.

    The dense outputs come from ``teacher`` (a separate frozen dense model) or, when it is None, from ``model``
    itself inside :func:`hf_tokred.training.dense_pass`. Seeded (``seed``); a tqdm bar unless ``log_every`` or
    ``progress=False``. Leaves the model in eval mode with every parameter frozen.

    Example:
        >>> losses = train_tokenlearner(vit, batches, steps=60, lr=1e-3)   # doctest: +SKIP
    """
    from ..training import _check_loop, _optimize, dense_pass

    module = _module(model)
    _check_loop("train_tokenlearner", batches, steps, lr, lr_schedule)
    class_tokens = get_applied(model).adapter.protected(model)
    references = []
    with torch.no_grad():
        for batch in batches:
            context = contextlib.nullcontext() if teacher is not None else dense_pass(model)
            with context:
                references.append(_last_hidden((teacher or model)(**batch)).detach())
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    def step_loss(index: int) -> torch.Tensor:
        return distillation_loss(_last_hidden(model(**batches[index])), references[index], class_tokens)

    return _optimize(model, [{"params": list(module.parameters()), "lr": lr}], step_loss, len(batches),
                     steps=steps, lr_schedule=lr_schedule, shuffle=shuffle, seed=seed, log_every=log_every,
                     log=log, label="tokenlearner", digits=4, progress=progress, desc="train tokenlearner")


__all__ = ["distillation_loss", "train_tokenlearner"]
