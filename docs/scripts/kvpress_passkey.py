"""kvpress 0.5.5 on hf_tokred's passkey samples (the issue-3 task), SmolLM2-135M-Instruct, CPU.

Run in a separate venv (kvpress 0.5.5 needs transformers 5.2, hf_tokred is tested with 5.23):
    python3.11 -m venv kvpress-venv && kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 "transformers>=5.2,<5.3"
    kvpress-venv/bin/python docs/scripts/kvpress_passkey.py --samples 20 --json kvpress_passkey.json
It reads the SmolLM2 safetensors copy hf_tokred caches (run `hf-tokred demo --samples 1` once first).

The samples are hf_tokred.bench.passkey's: random.Random(0), per sample key = randint(10000, 99999)
then depth = random(); the filler repeated 40 times, the key sentence after int(40 * depth) repeats.
The generator is re-implemented here (a few lines, same draws) so this venv does not need hf_tokred;
the script checks it against the first two keys hf_tokred documents (60494, 65125).

Modes, as the kvpress pipeline defines them:
  aware:    context = the whole user turn (instruction, haystack, question); question = "" -> the
            pipeline compresses the user turn, then feeds "<|im_end|>\\n<|im_start|>assistant\\n" + answer prefix.
  agnostic: context = instruction + haystack; question = "\\nWhat is the pass key?" -> compressed without
            the question, which is fed afterwards with the assistant header and the answer prefix.
In both the user turn's text is exactly hf_tokred's. Correct when the key is in the 8 generated tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

INSTRUCTION = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it."
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
MODEL_DIR = os.path.expanduser(os.environ.get("HF_TOKRED_CACHE", "~/.cache/hf_tokred") + "/SmolLM2-135M-Instruct")


def samples(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key = rng.randint(10000, 99999)
        depth = rng.random()
        out.append((key, depth))
    return out


def haystack(key: int, depth: float, repeats: int = 40) -> str:
    before = int(repeats * depth)
    return (FILLER * before + KEY_SENTENCE.format(key=key) + " " + FILLER * (repeats - before)).rstrip()


def make_press(name: str, ratio: float):
    from kvpress import (
        ExpectedAttentionPress,
        KnormPress,
        ObservedAttentionPress,
        SnapKVPress,
        StreamingLLMPress,
        TOVAPress,
    )

    return {
        "TOVA": TOVAPress, "Knorm": KnormPress, "StreamingLLM": StreamingLLMPress,
        "ObservedAttention": ObservedAttentionPress, "SnapKV": SnapKVPress, "ExpectedAttention": ExpectedAttentionPress,
    }[name](compression_ratio=ratio)


PRESSES = ["TOVA", "Knorm", "StreamingLLM", "ObservedAttention", "SnapKV", "ExpectedAttention"]
EAGER = {"ObservedAttention"}  # needs the attention weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.875, 0.5, 0.75],
                        help="kvpress compression_ratio (fraction removed); keep = 1 - ratio")
    parser.add_argument("--presses", nargs="+", default=PRESSES)
    parser.add_argument("--modes", nargs="+", default=["aware", "agnostic"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 wastes least on a shared machine)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import kvpress  # noqa: F401  (registers the pipeline)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    data = samples(args.samples)
    assert [k for k, _ in samples(2)] == [60494, 65125], "sample generator drifted from hf_tokred's"
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    pipes = {}

    def pipe_for(attn: str):
        if attn not in pipes:
            model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation=attn).eval()
            pipes[attn] = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
        return pipes[attn]

    def run(press_name, ratio, mode):
        pipe = pipe_for("eager" if press_name in EAGER else "sdpa")
        press = None if press_name == "none" else make_press(press_name, ratio)
        correct, answers, error = [], [], None
        start = time.perf_counter()
        for key, depth in data:
            hay = haystack(key, depth)
            if mode == "aware":
                context, question = f"{INSTRUCTION}\n{hay}\n{QUESTION}", ""
            else:
                context, question = f"{INSTRUCTION}\n{hay}", f"\n{QUESTION}"
            try:
                with torch.no_grad():
                    answer = pipe(context, question=question, answer_prefix=ANSWER_PREFIX, press=press,
                                  max_new_tokens=8)["answer"]
            except Exception as exc:  # record the failure (e.g. a press that crashes) and go on
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
                break
            answers.append(answer)
            correct.append(str(key) in answer)
        record = {"press": press_name, "compression_ratio": ratio, "keep": 1 - ratio, "mode": mode,
                  "samples": len(correct), "accuracy": sum(correct) / len(correct) if correct and not error else None,
                  "correct": correct, "answers": answers, "error": error, "wall_s": time.perf_counter() - start}
        acc = "error: " + error if error else f"{record['accuracy']:.2f}"
        print(f"{press_name:18s} keep={1 - ratio:<6g} {mode:8s} {acc}", flush=True)
        return record

    results = []

    def save():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"kvpress": "0.5.5", "transformers": transformers.__version__, "torch": torch.__version__,
                           "command": " ".join(sys.argv), "samples": args.samples, "modes": args.modes,
                           "results": results}, fh, indent=2)

    # the issue already has kvpress figures at keep 0.5/0.25 and dense: run the missing keep first
    # (--ratios order), every press at a ratio before the next ratio, dense last
    for ratio in args.ratios:
        for press_name in args.presses:
            for mode in args.modes:
                results.append(run(press_name, ratio, mode))
                save()
    for mode in args.modes:
        results.append(run("none", 0.0, mode))
        save()

    # the table: press x keep, "aware / agnostic"
    keeps = [1 - r for r in sorted(args.ratios)]
    print()
    print("| kvpress press | " + " | ".join(f"keep {k:g}" for k in keeps) + " |")
    print("|---|" + "---|" * len(keeps))

    def cell(press_name, ratio):
        parts = []
        for mode in args.modes:
            r = next((x for x in results if x["press"] == press_name and x["mode"] == mode
                      and (press_name == "none" or x["compression_ratio"] == ratio)), None)
            parts.append("-" if r is None else "error" if r["error"] else f"{r['accuracy']:.2f}")
        return " / ".join(parts)

    print("| none (dense) | " + cell("none", 0.0) + " |" + " |" * (len(keeps) - 1))
    for press_name in args.presses:
        print(f"| {press_name} | " + " | ".join(cell(press_name, r) for r in sorted(args.ratios)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
