"""``hf-tokred train ia_red2``: train IA-RED²'s multi-head interpreters (arXiv 2106.12620), backbone frozen.

:func:`ia_red2_loss` is the loss of one batch: REINFORCE on the sampled keep/drop actions with the reward "keep
the dense output while keeping the target fraction", plus (by default) a differentiable surrogate (see the method's
docstring); :func:`train_ia_red2` is the plain loop (reachable as ``hf_tokred.training.train_ia_red2``).

Example:
    >>> import hf_tokred
    >>> from hf_tokred.recipes.ia_red2 import train_ia_red2
    >>> hf_tokred.apply(model, {"method": "ia_red2", "keep_rate": 0.6, "layers": [2]})  # doctest: +SKIP
    >>> losses = train_ia_red2(model, batches, steps=60)                               # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..errors import TokenReductionError
from ..methods.encoder.base import SELECTS
from .avit import _last_hidden, _real, add_encoder_train_command, dense_reference, learned_part, logits_kl, train_heads


def ia_red2_loss(model, inputs: dict, *, teacher=None, ratio_weight: float = 2.0, surrogate_weight: float = 1.0,
                 reinforce_weight: float = 1.0, return_parts: bool = False):
    """The IA-RED² training loss of one batch; the interpreters must be in training mode.

    Reward of a row: cosine of the reduced model's sentence embedding (mean of the tokens the sampled actions kept)
    to the dense one, minus ``ratio_weight`` times the squared distance of each stage's kept fraction to its target
    (``keep_rate ** stage``), averaged over stages. REINFORCE: ``-(reward - mean reward of the batch)`` times the
    mean log-probability of the row's actions. Surrogate (``surrogate_weight``, 0 for pure REINFORCE):
    ``1 - cosine`` through the straight-through actions plus ``ratio_weight`` times the squared distance of the
    kept fractions to their targets, plus the logits' KL when the model has logits.

    Example:
        >>> learned_part(model, "ia_red2").train()                  # doctest: +SKIP
        >>> ia_red2_loss(model, batch).backward()                     # doctest: +SKIP
    """
    from ..methods.encoder.ia_red2 import policy_stages

    nets = learned_part(model, "ia_red2")
    if not nets.training:
        raise TokenReductionError("ia_red2_loss: the interpreters are in eval mode (hard drop); call "
                                  "model.hf_tokred_modules['ia_red2'].train() first")
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    reference, dense = dense_reference(model, inputs, teacher)
    outputs = model(**inputs)
    stages = policy_stages(model)
    if not stages:
        raise TokenReductionError("ia_red2_loss: no stage ran; check the config's layers and keep_rate")
    hidden = _last_hidden(outputs)
    real = _real(inputs, hidden)
    # The tokens a stage dropped are gone from the inference output: the student's mean is over the kept ones.
    candidates = stages[0].deciding.to(hidden.dtype)
    policy = torch.ones_like(real)
    for stage in stages:
        policy = policy * torch.where(stage.deciding, stage.action + stage.probability - stage.probability.detach(),
                                      torch.ones_like(stage.probability))
    weight = real * (policy * candidates + (1.0 - candidates))
    pooled = (hidden * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp_min(1e-6)
    cosine = torch.nn.functional.cosine_similarity(pooled.float(), dense.float(), dim=-1)
    ratio = torch.stack([(s.kept_fraction - s.target).square() for s in stages]).mean(dim=0)
    parts = {"cos": 1.0 - cosine.mean(), "ratio": ratio.mean()}
    # REINFORCE with the batch mean as baseline; the actions' log-probabilities averaged over each row's decisions.
    reward = (cosine - ratio_weight * ratio).detach()
    advantage = reward - reward.mean()
    log_prob = 0.0
    decisions = 0.0
    for stage in stages:
        p = stage.probability.float().clamp(1e-6, 1 - 1e-6)
        chosen = torch.where(stage.action > 0, p.log(), (1 - p).log())
        log_prob = log_prob + (chosen * stage.deciding).sum(dim=1)
        decisions = decisions + stage.deciding.sum(dim=1)
    log_prob = log_prob / torch.as_tensor(decisions).clamp_min(1)
    parts["reinforce"] = -(advantage * log_prob).mean()
    parts["reward"] = reward.mean()
    loss = reinforce_weight * parts["reinforce"]
    if surrogate_weight:
        expected = torch.stack([_expected_fraction(s, candidates) for s in stages]).mean()
        surrogate = parts["cos"] + ratio_weight * expected
        kl = logits_kl(outputs, reference)
        if kl is not None:
            parts["logits_kl"] = kl
            surrogate = surrogate + kl
        loss = loss + surrogate_weight * surrogate
    if return_parts:
        return loss, {k: float(torch.as_tensor(v).detach()) for k, v in parts.items()}
    return loss


def _expected_fraction(stage, candidates: torch.Tensor) -> torch.Tensor:
    """Squared distance of the stage's expected kept fraction (the keep probabilities summed over the tokens it
    decided on, over the row's unprotected real tokens) to its target: differentiable in the probabilities."""
    deciding = stage.deciding.to(stage.probability.dtype)
    expected = (stage.probability * deciding).sum(dim=1) / candidates.sum(dim=1).clamp_min(1)
    return (expected - stage.target).square().mean()


def train_ia_red2(model, batches: list[dict], *, teacher=None, steps: int = 60, lr: float = 3e-3,
                  lr_schedule: str = "constant", shuffle: bool = False, seed: int = 0, log_every: int = 0, log=print,
                  ratio_weight: float = 2.0, surrogate_weight: float = 1.0, reinforce_weight: float = 1.0,
                  progress: bool = True) -> list[float]:
    """Train the IA-RED² interpreters of ``model`` (already reduced with ``ia_red2``) on ``batches``, backbone frozen.

    ``teacher`` is a separate frozen dense model (None: ``model`` itself in a dense pass). AdamW at ``lr`` with the
    ``lr_schedule`` decay, a seeded batch order (``shuffle``) and seeded action sampling, a tqdm bar (or a log line
    every ``log_every`` steps). The loss is :func:`ia_red2_loss` (``surrogate_weight=0``: pure REINFORCE, the
    paper's). Leaves the model in eval mode (hard drop); returns the loss of every step.

    Example:
        >>> hf_tokred.apply(model, {"method": "ia_red2", "keep_rate": 0.6, "layers": [2]})  # doctest: +SKIP
        >>> losses = train_ia_red2(model, batches, steps=60)                               # doctest: +SKIP
        >>> model.save_pretrained("minilm-ia-red2")   # interpreters -> token_reduction.safetensors  # doctest: +SKIP
    """
    nets = learned_part(model, "ia_red2")

    def step_loss(index: int) -> torch.Tensor:
        return ia_red2_loss(model, batches[index], teacher=teacher, ratio_weight=ratio_weight,
                            surrogate_weight=surrogate_weight, reinforce_weight=reinforce_weight)

    return train_heads(model, nets, step_loss, len(batches), steps=steps, lr=lr, lr_schedule=lr_schedule,
                       shuffle=shuffle, seed=seed, log_every=log_every, log=log, name="ia_red2", progress=progress)


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train ia_red2`` (interpreters on MiniLM, then optionally the backbone through the drop).

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_train_command(sub)
    """

    def options(parser):
        parser.add_argument("--keep-rate", type=float, default=0.6, help="target kept fraction per stage (0.6)")
        parser.add_argument("--layers", type=int, nargs="*", default=[2], help="stage blocks (default: 2)")
        parser.add_argument("--select", choices=SELECTS, default="top_k",
                            help="inference selection (default: top_k)")
        parser.add_argument("--surrogate-weight", type=float, default=1.0,
                            help="weight of the differentiable surrogate (0: pure REINFORCE; default 1)")

    def config_options(args):
        return {"keep_rate": args.keep_rate, "layers": args.layers, "select": args.select}

    def run(model, batches, args, teacher):
        return train_ia_red2(model, batches, teacher=teacher, steps=args.steps, lr=args.lr, shuffle=True,
                             seed=args.seed, surrogate_weight=args.surrogate_weight, progress=not args.no_progress)

    add_encoder_train_command(subparsers, "ia_red2", paper="IA-RED² (arXiv 2106.12620)", steps=200, lr=3e-3,
                              options=options, run=run, config_options=config_options)


__all__ = ["add_train_command", "ia_red2_loss", "train_ia_red2"]
