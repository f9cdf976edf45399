"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): ``model.layers[i].self_attn``, post-RoPE keys
reach the cache through ``past_key_values.update(k, v, layer_idx)``."""

from . import ModelAdapter, register_adapter

register_adapter(
    ModelAdapter(
        name="llama",
        kind="decoder",
        match=("llama", "mistral", "qwen2", "qwen3"),
        layers="layers",
        attention="self_attn",
        has_kv_cache=True,
        examples=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    )
)
