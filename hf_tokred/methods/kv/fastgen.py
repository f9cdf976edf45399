"""FastGen: adaptive KV-cache compression (Ge et al., "Model Tells You What to Discard", ICLR'24, arXiv 2310.01801).

FastGen profiles every attention head on the prompt and gives each head its own policy: the cheapest
of a ladder of token sets that recovers at least ``recovery`` of the head's attention mass,

1. special tokens (the sinks and the tokenizer's special tokens),
2. + punctuation,
3. + the ``frequent_ratio`` most attended tokens (heavy hitters),
4. + the ``local_ratio`` most recent tokens,
5. everything (the full cache).

Heads that attend to a few special tokens keep a handful of slots; heads that need everything keep
their whole budget. Budgets therefore differ per head; every head has the same number of physical
slots (the largest head's), and each head's unused slots are masked out inside hf_tokred's attention.

Where we depart from the paper: the profile is the attention of the prompt's last ``profile_window``
queries, recomputed (the paper profiles the whole prompt with eager attention); query heads sharing a
KV head are profiled together (GQA); ``keep``/``max_tokens`` cap every head (the paper has no global
cap; ``keep=1.0`` gives the dense cache), and a head whose policy holds more tokens than the cap keeps its
special tokens, then its policy's other members by the attention they receive; the policy is applied
once, to the prompt, and generated tokens are appended (the paper also applies each head's policy to new
tokens).

The special and punctuation ids come from the tokenizer: pass them (``special_token_ids``,
``punctuation_token_ids``; :func:`token_ids_from_tokenizer` computes both), or leave them unset and the
tokenizer saved beside the model (``config._name_or_path``) is read when the cache is built.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="fastgen", keep=0.5, special_token_ids=[0, 1], punctuation_token_ids=[13])
    >>> cfg.recovery, cfg.compression
    (0.95, 'prefill')
"""

from __future__ import annotations

import dataclasses
import functools
import string
from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...errors import TokenReductionError
from ...kv.policy import KVPolicyConfig
from ...kv.scoring import attention_received

# Score offsets that order a head's kept tokens: special tokens first, then the members of the head's chosen
# policy, each group by attention received (probabilities sum to at most the window size, far below these).
_SPECIAL, _MEMBER = 2.0e6, 1.0e6


@register_method("fastgen")
@dataclass(kw_only=True)
class FastGenConfig(KVPolicyConfig):
    """Per-head policies chosen by profiling the prompt (arXiv 2310.01801)."""

    paper = "2310.01801"
    status = "beta"  # the evidence: docs/methods.md, "Why each status"
    compression = "prefill"
    needs_token_ids = True

    recovery: float = param(0.95, float, low=0.0, high=1.0, low_open=True,
                            help="attention mass a head's policy must recover")
    profile_window: int = param(32, int, low=1, help="last prompt queries whose attention profiles the heads")
    frequent_ratio: float = param(0.3, float, low=0.0, high=1.0, help="heavy hitters kept, as a fraction of the prompt")
    local_ratio: float = param(0.3, float, low=0.0, high=1.0, help="recent tokens kept, as a fraction of the prompt")
    special_token_ids: list[int] | None = param(None, int, optional=True, sequence=True,
                                                help="ids of special tokens (default: from the tokenizer)")
    punctuation_token_ids: list[int] | None = param(None, int, optional=True, sequence=True,
                                                    help="ids of punctuation tokens (default: from the tokenizer)")

    def bind(self, model) -> FastGenConfig:
        if self.special_token_ids is not None and self.punctuation_token_ids is not None:
            return self
        found = _token_ids_beside_model(getattr(model.config, "_name_or_path", "") or "")
        return dataclasses.replace(
            self,
            special_token_ids=self.special_token_ids if self.special_token_ids is not None else found["special_token_ids"],
            punctuation_token_ids=(self.punctuation_token_ids if self.punctuation_token_ids is not None
                                   else found["punctuation_token_ids"]),
        )

    def score(self, layer, module, query):
        received = attention_received(module, query, layer, last=self.profile_window)  # (batch, kv_heads, slots)
        ranking = self.pooled(layer, received)  # what orders heavy hitters and cuts (recovery uses the raw mass)
        token_ids = layer.shared.get("token_ids")
        if token_ids is None or token_ids.shape[-1] < layer.seen:
            raise TokenReductionError("fastgen: the cache did not see the prompt's input ids; call the model with "
                                      "input_ids (not inputs_embeds) after hf_tokred.apply")
        slot_ids = token_ids.to(layer.positions.device)[:, None, :].expand(-1, layer.positions.shape[1], -1)
        slot_ids = slot_ids.gather(-1, layer.positions)
        valid = layer.valid
        sink_end = getattr(layer, "sink_end", None) if getattr(layer, "sliding_window", None) else None
        if sink_end is not None:  # a sliding-window layer's sinks may have left with its window
            sinks = valid & (layer.positions < sink_end)
        else:
            sinks = valid & (valid.cumsum(dim=-1) <= self.sink_tokens)  # prompt slots are in position order here
        special = (_isin(slot_ids, self.special_token_ids) & valid) | sinks
        punctuation = _isin(slot_ids, self.punctuation_token_ids) & valid
        lengths = valid.sum(dim=-1, keepdim=True)  # real prompt tokens per row and head
        # Heavy hitters: the most attended tokens beyond the special/punctuation ones.
        frequent_count = (lengths.float() * self.frequent_ratio).ceil().long()
        others = torch.where(valid & ~special & ~punctuation, ranking, -1.0)
        rank = others.argsort(dim=-1, descending=True).argsort(dim=-1)
        frequent = (rank < frequent_count) & (others >= 0)
        local_count = (lengths.float() * self.local_ratio).ceil().long()
        local = valid & (layer.positions >= layer.seen - local_count)

        ladder = [special, special | punctuation]
        ladder.append(ladder[-1] | frequent)
        ladder.append(ladder[-1] | local)
        total = (received * valid).sum(dim=-1).clamp_min(1e-12)
        chosen = torch.full(lengths.shape[:2], len(ladder), dtype=torch.long, device=valid.device)  # default: full
        sizes = lengths[..., 0].clone()
        for index in reversed(range(len(ladder))):
            recovered = (received * ladder[index]).sum(dim=-1) / total
            fits = recovered >= self.recovery
            chosen = torch.where(fits, index, chosen)
            sizes = torch.where(fits, ladder[index].sum(dim=-1), sizes)
        layer.scratch["head_budgets"] = sizes
        layer.scratch["policies"] = chosen  # 0 special, 1 +punct, 2 +frequent, 3 +local, 4 full
        members = torch.stack([*ladder, valid], dim=-1).gather(-1, chosen[..., None, None].expand(*valid.shape, 1))[..., 0]
        # When a head's policy holds more tokens than the budget allows, its special tokens stay and its other
        # members are cut by the attention they receive, never by kind (punctuation is not worth more than
        # an attended content token).
        return ranking + _SPECIAL * special.float() + _MEMBER * members.float()

    def head_budgets(self, layer, module, query, budget):
        return layer.scratch.pop("head_budgets").clamp(min=1, max=budget)


@functools.lru_cache(maxsize=8)
def _token_ids_beside_model(source: str) -> dict[str, list[int]]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: no tokenizer next to the model
        raise TokenReductionError(
            f"fastgen: the fields special_token_ids and punctuation_token_ids are unset, and no tokenizer could be "
            f"loaded from the model's folder {source!r} ({type(err).__name__}); either save the tokenizer into the "
            "model folder (tokenizer.save_pretrained(folder), then load the model from it), or set both fields: "
            "from hf_tokred.methods.kv.fastgen import token_ids_from_tokenizer; "
            "TokenReductionConfig(method='fastgen', keep=0.5, **token_ids_from_tokenizer(tokenizer))"
        ) from None
    return token_ids_from_tokenizer(tokenizer)


def _isin(ids: torch.Tensor, wanted: list[int] | None) -> torch.Tensor:
    if not wanted:
        return torch.zeros_like(ids, dtype=torch.bool)
    return torch.isin(ids, torch.tensor(wanted, device=ids.device))


def token_ids_from_tokenizer(tokenizer) -> dict[str, list[int]]:
    """FastGen's ``special_token_ids`` and ``punctuation_token_ids`` for a tokenizer.

    Punctuation tokens are those that decode to nothing but punctuation and spaces (``","``, ``" ."``,
    ``"\\n"`` is not one).

    Example:
        >>> ids = token_ids_from_tokenizer(tokenizer)                                         # doctest: +SKIP
        >>> cfg = TokenReductionConfig(method="fastgen", keep=0.5, **ids)                     # doctest: +SKIP
    """
    special = sorted(set(tokenizer.all_special_ids))
    punctuation = []
    marks = set(string.punctuation)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).strip()
        if text and all(ch in marks for ch in text):
            punctuation.append(token_id)
    return {"special_token_ids": special, "punctuation_token_ids": punctuation}


__all__ = ["FastGenConfig", "token_ids_from_tokenizer"]
