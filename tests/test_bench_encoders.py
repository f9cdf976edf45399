"""``hf-tokred encoders``: the encoder benchmark at a tiny size (table printed, JSON written, plot written)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exit_code

from hf_tokred.bench.encoders import DropLast, cosine_stats, interpolate_at, stdlib_texts, text_batches
from hf_tokred.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from hf_tokred.embedded import load_minilm

    return load_minilm()[1]


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_texts_are_fixed_and_exactly_as_long_as_asked(tokenizer):
    texts = stdlib_texts(tokenizer, 8)
    assert [t.tokens for t in texts] == [64, 128, 192, 256] * 2
    assert texts == stdlib_texts(tokenizer, 8)  # deterministic
    later = stdlib_texts(tokenizer, 4, skip=8)
    assert not {t.text for t in later} & {t.text for t in texts}  # training texts are other texts
    batches = text_batches(tokenizer, texts, 16)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 64), (2, 128), (2, 192), (2, 256)]
    assert all(bool(b["attention_mask"].all()) for b in batches)  # no padding: FLOPs are real tokens'
    with pytest.raises(ValueError, match="count must be >= 1"):
        stdlib_texts(tokenizer, 0)


def test_interpolation_and_cosine_stats():
    assert interpolate_at([(0.0, 1.0), (0.2, 0.98), (0.4, 0.9)], 0.3) == pytest.approx(0.94)
    assert interpolate_at([(0.0, 1.0), (0.2, 0.98)], 0.3) is None
    e = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    stats = cosine_stats(e, e)
    assert stats["mean"] == pytest.approx(1.0) and stats["min"] == pytest.approx(1.0)
    assert cosine_stats(-e, e)["mean"] == pytest.approx(-1.0)


def test_drop_reference_cuts_tokens_through_the_wiring():
    from transformers import ViTConfig, ViTModel

    from hf_tokred.bench.encoders import _attach_drop

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                               intermediate_size=64), add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(pixel_values=pixels).last_hidden_state
        undo = _attach_drop(model, 16)
        assert model(pixel_values=pixels).last_hidden_state.shape[1] == 65 - 3 * 16
        undo.run()
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, dense)
    assert DropLast(4).schedule(2) == [4, 4]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_speed_part_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["encoders", "--part", "speed", "--vit", "tiny", "--repeats", "1", "--threads", "1",
                 "--method", "tome", "--method", "evit", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("dense", "tome", "tome (hidden)", "evit", "drop-16 (no matching)", "predicted", "measured"):
        assert label in text
    record = json.loads(out.read_text())
    assert record["command"].startswith("hf-tokred encoders --part speed")
    rows = {v["name"]: v for v in record["speed"]["variants"]}
    assert set(rows) == {"dense", "tome", "tome (hidden)", "evit", "drop-16 (no matching)"}
    assert rows["dense"]["predicted_speedup"] == 1.0 and rows["tome"]["predicted_speedup"] > 1.0
    assert rows["tome"]["tokens_out"] < rows["dense"]["tokens_out"] and len(rows["tome"]["times_s"]) == 1
    assert record["speed"]["torch_threads"] == 1 and "load_average" in record["machine"]


@pytest.mark.real_model
def test_quality_part_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "quality.json", tmp_path / "curve.png"
    assert main(["encoders", "--part", "quality", "--texts", "4", "--threads", "1", "--method", "tome",
                 "--method", "diffrate", "--calibration-texts", "2", "--json", str(out), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in text and "FLOPs saved" in text and "mean cosine at 30% FLOPs saved" in text
    record = json.loads(out.read_text())["quality"]
    variants = {r["variant"] for r in record["rows"]}
    assert variants == {"tome", "tome (hidden)", "diffrate"}
    for row in record["rows"]:
        assert 0.0 < row["flops_saved"] < 1.0 and 0.0 < row["cosine"]["mean"] <= 1.0 + 1e-6
    tome = sorted((r["params"]["ratio"], r["flops_saved"]) for r in record["rows"] if r["variant"] == "tome")
    assert [s for _, s in tome] == sorted(s for _, s in tome)  # more merging saves more
    diffrate = [r for r in record["rows"] if r["variant"] == "diffrate"]
    assert [r["setting"] for r in diffrate] == [f"flops_target={f}" for f in (0.9, 0.8, 0.7, 0.6)]
    assert all(len(r["params"]["prune"]) == 6 for r in diffrate)
    assert set(record["cosine_at_30pct_saved"]) == variants
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.real_model
def test_quality_part_trains_dynamicvit(tmp_path, capsys):
    out = tmp_path / "dvit.json"
    assert main(["encoders", "--part", "quality", "--texts", "4", "--threads", "1", "--method", "dynamicvit",
                 "--train-texts", "4", "--train-steps", "2", "--dynamicvit-keep-rate", "0.7", "--dynamicvit-keep-rate",
                 "0.5", "--predictor-dim", "32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["quality"]["rows"]
    assert [r["setting"] for r in rows] == [f"keep_rate={k}, layers=[2], predictor_dim=32" for k in (0.7, 0.5)]
    assert all(r["learned"] and r["train_steps"] == 2 and r["flops_saved"] > 0 for r in rows)
    assert "dynamicvit *" in capsys.readouterr().out


@pytest.mark.real_model
def test_quality_part_fine_tunes_a_copy_of_the_backbone(tmp_path, capsys):
    from hf_tokred.bench.encoders import run_quality

    record = run_quality(["dynamicvit", "tome"], texts=4, train_texts=4, train_steps=2, train_backbone=True,
                         backbone_lr=1e-3, variants=[("tome", "tome", [{"ratio": 0.1}]),
                                                     ("dynamicvit", "dynamicvit", [{"keep_rate": 0.7}]),
                                                     ("tome again", "tome", [{"ratio": 0.1}])])
    first, trained, again = record["rows"]
    assert trained["train_backbone"] and trained["backbone_lr"] == 1e-3 and trained["flops_saved"] > 0
    # the fine-tuned copy does not leak into later rows: the same ToMe setting gives the same embeddings
    assert again["cosine"] == first["cosine"] and again["flops_saved"] == first["flops_saved"]


@pytest.mark.real_model
def test_a_method_without_modules_records_that_its_backbone_trained(capsys):
    from hf_tokred.bench.encoders import run_quality

    record = run_quality(["evo_vit"], texts=4, train_texts=4, train_steps=1, train_lr=1e-4, log=print,
                         variants=[("evo_vit", "evo_vit", [{"keep_rate": 0.65}])])
    row = record["rows"][0]
    assert row["learned"] and row["train_backbone"] and row["backbone_lr"] == 1e-4 and row["train_steps"] == 1
    assert "evo_vit keep_rate=0.65: trained the backbone (no modules of its own)" in capsys.readouterr().out


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    assert exit_code(["encoders", "--part", "speed", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot draws the quality curve" in capsys.readouterr().err
    assert exit_code(["encoders", "--method", "nope"]) == 2
    assert "not registered: nope" in capsys.readouterr().err
    assert exit_code(["encoders", "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert exit_code(["encoders", "--part", "quality", "--backbone-lr", "1e-4"]) == 2
    assert "--backbone-lr needs --train-backbone" in capsys.readouterr().err
    assert exit_code(["encoders", "--part", "quality", "--train-lr", "0"]) == 2
    assert "--train-lr: expected a learning rate > 0" in capsys.readouterr().err
    assert exit_code(["encoders", "--part", "quality", "--dynamicvit-keep-rate", "1.5"]) == 2
    assert "--dynamicvit-keep-rate: expected a keep_rate in (0, 1], got 1.5" in capsys.readouterr().err
    assert exit_code(["encoders", "--part", "size"]) == 2
