"""Gist tokens: a prompt compressed into the KV of k learned tokens (Mu, Li and Goodman, NeurIPS 2023, arXiv 2304.08467).

Gisting appends k *gist tokens* after a prompt and trains the model so that every later token sees the prompt only
through them (the paper's gist attention mask). At inference the prompt is run once followed by the gist tokens and
only the gist tokens' keys and values are kept: a prompt of any length becomes k cache entries per layer, which are
reused by every later call.

Here the reduction is a config attached to a causal LM like every other (``hf_tokred.apply``,
``from_pretrained(..., token_reduction=...)``), stage ``"context"``, with two learned parts saved to
``token_reduction.safetensors``:

* ``gist.embeddings``: the k gist embeddings (``num_gist`` x hidden size), fed as ``inputs_embeds`` after the prompt;
* ``gist_lora``: a LoRA (:mod:`hf_tokred.methods.lora`: ``rank``, ``alpha``, ``target_modules``) on the decoder's
  Linear layers that runs **only while the gist tokens are computed**. The prompt is read by the base model and the
  answer is decoded by the base model; the learned parts only shape what the gist tokens write into the cache.

``hf_tokred.compress_context(model, prompt_ids, attention_mask)`` returns a
:class:`~hf_tokred.integration.wiring.CompressedContext` whose cache holds exactly ``num_gist`` entries per layer and
row; ask it with ``model.generate(torch.cat([ctx.prefix_ids, question_ids], -1), past_key_values=ctx.fresh_cache())``.
See :mod:`hf_tokred.integration.gist` for the positions (the gist keys sit at positions ``0..k-1``, the question at
``k, k+1, ...``, exactly as ``generate`` numbers them).

**Dense-equivalent**: without a ``compress_context`` call nothing runs: ``forward``/``generate`` are bit-identical to
the dense model, trained or not (the LoRA's hooks add their update only inside the gist pass).

Train it with :func:`hf_tokred.training.train_gist` (``hf-tokred train gist``): prompts of about 200 tokens (a
request about a passage of the standard library's documentation) and the dense model's own greedy answers as targets,
cross-entropy of the answer given the gist cache.

Where we depart from the paper:

* **two passes instead of a gist mask**: the paper trains one forward pass with a mask that hides the prompt from the
  tokens after the gist tokens. We run the compression itself (prompt, then gist tokens, keep the gist KV) and then a
  teacher-forced continuation through that k-entry cache: the same computation as the masked pass, and exactly the
  function used at inference, so training and inference cannot disagree on positions or masks;
* **positions**: with the mask, the paper's continuation keeps its natural positions (prompt length + k onwards).
  Here the prompt is run at positions ``-L..-1`` and the gist tokens at ``0..k-1`` (RoPE depends only on position
  differences, so the gist tokens see the prompt exactly as at natural positions), and the continuation follows at
  ``k, k+1, ...``, which is what ``generate`` gives after a k-entry cache; the position of an answer no longer
  depends on the prompt's length;
* **what is trained**: the paper fine-tunes the whole model (LLaMA-7B, FLAN-T5-XXL) with one gist token embedding
  repeated k times. We train k distinct gist embeddings and a LoRA that acts on the gist tokens only (full fine-tuning
  is out of reach on the CPU budget here); the base model reads the prompt and decodes the answer unchanged, so the
  prompt's pass needs no gradient and the dense model is untouched outside ``compress_context``;
* **data**: the paper's Alpaca+ instructions (short prompts, 1-26x compression); ours are ~200-token requests about
  stdlib documentation with the dense model's own answers as targets (self-distillation), about 25x compression at
  k = 8.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="gist", num_gist=8)
    >>> cfg.num_gist, cfg.rank, cfg.scaling
    (8, 8, 2.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import param, register_method
from ...errors import UnsupportedModelError
from ..lora import LoRAConfig

EMBEDDINGS_NAME = "gist"
LORA_NAME = "gist_lora"


class GistEmbeddings(nn.Module):
    """The ``num_gist`` learned gist embeddings (``weight``: num_gist x hidden), in float32.

    A fresh set starts at the mean of the model's input embeddings plus a small seeded perturbation (so the k tokens
    differ), a neutral token the base model already reads sensibly.

    Example:
        >>> emb = GistEmbeddings(torch.randn(100, 16), 4)
        >>> emb.weight.shape
        torch.Size([4, 16])
    """

    def __init__(self, vocab_embeddings: torch.Tensor, num_gist: int, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_gist, vocab_embeddings.shape[1], dtype=torch.float32))
        self.reset_parameters(vocab_embeddings, seed)

    def reset_parameters(self, vocab_embeddings: torch.Tensor, seed: int = 0) -> None:
        """Mean of ``vocab_embeddings`` plus 0.1 of their per-dimension spread as seeded noise."""
        table = vocab_embeddings.detach().float()
        if table.device.type == "meta":
            table = torch.zeros(2, table.shape[1])
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.weight.shape, generator=generator)
        with torch.no_grad():
            self.weight.copy_((table.mean(0) + 0.1 * table.std(0) * noise.to(table.device)).to(self.weight.device))

    def forward(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The gist embeddings for ``batch`` rows: ``(batch, num_gist, hidden)`` in ``dtype``."""
        return self.weight.to(dtype).unsqueeze(0).expand(batch, -1, -1)


@register_method("gist")
@dataclass(kw_only=True)
class GistConfig(LoRAConfig):
    """Gist tokens (arXiv 2304.08467): a prompt compressed into the KV of ``num_gist`` learned tokens.

    ``num_gist`` is k (the cache entries a compressed prompt keeps per layer); ``rank``, ``alpha`` and
    ``target_modules`` shape the LoRA that runs on the gist tokens. Where we depart from the paper: see
    :mod:`hf_tokred.methods.lm.gist`.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="gist", num_gist=4, rank=4, target_modules=["q_proj", "v_proj"])
        >>> cfg.stage, cfg.num_gist, cfg.scaling
        ('context', 4, 4.0)
    """

    stage: ClassVar[str] = "context"
    wiring: ClassVar[str] = "gist"
    model_kinds: ClassVar[tuple[str, ...]] = ("decoder",)
    learned: ClassVar[bool] = True
    paper: ClassVar[str] = "2304.08467"
    status: ClassVar[str] = "experimental"  # SmolLM2-135M on the CPU budget: see docs/learned_lm.md

    num_gist: int = param(8, int, low=1, high=4096,
                          help="k, the gist tokens after the prompt: a compressed prompt keeps k cache entries per layer")

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The gist embeddings (``gist``) and the LoRA (``gist_lora``), fresh: the LoRA's ``lora_B`` is zero.

        Checks, before anything is attached, that the model is a causal LM with an input embedding table and that
        the LoRA's targets exist. Fresh parts are drawn from generators seeded with 0 (the global random state is
        left alone).

        Example:
            >>> sorted(cfg.learned_modules(model, adapter))                      # doctest: +SKIP
            ['gist', 'gist_lora']
        """
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise UnsupportedModelError(
                f"gist: {type(model).__name__} cannot generate; gist tokens attach to a causal LM (an ...ForCausalLM "
                "model) whose generate() answers from the compressed prompt")
        embeddings = model.get_input_embeddings()
        if embeddings is None or not hasattr(embeddings, "weight"):
            raise UnsupportedModelError(f"gist: {type(model).__name__} has no input embedding table to size the gist "
                                        "embeddings from")
        return {EMBEDDINGS_NAME: GistEmbeddings(embeddings.weight, self.num_gist),
                LORA_NAME: self.lora_layers(model, adapter)}


def rouge_l(candidate: list, reference: list) -> float:
    """ROUGE-L F1 (beta = 1) of two token sequences: the longest common subsequence against both lengths.

    Example:
        >>> rouge_l([1, 2, 3, 4], [1, 3, 4, 5])
        0.75
        >>> rouge_l([], [1]), rouge_l([1, 2], [1, 2])
        (0.0, 1.0)
    """
    if not candidate or not reference:
        return float(candidate == reference)
    previous = [0] * (len(reference) + 1)
    for a in candidate:
        current = [0]
        for j, b in enumerate(reference):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


__all__ = ["GistConfig", "GistEmbeddings", "rouge_l"]
