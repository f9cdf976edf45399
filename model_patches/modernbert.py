"""ModernBERT encoders (``ModernBertModel``, ``ModernBertForSequenceClassification``, ...).

In transformers 5.23 ``ModernBertAttention`` (the block's ``attn``) calls the attention interface (the old
unpadding path is gone: flash attention also goes through the interface), so sequence reducers apply.
Blocks in ``layers``; ``[CLS]`` (index 0) is protected and ranks the other tokens.

Pre-norm block: ``h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))``: reducers shorten ``h`` at the
input of ``mlp_norm`` and the MLP runs on the reduced tokens.

Two things depend on a token's position and are computed once, at the input length, for all blocks:

* rotary embeddings: ``position_embeddings`` (``(cos, sin)``, per layer type) are passed to every block;
* local attention: blocks of type ``"sliding_attention"`` get a mask letting token ``i`` see token ``j`` only
  when ``|i - j| <= config.sliding_window`` (half of ``local_attention``).

Once tokens are merged or dropped, a position is no longer an index into the sequence. **What we chose:**
every token keeps the position of its *anchor* (the token it was kept as, or that the others were merged
into): its rotary embedding is the anchor's (``position_inputs``), and the local window is measured between
anchors (the wiring gathers the model's own window mask at the anchors). For pruning methods this is
exact: a kept token sits where it was and sees the kept tokens of its original window. For merging methods a
merged token stands at its anchor's position and its window is its anchor's, though it also carries tokens
from elsewhere (ToMe matches by similarity, not locality); global blocks are unaffected. Averaging positions
instead would give fractional rotary angles and windows no token pair of the input had.

``classifier_pooling="mean"`` heads average the last hidden state with the *input* attention mask, which a
shortened sequence does not fit: they need ``restore_length=True`` (then the mean is size-correct).
"""

from . import register_adapter
from .encoder import EncoderAdapter


def _mean_pooling_needs_restore(model, reducer) -> str | None:
    """Refuse mean-pooling heads without ``restore_length`` (they multiply by the input-length mask)."""
    config = getattr(model, "config", None)
    if getattr(config, "classifier_pooling", "cls") != "mean" or type(model).__name__ == "ModernBertModel":
        return None
    if getattr(reducer, "restore_length", False):
        return None
    return (f"{reducer.method} shortens the sequence; {type(model).__name__} with classifier_pooling='mean' averages "
            "the last hidden state with the input-length attention_mask: pass restore_length=True (a size-correct "
            "mean over the input tokens), or use classifier_pooling='cls'")


register_adapter(
    EncoderAdapter(
        name="modernbert",
        kind="encoder",
        match=("modernbert",),
        layers="layers",
        attention="attn",
        protected_tokens=1,
        class_tokens=1,
        mlp_input="mlp_norm",
        mlp_output="mlp",
        pooling="cls",
        position_inputs=("position_embeddings",),
        check=_mean_pooling_needs_restore,
        examples=("ModernBertModel", "ModernBertForSequenceClassification"),
    )
)
