"""Gist tokens' recipe (arXiv 2304.08467): ~200-token prompts, the dense model's answers, the gist embeddings and LoRA.

* :func:`gist_prompts`: chat requests (summarise, explain, list key facts...) about passages of about
  ``target_tokens`` tokens, built from consecutive paragraphs of :func:`~hf_tokred.recipes.lm_data.lm_texts` and
  trimmed at a word boundary, so the chat prompt (system prompt and assistant header included) is about
  ``target_tokens`` long. ``"train"`` and ``"heldout"`` never share a paragraph.
* :func:`split_prompt`: a chat prompt as ``(context, tail)``: the compressed part (everything up to the end of the
  user turn) and the assistant header that follows the gist tokens uncompressed (``generate`` needs at least one id
  after the cached ones).
* :func:`train_gist`: the dense model's greedy answers (:func:`~hf_tokred.recipes.lm_data.dense_generations`,
  cached) as targets, the cross-entropy of the answer read through the gist cache
  (:func:`hf_tokred.integration.gist.gist_cache` + :func:`~hf_tokred.integration.gist.continuation_logits`, the
  very functions ``compress_context`` uses); resumable, saved with ``save_pretrained`` and a model card.
* :func:`evaluate_gist`: ROUGE-L of the answers through the gist cache against the dense model's answers.

``hf-tokred train gist`` runs the recipe on the embedded SmolLM2-135M-Instruct.

Example:
    >>> from hf_tokred.embedded import load_smollm2
    >>> from hf_tokred.training import train_gist
    >>> model, tokenizer = load_smollm2()                                                  # doctest: +SKIP
    >>> model = train_gist(model, tokenizer, output_dir="smollm2-gist")                    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time

import torch

from ..compat import CACHE_KWARG
from ..errors import ConfigError
from . import mean_ends

TRAINING_STATE = "gist_training.json"
TARGET_TOKENS = 200
MAX_NEW_TOKENS = 64
# What the gist tokens compress: "request", the user's whole request about a passage (the answer is read from the
# gist tokens alone); "system", a system prompt (role, task, house rules) reused across calls, the user's passage
# after the gist tokens, uncompressed (the paper's setting: an instruction compressed, its input not).
PROMPT_KINDS = ("request", "system")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _turn_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                        return_dict=True)["input_ids"]
    return [int(i) for i in ids]


def split_prompt(tokenizer, prompt: str | list[dict]) -> tuple[list[int], list[int]]:
    """``(context, tail)`` of the chat prompt ``chat_ids(tokenizer, prompt)``: what the gist tokens compress and what
    is fed after the gist cache, uncompressed. A request (a string): its user turn, then the assistant header. A chat
    (a list of messages, :func:`hf_tokred.recipes.lm_data.system_prompts`): every message but the last (the system
    prompt), then the last message and the assistant header.

    Example:
        >>> context, tail = split_prompt(tokenizer, "Hello")                   # doctest: +SKIP
        >>> tokenizer.decode(tail)                                              # doctest: +SKIP
        '<|im_start|>assistant\\n'
    """
    from .lm_data import chat_ids

    full = [int(i) for i in chat_ids(tokenizer, prompt)]
    # a request: its user turn (with any system turn the template adds); a chat: every message but the last
    context = _turn_ids(tokenizer, [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt[:-1])
    if full[:len(context)] != context or len(full) == len(context):
        # a template whose generation prompt is not a plain suffix: keep the last token uncompressed
        return full[:-1], full[-1:]
    return context, full[len(context):]


def gist_prompts(tokenizer, split: str = "train", count: int | None = None, *, target_tokens: int = TARGET_TOKENS,
                 seed: int = 0, kind: str = "request") -> list[str] | list[list[dict]]:
    """The prompts whose compressed part is about ``target_tokens`` tokens, of one ``kind`` (:data:`PROMPT_KINDS`).

    ``"request"``: chat requests about passages, the whole chat prompt within 5% of ``target_tokens``. Consecutive
    paragraphs of ``lm_texts(split)`` are joined until the passage is long enough, then trimmed at a word boundary;
    a request template is drawn (seeded) for each passage; the prompts are shuffled with ``seed``.
    ``"system"``: chats of a system prompt and a user passage (:func:`hf_tokred.recipes.lm_data.system_prompts`),
    house rules added while the system turn stays within ``target_tokens`` (so it falls short of it by less than one
    rule, under 25 tokens). The first ``count`` are kept.

    Example:
        >>> prompts = gist_prompts(tokenizer, "heldout", 4)                                # doctest: +SKIP
        >>> [len(chat_ids(tokenizer, p)) for p in prompts]                                  # doctest: +SKIP
        [199, 201, 198, 200]
        >>> chats = gist_prompts(tokenizer, "heldout", 4, kind="system")                   # doctest: +SKIP
        >>> [len(split_prompt(tokenizer, c)[0]) for c in chats]                             # doctest: +SKIP
        [196, 192, 199, 190]
    """
    from .lm_data import REQUESTS, chat_ids, lm_texts, system_prompts

    if not isinstance(target_tokens, int) or target_tokens < 64:
        raise ConfigError(f"target_tokens: expected an int >= 64, got {target_tokens!r}", field="target_tokens")
    if kind not in PROMPT_KINDS:
        raise ConfigError(f"kind: expected one of {', '.join(PROMPT_KINDS)}, got {kind!r}", field="kind")
    if kind == "system":
        def fits(system: str) -> bool:
            return len(_turn_ids(tokenizer, [{"role": "system", "content": system}])) <= target_tokens

        return system_prompts(split, count, seed=seed, fits=fits)
    rng = random.Random(seed)
    overhead = len(chat_ids(tokenizer, REQUESTS[-1].format(text="")))
    budget = target_tokens - overhead
    prompts, words = [], []
    for text in lm_texts(split):
        words += text.split()
        if len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < budget:
            continue
        template = rng.choice(REQUESTS)
        low, high = 1, len(words)  # the most words whose prompt fits target_tokens
        while low < high:
            mid = (low + high + 1) // 2
            if len(chat_ids(tokenizer, template.format(text=" ".join(words[:mid])))) <= target_tokens:
                low = mid
            else:
                high = mid - 1
        prompt = template.format(text=" ".join(words[:low]))
        if len(chat_ids(tokenizer, prompt)) >= 0.95 * target_tokens:
            prompts.append(prompt)
        words = []
    rng.shuffle(prompts)
    return prompts if count is None else prompts[:count]


ANSWER_CHUNK = 32  # prompts per cache file of dense answers (a longer list reuses the files of a shorter one)


def answers_cache(split: str, chunk: int, target_tokens: int, max_new_tokens: int, seed: int,
                  kind: str = "request") -> str:
    """The JSON file caching the dense model's answers to the ``chunk``-th run of :data:`ANSWER_CHUNK` gist prompts
    of ``split`` and ``kind`` (under ``hf_tokred``'s cache)."""
    from ..embedded import cache_dir

    name = "gist" if kind == "request" else f"gist-{kind}"
    return os.path.join(cache_dir(), "lm_data",
                        f"{name}-{split}-{target_tokens}-{max_new_tokens}-{seed}-{chunk * ANSWER_CHUNK}.json")


def gist_data(model, tokenizer, split: str, count: int | None = None, *, target_tokens: int = TARGET_TOKENS,
              max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0, kind: str = "request",
              progress: bool = True) -> list[dict]:
    """The first ``count`` examples of ``split`` and ``kind`` (:func:`gist_prompts`; None: all of them): ``context``
    and ``tail`` ids (:func:`split_prompt`) and ``answer`` ids (the dense model's greedy answer; ``model`` must be
    dense when a cache file is missing).

    The answers are generated and cached :data:`ANSWER_CHUNK` prompts at a time (one JSON file each), so an
    interrupted run keeps what it finished and a larger ``count`` only generates the new prompts' answers.

    Example:
        >>> data = gist_data(model, tokenizer, "heldout", 8)                               # doctest: +SKIP
        >>> sorted(data[0])                                                                 # doctest: +SKIP
        ['answer', 'context', 'prompt', 'tail']
    """
    from .lm_data import dense_generations

    every = gist_prompts(tokenizer, split, target_tokens=target_tokens, seed=seed, kind=kind)
    if count is None:
        count = len(every)
    if not isinstance(count, int) or not 1 <= count <= len(every):
        raise ConfigError(f"count: expected 1..{len(every)} ({split} has {len(every)} gist prompts), got {count!r}",
                          field="count")
    answers: list[list[int]] = []
    for chunk in range((count + ANSWER_CHUNK - 1) // ANSWER_CHUNK):
        prompts = every[chunk * ANSWER_CHUNK:(chunk + 1) * ANSWER_CHUNK]
        answers += dense_generations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     cache_file=answers_cache(split, chunk, target_tokens, max_new_tokens, seed, kind),
                                     progress=progress)
    data = prompt_rows(tokenizer, every[:count])
    for row, answer in zip(data, answers):
        row["answer"] = [int(t) for t in answer]
    return data


def prompt_rows(tokenizer, prompts: list[str] | list[list[dict]]) -> list[dict]:
    """One row per prompt for :func:`gist_answers`: the ``prompt`` and its ``context`` and ``tail`` ids
    (:func:`split_prompt`); :func:`gist_data` adds the dense ``answer``.

    Example:
        >>> rows = prompt_rows(tokenizer, ["Summarize: ..."])                               # doctest: +SKIP
        >>> sorted(rows[0])                                                                 # doctest: +SKIP
        ['context', 'prompt', 'tail']
    """
    rows = []
    for prompt in prompts:
        context, tail = split_prompt(tokenizer, prompt)
        rows.append({"prompt": prompt, "context": context, "tail": tail, **task_probe(tokenizer, prompt)})
    return rows


TASK_QUESTION = "Before you start: what task did the system prompt give you?"


def task_probe(tokenizer, prompt: str | list[dict]) -> dict:
    """The task probe of a system-prompt chat (:func:`hf_tokred.recipes.lm_data.system_prompts`): ``probe_tail``, the
    ids after the system turn of a user turn asking for the task (:data:`TASK_QUESTION`) and the assistant header, and
    ``probe_answer``, the assistant turn naming the task the system prompt was drawn with. Read through the gist cache,
    it is :func:`gist_loss`'s second target (``probe_weight``): it asks the gist tokens for the part of the system
    prompt the answers depend on most. Empty for a request or a chat whose task is not one of
    :data:`~hf_tokred.recipes.lm_data.SYSTEM_TASKS`.

    Example:
        >>> from hf_tokred.recipes.lm_data import system_prompts
        >>> probe = task_probe(tokenizer, system_prompts("heldout", 1)[0])                   # doctest: +SKIP
        >>> tokenizer.decode(probe["probe_answer"])                                           # doctest: +SKIP
        'My task: write three quiz questions about the passage, each with its answer.<|im_end|>\n'
    """
    from .lm_data import system_task

    task = None if isinstance(prompt, str) else system_task(prompt)
    if task is None:
        return {}
    system = prompt[:-1]
    question = [*system, {"role": "user", "content": TASK_QUESTION}]
    context, tail = split_prompt(tokenizer, question)
    full = _turn_ids(tokenizer, [*question, {"role": "assistant", "content": f"My task: {task}."}])
    if full[:len(context) + len(tail)] != context + tail:  # a template that rewrites earlier turns: no probe
        return {}
    return {"probe_tail": tail, "probe_answer": full[len(context) + len(tail):]}


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _attach(model, reduction, num_gist, rank, alpha, target_modules):
    import hf_tokred

    from ..integration.wiring import get_applied
    from ..methods.lm.gist import GistConfig

    applied = get_applied(model)
    current = applied.config.get("context") if applied is not None else None
    if isinstance(current, GistConfig) and reduction is None:
        return current
    cfg = reduction if reduction is not None else {"method": "gist", "num_gist": num_gist, "rank": rank,
                                                   "alpha": alpha, "target_modules": list(target_modules)}
    hf_tokred.apply(model, cfg)
    return get_applied(model).config.get("context")


def _read_loss(model, cache, rows: list[tuple[list[int], list[int]]], pad: int,
               teachers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Mean loss per target token of each row's target read after ``cache`` and the row's tail (``(tail, target)``
    pairs): the cross-entropy of the target ids, or with ``teachers`` (one ``(ids, probs)`` per row,
    :func:`teacher_distributions`) the KL divergence from each position's teacher distribution."""
    from ..integration.gist import continuation_logits
    from .token_dropping import collate

    device = model.get_input_embeddings().weight.device
    cont, cont_mask = collate([tail + target for tail, target in rows], pad)  # right-padded
    logits = continuation_logits(model, cache, cont.to(device), cont_mask.to(device))[:, :-1].float()
    if teachers is not None:  # position len(tail) - 1 + j predicts the target's j-th token
        log_probs = logits.log_softmax(-1)
        total = logits.new_zeros(())
        for i, ((tail, target), (ids, probs)) in enumerate(zip(rows, teachers)):
            read = log_probs[i, len(tail) - 1:len(tail) - 1 + len(target)].gather(-1, ids.to(device))
            probs = probs.to(device)
            total = total + (torch.xlogy(probs, probs) - probs * read).sum()
        return total / sum(len(target) for _, target in rows)
    labels = torch.full(cont.shape, -100, dtype=torch.long)
    for i, (tail, target) in enumerate(rows):
        labels[i, len(tail):len(tail) + len(target)] = torch.tensor(target)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                                             ignore_index=-100)


def teacher_distributions(model, data: list[dict], top: int, pad: int, *, batch_size: int = 8,
                          progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dense model's next-token distribution at every answer position of each row of ``data``, reading the whole
    prompt (``context + tail + answer``, no gist): its ``top`` most likely ids and their probabilities renormalised to
    sum to 1, one ``(ids, probs)`` pair of ``(len(answer), top)`` tensors per row. :func:`gist_loss` with
    ``distill=True`` trains the gist-read model towards them (context distillation). ``model`` may carry the gist
    reduction: its plain forward is the dense model's.

    Example:
        >>> ids, probs = teacher_distributions(model, data[:1], 32, tokenizer.pad_token_id)[0]   # doctest: +SKIP
        >>> ids.shape == (len(data[0]["answer"]), 32)                                              # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    from .token_dropping import collate

    device = model.get_input_embeddings().weight.device
    teachers = []
    for begin in tqdm(range(0, len(data), batch_size), desc="dense distributions", disable=not progress):
        chunk = data[begin:begin + batch_size]
        ids, mask = collate([e["context"] + e["tail"] + e["answer"] for e in chunk], pad)  # right-padded
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for i, e in enumerate(chunk):
            start = len(e["context"]) + len(e["tail"]) - 1
            best = logits[i, start:start + len(e["answer"])].softmax(-1).topk(top, dim=-1)
            teachers.append((best.indices.cpu(), (best.values / best.values.sum(-1, keepdim=True)).cpu()))
    return teachers


def _reader_copy(cache):
    """A second reader of ``cache``: the same entries (graph kept), appended to separately (``DynamicLayer.update``
    replaces its tensors, so the copies share the gist entries and nothing else)."""
    import copy

    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    return twin


def gist_loss(model, batch: list[dict], pad: int, probe_weight: float = 0.0, parts: dict | None = None,
              distill: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the answers of ``batch`` read through their gist caches (the tail's last token
    predicts the answer's first): the training loss, through the same :func:`gist_cache` as inference. With
    ``distill``, the mean KL divergence from each row's ``teacher`` distributions (:func:`teacher_distributions`)
    instead. With ``probe_weight`` > 0, plus that weight times the cross-entropy of each row's task probe
    (:func:`task_probe`) read through the same gist cache. ``parts`` (a dict) receives the two terms' values,
    ``"answer"`` and ``"probe"``.

    Example:
        >>> loss = gist_loss(model, data[:4], tokenizer.pad_token_id)                     # doctest: +SKIP
    """
    from ..integration.gist import gist_cache

    device = model.get_input_embeddings().weight.device
    ids, mask = _left_pad([e["context"] for e in batch], pad)
    cache = gist_cache(model, ids.to(device), mask.to(device), grad=True)
    probe_cache = _reader_copy(cache) if probe_weight else None
    loss = _read_loss(model, cache, [(e["tail"], e["answer"]) for e in batch], pad,
                      [e["teacher"] for e in batch] if distill else None)
    if parts is not None:
        parts["answer"] = loss.item()
    if probe_weight:
        probe = _read_loss(model, probe_cache, [(e["probe_tail"], e["probe_answer"]) for e in batch], pad)
        if parts is not None:
            parts["probe"] = probe.item()
        loss = loss + probe_weight * probe
    return loss


def _fingerprint(data: list[dict], **settings) -> dict:
    digest = hashlib.sha256()
    for example in data:
        digest.update(json.dumps([example["context"], example["tail"], example["answer"]]).encode())
    return {"data_sha256": digest.hexdigest(), **settings}


def train_gist(model, tokenizer, *, data: list[dict] | None = None, reduction=None, num_gist: int = 8, rank: int = 8,
               alpha: float = 16.0, target_modules=(), steps: int = 330, batch_size: int = 4, lr: float = 4e-3,
               embedding_lr: float = 2e-2, lr_schedule: str = "cosine", max_grad_norm: float = 1.0,
               train_prompts: int | None = None, target_tokens: int = TARGET_TOKENS, prompt_kind: str = "request",
               max_new_tokens: int = MAX_NEW_TOKENS, probe_weight: float = 0.0, distill_top: int = 0, seed: int = 0,
               output_dir=None, resume: bool = True, save_every: int = 10, progress: bool = True):
    """Train the gist embeddings and the LoRA on ``model`` (a causal LM; returned with the reduction attached).

    The reduction: the gist one already attached, else ``reduction``, else a fresh one with ``num_gist``, ``rank``,
    ``alpha`` and ``target_modules``. The data: ``data`` (from :func:`gist_data`), else ``train_prompts`` prompts (all
    of the training split by default: 526 requests on Python 3.11, 2.5 passes in the default 330 steps of 4) of
    ``prompt_kind`` (:data:`PROMPT_KINDS`) whose compressed part is about ``target_tokens`` tokens, with the dense
    model's greedy answers (``max_new_tokens``, cached; ``model`` must then be dense when called). ``probe_weight`` >
    0 adds each example's task probe (:func:`task_probe`; system-prompt chats only) to the loss with that weight.
    ``distill_top`` > 0 trains towards the dense model's next-token distributions given the full prompt (their
    ``distill_top`` most likely tokens, :func:`teacher_distributions`, computed once before training) by their KL
    divergence, instead of the greedy answers' cross-entropy (context distillation; 0, the default: the paper's
    cross-entropy).

    The loop: only the gist embeddings and the LoRA train, AdamW (``embedding_lr`` for the embeddings, ``lr`` for the
    LoRA) with a ``lr_schedule`` decay, batches of ``batch_size`` drawn in a fresh seeded order every pass, loss
    :func:`gist_loss`, gradients clipped to ``max_grad_norm``, a tqdm bar. Fresh parts are drawn from ``seed``;
    the global RNG is restored afterwards. With ``output_dir``: resumable checkpoints every ``save_every`` steps,
    and at the end ``save_pretrained`` (the learned parts in ``token_reduction.safetensors``), the tokenizer,
    ``gist_training.json`` and a model card. The loss of every step is ``model.train_losses``.

    Example:
        >>> model = train_gist(model, tokenizer, output_dir="smollm2-gist")                 # doctest: +SKIP
        >>> ctx = hf_tokred.compress_context(model, prompt_ids)                             # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..integration.wiring import MODULES_ATTR
    from ..methods.lm.gist import EMBEDDINGS_NAME, LORA_NAME
    from ..training import LR_SCHEDULES, _batch_order, _prepare_checkpoint, _resumable_step, lr_factor, save_trained

    for name, value, ok in (("steps", steps, isinstance(steps, int) and steps >= 1),
                            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                            ("lr", lr, lr > 0), ("embedding_lr", embedding_lr, embedding_lr > 0),
                            ("save_every", save_every, isinstance(save_every, int) and save_every >= 1),
                            ("lr_schedule", lr_schedule, lr_schedule in LR_SCHEDULES),
                            ("probe_weight", probe_weight, isinstance(probe_weight, (int, float)) and probe_weight >= 0)):
        if not ok:
            raise ConfigError(f"{name}: invalid value {value!r}", field=name)
    vocab = model.config.get_text_config().vocab_size
    if not isinstance(distill_top, int) or isinstance(distill_top, bool) or not 0 <= distill_top <= vocab:
        raise ConfigError(f"distill_top: expected an int from 0 (off) to the vocabulary size {vocab}, got "
                          f"{distill_top!r}", field="distill_top")
    rng_state = torch.random.get_rng_state()
    try:
        built_kind = None  # the kind of prompts built here (the model card says what given data held)
        if data is None:
            built_kind = prompt_kind
            try:
                data = gist_data(model, tokenizer, "train", train_prompts, target_tokens=target_tokens,
                                 max_new_tokens=max_new_tokens, seed=seed, kind=prompt_kind, progress=progress)
            except ConfigError as error:  # gist_data's `count` is this function's `train_prompts`
                if error.field != "count":
                    raise
                raise ConfigError("train_prompts" + str(error).removeprefix("count"), field="train_prompts") from None
        if not data:
            raise ConfigError("data: expected at least one training example", field="data")
        if probe_weight and not all("probe_tail" in e and "probe_answer" in e for e in data):
            raise ConfigError("probe_weight: every example needs a task probe ('probe_tail' and 'probe_answer', "
                              "which gist_data adds to system-prompt chats); use 0 for other data", field="probe_weight")
        cfg = _attach(model, reduction, num_gist, rank, alpha, target_modules)
        holder = model._modules[MODULES_ATTR]
        embeddings, lora = holder[EMBEDDINGS_NAME], holder[LORA_NAME]
        embeddings.reset_parameters(model.get_input_embeddings().weight, seed)
        lora.reset_parameters(seed)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        params = [embeddings.weight, *lora.parameters()]
        for parameter in params:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW([{"params": params[:1], "lr": embedding_lr, "base": embedding_lr},
                                       {"params": params[1:], "lr": lr, "base": lr}], weight_decay=0.0)
        # earlier runs' fingerprints stay valid: the options enter only when used
        options = {name: value for name, value in (("probe_weight", probe_weight), ("distill_top", distill_top)) if value}
        fingerprint = _fingerprint(data, reduction=cfg.to_dict(), lr=lr, embedding_lr=embedding_lr,
                                   batch_size=batch_size, seed=seed, lr_schedule=lr_schedule,
                                   max_grad_norm=max_grad_norm, **options)
        state = {"step": 0, "losses": [], "fingerprint": fingerprint, "examples": len(data),
                 "prompt_kind": built_kind,
                 "prompt_tokens": round(sum(len(e["context"]) + len(e["tail"]) for e in data) / len(data), 1),
                 "answer_tokens": round(sum(len(e["answer"]) for e in data) / len(data), 1), "seconds": 0.0,
                 **options}
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, holder, optimizer, params, state)
        order = _batch_order(len(data), steps * batch_size, True, torch.Generator().manual_seed(seed))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        if distill_top and state["step"] < steps:  # only when steps remain (a finished run resumed needs none)
            # the dense model's distributions: its plain forward stays dense with the gist attached
            data = [{**e, "teacher": t} for e, t in
                    zip(data, teacher_distributions(model, data, distill_top, pad, progress=progress))]
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train gist", disable=not progress)
        start = time.perf_counter()
        for step in range(state["step"], steps):
            batch = [data[i] for i in order[step * batch_size:(step + 1) * batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = group["base"] * lr_factor(lr_schedule, step, steps)
            parts: dict = {}
            loss = gist_loss(model, batch, pad, probe_weight, parts, distill=bool(distill_top))
            if probe_weight:  # the answers' own loss, beside the total in "losses"
                state.setdefault("answer_losses", []).append(round(parts["answer"], 6))
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, holder, save_every, steps,
                            max_grad_norm=max_grad_norm)
            if checkpoint is not None and state["step"] % save_every == 0:
                state["seconds"] = round(state.get("seconds", 0.0) + time.perf_counter() - start, 2)
                start = time.perf_counter()
        bar.close()
        state["seconds"] = round(state.get("seconds", 0.0) + time.perf_counter() - start, 2)
        for parameter in params:
            parameter.requires_grad_(False)
        model.train(was_training)
        if output_dir is not None:
            save_trained(output_dir, model, tokenizer, TRAINING_STATE, state)
            write_model_card(output_dir, model, cfg, state)
    finally:
        torch.random.set_rng_state(rng_state)
    model.train_losses = list(state["losses"])
    return model


DATA_DESCRIPTIONS = {
    "request": "chat requests about standard-library documentation passages, the user turn compressed",
    "system": "system prompts (a role, a task, house rules) compressed, each followed by a user passage",
}


def write_model_card(output_dir: str, model, cfg, state: dict, results: dict | None = None) -> None:
    """Write ``README.md`` of a trained gist folder: training data, steps, seed and (``results``) measured figures."""
    base = getattr(model, "name_or_path", "") or type(model).__name__
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None
    losses = state["losses"]
    first, final = mean_ends(losses)
    fp = state["fingerprint"]
    probe_line = answer_line = ""
    loss_line = "cross-entropy of the answer read through the gist cache"
    if fp.get("distill_top"):
        loss_line = ("KL divergence from the dense model's next-token distributions given the full prompt (its top "
                     f"{fp['distill_top']} tokens, renormalised) to the model's reading the gist cache, at every answer "
                     "position (context distillation)")
    if fp.get("probe_weight"):
        probe_line = (f", plus {fp['probe_weight']} x the cross-entropy of the system prompt's task asked for through "
                      "the same cache (`task_probe`)")
        answer_first, answer_final = mean_ends(state.get("answer_losses", []))
        answer_line = f" (the answers' term alone: {answer_first:.4f} -> {answer_final:.4f})"
    figures = ""
    if results:
        figures = "\n## Held-out figures (`hf-tokred learned-lm gist`)\n\n| | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {v} |" for k, v in results.items()) + "\n"
    text = f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- gist-tokens
- context-compression
- hf_tokred
{f"base_model: {base}{chr(10)}" if hub_id else ""}---

# Gist tokens for `{base}` (hf_tokred)

Gist tokens (Mu et al., arXiv 2304.08467): a prompt is compressed into the keys and values of {cfg.num_gist} learned
tokens, reused by every later call. `model.safetensors` holds the unchanged base model; the gist embeddings
({cfg.num_gist} x hidden) and a LoRA (rank {cfg.rank}, alpha {cfg.alpha}, run on the gist tokens only) are in
`token_reduction.safetensors`.

```python
import torch, hf_tokred
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this folder>")          # gist reduction re-attached
ctx = hf_tokred.compress_context(model, prompt_ids, attention_mask)     # {cfg.num_gist} cache entries per layer
out = model.generate(torch.cat([ctx.prefix_ids, question_ids], -1), past_key_values=ctx.fresh_cache())
```

Without hf_tokred the same folder loads as the plain base model.

## Training

- data: {state["examples"]} {DATA_DESCRIPTIONS.get(state.get("prompt_kind"), "examples given to `train_gist`")}
  (`hf_tokred.recipes.gist.gist_prompts`, prompts of {state["prompt_tokens"]} tokens on average), targets the dense
  model's own greedy answers ({state["answer_tokens"]} tokens on average)
- loss: {loss_line}{probe_line}
- steps: {state["step"]}, batch size {fp["batch_size"]}, learning rate {fp["lr"]} (LoRA) / {fp["embedding_lr"]}
  (embeddings), {fp["lr_schedule"]}, seed {fp["seed"]}; {state.get("seconds", 0)} s of training on a shared CPU
- training loss: first 10 steps {first:.4f}, last 10 steps {final:.4f}{answer_line}
- data fingerprint (SHA-256): `{fp["data_sha256"]}`
{figures}
`checkpoint/` (optimizer state, for resuming) is not needed for inference.
"""
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(text)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def gist_answers(model, data: list[dict], *, mode: str = "gist", max_new_tokens: int = MAX_NEW_TOKENS,
                 eos_token_id=None, pad: int = 0, batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, progress: bool = False) -> list[list[int]]:
    """Answers (new token ids, up to the end token) to ``data`` with the prompt given as ``mode``:

    ``"gist"``: the context compressed by ``hf_tokred.compress_context`` (the attached gist reduction), then the tail;
    ``"full"``: the whole chat prompt (dense); ``"none"``: the tail only (no prompt at all, a floor).

    Greedy with ``temperature=0`` (the default); otherwise sampled with ``temperature`` and ``top_p`` (and
    ``generate``'s other defaults), each batch drawn from ``seed`` (the same seed and batches give the same answers;
    the global RNG, and the CUDA one of the model's device, is restored).

    Example:
        >>> answers = gist_answers(model, data, mode="gist")                               # doctest: +SKIP
        >>> drawn = gist_answers(model, data, mode="full", temperature=0.2, top_p=0.9, seed=1)   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    import hf_tokred

    if mode not in ("gist", "full", "none"):
        raise ConfigError(f"mode: expected 'gist', 'full' or 'none', got {mode!r}", field="mode")
    if not 0.0 <= temperature <= 10.0:
        raise ConfigError(f"temperature: expected 0 (greedy) to 10, got {temperature!r}", field="temperature")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p: expected a value in (0, 1], got {top_p!r}", field="top_p")
    device = model.get_input_embeddings().weight.device
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "eos_token_id": eos_token_id,
              "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    out_rows: list[list[int]] = []
    for begin in tqdm(range(0, len(data), batch_size), desc=f"answers ({mode})", disable=not progress):
        chunk = data[begin:begin + batch_size]
        with torch.no_grad(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + begin)
            if mode == "gist":
                ids, mask = _left_pad([e["context"] for e in chunk], pad)
                ctx = hf_tokred.compress_context(model, ids.to(device), mask.to(device))
                tail, tail_mask = _left_pad([e["tail"] for e in chunk], pad)
                inputs = torch.cat([ctx.prefix_ids, tail.to(device)], -1)
                full_mask = torch.cat([torch.ones_like(ctx.prefix_ids), tail_mask.to(device)], -1)
                out = model.generate(inputs, attention_mask=full_mask, **{CACHE_KWARG: ctx.fresh_cache()}, **kwargs)
            else:
                rows = [(e["context"] if mode == "full" else []) + e["tail"] for e in chunk]
                inputs, full_mask = (t.to(device) for t in _left_pad(rows, pad))
                out = model.generate(inputs, attention_mask=full_mask, **kwargs)
        for row in out[:, inputs.shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t == eos_token_id]
            out_rows.append(row[:ends[0] + 1] if ends else row)
    return out_rows


def mean_rouge_l(candidates: list[list[int]], references: list[list[int]]) -> float:
    """Mean token-level ROUGE-L F1 (:func:`hf_tokred.methods.lm.gist.rouge_l`) over pairs.

    Example:
        >>> mean_rouge_l([[1, 2], [3]], [[1, 2], [4]])
        0.5
    """
    from ..methods.lm.gist import rouge_l

    return sum(rouge_l(c, r) for c, r in zip(candidates, references)) / max(len(references), 1)


# ---------------------------------------------------------------------------------------------
# hf-tokred train gist
# ---------------------------------------------------------------------------------------------

DESCRIPTION = """\
gist: gist tokens (arXiv 2304.08467) on the embedded SmolLM2-135M-Instruct. Chat requests about ~200-token passages
of the standard library's documentation are answered by the dense model (greedy, cached); the gist embeddings and a
LoRA that runs on the gist tokens learn to make the answer readable through the gist tokens' KV alone (cross-entropy
of the dense answer given the gist cache). The folder it writes loads with AutoModelForCausalLM.from_pretrained(DIR);
measure it with `hf-tokred learned-lm gist`.

examples:
  hf-tokred train gist                          330 steps of 4 on every training prompt (526): ~10 min for the dense
                                                answers (cached) and ~25 min of training on one core
  hf-tokred train gist --num-gist 4 --steps 20 --output ./gist4
  hf-tokred train gist --prompt-kind system --prompts 640 --steps 400 --output ./gist-system
                                                system prompts (role, task, house rules) compressed, the user's
                                                passage after the gist tokens (the paper's setting)
  hf-tokred train gist --prompt-kind system --prompts 640 --steps 400 --task-probe 1 --output ./gist-system-task
                                                the same, the gist tokens also asked for the system prompt's task
  hf-tokred train gist --prompt-kind system --prompts 640 --steps 400 --distill-top 32 --output ./gist-system-kl
                                                the same, trained towards the dense model's distributions (its top
                                                32 tokens) rather than its greedy answers
"""


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train gist`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "gist"]).num_gist
        8
    """
    from ..cli import _float_in, _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "gist", help="gist tokens on SmolLM2: a prompt compressed into k cache "
                              "entries", description=DESCRIPTION, output="smollm2-gist", steps=330, corpus=False)
    train.add_argument("--num-gist", type=_positive_int, default=8, help="gist tokens k (default: 8)")
    train.add_argument("--batch-size", type=_positive_int, default=4, help="prompts per step (default: 4)")
    train.add_argument("--lr", type=_float_in(1e-7, 1.0), default=4e-3, help="LoRA learning rate (default: 4e-3)")
    train.add_argument("--embedding-lr", type=_float_in(1e-7, 1.0), default=2e-2,
                       help="gist embeddings' learning rate (default: 2e-2)")
    train.add_argument("--prompts", type=_positive_int, default=None,
                       help="training prompts (default: all of the training split: 526 requests or 1,438 system "
                       "prompts on Python 3.11)")
    train.add_argument("--task-probe", type=_float_in(0.0, 100.0), default=0.0, metavar="WEIGHT",
                       help="with --prompt-kind system: also train the gist tokens to name the system prompt's task "
                       "when asked through their cache, this weight times that loss (default: 0, off)")
    train.add_argument("--distill-top", type=_positive_int, default=None, metavar="N",
                       help="train towards the dense model's next-token distributions given the full prompt (its top "
                       "N tokens, KL divergence) instead of its greedy answers (default: off)")
    train.add_argument("--prompt-kind", choices=PROMPT_KINDS, default="request",
                       help="what the gist tokens compress: 'request' (default), the user's request about a passage; "
                       "'system', a system prompt of house rules, the user's passage after the gist tokens")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train the gist tokens on the embedded SmolLM2 and save them."""
    from ..cli import _log
    from ..embedded import load_smollm2
    from . import recipe_output

    model, tokenizer = load_smollm2()
    output = recipe_output(args, "smollm2-gist")
    _log(f"gist: {args.steps} steps of {args.batch_size}, {args.num_gist} gist tokens, "
         f"{args.prompts or 'all'} training prompts ({args.prompt_kind})")
    train_gist(model, tokenizer, num_gist=args.num_gist, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
               embedding_lr=args.embedding_lr, train_prompts=args.prompts, prompt_kind=args.prompt_kind,
               probe_weight=args.task_probe, distill_top=args.distill_top or 0, seed=args.seed, output_dir=output,
               progress=not args.no_progress)
    first, final = mean_ends(model.train_losses, 5)
    print(f"saved to {output}: AutoModelForCausalLM.from_pretrained({output!r}) re-attaches the gist tokens; "
          f"loss {first:.3f} -> {final:.3f}; measure with `hf-tokred learned-lm gist`")
    return 0


__all__ = ["answers_cache", "gist_answers", "gist_data", "gist_loss", "gist_prompts",
           "mean_rouge_l", "split_prompt", "task_probe", "teacher_distributions", "train_gist", "write_model_card"]
