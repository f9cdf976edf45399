"""STViT's recovery on validation texts: every token gets its own semantic token's update (ours, hard) or an
attention-weighted mix of the updates of the ``TOP_K`` semantic tokens most similar to it (softmax of cosine /
``TEMPERATURE``; closer to the paper's STViT-R recovery, which attends from the saved tokens to the semantic
tokens). Nothing here touches the benchmark's 192 held-out texts: validation = stdlib texts 192..391, training =
texts 392..2091 (1,700). The soft variant is measured by replacing the post-norm replay of
``hf_tokred.integration.encoders`` inside this process only (the package keeps the hard recovery).

    python docs/scripts/minilm_stvit_recovery_validation.py TOP_K TEMPERATURE STEPS RATIO START [LR]
    # TOP_K 0: the package's recovery; LR of the backbone steps (default 1e-4, the benchmark's).
    # Example: ... 4 0.2 800 0.4 2 (one thread, about 18 min)
"""

import copy
import sys
import time

import torch

import hf_tokred
from hf_tokred.bench.encoders import cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm
from hf_tokred.integration import encoders
from hf_tokred.recipes.stvit import train_stvit

VALIDATION, TRAINING = (192, 200), (392, 1700)  # (skip, count)


def soft_replay(top_k: int, temperature: float):
    """A ``_FastPath.replay`` that mixes the branches of each token's ``top_k`` most similar semantic tokens."""

    def replay(self, norms):
        state, weight, index = self.then, None, None
        for block, origin, captures in self.blocks:
            stream = captures[0]
            if weight is None:  # once per stage: similarity of each token's saved state to the semantic tokens
                m = stream.shape[1]
                occupied = torch.zeros(origin.shape[0], m + 1, device=origin.device).scatter_(
                    1, torch.where(origin >= 0, origin, m), 1.0)[:, :m] > 0
                occupied[:, :1] = False  # not the CLS token
                similarity = torch.nn.functional.normalize(state.float(), dim=-1) @ torch.nn.functional.normalize(
                    stream.float(), dim=-1).transpose(1, 2)
                top, index = similarity.masked_fill(~occupied[:, None, :], float("-inf")).topk(min(top_k, m), dim=-1)
                weight = (top / temperature).softmax(-1).to(state.dtype)
            updated = state
            for norm, (entering, leaving) in zip(norms[block], zip(captures[1::2], captures[2::2])):
                branch = entering - stream
                picked = branch.gather(1, index.flatten(1)[..., None].expand(-1, -1, branch.shape[-1]))
                updated = norm.forward(updated + (weight[..., None] * picked.view(*index.shape, -1)).sum(2))
                stream = leaving
            active = (self.since >= 0) & (self.since <= block) & (origin >= 0)
            state = torch.where(active[..., None], updated, state)
        return state

    return replay


def main(top_k: int, temperature: float, steps: int, ratio: float, start: int, lr: float = 1e-4) -> None:
    torch.set_num_threads(1)
    if top_k:
        encoders._FastPath.replay = soft_replay(top_k, temperature)
    model, tokenizer = load_minilm()
    validation = text_batches(tokenizer, stdlib_texts(tokenizer, VALIDATION[1], skip=VALIDATION[0]), 16)
    training = text_batches(tokenizer, stdlib_texts(tokenizer, TRAINING[1], skip=TRAINING[0]), 16)
    reference, dense_flops = embed_with_flops(model, validation, reduced=False)
    student = copy.deepcopy(model)
    hf_tokred.apply(student, {"method": "stvit", "ratio": ratio, "start": start})
    recovery = f"top-{top_k} soft, T={temperature}" if top_k else "own semantic token (package)"

    def report(label: str) -> None:
        embeddings, flops = embed_with_flops(student, validation, reduced=True)
        cosine = cosine_stats(embeddings, reference)
        print(f"stvit ratio={ratio} start={start}, recovery {recovery}, {label}: saved {1 - flops / dense_flops:6.1%}  "
              f"cos {cosine['mean']:.4f}  p5 {cosine['p5']:.4f}  min {cosine['min']:.4f}", flush=True)

    report("training-free")
    began = time.perf_counter()
    train_stvit(student, training, teacher=model, steps=steps, lr=lr, lr_schedule="linear", shuffle=True,
                progress=False)
    report(f"after {steps} backbone steps at lr {lr:g} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
         *[float(x) for x in sys.argv[6:7]])
