"""``hf-tokred diffusion`` at a tiny size, and the tome_sd image-pair example."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hf_tokred.cli import main

pytest.importorskip("tomesd", reason="the benchmark's tomesd variant needs tomesd==0.1.3 (the test extra)")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_diffusion_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["diffusion", "--size", "tiny", "--repeats", "2", "--threads", "1", "--ratio", "0.5",
                   "--ratio", "0.7", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "tiny unet" in printed and "tiny dit" in printed and "FLOP speed-up" in printed
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    unet, dit = report["runs"]
    assert [(r["method"], r["setting"]) for r in unet["results"]] == [
        ("dense", "-"),
        ("tomesd 0.1.3", "ratio=0.5"), ("tome_sd (ours)", "ratio=0.5"),
        ("tomesd 0.1.3", "ratio=0.7"), ("tome_sd (ours)", "ratio=0.7"),
        ("todo (ours)", "downsample_factor=2"),
        ("freqts (ours, partial step)", "ratio=0.5 full_every=3"), ("freqts (ours, partial step)", "ratio=0.7 full_every=3"),
    ]
    assert [r["method"] for r in dit["results"]] == ["dense", "tome_sd (ours)", "tome_sd (ours)", "todo (ours)",
                                                      *["freqts (ours, partial step)"] * 2, *["dydit (ours)"] * 2]
    for run in (unet, dit):
        dense, *reduced = run["results"]
        assert dense["relative_error"] == 0 and dense["flop_speedup"] == 1
        assert len(dense["times_s"]) == 2
        for result in reduced:
            assert result["gflops"] < dense["gflops"] and result["relative_error"] > 0, result
    by_setting = {(r["method"], r["setting"]): r for r in unet["results"]}
    # Same merge, same FLOPs (the similarity matmul included) and nearly the same output as tomesd.
    ours, theirs = by_setting[("tome_sd (ours)", "ratio=0.5")], by_setting[("tomesd 0.1.3", "ratio=0.5")]
    assert ours["gflops"] == pytest.approx(theirs["gflops"], rel=1e-3)
    assert by_setting[("tome_sd (ours)", "ratio=0.7")]["gflops"] < ours["gflops"]
    assert "PASS" in printed or "FAIL" in printed  # the checks are printed whatever the (tiny, noisy) timings
    # Where the time goes: the finest-grid blocks are timed in every round, and are part of the step.
    for run in (unet, dit):
        for result in run["results"]:
            assert len(result["finest_blocks_times_s"]) == 2
            assert 0 < result["finest_blocks_s"] < result["median_s"]
            assert result["rest_s"] == pytest.approx(result["median_s"] - result["finest_blocks_s"])
    # Ours against tomesd round by round, on every clock.
    for paired, times in (("vs_tomesd_times", "times_s"), ("vs_tomesd_cpu_times", "cpu_times_s"),
                          ("vs_tomesd_block_times", "finest_blocks_times_s")):
        assert ours[paired] == pytest.approx([a / b for a, b in zip(ours[times], theirs[times])])
    assert "[blocks] ratio=0.5: ours/tomesd per round" in printed


def test_rounds_alternate_the_variant_order():
    from hf_tokred.bench.diffusion import Variant, _round_order

    variants = [Variant(name, "-", None, None) for name in ("dense", "a", "b", "c")]
    assert [v.method for v in _round_order(variants, 0)] == ["dense", "a", "b", "c"]
    assert [v.method for v in _round_order(variants, 1)] == ["dense", "c", "b", "a"]
    assert [v.method for v in _round_order(variants, 2)] == ["dense", "a", "b", "c"]


def test_diffusion_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as err:
        main(["diffusion", "--ratio", "0.9"])
    assert err.value.code == 2
    assert "0.75" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diffusion", "--model", "flux"])


def test_tome_pair_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("diffusion_tome_pair", EXAMPLES / "diffusion_tome_pair.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.set_num_threads(1)
    out = tmp_path / "pair.png"
    example.main(["--out", str(out)])
    printed = capsys.readouterr().out
    assert "dense tokens per self-attention:   [64, 64]" in printed
    assert "merged tokens per self-attention:  [32, 32]" in printed
    assert printed.count("True") == 2
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (8 * (32 + 2 + 32), 8 * 32)
