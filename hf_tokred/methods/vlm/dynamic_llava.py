"""Dynamic-LLaVA (Huang et al., "Dynamic-LLaVA: Efficient Multimodal Large Language Models via Dynamic Vision-language
Context Sparsification", arXiv 2412.00876).

Learned predictors on the frozen language model sparsify the context in both phases:

* **prefill, vision**: after layer ``k - 1`` a small MLP scores every visual token from its hidden state and the mean
  hidden state of the row's text tokens (the instruction context); the top ``keep`` of each row's visual tokens go
  on (the paper's ``vision_keep_rate``, 0.2 by default as there), the others are never computed again;
* **decoding, output text**: after the same layer a second MLP decides for every generated token whether later
  steps may attend to it; a dropped token is still computed for its own output but is hidden from every later step
  in the layers after ``k - 1`` (``decode=True``; ``text_keep`` is the target fraction while training).

Training (:func:`hf_tokred.training.train_visual_pruner`): the language model is frozen, the predictors learn
with Gumbel-sigmoid soft masks (temperature ``gumbel_tau``) that hide a token's key from the queries after it in
every later layer, a distillation loss against the dense model's answer logits and a ratio loss toward ``keep``
(and ``text_keep`` on the answer tokens). Wiring: :mod:`hf_tokred.integration.vlm`.

Where we depart from the paper:

* The paper fine-tunes the whole MLLM with the predictors (one epoch of LLaVA's instruction data); here only the
  predictors train, on the frozen model, distilled from its own dense answers.
* Hidden generated tokens keep their cache slots (masked out of attention), where the paper's batched decoding
  does not store them; composing a KV policy evicts them for real.
* The vision predictor reads the instruction as the mean hidden state of the row's text tokens (the paper's
  predictor also reads pooled context, with its own layout); kept tokens keep their original positions.
* The paper's predictors for the prompt's text tokens (``use_text_predictor``) are left out: prompts here are short
  next to the image.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="dynamic_llava", keep=0.2, k=2)
    >>> cfg.resolve_schedule(30), cfg.decode_layer(30)
    ([(1, 0.2)], 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import param, register_method
from ...vlm.base import LayerAttention, LearnedInLLMConfig


class KeepPredictor(nn.Module):
    """An MLP giving a keep logit per token from its hidden state and a context vector (both ``width`` wide).

    Example:
        >>> import torch
        >>> KeepPredictor(16, 0.2)(torch.randn(2, 5, 16), torch.randn(2, 16)).shape
        torch.Size([2, 5])
    """

    def __init__(self, width: int, keep: float, hidden: int = 128, context: bool = True):
        super().__init__()
        self.context = context
        self.norm = nn.LayerNorm(width)
        self.net = nn.Sequential(nn.Linear(width * (2 if context else 1), hidden), nn.GELU(), nn.Linear(hidden, 1))
        keep = min(max(keep, 0.02), 0.98)  # start at the target rate
        with torch.no_grad():
            self.net[-1].bias.fill_(math.log(keep / (1 - keep)))

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(hidden)
        if self.context:
            x = torch.cat([x, self.norm(context)[:, None].expand_as(x)], dim=-1)
        return self.net(x)[..., 0]


def gumbel_sigmoid(logits: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Keep probabilities: ``sigmoid((logits + g1 - g2) / tau)`` with Gumbel noise while training, else
    ``sigmoid(logits)``.

    Example:
        >>> import torch
        >>> gumbel_sigmoid(torch.zeros(3), 1.0, training=False).tolist()
        [0.5, 0.5, 0.5]
    """
    if not training:
        return torch.sigmoid(logits)
    uniform = torch.rand(2, *logits.shape, device=logits.device, dtype=torch.float32).clamp_(1e-6, 1 - 1e-6)
    noise = -torch.log(-torch.log(uniform))
    return torch.sigmoid((logits.float() + noise[0] - noise[1]) / tau).to(logits.dtype)


def text_context(attention: LayerAttention) -> torch.Tensor:
    """``(batch, width)``: the mean hidden state of each row's text tokens (its instruction context).

    Example:
        >>> import torch
        >>> from hf_tokred.vlm.base import LayerAttention
        >>> attn = LayerAttention(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), 1.0,
        ...                       torch.ones(1, 3, 3, dtype=torch.bool), torch.tensor([[True, False, False]]),
        ...                       torch.tensor([[False, True, True]]), torch.tensor([[[9.0], [1.0], [3.0]]]))
        >>> text_context(attn).tolist()
        [[2.0]]
    """
    weight = attention.text.to(attention.hidden.dtype)[..., None]
    return (attention.hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


@register_method("dynamic_llava")
@dataclass(kw_only=True)
class DynamicLLaVAConfig(LearnedInLLMConfig):
    """Learned vision-context pruning in prefill and output-text sparsification while decoding (arXiv 2412.00876).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="dynamic_llava").params()["keep"]
        0.2
    """

    paper: ClassVar[str] = "2412.00876"
    status: ClassVar[str] = "experimental"

    keep: float = param(0.2, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of each row's visual tokens kept from layer k on (the paper's vision_keep_rate)")
    k: int = param(2, int, low=1, help="the first layer that sees only the kept visual tokens (the predictors read "
                                       "layer k-1's input)")
    decode: bool = param(True, bool, help="a second predictor hides generated tokens from later decoding steps")
    text_keep: float = param(0.5, float, low=0.0, high=1.0, low_open=True,
                             help="target fraction of generated tokens kept visible (training; the paper's "
                                  "output_text_keep_rate)")
    width: int = param(128, int, low=4, help="hidden width of the predictor MLPs")
    gumbel_tau: float = param(1.0, float, low=0.0, low_open=True, help="Gumbel-sigmoid temperature in training")

    @property
    def decode_target(self) -> float:
        """The fraction of generated tokens the decoding predictor is trained to keep visible."""
        return self.text_keep

    def resolve_schedule(self, num_layers: int) -> list[tuple[int, float]]:
        return [] if self.keep >= 1.0 else self.check_schedule([(self.k - 1, self.keep)], num_layers)

    def build_modules(self, hidden_size: int, num_layers: int) -> nn.Module:
        parts = {"vision": KeepPredictor(hidden_size, self.keep, self.width)}
        if self.decode:
            parts["text"] = KeepPredictor(hidden_size, self.text_keep, self.width, context=False)
        return nn.ModuleDict(parts)

    def _vision_logits(self, attention: LayerAttention, memory: dict) -> torch.Tensor:
        modules = memory["modules"]
        return modules["vision"](attention.hidden, text_context(attention))

    def score(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        return self._vision_logits(attention, memory).float()

    def soft_keep(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        return gumbel_sigmoid(self._vision_logits(attention, memory), self.gumbel_tau, training=True)

    def decode_layer(self, num_layers: int) -> int | None:
        return self.k - 1 if self.decode and self.k - 1 <= num_layers - 2 else None

    def decode_keep(self, hidden: torch.Tensor, memory: dict) -> torch.Tensor:
        module = memory["modules"]
        logits = module["text"](hidden)
        return gumbel_sigmoid(logits, self.gumbel_tau, training=module.training)
