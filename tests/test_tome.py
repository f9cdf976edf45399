"""ToMe (token merging) on tiny ViT and BERT encoders built from configs: exactness, padding, save/load, pipelines."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
    pipeline,
)

import hf_tokred
import hf_tokred.integration.encoders  # noqa: F401  (registers the "sequence" wiring)
import hf_tokred.methods.encoder.tome  # noqa: F401  (registers "tome")
from hf_tokred import ConfigError, TokenReductionConfig, UnsupportedModelError
from hf_tokred.integration.encoders import STATE_ATTR, token_sizes
from hf_tokred.methods.encoder.tome import ToMeConfig, bipartite_soft_matching, merge_wavg

IMAGE, PATCH, LAYERS = 32, 4, 4
TOKENS = (IMAGE // PATCH) ** 2 + 1  # 64 patches + CLS


def vit_config(**kw):
    return ViTConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=64, num_hidden_layers=LAYERS,
                     num_attention_heads=4, intermediate_size=128, num_labels=3, **kw)


def bert_config(**kw):
    kw = {"vocab_size": 64, **kw}
    return BertConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=64, **kw)


def make(cls, config, attn="sdpa"):
    torch.manual_seed(0)
    config._attn_implementation = attn
    return cls(config).eval()


@pytest.fixture
def vit():
    return make(ViTModel, vit_config())


@pytest.fixture
def images():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def padded_batch(left=False):
    g = torch.Generator().manual_seed(2)
    lengths = [12, 24, 17, 3]
    n = max(lengths)
    ids = torch.randint(5, 64, (len(lengths), n), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        if left:
            mask[row, n - length:] = 1
        else:
            mask[row, :length] = 1
    ids[:, 0] = 2  # [CLS] (right padding); for left padding the first real token plays its part
    return ids, mask


def block_lengths(model):
    """Register hooks recording the output length of every block (they run after hf_tokred's hooks)."""
    adapter = hf_tokred.model_patches.find_adapter(model)
    seen, handles = [], []
    for block in adapter.blocks(model):
        handles.append(block.register_forward_hook(lambda m, a, out: seen.append(out.shape[1])))
    return seen, handles


def untouched(model, attn="sdpa"):
    adapter = hf_tokred.model_patches.find_adapter(model)
    assert model.config._attn_implementation == attn
    assert "token_reduction" not in model.config.__dict__
    assert not hasattr(model, "_hf_tokred_applied") and STATE_ATTR not in model.__dict__
    for block in adapter.blocks(model):
        assert not block._forward_hooks and not block._forward_pre_hooks
        assert not any("_hf_tokred" in k for m in block.modules() for k in m.__dict__)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 1.5, "x", True, [2, -1], [1, 2.0]])  # None means "8 unless ratio"
def test_bad_r_is_rejected_naming_the_field(bad):
    with pytest.raises(ConfigError) as info:
        TokenReductionConfig(method="tome", r=bad)
    assert info.value.field in ("r", "r[1]")
    assert "int >= 0" in str(info.value)


def test_unknown_field_and_bad_prop_attn():
    with pytest.raises(ConfigError, match="rate: not a field of method 'tome'.*prop_attn, r, ratio, restore_length"):
        TokenReductionConfig(method="tome", rate=0.5)
    with pytest.raises(ConfigError, match="prop_attn: expected a bool"):
        TokenReductionConfig(method="tome", prop_attn="yes")


def test_ratio_and_metric_fields():
    cfg = TokenReductionConfig(method="tome", ratio=0.25)
    assert cfg.r is None and cfg.schedule(3) == [0.25] * 3
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    assert TokenReductionConfig(method="tome").r == 8 and TokenReductionConfig(method="tome").needs == {"metric"}
    assert TokenReductionConfig(method="tome", metric="hidden").needs == frozenset()
    with pytest.raises(ConfigError, match="ratio: give r or ratio, not both"):
        TokenReductionConfig(method="tome", r=4, ratio=0.2)
    with pytest.raises(ConfigError, match="ratio: expected a number in \\[0, 0.5\\]"):
        TokenReductionConfig(method="tome", ratio=0.7)
    with pytest.raises(ConfigError, match="metric: expected one of 'keys', 'hidden'"):
        TokenReductionConfig(method="tome", metric="queries")


def test_ratio_merges_each_rows_share_and_rows_equal_rows_alone():
    model = make(BertModel, bert_config())
    ids, mask = padded_batch()
    hf_tokred.apply(model, TokenReductionConfig(method="tome", ratio=0.25))
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        sizes = token_sizes(model)
        counts = model.__dict__[STATE_ATTR].row_counts
        for row in range(len(ids)):
            n = int(mask[row].sum())
            alone = model(ids[row:row + 1, :n]).last_hidden_state
            k = alone.shape[1]
            expected = n
            for _ in range(LAYERS):
                expected -= min(int((expected - 1) * 0.25), (expected - 1) // 2)
            assert k == expected == int(counts[-1][row])
            assert torch.allclose(out[row, :k], alone[0], atol=1e-5)
            assert (sizes[row, k:] == 0).all() and sizes[row].sum() == n


def test_hidden_state_metric(vit, images):
    with torch.no_grad():
        hf_tokred.apply(vit, TokenReductionConfig(method="tome", r=6))
        keys = vit(images).last_hidden_state
        hf_tokred.apply(vit, TokenReductionConfig(method="tome", r=6, metric="hidden"))
        hidden = vit(images).last_hidden_state
    assert keys.shape == hidden.shape == (3, TOKENS - 6 * LAYERS, 64) and not torch.allclose(keys, hidden)
    state = vit.__dict__[STATE_ATTR]
    assert not state.needs and not state.stats  # no attention statistics computed


def test_config_round_trip_and_schedule():
    cfg = TokenReductionConfig(method="tome", r=[3, 2], prop_attn=False)
    assert isinstance(cfg, ToMeConfig) and cfg.r == [3, 2]
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.schedule(4) == [3, 2, 0, 0]
    assert TokenReductionConfig(method="tome", r=5).schedule(2) == [5, 5]
    assert ToMeConfig.paper == "2210.09461" and ToMeConfig.stage == "sequence"
    with pytest.raises(ConfigError, match="r: the list has 3 values but the model has 2 blocks"):
        cfg.__class__(r=[1, 1, 1]).schedule(2)
    # (r, inflect): the paper's linear schedule, stored as two fields so it survives JSON
    pair = TokenReductionConfig(method="tome", r=(4, -0.5))
    assert (pair.r, pair.inflect) == (4, -0.5)
    assert pair.schedule(4) == [6, 4, 3, 2]  # int() truncation, as in the paper's parse_r
    assert TokenReductionConfig.from_dict(pair.to_dict()).schedule(4) == pair.schedule(4)
    assert TokenReductionConfig(method="tome", r=(4, 1.0)).schedule(3) == [0, 4, 8]
    for bad in [(4, 2.0), (4, "x"), (1, 2, 3), (-1, 0.0)]:
        with pytest.raises(ConfigError):
            TokenReductionConfig(method="tome", r=bad)


# ---------------------------------------------------------------------------------------------
# The tensor functions
# ---------------------------------------------------------------------------------------------


def test_matching_protects_cls_keeps_it_first_and_sizes_add_up():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 17, 8, generator=g)
    metric = x.clone()
    metric[:, 1:] = metric[:, :1]  # every token looks exactly like CLS: CLS must still never merge
    merge = bipartite_soft_matching(metric + 1e-3 * torch.randn(4, 17, 8, generator=g), r=5, protected=1)
    assert merge.r == 5 and not (merge.src == 0).any() and not (merge.dst == 0).any()
    assert (merge.order[:, 0] == 0).all()
    y, size = merge_wavg(merge, x)
    assert y.shape == (4, 12, 8) and torch.equal(y[:, 0], x[:, 0])
    assert torch.equal(size.sum(dim=1), torch.full((4, 1), 17.0)) and (size[:, 0] == 1).all()


def test_merge_is_a_size_weighted_average():
    x = torch.tensor([[[0.0], [1.0], [4.0], [10.0]]])
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    merge = bipartite_soft_matching(metric, r=1, protected=1)  # token 2 (A) merges into token 1 (B)
    assert merge.src.tolist() == [[2]] and merge.dst.tolist() == [[1]]
    y, size = merge_wavg(merge, x, torch.tensor([[[1.0], [3.0], [1.0], [1.0]]]))
    assert merge.order.tolist() == [[0, 1, 3]]
    assert torch.allclose(y[0, :, 0], torch.tensor([0.0, (3 * 1 + 4) / 4, 10.0]))
    assert size[0, :, 0].tolist() == [1.0, 4.0, 1.0]


def test_r_is_clamped_to_half_the_unprotected_tokens():
    merge = bipartite_soft_matching(torch.randn(2, 9, 4), r=100, protected=1)
    assert merge.r == 4 and merge.order.shape == (2, 5)
    assert bipartite_soft_matching(torch.randn(2, 2, 4), r=3, protected=1).r == 0
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        bipartite_soft_matching(torch.randn(1, 4, 2), r=-1)


def test_padding_never_reaches_real_tokens_in_the_functions():
    g = torch.Generator().manual_seed(4)
    n, real = 12, 7
    x = torch.randn(1, n, 6, generator=g)
    valid = torch.arange(n)[None] < real
    merged = bipartite_soft_matching(x, r=3, protected=1, valid_mask=valid)
    alone = bipartite_soft_matching(x[:, :real], r=3, protected=1)
    y, size = merge_wavg(merged, x, valid.float()[..., None])
    ya, sa = merge_wavg(alone, x[:, :real])
    k = ya.shape[1]
    assert torch.allclose(y[:, :k], ya) and torch.equal(size[:, :k], sa) and (size[:, k:] == 0).all()
    # Too few real tokens for r: the row merges what it can among its real tokens, then padding into padding.
    merged = bipartite_soft_matching(x, r=5, protected=1, valid_mask=valid)
    y, size = merge_wavg(merged, x, valid.float()[..., None])
    ya, sa = merge_wavg(bipartite_soft_matching(x[:, :real], r=5, protected=1), x[:, :real])
    assert y.shape[1] == n - 5 and ya.shape[1] == 4
    assert torch.allclose(y[:, :4], ya) and torch.equal(size[:, :4], sa) and size.sum() == real


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_r0_is_bit_identical_and_remove_restores(attn, images):
    model = make(ViTForImageClassification, vit_config(), attn)
    with torch.no_grad():
        dense = model(images).logits
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=0))
        assert model.config._attn_implementation == f"hf_tokred_{attn}"
        assert torch.equal(model(images).logits, dense)
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=4))
        assert not torch.equal(model(images).logits, dense)
        hf_tokred.remove(model)
        assert torch.equal(model(images).logits, dense)
    untouched(model, attn)


def test_token_counts_after_each_block(vit, images):
    hf_tokred.apply(vit, TokenReductionConfig(method="tome", r=4))
    seen, _ = block_lengths(vit)
    with torch.no_grad():
        out = vit(images, output_hidden_states=True)
    assert seen == [61, 57, 53, 49]
    assert vit.__dict__[STATE_ATTR].token_counts == [61, 57, 53, 49]
    assert out.last_hidden_state.shape == (3, 49, 64)
    assert [h.shape[1] for h in out.hidden_states] == [65, 61, 57, 53, 49]
    hf_tokred.apply(vit, TokenReductionConfig(method="tome", r=[8, 0, 2]))
    seen.clear()
    with torch.no_grad():
        vit(images)
    assert seen == [57, 57, 55, 55]


def test_cls_kept_first_and_sizes_sum_to_token_count(vit, images):
    hf_tokred.apply(vit, TokenReductionConfig(method="tome", r=8))
    state = vit.__dict__[STATE_ATTR]
    sizes = []
    for block in hf_tokred.model_patches.find_adapter(vit).blocks(vit):
        block.register_forward_hook(lambda m, a, out: sizes.append(state.size.clone()))
    with torch.no_grad():
        vit(images)
    assert [s.shape[1] for s in sizes] == [57, 49, 41, 33]
    for size in sizes:
        assert (size[:, 0, 0] == 1).all()  # CLS: never merged, always at index 0
        assert torch.equal(size.sum(dim=1)[:, 0], torch.full((3,), float(TOKENS)))
    assert torch.equal(token_sizes(vit), sizes[-1][..., 0])
    assert (sizes[-1] > 1).any()


def test_cls_output_tracks_cls_input(images):
    # Make the CLS token unmistakable: its final state must still sit at index 0.
    model = make(ViTModel, vit_config())
    with torch.no_grad():
        model.embeddings.cls_token.fill_(50.0)
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=8, prop_attn=False))
        out = model(images).last_hidden_state
        hf_tokred.remove(model)
        dense = model(images).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out[:, :1], out, dim=-1)
    assert (cos[:, 1:] < cos[:, :1] - 0.05).all()
    assert torch.nn.functional.cosine_similarity(out[:, 0], dense[:, 0], dim=-1).min() > 0.9


def test_vit_batch_equals_each_image_alone(images):
    model = make(ViTForImageClassification, vit_config())
    hf_tokred.apply(model, TokenReductionConfig(method="tome", r=6))
    with torch.no_grad():
        batch = model(images).logits
        for i in range(len(images)):
            assert torch.allclose(model(images[i:i + 1]).logits, batch[i:i + 1], atol=1e-5)


def test_prop_attn_changes_the_output(vit, images):
    with torch.no_grad():
        hf_tokred.apply(vit, TokenReductionConfig(method="tome", r=6, prop_attn=True))
        with_prop = vit(images).last_hidden_state
        hf_tokred.apply(vit, TokenReductionConfig(method="tome", r=6, prop_attn=False))
        without = vit(images).last_hidden_state
    assert with_prop.shape == without.shape
    assert not torch.allclose(with_prop, without, atol=1e-4)


def test_gradients_flow_through_merging(images):
    model = make(ViTForImageClassification, vit_config()).train()
    hf_tokred.apply(model, TokenReductionConfig(method="tome", r=4))
    loss = model(images, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# BERT with padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_padded_bert_rows_equal_rows_alone(attn, prop_attn):
    model = make(BertModel, bert_config(), attn)
    ids, mask = padded_batch()
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).last_hidden_state
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=3, prop_attn=prop_attn))
        out = model(ids, attention_mask=mask)
        sizes = token_sizes(model)
        assert out.last_hidden_state.shape[1] == 24 - 4 * 3
        assert torch.equal(sizes.sum(dim=1), mask.sum(dim=1).float())
        for row in range(len(ids)):
            n = int(mask[row].sum())
            alone = model(ids[row:row + 1, :n])
            k = alone.last_hidden_state.shape[1]
            assert torch.allclose(out.last_hidden_state[row, :k], alone.last_hidden_state[0], atol=1e-5)
            assert torch.allclose(out.pooler_output[row], alone.pooler_output[0], atol=1e-5)
            assert torch.equal(sizes[row, :k], token_sizes(model)[0])  # the same merges as alone
            assert (sizes[row, k:] == 0).all()  # padding stayed padding and was never merged into real tokens
        hf_tokred.remove(model)
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, dense)


def test_left_padded_bert_rows_equal_rows_alone():
    model = make(BertModel, bert_config())
    ids, mask = padded_batch(left=True)
    hf_tokred.apply(model, TokenReductionConfig(method="tome", r=2))
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        sizes = token_sizes(model)
        for row in range(len(ids)):
            n = int(mask[row].sum())
            pad = ids.shape[1] - n
            # BERT gives left-padded tokens positions pad..N-1; the row alone gets the same positions.
            alone = model(ids[row:row + 1, pad:], position_ids=torch.arange(pad, ids.shape[1])[None]).last_hidden_state
            k = alone.shape[1]
            assert torch.allclose(out[row, :k], alone[0], atol=1e-5)
            assert (sizes[row, k:] == 0).all()


def test_bert_r0_with_padding_is_bit_identical():
    model = make(BertModel, bert_config())
    ids, mask = padded_batch()
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).last_hidden_state
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=0))
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, dense)
        assert torch.equal(token_sizes(model), mask.float())


# ---------------------------------------------------------------------------------------------
# Bad input leaves the model untouched
# ---------------------------------------------------------------------------------------------


def test_tome_on_a_causal_lm_is_rejected():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    attn = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError) as info:
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=2))
    assert "encoder" in str(info.value) and "ViTModel" in str(info.value) and "BertModel" in str(info.value)
    assert model.config._attn_implementation == attn and not hasattr(model, "_hf_tokred_applied")
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


def test_per_token_heads_and_long_schedules_are_rejected():
    model = make(BertForMaskedLM, bert_config())
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM predicts one output per input token"):
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=2))
    untouched(model)
    vit = make(ViTModel, vit_config())
    with pytest.raises(ConfigError, match="r: the list has 5 values but the model has 4 blocks"):
        hf_tokred.apply(vit, {"method": "tome", "r": [1, 1, 1, 1, 1]})
    untouched(vit)


def test_token_sizes_without_reduction():
    with pytest.raises(hf_tokred.TokenReductionError, match="no sequence reduction"):
        token_sizes(make(ViTModel, vit_config()))


# ---------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained / pipelines
# ---------------------------------------------------------------------------------------------


def test_from_pretrained_and_save_reload(tmp_path, images):
    dense_dir, reduced_dir = tmp_path / "dense", tmp_path / "reduced"
    make(ViTForImageClassification, vit_config()).save_pretrained(dense_dir)
    cfg = TokenReductionConfig(method="tome", r=4)
    model = ViTForImageClassification.from_pretrained(dense_dir, token_reduction=cfg).eval()
    assert hf_tokred.integration.wiring.get_applied(model).config == cfg
    seen, _ = block_lengths(model)
    with torch.no_grad():
        logits = model(images).logits
    assert seen == [61, 57, 53, 49]
    model.save_pretrained(reduced_dir)
    reloaded = ViTForImageClassification.from_pretrained(reduced_dir).eval()
    assert hf_tokred.integration.wiring.get_applied(reloaded).config == cfg
    with torch.no_grad():
        assert torch.allclose(reloaded(images).logits, logits, atol=1e-6)
    dense = ViTForImageClassification.from_pretrained(reduced_dir, token_reduction=False)
    assert hf_tokred.integration.wiring.get_applied(dense) is None


def test_image_classification_pipeline(tmp_path):
    make(ViTForImageClassification, vit_config()).save_pretrained(tmp_path)
    processor = ViTImageProcessor(size=IMAGE)
    processor.save_pretrained(tmp_path)
    cfg = TokenReductionConfig(method="tome", r=4)
    pipe = pipeline("image-classification", model=str(tmp_path), image_processor=processor,
                    model_kwargs={"token_reduction": cfg})
    assert hf_tokred.integration.wiring.get_applied(pipe.model).config == cfg
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    result = pipe(image)
    assert len(result) == 3 and {"label", "score"} <= set(result[0])
    assert pipe.model.__dict__[STATE_ATTR].token_counts == [61, 57, 53, 49]


def test_feature_extraction_pipeline(tmp_path):
    words = "the a cat dog sat on mat token merging is fast and good very small model".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5.23: the vocabulary file is the `vocab` argument (a `vocab_file=` keyword is silently ignored).
    tokenizer = BertTokenizerFast(vocab=os.fspath(tmp_path / "vocab.txt"))
    make(BertModel, bert_config(vocab_size=len(vocab))).save_pretrained(tmp_path)
    cfg = TokenReductionConfig(method="tome", r=2)
    pipe = pipeline("feature-extraction", model=str(tmp_path), tokenizer=tokenizer, model_kwargs={"token_reduction": cfg})
    assert hf_tokred.integration.wiring.get_applied(pipe.model).config == cfg
    text = "the cat sat on the mat and the dog is very good"
    n = len(tokenizer(text)["input_ids"])
    assert n == 14
    features = pipe(text, return_tensors=True)
    assert features.shape[1] == n - 2 * LAYERS
    assert token_sizes(pipe.model).sum().item() == n


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    # transformers 5.23 checkpoints a block's forward (hooks stay outside, the attention observer runs again in the
    # recompute): the proportional-attention bias travels in the block's mask argument, so the recompute matches.
    ids, mask = padded_batch()
    grads = []
    for checkpointing in (False, True):
        model = make(BertModel, bert_config()).train()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        hf_tokred.apply(model, TokenReductionConfig(method="tome", r=3))
        out = model(ids, attention_mask=mask).last_hidden_state
        (out * token_sizes(model)[..., None]).sum().backward()
        grads.append((out.detach(), model.embeddings.word_embeddings.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4)
