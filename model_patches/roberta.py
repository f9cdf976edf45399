"""RoBERTa and XLM-RoBERTa encoders (``RobertaModel``, ``XLMRobertaModel`` and their heads): the BERT layout.

Blocks in ``encoder.layer``; ``RobertaSelfAttention`` (``attention.self``) calls transformers' attention
interface in 5.23, so observers attach there. Post-norm blocks: ``RobertaAttention`` (``attention``) returns
the post-attention residual stream after its LayerNorm, and the feed-forward part reads only that, so reducers
shorten the sequence at that module's output. ``<s>`` (index 0, RoBERTa's ``[CLS]``) is protected and ranks the
other tokens; ``RobertaForSequenceClassification`` reads it (``features[:, 0]``).

Position ids are derived from ``input_ids`` (``padding_idx + 1`` onwards, padding keeps ``padding_idx``), so a
left- or right-padded row gets the positions it has alone. Per-token heads (``ForMaskedLM``,
``ForTokenClassification``) need ``restore_length=True``.
"""

from . import register_adapter
from .encoder import EncoderAdapter

register_adapter(
    EncoderAdapter(
        name="roberta",
        kind="encoder",
        match=("roberta", "xlm-roberta"),
        layers="encoder.layer",
        attention="attention.self",
        protected_tokens=1,
        class_tokens=1,
        attention_output="attention",
        stream_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        pooling="cls",
        examples=("RobertaModel", "RobertaForSequenceClassification", "XLMRobertaModel",
                  "XLMRobertaForSequenceClassification"),
    )
)
