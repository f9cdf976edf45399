"""Training the learned visual-token methods (``atp_llava``, ``dynamic_llava``) on the caption-as-image task.

:func:`train_on_captions` builds training batches from the **tune** split of :mod:`hf_tokred.bench.vlm`'s task (the
held-out split stays for the report): each batch is one prompt followed by the dense model's own greedy answer
(the answer tokens are what the distillation compares), with that sample's caption features injected at the
projector. It then attaches the method and trains its modules with
:func:`hf_tokred.training.train_visual_pruner` (the language model, tower and projector frozen). The tower runs
once: its output is replaced by the caption features anyway.

Example:
    >>> from hf_tokred.bench.vlm import build_llava
    >>> model, tokenizer = build_llava()                                                    # doctest: +SKIP
    >>> losses = train_on_captions(model, tokenizer, {"method": "dynamic_llava", "keep": 0.25}, steps=60)  # doctest: +SKIP
"""

from __future__ import annotations

import time

import torch

from .vlm import (
    MAX_NEW_TOKENS,
    SPLITS,
    CaptionImage,
    _SameTower,
    caption_features,
    image_slots,
    make_sample,
    prompt_ids,
    random_image,
)

DEFAULT_TRAIN_SAMPLES = 32
DEFAULT_TRAIN_STEPS = 60


def caption_batches(model, tokenizer, samples: int = DEFAULT_TRAIN_SAMPLES, *, split: str = "tune"
                    ) -> tuple[list[dict], list[torch.Tensor]]:
    """``(batches, features)``: one batch per sample of ``split`` -- the prompt and the dense model's greedy answer
    (``input_ids``, ``attention_mask``, ``pixel_values``, ``answer_mask`` marking the answer) -- and each sample's
    caption features. Run it on the dense model (before a method is attached).

    Example:
        >>> batches, features = caption_batches(model, tokenizer, 4)                          # doctest: +SKIP
        >>> int(batches[0]["answer_mask"].sum()) > 0                                          # doctest: +SKIP
        True
    """
    slots = image_slots(model)
    pixels = random_image(model)
    batches, features = [], []
    with _SameTower(model), torch.no_grad():  # not inference_mode: the tensors feed training
        for i in range(samples):
            sample = make_sample(SPLITS[split] + i)
            ids = prompt_ids(tokenizer, sample.question, slots, sample.answer_start)
            image = caption_features(model, tokenizer, sample, seed=sample.meta["seed"])
            with CaptionImage(model, image):
                full = model.generate(ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            answers = torch.zeros_like(full, dtype=torch.bool)
            answers[:, ids.shape[-1]:] = True
            batches.append({"input_ids": full, "attention_mask": torch.ones_like(full),
                            "pixel_values": pixels, "answer_mask": answers})
            features.append(image)
    return batches, features


def train_on_captions(model, tokenizer, config, *, samples: int = DEFAULT_TRAIN_SAMPLES,
                      steps: int = DEFAULT_TRAIN_STEPS, lr: float = 3e-3, seed: int = 0, progress: bool = True,
                      log=None) -> dict:
    """Attach the learned method ``config`` to ``model`` (a dense LLaVA of :func:`hf_tokred.bench.vlm.build_llava`)
    and train its modules on ``samples`` tune-split samples for ``steps`` steps; returns ``{"losses", "seconds",
    "samples", "steps"}`` (the training budget the report quotes). The method stays attached, in eval mode.

    Example:
        >>> result = train_on_captions(model, tokenizer, {"method": "atp_llava", "keep": 0.25})   # doctest: +SKIP
    """
    import hf_tokred
    from hf_tokred.training import train_visual_pruner

    log = log or (lambda message: None)
    started = time.perf_counter()
    log(f"train: {samples} tune-split samples, the dense model's answers as targets ...")
    batches, features = caption_batches(model, tokenizer, samples)
    hf_tokred.apply(model, config)
    with _SameTower(model):
        losses = train_visual_pruner(model, batches, steps=steps, lr=lr, seed=seed, progress=progress,
                                     around=lambda index: CaptionImage(model, features[index]))
    return {"losses": losses, "seconds": time.perf_counter() - started, "samples": samples, "steps": steps}


__all__ = ["caption_batches", "train_on_captions"]
