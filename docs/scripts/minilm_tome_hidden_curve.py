"""ToMe with metric="hidden" on MiniLM at many ratios: the curve the learned methods are compared with at their own
FLOPs (the benchmark's 192 held-out texts; training-free, so no training texts).

    python docs/scripts/minilm_tome_hidden_curve.py 0.05,0.1,0.11,0.12,0.13,0.15
"""
import copy
import sys

import hf_tokred
from hf_tokred.bench.encoders import DEFAULT_BATCH, cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm

model, tok = load_minilm()
batches = text_batches(tok, stdlib_texts(tok, 192), DEFAULT_BATCH)
ref, dense = embed_with_flops(model, batches, reduced=False)
for r in [float(x) for x in sys.argv[1].split(",")]:
    target = copy.deepcopy(model)
    hf_tokred.apply(target, {"method": "tome", "ratio": r, "metric": "hidden"})
    emb, fl = embed_with_flops(target, batches, reduced=True)
    print(f"tome hidden ratio={r} saved {1 - fl / dense:.4f} cos {cosine_stats(emb, ref)['mean']:.4f}", flush=True)
