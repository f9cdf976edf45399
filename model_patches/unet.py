"""Stable Diffusion UNets (SD 1.x/2.x, SDXL): ``BasicTransformerBlock`` lists named ``transformer_blocks`` at
every resolution level; self-attention is ``attn1`` (``attn2`` is cross-attention to the text).

The latent is the first argument of ``forward`` (``sample``); the token grid of a level is the latent
halved once per downsampler, so diffusion reducers find a block's level from its token count and need
no per-block table here.
"""

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
