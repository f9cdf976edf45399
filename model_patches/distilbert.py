"""DistilBERT encoders (``DistilBertModel``, ``DistilBertForSequenceClassification``, ...).

Blocks in ``transformer.layer`` (``TransformerBlock``); the attention module is the block's ``attention``
(``DistilBertSelfAttention``), which calls transformers' attention interface in 5.23. ``[CLS]`` (index 0) is
protected and ranks the other tokens; the classification head reads it (``hidden_state[:, 0]``).

Post-norm block: ``h = sa_layer_norm(attention(x) + x); out = output_layer_norm(ffn(h) + h)``. The attention
module returns only its branch (before the residual add), so the post-attention residual stream is the
*output of* ``sa_layer_norm``: reducers shorten the sequence there and the feed-forward part runs on the
reduced tokens. Absolute position embeddings are added once, before the blocks.
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="distilbert",
        kind="encoder",
        match=("distilbert",),
        layers="transformer.layer",
        attention="attention",
        protected_tokens=1,
        class_tokens=1,
        attention_output="sa_layer_norm",
        stream_norms=("sa_layer_norm", "output_layer_norm"),
        pooling="cls",
        examples=("DistilBertModel", "DistilBertForSequenceClassification"),
    )
)
