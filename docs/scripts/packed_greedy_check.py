"""Greedy decoding on oneDNN-packed weights (``min_rows=1``: every pass packed) against PyTorch's kernels: are the
outputs the same on the EAGLE bench's 8 held-out prompts (256 new tokens, one thread)?

    python docs/scripts/packed_greedy_check.py [WEIGHTS]
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_tokred.integration.cpu_linear import pack_linear_weights
from hf_tokred.recipes.lm_data import chat_ids, instruction_prompts

torch.set_num_threads(1)
w = os.path.expanduser(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/hf_tokred/smollm2-eagle-960")
model = AutoModelForCausalLM.from_pretrained(w).eval()
tok = AutoTokenizer.from_pretrained(w)
prompts = [torch.tensor([chat_ids(tok, p)]) for p in instruction_prompts("heldout", 8, seed=0)]
kw = dict(max_new_tokens=256, do_sample=False, pad_token_id=tok.eos_token_id)
with torch.no_grad():
    plain = [model.generate(p, attention_mask=torch.ones_like(p), **kw) for p in prompts]
    pack_linear_weights(model, min_rows=1)
    packed = [model.generate(p, attention_mask=torch.ones_like(p), **kw) for p in prompts]
same = sum(torch.equal(a, b) for a, b in zip(plain, packed))
print(f"identical greedy outputs, packed vs PyTorch's kernels: {same} / {len(prompts)}")
