"""TokenSkip's recipe (arXiv 2502.12067): arithmetic word problems, compressed traces, LoRA fine-tuning.

* :func:`generate_problems`: seeded arithmetic word problems (shopping, ages, rates, remainders, travel,
  savings; 2-4 steps; every intermediate an integer) with a step-by-step solution and the answer, all computed
  and checked by Python (:func:`check_problem`). The ``"train"`` and ``"heldout"`` splits draw from disjoint
  seed ranges.
* :func:`compress_trace`: a solution's reasoning compressed by token importance with ``compress_prompt``
  (``llmlingua2`` when a classifier is given or found, else ``llmlingua`` scored by the embedded SmolLM2),
  digits, ``Step`` and ``=`` protected; the answer line is never compressed.
* :func:`tokenskip_examples`: training examples ``prompt + control(gamma) -> compressed reasoning + "The answer is
  N."`` with ``gamma`` drawn per example among the ratios (1.0: the uncompressed trace).
* :func:`train_tokenskip`: the LoRA fine-tuning (loss on the response only), resumable, saved with
  ``save_pretrained`` and a model card; ``ratios=[1.0]`` trains the "uncompressed traces only" baseline.
* :func:`evaluate_tokenskip`: greedy held-out accuracy (the answer parsed and checked by Python) and the mean
  number of tokens generated.

``hf-tokred train tokenskip`` runs the recipe on the embedded SmolLM2-135M-Instruct.

Example:
    >>> from hf_tokred.embedded import load_smollm2
    >>> from hf_tokred.training import train_tokenskip
    >>> model, tokenizer = load_smollm2()                                                  # doctest: +SKIP
    >>> model = train_tokenskip(model, tokenizer, steps=100, output_dir="smollm2-tokenskip")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError, TokenReductionError
from . import mean_ends

SYSTEM_PROMPT = "Solve the math problem step by step."
ANSWER_PREFIX = "The answer is"
# Where the two splits draw their problems: disjoint ranges of per-problem seeds.
SPLIT_OFFSETS = {"train": 0, "heldout": 1 << 40}
TRAINING_STATE = "tokenskip_training.json"
CHECKPOINT = "checkpoint"
# The strings kept wherever they occur in a trace, beside every word holding a digit (the paper's
# force_tokens=['Step', ':'] and force_reserve_digit=True; '=' keeps each equation readable).
FORCE_TOKENS = ("Step", "=")

_NAMES = ("Mia", "Tom", "Ava", "Leo", "Emma", "Noah", "Lily", "Omar", "Zoe", "Ben", "Sara", "Max")
_PRONOUNS = {"Mia": "she", "Ava": "she", "Emma": "she", "Lily": "she", "Zoe": "she", "Sara": "she"}
_ITEMS = ("notebooks", "pens", "apples", "books", "cups", "shirts", "tickets", "candles", "plates", "toys")
_THINGS = ("cookies", "marbles", "stickers", "eggs", "pencils", "cards")
_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
               "/": lambda a, b: a // b if b and a % b == 0 else None}


@dataclass
class Problem:
    """One word problem: its ``question``, the solution's ``steps`` (one line each), the ``answer``, the template
    (``kind``) and the ``numbers`` it was built from."""

    question: str
    steps: list
    answer: int
    kind: str
    numbers: dict

    @property
    def reasoning(self) -> str:
        """The solution's steps, one per line (the part TokenSkip compresses)."""
        return "\n".join(self.steps)

    @property
    def answer_line(self) -> str:
        """The final line, never compressed: ``The answer is N.``"""
        return f"{ANSWER_PREFIX} {self.answer}."


def _pronoun(name: str) -> str:
    return _PRONOUNS.get(name, "he")


def _shopping(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    first, second = rng.sample(_ITEMS, 2)
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 9)
    x, y = a * p, b * q
    total = x + y
    question = f"{name} buys {a} {first} at {p} dollars each and {b} {second} at {q} dollars each."
    steps = [f"Step 1: The {first} cost {a} * {p} = {x} dollars.", f"Step 2: The {second} cost {b} * {q} = {y} dollars.",
             f"Step 3: Together they cost {x} + {y} = {total} dollars."]
    numbers = {"a": a, "p": p, "b": b, "q": q}
    if rng.random() < 0.5:
        question += " How much does " + _pronoun(name) + " spend in total?"
        return Problem(question, steps, total, "shopping", numbers)
    bill = next(v for v in (20, 50, 100, 200) if v > total)
    numbers["bill"] = bill
    question += f" {_pronoun(name).capitalize()} pays with a {bill} dollar bill. How much change does {_pronoun(name)} get?"
    steps.append(f"Step 4: The change is {bill} - {total} = {bill - total} dollars.")
    return Problem(question, steps, bill - total, "shopping_change", numbers)


def _ages(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    a, k, y = rng.randint(3, 12), rng.randint(2, 4), rng.randint(2, 15)
    mother = a * k
    question = f"{name} is {a} years old. {name}'s aunt is {k} times as old as {name}."
    steps = [f"Step 1: The aunt is {a} * {k} = {mother} years old."]
    numbers = {"a": a, "k": k, "y": y}
    if rng.random() < 0.5:
        d = rng.randint(20, 35)
        numbers["d"] = d
        question += f" {name}'s grandfather is {d} years older than the aunt. How old will the grandfather be in {y} years?"
        steps += [f"Step 2: The grandfather is {mother} + {d} = {mother + d} years old.",
                  f"Step 3: In {y} years he will be {mother + d} + {y} = {mother + d + y} years old."]
        return Problem(question, steps, mother + d + y, "ages_grandfather", numbers)
    question += f" How old will the aunt be in {y} years?"
    steps.append(f"Step 2: In {y} years she will be {mother} + {y} = {mother + y} years old.")
    return Problem(question, steps, mother + y, "ages", numbers)


def _rates(rng: random.Random) -> Problem:
    r, h, d = rng.randint(3, 12), rng.randint(2, 8), rng.randint(2, 6)
    per_day = r * h
    total = per_day * d
    question = f"A machine makes {r} parts per hour. It runs for {h} hours a day."
    steps = [f"Step 1: Each day it makes {r} * {h} = {per_day} parts.",
             f"Step 2: In {d} days it makes {per_day} * {d} = {total} parts."]
    numbers = {"r": r, "h": h, "d": d}
    divisors = [b for b in range(2, 13) if total % b == 0 and total // b > 1]
    if divisors and rng.random() < 0.5:
        b = rng.choice(divisors)
        numbers["b"] = b
        question += f" The parts are packed in boxes of {b}. How many boxes are filled in {d} days?"
        steps.append(f"Step 3: The boxes filled are {total} / {b} = {total // b}.")
        return Problem(question, steps, total // b, "rates_boxes", numbers)
    question += f" How many parts does it make in {d} days?"
    return Problem(question, steps, total, "rates", numbers)


def _remainders(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    things = rng.choice(_THINGS)
    b, full, p = rng.randint(3, 9), rng.randint(3, 12), rng.randint(2, 9)
    left = rng.randint(1, b - 1)
    n = b * full + left
    question = (f"{name} has {n} {things} and puts them into bags of {b}. Each full bag sells for {p} dollars. "
                f"How much money does {_pronoun(name)} make from the full bags?")
    steps = [f"Step 1: {b} * {full} = {b * full}, so {full} bags are full and {n} - {b * full} = {left} {things} are left over.",
             f"Step 2: The full bags make {full} * {p} = {full * p} dollars."]
    return Problem(question, steps, full * p, "remainders", {"n": n, "b": b, "p": p})


def _travel(rng: random.Random) -> Problem:
    v, h, w, g = rng.randint(20, 90), rng.randint(2, 5), rng.randint(20, 90), rng.randint(2, 5)
    question = (f"A train travels at {v} km per hour for {h} hours and then at {w} km per hour for {g} hours. "
                "How far does it travel in total?")
    steps = [f"Step 1: First it travels {v} * {h} = {v * h} km.", f"Step 2: Then it travels {w} * {g} = {w * g} km.",
             f"Step 3: In total it travels {v * h} + {w * g} = {v * h + w * g} km."]
    return Problem(question, steps, v * h + w * g, "travel", {"v": v, "h": h, "w": w, "g": g})


def _savings(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    s, weeks, k = rng.randint(3, 15), rng.randint(3, 10), rng.randint(2, 5)
    total = s * weeks
    each = rng.randint(1, max(1, (total - 1) // k))
    spent = total - k * each
    if spent <= 0:
        spent, each = total - k, 1
    question = (f"{name} saves {s} dollars every week for {weeks} weeks. Then {_pronoun(name)} spends {spent} dollars on "
                f"a gift and shares the rest equally among {k} friends. How many dollars does each friend get?")
    steps = [f"Step 1: {name} saves {s} * {weeks} = {total} dollars.",
             f"Step 2: After the gift {total} - {spent} = {total - spent} dollars are left.",
             f"Step 3: Each friend gets {total - spent} / {k} = {each} dollars."]
    return Problem(question, steps, each, "savings", {"s": s, "weeks": weeks, "spent": spent, "k": k})


TEMPLATES = (_shopping, _ages, _rates, _remainders, _travel, _savings)


def check_problem(problem: Problem) -> None:
    """Recompute every equation of the solution and the answer; raise :class:`TokenReductionError` on any mistake.

    Example:
        >>> from hf_tokred.recipes.tokenskip import check_problem, generate_problems
        >>> check_problem(generate_problems(1)[0])
    """
    equations = [m for step in problem.steps for m in _EQUATION.finditer(step)]
    if not equations or not 2 <= len(problem.steps) <= 4:
        raise TokenReductionError(f"tokenskip: problem {problem.question!r} has {len(problem.steps)} steps")
    for match in equations:
        a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        value = _OPERATIONS[op](a, b)
        if value is None or value != result or value < 0:
            raise TokenReductionError(f"tokenskip: wrong step {match[0]!r} in {problem.question!r}")
    if int(equations[-1][4]) != problem.answer:
        raise TokenReductionError(f"tokenskip: the last step of {problem.question!r} is not its answer {problem.answer}")


def generate_problems(count: int, split: str = "train", seed: int = 0) -> list[Problem]:
    """``count`` checked word problems of ``split`` (``"train"`` or ``"heldout"``, disjoint seed ranges).

    Problem ``i`` comes from its own ``random.Random`` seeded with the split's offset, ``seed`` and ``i``, and
    uses the templates in turn, so any prefix of a longer list is the shorter list.

    Example:
        >>> from hf_tokred.recipes.tokenskip import generate_problems
        >>> problem = generate_problems(2, "heldout")[1]
        >>> problem.answer_line.startswith("The answer is")
        True
    """
    if split not in SPLIT_OFFSETS:
        raise ConfigError(f"split: expected one of {', '.join(SPLIT_OFFSETS)}, got {split!r}", field="split")
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"count: expected a positive int, got {count!r}", field="count")
    problems = []
    for i in range(count):
        rng = random.Random(SPLIT_OFFSETS[split] + seed * (1 << 24) + i)
        problem = TEMPLATES[i % len(TEMPLATES)](rng)
        check_problem(problem)
        problems.append(problem)
    return problems


def parse_answer(text: str) -> int | None:
    """The answer a model wrote: the number after the last ``The answer is``, else the last integer; None if none.

    Example:
        >>> from hf_tokred.recipes.tokenskip import parse_answer
        >>> parse_answer("Step 1: 3 * 4 = 12.\\nThe answer is 12."), parse_answer("so 7 left"), parse_answer("none")
        (12, 7, None)
    """
    found = re.findall(re.escape(ANSWER_PREFIX) + r"\s*\$?(-?[\d,]+)", text)
    if found:
        digits = found[-1].replace(",", "")
        if digits.lstrip("-").isdigit():
            return int(digits)
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------------
# Trace compression
# ---------------------------------------------------------------------------------------------


def default_compressor(classifier=None) -> tuple[str, str | None]:
    """``("llmlingua2", folder)`` for a given classifier or the one ``hf-tokred train llmlingua2`` wrote, else
    ``("llmlingua", None)`` (scored by the embedded SmolLM2).

    Example:
        >>> from hf_tokred.recipes.tokenskip import default_compressor
        >>> default_compressor("my-classifier")
        ('llmlingua2', 'my-classifier')
    """
    if classifier is not None:
        return "llmlingua2", classifier
    from ..embedded import cache_dir

    folder = os.path.join(cache_dir(), "llmlingua2-minilm")
    return ("llmlingua2", folder) if os.path.isfile(os.path.join(folder, "config.json")) else ("llmlingua", None)


def compress_trace(reasoning: str, rate: float, *, method: str = "llmlingua", classifier=None, scorer=None,
                   target_tokenizer=None) -> dict:
    """Compress a solution's reasoning (not its answer line) to ``rate`` of its tokens, as TokenSkip's data step.

    ``compress_prompt`` with ``method`` (``"llmlingua"``: ``scorer``, default the embedded SmolLM2;
    ``"llmlingua2"``: ``classifier``), every word holding a digit and every ``Step``/``=`` kept, the budget
    counted in ``target_tokenizer`` (the tokenizer of the model being trained). ``rate=1.0`` returns the text
    unchanged. Returns ``compress_prompt``'s dict (``compressed_prompt``, ``origin_tokens``,
    ``compressed_tokens``, ``budget_met``...).

    Example:
        >>> from hf_tokred.recipes.tokenskip import compress_trace, generate_problems
        >>> out = compress_trace(generate_problems(1)[0].reasoning, 0.6)                    # doctest: +SKIP
        >>> out["compressed_tokens"] <= out["origin_tokens"]                                # doctest: +SKIP
        True
    """
    from ..prompt.base import compress_prompt

    extra = {"classifier": classifier} if method == "llmlingua2" else {}
    return compress_prompt(reasoning, rate=rate, method=method, scorer=None if method == "llmlingua2" else scorer,
                           target_tokenizer=target_tokenizer, keep_digits=True, force_tokens=list(FORCE_TOKENS), **extra)


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt of a problem: the chat template (a short system prompt, the question, the assistant header) when
    the tokenizer has one, else ``Question: ...\\nAnswer:``. The control is appended after it.

    Example:
        >>> from hf_tokred.recipes.tokenskip import prompt_ids
        >>> tokenizer.decode(prompt_ids(tokenizer, "What is 2 + 3?"))[-22:]                 # doctest: +SKIP
        '<|im_start|>assistant\\n'
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]]


def tokenskip_examples(problems: list[Problem], tokenizer, cfg, *, seed: int = 0, method: str = "llmlingua",
                       classifier=None, scorer=None, progress: bool = False) -> list[dict]:
    """Training examples: ``prompt + control(gamma)`` -> ``compressed reasoning + "\\nThe answer is N." + eos``.

    ``gamma`` is drawn per example (seeded) among ``cfg.ratios``; below 1.0 the reasoning is compressed with
    :func:`compress_trace`. Each example: ``input_ids``, ``labels`` (-100 on the prompt and the control, so the
    loss is on the response only), ``ratio``, ``origin_tokens`` and ``compressed_tokens`` (of the reasoning).

    Example:
        >>> examples = tokenskip_examples(generate_problems(8), tokenizer, cfg)             # doctest: +SKIP
        >>> examples[0]["labels"][:3]                                                       # doctest: +SKIP
        [-100, -100, -100]
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer: TokenSkip's examples end with the tokenizer's eos token, and it has none",
                          field="tokenizer")
    examples = []
    for problem in tqdm(problems, desc="tokenskip traces", disable=not progress):
        ratio = rng.choice(list(cfg.ratios))
        reasoning = problem.reasoning
        origin = len(tokenizer(reasoning, add_special_tokens=False)["input_ids"])
        if ratio < 1.0:
            reasoning = compress_trace(reasoning, ratio, method=method, classifier=classifier, scorer=scorer,
                                       target_tokenizer=tokenizer)["compressed_prompt"]
        response = tokenizer(reasoning + "\n" + problem.answer_line, add_special_tokens=False)["input_ids"] + [eos]
        prompt = prompt_ids(tokenizer, problem.question) + cfg.control(ratio)
        examples.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response, "ratio": ratio,
                         "origin_tokens": origin,
                         "compressed_tokens": len(tokenizer(reasoning, add_special_tokens=False)["input_ids"])})
    return examples


def compression_summary(examples: list[dict]) -> list[dict]:
    """Per requested ratio: examples, mean achieved ratio (compressed / original reasoning tokens).

    Example:
        >>> compression_summary([{"ratio": 0.5, "origin_tokens": 10, "compressed_tokens": 6}])
        [{'ratio': 0.5, 'examples': 1, 'achieved': 0.6}]
    """
    rows = []
    for ratio in sorted({e["ratio"] for e in examples}):
        chosen = [e for e in examples if e["ratio"] == ratio]
        achieved = sum(e["compressed_tokens"] for e in chosen) / max(sum(e["origin_tokens"] for e in chosen), 1)
        rows.append({"ratio": ratio, "examples": len(chosen), "achieved": round(achieved, 4)})
    return rows


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _fingerprint(examples: list[dict], **settings) -> dict:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return {"data_sha256": digest.hexdigest(), **settings}


def _check_settings(**values) -> None:
    checks = {"steps": lambda v: isinstance(v, int) and v >= 1, "batch_size": lambda v: isinstance(v, int) and v >= 1,
              "lr": lambda v: isinstance(v, (int, float)) and v > 0, "seed": lambda v: isinstance(v, int),
              "save_every": lambda v: isinstance(v, int) and v >= 1,
              "max_grad_norm": lambda v: isinstance(v, (int, float)) and v > 0,
              "train_problems": lambda v: v is None or (isinstance(v, int) and v >= 1)}
    for name, value in values.items():
        if not checks[name](value):
            raise ConfigError(f"{name}: got {value!r}; see train_tokenskip's docstring for the allowed values", field=name)


def _attach(model, tokenizer, reduction, ratio, ratios, rank, alpha):
    """The model with a tokenskip reduction: the one attached, else a fresh one built from the arguments."""
    import hf_tokred

    from ..integration.wiring import get_applied
    from ..methods.nlp.tokenskip import TokenSkipConfig, build_controls

    applied = get_applied(model)
    attached = applied.config.get("prompt") if applied is not None else None
    if reduction is None and isinstance(attached, TokenSkipConfig):
        return attached
    if reduction is None:
        reduction = TokenSkipConfig(ratio=ratio, ratios=list(ratios), control_ids=build_controls(tokenizer, ratios),
                                    rank=rank, alpha=alpha)
    hf_tokred.apply(model, reduction)
    return get_applied(model).config.get("prompt")


def train_tokenskip(model, tokenizer, *, problems: list[Problem] | None = None, examples: list[dict] | None = None,
                    reduction=None, ratio: float = 0.6, ratios=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0), rank: int = 8,
                    alpha: float = 16.0, steps: int = 100, batch_size: int = 4, lr: float = 5e-4,
                    lr_schedule: str = "linear", max_grad_norm: float = 1.0, train_problems: int | None = None,
                    seed: int = 0, method: str | None = None, classifier=None, scorer=None, output_dir=None,
                    resume: bool = True, save_every: int = 50, progress: bool = True):
    """Fine-tune TokenSkip's LoRA on ``model`` (a causal LM; returned with the reduction attached and trained).

    The reduction: the tokenskip one already attached to ``model``, else ``reduction`` (a config), else a fresh
    one with ``ratio``, ``ratios`` (their controls built from ``tokenizer`` with
    :func:`~hf_tokred.methods.nlp.tokenskip.build_controls``), ``rank`` and ``alpha``. ``ratios=[1.0]`` (and
    ``ratio=1.0``) is the baseline "fine-tuned on uncompressed traces only".

    The data: ``examples`` (from :func:`tokenskip_examples`), else ``problems`` (default
    ``generate_problems(train_problems or steps * batch_size, "train", seed)``) made into examples, each
    compressed at its drawn ratio by ``method`` (default :func:`default_compressor`: ``llmlingua2`` with
    ``classifier`` or the trained one found in the cache, else ``llmlingua`` scored by ``scorer``/the embedded
    SmolLM2).

    The loop: only the LoRA trains (every other parameter frozen), AdamW at ``lr`` with a ``lr_schedule`` decay
    (``"constant"``, ``"linear"``, ``"cosine"``), batches of ``batch_size`` examples drawn in a fresh seeded order
    every pass, right-padded, cross-entropy on the response tokens only, gradients clipped to ``max_grad_norm``,
    a tqdm bar (``progress``). ``lora_A`` is drawn from ``seed`` (peft's initialisation), and everything is seeded
    (the global RNG is restored afterwards). With ``output_dir``: every ``save_every`` steps and at the end the LoRA,
    the AdamW moments and the RNG state go to ``output_dir/checkpoint`` (safetensors) and the step and losses to
    JSON; with ``resume`` a later call with the same data and settings continues from there. At the end the model
    is saved with ``save_pretrained`` (``model.safetensors``: the base weights only; the LoRA in
    ``token_reduction.safetensors``), with the tokenizer, ``tokenskip_training.json`` and a model card
    (``README.md``). The loss of every step is ``model.train_losses``; the data's compression
    (:func:`compression_summary`) is ``model.tokenskip_compression``.

    Example:
        >>> from hf_tokred.embedded import load_smollm2
        >>> from hf_tokred.training import train_tokenskip
        >>> model, tokenizer = load_smollm2()                                               # doctest: +SKIP
        >>> model = train_tokenskip(model, tokenizer, steps=100, output_dir="smollm2-tokenskip")  # doctest: +SKIP
        >>> model.generate(**inputs, max_new_tokens=128)   # shorter reasoning at ratio 0.6   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..methods.nlp.tokenskip import MODULE_NAME
    from ..training import LR_SCHEDULES, _batch_order, _prepare_checkpoint, _resumable_step, lr_factor, save_trained

    _check_settings(steps=steps, batch_size=batch_size, lr=lr, seed=seed, save_every=save_every,
                    max_grad_norm=max_grad_norm, train_problems=train_problems)
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}",
                          field="lr_schedule")
    if method is None:
        method, classifier = default_compressor(classifier)
    if method not in ("llmlingua", "llmlingua2"):
        raise ConfigError(f"method: expected 'llmlingua' or 'llmlingua2', got {method!r}", field="method")
    rng_state = torch.random.get_rng_state()
    try:
        cfg = _attach(model, tokenizer, reduction, ratio, ratios, rank, alpha)
        if examples is None:
            problems = problems if problems is not None else generate_problems(train_problems or steps * batch_size,
                                                                               "train", seed)
            examples = tokenskip_examples(problems, tokenizer, cfg, seed=seed, method=method, classifier=classifier,
                                          scorer=scorer, progress=progress)
        if not examples:
            raise ConfigError("examples: expected at least one training example", field="examples")
        from ..integration.wiring import MODULES_ATTR

        lora = model._modules[MODULES_ATTR][MODULE_NAME]
        lora.reset_parameters(seed)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        params = list(lora.parameters())
        for parameter in params:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        fingerprint = _fingerprint(examples, reduction=cfg.to_dict(), lr=lr, batch_size=batch_size, seed=seed,
                                   lr_schedule=lr_schedule, max_grad_norm=max_grad_norm)
        state = {"step": 0, "losses": [], "fingerprint": fingerprint, "examples": len(examples),
                 "compression": compression_summary(examples), "seconds": 0.0}
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, lora, optimizer, params, state)
        order = _batch_order(len(examples), steps * batch_size, True, torch.Generator().manual_seed(seed))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = model.get_input_embeddings().weight.device
        was_training = model.training
        model.eval()  # no dropout in the frozen model: the LoRA learns against the model it will run in
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train tokenskip", disable=not progress)
        start = time.perf_counter()
        for step in range(state["step"], steps):
            batch = [examples[i] for i in order[step * batch_size:(step + 1) * batch_size]]
            length = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), length), pad, dtype=torch.long)
            labels = torch.full((len(batch), length), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, example in enumerate(batch):
                n = len(example["input_ids"])
                ids[row, :n] = torch.tensor(example["input_ids"])
                labels[row, :n] = torch.tensor(example["labels"])
                mask[row, :n] = 1
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(lr_schedule, step, steps)
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, lora, save_every, steps,
                            max_grad_norm=max_grad_norm)
        bar.close()
        state["seconds"] = round(state.get("seconds", 0.0) + time.perf_counter() - start, 2)
        for parameter in params:
            parameter.requires_grad_(False)
        model.train(was_training)
        if output_dir is not None:
            save_trained(output_dir, model, tokenizer, TRAINING_STATE, state, _model_card(model, cfg, state, method))
    finally:
        torch.random.set_rng_state(rng_state)
    model.train_losses = list(state["losses"])
    model.tokenskip_compression = state["compression"]
    return model


def _model_card(model, cfg, state: dict, method: str) -> str:
    base = getattr(model, "name_or_path", "") or type(model).__name__
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None
    losses = state["losses"]
    final = mean_ends(losses)[1]
    fp = state["fingerprint"]
    rows = "\n".join(f"| {r['ratio']} | {r['examples']} | {r['achieved']:.3f} |" for r in state["compression"])
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- tokenskip
- chain-of-thought-compression
- hf_tokred
{f"base_model: {base}{chr(10)}" if hub_id else ""}---

# TokenSkip LoRA for `{base}` (hf_tokred)

A TokenSkip adapter (Xia et al., arXiv 2502.12067): with it the model writes its step-by-step reasoning
compressed to the ratio it is asked for ({", ".join(str(r) for r in cfg.ratios)}; configured: {cfg.ratio}).
`model.safetensors` holds the unchanged base model; the LoRA (rank {cfg.rank}, alpha {cfg.alpha}) is in
`token_reduction.safetensors` and the ratio with its control tokens in `config.json["token_reduction"]`.

```python
import hf_tokred
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this folder>")          # adapter + control re-attached
model = AutoModelForCausalLM.from_pretrained("<this folder>", token_reduction={{**model.config.token_reduction, "ratio": 0.9}})
```

Without hf_tokred the same folder loads as the plain base model.

## Training

- data: {state["examples"]} arithmetic word problems generated by `hf_tokred.recipes.tokenskip` (answers checked
  by Python), reasoning compressed with `{method}` (digits, `Step` and `=` kept)
- steps: {state["step"]}, batch size {fp["batch_size"]}, learning rate {fp["lr"]} ({fp["lr_schedule"]}), seed {fp["seed"]}
- final training loss (mean of the last {min(10, len(losses))} steps): {final:.4f}
- data fingerprint (SHA-256 of the examples): `{fp["data_sha256"]}`

| requested ratio | examples | achieved ratio (reasoning tokens) |
|---|---|---|
{rows}

`checkpoint/` (optimizer state, for resuming) is not needed for inference.
"""


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_tokenskip(model, tokenizer, problems: list[Problem], *, batch_size: int = 16, max_new_tokens: int = 128,
                       progress: bool = False) -> dict:
    """Greedy answers of ``model`` (with whatever reduction is attached) to ``problems``: accuracy and length.

    Prompts are :func:`prompt_ids` (the attached tokenskip reduction appends its control), left-padded batches of
    ``batch_size``. Returns ``accuracy`` (the parsed answer equals the Python one), ``mean_tokens`` (tokens
    generated before the end token), ``problems``, ``seconds`` and ``outputs`` (the decoded texts).

    Example:
        >>> from hf_tokred.recipes.tokenskip import evaluate_tokenskip, generate_problems
        >>> evaluate_tokenskip(model, tokenizer, generate_problems(32, "heldout"))["accuracy"]  # doctest: +SKIP
        0.25
    """
    from tqdm.auto import tqdm

    from ..prompt.base import pad_batch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = model.get_input_embeddings().weight.device
    correct, lengths, outputs = 0, [], []
    start = time.perf_counter()
    for begin in tqdm(range(0, len(problems), batch_size), desc="tokenskip eval", disable=not progress):
        chunk = problems[begin:begin + batch_size]
        ids, mask = pad_batch([prompt_ids(tokenizer, p.question) for p in chunk], pad, left=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for problem, row in zip(chunk, out[:, ids.shape[1]:].tolist()):
            length = row.index(eos) if eos in row else len(row)
            text = tokenizer.decode(row[:length], skip_special_tokens=True)
            lengths.append(length)
            outputs.append(text)
            correct += parse_answer(text) == problem.answer
    return {"accuracy": correct / len(problems), "mean_tokens": sum(lengths) / len(lengths), "problems": len(problems),
            "seconds": round(time.perf_counter() - start, 2), "outputs": outputs}


# ---------------------------------------------------------------------------------------------
# hf-tokred train tokenskip
# ---------------------------------------------------------------------------------------------

DESCRIPTION = """\
tokenskip: TokenSkip's LoRA (arXiv 2502.12067) on the embedded SmolLM2-135M-Instruct. Arithmetic word problems
with step-by-step solutions are generated and checked by Python, each solution's reasoning is compressed at a
ratio drawn from 0.5-1.0 (llmlingua2 if a classifier is given or ~/.cache/hf_tokred/llmlingua2-minilm exists,
else llmlingua scored by SmolLM2; digits kept), and a rank-8 LoRA learns to write the compressed reasoning after
the ratio's control tokens. The folder it writes loads with AutoModelForCausalLM.from_pretrained(DIR): the
adapter and the ratio (--ratio) come back with it. At the end the held-out problems are evaluated.

examples:
  hf-tokred train tokenskip                                   ~8 min on 2 CPU cores (100 steps of 4)
  hf-tokred train tokenskip --uncompressed --output ./smollm2-cot   the baseline: uncompressed traces only
"""


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train tokenskip`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "tokenskip"]).ratio
        0.6
    """
    from ..cli import _float_in, _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "tokenskip", help="TokenSkip's LoRA on SmolLM2: shorter reasoning at a "
                              "chosen ratio", description=DESCRIPTION, output="smollm2-tokenskip (smollm2-cot with "
                              "--uncompressed)", steps=100, corpus=False)
    train.add_argument("--batch-size", type=_positive_int, default=4, help="examples per step (default: 4)")
    train.add_argument("--lr", type=_float_in(1e-7, 1.0), default=5e-4, help="learning rate (default: 5e-4)")
    train.add_argument("--ratio", type=_float_in(0.5, 1.0), default=0.6, choices=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                       metavar="{0.5,...,1.0}", help="the ratio saved with the model (default: 0.6)")
    train.add_argument("--uncompressed", action="store_true",
                       help="the baseline: train on uncompressed traces only (ratio 1.0)")
    train.add_argument("--classifier", metavar="DIR", help="llmlingua2 classifier folder for the compression")
    train.add_argument("--heldout", type=_positive_int, default=48, help="held-out problems evaluated (default: 48)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train the LoRA on the embedded SmolLM2, save it, evaluate the held-out problems."""
    from ..cli import _log, format_table
    from ..embedded import load_smollm2
    from . import recipe_output

    model, tokenizer = load_smollm2()
    output = recipe_output(args, "smollm2-cot" if args.uncompressed else "smollm2-tokenskip")
    ratios, ratio = ((1.0,), 1.0) if args.uncompressed else ((0.5, 0.6, 0.7, 0.8, 0.9, 1.0), args.ratio)
    method, classifier = default_compressor(args.classifier)
    _log(f"tokenskip: {args.steps} steps of {args.batch_size}, ratios {list(ratios)}, compression by {method}")
    train_tokenskip(model, tokenizer, ratio=ratio, ratios=ratios, steps=args.steps, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, method=method, classifier=classifier, output_dir=output,
                    progress=not args.no_progress)
    print(f"saved to {output}: AutoModelForCausalLM.from_pretrained({output!r}) re-attaches the adapter at ratio {ratio}")
    print(format_table(["requested ratio", "examples", "achieved"],
                       [[str(r["ratio"]), str(r["examples"]), f"{r['achieved']:.3f}"] for r in model.tokenskip_compression],
                       right={1, 2}))
    result = evaluate_tokenskip(model, tokenizer, generate_problems(args.heldout, "heldout", args.seed),
                                progress=not args.no_progress)
    print(format_table(["held-out", "value"], [["problems", str(result["problems"])],
                                               ["accuracy", f"{result['accuracy']:.3f}"],
                                               ["mean tokens generated", f"{result['mean_tokens']:.1f}"]], right={1}))
    return 0


__all__ = ["Problem", "check_problem", "compress_trace", "compression_summary", "evaluate_tokenskip",
           "generate_problems", "parse_answer", "prompt_ids", "tokenskip_examples", "train_tokenskip"]
