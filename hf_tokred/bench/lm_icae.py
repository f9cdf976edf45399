"""``hf-tokred learned-lm icae``: ICAE's memory slots at 4x context compression on the embedded SmolLM2.

Loads the artefact of ``hf-tokred train icae`` (``--weights``; SmolLM2-135M-Instruct with the LoRA encoder and the
memory embeddings, 128-token chunks -> 32 slots each) and measures, on held-out data only:

* **reconstruction** of 512-token windows of held-out text (``lm_data.lm_texts("heldout")``), each compressed into
  4 x 32 = 128 slots: teacher-forced next-token accuracy of the autoencoding decoder (``[slots, <AE>, text]``),
  with all 128 slots in view (the whole context decoded at once) and chunk by chunk (each 128-token chunk from
  its own 32 slots, the training setting). Against the dense model: copying the text with the full text in view
  (``[text, <eos>, text]``, teacher-forced accuracy on the second copy) and, as a floor,
  predicting the text with nothing in view (plain language modelling);
* **passkey** retrieval (the KV harness's task, ``hf_tokred.bench.passkey``, with 18 filler repeats so that the
  context, everything up to the end of the haystack, is about 500 tokens): the context compressed into 128 slots
  with ``hf_tokred.compress_context`` and the question asked after them, against the uncompressed prompt.

It trains nothing; the training budget recorded in the artefact (``icae_training.json``) is printed with the
figures.
"""

from __future__ import annotations

import json
import os

import torch

from ..compat import CACHE_KWARG

PASSKEY_FILLER_REPEATS = 18  # the passkey context is then ~502 tokens on SmolLM2: 4 chunks, 128 slots
CONTEXT_TOKENS = 512


def add_command(subparsers) -> None:
    """Add ``hf-tokred learned-lm icae``.

    Example:
        >>> import argparse
        >>> from hf_tokred.bench.learned_lm import add_command as add_learned
        >>> parser = argparse.ArgumentParser()
        >>> add_learned(parser.add_subparsers())
        >>> parser.parse_args(["learned-lm", "icae"]).samples
        16
    """
    import argparse

    from ..cli import _positive_int

    parser = subparsers.add_parser("icae", help="ICAE: reconstruction and passkey accuracy through 128 memory slots "
                                   "(512 context tokens, 4x)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", metavar="DIR", help="the trained artefact (default: "
                        "~/.cache/hf_tokred/smollm2-icae, made by `hf-tokred train icae`)")
    parser.add_argument("--samples", type=_positive_int, default=16,
                        help="held-out 512-token windows and passkey samples (default: 16)")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=run)


def _load(weights: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..errors import MissingFileError

    if not os.path.isfile(os.path.join(weights, "token_reduction.safetensors")):
        raise MissingFileError(f"icae: no trained artefact in {weights!r}; run `hf-tokred train icae` first "
                               "(or pass --weights DIR)")
    import hf_tokred  # noqa: F401  (re-attaches the reduction on load)

    model = AutoModelForCausalLM.from_pretrained(weights)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    model.eval()
    return model, tokenizer


def reconstruction(model, tokenizer, windows: torch.Tensor, *, progress: bool = True) -> dict:
    """Teacher-forced reconstruction of ``windows`` (``(n, L)``) through the slots, against dense copying and plain
    language modelling. Returns per-setting token accuracies (means over windows)."""
    from tqdm.auto import tqdm

    from ..integration.icae import _attached, decoder_loss, encode

    cfg, _ = _attached(model)
    eos = tokenizer.eos_token_id
    sums = {"icae_all_slots": 0.0, "icae_per_chunk": 0.0, "dense_copy": 0.0, "dense_no_context": 0.0}
    n, length = windows.shape
    with torch.no_grad():
        for i in tqdm(range(n), desc="icae reconstruction", disable=not progress):
            text = windows[i:i + 1]
            slots = encode(model, text)  # the chunks' slots in order
            sums["icae_all_slots"] += decoder_loss(model, slots, text, autoencode=True)[1]
            # chunk by chunk: each chunk compressed on its own and decoded from its own m slots
            cuts = cfg.chunk_lengths(length)
            starts = [sum(cuts[:j]) for j in range(len(cuts))]
            sums["icae_per_chunk"] += sum(
                decoder_loss(model, encode(model, text[:, s:s + c]), text[:, s:s + c], autoencode=True)[1] * c
                for s, c in zip(starts, cuts)) / length
            copy = torch.cat([text, torch.tensor([[eos]]), text], 1)
            logits = model(input_ids=copy, use_cache=False).logits[0, :-1]
            hits = logits.argmax(-1) == copy[0, 1:]
            sums["dense_copy"] += float(hits[length:].float().mean())  # the second copy, the first in view
            sums["dense_no_context"] += float(hits[: length - 1].float().mean())
    return {k: round(v / n, 4) for k, v in sums.items()}


def passkey(model, tokenizer, count: int, *, progress: bool = True) -> dict:
    """Passkey accuracy with the context compressed into slots and with the full prompt (dense)."""
    from tqdm.auto import tqdm

    import hf_tokred

    from .passkey import MAX_NEW_TOKENS, is_correct, make_passkey_samples, prompt_ids

    samples = make_passkey_samples(count, filler_repeats=PASSKEY_FILLER_REPEATS)
    rows, contexts, slots = [], [], []
    with torch.no_grad():
        for sample in tqdm(samples, desc="icae passkey", disable=not progress):
            ids, n_context = prompt_ids(tokenizer, sample)
            context, query = ids[:, :n_context], ids[:, n_context:]
            ctx = hf_tokred.compress_context(model, context)
            full = torch.cat([ctx.prefix_ids, query], 1)
            new = model.generate(full, attention_mask=torch.ones_like(full), **{CACHE_KWARG: ctx.fresh_cache()},
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, full.shape[1]:]
            dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                   do_sample=False)[0, ids.shape[1]:]
            answers = [tokenizer.decode(new, skip_special_tokens=True), tokenizer.decode(dense, skip_special_tokens=True)]
            rows.append({"key": sample.key, "depth": round(sample.depth, 3), "icae": answers[0], "dense": answers[1],
                         "icae_correct": is_correct(sample, answers[0]), "dense_correct": is_correct(sample, answers[1])})
            contexts.append(n_context)
            slots.append(ctx.entries)
    return {"samples": count, "icae_accuracy": sum(r["icae_correct"] for r in rows) / count,
            "dense_accuracy": sum(r["dense_correct"] for r in rows) / count,
            "mean_context_tokens": sum(contexts) / count, "mean_slots": sum(slots) / count, "per_sample": rows}


def run(args) -> int:
    """Load the artefact, measure, print the tables (and write ``--json``)."""
    from ..cli import format_table
    from ..embedded import cache_dir
    from ..recipes.icae import DEFAULT_OUTPUT, TRAINING_STATE
    from ..recipes.lm_data import lm_texts, token_windows

    weights = args.weights or os.path.join(cache_dir(), DEFAULT_OUTPUT)
    model, tokenizer = _load(weights)
    progress = not args.no_progress
    from ..integration.icae import _attached

    cfg, _ = _attached(model)
    windows = token_windows(tokenizer, lm_texts("heldout"), CONTEXT_TOKENS, count=args.samples, seed=0)
    recon = reconstruction(model, tokenizer, windows, progress=progress)
    keys = passkey(model, tokenizer, args.samples, progress=progress)
    training = {}
    state_file = os.path.join(weights, TRAINING_STATE)
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as fh:
            state = json.load(fh)
        fp = state.get("fingerprint", {})
        training = {"steps": state.get("step"), "batch_size": fp.get("batch_size"), "lr": fp.get("lr"),
                    "lm_ratio": fp.get("lm_ratio"), "windows": state.get("windows"), "seconds": state.get("seconds"),
                    "seed": fp.get("seed")}
    slots = cfg.slots_for(CONTEXT_TOKENS)
    print(f"ICAE on SmolLM2-135M-Instruct: {cfg.chunk_tokens}-token chunks -> {cfg.memory_slots} slots; "
          f"{CONTEXT_TOKENS} context tokens -> {slots} slots ({CONTEXT_TOKENS / slots:g}x); slot form {cfg.slot_form}")
    if training:
        print(f"training: {training['steps']} steps x {training['batch_size']} windows of {2 * cfg.chunk_tokens} "
              f"tokens (lr {training['lr']}, LM ratio {training['lm_ratio']}, seed {training['seed']}), "
              f"{training['seconds']:.0f} s on a shared CPU")
    print(format_table(
        [f"reconstruction, {args.samples} held-out windows of {CONTEXT_TOKENS} tokens", "token accuracy"],
        [[f"ICAE, all {slots} slots in view", f"{recon['icae_all_slots']:.4f}"],
         [f"ICAE, chunk by chunk ({cfg.memory_slots} slots -> {cfg.chunk_tokens} tokens)",
          f"{recon['icae_per_chunk']:.4f}"],
         ["dense, copying with the full text in view", f"{recon['dense_copy']:.4f}"],
         ["dense, no text in view (language-model floor)", f"{recon['dense_no_context']:.4f}"]], right={1}))
    print(format_table(
        [f"passkey, {keys['samples']} samples", "context tokens", "cache entries", "accuracy"],
        [["ICAE: context -> slots, question after them", f"{keys['mean_context_tokens']:.0f}",
          f"{keys['mean_slots']:.0f}", f"{keys['icae_accuracy']:.3f}"],
         ["dense: the uncompressed prompt", f"{keys['mean_context_tokens']:.0f}", f"{keys['mean_context_tokens']:.0f}",
          f"{keys['dense_accuracy']:.3f}"]], right={1, 2, 3}))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"method": "icae", "weights": weights, "config": cfg.to_dict(), "training": training,
                       "reconstruction": recon, "passkey": keys}, fh, indent=1)
    return 0
