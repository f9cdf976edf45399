"""Compressed KV storage benchmark (KIVI, KVQuant, MiniCache): ``hf-tokred kv-storage``.

On the embedded SmolLM2-135M-Instruct, for the dense cache, each storage config, an eviction policy
composed with a storage, and transformers' built-in ``QuantizedCache`` (quanto backend, the anchor)
at the same bit widths:

``ppl``
    Teacher-forced perplexity on ``--tokens`` tokens (default 4,096) of Python standard-library source
    (``argparse``, ``textwrap``, ``json.decoder``, ... concatenated), fed through the cache in chunks of
    ``--chunk`` tokens: every chunk attends to the stored (compressed) cache of the earlier chunks and
    to itself in full precision, as in generation; every token but the first is scored. KVQuant is
    calibrated first on *other* text, never the evaluation text: 2,048 tokens of standard-library
    source (``difflib``, ``string``) and 2,048 tokens of English prose (``pydoc_data.topics``).
``memory``
    Measured on the cache the perplexity run leaves behind (``--tokens`` tokens stored): the resident
    bytes of the tensors it holds (``cache.kv_bytes()``: packed codes, scales, full-precision tails,
    outliers, positions), and the per-step peak of one more decoding step: resident bytes plus the
    largest transient a layer's store allocated in that step (the dequantized keys/values returned to
    attention and the scratch of one dequantization chunk). The dense and ``QuantizedCache`` peaks are
    resident plus one layer's full-precision keys/values (the copy ``torch.cat`` / dequantization makes).
    Ratios are against the dense cache held in bfloat16 (the same element count, 2 bytes each).
``passkey``
    :mod:`hf_tokred.bench.passkey` (about 1,050 tokens), ``--samples`` samples of seed ``--seed``.

Example:
    >>> from hf_tokred.bench.kvstorage import STORAGE_CONFIGS
    >>> STORAGE_CONFIGS["kivi-2"]
    {'method': 'kivi', 'bits': 2}
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import sys
import time

import torch

from ..compat import CACHE_KWARG
from .common import new_cache

# label -> config (None = dense); "quanto-N" labels are transformers' QuantizedCache
STORAGE_CONFIGS: dict[str, dict | None] = {
    "dense": None,
    "kivi-4": {"method": "kivi", "bits": 4},
    "kivi-2": {"method": "kivi", "bits": 2},
    # earlier defaults and the variants measured on the way (docs/kv.md), spelled out so they keep their meaning
    "kivi-4-g32": {"method": "kivi", "bits": 4, "group_size": 32},
    "kivi-2-g32": {"method": "kivi", "bits": 2, "group_size": 32, "key_outliers": 0},
    "kivi-2-k16": {"method": "kivi", "bits": 2, "group_size": 32, "key_group_size": 16, "key_outliers": 0},
    "kivi-2-k16-c90": {"method": "kivi", "bits": 2, "group_size": 32, "key_group_size": 16, "key_outliers": 0,
                       "key_clip": 0.9},
    "kivi-2-paper": {"method": "kivi", "bits": 2, "group_size": 32, "key_outliers": 0, "key_clip": 1.0,
                     "residual_dtype": "model", "sink_tokens": 0},
    "kivi-2-g16": {"method": "kivi", "bits": 2, "group_size": 16, "key_outliers": 0},
    "kivi-2-o1": {"method": "kivi", "bits": 2, "group_size": 32, "key_outliers": 1, "key_clip": 1.0},
    "kivi-2-o1-c70": {"method": "kivi", "bits": 2, "group_size": 32, "key_outliers": 1, "key_clip": 0.7},
    "kivi-2-o1-c90": {"method": "kivi", "bits": 2, "group_size": 32, "key_outliers": 1, "key_clip": 0.9},
    "kivi-2-k64-o2": {"method": "kivi", "bits": 2, "group_size": 32, "key_group_size": 64, "key_outliers": 2,
                      "key_clip": 1.0},
    # 2 bits without key outliers: smaller than transformers' QuantizedCache at 2 bits (0.1875x)
    "kivi-2-g64": {"method": "kivi", "bits": 2, "group_size": 64, "key_outliers": 0},
    "kivi-2-g64-r64": {"method": "kivi", "bits": 2, "group_size": 64, "residual": 64, "key_outliers": 0},
    "kivi-2-g64-o1-r64": {"method": "kivi", "bits": 2, "group_size": 64, "residual": 64, "key_outliers": 1},
    "kivi-4-g64": {"method": "kivi", "bits": 4, "group_size": 64},
    "kivi-2-v64-k32-o2": {"method": "kivi", "bits": 2, "group_size": 64, "key_group_size": 32, "key_outliers": 2},
    "kivi-2-v64-k64-o3": {"method": "kivi", "bits": 2, "group_size": 64, "key_outliers": 3},
    "kivi-2-v64-k64-o4": {"method": "kivi", "bits": 2, "group_size": 64, "key_outliers": 4},
    "kivi-2-v64-k64-o3-c85": {"method": "kivi", "bits": 2, "group_size": 64, "key_outliers": 3, "key_clip": 0.85},
    "kivi-2-v64-k64-o3-pre": {"method": "kivi", "bits": 2, "group_size": 64, "key_outliers": 3, "pre_rope": True},
    "kivi-2-pre": {"method": "kivi", "bits": 2, "group_size": 32, "key_outliers": 0, "pre_rope": True},
    "kivi-2-pre-o1": {"method": "kivi", "bits": 2, "group_size": 32, "pre_rope": True, "key_outliers": 1},
    "kivi-2-pre-o1-c90": {"method": "kivi", "bits": 2, "group_size": 32, "pre_rope": True, "key_outliers": 1,
                          "key_clip": 0.9},
    "kivi-2-pre-o1-c100": {"method": "kivi", "bits": 2, "group_size": 32, "pre_rope": True, "key_outliers": 1,
                           "key_clip": 1.0},
    "kvquant-3": {"method": "kvquant", "bits": 3},
    "kvquant-3-r128-o2": {"method": "kvquant", "bits": 3, "outlier_fraction": 0.02, "residual": 128},
    "kvquant-3-o4": {"method": "kvquant", "bits": 3, "outlier_fraction": 0.04},
    "minicache": {"method": "minicache"},
    "minicache+kivi-4": {"method": "minicache", "quantize": {"method": "kivi", "bits": 4, "group_size": 32}},
    "snapkv-0.5+kivi-2": {"method": "composed", "reducers": [{"method": "snapkv", "keep": 0.5},
                                                             {"method": "kivi", "bits": 2}]},
    "quanto-4": {"backend": "quanto", "nbits": 4},
    "quanto-2": {"backend": "quanto", "nbits": 2},
}
DEFAULT_RUNS = ("dense", "kivi-4", "kivi-2", "kivi-2-g64", "kvquant-3", "kvquant-3-r128-o2", "minicache",
                "minicache+kivi-4", "snapkv-0.5+kivi-2", "quanto-4", "quanto-2")
EVAL_MODULES = ("argparse", "textwrap", "json.decoder", "json.encoder", "configparser", "shlex")
CALIBRATION_MODULES = ("difflib", "string")
CALIBRATION_TOKENS = 2048  # per calibration text (code, prose)


def prose_text() -> str:
    """English prose shipped with Python: the reference-manual topics of ``pydoc_data.topics``, in key order.

    Example:
        >>> "Assignment statements" in prose_text()
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def stdlib_text(modules) -> str:
    """The concatenated source of standard-library modules (reproducible for one Python version).

    Example:
        >>> "def wrap(" in stdlib_text(["textwrap"])
        True
    """
    import importlib

    parts = []
    for name in modules:
        with open(inspect.getsourcefile(importlib.import_module(name)), encoding="utf-8") as fh:
            parts.append(fh.read())
    return "\n\n".join(parts)


def _is_anchor(label: str) -> bool:
    return label.startswith("quanto")


def _new_cache(model, label: str):
    from transformers import QuantizedCache

    import hf_tokred

    spec = STORAGE_CONFIGS[label]
    if spec is None:
        return new_cache(model)
    if _is_anchor(label):
        return QuantizedCache(backend=spec["backend"], config=model.config, nbits=spec["nbits"])
    return hf_tokred.build_cache(model)


def _tensor_bytes(tensor) -> int:
    if tensor is None:
        return 0
    if hasattr(tensor, "__tensor_flatten__"):  # quanto's packed tensors: data, scale and shift
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def resident_bytes(cache) -> int:
    """Bytes of the key/value tensors a cache holds (TokenReductionCache, DynamicCache or QuantizedCache).

    Example:
        >>> import torch
        >>> from transformers import DynamicCache
        >>> cache = DynamicCache()
        >>> _ = cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
        >>> resident_bytes(cache)
        320
    """
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None))
    return total


def _stores(cache):
    return [layer.store for layer in getattr(cache, "layers", []) if getattr(layer, "store", None) is not None]


def _step_transient(cache, label: str, model) -> int:
    stores = _stores(cache)
    if stores:
        return max(store.max_transient_bytes for store in stores)
    # dense / QuantizedCache: one layer's full-precision keys and values exist next to the resident cache
    from hf_tokred.kv.storage import KVStorageConfig

    heads, dim = KVStorageConfig.kv_heads(model), KVStorageConfig.head_dim(model)
    seen = cache.get_seq_length()
    return 2 * seen * heads * dim * torch.finfo(model.dtype).bits // 8


@torch.no_grad()
def perplexity_run(model, ids: torch.Tensor, label: str, chunk: int) -> dict:
    """Chunked teacher-forced perplexity through one cache, then its memory at the end (see module doc)."""
    cache = _new_cache(model, label)
    nll, count = 0.0, 0
    start_time = time.perf_counter()
    total = ids.shape[-1]
    for start in range(0, total, chunk):
        part = ids[:, start:start + chunk + 1]
        logits = model(input_ids=part[:, :chunk], **{CACHE_KWARG: cache}, use_cache=True).logits
        scored = logits[:, : part.shape[-1] - 1].float()
        targets = part[:, 1:]
        if targets.numel():
            nll += torch.nn.functional.cross_entropy(scored.reshape(-1, scored.shape[-1]), targets.reshape(-1),
                                                     reduction="sum").item()
            count += targets.numel()
    seconds = time.perf_counter() - start_time
    resident = resident_bytes(cache)
    for store in _stores(cache):
        store.max_transient_bytes = 0
    model(input_ids=ids[:, -1:], **{CACHE_KWARG: cache}, use_cache=True)  # one decoding step at full length
    transient = _step_transient(cache, label, model)
    from hf_tokred.kv.storage import KVStorageConfig

    dense_elements = (2 * total * model.config.get_text_config(decoder=True).num_hidden_layers
                      * KVStorageConfig.kv_heads(model) * KVStorageConfig.head_dim(model))
    return {
        "label": label,
        "ppl": math.exp(nll / count),
        "scored_tokens": count,
        "seconds": seconds,
        "resident_bytes": resident,
        "dense_bf16_bytes": dense_elements * 2,
        "resident_vs_dense_bf16": resident / (dense_elements * 2),
        "dense_same_dtype_bytes": dense_elements * model.dtype.itemsize,
        "resident_vs_dense_same_dtype": resident / (dense_elements * model.dtype.itemsize),
        "step_peak_bytes": resident + transient,
        "step_transient_bytes": transient,
    }


def _passkey_anchor(model, tokenizer, samples, label: str) -> dict:
    """Passkey with a transformers QuantizedCache (run_passkey builds only hf_tokred caches)."""
    from .passkey import MAX_NEW_TOKENS, is_correct, prompt_ids

    correct = []
    with torch.no_grad():
        for sample in samples:
            ids, _ = prompt_ids(tokenizer, sample)
            ids = ids.to(model.device)
            output = model.generate(ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: _new_cache(model, label)},
                                    max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    pad_token_id=model.generation_config.pad_token_id)
            correct.append(is_correct(sample, tokenizer.decode(output[0, ids.shape[-1]:], skip_special_tokens=True)))
    return {"accuracy": sum(correct) / len(correct), "correct": correct}


def _with_reduction(model, label: str, calibration_ids):
    """Attach the label's config (calibrating kvquant) and return the config, or None for dense/anchor."""
    import hf_tokred

    spec = STORAGE_CONFIGS[label]
    if spec is None or _is_anchor(label):
        return None
    cfg = hf_tokred.TokenReductionConfig.coerce(spec)
    hf_tokred.apply(model, cfg)
    storage = cfg.get("kv_storage")
    if storage is not None and storage.method == "kvquant":
        from ..methods.kv.kvquant import calibrate

        calibrate(model, calibration_ids)
    return cfg


def run_benchmark(model, tokenizer, runs, *, tokens: int = 4096, chunk: int = 256, samples: int = 20, seed: int = 0,
                  passkey: bool = True, log=print, on_result=None) -> list[dict]:
    """Run every label in ``runs`` (keys of :data:`STORAGE_CONFIGS`) and return one record per label.

    Example:
        >>> records = run_benchmark(model, tokenizer, ["dense", "kivi-2"], tokens=1024, samples=5)  # doctest: +SKIP
    """
    import hf_tokred

    from .passkey import make_passkey_samples, run_passkey

    ids = tokenizer(stdlib_text(EVAL_MODULES), return_tensors="pt").input_ids[:, :tokens].to(model.device)
    if ids.shape[-1] < tokens:
        raise ValueError(f"--tokens: the evaluation text has only {ids.shape[-1]} tokens")
    calibration_ids = [tokenizer(text, return_tensors="pt").input_ids[0, :CALIBRATION_TOKENS]
                       for text in (stdlib_text(CALIBRATION_MODULES), prose_text())]
    passkey_samples = make_passkey_samples(samples, seed) if passkey else []
    records = []
    for label in runs:
        cfg = _with_reduction(model, label, calibration_ids)
        try:
            record = perplexity_run(model, ids, label, chunk)
            record["config"] = None if cfg is None else cfg.to_dict()
            if passkey:
                if _is_anchor(label):
                    result = _passkey_anchor(model, tokenizer, passkey_samples, label)
                else:
                    result = run_passkey(model, tokenizer, passkey_samples, config=cfg, progress=False, warmup=False)
                record["passkey_accuracy"] = result["accuracy"]
                record["passkey_correct"] = result["correct"]
        finally:
            if cfg is not None:
                hf_tokred.remove(model)
        records.append(record)
        log(f"{label}: ppl {record['ppl']:.4f}, resident {record['resident_bytes']:,} B "
            f"({record['resident_vs_dense_bf16']:.3f}x dense bf16), peak {record['step_peak_bytes']:,} B"
            + (f", passkey {record['passkey_accuracy']:.2f}" if passkey else ""))
        if on_result is not None:
            on_result(records)
    return records


def format_results(records: list[dict]) -> str:
    """The results as a table; perplexity and passkey deltas are against the ``dense`` record."""
    from ..cli import _format_bytes, format_table

    dense = next((r for r in records if r["label"] == "dense"), None)
    rows = []
    for r in records:
        delta = "" if dense is None else f"{100 * (r['ppl'] / dense['ppl'] - 1):+.2f}%"
        passkey = "" if "passkey_accuracy" not in r else f"{r['passkey_accuracy']:.2f}"
        rows.append([r["label"], f"{r['ppl']:.4f}", delta, passkey, _format_bytes(r["resident_bytes"]),
                     f"{r['resident_vs_dense_bf16']:.3f}x", f"{r['resident_vs_dense_same_dtype']:.3f}x",
                     _format_bytes(r["step_peak_bytes"])])
    header = ["cache", "ppl", "vs dense", "passkey", "resident KV", "vs dense bf16", "vs dense same dtype", "step peak"]
    return format_table(header, rows, right={1, 2, 3, 4, 5, 6, 7})


def _cmd_kv_storage(args) -> int:
    from ..embedded import load_smollm2
    from ..errors import TokenReductionError

    runs = list(args.runs or DEFAULT_RUNS)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_smollm2(dtype=dtype)

    def save(records):
        if args.json:
            meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                    "dtype": args.dtype, "tokens": args.tokens, "chunk": args.chunk, "samples": args.samples}
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"meta": meta, "records": records}, fh, indent=2)

    try:
        records = run_benchmark(model, tokenizer, runs, tokens=args.tokens, chunk=args.chunk, samples=args.samples,
                                seed=args.seed, passkey=not args.no_passkey, log=lambda m: print(m, flush=True),
                                on_result=save)
    except (TokenReductionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_results(records))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    return 0


def add_command(subparsers) -> None:
    """Add ``kv-storage`` to the ``hf-tokred`` command line."""
    from ..cli import _choices, _positive_int

    parser = subparsers.add_parser(
        "kv-storage",
        help="compressed KV storage (kivi, kvquant, minicache) vs dense and transformers' QuantizedCache",
        description=__doc__.split("Example:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=_choices(STORAGE_CONFIGS, "runs"), default=None,
                        help=f"comma-separated labels (default: all): {', '.join(STORAGE_CONFIGS)}")
    parser.add_argument("--tokens", type=_positive_int, default=4096, help="perplexity tokens (default 4096)")
    parser.add_argument("--chunk", type=_positive_int, default=256, help="tokens per forward pass (default 256)")
    parser.add_argument("--samples", type=_positive_int, default=20, help="passkey samples (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="passkey seed (default 0)")
    parser.add_argument("--no-passkey", action="store_true", help="skip passkey retrieval")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.set_defaults(handler=_cmd_kv_storage)


__all__ = ["STORAGE_CONFIGS", "add_command", "format_results", "perplexity_run", "prose_text", "resident_bytes",
           "run_benchmark", "stdlib_text"]
