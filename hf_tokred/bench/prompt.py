"""``hf-tokred prompt`` (compress a file or stdin) and ``hf-tokred prompt-bench`` (measure prompt compressors).

The benchmark runs the KV harness's long-context tasks on the embedded SmolLM2-135M-Instruct as both the
scorer and the answering model: passkey retrieval (:mod:`hf_tokred.bench.passkey`), needle in a haystack and
multi-key retrieval (:mod:`hf_tokred.bench.longctx`). Each prompt is the chat template around the task's
instruction, its haystack (the *context*) and its question; only the haystack is compressed (the question
goes to the compressor, which keeps it), and the compressed haystack is put back in its place. Every method
and rate sees the same samples; greedy answers are correct when they hold the expected number.

Samples come from a split: ``heldout`` (seeds from 1000, the figures to report) or ``tune`` (seed 0 onwards,
where settings such as LongLLMLingua's ``contrast_weight`` were chosen). Rows: the uncompressed prompt, each
of our methods at each rate, and, when ``llmlingua`` 0.2.2 is installed (``pip install
"hf_tokred[llmlingua-reference]"``), Microsoft's package at the same rates on the same samples with the same
local SmolLM2 as its scorer (:mod:`hf_tokred.bench.llmlingua_reference`), and ``lazyllm`` (which prunes the
uncompressed prompt inside prefill) with its time to first token at 2k and 4k tokens. Columns: accuracy per task, the kept
fraction of context tokens, compression time per prompt and throughput (context tokens per second).

Example:
    >>> from hf_tokred.cli import main
    >>> main(["prompt-bench", "--samples", "2", "--rates", "0.5"])                       # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

TEXT_METHODS = ("llmlingua", "longllmlingua", "llmlingua2")
OUR_METHODS = (*TEXT_METHODS, "lazyllm")  # lazyllm prunes inside prefill: one row, no rate, and the TTFT table
REFERENCE_METHODS = ("llmlingua", "longllmlingua")
TASKS = ("passkey", "needle", "multikey")
SPLITS = {"tune": 0, "heldout": 1000}
DEFAULT_RATES = (0.5, 0.33)
DEFAULT_SAMPLES = 10
DEFAULT_CONTEXT = 1024
DEFAULT_TTFT_LENGTHS = (2048, 4096)


@dataclass
class TextSample:
    """One task prompt as text: ``prefix`` + ``context`` (the haystack) + ``query`` (question, template, answer start)."""

    task: str
    prefix: str
    context: str
    question: str
    query: str
    expected: str
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    def prompt(self, tokenizer, context: str | None = None):
        """The :class:`~hf_tokred.bench.common.Prompt` with ``context`` (default: the original) in place."""
        from .common import Prompt, tokenize_parts

        text = self.prefix + (self.context if context is None else context)
        ids, n_context = tokenize_parts(tokenizer, text, self.query)
        return Prompt(ids, n_context, self.expected, self.max_new_tokens, dict(self.meta, task=self.task))


def task_samples(tokenizer, task: str, n: int, *, seed: int, context_length: int = DEFAULT_CONTEXT) -> list[TextSample]:
    """``n`` samples of ``task`` (``passkey``, ``needle``, ``multikey``) as text, about ``context_length`` tokens each.

    Example:
        >>> [s.question for s in task_samples(tokenizer, "passkey", 1, seed=0)]           # doctest: +SKIP
        ['What is the pass key?']
    """
    from . import longctx, passkey

    if task == "passkey":
        # ~25 tokens per filler repeat: the repeats that make the prompt about context_length tokens
        repeats = max(1, round((context_length - 70) / 25))
        out = []
        for sample in passkey.make_passkey_samples(n, seed=seed, filler_repeats=repeats):
            context, query = passkey.build_prompt_parts(tokenizer, sample)
            haystack = sample.haystack()
            out.append(TextSample("passkey", context[:-len(haystack)], haystack, passkey.QUESTION, query,
                                  str(sample.key), passkey.MAX_NEW_TOKENS, {"key": sample.key, "depth": sample.depth}))
        return out
    if task not in ("needle", "multikey"):
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    make = longctx.needle_prompts if task == "needle" else longctx.multikey_prompts
    out = []
    for prompt in make(tokenizer, n, seed=seed, context_length=context_length):
        text = tokenizer.decode(prompt.ids[0], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        context = tokenizer.decode(prompt.ids[0, :prompt.context_tokens], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
        cut = context.index(longctx.NEEDLE_INSTRUCTION) + len(longctx.NEEDLE_INSTRUCTION) + 1  # and its newline
        city = prompt.meta["city"] if task == "needle" else prompt.meta["asked"]
        out.append(TextSample(task, context[:cut], context[cut:], longctx.NEEDLE_QUESTION.format(city=city),
                              text[len(context):], prompt.expected, prompt.max_new_tokens, dict(prompt.meta)))
    return out


def compress_samples(samples: list[TextSample], method: str, rate: float, *, model, tokenizer, reference: bool = False,
                     model_folder: str | None = None, **method_params) -> list[dict]:
    """Compress every sample's context at ``rate`` (the question given, kept); one record per sample.

    ``reference=True`` runs Microsoft's ``llmlingua`` 0.2.2 instead of ours. Each record holds the compressed
    context, its token count, the original's, and the compression time.

    Example:
        >>> records = compress_samples(samples, "longllmlingua", 0.5, model=model, tokenizer=tok)   # doctest: +SKIP
    """
    import hf_tokred
    from hf_tokred.prompt.base import count_tokens

    records = []
    for sample in samples:
        if reference:
            from .llmlingua_reference import reference_compress

            out = reference_compress([sample.context], sample.question, rate=rate, method=method,
                                     model_folder=model_folder)
            compressed = out["compressed_prompt"].rstrip()  # llmlingua appends the question it kept: take it off
            if compressed.endswith(sample.question):
                compressed = compressed[:-len(sample.question)].rstrip()
        else:
            # the budget counts in the answering model's tokenizer; llmlingua2 scores with its classifier instead
            scorer = {"scorer": model, "tokenizer": tokenizer} if method != "llmlingua2" else {}
            out = hf_tokred.compress_prompt(sample.context, sample.question, rate=rate, method=method,
                                            target_tokenizer=tokenizer, **scorer, **method_params)
            compressed = out["compressed_documents"][0]
        records.append({"compressed": compressed, "context_tokens": count_tokens(tokenizer, sample.context),
                        "compressed_context_tokens": count_tokens(tokenizer, compressed), "time_s": out["time_s"],
                        "budget_met": out.get("budget_met")})
    return records


def run_bench(model, tokenizer, *, samples: int = DEFAULT_SAMPLES, split: str = "heldout",
              rates=DEFAULT_RATES, methods=OUR_METHODS, tasks=TASKS, context_length: int = DEFAULT_CONTEXT,
              reference: bool | None = None, model_folder: str | None = None, llmlingua2_classifier=None,
              ttft_lengths=DEFAULT_TTFT_LENGTHS, lazyllm_params: dict | None = None,
              longllmlingua_params: dict | None = None, progress: bool = True, log=None) -> dict:
    """Accuracy, kept fraction and compression time of each method at each rate; see the module docstring.

    ``reference=None`` includes llmlingua 0.2.2 when it is installed. ``llmlingua2_classifier`` is the
    classifier folder for ``llmlingua2`` (the row is skipped, with a note, when there is none). With
    ``lazyllm`` among the methods, its time to first token against dense is measured at ``ttft_lengths``
    prompt tokens (:func:`hf_tokred.bench.lazyllm_ttft.measure_ttft`; empty: skipped); ``lazyllm_params`` are
    its settings (default: the method's defaults); ``longllmlingua_params`` are our ``longllmlingua``'s (its rows'
    labels then name them; llmlingua 0.2.2's rows are not affected).

    Example:
        >>> result = run_bench(model, tokenizer, samples=2, rates=(0.5,))                 # doctest: +SKIP
        >>> [row["label"] for row in result["rows"]][:2]                                  # doctest: +SKIP
        ['dense', 'llmlingua rate=0.5']
    """
    from .common import run_prompts

    log = log or (lambda message: None)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {tuple(SPLITS)}, got {split!r}")
    longllmlingua_params = dict(longllmlingua_params or {})
    if longllmlingua_params:  # a bad setting fails now, naming the field, not after the dense row
        from ..config import TokenReductionConfig

        TokenReductionConfig(method="longllmlingua", **longllmlingua_params)
    lll_settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in longllmlingua_params.items())
    data = {task: task_samples(tokenizer, task, samples, seed=SPLITS[split] + i, context_length=context_length)
            for i, task in enumerate(tasks)}
    if reference is None:
        from .llmlingua_reference import reference_available

        reference = reference_available()
    notes = []
    runs = [("dense", None, None, False)]
    for rate in rates:
        for method in (m for m in methods if m in TEXT_METHODS):
            if method == "llmlingua2" and llmlingua2_classifier is None:
                if rate == rates[0]:
                    notes.append("llmlingua2: no classifier folder (train one: hf-tokred train llmlingua2); row skipped")
                continue
            extra = f" ({lll_settings})" if method == "longllmlingua" and lll_settings else ""
            runs.append((f"{method} rate={rate:g}{extra}", method, rate, False))
        if reference:
            runs += [(f"llmlingua-0.2.2 {m} rate={rate:g}", m, rate, True) for m in REFERENCE_METHODS if m in methods]
    lazyllm = {"method": "lazyllm", **(lazyllm_params or {})}
    if "lazyllm" in methods:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in (lazyllm_params or {}).items())
        runs.append((f"lazyllm ({settings or 'defaults'})", "lazyllm", None, False))
    rows = []
    for label, method, rate, is_reference in runs:
        log(f"{label} ...")
        row = {"label": label, "method": method, "rate": rate, "reference": is_reference, "tasks": {}}
        times, kept, total = [], [], []
        for task, task_data in data.items():
            if method is None or method not in TEXT_METHODS:
                prompts = [s.prompt(tokenizer) for s in task_data]
                records = []
            else:
                params = {"classifier": llmlingua2_classifier} if method == "llmlingua2" else {}
                if method == "longllmlingua" and not is_reference:
                    params = longllmlingua_params
                records = compress_samples(task_data, method, rate, model=model, tokenizer=tokenizer,
                                           reference=is_reference, model_folder=model_folder, **params)
                prompts = [s.prompt(tokenizer, r["compressed"]) for s, r in zip(task_data, records)]
                times += [r["time_s"] for r in records]
                kept += [r["compressed_context_tokens"] for r in records]
                total += [r["context_tokens"] for r in records]
            in_model = lazyllm if method == "lazyllm" else None
            result = run_prompts(model, tokenizer, prompts, config=in_model, progress=progress, desc=f"{label} {task}")
            row["tasks"][task] = {"accuracy": result["accuracy"],
                                  "per_sample": [dict(p, **({k: v for k, v in r.items() if k != "compressed"}))
                                                 for p, r in zip(result["per_sample"], records or [{}] * len(prompts))]}
        row["accuracy"] = sum(t["accuracy"] for t in row["tasks"].values()) / len(row["tasks"])
        if times:
            row["kept"] = sum(kept) / sum(total)
            row["compress_s"] = sum(times) / len(times)
            row["context_tokens_per_s"] = sum(total) / sum(times)
        rows.append(row)
    ttft = []
    if "lazyllm" in methods and ttft_lengths:
        from .lazyllm_ttft import measure_ttft

        log(f"lazyllm time to first token at {', '.join(map(str, ttft_lengths))} tokens ...")
        ttft = measure_ttft(model, tokenizer, prompt_lengths=tuple(ttft_lengths), config=lazyllm)
    return {"split": split, "samples_per_task": samples, "context_length": context_length, "rates": list(rates),
            "rows": rows, "notes": notes, "ttft": ttft}


def format_result(result: dict) -> str:
    """The table of :func:`run_bench`'s result.

    Example:
        >>> print(format_result({"split": "heldout", "samples_per_task": 1, "context_length": 1024, "rates": [0.5],
        ...                      "notes": [], "rows": [{"label": "dense", "tasks": {"passkey": {"accuracy": 1.0}},
        ...                                             "accuracy": 1.0}]}))
        run    passkey  mean acc  context kept  compress s/prompt  context tok/s
        -----  -------  --------  ------------  -----------------  -------------
        dense     1.00      1.00             -                  -              -
        <BLANKLINE>
        held-out split, 1 samples per task, ~1024-token prompts
    """
    from hf_tokred.cli import format_table

    tasks = list(result["rows"][0]["tasks"])
    header = ["run", *tasks, "mean acc", "context kept", "compress s/prompt", "context tok/s"]
    rows = []
    for row in result["rows"]:
        rows.append([row["label"], *(f"{row['tasks'][t]['accuracy']:.2f}" for t in tasks), f"{row['accuracy']:.2f}",
                     f"{row['kept']:.2f}" if "kept" in row else "-",
                     f"{row['compress_s']:.2f}" if "compress_s" in row else "-",
                     f"{row['context_tokens_per_s']:.0f}" if "context_tokens_per_s" in row else "-"])
    split = "held-out" if result["split"] == "heldout" else "tuning"
    lines = [format_table(header, rows, right=set(range(1, len(header)))), "",
             f"{split} split, {result['samples_per_task']} samples per task, ~{result['context_length']}-token prompts"]
    lines += result["notes"]
    if result.get("ttft"):
        ttft = [[str(r["prompt_tokens"]), f"{r['dense_s']:.2f}", f"{r['lazyllm_s']:.2f}", f"{r['speedup']:.2f}x",
                 f"{r['computed_fraction']:.2f}", "yes" if r["same_first_token"] else "no"] for r in result["ttft"]]
        lines += ["", "lazyllm time to first token (median of interleaved runs):",
                  format_table(["prompt tokens", "dense s", "lazyllm s", "speed-up", "tokens x layers",
                                "same first token"], ttft, right={0, 1, 2, 3, 4})]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

COMPRESS_DESCRIPTION = """\
Compress a prompt (a file, or stdin with "-") with a prompt compressor scored by the embedded
SmolLM2-135M-Instruct (or --scorer FOLDER, a local causal LM), print the compressed text, and the
statistics on stderr. Text between <keep> and </keep> is kept verbatim; --question is kept and guides
question-aware methods (longllmlingua). Nothing is downloaded.

examples:
  hf-tokred prompt notes.txt --question "What did we decide?" --rate 0.5
  cat long.txt | hf-tokred prompt - --method llmlingua --target-token 300 --json stats.json
"""

BENCH_DESCRIPTION = f"""\
Prompt compression on the embedded SmolLM2-135M-Instruct as scorer and answering model: passkey,
needle and multi-key retrieval (~{DEFAULT_CONTEXT} tokens); the haystack is compressed, the question kept.
Reports accuracy per task, the kept fraction of the context, compression time and throughput for each
method and rate, beside the uncompressed prompt, and llmlingua 0.2.2 at the same rates when installed
(pip install "hf_tokred[llmlingua-reference]"). lazyllm prunes the uncompressed prompt inside prefill: one
accuracy row, and its time to first token against dense at 2k and 4k tokens. Report the held-out split
(the default).

examples:
  hf-tokred prompt-bench                                   every method at rates 0.5 and 0.33, and lazyllm
  hf-tokred prompt-bench --samples 3 --rates 0.5 --methods longllmlingua
  hf-tokred prompt-bench --methods lazyllm --ttft-lengths 4096
  hf-tokred prompt-bench --json prompt.json
"""


def add_command(subparsers) -> None:
    """Add ``hf-tokred prompt`` and ``hf-tokred prompt-bench`` to the CLI.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["prompt", "-", "--rate", "0.4"]).rate
        0.4
    """
    from hf_tokred.cli import _choices, _float_in, _fractions, _param, _positive_int

    compress = subparsers.add_parser("prompt", help="compress a prompt file or stdin (LLMLingua family)",
                                     description=COMPRESS_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    compress.add_argument("file", help='the prompt text file, or "-" for stdin')
    compress.add_argument("--question", help="the question (kept verbatim, after the context)")
    compress.add_argument("--instruction", help="an instruction (kept verbatim, before the context)")
    budget = compress.add_mutually_exclusive_group()
    budget.add_argument("--rate", type=_float_in(0.001, 1.0), default=0.5,
                        help="fraction of the prompt's tokens to keep (default: 0.5)")
    budget.add_argument("--target-token", type=_positive_int, metavar="N", help="token budget instead of --rate")
    compress.add_argument("--method", default="longllmlingua", help="a prompt compressor (default: longllmlingua)")
    compress.add_argument("--scorer", metavar="FOLDER", help="a local causal LM folder (default: the embedded SmolLM2)")
    compress.add_argument("--classifier", metavar="FOLDER", help="llmlingua2's token-classifier folder")
    compress.add_argument("--force-token", action="append", default=[], metavar="TEXT",
                          help="a string kept wherever it occurs (repeatable)")
    compress.add_argument("--json", metavar="OUT", help="also write the statistics to this JSON file")
    compress.set_defaults(handler=_cmd_prompt)

    bench = subparsers.add_parser("prompt-bench", help="prompt compression accuracy and speed on SmolLM2",
                                  description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--model", default="smollm2", metavar="NAME_OR_PATH",
                       help="scorer and answering model: smollm2 (default), gemma3 or a local causal-LM folder")
    bench.add_argument("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N",
                       help=f"samples per task (default: {DEFAULT_SAMPLES})")
    bench.add_argument("--rates", type=_fractions, default=DEFAULT_RATES, metavar="R[,R...]",
                       help="rates to run (default: 0.5,0.33)")
    bench.add_argument("--methods", type=_choices(OUR_METHODS, "methods"), default=OUR_METHODS, metavar="M[,M...]",
                       help=f"our methods to run (default: {','.join(OUR_METHODS)})")
    bench.add_argument("--split", choices=tuple(SPLITS), default="heldout",
                       help="heldout (report these) or tune (where defaults were chosen)")
    bench.add_argument("--context-length", type=_positive_int, default=DEFAULT_CONTEXT, metavar="N",
                       help=f"prompt tokens per sample (default: {DEFAULT_CONTEXT})")
    bench.add_argument("--ttft-lengths", type=_lengths, default=DEFAULT_TTFT_LENGTHS, metavar="N[,N...]",
                       help="prompt lengths of lazyllm's time-to-first-token measurement (default: 2048,4096; 0 skips)")
    bench.add_argument("--lazyllm-param", metavar="KEY=VALUE", type=_param, action="append", default=[],
                       help='a lazyllm setting, repeatable (e.g. schedule=[[0.7,0.3]] query_window=32); JSON values')
    bench.add_argument("--longllmlingua-param", metavar="KEY=VALUE", type=_param, action="append", default=[],
                       help="a longllmlingua setting, repeatable (e.g. passage_split=sentences keep_top_passages=1); "
                            "JSON values")
    bench.add_argument("--classifier", metavar="FOLDER",
                       help="llmlingua2's classifier folder (default: ~/.cache/hf_tokred/llmlingua2-minilm if present)")
    bench.add_argument("--no-reference", action="store_true", help="skip llmlingua 0.2.2 even when installed")
    bench.add_argument("--json", metavar="OUT", help="also write every number (and per-sample answers) to this file")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    bench.set_defaults(handler=_cmd_prompt_bench)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts such as 2048,4096 (or 0), got {text!r}") from None
    if values == (0,):
        return ()
    if not values or any(v < 16 for v in values):
        raise argparse.ArgumentTypeError(f"expected token counts >= 16 (or 0 to skip), got {text!r}")
    return values


def default_classifier() -> str | None:
    """The llmlingua2 classifier folder ``hf-tokred train llmlingua2`` writes by default, if it exists."""
    from hf_tokred.embedded import cache_dir

    folder = os.path.join(cache_dir(), "llmlingua2-minilm")
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _cmd_prompt(args) -> int:
    import hf_tokred
    from hf_tokred.cli import _log

    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise hf_tokred.errors.MissingFileError(f"file: cannot read {args.file!r} ({err.strerror})") from None
    params = {"force_tokens": args.force_token} if args.force_token else {}
    if args.classifier:
        params["classifier"] = args.classifier
    out = hf_tokred.compress_prompt(text, args.question, instruction=args.instruction, rate=args.rate,
                                    target_token=args.target_token, method=args.method, scorer=args.scorer, **params)
    print(out["compressed_prompt"])
    _log(f"{out['method']}: {out['origin_tokens']} -> {out['compressed_tokens']} tokens (budget {out['target_tokens']}, "
         f"{out['rate']:.2f} kept, {out['ratio']:.2f}x) in {out['time_s']:.2f} s"
         + ("" if out["budget_met"] else f"; budget not met: {out['budget_note']}"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in out.items()}, f, indent=2, default=str)
    return 0


def _cmd_prompt_bench(args) -> int:
    from hf_tokred import embedded
    from hf_tokred.cli import _log

    from .kv import load_model

    model, tokenizer, _ = load_model(args.model)
    folders = {"smollm2": embedded.smollm2_path, "gemma3": embedded.gemma3_path}
    folder = folders[args.model]() if args.model in folders else args.model if os.path.isdir(args.model) else None
    classifier = args.classifier or default_classifier()
    started = time.perf_counter()
    with torch.inference_mode():
        result = run_bench(model, tokenizer, samples=args.samples, split=args.split, rates=args.rates,
                           methods=args.methods, context_length=args.context_length,
                           reference=False if args.no_reference or folder is None else None, model_folder=folder,
                           llmlingua2_classifier=classifier, ttft_lengths=args.ttft_lengths,
                           lazyllm_params=dict(args.lazyllm_param),
                           longllmlingua_params=dict(args.longllmlingua_param),
                           progress=not args.no_progress, log=_log)
    result["command"] = "hf-tokred " + " ".join(args.argv)
    result["wall_s"] = time.perf_counter() - started
    print(format_result(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
