"""What one verification costs on this CPU: SmolLM2-135M-Instruct (fp32, one thread), the time of a forward pass
over k new tokens after a 300-token KV cache, relative to k = 1 (one greedy decoding step).

Speculative decoding pays off when the tokens gained per verification exceed the cost of verifying k drafted
tokens (k + 1 positions) plus drafting them; on a GPU a pass over a few tokens costs about one step, here it does
not. Median of 12 repetitions per k, a fresh cache each time. ``--packed``: the model's linear weights packed for
oneDNN first (:func:`hf_tokred.integration.cpu_linear.pack_linear_weights`; one-token steps keep PyTorch's path).

    python docs/scripts/smollm2_verification_cost.py [--packed]
"""
import sys
import time

import torch
from transformers import DynamicCache

from hf_tokred.embedded import load_smollm2

torch.set_num_threads(1)
model, _ = load_smollm2()
if "--packed" in sys.argv[1:]:
    from hf_tokred.integration.cpu_linear import pack_linear_weights

    pack_linear_weights(model)
context = torch.randint(100, 40000, (1, 300), generator=torch.Generator().manual_seed(0))
base = None
print("new tokens  forward ms  vs one token")
with torch.no_grad():
    for k in (1, 2, 3, 4, 5, 6, 7, 8):
        times = []
        for _ in range(12):
            cache = DynamicCache()
            model(context, past_key_values=cache, use_cache=True)
            new = torch.randint(100, 40000, (1, k))
            start = time.perf_counter()
            model(new, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        base = base or median
        print(f"{k:10d}  {median * 1000:10.1f}  {median / base:11.2f}x")
