"""``hf-tokred learned-lm gist``: answers through 8 gist tokens against the dense model's, KV bytes and time to first token.

Model: the embedded SmolLM2-135M-Instruct (fp32, CPU) with the gist tokens ``hf-tokred train gist`` saved
(``--weights``, default ``~/.cache/hf_tokred/smollm2-gist``). Data (:func:`hf_tokred.recipes.gist.gist_prompts`, split
``"heldout"``: no paragraph is shared with training), of the kind the gist tokens were trained on (``--prompt-kind``):
``request``, chat requests about ~200-token passages of the standard library's documentation, the whole user turn
compressed; ``system``, ~200-token system prompts (a role, a task, house rules) compressed, each followed by a user
passage of 20-90 words, uncompressed (the paper's setting). References: the dense model's answers to the full
prompts (greedy, cached; or sampled).

Reported:

* ROUGE-L (F1 of the longest common token subsequence) of the answers against the dense answers, with the
  prompt given as: the full prompt (the reference itself), the trained gist tokens (the user turn or the system
  turn compressed into ``num_gist`` cache entries, the rest after them), a fresh untrained gist (same shape, no training)
  and no prompt at all (what follows the gist tokens only: the assistant header, or the user's passage and the
  header), the last two as floors, and for ``system`` another held-out system prompt in the place of each one
  (what any system prompt of the family gives); the ratio of the gist figure to the
  full prompt's is the issue's target (>= 0.8). Greedy decoding by default, where the full prompt against itself is
  1.0 by construction; with ``--temperature T`` every answer is sampled (``--top-p``, ``--draws`` independent draws
  per prompt and way of giving it, each from its own seed) and every figure is the mean ROUGE-L between independent
  draws, so "the full prompt against itself" is two dense draws against each other;
* KV bytes of the reused prompt in one row: the gist cache (``num_gist`` entries per layer) against the cache of
  the part it replaces (the user turn, or the system turn; its length in entries);
* time to first token at batch 1: a question asked through a reused gist cache (a copy of the cache + what follows
  it + one decoding step) against the full prompt (prefill + one step), median of a few repeats. Timings on a
  shared CPU are indicative only;
* for ``system``, greedy: how many held-out system prompts' tasks the model names when asked for them after the full
  prompt and after the gist tokens (whether the gist cache carries the task, the part of a system prompt the answers
  depend on most).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import time

from ..compat import CACHE_KWARG


def add_command(subparsers) -> None:
    """Add ``hf-tokred learned-lm gist``.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["learned-lm", "gist"]).samples
        32
    """
    import argparse

    from ..cli import _float_in, _positive_int
    from ..recipes.gist import PROMPT_KINDS

    parser = subparsers.add_parser("gist", help="gist tokens: ROUGE-L against the dense answers, KV bytes, TTFT",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", metavar="DIR", default=None,
                        help="folder saved by `hf-tokred train gist` (default: ~/.cache/hf_tokred/smollm2-gist)")
    parser.add_argument("--samples", type=_positive_int, default=32, help="held-out prompts (default: 32)")
    parser.add_argument("--prompt-kind", choices=PROMPT_KINDS, default=None,
                        help="held-out prompts of this kind (default: the kind the weights were trained on)")
    parser.add_argument("--temperature", type=_float_in(0.0, 10.0), default=0.0,
                        help="sample the answers at this temperature (default: 0, greedy)")
    parser.add_argument("--top-p", type=_float_in(1e-6, 1.0), default=0.9, help="nucleus of the sampled answers "
                        "(default: 0.9; with --temperature 0.2 the model card's setting)")
    parser.add_argument("--draws", type=_positive_int, default=3,
                        help="sampled answers per prompt and way of giving it (default: 3; needs >= 2)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=run)


def default_weights() -> str:
    from ..embedded import cache_dir

    return os.path.join(cache_dir(), "smollm2-gist")


def run_bench(weights: str | None = None, samples: int = 32, progress: bool = True, *, temperature: float = 0.0,
              top_p: float = 0.9, draws: int = 3, prompt_kind: str | None = None) -> dict:
    """The figures of ``hf-tokred learned-lm gist`` as a dict (greedy, or sampled with ``temperature`` > 0), on
    held-out prompts of ``prompt_kind`` (default: the kind the weights were trained on, else ``"request"``).

    Example:
        >>> result = run_bench(samples=8)                                                    # doctest: +SKIP
        >>> result["rouge_l"]["gist"] / result["rouge_l"]["full prompt"]                     # doctest: +SKIP
        >>> sampled = run_bench(samples=8, temperature=0.2, top_p=0.9, draws=3)              # doctest: +SKIP
    """
    import torch

    import hf_tokred

    from ..cli import _log
    from ..embedded import load_smollm2
    from ..errors import ConfigError, MissingFileError
    from ..integration.wiring import get_applied
    from ..recipes import mean_ends
    from ..recipes.gist import (
        MAX_NEW_TOKENS,
        PROMPT_KINDS,
        TARGET_TOKENS,
        TRAINING_STATE,
        gist_answers,
        gist_data,
        mean_rouge_l,
    )

    if temperature > 0 and (not isinstance(draws, int) or draws < 2):
        raise ConfigError(f"draws: sampled answers need at least 2 draws per prompt, got {draws!r}", field="draws")
    weights = os.path.abspath(os.path.expanduser(weights or default_weights()))
    if not os.path.isfile(os.path.join(weights, "token_reduction.safetensors")):
        raise MissingFileError(f"{weights} holds no trained gist tokens (token_reduction.safetensors); train them "
                               "first with `hf-tokred train gist` or pass --weights DIR")
    with open(os.path.join(weights, "config.json"), encoding="utf-8") as fh:
        saved = json.load(fh).get("token_reduction")
    if not saved or saved.get("method") != "gist":
        raise MissingFileError(f"{weights}/config.json holds no gist reduction")
    budget, state = {}, {}
    state_file = os.path.join(weights, TRAINING_STATE)
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as fh:
            state = json.load(fh)
        fp = state["fingerprint"]
        first_loss, final_loss = mean_ends(state["losses"])
        budget = {"steps": state["step"], "batch_size": fp["batch_size"], "examples": state["examples"],
                  "lr": fp["lr"], "embedding_lr": fp["embedding_lr"], "seed": fp["seed"],
                  "train_seconds": state.get("seconds"),
                  "final_loss": round(final_loss, 4), "first_loss": round(first_loss, 4),
                  "probe_weight": fp.get("probe_weight", 0.0), "distill_top": fp.get("distill_top", 0)}
    kind = prompt_kind or state.get("prompt_kind") or "request"
    if kind not in PROMPT_KINDS:
        raise ConfigError(f"prompt_kind: expected one of {', '.join(PROMPT_KINDS)}, got {kind!r}", field="prompt_kind")
    model, tokenizer = load_smollm2()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _log(f"gist bench: dense answers to {samples} held-out {kind} prompts (cached after the first run)")
    data = gist_data(model, tokenizer, "heldout", samples, target_tokens=TARGET_TOKENS, max_new_tokens=MAX_NEW_TOKENS,
                     kind=kind, progress=progress)
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": eos, "pad": pad, "progress": progress,
              "temperature": temperature, "top_p": top_p}
    sampled = temperature > 0
    seeds = itertools.count()  # every draw of every way of giving the prompt has a seed of its own

    def answers(mode: str, rows: list[dict] = data) -> list[list[list[int]]]:
        return [gist_answers(model, rows, mode=mode, seed=next(seeds), **kwargs)
                for _ in range(draws if sampled else 1)]

    def against_dense(drawn: list[list[list[int]]]) -> float:
        # every draw against every dense draw (greedy: the one answer against the one dense answer)
        return statistics.mean(mean_rouge_l(a, r) for a in drawn for r in references)

    if sampled:
        _log(f"gist bench: {draws} dense draws per prompt (temperature {temperature}, top-p {top_p})")
        references = answers("full")
        rouge = {"full prompt": statistics.mean(mean_rouge_l(references[i], references[j])
                                                for i in range(draws) for j in range(i + 1, draws))}
    else:
        references = [[e["answer"] for e in data]]
        rouge = {"full prompt": 1.0}
    _log("gist bench: no prompt (only what follows the gist tokens)")
    rouge["no prompt"] = against_dense(answers("none"))
    if kind == "system" and len(data) > 1:
        _log("gist bench: another held-out system prompt in the place of each one")
        swapped = [{**row, "context": data[(i + 1) % len(data)]["context"]} for i, row in enumerate(data)]
        rouge["another system prompt"] = against_dense(answers("full", swapped))
    fresh = {k: v for k, v in saved.items()}
    hf_tokred.apply(model, fresh)  # fresh gist embeddings and LoRA: no training
    _log("gist bench: fresh (untrained) gist tokens")
    rouge["fresh gist"] = against_dense(answers("gist"))
    hf_tokred.remove(model)
    hf_tokred.apply(model, saved, weights_from=weights)
    num_gist = get_applied(model).config.get("context").num_gist
    _log(f"gist bench: trained gist tokens ({num_gist})")
    gisted = answers("gist")
    rouge["gist"] = against_dense(gisted)
    task_named = {}
    if kind == "system" and not sampled:
        _log("gist bench: each system prompt's task asked for, through the full prompt and through the gist tokens")
        task_named = _task_named(model, tokenizer, data, eos_token_id=eos, pad=pad, progress=progress)

    # KV bytes and time to first token of one reused prompt (batch 1)
    example = data[0]
    context = torch.tensor([example["context"]])
    tail = torch.tensor([example["tail"]])
    full = torch.cat([context, tail], -1)
    with torch.no_grad():
        ctx = hf_tokred.compress_context(model, context)
    gist_bytes = _cache_bytes(ctx.cache)
    prompt_tokens = statistics.mean(len(e["context"]) + len(e["tail"]) for e in data)

    def ttft_gist():
        with torch.no_grad():
            model.generate(torch.cat([ctx.prefix_ids, tail], -1), **{CACHE_KWARG: ctx.fresh_cache()}, max_new_tokens=1,
                           do_sample=False, pad_token_id=pad)

    def ttft_full():
        with torch.no_grad():
            model.generate(full, max_new_tokens=1, do_sample=False, pad_token_id=pad, return_dict_in_generate=True)

    hf_tokred.remove(model)  # the full prompt runs on the dense model (the gist hooks add nothing outside compress)
    from transformers import DynamicCache

    dense_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, **{CACHE_KWARG: dense_cache}, use_cache=True)  # the part the gist tokens replace
    full_bytes = _cache_bytes(dense_cache)
    t_full = _median_seconds(ttft_full)
    hf_tokred.apply(model, saved, weights_from=weights)
    with torch.no_grad():
        ctx = hf_tokred.compress_context(model, context)
    t_gist = _median_seconds(ttft_gist)
    t0 = time.perf_counter()
    with torch.no_grad():
        hf_tokred.compress_context(model, context)
    compress_seconds = time.perf_counter() - t0
    ratio = rouge["gist"] / rouge["full prompt"]
    return {
        "method": "gist", "model": "SmolLM2-135M-Instruct (embedded, fp32)", "weights": weights,
        "num_gist": num_gist, "samples": len(data), "prompt_kind": kind, "prompt_tokens": round(prompt_tokens, 1),
        "compressed_tokens": round(statistics.mean(len(e["context"]) for e in data), 1),
        "max_new_tokens": MAX_NEW_TOKENS, "budget": budget,
        "decoding": ({"temperature": temperature, "top_p": top_p, "draws": draws} if sampled else "greedy"),
        "rouge_l": {k: round(v, 4) for k, v in rouge.items()}, "gist_vs_full": round(ratio, 4),
        "target_met": ratio >= 0.8,
        "kv_bytes": {"gist": gist_bytes, "full prompt": full_bytes, "gist_entries": ctx.entries,
                     "full_entries": int(context.shape[1])},
        "ttft_seconds": {"reused gist": round(t_gist, 4), "full prompt": round(t_full, 4),
                         "compress once": round(compress_seconds, 4)},
        "task_named": task_named,
        "examples": [{"prompt": tokenizer.decode(data[i]["context"] + data[i]["tail"]),
                      "dense": tokenizer.decode(references[0][i]),
                      "gist": tokenizer.decode(gisted[0][i])} for i in range(min(2, len(data)))],
    }


def _task_named(model, tokenizer, data: list[dict], **kwargs) -> dict:
    """How many system prompts' tasks the model names when asked for them after the prompt (the task probe of
    :func:`hf_tokred.recipes.gist.task_probe`, greedy), with the prompt given in full and as the gist tokens: whether
    the gist cache carries the part of a system prompt the answers depend on most. A reply names the task when, of
    the :data:`~hf_tokred.recipes.lm_data.SYSTEM_TASKS`, the prompt's own is the one nearest to it (word-level
    ROUGE-L, above 0), so the dense model's paraphrases ("The system asked me to ...") count as the gist tokens'
    trained form ("My task: ...") does."""
    from ..methods.lm.gist import rouge_l
    from ..recipes.gist import gist_answers
    from ..recipes.lm_data import SYSTEM_TASKS, system_task

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def nearest(reply: str) -> str | None:
        scores = [rouge_l(words(reply), words(task)) for task in SYSTEM_TASKS]
        best = max(scores)
        return SYSTEM_TASKS[scores.index(best)] if best > 0 else None

    asked = [{**row, "tail": row["probe_tail"]} for row in data if "probe_tail" in row]
    tasks = [system_task(row["prompt"]) for row in asked]
    named = {"of": len(asked)}
    for label, mode in (("full prompt", "full"), ("gist", "gist")):
        replies = gist_answers(model, asked, mode=mode, max_new_tokens=32, **kwargs)
        named[label] = sum(nearest(tokenizer.decode(reply)) == task for task, reply in zip(tasks, replies))
    return named


def _cache_bytes(cache) -> int:
    return int(sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in cache.layers))


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> int:
    """Run the benchmark and print its table (``--json``: also write the results)."""
    from ..cli import format_table

    result = run_bench(args.weights, args.samples, progress=not args.no_progress, temperature=args.temperature,
                       top_p=args.top_p, draws=args.draws, prompt_kind=args.prompt_kind)
    rouge, kv, ttft, budget = result["rouge_l"], result["kv_bytes"], result["ttft_seconds"], result["budget"]
    if budget:
        print(f"gist tokens: k = {result['num_gist']}, trained {budget['steps']} steps of {budget['batch_size']} on "
              f"{budget['examples']} prompts (loss {budget['first_loss']} -> {budget['final_loss']}, "
              f"{budget['train_seconds']} s on a shared CPU"
              + (f"; KL divergence from the dense distributions, top {budget['distill_top']}"
                 if budget["distill_top"] else "")
              + (f"; with the task probe, weight {budget['probe_weight']}" if budget["probe_weight"] else "") + ")")
    decoding = result["decoding"]
    if decoding == "greedy":
        how, reference = "greedy answers", "full prompt (reference)"
    else:
        how = (f"answers sampled at temperature {decoding['temperature']}, top-p {decoding['top_p']} "
               f"({decoding['draws']} independent draws each; every figure a mean over pairs of draws)")
        reference = "full prompt (another draw)"
    what = ("requests" if result["prompt_kind"] == "request" else
            f"system prompts of {result['compressed_tokens']} tokens, each with a user passage after it")
    print(f"{result['samples']} held-out {what} ({result['prompt_tokens']} tokens in all), {how} of up to "
          f"{result['max_new_tokens']} tokens, ROUGE-L against the dense model's answers to the full prompt")
    rows = [[reference, f"{rouge['full prompt']:.3f}", str(kv["full_entries"]), f"{kv['full prompt']:,}",
             f"{ttft['full prompt'] * 1000:.0f}"],
            [f"gist, {result['num_gist']} tokens (trained)", f"{rouge['gist']:.3f}", str(kv["gist_entries"]),
             f"{kv['gist']:,}", f"{ttft['reused gist'] * 1000:.0f}"],
            ["gist, fresh (untrained)", f"{rouge['fresh gist']:.3f}", str(kv["gist_entries"]), f"{kv['gist']:,}", "-"],
            ["no prompt", f"{rouge['no prompt']:.3f}", "0", "0", "-"]]
    if "another system prompt" in rouge:
        rows.append(["another system prompt", f"{rouge['another system prompt']:.3f}", "-", "-", "-"])
    print(format_table(["prompt given as", "ROUGE-L", "KV entries", "KV bytes", "TTFT ms"], rows, right={1, 2, 3, 4}))
    print(f"gist / full prompt ROUGE-L: {result['gist_vs_full']:.3f} (target >= 0.8: "
          f"{'met' if result['target_met'] else 'missed'}); compressing a prompt once: "
          f"{ttft['compress once'] * 1000:.0f} ms (timings on a shared CPU are indicative)")
    named = result["task_named"]
    if named:
        print(f"asked for its task after the system prompt, the model names it (the nearest of the 12 tasks): full "
              f"prompt {named['full prompt']} / {named['of']}, gist tokens {named['gist']} / {named['of']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0
