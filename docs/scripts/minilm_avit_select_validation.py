"""A-ViT's halting rule on validation texts: the same trained halting heads read out with ``select="threshold"``
(the paper's) and ``select="top_k"``, and the CLS-attention drop of EViT at the same block as a training-free
reference. Nothing here touches the benchmark's 192 held-out texts: validation = stdlib texts 192..391, training =
texts 392..2091 (1,700).

    python docs/scripts/minilm_avit_select_validation.py HEAD_STEPS LR TRAIN_DEPTH [READ_DEPTH ...]

The heads train with ``target_depth=TRAIN_DEPTH`` (the prior), are read out with the threshold, then with
``select="top_k"`` at every READ_DEPTH (default: TRAIN_DEPTH; with top_k the target depth only sets the share that
halts, so a READ_DEPTH can match the threshold's FLOPs). Example:
``python docs/scripts/minilm_avit_select_validation.py 150 5e-3 0.6 0.6 0.85`` (one thread, about 6 min).
"""

import copy
import sys

import torch

import hf_tokred
from hf_tokred.bench.encoders import cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm
from hf_tokred.recipes.avit import train_avit

VALIDATION, TRAINING = (192, 200), (392, 1700)  # (skip, count)
HALTING = {"layers": [2], "prior_std": 3.0, "eps": 0.5}


def main(head_steps: int, lr: float, depth: float, read_depths: list[float]) -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_minilm()
    validation = text_batches(tokenizer, stdlib_texts(tokenizer, VALIDATION[1], skip=VALIDATION[0]), 16)
    training = text_batches(tokenizer, stdlib_texts(tokenizer, TRAINING[1], skip=TRAINING[0]), 16)
    reference, dense_flops = embed_with_flops(model, validation, reduced=False)

    def report(label: str, reduced) -> None:
        embeddings, flops = embed_with_flops(reduced, validation, reduced=True)
        cosine = cosine_stats(embeddings, reference)
        print(f"{label:75s} saved {1 - flops / dense_flops:6.1%}  cos {cosine['mean']:.4f}  p5 {cosine['p5']:.4f}  "
              f"min {cosine['min']:.4f}", flush=True)

    evit = copy.deepcopy(model)
    hf_tokred.apply(evit, {"method": "evit", "keep_rate": 0.55, "layers": [2], "fuse": False})
    report("evit keep_rate=0.55 before block 2, dropped (training-free)", evit)
    student = copy.deepcopy(model)
    hf_tokred.apply(student, {"method": "avit", "target_depth": depth, **HALTING})
    train_avit(student, training, teacher=model, steps=head_steps, lr=lr, shuffle=True, progress=False)
    trained = f"avit heads {head_steps} steps lr {lr} target_depth={depth}"
    report(f"{trained}: threshold", student)
    heads = {k: v.clone() for k, v in student.hf_tokred_modules["avit"].state_dict().items()}
    for read in read_depths or [depth]:
        hf_tokred.apply(student, {"method": "avit", "target_depth": read, **HALTING, "select": "top_k"})
        student.hf_tokred_modules["avit"].load_state_dict(heads)
        report(f"{trained}: top_k at target_depth={read}", student)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), [float(x) for x in sys.argv[4:]])
