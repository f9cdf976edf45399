"""Learned visual-token methods (atp_llava, dynamic_llava): training on a frozen VLM, save/push/load, decoding-time
text sparsification, batches, errors; tiny random LLaVA / Qwen2-VL models."""

from __future__ import annotations

import pytest
import torch
from conftest import faked_hub
from vlm_models import BUILDERS, IMAGE, SIZES

import hf_tokred
from hf_tokred import TokenReductionConfig
from hf_tokred.errors import TokenReductionError
from hf_tokred.integration.wiring import MODULES_ATTR
from hf_tokred.training import train_visual_pruner, visual_pruner_loss, visual_ratio_loss
from hf_tokred.vlm.base import KeepRecord

LEARNED = {"dynamic_llava": {"method": "dynamic_llava", "keep": 0.5}, "atp_llava": {"method": "atp_llava", "keep": 0.4}}


def build(family="llava"):
    model, make = BUILDERS[family]()
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [IMAGE, IMAGE + 1, IMAGE + 2, IMAGE + 3]
    return model, make


def batches(make, family="llava", count=3):
    out = []
    for i in range(count):
        batch = make([SIZES[family]], start=i)
        answers = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        answers[:, -3:] = True
        out.append({**batch, "answer_mask": answers})
    return out


def greedy(model, kw, new=5):
    return model.generate(**kw, max_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("method", sorted(LEARNED))
def test_training_moves_only_the_learned_modules_and_lowers_the_loss(method):
    model, make = build()
    hf_tokred.apply(model, LEARNED[method])
    with torch.no_grad():  # start far from the target (keeping nearly everything): the ratio loss must pull it back
        for head in model._modules[MODULES_ATTR][method].values():
            final = head.net[-1].bias
            final[0] = 4.0 if method == "dynamic_llava" else -4.0
    frozen = {k: v.clone() for k, v in model.state_dict().items() if MODULES_ATTR not in k}
    learned = {k: v.clone() for k, v in model._modules[MODULES_ATTR].state_dict().items()}
    data = batches(make)
    losses = train_visual_pruner(model, data, steps=24, lr=1e-2, shuffle=False, seed=0, progress=False)
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-6:]) < sum(losses[:6])
    for k, v in model.state_dict().items():
        if MODULES_ATTR not in k:
            assert torch.equal(v, frozen[k]), k
    changed = model._modules[MODULES_ATTR].state_dict()
    assert any(not torch.equal(changed[k], v) for k, v in learned.items())
    assert not model._modules[MODULES_ATTR].training  # eval mode after training: hard drops again


@pytest.mark.parametrize("method", sorted(LEARNED))
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_equals_rows_alone(method, family):
    model, make = build(family)
    hf_tokred.apply(model, LEARNED[method])
    rows = [SIZES[family], SIZES[family][:1]]
    batched = greedy(model, make(rows))
    for i, row in enumerate(rows):
        assert torch.equal(batched[i, -5:], greedy(model, make([row], start=i))[0, -5:])


@pytest.mark.parametrize("method", sorted(LEARNED))
def test_keep_one_is_the_dense_model(method):
    model, make = build()
    kw = make([SIZES["llava"]])
    reference = greedy(model, kw)
    hf_tokred.apply(model, {**LEARNED[method], "keep": 1.0})
    assert torch.equal(greedy(model, kw), reference)


@pytest.mark.parametrize("method", sorted(LEARNED))
def test_trained_modules_save_push_and_load_back(method, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, make = build()
    hf_tokred.apply(model, LEARNED[method])
    train_visual_pruner(model, batches(make), steps=4, lr=1e-2, progress=False)
    kw = make([SIZES["llava"], SIZES["llava"][:1]])
    expected = greedy(model, kw)
    model.save_pretrained(tmp_path / "saved")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    loaded.generation_config.suppress_tokens = model.generation_config.suppress_tokens
    assert torch.equal(greedy(loaded, kw), expected)
    with faked_hub() as hub:
        model.push_to_hub(f"me/llava-{method}")
    assert {"token_reduction.safetensors", "token_reduction_config.json", "config.json"} <= set(hub.files)
    folder = hub.snapshot(tmp_path / "hub", f"me/llava-{method}")
    again = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    again.generation_config.suppress_tokens = model.generation_config.suppress_tokens
    assert torch.equal(greedy(again, kw), expected)


def test_decoding_predictor_hides_dropped_tokens_from_later_steps():
    model, make = build()
    hf_tokred.apply(model, {"method": "dynamic_llava", "keep": 0.5, "k": 2})
    text = model._modules[MODULES_ATTR]["dynamic_llava"]["text"]
    kw = make([SIZES["llava"]])
    keep_all = model.generate(**kw, max_new_tokens=6, do_sample=False, output_scores=True,
                              return_dict_in_generate=True).scores[-1]
    with torch.no_grad():
        text.net[-1].bias.fill_(-50.0)  # every generated token is dropped
    cache = hf_tokred.build_cache(model)
    dropped = model.generate(**kw, max_new_tokens=6, do_sample=False, past_key_values=cache, output_scores=True,
                             return_dict_in_generate=True).scores[-1]
    length = kw["input_ids"].shape[1]
    for layer in cache.layers[2:]:  # after layer k - 1 = 1 the generated tokens are hidden from later steps
        generated = layer.positions[0, 0] >= length
        assert int(generated.sum()) == 5 and not bool(layer.valid[0, 0][generated].any())
    assert cache.stored_lengths()[:2] == [length + 5] * 2  # layers 0 and 1 keep every token, visible
    assert not torch.allclose(dropped, keep_all)  # the last step attended to fewer tokens


def test_atp_counts_differ_per_row_and_stay_within_the_visual_tokens():
    model, make = build()
    hf_tokred.apply(model, {"method": "atp_llava", "keep": 0.3, "spatial": 0.25})
    kw = make([SIZES["llava"], SIZES["llava"][:1]])
    cache = hf_tokred.build_cache(model)
    model.generate(**kw, max_new_tokens=1, do_sample=False, past_key_values=cache)
    stored = cache.stored_lengths()
    assert stored == sorted(stored, reverse=True)  # never grows with depth
    assert stored[-1] < stored[0]


def test_ratio_loss_and_bad_input():
    cand = torch.ones(1, 4, dtype=torch.bool)
    first = KeepRecord(1, torch.full((1, 4), 0.5), cand, 0.5)
    second = KeepRecord(2, torch.full((1, 4), 0.5), cand.clone(), 0.25)  # cumulative 0.25: on target
    assert visual_ratio_loss([first, second]).item() == 0.0
    assert abs(visual_ratio_loss([KeepRecord(1, torch.ones(1, 4), cand, 0.5)]).item() - 0.25) < 1e-6
    model, make = build()
    data = batches(make, count=1)
    with pytest.raises(TokenReductionError, match="no learned visual-token method"):
        train_visual_pruner(model, data, steps=1)
    hf_tokred.apply(model, {"method": "fastv"})
    with pytest.raises(TokenReductionError, match="no learned visual-token method"):
        visual_pruner_loss(model, data[0])
    hf_tokred.apply(model, LEARNED["dynamic_llava"])
    with pytest.raises(TokenReductionError, match="answer_mask"):
        visual_pruner_loss(model, {k: v for k, v in data[0].items() if k != "answer_mask"})
    with pytest.raises(hf_tokred.ConfigError, match="text_keep"):
        TokenReductionConfig(method="dynamic_llava", text_keep=0.0)
    with pytest.raises(hf_tokred.ConfigError, match="k"):
        hf_tokred.apply(model, {"method": "dynamic_llava", "k": 9})
