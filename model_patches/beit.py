"""BEiT encoders (``BeitModel``, ``BeitForImageClassification``): blocks ``layers``, attention
``BeitLayer.attention`` (``BeitAttention``, which calls transformers' attention interface in 5.23).
The CLS token (index 0) is protected and ranks the other tokens.

**Relative position bias.** BEiT adds to the attention logits a bias indexed by the 2-D offset between
patches (and three learned entries for CLS), built on the patch grid at the input length:

* per block (``use_relative_position_bias``): ``BeitLayer.relative_position_bias`` returns ``(1, heads, N, N)``
  and the block adds it to its mask: declared as ``position_bias``, its rows and columns are gathered at the
  current tokens' anchors (``dim_size``, the length it is built for, is kept at the input length);
* shared (``use_shared_relative_position_bias``): ``BeitModel`` adds it to the mask it passes to every block;
  the wiring recognises a mask carrying a bias and gathers it the same way.

So a kept token keeps its exact grid offsets to every other kept token; a merged token takes its anchor's
(the patch the others were merged into).

The block ends ``h + drop_path(lambda_2 * dropout(mlp(layernorm_after(h))))``: ``lambda_2`` is a bare parameter
and ``dropout``/``drop_path`` are shared with the attention branch, so no module marks the end of the MLP
branch and reducers act at the block output (the MLP of a reducing block runs on its input tokens).

``use_mean_pooling`` (the default) averages the patch tokens: with a merging reducer use
``restore_length=True`` for a size-correct mean. ``BeitForSemanticSegmentation`` and ``BeitBackbone`` read
several blocks' hidden states as patch grids and are refused; ``BeitForMaskedImageModeling`` predicts per
patch and needs ``restore_length=True``.
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="beit",
        kind="encoder",
        match=("beit",),
        layers="layers",
        attention="attention",
        protected_tokens=1,
        class_tokens=1,
        pooling="mean",
        position_bias="relative_position_bias",
        position_bias_length="dim_size",
        examples=("BeitModel", "BeitForImageClassification"),
    )
)
