"""Visual-token reduction for vision-language models: the base classes (:mod:`hf_tokred.vlm.base`)."""

from .base import BeforeLLMConfig, ImageTokens, InLLMConfig, LayerAttention, Selection, VisualTokenConfig

__all__ = ["BeforeLLMConfig", "ImageTokens", "InLLMConfig", "LayerAttention", "Selection", "VisualTokenConfig"]
