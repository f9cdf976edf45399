"""Stable Diffusion 3 / 3.5 denoisers: ``transformer_blocks`` of ``JointTransformerBlock``.

The image tokens are the block's first argument ``hidden_states``; the text tokens
(``encoder_hidden_states``) have their own stream. Self-attention ``attn`` is *joint*: it takes the
image tokens as ``hidden_states`` and the text as ``encoder_hidden_states``, attends over both, and
returns ``(image, text)``; SD3.5's dual-attention blocks add ``attn2``, a plain self-attention over the
image tokens. There is no cross-attention; ``ff`` is the image feed-forward (``ff_context`` the text's).

The latent is the first argument of ``forward`` (``hidden_states``, 4-D) and the patch size is
``config.patch_size``; every block sits on that one grid (level 1).
"""

from . import ModelAdapter, register_adapter
from .diffusion_blocks import BlockLayout, DenoiserLayout, register_denoiser_layout

register_adapter(
    ModelAdapter(
        name="sd3",
        kind="dit",
        library="diffusers",
        match=("SD3Transformer2DModel",),
        layers="transformer_blocks",
        attention="attn",
        examples=("SD3Transformer2DModel",),
    )
)
register_denoiser_layout(
    DenoiserLayout(
        adapter="sd3",
        blocks=(
            BlockLayout(
                block_class="JointTransformerBlock",
                self_attention=("attn", "attn2"),
                joint_attention=True,
                cross_attention=(),
                feed_forward=("ff",),
            ),
        ),
    )
)
