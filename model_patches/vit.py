"""ViT encoders (transformers 5.x): blocks in ``vit.layers`` (``ViTModel.layers``; 4.x had ``encoder.layer``),
attention ``ViTLayer.attention`` (``ViTAttention``, which calls transformers' attention interface itself);
the CLS token (index 0) is protected and ranks the other tokens.

Pre-norm block: ``layernorm_after`` receives the post-attention residual stream and ``mlp`` ends the MLP
branch, so sequence reducers shorten the sequence between attention and MLP (see ``model_patches.encoder``).
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="vit",
        kind="encoder",
        match=("vit",),
        layers="layers",
        attention="attention",
        protected_tokens=1,
        class_tokens=1,
        mlp_input="layernorm_after",
        mlp_output="mlp",
        pooling="cls",
        examples=("ViTModel", "ViTForImageClassification"),
    )
)
