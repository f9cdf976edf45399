"""``hf-tokred learned-lm eagle``: EAGLE drafting against plain greedy and prompt-lookup decoding on SmolLM2.

Model: the embedded SmolLM2-135M-Instruct (fp32, CPU) with the draft head ``hf-tokred train eagle`` saved
(``--weights``, default ``~/.cache/hf_tokred/smollm2-eagle``). Data: held-out chat requests about passages of the
standard library's documentation (:func:`hf_tokred.recipes.lm_data.instruction_prompts`, split ``"heldout"``: no
paragraph is shared with training). Every prompt is generated at batch 1, greedy (or sampled, below),
``--max-new-tokens`` new tokens (256 by default; generation stops earlier at the end token), six ways on the same
model, in turn:

* ``greedy``: plain ``model.generate()``;
* ``prompt lookup``: transformers' own prompt-lookup assisted decoding (``prompt_lookup_num_tokens=10``);
* ``eagle``: ``model.generate(..., assistant_model=eagle_assistant(model))``;
* ``eagle + lookup``: the same with ``prompt_lookup_num_tokens=10``: lookup drafts where the context's last
  ``lookup_min_match`` tokens occurred earlier, the head's drafts elsewhere;
* ``eagle tree``: ``model.generate(..., custom_generate=hf_tokred.eagle_tree_decoding)``: the head's draft tree
  (``--tree-tokens`` nodes, by default the reduction's ``tree_tokens``) verified in one forward pass per round;
* ``eagle tree + lookup``: the same with ``prompt_lookup_num_tokens=10`` (a lookup round verifies its chain).

With ``--temperature T`` every row samples instead (temperature ``T``, transformers' default ``top_k=50``), each
prompt under the same seed in every row, and the first row is ``sampling``, plain ``generate(do_sample=True)``.
The tree rows then draw the very sequences plain sampling draws (identical); the chain rows (transformers'
speculative sampling) and prompt lookup keep the model's distribution but not the seeded sequence, so their
"identical" count is not expected to be full.

With ``--policy P`` (a KV policy that compresses the prompt once: ``snapkv``, ``pyramidkv``, ``fastgen``) the
six run again over that policy's cache keeping ``--keep`` of the prompt (the reduced KV cache underneath the
drafting; rejected drafts and tree nodes are dropped from it again), and those rows are checked against the
policy's own plain output.

With ``--pack-weights`` the model's linear weights are packed for oneDNN first
(:func:`hf_tokred.integration.cpu_linear.pack_linear_weights` with ``min_rows=1``): every pass of every row, the
greedy steps included, runs oneDNN's kernels, so the speed-ups compare like with like. On a CPU this is what makes
a pass over a few drafted tokens cost about one decoding step (PyTorch's default MKL path took 2-3x its one-row
time for 2-8 rows on this project's CPU); outputs are compared with greedy decoding on the same packed model.

Reported per row: decode tokens/s (new tokens after the first, over the time after the prefill forward pass),
the speed-up over greedy, new tokens per verification (decode tokens per target forward pass after the prefill:
1.0 for greedy; the mean accepted draft tokens plus the target's own token) and whether every output is identical
to greedy's. Timings on a shared CPU are indicative only; token counts are exact.
"""

from __future__ import annotations

import json
import os
import time

PROMPT_LOOKUP_TOKENS = 10  # transformers' prompt lookup: tokens proposed per match
EAGLE_LOOKUP_TOKENS = 10  # EAGLE + lookup: tokens a lookup round drafts


def add_command(subparsers) -> None:
    """Add ``hf-tokred learned-lm eagle``.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["learned-lm", "eagle"]).max_new_tokens
        256
    """
    import argparse

    from ..cli import _float_in, _positive_int

    parser = subparsers.add_parser("eagle", help="EAGLE drafting: accepted tokens per verification and decode "
                                                 "tokens/s against greedy and prompt lookup",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", metavar="DIR", default=None,
                        help="folder saved by `hf-tokred train eagle` (default: ~/.cache/hf_tokred/smollm2-eagle)")
    parser.add_argument("--samples", type=_positive_int, default=8, help="held-out prompts (default: 8)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=256,
                        help="new tokens per prompt (default: 256)")
    parser.add_argument("--tree-tokens", type=_positive_int, default=None, metavar="N",
                        help="draft nodes the eagle tree rows verify per forward pass (default: the head's "
                             "tree_tokens setting)")
    parser.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.0, metavar="T",
                        help="sample at this temperature, seeded per prompt (default: 0, greedy)")
    parser.add_argument("--policy", metavar="P", default=None,
                        help="also decode over this KV policy's cache (snapkv, pyramidkv or fastgen)")
    parser.add_argument("--keep", type=float, default=0.5, metavar="F",
                        help="fraction of the prompt the --policy keeps (default: 0.5)")
    parser.add_argument("--pack-weights", action="store_true",
                        help="pack the linear weights for oneDNN (CPU) first; every row, greedy included, runs on "
                             "the packed model")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=run)


def default_weights() -> str:
    from ..embedded import cache_dir

    return os.path.join(cache_dir(), "smollm2-eagle")


class _ForwardClock:
    """Counts a model's forward passes and notes when the first one (the prefill) ended."""

    def __init__(self, model):
        self.calls, self.prefill_end = 0, None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        if self.calls == 1:
            self.prefill_end = time.perf_counter()

    def reset(self):
        self.calls, self.prefill_end = 0, None


def policy_config(policy: str, keep: float, tokenizer=None):
    """The config of a KV ``policy`` at ``keep`` that assisted decoding can run over (it compresses the prompt
    once, so rejected drafts can be cropped off its cache); anything else is refused here, before any decoding.

    Example:
        >>> policy_config("snapkv", 0.25).keep
        0.25
        >>> policy_config("h2o", 0.5)
        Traceback (most recent call last):
        ...
        hf_tokred.errors.ConfigError: --policy: h2o evicts while decoding, so assisted decoding cannot crop its cache; use a policy that compresses the prompt once: fastgen, pyramidkv, snapkv
    """
    from ..errors import ConfigError
    from ..kv.policy import prompt_once_policies
    from .kv import _with_token_ids, kv_policies, make_config

    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
        raise ConfigError(f"--keep: expected a fraction in (0, 1], got {keep!r}", field="keep")
    known, croppable = kv_policies(), prompt_once_policies()
    if policy not in known:
        raise ConfigError(f"--policy: unknown KV policy {policy!r}; allowed: {', '.join(croppable)}", field="policy")
    if policy not in croppable:
        raise ConfigError(f"--policy: {policy} evicts while decoding, so assisted decoding cannot crop its cache; "
                          f"use a policy that compresses the prompt once: {', '.join(croppable)}", field="policy")
    cfg = make_config(policy, float(keep))
    return cfg if tokenizer is None else _with_token_ids(cfg, tokenizer)


def run_bench(weights: str | None = None, samples: int = 8, max_new_tokens: int = 256, progress: bool = True,
              policy: str | None = None, keep: float = 0.5, tree_tokens: int | None = None,
              temperature: float = 0.0, pack_weights: bool = False) -> dict:
    """The figures of ``hf-tokred learned-lm eagle`` as a dict (with ``policy``: also over that KV policy's cache;
    ``tree_tokens``: the tree rows' nodes per verification, default the reduction's; ``temperature`` > 0: every
    row samples, seeded per prompt; ``pack_weights``: every row on the model with oneDNN-packed linear weights).

    Example:
        >>> result = run_bench(samples=2, max_new_tokens=64, policy="snapkv", keep=0.25)      # doctest: +SKIP
        >>> result["rows"]["eagle + snapkv@0.25"]["tokens_per_verification"]                  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_tokred  # also: from_pretrained re-attaches the head

    from ..errors import MissingFileError, TokenReductionError
    from ..integration.wiring import get_applied
    from ..recipes.eagle import TRAINING_STATE
    from ..recipes.lm_data import chat_ids, instruction_prompts

    if not temperature >= 0:
        raise TokenReductionError(f"temperature: expected a number >= 0 (0: greedy), got {temperature!r}")
    weights = os.path.abspath(os.path.expanduser(weights or default_weights()))
    if not os.path.isfile(os.path.join(weights, "token_reduction.safetensors")):
        raise MissingFileError(f"{weights} holds no trained EAGLE head (token_reduction.safetensors); train one first "
                               "with `hf-tokred train eagle` or pass --weights DIR")
    model = AutoModelForCausalLM.from_pretrained(weights).eval()
    if pack_weights:
        from ..integration.cpu_linear import pack_linear_weights

        pack_linear_weights(model, min_rows=1)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    kv = policy_config(policy, keep, tokenizer) if policy is not None else None
    budget = {}
    if os.path.isfile(os.path.join(weights, TRAINING_STATE)):
        with open(os.path.join(weights, TRAINING_STATE), encoding="utf-8") as fh:
            state = json.load(fh)
        budget = {"steps": state["step"], "batch_size": state["fingerprint"]["batch_size"],
                  "sequences": state["sequences"], "tokens": state["tokens"], "seconds": state["seconds"],
                  "data": state["data"], "unroll": state["fingerprint"].get("unroll", 1),
                  "init_from": state["fingerprint"].get("init_from")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "pad_token_id": pad}
    if temperature > 0:
        common["temperature"] = temperature
    plain = "sampling" if temperature > 0 else "greedy"
    reduction = model.config.token_reduction
    prompts = [torch.tensor([chat_ids(tokenizer, p)]) for p in instruction_prompts("heldout", samples, seed=0)]
    if tree_tokens is None:
        tree_tokens = get_applied(model).config.get("decoding").tree_tokens
    totals = _decode_all(model, prompts, common, decoding_rows(model, tree_tokens=tree_tokens, plain=plain), progress)
    if kv is not None:
        # The same head over the policy's cache: the model re-applied with both (head weights from the folder).
        hf_tokred.remove(model)
        hf_tokred.apply(model, hf_tokred.compose(reduction, kv), weights_from=weights)
        if pack_weights:  # the re-attached head's layers (the model's are packed already)
            pack_linear_weights(model, min_rows=1)
        reduction = model.config.token_reduction
        rows = decoding_rows(model, f" + {policy}@{keep:g}", tree_tokens, plain)
        totals.update(_decode_all(model, prompts, common, rows, progress))
    base = totals[plain]["tokens"] / max(totals[plain]["seconds"], 1e-9)
    result_rows = {}
    for name, total in totals.items():
        speed = total["tokens"] / max(total["seconds"], 1e-9)
        result_rows[name] = {"tokens_per_s": round(speed, 2), "speedup": round(speed / base, 3),
                             "tokens_per_verification": round(total["tokens"] / max(total["verifications"], 1), 3),
                             "identical": total["identical"], "decode_tokens": total["tokens"],
                             "reference": total["reference"]}
    return {"samples": samples, "max_new_tokens": max_new_tokens, "weights": weights, "budget": budget,
            "reduction": reduction, "tree_tokens": tree_tokens, "temperature": temperature,
            "pack_weights": pack_weights, "rows": result_rows,
            "note": "timings on a shared CPU are indicative only; token counts are exact"}


def decoding_rows(model, suffix: str = "", tree_tokens: int | None = None, plain: str = "greedy") -> dict:
    """The decodings the bench compares (name -> extra ``generate()`` arguments), plain decoding first (named
    ``plain``): prompt lookup, EAGLE, and EAGLE with lookup drafts where the context repeats itself; names end
    with ``suffix``. With ``tree_tokens``, also EAGLE's tree verification of that many nodes per round, alone and
    with lookup drafts.

    Example:
        >>> list(decoding_rows(model, tree_tokens=8))                                      # doctest: +SKIP
        ['greedy', 'prompt lookup', 'eagle', 'eagle + lookup', 'eagle tree', 'eagle tree + lookup']
    """
    from ..integration.eagle import eagle_assistant
    from ..integration.eagle_tree import eagle_tree_decoding

    head = eagle_assistant(model)
    rows = {plain + suffix: {}, "prompt lookup" + suffix: {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS},
            "eagle" + suffix: {"assistant_model": head},
            "eagle + lookup" + suffix: {"assistant_model": head, "prompt_lookup_num_tokens": EAGLE_LOOKUP_TOKENS}}
    if tree_tokens is not None:
        tree = {"custom_generate": eagle_tree_decoding, "tree_tokens": tree_tokens}
        rows["eagle tree" + suffix] = tree
        rows["eagle tree + lookup" + suffix] = {**tree, "prompt_lookup_num_tokens": EAGLE_LOOKUP_TOKENS}
    return rows


def _decode_all(model, prompts, common: dict, rows: dict, progress: bool) -> dict:
    """Every decoding of ``rows`` (name -> extra ``generate()`` arguments; the first is the reference) of every
    prompt on ``model`` as it is: per row the decode tokens, seconds after the prefill, target forward passes
    after it, and how many outputs equal the reference row's. With sampling, each prompt is generated under the
    seed of its index in every row."""
    import torch
    from tqdm.auto import tqdm

    reference_row = next(iter(rows))
    totals = {name: {"tokens": 0, "seconds": 0.0, "verifications": 0, "identical": 0, "reference": reference_row}
              for name in rows}
    clock = _ForwardClock(model)
    try:
        with torch.no_grad():
            warm = prompts[0][:, :16]
            for extra in rows.values():  # warm-up: first calls allocate
                model.generate(warm, attention_mask=torch.ones_like(warm), **{**common, "max_new_tokens": 8}, **extra)
            for index, ids in enumerate(tqdm(prompts, desc=f"eagle bench ({reference_row})", disable=not progress)):
                reference = None
                for name, extra in rows.items():
                    if common.get("do_sample"):
                        torch.manual_seed(index)
                    clock.reset()
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **common, **extra)
                    end = time.perf_counter()
                    new = out[0, ids.shape[1]:]
                    if reference is None:
                        reference = new
                    total = totals[name]
                    total["tokens"] += max(new.numel() - 1, 0)
                    total["seconds"] += end - clock.prefill_end
                    total["verifications"] += clock.calls - 1
                    total["identical"] += int(torch.equal(new, reference))
    finally:
        clock.handle.remove()
    return totals


def format_result(result: dict) -> str:
    """The table ``hf-tokred learned-lm eagle`` prints."""
    from ..cli import format_table

    samples = result["samples"]
    plain = "sampling" if result.get("temperature") else "greedy"
    table = format_table(
        ["decoding", "tokens/s", "speed-up", "tokens / verification", f"identical to its {plain}"],
        [[name, f"{row['tokens_per_s']:.1f}", f"{row['speedup']:.2f}x", f"{row['tokens_per_verification']:.2f}",
          f"{'yes' if row['identical'] == samples else 'no'} ({row['identical']}/{samples})"]
         for name, row in result["rows"].items()], right={1, 2, 3})
    if any(row["reference"] != plain for row in result["rows"].values()):
        table += (f"\n(speed-ups against dense {plain}; rows over a KV policy are compared with that policy's own "
                  f"{plain} output)")
    return table


def run(args) -> int:
    from ..cli import _log

    result = run_bench(args.weights, args.samples, args.max_new_tokens, progress=not args.no_progress,
                       policy=args.policy, keep=args.keep, tree_tokens=args.tree_tokens,
                       temperature=args.temperature, pack_weights=args.pack_weights)
    budget = result["budget"]
    if budget:
        extra = f", training-time test over {budget['unroll']} steps" if budget["unroll"] > 1 else ""
        if budget["init_from"]:
            extra += f", continuing the head of {budget['init_from']}"
        _log(f"eagle head: {budget['steps']} steps x {budget['batch_size']} sequences on {budget['sequences']} "
             f"sequences ({budget['tokens']} tokens), {budget['seconds']:.0f} s of training{extra}")
    decoding = f"sampling at temperature {result['temperature']:g} (seeded per prompt)" if result["temperature"] \
        else "greedy"
    print(f"SmolLM2-135M-Instruct, {result['samples']} held-out prompts, batch 1, {decoding}, up to "
          f"{result['max_new_tokens']} new tokens, eagle tree: {result['tree_tokens']} nodes per verification"
          f"{', linear weights packed for oneDNN' if result['pack_weights'] else ''} "
          "(timings on a shared CPU are indicative)")
    print(format_result(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


__all__ = ["add_command", "format_result", "policy_config", "run_bench"]
