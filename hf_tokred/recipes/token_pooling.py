"""``hf-tokred train token_pooling``: a byte-level hourglass decoder (Dynamic Token Pooling) trained from scratch.

:func:`train_token_pooling` builds a small ``LlamaForCausalLM`` over UTF-8 bytes (ids 0..255, then pad/bos/eos: no
tokenizer files), attaches a ``token_pooling`` reduction (or none: the unpooled baseline, the same loop), and trains
every weight on the language-modelling loss plus, with learned boundaries, the paper's Binomial prior loss. The
folder it writes loads with ``LlamaForCausalLM.from_pretrained(DIR)`` (the reduction re-attaches; the predictor is in
``token_reduction.safetensors``). :func:`bits_per_byte` evaluates a model on text.
"""

from __future__ import annotations

import json
import math
import os

import torch

from ..errors import ConfigError
from ..methods.nlp.token_pooling import (
    BYTE_BOS_ID,
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    BYTE_WHITESPACE_IDS,
    TokenPoolingConfig,
)
from . import mean_ends

STATE_NAME = "token_pooling_training.json"
BOUNDARY_CHOICES = ("whitespace", "learned", "none")

DESCRIPTION = """\
token_pooling: a byte-level Llama decoder with a Dynamic Token Pooling hourglass (Nawrot et al., arXiv 2211.09761),
trained from scratch on the corpus (default: the Python documentation shipped with the standard library, training
split): the first 2 and last 2 of --layers layers run on every byte, the layers between on segments that end at
whitespace (--boundaries whitespace) or where a learned boundary predictor says (--boundaries learned, with the
paper's Binomial prior toward --rate). --boundaries none trains the unpooled baseline with the same loop. The folder
loads with LlamaForCausalLM.from_pretrained(DIR); an interrupted run resumes from its checkpoint there.

examples:
  hf-tokred train token_pooling                                   ~5 min on 2 CPU cores (300 steps)
  hf-tokred train token_pooling --boundaries learned --rate 0.2 --output ./hourglass-learned
  hf-tokred train token_pooling --boundaries none --output ./vanilla
"""


def byte_lm_config(layers: int = 8, hidden_size: int = 128, heads: int = 4, max_length: int = 1024):
    """The ``LlamaConfig`` of the recipe's byte-level decoders (vocabulary: 256 bytes + pad, bos, eos).

    Example:
        >>> byte_lm_config(layers=4).vocab_size
        259
    """
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_length, pad_token_id=BYTE_PAD_ID, bos_token_id=BYTE_BOS_ID,
                       eos_token_id=BYTE_EOS_ID, tie_word_embeddings=False, attn_implementation="sdpa")


def default_reduction(boundaries: str = "whitespace", *, pre_layers: int = 2, post_layers: int = 2,
                      rate: float = 0.2) -> TokenPoolingConfig | None:
    """The recipe's hourglass config for byte-level models (None for ``boundaries="none"``).

    Example:
        >>> default_reduction("whitespace").boundary_token_ids
        [9, 10, 11, 12, 13, 32]
    """
    if boundaries not in BOUNDARY_CHOICES:
        raise ConfigError(f"boundaries: expected one of {', '.join(BOUNDARY_CHOICES)}, got {boundaries!r}",
                          field="boundaries")
    if boundaries == "none":
        return None
    extra = {"boundary_token_ids": list(BYTE_WHITESPACE_IDS)} if boundaries == "whitespace" else {}
    return TokenPoolingConfig(boundaries=boundaries, pre_layers=pre_layers, post_layers=post_layers,
                              boundary_rate=rate, **extra)


def byte_stream(texts: list[str]) -> torch.Tensor:
    """The texts' UTF-8 bytes, separated by blank lines, as one id tensor.

    Example:
        >>> byte_stream(["ab", "c"]).tolist()
        [97, 98, 10, 10, 99]
    """
    return torch.tensor(list("\n\n".join(texts).encode("utf-8")), dtype=torch.long)


def _windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` bytes, each after a BOS id (``(N, seq_len + 1)``)."""
    count = stream.numel() // seq_len
    if count < 1:
        raise ConfigError(f"texts: {stream.numel()} bytes hold no window of seq_len={seq_len}", field="texts")
    body = stream[: count * seq_len].view(count, seq_len)
    return torch.cat([torch.full((count, 1), BYTE_BOS_ID, dtype=torch.long), body], dim=1)


@torch.no_grad()
def bits_per_byte(model, texts: list[str], *, seq_len: int = 256, batch_size: int = 8,
                  max_windows: int | None = None) -> float:
    """Bits per byte of ``model`` on ``texts``: the mean next-byte cross-entropy (in bits) over non-overlapping windows
    of ``seq_len`` bytes of the texts' byte stream, each window starting after a BOS id.

    Example:
        >>> from hf_tokred.training import stdlib_corpus
        >>> bits_per_byte(model, stdlib_corpus("heldout"), seq_len=256)    # doctest: +SKIP
        2.31
    """
    windows = _windows(byte_stream(texts), seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += nll.item()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count / math.log(2)


def _card(state: dict, reduction) -> str:
    fp = state["fingerprint"]
    losses = state["lm_losses"]
    final = mean_ends(losses)[1]
    what = ("an unpooled byte-level decoder (the baseline of Dynamic Token Pooling)" if reduction is None else
            f"a byte-level hourglass decoder, Dynamic Token Pooling (Nawrot et al., arXiv 2211.09761): layers "
            f"{reduction['pre_layers']} full resolution, then pooled segments ({reduction['boundaries']} boundaries), "
            f"then {reduction['post_layers']} full resolution")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- byte-level
- hf_tokred
{"- token-reduction" + chr(10) + "- token_pooling" + chr(10) if reduction is not None else ""}---

# Byte-level decoder trained with hf_tokred

{what}. Trained from scratch with `hf_tokred.training.train_token_pooling` on
{state["bytes"]} bytes of text (the Python documentation shipped with the standard library unless a corpus was
given). A small research model, not a general language model. Inputs are UTF-8 bytes (ids 0..255), BOS {BYTE_BOS_ID},
EOS {BYTE_EOS_ID}, pad {BYTE_PAD_ID}; no tokenizer files.

```python
import hf_tokred, torch
from transformers import LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained("<this folder>")   # re-attaches the reduction
ids = torch.tensor([[{BYTE_BOS_ID}] + list("The module".encode())])
print(bytes(t for t in model.generate(ids, max_new_tokens=40, do_sample=False)[0, 1:].tolist() if t < 256))
```

## Training

- steps: {state["step"]}, batch {fp["batch_size"]} windows of {fp["seq_len"]} bytes, learning rate {fp["lr"]}
  (warm-up then cosine), seed {fp["seed"]}
- model: {fp["layers"]} layers, hidden size {fp["hidden_size"]}, {fp["heads"]} heads
- reduction: `{json.dumps(reduction)}`
- final language-modelling loss (mean of the last {min(10, len(losses))} steps): {final:.4f} nats per byte

`checkpoint/` (optimizer state, for resuming) is not needed for inference.
"""


def train_token_pooling(texts: list[str] | None = None, *, reduction="whitespace", layers: int = 8,
                        hidden_size: int = 128, heads: int = 4, seq_len: int = 256, batch_size: int = 8,
                        steps: int = 300, lr: float = 2e-3, warmup: int = 20, prior_weight: float = 1.0,
                        max_grad_norm: float = 1.0, seed: int = 0, output_dir=None, resume: bool = True,
                        progress: bool = True, save_every: int = 100):
    """Train a byte-level ``LlamaForCausalLM`` from scratch with a Dynamic Token Pooling hourglass; returns the model.

    ``texts`` (default: ``stdlib_corpus("train")``) become one byte stream; every step draws ``batch_size`` random
    windows of ``seq_len`` bytes (each after a BOS id; the draws are fixed by ``seed``). ``reduction`` is a
    ``token_pooling`` config (or dict), ``"whitespace"`` / ``"learned"`` (:func:`default_reduction`: 2 layers, pooled
    middle, 2 layers), or None for the unpooled baseline -- the same loop. The loss is the language-modelling loss
    plus, with learned boundaries, ``prior_weight`` times the paper's Binomial prior loss (boundaries drawn with
    Gumbel-sigmoid in training). AdamW at ``lr`` with ``warmup`` linear warm-up steps then a cosine decay, gradients
    clipped to ``max_grad_norm``, a tqdm bar (``progress``); everything seeded (the global RNG is restored afterwards).

    With ``output_dir``, a checkpoint (weights, AdamW moments, RNG state in safetensors; step and losses in JSON) goes
    to ``output_dir/checkpoint`` every ``save_every`` steps and at the end, and with ``resume`` a later call with the
    same settings continues from it exactly; the finished model is saved with ``save_pretrained`` (the predictor to
    ``token_reduction.safetensors``), with ``token_pooling_training.json`` and a model card. The returned model is in
    eval mode; ``model.train_losses`` holds the total loss of every step.

    Example:
        >>> from hf_tokred.training import train_token_pooling
        >>> model = train_token_pooling(steps=300, output_dir="hourglass-bytes")          # doctest: +SKIP
        >>> baseline = train_token_pooling(reduction=None, steps=300, output_dir="vanilla")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    import hf_tokred

    from ..config import TokenReductionConfig
    from ..integration.hourglass import last_pooling
    from ..training import _prepare_checkpoint, _resumable_step, decay_groups, save_trained, stdlib_corpus

    for name, value, ok in (("steps", steps, isinstance(steps, int) and steps >= 1),
                            ("layers", layers, isinstance(layers, int) and layers >= 1),
                            ("hidden_size", hidden_size, isinstance(hidden_size, int) and hidden_size >= 8),
                            ("heads", heads, isinstance(heads, int) and heads >= 1 and hidden_size % heads == 0
                             and (hidden_size // heads) % 2 == 0),
                            ("seq_len", seq_len, isinstance(seq_len, int) and seq_len >= 2),
                            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                            ("lr", lr, isinstance(lr, (int, float)) and lr > 0),
                            ("warmup", warmup, isinstance(warmup, int) and warmup >= 0),
                            ("prior_weight", prior_weight, isinstance(prior_weight, (int, float)) and prior_weight >= 0),
                            ("max_grad_norm", max_grad_norm, isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0),
                            ("seed", seed, isinstance(seed, int)),
                            ("save_every", save_every, isinstance(save_every, int) and save_every >= 1)):
        if not ok:
            raise ConfigError(f"{name}: got {value!r}; see train_token_pooling's docstring for the allowed values",
                              field=name)
    if isinstance(reduction, str):
        reduction = default_reduction(reduction)
    elif reduction is not None:
        reduction = TokenReductionConfig.coerce(reduction)
        if not isinstance(reduction, TokenPoolingConfig):
            raise ConfigError(f"reduction: expected a token_pooling config, got {reduction.method!r}", field="reduction")
    texts = stdlib_corpus("train") if texts is None else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts: expected a non-empty list of strings", field="texts")
    stream = byte_stream(texts)
    if stream.numel() <= seq_len:
        raise ConfigError(f"texts: {stream.numel()} bytes are too few for seq_len={seq_len}", field="texts")

    import hashlib

    digest = hashlib.sha256(stream.numpy().tobytes()).hexdigest()
    fingerprint = {"data_sha256": digest, "reduction": None if reduction is None else reduction.to_dict(),
                   "layers": layers, "hidden_size": hidden_size, "heads": heads, "seq_len": seq_len,
                   "batch_size": batch_size, "steps_planned": steps, "lr": lr, "warmup": warmup,
                   "prior_weight": prior_weight, "max_grad_norm": max_grad_norm, "seed": seed}
    state = {"step": 0, "losses": [], "lm_losses": [], "shorten_factors": [], "fingerprint": fingerprint,
             "bytes": int(stream.numel())}
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(byte_lm_config(layers, hidden_size, heads, max_length=max(1024, 2 * seq_len)))
        model.generation_config.eos_token_id = None  # bytes never stop early on a random EOS
        if reduction is not None:
            hf_tokred.apply(model, reduction)
        groups, params = decay_groups(model.parameters(), 0.1)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        starts = torch.randint(0, stream.numel() - seq_len, (steps, batch_size),
                               generator=torch.Generator().manual_seed(seed))
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, model, optimizer, params, state)
        state.setdefault("lm_losses", [])
        if output_dir is not None and state["step"]:
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
                saved = json.load(fh)
            state["lm_losses"], state["shorten_factors"] = saved["lm_losses"], saved["shorten_factors"]
        learned = reduction is not None and reduction.boundaries == "learned"
        device = next(model.parameters()).device
        model.train()
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train token_pooling", disable=not progress)
        for step in range(state["step"], steps):
            rows = starts[step][:, None] + torch.arange(seq_len)[None, :]
            ids = torch.cat([torch.full((batch_size, 1), BYTE_BOS_ID), stream[rows]], dim=1).to(device)
            factor = (step + 1) / warmup if step < warmup else \
                0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            out = model(input_ids=ids, labels=ids)
            loss = out.loss
            if reduction is not None:
                record = last_pooling(model)
                state["shorten_factors"].append(round(record.shorten_factor, 4))
                if learned and prior_weight > 0:
                    loss = loss + prior_weight * record.prior_loss()
            state["lm_losses"].append(round(out.loss.item(), 6))
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, model, save_every, steps, max_grad_norm)
            bar.set_postfix(loss=f"{state['lm_losses'][-1]:.3f}")  # the language-model loss, without the prior
        bar.close()
        model.eval()
        if output_dir is not None:
            save_trained(output_dir, model, None, STATE_NAME, state, _card(state, fingerprint["reduction"]))
    finally:
        torch.random.set_rng_state(rng_state)
    model.train_losses = list(state["losses"])
    model.train_state = state
    return model


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train token_pooling`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "token_pooling"]).boundaries
        'whitespace'
    """
    from ..cli import _float_in, _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "token_pooling", help="a byte-level hourglass decoder (Dynamic Token "
                              "Pooling) trained from scratch", description=DESCRIPTION,
                              output="token-pooling-BOUNDARIES", steps=300)
    train.add_argument("--boundaries", choices=BOUNDARY_CHOICES, default="whitespace",
                       help="segment ends: whitespace bytes, a learned predictor, or none (the unpooled baseline)")
    train.add_argument("--rate", type=_float_in(0.01, 1.0), default=0.2,
                       help="boundary rate, 1 / shorten factor: the learned predictor's prior (default: 0.2)")
    train.add_argument("--layers", type=_positive_int, default=8, help="decoder layers (default: 8: 2, 4 pooled, 2)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train, save and report held-out bits per byte (default corpus)."""
    from ..cli import _log
    from ..training import stdlib_corpus
    from . import recipe_output, recipe_texts

    texts = recipe_texts(args)
    output = recipe_output(args, f"token-pooling-{args.boundaries}")
    reduction = default_reduction(args.boundaries, rate=args.rate)
    if reduction is not None:
        reduction.pooled_layers(args.layers)  # a clear error for a depth below pre + post before training
    _log(f"token_pooling: {args.steps} steps of a {args.layers}-layer byte-level decoder "
         f"({'unpooled' if reduction is None else args.boundaries + ' boundaries'}) on {len(texts)} paragraphs")
    model = train_token_pooling(texts, reduction=reduction, layers=args.layers, steps=args.steps, seed=args.seed,
                                output_dir=output, progress=not args.no_progress)
    print(f"saved to {output}: LlamaForCausalLM.from_pretrained({output!r})")
    if not args.corpus:
        print(f"held-out bits per byte: {bits_per_byte(model, stdlib_corpus('heldout')):.4f}")
    return 0


__all__ = ["bits_per_byte", "byte_lm_config", "byte_stream", "default_reduction", "train_token_pooling"]
