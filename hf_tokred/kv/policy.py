"""Base class of KV-cache eviction policies.

A policy is a config (its fields are what users set) plus one method to write, :meth:`KVPolicyConfig.score`.
The shared machinery in :mod:`hf_tokred.kv.cache` decides *when* to compress (after every attention
call, once the cache holds more than its budget), protects sinks, the recent window and never keeps
padding over a real token, and gathers the kept slots. Policies only say *how* to score.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="streamingllm", sink_tokens=4, keep=0.5)
    >>> cfg.budget(1000)
    500
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import TokenReductionConfig, param
from ..errors import ConfigError


@dataclass(kw_only=True)
class KVPolicyConfig(TokenReductionConfig):
    """Fields shared by every KV policy: a budget (``keep`` fraction or ``max_tokens``) and the
    always-protected ``sink_tokens`` and recent ``window``."""

    stage: ClassVar[str] = "kv_policy"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)

    keep: float | None = param(None, float, low=0.0, high=1.0, low_open=True, optional=True,
                               help="fraction of the prompt's tokens the cache keeps (1.0 = dense)")
    max_tokens: int | None = param(None, int, low=1, optional=True, help="absolute cache budget per layer")
    sink_tokens: int = param(4, int, low=0, help="first tokens of each sequence that are never evicted")
    window: int | None = param(None, int, low=0, optional=True, help="most recent tokens that are never evicted")

    def validate(self) -> None:
        if self.keep is not None and self.max_tokens is not None:
            raise ConfigError("keep: set either keep or max_tokens, not both", field="keep")
        if self.keep is None and self.max_tokens is None:
            raise ConfigError(f"max_tokens: {self.method_key} needs a budget: set keep or max_tokens", field="max_tokens")
        if self.max_tokens is not None and self.max_tokens <= self.sink_tokens + (self.window or 0):
            raise ConfigError(
                f"max_tokens: must exceed sink_tokens + window = {self.sink_tokens + (self.window or 0)}, "
                f"got {self.max_tokens}",
                field="max_tokens",
            )

    def budget(self, prompt_length: int) -> int | None:
        """Tokens a layer keeps, given the length of the first (prefill) chunk; None = never evict."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.keep >= 1.0:
            return None
        return max(math.ceil(self.keep * prompt_length), self.sink_tokens + (self.window or 0) + 1)

    def recent_window(self, budget: int) -> int:
        """Recent tokens protected for a given budget."""
        return self.window or 0

    def score(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Importance of every stored slot, ``(batch, kv_heads, slots)``; higher is kept.

        ``positions`` are the slots' logical positions; ``query``/``key`` are this step's post-RoPE
        queries and all stored keys. The default prefers recent tokens.
        """
        return positions.float()
