"""Why ICAE's slots carry nothing at our budget: what the frozen SmolLM2 decoder makes of different inputs in the
slots' place, untrained, and whether the recipe can overfit a handful of windows.

ICAE's decoder reads the encoder's final-norm hidden states as input embeddings. This script gives the frozen
decoder, in place of the slots, (1) the context's own token embeddings (an uncompressed "perfect" memory), (2) the
context's final-norm hidden states of the plain model (uncompressed, 128 of them), (3) the same rescaled to the
embeddings' mean norm, and reports the teacher-forced AE reconstruction accuracy of 4 training windows. Then,
with ``OVERFIT_STEPS > 0``, it trains the recipe (AE objective only) on those same 4 windows for that many steps
and reports the reconstruction accuracy on them: a check that the slot pathway can be learned at all.

    python docs/scripts/icae_slot_reading.py [OVERFIT_STEPS] [TARGETS]      # e.g. 80 q_proj,v_proj (about 5 min)
"""

import sys

import torch

import hf_tokred
from hf_tokred.embedded import load_smollm2
from hf_tokred.integration.icae import decoder_loss, icae_losses
from hf_tokred.recipes.icae import train_icae, training_windows

torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 0
choice = sys.argv[2] if len(sys.argv) > 2 else "q_proj,v_proj"  # the paper's targets; "all": every Linear layer
targets = [] if choice == "all" else choice.split(",")
model, tokenizer = load_smollm2()
reduction = {"method": "icae", "memory_slots": 32, "chunk_tokens": 128, "target_modules": targets}
hf_tokred.apply(model, reduction)
windows = training_windows(tokenizer, 128, "train", seed=0)[:4]
context = windows[:, :128]
embedding = model.get_input_embeddings()
with torch.no_grad():
    final = model.base_model(input_ids=context).last_hidden_state
    scale = embedding.weight.norm(dim=-1).mean() / final.norm(dim=-1).mean()
    print("decoder input in the slots' place (128 per window, uncompressed)   AE loss   AE accuracy")
    for label, slots in (("the context's token embeddings", embedding(context)),
                         ("the context's final-norm hidden states", final),
                         ("the same, rescaled to the embeddings' mean norm", final * scale)):
        loss, accuracy = decoder_loss(model, slots, context, autoencode=True)
        print(f"{label:68s} {loss.item():7.3f}   {accuracy:.3f}")
if steps:
    train_icae(model, tokenizer, windows=windows, steps=steps, lm_ratio=0.0, heldout=0, progress=False)
    losses = model.train_losses
    with torch.no_grad():
        loss, accuracy = icae_losses(model, context)
    print(f"recipe trained {steps} AE steps on these 4 windows (LoRA on {targets or 'every Linear'}): loss "
          f"{sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}; reconstruction of the same windows from 32 "
          f"slots each: loss {loss.item():.3f}, accuracy {accuracy:.3f}")
