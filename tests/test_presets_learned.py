"""Presets of learned methods: trained parts shipped beside the JSON, or the command that trains them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_llama

import hf_tokred
from hf_tokred import config as config_module
from hf_tokred.config import WEIGHTS_NAME
from hf_tokred.errors import ConfigError, MissingFileError

LORA = {"method": "tokenskip", "ratio": 1.0, "ratios": [1.0], "control_ids": [[3]]}


@pytest.fixture
def presets(tmp_path, monkeypatch):
    """An empty preset tree standing in for hub_configs/ (returns a writer of presets)."""
    root = tmp_path / "hub_configs"
    (root / "org" / "model").mkdir(parents=True)
    monkeypatch.setattr(config_module, "_presets_root", lambda: root)

    def write(name, data):
        (root / "org" / "model" / f"{name}.json").write_text(json.dumps(data))
        return f"org/model/{name}"

    return write, root / "org" / "model"


def _trained(tmp_path):
    """A tiny LLaMA with a trained (non-zero) LoRA saved to a folder; returns the folder and its logits."""
    model = hf_tokred.apply(make_tiny_llama(), LORA)
    with torch.no_grad():
        for p in model.hf_tokred_modules.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    folder = tmp_path / "trained"
    model.save_pretrained(folder)
    ids = torch.arange(5, 25)[None]
    return folder, model(ids).logits, ids


def test_shipped_weights_are_loaded_with_the_preset(tmp_path, presets):
    write, where = presets
    folder, trained_logits, ids = _trained(tmp_path)
    shutil.copy(folder / WEIGHTS_NAME, where / "lora.safetensors")
    name = write("lora", {**LORA, "hf_tokred_learned": {"weights": "lora.safetensors"}})
    assert name in hf_tokred.list_presets()
    model = hf_tokred.apply(make_tiny_llama(), name)
    assert torch.equal(model(ids).logits, trained_logits)


def test_a_preset_without_shipped_weights_names_its_training_command(tmp_path, presets):
    write, _ = presets
    name = write("lora", {**LORA, "hf_tokred_learned": {"train": "hf-tokred train tokenskip"}})
    model = make_tiny_llama()
    ids = torch.arange(5, 25)[None]
    dense = model(ids).logits
    with pytest.raises(MissingFileError, match="hf-tokred train tokenskip"):
        hf_tokred.apply(model, name)
    assert "token_reduction" not in model.config.__dict__
    assert torch.equal(model(ids).logits, dense)
    # trained parts found in the model's own folder win over the preset's note
    folder, trained_logits, ids = _trained(tmp_path)
    loaded = hf_tokred.apply(make_tiny_llama(), name, weights_from=str(folder))
    assert torch.equal(loaded(ids).logits, trained_logits)


@pytest.mark.parametrize("entry, match", [
    (None, "needs"),                                    # a learned method's preset must say where its parts come from
    ({"weights": "../elsewhere.safetensors"}, "beside the preset"),
    ({"weights": "missing.safetensors"}, "beside the preset"),
    ({"train": 3}, "needs"),
    ({"weights": "a.safetensors", "train": "x"}, "needs"),
])
def test_malformed_learned_entries_are_refused(presets, entry, match):
    write, _ = presets
    data = dict(LORA) if entry is None else {**LORA, "hf_tokred_learned": entry}
    with pytest.raises(ConfigError, match=match) as err:
        hf_tokred.TokenReductionConfig.from_pretrained(write("bad", data))
    assert err.value.field == "hf_tokred_learned"


def test_the_entry_is_refused_on_a_method_without_learned_parts(presets):
    write, _ = presets
    name = write("plain", {"method": "streamingllm", "max_tokens": 64, "hf_tokred_learned": {"train": "x"}})
    with pytest.raises(ConfigError, match="no learned parts"):
        hf_tokred.TokenReductionConfig.from_pretrained(name)


def test_the_package_presets_of_the_learned_lm_methods():
    """dcp-50 ships its trained gates (1.4 MB) and loads on the embedded SmolLM2; eagle, gist-8 and icae-4x are too
    large to ship and name their training command."""
    from safetensors.torch import load_file

    from hf_tokred.embedded import load_smollm2

    model, tokenizer = load_smollm2()
    for name in ("eagle", "gist-8", "icae-4x"):
        with pytest.raises(MissingFileError, match=f"hf-tokred train {name.split('-')[0]}"):
            hf_tokred.apply(model, f"HuggingFaceTB/SmolLM2-135M-Instruct/{name}")
    hf_tokred.apply(model, "HuggingFaceTB/SmolLM2-135M-Instruct/dcp-50")
    shipped = load_file(hf_tokred.TokenReductionConfig.from_pretrained(
        "HuggingFaceTB/SmolLM2-135M-Instruct/dcp-50").preset_learned.weights)
    assert all(torch.equal(model.hf_tokred_modules.state_dict()[k], v) for k, v in shipped.items())
    ids = tokenizer("The pass key is 31415. " * 40, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
