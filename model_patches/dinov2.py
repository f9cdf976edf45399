"""DINOv2 encoders: ``Dinov2Model`` and ``Dinov2ForImageClassification`` (blocks ``encoder.layer``, attention
``Dinov2Layer.attention``), and ``Dinov2WithRegistersModel``, whose register tokens follow the CLS token and are
protected too (``config.num_register_tokens``). Only the CLS token ranks the other tokens.

Pre-norm block with layer scale: ``norm2`` receives the post-attention residual stream and ``layer_scale2``
ends the MLP branch. ``Dinov2ForImageClassification`` concatenates CLS with the mean of the patch tokens: with
a merging reducer use ``restore_length=True`` for a size-correct mean. ``Dinov2Backbone`` reshapes every hidden
state into a patch grid and cannot take a shortened sequence.
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="dinov2",
        kind="encoder",
        match=("dinov2", "dinov2_with_registers"),
        layers="encoder.layer",
        attention="attention",
        protected_tokens=1,
        class_tokens=1,
        extra_protected="num_register_tokens",
        mlp_input="norm2",
        mlp_output="layer_scale2",
        pooling="cls",
        examples=("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel"),
    )
)
