"""``hf-tokred train mrt5``: a small byte-level T5 with MrT5's delete gate, trained from scratch on span corruption.

There are no pretrained ByT5 weights on this machine, so the recipe builds a ByT5-shaped
``T5ForConditionalGeneration`` from a config (bytes + 3 as token ids, ``</s>`` = 1, padding 0, the 125 sentinels
``<extra_id_i>`` = 259 + i of ``transformers.ByT5Tokenizer()``, which needs no files) and trains it with T5's span
corruption adapted to bytes as ByT5 does it (15 % of the bytes masked in spans of 20 bytes on average), with the
delete gate of :mod:`hf_tokred.methods.nlp.mrt5` attached and trained jointly (soft deletion), its regulariser
``alpha * mean(G)`` steered by the paper's PI controller towards ``target_deletion``. ``delete=False`` trains the
same model, same data and seed, without the gate: the baseline.

Example:
    >>> from hf_tokred.training import train_mrt5
    >>> model = train_mrt5(steps=300, output_dir="byt5-mrt5")                   # doctest: +SKIP
    >>> baseline = train_mrt5(steps=300, delete=False, output_dir="byt5-dense")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError

# ByT5's vocabulary (transformers.ByT5Tokenizer()): 0 pad, 1 </s>, 2 unk, 3..258 the bytes, 259.. the sentinels.
PAD_ID, EOS_ID, BYTE_OFFSET, FIRST_SENTINEL, SENTINELS = 0, 1, 3, 259, 125
VOCAB_SIZE = FIRST_SENTINEL + SENTINELS
STATE_FILE = "mrt5_training.json"
# The model the recipe and the benchmark train by default: ByT5's shape (a deep encoder, a shallow decoder, gated
# GELU, untied output embedding), scaled down to train in minutes on two CPU cores.
DEFAULT_SIZES = {"d_model": 128, "d_ff": 384, "num_heads": 4, "num_layers": 6, "num_decoder_layers": 2}
DEFAULT_GATE_LAYER = 3

DESCRIPTION = """\
mrt5: a ByT5-shaped byte-level T5 (6 encoder / 2 decoder blocks, d_model 128) trained from scratch on span
corruption over the corpus, with MrT5's delete gate after encoder layer --gate-layer (of 6) trained jointly (soft
deletion; a PI controller steers the deletion rate to --target-deletion). The folder it writes loads with
T5ForConditionalGeneration.from_pretrained(DIR) (import hf_tokred first: the gate is re-attached from
token_reduction.safetensors and deletes at inference); its tokenizer is transformers.ByT5Tokenizer().
--no-delete trains the same model without the gate (the baseline of hf-tokred nlp-bench mrt5).

examples:
  hf-tokred train mrt5                                  ~6 min on 2 CPU cores (300 steps)
  hf-tokred train mrt5 --no-delete --output ./byt5-dense
  hf-tokred train mrt5 --corpus my_text.txt --steps 2000 --target-deletion 0.6
"""


# ---------------------------------------------------------------------------------------------
# Data: bytes and span corruption
# ---------------------------------------------------------------------------------------------


def byte_ids(text: str) -> list[int]:
    """ByT5's token ids of ``text``: its UTF-8 bytes + 3 (no ``</s>``), as ``ByT5Tokenizer()`` gives them.

    Example:
        >>> byte_ids("hé")
        [107, 198, 172]
    """
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def _segment(total: int, parts: int, rng: random.Random) -> list[int]:
    """``total`` items cut into ``parts`` non-empty runs at uniformly random places (T5's random segmentation)."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def span_corruption(ids: list[int], rng: random.Random, noise_density: float = 0.15,
                    mean_span: float = 20.0) -> tuple[list[int], list[int]]:
    """T5's span corruption of one sequence of byte ids, with ByT5's span length: ``(inputs, targets)``.

    About ``noise_density`` of the ids, in ``round(noise / mean_span)`` spans (at least one, at most 125), are
    cut out; the input keeps the rest with sentinel ``i`` (id ``259 + i``) where span ``i`` was, the target is
    every sentinel followed by its span; both end with ``</s>``. Spans never touch each other or the ends of
    the sequence in a way that merges them (the non-noise runs between them are non-empty).

    Example:
        >>> import random
        >>> inputs, targets = span_corruption(list(range(10, 50)), random.Random(0), mean_span=3)
        >>> sorted(i for i in inputs + targets if 10 <= i < 50) == list(range(10, 50))
        True
        >>> inputs[-1], targets[-1], targets[0]
        (1, 1, 259)
    """
    n = len(ids)
    noise = min(max(int(round(n * noise_density)), 1), n - 1)
    spans = min(max(int(round(noise / mean_span)), 1), SENTINELS, n - noise)
    noise_runs, keep_runs = _segment(noise, spans, rng), _segment(n - noise, spans, rng)
    inputs, targets, at = [], [], 0
    for i, (keep, drop) in enumerate(zip(keep_runs, noise_runs)):
        inputs += ids[at:at + keep]
        at += keep
        inputs.append(FIRST_SENTINEL + i)
        targets += [FIRST_SENTINEL + i, *ids[at:at + drop]]
        at += drop
    return inputs + [EOS_ID], targets + [EOS_ID]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def corruption_batch(pairs: list[tuple[list[int], list[int]]]) -> dict:
    """Model inputs of span-corrupted pairs: right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100).

    Example:
        >>> corruption_batch([([5, 259, 1], [259, 6, 1]), ([7, 1], [259, 1])])["labels"].tolist()
        [[259, 6, 1], [259, 1, -100]]
    """
    inputs = _pad([p[0] for p in pairs], PAD_ID)
    return {"input_ids": inputs, "attention_mask": (inputs != PAD_ID).long(), "labels": _pad([p[1] for p in pairs], -100)}


def _byte_stream(texts: list[str]) -> list[int]:
    return [i for text in texts for i in byte_ids(text) + byte_ids("\n")]


def training_batch(stream: list[int], step: int, *, batch_size: int, length: int, seed: int) -> dict:
    """The batch of training ``step``: ``batch_size`` random ``length``-byte windows of ``stream``, span-corrupted.

    It depends on ``(seed, step)`` only, so a resumed run sees exactly the batches it would have seen.

    Example:
        >>> batch = training_batch(list(range(3, 259)) * 8, 0, batch_size=2, length=64, seed=0)
        >>> batch["input_ids"].shape[0], int(batch["attention_mask"].sum(1).max()) < 64
        (2, True)
    """
    rng = random.Random(seed * 1_000_003 + step)
    pairs = []
    for _ in range(batch_size):
        start = rng.randrange(0, max(len(stream) - length, 0) + 1)
        pairs.append(span_corruption(stream[start:start + length], rng))
    return corruption_batch(pairs)


def heldout_batches(texts: list[str], *, batch_size: int = 8, length: int = 256, seed: int = 1234) -> list[dict]:
    """Fixed evaluation batches: consecutive ``length``-byte windows of ``texts``, span-corrupted with ``seed``.

    Example:
        >>> from hf_tokred.training import stdlib_corpus
        >>> batches = heldout_batches(stdlib_corpus("heldout"), length=256)
        >>> len(batches) > 3
        True
    """
    stream = _byte_stream(texts)
    rng = random.Random(seed)
    pairs = [span_corruption(stream[s:s + length], rng) for s in range(0, len(stream) - length + 1, length)]
    if not pairs:
        raise ConfigError(f"texts: need at least {length} bytes of text, got {len(stream)}", field="texts")
    return [corruption_batch(pairs[i:i + batch_size]) for i in range(0, len(pairs), batch_size)]


# ---------------------------------------------------------------------------------------------
# Model, controller, loss
# ---------------------------------------------------------------------------------------------


def byte_t5(seed: int = 0, **sizes):
    """A freshly initialised ByT5-shaped ``T5ForConditionalGeneration`` (384-id byte vocabulary, gated GELU,
    untied output embedding, no dropout); ``sizes`` override :data:`DEFAULT_SIZES`.

    Example:
        >>> model = byte_t5(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=1)
        >>> model.config.vocab_size, model.config.num_layers
        (384, 2)
    """
    from transformers import T5Config, T5ForConditionalGeneration

    unknown = sorted(set(sizes) - set(DEFAULT_SIZES))
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a model size; allowed: {', '.join(DEFAULT_SIZES)}", field=unknown[0])
    dims = {**DEFAULT_SIZES, **sizes}
    if dims["d_model"] % dims["num_heads"]:
        raise ConfigError(f"d_model: {dims['d_model']} is not a multiple of num_heads={dims['num_heads']}",
                          field="d_model")
    config = T5Config(vocab_size=VOCAB_SIZE, d_kv=dims["d_model"] // dims["num_heads"], dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=PAD_ID,
                      eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, **dims)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config).eval()
        # transformers initialises an untied output embedding with std 1 (logits of std ~sqrt(d_model), an initial
        # loss near 100); Mesh TensorFlow's untied T5 (ByT5) scales it by d_model ** -0.5.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, dims["d_model"] ** -0.5)
        return model
    finally:
        torch.random.set_rng_state(state)


@dataclass
class PIController:
    """MrT5's PI controller of the regulariser's weight: ``alpha = kp * e + I``, ``I = I + ki * e``, with
    ``e = target - measured deletion rate`` at every step.

    The proportional term answers at once; the integral term removes the steady gap the proportional one leaves.
    ``alpha`` may go negative (then the regulariser pushes the gate back towards keeping): a model that does not
    yet use its encoder's content loses nothing when everything is deleted, and a one-sided regulariser would
    leave the gate saturated at "delete all" (our departure; the paper continues pretraining a ByT5 that does
    use its input). The paper uses ``kp = 0.5``, ``ki = 1e-5`` over tens of thousands of steps; a run of a few
    hundred steps needs a faster integral (``ki = 0.05``, our default, with ``kp = 2``).

    Example:
        >>> c = PIController(target=0.5, kp=2.0, ki=0.05)
        >>> round(c.update(0.0), 4), round(c.update(0.7), 4)
        (1.025, -0.385)
    """

    target: float
    kp: float = 2.0
    ki: float = 0.05
    integral: float = 0.0
    alpha: float = 0.0

    def update(self, deletion_rate: float) -> float:
        error = self.target - deletion_rate
        self.integral += self.ki * error
        self.alpha = self.kp * error + self.integral
        return self.alpha


def gate_statistics(encoder_outputs, attention_mask: torch.Tensor, threshold: float,
                    input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """``(mean G, fraction with G < threshold)`` over the real tokens of an MrT5 encoder output in training (soft)
    mode, ``</s>`` excluded when ``input_ids`` are given (it is never deleted). The mean is differentiable.

    Example:
        >>> out = model.get_encoder()(**inputs)                                                     # doctest: +SKIP
        >>> mean_gate, rate = gate_statistics(out, inputs["attention_mask"], -15.0, inputs["input_ids"])  # doctest: +SKIP
    """
    gate = encoder_outputs.delete_gate
    if gate is None:
        raise ConfigError("encoder_outputs: no delete_gate values (the reduction deletes nothing, or the model "
                          "has no mrt5 reduction)", field="encoder_outputs")
    real = attention_mask.bool()
    if input_ids is not None:
        real = real & (input_ids != EOS_ID)
    values = gate[real]
    return values.mean(), float((values.detach() < threshold).float().mean())


class _Parameters(torch.nn.Module):
    """Every distinct parameter of a model under a flat name: T5 shares its embedding between ``shared``,
    ``encoder.embed_tokens`` and ``decoder.embed_tokens``, which safetensors refuses to save three times."""

    def __init__(self, model):
        super().__init__()
        self.params = torch.nn.ParameterDict({name.replace(".", "__"): p for name, p in model.named_parameters()})


def _sizes_text(sizes: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sizes.items())


def _model_card(state: dict) -> str:
    fp = state["fingerprint"]
    losses = state["lm_losses"]
    final = sum(losses[-20:]) / max(len(losses[-20:]), 1)
    deleting = fp["delete"]
    rates = state["deletion"][-20:]
    gate = (f"MrT5's delete gate after encoder layer {fp['gate_layer']} (of {fp['sizes']['num_layers']}), trained jointly with soft deletion "
            f"towards a deletion rate of {fp['target_deletion']} (PI controller kp {fp['controller_p']}, "
            f"ki {fp['controller_i']}); final training deletion rate (mean of the last {len(rates)} steps): "
            f"{sum(rates) / max(len(rates), 1):.3f}" if deleting else "no delete gate (the dense baseline)")
    return f"""---
library_name: transformers
pipeline_tag: text2text-generation
tags:
- byt5
- span-corruption
{"- mrt5" + chr(10) + "- hf_tokred" + chr(10) if deleting else ""}---

# Byte-level T5 {"with MrT5 deletion " if deleting else ""}(hf_tokred)

A ByT5-shaped `T5ForConditionalGeneration` trained from scratch with `hf_tokred.training.train_mrt5` on T5 span
corruption over bytes (15 % noise, mean span 20 bytes) — a small research model, not a general-purpose one.
{"With `import hf_tokred`, `from_pretrained` re-attaches the delete gate from `token_reduction.safetensors` "
 "(MrT5, Kallini et al., arXiv 2410.20771): in eval mode the encoder deletes the tokens the gate scores below "
 "the threshold after the gate's block. Without hf_tokred the folder loads as the dense T5 (no gate)."
 if deleting else ""}
The tokenizer is `transformers.ByT5Tokenizer()` (UTF-8 bytes + 3; no files needed).

## Training

- model: {_sizes_text(fp["sizes"])}, vocabulary {VOCAB_SIZE}
- {gate}
- data: {fp["texts"]} paragraphs ({fp["bytes"]} bytes), random {fp["length"]}-byte windows, batch {fp["batch_size"]}
- steps: {state["step"]}, AdamW lr {fp["lr"]} (warm-up {fp["warmup"]} steps, cosine decay), seed {fp["seed"]}
- final training span-corruption loss (mean of the last {min(20, len(losses))} steps): {final:.4f}

`checkpoint/` (optimizer state, for resuming) is not needed for inference.
"""


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def train_mrt5(texts: list[str] | None = None, *, steps: int = 300, delete: bool = True,
               gate_layer: int = DEFAULT_GATE_LAYER, target_deletion: float = 0.5, threshold: float = -15.0,
               gate_scale: float = -30.0, controller_p: float = 2.0, controller_i: float = 0.05,
               regularizer_delay: int | None = None, gate_lr: float = 1e-2,
               batch_size: int = 8, length: int = 256, lr: float = 1e-3, warmup: int = 30,
               weight_decay: float = 0.01, max_grad_norm: float = 1.0, seed: int = 0, sizes: dict | None = None,
               output_dir=None, resume: bool = True, save_every: int = 100, progress: bool = True):
    """Train a byte-level T5 from scratch on span corruption, with MrT5's delete gate (``delete=True``) or without.

    ``texts`` are the training paragraphs (default: ``stdlib_corpus("train")``). Every step draws ``batch_size``
    random ``length``-byte windows of their byte stream and span-corrupts them (:func:`training_batch`; the batch
    of a step depends on ``seed`` and the step only). The model is :func:`byte_t5` (``sizes`` override its
    dimensions), initialised from ``seed``. With ``delete`` the ``mrt5`` reduction (``gate_layer``, ``threshold``,
    ``gate_scale``, ``target_deletion``) is attached first and the whole model trains with the gate in soft mode;
    the loss is the span-corruption loss plus ``alpha * mean(G)`` over the real tokens, ``alpha`` set each step by
    :class:`PIController` (``controller_p``, ``controller_i``) from the batch's deletion rate (the fraction of real
    tokens with ``G < threshold``). Without ``delete`` the same model trains on the same batches: the baseline.

    A plain PyTorch loop: AdamW at ``lr`` with ``warmup`` linear warm-up steps then a cosine decay, gradients
    clipped to ``max_grad_norm``, a tqdm bar (``progress``), everything seeded (the global RNG is restored
    afterwards). With ``output_dir``, every ``save_every`` steps and at the end a checkpoint (weights, AdamW
    moments, the controller, safetensors + JSON) goes to ``output_dir/checkpoint``, and with ``resume`` a later
    call with the same settings continues from it exactly; the trained model is saved with ``save_pretrained``
    (the gate in ``token_reduction.safetensors``), with ``mrt5_training.json`` (every step's loss, deletion rate
    and ``alpha``) and a model card. Returns the model in eval mode (hard deletion); ``model.train_log`` holds
    the per-step lists.

    Example:
        >>> from hf_tokred.training import train_mrt5
        >>> model = train_mrt5(steps=300, output_dir="byt5-mrt5")                     # doctest: +SKIP
        >>> model.train_log["deletion"][-1]                                            # doctest: +SKIP
        0.51
    """
    from tqdm.auto import tqdm

    import hf_tokred

    from ..training import _prepare_checkpoint, _resumable_step, save_trained, stdlib_corpus

    for name, value, ok in (("steps", steps, isinstance(steps, int) and steps >= 1),
                            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                            ("length", length, isinstance(length, int) and 16 <= length <= 8192),
                            ("lr", lr, isinstance(lr, (int, float)) and lr > 0),
                            ("warmup", warmup, isinstance(warmup, int) and warmup >= 0),
                            ("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0),
                            ("max_grad_norm", max_grad_norm, isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0),
                            ("controller_p", controller_p, isinstance(controller_p, (int, float)) and controller_p >= 0),
                            ("controller_i", controller_i, isinstance(controller_i, (int, float)) and controller_i >= 0),
                            ("gate_lr", gate_lr, isinstance(gate_lr, (int, float)) and gate_lr > 0),
                            ("regularizer_delay", regularizer_delay, regularizer_delay is None
                             or (isinstance(regularizer_delay, int) and regularizer_delay >= 0)),
                            ("save_every", save_every, isinstance(save_every, int) and save_every >= 1),
                            ("seed", seed, isinstance(seed, int) and not isinstance(seed, bool)),
                            ("delete", delete, isinstance(delete, bool))):
        if not ok:
            raise ConfigError(f"{name}: got {value!r}; see train_mrt5's docstring for the allowed values", field=name)
    texts = stdlib_corpus("train") if texts is None else texts
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts: expected a list of strings", field="texts")
    stream = _byte_stream(list(texts))
    if len(stream) < length:
        raise ConfigError(f"texts: need at least length={length} bytes of text, got {len(stream)}", field="texts")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    delay = steps // 3 if regularizer_delay is None else regularizer_delay
    cfg = None
    if delete:
        cfg = hf_tokred.TokenReductionConfig(method="mrt5", gate_layer=gate_layer, threshold=threshold,
                                             gate_scale=gate_scale, target_deletion=target_deletion)
    fingerprint = {"texts": len(texts), "bytes": len(stream), "sizes": sizes, "delete": delete,
                   "gate_layer": gate_layer if delete else None, "threshold": threshold if delete else None,
                   "gate_scale": gate_scale if delete else None, "target_deletion": target_deletion if delete else None,
                   "controller_p": controller_p if delete else None, "controller_i": controller_i if delete else None,
                   "regularizer_delay": delay if delete else None, "gate_lr": gate_lr if delete else None,
                   "batch_size": batch_size, "length": length, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
                   "max_grad_norm": max_grad_norm, "seed": seed, "data_sha256": _digest(stream)}

    rng_state = torch.random.get_rng_state()
    try:
        model = byte_t5(seed, **sizes)
        if cfg is not None:
            hf_tokred.apply(model, cfg, weights_required=False)
            torch.manual_seed(seed)  # the gate's initialisation does not depend on what ran before
            with torch.no_grad():
                model.hf_tokred_modules["mrt5"].proj.weight.normal_(0.0, 0.02)
        holder = _Parameters(model)
        gate_params = {id(p) for p in model.hf_tokred_modules.parameters()} if cfg is not None else set()
        params = [p for p in holder.parameters() if id(p) not in gate_params]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        gate = [p for p in holder.parameters() if id(p) in gate_params]
        # The gate gets its own, larger and constant learning rate: it has to move from "keep all" to the target
        # rate within the part of a short run the regulariser acts in, when the model's rate has decayed.
        groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "decay": True},
                  {"params": no_decay, "weight_decay": 0.0, "lr": lr, "decay": True}]
        if gate:
            groups.append({"params": gate, "weight_decay": 0.0, "lr": gate_lr, "decay": False})
        optimizer = torch.optim.AdamW(groups)
        params = decay + no_decay + gate
        controller = PIController(target_deletion, controller_p, controller_i)
        state = {"step": 0, "losses": [], "lm_losses": [], "deletion": [], "alpha": [],
                 "controller": asdict(controller), "fingerprint": fingerprint}
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, holder, optimizer, params, state)
        if state["step"] and checkpoint is not None:  # the shared helper restores step and losses; ours too
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
                saved = json.load(fh)
            for key in ("lm_losses", "deletion", "alpha", "controller"):
                state[key] = saved[key]
            controller = PIController(**saved["controller"])
        model.train()
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc=f"train {'mrt5' if delete else 'byt5'}",
                   disable=not progress)
        for step in range(state["step"], steps):
            batch = training_batch(stream, step, batch_size=batch_size, length=length, seed=seed)
            warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
            decayed = warm * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * decayed if group["decay"] else gate_lr * warm
            if cfg is None:
                lm_loss = model(**batch).loss
                loss, rate = lm_loss, 0.0
            else:
                encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                lm_loss = model(encoder_outputs=encoded, attention_mask=batch["attention_mask"],
                                labels=batch["labels"]).loss
                mean_gate, rate = gate_statistics(encoded, batch["attention_mask"], threshold, batch["input_ids"])
                alpha = controller.update(rate) if step >= delay else 0.0
                loss = lm_loss + alpha * mean_gate
            state["lm_losses"].append(round(lm_loss.item(), 6))
            state["deletion"].append(round(rate, 6))
            state["alpha"].append(round(controller.alpha, 6))
            state["controller"] = asdict(controller)
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, holder, save_every, steps,
                            max_grad_norm=max_grad_norm)
            if cfg is not None:
                bar.set_postfix(loss=f"{lm_loss.item():.4f}", deleted=f"{rate:.2f}")
        bar.close()
        model.eval()
        if output_dir is not None:
            from transformers import ByT5Tokenizer

            save_trained(output_dir, model, ByT5Tokenizer(), STATE_FILE, state, _model_card(state))
    finally:
        torch.random.set_rng_state(rng_state)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train_log = {key: list(state[key]) for key in ("losses", "lm_losses", "deletion", "alpha")}
    return model


def _digest(stream: list[int]) -> str:
    import hashlib

    return hashlib.sha256(bytes(i - BYTE_OFFSET for i in stream)).hexdigest()


@torch.no_grad()
def evaluate_span_loss(model, batches: list[dict]) -> dict:
    """Held-out span-corruption loss of ``model`` in eval mode (an MrT5 model deletes for real: hard deletion).

    Returns ``loss`` (mean cross-entropy per target byte over all batches), ``target_tokens``, and for a model with
    the ``mrt5`` reduction ``deletion_rate`` (fraction of the inputs' real tokens the gate removed) and
    ``kept_tokens`` / ``input_tokens``.

    Example:
        >>> from hf_tokred.recipes.mrt5 import evaluate_span_loss, heldout_batches
        >>> from hf_tokred.training import stdlib_corpus
        >>> evaluate_span_loss(model, heldout_batches(stdlib_corpus("heldout")))["loss"]   # doctest: +SKIP
        1.42
    """
    was_training = model.training
    model.eval()
    total, count, kept, real = 0.0, 0, 0, 0
    try:
        for batch in batches:
            encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out = model(encoder_outputs=encoded, attention_mask=batch["attention_mask"], labels=batch["labels"])
            targets = int((batch["labels"] != -100).sum())
            total += float(out.loss) * targets
            count += targets
            mask = getattr(encoded, "attention_mask", None)
            kept += int(mask.sum()) if mask is not None else int(batch["attention_mask"].sum())
            real += int(batch["attention_mask"].sum())
    finally:
        model.train(was_training)
    result = {"loss": total / max(count, 1), "target_tokens": count, "input_tokens": real, "kept_tokens": kept}
    result["deletion_rate"] = 1.0 - kept / max(real, 1)
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train mrt5`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "mrt5"]).target_deletion
        0.5
    """
    from ..cli import _float_in
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "mrt5", help="MrT5's delete gate on a byte-level T5 trained from scratch",
                              description=DESCRIPTION, output="byt5-mrt5 (byt5-dense with --no-delete)", steps=300)
    train.add_argument("--target-deletion", type=_float_in(0.0, 0.95), default=0.5,
                       help="fraction of the bytes the gate learns to delete (default: 0.5)")
    train.add_argument("--gate-layer", type=int, default=DEFAULT_GATE_LAYER,
                       help=f"encoder blocks before the gate (default: {DEFAULT_GATE_LAYER}: the gate acts after the "
                            "third of six)")
    train.add_argument("--no-delete", action="store_true", help="train the same model without the gate (baseline)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train the model, save it, and (default corpus) report its held-out span-corruption loss."""
    from ..cli import _log, format_table
    from ..training import stdlib_corpus
    from . import recipe_output, recipe_texts

    texts = recipe_texts(args)
    output = recipe_output(args, "byt5-dense" if args.no_delete else "byt5-mrt5")
    _log(f"mrt5: {args.steps} steps on {len(texts)} paragraphs, {'no gate' if args.no_delete else 'with the gate'}")
    model = train_mrt5(texts, steps=args.steps, delete=not args.no_delete, gate_layer=args.gate_layer,
                       target_deletion=args.target_deletion, seed=args.seed, output_dir=output,
                       progress=not args.no_progress)
    print(f"saved to {output}: T5ForConditionalGeneration.from_pretrained({output!r}) after import hf_tokred")
    if not args.corpus:
        metrics = evaluate_span_loss(model, heldout_batches(stdlib_corpus("heldout")))
        rows = [["span-corruption loss", f"{metrics['loss']:.4f}"],
                ["deletion rate", f"{metrics['deletion_rate']:.3f}"],
                ["input bytes (kept)", f"{metrics['input_tokens']} ({metrics['kept_tokens']})"]]
        print(format_table(["held-out", "value"], rows, right={1}))
    return 0
