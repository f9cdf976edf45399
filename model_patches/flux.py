"""FLUX.1 denoisers: ``transformer_blocks`` of ``FluxTransformerBlock`` (two streams) and
``single_transformer_blocks`` of ``FluxSingleTransformerBlock`` (one stream).

The latent is *packed*: ``hidden_states`` is ``(batch, tokens, 64)`` and the token grid comes from
``img_ids`` (one ``(0, row, column)`` row per image token), not from a 4-D latent. In both block kinds the
image tokens are the first argument ``hidden_states`` and the text is ``encoder_hidden_states``.

* ``FluxTransformerBlock.attn`` is joint attention: image tokens as ``hidden_states``, text as
  ``encoder_hidden_states``, returning ``(image, text)``; ``ff`` is the image feed-forward.
* ``FluxSingleTransformerBlock`` concatenates ``[text, image]`` itself and calls ``attn`` on that sequence;
  its MLP (``proj_mlp``) runs beside the attention on the whole sequence, so only the attention is merged.
* Both attentions take ``image_rotary_emb``, a ``(cos, sin)`` table with one row per position of
  ``[text, image]``, shared by the whole batch, and diffusers' ``FluxAttnProcessor`` applies it to queries
  and keys before calling the attention kernel on ``[text, image]``. ``tome_sd`` hands the attention the
  table rows of the tokens each batch row keeps (one attention call per batch row when the rows keep
  different tokens); ``todo`` downsamples the image keys/values at the kernel call, after the rotation
  (``kv_at_kernel``), so a kept key carries its own position's rotation.
"""

from hf_tokred.errors import UnsupportedModelError

from . import ModelAdapter, register_adapter
from .diffusion_blocks import BlockLayout, DenoiserLayout, register_denoiser_layout


def flux_token_grid(model, args: tuple, kwargs: dict) -> tuple[int, int]:
    """``(height, width)`` of the packed image tokens of a Flux call, from ``img_ids``.

    Example:
        >>> import torch
        >>> from hf_tokred.model_patches.flux import flux_token_grid
        >>> rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
        >>> ids = torch.stack([torch.zeros(12), rows.flatten(), cols.flatten()], dim=-1)
        >>> flux_token_grid(None, (torch.zeros(1, 12, 64),), {"img_ids": ids})
        (3, 4)
    """
    ids = kwargs.get("img_ids")
    if ids is None:
        raise ValueError("Flux: img_ids is needed to know the token grid")
    if ids.ndim == 3:  # deprecated batched ids: every row is the same
        ids = ids[0]
    rows, cols = ids[:, 1], ids[:, 2]
    height = int(rows.max() - rows.min()) + 1
    width = int(cols.max() - cols.min()) + 1
    if height * width != ids.shape[0]:
        # e.g. Flux Kontext appends reference-image tokens whose ids overlap the target grid
        raise UnsupportedModelError(
            f"Flux: the {ids.shape[0]} rows of img_ids are not one {height}x{width} token grid (reference-image "
            "tokens, as in Flux Kontext, are not supported by the token reductions)"
        )
    return height, width


FLUX_PROCESSORS = ("FluxAttnProcessor",)

register_adapter(
    ModelAdapter(
        name="flux",
        kind="dit",
        library="diffusers",
        match=("FluxTransformer2DModel",),
        layers="transformer_blocks",
        attention="attn",
        examples=("FluxTransformer2DModel",),
    )
)
register_denoiser_layout(
    DenoiserLayout(
        adapter="flux",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        grid_of=flux_token_grid,
        blocks=(
            BlockLayout(
                block_class="FluxTransformerBlock",
                self_attention=("attn",),
                joint_attention=True,
                cross_attention=(),
                feed_forward=("ff",),
                rotary_argument="image_rotary_emb",
                attention_processors=FLUX_PROCESSORS,
                kv_at_kernel=True,
            ),
            BlockLayout(
                block_class="FluxSingleTransformerBlock",
                self_attention=("attn",),
                cross_attention=(),
                feed_forward=(),
                rotary_argument="image_rotary_emb",
                text_prefix="encoder_hidden_states",
                attention_processors=FLUX_PROCESSORS,
                kv_at_kernel=True,
            ),
        ),
    )
)
