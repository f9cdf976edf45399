"""DiT denoisers: ``transformer_blocks`` of ``BasicTransformerBlock``; self-attention ``attn1`` over
(H/patch)x(W/patch) image tokens.

The latent is the first argument of ``forward`` (``hidden_states``) and the patch size is
``config.patch_size``; every block attends over the same patch grid, which diffusion reducers treat
as level 1 (the finest grid), so ``max_downsample`` never switches a DiT block off.
"""

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
