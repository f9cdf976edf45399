"""SPViT on MiniLM: one stage before block 2, selectors trained (phase 1), then optionally the backbone through the
hard keep+package (phase 2, fine_tune_reduced); held-out cosine to dense on the benchmark's 192 evaluation texts.

    python docs/scripts/minilm_quality_spvit.py KEEP_RATES SELECTOR_STEPS TRAIN_TEXTS FINETUNE_STEPS [CONFIG_JSON]
        [--lr LR] [--mix A,B,...] [--seed SEED]

``--lr`` is the backbone's learning rate in phase 2 (1e-4); ``--mix`` also scores the backbone interpolated between the
dense and the fine-tuned weights (WiSE-FT; ``minilm_finetune_validation.py``); ``--seed`` (0) seeds both phases' batch
order and phase 1's Gumbel noise (the fresh selectors are drawn as ``hf_tokred.apply`` draws them, whatever the seed).
"""
import argparse
import copy
import json
import time

from minilm_finetune_validation import mixed_backbones

import hf_tokred
from hf_tokred.bench.encoders import DEFAULT_BATCH, cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.cli import _fractions
from hf_tokred.embedded import load_minilm
from hf_tokred.recipes.spvit import train_spvit
from hf_tokred.training import fine_tune_reduced

parser = argparse.ArgumentParser()
parser.add_argument("keeps", type=_fractions)
parser.add_argument("steps", type=int)
parser.add_argument("train_texts", type=int)
parser.add_argument("ft_steps", type=int)
parser.add_argument("extra", nargs="?", type=json.loads, default={})  # more config fields, e.g. '{"prop_attn": true}'
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--mix", type=_fractions, default=(1.0,))
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
keeps, steps, train_texts, ft_steps, extra = args.keeps, args.steps, args.train_texts, args.ft_steps, args.extra
model, tok = load_minilm()
batches = text_batches(tok, stdlib_texts(tok, 192), DEFAULT_BATCH)
train = text_batches(tok, stdlib_texts(tok, train_texts, skip=192), DEFAULT_BATCH)
ref, dense_flops = embed_with_flops(model, batches, reduced=False)
for keep in keeps:
    target = copy.deepcopy(model)
    cfg = {"method": "spvit", "keep_rate": keep, "layers": [2], "selector_dim": 96, **extra}
    hf_tokred.apply(target, cfg)
    t = time.perf_counter()
    losses = train_spvit(target, train, steps=steps, shuffle=True, seed=args.seed, log_every=50)
    t1 = time.perf_counter() - t
    emb, fl = embed_with_flops(target, batches, reduced=True)
    print(json.dumps({"keep": keep, "phase": 1, "seed": args.seed, "steps": steps, "train_texts": train_texts, "saved": round(1 - fl / dense_flops, 4),
                      "cos": cosine_stats(emb, ref), "train_s": round(t1, 1), "loss": [losses[0], sum(losses[-20:]) / 20]}), flush=True)
    if ft_steps:
        t = time.perf_counter()
        fine_tune_reduced(target, train, teacher=model, steps=ft_steps, lr=args.lr, seed=args.seed, log_every=50)
        train_s = round(time.perf_counter() - t, 1)
        for mix in mixed_backbones(target, model, args.mix):
            emb, fl = embed_with_flops(target, batches, reduced=True)
            print(json.dumps({"keep": keep, "phase": 2, "seed": args.seed, "finetune_steps": ft_steps, "lr": args.lr, "mix": mix,
                              "saved": round(1 - fl / dense_flops, 4), "cos": cosine_stats(emb, ref),
                              "train_s": train_s}), flush=True)
    hf_tokred.remove(target)
