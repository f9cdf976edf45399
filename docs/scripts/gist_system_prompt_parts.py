"""Which part of a system prompt do SmolLM2's answers depend on? The dense model only, on the gist bench's held-out
system chats (``gist_prompts(..., kind="system")``), each system prompt replaced by a variant of it.

Variants: another held-out system prompt (the next chat's, as the bench's "another system prompt" row); another
held-out system prompt with the *same task* (the first one in the held-out split past the 32 evaluated chats);
the first line alone (role, audience and task, no house rules); the task alone (``"Your task: ...."``). Each is
scored as the bench scores its rows: sampled answers (temperature 0.2, top-p 0.9, 3 draws, one seed per draw)
against 3 dense draws of the full prompt, and greedy answers against the dense greedy answers.

    OMP_NUM_THREADS=1 python docs/scripts/gist_system_prompt_parts.py     # about 25 min on one thread
"""

import json
import statistics

import torch

from hf_tokred.embedded import load_smollm2
from hf_tokred.recipes.gist import MAX_NEW_TOKENS, gist_answers, gist_prompts, mean_rouge_l, prompt_rows
from hf_tokred.recipes.lm_data import system_task

SAMPLES, DRAWS = 32, 3


def with_system(chat: list[dict], text: str) -> list[dict]:
    return [{"role": "system", "content": text}, chat[1]]


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    pool = gist_prompts(tokenizer, "heldout", None, kind="system")
    chats = pool[:SAMPLES]
    same_task = []
    for chat in chats:
        other = next(p for p in pool[SAMPLES:] if system_task(p) == system_task(chat))
        same_task.append(with_system(chat, other[0]["content"]))
    variants = {
        "another system prompt (the next chat's)": [with_system(c, chats[(i + 1) % SAMPLES][0]["content"])
                                                    for i, c in enumerate(chats)],
        "another system prompt, same task": same_task,
        "first line only (role, audience, task)": [with_system(c, c[0]["content"].split("\n", 1)[0]) for c in chats],
        "task only": [with_system(c, f"Your task: {system_task(c)}.") for c in chats],
    }
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    seeds = iter(range(1000))

    def answers(prompts, sampled: bool):
        rows = prompt_rows(tokenizer, prompts)
        if not sampled:
            return gist_answers(model, rows, mode="full", eos_token_id=eos, pad=pad, max_new_tokens=MAX_NEW_TOKENS)
        return [gist_answers(model, rows, mode="full", temperature=0.2, top_p=0.9, seed=next(seeds), eos_token_id=eos,
                             pad=pad, max_new_tokens=MAX_NEW_TOKENS) for _ in range(DRAWS)]

    references = answers(chats, sampled=True)
    itself = statistics.mean(mean_rouge_l(references[i], references[j])
                             for i in range(DRAWS) for j in range(i + 1, DRAWS))
    print(json.dumps({"variant": "full prompt (another draw)", "sampled": round(itself, 4), "greedy": 1.0}), flush=True)
    greedy = answers(chats, sampled=False)
    for name, prompts in variants.items():
        drawn = answers(prompts, sampled=True)
        sampled = statistics.mean(mean_rouge_l(a, r) for a in drawn for r in references)
        print(json.dumps({"variant": name, "sampled": round(sampled, 4),
                          "greedy": round(mean_rouge_l(answers(prompts, sampled=False), greedy), 4)}), flush=True)


if __name__ == "__main__":
    main()
