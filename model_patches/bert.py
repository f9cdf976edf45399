"""BERT encoders: blocks in ``encoder.layer``, attention ``BertLayer.attention``; ``[CLS]`` (index 0) is protected."""

from . import ModelAdapter, register_adapter

register_adapter(
    ModelAdapter(
        name="bert",
        kind="encoder",
        match=("bert",),
        layers="encoder.layer",
        attention="attention",
        protected_tokens=1,
        examples=("BertModel", "BertForSequenceClassification"),
    )
)
