"""Choose EAGLE's tree size (``tree_tokens``) on validation prompts (training-split prompts the head never saw).

    python docs/scripts/eagle_tree_validation.py WEIGHTS FIRST COUNT TREE_TOKENS [--packed]

e.g. ``python docs/scripts/eagle_tree_validation.py ~/.cache/hf_tokred/smollm2-eagle-960 960 8 2,5,8,12``:
training-split prompts 960..967 (the 960-prompt head saw prompts 0..959), 256 new tokens each, greedy against EAGLE's
chain (``assistant_model``) and its tree verification (``custom_generate=eagle_tree_decoding``) at every
``tree_tokens``; prints tokens per verification and the decode speed-up over greedy of each (outputs checked
identical to greedy). The rows run through the benchmark's own loop (``hf-tokred learned-lm eagle``). ``--packed``:
every row on the model with oneDNN-packed linear weights, as the benchmark's ``--pack-weights``.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_tokred
from hf_tokred.bench.lm_eagle import _decode_all
from hf_tokred.integration.cpu_linear import pack_linear_weights
from hf_tokred.recipes.lm_data import chat_ids, instruction_prompts

args = [a for a in sys.argv[1:] if a != "--packed"]
weights, first, count = args[0], int(args[1]), int(args[2])
sizes = [int(n) for n in args[3].split(",")]
model = AutoModelForCausalLM.from_pretrained(weights).eval()
if "--packed" in sys.argv[1:]:
    pack_linear_weights(model, min_rows=1)
tokenizer = AutoTokenizer.from_pretrained(weights)
prompts = [torch.tensor([chat_ids(tokenizer, p)]) for p in instruction_prompts("train", first + count)[first:]]
rows = {"greedy": {}, "eagle": {"assistant_model": hf_tokred.eagle_assistant(model)}}
rows.update({f"eagle tree, tree_tokens={n}": {"custom_generate": hf_tokred.eagle_tree_decoding, "tree_tokens": n}
             for n in sizes})
common = {"max_new_tokens": 256, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
totals = _decode_all(model, prompts, common, rows, progress=True)
base = totals["greedy"]["tokens"] / totals["greedy"]["seconds"]
for name, total in totals.items():
    print(f"{name:30s} tokens/verification {total['tokens'] / total['verifications']:5.2f}  "
          f"speed-up {total['tokens'] / total['seconds'] / base:5.2f}x  identical {total['identical']}/{count}")
