"""H1 quality runs: python quality.py METHOD 'JSON list of params' train_steps train_texts finetune_steps [lr]
[eval_texts] [extra JSON] [eval_skip]: eval_skip > 0 evaluates on texts eval_skip.. instead of the benchmark's
held-out texts 0.. (a validation split after the training texts: e.g. 2092 with 1,900 training texts)"""
import copy
import json
import sys
import time

import hf_tokred
from hf_tokred.bench.encoders import cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm
from hf_tokred.training import fine_tune_reduced

method = sys.argv[1]
settings = json.loads(sys.argv[2])
steps, ntrain, ft = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lr = float(sys.argv[6]) if len(sys.argv) > 6 else None
evaltexts = int(sys.argv[7]) if len(sys.argv) > 7 else 192
extra = json.loads(sys.argv[8]) if len(sys.argv) > 8 else {}
eval_skip = int(sys.argv[9]) if len(sys.argv) > 9 else 0
if method == "avit":
    from hf_tokred.recipes.avit import train_avit as trainer
else:
    from hf_tokred.recipes.ia_red2 import train_ia_red2 as trainer
model, tok = load_minilm()
t0 = time.perf_counter()
batches = text_batches(tok, stdlib_texts(tok, evaltexts, skip=eval_skip), 16)
ref, dense = embed_with_flops(model, batches, reduced=False)
train = text_batches(tok, stdlib_texts(tok, ntrain, skip=192), 16)
print("dense", dense / 1e9, time.perf_counter() - t0, flush=True)
for params in settings:
    s = time.perf_counter()
    target = copy.deepcopy(model)
    hf_tokred.apply(target, {"method": method, **params})
    opts = ({} if lr is None else {"lr": lr}) | extra
    losses = trainer(target, train, teacher=model, steps=steps, shuffle=True, progress=False, **opts)
    emb, fl = embed_with_flops(target, batches, reduced=True)
    c = cosine_stats(emb, ref)["mean"]
    print(f"{method} {params} phase1 steps={steps} loss {losses[0]:.4f}->{losses[-1]:.4f} saved {1 - fl / dense:.3f} cos {c:.4f} ({time.perf_counter() - s:.0f}s)", flush=True)
    if ft:
        fine_tune_reduced(target, train, teacher=model, steps=ft, lr=1e-4)
        emb, fl = embed_with_flops(target, batches, reduced=True)
        c = cosine_stats(emb, ref)["mean"]
        print(f"{method} {params} +finetune {ft} saved {1 - fl / dense:.3f} cos {c:.4f} ({time.perf_counter() - s:.0f}s)", flush=True)
