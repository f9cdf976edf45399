"""peft LoRA adapters and accelerate device maps on reduced models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_tokred
from hf_tokred import TokenReductionCache
from hf_tokred.integration.wiring import get_applied

STREAM = {"method": "streamingllm", "sink_tokens": 2, "window": 6}
GEN = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True)


def test_lora_adapter_on_reduced_model_and_merge(tiny_llama_dir, tmp_path):
    # train-free "adapter": random LoRA weights saved with peft
    base = make_tiny_llama()
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    lora.save_pretrained(adapter_dir)

    reduced = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=STREAM)
    peft_model = PeftModel.from_pretrained(reduced, adapter_dir)
    ids = torch.randint(3, 120, (1, 10), generator=torch.Generator().manual_seed(0))
    with_adapter = peft_model.generate(input_ids=ids, **GEN)
    assert isinstance(with_adapter.past_key_values, TokenReductionCache)
    assert with_adapter.past_key_values.stored_lengths() == [8, 8]

    merged = peft_model.merge_and_unload()
    assert get_applied(merged) is not None
    after_merge = merged.generate(ids, **GEN)
    assert isinstance(after_merge.past_key_values, TokenReductionCache)
    assert torch.equal(after_merge.sequences, with_adapter.sequences)
    # the adapter matters: without it the tokens differ
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=STREAM).generate(ids, **GEN)
    assert not torch.equal(plain.sequences, with_adapter.sequences)


@pytest.mark.parametrize("reduction", [STREAM, {"method": "h2o", "max_tokens": 8, "sink_tokens": 1},
                                       {"method": "snapkv", "max_tokens": 8, "window_size": 2, "sink_tokens": 1}],
                         ids=["streamingllm", "h2o", "snapkv"])
def test_device_map_with_offloaded_layer(tiny_llama_dir, tmp_path, reduction):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, token_reduction=reduction, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded by accelerate
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, token_reduction=reduction)
    ids = torch.randint(3, 120, (1, 10), generator=torch.Generator().manual_seed(0))
    out = offloaded.generate(ids, **GEN)
    expected = reference.generate(ids, **GEN)
    assert torch.equal(out.sequences, expected.sequences)
    for layer, module in zip(out.past_key_values.layers, offloaded.model.layers):
        execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None) or "cpu"
        assert layer.keys.device == torch.device(execution_device)
        assert layer.positions.device == layer.keys.device and layer.valid.device == layer.keys.device
        assert all(buffer.device == layer.keys.device for buffer in layer.buffers.values())
    # prefill-once SnapKV appends the generated tokens after compressing the prompt to 8
    assert out.past_key_values.stored_lengths() == ([8 + 11] * 2 if reduction["method"] == "snapkv" else [8, 8])


def test_remove_after_peft_restores_dense(tiny_llama):
    ids = torch.randint(3, 120, (1, 10))
    dense = tiny_llama(ids).logits
    hf_tokred.apply(tiny_llama, STREAM)
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    merged = peft_model.merge_and_unload()  # LoRA B is zero at init: merging changes nothing
    hf_tokred.remove(merged)
    assert torch.equal(merged(ids).logits, dense)


def test_apply_to_a_peft_model_reduces_its_base_model(tiny_llama):
    """hf_tokred.apply(peft_model, cfg) attaches to the wrapped transformers model; generate() through peft
    then uses the reduced cache, and remove() restores the adapted model's dense outputs."""
    import hf_tokred

    ids = torch.randint(3, 120, (1, 24))
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    dense = peft_model.generate(input_ids=ids, **GEN).sequences
    assert hf_tokred.apply(peft_model, {"method": "streamingllm", "max_tokens": 12}) is peft_model
    base = peft_model.get_base_model()
    assert base.config._attn_implementation == "hf_tokred_sdpa"
    cache = hf_tokred.build_cache(base)
    reduced = peft_model.generate(input_ids=ids, past_key_values=cache, **GEN).sequences
    assert max(cache.stored_lengths()) == 12 and reduced.shape == dense.shape
    assert hf_tokred.remove(peft_model) is peft_model
    assert torch.equal(peft_model.generate(input_ids=ids, **GEN).sequences, dense)
