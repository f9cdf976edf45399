"""ViT encoders (transformers 5.x): blocks in ``vit.layers`` (``ViTModel.layers``; 4.x had ``encoder.layer``),
attention ``ViTLayer.attention`` (``ViTAttention``, which calls transformers' attention interface itself);
the CLS token (index 0) is protected."""

from . import ModelAdapter, register_adapter

register_adapter(
    ModelAdapter(
        name="vit",
        kind="encoder",
        match=("vit",),
        layers="layers",
        attention="attention",
        protected_tokens=1,
        examples=("ViTModel", "ViTForImageClassification"),
    )
)
