"""Gist tokens with the LoRA also on while the model reads the gist cache, against the recipe's gist-pass-only LoRA.

    OMP_NUM_THREADS=1 python docs/scripts/gist_reader_lora_validation.py gist-pass     # the recipe as shipped
    OMP_NUM_THREADS=1 python docs/scripts/gist_reader_lora_validation.py reader        # + the LoRA reading the cache

The paper fine-tunes the whole model, so the tokens after the gist tokens are read by a trained model too; the
recipe's LoRA runs only on the gist tokens. ``reader`` also turns it on for the continuation (in training, through
``continuation_logits``; in generation, for ``generate``'s passes after ``compress_context``). Both train with the
recipe's defaults (80 steps of 4 on training-split prompts 0..127) and are measured on training-split prompts
128..159, which neither trains on: the cross-entropy of the dense answers through the gist cache and the ROUGE-L
of greedy answers against the dense answers. Prints one JSON line.
"""

import json
import sys
import time

import torch

import hf_tokred.integration.gist as gist_wiring
from hf_tokred.embedded import load_smollm2
from hf_tokred.integration.wiring import MODULES_ATTR
from hf_tokred.recipes.gist import gist_answers, gist_data, gist_loss, mean_rouge_l, train_gist

variant = sys.argv[1]
if variant not in ("gist-pass", "reader"):
    raise SystemExit("usage: gist_reader_lora_validation.py gist-pass|reader")
model, tokenizer = load_smollm2()
data = gist_data(model, tokenizer, "train", 160, progress=False)
train, validation = data[:128], data[128:]
reader = variant == "reader"
plain_continuation = gist_wiring.continuation_logits


def continuation_with_lora(model, cache, ids, attention_mask=None):
    with gist_wiring._lora_on(model._modules[MODULES_ATTR]["gist_lora"]):
        return plain_continuation(model, cache, ids, attention_mask)


if reader:
    gist_wiring.continuation_logits = continuation_with_lora
start = time.time()
model = train_gist(model, tokenizer, data=train, steps=80, progress=False)
seconds = time.time() - start
pad = tokenizer.pad_token_id
lora = model._modules[MODULES_ATTR]["gist_lora"]
with torch.no_grad():
    def mean_loss(rows):
        return sum(float(gist_loss(model, rows[i:i + 4], pad)) for i in range(0, len(rows), 4)) / (len(rows) / 4)
    validation_loss, training_loss = mean_loss(validation), mean_loss(train[:32])
if reader:  # generate()'s passes read the gist cache with the LoRA on; compress_context runs as trained
    plain_generate = model.generate

    def generate(*args, **kwargs):
        lora.__dict__["gist_active"] = True
        try:
            return plain_generate(*args, **kwargs)
        finally:
            lora.__dict__["gist_active"] = False

    model.generate = generate
answers = gist_answers(model, validation, mode="gist", pad=pad, eos_token_id=tokenizer.eos_token_id)
print(json.dumps({"variant": variant, "training_seconds": round(seconds),
                  "loss_first_10_steps": round(sum(model.train_losses[:10]) / 10, 4),
                  "loss_last_10_steps": round(sum(model.train_losses[-10:]) / 10, 4),
                  "loss_training_prompts_0_31": round(training_loss, 4), "loss_validation": round(validation_loss, 4),
                  "rouge_l_validation": round(mean_rouge_l(answers, [e["answer"] for e in validation]), 4)}))
