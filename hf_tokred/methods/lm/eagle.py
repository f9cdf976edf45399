"""EAGLE: speculative sampling at the feature level (Li et al., ICML 2024, arXiv 2401.15077), with EAGLE-2's
confidence-driven draft length (arXiv 2406.16858) and FR-Spec's frequency-ranked draft vocabulary (arXiv 2502.14856).

A target model's *features* (its last hidden state, the input of its LM head) are far more predictable than its
tokens. EAGLE trains a small **draft head** that predicts the next feature from the features so far and the
embeddings of the tokens one step ahead: at position ``i`` its input is ``fc([f_i, E(x_{i+1})])`` (``fc``: a linear
layer ``2h -> h``), one decoder layer turns it into ``f^_{i+1}``, and the target's own LM head turns that into
the draft token ``x^_{i+2}``. The draft token's embedding and the predicted feature feed the next draft step, and
so on. The target model verifies the drafted tokens in one forward pass, so the output is exactly the target's.

Here the draft head is the learned part of a reduction at the ``"decoding"`` stage (:class:`EagleConfig`):

* :class:`EagleHead` holds ``fc`` and **one decoder layer of the target's own architecture** (its class is the
  class of the target's decoder blocks, found through the model's adapter, built from a copy of the model's
  config with one layer and SDPA attention; its forward is the model's own). It reuses the target's frozen
  token embedding, rotary embedding and LM head, which are not part of the head and not saved with it. The head
  also stores ``vocab_ids`` (the draft vocabulary, see below) and ``base_signature`` (a fingerprint of the
  weights of the model it was trained for); the config records that model's hidden size, vocabulary size and
  layer count. A head trained for another base model is refused with an error naming what differs.
* Users reach it through transformers' assisted generation:
  ``model.generate(**inputs, assistant_model=hf_tokred.integration.eagle.eagle_assistant(model))`` (see
  :mod:`hf_tokred.integration.eagle`). The target's hidden states reach the draft head every round through
  transformers' ``requires_model_outputs`` candidate-generator interface. For greedy decoding,
  ``model.generate(**inputs, custom_generate=hf_tokred.eagle_tree_decoding)`` verifies the whole draft tree in one
  forward pass per round (a decoding loop ``generate()`` runs after its own preparation; see
  :mod:`hf_tokred.integration.eagle_tree`).

Where we depart from the paper:

* **tree verification** is EAGLE's (and EAGLE-2's) with
  ``generate(..., custom_generate=hf_tokred.eagle_tree_decoding)`` (:mod:`hf_tokred.integration.eagle_tree`): the
  ``tree_tokens`` best nodes of the draft's beam search (EAGLE-2's re-ranking by cumulative draft probability; the
  paper's dynamic tree expands the top-k children of the top-k nodes, we keep a beam of width ``top_k`` per depth) are
  verified in one forward pass with a tree attention mask, greedy or sampled (the model's own token at each node,
  drawn as plain sampling draws it, decides the path: a child is accepted with the model's probability of its token,
  not EAGLE's ``min(1, p / q)`` recursive rejection). transformers' assisted decoding
  (``assistant_model=eagle_assistant(model)``, the path for transformers' speculative sampling and for sliding-window
  models) verifies one chain per forward pass, so there the tree lives on the draft side only: the single best path of
  the beam search is verified, cut where its cumulative draft probability falls below ``min_confidence`` (EAGLE-2's
  dynamic draft length, applied to a chain), never longer than ``depth``. With sampling (``do_sample=True``) the chain
  is *sampled* from the draft distribution instead (width 1), and the draft logits go back to transformers, whose
  speculative-sampling rule (Leviathan et al.) keeps the target distribution exactly.
* **draft vocabulary**: the draft's LM head covers only the ``draft_vocab`` most frequent tokens of the training
  data (FR-Spec's idea; ``vocab_ids``, a buffer of the head), because the full 49,152-token LM head costs about a
  quarter of SmolLM2-135M's whole forward pass per draft step on a CPU. Verification uses the full vocabulary,
  so outputs are exact either way; ``draft_vocab=0`` keeps the full vocabulary.
* **initialisation**: the draft decoder layer starts from the weights of the target's last decoder layer and
  ``fc``'s feature half from the identity (the paper trains both from scratch), so that a short CPU training
  starts from "the next feature is this feature" rather than from noise.
* **training data and loss** (``hf_tokred.training.train_eagle``): the paper trains on ShareGPT conversations with
  a fixed dataset; we use the dense model's own greedy answers to training-split instruction prompts plus windows
  of training text (see :mod:`hf_tokred.recipes.lm_data`), with the paper's loss (smooth L1 on features plus 0.1 x
  cross-entropy of the draft's LM-head distribution against the target's next-token distribution) and its
  uniform feature noise U(-0.1, 0.1); the cross-entropy is over the draft vocabulary (target probabilities
  renormalised over it).
* **training-time test (an addition, off unless asked for)**: ``train_eagle(..., unroll=k)`` also trains the head
  on its own predicted features up to ``k`` steps deep (:func:`unrolled_features`), as EAGLE-3 (arXiv 2503.01840)
  and HASS (arXiv 2408.15766) do, so that drafting several tokens ahead sees at training what it sees at
  inference; the paper trains one step on the target's features only. EAGLE-3's other changes (fused features of
  several layers, token-only loss) are not taken: the head keeps EAGLE's architecture and loss.
* **retrieval drafts (an addition, off unless asked for)**: ``generate(..., assistant_model=eagle_assistant(model),
  prompt_lookup_num_tokens=N)`` combines EAGLE with prompt lookup the way SAM-Decoding (Hu et al., arXiv
  2411.10666) combines its retrieval with EAGLE: each round, where the context's last ``lookup_min_match`` or
  more tokens occurred earlier in the prompt or the answer so far (:func:`lookup_continuation`: the longest such
  match, the most recent one), the N tokens that followed it are the draft; elsewhere the draft head drafts as
  above. SAM-Decoding looks up a suffix automaton of the sequence and of a static corpus; we search the sequence
  only. Verification is unchanged, so outputs stay exact (with sampling, a retrieved draft comes without logits and
  transformers samples each position from the target and keeps the draft while they agree).
* **batch size**: transformers' assisted decoding runs batch 1 only; a batch of more rows raises
  :class:`~hf_tokred.errors.TokenReductionError` (ours, before generation starts).

Example:
    >>> import hf_tokred
    >>> from hf_tokred import eagle_assistant
    >>> model = AutoModelForCausalLM.from_pretrained("~/.cache/hf_tokred/smollm2-eagle")   # doctest: +SKIP
    >>> out = model.generate(**inputs, max_new_tokens=256, do_sample=False,
    ...                      assistant_model=eagle_assistant(model))                      # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import CACHE_KWARG
from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError

MODULE_NAME = "eagle"
# The paper's loss weights and feature noise (section 4: L = L_reg + w_cls * L_cls, w_cls = 0.1; U(-0.1, 0.1)).
CLS_WEIGHT = 0.1
FEATURE_NOISE = 0.1
LOOKUP_MAX_MATCH = 32  # suffix matches are compared up to this many tokens (longer ones are as good a signal)
# Rows of the token embedding whose norms (and block-parameter chunks) make up the base model's fingerprint.
SIGNATURE_ROWS = 16
SIGNATURE_CHUNKS = 8
SIGNATURE_RTOL = 2e-2


def base_signature(model, adapter) -> torch.Tensor:
    """A fingerprint of ``model``'s weights (float32, ``SIGNATURE_ROWS + SIGNATURE_CHUNKS`` values).

    The L2 norms of ``SIGNATURE_ROWS`` evenly spaced rows of the token embedding, then the mean absolute value of
    ``SIGNATURE_CHUNKS`` chunks of the first parameter of the last decoder block: stable across dtypes (a bf16 copy
    of the same model matches within :data:`SIGNATURE_RTOL`) and different between two trained models.

    Example:
        >>> base_signature(model, find_adapter(model)).shape                     # doctest: +SKIP
        torch.Size([24])
    """
    emb = model.get_input_embeddings().weight
    rows = torch.linspace(0, emb.shape[0] - 1, SIGNATURE_ROWS).round().long().to(emb.device)
    norms = emb.detach().index_select(0, rows).float().norm(dim=-1)
    last = next(p for p in adapter.blocks(model)[-1].parameters() if p.is_floating_point())
    flat = last.detach().float().flatten()
    chunks = torch.stack([c.abs().mean() for c in flat.chunk(SIGNATURE_CHUNKS)])
    if chunks.numel() < SIGNATURE_CHUNKS:
        chunks = torch.cat([chunks, chunks.new_zeros(SIGNATURE_CHUNKS - chunks.numel())])
    return torch.cat([norms, chunks]).cpu()


def signature_matches(stored: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether two :func:`base_signature` values come from the same base model (relative tolerance
    :data:`SIGNATURE_RTOL`)."""
    if stored.shape != current.shape:
        return False
    scale = current.abs().clamp_min(1e-6)
    return bool(((stored.float() - current.float()).abs() <= SIGNATURE_RTOL * scale).all())


def draft_layer_config(model):
    """A copy of the target's (text) config for a one-layer draft: ``num_hidden_layers=1``, SDPA attention, the
    first layer type that is full attention (no sliding window)."""
    config = copy.deepcopy(model.config.get_text_config(decoder=True))
    config.num_hidden_layers = 1
    config.use_cache = True
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        config.layer_types = ["full_attention" if "full_attention" in types else types[0]]
    if hasattr(config, "sliding_window") and getattr(config, "use_sliding_window", None) is not None:
        config.use_sliding_window = False
    config._attn_implementation = "sdpa"
    return config


class EagleHead(nn.Module):
    """EAGLE's draft head: ``fc`` (``2h -> h``) over ``[feature, next token's embedding]`` and one decoder layer.

    ``layer_cls`` is the class of the target's decoder blocks, built from ``layer_config``
    (:func:`draft_layer_config`); ``vocab_ids`` the draft vocabulary (empty: the full vocabulary);
    ``signature`` the :func:`base_signature` of the model it drafts for. The target's embedding, rotary module and
    LM head are passed in at call time (they are not part of the head). ``config`` is the draft layer's config
    (the target's vocabulary size, as transformers checks for an assistant).

    Example:
        >>> head = EagleHead(type(blocks[0]), draft_layer_config(model), torch.arange(8192), sig)   # doctest: +SKIP
        >>> features = head(features, embeds, rotary(features, positions))                     # doctest: +SKIP
    """

    def __init__(self, layer_cls: type, layer_config, vocab_ids: torch.Tensor, signature: torch.Tensor):
        super().__init__()
        hidden = layer_config.hidden_size
        self.config = layer_config
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = layer_cls(layer_config, 0)
        self.register_buffer("vocab_ids", vocab_ids.long().clone())
        self.register_buffer("base_signature", signature.float().clone())

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def generation_config(self):
        # transformers' own assisted decoding asks an assistant for this first: reaching it means the model that
        # generates does not have this head's wiring (hf_tokred.remove(model) ran, or another model was used).
        raise TokenReductionError(
            "eagle: this EAGLE draft head drafts only for the model it is attached to (hf_tokred.apply with method "
            "'eagle'); call generate(..., assistant_model=eagle_assistant(model)) on that model")

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor, position_embeddings, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """Predicted next features ``(batch, n, h)`` from features ``f_i`` and embeddings of ``x_{i+1}`` (same shape).

        ``position_embeddings`` are the target rotary module's ``(cos, sin)`` at the positions; ``attention_mask``
        a boolean ``(batch, 1, n, kv)`` mask (True: attend) or None (causal, no cache); ``cache`` the
        draft's own one-layer cache.
        """
        x = self.fc(torch.cat([features, token_embeds.to(features.dtype)], dim=-1))
        out = self.layer(x, attention_mask=attention_mask, position_ids=position_ids, **{CACHE_KWARG: cache},
                         use_cache=cache is not None, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    def draft_weight(self, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target LM head's weight (and bias) restricted to the draft vocabulary."""
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
        if self.vocab_ids.numel():
            weight = weight.index_select(0, self.vocab_ids)
            bias = bias.index_select(0, self.vocab_ids) if bias is not None else None
        return weight, bias


# ---------------------------------------------------------------------------------------------
# plain tensor functions (draft-side tree search, losses, vocabulary)
# ---------------------------------------------------------------------------------------------


def causal_mask(past: int, length: int, device=None) -> torch.Tensor:
    """Boolean ``(1, 1, length, past + length)`` mask: every new token sees the ``past`` cached ones and the new
    ones up to itself.

    Example:
        >>> causal_mask(1, 2).int().tolist()
        [[[[1, 1, 0], [1, 1, 1]]]]
    """
    mask = torch.ones(length, past + length, dtype=torch.bool, device=device)
    mask[:, past:] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return mask[None, None]


def tree_mask(past: int, ancestors: torch.Tensor) -> torch.Tensor:
    """Boolean ``(1, 1, w, past + t + w)`` mask of ``w`` new tree nodes: each sees the ``past`` committed entries,
    its ancestors among the ``t`` tree nodes already cached (``ancestors``: ``(w, t)`` booleans) and itself.

    Example:
        >>> tree_mask(1, torch.tensor([[True, False], [False, True]])).int()[0, 0].tolist()
        [[1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
    """
    w = ancestors.shape[0]
    head = torch.ones(w, past, dtype=torch.bool, device=ancestors.device)
    eye = torch.eye(w, dtype=torch.bool, device=ancestors.device)
    return torch.cat([head, ancestors, eye], dim=1)[None, None]


def unroll_mask(length: int, depth: int, device=None) -> torch.Tensor:
    """Boolean ``(1, 1, length, depth * length)`` mask of pass ``depth`` of training-time test
    (:func:`unrolled_features`): position ``j`` sees pass 1's entries up to ``j - depth + 1`` (the target's
    features), the entry of each later pass ``e`` at ``j - depth + e`` (the head's own earlier predictions), and
    itself: what the draft step at depth ``depth`` sees at inference. Pass 1 is the causal mask.

    Example:
        >>> unroll_mask(3, 2).int()[0, 0].tolist()
        [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]]
    """
    if depth == 1:
        return causal_mask(0, length, device)
    j = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    parts = [k <= j - (depth - 1)] + [k == j - (depth - e) for e in range(2, depth + 1)]
    return torch.cat(parts, dim=1)[None, None]


def unrolled_features(head: EagleHead, features: torch.Tensor, token_embeds: torch.Tensor, position_embeddings,
                      position_ids: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Training-time test (EAGLE-3, arXiv 2503.01840; HASS, arXiv 2408.15766): ``depth`` passes of the draft head
    over whole sequences, where pass ``d`` reads the features pass ``d - 1`` predicted, as drafting ``d`` tokens
    ahead does at inference.

    ``features`` ``(batch, n, h)`` are the target's features ``f_0..f_{n-1}``, ``token_embeds`` the embeddings of
    ``x_1..x_n``. Returns one ``(batch, n, h)`` tensor per pass: pass ``d``'s row ``j`` predicts ``f_{j+1}`` from
    the target's features up to ``j - d + 1`` and the head's own predictions after that (rows ``j < d - 1`` have
    no such history). Depth 1 is the head's plain forward (causal, no cache); deeper passes share one cache of the
    earlier passes' keys and values (:func:`unroll_mask`).

    Example:
        >>> outs = unrolled_features(head, feats, embeds, rotary(feats, pos), pos, 3)        # doctest: +SKIP
        >>> len(outs), outs[2].shape == feats.shape                                       # doctest: +SKIP
        (3, True)
    """
    from transformers import DynamicCache

    if depth == 1:
        return [head(features, token_embeds, position_embeddings, position_ids=position_ids)]
    cache, outs, length = DynamicCache(), [], features.shape[1]
    for d in range(1, depth + 1):
        inputs = features if d == 1 else torch.cat([features[:, :1], outs[-1][:, :-1]], dim=1)
        outs.append(head(inputs, token_embeds, position_embeddings, position_ids=position_ids, cache=cache,
                         attention_mask=unroll_mask(length, d, features.device)))
    return outs


def expand_beams(scores: torch.Tensor, logprobs: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """One depth of the draft tree: the ``width`` best children of ``w`` nodes by cumulative log-probability.

    ``scores`` ``(w,)`` are the nodes' cumulative log-probabilities, ``logprobs`` ``(w, V)`` their children's.
    Returns ``(parent, column, score)``: the parent node index, the child's column in ``logprobs`` and its
    cumulative score, best first.

    Example:
        >>> lp = torch.log(torch.tensor([[0.6, 0.4], [0.9, 0.1]]))
        >>> parent, column, score = expand_beams(torch.log(torch.tensor([0.7, 0.3])), lp, 2)
        >>> parent.tolist(), column.tolist(), [round(s, 2) for s in score.exp().tolist()]
        ([0, 0], [0, 1], [0.42, 0.28])
    """
    total = (scores[:, None] + logprobs).flatten()
    width = min(width, total.numel())
    score, flat = total.topk(width)
    return flat // logprobs.shape[1], flat % logprobs.shape[1], score


def best_chain(tokens: list[torch.Tensor], parents: list[torch.Tensor], scores: list[torch.Tensor],
               min_confidence: float) -> list[int]:
    """The best path of a draft tree (beams per depth, best first): the best beam of the deepest depth whose best
    cumulative probability is at least ``min_confidence`` (depth 1 at least), as token ids from the root.

    ``tokens[d]``, ``parents[d]`` (index into depth ``d - 1``) and ``scores[d]`` (cumulative log-probabilities,
    descending) describe depth ``d + 1``.

    Example:
        >>> toks = [torch.tensor([5, 6]), torch.tensor([7, 8])]
        >>> par = [torch.tensor([0, 0]), torch.tensor([1, 0])]
        >>> sc = [torch.log(torch.tensor([0.6, 0.3])), torch.log(torch.tensor([0.25, 0.2]))]
        >>> best_chain(toks, par, sc, 0.2), best_chain(toks, par, sc, 0.5)
        ([6, 7], [5])
    """
    threshold = torch.log(torch.tensor(max(min_confidence, 1e-30))).item()
    depth = 0
    for d in range(len(tokens)):
        if d == 0 or scores[d][0].item() >= threshold:
            depth = d
        else:
            break
    chain, node = [], 0
    for d in range(depth, -1, -1):
        chain.append(int(tokens[d][node]))
        node = int(parents[d][node])
    return chain[::-1]


def select_tree(tokens: list[torch.Tensor], parents: list[torch.Tensor], scores: list[torch.Tensor],
                count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EAGLE-2's re-ranking: the ``count`` nodes of a draft tree (beams per depth, as :func:`best_chain` takes them)
    with the highest cumulative draft log-probability, as the tree the target verifies.

    A child's cumulative score is never above its parent's, so the best ``count`` nodes (ties go to the shallower
    node) always include their ancestors. Returns ``(token, parent, depth)``, each ``(n,)``, ``n <= count``, in
    breadth-first order: ``parent`` indexes the returned nodes (-1: a child of the root, the last verified token),
    ``depth`` starts at 1.

    Example:
        >>> toks = [torch.tensor([5, 6]), torch.tensor([7, 8])]
        >>> par = [torch.tensor([0, 0]), torch.tensor([1, 0])]
        >>> sc = [torch.log(torch.tensor([0.6, 0.3])), torch.log(torch.tensor([0.25, 0.2]))]
        >>> [t.tolist() for t in select_tree(toks, par, sc, 3)]
        [[5, 6, 7], [-1, -1, 1], [1, 1, 2]]
    """
    flat_scores = torch.cat([s.float() for s in scores])
    depth_of = torch.cat([torch.full((s.numel(),), d, dtype=torch.long) for d, s in enumerate(scores)])
    # best first, shallower first among equals (a stable sort of scores already ordered by depth)
    order = torch.sort(flat_scores.cpu(), descending=True, stable=True).indices[:count].sort().values
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + s.numel())
    new_index = {int(flat): i for i, flat in enumerate(order)}
    token, parent, depth = [], [], []
    for flat in order.tolist():
        d = int(depth_of[flat])
        local = flat - offsets[d]
        token.append(int(tokens[d][local]))
        depth.append(d + 1)
        if d == 0:
            parent.append(-1)
        else:
            up = offsets[d - 1] + int(parents[d][local])
            if up not in new_index:  # cannot happen for log-probabilities (a child never outscores its parent)
                raise ValueError("select_tree: a selected node's parent was not selected")
            parent.append(new_index[up])
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return as_long(token), as_long(parent), as_long(depth)


def tree_verification_mask(past: int, parent: torch.Tensor) -> torch.Tensor:
    """Boolean ``(1, 1, 1 + n, past + 1 + n)`` mask of one tree verification: the root (the last verified token,
    not yet cached) and ``n`` draft nodes (``parent`` as :func:`select_tree` returns it, breadth-first); every row
    sees the ``past`` cached tokens, the root, its own ancestors and itself.

    Example:
        >>> tree_verification_mask(1, torch.tensor([-1, -1, 0])).int()[0, 0].tolist()
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 1, 0, 1]]
    """
    n = parent.shape[0]
    sees = torch.eye(1 + n, dtype=torch.bool)
    sees[:, 0] = True
    for i, up in enumerate(parent.tolist()):  # breadth-first: a parent's row is complete before its children's
        if up >= 0:
            sees[1 + i] |= sees[1 + up]
    head = torch.ones(1 + n, past, dtype=torch.bool)
    return torch.cat([head, sees], dim=1)[None, None].to(parent.device)


def lookup_continuation(ids: torch.Tensor, min_match: int, count: int, max_match: int = LOOKUP_MAX_MATCH) -> list[int]:
    """Retrieval draft (SAM-Decoding, arXiv 2411.10666, over the sequence itself): the ``count`` tokens that followed
    the most recent earlier occurrence of the longest suffix of ``ids`` (1-d), if that suffix is at least
    ``min_match`` tokens long (matches are compared up to ``max_match`` tokens); else ``[]``.

    Example:
        >>> ids = torch.tensor([7, 1, 2, 3, 9, 5, 1, 2, 3, 8, 4, 1, 2, 3])
        >>> lookup_continuation(ids, 3, 2), lookup_continuation(ids, 4, 2)
        ([8, 4], [])
    """
    n = ids.shape[0]
    if count < 1 or n <= min_match:
        return []
    ends = torch.arange(n - 1, device=ids.device)  # where an earlier occurrence ends (its continuation follows)
    length = torch.zeros(n - 1, dtype=torch.long, device=ids.device)
    alive = torch.ones(n - 1, dtype=torch.bool, device=ids.device)
    for k in range(min(max_match, n - 1)):
        starts = ends - k
        alive = alive & (starts >= 0) & (ids[starts.clamp_min(0)] == ids[n - 1 - k])
        if not bool(alive.any()):
            break
        length += alive.long()
    best = int(length.max())
    if best < min_match:
        return []
    end = int(torch.nonzero(length == best)[-1])  # the most recent of the longest matches
    return ids[end + 1:end + 1 + count].tolist()


def frequent_tokens(ids: torch.Tensor, count: int, vocab_size: int, always: list[int] | tuple = ()) -> torch.Tensor:
    """The ``count`` most frequent token ids of ``ids`` (ties by id), ``always`` included (e.g. the end token),
    sorted: a draft vocabulary (FR-Spec).

    Example:
        >>> frequent_tokens(torch.tensor([3, 3, 1, 2, 3, 1]), 2, 5).tolist()
        [1, 3]
        >>> frequent_tokens(torch.tensor([3, 3, 1, 2, 3, 1]), 2, 5, always=[4]).tolist()
        [3, 4]
    """
    if not 0 < count <= vocab_size:
        raise ConfigError(f"draft_vocab: expected 1..{vocab_size}, got {count}", field="draft_vocab")
    counts = torch.bincount(ids.flatten().long(), minlength=vocab_size)[:vocab_size].double()
    # a small decreasing bonus by id breaks ties deterministically; `always` wins over everything
    counts = counts - torch.arange(vocab_size, dtype=torch.double) / (2.0 * vocab_size)
    for token in always:
        if 0 <= int(token) < vocab_size:
            counts[int(token)] = float("inf")
    return counts.topk(count).indices.sort().values


def eagle_loss(predicted: torch.Tensor, target: torch.Tensor, draft_logits: torch.Tensor,
               target_logits: torch.Tensor, mask: torch.Tensor | None = None,
               cls_weight: float = CLS_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EAGLE's training loss: smooth L1 between predicted and target features plus ``cls_weight`` x the
    cross-entropy of the draft distribution against the target's distribution (soft labels).

    ``predicted``/``target`` ``(..., h)``; ``draft_logits``/``target_logits`` ``(..., V)`` over the same vocabulary;
    ``mask`` ``(...)`` selects the positions that count. Returns ``(loss, regression, classification)``.

    Example:
        >>> f = torch.zeros(2, 3)
        >>> loss, reg, cls = eagle_loss(f, f, torch.zeros(2, 4), torch.zeros(2, 4))
        >>> round(reg.item(), 4), round(cls.item(), 4)
        (0.0, 1.3863)
    """
    reg = F.smooth_l1_loss(predicted.float(), target.float(), reduction="none").mean(-1)
    p = target_logits.float().softmax(-1)
    cls = -(p * draft_logits.float().log_softmax(-1)).sum(-1)
    if mask is None:
        reg, cls = reg.mean(), cls.mean()
    else:
        weight = mask.float()
        total = weight.sum().clamp_min(1.0)
        reg, cls = (reg * weight).sum() / total, (cls * weight).sum() / total
    return reg + cls_weight * cls, reg, cls


# ---------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------


@register_method("eagle")
@dataclass(kw_only=True)
class EagleConfig(TokenReductionConfig):
    """EAGLE (arXiv 2401.15077): a one-decoder-layer draft head that drafts tokens at the feature level for the
    model it is attached to, verified by transformers' assisted generation (lossless).

    ``depth`` is the most tokens drafted per verification; ``top_k`` the width of the draft-side tree search (1: a
    greedy chain); ``min_confidence`` cuts the drafted chain where its cumulative draft probability falls below it;
    ``tree_tokens`` the draft nodes a tree verification checks in one forward pass (with
    ``custom_generate=hf_tokred.eagle_tree_decoding``; the chain path ignores it); ``draft_vocab`` the size of the
    draft vocabulary (0: the full vocabulary); ``lookup_min_match`` the shortest earlier match of the context's tail
    that drafts by lookup when ``generate()`` gets ``prompt_lookup_num_tokens`` (SAM-Decoding's retrieval draft).
    ``base_hidden_size``, ``base_vocab_size`` and ``base_num_layers`` record the model the head was trained for (0:
    not recorded; the recipe sets them) and ``base_model`` its name. Where we depart from the paper: see
    :mod:`hf_tokred.methods.lm.eagle`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="eagle", depth=5, top_k=4, draft_vocab=8192)
        >>> cfg.stage, cfg.depth, cfg.min_confidence
        ('decoding', 5, 0.25)
    """

    stage: ClassVar[str] = "decoding"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    learned: ClassVar[bool] = True
    paper: ClassVar[str] = "2401.15077"
    status: ClassVar[str] = "experimental"

    depth: int = param(6, int, low=1, high=64, help="most tokens drafted per verification (the chain's length cap)")
    top_k: int = param(4, int, low=1, high=64, help="draft-side tree width: the top-k expansions kept at each depth "
                                                   "(1 = a greedy chain); sampling always drafts a sampled chain")
    min_confidence: float = param(0.25, float, low=0.0, high=1.0,
                                  help="stop the drafted chain where its cumulative draft probability falls below "
                                       "this (EAGLE-2's dynamic draft length); 0 = always `depth` tokens")
    draft_vocab: int = param(8192, int, low=0, help="tokens of the draft's LM head: the most frequent tokens of the "
                                                    "training data (FR-Spec); 0 = the full vocabulary")
    # 3: the fastest on validation prompts on a CPU, where each verified token costs (docs/learned_lm.md)
    tree_tokens: int = param(3, int, low=1, high=64,
                             help="with generate(..., custom_generate=eagle_tree_decoding): draft nodes the model "
                                  "verifies per forward pass, the best by cumulative draft probability (EAGLE-2)")
    lookup_min_match: int = param(3, int, low=1, high=LOOKUP_MAX_MATCH,
                                  help="with generate(..., prompt_lookup_num_tokens=N): draft the N tokens that "
                                       "followed an earlier occurrence of the context's last tokens when at least "
                                       "this many match (SAM-Decoding's retrieval draft), else EAGLE's own draft")
    base_hidden_size: int = param(0, int, low=0, help="hidden size of the model the head was trained for (0: unset)")
    base_vocab_size: int = param(0, int, low=0, help="vocabulary size of the model the head was trained for (0: unset)")
    base_num_layers: int = param(0, int, low=0, help="decoder layers of the model the head was trained for (0: unset)")
    base_model: str = param("", str, help="name of the model the head was trained for (informative)")

    def check_base(self, model) -> None:
        """Raise :class:`ConfigError` (naming the field) when ``model`` is not the kind of model the head was
        trained for (hidden size, vocabulary size, layer count as recorded)."""
        text = model.config.get_text_config(decoder=True)
        actual = {"base_hidden_size": text.hidden_size, "base_vocab_size": model.get_input_embeddings().num_embeddings,
                  "base_num_layers": getattr(text, "num_hidden_layers", 0)}
        for name, value in actual.items():
            recorded = getattr(self, name)
            if recorded and recorded != value:
                what = name.removeprefix("base_").replace("_", " ")
                trained = f" ({self.base_model})" if self.base_model else ""
                raise ConfigError(
                    f"{name}: this EAGLE draft head was trained for a model{trained} with {what} {recorded}, and "
                    f"{type(model).__name__} has {value}; a draft head only works with the base model it was "
                    "trained for: train one for this model (hf-tokred train eagle)", field=name)

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The draft head (:class:`EagleHead`), fresh: ``fc`` drawn from the random state ``hf_tokred.apply`` seeds
        for every learned part (``LEARNED_INIT_SEED``; the caller's state is left alone), the decoder layer a copy of
        the target's last decoder layer, ``vocab_ids`` the first ``draft_vocab`` ids (the recipe replaces them with
        the most frequent ones).

        Checks first that the model is a causal LM whose recorded dimensions (if any) match.
        """
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise UnsupportedModelError(
                f"eagle: {type(model).__name__} cannot generate; EAGLE drafts for a causal LM (an ...ForCausalLM "
                "model) through generate(assistant_model=...)")
        if model.get_output_embeddings() is None or not hasattr(model.get_output_embeddings(), "weight"):
            raise UnsupportedModelError(f"eagle: {type(model).__name__} has no LM head (get_output_embeddings) "
                                        "for the draft head to reuse")
        self.check_base(model)
        vocab = model.get_input_embeddings().num_embeddings
        if self.draft_vocab > vocab:
            raise ConfigError(f"draft_vocab: {self.draft_vocab} is larger than the vocabulary of "
                              f"{type(model).__name__} ({vocab} tokens); use at most {vocab}, or 0 for all",
                              field="draft_vocab")
        blocks = adapter.blocks(model)
        last = blocks[-1]
        config = draft_layer_config(model)
        ref = next(p for p in last.parameters() if p.is_floating_point())
        head = EagleHead(type(last), config, torch.arange(self.draft_vocab), base_signature(model, adapter))
        with torch.no_grad():  # start as "the next feature is this feature" (the token half keeps its init)
            hidden = config.hidden_size
            head.fc.weight[:, :hidden].copy_(torch.eye(hidden))
            head.fc.bias.zero_()
        try:
            head.layer.load_state_dict(last.state_dict())
        except RuntimeError as err:  # a block whose state differs from a freshly built one (should not happen)
            raise UnsupportedModelError(f"eagle: cannot build a draft layer like {type(last).__name__}: {err}") from err
        return {MODULE_NAME: head.to(device=ref.device, dtype=ref.dtype)}


__all__ = ["EagleConfig", "EagleHead", "base_signature", "best_chain", "causal_mask", "draft_layer_config",
           "eagle_loss", "expand_beams", "frequent_tokens", "lookup_continuation", "select_tree", "signature_matches",
           "tree_mask", "tree_verification_mask", "unroll_mask", "unrolled_features"]
