"""Base class of KV-cache eviction policies.

A policy is a config (its fields are what users set) plus one method to write, :meth:`KVPolicyConfig.score`.
Three concerns are kept apart:

* **when** to compress: the class attribute ``compression``. ``"prefill"`` compresses each layer once,
  right after the first chunk (the prompt) has been attended, and appends every later token (SnapKV,
  PyramidKV, FastGen). ``"step"`` keeps the cache within its budget after every attention call; with
  ``compress_every=m`` it evicts down to ``budget - m + 1`` so that eviction runs once every ``m``
  decoding steps and the budget is never exceeded (H2O, Scissorhands, TOVA, StreamingLLM).
* **how** to score: :meth:`KVPolicyConfig.score` (attention-free, from a recomputed window of queries
  with :func:`hf_tokred.kv.scoring.attention_probs`, or from history buffers that
  :meth:`KVPolicyConfig.accumulate` updates on every attention call).
* **what** happens to evicted tokens: the ``evicted`` field, ``"drop"`` (the papers) or ``"merge"``
  (each evicted key/value is averaged, weighted by how many tokens each slot stands for, into the kept
  slot of the same row and head whose key is most similar).

The shared machinery in :mod:`hf_tokred.kv.cache` protects the sinks and the recent window, never keeps
padding over a real token, and gathers the kept slots. ``layers`` says which decoder layers the policy acts
on (by default the full-attention ones; sliding-window layers keep transformers' own window cache, see
:mod:`hf_tokred.kv.layers`).

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
from .layers import check_layers, layers_param
from .scoring import pool_along_positions

COMPRESSIONS = ("prefill", "step")


@dataclass(kw_only=True)
class KVPolicyConfig(TokenReductionConfig):
    """Fields shared by every KV policy: a budget (``keep`` fraction or ``max_tokens``), the
    always-protected ``sink_tokens`` and recent ``window``, ``compress_every``, ``evicted`` and ``layers``.

    Subclasses set ``compression`` (``"prefill"`` or ``"step"``), write :meth:`score`, and may write
    :meth:`accumulate` (history), :meth:`layer_budget` (per-layer budgets) and :meth:`head_budgets`
    (per-head budgets). ``buffers`` names the per-slot history tensors a layer keeps for the policy;
    they are gathered on eviction and reordered with the cache in beam search.
    """

    stage: ClassVar[str] = "kv_policy"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    compression: ClassVar[str] = "step"
    buffers: ClassVar[tuple[str, ...]] = ()
    needs_token_ids: ClassVar[bool] = False  # the cache records the input ids it sees (layer.shared["token_ids"])

    keep: float | None = param(None, float, low=0.0, high=1.0, low_open=True, optional=True,
                               help="fraction of the prompt's tokens the cache keeps (1.0 = dense)")
    max_tokens: int | None = param(None, int, low=1, optional=True, help="absolute cache budget per layer")
    sink_tokens: int = param(4, int, low=0, help="first tokens of each sequence that are never evicted")
    window: int | None = param(None, int, low=0, optional=True, help="most recent tokens that are never evicted")
    compress_every: int = param(1, int, low=1, help="per-step policies: evict down to budget - compress_every + 1 "
                                                    "so eviction runs once every compress_every steps")
    evicted: str = param("drop", str, choices=("drop", "merge"),
                         help="drop evicted tokens, or merge each into the most similar kept token")
    kernel_size: int = param(1, int, low=1, help="odd width of the pooling of scores along positions, so a kept "
                                                 "token keeps its neighbours (1 = none)")
    layers: str | None = layers_param()

    def validate(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: expected an odd int >= 1, got {self.kernel_size}", field="kernel_size")
        if self.keep is not None and self.max_tokens is not None:
            raise ConfigError("keep: set either keep or max_tokens, not both", field="keep")
        if self.keep is None and self.max_tokens is None:
            raise ConfigError(f"max_tokens: {self.method_key} needs a budget: set keep or max_tokens", field="max_tokens")
        self._check_budget_room()

    def _check_budget_room(self) -> None:
        if self.compression == "prefill" and self.compress_every != 1:
            raise ConfigError(
                f"compress_every: {self.method_key} compresses once after the prompt; compress_every applies to "
                f"per-step policies only, got {self.compress_every}",
                field="compress_every",
            )
        if self.max_tokens is not None and self.max_tokens < self.min_budget():
            raise ConfigError(
                f"max_tokens: must be at least {self.min_budget()} (the protected sinks and recent window plus "
                f"compress_every), got {self.max_tokens}",
                field="max_tokens",
            )

    def check_model(self, model) -> None:
        """Raise before ``apply`` touches ``model`` when the policy cannot act on it: layer kinds without a plain
        KV cache, or a ``layers`` choice that selects nothing (:func:`hf_tokred.kv.layers.check_layers`)."""
        check_layers(self, model)

    def bind(self, model) -> KVPolicyConfig:
        """The policy a cache for ``model`` uses (a copy with model-specific values filled in, or ``self``)."""
        return self

    # -- when ---------------------------------------------------------------------------------

    def budget(self, prompt_length: int) -> int | None:
        """Tokens a layer keeps, given the length of the first (prefill) chunk; None = never evict."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.keep >= 1.0:
            return None
        return max(math.ceil(self.keep * prompt_length), self.min_budget())

    def min_budget(self) -> int:
        """The smallest budget that leaves room for ``compress_every`` scored tokens beside the protected ones."""
        return self.sink_tokens + self.recent_window(0) + self.compress_every

    def layer_budget(self, budget: int, layer_idx: int, num_layers: int) -> int:
        """Budget of one layer (PyramidKV overrides this); the default gives every layer ``budget``.

        ``layer_idx`` counts the layers the policy acts on (0 .. ``num_layers`` - 1), not the model's layers: on a
        model with sliding-window layers it is the rank among the full-attention ones."""
        return budget

    def recent_window(self, budget: int) -> int:
        """Recent tokens protected for a given (layer) budget."""
        return self.window or 0

    # -- how ----------------------------------------------------------------------------------

    def accumulate(self, layer, module, query: torch.Tensor) -> None:
        """Update the layer's history buffers after an attention call (history-based policies)."""
        return None

    def score(self, layer, module, query: torch.Tensor) -> torch.Tensor:
        """Importance of every stored slot, ``(batch, kv_heads, slots)``; higher is kept.

        ``layer`` is the :class:`~hf_tokred.kv.cache.ReducingLayer` (its ``keys``, ``values``,
        ``positions``, ``valid``, ``buffers``, ``seen``, ``layer_idx``); ``query`` is this call's
        post-RoPE queries ``(batch, heads, q, dim)``; ``module`` the attention module (``scaling``).
        The default prefers recent tokens.
        """
        return layer.positions.float()

    def pooled(self, layer, scores: torch.Tensor, pooling: str = "max") -> torch.Tensor:
        """``scores`` smoothed along positions over ``kernel_size`` neighbours (for policies' :meth:`score`).

        Pooling (SnapKV's, made available to every policy) keeps a multi-token fact together: without it,
        one-shot selections keep the most attended token of a number or name and drop the tokens after it.
        """
        return pool_along_positions(scores, layer.positions, self.kernel_size, pooling, layer.valid)

    def head_budgets(self, layer, module, query: torch.Tensor, budget: int) -> torch.Tensor | None:
        """Per-head budgets ``(batch, kv_heads)`` at most ``budget`` (FastGen), or None for one budget."""
        return None


def prompt_once_policies() -> list[str]:
    """Registry keys of the KV policies that compress the prompt once (``compression == "prefill"``), sorted: the
    ones whose cache can take decoded tokens back (``Cache.crop``), as assisted decoding needs.

    Example:
        >>> import hf_tokred
        >>> from hf_tokred.kv.policy import prompt_once_policies
        >>> prompt_once_policies()
        ['fastgen', 'pyramidkv', 'snapkv']
    """
    from ..config import registered_methods

    return sorted(key for key, cls in registered_methods().items()
                  if cls.stage == "kv_policy" and getattr(cls, "compression", None) == "prefill")
