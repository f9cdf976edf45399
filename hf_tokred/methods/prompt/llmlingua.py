"""LLMLingua: coarse-to-fine prompt compression by a small LM's perplexity (Jiang et al., EMNLP 2023, arXiv 2310.05736).

The paper's three parts, on the scorer's surprisal (``-log p``):

* **budget controller**: the instruction and the question keep their text; the demonstrations (the context
  documents) share what is left of the budget. With several demonstrations, a *coarse* stage ranks them by
  perplexity (mean surprisal, each demonstration scored on its own; higher = more informative) and keeps
  the best until they hold ``granularity`` times the remaining budget (the paper's granular control
  coefficient ``k``); the others are dropped.
* **iterative token-level compression**: the kept demonstrations are cut into segments of about
  ``segment_tokens`` tokens; each segment is scored *conditioned on the compressed text before it*
  (instruction plus the words kept so far, held in one KV cache: :class:`~hf_tokred.prompt.base.ConditionalScorer`)
  and keeps its most surprising words at the token-level rate, so later segments are judged against what the
  target model will actually see.
* **distribution alignment** (instruction-tuning the small LM on the target LM's outputs) is not done:
  the scorer is used as it is.

Where we depart from the paper: words (a word and the whitespace before it), not sub-word tokens, are kept
or dropped, and a word's score is the mean surprisal of its tokens; the instruction and the question are
kept whole (the paper compresses them lightly, at their own rates τ_ins, τ_que); the per-segment selections
only build the conditioning text, and the final selection is one global ranking of the words' conditional
surprisal settled on the target tokenizer's count (so the budget holds within 2%, which the paper's
per-segment thresholds do not guarantee); the kept words of a segment are fed to the scorer again after it
is scored, so the next segment is conditioned on exactly the compressed text (the reference code instead
drops the removed tokens' entries from the KV cache computed on the full segment); ``force_tokens``, ``keep_digits`` and ``<keep>`` regions are
protected (the package has the first two).

Example:
    >>> import hf_tokred
    >>> out = hf_tokred.compress_prompt(["Q: 1+1? A: 2", "Q: 2+2? A: 4"], question="Q: 3+3? A:",
    ...                                 method="llmlingua", rate=0.5)                       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...prompt.base import PromptCompressorConfig, PromptJob, rank_priority, split_units


@register_method("llmlingua")
@dataclass(kw_only=True)
class LLMLinguaConfig(PromptCompressorConfig):
    """Demonstration-level selection by perplexity, then iterative token-level compression (arXiv 2310.05736)."""

    paper = "2310.05736"
    status = "experimental"  # not measured yet: docs/methods.md, "Why each status"

    segment_tokens: int = param(200, int, low=8, high=1 << 16, help="tokens per segment of the iterative stage")

    def priorities(self, job: PromptJob) -> list[torch.Tensor]:
        docs = job.contexts
        cost = [float(seg.costs[~seg.protected].sum()) for seg in docs]
        kept = list(range(len(docs)))
        if len(docs) > 1:
            # coarse: perplexity of each demonstration on its own, most informative first
            scores = job.unit_surprisal([(seg, 0, len(seg), "") for seg in docs])
            ppl = [float((s * seg.costs).sum() / seg.costs.sum().clamp(min=1)) for s, seg in zip(scores, docs)]
            kept, _ = self.coarse_keep(sorted(range(len(docs)), key=lambda d: -ppl[d]), cost, job.available)
            job.notes["demonstration_perplexity"] = ppl
        token_rate = min(1.0, job.available / max(sum(cost[d] for d in kept), 1.0))
        out = [torch.full((len(seg),), float("-inf")) for seg in docs]
        scorer = job.conditional_scorer(job.instruction)
        for d in sorted(kept):  # the demonstrations' own order: each is conditioned on the kept text before it
            seg = docs[d]
            for a, b in split_units(seg.costs, self.segment_tokens):
                scores = scorer.score(seg, a, b)
                out[d][a:b] = scores
                free = ~seg.protected[a:b]
                keep = seg.protected[a:b].clone()
                if free.any():
                    budget = token_rate * float(seg.costs[a:b][free].sum())
                    priority = rank_priority(scores[free], seg.costs[a:b][free], budget)
                    keep[free] = priority >= 1.0
                scorer.keep(keep)
        return out
