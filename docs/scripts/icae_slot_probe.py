"""How fast ICAE's slots learn, for a slot form and LoRA targets: a short training loop with the recipe's objectives,
measured on windows it never trained on.

    python docs/scripts/icae_slot_probe.py FORM STEPS WINDOWS [LR] [LM_RATIO] [TARGETS]

``FORM`` is ``kv`` or ``hidden``; ``TARGETS`` a comma-separated list of projections (default ``q_proj,v_proj``).
``WINDOWS`` 0: train on the training split's windows but the last 16, which are the validation windows (AE and LM
token accuracy on them every 100 steps), never the held-out split that the bench reports. ``WINDOWS`` n > 0: train
on the first n windows alone (the AE objective only) and report how well it fits them, then the held-out windows:
a check that the slot pathway can be learned at all. Each step: 2 windows drawn at random (seeded), the AE objective
or, with probability ``LM_RATIO``, the LM one (``hf_tokred.integration.icae.icae_losses``), AdamW at ``LR`` decayed
linearly to 0, gradients clipped to 1. One thread. E.g.

    python docs/scripts/icae_slot_probe.py kv 80 4                                   # fit 4 windows
    python docs/scripts/icae_slot_probe.py kv 300 0 1e-3 0.5 q_proj,k_proj,v_proj,o_proj
"""

import random
import sys
import time

import torch

import hf_tokred
from hf_tokred.embedded import load_smollm2
from hf_tokred.integration.icae import icae_losses
from hf_tokred.recipes.icae import training_windows

torch.set_num_threads(1)
form, steps, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
lm_ratio = float(sys.argv[5]) if len(sys.argv) > 5 else 0.5
targets = sys.argv[6].split(",") if len(sys.argv) > 6 else ["q_proj", "v_proj"]
model, tokenizer = load_smollm2()
hf_tokred.apply(model, {"method": "icae", "memory_slots": 32, "chunk_tokens": 128, "target_modules": targets,
                        "slot_form": form})
parts = model.hf_tokred_modules["icae"]
windows = training_windows(tokenizer, 128, "train", seed=0)
if count:
    windows, check = windows[:count], training_windows(tokenizer, 128, "heldout", count=16, seed=0)
else:
    windows, check = windows[:-16], windows[-16:]
params = list(parts.parameters())
learned = {id(p) for p in params}
for p in model.parameters():  # the model frozen, ICAE's part (hung under it) trained
    p.requires_grad_(id(p) in learned)
optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
generator, draws = torch.Generator().manual_seed(0), random.Random(0)
model.eval()


def accuracy(rows: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        ae = [icae_losses(model, rows[i:i + 4, :128])[1] for i in range(0, len(rows), 4)]
        lm = [icae_losses(model, rows[i:i + 4, :128], rows[i:i + 4, 128:])[1] for i in range(0, len(rows), 4)]
    return round(sum(ae) / len(ae), 4), round(sum(lm) / len(lm), 4)


began = time.time()
for step in range(steps):
    batch = windows[torch.randint(0, windows.shape[0], (2,), generator=generator)]
    autoencode = count > 0 or draws.random() >= lm_ratio
    for group in optimizer.param_groups:
        group["lr"] = lr * (1 - step / steps)
    if autoencode:
        loss, _ = icae_losses(model, batch[:, :128])
    else:
        loss, _ = icae_losses(model, batch[:, :128], batch[:, 128:])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if not count and (step + 1) % 100 == 0:
        print(f"step {step + 1}: validation AE / LM token accuracy {accuracy(check)}  {time.time() - began:.0f} s",
              flush=True)
if count:
    print(f"{steps} AE steps on {count} windows: their AE / LM accuracy {accuracy(windows[:4])}; held-out "
          f"{accuracy(check)}  {time.time() - began:.0f} s")
