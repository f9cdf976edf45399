"""oneDNN-packed linear weights (``hf_tokred.integration.cpu_linear``): single-token steps keep PyTorch's path
bit for bit, multi-token passes agree to float rounding, speculative decoding on the packed model equals its
greedy output, and unpacking, copying, saving and training leave nothing stale behind."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

import hf_tokred
from hf_tokred import eagle_tree_decoding
from hf_tokred.errors import ConfigError, UnsupportedModelError
from hf_tokred.integration.cpu_linear import PackedLinear, linear_as, pack_linear_weights, unpack_linear_weights

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (1, n), generator=torch.Generator().manual_seed(seed))


def _linear_types(model) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.Linear)}


def test_single_token_steps_are_bit_identical_and_multi_token_passes_agree():
    model = make_tiny_llama()
    prompt, token = _prompt(12), _prompt(1, seed=5)
    with torch.no_grad():
        cache = DynamicCache()
        dense_prefill = model(prompt, past_key_values=cache).logits
        dense_step = model(token, past_key_values=copy.deepcopy(cache)).logits
        pack_linear_weights(model)
        assert _linear_types(model) == {PackedLinear}
        step = model(token, past_key_values=copy.deepcopy(cache)).logits  # 1 row: PyTorch's own kernels
        prefill = model(prompt).logits  # 12 rows: oneDNN
    assert torch.equal(step, dense_step)
    torch.testing.assert_close(prefill, dense_prefill, rtol=1e-4, atol=1e-5)


def test_min_rows_one_runs_every_pass_through_onednn_and_agrees(monkeypatch):
    import types

    from hf_tokred.integration import cpu_linear

    model = make_tiny_llama()
    prompt = _prompt(9)
    with torch.no_grad():
        dense = model(prompt[:, :1]).logits
        pack_linear_weights(model, min_rows=1)

        def refuse(*args, **kwargs):
            raise AssertionError("PyTorch's linear was called")

        monkeypatch.setattr(cpu_linear, "F", types.SimpleNamespace(linear=refuse))
        packed = model(prompt[:, :1]).logits
    torch.testing.assert_close(packed, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("min_rows", [1, 2])
def test_eagle_chain_tree_and_lookup_on_the_packed_model_give_its_greedy_output(min_rows):
    model = make_tiny_llama()
    hf_tokred.apply(model, {"method": "eagle", "draft_vocab": 64, "depth": 4, "top_k": 3, "min_confidence": 0.0,
                            "tree_tokens": 8})
    with torch.no_grad():
        for p in model.hf_tokred_modules["eagle"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    pack_linear_weights(model, min_rows=min_rows)
    assert type(model.hf_tokred_modules["eagle"].fc) is PackedLinear  # the draft head's layers are packed too
    packed_once = model.lm_head._packed
    pack_linear_weights(model, min_rows=min_rows)  # again (the bench does, after re-attaching a head): not repacked
    assert model.lm_head._packed is packed_once
    head = hf_tokred.eagle_assistant(model)
    for n in (5, 17):
        prompt = _prompt(n, seed=n)
        greedy = model.generate(prompt, max_new_tokens=20, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=head), greedy)
        assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False,
                                          custom_generate=eagle_tree_decoding), greedy)
        assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4),
                           greedy)


def test_unpack_restores_plain_linear_layers_and_bit_identical_outputs():
    model = make_tiny_llama()
    prompt = _prompt(10)
    with torch.no_grad():
        dense = model(prompt).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert unpack_linear_weights(pack_linear_weights(model)) is model
    assert _linear_types(model) == {nn.Linear}
    assert not any("_packed" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, dense)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_state_dict_ties_and_save_load_are_unchanged_while_packed(tmp_path):
    model = make_tiny_llama(tie_word_embeddings=True)
    keys = list(model.state_dict())
    pack_linear_weights(model)
    assert list(model.state_dict()) == keys
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _linear_types(loaded) == {nn.Linear}  # a loaded model is plain until packed again
    prompt = _prompt(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits, rtol=1e-4, atol=1e-5)


def test_a_weight_changed_in_place_is_repacked_and_a_deep_copy_packs_its_own():
    layer = pack_linear_weights(nn.Linear(32, 48))
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
        layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        twin = copy.deepcopy(layer)
        assert type(twin) is PackedLinear
        assert torch.equal(twin(x), layer(x))


def test_passes_that_need_gradients_use_pytorchs_path_and_train():
    model = make_tiny_llama()
    pack_linear_weights(model)
    prompt = _prompt(6)
    loss = model(prompt, labels=prompt).loss
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_layers_in_another_dtype_are_left_alone_and_bad_input_is_refused():
    model = make_tiny_llama()
    model.lm_head.to(torch.bfloat16)
    pack_linear_weights(model)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp.up_proj) is PackedLinear
    with pytest.raises(UnsupportedModelError, match="no fp32 nn.Linear"):
        pack_linear_weights(make_tiny_llama().to(torch.bfloat16))
    with pytest.raises(ConfigError, match="min_rows") as err:
        pack_linear_weights(make_tiny_llama(), min_rows=0)
    assert err.value.field == "min_rows"
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        pack_linear_weights("a model name")
    untouched = make_tiny_llama()
    with pytest.raises(ConfigError):
        pack_linear_weights(untouched, min_rows=True)
    assert _linear_types(untouched) == {nn.Linear}


def test_linear_as_packs_a_draft_head_as_the_reference_is_packed():
    reference = nn.Linear(16, 40)
    rows = torch.tensor([3, 7, 11, 30])
    weight, bias = reference.weight[rows], reference.bias[rows]
    x = torch.randn(5, 16)
    plain = linear_as(reference, weight, bias)
    assert type(plain) is nn.Linear and not plain.weight.requires_grad
    assert linear_as(reference, reference.weight, reference.bias) is reference
    pack_linear_weights(reference, min_rows=3)
    draft = linear_as(reference, weight, bias)
    assert type(draft) is PackedLinear and draft._min_rows == 3
    with torch.no_grad():
        torch.testing.assert_close(draft(x), nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(draft(x[:1]), plain(x[:1]))  # below min_rows: PyTorch's own path


def test_a_packed_model_cast_to_another_dtype_or_given_new_weights_follows_them():
    model = make_tiny_llama()
    pack_linear_weights(model)
    prompt = _prompt(7)
    with torch.no_grad():
        model.to(torch.bfloat16)
        unpacked = unpack_linear_weights(copy.deepcopy(model))
        assert torch.equal(model(prompt).logits, unpacked(prompt).logits)  # bf16: PyTorch's path throughout
        model.to(torch.float32)
        layer = model.model.layers[0].mlp.down_proj
        layer.weight.data = torch.randn_like(layer.weight)
        x = torch.randn(4, layer.in_features)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
