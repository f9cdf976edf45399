"""ToMe with metric="hidden" on MiniLM at many ratios: the curve the learned methods are compared with at their own
FLOPs (the benchmark's 192 held-out texts; training-free, so no training texts), through the benchmark's own
``run_quality``.

    python docs/scripts/minilm_tome_hidden_curve.py 0.05,0.1,0.11,0.12,0.13,0.15
"""
import sys

from hf_tokred.bench.encoders import run_quality

ratios = [float(x) for x in sys.argv[1].split(",")]
record = run_quality(["tome"], variants=[("tome (hidden)", "tome", [{"ratio": r, "metric": "hidden"} for r in ratios])])
for ratio, row in zip(ratios, record["rows"]):
    print(f"tome hidden ratio={ratio} saved {row['flops_saved']:.4f} cos {row['cosine']['mean']:.4f}", flush=True)
