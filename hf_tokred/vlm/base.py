"""Base classes of the visual-token methods for vision-language models (LLaVA, LLaVA-NeXT, Qwen2-VL, ...).

A visual-token method is a config (its fields are what users set) plus one method to write. Where it cuts is
the subclass it derives from; *when* and *how the reduced tokens travel* is the same for all of them and lives
in :mod:`hf_tokred.integration.vlm`:

* :class:`BeforeLLMConfig` methods decide, per image, which of its tokens reach the language model at all
  (VisionZip, PruMerge, Turbo). They write :meth:`BeforeLLMConfig.select`, which sees one image's tokens as the
  language model would receive them (:class:`ImageTokens`: the hidden states entering its first layer, and what
  the vision tower said about each token: CLS attention or attention received, keys) and returns the kept
  tokens, optionally with new hidden states for them (merged tokens).
* :class:`InLLMConfig` methods drop visual tokens between decoder layers (FastV, SparseVLM, IVTP). They write
  :meth:`InLLMConfig.score`, which sees a pruning layer's post-RoPE queries and keys (:class:`LayerAttention`)
  and returns an importance per key; the schedule (:meth:`InLLMConfig.resolve_schedule`) says after which
  layers how many of each row's visual tokens go on; :meth:`InLLMConfig.recycle` may fold dropped tokens into
  carriers (SparseVLM).

What the two share, and why no method has to care:

* **Positions**: kept tokens keep their ORIGINAL positions (their RoPE -- Qwen2-VL's 3-D M-RoPE included -- is
  computed by the model on the full layout and gathered), and decoding continues after the full prompt, as in
  the dense model. Nothing is renumbered, so ``generate()``'s bookkeeping, the attention mask and the returned
  sequences are the user's; the language model simply never computes the dropped tokens after the cut.
* **Batches**: every row keeps ``kept_count(n)`` of each of its images' ``n`` tokens (before the LLM) or of its
  ``n`` visual tokens (inside it); text tokens and padding are never candidates, so a padded batch gives what
  each row gives alone.
* **The cache** of every layer after the cut holds only the kept tokens (a slot-tracking
  :class:`~hf_tokred.kv.cache.TokenReductionCache`, which ``generate()`` builds and a KV policy or storage
  composed with the method then reduces further).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="fastv", k=2, keep=0.5)
    >>> cfg.resolve_schedule(30), cfg.kept_count(576)
    ([(1, 0.5)], 288)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import TokenReductionConfig, param
from ..errors import ConfigError

INSERTIONS = ("before_llm", "in_llm")


@dataclass(kw_only=True)
class VisualTokenConfig(TokenReductionConfig):
    """Fields shared by every visual-token method: ``keep``, the fraction of visual tokens that go on.

    Subclasses derive from :class:`BeforeLLMConfig` or :class:`InLLMConfig`, not from this class.
    """

    stage: ClassVar[str] = "visual"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    insertion: ClassVar[str] = ""
    # How kept tokens are placed; every method here keeps the original positions (see the module docstring).
    positions: ClassVar[str] = "original"

    keep: float = param(0.25, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of each image's visual tokens (of each row's, inside the LLM) that go on; "
                             "1.0 = the dense model")

    def kept_count(self, tokens: int, keep: float | None = None) -> int:
        """Visual tokens kept out of ``tokens``: ``ceil(keep * tokens)``, at least 1 (0 for 0).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="visionzip", keep=1 / 9).kept_count(576)
            64
        """
        keep = self.keep if keep is None else keep
        if tokens <= 0:
            return 0
        return min(tokens, max(1, math.ceil(round(keep * tokens, 6))))

    def subset_layers(self, model) -> list[int]:
        """Decoder layers whose KV cache holds only part of the prompt (after the cut); a
        :class:`~hf_tokred.kv.cache.TokenReductionCache` built for a model carrying this method makes them
        slot-tracking layers.

        Example:
            >>> TokenReductionConfig(method="fastv", k=2).subset_layers(model)        # doctest: +SKIP
            [2, 3, ..., 29]
        """
        from ..model_patches.decoder import decoder_layer_types

        num_layers = len(decoder_layer_types(model)[0])
        if self.insertion == "before_llm":
            return list(range(num_layers)) if self.keep < 1.0 else []
        stages = self.resolve_schedule(num_layers)
        return list(range(stages[0][0] + 1, num_layers)) if stages else []


# ---------------------------------------------------------------------------------------------
# Before the language model
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageTokens:
    """One image's visual tokens as the language model receives them, with the vision tower's view of them.

    Attributes:
        hidden: ``(n, d)`` hidden states entering the language model's first layer at the image's placeholder
            positions: the projected features, scaled as the model scales its input embeddings (a weighted mean
            of them is what a merged token should carry).
        importance: ``(n,)`` how much the tower attends to each token at the layer the features come from: the CLS
            token's attention (CLIP towers), else the mean attention each token receives from the image's tokens
            (SigLIP, Qwen2-VL, Idefics3); averaged over heads, and over the tower tokens a connector merges into
            one (Qwen2-VL's 2x2 merger, Idefics3's pixel shuffle). Newline tokens get ``+inf``.
        keys: ``(n, dk)`` the tower's keys at that layer, averaged over heads (and over merged tower tokens).
        grid: ``(rows, cols)`` when the tokens form one raster grid in order (LLaVA, PaliGemma, Qwen2-VL images),
            else None (LLaVA-NeXT's packed crops, Idefics3's crops).
        protected: ``(n,)`` bool: tokens that are never dropped (LLaVA-NeXT's row-end newline tokens).
    """

    hidden: torch.Tensor
    importance: torch.Tensor
    keys: torch.Tensor
    grid: tuple[int, int] | None
    protected: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]


@dataclass
class Selection:
    """What :meth:`BeforeLLMConfig.select` returns for one image.

    Attributes:
        index: ``(k,)`` ascending indices of the tokens that go on (every protected token among them).
        hidden: ``(k, d)`` new hidden states for those tokens (merged tokens), or None to keep theirs.
    """

    index: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclass(kw_only=True)
class BeforeLLMConfig(VisualTokenConfig):
    """A method that decides, per image, which visual tokens reach the language model. Write :meth:`select`.

    The method sees each image alone (images of one batch differ in size and count); protected tokens are always
    kept and do not count against ``keep`` (``count`` is ``kept_count`` of the unprotected tokens).
    """

    insertion: ClassVar[str] = "before_llm"

    def select(self, image: ImageTokens, count: int) -> Selection:
        """The tokens of ``image`` that go on: ``count`` of its unprotected tokens plus every protected one
        (a method with an adaptive count, PruMerge's, may return fewer), with merged hidden states if any."""
        raise NotImplementedError  # abstract: every registered subclass writes it

    def check_selection(self, image: ImageTokens, selection: Selection, count: int) -> Selection:
        """The engine's check of a method's answer: indices in range, ascending, unique, protected tokens kept,
        at most ``count`` + protected tokens, hidden states of the right shape."""
        index = selection.index
        n = len(image)
        problem = None
        if index.dim() != 1 or index.numel() == 0:
            problem = f"index must be a non-empty 1-D tensor, got shape {tuple(index.shape)}"
        elif int(index.min()) < 0 or int(index.max()) >= n or bool((index[1:] <= index[:-1]).any()):
            problem = "index must hold ascending, unique token indices within the image"
        elif not bool(image.protected[index].sum() == image.protected.sum()):
            problem = "a protected token was dropped"
        elif index.numel() > count + int(image.protected.sum()):
            problem = f"kept {index.numel()} tokens, more than the {count} asked for"
        elif selection.hidden is not None and tuple(selection.hidden.shape) != (index.numel(), image.hidden.shape[-1]):
            problem = f"hidden must be ({index.numel()}, {image.hidden.shape[-1]}), got {tuple(selection.hidden.shape)}"
        if problem is not None:
            raise RuntimeError(f"{self.method}.select: {problem}")  # a bug in the method, not in the user's input
        return selection


# ---------------------------------------------------------------------------------------------
# Inside the language model
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerAttention:
    """What a pruning layer's attention saw, for :meth:`InLLMConfig.score`.

    Attributes:
        query: ``(batch, heads, q, dim)`` post-RoPE queries of the current rows.
        key: ``(batch, kv_heads, k, dim)`` post-RoPE keys (GQA not expanded; ``k == q`` in prefill).
        scaling: the attention's softmax scale.
        visible: ``(batch, q, k)`` bool: which keys each query may attend to (causal, padding, prefix).
        visual: ``(batch, k)`` bool: the row's visual tokens still present (the candidates).
        text: ``(batch, k)`` bool: the row's real non-visual tokens.
        hidden: ``(batch, k, width)`` hidden states entering the layer.
        softcap: the model's attention-logit soft cap, or None.
    """

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    visible: torch.Tensor
    visual: torch.Tensor
    text: torch.Tensor
    hidden: torch.Tensor
    softcap: float | None = None

    def query_attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``(batch, len(rows), k)`` of the chosen query positions to every key, averaged
        over query heads (not over queries). ``rows`` is a 1-D index into the query axis; a query that sees no key
        (padding) gives zeros.

        Example:
            >>> import torch
            >>> visible = torch.ones(3, 3, dtype=torch.bool).tril()[None]
            >>> attn = LayerAttention(torch.zeros(1, 2, 3, 4), torch.randn(1, 1, 3, 4), 0.5, visible,
            ...                       torch.tensor([[True, True, False]]), torch.tensor([[False, False, True]]),
            ...                       torch.zeros(1, 3, 8))
            >>> attn.query_attention(torch.tensor([1, 2])).tolist()     # zero queries: uniform over what they see
            [[[0.5, 0.5, 0.0], [0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]]
        """
        batch, heads, _, dim = self.query.shape
        kv_heads = self.key.shape[1]
        keys = self.key.float().transpose(-1, -2)[:, :, None]
        out = []
        for chunk in rows.split(256):  # a few hundred queries at a time bound the memory
            qc = self.query[:, :, chunk].float().reshape(batch, kv_heads, heads // kv_heads, chunk.numel(), dim)
            logits = (qc @ keys) * self.scaling
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            seen = self.visible[:, chunk][:, None, None]
            out.append(logits.masked_fill(~seen, float("-inf")).softmax(dim=-1).nan_to_num(0.0).mean(dim=(1, 2)))
        if not out:
            return self.query.new_zeros(batch, 0, self.key.shape[-2], dtype=torch.float32)
        return torch.cat(out, dim=1)

    def attention_from(self, queries: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``(batch, k)`` from the chosen queries to every key, averaged over query heads
        and over the chosen queries of each row (rows with none give zeros).

        ``queries`` is ``(batch, q)`` bool (e.g. ``text`` for text-guided raters, or the last position).

        Example:
            >>> import torch
            >>> attn = LayerAttention(torch.zeros(1, 2, 3, 4), torch.randn(1, 1, 3, 4), 0.5,
            ...                       torch.ones(1, 3, 3, dtype=torch.bool), torch.tensor([[1, 1, 0]]).bool(),
            ...                       torch.tensor([[0, 0, 1]]).bool(), torch.zeros(1, 3, 8))
            >>> attn.attention_from(torch.tensor([[False, False, True]])).tolist()   # a zero query: uniform
            [[0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]
        """
        picked = queries.any(dim=0).nonzero().flatten()
        probs = self.query_attention(picked)  # (batch, picked, k)
        weights = queries[:, picked].to(probs.dtype)[..., None]
        return (probs * weights).sum(dim=1) / queries.sum(dim=-1, keepdim=True).clamp(min=1)

    def last_position(self) -> torch.Tensor:
        """``(batch, q)`` bool marking each row's last query (the last prompt token in prefill)."""
        marks = torch.zeros(self.query.shape[0], self.query.shape[2], dtype=torch.bool, device=self.query.device)
        marks[:, -1] = True
        return marks


@dataclass(kw_only=True)
class InLLMConfig(VisualTokenConfig):
    """A method that drops visual tokens between decoder layers. Write :meth:`score` and
    :meth:`resolve_schedule`; optionally :meth:`recycle` and :meth:`observed_layers`.

    Scores are compared only among a row's visual tokens; text tokens, padding and everything after the pruning
    layer's cut are never candidates.
    """

    insertion: ClassVar[str] = "in_llm"

    def resolve_schedule(self, num_layers: int) -> list[tuple[int, float]]:
        """``[(layer, keep), ...]``: after decoder layer ``layer`` only the cumulative fraction ``keep`` of each
        row's visual tokens goes on (layers ascending, keeps not increasing, entries keeping 1.0 left out)."""
        raise NotImplementedError  # abstract: every registered subclass writes it

    def observed_layers(self, num_layers: int) -> list[int]:
        """Layers whose attention :meth:`score` is shown (default: the pruning layers). A method that accumulates
        over earlier layers (attention rollout) lists them too; their scores are kept in ``memory``."""
        return [layer for layer, _ in self.resolve_schedule(num_layers)]

    def score(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor | None:
        """Importance ``(batch, k)`` of every key at ``layer`` (higher = kept; only visual keys are compared),
        or None at an observed layer that does not prune. ``memory`` is a dict that lives for one forward pass."""
        raise NotImplementedError  # abstract: every registered subclass writes it

    def recycle(self, hidden: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fold some of one row's dropped visual tokens into carriers that go on (SparseVLM's recycling).

        ``hidden`` ``(k, width)`` and ``scores`` ``(k,)`` are the row's, ``dropped`` ``(k,)`` bool the visual
        tokens this layer drops. Return ``(carriers, carrier_hidden)``: indices of dropped tokens that go on after
        all (they keep their positions) and their new hidden states; None (the default) drops them all.
        """
        return None

    def check_schedule(self, schedule: list[tuple[int, float]], num_layers: int) -> list[tuple[int, float]]:
        """Raise :class:`ConfigError` for a layer past the model's depth (no later layer would see the cut)."""
        for layer, _ in schedule:
            if layer > num_layers - 2 or layer < 0:
                raise ConfigError(f"{self.layer_field}: {self.method} pruning after layer {layer} is out of range for a language model "
                                  f"of {num_layers} layers (0..{num_layers - 2})", field=self.layer_field)
        return schedule

    layer_field: ClassVar[str] = "k"


@dataclass
class KeepRecord:
    """One learned stage's soft decisions in a training-mode forward pass (for the losses).

    Attributes:
        layer: the decoder layer after which the stage acts.
        keep: ``(batch, k)`` keep probabilities of the stage's candidates (differentiable).
        candidates: ``(batch, k)`` bool: the tokens the stage decides about (visual tokens, or answer tokens for a
            decoding-time predictor).
        target: the fraction of candidates the stage should keep.
    """

    layer: int
    keep: torch.Tensor
    candidates: torch.Tensor
    target: float


@dataclass(kw_only=True)
class LearnedInLLMConfig(InLLMConfig):
    """An in-LLM method whose scores come from small learned modules on the frozen language model (ATP-LLaVA,
    Dynamic-LLaVA). Write :meth:`build_modules`, :meth:`score` and :meth:`soft_keep`; optionally
    :meth:`kept_counts` (instance-wise budgets) and :meth:`decode_keep` (decoding-time predictors).

    Inference (the learned modules in eval mode) drops tokens like any in-LLM method. Training (modules in train
    mode, ``model.hf_tokred_modules[method].train()``) drops nothing: :meth:`soft_keep` gives each candidate a
    differentiable keep probability, every later layer's attention adds ``log(keep)`` to the candidate's key column
    (for the queries after it), and the decisions are recorded as :class:`KeepRecord` for the losses of
    :func:`hf_tokred.training.visual_pruner_loss`. The modules are ``learned_modules`` (saved to
    ``token_reduction.safetensors``); ``memory["modules"]`` holds them during a pass.
    """

    learned: ClassVar[bool] = True

    def learned_modules(self, model, adapter) -> dict[str, torch.nn.Module]:
        from ..model_patches.decoder import decoder_layer_types

        width = model.config.get_text_config(decoder=True).hidden_size
        module = self.build_modules(width, len(decoder_layer_types(model)[0]))
        parameter = next(model.parameters())
        module.train(model.training)  # an eval-mode model drops tokens from its first call on
        return {self.method: module.to(parameter.device)}

    def build_modules(self, hidden_size: int, num_layers: int) -> torch.nn.Module:
        """The learned modules for a language model of this width and depth (an ``nn.ModuleDict`` keyed by the
        pruning layer, usually)."""
        raise NotImplementedError  # abstract: every registered subclass writes it

    def soft_keep(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        """Training: differentiable keep probabilities ``(batch, k)`` in (0, 1) at pruning layer ``layer``."""
        raise NotImplementedError  # abstract: every registered subclass writes it

    def kept_counts(self, scores: torch.Tensor, visual: torch.Tensor, layer: int, memory: dict
                    ) -> torch.Tensor | None:
        """Inference: how many visual tokens each row keeps at ``layer`` (``(batch,)``), or None for the fixed
        ``keep`` schedule."""
        return None

    def decode_layer(self, num_layers: int) -> int | None:
        """The layer after which a decoding-time predictor decides whether each new token stays visible to later
        steps (None: no such predictor)."""
        return None

    def decode_keep(self, hidden: torch.Tensor, memory: dict) -> torch.Tensor:
        """Keep probabilities ``(batch, q)`` of tokens from their hidden states ``(batch, q, width)`` after
        :meth:`decode_layer` (decoding: the new token; training: the answer tokens)."""
        raise NotImplementedError  # only called when decode_layer is not None


__all__ = ["INSERTIONS", "BeforeLLMConfig", "KeepRecord", "LearnedInLLMConfig", "ImageTokens", "InLLMConfig", "LayerAttention", "Selection",
           "VisualTokenConfig"]
