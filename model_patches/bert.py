"""BERT encoders: blocks in ``encoder.layer``; ``[CLS]`` (index 0) is protected.

The attention module is ``BertLayer.attention.self`` (``BertSelfAttention``): that is the module that calls
transformers' attention interface, so observers (keys for ToMe's metric) attach there, not to the
``BertAttention`` wrapper. The path is dotted: resolve it with ``block.get_submodule(adapter.attention)``.
"""

from . import ModelAdapter, register_adapter

register_adapter(
    ModelAdapter(
        name="bert",
        kind="encoder",
        match=("bert",),
        layers="encoder.layer",
        attention="attention.self",
        protected_tokens=1,
        examples=("BertModel", "BertForSequenceClassification"),
    )
)
