"""Gist tokens trained on the dense model's next-token distributions instead of its greedy answers alone.

    OMP_NUM_THREADS=1 python docs/scripts/gist_distillation_validation.py 32     # the dense model's top 32 tokens

Context distillation, the recipe's ``train_gist(..., distill_top=TOP)`` (``hf-tokred train gist --distill-top``): at
every answer position the loss is the KL divergence from the dense model's distribution given the whole prompt, over
that distribution's TOP most likely tokens (renormalised), instead of the cross-entropy of the greedy token only.
Training and validation as in gist_reader_lora_validation.py (the recipe's defaults on training-split prompts 0..127;
training-split prompts 128..159 measured: the plain cross-entropy of the dense answers through the gist cache, and
ROUGE-L of greedy answers). Prints one JSON line.
"""

import json
import sys
import time

import torch

from hf_tokred.embedded import load_smollm2
from hf_tokred.recipes import mean_ends
from hf_tokred.recipes.gist import gist_answers, gist_data, gist_loss, mean_rouge_l, train_gist

TOP = int(sys.argv[1]) if len(sys.argv) > 1 else 32
model, tokenizer = load_smollm2()
data = gist_data(model, tokenizer, "train", 160, progress=False)
train, validation = data[:128], data[128:]
start = time.time()
model = train_gist(model, tokenizer, data=train, steps=80, distill_top=TOP, progress=False)
seconds = time.time() - start
pad = tokenizer.pad_token_id
with torch.no_grad():
    def mean_loss(rows):
        return sum(float(gist_loss(model, rows[i:i + 4], pad)) for i in range(0, len(rows), 4)) / (len(rows) / 4)
    validation_loss, training_loss = mean_loss(validation), mean_loss(train[:32])
answers = gist_answers(model, validation, mode="gist", pad=pad, eos_token_id=tokenizer.eos_token_id)
first, last = mean_ends(model.train_losses)
print(json.dumps({"variant": f"distilled top-{TOP}", "training_seconds": round(seconds),
                  "loss_first_10_steps": round(first, 4), "loss_last_10_steps": round(last, 4),
                  "loss_training_prompts_0_31": round(training_loss, 4), "loss_validation": round(validation_loss, 4),
                  "rouge_l_validation": round(mean_rouge_l(answers, [e["answer"] for e in validation]), 4)}))
