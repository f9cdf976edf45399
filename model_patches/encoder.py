"""The adapter record of bidirectional encoders (ViT, DeiT, CLIP and SigLIP vision towers, DINOv2, BEiT, BERT,
RoBERTa/XLM-R, DistilBERT, ModernBERT).

An encoder adapter says, besides where the blocks and their attention are, *where inside a block* a
sequence reducer may shorten the sequence, by naming modules whose inputs or outputs carry the
residual stream, so that the reduction is installed with hooks and no ``forward`` is ever copied:

* pre-norm blocks (ViT, DeiT, CLIP, SigLIP, DINOv2, ModernBERT:
  ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``)
  name ``mlp_input`` (the module whose *input* is ``h``: ``norm2``) and ``mlp_output`` (the module whose
  *output* ends the MLP branch before the residual add). The reducer shortens ``h`` at ``mlp_input``, so
  the MLP runs on the reduced tokens, as in the ToMe paper (merge between attention and MLP);
* post-norm blocks (BERT, RoBERTa/XLM-R, DistilBERT: ``h = norm1(x + attn(x)); out = norm2(h + mlp(h))``)
  name ``attention_output`` (the module whose *output* is ``h``): shortening it there shortens the rest of the block.

Without either, reducers act at the block's output (BEiT: its MLP branch ends in a bare layer-scale
parameter and in dropout/drop-path modules shared with the attention branch, so no module marks its end).

Architectures whose attention depends on *where* a token is, through something other than the hidden
states, say so, so that the wiring can make it follow the reduction. Every current token has an
*anchor*: the input position of the token that anchors its slot (a kept token's own position; for a
merged token, the position of the token the others were merged into). Position-dependent inputs are
read at the anchors:

* ``position_inputs``: keyword arguments of a block carrying per-token tensors (ModernBERT's rotary
  ``position_embeddings``, a ``(cos, sin)`` pair computed once at the input length) are gathered at the
  anchors;
* ``position_bias``: a module inside a block whose output is an attention bias over input positions
  (BEiT's per-block ``relative_position_bias``, ``(1, heads, N, N)``) has its rows and columns gathered
  at the anchors; ``position_bias_length`` names its keyword argument giving the length it is built for,
  which is kept at the input length;
* the attention mask the model passes to a block, when it is more than a key-padding mask (ModernBERT's
  local-attention window, BEiT's shared relative position bias), is gathered the same way: a reduced
  token sees what its anchor saw. No declaration is needed: the wiring recognises such masks.

``unsupported`` refuses an architecture with a stated reason (its attention does not go through
transformers' attention interface); ``check`` refuses a particular model or configuration.

Example:
    >>> from hf_tokred.model_patches.encoder import EncoderAdapter
    >>> a = EncoderAdapter(name="demo", kind="encoder", match=("demo",), protected_tokens=1, class_tokens=1,
    ...                    mlp_input="norm2", mlp_output="mlp")
    >>> a.reduce_point
    'mlp'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import ModelAdapter, register_detector


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
        stream_norms: post-norm blocks: dotted paths of the norms on the residual stream, in the order the
            block runs them (BERT: ``attention.output.LayerNorm``, ``output.LayerNorm``). A reducer that gives
            carried tokens their carrier's update (``restore_update="residual"``: Evo-ViT's fast path) adds the
            carrier's branch before each of them, as the block did for the carrier.
        position_inputs: keyword arguments of a block holding per-token positional tensors (or tuples of
            them) with the sequence on dim 1, gathered at the current tokens' anchors once the sequence changed.
        position_bias: dotted path, inside a block, of an optional module whose output is an attention bias
            ``(..., N, N)`` over input positions; its rows and columns are gathered at the anchors.
        position_bias_length: keyword argument of the ``position_bias`` module giving the sequence length
            it is built for; kept at the input length once the sequence changed.
        unsupported: why sequence reducers cannot act on this architecture (shown in the error), or None.
        check: ``check(model, reducer) -> reason or None``: refuses a particular model or configuration
            (e.g. a head that pools with the input-length attention mask) before anything is installed.
    """

    class_tokens: int = 1
    extra_protected: str | None = None
    mlp_input: str | None = None
    mlp_output: str | None = None
    attention_output: str | None = None
    pooling: str = "cls"
    stream_norms: tuple[str, ...] = ()
    position_inputs: tuple[str, ...] = ()
    position_bias: str | None = None
    position_bias_length: str | None = None
    unsupported: str | None = None
    check: Callable[[Any, Any], str | None] | None = None

    def __post_init__(self):
        super().__post_init__()
        if (self.mlp_input is None) != (self.mlp_output is None):
            raise ValueError("EncoderAdapter: mlp_input and mlp_output go together")
        if self.mlp_input is not None and self.attention_output is not None:
            raise ValueError("EncoderAdapter: give mlp_input/mlp_output (pre-norm) or attention_output (post-norm)")
        if self.stream_norms and self.attention_output is None:
            raise ValueError("EncoderAdapter: stream_norms name the norms of post-norm blocks (with attention_output)")
        if self.class_tokens > self.protected_tokens:
            raise ValueError("EncoderAdapter: class tokens are protected tokens (class_tokens <= protected_tokens)")
        if self.position_bias_length is not None and self.position_bias is None:
            raise ValueError("EncoderAdapter: position_bias_length needs position_bias")

    def refusal(self, model, reducer) -> str | None:
        """Why ``reducer`` cannot act on ``model`` (architecture or configuration), or None.

        Example:
            >>> from hf_tokred.model_patches.encoder import EncoderAdapter
            >>> demo = EncoderAdapter(name="demo", kind="encoder", match=("demo",), protected_tokens=1,
            ...                       unsupported="its attention bypasses the attention interface")
            >>> demo.refusal(None, None)
            'its attention bypasses the attention interface'
        """
        if self.unsupported is not None:
            return self.unsupported
        return None if self.check is None else self.check(model, reducer)

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


def explain_unknown_encoder(model) -> str | None:
    """Why a transformers model that looks like a bidirectional encoder, but that no adapter names, is refused.

    A detector (see ``register_detector``): it never returns an adapter, only the sentence shown in
    ``find_adapter``'s error, so that the error for an unknown encoder says what sequence reducers miss.
    A model "looks like an encoder" when some of its modules declare ``is_causal = False`` (transformers'
    bidirectional attention modules do) and none declares ``is_causal = True``. Encoders are not detected
    into an adapter: which leading tokens are protected (a CLS token, a distillation token, none) and where
    a block's residual stream may be shortened cannot be read off the modules reliably.

    Example:
        >>> from transformers import ElectraConfig, ElectraModel
        >>> model = ElectraModel(ElectraConfig(vocab_size=32, embedding_size=16, hidden_size=16, num_hidden_layers=1,
        ...                                    num_attention_heads=2, intermediate_size=32))
        >>> explain_unknown_encoder(model).startswith("ElectraModel looks like a bidirectional encoder")
        True
    """
    config = getattr(model, "config", None)
    if not isinstance(getattr(config, "model_type", None), str) or getattr(config, "is_encoder_decoder", False):
        return None
    causal = [getattr(m, "is_causal", None) for m in model.modules()]
    if False not in causal or True in causal:
        return None
    name = type(model).__name__
    if not getattr(type(model), "_supports_attention_backend", False):
        return (f"{name} looks like a bidirectional encoder, but its attention does not go through transformers' "
                "attention interface, so sequence reducers (tome, evit, ...) cannot observe it or give it the mask "
                "of a shortened sequence")
    return (f"{name} looks like a bidirectional encoder, but no encoder adapter says where its blocks are, where a "
            "block's residual stream may be shortened and which leading tokens (CLS) are protected, which sequence "
            "reducers (tome, evit, ...) need; one EncoderAdapter record in model_patches/ adds it")


register_detector(explain_unknown_encoder)
