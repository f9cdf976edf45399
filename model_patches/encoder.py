"""The adapter record of bidirectional encoders (ViT, DeiT, CLIP and SigLIP vision towers, DINOv2, BERT).

An encoder adapter says, besides where the blocks and their attention are, *where inside a block* a
sequence reducer may shorten the sequence, by naming modules whose inputs or outputs carry the
residual stream, so that the reduction is installed with hooks and no ``forward`` is ever copied:

* pre-norm blocks (ViT, DeiT, CLIP, SigLIP, DINOv2: ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``)
  name ``mlp_input`` (the module whose *input* is ``h``: ``norm2``) and ``mlp_output`` (the module whose
  *output* ends the MLP branch before the residual add). The reducer shortens ``h`` at ``mlp_input``, so
  the MLP runs on the reduced tokens, as in the ToMe paper (merge between attention and MLP);
* post-norm blocks (BERT: ``h = norm1(x + attn(x)); out = norm2(h + mlp(h))``) name ``attention_output``
  (the module whose *output* is ``h``): shortening it there shortens the rest of the block.

Without either, reducers act at the block's output.

Example:
    >>> from hf_tokred.model_patches.encoder import EncoderAdapter
    >>> a = EncoderAdapter(name="demo", kind="encoder", match=("demo",), protected_tokens=1, class_tokens=1,
    ...                    mlp_input="norm2", mlp_output="mlp")
    >>> a.reduce_point
    'mlp'
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ModelAdapter


@dataclass(frozen=True)
class EncoderAdapter(ModelAdapter):
    """:class:`ModelAdapter` of an encoder, with the hook points sequence reducers use.

    Attributes (besides those of :class:`ModelAdapter`):
        class_tokens: leading tokens whose attention rows rank the other tokens ("CLS attention"):
            1 for a CLS token, 2 for DeiT's CLS and distillation tokens, 0 without a class token (SigLIP).
        extra_protected: name of a config attribute adding protected tokens after the class tokens
            (register tokens), or None.
        mlp_input: dotted path, inside a block, of the module whose input is the post-attention residual
            stream and starts the MLP branch (pre-norm blocks), or None.
        mlp_output: dotted path of the module whose output ends the MLP branch (pre-norm blocks), or None.
        attention_output: dotted path of the module whose output is the post-attention residual stream
            (post-norm blocks, e.g. ``BertAttention``), or None.
        pooling: how the model's heads read the last hidden state, for the docs and error messages
            (``"cls"``, ``"mean"``, ``"attention"``).
    """

    class_tokens: int = 1
    extra_protected: str | None = None
    mlp_input: str | None = None
    mlp_output: str | None = None
    attention_output: str | None = None
    pooling: str = "cls"

    def __post_init__(self):
        super().__post_init__()
        if (self.mlp_input is None) != (self.mlp_output is None):
            raise ValueError("EncoderAdapter: mlp_input and mlp_output go together")
        if self.mlp_input is not None and self.attention_output is not None:
            raise ValueError("EncoderAdapter: give mlp_input/mlp_output (pre-norm) or attention_output (post-norm)")
        if self.class_tokens > self.protected_tokens:
            raise ValueError("EncoderAdapter: class tokens are protected tokens (class_tokens <= protected_tokens)")

    @property
    def reduce_point(self) -> str:
        """``"mlp"`` (pre-norm), ``"attention_output"`` (post-norm) or ``"block_output"``."""
        if self.mlp_input is not None:
            return "mlp"
        if self.attention_output is not None:
            return "attention_output"
        return "block_output"

    def protected(self, model) -> int:
        """Leading tokens never reduced in ``model`` (class tokens plus e.g. register tokens)."""
        extra = 0
        if self.extra_protected is not None:
            config = getattr(model, "config", None)
            for holder in (config, getattr(config, "vision_config", None)):
                value = getattr(holder, self.extra_protected, None)
                if isinstance(value, int):
                    extra = value
                    break
        return self.protected_tokens + extra
