"""Training-free screening of encoder settings on MiniLM: FLOPs saved and cosine to dense on 96 *training* texts
(stdlib texts 192-287, never the 192 held-out ones), to choose settings before a trained, held-out run.

    python docs/scripts/minilm_training_free_screen.py CONFIGS_JSON [--rank-received]

CONFIGS_JSON is a list of configs, e.g. '[{"method": "stvit", "ratio": 0.4, "start": 2, "iterations": 3}]'.
--rank-received ranks tokens by the attention they receive (SigLIP's fallback) instead of the CLS row.
"""
import copy
import json
import sys

import torch

import hf_tokred
import hf_tokred.integration.encoders as encoders
from hf_tokred.bench.encoders import DEFAULT_BATCH, cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm

if "--rank-received" in sys.argv:
    statistics = encoders.attention_statistics

    def received(module, query, key, value, mask, needs, class_tokens, valid):
        return statistics(module, query, key, value, mask, needs, 0, valid)

    encoders.attention_statistics = received
torch.set_num_threads(1)
model, tokenizer = load_minilm()
batches = text_batches(tokenizer, stdlib_texts(tokenizer, 96, skip=192), DEFAULT_BATCH)
reference, dense_flops = embed_with_flops(model, batches, reduced=False)
for config in json.loads(sys.argv[1]):
    reduced = copy.deepcopy(model)
    hf_tokred.apply(reduced, config)
    embeddings, flops = embed_with_flops(reduced, batches, reduced=True)
    stats = cosine_stats(embeddings, reference)
    print(f"{json.dumps(config):90s} saved {1 - flops / dense_flops:6.1%}  cos {stats['mean']:.4f}  "
          f"p5 {stats['p5']:.4f}  min {stats['min']:.4f}", flush=True)
