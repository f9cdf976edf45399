"""``hf-tokred train token_dropping``: continued MLM pretraining with Token Dropping (arXiv 2203.13240).

The recipe itself is :func:`train_token_dropping` (also ``hf_tokred.training.train_token_dropping``): a plain
PyTorch loop of masked language modelling in which the middle blocks run on the hard tokens only and the
importance table is updated from every step's per-token losses. :class:`TokenDroppingCallback` does the table
update for a ``transformers.Trainer`` run instead. :func:`minilm_mlm` builds the masked-LM model the recipe
starts from by default: the embedded all-MiniLM-L6-v2 encoder with a new MLM head.

Example:
    >>> from hf_tokred.training import stdlib_corpus, train_token_dropping
    >>> model = train_token_dropping(None, stdlib_corpus("train"), steps=200, output_dir="minilm-td")  # doctest: +SKIP
    >>> # minilm-td/ is a plain BertForMaskedLM checkpoint (the reduction was only used for training)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import torch
from transformers import TrainerCallback

from ..errors import ConfigError, TokenReductionError
from . import mean_ends

STATE_NAME = "token_dropping_training.json"
MASK_RATE = 0.15

DESCRIPTION = """\
token_dropping: continued masked-language-model pretraining of the embedded all-MiniLM-L6-v2 (a BertModel,
given an MLM head tied to its word embeddings) in which the middle blocks see only the tokens whose ids have
the highest running MLM loss (Token Dropping, arXiv 2203.13240). The output folder is a plain
BertForMaskedLM checkpoint (its encoder is a sentence encoder again: mean-pool its last hidden state); with
--keep-reduction the reduction and its importance table stay attached (token_reduction.safetensors).

examples:
  hf-tokred train token_dropping                        ~3 min on 2 CPU cores (200 steps of 16 x 128 tokens)
  hf-tokred train token_dropping --corpus my_docs.txt --steps 1000 --keep 0.5 --output ./minilm-td
"""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                special_ids, generator: torch.Generator, rate: float = MASK_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``rate`` of the real, non-special tokens get a label; of those 80 % become ``[MASK]``,
    10 % a random token, 10 % stay. Returns ``(masked input_ids, labels)`` (labels -100 where unlabelled); every
    row with a maskable token gets at least one label. Deterministic for a given ``generator``.

    Example:
        >>> import torch
        >>> ids, labels = mask_tokens(torch.tensor([[101, 7, 8, 9, 102]]), torch.ones(1, 5, dtype=torch.long),
        ...                           mask_token_id=103, vocab_size=200, special_ids=[101, 102, 103],
        ...                           generator=torch.Generator().manual_seed(0))
        >>> int((labels != -100).sum()) >= 1 and labels[0, 0].item() == -100
        True
    """
    special = torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype))
    maskable = attention_mask.bool() & ~special
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = (draw < rate) & maskable
    # A row without any label would give nothing to learn from: label its maskable token of smallest draw.
    empty = ~chosen.any(dim=1) & maskable.any(dim=1)
    if bool(empty.any()):
        first = draw.masked_fill(~maskable, 2.0).argmin(dim=1)
        chosen[empty, first[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = input_ids.clone()
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), masked)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


def tokenize_chunks(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Every text as token ids (with ``[CLS]``/``[SEP]``), cut into chunks of at most ``max_length`` tokens.

    Example:
        >>> chunks = tokenize_chunks(["A short text."], tokenizer, 128)           # doctest: +SKIP
        >>> chunks[0][0] == tokenizer.cls_token_id                              # doctest: +SKIP
        True
    """
    first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
    if first is None or last is None:
        raise ConfigError("tokenizer: a masked-LM tokenizer with CLS and SEP tokens is needed", field="tokenizer")
    body = max_length - 2
    chunks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            chunks.append([first, *ids[start:start + body], last])
    return chunks


def collate(chunks: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of a list of token-id lists."""
    length = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), length), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        ids[row, :len(chunk)] = torch.tensor(chunk)
        mask[row, :len(chunk)] = 1
    return ids, mask


def special_ids(tokenizer) -> list[int]:
    """The tokenizer's special ids (``[CLS]``, ``[SEP]``, ``[MASK]``, ``[PAD]``, ``[UNK]``): never masked, never dropped."""
    return sorted(set(int(i) for i in tokenizer.all_special_ids))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def masked_logits_only(model, labelled: torch.Tensor):
    """Within this block the model's output projection (``get_output_embeddings()``, the vocabulary decoder) runs
    only at the ``labelled`` positions ``(B, N)``: ``logits`` come back as ``(M, vocab)`` for the ``M`` labelled
    tokens in row-major order. The vocabulary projection is the largest matrix of a small MLM (MiniLM's costs as
    much as its six blocks), and the loss needs it only there (BERT's own pretraining code does the same).

    Example:
        >>> with masked_logits_only(model, labels != -100):                           # doctest: +SKIP
        ...     logits = model(input_ids=ids, attention_mask=mask).logits              # (M, vocab)
    """
    decoder = model.get_output_embeddings()
    if decoder is None:
        raise TokenReductionError(f"{type(model).__name__} has no output embeddings (vocabulary decoder): token "
                                  "dropping trains a masked language model (BertForMaskedLM, RobertaForMaskedLM, ...)")

    def select(module, args):
        hidden = args[0]
        return (hidden[labelled.to(hidden.device)], *args[1:])

    handle = decoder.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def minilm_mlm(texts: list[str] | None = None, *, max_length: int = 128, seed: int = 0, fit_chunks: int = 128):
    """``(BertForMaskedLM, tokenizer)``: the embedded all-MiniLM-L6-v2 with a new masked-LM head.

    The sentence-transformers checkpoint ships no MLM head: the decoder is tied to the word embeddings (bias 0)
    and the head's transform (``Linear(384, 384)``, GELU, LayerNorm) is initialised by ridge regression of the
    final hidden states of masked positions onto their tokens' word embeddings, over ``fit_chunks`` masked chunks
    of ``texts`` (a few seconds; the held-out MLM loss starts near 7.5 instead of 11 for a random transform).
    Without ``texts`` the transform is the identity. Deterministic for a given ``seed``.

    Example:
        >>> from hf_tokred.training import stdlib_corpus
        >>> model, tokenizer = minilm_mlm(stdlib_corpus("train"))                    # doctest: +SKIP
    """
    from transformers import AutoTokenizer, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    from ..embedded import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing head weights are expected: we build the head here
    try:
        model = BertForMaskedLM.from_pretrained(path, attn_implementation="sdpa", token_reduction=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    head = model.cls.predictions
    with torch.no_grad():
        head.decoder.weight = model.bert.embeddings.word_embeddings.weight
        head.bias.zero_()
        head.transform.dense.weight.copy_(torch.eye(head.transform.dense.weight.shape[0]))
        head.transform.dense.bias.zero_()
        head.transform.LayerNorm.reset_parameters()
        if texts:
            generator = torch.Generator().manual_seed(seed)
            chunks = tokenize_chunks(list(texts), tokenizer, max_length)[:fit_chunks]
            states, targets = [], []
            for start in range(0, len(chunks), 16):
                ids, mask = collate(chunks[start:start + 16], tokenizer.pad_token_id)
                masked, labels = mask_tokens(ids, mask, mask_token_id=tokenizer.mask_token_id,
                                             vocab_size=model.config.vocab_size, special_ids=special_ids(tokenizer),
                                             generator=generator)
                hidden = model.bert(input_ids=masked, attention_mask=mask).last_hidden_state
                states.append(hidden[labels != -100])
                targets.append(labels[labels != -100])
            x = torch.cat([torch.cat(states), torch.ones(sum(len(s) for s in states), 1)], dim=1).double()
            y = model.bert.embeddings.word_embeddings.weight[torch.cat(targets)].double()
            solution = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
            head.transform.dense.weight.copy_(solution[:-1].T.float())
            head.transform.dense.bias.copy_(solution[-1].float())
    model.name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Trainer integration
# ---------------------------------------------------------------------------------------------


class TokenDroppingCallback(TrainerCallback):
    """A ``transformers.Trainer`` callback that keeps a token-dropping model's importance table up to date.

    At ``on_train_begin`` it installs :func:`~hf_tokred.integration.token_dropping.track_importance` on the
    trained model: every training-mode forward pass with ``labels`` (the Trainer's own ``compute_loss``, with
    ``DataCollatorForLanguageModeling`` batches) folds its per-token MLM losses, computed from the output logits,
    into the table; evaluation passes change nothing. No ``compute_loss`` override is needed: the per-token
    losses come from the logits the model returns anyway (one extra cross-entropy over the labelled positions,
    without gradients). The hook is removed at ``on_train_end``.

    Example:
        >>> import hf_tokred
        >>> from transformers import DataCollatorForLanguageModeling, Trainer
        >>> hf_tokred.apply(mlm, {"method": "token_dropping", "keep": 0.5,                       # doctest: +SKIP
        ...                       "keep_ids": tokenizer.all_special_ids})
        >>> trainer = Trainer(model=mlm, args=args, train_dataset=data,                           # doctest: +SKIP
        ...                   data_collator=DataCollatorForLanguageModeling(tokenizer),
        ...                   callbacks=[TokenDroppingCallback()])
        >>> trainer.train(); hf_tokred.remove(mlm); mlm.save_pretrained("out")                   # doctest: +SKIP
    """

    def __init__(self):
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..integration.token_dropping import track_importance

        if model is None:
            raise TokenReductionError("TokenDroppingCallback: the Trainer passed no model to the callback")
        self.on_train_end(args, state, control)
        self.handle = track_importance(model)

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def _fingerprint(chunks: list[list[int]], **settings) -> dict:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(json.dumps(chunk).encode("utf-8"))
    return {"data_sha256": digest.hexdigest(), **settings}


def _model_card(name: str, state: dict, easiest: list[str]) -> str:
    fp = state["fingerprint"]
    losses = state["losses"]
    final = mean_ends(losses)[1]
    dropping = fp["dropping"]
    how = (f"Token Dropping (Hou et al., arXiv 2203.13240): blocks {fp['drop_layer']} .. {fp['restore_layer'] - 1} "
           f"saw only the hard tokens (keep {fp['keep']} of the droppable tokens, ranked by the running MLM loss of "
           "their ids); the first and the last block saw every token" if dropping else "no token dropping (baseline)")
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags:
- token-dropping
- hf_tokred
---

# Continued MLM pretraining of `{name}` (hf_tokred)

A `BertForMaskedLM` continued-pretrained with masked language modelling (15 % of tokens, 80/10/10) by
`hf_tokred.training.train_token_dropping`; {how}. The checkpoint is an ordinary model: load it with
`AutoModelForMaskedLM` / `AutoModel` (mean-pool the last hidden state for sentence embeddings).

## Training

- data: {state["chunks"]} chunks of at most {fp["max_length"]} tokens ({state["tokens"]} tokens)
- steps: {state["step"]}, batch size {fp["batch_size"]}, learning rate {fp["lr"]} ({fp["lr_schedule"]}), weight decay {fp["weight_decay"]}, seed {fp["seed"]}
- final training MLM loss (mean of the last {min(10, len(losses))} steps): {final:.4f}
- tokens kept in the middle blocks (mean over steps): {state["kept_fraction"]:.3f}
- easiest tokens by the importance table: {", ".join(f"`{t}`" for t in easiest) or "-"}
- data fingerprint (SHA-256 of the token ids): `{fp["data_sha256"]}`

`checkpoint/` (optimizer state, for resuming) is not needed for inference.
"""


def _check_settings(**checks) -> None:
    for name, (value, ok) in checks.items():
        if not ok:
            raise ConfigError(f"{name}: got {value!r}; see train_token_dropping's docstring for the allowed values",
                              field=name)


def train_token_dropping(model=None, texts=None, *, tokenizer=None, keep: float = 0.5, drop_layer: int | None = None,
                         restore_layer: int | None = None, dropping: bool = True, steps: int = 200, lr: float = 5e-5,
                         batch_size: int = 16, max_length: int = 128, seed: int = 0, lr_schedule: str = "linear",
                         weight_decay: float = 0.01, max_grad_norm: float = 1.0, output_dir=None, resume: bool = True,
                         save_every: int = 50, keep_reduction: bool = False, progress: bool = True):
    """Continue the MLM pretraining of ``model`` on ``texts`` with Token Dropping (arXiv 2203.13240); returns the model.

    ``model`` is a masked LM (``BertForMaskedLM``, ``RobertaForMaskedLM``, ``DistilBertForMaskedLM``; with
    ``tokenizer``) or None for the embedded all-MiniLM-L6-v2 with a new MLM head (:func:`minilm_mlm`, fitted on
    ``texts``). ``texts`` is a list of strings (None: the standard-library text, training split), tokenized
    and cut into chunks of at most ``max_length`` tokens. Unless the model already carries a ``token_dropping``
    reduction, one is attached with ``keep``, ``drop_layer``, ``restore_layer`` and ``keep_ids`` = the tokenizer's
    special ids. ``dropping=False`` trains the same way without it (the baseline).

    A plain PyTorch loop: each step draws ``batch_size`` chunks (a fresh seeded order every pass), masks 15 % of
    their tokens (80 % ``[MASK]``, 10 % random, 10 % unchanged; seeded per step), runs the model in training mode
    (dropout on) with the masked positions kept through the middle blocks, computes the vocabulary logits only at
    the masked positions (:func:`masked_logits_only`), steps AdamW (``lr`` with a ``lr_schedule`` decay, decoupled
    ``weight_decay`` on matrices, gradients clipped to ``max_grad_norm``) on the mean loss, and folds the
    per-token losses into the importance table. Everything is seeded (``seed``; the global RNG is restored
    afterwards); a tqdm bar shows the loss (``progress``). Every model parameter trains (the table is a buffer).

    With ``output_dir``, every ``save_every`` steps and at the end a checkpoint (weights, table, AdamW moments, RNG
    state in safetensors; step and losses in JSON) goes to ``output_dir/checkpoint``, and with ``resume`` a later
    call with the same data and settings continues from it exactly. The finished model is saved with
    ``save_pretrained`` — by default **without** the reduction (a plain checkpoint, as the paper intends; the
    returned model is plain too), with ``keep_reduction=True`` with it attached (its table in
    ``token_reduction.safetensors``) — plus the tokenizer, ``token_dropping_training.json`` and a model card.
    The returned model is in eval mode; ``model.train_losses`` holds every step's loss, ``model.kept_fraction`` the
    mean fraction of the real tokens the middle blocks saw, ``model.step_seconds`` the wall time of this call's steps
    (checkpoint saves included).

    Example:
        >>> from hf_tokred.training import stdlib_corpus, train_token_dropping
        >>> model = train_token_dropping(None, stdlib_corpus("train"), steps=200, output_dir="minilm-td")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .. import apply, remove
    from ..integration.token_dropping import importance_table, keep_positions, last_drop, mlm_token_losses
    from ..integration.wiring import get_applied
    from ..training import (
        LR_SCHEDULES,
        _prepare_checkpoint,
        _resumable_step,
        decay_groups,
        lr_factor,
        save_trained,
        stdlib_corpus,
    )

    if texts is None:
        texts = stdlib_corpus("train")
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts or \
            not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts: expected a non-empty list of strings", field="texts")
    _check_settings(steps=(steps, isinstance(steps, int) and steps >= 1),
                    lr=(lr, isinstance(lr, (int, float)) and lr > 0),
                    batch_size=(batch_size, isinstance(batch_size, int) and batch_size >= 1),
                    max_length=(max_length, isinstance(max_length, int) and max_length >= 8),
                    seed=(seed, isinstance(seed, int)),
                    save_every=(save_every, isinstance(save_every, int) and save_every >= 1),
                    weight_decay=(weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0),
                    max_grad_norm=(max_grad_norm, isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0),
                    lr_schedule=(lr_schedule, lr_schedule in LR_SCHEDULES))

    rng_state = torch.random.get_rng_state()
    try:
        if model is None:
            model, tokenizer = minilm_mlm(texts, max_length=max_length, seed=seed)
        elif tokenizer is None:
            raise ConfigError("tokenizer: pass the tokenizer of the model you train", field="tokenizer")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ConfigError("tokenizer: a masked-LM tokenizer with mask and pad tokens is needed", field="tokenizer")
        if model.get_output_embeddings() is None:
            raise TokenReductionError(f"train_token_dropping: {type(model).__name__} has no vocabulary decoder; pass a "
                                      "masked LM (BertForMaskedLM, RobertaForMaskedLM, DistilBertForMaskedLM)")
        applied = get_applied(model)
        attached = applied is not None and applied.config.get("sequence") is not None and \
            applied.config.get("sequence").method == "token_dropping"
        if dropping and not attached:
            apply(model, {"method": "token_dropping", "keep": keep, "drop_layer": drop_layer,
                          "restore_layer": restore_layer, "keep_ids": special_ids(tokenizer)})
        elif not dropping and applied is not None:
            raise TokenReductionError("train_token_dropping: dropping=False trains the plain model; remove the "
                                      "reduction first (hf_tokred.remove(model))")
        reducer = get_applied(model).config.get("sequence") if dropping else None
        name = getattr(model, "name_or_path", None) or type(model).__name__
        chunks = tokenize_chunks(list(texts), tokenizer, max_length)
        if not chunks:
            raise ConfigError("texts: no tokens in the texts", field="texts")
        blocks = None if reducer is None else len(get_applied(model).adapter.blocks(model))
        layers = reducer.layers(blocks) if reducer is not None else (None, None)
        fingerprint = _fingerprint(chunks, base=name, dropping=bool(dropping),
                                   keep=reducer.keep if reducer is not None else None, drop_layer=layers[0],
                                   restore_layer=layers[1], lr=lr, batch_size=batch_size, max_length=max_length,
                                   seed=seed, lr_schedule=lr_schedule, weight_decay=weight_decay,
                                   max_grad_norm=max_grad_norm)
        state = {"step": 0, "losses": [], "kept": [], "fingerprint": fingerprint, "chunks": len(chunks),
                 "tokens": sum(len(c) for c in chunks)}
        groups, params = decay_groups(model.parameters(), weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr)
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, model, optimizer, params, state)
        state.setdefault("kept", [])
        if output_dir is not None and os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
                state["kept"] = json.load(fh).get("kept", [])[: state["step"]]
        order: list[int] = []
        generator = torch.Generator().manual_seed(seed)
        while len(order) < steps * batch_size:
            order += torch.randperm(len(chunks), generator=generator).tolist()
        specials = special_ids(tokenizer)
        device = next(model.parameters()).device
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train token_dropping", disable=not progress)
        seconds = []
        model.train()
        for step in range(state["step"], steps):
            started = time.perf_counter()
            ids, mask = collate([chunks[i] for i in order[step * batch_size:(step + 1) * batch_size]],
                                tokenizer.pad_token_id)
            masked, labels = mask_tokens(ids, mask, mask_token_id=tokenizer.mask_token_id,
                                         vocab_size=model.config.vocab_size, special_ids=specials,
                                         generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
            masked, mask, labels = masked.to(device), mask.to(device), labels.to(device)
            labelled = labels != -100
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(lr_schedule, step, steps)
            keeping = keep_positions(model, labelled) if dropping else contextlib.nullcontext()
            with keeping, masked_logits_only(model, labelled):
                logits = model(input_ids=masked, attention_mask=mask).logits
            token_ids, losses = mlm_token_losses(logits, labels[labelled])
            loss = losses.mean()
            if dropping:
                importance_table(model).update(token_ids, losses)
                kept = last_drop(model).kept.sum() / mask.sum() if reducer.keep < 1.0 else torch.tensor(1.0)
            else:
                kept = torch.tensor(1.0)
            state["kept"].append(round(float(kept), 4))
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, model, save_every, steps,
                            max_grad_norm=max_grad_norm)
            seconds.append(time.perf_counter() - started)
        bar.close()
        model.eval()
        for parameter in model.parameters():
            parameter.grad = None
        state["kept_fraction"] = sum(state["kept"]) / max(len(state["kept"]), 1)
        easiest = []
        if dropping:
            table = importance_table(model)
            seen = (table.count > 0).nonzero().flatten()
            if seen.numel():
                order_seen = seen[table.loss[seen].argsort()[:10]]
                easiest = [str(t) for t in tokenizer.convert_ids_to_tokens(order_seen.tolist())]
            if not keep_reduction:
                remove(model)
        if output_dir is not None:
            save_trained(output_dir, model, tokenizer, STATE_NAME, state, _model_card(name, state, easiest))
    finally:
        torch.random.set_rng_state(rng_state)
    model.train_losses = list(state["losses"])
    model.kept_fraction = state["kept_fraction"]
    model.step_seconds = seconds
    return model


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train token_dropping`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "token_dropping"]).keep
        0.5
    """
    from ..cli import _float_in
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "token_dropping", help="continued MLM pretraining of all-MiniLM-L6-v2 "
                              "with Token Dropping", description=DESCRIPTION, output="minilm-token-dropping", steps=200)
    train.add_argument("--keep", type=_float_in(0.01, 1.0), default=0.5,
                       help="fraction of the droppable tokens the middle blocks keep (default: 0.5)")
    train.add_argument("--keep-reduction", action="store_true",
                       help="save the model with the reduction and its importance table attached")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train on the corpus and save the model (a plain BertForMaskedLM unless --keep-reduction)."""
    from ..cli import _log
    from . import recipe_output, recipe_texts

    texts = recipe_texts(args)
    output = recipe_output(args, "minilm-token-dropping")
    _log(f"token_dropping: {len(texts)} paragraphs, {args.steps} steps at keep {args.keep}")
    model = train_token_dropping(None, texts, keep=args.keep, steps=args.steps, seed=args.seed, output_dir=output,
                                 keep_reduction=args.keep_reduction, progress=not args.no_progress)
    print(f"saved to {output}: final loss {mean_ends(model.train_losses)[1]:.4f}, "
          f"{model.kept_fraction:.1%} of the tokens in the middle blocks; load it with "
          f"AutoModelForMaskedLM.from_pretrained({output!r})")
    return 0


__all__ = ["TokenDroppingCallback", "masked_logits_only", "mask_tokens", "minilm_mlm", "train_token_dropping"]
