"""How often an EAGLE head's draft agrees with the model, per draft depth, teacher-forced on validation prompts.

    python docs/scripts/eagle_depth_agreement.py WEIGHTS [DEPTH]

e.g. ``python docs/scripts/eagle_depth_agreement.py ~/.cache/hf_tokred/smollm2-eagle-960 4``. Validation: training-split
prompts 960..1119 with the dense model's greedy answers (the 960-prompt heads saw prompts 0..959; the answers are
generated once and cached beside the training ones); for comparison, training prompts 0..159. For each answer
position j and depth d = 1..DEPTH, the head drafts d tokens ahead from the target's features up to j (pass d of
training-time test, ``hf_tokred.methods.lm.eagle.unrolled_features``, which equals the inference draft step); the
draft token agrees when it is the target's greedy token there. Prints the agreement at depth d among positions
where depths 1..d-1 agreed, and their running product summed (the drafts a chain of DEPTH would accept on average
if rounds started anywhere; real rounds start after a miss, where drafting is harder, so the bench's figure is
lower).
"""

import sys

import torch
from transformers import AutoModelForCausalLM

import hf_tokred  # noqa: F401  (from_pretrained re-attaches the head)
from hf_tokred.embedded import load_smollm2
from hf_tokred.integration.eagle import eagle_assistant
from hf_tokred.methods.lm.eagle import unrolled_features
from hf_tokred.recipes.eagle import eagle_sequences, target_features

weights, depth = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
model, tokenizer = load_smollm2()
sequences = eagle_sequences(model, tokenizer, prompts=1120, windows=0, progress=False)
drafter = AutoModelForCausalLM.from_pretrained(weights).eval()
head = eagle_assistant(drafter)
rotary = drafter.__dict__["_hf_tokred_eagle_rotary"]
embed, lm_head = drafter.get_input_embeddings(), drafter.get_output_embeddings()
weight, bias = head.draft_weight(lm_head)


@torch.no_grad()
def agreement(rows: list[dict]) -> tuple[list[float], float]:
    hits, seen = torch.zeros(depth), torch.zeros(depth)
    for seq, feats in zip(rows, target_features(model, rows, progress=False)):
        ids, feats = torch.tensor([seq["input_ids"]]), feats[None]
        n = ids.shape[1] - 1
        pos = torch.arange(n)[None]
        passes = unrolled_features(head, feats[:, :-1], embed(ids[:, 1:]), rotary(feats, pos), pos, depth)
        greedy = lm_head(feats[0, 1:]).argmax(-1)  # the target's next token after position j + 1
        agree = [head.vocab_ids[torch.nn.functional.linear(p[0], weight, bias).argmax(-1)] == greedy for p in passes]
        for j in range(seq["start"], n):
            for d in range(min(depth, n - j)):
                seen[d] += 1
                if not agree[d][j + d]:
                    break
                hits[d] += 1
    rates = (hits / seen.clamp_min(1)).tolist()
    expected, running = 0.0, 1.0
    for rate in rates:
        running *= rate
        expected += running
    return rates, expected


for name, rows in (("validation prompts 960-1119", sequences[960:]), ("training prompts 0-159", sequences[:160])):
    rates, expected = agreement(rows)
    print(f"{name:28s} agreement by depth {' '.join(f'{r:.3f}' for r in rates)}   expected accepted drafts "
          f"{expected:.3f}", flush=True)
