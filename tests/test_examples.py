"""The example scripts run and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_diffusion_todo_example():
    out = _run("diffusion_todo.py")
    assert "dense keys per self-attention:   [64, 64]" in out
    assert "reduced keys per self-attention: [16, 16]" in out
    assert out.count("True") == 3


@pytest.mark.real_model
def test_streaming_generation_example():
    out = _run("streaming_generation.py", "--new-tokens", "300")
    assert "tokens held per layer: 256" in out
    assert "'max_tokens': 256" in out


def test_diffusion_tome_pair_example(tmp_path):
    out = _run("diffusion_tome_pair.py", "--out", str(tmp_path / "pair.png"))
    assert "same seed, same image again:       True" in out
    assert "remove() restores dense output:    True" in out
    assert (tmp_path / "pair.png").stat().st_size > 0


@pytest.mark.real_model
def test_train_dynamicvit_example(tmp_path):
    out = _run("train_dynamicvit.py", "--steps", "2", "--train-texts", "16", "--eval-texts", "16",
               "--out", str(tmp_path / "minilm-dynamicvit"))
    assert "reloaded outputs identical: True" in out
