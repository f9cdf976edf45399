"""PixArt-alpha/sigma denoisers: ``transformer_blocks`` of ``BasicTransformerBlock`` with ``norm_type``
``"ada_norm_single"``; self-attention ``attn1`` over the (H/patch)x(W/patch) image tokens (the block's first
argument ``hidden_states``), cross-attention ``attn2`` to the T5 text, feed-forward ``ff``.

The latent is the first argument of ``forward`` (``hidden_states``, 4-D) and the patch size is
``config.patch_size``; every block sits on that one grid (level 1).
"""

from . import ModelAdapter, register_adapter
from .diffusion_blocks import BASIC_TRANSFORMER_BLOCK, DenoiserLayout, register_denoiser_layout

register_adapter(
    ModelAdapter(
        name="pixart",
        kind="dit",
        library="diffusers",
        match=("PixArtTransformer2DModel",),
        layers="transformer_blocks",
        attention="attn1",
        examples=("PixArtTransformer2DModel",),
    )
)
register_denoiser_layout(DenoiserLayout(adapter="pixart", blocks=(BASIC_TRANSFORMER_BLOCK,)))
