"""ATP-LLaVA (Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", arXiv 2412.00447).

Inside the language model, at a few layers, an Adaptive Token Pruning module decides how many visual tokens go on
*per instance and per layer*: every visual token gets an importance (the attention the row's text tokens pay it,
averaged over heads) and a redundancy (its mean cosine similarity to the row's other visual tokens); both are
normalised within the row and combined, ``z = mix * importance + (1 - mix) * (1 - redundancy)``; a small learned
head reads the row's pooled visual and text hidden states and predicts the row's threshold ``theta`` (and the mix);
tokens with ``z > theta`` go on. **Spatial augmented pruning** keeps, on top, a uniform sample of the visual tokens
(a fraction ``spatial`` of the tokens present), so every region keeps a few tokens. Counts thus differ per row and
per layer; ``keep`` is the average fraction the training drives toward (cumulative over the stages).

Training (:func:`hf_tokred.training.train_visual_pruner`): the language model is frozen; in training mode each
token's keep probability is ``sigmoid((z - theta) / temperature)`` (1 for the spatial samples), which hides its key
from the queries after it in every later layer; the loss distils the dense model's answer logits and pulls the
mean keep probability of each stage toward its target. Wiring: :mod:`hf_tokred.integration.vlm`.

Where we depart from the paper:

* The paper trains the ATP modules with the MLLM fine-tuned (LLaVA instruction data, its pruning-rate loss); here
  only the modules train, on the frozen model, distilled from its own dense answers.
* Redundancy is the mean cosine similarity of hidden states (the paper derives it from the visual tokens'
  self-attention); importance is the text tokens' attention recomputed from post-RoPE queries (SDPA works).
* The spatial samples are a stride over the row's visual tokens in order (the paper samples the 2-D grid); for
  LLaVA's raster order that is a uniform spread over the image.
* Stages sit at 1/8, 7/16 and 3/4 of the depth (the paper's layers 4, 14, 24 of 32); kept tokens keep their
  original positions.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="atp_llava", keep=0.25)
    >>> [(layer, round(keep, 3)) for layer, keep in cfg.resolve_schedule(32)]
    [(3, 0.63), (13, 0.397), (23, 0.25)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import param, register_method
from ...vlm.base import LayerAttention, LearnedInLLMConfig

# Depth fractions of the stages: the paper's layers 4, 14 and 24 of 32 (the first layer that sees the cut).
STAGES = (4 / 32, 14 / 32, 24 / 32)


class ThresholdHead(nn.Module):
    """Predicts a row's threshold ``theta`` in (0, 1) and the importance/redundancy mix from pooled hidden states.

    Example:
        >>> import torch
        >>> theta, mix = ThresholdHead(16, 0.5)(torch.randn(2, 16), torch.randn(2, 16))
        >>> theta.shape, bool(((0 < mix) & (mix < 1)).all())
        (torch.Size([2]), True)
    """

    def __init__(self, width: int, keep: float, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.net = nn.Sequential(nn.Linear(2 * width, hidden), nn.GELU(), nn.Linear(hidden, 2))
        keep = min(max(keep, 0.02), 0.98)  # z is about uniform in [0, 1]: theta = 1 - keep keeps about `keep`
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.tensor([math.log((1 - keep) / keep), 0.0]))

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(torch.cat([self.norm(visual), self.norm(text)], dim=-1))
        return torch.sigmoid(out[..., 0]), torch.sigmoid(out[..., 1])


def _row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.to(values.dtype)[..., None]
    return (values * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def _normalise(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of ``values`` over each row's ``mask`` (0 outside it)."""
    low = torch.where(mask, values, torch.inf).amin(dim=-1, keepdim=True)
    high = torch.where(mask, values, -torch.inf).amax(dim=-1, keepdim=True)
    return torch.where(mask, (values - low) / (high - low).clamp(min=1e-6), 0.0)


def token_scores(attention: LayerAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance, redundancy)``, each ``(batch, k)`` in [0, 1] over the row's visual tokens (0 elsewhere):
    the text tokens' attention to each visual token, and its mean cosine similarity to the row's visual tokens.

    Example:
        >>> import torch
        >>> from hf_tokred.vlm.base import LayerAttention
        >>> g = torch.Generator().manual_seed(0)
        >>> attn = LayerAttention(torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g), 0.35,
        ...                       torch.ones(1, 4, 4, dtype=torch.bool).tril(), torch.tensor([[0, 1, 1, 0]]).bool(),
        ...                       torch.tensor([[1, 0, 0, 1]]).bool(), torch.randn(1, 4, 8, generator=g))
        >>> importance, redundancy = token_scores(attn)
        >>> sorted(importance[0, 1:3].tolist()), importance[0, 0].item()
        ([0.0, 1.0], 0.0)
    """
    visual = attention.visual
    importance = attention.attention_from(attention.text)
    unit = torch.nn.functional.normalize(attention.hidden.float(), dim=-1)
    centre = _row_mean(unit, visual)  # mean_j cos(h_i, h_j) = h_i . mean_j(unit_j)
    redundancy = (unit * centre[:, None]).sum(dim=-1)
    return _normalise(importance, visual), _normalise(redundancy, visual)


def spatial_samples(visual: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(batch, k)`` bool: a uniform stride over each row's visual tokens, ``ceil(fraction * n)`` of them.

    Example:
        >>> import torch
        >>> spatial_samples(torch.ones(1, 8, dtype=torch.bool), 0.25).nonzero()[:, 1].tolist()
        [0, 4]
    """
    counts = visual.sum(dim=-1)
    rank = visual.long().cumsum(dim=-1) - 1
    wanted = torch.ceil(counts.float() * fraction).long().clamp(min=0)
    stride = torch.where(wanted > 0, counts // wanted.clamp(min=1), counts + 1).clamp(min=1)
    return visual & (rank % stride[:, None] == 0) & (rank // stride[:, None] < wanted[:, None])


@register_method("atp_llava")
@dataclass(kw_only=True)
class ATPLLaVAConfig(LearnedInLLMConfig):
    """Instance- and layer-wise learned thresholds on importance and redundancy, with spatial augmented pruning
    (arXiv 2412.00447).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="atp_llava").params()["spatial"]
        0.05
    """

    paper: ClassVar[str] = "2412.00447"
    status: ClassVar[str] = "experimental"

    keep: float = param(0.25, float, low=0.0, high=1.0, low_open=True,
                        help="target fraction of visual tokens kept after the last stage (training target; the "
                             "learned thresholds set the count per row and layer)")
    spatial: float = param(0.05, float, low=0.0, high=1.0, help="fraction of the visual tokens present kept as a "
                                                                 "uniform spatial sample at every stage")
    temperature: float = param(0.1, float, low=0.0, low_open=True, help="softness of the training-time keep mask")

    def resolve_schedule(self, num_layers: int) -> list[tuple[int, float]]:
        if self.keep >= 1.0:
            return []
        layers = sorted({min(max(math.floor(f * num_layers + 0.5) - 1, 0), num_layers - 2) for f in STAGES})
        stages = len(layers)
        return self.check_schedule([(layer, self.keep ** ((i + 1) / stages)) for i, layer in enumerate(layers)],
                                   num_layers)

    def build_modules(self, hidden_size: int, num_layers: int) -> nn.Module:
        schedule = self.resolve_schedule(num_layers)
        previous = 1.0
        heads = {}
        for layer, keep in schedule:
            heads[str(layer)] = ThresholdHead(hidden_size, keep / previous)  # each stage keeps its share of what came
            previous = keep
        return nn.ModuleDict(heads)

    def _decide(self, attention: LayerAttention, layer: int, memory: dict):
        importance, redundancy = token_scores(attention)
        head = memory["modules"][str(layer)]
        visual = attention.visual
        theta, mix = head(_row_mean(attention.hidden, visual), _row_mean(attention.hidden, attention.text))
        z = mix[:, None] * importance + (1 - mix[:, None]) * (1 - redundancy)
        return z, theta, spatial_samples(visual, self.spatial)

    def score(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        z, theta, sampled = self._decide(attention, layer, memory)
        memory[f"atp_llava.{layer}"] = ((z > theta[:, None]) | sampled) & attention.visual
        return torch.where(sampled, torch.inf, z.float())

    def kept_counts(self, scores, visual, layer, memory):
        return memory.pop(f"atp_llava.{layer}").sum(dim=-1).clamp(min=1)

    def soft_keep(self, attention: LayerAttention, layer: int, memory: dict) -> torch.Tensor:
        z, theta, sampled = self._decide(attention, layer, memory)
        keep = torch.sigmoid((z - theta[:, None]) / self.temperature)
        return torch.where(sampled, torch.ones_like(keep), keep).to(attention.hidden.dtype)
