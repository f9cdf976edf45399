"""Cohere 2 (Command R7B): a detected decoder, except for its positions.

Its sliding-window layers apply RoPE and its full-attention layers apply none (NoPE): the attention's
``forward`` rotates only ``if self.sliding_window is not None``, which nothing outside the source says. So
pre-RoPE key storage (KVQuant, KIVI ``pre_rope=True``) must leave the full-attention layers' keys as they
are; everything else is found as for any decoder.
"""

from . import register_adapter
from .decoder import DecoderAdapter

register_adapter(
    DecoderAdapter(
        name="cohere2",
        kind="decoder",
        match=("cohere2",),
        layers="model.layers",
        attention="self_attn",
        has_kv_cache=True,
        rope_layer_types=("sliding_attention",),
        examples=("Cohere2ForCausalLM",),
        notes="RoPE in the sliding-window layers only; full-attention layers are NoPE",
    )
)
