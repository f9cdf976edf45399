"""BLIP and BLIP-2 vision encoders: the ViT inside ``BlipForImageTextRetrieval``, ``BlipForQuestionAnswering``,
``BlipForConditionalGeneration``, ``BlipModel`` (model type ``blip``), ``Blip2ForConditionalGeneration`` and the
other BLIP-2 classes (``blip-2``), and the vision models on their own (``BlipVisionModel``: ``blip_vision_model``;
``Blip2VisionModel``: ``blip_2_vision_model``).

The blocks are ``vision_model.encoder.layers`` (``BlipEncoderLayer`` / ``Blip2EncoderLayer``, attention
``self_attn``); the text encoder (``text_encoder.encoder.layer``), the text decoder, the Q-Former
(``qformer.encoder.layer``) and the language model do not match and stay dense. The class embedding (index 0)
is protected. Pre-norm blocks: ``layer_norm2`` receives the post-attention residual stream, ``mlp`` ends the
MLP branch.

Neither vision attention takes the attention mask of its block, so the records say how the mask of a shortened
sequence reaches it (``mask_route``):

* BLIP (``BlipAttention``) computes ``softmax(q k^T)`` itself, outside transformers' attention interface
  (``uses_attention_interface=False``): the mask is applied to the attention probabilities on their way into
  ``self_attn.dropout`` (``p * exp(mask)``, renormalised, which is ``softmax(logits + mask)``). Reducers that need
  attention statistics (tome, evit, ...) cannot act on it; learned ones that need none (madtp, dynamicvit) can.
* BLIP-2 (``Blip2Attention``) calls the attention interface with ``attention_mask=None``: the mask goes to
  hf_tokred's attention function through an observer (``mask_route="attention"``).

Example:
    >>> from hf_tokred.model_patches import registered_adapters
    >>> sorted(a.name for a in registered_adapters() if a.name.startswith("blip"))
    ['blip', 'blip_2', 'blip_2_vision', 'blip_vision']
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register_adapter
from .encoder import EncoderAdapter


@dataclass(frozen=True)
class BlipEncoderAdapter(EncoderAdapter):
    """:class:`EncoderAdapter` of a vision encoder whose blocks do not hand an attention mask to their attention.

    Attributes (besides those of :class:`EncoderAdapter`):
        mask_route: how the mask of the current tokens reaches the attention: ``"block"`` (the block's
            ``attention_mask`` argument, the default of every other encoder), ``"attention"`` (an observer of
            hf_tokred's attention function supplies it) or ``"probabilities"`` (applied to the attention
            probabilities entering the module at ``attention_probs``).
        attention_probs: dotted path, inside a block, of the module whose input is the attention probabilities
            (``mask_route="probabilities"``).
        uses_attention_interface: the attention calls transformers' attention interface (False for BLIP, whose
            attention hf_tokred can neither observe nor switch to its own implementation).
        cross_modal: the encoder is the image tower of a vision-language model whose other parts read it whole
            (cross-attention, a Q-Former): the class-name checks for per-token heads (``...ForQuestionAnswering``)
            do not apply.

    Example:
        >>> a = BlipEncoderAdapter(name="demo", kind="encoder", match=("demo",), protected_tokens=1,
        ...                        mlp_input="layer_norm2", mlp_output="mlp", mask_route="attention")
        >>> a.mask_route, a.reduce_point
        ('attention', 'mlp')
    """

    mask_route: str = "block"
    attention_probs: str | None = None
    uses_attention_interface: bool = True
    cross_modal: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.mask_route not in ("block", "attention", "probabilities"):
            raise ValueError(f"BlipEncoderAdapter.mask_route must be 'block', 'attention' or 'probabilities', "
                             f"got {self.mask_route!r}")
        if (self.mask_route == "probabilities") != (self.attention_probs is not None):
            raise ValueError("BlipEncoderAdapter: attention_probs goes with mask_route='probabilities'")


_COMMON = dict(kind="encoder", attention="self_attn", mlp_input="layer_norm2", mlp_output="mlp", pooling="cls",
               protected_tokens=1, class_tokens=1)
_BLIP = dict(mask_route="probabilities", attention_probs="self_attn.dropout", uses_attention_interface=False)
_BLIP_2 = dict(mask_route="attention")
_TOWER = dict(cross_modal=True)

register_adapter(
    BlipEncoderAdapter(
        name="blip",
        match=("blip",),
        layers="vision_model.encoder.layers",
        examples=("BlipForImageTextRetrieval", "BlipForQuestionAnswering", "BlipForConditionalGeneration",
                  "BlipModel (vision tower)"),
        **_COMMON,
        **_BLIP,
        **_TOWER,
    )
)
register_adapter(
    BlipEncoderAdapter(
        name="blip_vision",
        match=("blip_vision_model",),
        layers="encoder.layers",
        examples=("BlipVisionModel",),
        **_COMMON,
        **_BLIP,
    )
)
register_adapter(
    BlipEncoderAdapter(
        name="blip_2",
        match=("blip-2",),
        layers="vision_model.encoder.layers",
        examples=("Blip2ForConditionalGeneration", "Blip2Model (vision tower)", "Blip2ForImageTextRetrieval"),
        **_COMMON,
        **_BLIP_2,
        **_TOWER,
    )
)
register_adapter(
    BlipEncoderAdapter(
        name="blip_2_vision",
        match=("blip_2_vision_model",),
        layers="encoder.layers",
        examples=("Blip2VisionModel",),
        **_COMMON,
        **_BLIP_2,
    )
)
