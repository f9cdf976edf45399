"""Stable Diffusion UNets: ``BasicTransformerBlock`` lists named ``transformer_blocks`` at every resolution
level; self-attention is ``attn1`` (``attn2`` is cross-attention to the text)."""

from . import ModelAdapter, register_adapter

register_adapter(
    ModelAdapter(
        name="unet2d_condition",
        kind="unet",
        library="diffusers",
        match=("UNet2DConditionModel",),
        layers="transformer_blocks",
        attention="attn1",
        examples=("UNet2DConditionModel",),
    )
)
