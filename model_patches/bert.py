"""BERT encoders: blocks in ``encoder.layer``; ``[CLS]`` (index 0) is protected and ranks the other tokens.

The attention module is ``BertLayer.attention.self`` (``BertSelfAttention``): that is the module that calls
transformers' attention interface, so observers (keys for ToMe's metric) attach there, not to the
``BertAttention`` wrapper. The path is dotted: resolve it with ``block.get_submodule(adapter.attention)``.

Post-norm block: ``BertLayer.attention`` (``BertAttention``) returns the post-attention residual stream
(after its LayerNorm), and the feed-forward part reads only that, so sequence reducers shorten the
sequence at that module's output. The norms on the residual stream (``stream_norms``) are
``attention.output.LayerNorm`` and ``output.LayerNorm``: Evo-ViT's and STViT's shared updates go through them.
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="bert",
        kind="encoder",
        match=("bert",),
        layers="encoder.layer",
        attention="attention.self",
        protected_tokens=1,
        class_tokens=1,
        attention_output="attention",
        stream_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        pooling="cls",
        examples=("BertModel", "BertForSequenceClassification"),
    )
)
