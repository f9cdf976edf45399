"""ICAE's recipe (arXiv 2307.06945): autoencoding + language-modelling pretraining of the LoRA encoder and the
memory-token embeddings, the decoder frozen.

* :func:`train_icae`: windows of ``2 * chunk_tokens`` tokens of training text (:func:`~hf_tokred.recipes.lm_data.
  token_windows` of :func:`~hf_tokred.recipes.lm_data.lm_texts` ``("train")``); each step draws, with probability
  ``lm_ratio``, the LM objective (the first half compressed, the decoder continues with the second half) and
  otherwise the AE objective (the first half compressed and reconstructed after ``<AE>``), teacher-forced
  (:func:`hf_tokred.integration.icae.icae_losses`). Resumable, seeded, saved with ``save_pretrained`` and a model
  card recording the data, steps, seed and the held-out token accuracies it measured.
* :func:`evaluate_icae_chunks`: teacher-forced AE and LM token accuracy on held-out windows at the training length.

``hf-tokred train icae`` runs it on the embedded SmolLM2-135M-Instruct. Departure from the paper: it trains at
128 tokens -> 32 slots (the paper's 4x ratio; the paper: 512 -> 128 on a 7B model) and applies the encoder
chunk-wise to longer contexts (512 tokens -> 4 chunks -> 128 slots); see :mod:`hf_tokred.methods.lm.icae`.

Example:
    >>> from hf_tokred.embedded import load_smollm2
    >>> from hf_tokred.training import train_icae
    >>> model, tokenizer = load_smollm2()                                                  # doctest: +SKIP
    >>> model = train_icae(model, tokenizer, steps=300, output_dir="smollm2-icae")          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time

import torch

from ..errors import ConfigError

TRAINING_STATE = "icae_training.json"
DEFAULT_OUTPUT = "smollm2-icae"
DESCRIPTION = """Pretrain ICAE (In-context Autoencoder, arXiv 2307.06945) on the embedded SmolLM2-135M-Instruct: a LoRA
encoder turns each 128-token chunk of a context into 32 memory slots that the frozen model reads. Objectives:
autoencoding (reconstruct the chunk from its slots) and language modelling (continue the text from the slots), on
the standard library's documentation (training split). The result goes to ~/.cache/hf_tokred/smollm2-icae;
measure it with `hf-tokred learned-lm icae`."""


def _check_settings(**values) -> None:
    for name in ("steps", "batch_size", "save_every", "memory_slots", "chunk_tokens"):
        value = values.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}: expected an int >= 1, got {value!r}", field=name)
    if not 0.0 <= values["lm_ratio"] <= 1.0:
        raise ConfigError(f"lm_ratio: expected a fraction in [0, 1], got {values['lm_ratio']!r}", field="lm_ratio")
    if not values["lr"] > 0:
        raise ConfigError(f"lr: expected a learning rate > 0, got {values['lr']!r}", field="lr")


def _attach(model, reduction, memory_slots, chunk_tokens, rank, alpha, slot_form, target_modules):
    import hf_tokred

    from ..integration.wiring import get_applied

    applied = get_applied(model)
    current = applied.config.get("context") if applied is not None else None
    if current is not None and current.method_key == "icae" and reduction is None:
        return current
    cfg = hf_tokred.TokenReductionConfig.coerce(reduction if reduction is not None else {
        "method": "icae", "memory_slots": memory_slots, "chunk_tokens": chunk_tokens, "rank": rank, "alpha": alpha,
        "slot_form": slot_form, **({} if target_modules is None else {"target_modules": list(target_modules)})})
    if cfg.method_key != "icae":
        raise ConfigError(f"reduction: expected an icae config, got {cfg.method_key!r}", field="reduction")
    hf_tokred.apply(model, cfg)
    return cfg


def training_windows(tokenizer, chunk_tokens: int, split: str = "train", count: int | None = None, seed: int = 0):
    """Windows of ``2 * chunk_tokens`` ids of :func:`lm_texts` ``(split)``: the first half is the context, the
    second its continuation."""
    from .lm_data import lm_texts, token_windows

    return token_windows(tokenizer, lm_texts(split), 2 * chunk_tokens, count=count, seed=seed)


def train_icae(model, tokenizer, *, reduction=None, memory_slots: int = 32, chunk_tokens: int = 128, rank: int = 16,
               alpha: float = 32.0, slot_form: str = "kv", target_modules=None, steps: int = 300,
               batch_size: int = 2, lr: float = 1e-3, lm_ratio: float = 0.5, lr_schedule: str = "linear",
               max_grad_norm: float = 1.0, seed: int = 0, windows=None,
               output_dir=None, resume: bool = True, save_every: int = 25, heldout: int = 16,
               max_minutes: float | None = None, progress: bool = True):
    """Pretrain ICAE's learned part on ``model`` (a causal LM; returned with the reduction attached and trained).

    The reduction: the icae one already attached, else ``reduction``, else a fresh one (``memory_slots``,
    ``chunk_tokens``, ``rank``, ``alpha``, ``slot_form``, ``target_modules``: None for the config's default). Only
    the LoRA and the memory / ``<AE>`` embeddings train (the model is frozen; LoRA ``lora_A`` and the embeddings
    drawn from ``seed``). Data: ``windows`` (a ``(n, 2 * chunk_tokens)`` LongTensor), else
    :func:`training_windows` of the training split, visited in a seeded order (reshuffled every pass). Each step is
    one objective for the whole batch: LM with probability ``lm_ratio``, else AE (the draw is seeded, so a resumed
    run draws the same). AdamW (no weight decay) at ``lr`` with the
    ``lr_schedule`` decay, gradients clipped to ``max_grad_norm``. With ``output_dir``: a checkpoint every
    ``save_every`` steps (resumed with ``resume``), and at the end ``save_pretrained`` + tokenizer +
    ``icae_training.json`` + a model card with the held-out accuracies of :func:`evaluate_icae_chunks` on
    ``heldout`` windows (0: skip). ``max_minutes`` stops the loop after that much wall time (this call's), at a
    step boundary, and saves what was trained: the steps actually done are recorded (``state["step"]``,
    ``state["stopped_early"]``); a later call with the same settings and ``resume`` continues the run.
    """
    from tqdm.auto import tqdm

    from ..integration.icae import icae_losses
    from ..integration.wiring import MODULES_ATTR
    from ..methods.lm.icae import MODULE_NAME
    from ..training import LR_SCHEDULES, _batch_order, _prepare_checkpoint, _resumable_step, lr_factor, save_trained

    _check_settings(steps=steps, batch_size=batch_size, save_every=save_every, memory_slots=memory_slots,
                    chunk_tokens=chunk_tokens, lm_ratio=lm_ratio, lr=lr)
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}",
                          field="lr_schedule")
    rng_state = torch.random.get_rng_state()
    try:
        cfg = _attach(model, reduction, memory_slots, chunk_tokens, rank, alpha, slot_form, target_modules)
        if windows is None:
            windows = training_windows(tokenizer, cfg.chunk_tokens, "train", seed=seed)
        if windows.dim() != 2 or windows.shape[1] != 2 * cfg.chunk_tokens or windows.shape[0] == 0:
            raise ConfigError(f"windows: expected a (n >= 1, {2 * cfg.chunk_tokens}) tensor of ids (context + "
                              f"continuation of chunk_tokens each), got {tuple(windows.shape)}", field="windows")
        parts = model._modules[MODULES_ATTR][MODULE_NAME]
        parts.lora.reset_parameters(seed)
        parts.reset_embeddings(model.get_input_embeddings().weight.detach(), seed)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        params = list(parts.parameters())
        for parameter in params:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
        fingerprint = {"data_sha256": digest, "steps": steps, "reduction": cfg.to_dict(), "lr": lr, "batch_size": batch_size,
                       "seed": seed, "lr_schedule": lr_schedule, "lm_ratio": lm_ratio, "max_grad_norm": max_grad_norm}
        state = {"step": 0, "losses": [], "fingerprint": fingerprint,
                 "windows": int(windows.shape[0]), "seconds": 0.0}
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, parts, optimizer, params, state)
        if state["step"] and checkpoint is not None:  # resumed: keep counting the wall time already spent
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
                state["seconds"] = float(json.load(fh).get("seconds", 0.0))
        order = _batch_order(int(windows.shape[0]), steps * batch_size, True, torch.Generator().manual_seed(seed))
        draws = random.Random(seed)
        objectives = ["lm" if draws.random() < lm_ratio else "ae" for _ in range(steps)]
        device = model.get_input_embeddings().weight.device
        was_training = model.training
        model.eval()
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train icae", disable=not progress)
        start = began = time.perf_counter()
        state["stopped_early"] = False
        for step in range(state["step"], steps):
            if max_minutes is not None and time.perf_counter() - began > 60 * max_minutes:
                state["stopped_early"] = True
                if checkpoint is not None:
                    from ..training import _save_checkpoint

                    _save_checkpoint(checkpoint, parts, optimizer, params, state)
                break
            batch = windows[order[step * batch_size:(step + 1) * batch_size]].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(lr_schedule, step, steps)
            context, continuation = batch[:, :cfg.chunk_tokens], batch[:, cfg.chunk_tokens:]
            if objectives[step] == "lm":
                loss, _ = icae_losses(model, context, continuation)
            else:
                loss, _ = icae_losses(model, context)
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, parts, save_every, steps,
                            max_grad_norm=max_grad_norm)
            state["seconds"] = round(state.get("seconds", 0.0) + time.perf_counter() - start, 2)
            start = time.perf_counter()
        bar.close()
        for parameter in params:
            parameter.requires_grad_(False)
        model.train(was_training)
        if heldout:
            state["heldout"] = evaluate_icae_chunks(model, tokenizer, count=heldout, seed=seed, progress=progress)
        if output_dir is not None:
            save_trained(output_dir, model, tokenizer, TRAINING_STATE, state, model_card(model, cfg, state))
    finally:
        torch.random.set_rng_state(rng_state)
    model.train_losses = list(state["losses"])
    model.icae_training = state
    return model


def evaluate_icae_chunks(model, tokenizer, *, count: int = 16, seed: int = 0, batch_size: int = 4,
                         progress: bool = True) -> dict:
    """Teacher-forced token accuracy of the AE (reconstruction) and LM (continuation) objectives through the slots on
    ``count`` held-out windows at the training length (one chunk each); also the dense model's LM accuracy on the
    same continuations with the full context in view, and its accuracy on the contexts with no context at all.

    Example:
        >>> evaluate_icae_chunks(model, tokenizer, count=8)                   # doctest: +SKIP
        {'windows': 8, 'ae_accuracy': ..., 'lm_accuracy': ..., 'dense_lm_accuracy': ..., 'no_context_accuracy': ...}
    """
    from tqdm.auto import tqdm

    from ..integration.icae import _attached, icae_losses

    cfg, _ = _attached(model)
    windows = training_windows(tokenizer, cfg.chunk_tokens, "heldout", count=count, seed=seed)
    device = model.get_input_embeddings().weight.device
    sums = {"ae_accuracy": 0.0, "lm_accuracy": 0.0, "dense_lm_accuracy": 0.0, "no_context_accuracy": 0.0}
    with torch.no_grad():
        for i in tqdm(range(0, count, batch_size), desc="held-out icae", disable=not progress):
            batch = windows[i:i + batch_size].to(device)
            n = batch.shape[0]
            context, continuation = batch[:, :cfg.chunk_tokens], batch[:, cfg.chunk_tokens:]
            sums["ae_accuracy"] += icae_losses(model, context)[1] * n
            sums["lm_accuracy"] += icae_losses(model, context, continuation)[1] * n
            logits = model(input_ids=batch, use_cache=False).logits  # plain forward: the dense model
            predicted = logits[:, :-1].argmax(-1)
            targets = batch[:, 1:]
            k = cfg.chunk_tokens
            sums["dense_lm_accuracy"] += float((predicted[:, k - 1:] == targets[:, k - 1:]).float().mean()) * n
            sums["no_context_accuracy"] += float((predicted[:, :k - 1] == targets[:, :k - 1]).float().mean()) * n
    return {"windows": count, **{k: round(v / count, 4) for k, v in sums.items()}}


SLOT_FORM_TEXT = {
    "kv": "The slots are the encoder's keys and values at the memory positions in every layer (500xCompressor, "
          "arXiv 2408.03094; `slot_form=\"kv\"`).",
    "hidden": "The slots are the encoder's last hidden states at the memory positions, read as input embeddings "
              "(the paper's; `slot_form=\"hidden\"`).",
}


def model_card(model, cfg, state: dict) -> str:
    base = getattr(model, "name_or_path", "") or type(model).__name__
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None
    losses = state["losses"]
    final = sum(losses[-20:]) / max(len(losses[-20:]), 1)
    fp = state["fingerprint"]
    held = state.get("heldout")
    held_rows = "" if not held else f"""
## Held-out figures at the training length ({held["windows"]} windows of {cfg.chunk_tokens} + {cfg.chunk_tokens} tokens, teacher-forced)

| | token accuracy |
|---|---|
| reconstruction of the context from its {cfg.memory_slots} slots (AE) | {held["ae_accuracy"]:.4f} |
| continuation from the slots (LM) | {held["lm_accuracy"]:.4f} |
| continuation, dense model with the full context | {held["dense_lm_accuracy"]:.4f} |
| the context itself, dense model with no context (floor) | {held["no_context_accuracy"]:.4f} |

At 512 tokens (4 chunks -> 128 slots) and on passkey retrieval: `hf-tokred learned-lm icae`.
"""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- icae
- context-compression
- hf_tokred
{f"base_model: {base}{chr(10)}" if hub_id else ""}---

# ICAE memory slots for `{base}` (hf_tokred)

An In-context Autoencoder (Ge et al., arXiv 2307.06945): a LoRA encoder (rank {cfg.rank}, alpha {cfg.alpha},
on {", ".join(cfg.target_modules) or "every Linear layer"}) turns every chunk of at most {cfg.chunk_tokens} context
tokens into {cfg.memory_slots} memory slots that the frozen model reads ({cfg.ratio:g}x compression). {SLOT_FORM_TEXT[cfg.slot_form]}
`model.safetensors` holds the unchanged base model; the LoRA and the memory / `<AE>` embeddings are in
`token_reduction.safetensors`. Without hf_tokred the folder loads as the plain base model.

```python
import torch, hf_tokred
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this folder>")          # ICAE re-attached
ctx = hf_tokred.compress_context(model, context_ids)                  # 512 tokens -> 128 slots
out = model.generate(torch.cat([ctx.prefix_ids, question_ids], -1), past_key_values=ctx.fresh_cache())
```

## Training

- data: {state["windows"]} windows of {2 * cfg.chunk_tokens} tokens of the Python standard library's documentation
  and docstrings (`hf_tokred.recipes.lm_data.lm_texts("train")`), context = first {cfg.chunk_tokens}, continuation = the rest
- objectives: autoencoding and language modelling (LM drawn per step with probability {fp["lm_ratio"]}), teacher-forced,
  decoder frozen; no instruction fine-tuning
- steps: {state["step"]}{f" (of {fp.get('steps')} planned: stopped by the time budget)" if state.get("stopped_early") else ""}, batch size {fp["batch_size"]}, learning rate {fp["lr"]} ({fp["lr_schedule"]}), seed {fp["seed"]}
- wall time: {state["seconds"]:.0f} s on a shared CPU (1 thread, under load)
- final training loss (mean of the last {min(20, len(losses))} steps): {final:.4f}
- data fingerprint (SHA-256 of the windows): `{fp["data_sha256"]}`
{held_rows}
`checkpoint/` (optimizer state, for resuming) is not needed for inference.
"""


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train icae`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "icae"]).memory_slots
        32
    """
    from ..cli import _float_in, _positive_int
    from ..methods.lm.icae import SLOT_FORMS
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "icae", help="ICAE's LoRA encoder and memory slots on SmolLM2 (4x context "
                              "compression)", description=DESCRIPTION, output=DEFAULT_OUTPUT, steps=300, corpus=False)
    train.add_argument("--memory-slots", type=_positive_int, default=32, help="memory slots per chunk (default: 32)")
    train.add_argument("--chunk-tokens", type=_positive_int, default=128,
                       help="context tokens per chunk (default: 128)")
    train.add_argument("--batch-size", type=_positive_int, default=2, help="windows per step (default: 2)")
    train.add_argument("--lr", type=_float_in(1e-7, 1.0), default=1e-3, help="learning rate (default: 1e-3)")
    train.add_argument("--max-minutes", type=_float_in(0.0, 1e6), default=None,
                       help="stop after this many minutes and save what was trained (rerun to resume)")
    train.add_argument("--slot-form", choices=SLOT_FORMS, default="kv",
                       help="what the decoder reads of the encoder at the memory positions: kv (its keys and values in "
                            "every layer, 500xCompressor; default) or hidden (its last hidden states as input "
                            "embeddings, the paper's)")
    train.add_argument("--target-modules", type=lambda text: [t for t in text.split(",") if t], default=None,
                       help="comma-separated projections the encoder's LoRA adapts (default: q_proj,k_proj,v_proj,"
                            "o_proj; the paper's: q_proj,v_proj)")
    train.add_argument("--lm-ratio", type=_float_in(0.0, 1.0), default=0.5,
                       help="probability of the language-modelling objective per step (default: 0.5)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train on the embedded SmolLM2 and save."""
    from ..cli import format_table
    from ..embedded import load_smollm2
    from . import recipe_output

    model, tokenizer = load_smollm2()
    output = recipe_output(args, DEFAULT_OUTPUT)
    train_icae(model, tokenizer, memory_slots=args.memory_slots, chunk_tokens=args.chunk_tokens,
               slot_form=args.slot_form, target_modules=args.target_modules, steps=args.steps,
               batch_size=args.batch_size, lr=args.lr, lm_ratio=args.lm_ratio, seed=args.seed, output_dir=output,
               max_minutes=args.max_minutes, progress=not args.no_progress)
    print(f"saved to {output}: AutoModelForCausalLM.from_pretrained({output!r}) re-attaches ICAE")
    held = model.icae_training.get("heldout")
    if held:
        print(format_table(["held-out (teacher-forced)", "token accuracy"],
                           [[k, f"{v:.4f}"] for k, v in held.items() if k != "windows"], right={1}))
    return 0


__all__ = ["evaluate_icae_chunks", "train_icae", "training_windows"]
