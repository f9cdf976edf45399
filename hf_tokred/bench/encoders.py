"""The encoder benchmark: ``hf-tokred encoders``.

Three parts, chosen with ``--part`` (default: the first two):

``quality``
    The real all-MiniLM-L6-v2 (embedded, :func:`hf_tokred.embedded.load_minilm`) embeds a fixed set of
    stdlib texts (:func:`stdlib_texts`: prose paragraphs of ``pydoc_data.topics`` joined and truncated to
    exactly 64, 128, 192 or 256 tokens, so a batch holds no padding and FLOPs are those of real tokens).
    Sentence embeddings are what sentence-transformers computes: the attention-masked mean of
    ``last_hidden_state``, L2-normalized; with a reduction the mean is weighted by each output token's size
    (:func:`hf_tokred.integration.encoders.token_sizes`: how many input tokens it stands for), which is the
    mean pooling of the restored sequence. Each method runs at several settings; a row reports the FLOPs
    saved against the dense model (counted by ``torch.utils.flop_counter.FlopCounterMode`` over the whole
    run: every matmul, including the methods' own matching and predictors) and the cosine similarity of
    its embeddings to the dense ones (mean, 5th percentile, min). For every method the cosine at exactly
    30 % FLOPs saved is interpolated on its curve. ``dynamicvit`` predictors are trained first
    (:func:`hf_tokred.training.train_dynamicvit`) on other stdlib texts than the
    evaluation set; ``diffrate`` schedules are calibrated on those training texts for each FLOPs target.
``speed``
    ViT-B/16 (``ViTConfig()`` defaults, random weights) at 224x224, batch 8, under ``torch.inference_mode``
    with the process's thread count. Every variant (dense, each method at one setting that removes about
    as many tokens as ToMe ``r=16``, and a *drop-16 (no matching)* reference that cuts the last 16 tokens
    where the methods reduce, without scoring) is timed once per repetition, the variants interleaved
    (dense, m1, m2, ..., dense, m1, ...), and the table shows medians, the speed-up its FLOP count
    predicts (dense FLOPs / its FLOPs), the measured speed-up and their ratio.
``video``
    ``VideoMAEModel`` and ``TimesformerModel`` (ViT-B/16 blocks, 16 frames, random weights): FLOPs and time of
    dense, TokenLearner and TESTA (:func:`hf_tokred.bench.video.run_video`).

Example:
    >>> from hf_tokred.bench.encoders import stdlib_texts
    >>> from hf_tokred.embedded import load_minilm
    >>> model, tokenizer = load_minilm()                                                   # doctest: +SKIP
    >>> texts = stdlib_texts(tokenizer, 8)                                                 # doctest: +SKIP
    >>> [t.tokens for t in texts[:4]]                                                      # doctest: +SKIP
    [64, 128, 192, 256]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from .common import median

PARTS = ("quality", "speed", "video")
DEFAULT_PARTS = ("quality", "speed")
TEXT_LENGTHS = (64, 128, 192, 256)
DEFAULT_TEXTS = 192
DEFAULT_BATCH = 16
DEFAULT_REPEATS = 5
TARGET_SAVED = 0.30
TARGET_COSINE = 0.97
TARGET_TOME_SPEEDUP = 1.8
TARGET_SPEEDUP_RATIO = 0.85
DROP_REFERENCE = "drop-16 (no matching)"

# The curves of the quality part, swept on MiniLM (6 blocks): (label, method, settings). The sentence embedding
# is the size-weighted mean of the output tokens (a merged token counts once per input token it carries, a pruned
# token not at all). restore_length=True is not used: it would put pruned tokens back with the state they had
# when dropped (an early layer's), which pulls the mean away (evit without fusion, keep 0.7: cosine 0.37 instead
# of 0.93). Ratio-style fields make one setting fit texts of every length.
_KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5)
QUALITY_VARIANTS: list[tuple[str, str, list[dict]]] = [
    ("tome", "tome", [{"ratio": x} for x in (0.05, 0.1, 0.15, 0.2, 0.25)]),
    # dense around 30 % saved: the learned methods are compared with ToMe hidden at their own FLOPs, and its curve
    # bends there (a chord from 25.5 % to 36.2 % sits up to 0.0017 below the measured points)
    ("tome (hidden)", "tome", [{"ratio": x, "metric": "hidden"}
                               for x in (0.05, 0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.2, 0.25)]),
    ("evit", "evit", [{"keep_rate": k} for k in _KEEP_RATES]),
    ("ats", "ats", [{"keep_rate": k} for k in _KEEP_RATES]),
    ("zero_tprune", "zero_tprune", [{"keep_rate": k} for k in _KEEP_RATES]),
    ("atc", "atc", [{"keep_rate": k} for k in _KEEP_RATES]),
    ("tps", "tps", [{"keep_rate": k} for k in _KEEP_RATES]),
    ("diffrate", "diffrate", [{"flops_target": f} for f in (0.9, 0.8, 0.7, 0.6)]),
    # One stage before block 2 of 6 with narrow predictors: on MiniLM's mean-pooled embedding a pruned token is lost
    # from the mean wherever it is pruned, so one stage keeps more tokens to the end than the paper's three
    # (48 texts, frozen backbone: 0.955 at 32.5 % saved vs 0.920 at 34.7 % for keep 0.7 at blocks 1, 3, 4).
    ("dynamicvit", "dynamicvit", [{"keep_rate": k, "layers": [2], "predictor_dim": 96} for k in (0.6, 0.5, 0.4)]),
]
# The wave-2 learned methods, at the settings of docs/encoders.md ("Learned pruners on MiniLM"); run with --method
# (each trains for minutes to tens of minutes, so the default run leaves them out).
WAVE2_QUALITY_VARIANTS: list[tuple[str, str, list[dict]]] = [
    ("ia_red2", "ia_red2", [{"keep_rate": k, "layers": [2], "select": "top_k"} for k in (0.6, 0.55, 0.5)]),
    ("spvit", "spvit", [{"keep_rate": k, "layers": [2], "selector_dim": 96, "prop_attn": True} for k in (0.6, 0.5)]),
    ("tocom", "tocom", [{"ratio": r, "source_ratio": 0.0, "rank": 4, "metric": "hidden"} for r in (0.1, 0.15)]),
    # One halting point (before block 2); top_k halts the prior's share of every row: 30.5 and 34.0 % by the prior
    # (30.1 and 33.2 % measured with the heads' cost and per-row rounding; docs/encoders.md).
    ("avit", "avit", [{"target_depth": t, "layers": [2], "prior_std": 3.0, "eps": 0.5, "select": "top_k"}
                      for t in (0.73, 0.66)]),
    # Blocks 2-5 with a falling slow-path fraction (block 2 keeps the most), chosen training-free on training texts,
    # ranked by the previous block's attention alone (ema=0, chosen on validation texts; docs/encoders.md): 30.0 %
    # saved. Its figure is with --train-lr 5e-5.
    ("evo_vit", "evo_vit", [{"layers": [2, 3, 4, 5], "keep_rates": [0.7, 0.6, 0.45, 0.4], "ema": 0.0}]),
    # Blocks 2-5 on semantic tokens (recovered after the last block), 3 refinements: about 28 and 31.5 % saved on
    # MiniLM; chosen training-free on training texts (docs/encoders.md).
    ("stvit", "stvit", [{"ratio": r, "start": 2, "end": 6, "iterations": 3} for r in (0.55, 0.5)]),
]
_DYNAMICVIT_SETTINGS = next(settings for _, method, settings in QUALITY_VARIANTS if method == "dynamicvit")
# Methods whose settings are learned on the training texts before they are evaluated.
LEARNED = ("diffrate", "dynamicvit")

# One setting per method on ViT-B/16 (12 blocks, 197 tokens): ToMe r=16 as in the target, the pruning methods at
# their papers' setting (keep 0.7 at blocks 3, 6, 9), DiffRate at a hand-set schedule removing 16 tokens per block.
SPEED_VARIANTS: list[tuple[str, str, dict]] = [
    ("tome", "tome", {"r": 16}),
    ("tome (hidden)", "tome", {"r": 16, "metric": "hidden"}),
    ("evit", "evit", {"keep_rate": 0.7}),
    ("ats", "ats", {"keep_rate": 0.7}),
    ("zero_tprune", "zero_tprune", {"keep_rate": 0.7}),
    ("atc", "atc", {"keep_rate": 0.7}),
    ("tps", "tps", {"keep_rate": 0.7}),
    ("diffrate", "diffrate", {"prune": [8] * 12, "merge": [8] * 12}),
    ("dynamicvit", "dynamicvit", {"keep_rate": 0.7}),
    # Wave 2, each at its paper's or fragment's setting (untrained learned parts: speed does not depend on them,
    # except A-ViT's halting, whose untrained heads halt every patch by block 8 at target_depth 0.7).
    ("avit", "avit", {"target_depth": 0.7}),
    ("ia_red2", "ia_red2", {"keep_rate": 0.7, "select": "top_k"}),
    ("evo_vit", "evo_vit", {"keep_rate": 0.5}),
    ("stvit", "stvit", {"ratio": 0.25}),
    ("spvit", "spvit", {"keep_rate": 0.7}),
    ("tocom", "tocom", {"r": 16, "source_r": 8, "rank": 4}),
    ("tokenlearner", "tokenlearner", {"num_tokens": 8}),  # before block 6 of 12 (the middle, its default)
]
METHODS = tuple(dict.fromkeys(method for _, method, _ in QUALITY_VARIANTS))  # the default run
QUALITY_VARIANTS += WAVE2_QUALITY_VARIANTS

COMMAND_DESCRIPTION = f"""\
Encoder token reduction: quality of sentence embeddings on the real all-MiniLM-L6-v2 against FLOPs saved
(every method at several settings; the curve as a table, JSON and PNG) and speed of ViT-B/16 (224x224,
batch 8, random weights) on this machine: images/s of dense, every method and a drop-16 reference, with
the speed-up its FLOP count predicts and the one measured.

Targets: mean cosine >= {TARGET_COSINE} at about {TARGET_SAVED:.0%} fewer FLOPs for the best training-free method;
ToMe r=16 >= {TARGET_TOME_SPEEDUP}x dense; measured speed-up >= {TARGET_SPEEDUP_RATIO} x the FLOP-predicted one.

examples:
  hf-tokred encoders --threads 1                       both parts, every method (about 30 minutes on 2 cores)
  hf-tokred encoders --part quality --plot curve.png   the quality curve and its plot
  hf-tokred encoders --part speed --method tome --repeats 9
  hf-tokred encoders --json encoders.json              also write every number to a JSON file
"""


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSample:
    """One evaluation text: ``text`` tokenizes to at least ``tokens`` tokens and is truncated to exactly that."""

    tokens: int
    text: str


def _prose_paragraphs() -> list[str]:
    """Prose paragraphs of ``pydoc_data.topics`` (code blocks, which are indented, left out), in topic order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            if block.strip() and not block.startswith((" ", "\t")):
                paragraphs.append(" ".join(block.split()))
    return paragraphs


def stdlib_texts(tokenizer, count: int, lengths: tuple[int, ...] = TEXT_LENGTHS, skip: int = 0) -> list[TextSample]:
    """A fixed, deterministic list of ``count`` stdlib texts cycling through ``lengths`` (tokens, with [CLS]/[SEP]).

    Consecutive prose paragraphs of ``pydoc_data.topics`` are joined until the text reaches the next length;
    the first ``skip`` texts of the sequence are passed over (the benchmark evaluates on texts ``0..count``
    and trains DynamicViT / calibrates DiffRate on texts after them). When the topics run out, docstrings of
    stdlib modules continue the stream (texts 0-566 come from the topics and the docstrings of
    ``_DOC_MODULES``; then the docstrings of every stdlib source file, about 2,000 texts more).

    Example:
        >>> from hf_tokred.bench.encoders import stdlib_texts
        >>> from hf_tokred.embedded import load_minilm
        >>> _, tokenizer = load_minilm()                                                   # doctest: +SKIP
        >>> [t.tokens for t in stdlib_texts(tokenizer, 5)]                                 # doctest: +SKIP
        [64, 128, 192, 256, 64]
    """
    if count < 1:
        raise ValueError(f"stdlib_texts: count must be >= 1, got {count}")
    out = paragraph_texts(tokenizer, _paragraph_stream(), count, lengths, skip)
    if len(out) == count:
        return out
    raise ValueError(f"stdlib_texts: the stdlib holds only {len(out)} texts after skipping {skip}; asked for {count}")


def paragraph_texts(tokenizer, paragraphs, count: int, lengths: tuple[int, ...] = TEXT_LENGTHS,
                    skip: int = 0) -> list[TextSample]:
    """Up to ``count`` texts cut from the ``paragraphs`` stream as :func:`stdlib_texts` cuts the stdlib's: paragraphs
    are joined until the text reaches the next of ``lengths`` (tokens, with [CLS]/[SEP]; cycling), the first
    ``skip`` texts passed over. Fewer than ``count`` when the stream runs out.

    Example:
        >>> from hf_tokred.bench.encoders import paragraph_texts
        >>> from hf_tokred.embedded import load_minilm
        >>> _, tokenizer = load_minilm()                                                   # doctest: +SKIP
        >>> [t.tokens for t in paragraph_texts(tokenizer, ["a b c"] * 200, 3, (8, 16))]    # doctest: +SKIP
        [8, 16, 8]
    """
    out: list[TextSample] = []
    current = ""
    index = 0
    for paragraph in paragraphs:
        current = f"{current} {paragraph}".strip()
        target = lengths[index % len(lengths)]
        if len(tokenizer(current)["input_ids"]) >= target:
            if index >= skip:
                out.append(TextSample(target, current))
                if len(out) == count:
                    break
            index += 1
            current = ""
    return out


_DOC_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
                "inspect", "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3",
                "statistics", "string", "subprocess", "tarfile", "threading", "unittest", "zipfile")


def _paragraph_stream():
    """Every paragraph of :func:`stdlib_texts`, in order: the topics, the docstrings of ``_DOC_MODULES``, then the
    docstrings of the stdlib's source files not seen before (appended last, so that the earlier texts, the
    evaluation and calibration texts among them, stay exactly what they were)."""
    seen = set()
    for paragraph in itertools.chain(_prose_paragraphs(), _module_docstrings()):
        seen.add(paragraph)
        yield paragraph
    for paragraph in _source_docstrings():
        if paragraph not in seen:
            seen.add(paragraph)
            yield paragraph


# Folders of the stdlib whose docstrings are not prose for our purposes (tests) or not the stdlib's (site-packages).
_SKIP_SOURCE_DIRS = ("__pycache__", "idlelib", "site-packages", "test", "tests")


def _source_docstrings():
    """Prose paragraphs of the docstrings of every ``.py`` file of the stdlib (:func:`source_docstrings`)."""
    import sysconfig

    return source_docstrings(sysconfig.get_paths()["stdlib"])


def source_docstrings(root: str, skip_dirs: tuple[str, ...] = _SKIP_SOURCE_DIRS):
    """Prose paragraphs (8+ words, no indented code or doctest) of the docstrings (modules, classes, functions) of
    every ``.py`` file under ``root``, read with ``ast`` (nothing imported), files in sorted path order; folders
    named in ``skip_dirs`` or starting with a dot are passed over. Each paragraph is whitespace-normalised.

    Example:
        >>> import os, sysconfig
        >>> from hf_tokred.bench.encoders import source_docstrings
        >>> next(source_docstrings(os.path.join(sysconfig.get_paths()["stdlib"], "json")))[:30]
        'JSON (JavaScript Object Notati'
    """
    import ast

    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip_dirs and not d.startswith("."))
        files += [os.path.join(folder, name) for name in names if name.endswith(".py")]
    for path in sorted(files):
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for block in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    if len(block.split()) >= 8 and not block.startswith((" ", ">>>")):
                        yield " ".join(block.split())


def _module_docstrings():
    """Prose paragraphs of stdlib docstrings (read only if the topics run out)."""
    import importlib
    import inspect

    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        members = [module, *(getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_"))]
        for member in members:
            if getattr(member, "__module__", module.__name__) != module.__name__ and member is not module:
                continue
            doc = inspect.getdoc(member) if (inspect.isclass(member) or inspect.isfunction(member)
                                             or inspect.ismodule(member)) else None
            for block in re.split(r"\n\s*\n", doc or ""):
                if len(block.split()) >= 8 and not block.startswith((" ", ">>>")):
                    yield " ".join(block.split())


def text_batches(tokenizer, texts: list[TextSample], batch_size: int) -> list[dict]:
    """Tokenized batches of texts of one length each (no padding), in a fixed order.

    Example:
        >>> batches = text_batches(tokenizer, stdlib_texts(tokenizer, 8), 4)              # doctest: +SKIP
        >>> [tuple(b["input_ids"].shape) for b in batches]                                 # doctest: +SKIP
        [(2, 64), (2, 128), (2, 192), (2, 256)]
    """
    batches = []
    for length in sorted({t.tokens for t in texts}):
        group = [t.text for t in texts if t.tokens == length]
        for start in range(0, len(group), batch_size):
            batch = tokenizer(group[start:start + batch_size], truncation=True, max_length=length, padding=True,
                              return_tensors="pt")
            batches.append(dict(batch))
    return batches


# ---------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------


def pooled_embeddings(model, batch: dict, reduced: bool) -> torch.Tensor:
    """Sentence embeddings of one batch: masked mean of ``last_hidden_state`` (size-weighted when ``reduced``), normalized.

    Example:
        >>> e = pooled_embeddings(model, batches[0], reduced=False)                        # doctest: +SKIP
        >>> e.norm(dim=-1)                                                                 # doctest: +SKIP
        tensor([1.0000, 1.0000])
    """
    from ..integration.encoders import token_sizes

    hidden = model(**batch).last_hidden_state
    if reduced and hidden.shape[1] != batch["input_ids"].shape[1]:
        weights = token_sizes(model).to(hidden.dtype)
    else:
        weights = batch["attention_mask"].to(hidden.dtype)
    pooled = (hidden * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embed_with_flops(model, batches: list[dict], reduced: bool) -> tuple[torch.Tensor, int]:
    """Embeddings of every batch and the FLOPs the model spent on them (``FlopCounterMode``).

    Example:
        >>> embeddings, flops = embed_with_flops(model, batches, reduced=False)            # doctest: +SKIP
    """
    from torch.utils.flop_counter import FlopCounterMode

    outputs, flops = [], 0
    with torch.inference_mode():
        for batch in batches:
            with FlopCounterMode(display=False) as counter:
                outputs.append(pooled_embeddings(model, batch, reduced))
            flops += counter.get_total_flops()
    return torch.cat(outputs), flops


def cosine_stats(embeddings: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean, 5th percentile and min of the row-wise cosine similarity of two sets of normalized embeddings.

    Example:
        >>> import torch
        >>> from hf_tokred.bench.encoders import cosine_stats
        >>> e = torch.nn.functional.normalize(torch.ones(3, 4), dim=-1)
        >>> cosine_stats(e, e)["mean"]
        1.0
    """
    cos = (embeddings.float() * reference.float()).sum(dim=-1).clamp(-1.0, 1.0)
    return {"mean": round(cos.mean().item(), 6), "p5": round(torch.quantile(cos, 0.05).item(), 6),
            "min": round(cos.min().item(), 6)}


def interpolate_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of ``y`` at ``x`` on a curve of ``(x, y)`` points; None outside their range.

    Example:
        >>> from hf_tokred.bench.encoders import interpolate_at
        >>> interpolate_at([(0.1, 0.99), (0.4, 0.93)], 0.3)
        0.95
    """
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return round(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0), 6)
    if points and points[-1][0] == x:
        return points[-1][1]
    return None


def _registered(methods: list[str]) -> tuple[list[str], list[str]]:
    import hf_tokred

    known = hf_tokred.registered_methods()
    return [m for m in methods if m in known], [m for m in methods if m not in known]


def _config(method: str, params: dict):
    from hf_tokred import TokenReductionConfig

    return TokenReductionConfig(method=method, **params)


def _label(params: dict) -> str:
    def show(value):
        if isinstance(value, list) and len(value) > 4 and len(set(value)) == 1:
            return f"[{value[0]}]*{len(value)}"
        return json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    return ", ".join(f"{k}={show(v)}" for k, v in params.items()) or "-"


def run_quality(methods: list[str] = METHODS, *, texts: int = DEFAULT_TEXTS, batch_size: int = DEFAULT_BATCH,
                train_texts: int = 64, train_steps: int = 40, calibration_texts: int = 32,
                train_backbone: bool = False, train_lr: float | None = None, backbone_lr: float | None = None,
                lr_schedule: str = "constant", shuffle: bool = False, finetune_steps: int = 0,
                finetune_lr: float = 3e-5, variants: list | None = None, log=None) -> dict:
    """The quality part: every variant of the chosen ``methods`` at every setting on MiniLM; the JSON-ready record.

    ``variants`` are ``(label, method, [params, ...])`` (default :data:`QUALITY_VARIANTS`). The learned parts of a learned
    method (DynamicViT's predictors, ...) train for ``train_steps`` steps on ``train_texts`` texts after the
    evaluation set (``hf_tokred.training.train_<method>``, learning rate ``train_lr``, default the method's own),
    one training per setting (``lr_schedule``: constant or decaying learning rate; ``shuffle``: a seeded new order
    of the training batches every pass); with ``train_backbone`` a copy of the model is fine-tuned with them (at
    ``backbone_lr``, distilled from the untouched dense model), so later rows still see the original weights;
    with ``finetune_steps`` a copy's backbone is then fine-tuned through the hard reduction, learned parts fixed
    (:func:`hf_tokred.training.fine_tune_reduced`, ``finetune_lr`` with a linear decay, shuffled batches);
    DiffRate measures its sensitivities once on ``calibration_texts`` of those texts and calibrates a schedule
    per FLOPs target (:func:`hf_tokred.methods.encoder.diffrate.calibrate`).

    Example:
        >>> record = run_quality(["tome"], texts=8, variants=[("tome", "tome", [{"ratio": 0.1}])])  # doctest: +SKIP
        >>> record["rows"][0]["cosine"]["mean"] > 0.9                                             # doctest: +SKIP
        True
    """
    import hf_tokred
    from hf_tokred.embedded import MINILM_HUB_ID, load_minilm

    log = log or (lambda message: None)
    variants = [v for v in (variants or QUALITY_VARIANTS) if v[1] in methods]
    present, missing = _registered(list(dict.fromkeys(m for _, m, _ in variants)))
    model, tokenizer = load_minilm()
    samples = stdlib_texts(tokenizer, texts)
    batches = text_batches(tokenizer, samples, batch_size)
    start = time.perf_counter()
    reference, dense_flops = embed_with_flops(model, batches, reduced=False)
    log(f"dense: {dense_flops / 1e9:.1f} GFLOPs for {texts} texts ({time.perf_counter() - start:.1f} s)")
    learning = {"training": None, "sensitivity": None}

    def training_batches():
        if learning["training"] is None:
            learning["training"] = text_batches(tokenizer, stdlib_texts(tokenizer, train_texts, skip=texts), batch_size)
        return learning["training"]

    rows = []
    for label, method, settings in variants:
        if method not in present:
            continue
        for params in settings:
            started = time.perf_counter()
            extra: dict = {}
            shown = params
            if method == "diffrate":
                params, extra = _calibrated(model, tokenizer, params, learning, texts, calibration_texts,
                                            batch_size, log)
            cfg = _config(method, params)
            # Trained first: methods with learned parts, and those whose recipe trains the backbone for them (evo_vit).
            learned = cfg.learned or f"train_{method}" in training_recipes()
            fine_tune = method == "dynamicvit" and train_backbone
            # ToCom's point is not to re-tune the model: its plug-in alone is trained.
            hard_tune = learned and finetune_steps > 0 and method != "tocom"
            # Training must not leak into later rows (some recipes train the backbone): train a copy, the dense
            # model is its teacher.
            target = copy.deepcopy(model) if learned else model
            hf_tokred.apply(target, cfg)
            try:
                if learned:
                    extra = _train_learned(method, params, target, model, training_batches(), log,
                                           train_steps=train_steps, train_texts=train_texts, train_lr=train_lr,
                                           fine_tune=fine_tune, backbone_only=not cfg.learned,
                                           backbone_lr=backbone_lr, lr_schedule=lr_schedule,
                                           shuffle=shuffle, finetune_steps=finetune_steps if hard_tune else 0,
                                           finetune_lr=finetune_lr)
                embeddings, flops = embed_with_flops(target, batches, reduced=True)
            finally:
                hf_tokred.remove(target)
            row = {"variant": label, "method": method, "setting": _label(shown), "params": params,
                   "flops_saved": round(1 - flops / dense_flops, 6), "cosine": cosine_stats(embeddings, reference),
                   "learned": method in LEARNED or learned, "wall_s": round(time.perf_counter() - started, 2), **extra}
            rows.append(row)
            log(f"{label:14s} {row['setting']:28s} saved {row['flops_saved']:.3f}  cos {row['cosine']['mean']:.4f}")
    at_target = {}
    for label in dict.fromkeys(r["variant"] for r in rows):
        points = [(r["flops_saved"], r["cosine"]["mean"]) for r in rows if r["variant"] == label]
        at_target[label] = interpolate_at([(0.0, 1.0), *points], TARGET_SAVED)
    return {
        "model": MINILM_HUB_ID,
        "texts": texts,
        "text_lengths": list(TEXT_LENGTHS),
        "batch_size": batch_size,
        "dense_gflops": round(dense_flops / 1e9, 3),
        "pooling": "mean of last_hidden_state weighted by token sizes (hf_tokred.integration.encoders.token_sizes), "
                   "L2-normalized",
        "rows": rows,
        "cosine_at_30pct_saved": at_target,
        "not_registered": missing,
    }


def training_recipes() -> set[str]:
    """The ``train_<method>`` functions :mod:`hf_tokred.training` provides (its own and its recipe modules')."""
    from hf_tokred import training

    return {name for name in [*vars(training), *training._RECIPES] if name.startswith("train_")}


def _train_learned(method: str, params: dict, target, teacher, batches: list[dict], log, *, train_steps: int,
                   train_texts: int, train_lr: float | None, fine_tune: bool, backbone_lr: float | None,
                   lr_schedule: str, shuffle: bool, finetune_steps: int, finetune_lr: float,
                   backbone_only: bool = False) -> dict:
    """Train the learned parts of ``target`` (reduced with ``method``) with ``hf_tokred.training.train_<method>``
    (phase 1; ``backbone_only``: the method has no modules of its own and its recipe fine-tunes the backbone, as
    Evo-ViT's and STViT's do), then, with ``finetune_steps``, its backbone through the hard reduction (phase 2,
    :func:`hf_tokred.training.fine_tune_reduced`); ``teacher`` is the untouched dense model. Returns the row's
    training record."""
    from hf_tokred import training

    trainer = getattr(training, f"train_{method}")
    options = {"lr": train_lr} if train_lr is not None else {}
    if method == "dynamicvit":
        options.update(train_backbone=fine_tune, teacher=teacher if fine_tune else None,
                       backbone_lr=backbone_lr if fine_tune else None)
    else:
        options["teacher"] = teacher
    started = time.perf_counter()
    losses = trainer(target, batches, steps=train_steps, lr_schedule=lr_schedule, shuffle=shuffle, **options)
    lr_of_backbone = (backbone_lr or (train_lr or 3e-3) / 100) if fine_tune else train_lr if backbone_only else None
    extra = {"train_steps": train_steps, "train_texts": train_texts, "train_lr": train_lr,
             "train_backbone": fine_tune or backbone_only, "backbone_lr": lr_of_backbone,
             "lr_schedule": lr_schedule, "shuffle": shuffle, "train_s": round(time.perf_counter() - started, 1),
             "final_loss": round(losses[-1], 5)}
    what = ("the backbone (no modules of its own)" if backbone_only
            else "the learned parts and the backbone" if fine_tune else "the learned parts")
    log(f"{method} {_label(params)}: trained {what} in {extra['train_s']:.0f} s "
        f"(loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    if finetune_steps:
        started = time.perf_counter()
        tune_losses = training.fine_tune_reduced(target, batches, teacher=teacher, steps=finetune_steps, lr=finetune_lr)
        extra.update({"finetune_steps": finetune_steps, "finetune_lr": finetune_lr,
                      "finetune_s": round(time.perf_counter() - started, 1),
                      "finetune_final_loss": round(tune_losses[-1], 6)})
        log(f"{method} {_label(params)}: fine-tuned the backbone through the hard reduction in "
            f"{extra['finetune_s']:.0f} s (loss {tune_losses[0]:.5f} -> {tune_losses[-1]:.5f})")
    return extra


# Candidate rates of the benchmark's DiffRate calibration (a coarser grid than the default keeps it to minutes).
_BENCH_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def _calibrated(model, tokenizer, params, learning, texts, calibration_texts, batch_size, log):
    """A DiffRate schedule calibrated for ``params["flops_target"]`` (sensitivities measured once, then reused)."""
    from hf_tokred.methods.encoder.diffrate import calibrate, measure_sensitivity

    started = time.perf_counter()
    if learning["sensitivity"] is None:
        calibration = text_batches(tokenizer, stdlib_texts(tokenizer, calibration_texts, skip=texts), batch_size)
        learning["sensitivity"] = measure_sensitivity(model, calibration, rates=_BENCH_RATES, pooling="mean")
        log(f"diffrate: sensitivities measured on {calibration_texts} texts in {time.perf_counter() - started:.0f} s")
    target = params["flops_target"]
    cfg = calibrate(model, flops_target=target, sensitivity=learning["sensitivity"])
    log(f"diffrate flops_target={target}: prune {cfg.prune}, merge {cfg.merge}")
    return cfg.params(), {"calibration_texts": calibration_texts, "calibrate_s": round(time.perf_counter() - started, 1)}


def format_quality(record: dict) -> str:
    """The quality table (one row per method and setting) and the cosine at 30 % FLOPs saved per method.

    Example:
        >>> print(format_quality(record))                                                  # doctest: +SKIP
    """
    from hf_tokred.cli import format_table

    rows = [[r["variant"], r["setting"], f"{100 * r['flops_saved']:.1f}%", f"{r['cosine']['mean']:.4f}",
             f"{r['cosine']['p5']:.4f}", f"{r['cosine']['min']:.4f}"] for r in record["rows"]]
    lines = [
        f"Quality: {record['model']}, {record['texts']} stdlib texts of {'/'.join(map(str, record['text_lengths']))} "
        f"tokens, dense {record['dense_gflops']:.1f} GFLOPs",
        "",
        format_table(["method", "setting", "FLOPs saved", "cos mean", "cos p5", "cos min"], rows, right={2, 3, 4, 5}),
        "",
        f"mean cosine at {TARGET_SAVED:.0%} FLOPs saved (interpolated on each curve; target >= {TARGET_COSINE} for the "
        "best training-free method; * = learned on other stdlib texts):",
    ]
    learned = {r["variant"] for r in record["rows"] if r.get("learned")}
    for label, value in record["cosine_at_30pct_saved"].items():
        shown = "(curve ends before 30%)" if value is None else f"{value:.4f}"
        lines.append(f"  {label + (' *' if label in learned else ''):16s} {shown}")
    if record.get("not_registered"):
        lines.append(f"not registered (skipped): {', '.join(record['not_registered'])}")
    return "\n".join(lines)


def plot_quality(record: dict, path: str) -> None:
    """Write a PNG of mean cosine against FLOPs saved, one line per method (needs matplotlib).

    Example:
        >>> plot_quality(record, "curve.png")                                              # doctest: +SKIP
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["variant"] for r in record["rows"]):
        points = [(0.0, 1.0), *sorted((r["flops_saved"], r["cosine"]["mean"])
                                      for r in record["rows"] if r["variant"] == label)]
        learned = any(r.get("learned") for r in record["rows"] if r["variant"] == label)
        axis.plot([100 * x for x, _ in points], [y for _, y in points], marker="s" if learned else "o", markersize=3,
                  linestyle="--" if learned else "-", label=label + (" (learned)" if learned else ""))
    axis.axhline(TARGET_COSINE, color="grey", linestyle="--", linewidth=0.8)
    axis.axvline(100 * TARGET_SAVED, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xlabel("FLOPs saved vs dense (%)")
    axis.set_ylabel("mean cosine to dense embeddings")
    axis.set_title(f"{record['model']}: {record['texts']} stdlib texts")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _pyplot():
    from hf_tokred.errors import MissingDependencyError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib, which is not installed; install it with: "
                                     "pip install 'hf_tokred[plot]' (or pip install matplotlib)") from None
    return plt


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------


@dataclass
class SpeedVariant:
    """One timed variant of the speed part: dense, a method config, or the drop reference."""

    name: str
    setting: str
    config: object = None
    drop: int = 0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    flops: int = 0
    tokens_out: int = 0


def vit_config(size: str):
    """``ViTConfig`` of the speed part: ``"base"`` (ViT-B/16 at 224, the defaults) or ``"tiny"`` (for tests).

    Example:
        >>> from hf_tokred.bench.encoders import vit_config
        >>> vit_config("base").hidden_size, vit_config("tiny").num_hidden_layers
        (768, 4)
    """
    from transformers import ViTConfig

    if size == "base":
        return ViTConfig()
    if size == "tiny":
        return ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=128)
    raise ValueError(f"vit_config: size must be 'base' or 'tiny', got {size!r}")


def _time_call(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds (``time.process_time``: this process only, all its threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class DropLast:
    """The *drop-16 (no matching)* reference: a sequence reducer that cuts the last ``count`` tokens in every block.

    It goes through the same wiring (and so the same point inside each block) as the methods, with no scoring
    and no matching, so its speed-up is what shrinking the sequence alone buys.

    Example:
        >>> DropLast(16).schedule(3)
        [16, 16, 16]
    """

    method = "drop-last"
    needs = frozenset()
    reduce_at = "attention"
    restore_length = False
    prop_attn = False

    def __init__(self, count: int):
        self.count = count

    def schedule(self, num_blocks: int) -> list[int]:
        return [self.count] * num_blocks

    def plan(self, ctx):
        from hf_tokred.methods.encoder.base import Reduction

        kept = max(ctx.num_tokens - self.count, ctx.protected, 1)
        keep = torch.arange(kept, device=ctx.hidden.device).expand(ctx.batch_size, kept)
        return Reduction(keep=keep, num_tokens=ctx.num_tokens)


class _Undo:
    def __init__(self):
        self.steps = []

    def add_undo(self, fn):
        self.steps.append(fn)

    def run(self):
        while self.steps:
            self.steps.pop()()


def _attach_drop(model, count: int) -> _Undo:
    from hf_tokred.integration.encoders import wire_sequence_reducer
    from hf_tokred.model_patches import find_adapter

    undo = _Undo()
    try:
        wire_sequence_reducer(model, find_adapter(model), DropLast(count), undo)
    except BaseException:
        undo.run()
        raise
    return undo


def run_speed(methods: list[str] = METHODS, *, size: str = "base", batch: int = 8, repeats: int = DEFAULT_REPEATS,
              variants: list | None = None, drop: int = 16, log=None) -> dict:
    """The speed part: images/s of dense, every method and the drop reference on a random ViT; returns the record.

    ``variants`` are ``(label, method, params)`` (default :data:`SPEED_VARIANTS`), kept when their method is in
    ``methods``. Every variant runs once per repetition, the variants interleaved; medians are reported.

    Example:
        >>> record = run_speed(["tome"], size="tiny", repeats=2)                            # doctest: +SKIP
        >>> [v["name"] for v in record["variants"]]                                        # doctest: +SKIP
        ['dense', 'tome', 'tome (hidden)', 'drop-16 (no matching)']
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import ViTModel

    import hf_tokred

    log = log or (lambda message: None)
    chosen = [v for v in (variants or SPEED_VARIANTS) if v[1] in methods]
    present, missing = _registered(list(dict.fromkeys(m for _, m, _ in chosen)))
    config = vit_config(size)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    timed = [SpeedVariant("dense", "-")]
    for label, method, params in chosen:
        # per-block lists are written for ViT-B's 12 blocks; a smaller test model takes their first entries
        params = {k: v[: config.num_hidden_layers] if isinstance(v, list) else v for k, v in params.items()}
        if method in present:
            timed.append(SpeedVariant(label, _label(params), config=_config(method, params)))
    timed.append(SpeedVariant(DROP_REFERENCE.replace("16", str(drop)), f"cut the last {drop} tokens per block",
                              drop=drop))

    def run(variant: SpeedVariant, count_flops: bool = False) -> tuple[float, float]:
        undo = None
        if variant.config is not None:
            hf_tokred.apply(model, variant.config)
        if variant.drop:
            undo = _attach_drop(model, variant.drop)
        try:
            if count_flops:
                with FlopCounterMode(display=False) as counter:
                    out = model(pixel_values=pixels)
                variant.flops = counter.get_total_flops()
                variant.tokens_out = out.last_hidden_state.shape[1]
                return 0.0, 0.0
            return _time_call(lambda: model(pixel_values=pixels))
        finally:
            if undo is not None:
                undo.run()
            if variant.config is not None:
                hf_tokred.remove(model)

    with torch.inference_mode():
        for variant in timed:  # FLOPs, and a warm-up of every code path
            run(variant, count_flops=True)
            run(variant)
        for repeat in range(repeats):
            for variant in timed:
                wall, cpu = run(variant)
                variant.times.append(wall)
                variant.cpu_times.append(cpu)
            log(f"repetition {repeat + 1}/{repeats}: " + ", ".join(f"{v.name} {v.times[-1]:.3f}s" for v in timed))
    dense = timed[0]
    dense_time, dense_cpu = median(dense.times), median(dense.cpu_times)
    rows = []
    for variant in timed:
        seconds, cpu = median(variant.times), median(variant.cpu_times)
        predicted = dense.flops / variant.flops
        measured = dense_time / seconds
        measured_cpu = dense_cpu / cpu
        rows.append({"name": variant.name, "setting": variant.setting, "median_s": round(seconds, 5),
                     "images_per_s": round(batch / seconds, 3), "gflops": round(variant.flops / 1e9, 3),
                     "tokens_out": variant.tokens_out, "predicted_speedup": round(predicted, 4),
                     "measured_speedup": round(measured, 4), "ratio": round(measured / predicted, 4),
                     "median_cpu_s": round(cpu, 5), "cpu_images_per_s": round(batch / cpu, 3),
                     "measured_speedup_cpu": round(measured_cpu, 4), "ratio_cpu": round(measured_cpu / predicted, 4),
                     "times_s": [round(t, 5) for t in variant.times],
                     "cpu_times_s": [round(t, 5) for t in variant.cpu_times]})
    return {
        "model": f"ViTModel(ViTConfig{'()' if size == 'base' else ' tiny'}), random weights",
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "batch": batch,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "variants": rows,
        "not_registered": missing,
    }


def format_speed(record: dict) -> str:
    """The speed table: images/s, predicted (FLOP) and measured speed-up and their ratio per variant.

    Example:
        >>> print(format_speed(record))                                                    # doctest: +SKIP
    """
    from hf_tokred.cli import format_table

    rows = [[v["name"], v["setting"], str(v["tokens_out"]), f"{v['gflops']:.1f}", f"{v['images_per_s']:.2f}",
             f"{v['predicted_speedup']:.2f}x", f"{v['measured_speedup']:.2f}x", f"{v['ratio']:.2f}",
             f"{v['cpu_images_per_s']:.2f}", f"{v['measured_speedup_cpu']:.2f}x", f"{v['ratio_cpu']:.2f}"]
            for v in record["variants"]]
    lines = [
        f"Speed: {record['model']}, {record['image_size']}x{record['image_size']}, batch {record['batch']}, "
        f"median of {record['repeats']} interleaved repetitions, {record['torch_threads']} threads",
        "",
        format_table(["variant", "setting", "tokens out", "GFLOPs", "images/s", "predicted", "measured", "ratio",
                      "CPU images/s", "measured (CPU)", "ratio (CPU)"], rows, right=set(range(2, 11))),
        "",
        f"predicted = dense FLOPs / variant FLOPs; measured = dense time / variant time (wall clock; CPU: "
        "time.process_time of this process); ratio = measured / predicted "
        f"(target >= {TARGET_SPEEDUP_RATIO}); tome r=16 target >= {TARGET_TOME_SPEEDUP}x. On a loaded machine the CPU "
        "clock with --threads 1 is the reliable one.",
    ]
    if record.get("not_registered"):
        lines.append(f"not registered (skipped): {', '.join(record['not_registered'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": None if load is None else [round(x, 2) for x in load]}


def add_command(subparsers) -> None:
    """Add ``hf-tokred encoders`` to the CLI.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> args = build_parser().parse_args(["encoders", "--part", "speed", "--method", "tome"])
        >>> args.part, args.method
        (['speed'], ['tome'])
    """
    from hf_tokred.cli import _positive_int

    parser = subparsers.add_parser(
        "encoders", help="encoder reduction: MiniLM embedding quality vs FLOPs, ViT-B/16 speed",
        description=COMMAND_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--part", action="append", choices=PARTS, metavar="PART",
                        help="quality, speed or video (VideoMAE and TimeSformer at 16 frames: TokenLearner and TESTA "
                             "against dense), repeatable (default: quality and speed)")
    parser.add_argument("--method", action="append", metavar="M",
                        help=f"a method, repeatable (default: {' '.join(METHODS)})")
    parser.add_argument("--texts", type=_positive_int, default=DEFAULT_TEXTS, metavar="N",
                        help=f"evaluation texts of the quality part (default: {DEFAULT_TEXTS})")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, metavar="N",
                        help=f"texts per batch of the quality part (default: {DEFAULT_BATCH})")
    parser.add_argument("--train-texts", type=_positive_int, default=64, metavar="N",
                        help="texts (after the evaluation set) that train the learned methods (default: 64)")
    parser.add_argument("--train-steps", type=_positive_int, default=40, metavar="N",
                        help="optimizer steps of each learned method's training (default: 40)")
    parser.add_argument("--dynamicvit-keep-rate", type=float, action="append", metavar="RHO",
                        help="a DynamicViT keep_rate of the quality part, repeatable (default: "
                             f"{' '.join(str(p['keep_rate']) for p in _DYNAMICVIT_SETTINGS)})")
    parser.add_argument("--dynamicvit-layers", type=int, nargs="+", metavar="BLOCK",
                        help="blocks before which DynamicViT prunes in the quality part (default: "
                             f"{' '.join(str(b) for b in _DYNAMICVIT_SETTINGS[0]['layers'])})")
    parser.add_argument("--predictor-dim", type=_positive_int, metavar="N",
                        help="width of the DynamicViT predictors (default: the model's hidden size, the paper's)")
    parser.add_argument("--train-lr", type=float, metavar="LR",
                        help="learning rate of the learned parts (default: each method's own; DynamicViT 3e-3)")
    parser.add_argument("--train-backbone", action="store_true",
                        help="DynamicViT: fine-tune a copy of the backbone with the predictors, distilled from the "
                             "dense model (the paper's joint training)")
    parser.add_argument("--backbone-lr", type=float, metavar="LR",
                        help="learning rate of the backbone with --train-backbone (default: --train-lr / 100)")
    parser.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant",
                        help="learned methods' training: learning-rate schedule (default: constant)")
    parser.add_argument("--shuffle", action="store_true",
                        help="learned methods' training: visit the training batches in a new seeded order every pass "
                             "(default: in order, shortest texts first)")
    parser.add_argument("--finetune-steps", type=_positive_int, default=0, metavar="N",
                        help="learned methods: after training their learned parts, fine-tune a copy of the backbone for N "
                             "steps through the hard reduction (learned parts fixed) on the embedding cosine to the dense model "
                             "(default: 0, off)")
    parser.add_argument("--finetune-lr", type=float, default=3e-5, metavar="LR",
                        help="learning rate of --finetune-steps (linear decay to 0; default: 3e-5)")
    parser.add_argument("--fuse", action="store_true",
                        help="DynamicViT: fuse each stage's dropped tokens into one token (fuse=True) instead of "
                             "dropping them")
    parser.add_argument("--calibration-texts", type=_positive_int, default=32, metavar="N",
                        help="texts (after the evaluation set) on which DiffRate calibrates (default: 32)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help=f"torch threads (default: torch.get_num_threads(), {torch.get_num_threads()} here)")
    parser.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS, metavar="N",
                        help=f"interleaved timing repetitions of the speed part (default: {DEFAULT_REPEATS})")
    parser.add_argument("--vit", choices=("base", "tiny"), default="base",
                        help="ViT of the speed part: base (ViT-B/16, 224x224) or tiny (a quick check)")
    parser.add_argument("--batch", type=_positive_int, default=8, metavar="N", help="images per batch (default: 8)")
    parser.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")
    parser.add_argument("--plot", metavar="OUT.png", help="write the quality curve as a PNG (needs matplotlib)")
    parser.set_defaults(handler=_cmd_encoders, parser=parser)


def _cmd_encoders(args) -> int:
    from hf_tokred import __version__

    parser = args.parser
    parts = args.part or list(DEFAULT_PARTS)
    methods = list(dict.fromkeys(args.method or METHODS))
    for path, option in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                parser.error(f"{option}: folder {folder} does not exist")
    for value, option in ((args.train_lr, "--train-lr"), (args.backbone_lr, "--backbone-lr"),
                          (args.finetune_lr, "--finetune-lr")):
        if value is not None and not value > 0:
            parser.error(f"{option}: expected a learning rate > 0, got {value}")
    if args.backbone_lr is not None and not args.train_backbone:
        parser.error("--backbone-lr needs --train-backbone")
    for rate in args.dynamicvit_keep_rate or ():
        if not 0.0 < rate <= 1.0:
            parser.error(f"--dynamicvit-keep-rate: expected a keep_rate in (0, 1], got {rate}")
    variants = None
    if args.dynamicvit_layers is not None and (not args.dynamicvit_layers or min(args.dynamicvit_layers) < 0):
        parser.error(f"--dynamicvit-layers: expected block indices >= 0, got {args.dynamicvit_layers}")
    if args.dynamicvit_keep_rate or args.predictor_dim or args.fuse or args.dynamicvit_layers:
        extra = {k: v for k, v in _DYNAMICVIT_SETTINGS[0].items() if k != "keep_rate"}  # the default placement
        if args.dynamicvit_layers:
            extra["layers"] = list(args.dynamicvit_layers)
        if args.predictor_dim is not None:
            extra["predictor_dim"] = args.predictor_dim
        if args.fuse:
            extra["fuse"] = True
        rates = args.dynamicvit_keep_rate or [p["keep_rate"] for p in _DYNAMICVIT_SETTINGS]
        variants = [(label, method, [{"keep_rate": r, **extra} for r in rates] if method == "dynamicvit" else settings)
                    for label, method, settings in QUALITY_VARIANTS]
    if args.plot:
        if "quality" not in parts:
            parser.error("--plot draws the quality curve; add --part quality")
        _pyplot()
    import hf_tokred

    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in methods if m not in hf_tokred.registered_methods()]
    if unknown and args.method:
        parser.error(f"--method: not registered: {', '.join(unknown)} (see: hf-tokred methods)")
    record = {"hf_tokred_version": __version__, "command": "hf-tokred " + " ".join(getattr(args, "argv", [])),
              "machine": _machine()}
    if "quality" in parts:
        record["quality"] = run_quality(methods, texts=args.texts, batch_size=args.batch_size,
                                        train_texts=args.train_texts, train_steps=args.train_steps,
                                        calibration_texts=args.calibration_texts,
                                        train_backbone=args.train_backbone, train_lr=args.train_lr,
                                        backbone_lr=args.backbone_lr, lr_schedule=args.lr_schedule,
                                        shuffle=args.shuffle, finetune_steps=args.finetune_steps,
                                        finetune_lr=args.finetune_lr, variants=variants, log=_log)
        print(format_quality(record["quality"]))
        print()
        if args.plot:
            plot_quality(record["quality"], args.plot)
            _log(f"wrote {args.plot}")
    if "speed" in parts:
        record["speed"] = run_speed(methods, size=args.vit, batch=args.batch, repeats=args.repeats, log=_log)
        print(format_speed(record["speed"]))
    if "video" in parts:
        from .video import format_video, run_video

        record["video"] = run_video(repeats=args.repeats, log=_log)
        print(format_video(record["video"]))
    record["machine"]["load_average_after"] = _machine()["load_average"]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
        _log(f"wrote {args.json}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = [
    "METHODS",
    "QUALITY_VARIANTS",
    "SPEED_VARIANTS",
    "DropLast",
    "TextSample",
    "add_command",
    "cosine_stats",
    "embed_with_flops",
    "format_quality",
    "format_speed",
    "interpolate_at",
    "paragraph_texts",
    "plot_quality",
    "pooled_embeddings",
    "run_quality",
    "run_speed",
    "source_docstrings",
    "stdlib_texts",
    "text_batches",
    "vit_config",
]
