"""EAGLE's tree verification, as a decoding method that transformers' ``generate()`` runs (``custom_generate``).

EAGLE (arXiv 2401.15077) and EAGLE-2 (arXiv 2406.16858) verify a whole draft *tree* in one forward pass of the
model: every node attends to the cached context, the last verified token and its own ancestors, so a round can
accept the longest path of the tree the model agrees with, not only one chain. transformers' assisted decoding
verifies one chain per forward pass (what ``assistant_model=eagle_assistant(model)`` runs); ``generate()`` also
accepts a decoding loop as a *callable* ``custom_generate`` (no remote code: the callable is ours, run after
``generate()``'s own input, cache, logits-processor and stopping-criteria preparation)::

    out = model.generate(**inputs, max_new_tokens=256, do_sample=False, custom_generate=hf_tokred.eagle_tree_decoding)

Each round (:func:`eagle_tree_decoding`):

1. the draft head reads the target's features of the tokens verified last round and runs its beam search (width
   ``top_k``, at most ``depth`` deep); the ``tree_tokens`` nodes with the highest cumulative draft probability
   are the tree (:func:`~hf_tokred.methods.lm.eagle.select_tree`, EAGLE-2's re-ranking);
2. the model runs the last verified token and the tree in one forward pass with a tree attention mask
   (:func:`~hf_tokred.methods.lm.eagle.tree_verification_mask`) and each node at its depth's position;
3. from the root, the model's token at each accepted node is appended, picked as plain ``generate()`` picks it
   (the generation's logits processors, and with ``do_sample=True`` its warpers, on the sequence so far; then the
   argmax, or one ``torch.multinomial`` draw); while a child of that node drafted that token the walk goes on; the
   first token no child drafted ends the round (the model's own token);
4. the cache keeps the entries of the accepted path and drops the other nodes'.

Greedy, the output is the model's greedy output. Sampling, every token is a draw from the model's own
distribution given the sequence so far, so the output follows that distribution exactly; under a seed it is the
very sequence plain sampling draws (one draw per token from the same generator, in the same order). Where we depart
from EAGLE: its sampling verifies the tree by recursive rejection (SpecInfer's multi-step speculative sampling),
accepting a drafted child with probability ``min(1, p / q)`` of the model's and the draft's probabilities; ours
accepts a child with the model's probability ``p`` of its token (never more than ``min(1, p / q)``), which needs
no draft distribution (lookup chains and beam-search nodes have none) and keeps the seeded sequence.

With ``prompt_lookup_num_tokens=N`` a round whose context ends in ``lookup_min_match`` tokens that occurred earlier
verifies the N tokens that followed them instead (a chain, as with the assistant). Batch 1, over transformers'
``DynamicCache`` of full-attention layers or the ``TokenReductionCache`` of a KV policy that compresses the prompt
once (``snapkv``, ``pyramidkv``, ``fastgen``: the prompt is compressed in the first forward pass, each round's tree
appended and its rejected nodes dropped again, so the output is that policy's own plain output). Beam search, a
batch of more rows, a cache that evicts or compresses while decoding, and sliding-window layers raise
:class:`~hf_tokred.errors.TokenReductionError` before the first forward pass.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..attention import mask_like
from ..compat import CACHE_KWARG, cache_in
from ..errors import TokenReductionError
from ..kv.cache import ReducingLayer, TokenReductionCache, keep_newest_entries, layer_refusing_keep_newest
from ..kv.policy import prompt_once_policies
from ..methods.lm.eagle import lookup_continuation, tree_verification_mask
from .eagle import EagleCandidateGenerator, eagle_assistant
from .wiring import get_applied

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@torch.no_grad()
def eagle_tree_decoding(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
                        tree_tokens: int | None = None, **model_kwargs):
    """Greedy decoding or sampling with EAGLE's draft tree verified in one forward pass per round; pass it to
    ``generate()``.

    ``generate()`` calls it with the prepared inputs (``custom_generate=eagle_tree_decoding``); the model must carry
    an EAGLE reduction (``hf_tokred.apply(model, {"method": "eagle", ...}, weights_from=folder)`` or
    ``from_pretrained`` of a folder saved with one). ``tree_tokens``, ``top_k``, ``depth`` and ``lookup_min_match``
    of that reduction shape the tree; ``generate(..., tree_tokens=N)`` sets the nodes verified per round for this
    call only. Returns the sequences (or a ``GenerateDecoderOnlyOutput`` with the cache when
    ``return_dict_in_generate=True``); the decode statistics of the call are left at
    ``model.hf_tokred_eagle_tree_stats`` (rounds, verified nodes, accepted drafts).

    Example:
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=hf_tokred.eagle_tree_decoding)               # doctest: +SKIP
    """
    head = eagle_assistant(model)  # raises when the model has no EAGLE reduction
    reducer = get_applied(model).config.get("decoding")
    if tree_tokens is not None:
        reducer = dataclasses.replace(reducer, tree_tokens=tree_tokens)  # validated as the config field is
    cache = cache_in(model_kwargs)
    mask_dtype = _mask_dtype(model)
    _check_request(model, input_ids, generation_config, model_kwargs, cache, mask_dtype)
    drafter = EagleCandidateGenerator(model, head, reducer, generation_config, logits_processor)
    stats = {"rounds": 0, "verified_nodes": 0, "accepted": 0, "lookup_rounds": 0}
    model.__dict__["hf_tokred_eagle_tree_stats"] = stats

    done = cache.get_seq_length()  # tokens a given cache already holds (a reused prompt prefix)
    if done >= input_ids.shape[1]:
        raise TokenReductionError(f"eagle_tree_decoding: the given cache already holds {done} tokens, the whole "
                                  f"prompt of {input_ids.shape[1]}; pass a cache of a prefix of the prompt")
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=input_ids[:, done:], **{CACHE_KWARG: cache}, use_cache=True, output_hidden_states=-1,
                **last_only)
    _check_cache_layers(cache)  # again: a cache built without a config creates its layers in the first forward pass
    sample = bool(generation_config.do_sample)
    sequence = _append(input_ids, logits_processor, out.logits[0, -1:], sample)
    features = out.hidden_states[-1][0]
    while not bool(stopping_criteria(sequence, None).any()):
        root = drafter.feed(sequence, features)[-1:]
        room = generation_config.max_length - sequence.shape[1] - 1  # drafts that can still be accepted
        tokens, parent, depth = _draft(drafter, reducer, sequence, root, room, stats)
        past = cache.get_seq_length()
        mask = tree_verification_mask(past, parent).to(sequence.device)
        depth = depth.to(sequence.device)
        step = torch.cat([sequence[:, -1:], tokens[None].to(sequence)], dim=-1)
        out = model(input_ids=step, attention_mask=mask_like(mask, mask.new_empty(0, dtype=mask_dtype)),
                    position_ids=(past + torch.cat([depth.new_zeros(1), depth]))[None], **{CACHE_KWARG: cache},
                    use_cache=True, output_hidden_states=-1)
        rows, sequence, finished = _accept(out.logits[0], tokens, parent, sequence, logits_processor,
                                           stopping_criteria, sample)
        stats["rounds"] += 1
        stats["verified_nodes"] += tokens.numel()
        stats["accepted"] += len(rows) - 1
        keep_newest_entries(cache, step.shape[1], rows)
        if finished:
            break
        features = out.hidden_states[-1][0][rows]
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequence, **{CACHE_KWARG: cache})
    return sequence


def _check_request(model, input_ids, generation_config, model_kwargs, cache, mask_dtype) -> None:
    """Everything tree verification cannot do, refused before the first forward pass."""
    if (generation_config.num_beams or 1) > 1:
        raise TokenReductionError(
            f"eagle_tree_decoding: greedy decoding or sampling (num_beams=1), got num_beams="
            f"{generation_config.num_beams}; beam search has no draft tree to verify")
    if input_ids.shape[0] != 1:
        raise TokenReductionError(
            f"eagle_tree_decoding: verifies one sequence at a time; got a batch of {input_ids.shape[0]}: call "
            "generate() once per prompt")
    asked = [name for name in _UNSUPPORTED_OUTPUTS if getattr(generation_config, name, False)]
    if asked:
        raise TokenReductionError(f"eagle_tree_decoding: returns the sequences (and the cache) only; "
                                  f"{', '.join(asked)} cannot be given: leave them unset")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise TokenReductionError("eagle_tree_decoding: the attention_mask has padding; pass the prompt unpadded")
    if not model_kwargs.get("use_cache", True) or cache is None:
        raise TokenReductionError("eagle_tree_decoding: needs the KV cache (use_cache=True)")
    if type(cache).__name__ != "DynamicCache" and not isinstance(cache, TokenReductionCache):
        raise TokenReductionError(
            f"eagle_tree_decoding: keeps a tree's accepted path in transformers' DynamicCache or a KV policy's "
            f"TokenReductionCache, got {type(cache).__name__} (a static or offloaded cache); leave the cache "
            "unset or pass a DynamicCache")
    _check_cache_layers(cache)
    if mask_dtype is None:
        raise TokenReductionError(
            f"eagle_tree_decoding: the model's attn_implementation {model.config._attn_implementation!r} cannot take "
            "a tree attention mask; use sdpa or eager")


def _check_cache_layers(cache) -> None:
    refusing = layer_refusing_keep_newest(cache)
    if isinstance(refusing, ReducingLayer):
        raise TokenReductionError(
            f"eagle_tree_decoding: layer {refusing.layer_idx} of the {refusing.label} cache cannot take tokens back "
            "(its policy evicts or compresses while decoding, or the layer slides a window), so a tree's rejected "
            f"nodes could not be dropped from it; a policy that compresses the prompt once "
            f"({', '.join(prompt_once_policies())}) on full-attention layers works, or decode over a DynamicCache")
    if refusing is not None:
        raise TokenReductionError(
            f"eagle_tree_decoding: the cache has a {type(refusing).__name__} (sliding-window attention): a tree's "
            "rejected nodes cannot be taken back from it exactly; use generate(..., "
            "assistant_model=eagle_assistant(model)) for this model")


def _mask_dtype(model):
    """``torch.bool`` for SDPA-style attention, the model's float dtype (additive mask) for eager, None otherwise."""
    implementation = str(model.config._attn_implementation or "eager")
    if implementation.endswith("sdpa"):
        return torch.bool
    if implementation.endswith("eager"):
        return model.dtype
    return None


def _draft(drafter, reducer, sequence, root, room, stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The round's draft tree ``(tokens, parent, depth)`` (as :func:`~hf_tokred.methods.lm.eagle.select_tree`
    returns it): a lookup chain where the context repeats itself (with ``prompt_lookup_num_tokens``), else the
    head's tree; empty when no draft can be accepted any more."""
    if room < 1:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    chain = lookup_continuation(sequence[0], reducer.lookup_min_match, min(drafter.lookup_tokens, room))
    if chain:
        stats["lookup_rounds"] += 1
        return torch.tensor(chain, dtype=torch.long), torch.arange(-1, len(chain) - 1), torch.arange(1, len(chain) + 1)
    return drafter.draft_tree(root, min(reducer.depth, room))


def _append(sequence: torch.Tensor, logits_processor, logits: torch.Tensor, sample: bool) -> torch.Tensor:
    """``sequence`` with the model's token for ``logits`` (one row) appended, as plain ``generate()`` picks it: the
    logits processors (with sampling: the warpers too) on the sequence so far, then the argmax or one draw of
    ``torch.multinomial`` from their softmax (the same draw, from the same generator, as plain sampling)."""
    scores = logits.float()
    if logits_processor is not None:
        scores = logits_processor(sequence, scores)
    token = torch.multinomial(scores.softmax(-1), 1) if sample else scores.argmax(-1, keepdim=True)
    return torch.cat([sequence, token.to(sequence.dtype)], dim=-1)


def _accept(logits, tokens, parent, sequence, logits_processor, stopping_criteria, sample):
    """Walk the verified tree from the root: append the model's token at each accepted node (greedy, or drawn with
    ``sample``); go on to the child that drafted it. Returns the accepted rows (the root's 0 and each accepted node's
    ``1 + index``), the sequence and whether a stopping criterion ended the generation."""
    rows, node = [0], -1
    children = {}
    for i, (up, token) in enumerate(zip(parent.tolist(), tokens.tolist())):
        children.setdefault((up, token), i)
    while True:
        sequence = _append(sequence, logits_processor, logits[rows[-1]][None], sample)
        if bool(stopping_criteria(sequence, None).any()):
            return rows, sequence, True
        child = children.get((node, int(sequence[0, -1])))
        if child is None:
            return rows, sequence, False
        rows.append(1 + child)
        node = child


__all__ = ["eagle_tree_decoding"]
