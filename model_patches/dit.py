"""DiT denoisers: ``transformer_blocks`` of ``BasicTransformerBlock``; self-attention ``attn1`` over
(H/patch)x(W/patch) image tokens (the block's first argument ``hidden_states``), feed-forward ``ff``;
class-conditional, so no cross-attention.

The latent is the first argument of ``forward`` (``hidden_states``) and the patch size is
``config.patch_size``; every block attends over the same patch grid, which diffusion reducers treat
as level 1 (the finest grid), so ``max_downsample`` never switches a DiT block off.
"""

from . import ModelAdapter, register_adapter
from .diffusion_blocks import BASIC_TRANSFORMER_BLOCK, DenoiserLayout, register_denoiser_layout

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
register_denoiser_layout(DenoiserLayout(adapter="dit", blocks=(BASIC_TRANSFORMER_BLOCK,)))
