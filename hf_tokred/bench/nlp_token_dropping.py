"""token_dropping: continued MLM pretraining of all-MiniLM-L6-v2 with and without Token Dropping at equal steps.

Builds the embedded all-MiniLM-L6-v2 (a BertModel) into a BertForMaskedLM (decoder tied to the word embeddings,
head transform fitted by ridge regression on the training split; see hf_tokred.recipes.token_dropping.minilm_mlm)
and continues its masked-language-model pretraining twice from that same start, with the same seed, batches,
masks and steps: once with Token Dropping (arXiv 2203.13240; blocks drop_layer .. restore_layer-1 see only
the hard tokens, ranked by the running MLM loss of their ids), once without. Data: the prose paragraphs of the
Python documentation shipped with the standard library (hf_tokred.training.stdlib_corpus), training split for
training, held-out split for every figure. Reports:

- time per training step (median of each run's steps after warm-up; forward + backward + AdamW) with and without
  dropping; forward + backward of the two trained models taking turns on one batch (median of --repeats rounds,
  robust to load that changes during the runs); the encoder forward FLOPs of one training batch
  (torch FlopCounterMode);
- held-out MLM loss afterwards (full sequence, no dropping at evaluation; same masks for every model);
- sentence-embedding quality afterwards (mean-pooled last hidden state, no dropping): cosine to the ORIGINAL
  all-MiniLM-L6-v2 embeddings of the held-out paragraphs (how far each run moved the embedding), and a
  retrieval proxy: each held-out paragraph's first half retrieves its own second half among all second halves
  (top-1 accuracy and mean reciprocal rank), for the original model and both runs.
Times were taken on whatever else the machine was running: compare the two arms, not the absolute seconds.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch

from ..recipes import mean_ends


def add_bench_arguments(parser) -> None:
    """The settings of ``hf-tokred nlp-bench token_dropping``.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["nlp-bench", "token_dropping"]).steps
        80
    """
    from ..cli import _float_in, _positive_int

    parser.add_argument("--steps", type=_positive_int, default=80, help="training steps of each run (default: 80)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="chunks per step (default: 8)")
    parser.add_argument("--max-length", type=_positive_int, default=128, help="tokens per chunk (default: 128)")
    parser.add_argument("--keep", type=_float_in(0.01, 1.0), default=0.5,
                        help="fraction of the droppable tokens the middle blocks keep (default: 0.5)")
    parser.add_argument("--drop-layer", type=int, default=None,
                        help="first block on the kept tokens (default: half the depth, 3 of 6)")
    parser.add_argument("--paragraphs", type=_positive_int, default=None,
                        help="use only this many training and held-out paragraphs (default: all; for quick runs)")
    parser.add_argument("--repeats", type=_positive_int, default=7,
                        help="interleaved timing rounds of forward + backward after training (default: 7)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")


def _mean_pool(encoder, texts: list[str], tokenizer, batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled last hidden states (all-MiniLM-L6-v2's sentence embedding before its normalisation)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                            return_tensors="pt")
            hidden = encoder(**enc).last_hidden_state
            weight = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * weight).sum(1) / weight.sum(1))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def _halves(texts: list[str]) -> tuple[list[str], list[str]]:
    firsts, seconds = [], []
    for text in texts:
        words = text.split()
        middle = len(words) // 2
        firsts.append(" ".join(words[:middle]))
        seconds.append(" ".join(words[middle:]))
    return firsts, seconds


def _retrieval(encoder, firsts, seconds, tokenizer) -> dict:
    a, b = _mean_pool(encoder, firsts, tokenizer), _mean_pool(encoder, seconds, tokenizer)
    scores = a @ b.T
    target = scores.diagonal().unsqueeze(1)
    rank = (scores > target).sum(dim=1) + 1
    return {"top1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank.float()).mean())}


def _heldout_mlm_loss(model, chunks, tokenizer, seed: int, batch_size: int = 16) -> float:
    from ..integration.token_dropping import mlm_token_losses
    from ..recipes.token_dropping import collate, mask_tokens, masked_logits_only, special_ids

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            ids, mask = collate(chunks[start:start + batch_size], tokenizer.pad_token_id)
            masked, labels = mask_tokens(ids, mask, mask_token_id=tokenizer.mask_token_id,
                                         vocab_size=model.config.vocab_size, special_ids=special_ids(tokenizer),
                                         generator=torch.Generator().manual_seed(seed + start))
            labelled = labels != -100
            with masked_logits_only(model, labelled):
                logits = model(input_ids=masked, attention_mask=mask).logits
            _, losses = mlm_token_losses(logits, labels[labelled])
            total += float(losses.sum())
            count += losses.numel()
    return total / max(count, 1)


def _encoder_flops(model, chunks, tokenizer, dropping: bool) -> int:
    """Forward FLOPs of the encoder blocks on one masked training batch (the masked positions kept)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..integration.token_dropping import keep_positions
    from ..recipes.token_dropping import collate, mask_tokens, special_ids

    ids, mask = collate(chunks, tokenizer.pad_token_id)
    masked, labels = mask_tokens(ids, mask, mask_token_id=tokenizer.mask_token_id, vocab_size=model.config.vocab_size,
                                 special_ids=special_ids(tokenizer), generator=torch.Generator().manual_seed(0))
    model.eval()
    counter = FlopCounterMode(display=False)
    keeping = keep_positions(model, labels != -100) if dropping else contextlib.nullcontext()
    with torch.no_grad(), counter, keeping:
        model.bert(input_ids=masked, attention_mask=mask)  # embeddings are lookups: the matmuls are the blocks'
    return int(counter.get_total_flops())


def _interleaved_step_times(models: dict, chunks, tokenizer, repeats: int) -> dict:
    """Median seconds of one training forward + backward (no optimizer step) of each model on the same masked
    batch, the models taking turns ``repeats`` times after a warm-up: robust to load that changes over time."""
    from ..integration.token_dropping import keep_positions, mlm_token_losses
    from ..recipes.token_dropping import collate, mask_tokens, masked_logits_only, special_ids

    ids, mask = collate(chunks, tokenizer.pad_token_id)
    times = {name: [] for name in models}
    for repeat in range(repeats + 1):
        for name, (model, dropping) in models.items():
            masked, labels = mask_tokens(ids, mask, mask_token_id=tokenizer.mask_token_id,
                                         vocab_size=model.config.vocab_size, special_ids=special_ids(tokenizer),
                                         generator=torch.Generator().manual_seed(repeat))
            labelled = labels != -100
            model.train()
            started = time.perf_counter()
            keeping = keep_positions(model, labelled) if dropping else contextlib.nullcontext()
            with keeping, masked_logits_only(model, labelled):
                logits = model(input_ids=masked, attention_mask=mask).logits
            mlm_token_losses(logits, labels[labelled])[1].mean().backward()
            elapsed = time.perf_counter() - started
            model.zero_grad(set_to_none=True)
            model.eval()
            if repeat:  # the first round is the warm-up
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def run_bench(args) -> dict:
    """Train both runs, then measure them on the held-out split; every number in a JSON-ready dict."""
    import hf_tokred

    from ..cli import _log
    from ..recipes.token_dropping import minilm_mlm, special_ids, tokenize_chunks, train_token_dropping
    from ..training import stdlib_corpus

    started = time.perf_counter()
    train_texts, heldout = stdlib_corpus("train"), stdlib_corpus("heldout")
    if args.paragraphs is not None:
        train_texts, heldout = train_texts[: args.paragraphs], heldout[: args.paragraphs]
    _log(f"token_dropping bench: MiniLM MLM head fitted on {len(train_texts)} training paragraphs")
    start_model, tokenizer = minilm_mlm(train_texts, max_length=args.max_length, seed=args.seed)
    original = copy.deepcopy(start_model.bert).eval()
    heldout_chunks = tokenize_chunks(heldout, tokenizer, args.max_length)
    runs = {}
    for name, dropping in (("token_dropping", True), ("baseline", False)):
        model = copy.deepcopy(start_model)
        _log(f"token_dropping bench: {name}, {args.steps} steps of {args.batch_size} x <= {args.max_length} tokens")
        t0 = time.perf_counter()
        model = train_token_dropping(model, train_texts, tokenizer=tokenizer, keep=args.keep,
                                     drop_layer=args.drop_layer, dropping=dropping, steps=args.steps,
                                     batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                                     keep_reduction=True, progress=False)
        seconds = time.perf_counter() - t0
        times = model.step_seconds[min(3, len(model.step_seconds) - 1):]  # after warm-up
        runs[name] = {"model": model, "train_seconds": seconds, "step_median_s": statistics.median(times),
                      "final_train_loss": mean_ends(model.train_losses)[1],
                      "kept_fraction": model.kept_fraction}
    sample = tokenize_chunks(train_texts, tokenizer, args.max_length)[: args.batch_size]
    _log(f"token_dropping bench: {args.repeats} interleaved timing rounds")
    for parameter in [p for run in runs.values() for p in run["model"].parameters()]:
        parameter.requires_grad_(True)
    step_times = _interleaved_step_times({name: (run["model"], name == "token_dropping") for name, run in runs.items()},
                                         sample, tokenizer, args.repeats)
    hf_tokred.remove(runs["token_dropping"]["model"])  # evaluated as the plain checkpoint it is
    # FLOPs of the encoder blocks on one training batch, through the same reduction.
    flop_model = copy.deepcopy(start_model)
    dense_flops = _encoder_flops(flop_model, sample, tokenizer, dropping=False)
    hf_tokred.apply(flop_model, {"method": "token_dropping", "keep": args.keep, "drop_layer": args.drop_layer,
                                 "keep_ids": special_ids(tokenizer)})
    reducer = flop_model.config.token_reduction
    drop_layer, restore_layer = hf_tokred.TokenReductionConfig.coerce(reducer).layers(len(flop_model.bert.encoder.layer))
    dropped_flops = _encoder_flops(flop_model, sample, tokenizer, dropping=True)

    _log("token_dropping bench: held-out evaluation")
    firsts, seconds_half = _halves(heldout)
    base_embedding = _mean_pool(original, heldout, tokenizer)
    result_models = {"original": {"encoder": original, "mlm": start_model}}
    result_models.update({name: {"encoder": run["model"].bert, "mlm": run["model"]} for name, run in runs.items()})
    quality = {}
    for name, item in result_models.items():
        encoder = item["encoder"].eval()
        embedding = _mean_pool(encoder, heldout, tokenizer)
        quality[name] = {
            "heldout_mlm_loss": _heldout_mlm_loss(item["mlm"], heldout_chunks, tokenizer, args.seed),
            "cosine_to_original": float((embedding * base_embedding).sum(-1).mean()),
            **{f"retrieval_{k}": v for k, v in _retrieval(encoder, firsts, seconds_half, tokenizer).items()},
        }
    drop, base = runs["token_dropping"], runs["baseline"]
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (embedded) + MLM head (tied decoder, ridge-fitted transform)",
        "data": {"train_paragraphs": len(train_texts), "heldout_paragraphs": len(heldout),
                 "heldout_chunks": len(heldout_chunks)},
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                     "keep": args.keep, "drop_layer": drop_layer, "restore_layer": restore_layer,
                     "blocks": len(start_model.bert.encoder.layer), "seed": args.seed, "lr": 5e-5,
                     "lr_schedule": "linear", "mask_rate": 0.15, "repeats": args.repeats},
        "training": {name: {k: v for k, v in run.items() if k != "model"} for name, run in runs.items()},
        "forward_backward_s": step_times,
        "time_saved_forward_backward": 1.0 - step_times["token_dropping"] / step_times["baseline"],
        "time_saved_per_step": 1.0 - drop["step_median_s"] / base["step_median_s"],
        "encoder_flops": {"baseline": dense_flops, "token_dropping": dropped_flops,
                          "saved": 1.0 - dropped_flops / dense_flops},
        "heldout": quality,
        "seconds": time.perf_counter() - started,
    }


def format_bench(result) -> str:
    """The printed report: settings, training cost, held-out quality."""
    from ..cli import format_table

    s = result["settings"]
    train = result["training"]
    lines = [
        f"token_dropping: {result['model']}",
        f"continued MLM pretraining, {s['steps']} steps x {s['batch_size']} chunks of <= {s['max_length']} tokens, "
        f"lr {s['lr']} ({s['lr_schedule']}), seed {s['seed']}; dropping: keep {s['keep']} of the droppable tokens in "
        f"blocks {s['drop_layer']}..{s['restore_layer'] - 1} of {s['blocks']} (blocks 0..{s['drop_layer'] - 1} and "
        f"{s['restore_layer']}..{s['blocks'] - 1} see every token)",
        f"data: {result['data']['train_paragraphs']} training / {result['data']['heldout_paragraphs']} held-out "
        "paragraphs of the standard-library documentation",
        "",
        format_table(["training", "step s (median)", "train s", "final train loss", "tokens in middle blocks"],
                     [[name, f"{run['step_median_s']:.3f}", f"{run['train_seconds']:.0f}",
                       f"{run['final_train_loss']:.3f}", f"{run['kept_fraction']:.1%}"] for name, run in train.items()],
                     right={1, 2, 3, 4}),
        f"time saved per training step (median of each run's steps, optimizer included): "
        f"{result['time_saved_per_step']:.1%}",
        f"forward + backward, the two models taking turns ({s['repeats']} rounds, median): baseline "
        f"{result['forward_backward_s']['baseline']:.3f} s, token_dropping {result['forward_backward_s']['token_dropping']:.3f}"
        f" s, saved {result['time_saved_forward_backward']:.1%}",
        f"encoder forward FLOPs on a training batch: saved {result['encoder_flops']['saved']:.1%}",
        "",
        format_table(["held-out", "MLM loss", "cosine to original", "half->half top-1", "MRR"],
                     [[name, f"{q['heldout_mlm_loss']:.3f}", f"{q['cosine_to_original']:.4f}",
                       f"{q['retrieval_top1']:.3f}", f"{q['retrieval_mrr']:.3f}"]
                      for name, q in result["heldout"].items()], right={1, 2, 3, 4}),
        f"total {result['seconds']:.0f} s (times on a shared machine: compare the two runs, not the seconds)",
    ]
    return "\n".join(lines)
