"""Data2VecVision (``Data2VecVisionModel``, ``Data2VecVisionForImageClassification``): refused.

Registered only so that the refusal says why. In transformers 5.23 its attention
(``Data2VecVisionSelfAttention`` / ``Data2VecVisionSdpaSelfAttention``, in ``encoder.layer[i].attention.attention``)
computes the softmax or calls ``torch.nn.functional.scaled_dot_product_attention`` itself instead of going
through transformers' attention interface (the model class does not set ``_supports_attention_backend``, and
``set_attn_implementation`` leaves it unchanged). hf_tokred therefore cannot read the keys or the CLS attention
that the reducers rank tokens by, nor hand a block the mask of a shortened sequence; and its relative position
bias is added inside that attention at the input grid's size. BEiT, whose attention goes through the interface,
is supported.
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="data2vec_vision",
        kind="encoder",
        match=("data2vec-vision",),
        layers="encoder.layer",
        attention="attention.attention",
        protected_tokens=1,
        class_tokens=1,
        pooling="mean",
        unsupported=(
            "Data2VecVision's attention (Data2VecVisionSelfAttention / Data2VecVisionSdpaSelfAttention) computes "
            "attention itself instead of calling transformers' attention interface (transformers 5.23), so hf_tokred "
            "can neither read the keys and CLS attention that sequence reducers rank tokens by nor give a block the "
            "mask and relative position bias of a shortened sequence; BEiT (BeitModel, BeitForImageClassification) "
            "is supported"
        ),
        examples=("Data2VecVisionModel (refused: attention outside the attention interface)",),
    )
)
