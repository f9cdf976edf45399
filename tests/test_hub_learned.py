"""The learned reducers of the wave-2 families go to the Hub and come back: ``push_to_hub`` (transport faked at the
``HfApi`` level) uploads the base weights, ``token_reduction.safetensors`` and the config; what was pushed, laid
out as a Hugging Face cache, loads by repo id offline, learned parts re-attached, with identical outputs.
Issue 14's language-model reducers (EAGLE, Gist, ICAE, DCP) and issue 15's encoder reducers (A-ViT, SPViT,
IA-RED², ToCom, TokenLearner; Evo-ViT and STViT, which train the backbone instead) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import faked_hub, make_tiny_bert, make_tiny_llama, make_tiny_vit, padded_bert_batch, realigned
from safetensors import safe_open

import hf_tokred
from hf_tokred.integration.wiring import MODULES_ATTR, get_applied

ENCODERS = {
    "avit": {"method": "avit", "target_depth": 0.6, "layers": [1]},
    "spvit": {"method": "spvit", "keep_rate": 0.6, "layers": [1], "selector_dim": 16},
    "ia_red2": {"method": "ia_red2", "keep_rate": 0.6, "layers": [1]},
    "tocom": {"method": "tocom", "r": 6, "source_r": 2, "metric": "hidden", "rank": 3},
    "evo_vit": {"method": "evo_vit", "keep_rate": 0.5, "layers": [1, 2]},
    "stvit": {"method": "stvit", "ratio": 0.3, "start": 1, "end": 3},
    "tokenlearner": {"method": "tokenlearner", "num_tokens": 8, "layer": 2, "fuse": True},
}
LANGUAGE_MODELS = {
    "eagle": {"method": "eagle", "draft_vocab": 64, "depth": 4, "top_k": 3, "min_confidence": 0.0,
              "base_hidden_size": 64, "base_vocab_size": 128, "base_num_layers": 2},
    "gist": {"method": "gist", "num_gist": 4, "rank": 4},
    "icae": {"method": "icae", "memory_slots": 4, "chunk_tokens": 12, "rank": 4, "alpha": 8.0},
    "dcp": {"method": "dcp", "sink_tokens": 2, "sparsity": 0.5},
}


def _trained_like(model, seed: int = 1) -> None:
    """Seeded noise on what training would change: the learned parts, or the backbone where there are none."""
    parts = model._modules.get(MODULES_ATTR)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (parts or model).parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _push_and_load(model, repo_id: str, tmp_path):
    """Push ``model``, check what went up, and load it back by repo id from a Hugging Face cache, offline."""
    with faked_hub() as hub:
        model.push_to_hub(repo_id)
    learned = model._modules.get(MODULES_ATTR) is not None
    assert {"config.json", "model.safetensors", "token_reduction_config.json", "README.md"} <= set(hub.files)
    assert ("token_reduction.safetensors" in hub.files) == learned
    folder = hub.snapshot(tmp_path / "hub", repo_id)
    with safe_open(folder / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "hf_tokred" in k]
    loaded = type(model).from_pretrained(repo_id, cache_dir=tmp_path / "hub", local_files_only=True)
    assert get_applied(loaded).config == get_applied(model).config
    if learned:
        ours, theirs = model.hf_tokred_modules.state_dict(), loaded.hf_tokred_modules.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    return realigned(loaded.eval())


@pytest.mark.parametrize("method", sorted(ENCODERS))
def test_encoder_reducer_pushed_and_loaded_gives_identical_outputs(method, tmp_path, images):
    if method == "tokenlearner":
        model, inputs = make_tiny_vit(), {"pixel_values": images}
    else:
        model, inputs = make_tiny_bert(), padded_bert_batch(7)
    hf_tokred.apply(model, ENCODERS[method])
    _trained_like(model)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    loaded = _push_and_load(model, f"me/tiny-{method}", tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, expected)


def _eagle_greedy(model, ids):
    from hf_tokred.integration.eagle import eagle_assistant

    model.generation_config.eos_token_id = None
    return model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=eagle_assistant(model))


def _greedy_after_context(model, ids):
    context = hf_tokred.compress_context(model, ids[:, :20])
    prompt = torch.cat([context.prefix_ids, ids[:, 20:]], dim=-1)
    return model.generate(prompt, past_key_values=context.fresh_cache(), max_new_tokens=6, do_sample=False)


OUTPUTS = {"eagle": _eagle_greedy, "gist": _greedy_after_context, "icae": _greedy_after_context,
           "dcp": lambda model, ids: model.generate(ids, max_new_tokens=8, do_sample=False)}


@pytest.mark.parametrize("method", sorted(LANGUAGE_MODELS))
def test_language_model_reducer_pushed_and_loaded_gives_identical_outputs(method, tmp_path):
    model = make_tiny_llama()
    hf_tokred.apply(model, LANGUAGE_MODELS[method])
    _trained_like(model)
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(4))
    expected = OUTPUTS[method](model, ids)
    loaded = _push_and_load(model, f"me/tiny-{method}", tmp_path)
    assert torch.equal(OUTPUTS[method](loaded, ids), expected)
