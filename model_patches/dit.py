"""DiT denoisers: ``transformer_blocks`` of ``BasicTransformerBlock``; self-attention ``attn1`` over
(H/patch)x(W/patch) image tokens."""

from . import ModelAdapter, register_adapter

register_adapter(
    ModelAdapter(
        name="dit",
        kind="dit",
        library="diffusers",
        match=("DiTTransformer2DModel",),
        layers="transformer_blocks",
        attention="attn1",
        examples=("DiTTransformer2DModel",),
    )
)
