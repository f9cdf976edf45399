"""Every encoder reducer on every supported encoder (tiny random configs): exactness, token counts, protected
tokens, batch == rows, remove(), restore_length, save/load, pipelines, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hf_tokred.model_patches import find_adapter
from transformers import (
    BertConfig,
    BertForTokenClassification,
    BertModel,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Backbone,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ElectraConfig,
    ElectraModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
    pipeline,
)

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, UnsupportedModelError
from hf_tokred.integration.encoders import STATE_ATTR, source_map, token_counts, token_sizes, unmerge

IMAGE, PATCH, LAYERS, HIDDEN = 32, 4, 4, 64
PATCHES = (IMAGE // PATCH) ** 2
SMALL = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128)
VISION = dict(image_size=IMAGE, patch_size=PATCH, **SMALL)


def _make(cls, config, attn="sdpa"):
    torch.manual_seed(0)
    config._attn_implementation = attn
    for sub in ("vision_config", "text_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = attn
    return cls(config).eval()


# name -> (factory, protected tokens, input tokens, forward(model, pixels) -> main output tensor)
def _logits(model, pixels):
    return model(pixel_values=pixels).logits


def _pooled(model, pixels):
    return model(pixel_values=pixels).pooler_output


def _image_features(model, pixels):
    return model.get_image_features(pixel_values=pixels).pooler_output


MODELS = {
    "vit": (lambda: _make(ViTForImageClassification, ViTConfig(**VISION, num_labels=3)), 1, PATCHES + 1, _logits),
    "deit": (lambda: _make(DeiTForImageClassificationWithTeacher, DeiTConfig(**VISION, num_labels=3)), 2,
             PATCHES + 2, _logits),
    "clip_vision": (lambda: _make(CLIPVisionModel, CLIPVisionConfig(**VISION)), 1, PATCHES + 1, _pooled),
    "clip": (lambda: _make(CLIPModel, CLIPConfig(text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=1,
                                                                  pad_token_id=1, **SMALL),
                                                  vision_config=VISION)), 1, PATCHES + 1, _image_features),
    "siglip": (lambda: _make(SiglipVisionModel, SiglipVisionConfig(**VISION)), 0, PATCHES, _pooled),
    "dinov2": (lambda: _make(Dinov2Model, Dinov2Config(image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN,
                                                       num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2)),
               1, PATCHES + 1, _pooled),
}

# Each method at a real reduction, and at zero reduction (must be bit-identical to dense).
METHODS = {
    "tome": ({"method": "tome", "r": 5}, {"method": "tome", "r": 0}),
    "evit": ({"method": "evit", "keep_rate": 0.6}, {"method": "evit", "keep_rate": 1.0}),
    "ats": ({"method": "ats", "keep_rate": 0.6}, {"method": "ats", "keep_rate": 1.0}),
    "zero_tprune": ({"method": "zero_tprune", "keep_rate": 0.6}, {"method": "zero_tprune", "keep_rate": 1.0}),
    "atc": ({"method": "atc", "keep_rate": 0.6}, {"method": "atc", "keep_rate": 1.0}),
    "tps": ({"method": "tps", "keep_rate": 0.6}, {"method": "tps", "keep_rate": 1.0}),
}


def expected_counts(method: str, n: int, protected: int, blocks: int = LAYERS) -> list[int]:
    """Token count after each block, computed from the papers' rules (ATS: the upper bound)."""
    counts = []
    layers = sorted({blocks * k // 4 for k in (1, 2, 3)})
    for block in range(blocks):
        if method == "tome":
            n -= min(5, (n - protected) // 2)
        elif block in layers:
            kept = math.ceil(0.6 * (n - protected))
            n = protected + kept + (1 if method == "evit" else 0)
        counts.append(n)
    return counts


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _untouched(model):
    adapter = find_adapter(model)
    assert "token_reduction" not in model.config.__dict__
    assert not hasattr(model, "_hf_tokred_applied") and STATE_ATTR not in model.__dict__
    for block in adapter.blocks(model):
        for module in block.modules():
            hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
            assert not [h for h in hooks if h.__module__.startswith("hf_tokred")]  # transformers' own may stay
            assert not any("_hf_tokred" in k for k in module.__dict__)


# ---------------------------------------------------------------------------------------------
# Exactness, counts, protected tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_zero_reduction_is_bit_identical_counts_are_exact_and_remove_restores(name, method, pixels):
    factory, protected, n, forward = MODELS[name]
    model = factory()
    reduced_cfg, zero_cfg = METHODS[method]
    with torch.no_grad():
        dense = forward(model, pixels)
        hf_tokred.apply(model, zero_cfg)
        assert torch.equal(forward(model, pixels), dense)
        assert token_counts(model) == [n] * LAYERS
        hf_tokred.apply(model, reduced_cfg)
        out = forward(model, pixels)
        counts = token_counts(model)
        rows = model.__dict__[STATE_ATTR].row_counts
        if method == "ats":  # adaptive: at most the budget, each row its own count, the batch padded to the longest
            bound = expected_counts(method, n, protected)
            assert all(c <= b for c, b in zip(counts, bound)) and counts[-1] < n
            assert [int(r.max()) for r in rows] == counts
        else:
            assert counts == expected_counts(method, n, protected)
            assert all(bool((r == c).all()) for r, c in zip(rows, counts))
        assert out.shape == dense.shape and not torch.allclose(out, dense)
        # Protected tokens are never merged or dropped, and stay in place.
        carried = source_map(model)
        for k in range(protected):
            assert carried[:, k, k].all() and (carried[:, k].sum(dim=-1) == 1).all()
            assert not carried[:, protected:, k].any()
        sizes = token_sizes(model)
        if method in ("tome", "atc", "tps", "evit"):  # merging methods keep every input token's weight
            assert torch.equal(sizes.sum(dim=1), torch.full((len(pixels),), float(n)))
        hf_tokred.remove(model)
        assert torch.equal(forward(model, pixels), dense)
    _untouched(model)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["vit", "deit", "siglip", "dinov2"])
def test_batch_equals_each_image_alone(name, method, pixels):
    factory, protected, n, _ = MODELS[name]
    model = factory()
    hf_tokred.apply(model, METHODS[method][0])
    with torch.no_grad():
        batch = model(pixel_values=pixels)
        batch_sizes = token_sizes(model)
        for i in range(len(pixels)):
            alone = model(pixel_values=pixels[i:i + 1])
            if hasattr(alone, "logits"):
                assert torch.allclose(alone.logits, batch.logits[i:i + 1], atol=1e-5)
            else:
                k = alone.last_hidden_state.shape[1]  # ATS rows keep their own counts; fillers follow
                assert torch.allclose(alone.last_hidden_state[0], batch.last_hidden_state[i, :k], atol=1e-5)
                assert torch.equal(token_sizes(model)[0], batch_sizes[i, :k])
                assert (batch_sizes[i, k:] == 0).all()


def test_deit_keeps_cls_and_distillation_tokens_first(pixels):
    # Make both tokens unmistakable: their final states must still sit at indices 0 and 1.
    model = MODELS["deit"][0]()
    with torch.no_grad():
        model.deit.embeddings.cls_token.fill_(40.0)
        model.deit.embeddings.distillation_token.fill_(-40.0)
        dense = model.deit(pixel_values=pixels).last_hidden_state
        for cfg, _ in METHODS.values():
            hf_tokred.apply(model, cfg)
            out = model.deit(pixel_values=pixels).last_hidden_state
            for k in (0, 1):
                cos = torch.nn.functional.cosine_similarity(out[:, k], dense[:, k], dim=-1)
                assert cos.min() > 0.9, cfg
    hf_tokred.remove(model)


def test_dinov2_register_tokens_are_protected(pixels):
    config = Dinov2WithRegistersConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, mlp_ratio=2, num_register_tokens=3)
    model = _make(Dinov2WithRegistersModel, config)
    hf_tokred.apply(model, {"method": "tome", "r": 8})
    assert model.__dict__[STATE_ATTR].protected == 4 and model.__dict__[STATE_ATTR].class_tokens == 1
    with torch.no_grad():
        model(pixel_values=pixels)
    carried = source_map(model)
    assert all(carried[:, k, k].all() and (carried[:, k].sum(-1) == 1).all() for k in range(4))
    assert token_counts(model) == [PATCHES + 4 - 8 * (i + 1) for i in range(LAYERS)]


def test_clip_model_reduces_the_vision_tower_only(pixels):
    model = MODELS["clip"][0]()
    ids = torch.randint(2, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_dense = model.get_text_features(input_ids=ids).pooler_output
        hf_tokred.apply(model, {"method": "tome", "r": 5})
        assert len(find_adapter(model).blocks(model)) == LAYERS
        assert torch.equal(model.get_text_features(input_ids=ids).pooler_output, text_dense)
        out = model(input_ids=ids, pixel_values=pixels)
    assert out.logits_per_image.shape == (3, 2)
    assert token_counts(model) == expected_counts("tome", PATCHES + 1, 1)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_eager_attention_matches_sdpa(method, pixels):
    outs = []
    for attn in ("sdpa", "eager"):
        model = _make(ViTModel, ViTConfig(**VISION), attn)
        hf_tokred.apply(model, METHODS[method][0])
        assert model.config._attn_implementation == f"hf_tokred_{attn}"
        with torch.no_grad():
            outs.append(model(pixel_values=pixels).last_hidden_state)
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# restore_length, unmerge, source maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_restore_length_gives_every_input_token_its_carrier(method, pixels):
    model = _make(ViTModel, ViTConfig(**VISION))
    cfg = METHODS[method][0]
    with torch.no_grad():
        hf_tokred.apply(model, cfg)
        short = model(pixel_values=pixels).last_hidden_state
        carried = source_map(model).any(dim=1)  # input tokens still carried by an output token
        expanded = unmerge(model, short)
        sizes = token_sizes(model)
        pooled = (short * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
        hf_tokred.apply(model, {**cfg, "restore_length": True})
        full = model(pixel_values=pixels)
    assert full.last_hidden_state.shape == (3, PATCHES + 1, HIDDEN)
    assert torch.equal(token_sizes(model), torch.ones(3, PATCHES + 1))
    assert token_counts(model)[-1] == PATCHES + 1
    # Tokens carried to the end come back with their carrier's final state (the final norm acts per token).
    assert torch.allclose(full.last_hidden_state[carried], expanded[carried], atol=1e-5)
    assert torch.allclose(full.pooler_output, model.pooler(full.last_hidden_state), atol=1e-6)
    if method in ("tome", "atc", "tps", "evit"):
        assert carried.all()
        # masked mean pooling over the restored sequence == size-weighted pooling over the reduced one
        assert torch.allclose(full.last_hidden_state.mean(dim=1), pooled, atol=1e-5)
    else:
        assert not carried.all()  # pruned tokens come back with the state they had when dropped
        assert torch.isfinite(full.last_hidden_state).all()
        assert (full.last_hidden_state[~carried].abs().sum(-1) > 0).all()


def test_unmerge_and_source_map_shapes(pixels):
    model = _make(ViTModel, ViTConfig(**VISION))
    hf_tokred.apply(model, {"method": "evit", "keep_rate": 0.5, "fuse": False})
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    carried = source_map(model)
    assert carried.shape == (3, out.shape[1], PATCHES + 1) and (carried.sum(dim=1) <= 1).all()
    full = unmerge(model, out, fill=float("nan"))
    assert full.shape == (3, PATCHES + 1, HIDDEN)
    assert torch.isnan(full[~carried.any(1)]).all() and not torch.isnan(full[carried.any(1)]).any()
    with pytest.raises(hf_tokred.TokenReductionError, match="unmerge: expected a tensor of shape"):
        unmerge(model, out[:, :3])


def test_per_token_heads_need_restore_length():
    model = _make(BertForTokenClassification, BertConfig(vocab_size=64, max_position_embeddings=64, num_labels=5,
                                                          **SMALL))
    with pytest.raises(UnsupportedModelError, match="restore_length=True"):
        hf_tokred.apply(model, {"method": "tome", "r": 2})
    _untouched(model)
    ids = torch.randint(5, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    hf_tokred.apply(model, {"method": "tome", "r": 2, "restore_length": True})
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 20, 5) and token_counts(model)[:-1] == [18, 16, 14]


# ---------------------------------------------------------------------------------------------
# BERT with padding
# ---------------------------------------------------------------------------------------------


def _bert():
    return _make(BertModel, BertConfig(vocab_size=64, max_position_embeddings=64, **SMALL))


def _padded(left: bool):
    g = torch.Generator().manual_seed(2)
    lengths = [12, 24, 17, 5]
    n = max(lengths)
    ids = torch.randint(5, 64, (len(lengths), n), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        if left:
            mask[row, n - length:] = 1
        else:
            mask[row, :length] = 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_padded_bert_rows_equal_rows_alone(method, left):
    model = _bert()
    ids, mask = _padded(left)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).last_hidden_state
        hf_tokred.apply(model, METHODS[method][0])
        out = model(ids, attention_mask=mask)
        sizes = token_sizes(model)
        if method in ("tome", "atc", "tps", "evit"):  # padding has size 0 and real tokens keep their weight
            assert torch.equal(sizes.sum(dim=1), mask.sum(dim=1).float())
        for row in range(len(ids)):
            n = int(mask[row].sum())
            start = ids.shape[1] - n if left else 0
            alone = model(ids[row:row + 1, start:start + n], position_ids=torch.arange(start, start + n)[None])
            k = alone.last_hidden_state.shape[1]
            assert torch.allclose(out.last_hidden_state[row, :k], alone.last_hidden_state[0], atol=1e-5)
            assert torch.allclose(out.pooler_output[row], alone.pooler_output[0], atol=1e-5)
            assert torch.equal(sizes[row, :k], token_sizes(model)[0])
            assert (sizes[row, k:] == 0).all()  # padding never merged into real tokens
        hf_tokred.remove(model)
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, dense)


@pytest.mark.parametrize("method", ["evit", "ats"])
def test_padded_bert_restore_length_puts_tokens_back_in_place(method):
    model = _bert()
    ids, mask = _padded(left=True)
    hf_tokred.apply(model, {**METHODS[method][0], "restore_length": True})
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        assert out.shape == (*ids.shape, HIDDEN)
        assert torch.equal(token_sizes(model), mask.float())
        n = int(mask[0].sum())
        start = ids.shape[1] - n
        alone = model(ids[:1, start:], position_ids=torch.arange(start, ids.shape[1])[None]).last_hidden_state
    assert torch.allclose(out[0, start:], alone[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_gradients_flow(method, pixels):
    model = _make(ViTForImageClassification, ViTConfig(**VISION, num_labels=3)).train()
    hf_tokred.apply(model, METHODS[method][0])
    loss = model(pixel_values=pixels, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert token_counts(model)[-1] < PATCHES + 1


@pytest.mark.parametrize("method", ["tome", "ats"])
def test_gradient_checkpointing_on_a_pre_norm_model_matches(method, pixels):
    # The mid-block hooks run again in the backward replay: the replay must rebuild the same reduction.
    results = []
    for checkpointing in (False, True):
        model = _make(ViTModel, ViTConfig(**VISION)).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        hf_tokred.apply(model, METHODS[method][0])
        out = model(pixel_values=pixels).last_hidden_state
        (out * token_sizes(model)[..., None]).square().sum().backward()
        results.append((out.detach(), model.embeddings.patch_embeddings.projection.weight.grad.clone()))
        assert not model.__dict__[STATE_ATTR].pending  # the replay's reductions are not kept after backward
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_models(method, pixels):
    model = _make(ViTModel, ViTConfig(**VISION)).to(torch.bfloat16)
    with torch.no_grad():
        dense = model(pixel_values=pixels.bfloat16()).last_hidden_state
        hf_tokred.apply(model, {**METHODS[method][0], "prop_attn": True, "restore_length": True})
        out = model(pixel_values=pixels.bfloat16()).last_hidden_state
    assert out.dtype == torch.bfloat16 and out.shape == dense.shape and torch.isfinite(out).all()
    assert min(token_counts(model)) < PATCHES + 1
    cos = torch.nn.functional.cosine_similarity(out[:, 0].float(), dense[:, 0].float(), dim=-1)
    assert cos.min() > 0.5  # the CLS state stays close to the dense one in a random tiny model


# ---------------------------------------------------------------------------------------------
# from_pretrained / save / load / pipelines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,method", [("vit", "atc"), ("deit", "tome"), ("clip_vision", "evit"), ("clip", "tps"),
                                         ("siglip", "ats"), ("dinov2", "zero_tprune")])
def test_from_pretrained_save_and_reload(name, method, tmp_path, pixels):
    factory, _, _, forward = MODELS[name]
    model = factory()
    model.save_pretrained(tmp_path / "dense")
    cfg = TokenReductionConfig(**METHODS[method][0], restore_length=method == "atc")
    loaded = type(model).from_pretrained(tmp_path / "dense", token_reduction=cfg).eval()
    with torch.no_grad():
        out = forward(loaded, pixels)
        counts = token_counts(loaded)
    loaded.save_pretrained(tmp_path / "reduced")
    again = type(model).from_pretrained(tmp_path / "reduced").eval()
    assert hf_tokred.integration.wiring.get_applied(again).config == cfg
    with torch.no_grad():
        assert torch.equal(forward(again, pixels), out)
    assert token_counts(again) == counts
    dense = type(model).from_pretrained(tmp_path / "reduced", token_reduction=False)
    assert hf_tokred.integration.wiring.get_applied(dense) is None


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("cls,config,method", [
    (DeiTForImageClassificationWithTeacher, DeiTConfig(**VISION, num_labels=3), "evit"),
    (Dinov2ForImageClassification, Dinov2Config(image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN,
                                                num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2,
                                                num_labels=3), "tome"),
    (SiglipForImageClassification, SiglipConfig(text_config=dict(vocab_size=99, **SMALL), vision_config=VISION,
                                                num_labels=3), "ats"),
    (CLIPForImageClassification, CLIPConfig(text_config=dict(vocab_size=99, **SMALL), vision_config=VISION,
                                            num_labels=3), "zero_tprune"),
])
def test_image_classification_pipeline(cls, config, method, tmp_path):
    _make(cls, config).save_pretrained(tmp_path)
    processor = ViTImageProcessor(size=IMAGE)
    cfg = TokenReductionConfig(**METHODS[method][0], restore_length=True)
    pipe = pipeline("image-classification", model=str(tmp_path), image_processor=processor,
                    model_kwargs={"token_reduction": cfg})
    assert hf_tokred.integration.wiring.get_applied(pipe.model).config == cfg
    result = pipe(_image())
    assert len(result) == 3 and {"label", "score"} <= set(result[0])
    assert min(token_counts(pipe.model)[:-1]) < token_counts(pipe.model)[-1]  # reduced, then restored


@pytest.mark.parametrize("cls,config,method", [
    (ViTModel, ViTConfig(**VISION), "tps"),
    (CLIPVisionModel, CLIPVisionConfig(**VISION), "atc"),
    (SiglipVisionModel, SiglipVisionConfig(**VISION), "evit"),
])
def test_image_feature_extraction_pipeline(cls, config, method, tmp_path):
    _make(cls, config).save_pretrained(tmp_path)
    pipe = pipeline("image-feature-extraction", model=str(tmp_path), image_processor=ViTImageProcessor(size=IMAGE),
                    model_kwargs={"token_reduction": METHODS[method][0]})
    features = pipe(_image(), return_tensors=True)
    assert features.shape[1] == token_counts(pipe.model)[-1] < config.num_hidden_layers * 100


@pytest.mark.parametrize("method", ["evit", "atc"])
def test_text_feature_extraction_pipeline(method, tmp_path):
    from transformers import BertTokenizerFast

    words = "the a cat dog sat on mat token merging is fast and good very small model".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    _make(BertModel, BertConfig(vocab_size=len(vocab), max_position_embeddings=64, **SMALL)).save_pretrained(tmp_path)
    pipe = pipeline("feature-extraction", model=str(tmp_path), tokenizer=tokenizer,
                    model_kwargs={"token_reduction": {**METHODS[method][0], "restore_length": True}})
    features = pipe("the cat sat on the mat and the dog is very good", return_tensors=True)
    assert features.shape[1] == 14  # restored to the input length
    assert min(token_counts(pipe.model)[:-1]) < 14


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------


def test_an_encoder_without_adapter_is_rejected():
    model = ElectraModel(ElectraConfig(vocab_size=64, max_position_embeddings=70, **SMALL))
    with pytest.raises(UnsupportedModelError) as info:
        hf_tokred.apply(model, {"method": "evit"})
    message = str(info.value)
    assert "ElectraModel" in message and "electra" in message
    for supported in ("ViTModel", "DeiTForImageClassificationWithTeacher", "CLIPVisionModel", "SiglipVisionModel",
                      "Dinov2Model", "BertModel"):
        assert supported in message
    assert not hasattr(model, "_hf_tokred_applied")


def test_a_backbone_is_rejected():
    model = _make(Dinov2Backbone, Dinov2Config(image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN,
                                               num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2))
    with pytest.raises(UnsupportedModelError, match="Dinov2Backbone reads the hidden states of every block"):
        hf_tokred.apply(model, {"method": "tome", "r": 2})
    _untouched(model)


@pytest.mark.parametrize("params,field", [
    ({"method": "evit", "keep_rate": 0.0}, "keep_rate"),
    ({"method": "ats", "keep_rate": 1.5}, "keep_rate"),
    ({"method": "tps", "layers": [1, 1]}, "layers"),
    ({"method": "zero_tprune", "layers": [-1]}, "layers[0]"),
    ({"method": "zero_tprune", "similarity_share": 2.0}, "similarity_share"),
    ({"method": "zero_tprune", "iterations": 0}, "iterations"),
    ({"method": "atc", "linkage": "ward"}, "linkage"),
    ({"method": "evit", "fuse": "yes"}, "fuse"),
    ({"method": "tome", "restore_length": 1}, "restore_length"),
    ({"method": "evit", "ratio": 0.5}, "ratio"),
])
def test_bad_fields_are_rejected_naming_the_field(params, field):
    with pytest.raises(ConfigError) as info:
        TokenReductionConfig(**params)
    assert info.value.field == field and field.split("[")[0] in str(info.value)


@pytest.mark.parametrize("params", [{"method": "evit", "layers": [4]}, {"method": "tome", "r": [1] * (LAYERS + 1)}])
def test_a_config_that_does_not_fit_the_model_leaves_it_untouched(params, pixels):
    model = _make(ViTModel, ViTConfig(**VISION))
    with torch.no_grad():
        dense = model(pixel_values=pixels).last_hidden_state
    with pytest.raises(ConfigError, match="the model has 4 blocks"):
        hf_tokred.apply(model, params)
    _untouched(model)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, dense)
