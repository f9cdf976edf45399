"""Visual-token methods on tiny random vision-language models of every supported family.

The behaviour the visual stage promises: batches of rows with different image counts and sizes, left-padded,
equal each row run alone; ``keep=1.0`` and ``remove()`` are bit-identical to the untouched model; the cache holds
only the kept visual tokens after the cut; generate() works greedy, sampling and with beams; Qwen2-VL's M-RoPE
positions are the full layout's; bad input fails with a clear error and leaves the model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from vlm_models import BUILDERS, IMAGE, SIZES, llava_processor

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig
from hf_tokred.config import register_method
from hf_tokred.errors import TokenReductionError, UnsupportedModelError
from hf_tokred.integration.wiring import get_applied
from hf_tokred.vlm.base import BeforeLLMConfig, Selection

FAMILIES = sorted(BUILDERS)
IN_LLM = {"method": "fastv", "k": 2, "keep": 0.5}


@register_method("test_top_importance")
@dataclass(kw_only=True)
class TopImportance(BeforeLLMConfig):
    """Keeps the tokens the tower attends to most, unmerged: the plain drop a reference can reproduce."""

    def select(self, image, count):
        score = torch.where(image.protected, torch.inf, image.importance)
        return Selection(score.topk(count + int(image.protected.sum())).indices.sort().values)


BEFORE = {"method": "test_top_importance", "keep": 0.5}
METHODS = {"fastv": IN_LLM, "before": BEFORE, "visionzip": {"method": "visionzip", "keep": 0.5},
           "prumerge": {"method": "prumerge", "keep": 0.5}, "prumerge_plus": {"method": "prumerge", "plus": True},
           "turbo": {"method": "turbo", "keep": 0.5}, "sparsevlm": {"method": "sparsevlm", "keep": 0.3},
           "ivtp": {"method": "ivtp", "keep": 0.5, "layer": 1, "group_size": 4}}


def build(family):
    model, make = BUILDERS[family]()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    # A random model may emit a placeholder id, which the next uncached call would count as an image token.
    model.generation_config.suppress_tokens = [IMAGE, IMAGE + 1, IMAGE + 2, IMAGE + 3]
    return model, make


def rows(family):
    sizes = SIZES[family]
    return [sizes, sizes[:1]]  # two rows: two images (different sizes where supported) and one


def greedy(model, kw, new=4, **extra):
    extra.setdefault("do_sample", False)
    return model.generate(**kw, max_new_tokens=new, **extra)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_batch_equals_rows_alone(family, method):
    model, make = build(family)
    hf_tokred.apply(model, METHODS[method])
    batch_rows = rows(family)
    batched = greedy(model, make(batch_rows))
    for i, row in enumerate(batch_rows):
        alone = greedy(model, make([row], start=i))
        assert torch.equal(batched[i, -4:], alone[0, -4:]), (family, method, i)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_noop_and_remove_are_bit_identical(family, method):
    model, make = build(family)
    kw = make(rows(family))
    with torch.no_grad():
        dense = model(**kw).logits
    reference = greedy(model, kw)
    hf_tokred.apply(model, {**METHODS[method], "keep": 1.0})
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, dense)
    assert torch.equal(greedy(model, kw), reference)
    hf_tokred.apply(model, METHODS[method])
    reduced = greedy(model, kw, new=8)
    hf_tokred.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, dense)
    assert torch.equal(greedy(model, kw), reference)
    assert reduced.shape[1] == reference.shape[1] + 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cache_holds_only_kept_visual_tokens(family, method):
    model, make = build(family)
    hf_tokred.apply(model, METHODS[method])
    kw = make([SIZES[family][:1]])
    length = kw["input_ids"].shape[1]
    visual = int((kw["input_ids"] == IMAGE).sum())
    cache = hf_tokred.build_cache(model)
    greedy(model, kw, new=3, past_key_values=cache)
    layers = len(cache.stored_lengths())
    cfg = TokenReductionConfig(**METHODS[method])
    kept = length - visual + cfg.kept_count(visual)
    stored = cache.stored_lengths()
    if cfg.insertion == "in_llm":  # layers up to the first cut hold every token (+ 3 decoded, - 1), then fewer
        schedule = cfg.resolve_schedule(layers)
        first, last_keep = schedule[0][0], schedule[-1][1]
        assert stored[: first + 1] == [length + 2] * (first + 1)
        final = length - visual + cfg.kept_count(visual, last_keep) + 2
        if method == "sparsevlm":  # recycled carriers go on beside the kept tokens
            assert final <= stored[-1] < stored[first + 1] <= length + 2
        else:
            assert stored[first + 1:] == [final] * (layers - first - 1)
    elif family == "llava_next":  # its newline tokens are kept on top of the share of the others
        assert stored == [stored[0]] * layers and stored[0] < length + 2
    elif getattr(cfg, "adaptive", False) and not getattr(cfg, "plus", False):  # PruMerge: at most the budget
        assert stored == [stored[0]] * layers and length - visual + 2 < stored[0] <= kept + 2
    else:
        assert stored == [kept + 2] * layers


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_dropping_before_the_llm_equals_masking_the_tokens_out(family):
    """A token dropped before layer 0 is as if no one could attend to it, at its original position: the last
    logits equal the dense model's with those tokens masked out of attention (same position ids, M-RoPE too)."""
    model, make = build(family)
    kw = make([SIZES[family][:1]])
    hf_tokred.apply(model, BEFORE)
    with torch.no_grad():
        reduced = model(**kw).logits[:, -1]
        # Which visual tokens went on: the first decoder layer's cache slots after a cached call.
        cache = hf_tokred.build_cache(model)
        model(**kw, past_key_values=cache, use_cache=True)
        kept = cache.layers[0].positions[0, 0].tolist()
    hf_tokred.remove(model)
    mask = torch.zeros_like(kw["attention_mask"])
    mask[0, kept] = 1
    extra = {}
    if family.startswith("qwen"):
        positions, _ = model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"],
                                                  attention_mask=kw["attention_mask"])
        extra["position_ids"] = positions
    else:
        extra["position_ids"] = torch.arange(kw["input_ids"].shape[1])[None]
    with torch.no_grad():
        masked = model(**{**kw, "attention_mask": mask}, **extra).logits[:, -1]
    assert len(kept) < kw["input_ids"].shape[1]
    torch.testing.assert_close(reduced, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_generate_modes(family, method):
    model, make = build(family)
    hf_tokred.apply(model, METHODS[method])
    kw = make(rows(family))
    beams = greedy(model, kw, num_beams=2)
    assert beams.shape[0] == 2
    torch.manual_seed(0)
    sampled = model.generate(**kw, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == beams.shape
    # Without a cache every forward prunes anew; the last position's logits still decode.
    no_cache = greedy(model, kw, use_cache=False)
    assert no_cache.shape == beams.shape


@pytest.mark.parametrize("method", sorted(METHODS))
def test_composes_with_kv_policy_and_storage(method):
    model, make = build("llava")
    kw = make(rows("llava"))
    cfg = hf_tokred.compose(METHODS[method], {"method": "snapkv", "keep": 0.5, "window": 4, "sink_tokens": 1},
                            {"method": "kivi", "bits": 4, "group_size": 8, "residual": 4})
    hf_tokred.apply(model, cfg)
    cache = hf_tokred.build_cache(model)
    out = greedy(model, kw, past_key_values=cache)
    assert out.shape[1] == kw["input_ids"].shape[1] + 4
    assert cache.label == f"{METHODS[method]['method']}+snapkv+kivi"
    dense_tokens = kw["input_ids"].shape[1] + 3
    assert max(cache.stored_lengths()) < dense_tokens


def test_save_and_load_give_identical_outputs(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, make = build("llava")
    kw = make(rows("llava"))
    hf_tokred.apply(model, IN_LLM)
    expected = greedy(model, kw)
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert get_applied(loaded).config.method == "fastv"
    assert torch.equal(greedy(loaded, kw), expected)


@pytest.mark.parametrize("method", ["fastv", "visionzip"])
def test_image_text_to_text_pipeline(tmp_path, method):
    from PIL import Image
    from transformers import pipeline

    model, _ = build("llava")
    model.save_pretrained(tmp_path)
    llava_processor().save_pretrained(tmp_path)
    picture = Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "w5 w6 w7"}]}]
    dense = pipeline("image-text-to-text", model=str(tmp_path))
    reduced = pipeline("image-text-to-text", model=str(tmp_path), model_kwargs={"token_reduction": METHODS[method]})
    assert get_applied(reduced.model).config.method == method
    assert get_applied(dense.model) is None
    out = reduced(text=chat, max_new_tokens=3, return_full_text=False)
    assert out[0]["input_text"] == chat and isinstance(out[0]["generated_text"], str)
    noop = pipeline("image-text-to-text", model=str(tmp_path),
                    model_kwargs={"token_reduction": {**METHODS[method], "keep": 1.0}})
    assert noop(text=chat, max_new_tokens=3, return_full_text=False) == dense(text=chat, max_new_tokens=3,
                                                                               return_full_text=False)


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ConfigError, match="keep"):
        TokenReductionConfig(method="fastv", keep=0.0)
    with pytest.raises(ConfigError, match="k"):
        TokenReductionConfig(method="fastv", k=0)
    model, make = build("llava")
    kw = make(rows("llava"))
    with torch.no_grad():
        dense = model(**kw).logits
    with pytest.raises(ConfigError, match="layer 9 is out of range"):
        hf_tokred.apply(model, {"method": "fastv", "k": 10})
    assert get_applied(model) is None
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, dense)


def test_text_only_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        hf_tokred.apply(model, IN_LLM)
    assert get_applied(model) is None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_placeholders_not_matching_the_images_fail_clearly(method):
    model, make = build("llava")
    hf_tokred.apply(model, METHODS[method])
    kw = make([SIZES["llava"]])
    ids = kw["input_ids"].clone()
    ids[0, (ids[0] == IMAGE).nonzero()[0]] = 5  # one placeholder fewer than the image's features
    with pytest.raises((TokenReductionError, ValueError), match="(?i)image"):
        model(**{**kw, "input_ids": ids})


def test_rows_without_images_are_unchanged():
    model, make = build("llava")
    kw = make([[]])
    with torch.no_grad():
        dense = model(**kw).logits
    for method in METHODS.values():
        hf_tokred.apply(model, method)
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, dense)
        hf_tokred.remove(model)


def test_before_llm_refuses_video_tokens():
    model, make = build("qwen2_vl")
    hf_tokred.apply(model, BEFORE)
    kw = make([[]])
    kw["input_ids"][0, 2] = 121  # a video placeholder
    with pytest.raises(UnsupportedModelError, match="video"):
        model(**kw)
