"""SigLIP vision towers: ``SiglipVisionModel``, ``SiglipForImageClassification`` and the vision tower of
``SiglipModel``; blocks ``encoder.layers`` of the vision model (``SiglipEncoderLayer``, attention ``self_attn``).

SigLIP has **no CLS token**: nothing is protected, and methods that rank tokens by CLS attention (EViT, ATS,
TPS) use the fallback documented in ``docs/encoders.md``: the attention each token *receives*, averaged over
heads and over every real query. The attention-pooling head reads all tokens (and ``SiglipForImageClassification``
mean-pools): with a merging reducer use ``restore_length=True`` when pooling must weigh input patches equally.
"""

from . import register_adapter
from .encoder import EncoderAdapter

_COMMON = dict(kind="encoder", attention="self_attn", mlp_input="layer_norm2", mlp_output="mlp", pooling="attention")

# The vision model on its own (transformers 5.23 flattens it: blocks at ``encoder.layers``).
register_adapter(
    EncoderAdapter(
        name="siglip_vision",
        match=("siglip_vision_model",),
        layers="encoder.layers",
        protected_tokens=0,
        class_tokens=0,
        examples=("SiglipVisionModel",),
        **_COMMON,
    )
)
# The dual-encoder model and the classifier: only the vision tower (``vision_model``) is reduced; the text
# tower's blocks (``text_model.encoder.layers``) do not match and stay dense.
register_adapter(
    EncoderAdapter(
        name="siglip",
        match=("siglip",),
        layers="vision_model.encoder.layers",
        protected_tokens=0,
        class_tokens=0,
        examples=("SiglipModel (vision tower)", "SiglipForImageClassification"),
        **_COMMON,
    )
)
