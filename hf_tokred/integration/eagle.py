"""Wiring of EAGLE (stage ``"decoding"``): the draft head as an assistant of transformers' assisted generation.

``hf_tokred.apply(model, {"method": "eagle", ...}, weights_from=folder)`` (or ``from_pretrained`` of a folder saved
with it) attaches the draft head (:class:`~hf_tokred.methods.lm.eagle.EagleHead`) at
``model.hf_tokred_modules["eagle"]`` and gives the model an instance-level ``_get_candidate_generator`` (undone by
``hf_tokred.remove``). Plain ``generate()`` is unchanged (dense); drafting is asked for the transformers way::

    from hf_tokred import eagle_assistant
    out = model.generate(**inputs, max_new_tokens=256, assistant_model=eagle_assistant(model))

When the ``assistant_model`` is the model's own EAGLE head, transformers' ``_assisted_decoding`` gets an
:class:`EagleCandidateGenerator`: a ``CandidateGenerator`` with ``requires_model_outputs = True`` whose
``model_kwargs_overrides`` ask the target's forward pass for its last hidden state (``output_hidden_states=-1``),
so every round it receives the target's features of the tokens just verified. The first round lets the target
run the prompt alone (no features yet); from then on each round

1. feeds the verified tokens' features (and the embeddings of the tokens one step ahead) to the draft head,
   cropping the draft's own one-layer cache back to the verified prefix first;
2. drafts a chain: greedy decoding runs a draft-side tree search (width ``top_k``, one draft call per depth,
   tree attention mask) and returns the best path; sampling draws a chain from the draft distribution and
   returns its logits (full vocabulary, ``-inf`` outside the draft vocabulary, after the generation's logits
   processors), which transformers' speculative sampling needs to keep the target distribution;
3. stops at ``depth`` tokens, where the chain's cumulative draft probability falls below ``min_confidence``, or
   where ``max_length`` would be passed.

With ``prompt_lookup_num_tokens=N`` as well, a round whose context ends in ``lookup_min_match`` or more tokens that
occurred earlier drafts the N tokens that followed them instead (SAM-Decoding's retrieval draft; see
:mod:`hf_tokred.methods.lm.eagle`); the draft head still reads that round's features.

transformers verifies the chain in one forward pass and keeps the longest prefix the target agrees with, plus the
target's own next token: greedy outputs are the target's greedy outputs. (Greedy decoding can verify the whole draft
tree in one forward pass instead: ``generate(..., custom_generate=hf_tokred.eagle_tree_decoding)``, in
:mod:`hf_tokred.integration.eagle_tree`, which drafts with this generator's head and cache.) Batch 1 only
(transformers' assisted decoding): a batch of more rows raises :class:`~hf_tokred.errors.TokenReductionError` before
anything runs. Composed with a KV policy that compresses the prompt once (snapkv, pyramidkv, fastgen), EAGLE drafts
over that compressed cache (rejected drafts are cropped off it; greedy outputs equal the policy's own plain greedy
outputs); a policy that evicts while decoding, a KV storage or a prefill reducer refuses assisted decoding before it
runs (their caches cannot take tokens back).
"""

from __future__ import annotations

import functools
import types

import torch
from transformers.generation.candidate_generator import CandidateGenerator

from ..errors import TokenReductionError
from ..methods.lm.eagle import (
    MODULE_NAME,
    EagleHead,
    base_signature,
    best_chain,
    causal_mask,
    expand_beams,
    lookup_continuation,
    select_tree,
    signature_matches,
    tree_mask,
)
from .cpu_linear import linear_as
from .transformers import skip_cached_prefix_of_call, wrap_candidate_factory
from .wiring import MODULES_ATTR, get_applied, register_wiring


@register_wiring("decoding")
def wire_eagle(model, adapter, reducer, applied) -> None:
    """Check the head was trained for this model (fingerprint), then route ``assistant_model=<the head>`` to
    :class:`EagleCandidateGenerator` through an instance-level ``_get_candidate_generator``."""
    head = model._modules[MODULES_ATTR][MODULE_NAME]
    current = base_signature(model, adapter)
    if not signature_matches(head.base_signature.detach().cpu(), current):
        trained = f" ({reducer.base_model})" if reducer.base_model else ""
        raise TokenReductionError(
            f"eagle: this draft head was trained for another base model{trained}: its fingerprint of the base "
            f"weights (base_signature) does not match {type(model).__name__}'s; a draft head only drafts well for "
            "the model it was trained on: train one for this model (hf-tokred train eagle)")
    from ..model_patches.rope import _rotary_module

    attention = adapter.attention_modules(model)[0]
    rotary = _rotary_module(model, adapter, attention)
    if rotary is None:
        raise TokenReductionError(f"eagle: {type(model).__name__} has no rotary embedding module hf_tokred can find "
                                  "for the draft layer's positions")
    model.__dict__["_hf_tokred_eagle_rotary"] = rotary  # a reference, not a submodule (not saved with the head)
    # other assistants go to the factory in place before (another reduction's wrapper, e.g. gist's), else the class's
    wrap_candidate_factory(model, applied, lambda previous: types.MethodType(
        functools.partial(_get_candidate_generator, previous=previous), model))
    applied.add_undo(lambda: model.__dict__.pop("_hf_tokred_eagle_rotary", None))


def eagle_assistant(model) -> EagleHead:
    """The draft head to pass as ``generate(..., assistant_model=...)`` to the model that carries it.

    Example:
        >>> out = model.generate(**inputs, assistant_model=hf_tokred.eagle_assistant(model), max_new_tokens=64)  # doctest: +SKIP
    """
    applied = get_applied(model)
    reducer = applied.config.get("decoding") if applied is not None else None
    if reducer is None or reducer.method != "eagle":
        raise TokenReductionError("eagle_assistant: the model has no EAGLE reduction attached; load a folder trained "
                                  "with `hf-tokred train eagle` (from_pretrained) or hf_tokred.apply(model, cfg, "
                                  "weights_from=folder) first")
    return model._modules[MODULES_ATTR][MODULE_NAME]


def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                             assistant_model=None, target_tokenizer=None, assistant_tokenizer=None, *, previous):
    applied = get_applied(self)
    modules = self._modules.get(MODULES_ATTR)
    head = modules[MODULE_NAME] if applied is not None and modules is not None and MODULE_NAME in modules else None
    if assistant_model is None or head is None or assistant_model is not head:
        if isinstance(assistant_model, EagleHead):
            raise TokenReductionError("eagle: this draft head belongs to another model; pass "
                                      "assistant_model=eagle_assistant(model) of the model that generates")
        return previous(generation_config=generation_config, input_ids=input_ids, inputs_tensor=inputs_tensor,
                        logits_processor=logits_processor, model_kwargs=model_kwargs, assistant_model=assistant_model,
                        target_tokenizer=target_tokenizer, assistant_tokenizer=assistant_tokenizer)
    if input_ids.shape[0] != 1:
        raise TokenReductionError(
            f"eagle: assisted generation drafts for one sequence at a time (transformers' assisted decoding runs "
            f"batch 1 only); got a batch of {input_ids.shape[0]}: call generate() once per prompt")
    if generation_config.assistant_early_exit is not None:
        raise TokenReductionError("eagle: assistant_model=eagle_assistant(model) cannot be combined with "
                                  "assistant_early_exit")
    if generation_config.prompt_lookup_num_tokens is not None and generation_config.max_matching_ngram_size:
        raise TokenReductionError(
            "eagle: with assistant_model=eagle_assistant(model), prompt_lookup_num_tokens drafts from the longest "
            "earlier match of the context's last tokens (at least the reduction's lookup_min_match); "
            "max_matching_ngram_size does not apply: leave it unset and set lookup_min_match instead")
    generator = EagleCandidateGenerator(self, head, applied.config.get("decoding"), generation_config, logits_processor)
    skip_cached_prefix_of_call(self, model_kwargs)
    return generator


class EagleCandidateGenerator(CandidateGenerator):
    """transformers ``CandidateGenerator`` that drafts with EAGLE's head from the target's features.

    ``requires_model_outputs``: transformers passes the target's last forward outputs (with the last hidden state,
    asked for by ``model_kwargs_overrides``) to :meth:`get_candidates` every round. ``stats`` counts the rounds,
    the tokens drafted, the draft calls and the rounds drafted by lookup of this generation.
    """

    requires_model_outputs = True
    model_kwargs_overrides = {"output_hidden_states": -1}

    def __init__(self, model, head: EagleHead, reducer, generation_config, logits_processor):
        from transformers import DynamicCache

        self.model, self.head, self.reducer = model, head, reducer
        self.embed = model.get_input_embeddings()
        self.rotary = model.__dict__["_hf_tokred_eagle_rotary"]
        lm_head = model.get_output_embeddings()
        # the LM head over the draft vocabulary, packed for oneDNN where the model's is (cpu_linear)
        self.draft_lm_head = linear_as(lm_head, *head.draft_weight(lm_head))
        self.vocab_ids = head.vocab_ids if head.vocab_ids.numel() else None
        self.vocab_size = lm_head.weight.shape[0]
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.max_length = generation_config.max_length
        self.lookup_tokens = generation_config.prompt_lookup_num_tokens or 0
        self.cache = DynamicCache()
        self.fed = 0  # verified tokens the draft has read (input i: feature of token i, embedding of token i+1)
        self.held = 0  # of them, entries in the draft's cache (fewer when the target's cache began with a prefix)
        self.stats = {"rounds": 0, "drafted": 0, "draft_calls": 0, "lookup_rounds": 0}

    # -- the draft head, one call ---------------------------------------------------------

    def _step(self, features, tokens, positions, mask):
        pos = positions[None]
        embeds = self.embed(tokens)[None]
        feats = features[None].to(self.head.fc.weight.dtype)
        position_embeddings = self.rotary(feats, pos)
        self.stats["draft_calls"] += 1
        return self.head(feats, embeds, position_embeddings, attention_mask=mask, position_ids=pos,
                         cache=self.cache)[0]

    def _logits(self, features):
        return self.draft_lm_head(features).float()

    def _ids(self, columns):
        return self.vocab_ids[columns] if self.vocab_ids is not None else columns

    def feed(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Give the head the target's features ``(n, h)`` of the verified tokens it has not seen (``input_ids``:
        the verified sequence, batch 1); returns its predicted next features there (the last row drafts the
        token after ``input_ids``). The head's cache is first cropped back to the verified prefix."""
        length = input_ids.shape[1]
        new = length - 1 - self.fed  # verified tokens whose features the draft has not seen
        if new > features.shape[0]:  # the target was given a cache with earlier tokens: start after them
            self.fed += new - features.shape[0]
            new = features.shape[0]
        features = features[:new]
        extra = self.cache.get_seq_length() - self.held  # the last round's draft nodes
        if extra > 0:
            self.cache.crop(-extra)
        tokens = input_ids[0, self.fed + 1:self.fed + 1 + new]
        positions = torch.arange(self.fed, self.fed + new, device=features.device)
        mask = causal_mask(self.held, new, features.device) if (new > 1 or self.held) else None
        out = self._step(features, tokens, positions, mask)
        self.fed += new
        self.held += new
        return out

    # -- transformers' interface ----------------------------------------------------------

    @torch.no_grad()
    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False,
                       n_last_matches=0, **kwargs):
        if is_first_iteration or model_outputs is None:
            return input_ids, None  # the target runs the prompt first: the draft needs its features
        hidden = getattr(model_outputs, "hidden_states", None)
        if not hidden:
            raise TokenReductionError("eagle: the target's forward pass returned no hidden states for the draft head")
        out = self.feed(input_ids, hidden[-1][0])
        length = input_ids.shape[1]
        room = self.max_length - length - 1
        if room < 1:
            return input_ids, None
        self.stats["rounds"] += 1
        chain = lookup_continuation(input_ids[0], self.reducer.lookup_min_match, min(self.lookup_tokens, room))
        if chain:  # a retrieved draft: verified like any other (with sampling: token by token, no draft logits)
            self.stats["lookup_rounds"] += 1
            logits = None
        elif self.do_sample:
            chain, logits = self._sample_chain(input_ids, out[-1:], min(self.reducer.depth, room))
        else:
            chain, logits = self._tree_chain(out[-1:], min(self.reducer.depth, room)), None
        self.stats["drafted"] += len(chain)
        candidates = torch.cat([input_ids, torch.tensor([chain], dtype=input_ids.dtype, device=input_ids.device)], -1)
        return candidates, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        return None

    @property
    def num_drafting_tokens(self) -> int:
        """Most tokens one round drafts (transformers 5.24+ asks, to size what a cache records for rollback)."""
        return max(self.reducer.depth, self.lookup_tokens)

    # -- drafting ---------------------------------------------------------------------------

    def _tree_chain(self, root: torch.Tensor, budget: int) -> list[int]:
        """Greedy: beam search of width ``top_k`` over the draft tree; the best path (cut by confidence)."""
        cut = self.reducer.min_confidence
        tokens, parents, scores = self.draft_beams(root, budget, lambda scores: scores[-1][0].exp().item() >= cut)
        return best_chain(tokens, parents, scores, cut)

    def draft_tree(self, root: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tree a tree verification checks (:func:`select_tree`): the ``tree_tokens`` best nodes of a beam
        search at most ``budget`` deep; the search stops once a depth's best node could not enter them."""
        count = self.reducer.tree_tokens

        def can_enter(scores):
            best = scores[-1][0]
            return sum(int((s > best).sum()) for s in scores[:-1]) < count

        return select_tree(*self.draft_beams(root, budget, can_enter), count)

    def draft_beams(self, root: torch.Tensor, budget: int, deeper) -> tuple[list, list, list]:
        """Beam search of width ``top_k`` over the draft tree from ``root`` (the head's last predicted feature),
        at most ``budget`` deep, going one depth deeper while ``deeper(scores)`` holds; the tokens, parents and
        cumulative log-probabilities of every depth, best first (as :func:`best_chain` takes them)."""
        width = self.reducer.top_k
        logprobs = self._logits(root).log_softmax(-1)
        parent, column, score = expand_beams(logprobs.new_zeros(1), logprobs, width)
        tokens, parents, scores = [self._ids(column)], [parent], [score]
        feats = root.expand(column.shape[0], -1)
        ancestors = torch.zeros(column.shape[0], 0, dtype=torch.bool, device=root.device)
        for d in range(1, budget):
            if not deeper(scores):
                break
            w = column.shape[0]
            mask = tree_mask(self.held, ancestors)
            positions = torch.full((w,), self.fed + d - 1, device=root.device)
            out = self._step(feats, tokens[-1], positions, mask)
            logprobs = self._logits(out).log_softmax(-1)
            parent, column, score = expand_beams(score, logprobs, width)
            tokens.append(self._ids(column))
            parents.append(parent)
            scores.append(score)
            with_self = torch.cat([ancestors, torch.eye(w, dtype=torch.bool, device=root.device)], 1)
            ancestors = with_self[parent]
            feats = out[parent]
        return tokens, parents, scores

    def _sample_chain(self, input_ids: torch.Tensor, root: torch.Tensor, budget: int):
        """Sampling: a chain drawn from the draft distribution (after the logits processors) and its logits."""
        cut = self.reducer.min_confidence
        chain, rows, feats, sequence, confidence = [], [], root, input_ids, 1.0
        for d in range(budget):
            if d:
                mask = causal_mask(self.held + d - 1, 1, root.device)
                positions = torch.tensor([self.fed + d - 1], device=root.device)
                feats = self._step(feats, sequence[0, -1:], positions, mask)
            logits = torch.full((1, self.vocab_size), float("-inf"), device=root.device)
            draft = self._logits(feats)
            if self.vocab_ids is not None:
                logits[0, self.vocab_ids] = draft[0]
            else:
                logits = draft.clone()
            if self.logits_processor is not None and len(self.logits_processor):
                logits = self.logits_processor(sequence, logits)
            probs = logits.softmax(-1)
            token = torch.multinomial(probs, 1)
            rows.append(logits)
            chain.append(int(token))
            sequence = torch.cat([sequence, token.to(sequence.dtype)], -1)
            confidence *= float(probs[0, token])
            if confidence < cut:
                break
        return chain, torch.stack(rows, 1)


__all__ = ["EagleCandidateGenerator", "eagle_assistant", "wire_eagle"]
