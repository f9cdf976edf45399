"""Vision-language models: where their vision tower is and how its tokens become the language model's.

Visual-token methods need two pieces of per-architecture knowledge, kept here and nowhere else:

* which placeholder ids mark visual tokens in ``input_ids`` (``config.image_token_id``; Qwen2-VL's
  ``video_token_id`` too), so every row's visual positions are found from its own ids;
* for methods that act before the language model, which vision-tower attention module scores the tokens (the
  layer the features come from) and how the tower's tokens map onto the features the language model receives:
  LLaVA drops the CLS token ("default" strategy), LLaVA-NeXT packs anyres crops with row-end newline tokens
  (:meth:`LlavaNextModel.pack_image_features` is applied to the scores themselves), Qwen2-VL's merger joins 2x2
  patches (and Qwen2.5-VL reorders them by window), Idefics3's connector pixel-shuffles ``s x s`` patches.

A :class:`VisionLanguageRecord` holds this for one family; :func:`vision_record` finds it for a model. The
language model itself is a decoder found by :mod:`model_patches.decoder` (PaliGemma's, whose prefix attention is
bidirectional, has the explicit record below).

Example:
    >>> from hf_tokred.model_patches.vlm import VISION_RECORDS
    >>> sorted(VISION_RECORDS)
    ['idefics3', 'llava', 'llava_next', 'paligemma', 'qwen2_5_vl', 'qwen2_vl']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hf_tokred.errors import UnsupportedModelError

from . import register_adapter
from .decoder import DecoderAdapter

# PaliGemma's Gemma attends bidirectionally over the image and prompt prefix (``is_causal`` is False on its
# attention modules, which detection reads as an encoder); it still writes a KV cache and decodes causally.
register_adapter(
    DecoderAdapter(
        name="paligemma",
        kind="decoder",
        match=("paligemma",),
        layers="model.language_model.layers",
        attention="self_attn",
        has_kv_cache=True,
        examples=("PaliGemmaForConditionalGeneration",),
        notes="prefix-LM: bidirectional attention over the image and prompt, causal decoding",
    )
)


@dataclass
class TowerTokens:
    """What the vision tower said about one image's tokens, in the order the language model receives them:
    ``importance`` ``(n,)``, ``keys`` ``(n, dk)``, ``grid`` ``(rows, cols)`` or None, ``protected`` ``(n,)``."""

    importance: torch.Tensor
    keys: torch.Tensor
    grid: tuple[int, int] | None
    protected: torch.Tensor


@dataclass(frozen=True)
class VisionLanguageRecord:
    """One family of vision-language models.

    Attributes:
        name: the family (a ``model_type``).
        match: ``model_type`` values of the family.
        examples: model classes, for listings and errors.
        tower: path from the inner model (``model.model``) to the vision tower.
        blocks: path inside the tower to its ``nn.ModuleList`` of layers; ``attention`` inside a layer.
        cls_token: the tower's first token is a CLS token (its attention row scores the patches).
        scoring_layer: ``(model) -> int``: the tower layer whose attention scores the tokens (the one the
            language model's features come from).
        assemble: ``(inner, per_call, arguments) -> list[TowerTokens]``: the per-image scores in feature order,
            from the per-attention-call ``(importance (b, t), keys (b, t, dk))`` the tower produced and the
            ``get_image_features`` arguments.
        token_ids: config attributes holding visual placeholder ids.
    """

    name: str
    match: tuple[str, ...]
    examples: tuple[str, ...]
    tower: str
    blocks: str
    attention: str
    cls_token: bool
    scoring_layer: Callable
    assemble: Callable
    token_ids: tuple[str, ...] = ("image_token_id",)
    video_ids: tuple[str, ...] = field(default=())


def _feature_layer(model) -> int:
    """The tower layer producing ``hidden_states[vision_feature_layer]`` (the last one listed, if several)."""
    layer = model.config.vision_feature_layer
    layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
    depth = model.config.vision_config.num_hidden_layers
    return (layer if layer >= 0 else depth + 1 + layer) - 1


def _last_layer(model) -> int:
    config = model.config.vision_config
    return getattr(config, "num_hidden_layers", None) or config.depth


def _square(tokens: int) -> tuple[int, int] | None:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


def _per_image(importance, keys, grid_fn=_square) -> list[TowerTokens]:
    return [TowerTokens(i, k, grid_fn(i.shape[0]), torch.zeros(i.shape[0], dtype=torch.bool, device=i.device))
            for i, k in zip(importance, keys)]


def _concat(per_call):
    return torch.cat([c[0] for c in per_call]), torch.cat([c[1] for c in per_call])


def _assemble_llava(inner, per_call, arguments) -> list[TowerTokens]:
    importance, keys = _concat(per_call)
    strategy = arguments.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
    if strategy == "default":
        importance, keys = importance[:, 1:], keys[:, 1:]
    return _per_image(importance, keys)


def _assemble_plain(inner, per_call, arguments) -> list[TowerTokens]:
    return _per_image(*_concat(per_call))


def _assemble_llava_next(inner, per_call, arguments) -> list[TowerTokens]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    importance, keys = _concat(per_call)
    strategy = arguments.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
    if strategy == "default":
        importance, keys = importance[:, 1:], keys[:, 1:]
    sizes = arguments["image_sizes"]
    crops = [image_size_to_num_patches(image_size=size, grid_pinpoints=inner.config.image_grid_pinpoints,
                                       patch_size=inner.config.vision_config.image_size) for size in sizes]
    # The model's own packing, applied to [importance, keys] channels; newline tokens get +inf importance.
    joined = torch.cat([importance[..., None], keys], dim=-1).split(crops, dim=0)
    newline = torch.zeros(joined[0].shape[-1], dtype=joined[0].dtype, device=joined[0].device)
    newline[0] = torch.inf
    packed, _ = inner.pack_image_features(list(joined), sizes, strategy, image_newline=newline)
    return [TowerTokens(p[:, 0], p[:, 1:], None, torch.isinf(p[:, 0])) for p in packed]


def _assemble_idefics3(inner, per_call, arguments) -> list[TowerTokens]:
    importance, keys = _concat(per_call)  # (crops, patches): every real crop is one image here
    scale = inner.config.scale_factor
    joined = inner.connector.pixel_shuffle(torch.cat([importance[..., None], keys], dim=-1), scale)
    crops, tokens, _ = joined.shape
    joined = joined.view(crops, tokens, scale * scale, -1).mean(dim=2)  # channels are (i * s + j) * d + c
    return _per_image(joined[..., 0], joined[..., 1:])


def _assemble_qwen2_vl(inner, per_call, arguments) -> list[TowerTokens]:
    grids = arguments["image_grid_thw"]
    merge = inner.config.vision_config.spatial_merge_size
    importance, keys = torch.cat([c[0] for c in per_call], dim=-1)[0], torch.cat([c[1] for c in per_call], dim=1)[0]
    unit = merge * merge
    joined = torch.cat([importance[:, None], keys], dim=-1)
    joined = joined.view(-1, unit, joined.shape[-1]).mean(dim=1)  # the merger joins `unit` consecutive patches
    if inner.config.model_type == "qwen2_5_vl":  # the tower ran in window order; the merger's output is reversed
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

        visual = inner.visual
        window_index, _ = get_vision_window_index(grids, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        joined = joined[torch.argsort(window_index.to(joined.device))]
    counts = [int(t * h * w) // unit for t, h, w in grids.tolist()]
    out = []
    for part, (t, h, w) in zip(joined.split(counts), grids.tolist()):
        grid = (h // merge, w // merge) if t == 1 else None
        out.append(TowerTokens(part[:, 0], part[:, 1:], grid, torch.zeros(part.shape[0], dtype=torch.bool,
                                                                          device=part.device)))
    return out


def _qwen_scoring_layer(model) -> int:
    config = model.config.vision_config
    full = getattr(config, "fullatt_block_indexes", None)
    return max(full) if full else config.depth - 1


VISION_RECORDS: dict[str, VisionLanguageRecord] = {}


def register_vision_record(record: VisionLanguageRecord) -> VisionLanguageRecord:
    """Add a family (keyed by every ``model_type`` it matches)."""
    for model_type in record.match:
        VISION_RECORDS[model_type] = record
    return record


register_vision_record(VisionLanguageRecord(
    "llava", ("llava",), ("LlavaForConditionalGeneration",), "vision_tower", "encoder.layers",
    "self_attn", True, _feature_layer, _assemble_llava))
register_vision_record(VisionLanguageRecord(
    "llava_next", ("llava_next",), ("LlavaNextForConditionalGeneration",), "vision_tower",
    "encoder.layers", "self_attn", True, _feature_layer, _assemble_llava_next))
register_vision_record(VisionLanguageRecord(
    "paligemma", ("paligemma",), ("PaliGemmaForConditionalGeneration",), "vision_tower", "encoder.layers",
    "self_attn", False, lambda model: _last_layer(model) - 1, _assemble_plain))
register_vision_record(VisionLanguageRecord(
    "idefics3", ("idefics3",), ("Idefics3ForConditionalGeneration",), "vision_model", "encoder.layers", "self_attn",
    False, lambda model: _last_layer(model) - 1, _assemble_idefics3))
register_vision_record(VisionLanguageRecord(
    "qwen2_vl", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), "visual", "blocks", "attn", False,
    lambda model: model.config.vision_config.depth - 1, _assemble_qwen2_vl, video_ids=("video_token_id",)))
register_vision_record(VisionLanguageRecord(
    "qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",), "visual", "blocks", "attn", False,
    _qwen_scoring_layer, _assemble_qwen2_vl, video_ids=("video_token_id",)))


def vision_record(model, method: str) -> VisionLanguageRecord:
    """The :class:`VisionLanguageRecord` of ``model``, or :class:`UnsupportedModelError` naming the families.

    Example:
        >>> vision_record(llava_model, "fastv").name                 # doctest: +SKIP
        'llava'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    record = VISION_RECORDS.get(model_type)
    if record is None:
        families = ", ".join(sorted({e for r in VISION_RECORDS.values() for e in r.examples}))
        raise UnsupportedModelError(f"{method}: {type(model).__name__} (model_type {model_type!r}) is not a supported "
                                    f"vision-language model; {method} supports {families}")
    return record


def inner_model(model):
    """The multimodal base model holding the tower and the language model (``model.model`` of the
    ``...ForConditionalGeneration`` classes, or the model itself)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "get_image_features") else model


__all__ = ["VISION_RECORDS", "TowerTokens", "VisionLanguageRecord", "inner_model", "register_vision_record",
           "vision_record"]
