"""Hub: push_to_hub with a model card (transport replaced at the HfApi level) and offline loading
through a real Hugging Face cache layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import hf_cache_snapshot
from huggingface_hub import ModelCard
from transformers import LlamaForCausalLM

import hf_tokred
from hf_tokred import TokenReductionConfig
from hf_tokred.integration.hub import make_model_card

STREAM = {"method": "streamingllm", "sink_tokens": 2, "window": 6}
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_model_push_to_hub_uploads_side_cars_and_card(tiny_llama_dir, fake_hub):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=STREAM)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.push_to_hub("me/tiny-stream", token_reduction_results={"passkey accuracy": 0.9, "KV bytes": "0.5x"})
    assert fake_hub.repos == ["me/tiny-stream"]
    files = fake_hub.commits[-1]["files"]
    assert {"config.json", "model.safetensors", "token_reduction_config.json", "README.md", "generation_config.json"} <= set(files)
    assert json.loads(files["config.json"])["token_reduction"] == TokenReductionConfig(**STREAM).to_dict()
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"token-reduction", "hf_tokred", "hf_tokred-streamingllm"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "**streamingllm**" in card.text and "2309.17453" in card.text
    assert "| `window` | `6` |" in card.text and "| `sink_tokens` | `2` |" in card.text
    assert "| passkey accuracy | 0.9 |" in card.text
    assert ("applied to [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)"
            in card.text)
    assert 'model = AutoModelForCausalLM.from_pretrained("me/tiny-stream")' in card.text


def test_card_of_a_model_from_a_local_folder_has_no_base_model_and_loads_with_its_class(tiny_llama_dir, fake_hub):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=STREAM)  # _name_or_path: the folder
    model.push_to_hub("me/tiny-local")
    card = ModelCard(fake_hub.commits[-1]["files"]["README.md"].decode())
    assert card.data.base_model is None and "base_model" not in str(card.data)
    assert "huggingface.co//" not in card.text and str(tiny_llama_dir) not in card.text and "applied to" not in card.text
    assert "from transformers import AutoModelForCausalLM\n" in card.text
    assert 'dense = AutoModelForCausalLM.from_pretrained("me/tiny-local", token_reduction=False)' in card.text
    assert "AutoModel." not in card.text  # a bare AutoModel would give the base model, without generate()


def test_hub_model_id_keeps_only_hub_ids(tmp_path, monkeypatch):
    from hf_tokred.integration.hub import hub_model_id

    assert hub_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for not_an_id in (None, "", str(tmp_path), "/tmp/model", "./model", "a/b/c", "../x", "gpt2", "C:\\models\\x"):
        assert hub_model_id(not_an_id) is None, not_an_id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "model").mkdir(parents=True)
    assert hub_model_id("me/model") is None  # an existing local folder, not the Hub repo of that name


def test_loading_class_follows_the_auto_mappings():
    from conftest import make_tiny_llama
    from transformers import LlamaConfig, ViTConfig, ViTForImageClassification, ViTModel

    from hf_tokred.integration.hub import loading_class

    assert loading_class(make_tiny_llama()) == "AutoModelForCausalLM"
    vit = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    assert loading_class(ViTForImageClassification(vit)) == "AutoModelForImageClassification"
    assert loading_class(ViTModel(vit)) == "AutoModel"

    class PluginConfig(LlamaConfig):  # a config type no auto mapping knows
        model_type = "plugin_llama"

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    assert loading_class(LlamaForCausalLM(PluginConfig(**small))) == "LlamaForCausalLM"  # the exported class itself

    class PluginForCausalLM(LlamaForCausalLM):
        config_class = PluginConfig

    assert loading_class(PluginForCausalLM(PluginConfig(**small))) == "AutoModel"  # not importable from transformers


def test_save_pretrained_push_to_hub_flag_routes_through_card(tiny_llama_dir, tmp_path, fake_hub):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=STREAM)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/flagged")
    assert fake_hub.repos == ["me/flagged"]
    assert "token_reduction_config.json" in fake_hub.commits[-1]["files"]


def test_config_push_to_hub(fake_hub):
    TokenReductionConfig(**STREAM).push_to_hub("me/recipe")
    files = fake_hub.commits[-1]["files"]
    assert list(files) == ["token_reduction_config.json"]
    assert TokenReductionConfig.from_dict(json.loads(files["token_reduction_config.json"])) == TokenReductionConfig(**STREAM)


def test_results_table_from_rows():
    card = make_model_card(TokenReductionConfig(**STREAM), base_model=None, repo_id="me/x",
                           results=[{"keep": 0.5, "accuracy": 0.9}, {"keep": 0.25, "accuracy": 0.8}])
    assert "| keep | accuracy |" in card.text and "| 0.25 | 0.8 |" in card.text
    with pytest.raises(TypeError, match="token_reduction_results"):
        make_model_card(TokenReductionConfig(**STREAM), base_model=None, repo_id="me/x", results=3)


def test_load_from_hub_cache_offline(tiny_llama_dir, tmp_path):
    from conftest import make_tiny_tokenizer

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=STREAM)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    make_tiny_tokenizer(saved)
    ids = torch.arange(3, 15)[None]
    expected = model.generate(ids, max_new_tokens=10, do_sample=False)
    torch.save(expected, tmp_path / "expected.pt")
    shutil.copytree(saved, hf_cache_snapshot(tmp_path / "hub", "me/tiny-stream", SHA), dirs_exist_ok=True)
    script = textwrap.dedent(
        f"""
        import torch, hf_tokred
        from transformers import AutoModelForCausalLM, pipeline
        from hf_tokred import TokenReductionConfig
        from hf_tokred.integration.wiring import get_applied
        cache = {str(tmp_path / "hub")!r}
        model = AutoModelForCausalLM.from_pretrained("me/tiny-stream", cache_dir=cache)
        assert get_applied(model).config.window == 6
        out = model.generate(torch.arange(3, 15)[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r}))
        assert TokenReductionConfig.from_pretrained("me/tiny-stream", cache_dir=cache).window == 6
        print("offline ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offline ok" in result.stdout


def test_learned_side_car_from_hub_cache_offline(tiny_llama_dir, tmp_path):
    from test_transformers import LearnedKVConfig  # registers the test plugin method

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=LearnedKVConfig(max_tokens=16))
    with torch.no_grad():
        for p in model.hf_tokred_modules.parameters():
            p.fill_(0.25)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    shutil.copytree(saved, hf_cache_snapshot(tmp_path / "hub", "me/tiny-learned", SHA), dirs_exist_ok=True)
    again = LlamaForCausalLM.from_pretrained("me/tiny-learned", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    assert all(bool((p == 0.25).all()) for p in again.hf_tokred_modules.parameters())
    assert hf_tokred.integration.wiring.get_applied(again).config.max_tokens == 16
