"""CLIP vision towers: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPForImageClassification``
and the vision tower of ``CLIPModel``. The blocks are ``encoder.layers`` of the vision model (``CLIPEncoderLayer``,
attention ``self_attn``): ``encoder.layers`` in ``CLIPVisionModel`` (model type ``clip_vision_model``),
``vision_model.encoder.layers`` in ``CLIPModel``/``CLIPForImageClassification`` (model type ``clip``), whose
text tower (``text_model.encoder.layers``) is not matched and stays dense. The class embedding (index 0) is protected and ranks the other tokens.

Pre-norm block: ``layer_norm2`` receives the post-attention residual stream, ``mlp`` ends the MLP branch.
``CLIPForImageClassification`` mean-pools the patch tokens: with a merging reducer use ``restore_length=True``
for a size-correct mean.
"""

from . import register_adapter
from .encoder import EncoderAdapter

_COMMON = dict(kind="encoder", attention="self_attn", mlp_input="layer_norm2", mlp_output="mlp", pooling="cls")

# The vision model on its own (transformers 5.23 flattens it: blocks at ``encoder.layers``).
register_adapter(
    EncoderAdapter(
        name="clip_vision",
        match=("clip_vision_model",),
        layers="encoder.layers",
        protected_tokens=1,
        class_tokens=1,
        examples=("CLIPVisionModel", "CLIPVisionModelWithProjection"),
        **_COMMON,
    )
)
# The dual-encoder model and the classifier: only the vision tower (``vision_model``) is reduced; the text
# tower's blocks (``text_model.encoder.layers``) do not match and stay dense.
register_adapter(
    EncoderAdapter(
        name="clip",
        match=("clip",),
        layers="vision_model.encoder.layers",
        protected_tokens=1,
        class_tokens=1,
        examples=("CLIPModel (vision tower)", "CLIPForImageClassification"),
        **_COMMON,
    )
)
