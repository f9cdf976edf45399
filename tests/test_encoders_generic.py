"""Every encoder method on the encoders added for issue 17 (tiny random configs, no downloads): RoBERTa, XLM-R,
DistilBERT, ModernBERT (rotary + local attention) and BEiT (per-block and shared relative position bias), and the
clear refusal of Data2VecVision, whose attention bypasses transformers' attention interface.

Besides exactness (zero reduction and remove() bit-identical), token counts, protected tokens, padded batches and
save/load, the positional architectures are checked against a dense reference: pruning at block 0 must equal the
dense model whose later blocks mask the dropped keys, which holds only if every kept token keeps its own rotary
angle, local window and relative position bias."""

from __future__ import annotations

import pytest
import torch
from hf_tokred.model_patches import find_adapter
from test_encoders_models import METHODS, _make, _untouched, expected_counts
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    BeitModel,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Data2VecVisionModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    ModernBertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaForTokenClassification,
    XLMRobertaModel,
)

import hf_tokred
from hf_tokred import TokenReductionConfig, UnsupportedModelError
from hf_tokred.attention import mask_keep
from hf_tokred.integration.encoders import STATE_ATTR, source_map, token_counts, token_sizes
from hf_tokred.integration.wiring import get_applied

LAYERS, HIDDEN, TEXT, VOCAB = 4, 32, 24, 64
IMAGE, PATCH = 32, 4
PATCHES = (IMAGE // PATCH) ** 2
SMALL = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)
TEXT_CONFIG = dict(vocab_size=VOCAB, max_position_embeddings=TEXT + 8, **SMALL)
WINDOW = 3  # ModernBERT's half window (local_attention=6): |i - j| <= 3, far shorter than the sequence

# Every encoder method at a real reduction and at zero reduction; DiffRate and DynamicViT join the six of
# test_encoders_models (DynamicViT's predictors are fresh, deterministic under the seed).
ALL_METHODS = {
    **METHODS,
    "diffrate": ({"method": "diffrate", "prune": [2, 0, 3, 0], "merge": [1, 2, 0, 1]},
                 {"method": "diffrate", "prune": [0], "merge": [0]}),
    "dynamicvit": ({"method": "dynamicvit", "keep_rate": 0.6}, {"method": "dynamicvit", "keep_rate": 1.0}),
}
MERGING = ("tome", "atc", "tps", "evit")  # methods whose token sizes add up to the input length


def counts_for(method: str, n: int, protected: int = 1) -> list[int]:
    """Token count after each block (ATS: the upper bound)."""
    if method == "diffrate":
        counts = []
        for prune, merge in zip([2, 0, 3, 0], [1, 2, 0, 1]):
            n -= prune + merge
            counts.append(n)
        return counts
    if method == "dynamicvit":  # keep_rate 0.6 before blocks 1, 2, 3, no fused token
        return expected_counts("zero_tprune", n, protected, LAYERS)
    return expected_counts(method, n, protected, LAYERS)


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


def _beit_config(**kw):
    return dict(image_size=IMAGE, patch_size=PATCH, **SMALL, **kw)


def _randomize_position_bias(model):
    # BEiT initialises its relative position bias tables to zero: give them values so that a wrong gather shows.
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "relative_position_bias_table" in name:
                parameter.normal_(0.0, 1.0)
    return model


def _modernbert_config(**kw):
    return ModernBertConfig(vocab_size=VOCAB, local_attention=2 * WINDOW, pad_token_id=0, cls_token_id=2,
                            sep_token_id=3, bos_token_id=None, eos_token_id=None, **SMALL, **kw)


def _distilbert_config(**kw):
    return DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=4, hidden_dim=64,
                            max_position_embeddings=TEXT + 8, **kw)


# name -> (factory, modality, padding token id, [CLS] id, position ids derived from input_ids)
ARCHS = {
    "roberta": (lambda: _make(RobertaModel, RobertaConfig(**TEXT_CONFIG)), "text", 1, 0, True),
    "xlm-roberta": (lambda: _make(XLMRobertaModel, XLMRobertaConfig(**TEXT_CONFIG)), "text", 1, 0, True),
    "distilbert": (lambda: _make(DistilBertModel, _distilbert_config()), "text", 0, 2, False),
    "modernbert": (lambda: _make(ModernBertModel, _modernbert_config()), "text", 0, 2, False),
    "beit": (lambda: _randomize_position_bias(_make(BeitModel, BeitConfig(**_beit_config(
        use_relative_position_bias=True)))), "image", None, None, False),
    "beit_shared": (lambda: _randomize_position_bias(_make(BeitModel, BeitConfig(**_beit_config(
        use_shared_relative_position_bias=True)))), "image", None, None, False),
}
TEXT_ARCHS = [name for name, spec in ARCHS.items() if spec[1] == "text"]


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _ids(cls_id: int, batch: int = 2) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (batch, TEXT), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = cls_id
    return ids


def _inputs(name, pixels):
    _, modality, _, cls_id, _ = ARCHS[name]
    return {"pixel_values": pixels} if modality == "image" else {"input_ids": _ids(cls_id)}


def _tokens(name) -> int:
    return PATCHES + 1 if ARCHS[name][1] == "image" else TEXT


def _out(model, inputs):
    return model(**inputs)[0]  # last_hidden_state, or logits for the heads


# ---------------------------------------------------------------------------------------------
# Exactness, counts, protected tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("name", ARCHS)
def test_zero_reduction_is_bit_identical_counts_are_exact_and_remove_restores(name, method, pixels):
    model = ARCHS[name][0]()
    inputs, n = _inputs(name, pixels), _tokens(name)
    reduced_cfg, zero_cfg = ALL_METHODS[method]
    with torch.no_grad():
        dense = _out(model, inputs)
        hf_tokred.apply(model, zero_cfg)
        assert torch.equal(_out(model, inputs), dense)
        assert token_counts(model) == [n] * LAYERS
        hf_tokred.apply(model, reduced_cfg)
        out = _out(model, inputs)
        counts, rows = token_counts(model), model.__dict__[STATE_ATTR].row_counts
        if method == "ats":  # adaptive: at most the budget, each row its own count
            assert all(c <= b for c, b in zip(counts, counts_for(method, n))) and counts[-1] < n
            assert [int(r.max()) for r in rows] == counts
        else:
            assert counts == counts_for(method, n)
            assert all(bool((r == c).all()) for r, c in zip(rows, counts))
        assert out.shape == (2, counts[-1], HIDDEN) and torch.isfinite(out).all()
        # The CLS / <s> token is never merged or dropped and stays first.
        carried = source_map(model)
        assert carried[:, 0, 0].all() and (carried[:, 0].sum(dim=-1) == 1).all() and not carried[:, 1:, 0].any()
        if method in MERGING:
            assert torch.equal(token_sizes(model).sum(dim=1), torch.full((2,), float(n)))
        hf_tokred.remove(model)
        assert torch.equal(_out(model, inputs), dense)
    _untouched(model)


def _dense_with_dropped_keys(model, inputs, kept: torch.Tensor, first_block: int = 1):
    """The dense model whose blocks from ``first_block`` on see only the ``kept`` tokens as keys."""
    def pre_hook(module, args, kwargs):
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        drop = torch.zeros(kept.shape, dtype=torch.float32).masked_fill(~kept, torch.finfo(torch.float32).min)
        drop = drop[:, None, None, :]
        if mask is None:
            mask = drop
        elif mask.dtype == torch.bool:
            mask = mask & kept[:, None, None, :]
        else:
            mask = (mask + drop.to(mask.dtype)).clamp_min(torch.finfo(mask.dtype).min)
        if len(args) > 1:
            return (args[0], mask, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": mask}

    handles = [block.register_forward_pre_hook(pre_hook, with_kwargs=True)
               for block in find_adapter(model).blocks(model)[first_block:]]
    try:
        return _out(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ARCHS)
def test_pruned_tokens_keep_their_positions(name, attn, pixels):
    """Pruning at block 0 == the dense model with the dropped keys masked in blocks 1.. : kept tokens keep their
    own rotary angle and local window (ModernBERT) and their relative position bias (BEiT)."""
    factory = ARCHS[name][0]
    torch.manual_seed(0)
    model = factory()
    if attn == "eager":
        model.set_attn_implementation("eager")
    inputs = _inputs(name, pixels)
    with torch.no_grad():
        hf_tokred.apply(model, {"method": "evit", "keep_rate": 0.5, "layers": [0], "fuse": False})
        out = _out(model, inputs)
        kept = source_map(model).any(dim=1)
        assert out.shape[1] < _tokens(name)
        hf_tokred.remove(model)
        reference = _dense_with_dropped_keys(model, inputs, kept)
    torch.testing.assert_close(out, torch.stack([reference[b, kept[b]] for b in range(len(kept))]),
                               rtol=1e-5, atol=1e-5)


def test_modernbert_local_window_is_measured_between_anchors():
    """After ToMe merges, a sliding-attention block lets two tokens see each other iff their anchors (the input
    positions they stand at) are within the window; full-attention blocks see everything."""
    model = ARCHS["modernbert"][0]()
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    seen = {}

    def capture(index):
        def hook(module, args, kwargs):
            seen[index] = kwargs["attention_mask"]
        return hook

    blocks = find_adapter(model).blocks(model)
    hf_tokred.apply(model, {"method": "tome", "r": 5})  # proportional attention: a float mask with log-sizes
    handles = [blocks[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in (2, 3)]
    with torch.no_grad():
        model(input_ids=_ids(2))
    for handle in handles:
        handle.remove()
    state = model.__dict__[STATE_ATTR]
    anchor = state.block_anchor[2]
    assert anchor.shape == (2, TEXT - 10)
    assert all(len(set(row.tolist())) == row.numel() for row in anchor)  # one token per input position
    window = (anchor[:, :, None] - anchor[:, None, :]).abs() <= WINDOW
    assert torch.equal(mask_keep(seen[2])[:, 0], window)
    assert seen[3] is None or mask_keep(seen[3]).all()  # global block: no window (only log-size biases)


@pytest.mark.parametrize("name", ["modernbert", "beit"])
def test_gradient_checkpointing_replays_the_same_positions(name, pixels):
    # The backward replay re-runs BEiT's bias module inside each block: it must read that block's anchors.
    results = []
    for checkpointing in (False, True):
        model = ARCHS[name][0]().train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        hf_tokred.apply(model, {"method": "tome", "r": 5})
        out = _out(model, _inputs(name, pixels))
        (out * token_sizes(model)[..., None]).square().sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Padded text batches
# ---------------------------------------------------------------------------------------------


def _padded(name, left: bool):
    _, _, pad_id, cls_id, _ = ARCHS[name]
    lengths = [12, 24, 17, 5]
    n = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), n), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        real = slice(n - length, n) if left else slice(0, length)
        mask[row, real] = 1
        ids[row, real.start] = cls_id
    ids[mask == 0] = pad_id
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("name", ["roberta", "distilbert", "modernbert"])
def test_padded_batch_rows_equal_rows_alone(name, method, left):
    model = ARCHS[name][0]()
    ids, mask = _padded(name, left)
    positions_from_ids = ARCHS[name][4]
    with torch.no_grad():
        hf_tokred.apply(model, ALL_METHODS[method][0])
        out = model(ids, attention_mask=mask).last_hidden_state
        sizes = token_sizes(model)
        if method in MERGING:  # padding has size 0 and real tokens keep their weight
            assert torch.equal(sizes.sum(dim=1), mask.sum(dim=1).float())
        for row in range(len(ids)):
            n = int(mask[row].sum())
            start = ids.shape[1] - n if left else 0
            # RoBERTa numbers positions from the padding in input_ids, like a row alone; the others by index.
            positions = None if positions_from_ids else torch.arange(start, start + n)[None]
            alone = model(ids[row:row + 1, start:start + n], position_ids=positions).last_hidden_state
            real = sizes[row] > 0
            assert alone.shape[1] == int(real.sum())
            torch.testing.assert_close(out[row][real], alone[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(sizes[row][real], token_sizes(model)[0])


@pytest.mark.parametrize("config", [{"method": "evo_vit", "keep_rate": 0.4, "layers": [1, 2]},
                                    {"method": "stvit", "ratio": 0.4, "start": 1, "end": 3}])
@pytest.mark.parametrize("name", ["roberta", "xlm-roberta", "distilbert"])
def test_post_norm_fast_path_ends_in_the_blocks_last_norm_and_padded_rows_equal_rows_alone(name, config):
    # Tokens that shared a carrier's update come back through the block's own norms (the adapter's stream_norms):
    # after the restoring block every real token is an output of its last LayerNorm.
    model = ARCHS[name][0]()
    ids, mask = _padded(name, left=True)
    hf_tokred.apply(model, config)
    blocks = find_adapter(model).blocks(model)
    norms = model.__dict__[STATE_ATTR].stream_norms
    assert sorted(norms) == list(range(len(blocks)))
    assert all(len(pair) == 2 and all(isinstance(n, torch.nn.LayerNorm) for n in pair) for pair in norms.values())
    seen = {}
    blocks[2].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        restored, last = seen["out"], norms[2][1]
        assert restored.shape[:2] == ids.shape and token_counts(model)[2] == ids.shape[1]
        plain = ((restored - last.bias) / last.weight)[mask.bool()]
        torch.testing.assert_close(plain.mean(dim=-1), torch.zeros(plain.shape[0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(plain.var(dim=-1, unbiased=False), torch.ones(plain.shape[0]), atol=2e-3, rtol=0)
        for row in range(len(ids)):
            n = int(mask[row].sum())
            positions = None if ARCHS[name][4] else torch.arange(ids.shape[1] - n, ids.shape[1])[None]
            alone = model(ids[row:row + 1, -n:], position_ids=positions).last_hidden_state
            torch.testing.assert_close(out[row, -n:], alone[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,config,method", [
    (RobertaForSequenceClassification, RobertaConfig(**TEXT_CONFIG, num_labels=3), "tome"),
    (XLMRobertaForSequenceClassification, XLMRobertaConfig(**TEXT_CONFIG, num_labels=3), "evit"),
    (DistilBertForSequenceClassification, _distilbert_config(num_labels=3), "atc"),
    (ModernBertForSequenceClassification, _modernbert_config(num_labels=3), "tps"),
    (BeitForImageClassification, BeitConfig(**_beit_config(use_relative_position_bias=True), num_labels=3), "ats"),
])
def test_classification_heads(cls, config, method, pixels):
    model = _make(cls, config)
    inputs = {"pixel_values": pixels} if "Beit" in cls.__name__ else {"input_ids": _ids(0 if "Roberta" in cls.__name__
                                                                                        else 2)}
    with torch.no_grad():
        dense = model(**inputs).logits
        hf_tokred.apply(model, ALL_METHODS[method][1])
        assert torch.equal(model(**inputs).logits, dense)
        hf_tokred.apply(model, ALL_METHODS[method][0])
        logits = model(**inputs).logits
    assert logits.shape == dense.shape == (2, 3) and not torch.equal(logits, dense)
    assert token_counts(model)[-1] < token_counts(model)[0]


@pytest.mark.parametrize("cls,config", [
    (RobertaForMaskedLM, RobertaConfig(**TEXT_CONFIG)),
    (XLMRobertaForTokenClassification, XLMRobertaConfig(**TEXT_CONFIG, num_labels=5)),
])
def test_per_token_heads_need_restore_length(cls, config):
    model = _make(cls, config)
    with pytest.raises(UnsupportedModelError, match="restore_length=True"):
        hf_tokred.apply(model, {"method": "tome", "r": 2})
    _untouched(model)
    hf_tokred.apply(model, {"method": "tome", "r": 3, "restore_length": True})
    with torch.no_grad():
        logits = model(_ids(0)).logits
    assert logits.shape[:2] == (2, TEXT) and token_counts(model)[:-1] == [21, 18, 15]


def test_modernbert_mean_pooling_needs_restore_length():
    model = _make(ModernBertForSequenceClassification, _modernbert_config(num_labels=3, classifier_pooling="mean"))
    ids, mask = _padded("modernbert", left=False)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        with pytest.raises(UnsupportedModelError, match="classifier_pooling='mean'.*restore_length=True"):
            hf_tokred.apply(model, {"method": "tome", "r": 2})
        _untouched(model)
        assert torch.equal(model(ids, attention_mask=mask).logits, dense)
        hf_tokred.apply(model, {"method": "tome", "r": 0, "restore_length": True})
        assert torch.equal(model(ids, attention_mask=mask).logits, dense)
        hf_tokred.apply(model, {"method": "tome", "r": 3, "restore_length": True})
        assert model(ids, attention_mask=mask).logits.shape == (4, 3)
    assert min(token_counts(model)) < ids.shape[1]


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,method", [("roberta", "tome"), ("xlm-roberta", "diffrate"), ("distilbert", "evit"),
                                         ("modernbert", "tome"), ("beit", "atc"), ("beit_shared", "dynamicvit")])
def test_save_and_reload_give_identical_outputs(name, method, tmp_path, pixels):
    model = ARCHS[name][0]()
    inputs = _inputs(name, pixels)
    model.save_pretrained(tmp_path / "dense")
    cfg = TokenReductionConfig(**ALL_METHODS[method][0])
    loaded = type(model).from_pretrained(tmp_path / "dense", token_reduction=cfg).eval()
    with torch.no_grad():
        out = _out(loaded, inputs)
        counts = token_counts(loaded)
    assert counts[-1] < _tokens(name)
    loaded.save_pretrained(tmp_path / "reduced")
    again = type(model).from_pretrained(tmp_path / "reduced").eval()
    assert get_applied(again).config == cfg
    with torch.no_grad():
        assert torch.equal(_out(again, inputs), out)
    assert token_counts(again) == counts


# ---------------------------------------------------------------------------------------------
# Clear refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Data2VecVisionModel, Data2VecVisionForImageClassification])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_data2vec_vision_is_refused_naming_why_and_left_untouched(cls, method, pixels):
    model = _make(cls, Data2VecVisionConfig(**_beit_config(use_relative_position_bias=True)))
    with torch.no_grad():
        dense = model(pixel_values=pixels)[0]
    with pytest.raises(UnsupportedModelError) as info:
        hf_tokred.apply(model, ALL_METHODS[method][0])
    message = str(info.value)
    assert cls.__name__ in message and "attention interface" in message and "BeitModel" in message
    _untouched(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels)[0], dense)


def test_an_unknown_encoder_gets_a_clear_reason():
    model = ElectraModel(ElectraConfig(vocab_size=VOCAB, embedding_size=HIDDEN, **SMALL))
    with pytest.raises(UnsupportedModelError) as info:
        hf_tokred.apply(model, {"method": "tome", "r": 2})
    message = str(info.value)
    assert "ElectraModel looks like a bidirectional encoder" in message and "EncoderAdapter" in message
    for supported in ("RobertaModel", "XLMRobertaModel", "DistilBertModel", "ModernBertModel", "BeitModel"):
        assert supported in message
    assert not hasattr(model, "_hf_tokred_applied")


def test_a_model_whose_attention_bypasses_the_interface_is_refused():
    # The generic guard, whatever the adapter says: transformers' own flag for "attention goes through the interface".
    class OwnAttentionRoberta(RobertaModel):
        _supports_attention_backend = False

    model = _make(OwnAttentionRoberta, RobertaConfig(**TEXT_CONFIG))
    with pytest.raises(UnsupportedModelError, match="does not go through transformers' attention interface"):
        hf_tokred.apply(model, {"method": "tome", "r": 2})
    _untouched(model)
