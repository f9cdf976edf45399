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
3. from the root, the model's greedy token at each accepted node (after the generation's logits processors, on
   the sequence so far, as plain greedy decoding computes it) is appended; while a child of that node drafted
   that token the walk goes on; the first token no child drafted ends the round (the model's own token);
4. the cache keeps the entries of the accepted path and drops the other nodes'.

The output is the model's greedy output. With ``prompt_lookup_num_tokens=N`` a round whose context ends in
``lookup_min_match`` tokens that occurred earlier verifies the N tokens that followed them instead (a chain, as
with the assistant). Greedy decoding, batch 1 and transformers' ``DynamicCache`` of full-attention layers only:
sampling, a batch of more rows, a KV policy's cache or sliding-window layers raise
:class:`~hf_tokred.errors.TokenReductionError` before the first forward pass (the chain assistant covers those).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..attention import mask_like
from ..errors import TokenReductionError
from ..methods.lm.eagle import lookup_continuation, tree_verification_mask
from .eagle import EagleCandidateGenerator, eagle_assistant
from .wiring import get_applied

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@torch.no_grad()
def eagle_tree_decoding(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
                        tree_tokens: int | None = None, **model_kwargs):
    """Greedy decoding with EAGLE's draft tree verified in one forward pass per round; pass it to ``generate()``.

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
    cache = model_kwargs.get("past_key_values")
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
    out = model(input_ids=input_ids[:, done:], past_key_values=cache, use_cache=True, output_hidden_states=-1,
                **last_only)
    _check_cache_layers(cache)  # again: a cache built without a config creates its layers in the first forward pass
    sequence = _append(input_ids, logits_processor, out.logits[0, -1:])
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
                    position_ids=(past + torch.cat([depth.new_zeros(1), depth]))[None], past_key_values=cache,
                    use_cache=True, output_hidden_states=-1)
        rows, sequence, finished = _accept(out.logits[0], tokens, parent, sequence, logits_processor,
                                           stopping_criteria)
        stats["rounds"] += 1
        stats["verified_nodes"] += tokens.numel()
        stats["accepted"] += len(rows) - 1
        keep_newest_entries(cache, step.shape[1], rows)
        if finished:
            break
        features = out.hidden_states[-1][0][rows]
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequence, past_key_values=cache)
    return sequence


def keep_newest_entries(cache, count: int, rows: list[int]) -> None:
    """Keep, of the newest ``count`` entries of every layer of a transformers ``DynamicCache``, only ``rows``
    (indices among those ``count``, ascending): a tree verification's accepted path.

    Example:
        >>> keep_newest_entries(cache, 9, [0, 1, 4])   # the root and two accepted nodes of 8   # doctest: +SKIP
    """
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        index = torch.tensor(rows, dtype=torch.long, device=layer.keys.device)
        newest_keys, newest_values = layer.keys[..., -count:, :], layer.values[..., -count:, :]
        layer.keys = torch.cat([layer.keys[..., :-count, :], newest_keys.index_select(-2, index)], dim=-2)
        layer.values = torch.cat([layer.values[..., :-count, :], newest_values.index_select(-2, index)], dim=-2)


def _check_request(model, input_ids, generation_config, model_kwargs, cache, mask_dtype) -> None:
    """Everything tree verification cannot do, refused before the first forward pass."""
    if generation_config.do_sample or (generation_config.num_beams or 1) > 1:
        raise TokenReductionError(
            "eagle_tree_decoding: greedy decoding only (do_sample=False, num_beams=1); for sampling use "
            "generate(..., assistant_model=eagle_assistant(model)), whose verification keeps the model's distribution")
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
    if type(cache).__name__ != "DynamicCache":
        raise TokenReductionError(
            f"eagle_tree_decoding: keeps a tree's accepted path in transformers' DynamicCache only, got "
            f"{type(cache).__name__} (a KV policy or a static cache); use generate(..., "
            "assistant_model=eagle_assistant(model)) over a KV policy's cache")
    _check_cache_layers(cache)
    if mask_dtype is None:
        raise TokenReductionError(
            f"eagle_tree_decoding: the model's attn_implementation {model.config._attn_implementation!r} cannot take "
            "a tree attention mask; use sdpa or eager")


def _check_cache_layers(cache) -> None:
    other = next((layer for layer in cache.layers if type(layer) is not DynamicLayer), None)
    if other is not None:
        raise TokenReductionError(
            f"eagle_tree_decoding: the cache has a {type(other).__name__} (sliding-window attention): a tree's "
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


def _append(sequence: torch.Tensor, logits_processor, logits: torch.Tensor) -> torch.Tensor:
    """``sequence`` with the model's greedy token for ``logits`` (one row) appended, as plain greedy computes it."""
    scores = logits.float()
    if logits_processor is not None:
        scores = logits_processor(sequence, scores)
    return torch.cat([sequence, scores.argmax(-1, keepdim=True).to(sequence.dtype)], dim=-1)


def _accept(logits, tokens, parent, sequence, logits_processor, stopping_criteria):
    """Walk the verified tree from the root: append the model's token at each accepted node; go on to the child
    that drafted it. Returns the accepted rows (the root's 0 and each accepted node's ``1 + index``), the
    sequence and whether a stopping criterion ended the generation."""
    rows, node = [0], -1
    children = {}
    for i, (up, token) in enumerate(zip(parent.tolist(), tokens.tolist())):
        children.setdefault((up, token), i)
    while True:
        sequence = _append(sequence, logits_processor, logits[rows[-1]][None])
        if bool(stopping_criteria(sequence, None).any()):
            return rows, sequence, True
        child = children.get((node, int(sequence[0, -1])))
        if child is None:
            return rows, sequence, False
        rows.append(1 + child)
        node = child


__all__ = ["eagle_tree_decoding", "keep_newest_entries"]
