"""StreamingLLM: attention sinks plus a recent window (Xiao et al., ICLR'24, arXiv 2309.17453).

The cache keeps the first ``sink_tokens`` tokens of every sequence and the most recent ``window``
tokens, so memory stays constant however long generation runs.

Where we depart from the paper: the paper re-assigns positions inside the cache (the kept tokens are
re-rotated to contiguous positions). We keep every key at its original absolute RoPE position, which
is what ``generate()`` passes in transformers 5.x and needs no re-rotation; it matches a teacher-forced
full-attention model masked to the same sinks and window. With left-padded batches the sinks are the
first *real* tokens of each row, never padding.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="streamingllm", sink_tokens=4, max_tokens=512)
    >>> cfg.window
    508
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import register_method
from ...errors import ConfigError
from ...kv.policy import KVPolicyConfig


@register_method("streamingllm")
@dataclass(kw_only=True)
class StreamingLLMConfig(KVPolicyConfig):
    """Sinks + recent window. Set ``window`` (recent tokens kept), ``max_tokens`` (= sinks + window)
    or ``keep`` (a fraction of the prompt)."""

    paper = "2309.17453"
    status = "stable"  # the evidence: docs/methods.md, "Why each status"

    def validate(self) -> None:
        if self.keep is not None and (self.window is not None or self.max_tokens is not None):
            raise ConfigError("keep: set keep, or window/max_tokens, not both", field="keep")
        if self.keep is None and self.window is None and self.max_tokens is None:
            raise ConfigError("window: streamingllm needs one of window, max_tokens or keep", field="window")
        if self.window is not None and self.max_tokens is not None and self.max_tokens != self.sink_tokens + self.window:
            raise ConfigError(
                f"max_tokens: must equal sink_tokens + window = {self.sink_tokens + self.window}, got "
                f"{self.max_tokens} (set only one of them)",
                field="max_tokens",
            )
        if self.window is not None:
            if self.window < 1:
                raise ConfigError(f"window: expected an int >= 1, got {self.window}", field="window")
            self.max_tokens = self.sink_tokens + self.window
        elif self.max_tokens is not None:
            if self.max_tokens <= self.sink_tokens:
                raise ConfigError(
                    f"max_tokens: must exceed sink_tokens = {self.sink_tokens}, got {self.max_tokens}",
                    field="max_tokens",
                )
            self.window = self.max_tokens - self.sink_tokens

    def recent_window(self, budget: int) -> int:
        return budget - self.sink_tokens
