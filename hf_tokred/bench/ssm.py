"""``hf-tokred ssm-bench``: ssm_prune on a Mamba of realistic width (random weights): FLOPs, time, exactness.

The model has the shape of mamba-130m (d_model 768, 24 blocks, state 16, expand 2, vocabulary 50280) with random
weights: the benchmark measures cost, not quality. For the dense model and each pruning setting it reports

* the FLOPs of one prefill (``MambaForCausalLM`` on ``--tokens`` tokens, logits of the last token only, as
  ``generate`` computes them) counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and the causal
  convolution, the scan's per-step ``state @ C`` included) plus the scan's elementwise work counted analytically
  (``6 * d_inner * d_state`` per token and block: discretisation, input and state update), and the saving
  predicted from the tokens each block scans;
* the median wall time of that prefill (the models take turns ``--repeats`` times after the measuring pass,
  which warms them up), on transformers' torch path: without ``mamba_ssm`` / ``causal_conv1d`` that is the
  sequential reference scan, one Python step per token and block (about 1 ms each on a CPU core), so time
  follows the number of scanned tokens closely and a 1,024-token prefill of 24 blocks takes ~25 s;
* the cosine of the last token's final hidden state to the dense model's;
* exactness of the unpruned path: ``keep=1.0`` and ``layers=[]`` give bit-identical logits, and so does the
  model after ``hf_tokred.remove``.

Example:
    hf-tokred ssm-bench                              # 1,024 tokens, 2 settings (a few minutes on 2 cores)
    hf-tokred ssm-bench --tokens 4096 --repeats 3 --json ssm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

DEFAULT_SETTINGS = ("0.5@12", "0.7@6,12,18")
DEFAULT_TOKENS = 1024
MAMBA_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, expand=2, conv_kernel=4)


def parse_setting(text: str) -> dict:
    """``"KEEP@L1,L2"`` -> an ssm_prune config dict.

    Example:
        >>> parse_setting("0.5@8,16")
        {'method': 'ssm_prune', 'keep': 0.5, 'layers': [8, 16]}
    """
    try:
        keep, layers = text.split("@")
        return {"method": "ssm_prune", "keep": float(keep), "layers": [int(i) for i in layers.split(",") if i]}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEEP@LAYER[,LAYER...] (e.g. 0.5@12), got {text!r}") from None


def build_model(num_layers: int = 24, hidden_size: int = 768, seed: int = 0):
    """A random-weight ``MambaForCausalLM`` of mamba-130m's shape (or narrower / shallower), in eval mode, without
    gradients.

    Example:
        >>> build_model(num_layers=2, hidden_size=64).config.num_hidden_layers
        2
    """
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(**{**MAMBA_130M, "num_hidden_layers": num_layers, "hidden_size": hidden_size})
    # Inference only: torch's FlopCounterMode hooks every module call and fails on a parameter that requires
    # grad passed to a module (transformers 5.24+ runs Mamba's convolution as a module taking conv1d.bias).
    return MambaForCausalLM(config).eval().requires_grad_(False)


def predicted_fraction(setting: dict, num_layers: int) -> float:
    """Fraction of the dense per-block work left: the mean over blocks of the share of tokens each scans.

    Example:
        >>> predicted_fraction({"keep": 0.5, "layers": [12]}, 24)
        0.75
    """
    share, total = 1.0, 0.0
    for block in range(num_layers):
        if block in setting["layers"]:
            share *= setting["keep"]
        total += share
    return total / num_layers


def _prefill(model, ids, hidden: bool = False):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1, output_hidden_states=hidden)


def measure(model, ids) -> dict:
    """One prefill: its FLOPs (counted matmuls/convolutions plus the scan's elementwise work, see the module doc),
    the tokens each block scanned, the last-token logits and final hidden state.

    Example:
        >>> measure(build_model(2, 64), torch.zeros(1, 8, dtype=torch.long))["counted"] > 0
        True
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ..integration.ssm import last_pruning
    from ..integration.wiring import get_applied

    counter = FlopCounterMode(display=False)
    with counter:
        out = _prefill(model, ids, hidden=True)
    if get_applied(model) is not None:
        tokens = last_pruning(model).tokens_per_block
    else:
        tokens = [ids.shape[1]] * model.config.num_hidden_layers
    d_inner = model.config.intermediate_size
    scan = sum(6 * d_inner * model.config.state_size * n * ids.shape[0] for n in tokens)
    counted = int(counter.get_total_flops())
    return {"counted": counted, "scan_elementwise": scan, "total": counted + scan, "tokens_per_block": tokens,
            "logits": out.logits, "last_hidden": out.hidden_states[-1][:, -1].float()}


def _layers_label(layers) -> str:
    if len(layers) > 4:
        return f"[{layers[0]}..{layers[-1]}]"
    return "[" + ",".join(map(str, layers)) + "]"


def _label(setting: dict) -> str:
    return f"keep {setting['keep']:g} @ {_layers_label(setting['layers'])}"


def run_ssm(tokens: int = DEFAULT_TOKENS, settings=DEFAULT_SETTINGS, *, num_layers: int = 24, hidden_size: int = 768,
            batch: int = 1, repeats: int = 1, seed: int = 0, log=print) -> dict:
    """Run the benchmark; returns a JSON-ready record (see the module doc).

    Exactness of the unpruned path: a ``keep=1.0`` reduction at every block and a ``layers=[]`` one give logits
    bit-identical to the dense model's, and so does the model after ``hf_tokred.remove`` of each setting.

    Example:
        >>> record = run_ssm(16, ["0.5@1"], num_layers=2, hidden_size=64, repeats=1, log=lambda *a: None)
        >>> record["rows"][1]["tokens_per_block"], record["exactness"]["all_identical"]
        ([16, 8], True)
    """
    import hf_tokred

    settings = [parse_setting(s) if isinstance(s, str) else s for s in settings]
    for setting in settings:
        hf_tokred.TokenReductionConfig.coerce(setting).check_depth(num_layers)
    model = build_model(num_layers, hidden_size, seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    log(f"mamba-130m shape: {num_layers} blocks, d_model {hidden_size}, {batch} x {tokens} tokens, random weights")

    labels = ["dense", *(_label(s) for s in settings)]
    configs = [None, *settings]
    measured, checks = {}, {}
    noop = [{"method": "ssm_prune", "keep": 1.0, "layers": list(range(num_layers))},
            {"method": "ssm_prune", "keep": 0.5, "layers": []}]
    for label, setting in zip(labels, configs):
        if setting is not None:
            hf_tokred.apply(model, setting)
        measured[label] = measure(model, ids)
        if setting is not None:
            hf_tokred.remove(model)
        log(f"measured {label}")
        if setting is None:  # the no-op settings against the dense logits
            for check in noop:
                hf_tokred.apply(model, check)
                checks[f"keep={check['keep']:g} layers={_layers_label(check['layers'])}"] = torch.equal(
                    _prefill(model, ids).logits, measured["dense"]["logits"])
                hf_tokred.remove(model)
    dense = measured["dense"]
    times = {label: [] for label in labels}
    for repeat in range(repeats):  # the measuring passes above warmed up; models take turns
        for label, setting in zip(labels, configs):
            if setting is not None:
                hf_tokred.apply(model, setting)
            start = time.perf_counter()
            out = _prefill(model, ids)
            elapsed = time.perf_counter() - start
            if setting is not None:
                hf_tokred.remove(model)
            elif repeat == 0 and len(configs) > 1:  # the dense model after the previous round's apply/remove
                checks["after remove"] = torch.equal(out.logits, dense["logits"])
            times[label].append(elapsed)
        log(f"timed round {repeat + 1}/{repeats}")
    if repeats == 0 and len(configs) > 1:
        checks["after remove"] = torch.equal(_prefill(model, ids).logits, dense["logits"])
    exactness = {"checks": checks, "all_identical": all(checks.values())}
    log(f"exactness of the unpruned path: {'bit-identical' if exactness['all_identical'] else 'DIFFERS'}")
    rows = []
    dense_time = _median(times["dense"]) if repeats else None
    for label, setting in zip(labels, configs):
        row = measured[label]
        seconds = _median(times[label]) if repeats else None
        predicted = 1.0 if setting is None else predicted_fraction(setting, num_layers)
        cosine = torch.nn.functional.cosine_similarity(row["last_hidden"], dense["last_hidden"]).mean()
        rows.append({
            "setting": label, "config": setting, "tokens_per_block": row["tokens_per_block"],
            "gflops": row["total"] / 1e9, "gflops_counted": row["counted"] / 1e9,
            "gflops_scan_elementwise": row["scan_elementwise"] / 1e9,
            "flops_saved": 1 - row["total"] / dense["total"], "block_work_saved_predicted": 1 - predicted,
            "seconds": seconds, "speedup": None if seconds is None else dense_time / seconds,
            "speedup_predicted": dense["total"] / row["total"], "last_token_cosine": float(cosine),
        })
    return {"model": {"shape": "mamba-130m", "num_layers": num_layers, "hidden_size": hidden_size,
                      "state_size": MAMBA_130M["state_size"], "expand": MAMBA_130M["expand"]},
            "batch": batch, "tokens": tokens, "repeats": repeats, "exactness": exactness, "rows": rows}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def format_ssm(record: dict) -> str:
    """The record of :func:`run_ssm` as a table.

    Example:
        >>> print(format_ssm(run_ssm(16, ["0.5@1"], num_layers=2, hidden_size=64, repeats=1,
        ...                          log=lambda *a: None)).splitlines()[0])   # doctest: +ELLIPSIS
        ssm_prune on a random-weight Mamba (mamba-130m shape: 2 blocks, d_model 64), prefill of 1 x 16 tokens
    """
    from ..cli import format_table

    m = record["model"]
    lines = [f"ssm_prune on a random-weight Mamba (mamba-130m shape: {m['num_layers']} blocks, d_model "
             f"{m['hidden_size']}), prefill of {record['batch']} x {record['tokens']} tokens"]
    header = ["setting", "GFLOPs", "FLOPs saved", "predicted", "time (s)", "speed-up", "FLOP speed-up",
              "last-token cos"]
    rows = []
    for row in record["rows"]:
        rows.append([
            row["setting"], f"{row['gflops']:.1f}", f"{row['flops_saved']:.1%}", f"{row['block_work_saved_predicted']:.1%}",
            "-" if row["seconds"] is None else f"{row['seconds']:.2f}",
            "-" if row["speedup"] is None else f"{row['speedup']:.2f}x", f"{row['speedup_predicted']:.2f}x",
            f"{row['last_token_cosine']:.4f}",
        ])
    lines.append(format_table(header, rows, right=set(range(1, len(header)))))
    checks = record["exactness"]["checks"]
    lines.append("exactness of the unpruned path (logits bit-identical to dense): "
                 + ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()))
    return "\n".join(lines)


def add_command(subparsers) -> None:
    """Add ``hf-tokred ssm-bench`` to the CLI.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_command(parser.add_subparsers())
        >>> parser.parse_args(["ssm-bench", "--tokens", "512"]).tokens
        512
    """
    bench = subparsers.add_parser("ssm-bench", help="ssm_prune on a mamba-130m-shaped Mamba: FLOPs, time, exactness",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"prompt length (default {DEFAULT_TOKENS})")
    bench.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    bench.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting(s) for s in DEFAULT_SETTINGS],
                       metavar="KEEP@LAYERS", help=f"pruning settings (default: {' '.join(DEFAULT_SETTINGS)})")
    bench.add_argument("--layers", type=int, default=24, help="blocks (default 24, mamba-130m)")
    bench.add_argument("--hidden-size", type=int, default=768, help="d_model (default 768, mamba-130m)")
    bench.add_argument("--repeats", type=int, default=1, help="timed rounds, after the measuring pass (default 1)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", metavar="OUT", help="also write every number to this file")
    bench.set_defaults(handler=_run)


def _run(args) -> int:
    record = run_ssm(args.tokens, args.settings, num_layers=args.layers, hidden_size=args.hidden_size,
                     batch=args.batch, repeats=args.repeats, seed=args.seed)
    record["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    print(format_ssm(record))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return 0
