"""DiffRate: a per-block prune + merge schedule, learned for a FLOPs target (Chen et al., ICCV'23, arXiv 2305.17997).

In every block, after the attention, DiffRate first **prunes** the least important tokens (importance =
attention from the class token, averaged over heads) and then **merges** the least important of the
survivors into their most similar important token (cosine similarity of the keys averaged over heads,
a size-weighted average as in ToMe). How many tokens each block prunes and merges is the *schedule*, the
method's only artefact: it is part of the config (``prune`` and ``merge``, one value per block), so it
is saved in ``config.json`` / ``token_reduction_config.json`` and comes back with ``from_pretrained``.

A schedule value is either an **int** (tokens removed in that block, the paper's absolute counts for
fixed-size images) or a **float** in [0, 1) (the fraction of the block's current unprotected real tokens
removed, which fits text of any length). :func:`calibrate` learns a schedule for a FLOPs target on the
user's own batches.

Where we depart from the paper:

* **Calibration.** The paper makes the kept-token numbers differentiable (its *differentiable discrete
  proxy*: a softmax over candidate numbers per block, tokens masked by the probability that their rank is
  kept) and trains them end-to-end through the network on ImageNet with a distillation loss plus
  ``lambda * (FLOPs - target)**2``. We keep the softmax over candidate rates per block and operation, the
  expected-FLOPs penalty and the gradient descent on those logits, but replace the end-to-end
  distillation term by a **separable proxy measured on the user's data**: for every block, operation and
  candidate rate, the distortion (1 - cosine of the pooled output to the dense model's) of that single
  reduction, measured once (:func:`measure_sensitivity`); the expected distortion is the sum over blocks
  of the probability-weighted candidates. This needs ``blocks * 2 * candidates`` forward passes and no
  backward pass through the model, so it runs on a CPU in a minute for a small encoder; it ignores how
  reductions in different blocks interact. After the descent each block takes its most probable rate (as
  the paper does), then a greedy repair step moves single rates until the predicted FLOPs meet the target.
* **Expected FLOPs** come from a closed form per block (``8 n d^2 + 4 n^2 d`` for the attention on ``n``
  tokens, ``4 n' d d_ff`` for the MLP on the ``n'`` tokens left after the reduction), not from counting.
* **Merging** follows the paper's sorted split: the merged tokens are the least important survivors and
  they merge into the most similar of the tokens that stay (not ToMe's alternating bipartite split);
  protected tokens (CLS) neither merge nor receive merges. Counts are per row (fractions of each row's
  real tokens), so padded text batches work and a batch gives each row's result alone.
* The reduction sits where every encoder reducer of hf_tokred sits (between attention and MLP in pre-norm
  blocks, after the attention sub-layer in BERT), as in the paper.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="diffrate", prune=[8, 8], merge=[0.1, 0.0])
    >>> cfg.schedule(3)
    [(8, 0.1), (8, 0.0), None]
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError
from .base import EncoderReducerConfig, Reduction, cosine_scores, keep_top, rank_unprotected

_RATE_HELP = ("one value per block: an int >= 0 (tokens removed in that block) or a float in [0, 1) (fraction of "
              "the block's current unprotected tokens removed); shorter lists are padded with 0")
# Candidate rates of the calibration (fractions of the current tokens removed by one operation in one block).
CANDIDATE_RATES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


@register_method("diffrate")
@dataclass(kw_only=True)
class DiffRateConfig(EncoderReducerConfig):
    """DiffRate (arXiv 2305.17997): prune by CLS attention, then merge by key similarity, per-block schedule.

    See the module docstring for the schedule values and where we depart from the paper.

    Fields:
        prune: tokens (int) or fraction (float) pruned in each block, by ascending class-token attention.
        merge: tokens (int) or fraction (float) merged in each block after pruning.
        flops_target: the FLOPs fraction the schedule was calibrated for (informative; set by :func:`calibrate`).
        restore_length, prop_attn: as for every encoder reducer.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="diffrate", prune=[0.1] * 6, merge=[0.1] * 6).to_dict()["merge"][:2]
        [0.1, 0.1]
    """

    paper = "2305.17997"
    status = "beta"
    needs = frozenset({"metric", "cls_attention"})

    prune: list = field(default_factory=list, metadata={"help": _RATE_HELP})
    merge: list = field(default_factory=list, metadata={"help": _RATE_HELP})
    flops_target: float | None = param(None, float, low=0.0, high=1.0, low_open=True, optional=True,
                                       help="FLOPs fraction the schedule was calibrated for (informative)")

    def validate(self) -> None:
        for name in ("prune", "merge"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)):
                raise ConfigError(f"{name}: expected a list ({_RATE_HELP}), got {type(values).__name__}", field=name)
            checked = []
            for i, value in enumerate(values):
                ok_int = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
                ok_float = isinstance(value, float) and math.isfinite(value) and 0.0 <= value < 1.0
                if not (ok_int or ok_float):
                    raise ConfigError(f"{name}[{i}]: expected an int >= 0 (tokens) or a float in [0, 1) (fraction), "
                                      f"got {value!r}", field=name)
                checked.append(int(value) if ok_int else float(value))
            setattr(self, name, checked)
        if not self.prune and not self.merge:
            raise ConfigError("prune: give a schedule (prune and/or merge, one value per block; [0] for none) or learn "
                              "one with hf_tokred.methods.encoder.diffrate.calibrate(model, batches, flops_target)",
                              field="prune")

    def schedule(self, num_blocks: int) -> list:
        """``(prune, merge)`` per block, None for blocks that do neither.

        Raises :class:`ConfigError` when a list is longer than the model has blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="diffrate", prune=[4], merge=[0, 2]).schedule(3)
            [(4, 0), (0, 2), None]
        """
        for name in ("prune", "merge"):
            if len(getattr(self, name)) > num_blocks:
                raise ConfigError(f"{name}: the list has {len(getattr(self, name))} values but the model has "
                                  f"{num_blocks} blocks; give at most {num_blocks}", field=name)
        prune = list(self.prune) + [0] * (num_blocks - len(self.prune))
        merge = list(self.merge) + [0] * (num_blocks - len(self.merge))
        return [(p, m) if (p or m) else None for p, m in zip(prune, merge)]

    def plan(self, ctx):
        """Prune then merge in one block (see :func:`diffrate_reductions`)."""
        prune, merge = ctx.amount
        return diffrate_reductions(ctx.cls_attention, ctx.metric, prune, merge, ctx.protected, ctx.valid) or None


# ---------------------------------------------------------------------------------------------
# Plain tensor functions
# ---------------------------------------------------------------------------------------------


def kept_after(counts: torch.Tensor, amount) -> torch.Tensor:
    """Tokens left of ``counts`` ``(B,)`` after removing ``amount`` (int: tokens; float: fraction); at least 1 if any.

    Example:
        >>> import torch
        >>> kept_after(torch.tensor([10, 3, 0]), 4).tolist(), kept_after(torch.tensor([10, 3, 0]), 0.25).tolist()
        ([6, 1, 0], [8, 3, 0])
    """
    if isinstance(amount, float):
        kept = torch.ceil(counts.double() * (1.0 - amount) - 1e-9).long()
    else:
        kept = counts - int(amount)
    return torch.minimum(kept.clamp(min=1), counts)


def merge_into_important(importance: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, protected: int,
                         valid: torch.Tensor | None = None) -> Reduction:
    """DiffRate's merge: per row, the ``keep[b]`` most important unprotected tokens stay; every other real token
    merges into the most similar of them (cosine of ``metric``). Protected tokens stay and receive nothing.

    Example:
        >>> import torch
        >>> imp = torch.tensor([[9.0, 5.0, 1.0, 4.0]])
        >>> met = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])
        >>> r = merge_into_important(imp, met, torch.tensor([2]), protected=1)
        >>> r.slot_of().tolist()                       # token 2 merges into token 3 (slot 2)
        [[0, 1, 2, 2]]
    """
    batch, n = importance.shape
    device = importance.device
    ranked = rank_unprotected(importance, protected, valid)
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
    position = torch.arange(n, device=device).expand(batch, n)
    real = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid
    stays = (rank < keep[:, None] + protected) & real
    stays |= position < protected
    sources = real & ~stays
    targets = stays & (position >= protected)
    similarity = cosine_scores(metric, metric).masked_fill(~targets[:, None, :], -math.inf)
    partner = similarity.argmax(dim=-1)
    slot = torch.where(stays, stays.long().cumsum(dim=1) - 1, -1)
    slot = torch.where(sources, slot.gather(1, partner), slot)
    return Reduction.from_slots(slot)


def diffrate_reductions(importance: torch.Tensor, metric: torch.Tensor, prune, merge, protected: int,
                        valid: torch.Tensor | None = None) -> list[Reduction]:
    """One DiffRate block: prune ``prune`` tokens by ``importance`` ``(B, N)``, then merge ``merge`` of the rest.

    ``prune``/``merge`` are token counts (int) or fractions (float) of each row's unprotected real tokens.
    Returns the reductions to apply in order (empty when neither removes anything).

    Example:
        >>> import torch
        >>> imp, met = torch.rand(2, 9), torch.randn(2, 9, 4)
        >>> rs = diffrate_reductions(imp, met, 2, 0.25, protected=1)
        >>> [r.num_slots for r in rs]                  # 9 -> 7 -> 1 + ceil(0.75 * 6)
        [7, 6]
    """
    if importance is None or metric is None:
        raise TokenReductionError("diffrate: the block reported no class-token attention or keys")
    batch, n = importance.shape
    device = importance.device
    counts = (torch.full((batch,), max(n - protected, 0), dtype=torch.long, device=device) if valid is None
              else valid[:, protected:].sum(dim=1))
    out: list[Reduction] = []
    kept = kept_after(counts, prune)
    if bool((kept < counts).any()):
        pruned = keep_top(importance, kept, protected, valid)
        out.append(pruned)
        importance = importance.gather(1, pruned.keep)
        metric = metric.gather(1, pruned.keep[..., None].expand(-1, -1, metric.shape[-1]))
        valid = pruned.slot_valid
        counts = kept
    kept = kept_after(counts, merge)
    if bool((kept < counts).any()):
        out.append(merge_into_important(importance, metric, kept, protected, valid))
    return out


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """Distortion of single reductions, measured by :func:`measure_sensitivity`.

    Attributes:
        distortion: ``(blocks, 2, len(rates))`` mean ``1 - cosine`` of the pooled output to the dense one when
            only that block prunes (index 0) or merges (index 1) at that rate; 0 at rate 0.
        rates: the candidate rates (fractions removed).
        tokens: mean real tokens per input row of the calibration batches.
        hidden_size, intermediate_size: the model's widths (for the FLOPs model).
    """

    distortion: torch.Tensor
    rates: tuple
    tokens: float
    hidden_size: int
    intermediate_size: int


def _widths(model) -> tuple[int, int]:
    config = model.config
    for holder in (getattr(config, "vision_config", None), config):
        if holder is not None and isinstance(getattr(holder, "hidden_size", None), int):
            hidden = holder.hidden_size
            inner = getattr(holder, "intermediate_size", None)
            if not isinstance(inner, int):
                inner = int(getattr(holder, "mlp_ratio", 4) * hidden)
            return hidden, inner
    raise TokenReductionError(f"calibrate: cannot read the hidden size of {type(model).__name__}")


def _pooled(model, batch: dict, pooling: str) -> torch.Tensor:
    from ...integration.encoders import token_sizes
    from ...integration.wiring import get_applied

    outputs = model(**batch)
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return torch.nn.functional.normalize(hidden[:, 0].float(), dim=-1)
    if get_applied(model) is not None:
        weights = token_sizes(model)
    else:
        mask = batch.get("attention_mask")
        weights = torch.ones(hidden.shape[:2]) if mask is None else mask.float()
    weights = weights.to(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _pooling_of(model, pooling: str | None) -> str:
    if pooling is not None:
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling: expected 'mean' or 'cls', got {pooling!r}", field="pooling")
        return pooling
    from ...model_patches import find_adapter

    return "mean" if getattr(find_adapter(model), "pooling", "cls") == "mean" else "cls"


def measure_sensitivity(model, batches: list[dict], rates: tuple = CANDIDATE_RATES, pooling: str | None = None,
                        log=None) -> Sensitivity:
    """Measure, on ``batches``, the distortion of every single (block, prune/merge, rate) reduction.

    ``pooling``: ``"mean"`` (size-weighted mean of ``last_hidden_state``; sentence encoders) or ``"cls"`` (the
    first token; classifiers); default from the model's adapter. The model must not carry a reduction.

    Example:
        >>> sens = measure_sensitivity(model, batches)                       # doctest: +SKIP
        >>> sens.distortion.shape                                            # doctest: +SKIP
        torch.Size([6, 2, 11])
    """
    import hf_tokred
    from hf_tokred.integration.wiring import get_applied

    if get_applied(model) is not None:
        raise TokenReductionError("calibrate: the model already carries a reduction; hf_tokred.remove(model) first")
    if not batches:
        raise TokenReductionError("calibrate: batches is empty")
    if rates[0] != 0.0 or any(not (0.0 <= r < 1.0) for r in rates) or list(rates) != sorted(rates):
        raise ConfigError(f"rates: expected increasing fractions in [0, 1) starting at 0.0, got {rates!r}", field="rates")
    pooling = _pooling_of(model, pooling)
    from ...model_patches import find_adapter

    num_blocks = len(find_adapter(model).blocks(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = [_pooled(model, batch, pooling) for batch in batches]
            tokens = []
            for batch in batches:
                mask = batch.get("attention_mask")
                tokens.append(float(mask.sum(dim=1).float().mean()) if mask is not None
                              else float(model(**batch).last_hidden_state.shape[1]))
            distortion = torch.zeros(num_blocks, 2, len(rates))
            for block in range(num_blocks):
                for op in range(2):
                    for k, rate in enumerate(rates):
                        if rate == 0.0:
                            continue
                        schedule = [0.0] * num_blocks
                        schedule[block] = float(rate)
                        cfg = DiffRateConfig(prune=schedule if op == 0 else [0.0],
                                             merge=schedule if op == 1 else [0.0])
                        hf_tokred.apply(model, cfg)
                        try:
                            values = [(1 - (_pooled(model, b, pooling) * ref).sum(-1)).mean()
                                      for b, ref in zip(batches, reference)]
                        finally:
                            hf_tokred.remove(model)
                        distortion[block, op, k] = torch.stack(values).mean().clamp_min(0.0)
                if log is not None:
                    log(f"diffrate: measured block {block + 1}/{num_blocks}")
    finally:
        model.train(was_training)
    hidden, inner = _widths(model)
    return Sensitivity(distortion, tuple(rates), sum(tokens) / len(tokens), hidden, inner)


def expected_flops(keep: torch.Tensor, tokens: float, hidden: int, inner: int) -> torch.Tensor:
    """FLOPs of the blocks, relative to dense, for per-block kept fractions ``keep`` ``(blocks, 2)`` (prune, merge).

    Block ``b`` runs its attention on ``n_b`` tokens (``8 n d^2 + 4 n^2 d``) and its MLP on
    ``n_b * keep[b, 0] * keep[b, 1]`` (``4 n d d_ff``); the next block starts from there. Differentiable.

    Example:
        >>> import torch
        >>> round(expected_flops(torch.ones(4, 2), 100.0, 64, 256).item(), 6)
        1.0
    """
    def block(n_in, n_out):
        return 8 * n_in * hidden**2 + 4 * n_in**2 * hidden + 4 * n_out * hidden * inner

    dense = keep.shape[0] * block(torch.tensor(tokens), torch.tensor(tokens))
    total = keep.new_zeros(())
    n = keep.new_tensor(tokens)
    for b in range(keep.shape[0]):
        n_out = n * keep[b, 0] * keep[b, 1]
        total = total + block(n, n_out)
        n = n_out
    return total / dense


def calibrate(model, batches: list[dict] | None = None, flops_target: float = 0.7, *, sensitivity: Sensitivity | None = None,
              steps: int = 500, lr: float = 0.05, penalty: float = 50.0, pooling: str | None = None,
              rates: tuple = CANDIDATE_RATES, log=None) -> DiffRateConfig:
    """Learn a DiffRate schedule that runs the blocks at ``flops_target`` of the dense FLOPs, on the user's batches.

    ``batches`` are dicts of model inputs (e.g. tokenized text or ``pixel_values``); the model must be dense
    (no reduction attached) and is left as it was. Steps: (1) :func:`measure_sensitivity` (skipped when a
    ``sensitivity`` from an earlier call is passed, e.g. to calibrate several targets); (2) ``steps`` Adam
    steps on the logits of a softmax over :data:`CANDIDATE_RATES` per block and operation, minimizing the
    expected distortion plus ``penalty * (expected FLOPs - flops_target)**2`` (the paper's objective with its
    distillation term replaced by the measured proxy, see the module docstring); (3) the most probable rate
    per block and operation, then greedy repair until the predicted FLOPs are at most 0.01 above the target
    (and, where a cheaper schedule allows, not more than 0.01 below). ``rates`` are the candidate fractions.
    Returns a :class:`DiffRateConfig` with fractional ``prune``/``merge`` lists and ``flops_target`` set:
    apply it with ``hf_tokred.apply`` and it saves/loads with the model.

    Example:
        >>> import hf_tokred
        >>> from hf_tokred.methods.encoder.diffrate import calibrate
        >>> cfg = calibrate(model, batches, flops_target=0.7)                 # doctest: +SKIP
        >>> hf_tokred.apply(model, cfg); model.save_pretrained("reduced")     # doctest: +SKIP
    """
    if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float)) or not 0.0 < flops_target <= 1.0:
        raise ConfigError(f"flops_target: expected a number in (0, 1] (fraction of the dense FLOPs), got {flops_target!r}",
                          field="flops_target")
    if sensitivity is None:
        if batches is None:
            raise TokenReductionError("calibrate: pass batches (or a sensitivity measured earlier)")
        sensitivity = measure_sensitivity(model, batches, rates=rates, pooling=pooling, log=log)
    distortion = sensitivity.distortion
    rates = torch.tensor(sensitivity.rates)
    blocks = distortion.shape[0]
    logits = torch.zeros(blocks, 2, len(rates))
    logits[..., 0] = 2.0  # start near "no reduction"
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    flops = lambda keep: expected_flops(keep, sensitivity.tokens, sensitivity.hidden_size,  # noqa: E731
                                        sensitivity.intermediate_size)
    for _ in range(steps):
        probs = logits.softmax(dim=-1)
        keep = (probs * (1 - rates)).sum(dim=-1)
        loss = (probs * distortion).sum() + penalty * (flops(keep) - flops_target) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    choice = logits.detach().argmax(dim=-1)
    choice = _repair(choice, distortion, rates, flops, flops_target)
    chosen = rates[choice]
    prune = [round(float(v), 4) for v in chosen[:, 0]]
    merge = [round(float(v), 4) for v in chosen[:, 1]]
    if log is not None:
        log(f"diffrate: predicted FLOPs {float(flops(1 - chosen)):.3f} of dense for target {flops_target}")
    if not any(prune) and not any(merge):
        prune = [0.0]
    return DiffRateConfig(prune=prune, merge=merge, flops_target=float(flops_target))


def _repair(choice: torch.Tensor, distortion: torch.Tensor, rates: torch.Tensor, flops, target: float,
            tolerance: float = 0.01) -> torch.Tensor:
    """Greedy repair of the most probable rates: raise single (block, op) rates, cheapest distortion per FLOP
    first, until the predicted FLOPs are at most ``target + tolerance``; then, while they are below
    ``target - tolerance``, lower the rate whose decrease removes the most distortion without going over."""
    choice = choice.clone()
    last = len(rates) - 1

    def predicted(c):
        return float(flops(1 - rates[c]))

    def moves(step):
        for b in range(choice.shape[0]):
            for op in range(2):
                k = int(choice[b, op]) + step
                if 0 <= k <= last:
                    trial = choice.clone()
                    trial[b, op] = k
                    yield trial, float(distortion[b, op, k] - distortion[b, op, k - step])

    while predicted(choice) > target + tolerance:
        current = predicted(choice)
        options = [(added / max(current - predicted(t), 1e-12), t) for t, added in moves(1) if predicted(t) < current]
        if not options:
            break
        choice = min(options, key=lambda o: o[0])[1]
    while predicted(choice) < target - tolerance:
        options = [(removed, t) for t, removed in moves(-1) if predicted(t) <= target + tolerance]
        if not options:
            break
        choice = min(options, key=lambda o: o[0])[1]
    return choice


__all__ = ["CANDIDATE_RATES", "DiffRateConfig", "Sensitivity", "calibrate", "diffrate_reductions", "expected_flops",
           "kept_after", "measure_sensitivity", "merge_into_important"]
