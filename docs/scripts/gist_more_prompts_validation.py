"""Gist tokens trained on every training-split prompt instead of the recipe's 128, at the same number of passes.

    OMP_NUM_THREADS=1 python docs/scripts/gist_more_prompts_validation.py all    # prompts 0..127 and 160.. (494)
    OMP_NUM_THREADS=1 python docs/scripts/gist_more_prompts_validation.py 128    # the recipe's prompts 0..127

Until 2026-12-07 the recipe trained 80 steps of 4 on 128 prompts (2.5 passes; this run made it every prompt, 330
steps); the reader-LoRA run (gist_reader_lora_validation.py) fitted those 128 and did worse on prompts it had not
seen, so the question is whether more prompts generalise.
Both variants train with the recipe's settings for 2.5 passes over their prompts and are measured on training-split
prompts 128..159, which neither trains on (as the other validation scripts): the cross-entropy of the dense answers
through the gist cache and the ROUGE-L of greedy answers against the dense answers. Prints one JSON line.
"""

import json
import sys
import time

import torch

from hf_tokred.embedded import load_smollm2
from hf_tokred.recipes.gist import gist_answers, gist_data, gist_loss, mean_rouge_l, train_gist

variant = sys.argv[1] if len(sys.argv) > 1 else ""
if variant not in ("all", "128"):
    raise SystemExit("usage: gist_more_prompts_validation.py all|128")
model, tokenizer = load_smollm2()
data = gist_data(model, tokenizer, "train", 160 if variant == "128" else None, progress=False)
train, validation = data[:128] + data[160:], data[128:160]
steps = round(len(train) * 2.5 / 4)
start = time.time()
model = train_gist(model, tokenizer, data=train, steps=steps, progress=False)
seconds = time.time() - start
pad = tokenizer.pad_token_id
with torch.no_grad():
    validation_loss = sum(float(gist_loss(model, validation[i:i + 4], pad)) for i in range(0, 32, 4)) / 8
answers = gist_answers(model, validation, mode="gist", pad=pad, eos_token_id=tokenizer.eos_token_id)
print(json.dumps({"variant": variant, "training_prompts": len(train), "steps": steps,
                  "training_seconds": round(seconds),
                  "loss_first_10_steps": round(sum(model.train_losses[:10]) / 10, 4),
                  "loss_last_10_steps": round(sum(model.train_losses[-10:]) / 10, 4),
                  "loss_validation": round(validation_loss, 4),
                  "rouge_l_validation": round(mean_rouge_l(answers, [e["answer"] for e in validation]), 4)}))
