"""How far the dense model's own greedy answers move under changes that keep a prompt's meaning.

    OMP_NUM_THREADS=1 python docs/scripts/gist_target_sensitivity.py            # the bench's 32 held-out prompts

The gist target compares answers read through 8 gist tokens with the dense model's greedy answers to the full
prompt (ROUGE-L >= 0.8). This script measures the same ROUGE-L for answers the dense model itself gives to the
same held-out prompts (``gist_data("heldout", 32)``, the prompts of ``hf-tokred learned-lm gist``) after changes
that lose nothing or almost nothing:

* one word of the request reworded (e.g. "Summarize" -> "Summarise"; the passage untouched);
* the passage's last 10 % of words dropped (90 % of the prompt kept, against 4 % in 8 gist tokens);
* the same prompt with the weights in bfloat16 instead of float32 (rounding only).

Prints one line per variant and a JSON line.
"""

import json
import sys

import torch

from hf_tokred.embedded import load_smollm2
from hf_tokred.recipes.gist import gist_answers, gist_data, mean_rouge_l, prompt_rows
from hf_tokred.recipes.lm_data import REQUESTS

SAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 32
# one word of each request template of lm_data.REQUESTS, in order
REWORDED = (
    "Summarise the following text in two sentences.\n\n{text}",
    "Explain the following passage to a newcomer.\n\n{text}",
    "{text}\n\nWhat is the main point of the text?",
    "Read this documentation extract and list its key facts.\n\n{text}",
    "{text}\n\nRewrite the passage above in simpler language.",
    "Here is a part of Python documentation:\n\n{text}\n\nWhat should a programmer remember from it?",
)
assert len(REWORDED) == len(REQUESTS)


def template_and_text(prompt: str) -> tuple[int, str]:
    for index, template in enumerate(REQUESTS):
        before, after = template.split("{text}")
        if prompt.startswith(before) and prompt.endswith(after):
            return index, prompt[len(before):len(prompt) - len(after)]
    raise ValueError(f"no request template matches {prompt[:60]!r}")


model, tokenizer = load_smollm2()
data = gist_data(model, tokenizer, "heldout", SAMPLES, progress=False)
references = [e["answer"] for e in data]
eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
kwargs = {"eos_token_id": eos, "pad": pad}
reworded, shortened = [], []
for e in data:
    index, text = template_and_text(e["prompt"])
    reworded.append(REWORDED[index].format(text=text))
    words = text.split()
    shortened.append(REQUESTS[index].format(text=" ".join(words[:round(0.9 * len(words))])))
results = {"samples": len(data)}
results["same prompt, float32 (the reference)"] = mean_rouge_l(gist_answers(model, data, mode="full", **kwargs),
                                                                references)
results["one request word reworded"] = mean_rouge_l(
    gist_answers(model, prompt_rows(tokenizer, reworded), mode="full", **kwargs), references)
results["last 10% of the passage dropped"] = mean_rouge_l(
    gist_answers(model, prompt_rows(tokenizer, shortened), mode="full", **kwargs), references)
model.to(torch.bfloat16)
results["same prompt, bfloat16 weights"] = mean_rouge_l(gist_answers(model, data, mode="full", **kwargs), references)
for name, value in results.items():
    print(f"{name:40s} {value if name == 'samples' else round(value, 4)}")
print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}))
