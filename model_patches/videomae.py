"""VideoMAE encoders (``VideoMAEModel``, ``VideoMAEForVideoClassification``), and the video adapter record.

Blocks in ``encoder.layer`` (``VideoMAELayer``, attention ``attention.attention``, which calls transformers' attention
interface with no mask: the mask of a shortened sequence goes to hf_tokred's attention function through an
observer, ``mask_route="attention"``). There is no class token: every token is a space-time patch (a tube of ``tubelet_size`` frames by
``patch_size`` pixels), laid out frame-major: token ``t * (H * W) + h * W + w`` (``t`` over
``num_frames // tubelet_size`` tube slots). The classifier mean-pools the last hidden state.

The block is pre-norm, but its MLP output module (``VideoMAEOutput``) adds the residual itself, so no module
ends the MLP branch alone: sequence reducers (ToMe, EViT, ...) act at the block's output, as on BEiT.

:class:`VideoEncoderAdapter` says how the tokens of a video encoder are laid out by frame, for methods that
act per frame (TokenLearner): ``frame_major`` (VideoMAE: the frames follow each other) or not (TimeSformer:
the frame index varies fastest), and a ``row_multiple`` the per-frame token count must keep (TimeSformer
reshapes each frame into rows of ``image_size // patch_size`` tokens).

Example:
    >>> from transformers import VideoMAEConfig, VideoMAEModel
    >>> from hf_tokred.model_patches import find_adapter
    >>> model = VideoMAEModel(VideoMAEConfig(image_size=16, patch_size=8, num_frames=4, hidden_size=32,
    ...                                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    >>> adapter = find_adapter(model)
    >>> adapter.name, adapter.frame_tokens(model), adapter.frame_major
    ('videomae', 4, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_adapter
from .encoder import EncoderAdapter


def _vision_config(model):
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) or config


@dataclass(frozen=True)
class VideoEncoderAdapter(EncoderAdapter):
    """:class:`EncoderAdapter` of a video encoder, with the frame layout of its patch tokens.

    Attributes (besides those of :class:`EncoderAdapter`):
        frame_major: the patch tokens are ordered frame by frame (``(T, H*W)``); False when the frame index
            varies fastest (``(H*W, T)``, TimeSformer).
        row_multiple: whether a per-frame token count must stay a multiple of the patch-grid width (the
            blocks reshape each frame into rows of that width).
        uses_attention_interface: the blocks' attention calls transformers' attention interface (False for
            TimeSformer: ``apply`` then leaves the attention implementation alone).
        mask_route: how the mask of a shortened sequence reaches the attention (see ``model_patches.blip``):
            ``"attention"``, through an observer of hf_tokred's attention function (VideoMAE's attention calls the
            interface with ``attention_mask=None`` and its blocks take no mask argument).
    """

    frame_major: bool = True
    row_multiple: bool = False
    uses_attention_interface: bool = True
    mask_route: str = "attention"

    def frame_tokens(self, model) -> int:
        """Patch tokens of one frame (one tube slot for VideoMAE): ``(image_size // patch_size) ** 2``."""
        config = _vision_config(model)
        return (config.image_size // config.patch_size) ** 2

    def grid_width(self, model) -> int:
        """Patch tokens per row of a frame: ``image_size // patch_size``."""
        config = _vision_config(model)
        return config.image_size // config.patch_size

    def by_frame(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        """``(B, T * P, C)`` patch tokens in the model's order -> ``(B, T, P, C)``.

        Example:
            >>> import torch
            >>> VIDEOMAE.by_frame(torch.arange(6.0).view(1, 6, 1), 2)[0, :, :, 0].tolist()
            [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        """
        batch, _, channels = tokens.shape
        if self.frame_major:
            return tokens.reshape(batch, frames, -1, channels)
        return tokens.reshape(batch, -1, frames, channels).transpose(1, 2)

    def from_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, P, C)`` -> ``(B, T * P, C)`` in the model's order (the inverse of :meth:`by_frame`)."""
        batch, frames, per_frame, channels = tokens.shape
        if self.frame_major:
            return tokens.reshape(batch, frames * per_frame, channels)
        return tokens.transpose(1, 2).reshape(batch, frames * per_frame, channels)


VIDEOMAE = VideoEncoderAdapter(
    name="videomae",
    kind="encoder",
    match=("videomae",),
    layers="encoder.layer",
    attention="attention.attention",
    protected_tokens=0,
    class_tokens=0,
    pooling="mean",
    frame_major=True,
    examples=("VideoMAEModel", "VideoMAEForVideoClassification"),
)
register_adapter(VIDEOMAE)
