"""SPViT on MiniLM: one stage before block 2, selectors trained (phase 1), then optionally the backbone through the
hard keep+package (phase 2, fine_tune_reduced); held-out cosine to dense on the benchmark's 192 evaluation texts.

    python docs/scripts/minilm_quality_spvit.py KEEP_RATES SELECTOR_STEPS TRAIN_TEXTS FINETUNE_STEPS [CONFIG_JSON]
"""
import copy
import json
import sys
import time

import hf_tokred
from hf_tokred.bench.encoders import DEFAULT_BATCH, cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm
from hf_tokred.recipes.spvit import train_spvit
from hf_tokred.training import fine_tune_reduced

keeps = [float(x) for x in sys.argv[1].split(",")]
steps, train_texts, ft_steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # more config fields, e.g. '{"prop_attn": true}'
model, tok = load_minilm()
batches = text_batches(tok, stdlib_texts(tok, 192), DEFAULT_BATCH)
train = text_batches(tok, stdlib_texts(tok, train_texts, skip=192), DEFAULT_BATCH)
ref, dense_flops = embed_with_flops(model, batches, reduced=False)
for keep in keeps:
    target = copy.deepcopy(model)
    cfg = {"method": "spvit", "keep_rate": keep, "layers": [2], "selector_dim": 96, **extra}
    hf_tokred.apply(target, cfg)
    t = time.perf_counter()
    losses = train_spvit(target, train, steps=steps, shuffle=True, log_every=50)
    t1 = time.perf_counter() - t
    emb, fl = embed_with_flops(target, batches, reduced=True)
    print(json.dumps({"keep": keep, "phase": 1, "steps": steps, "train_texts": train_texts, "saved": round(1 - fl / dense_flops, 4),
                      "cos": cosine_stats(emb, ref), "train_s": round(t1, 1), "loss": [losses[0], sum(losses[-20:]) / 20]}), flush=True)
    if ft_steps:
        t = time.perf_counter()
        fine_tune_reduced(target, train, teacher=model, steps=ft_steps, lr=1e-4, log_every=50)
        emb, fl = embed_with_flops(target, batches, reduced=True)
        print(json.dumps({"keep": keep, "phase": 2, "finetune_steps": ft_steps, "saved": round(1 - fl / dense_flops, 4),
                          "cos": cosine_stats(emb, ref), "train_s": round(time.perf_counter() - t, 1)}), flush=True)
    hf_tokred.remove(target)
