"""Training of MADTP's heads (arXiv 2403.02991) on a frozen BLIP / BLIP-2.

Only the MAG and DTP heads (``model.hf_tokred_modules["madtp"]``) train; the backbone is frozen and in eval mode.
The teacher is the same model run densely (the reduction switched off for that pass). The loss of one batch is

``distill_weight * KL(dense logits || reduced logits) + pooled_weight * (1 - cos(pooled vision embeddings))
+ ratio_weight * ratio + align_weight * alignment``

* logits: ``itm_score`` (BlipForImageTextRetrieval), the answer decoder's logits (BlipForQuestionAnswering,
  captured from ``text_decoder``), ``logits`` (Blip2ForConditionalGeneration, BlipForConditionalGeneration), over
  the real positions;
* pooled vision embedding: the vision encoder's output CLS token;
* ratio: :func:`hf_tokred.methods.encoder.madtp.ratio_loss` (batch-mean kept fraction toward the budget);
* alignment: :func:`hf_tokred.methods.encoder.madtp.alignment_loss` (MAG's InfoNCE between image and text).

Example:
    >>> import hf_tokred
    >>> from hf_tokred.training_madtp import synthetic_batches, train_madtp
    >>> hf_tokred.apply(blip, {"method": "madtp", "keep": 0.5})                          # doctest: +SKIP
    >>> losses = train_madtp(blip, synthetic_batches(blip, 4), steps=50, output_dir="blip-madtp")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib

import torch

from .errors import ConfigError, TokenReductionError
from .integration.wiring import MODULES_ATTR
from .recipes import mean_ends
from .training import (
    _batch_order,
    _check_loop,
    _prepare_checkpoint,
    _reducer,
    _resumable_step,
    dense_pass,
    lr_factor,
    save_trained,
)

STATE_NAME = "madtp_training.json"


def madtp_heads(model) -> torch.nn.Module:
    """The MADTP heads attached to ``model`` (``model.hf_tokred_modules["madtp"]``).

    Example:
        >>> params = madtp_heads(blip).parameters()                    # doctest: +SKIP
    """
    _reducer(model, "madtp")
    return model._modules[MODULES_ATTR]["madtp"]


def _vision_module(model):
    return getattr(model, "vision_model", model)


def _logits(model, output, captured):
    if captured:
        return captured[-1], None
    for name in ("itm_score", "logits"):
        value = getattr(output, name, None)
        if torch.is_tensor(value):
            return value, name
    return None, None


def madtp_loss(model, batch: dict, *, distill_weight: float = 1.0, pooled_weight: float = 1.0,
               ratio_weight: float = 2.0, align_weight: float = 0.1, return_parts: bool = False):
    """The MADTP training loss of one batch (see the module docstring); the heads must be in training mode.

    ``batch`` holds the model's keyword inputs (``pixel_values``, ``input_ids``, ``attention_mask``, and what the
    model needs besides, e.g. ``decoder_input_ids`` for BlipForQuestionAnswering). Returns the loss, or
    ``(loss, parts)`` with ``return_parts``.

    Example:
        >>> madtp_heads(blip).train()                                  # doctest: +SKIP
        >>> madtp_loss(blip, batch).backward()                         # doctest: +SKIP
    """
    from .methods.encoder.madtp import alignment_loss, ratio_loss, stage_decisions

    reducer = _reducer(model, "madtp")
    heads = madtp_heads(model)
    if not heads.training:
        raise TokenReductionError("madtp_loss: the heads are in eval mode (hard drop); call madtp_heads(model).train()")
    captured: list[torch.Tensor] = []
    vision_out: list[torch.Tensor] = []
    decoder = getattr(model, "text_decoder", None) if hasattr(model, "text_encoder") else None
    handles = [_vision_module(model).register_forward_hook(
        lambda m, a, o: vision_out.append(o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]))]
    if decoder is not None:
        handles.append(decoder.register_forward_hook(lambda m, a, o: captured.append(o.logits)))
    try:
        with torch.no_grad(), dense_pass(model):
            reference = model(**batch)
        teacher_logits, _ = _logits(model, reference, captured)
        teacher_vision = vision_out[-1]
        captured.clear()
        vision_out.clear()
        output = model(**batch)
        student_logits, name = _logits(model, output, captured)
        student_vision = vision_out[-1]
    finally:
        for handle in handles:
            handle.remove()
    records = stage_decisions(model)
    targets = [reducer.stage_target(i, len(records)) for i in range(len(records))]
    parts = {"ratio": ratio_loss(records, targets), "align": alignment_loss(records)}
    if teacher_logits is not None:
        s, t = student_logits.float(), teacher_logits.float()
        if s.dim() == 3:  # (B, L, V): the real positions only
            mask = batch.get("attention_mask")
            rows = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
            if mask is not None and mask.shape == s.shape[:2]:
                rows = mask.bool().to(s.device)
            s, t = s[rows], t[rows]
        parts["kl"] = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                                 reduction="batchmean")
    cosine = torch.nn.functional.cosine_similarity(student_vision[:, 0].float(), teacher_vision[:, 0].float(), dim=-1)
    parts["pooled"] = 1 - cosine.mean()
    loss = ratio_weight * parts["ratio"] + align_weight * parts["align"] + pooled_weight * parts["pooled"]
    if "kl" in parts:
        loss = loss + distill_weight * parts["kl"]
    if return_parts:
        return loss, {k: float(v.detach()) for k, v in parts.items()}
    return loss


def synthetic_batches(model, count: int = 4, *, batch_size: int = 2, text_length: int = 8, seed: int = 0
                      ) -> list[dict]:
    """Random batches a BLIP / BLIP-2 model accepts (images, texts of different lengths per row), for tests and smoke
    runs: ``pixel_values``, ``input_ids``, ``attention_mask`` (right-padded), plus ``decoder_input_ids`` for
    BlipForQuestionAnswering and the image placeholder run for BLIP-2.

    Example:
        >>> batches = synthetic_batches(blip, 2, batch_size=3)        # doctest: +SKIP
        >>> sorted(batches[0])                                        # doctest: +SKIP
        ['attention_mask', 'input_ids', 'pixel_values']
    """
    if count < 1 or batch_size < 1 or text_length < 2:
        raise ConfigError("synthetic_batches: count and batch_size must be >= 1 and text_length >= 2",
                          field="count" if count < 1 else "batch_size" if batch_size < 1 else "text_length")
    config = model.config
    vision = getattr(config, "vision_config", config)
    text_config = getattr(config, "text_config", None)
    vocab = int(getattr(text_config, "vocab_size", 100))
    generator = torch.Generator().manual_seed(seed)
    parameter = next(model.parameters())
    image_token = getattr(config, "image_token_id", None)
    image_token = image_token if isinstance(image_token, int) else getattr(config, "image_token_index", None)
    queries = getattr(config, "num_query_tokens", 0) if isinstance(image_token, int) else 0
    low = 4
    batches = []
    for _ in range(count):
        pixels = torch.randn(batch_size, getattr(vision, "num_channels", 3), vision.image_size, vision.image_size,
                             generator=generator)
        lengths = torch.randint(2, text_length + 1, (batch_size,), generator=generator)
        lengths[0] = text_length
        ids = torch.randint(low, vocab, (batch_size, text_length), generator=generator)
        if isinstance(image_token, int):
            ids = ids.masked_fill(ids == image_token, low)
        mask = (torch.arange(text_length)[None] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, int(getattr(text_config, "pad_token_id", 0) or 0))
        if queries:
            ids = torch.cat([torch.full((batch_size, queries), image_token), ids], dim=1)
            mask = torch.cat([torch.ones(batch_size, queries, dtype=torch.long), mask], dim=1)
        batch = {"pixel_values": pixels.to(parameter.device, parameter.dtype), "input_ids": ids.to(parameter.device),
                 "attention_mask": mask.to(parameter.device)}
        if type(model).__name__ == "BlipForQuestionAnswering":
            batch["decoder_input_ids"] = torch.randint(low, vocab, (batch_size, 4), generator=generator).to(parameter.device)
        batches.append(batch)
    return batches


def _fingerprint(batches: list[dict], **settings) -> dict:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            digest.update(key.encode())
            if torch.is_tensor(value):
                digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return {"data_sha256": digest.hexdigest(), **settings}


def _model_card(model, reducer, state: dict) -> str:
    from .integration.hub import make_model_card

    card = make_model_card(reducer, base_model=getattr(model.config, "_name_or_path", None),
                           repo_id=f"{type(model).__name__}-madtp",
                           results={"steps": state["step"], "final loss": round(state["losses"][-1], 5)
                                    if state["losses"] else None})
    fp = state["fingerprint"]
    losses = state["losses"]
    return str(card) + f"""
## Training (hf_tokred.training_madtp.train_madtp)

- trained: the MADTP heads only (MAG alignment tokens and projections, DTP keep-ratio heads); the backbone is frozen
- teacher: the same model run densely; loss = KL on the output logits + pooled-vision cosine + ratio + alignment
- steps: {state["step"]}, learning rate {fp["lr"]} ({fp["lr_schedule"]}), seed {fp["seed"]}, {fp["batch_count"]} batches
- final training loss (mean of the last {min(len(losses), 10)} steps): {mean_ends(losses)[1]:.5f}
- data fingerprint: `{fp["data_sha256"]}`
"""


def train_madtp(model, batches: list[dict], *, steps: int = 100, lr: float = 1e-3, seed: int = 0, output_dir=None,
                resume: bool = True, save_every: int = 50, lr_schedule: str = "constant", shuffle: bool = False,
                progress: bool = True, distill_weight: float = 1.0, pooled_weight: float = 1.0,
                ratio_weight: float = 2.0, align_weight: float = 0.1) -> list[float]:
    """Train the MADTP heads of ``model`` (already reduced with ``madtp``) on ``batches``; returns every step's loss.

    AdamW at ``lr`` over the heads only (the backbone frozen and in eval mode), ``steps`` steps cycling through
    ``batches`` (``shuffle``: a fresh seeded order every pass) with a ``lr_schedule`` decay, a tqdm bar
    (``progress``), everything seeded by ``seed`` (the global RNG is restored afterwards). With ``output_dir``:
    every ``save_every`` steps and at the end a checkpoint (heads, AdamW moments, RNG state in safetensors; step and
    losses in JSON) goes to ``output_dir/checkpoint``; with ``resume`` a later call with the same data and settings
    continues from it exactly. At the end the model is saved there with ``save_pretrained`` (the heads go to
    ``token_reduction.safetensors``) with a model card (``README.md``). Leaves the model in eval mode (hard drop).

    Example:
        >>> import hf_tokred
        >>> from hf_tokred.training_madtp import synthetic_batches, train_madtp
        >>> hf_tokred.apply(blip, {"method": "madtp", "keep": 0.5})                                  # doctest: +SKIP
        >>> losses = train_madtp(blip, synthetic_batches(blip, 4), steps=20, output_dir="out")      # doctest: +SKIP
        >>> type(blip).from_pretrained("out").hf_tokred_modules["madtp"] is not None                # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    _check_loop("train_madtp", batches, steps, lr, lr_schedule)
    if not isinstance(save_every, int) or save_every < 1:
        raise ConfigError(f"save_every: expected an int >= 1, got {save_every!r}", field="save_every")
    reducer = _reducer(model, "madtp")
    heads = madtp_heads(model)
    params = list(heads.parameters())
    trainable = {id(p) for p in params}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    fingerprint = _fingerprint(batches, lr=lr, seed=seed, lr_schedule=lr_schedule, shuffle=shuffle,
                               batch_count=len(batches), config=reducer.to_dict(),
                               weights=[distill_weight, pooled_weight, ratio_weight, align_weight])
    state = {"step": 0, "losses": [], "fingerprint": fingerprint}
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, heads, optimizer, params, state)
        order = _batch_order(len(batches), steps, shuffle, torch.Generator().manual_seed(seed))
        model.eval()
        heads.train()
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train madtp", disable=not progress)
        for step in range(state["step"], steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(lr_schedule, step, steps)
            loss = madtp_loss(model, batches[order[step]], distill_weight=distill_weight, pooled_weight=pooled_weight,
                              ratio_weight=ratio_weight, align_weight=align_weight)
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, heads, save_every, steps)
        bar.close()
    finally:
        torch.random.set_rng_state(rng_state)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    if output_dir is not None:
        save_trained(output_dir, model, None, STATE_NAME, state, _model_card(model, reducer, state))
    return list(state["losses"])


__all__ = ["dense_pass", "madtp_heads", "madtp_loss", "synthetic_batches", "train_madtp"]
