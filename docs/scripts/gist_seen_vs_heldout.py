"""Do trained gist tokens answer the prompts they were trained on better than held-out ones? Greedy answers through
the gist cache, ROUGE-L against the dense model's greedy answers (as ``hf-tokred learned-lm gist``), on the first 32
training prompts of the weights' kind and on the bench's 32 held-out prompts. A large gap means the gist tokens
fit their training prompts and do not carry that to new ones; none means they fall short on both. Beside it, the
training loss on the same prompts (cross-entropy of the dense answers read through the gist cache, teacher-forced).

    OMP_NUM_THREADS=2 python docs/scripts/gist_seen_vs_heldout.py ~/.cache/hf_tokred/smollm2-gist-system-task
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import hf_tokred  # noqa: F401  (re-attaches the gist tokens on load)
from hf_tokred.embedded import load_smollm2
from hf_tokred.recipes.gist import TRAINING_STATE, gist_answers, gist_data, gist_loss, mean_rouge_l

SAMPLES = 32


def main(weights: str) -> None:
    weights = os.path.expanduser(weights)
    with open(os.path.join(weights, TRAINING_STATE), encoding="utf-8") as fh:
        kind = json.load(fh).get("prompt_kind") or "request"
    dense, tokenizer = load_smollm2()
    model = AutoModelForCausalLM.from_pretrained(weights)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for split in ("train", "heldout"):
        data = gist_data(dense, tokenizer, split, SAMPLES, kind=kind, progress=False)  # cached dense answers
        answers = gist_answers(model, data, mode="gist", eos_token_id=tokenizer.eos_token_id, pad=pad)
        with torch.no_grad():
            loss = sum(gist_loss(model, data[i:i + 4], pad).item() for i in range(0, len(data), 4)) / (len(data) / 4)
        print(json.dumps({"split": split, "prompts": len(data), "kind": kind, "loss": round(loss, 4),
                          "rouge_l": round(mean_rouge_l(answers, [row["answer"] for row in data]), 4)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
