"""How long should phase 1 (the learned part alone, backbone frozen) train before the backbone phase? Chosen on
validation texts, reported on the held-out ones: phase 1 (the method's trainer, constant lr, shuffled batches) runs
``MAX_STEPS`` steps; every ``EVERY`` steps the hard reduction's cosine on the validation texts is measured and the
learned part snapshotted (with a constant lr and a seeded order, step N of this run is exactly an N-step run). The
length with the best validation cosine is chosen, phase 2 (the backbone, ``FT_STEPS`` steps at lr 1e-4 with a
linear decay, ``fine_tune_reduced``) runs from its snapshot, then validation and held-out figures are printed.
Splits: held-out = the benchmark's stdlib texts 0..191, validation = 192..391, training = 392..2091 (1,700).

    python docs/scripts/minilm_phase1_length_validation.py METHOD CONFIG_JSON MAX_STEPS EVERY FT_STEPS
    # Example (one thread, about 45 min):
    # ... ia_red2 '{"keep_rate":0.55,"layers":[2],"select":"top_k"}' 1200 200 700
"""
import copy
import json
import sys
import time

import torch

import hf_tokred
from hf_tokred.bench.encoders import cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm
from hf_tokred.training import fine_tune_reduced

torch.set_num_threads(1)
method, config = sys.argv[1], json.loads(sys.argv[2])
max_steps, every, finetune = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model, tok = load_minilm()
heldout = text_batches(tok, stdlib_texts(tok, 192), 16)
validation = text_batches(tok, stdlib_texts(tok, 200, skip=192), 16)
train = text_batches(tok, stdlib_texts(tok, 1700, skip=392), 16)
heldout_ref, heldout_flops = embed_with_flops(model, heldout, reduced=False)
validation_ref, validation_flops = embed_with_flops(model, validation, reduced=False)
target = copy.deepcopy(model)
hf_tokred.apply(target, {"method": method, **config})
learned = target.hf_tokred_modules
snapshots, curve = {}, {}
started = time.perf_counter()


def checkpoint(message):
    """The trainer's log line every EVERY steps: measure on validation in eval mode, snapshot, restore the modes."""
    step = every * (len(curve) + 1)  # the trainer logs after steps EVERY, 2 * EVERY, ...
    modes = {name: module.training for name, module in target.named_modules()}
    target.eval()
    with torch.no_grad():
        emb, flops = embed_with_flops(target, validation, reduced=True)
    for name, module in target.named_modules():
        module.training = modes[name]
    curve[step] = cosine_stats(emb, validation_ref)["mean"]
    snapshots[step] = copy.deepcopy(learned.state_dict())
    print(f"{message} | validation cos {curve[step]:.4f} saved {1 - flops / validation_flops:.3f} "
          f"({time.perf_counter() - started:.0f}s)", flush=True)


if method == "spvit":
    from hf_tokred.recipes.spvit import train_spvit
    train_spvit(target, train, steps=max_steps, shuffle=True, log_every=every, log=checkpoint)
elif method == "ia_red2":
    from hf_tokred.recipes.ia_red2 import train_ia_red2
    train_ia_red2(target, train, teacher=model, steps=max_steps, shuffle=True, progress=False, log_every=every,
                  log=checkpoint)
else:
    raise SystemExit(f"written for spvit and ia_red2, not {method}")
best = max(curve, key=curve.get)
print(json.dumps({"curve": curve, "best": best}), flush=True)
learned.load_state_dict(snapshots[best])
target.eval()
fine_tune_reduced(target, train, teacher=model, steps=finetune, lr=1e-4, log_every=100)
for split, batches, ref, dense in (("validation", validation, validation_ref, validation_flops),
                                   ("held-out", heldout, heldout_ref, heldout_flops)):
    emb, flops = embed_with_flops(target, batches, reduced=True)
    print(json.dumps({"method": method, "config": config, "phase1_steps": best, "finetune_steps": finetune,
                      "split": split, "saved": round(1 - flops / dense, 4), "cos": cosine_stats(emb, ref)}),
          flush=True)
print(f"total {time.perf_counter() - started:.0f}s")
