"""MADTP (text-guided, per-instance learned pruning of BLIP's / BLIP-2's vision tokens): tiny random
BlipForImageTextRetrieval, BlipForQuestionAnswering and Blip2ForConditionalGeneration; no-op at keep=1, remove(),
exact per-row counts, CLS protected, batched == per row, training changes only the heads, save/load, errors,
generate()."""

from __future__ import annotations

import pytest
import torch
from hf_tokred.model_patches import find_adapter
from safetensors import safe_open
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_tokred
import hf_tokred.methods.encoder.madtp  # noqa: F401  (registers "madtp" until hf_tokred.methods imports it)
from hf_tokred import ConfigError, TokenReductionConfig, UnsupportedModelError
from hf_tokred.integration.encoders import source_map, token_counts
from hf_tokred.methods.encoder.madtp import stage_decisions, text_features
from hf_tokred.training_madtp import madtp_heads, madtp_loss, synthetic_batches, train_madtp

# The BLIP vision attention takes no attention mask from its block; the sequence wiring must deliver the mask of a
# shortened sequence another way (EncoderAdapter mask_route; see model_patches/blip.py).
_wiring = pytest.importorskip("hf_tokred.integration.encoders")
pytestmark = pytest.mark.skipif(not hasattr(_wiring, "MASK_ROUTES"),
                                reason="the sequence wiring has no mask routes (BLIP's attention takes no mask)")

IMAGE, PATCH, LAYERS = 32, 4, 4  # 64 patches + CLS
HEADS = {"align_dim": 16, "num_concepts": 4, "ratio_hidden": 8}


def _blip_config():
    return BlipConfig(
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=1, sep_token_id=2,
                         pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         initializer_range=0.3),  # large enough that the image visibly steers the text side
        vision_config=dict(hidden_size=32, image_size=IMAGE, patch_size=PATCH, num_hidden_layers=LAYERS,
                           num_attention_heads=4, intermediate_size=37, attention_dropout=0.0,
                           initializer_range=0.2),  # the vision default (1e-10) leaves every image the same
        projection_dim=16, image_text_hidden_size=16)


def make_itr():
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(_blip_config()).eval()


def make_vqa():
    torch.manual_seed(0)
    return BlipForQuestionAnswering(_blip_config()).eval()


def make_blip2():
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, image_size=IMAGE, patch_size=PATCH, num_hidden_layers=LAYERS,
                           num_attention_heads=4, intermediate_size=37, attention_dropout=0.0,
                           initializer_range=0.2),  # the vision default (1e-10) leaves every image the same
        qformer_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64,
                            initializer_range=0.3),
        text_config=dict(model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
        num_query_tokens=4, image_token_index=98, initializer_range=0.3)
    config._attn_implementation = "sdpa"
    return Blip2ForConditionalGeneration(config).eval()


MAKERS = {"itr": make_itr, "vqa": make_vqa, "blip2": make_blip2}


def batch_for(model, batch_size=3, seed=1):
    return synthetic_batches(model, 1, batch_size=batch_size, text_length=7, seed=seed)[0]


def outputs(model, batch):
    """The tensor the test compares: ITM logits, answer-decoder logits (VQA), LM logits (BLIP-2)."""
    with torch.no_grad():
        if isinstance(model, BlipForQuestionAnswering):
            captured = []
            handle = model.text_decoder.register_forward_hook(lambda m, a, o: captured.append(o.logits))
            try:
                model(**batch)
            finally:
                handle.remove()
            return captured[-1]
        out = model(**batch)
        return out.itm_score if isinstance(model, BlipForImageTextRetrieval) else out.logits


def randomize(model, scale=0.3, seed=5):
    """Distinct random heads (as if trained) so that alignment scores and per-instance ratios differ by row."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in madtp_heads(model).parameters():
            p.normal_(0, scale)


def apply(model, **fields):
    return hf_tokred.apply(model, {"method": "madtp", **HEADS, **fields})


# ---------------------------------------------------------------------------------------------
# Adapters, config, errors
# ---------------------------------------------------------------------------------------------


def test_adapters_match_the_blip_classes():
    assert find_adapter(make_itr()).name == "blip"
    assert find_adapter(make_blip2()).name == "blip_2"
    assert find_adapter(make_itr().vision_model).name == "blip_vision"
    assert find_adapter(make_blip2().vision_model).name == "blip_2_vision"


@pytest.mark.parametrize("fields, field", [({"keep": 0.0}, "keep"), ({"keep": 1.5}, "keep"),
                                           ({"spread": -0.1}, "spread"), ({"guidance": "audio"}, "guidance"),
                                           ({"layers": [1, 1]}, "layers"), ({"tau": 0.0}, "tau")])
def test_bad_fields_raise_config_error_naming_the_field(fields, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="madtp", **fields)
    assert err.value.field == field


def test_layer_out_of_range_names_layers_and_leaves_the_model_untouched():
    model = make_itr()
    with pytest.raises(ConfigError) as err:
        apply(model, layers=[9])
    assert err.value.field == "layers"
    assert hf_tokred.integration.wiring.get_applied(model) is None


def test_unsupported_models_name_what_madtp_supports():
    from conftest import make_tiny_vit

    with pytest.raises(UnsupportedModelError, match="BlipForImageTextRetrieval"):
        apply(make_tiny_vit())
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="madtp"):
        apply(llama)


def test_other_sequence_reducers_needing_attention_statistics_are_refused_on_blip():
    with pytest.raises(UnsupportedModelError, match="attention interface"):
        hf_tokred.apply(make_itr(), {"method": "evit", "keep_rate": 0.5})


# ---------------------------------------------------------------------------------------------
# Inference: no-op, remove, counts, CLS, batching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_keep_one_is_bit_identical_and_remove_restores(kind):
    model = MAKERS[kind]()
    batch = batch_for(model)
    dense = outputs(model, batch)
    apply(model, keep=1.0)
    randomize(model)
    assert torch.equal(outputs(model, batch), dense)
    hf_tokred.remove(model)
    apply(model, keep=0.3)
    randomize(model)
    assert not torch.allclose(outputs(model, batch), dense, atol=1e-6)
    hf_tokred.remove(model)
    assert torch.equal(outputs(model, batch), dense)
    assert "generate" not in model.__dict__ and not hasattr(model, "hf_tokred_modules")


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_exact_counts_per_layer_and_cls_protected(kind):
    model = MAKERS[kind]()
    apply(model, keep=0.3, layers=[1, 3])
    randomize(model)
    batch = batch_for(model, batch_size=4)
    outputs(model, batch)
    decisions = stage_decisions(model)
    assert [d.block for d in decisions] == [1, 3]
    n = torch.full((4,), IMAGE * IMAGE // PATCH ** 2)
    for decision in decisions:
        assert torch.equal(decision.candidates, n)
        expected = torch.minimum(torch.ceil(n.double() * decision.ratio.double() - 1e-6).long().clamp(min=1), n)
        assert torch.equal(decision.kept, expected)
        n = expected
    vision = model.vision_model
    counts = token_counts(model)
    assert counts[1] == 1 + int(decisions[0].kept.max()) and counts[3] == 1 + int(decisions[1].kept.max())
    state = model.__dict__[hf_tokred.integration.encoders.STATE_ATTR]
    assert torch.equal(state.row_counts[-1], 1 + decisions[-1].kept)
    assert bool(source_map(model)[:, 0, 0].all())  # CLS stays first, carrying itself
    assert vision is model.vision_model


def test_instances_get_different_ratios_and_text_changes_the_choice():
    model = make_itr()
    apply(model, keep=0.3, layers=[1, 3])
    randomize(model, scale=0.5)
    batch = batch_for(model, batch_size=4)
    outputs(model, batch)
    ratios = stage_decisions(model)[0].ratio
    assert len(set(ratios.tolist())) > 1
    chosen = source_map(model)[:, :, :].any(1)
    other = dict(batch, input_ids=batch["input_ids"].flip(0), attention_mask=batch["attention_mask"].flip(0))
    outputs(model, other)
    assert not torch.equal(source_map(model).any(1)[0], chosen[0]) or not torch.equal(
        source_map(model).any(1)[-1], chosen[-1])


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_batched_equals_per_row(kind):
    model = MAKERS[kind]()
    apply(model, keep=0.3, layers=[1, 3])
    randomize(model, scale=0.5)
    batch = batch_for(model, batch_size=3)
    if kind == "vqa":
        # transformers' BLIP text decoder drops the question's padding mask in its cross-attention, so the dense
        # model itself differs batched vs per row with padded questions: compare with unpadded ones.
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    together = outputs(model, batch)
    kept = [d.kept for d in stage_decisions(model)]
    for row in range(3):
        one = {k: v[row:row + 1] for k, v in batch.items()}
        if "attention_mask" in one:  # trim the row's own padding
            length = int(one["attention_mask"].sum())
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, :length], one["attention_mask"][:, :length]
        alone = outputs(model, one)
        assert [int(d.kept[0]) for d in stage_decisions(model)] == [int(k[row]) for k in kept]
        reference = together[row:row + 1]
        if alone.dim() == 3:
            reference = reference[:, : alone.shape[1]]
        torch.testing.assert_close(alone, reference, atol=2e-5, rtol=1e-4)


def test_text_guidance_is_the_unimodal_text_encoder_cls():
    model = make_itr()
    batch = batch_for(model)
    feats, has_text = text_features(model, "blip", batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        cls = model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.equal(feats, cls[:, 0]) and bool(has_text.all())
    blip2 = make_blip2()
    batch = batch_for(blip2)
    feats, has_text = text_features(blip2, "blip_2", batch["input_ids"], batch["attention_mask"])
    assert feats.shape == (3, 32) and bool(has_text.all())
    only_images = torch.full((2, 5), 98)
    only_images[:, -1] = 1  # image placeholders + BOS: no text
    assert not text_features(blip2, "blip_2", only_images)[1].any()


def test_guidance_text_requires_text_and_vision_ignores_it():
    model = make_itr()
    apply(model, keep=0.3, guidance="text")
    with pytest.raises(hf_tokred.TokenReductionError, match="guidance"):
        model.vision_model(pixel_values=batch_for(model)["pixel_values"])
    hf_tokred.remove(model)
    apply(model, keep=0.3, guidance="vision")
    randomize(model)
    batch = batch_for(model)
    first = outputs(model, batch)
    picked = source_map(model).any(1)
    outputs(model, dict(batch, input_ids=batch["input_ids"].flip(0)))
    assert torch.equal(source_map(model).any(1), picked)  # the text does not steer the pruning
    assert first.shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# Training, save/load, generate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_training_reduces_the_loss_and_changes_only_the_heads(kind, tmp_path):
    model = MAKERS[kind]()
    apply(model, keep=0.4, layers=[1, 3])
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred_modules" not in k}
    heads_before = {k: v.clone() for k, v in madtp_heads(model).state_dict().items()}
    batches = synthetic_batches(model, 2, batch_size=3, text_length=7, seed=3)
    losses = train_madtp(model, batches, steps=12, lr=2e-2, seed=0, progress=False)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    after = {k: v for k, v in model.state_dict().items() if "hf_tokred_modules" not in k}
    assert all(torch.equal(after[k], backbone[k]) for k in backbone)
    assert any(not torch.equal(v, heads_before[k]) for k, v in madtp_heads(model).state_dict().items())
    assert not madtp_heads(model).training


def test_soft_masks_in_training_keep_every_token_and_reach_the_heads():
    model = make_itr()
    apply(model, keep=0.3, layers=[1, 3])
    madtp_heads(model).train()
    batch = batch_for(model)
    loss, parts = madtp_loss(model, batch, return_parts=True)
    assert token_counts(model) == [65] * LAYERS  # nothing dropped in training
    loss.backward()
    grads = [p.grad for p in madtp_heads(model).parameters()]
    assert sum(int(g is not None and bool(g.abs().sum() > 0)) for g in grads) >= len(grads) // 2
    assert set(parts) >= {"ratio", "align", "kl", "pooled"}


def test_resumable_checkpoints_and_output_dir(tmp_path):
    model = make_itr()
    apply(model, keep=0.4, layers=[1, 3])
    batches = synthetic_batches(model, 2, batch_size=2, seed=4)
    full = train_madtp(model, batches, steps=6, lr=1e-2, seed=0, progress=False)
    full_heads = {k: v.clone() for k, v in madtp_heads(model).state_dict().items()}
    model = make_itr()
    apply(model, keep=0.4, layers=[1, 3])
    out = tmp_path / "run"
    train_madtp(model, batches, steps=3, lr=1e-2, seed=0, progress=False, output_dir=out, save_every=1)
    model = make_itr()
    apply(model, keep=0.4, layers=[1, 3])
    resumed = train_madtp(model, batches, steps=6, lr=1e-2, seed=0, progress=False, output_dir=out, save_every=1)
    assert resumed == pytest.approx(full, abs=1e-5)
    for k, v in madtp_heads(model).state_dict().items():
        torch.testing.assert_close(v, full_heads[k], atol=1e-5, rtol=1e-4)
    assert (out / "token_reduction.safetensors").is_file() and (out / "README.md").is_file()
    assert "madtp" in (out / "README.md").read_text()
    with pytest.raises(ConfigError) as err:
        train_madtp(model, batches, steps=6, lr=5e-3, seed=0, progress=False, output_dir=out)
    assert err.value.field == "output_dir"


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_save_load_gives_identical_outputs(kind, tmp_path):
    model = MAKERS[kind]()
    apply(model, keep=0.3, layers=[1, 3])
    randomize(model)
    batch = batch_for(model)
    reduced = outputs(model, batch)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "token_reduction.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names and all(name.startswith("madtp.") for name in names)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any("hf_tokred" in k for k in f.keys())
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert hf_tokred.integration.wiring.get_applied(loaded).config.method == "madtp"
    assert torch.equal(outputs(loaded, batch), reduced)
    dense = type(model).from_pretrained(tmp_path, token_reduction=False).eval()
    assert not hasattr(dense, "hf_tokred_modules")


def test_push_to_hub_uploads_the_heads(tmp_path, monkeypatch):
    from unittest import mock

    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    model = make_itr()
    apply(model, keep=0.3)
    uploaded = {}

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded.update({op.path_in_repo: op for op in operations})

    with mock.patch.object(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://hf.co/{repo_id}")), \
            mock.patch.object(HfApi, "create_commit", create_commit):
        model.push_to_hub("me/blip-madtp")
    assert "token_reduction.safetensors" in uploaded and "README.md" in uploaded


def test_generate_with_madtp_vqa_and_blip2():
    vqa = make_vqa()
    apply(vqa, keep=0.3, layers=[1, 3])
    randomize(vqa)
    batch = batch_for(vqa)
    out = vqa.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], max_new_tokens=3)
    assert out.shape[0] == 3 and token_counts(vqa)[-1] < 65
    assert madtp_heads(vqa)._guidance == []  # the call's guidance is gone afterwards
    blip2 = make_blip2()
    apply(blip2, keep=0.3, layers=[1, 3])
    randomize(blip2)
    batch = batch_for(blip2)
    out = blip2.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 3 and token_counts(blip2)[-1] < 65
    caption = blip2.generate(pixel_values=batch["pixel_values"], max_new_tokens=2, do_sample=False)  # no text
    assert caption.shape[0] == 3
    assert not stage_decisions(blip2)[0].has_text.any()
