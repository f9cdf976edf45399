"""SPViT with a keep threshold instead of a fixed keep count per text, on validation texts.

SPViT's stage keeps ``ceil(keep_rate * n)`` tokens of every text. The paper's soft masks keep every token whose
keep score passes a threshold, so a text with many redundant tokens keeps fewer and a dense one more, at the same
mean cost. This script trains the benchmark's SPViT (``keep_rate=0.55`` before block 2, proportional attention: 400
selector steps, then 700 backbone steps through the fixed-count reduction) and scores it both ways after each
phase. The threshold (on the selector's keep logit) is chosen on training texts so that they save what the fixed
count saves there; the validation texts are then scored at that threshold, beside the fixed count at
``keep_rate`` 0.5, 0.55 and 0.6 (to read the fixed count's curve at the threshold's FLOPs).
Nothing here touches the benchmark's 192 held-out texts: validation = stdlib texts 192..391, training = texts
392..2091 (the split of ``minilm_finetune_validation.py``).

    python docs/scripts/minilm_spvit_threshold_validation.py [PHASE1_STEPS PHASE2_STEPS]  # 400 700: 1 thread, 40 min
"""

import copy
import json
import sys
import time

import torch
from minilm_finetune_validation import SETTINGS, fine_tune, validation_split

import hf_tokred
from hf_tokred.bench.encoders import cosine_stats, embed_with_flops
from hf_tokred.integration.encoders import STATE_ATTR
from hf_tokred.methods.encoder import spvit
from hf_tokred.recipes.spvit import train_spvit

KEEP_RATES = (0.5, 0.55, 0.6)
fixed_keep_top = spvit.keep_top
threshold = None  # None: the fixed count


def keep_top_above_threshold(score, counts, protected, valid=None, fuse_rest=None, squeeze_into=None):
    """The stage's keep_top with each row's count replaced by its number of candidates scoring above ``threshold``."""
    if threshold is not None:
        candidates = torch.ones_like(score, dtype=torch.bool) if valid is None else valid.clone()
        candidates[:, :protected] = False
        above = ((score > threshold) & candidates).sum(dim=1)
        counts = torch.minimum(above.clamp_min(1), candidates.sum(dim=1))
    return fixed_keep_top(score, counts, protected, valid, fuse_rest, squeeze_into)


spvit.keep_top = keep_top_above_threshold


def score(model, texts, reference, keep_rate=None, at=None):
    """Saved FLOPs and cosine stats of ``model`` on ``texts``: the fixed count at ``keep_rate`` or threshold ``at``."""
    global threshold
    schedule = model.__dict__[STATE_ATTR].schedule  # the stage's keep rate per block, read at every forward pass
    stages = [i for i, amount in enumerate(schedule) if amount]
    trained = [schedule[i] for i in stages]
    threshold = at
    if keep_rate is not None:
        for i in stages:
            schedule[i] = keep_rate
    try:
        embeddings, flops = embed_with_flops(model, texts, reduced=True)
    finally:
        threshold = None
        for i, amount in zip(stages, trained):
            schedule[i] = amount
    return {"saved": round(1 - flops / reference[1], 4),
            **{k: round(v, 4) for k, v in cosine_stats(embeddings, reference[0]).items()}}


def calibrate(model, texts, reference, target_saved: float) -> float:
    """The keep-logit threshold at which ``texts`` save ``target_saved`` of the FLOPs (bisection)."""
    low, high = -10.0, 10.0  # a higher threshold keeps fewer tokens: saves more
    for _ in range(20):
        middle = (low + high) / 2
        if score(model, texts, reference, at=middle)["saved"] < target_saved:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def report(model, phase, validation, seen, references):
    fixed_seen = score(model, seen, references["training"])
    at = calibrate(model, seen, references["training"], fixed_seen["saved"])
    record = {"phase": phase, "threshold": round(at, 4),
              "training": {"fixed": fixed_seen, "threshold": score(model, seen, references["training"], at=at)},
              "validation": {"threshold": score(model, validation, references["validation"], at=at),
                             **{f"fixed {k}": score(model, validation, references["validation"], keep_rate=k)
                                for k in KEEP_RATES}}}
    print(json.dumps(record), flush=True)


def main(phase1_steps: int, phase2_steps: int) -> None:
    model, validation, training, seen, references = validation_split()
    student = copy.deepcopy(model)
    hf_tokred.apply(student, {"method": "spvit", **SETTINGS["spvit"]})
    start = time.perf_counter()
    train_spvit(student, training, teacher=model, steps=phase1_steps, shuffle=True)
    print(json.dumps({"phase 1 s": round(time.perf_counter() - start)}), flush=True)
    report(student, 1, validation, seen, references)
    fine_tune(student, model, training, 0.0, phase2_steps, 1e-4, ())
    print(json.dumps({"phase 1 + 2 s": round(time.perf_counter() - start)}), flush=True)
    report(student, 2, validation, seen, references)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3])) if len(sys.argv) > 1 else main(400, 700)
