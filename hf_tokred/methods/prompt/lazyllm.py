"""LazyLLM (Fu et al., "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference", arXiv 2407.14057).

Progressive pruning of the prompt *inside prefill*. At a few decoder layers (the ``schedule``) the importance
of each prompt token is the attention probability the *last* prompt token gives it, averaged over heads
(``s_i = 1/H sum_h A_h[N, i]``), and only the most important tokens -- a fraction of the prompt that shrinks
with depth -- are forwarded to the later layers. The pruned tokens' hidden states and their keys/values at
those later layers are never computed: that is where the time to first token is saved. The last token is always
kept (its logits are the output); so are the first ``sink_tokens`` tokens. A pruned token's hidden state at the
layer where it was dropped goes into an **aux cache**; with ``revive`` a later decoding step can bring it back
(see below). Wiring: :mod:`hf_tokred.integration.prefill`.

Positions: kept tokens keep their ORIGINAL positions. Their RoPE ``(cos, sin)``, ``position_ids`` and attention
mask are gathered from the full prompt's, never renumbered, and the KV cache records each slot's original
position (so decoding continues at position N, as in the dense model). Padding (left-padded batches) is pruned
before any real token, and each row keeps the count its own real length gives, so a padded batch gives what each
row gives alone.

Schedule: a list of ``[where, keep]`` pairs. ``where`` is the decoder layer whose attention scores the tokens
and after which they are pruned: an int is a layer index (0 .. num_layers - 2), a float in (0, 1) a fraction of
the depth (the first ``round(where * num_layers)`` layers see the tokens the entry prunes). ``keep`` is the
fraction of each row's prompt tokens kept *cumulatively* (of the whole prompt, not of the previous entry), so
keeps never increase with depth. The default keeps every token through 63% of the layers, then 20%, and 5% after
four fifths (30 layers: layers 0-18 see the whole prompt, 19-23 20%, 24-29 5%; 68% of the dense tokens x layers).
It was chosen on the tuning split of ``hf-tokred prompt-bench`` with SmolLM2-135M, whose shallow layers' attention
does not find a needle (it reaches the top 10-25% of the prompt only around layers 20-22): the paper-like schedule
(70% after a quarter, 50% after half, 35% after three quarters) lost most needles there.
A schedule that keeps 1.0 everywhere, or an empty one, is the dense model.

Where we depart from the paper:

* Revival is off by default (``revive=False``: pruned tokens stay pruned while decoding; on SmolLM2 passkey
  prompts of 1k tokens it answered 5/5, against 4/5 with revival), and with ``revive=True`` it is simpler than the
  paper's. The paper redoes the selection at every decoding step
  at every pruning layer and restricts that step's attention to the selected tokens, reviving from the aux
  cache any selected token that a later layer lacks. Here decoding steps attend to every token a layer holds
  (nothing is pruned from a step's attention). At each pruning layer, the aux tokens *that layer pruned*
  (their keys are still in its cache) whose attention probability from the new token exceeds the smallest
  one among the tokens it kept are revived, at most ``revive_limit`` per layer and step, highest first: their
  stored hidden states are computed once through every later layer (their keys/values appended to those
  layers' caches at their original positions) beside the new token, and they leave the aux cache. A revived
  token is never pruned again, so each token is computed at most once per layer, as in the paper. Tokens a
  KV policy composed with lazyllm has evicted from the pruning layer can no longer be revived.
* The importance is recomputed from the layer's post-RoPE query of the last position and the keys (so SDPA
  works; the paper reads eager attention maps), with GQA query heads averaged; the first ``sink_tokens`` real
  tokens are protected (the paper protects only the last token; ``sink_tokens=0`` is the paper).
* The keep fractions are given per layer as cumulative fractions of the prompt (the paper gives a pruning
  percentile per layer); the default schedule is ours, chosen on SmolLM2-135M (the paper's per-model schedules
  are not published).
* Without a KV cache (``use_cache=False``) every forward pass prunes anew (each generation step re-selects
  from the full sequence, as the paper's dynamic pruning does); the pruned tokens' outputs are their hidden
  states where they were dropped (so logits keep the input's length; only the last position is exact).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="lazyllm")
    >>> cfg.resolve_schedule(30)
    [(18, 0.2), (23, 0.05)]
    >>> cfg.kept_count(0.5, 100)
    50
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError

DEFAULT_SCHEDULE = [[0.63, 0.2], [0.8, 0.05]]


@register_method("lazyllm")
@dataclass(kw_only=True)
class LazyLLMConfig(TokenReductionConfig):
    """Progressive last-token-attention pruning of the prompt during prefill (arXiv 2407.14057).

    Example:
        >>> from hf_tokred import TokenReductionConfig, compose
        >>> cfg = TokenReductionConfig(method="lazyllm", schedule=[[4, 0.6], [8, 0.3]], sink_tokens=4)
        >>> cfg.resolve_schedule(12)
        [(4, 0.6), (8, 0.3)]
        >>> compose(cfg, {"method": "tova", "keep": 0.5}).method       # its pruned prompt is what TOVA sees
        'composed'
    """

    stage: ClassVar[str] = "prefill"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    paper: ClassVar[str] = "2407.14057"
    status: ClassVar[str] = "beta"  # both targets met on SmolLM2 (docs/prompt.md); revival simpler than the paper's

    schedule: list = field(default_factory=lambda: [list(e) for e in DEFAULT_SCHEDULE], metadata={
        "help": "[[where, keep], ...]: after layer `where` (an int layer index, or a float in (0, 1) = fraction of "
                "the depth) only the fraction `keep` in (0, 1] of each row's prompt goes on; keeps never increase"})
    sink_tokens: int = param(4, int, low=0, help="first real tokens of each row that are never pruned")
    revive: bool = param(False, bool, help="decoding steps revive pruned tokens the new token attends to more than "
                                          "the least attended kept one (from the aux cache of hidden states)")
    revive_limit: int = param(8, int, low=1, help="most tokens revived per pruning layer and decoding step")
    query_window: int = param(1, int, low=1, high=4096,
                              help="the last tokens whose attention scores the prompt (1 = the paper's last token); "
                                   "they are always kept")
    kernel_size: int = param(1, int, low=1, high=63,
                             help="scores max-pooled over this many neighbouring tokens (odd; 1 = off, the paper)")

    def validate(self) -> None:
        schedule = self.schedule
        if not isinstance(schedule, (list, tuple)):
            raise ConfigError(f"schedule: expected a list of [where, keep] pairs, got {type(schedule).__name__}",
                              field="schedule")
        entries = []
        for i, entry in enumerate(schedule):
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ConfigError(f"schedule[{i}]: expected a [where, keep] pair, got {entry!r:.60}", field="schedule")
            where, keep = entry
            if isinstance(where, bool) or not isinstance(where, (int, float)):
                raise ConfigError(f"schedule[{i}]: where must be an int layer index or a float fraction of the "
                                  f"depth in (0, 1), got {where!r:.40}", field="schedule")
            if isinstance(where, int) and where < 0:
                raise ConfigError(f"schedule[{i}]: layer index {where} is negative; layer indices start at 0",
                                  field="schedule")
            if isinstance(where, float) and not (0.0 < where < 1.0):
                raise ConfigError(f"schedule[{i}]: depth fraction {where!r} is outside (0, 1) (use an int for a layer "
                                  "index)", field="schedule")
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or \
                    not (0.0 < keep <= 1.0):
                raise ConfigError(f"schedule[{i}]: keep must be a fraction in (0, 1], got {keep!r:.40}",
                                  field="schedule")
            entries.append([where, float(keep)])
        for kind in (int, float):  # ints compare with ints, fractions with fractions (depth is known at apply)
            same = [(i, w) for i, (w, _) in enumerate(entries) if isinstance(w, kind)]
            for (i, a), (j, b) in zip(same, same[1:]):
                if b <= a:
                    raise ConfigError(f"schedule[{j}]: where {b!r} does not come after schedule[{i}]'s {a!r}; "
                                      "entries go from shallow to deep layers", field="schedule")
        for i in range(1, len(entries)):
            if entries[i][1] > entries[i - 1][1]:
                raise ConfigError(
                    f"schedule[{i}]: keep {entries[i][1]:g} is more than schedule[{i - 1}]'s {entries[i - 1][1]:g}; keep is "
                    "the cumulative fraction of the prompt still forwarded, so it never increases with depth "
                    "(pruned tokens are not computed again)", field="schedule")
        self.schedule = entries

    def resolve_schedule(self, num_layers: int) -> list[tuple[int, float]]:
        """``[(layer, keep), ...]`` for a decoder of ``num_layers`` layers: the layers that prune (their attention
        scores the tokens; the layers after them see ``keep`` of the prompt), entries keeping 1.0 left out.

        Raises :class:`ConfigError` (field ``schedule``) for a layer index outside 0 .. ``num_layers`` - 2 (no layer
        would see the pruning) and for entries that do not go deeper in order. Depth fractions that land on the same
        layer merge (the smaller keep wins).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="lazyllm", schedule=[[0.5, 0.5], [0.9, 0.25]]).resolve_schedule(4)
            [(1, 0.5), (2, 0.25)]
        """
        resolved: list[tuple[int, float]] = []
        for i, (where, keep) in enumerate(self.schedule):
            if isinstance(where, int):
                if where > num_layers - 2:
                    raise ConfigError(
                        f"schedule[{i}]: layer {where} is out of range: a model of {num_layers} layers prunes after "
                        f"layers 0..{num_layers - 2} (a later layer must see the pruning)", field="schedule")
                layer = where
            else:
                layer = min(max(math.floor(where * num_layers + 0.5) - 1, 0), num_layers - 2)
            if resolved and layer < resolved[-1][0]:
                raise ConfigError(f"schedule[{i}]: layer {layer} comes before the previous entry's layer "
                                  f"{resolved[-1][0]}; entries go from shallow to deep layers", field="schedule")
            if resolved and layer == resolved[-1][0]:
                resolved[-1] = (layer, min(keep, resolved[-1][1]))
            else:
                resolved.append((layer, keep))
        return [(layer, keep) for layer, keep in resolved if keep < 1.0]

    def kept_count(self, keep: float, length: int) -> int:
        """Tokens a row of ``length`` real prompt tokens keeps at cumulative fraction ``keep``: ``ceil(keep *
        length)``, at least the protected sinks and last token, at most ``length``.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> cfg = TokenReductionConfig(method="lazyllm", sink_tokens=4)
            >>> cfg.kept_count(0.1, 20), cfg.kept_count(0.35, 2048), cfg.kept_count(0.5, 3)
            (5, 717, 3)
        """
        wanted = math.ceil(round(keep * length, 6))
        return min(length, max(wanted, self.sink_tokens + self.query_window))

    def subset_layers(self, model) -> list[int]:
        """Decoder layers whose KV cache holds only part of the prompt (every layer after the first pruning
        one); a :class:`~hf_tokred.kv.cache.TokenReductionCache` built for a model carrying this reduction makes
        them slot-tracking layers.

        Example:
            >>> cfg.subset_layers(model)                                 # doctest: +SKIP
            [8, 9, ..., 29]
        """
        from ...model_patches.decoder import decoder_layer_types

        num_layers = len(decoder_layer_types(model)[0])
        stages = self.resolve_schedule(num_layers)
        return list(range(stages[0][0] + 1, num_layers)) if stages else []


# ---------------------------------------------------------------------------------------------
# Plain tensor functions
# ---------------------------------------------------------------------------------------------


def last_token_importance(query: torch.Tensor, key: torch.Tensor, scaling: float, visible: torch.Tensor | None = None,
                          softcap: float | None = None, sinks: torch.Tensor | None = None, window: int = 1,
                          kernel_size: int = 1) -> torch.Tensor:
    """Attention probability from the last ``window`` queries to every key, averaged over them and over query
    heads, then max-pooled over ``kernel_size`` neighbouring keys: ``(batch, keys)``.

    ``query`` is ``(batch, heads, q, dim)`` post-RoPE (its last ``window`` positions are used; 1 = the paper's last
    token), ``key`` ``(batch, kv_heads, keys, dim)`` (GQA: query heads are grouped by the KV head they share).
    ``visible`` ``(batch, keys)`` or ``(batch, window, keys)`` says which keys each query may see (None: all);
    hidden ones get probability 0. ``softcap`` (Gemma 2's ``attn_logit_softcapping``) and per-head ``sinks`` logits
    (GPT-OSS) follow the model's own attention.

    Example:
        >>> import torch
        >>> q, k = torch.zeros(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
        >>> last_token_importance(q, k, 8 ** -0.5).tolist()     # a zero query attends uniformly
        [[0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    window = max(1, min(window, length))
    last = query[:, :, -window:].float().reshape(batch, kv_heads, heads // kv_heads, window, dim)
    logits = (last @ key.float().transpose(-1, -2)[:, :, None]) * scaling  # (batch, kv_heads, group, window, keys)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if visible is not None:
        seen = visible[:, None, None, None, :] if visible.dim() == 2 else visible[:, None, None, -window:, :]
        logits = logits.masked_fill(~seen, float("-inf"))
    if isinstance(sinks, torch.Tensor) and sinks.numel() == heads:
        sink = sinks.detach().float().view(1, kv_heads, heads // kv_heads, 1, 1).expand(batch, -1, -1, window, 1)
        probs = torch.cat([logits, sink.to(logits.device)], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probs = logits.softmax(dim=-1)
    scores = probs.nan_to_num_(0.0).mean(dim=(1, 2, 3))
    if kernel_size > 1:  # a kept token keeps its neighbours (a number's digits, the words around a fact)
        scores = torch.nn.functional.max_pool1d(scores[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    return scores


def select_kept(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor,
                sink_end: torch.Tensor, recent: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of a row's current slots go on to the next layers, and which of those stay real (valid).

    ``scores``, ``positions`` (original position of each slot, ascending), ``valid`` (False for padding and for
    tokens already dropped from attention) are ``(batch, slots)``; ``counts`` ``(batch,)`` is how many real tokens
    each row keeps; ``sink_end`` ``(batch,)`` the first position after each row's protected sinks. The last
    ``recent`` real tokens and the sinks outrank every scored token, padding ranks below everything and ties go to the later
    position. Every row returns ``max(counts)`` slots (ascending, so the last token stays last); a row that keeps
    fewer fills up with its lowest-ranked slots -- padding first -- marked invalid.

    Returns ``(index, index_valid)``, ``(batch, max(counts))``: slot indices into the current slots, and validity.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.0, 0.5, 0.1, 0.3, 0.1], [0.0, 0.0, 0.9, 0.1, 0.0]])
        >>> positions = torch.arange(5).expand(2, 5)
        >>> valid = torch.tensor([[True] * 5, [False, False, True, True, True]])   # row 1 is left-padded
        >>> index, index_valid = select_kept(scores, positions, valid, torch.tensor([3, 2]), torch.tensor([1, 3]))
        >>> index.tolist(), index_valid.tolist()
        ([[0, 1, 4], [1, 2, 4]], [[True, True, True], [False, True, True]])
    """
    real_pos = torch.where(valid, positions, -1)
    last = real_pos.amax(dim=-1, keepdim=True)
    protected = valid & ((positions < sink_end[:, None]) | (positions > last - max(recent, 1)))
    ranked = torch.where(valid, scores.float(), torch.finfo(torch.float32).min)
    ranked = torch.where(protected, torch.inf, ranked)
    # Later positions first, then a stable sort by score: equal scores keep the later token.
    by_position = positions.argsort(dim=-1, descending=True)
    order = by_position.gather(-1, ranked.gather(-1, by_position).sort(dim=-1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    kept = valid & (rank < counts[:, None])
    # Physical slots: the kept tokens, then fillers for rows that keep fewer than the widest row: padding and
    # tokens dropped before (already invalid) first, freshly dropped tokens only when those run out.
    tier = torch.where(kept, 2, torch.where(valid, 0, 1))
    chosen = order.gather(-1, tier.gather(-1, order).sort(dim=-1, descending=True, stable=True).indices)
    index = chosen[..., : int(counts.max())].sort(dim=-1).values
    return index, kept.gather(-1, index)


def revival_candidates(scores: torch.Tensor, kept_floor: torch.Tensor, valid: torch.Tensor,
                       limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aux tokens to revive: those whose ``scores`` exceed their row's ``kept_floor`` (the smallest score of a
    kept token), at most ``limit`` per row, highest first.

    ``scores`` and ``valid`` are ``(batch, aux)``, ``kept_floor`` ``(batch,)``. Returns ``(index, chosen)``,
    ``(batch, r)`` with ``r`` the largest count over rows (0 when nothing qualifies): indices into the aux
    tokens, ascending, and which of them are real choices (rows with fewer pad with unchosen entries).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.1, 0.0]])
        >>> index, chosen = revival_candidates(scores, torch.tensor([0.25, 0.5]), torch.ones(2, 3, dtype=torch.bool), 8)
        >>> index[0].tolist(), chosen.tolist()
        ([1, 2], [[True, True], [False, False]])
    """
    eligible = valid & (scores > kept_floor[:, None])
    count = eligible.sum(dim=-1).clamp(max=limit)
    width = int(count.max()) if count.numel() else 0
    if width == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.long), valid.new_zeros(scores.shape[0], 0)
    ranked = torch.where(eligible, scores.float(), -torch.inf)
    top = ranked.topk(width, dim=-1)
    index, order = top.indices.sort(dim=-1)
    chosen = (torch.arange(width, device=scores.device)[None] < count[:, None]).gather(-1, order)
    return index, chosen
