"""Gist tokens trained on the dense model's next-token distributions instead of its greedy answers alone.

    OMP_NUM_THREADS=1 python docs/scripts/gist_distillation_validation.py 32     # the dense model's top 32 tokens

Context distillation: at every answer position the loss is the cross-entropy of the gist-read model against the
dense model's distribution given the whole prompt, over that distribution's TOP most likely tokens (renormalised),
instead of against the greedy token only. Training and validation as in gist_reader_lora_validation.py (the
recipe's defaults on training-split prompts 0..127; training-split prompts 128..159 measured: the plain
cross-entropy of the dense answers through the gist cache, and ROUGE-L of greedy answers). Prints one JSON line.
"""

import json
import sys
import time

import torch

import hf_tokred.recipes.gist as recipe
from hf_tokred.embedded import load_smollm2
from hf_tokred.integration.gist import continuation_logits, gist_cache
from hf_tokred.recipes.gist import _left_pad, gist_answers, gist_data, mean_rouge_l, train_gist
from hf_tokred.recipes.token_dropping import collate

TOP = int(sys.argv[1]) if len(sys.argv) > 1 else 32
model, tokenizer = load_smollm2()
data = gist_data(model, tokenizer, "train", 160, progress=False)
train, validation = data[:128], data[128:]
with torch.no_grad():  # the dense model reading the whole prompt: its distribution at every answer position
    for e in train:
        ids = torch.tensor([e["context"] + e["tail"] + e["answer"]])
        logits = model(input_ids=ids).logits[0, len(e["context"]) + len(e["tail"]) - 1:-1].float()
        probs = logits.softmax(-1)
        top = probs.topk(TOP, dim=-1)
        e["teacher_ids"], e["teacher_probs"] = top.indices, top.values / top.values.sum(-1, keepdim=True)
plain_loss = recipe.gist_loss


def distilled_loss(model, batch, pad):
    if "teacher_ids" not in batch[0]:
        return plain_loss(model, batch, pad)
    ids, mask = _left_pad([e["context"] for e in batch], pad)
    cache = gist_cache(model, ids, mask, grad=True)
    cont, cont_mask = collate([e["tail"] + e["answer"] for e in batch], pad)  # right-padded
    logits = continuation_logits(model, cache, cont, cont_mask).float().log_softmax(-1)
    total, count = 0.0, 0
    for i, e in enumerate(batch):
        start = len(e["tail"]) - 1
        rows_logp = logits[i, start:start + len(e["answer"])]
        total = total - (e["teacher_probs"] * rows_logp.gather(-1, e["teacher_ids"])).sum()
        count += len(e["answer"])
    return total / count


recipe.gist_loss = distilled_loss
start = time.time()
model = train_gist(model, tokenizer, data=train, steps=80, progress=False)
seconds = time.time() - start
pad = tokenizer.pad_token_id
with torch.no_grad():
    def mean_loss(rows):
        rows = [{k: e[k] for k in ("context", "tail", "answer")} for e in rows]
        return sum(float(plain_loss(model, rows[i:i + 4], pad)) for i in range(0, len(rows), 4)) / (len(rows) / 4)
    validation_loss, training_loss = mean_loss(validation), mean_loss(train[:32])
answers = gist_answers(model, validation, mode="gist", pad=pad, eos_token_id=tokenizer.eos_token_id)
print(json.dumps({"variant": f"distilled top-{TOP}", "training_seconds": round(seconds),
                  "loss_first_10_steps": round(sum(model.train_losses[:10]) / 10, 4),
                  "loss_last_10_steps": round(sum(model.train_losses[-10:]) / 10, 4),
                  "loss_training_prompts_0_31": round(training_loss, 4), "loss_validation": round(validation_loss, 4),
                  "rouge_l_validation": round(mean_rouge_l(answers, [e["answer"] for e in validation]), 4)}))
