"""Variants of the backbone fine-tune of a reduced MiniLM, on validation texts: token-level distillation, the
learning rate, parameters kept frozen.

The benchmark's recipes fine-tune the backbone through the hard reduction with one loss, ``1 - cosine`` of the
sentence embeddings (:func:`hf_tokred.training.pooled_cosine_loss`): one target per text. DynamicViT's paper
also distils every kept token's final state from the teacher's. Here the pooled loss gets that term,
``TOKEN_WEIGHT * sum ||s_i - t_i||^2 / sum ||t_i||^2`` over the real input tokens still carried at the output
(each compared with the output token that carries it), for Evo-ViT's recipe or the phase 2 of SPViT / IA-RED².
Nothing here touches the benchmark's 192 held-out texts: validation = stdlib texts 192..391, training = texts
392..2091 (1,700); the first 208 training texts (13 batches) are also scored, to see how far the fine-tune overfits.

    python docs/scripts/minilm_finetune_validation.py METHOD TOKEN_WEIGHT [--steps N] [--setting JSON]
        [--lr LR] [--frozen PREFIX,...] [--mix A,B,...]

METHOD is ``evo_vit`` (800 backbone steps by default, the 30.0 % schedule), ``spvit`` (400 selector steps, then
700 backbone steps; ``keep_rate=0.55``) or ``ia_red2`` (150 interpreter steps, then 700; ``keep_rate=0.55``).
``--lr`` is the backbone's learning rate (1e-4, the recipes'); ``--frozen`` keeps the parameters whose names start
with one of the prefixes out of the fine-tune (e.g. ``embeddings.``); ``--mix`` also scores the backbone interpolated
between the dense and the fine-tuned weights (WiSE-FT, Wortsman et al., arXiv 2109.01903: ``(1 - a) * dense + a *
fine-tuned`` for each ``a``; the learned parts stay as trained). Example (one thread, about 30 min):
``python docs/scripts/minilm_finetune_validation.py evo_vit 0.3``.
"""

import argparse
import copy
import json
import time

import torch

import hf_tokred
from hf_tokred.bench.encoders import cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.cli import _fractions
from hf_tokred.embedded import load_minilm
from hf_tokred.integration.encoders import source_map, unmerge
from hf_tokred.recipes.ia_red2 import train_ia_red2
from hf_tokred.recipes.spvit import train_spvit
from hf_tokred.training import _dense_embedding, _last_hidden, _model_inputs, _optimize, _pooled_cosine

VALIDATION, TRAINING = (192, 200), (392, 1700)  # (skip, count)
PHASE1 = {"spvit": (train_spvit, 400), "ia_red2": (train_ia_red2, 150)}
SETTINGS = {
    "evo_vit": {"layers": [2, 3, 4, 5], "keep_rates": [0.7, 0.6, 0.45, 0.4]},
    "spvit": {"keep_rate": 0.55, "layers": [2], "selector_dim": 96, "prop_attn": True},
    "ia_red2": {"keep_rate": 0.55, "layers": [2], "select": "top_k"},
}


def fine_tune(model, teacher, batches, token_weight: float, steps: int, lr: float, frozen: tuple[str, ...]) -> None:
    """The recipes' backbone loop (AdamW, linear decay, shuffled, seed 0) with the token term added."""
    from hf_tokred.integration.wiring import MODULES_ATTR

    learned = model._modules.get(MODULES_ATTR) or torch.nn.ModuleDict()
    learned_ids = {id(p) for p in learned.parameters()}
    backbone = [p for name, p in model.named_parameters() if id(p) not in learned_ids and not name.startswith(frozen)]
    trained = {id(p) for p in backbone}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trained)
    model.eval()
    targets: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def step_loss(index: int) -> torch.Tensor:
        inputs = _model_inputs(batches[index])
        if index not in targets:  # the teacher's per-token states only where the token term needs them
            with torch.no_grad():
                tokens = _last_hidden(teacher(**inputs)) if token_weight else None
            targets[index] = (_dense_embedding(teacher, inputs), tokens)
        pooled, tokens = targets[index]
        hidden = None

        def keep(module, args, output):  # the student's last hidden state of this very forward pass
            nonlocal hidden
            hidden = _last_hidden(output)

        handle = model.register_forward_hook(keep)
        try:
            loss = _pooled_cosine(model, inputs, pooled)
        finally:
            handle.remove()
        if token_weight:
            carried = source_map(model).any(dim=1) & inputs["attention_mask"].bool()
            student = unmerge(model, hidden)
            error = ((student - tokens) ** 2).sum(-1)
            loss = loss + token_weight * (error * carried).sum() / ((tokens ** 2).sum(-1) * carried).sum()
        return loss

    _optimize(model, [{"params": backbone, "lr": lr, "weight_decay": 0.0}], step_loss, len(batches), steps=steps,
              lr_schedule="linear", shuffle=True, seed=0, log_every=0, log=print, label="", digits=5)


def mixed_backbones(student, dense, mixes: tuple[float, ...]):
    """Yield each ``a`` of ``mixes`` with the student's backbone set to ``(1 - a) * dense + a * fine-tuned`` (WiSE-FT);
    the fine-tuned weights are restored at the end."""
    reference = dict(dense.named_parameters())
    params = dict(student.named_parameters())
    tuned = {name: p.detach().clone() for name, p in params.items() if name in reference}
    try:
        for mix in mixes:
            with torch.no_grad():
                for name, weight in tuned.items():
                    params[name].copy_(weight if mix == 1.0 else torch.lerp(reference[name].detach(), weight, mix))
            yield mix
    finally:
        with torch.no_grad():
            for name, weight in tuned.items():
                params[name].copy_(weight)


def validation_split():
    """MiniLM (one thread) and its batches of 16 texts: validation, training, the first 208 training texts (``seen``),
    and the dense embeddings and FLOPs of ``validation`` and ``seen`` (``references``, keyed by those names)."""
    torch.set_num_threads(1)
    model, tokenizer = load_minilm()
    validation = text_batches(tokenizer, stdlib_texts(tokenizer, VALIDATION[1], skip=VALIDATION[0]), 16)
    training = text_batches(tokenizer, stdlib_texts(tokenizer, TRAINING[1], skip=TRAINING[0]), 16)
    seen = training[: VALIDATION[1] // 16 + 1]
    references = {name: embed_with_flops(model, texts, reduced=False) for name, texts in
                  (("validation", validation), ("training", seen))}
    return model, validation, training, seen, references


def main(method: str, token_weight: float, steps: int | None, setting: dict | None, lr: float,
         frozen: tuple[str, ...], mixes: tuple[float, ...]) -> None:
    model, validation, training, seen, references = validation_split()
    setting = setting or SETTINGS[method]
    student = copy.deepcopy(model)
    hf_tokred.apply(student, {"method": method, **setting})
    start = time.perf_counter()
    if method in PHASE1:  # the learned part first, backbone frozen (the benchmark's phase 1)
        train, phase1_steps = PHASE1[method]
        train(student, training, teacher=model, steps=phase1_steps, shuffle=True)
    fine_tune(student, model, training, token_weight, steps or (800 if method == "evo_vit" else 700), lr, frozen)
    record = {"method": method, "setting": setting, "token_weight": token_weight, "lr": lr, "frozen": list(frozen),
              "train_s": round(time.perf_counter() - start)}
    for mix in mixed_backbones(student, model, mixes):
        record["mix"] = mix
        for name, texts in (("validation", validation), ("training", seen)):
            reference, dense_flops = references[name]
            embeddings, flops = embed_with_flops(student, texts, reduced=True)
            record[name] = {"saved": round(1 - flops / dense_flops, 4),
                            **{k: round(v, 4) for k, v in cosine_stats(embeddings, reference).items()}}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=sorted(SETTINGS))
    parser.add_argument("token_weight", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--setting", type=json.loads)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--frozen", type=lambda text: tuple(filter(None, text.split(","))), default=())
    parser.add_argument("--mix", type=_fractions, default=(1.0,))
    args = parser.parse_args()
    main(args.method, args.token_weight, args.steps, args.setting, args.lr, args.frozen, args.mix)
