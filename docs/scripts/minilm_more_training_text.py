"""Does more training text help the backbone phase? Phase 1 (the method's own trainer) on the benchmark's 1,900
training texts (stdlib texts 192..2091, the whole stdlib after the 192 held-out texts), then phase 2 (the backbone
through the hard reduction, lr 1e-4 with a linear decay, ``fine_tune_reduced``) on those 1,900 texts plus
``EXTRA_TEXTS`` texts cut the same way (64/128/192/256 tokens) from the docstrings of installed third-party
packages (transformers, torch, diffusers, numpy, ...: the only other prose on the machine). Prints the held-out
cosine (192 benchmark texts) and the cosine on the first 192 training texts (the over-fitting gap).

    python docs/scripts/minilm_more_training_text.py METHOD CONFIG_JSON PHASE1_STEPS FT_STEPS EXTRA_TEXTS [SEED]
    # SEED (default 0): the training seed of both phases (batch order, sampling); the learned part's initial
    # weights are always the same (hf_tokred's LEARNED_INIT_SEED).
    # Example (one thread, about 25 min):
    # ... ia_red2 '{"keep_rate":0.55,"layers":[2],"select":"top_k"}' 150 700 6000
"""
import copy
import json
import os
import sys
import sysconfig
import time

import torch

import hf_tokred
from hf_tokred.bench.encoders import (
    cosine_stats,
    embed_with_flops,
    paragraph_texts,
    source_docstrings,
    stdlib_texts,
    text_batches,
)
from hf_tokred.embedded import load_minilm
from hf_tokred.training import fine_tune_reduced

PACKAGES = ("transformers", "torch", "diffusers", "numpy", "huggingface_hub", "peft", "accelerate", "safetensors",
            "tokenizers", "tqdm", "jinja2", "yaml", "requests", "urllib3", "packaging", "filelock", "fsspec", "sympy",
            "networkx", "regex")


def package_paragraphs():
    """Docstring paragraphs of PACKAGES' source files (their tests left out), in sorted path order, each once."""
    root, seen = sysconfig.get_paths()["purelib"], set()
    for package in PACKAGES:
        for paragraph in source_docstrings(os.path.join(root, package), ("__pycache__", "test", "tests", "testing")):
            if paragraph not in seen:
                seen.add(paragraph)
                yield paragraph


torch.set_num_threads(1)
method, config = sys.argv[1], json.loads(sys.argv[2])
phase1, finetune, extra = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
seed = int(sys.argv[6]) if len(sys.argv) > 6 else 0
model, tok = load_minilm()
heldout = text_batches(tok, stdlib_texts(tok, 192), 16)
stdlib_train = stdlib_texts(tok, 1900, skip=192)
train = text_batches(tok, stdlib_train, 16)
train_probe = text_batches(tok, stdlib_train[:192], 16)
train_more = train + (text_batches(tok, paragraph_texts(tok, package_paragraphs(), extra), 16) if extra else [])
ref, dense = embed_with_flops(model, heldout, reduced=False)
probe_ref, _ = embed_with_flops(model, train_probe, reduced=False)
target = copy.deepcopy(model)
hf_tokred.apply(target, {"method": method, **config})
started = time.perf_counter()


def report(phase):
    emb, flops = embed_with_flops(target, heldout, reduced=True)
    probe, _ = embed_with_flops(target, train_probe, reduced=True)
    print(json.dumps({"method": method, "config": config, "phase": phase, "extra_texts": extra, "seed": seed,
                      "saved": round(1 - flops / dense, 4), "held-out cos": cosine_stats(emb, ref),
                      "training cos": cosine_stats(probe, probe_ref)["mean"],
                      "s": round(time.perf_counter() - started)}), flush=True)


if phase1:
    if method == "spvit":
        from hf_tokred.recipes.spvit import train_spvit
        train_spvit(target, train, steps=phase1, shuffle=True, seed=seed, log_every=100)
    elif method == "ia_red2":
        from hf_tokred.recipes.ia_red2 import train_ia_red2
        train_ia_red2(target, train, teacher=model, steps=phase1, shuffle=True, seed=seed, progress=False)
    else:
        raise SystemExit(f"phase 1 is written for spvit and ia_red2, not {method}; use PHASE1_STEPS 0")
    report(f"phase 1 ({phase1} steps)")
fine_tune_reduced(target, train_more, teacher=model, steps=finetune, lr=1e-4, lr_schedule="linear", seed=seed,
                  log_every=100)
report(f"phase 2 ({finetune} steps)")
