"""Train DynamicViT predictors on the embedded all-MiniLM-L6-v2 and save them with the model.

The predictors learn, from stdlib text, which tokens the sentence embedding can do without (distillation
from the dense model plus the paper's keep-ratio loss). By default the backbone stays frozen; with
``--train-backbone`` it is fine-tuned with the predictors (the paper's joint training), distilled from a
frozen dense copy. The reduced model is saved with ``save_pretrained``: the predictors go to
``token_reduction.safetensors``, the (possibly fine-tuned) backbone to ``model.safetensors``, the config to
``config.json``, and ``AutoModel.from_pretrained(folder)`` brings them all back.

    python examples/train_dynamicvit.py --keep-rate 0.7 --steps 60 --out minilm-dynamicvit
    python examples/train_dynamicvit.py --keep-rate 0.5 --layers 2 --predictor-dim 96 --steps 60 \
        --train-texts 128 --train-backbone

    python examples/train_dynamicvit.py --keep-rate 0.5 --layers 2 --predictor-dim 96 --steps 60 \
        --train-texts 1900 --shuffle --finetune-steps 250 --finetune-lr 1e-4

The second line is the joint training of the paper (one stage before block 2 of MiniLM's 6, narrow
predictors, backbone fine-tuned with them): about 32 % fewer FLOPs. The third trains the predictors alone,
then fine-tunes the backbone through the hard reduction (predictors fixed) on the sentence-embedding cosine
to the dense model (``hf_tokred.training.fine_tune_reduced``); add ``--fuse`` to fuse the dropped tokens into
one token, which that fine-tuning then learns to use.

With ``transformers.Trainer`` use ``hf_tokred.training.DynamicViTTrainer``; with accelerate call
``hf_tokred.training.dynamicvit_loss`` in your loop.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from transformers import AutoModel

import hf_tokred
from hf_tokred.bench.encoders import cosine_stats, embed_with_flops, stdlib_texts, text_batches
from hf_tokred.embedded import load_minilm
from hf_tokred.training import fine_tune_reduced, train_dynamicvit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-rate", type=float, default=0.7, help="fraction kept at each stage")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60, a few minutes on 2 cores)")
    parser.add_argument("--train-texts", type=int, default=128, help="stdlib training texts")
    parser.add_argument("--eval-texts", type=int, default=64, help="stdlib evaluation texts (others than the training ones)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the predictors (default 3e-3)")
    parser.add_argument("--train-backbone", action="store_true", help="fine-tune the backbone with the predictors")
    parser.add_argument("--backbone-lr", type=float, help="learning rate of the backbone (default: --lr / 100)")
    parser.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant",
                        help="learning-rate schedule of the predictor training (default constant)")
    parser.add_argument("--shuffle", action="store_true", help="a new seeded order of the training batches every pass")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="then fine-tune the backbone through the hard reduction for this many steps (default 0)")
    parser.add_argument("--finetune-lr", type=float, default=3e-5, help="learning rate of --finetune-steps (default 3e-5)")
    parser.add_argument("--fuse", action="store_true", help="fuse each stage's dropped tokens into one token")
    parser.add_argument("--layers", type=int, nargs="+", help="blocks before which a stage prunes (default: 1 3 4)")
    parser.add_argument("--predictor-dim", type=int, help="width of the predictor MLPs (default: the hidden size)")
    parser.add_argument("--out", help="folder to save the reduced model in (default: a temporary folder)")
    args = parser.parse_args()

    model, tokenizer = load_minilm()
    evaluation = text_batches(tokenizer, stdlib_texts(tokenizer, args.eval_texts), 16)
    training = text_batches(tokenizer, stdlib_texts(tokenizer, args.train_texts, skip=args.eval_texts), 16)
    dense, dense_flops = embed_with_flops(model, evaluation, reduced=False)

    # the frozen dense model to distil from when the backbone trains
    teacher = copy.deepcopy(model) if args.train_backbone or args.finetune_steps else None
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": args.keep_rate, "layers": args.layers,
                            "predictor_dim": args.predictor_dim, "fuse": args.fuse})
    before, flops = embed_with_flops(model, evaluation, reduced=True)
    print(f"untrained predictors: FLOPs saved {1 - flops / dense_flops:.3f}, "
          f"mean cosine to dense {cosine_stats(before, dense)['mean']:.4f}")
    losses = train_dynamicvit(model, training, steps=args.steps, lr=args.lr, train_backbone=args.train_backbone,
                              teacher=teacher if args.train_backbone else None, backbone_lr=args.backbone_lr,
                              lr_schedule=args.lr_schedule, shuffle=args.shuffle)
    if args.finetune_steps:
        tuned = fine_tune_reduced(model, training, teacher=teacher, steps=args.finetune_steps, lr=args.finetune_lr)
        print(f"fine-tuned the backbone through the hard reduction ({args.finetune_steps} steps, loss "
              f"{tuned[0]:.5f} -> {tuned[-1]:.5f})")
    after, flops = embed_with_flops(model, evaluation, reduced=True)
    print(f"trained ({args.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}): FLOPs saved "
          f"{1 - flops / dense_flops:.3f}, mean cosine to dense {cosine_stats(after, dense)['mean']:.4f}")

    folder = args.out or tempfile.mkdtemp(prefix="minilm-dynamicvit-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    again = AutoModel.from_pretrained(folder).eval()
    reloaded, _ = embed_with_flops(again, evaluation, reduced=True)
    print(f"saved to {folder}; reloaded outputs identical: {torch.equal(reloaded, after)}")


if __name__ == "__main__":
    main()
