"""ToCom on MiniLM: ToMe(hidden) at a ratio the model was not tuned for (it was tuned dense), with and without the
trained plug-in; held-out cosine to dense on the benchmark's 192 evaluation texts."""
import json
import sys
import time

import hf_tokred
from hf_tokred.bench.encoders import DEFAULT_BATCH, cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm
from hf_tokred.integration.tocom import plugin_off
from hf_tokred.recipes.tocom import train_tocom

ratios = [float(x) for x in sys.argv[1].split(",")]
steps, train_texts, rank = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 2e-3
model, tok = load_minilm()
batches = text_batches(tok, stdlib_texts(tok, 192), DEFAULT_BATCH)
train = text_batches(tok, stdlib_texts(tok, train_texts, skip=192), DEFAULT_BATCH)
ref, dense_flops = embed_with_flops(model, batches, reduced=False)
for ratio in ratios:
    cfg = {"method": "tocom", "ratio": ratio, "source_ratio": 0.0, "rank": rank, "metric": "hidden"}
    hf_tokred.apply(model, cfg)
    with plugin_off(model):
        emb, fl = embed_with_flops(model, batches, reduced=True)
    print(json.dumps({"ratio": ratio, "plugin": False, "saved": round(1 - fl / dense_flops, 4),
                      "cos": cosine_stats(emb, ref)}), flush=True)
    t = time.perf_counter()
    losses = train_tocom(model, train, steps=steps, lr=lr, shuffle=True, log_every=50)
    train_s = time.perf_counter() - t
    emb, fl = embed_with_flops(model, batches, reduced=True)
    print(json.dumps({"ratio": ratio, "plugin": True, "rank": rank, "steps": steps, "train_texts": train_texts,
                      "lr": lr, "saved": round(1 - fl / dense_flops, 4), "cos": cosine_stats(emb, ref),
                      "train_s": round(train_s, 1), "loss_first_last": [losses[0], sum(losses[-20:]) / 20]}), flush=True)
    hf_tokred.remove(model)
