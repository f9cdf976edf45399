"""Prompt compression: text in, shorter text out, scored by a small causal LM.

:func:`compress_prompt` is the public entry point; :class:`PromptCompressorConfig` is the base class of the
methods (``hf_tokred/methods/prompt/``), which write one method, :meth:`PromptCompressorConfig.priorities`.

Example:
    >>> import hf_tokred
    >>> out = hf_tokred.compress_prompt("Some long context ...", question="Why?", rate=0.5)   # doctest: +SKIP
    >>> out["compressed_prompt"], out["compressed_tokens"], out["origin_tokens"]             # doctest: +SKIP
"""

from .base import (
    KEEP_CLOSE,
    KEEP_OPEN,
    PromptCompressorConfig,
    PromptJob,
    Scorer,
    compress_prompt,
    compress_prompts,
    load_scorer,
    rank_priority,
    token_surprisal,
)

__all__ = [
    "KEEP_CLOSE",
    "KEEP_OPEN",
    "PromptCompressorConfig",
    "PromptJob",
    "Scorer",
    "compress_prompt",
    "compress_prompts",
    "load_scorer",
    "rank_priority",
    "token_surprisal",
]
