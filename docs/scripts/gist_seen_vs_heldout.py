"""How far from the dense model are the answers of trained gist tokens, on prompts they were trained on and on new
ones? The first 32 training prompts of the weights' kind and the bench's 32 held-out prompts, each against the
dense model's greedy answer to the full prompt (cached, as ``hf-tokred learned-lm gist``):

* ``rouge_l``: greedy answers through the gist cache, ROUGE-L against the dense answers (the bench's figure);
* teacher-forced along the dense answer: ``loss``, the cross-entropy of the dense answer's tokens; ``top1``, the
  share of its tokens that are also the reader's most likely token (greedy decoding stays on the dense answer
  exactly as long as they agree); ``first_miss``, the mean position of the first token where they differ (the
  answer's length where none does).

The same teacher-forced figures for the dense model itself with the full prompt (its own greedy answers: top-1 is
1.0 by construction but for numerical ties) and, for system prompts, with another held-out system prompt in each
one's place (the bench's "another system prompt": the next chat's). A large train/held-out gap means the gist tokens
fit their training prompts and do not carry that to new ones; none means they fall short on both.

    OMP_NUM_THREADS=2 python docs/scripts/gist_seen_vs_heldout.py ~/.cache/hf_tokred/smollm2-gist-system-task
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import hf_tokred  # noqa: F401  (re-attaches the gist tokens on load)
from hf_tokred.embedded import load_smollm2
from hf_tokred.integration.gist import continuation_logits, gist_cache
from hf_tokred.recipes.gist import TRAINING_STATE, gist_answers, gist_data, mean_rouge_l

SAMPLES = 32


def answer_logits(model, row: dict, gist: bool) -> torch.Tensor:
    """Logits predicting each token of the row's dense answer, teacher-forced, after the gist cache or the prompt."""
    answer = row["answer"]
    with torch.no_grad():
        if gist:
            cache = gist_cache(model, torch.tensor([row["context"]]))
            logits = continuation_logits(model, cache, torch.tensor([row["tail"] + answer]))[0]
            return logits[len(row["tail"]) - 1:-1]
        prompt = row["context"] + row["tail"]
        return model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]


def teacher_forced(model, rows: list[dict], gist: bool) -> dict:
    losses, agree, first_miss = [], [], []
    for row in rows:
        logits, answer = answer_logits(model, row, gist), torch.tensor(row["answer"])
        losses.append(torch.nn.functional.cross_entropy(logits, answer, reduction="none"))
        same = logits.argmax(-1) == answer
        agree.append(same)
        misses = (~same).nonzero()
        first_miss.append(int(misses[0]) if len(misses) else len(answer))
    return {"loss": round(torch.cat(losses).mean().item(), 4), "top1": round(torch.cat(agree).float().mean().item(), 4),
            "first_miss": round(sum(first_miss) / len(first_miss), 1)}


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
        print(json.dumps({"split": split, "reader": "gist", "kind": kind, **teacher_forced(model, data, gist=True),
                          "rouge_l": round(mean_rouge_l(answers, [row["answer"] for row in data]), 4)}), flush=True)
    compared = {"dense, full prompt": data}
    if kind == "system":
        compared["dense, another system prompt"] = [{**row, "context": data[(i + 1) % len(data)]["context"]}
                                                    for i, row in enumerate(data)]
    for name, rows in compared.items():
        print(json.dumps({"split": "heldout", "reader": name, **teacher_forced(dense, rows, gist=False)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
