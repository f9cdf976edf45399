"""EAGLE's recipe (arXiv 2401.15077): train the draft head on the target model's own features.

* Data: the dense model's own greedy answers to training-split instruction prompts
  (:func:`~hf_tokred.recipes.lm_data.dense_generations`, cached in JSON) as chat sequences (prompt + answer), plus
  windows of training-split text (:func:`~hf_tokred.recipes.lm_data.token_windows`). Self-distillation: the
  draft learns what the model itself writes.
* Draft vocabulary: the ``draft_vocab`` most frequent token ids of that data (answers counted ten times, as they
  are what the draft must write), special tokens always included (FR-Spec).
* Features: the target's last hidden state (the input of its LM head) of every training token, computed once and
  cached in ``data_dir`` (safetensors, keyed by the data and the model's fingerprint).
* Loss (the paper's): smooth L1 between the head's predicted feature and the target's next feature, plus 0.1 x the
  cross-entropy of the draft distribution (target LM head over the draft vocabulary) against the target's next-token
  distribution over the same vocabulary; features get uniform noise U(-0.1, 0.1). Chat sequences count from the
  last prompt token on (the predictions made while answering); text windows count everywhere.

``hf-tokred train eagle`` runs it on the embedded SmolLM2-135M-Instruct and saves the model folder (the base weights
in ``model.safetensors``, the head in ``token_reduction.safetensors``) with a model card.

Example:
    >>> from hf_tokred.embedded import load_smollm2
    >>> from hf_tokred.training import train_eagle
    >>> model, tokenizer = load_smollm2()                                                  # doctest: +SKIP
    >>> model = train_eagle(model, tokenizer, steps=300, output_dir="smollm2-eagle")       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import torch

from ..errors import ConfigError

TRAINING_STATE = "eagle_training.json"
DATA_FOLDER = "eagle-data"  # under hf_tokred.embedded.cache_dir(): the cached answers and features
PROMPT_CHUNK = 160  # prompts per cached file of dense answers
ANSWER_WEIGHT = 10  # how many times an answer token counts in the draft vocabulary's frequencies
DESCRIPTION = """\
Train EAGLE's draft head (arXiv 2401.15077) for the embedded SmolLM2-135M-Instruct: one decoder layer of the
model's own architecture over [feature, next token embedding], trained on the model's own greedy answers to
training-split instruction prompts and on training-split text windows (features computed once and cached).
Use it with model.generate(..., assistant_model=eagle_assistant(model)); measure it with
`hf-tokred learned-lm eagle`."""


def eagle_sequences(model, tokenizer, *, prompts: int = 160, max_new_tokens: int = 128, windows: int = 32,
                    window_length: int = 256, seed: int = 0, data_dir=None,
                    progress: bool = True) -> list[dict]:
    """The training sequences: ``{"input_ids": [...], "start": k}`` where predictions count from position ``k``.

    ``prompts`` training-split instruction prompts (drawn with ``seed``) as chats followed by the dense model's
    greedy answer (``max_new_tokens`` at most; cached per :data:`PROMPT_CHUNK` prompts in ``data_dir``, default
    ``~/.cache/hf_tokred/eagle-data``; ``data_dir=False``: no cache), then ``windows`` text windows of
    ``window_length`` tokens.

    Example:
        >>> seqs = eagle_sequences(model, tokenizer, prompts=8, windows=4)                   # doctest: +SKIP
    """
    from .lm_data import chat_ids, dense_generations, instruction_prompts, lm_texts, token_windows

    data_dir = _data_dir(data_dir)
    sequences = []
    if prompts:
        texts = instruction_prompts("train", prompts, seed=seed)
        answers = []
        for start in range(0, len(texts), PROMPT_CHUNK):  # cached per chunk: more prompts reuse the earlier answers
            name = "dense_answers.json" if start == 0 else f"dense_answers_{start // PROMPT_CHUNK}.json"
            answers += dense_generations(model, tokenizer, texts[start:start + PROMPT_CHUNK],
                                         max_new_tokens=max_new_tokens, batch_size=16, progress=progress,
                                         cache_file=os.path.join(data_dir, name) if data_dir else None)
        for text, answer in zip(texts, answers):
            ids = chat_ids(tokenizer, text)
            sequences.append({"input_ids": list(ids) + list(answer), "start": max(len(ids) - 2, 0),
                              "answer": len(answer)})
    if windows:
        for row in token_windows(tokenizer, lm_texts("train"), window_length, count=windows, seed=seed).tolist():
            sequences.append({"input_ids": row, "start": 0, "answer": 0})
    return sequences


def _data_dir(data_dir) -> str | None:
    if data_dir is False:
        return None
    if data_dir is None:
        from ..embedded import cache_dir

        return os.path.join(cache_dir(), DATA_FOLDER)
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def draft_vocabulary(tokenizer, sequences: list[dict], count: int, vocab_size: int) -> torch.Tensor:
    """The ``count`` most frequent ids of ``sequences`` (answers counted :data:`ANSWER_WEIGHT` times), special
    tokens always included."""
    from ..methods.lm.eagle import frequent_tokens

    ids = []
    for seq in sequences:
        ids.extend(seq["input_ids"])
        if seq["answer"]:
            ids.extend(seq["input_ids"][-seq["answer"]:] * (ANSWER_WEIGHT - 1))
    always = [int(t) for t in getattr(tokenizer, "all_special_ids", [])]
    return frequent_tokens(torch.tensor(ids, dtype=torch.long), count, vocab_size, always=always)


@torch.no_grad()
def target_features(model, sequences: list[dict], *, cache_file=None, progress: bool = True) -> list[torch.Tensor]:
    """The target's last hidden state (the input of its LM head) of every token of every sequence (float32, CPU),
    cached in ``cache_file`` (safetensors keyed by the sequences and the model's fingerprint)."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ..methods.lm.eagle import base_signature
    from ..model_patches import find_adapter

    digest = hashlib.sha256(json.dumps([s["input_ids"] for s in sequences]).encode())
    digest.update(base_signature(model, find_adapter(model)).numpy().tobytes())
    key = digest.hexdigest()
    if cache_file is not None and os.path.isfile(cache_file):
        from safetensors import safe_open

        with safe_open(cache_file, "pt") as fh:
            stored = (fh.metadata() or {}).get("key")
        if stored == key:
            tensors = load_file(cache_file)
            return [tensors[f"f{i}"] for i in range(len(sequences))]
    device = model.get_input_embeddings().weight.device
    features = []
    for seq in tqdm(sequences, desc="target features", disable=not progress):
        ids = torch.tensor([seq["input_ids"]], device=device)
        out = model(input_ids=ids, output_hidden_states=-1, use_cache=False, logits_to_keep=1)
        features.append(out.hidden_states[-1][0].float().cpu().contiguous())
    if cache_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
        save_file({f"f{i}": f for i, f in enumerate(features)}, cache_file, metadata={"key": key})
    return features


def _batch(sequences, features, indices, device):
    length = max(len(sequences[i]["input_ids"]) for i in indices)
    hidden = features[indices[0]].shape[-1]
    ids = torch.zeros(len(indices), length, dtype=torch.long)
    feats = torch.zeros(len(indices), length, hidden)
    weight = torch.zeros(len(indices), length - 1)
    for row, i in enumerate(indices):
        n = len(sequences[i]["input_ids"])
        ids[row, :n] = torch.tensor(sequences[i]["input_ids"])
        feats[row, :n] = features[i]
        weight[row, sequences[i]["start"]:n - 1] = 1.0
    return ids.to(device), feats.to(device), weight.to(device)


def train_eagle(model, tokenizer, *, reduction=None, depth: int = 6, top_k: int = 4, min_confidence: float = 0.25,
                draft_vocab: int = 8192, prompts: int = 160, max_new_tokens: int = 128, windows: int = 32,
                window_length: int = 256, steps: int = 300, batch_size: int = 4, lr: float = 1e-3,
                lr_schedule: str = "cosine", max_grad_norm: float = 0.5, noise: float | None = None, unroll: int = 1,
                init_from=None, seed: int = 0, data_dir=None, output_dir=None, resume: bool = True,
                save_every: int = 50, progress: bool = True):
    """Train EAGLE's draft head for ``model`` (a causal LM; returned with the reduction attached and trained).

    The reduction: ``reduction`` (an eagle config), else a fresh one with ``depth``, ``top_k``, ``min_confidence``
    and ``draft_vocab``; the base model's dimensions and name are recorded in it. The data
    (:func:`eagle_sequences`): ``prompts`` training prompts with the dense model's answers of up to
    ``max_new_tokens`` tokens and ``windows`` text windows of ``window_length`` tokens; the draft vocabulary is
    its most frequent tokens (:func:`draft_vocabulary`); the target's features are computed once
    (:func:`target_features`, cached in ``data_dir``). The loop: AdamW at ``lr`` with a ``lr_schedule`` decay,
    ``batch_size`` sequences per step in a seeded order, the paper's loss and feature noise (``noise``, default
    0.1), gradients clipped to ``max_grad_norm``; only the head trains. ``unroll`` > 1 adds training-time test
    (EAGLE-3, HASS; :func:`~hf_tokred.methods.lm.eagle.unrolled_features`): the loss is the mean over ``unroll``
    passes, pass ``d`` predicting from the head's own features ``d - 1`` steps back, as drafting ``d`` tokens ahead
    does. ``init_from`` (a folder saved by this recipe) continues training that head: its reduction settings and
    draft vocabulary are kept (``reduction``, ``depth``, ``top_k``, ``min_confidence``, ``draft_vocab`` are then
    not used). With ``output_dir``: checkpoints every
    ``save_every`` steps (resumed with ``resume``), then ``save_pretrained`` (the head goes to
    ``token_reduction.safetensors``), the tokenizer, ``eagle_training.json`` and a model card. Every step's loss is
    ``model.train_losses``.

    Example:
        >>> model = train_eagle(model, tokenizer, steps=300, output_dir="smollm2-eagle")     # doctest: +SKIP
        >>> model.generate(**inputs, assistant_model=eagle_assistant(model))                 # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .. import integration
    from ..config import TokenReductionConfig
    from ..integration.wiring import MODULES_ATTR, get_applied
    from ..methods.lm.eagle import FEATURE_NOISE, MODULE_NAME, EagleConfig, eagle_loss, unrolled_features
    from ..model_patches import find_adapter
    from ..model_patches.rope import _rotary_module
    from ..training import LR_SCHEDULES, _batch_order, _prepare_checkpoint, _resumable_step, lr_factor, save_trained

    for name, value in (("steps", steps), ("batch_size", batch_size), ("save_every", save_every), ("unroll", unroll)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected an int >= 1, got {value!r}", field=name)
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"lr: expected a positive number, got {lr!r}", field="lr")
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}",
                          field="lr_schedule")
    noise = FEATURE_NOISE if noise is None else float(noise)
    # the reduction first: a bad init_from or reduction fails before the model is touched or any data is built
    text = model.config.get_text_config(decoder=True)
    vocab = model.get_input_embeddings().num_embeddings
    if init_from is not None:
        init_from = os.path.abspath(os.path.expanduser(os.fspath(init_from)))
        cfg = TokenReductionConfig.from_pretrained(init_from)
        if not isinstance(cfg, EagleConfig):
            raise ConfigError(f"init_from: {init_from!r} holds a {cfg.method!r} reduction, not an eagle head",
                              field="init_from")
    elif reduction is not None:
        cfg = TokenReductionConfig.coerce(reduction)
        if not isinstance(cfg, EagleConfig):
            raise ConfigError(f"reduction: expected an eagle config, got {cfg.method!r}", field="reduction")
    else:
        cfg = EagleConfig(depth=depth, top_k=top_k, min_confidence=min_confidence, draft_vocab=draft_vocab)
    cfg.base_hidden_size, cfg.base_vocab_size = text.hidden_size, vocab
    cfg.base_num_layers = text.num_hidden_layers
    cfg.base_model = str(getattr(model, "name_or_path", "") or type(model).__name__)
    rng_state = torch.random.get_rng_state()
    try:
        if get_applied(model) is not None:
            integration.remove(model)
        sequences = eagle_sequences(model, tokenizer, prompts=prompts, max_new_tokens=max_new_tokens, windows=windows,
                                    window_length=window_length, seed=seed, data_dir=data_dir, progress=progress)
        if not sequences:
            raise ConfigError("prompts: expected some training data (prompts or windows > 0)", field="prompts")
        data_path = _data_dir(data_dir)
        features = target_features(model, sequences, progress=progress,
                                   cache_file=os.path.join(data_path, "features.safetensors") if data_path else None)
        integration.apply(model, cfg, weights_from=init_from)  # init_from: the head it holds (checked for this model)
        head = model._modules[MODULES_ATTR][MODULE_NAME]
        if cfg.draft_vocab and init_from is None:
            head.vocab_ids.copy_(draft_vocabulary(tokenizer, sequences, cfg.draft_vocab, vocab))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        params = [p for p in head.parameters()]
        for parameter in params:
            parameter.requires_grad_(True)
        adapter = find_adapter(model)
        rotary = _rotary_module(model, adapter, adapter.attention_modules(model)[0])
        embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        digest = hashlib.sha256(json.dumps([[s["input_ids"], s["start"]] for s in sequences]).encode()).hexdigest()
        fingerprint = {"data_sha256": digest, "reduction": cfg.to_dict(), "lr": lr, "batch_size": batch_size,
                       "seed": seed, "lr_schedule": lr_schedule, "max_grad_norm": max_grad_norm, "noise": noise}
        if unroll > 1:  # only when set, so checkpoints of runs without them still resume
            fingerprint["unroll"] = unroll
        if init_from is not None:
            fingerprint["init_from"] = init_from
        state = {"step": 0, "losses": [], "fingerprint": fingerprint, "sequences": len(sequences),
                 "tokens": sum(len(s["input_ids"]) for s in sequences), "seconds": 0.0,
                 "data": {"prompts": prompts, "max_new_tokens": max_new_tokens, "windows": windows,
                          "window_length": window_length}}
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, head, optimizer, params, state)
        if checkpoint is not None and state["step"] and os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
                state["seconds"] = float(json.load(fh).get("seconds", 0.0))  # the training time before the resume
        order = _batch_order(len(sequences), steps * batch_size, True, torch.Generator().manual_seed(seed))
        device = embed.weight.device
        was_training = model.training
        model.eval()
        head.train()
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train eagle", disable=not progress)
        start, first, before = time.perf_counter(), state["step"], state["seconds"]
        reg_sum = cls_sum = 0.0
        for step in range(state["step"], steps):
            indices = order[step * batch_size:(step + 1) * batch_size]
            ids, feats, weight = _batch(sequences, features, indices, device)
            feats = feats.to(head.fc.weight.dtype)
            inputs = feats[:, :-1] + (torch.rand_like(feats[:, :-1]) * 2 - 1) * noise
            length = inputs.shape[1]
            positions = torch.arange(length, device=device)[None].expand(ids.shape[0], -1)
            passes = unrolled_features(head, inputs, embed(ids[:, 1:]), rotary(inputs, positions), positions, unroll)
            target = feats[:, 1:]
            w_draft, b_draft = head.draft_weight(lm_head)
            with torch.no_grad():
                target_logits = torch.nn.functional.linear(target, w_draft, b_draft)
            loss = 0.0
            for d, predicted in enumerate(passes):  # pass d + 1 has no history before row d
                draft_logits = torch.nn.functional.linear(predicted, w_draft, b_draft)
                counted = weight if d == 0 else weight * (torch.arange(length, device=device) >= d)
                pass_loss, reg, cls = eagle_loss(predicted, target, draft_logits, target_logits, counted)
                loss = loss + pass_loss / len(passes)
                if d == 0:  # the logged parts are pass 1's (the paper's loss)
                    reg_sum, cls_sum = reg_sum + reg.item(), cls_sum + cls.item()
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(lr_schedule, step, steps)
            state["seconds"] = round(before + time.perf_counter() - start, 2)  # checkpointed with the step
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, head, save_every, steps,
                            max_grad_norm=max_grad_norm)
        bar.close()
        ran = max(steps - first, 1)
        state["seconds"] = round(before + time.perf_counter() - start, 2)
        state["last_reg"], state["last_cls"] = round(reg_sum / ran, 5), round(cls_sum / ran, 5)
        for parameter in params:
            parameter.requires_grad_(False)
        head.eval()
        model.train(was_training)
        if output_dir is not None:
            save_trained(output_dir, model, tokenizer, TRAINING_STATE, state, model_card(model, cfg, state))
    finally:
        torch.random.set_rng_state(rng_state)
    model.train_losses = list(state["losses"])
    model.eagle_training = state
    return model


def model_card(model, cfg, state: dict, figures: str = "") -> str:
    """The README.md of a trained head: what it is, the data, the budget, and ``figures`` (a measured table)."""
    base = cfg.base_model or getattr(model, "name_or_path", "") or type(model).__name__
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None
    losses = state["losses"]
    final = sum(losses[-20:]) / max(len(losses[-20:]), 1)
    fp, data = state["fingerprint"], state["data"]
    unroll = fp.get("unroll", 1)
    unrolled = f", averaged over {unroll} passes of training-time test (EAGLE-3, HASS)" if unroll > 1 else ""
    continued = (f"\n- continued from the head in `{fp['init_from']}` (its own card gives its earlier training)"
                 if fp.get("init_from") else "")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- eagle
- speculative-decoding
- hf_tokred
{f"base_model: {base}{chr(10)}" if hub_id else ""}---
# EAGLE draft head for `{base}` (hf_tokred)

An EAGLE draft head (Li et al., arXiv 2401.15077): `fc` (2h -> h) over [feature, next token embedding] and one
decoder layer of the model's own architecture, drafting with the model's own embedding and LM head over its
{cfg.draft_vocab or "full"}-token draft vocabulary. `model.safetensors` holds the unchanged base model; the head is
in `token_reduction.safetensors` (loaded by `hf_tokred`; a process without it loads the plain base model).

```python
import hf_tokred
from transformers import AutoModelForCausalLM
from hf_tokred import eagle_assistant
model = AutoModelForCausalLM.from_pretrained("<this folder>")          # the head is re-attached
out = model.generate(**inputs, max_new_tokens=256, assistant_model=eagle_assistant(model))  # batch 1
# where answers copy from their prompt: lookup drafts where the context repeats, the head's elsewhere
out = model.generate(**inputs, max_new_tokens=256, assistant_model=eagle_assistant(model), prompt_lookup_num_tokens=10)
```

Greedy outputs are the model's own greedy outputs; sampling keeps its distribution.

## Training (`hf_tokred.training.train_eagle`)
- data: {data["prompts"]} training-split instruction prompts (`hf_tokred.recipes.lm_data.instruction_prompts`) with
  the dense model's greedy answers (up to {data["max_new_tokens"]} tokens), and {data["windows"]} windows of
  {data["window_length"]} training-split text tokens: {state["sequences"]} sequences, {state["tokens"]} tokens
- steps: {state["step"]} x {fp["batch_size"]} sequences, AdamW lr {fp["lr"]} ({fp["lr_schedule"]}), gradient clip
  {fp["max_grad_norm"]}, feature noise U(-{fp["noise"]}, {fp["noise"]}), seed {fp["seed"]}
- loss: smooth L1 on features + 0.1 x cross-entropy against the target's next-token distribution{unrolled}; last 20
  steps' mean {final:.4f}{continued}
- wall time: {state["seconds"]:.0f} s of training on a shared CPU (after data generation)
- settings: depth {cfg.depth}, top_k {cfg.top_k}, min_confidence {cfg.min_confidence}

{figures}
"""


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train eagle`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "eagle"]).prompts
        160
    """
    from ..cli import _float_in, _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "eagle", help="EAGLE's draft head for SmolLM2 (speculative decoding)",
                              description=DESCRIPTION, output="smollm2-eagle", steps=300, corpus=False)
    train.add_argument("--prompts", type=_positive_int, default=160,
                       help="training prompts answered by the dense model (default: 160; answers cached)")
    train.add_argument("--windows", type=int, default=32, help="training text windows of 256 tokens (default: 32)")
    train.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per step (default: 4)")
    train.add_argument("--lr", type=_float_in(1e-7, 1.0), default=1e-3, help="learning rate (default: 1e-3)")
    train.add_argument("--draft-vocab", type=int, default=8192,
                       help="draft vocabulary: most frequent training tokens (default: 8192; 0 = all)")
    train.add_argument("--unroll", type=_positive_int, default=1,
                       help="training-time test: also train the head on its own predictions this many steps deep "
                            "(EAGLE-3, HASS; default: 1 = the paper's single step)")
    train.add_argument("--init-from", metavar="DIR",
                       help="continue training the head saved in DIR (by this command) instead of a fresh one")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train the head on the embedded SmolLM2 and save it."""
    from ..cli import _log
    from ..embedded import load_smollm2
    from . import recipe_output

    model, tokenizer = load_smollm2()
    output = recipe_output(args, "smollm2-eagle")
    _log(f"eagle: {args.prompts} prompts + {args.windows} windows, {args.steps} steps of {args.batch_size}")
    train_eagle(model, tokenizer, prompts=args.prompts, windows=args.windows, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, draft_vocab=args.draft_vocab, unroll=args.unroll,
                init_from=args.init_from, seed=args.seed,
                output_dir=output, progress=not args.no_progress)
    print(f"saved to {output}: AutoModelForCausalLM.from_pretrained({output!r}) re-attaches the head; "
          "measure it with `hf-tokred learned-lm eagle`")
    return 0


__all__ = ["draft_vocabulary", "eagle_sequences", "model_card", "target_features", "train_eagle"]
