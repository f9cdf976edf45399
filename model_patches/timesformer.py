"""TimeSformer encoders (``TimesformerModel``, ``TimesformerForVideoClassification``).

Blocks in ``encoder.layer`` (``TimesformerLayer``). A CLS token (index 0, protected) is followed by the patch
tokens of every frame, ordered with the frame index varying fastest: token ``1 + (h * W + w) * T + t``.
With the default divided space-time attention each block reshapes the patch tokens by frames
(``config.num_frames``) and by rows of ``image_size // patch_size`` tokens, runs temporal attention across
frames and spatial attention within each frame (the CLS token copied into every frame), so a reduction must
keep the same number of tokens in every frame, a multiple of the row width.

The attention is TimeSformer's own (it does not call transformers' attention interface), so the generic
sequence reducers (ToMe, EViT, ...) are refused with that reason; TokenLearner, which replaces the patch
tokens of each frame by the same number of learned tokens and needs no attention statistics, has its own
wiring (``hf_tokred/integration/tokenlearner.py``).

Example:
    >>> from transformers import TimesformerConfig, TimesformerModel
    >>> from hf_tokred.model_patches import find_adapter
    >>> model = TimesformerModel(TimesformerConfig(image_size=16, patch_size=8, num_frames=2, hidden_size=32,
    ...                                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    >>> adapter = find_adapter(model)
    >>> adapter.name, adapter.frame_major, adapter.grid_width(model)
    ('timesformer', False, 2)
"""

from . import register_adapter
from .videomae import VideoEncoderAdapter

TIMESFORMER = VideoEncoderAdapter(
    name="timesformer",
    kind="encoder",
    match=("timesformer",),
    layers="encoder.layer",
    attention="attention",
    protected_tokens=1,
    class_tokens=1,
    pooling="cls",
    frame_major=False,
    row_multiple=True,
    uses_attention_interface=False,
    unsupported=("its divided space-time attention reshapes the sequence by frames and rows and does not go through "
                 "transformers' attention interface; of the sequence reducers only tokenlearner (per frame) supports it"),
    examples=("TimesformerModel", "TimesformerForVideoClassification"),
)
register_adapter(TIMESFORMER)
