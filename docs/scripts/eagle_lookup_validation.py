"""Choose EAGLE + lookup's settings on validation prompts (training-split prompts the head was not trained on).

    python docs/scripts/eagle_lookup_validation.py WEIGHTS FIRST COUNT MIN_MATCHES TOKENS

e.g. ``python docs/scripts/eagle_lookup_validation.py ~/.cache/hf_tokred/smollm2-eagle-960 960 8 2,3,4 6,10``:
training-split prompts 960..967 (the 960-prompt head saw prompts 0..959), greedy against EAGLE alone and EAGLE +
lookup for every ``lookup_min_match`` x ``prompt_lookup_num_tokens``; prints tokens per verification and the
decode speed-up over greedy of each (outputs checked identical to greedy).
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_tokred  # noqa: F401  (from_pretrained re-attaches the head)
from hf_tokred.bench.lm_eagle import _ForwardClock
from hf_tokred.integration.eagle import eagle_assistant
from hf_tokred.integration.wiring import get_applied
from hf_tokred.recipes.lm_data import chat_ids, instruction_prompts

weights, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
matches = [int(m) for m in sys.argv[4].split(",")]
tokens = [int(n) for n in sys.argv[5].split(",")]
model = AutoModelForCausalLM.from_pretrained(weights).eval()
tokenizer = AutoTokenizer.from_pretrained(weights)
reducer = get_applied(model).config.get("decoding")
head = eagle_assistant(model)
prompts = [torch.tensor([chat_ids(tokenizer, p)]) for p in instruction_prompts("train", first + count)[first:]]
settings = [("greedy", None, {}), ("eagle", None, {"assistant_model": head})]
settings += [(f"eagle + lookup min_match={m} N={n}", m, {"assistant_model": head, "prompt_lookup_num_tokens": n})
             for m in matches for n in tokens]
totals = {name: [0, 0.0, 0, 0] for name, _, _ in settings}  # decode tokens, seconds, verifications, identical
clock = _ForwardClock(model)
common = {"max_new_tokens": 256, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
with torch.no_grad():
    for ids in prompts:
        reference = None
        for name, match, extra in settings:
            if match is not None:
                reducer.lookup_min_match = match
            clock.reset()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **common, **extra)
            end = time.perf_counter()
            new = out[0, ids.shape[1]:]
            reference = new if reference is None else reference
            row = totals[name]
            row[0] += new.numel() - 1
            row[1] += end - clock.prefill_end
            row[2] += clock.calls - 1
            row[3] += int(torch.equal(new, reference))
        print(f"prompt done ({ids.shape[1]} tokens)", flush=True)
base = totals["greedy"][0] / totals["greedy"][1]
for name, (n, seconds, verifications, same) in totals.items():
    print(f"{name:36s} tokens/verification {n / verifications:5.2f}  speed-up {n / seconds / base:5.2f}x  "
          f"identical {same}/{count}")
