"""Stable Diffusion UNets (SD 1.x/2.x, SDXL): ``BasicTransformerBlock`` lists named ``transformer_blocks`` at
every resolution level; self-attention is ``attn1`` (``attn2`` is cross-attention to the text, ``ff`` the
feed-forward), and the image tokens are the block's first argument ``hidden_states``.

The latent is the first argument of ``forward`` (``sample``); the token grid of a level is the latent
halved once per downsampler. At run time diffusion reducers find a block's level from its token
count; the static level of every block (:func:`unet_block_level`, from the model's down/up
samplers) lets ``apply`` reject a ``max_downsample`` that would reduce nothing: SD 1.5 has
self-attention at levels 1, 2 and 4 (8 is the attention-free bottom), SDXL only at levels 2 and 4.
"""

from . import ModelAdapter, register_adapter
from .diffusion_blocks import BASIC_TRANSFORMER_BLOCK, DenoiserLayout, register_denoiser_layout


def _downsampler_count(blocks) -> int:
    return sum(getattr(block, "downsamplers", None) is not None for block in blocks)


def _upsampler_count(blocks) -> int:
    return sum(getattr(block, "upsamplers", None) is not None for block in blocks)


def unet_block_level(unet, block_name: str) -> int:
    """The resolution level (1, 2, 4, ...) of a block of a ``UNet2DConditionModel``, from its qualified name.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> from hf_tokred.model_patches.unet import unet_block_level
        >>> unet = UNet2DConditionModel(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        ...                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1)
        >>> unet_block_level(unet, "down_blocks.0.attentions.0.transformer_blocks.0"), unet_block_level(unet, "mid_block.attentions.0.transformer_blocks.0")
        (1, 2)
    """
    part, _, rest = block_name.partition(".")
    bottom = 2 ** _downsampler_count(unet.down_blocks)
    if part == "down_blocks":
        index = int(rest.split(".", 1)[0])
        return 2 ** _downsampler_count(unet.down_blocks[:index])
    if part == "up_blocks":
        index = int(rest.split(".", 1)[0])
        return bottom // 2 ** _upsampler_count(unet.up_blocks[:index])
    return bottom


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
register_denoiser_layout(
    DenoiserLayout(adapter="unet2d_condition", blocks=(BASIC_TRANSFORMER_BLOCK,), level_of=unet_block_level)
)
