"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", arXiv 2412.04467).

Before the language model, per image: the ``keep`` budget is split into **dominant** tokens, the ones the vision
tower attends to most, kept as they are, and a few **contextual** tokens that stand for everything else. The
contextual tokens are targets picked at a uniform stride among the non-dominant tokens; every other non-dominant
token joins the target whose (L2-normalised) tower key it is most cosine-similar to, and each target then carries
the mean hidden state of its group. The paper's split is 54 dominant + 10 contextual out of 64 tokens
(``contextual_fraction = 10/64``; 108+20 of 128, 162+30 of 192 follow from the same fraction).

Scores: ``ImageTokens.importance``, i.e. the CLS token's attention on CLIP towers (the paper's signal); on towers
without a CLS token (SigLIP, Qwen2-VL, Idefics3) it is the mean attention each token *receives* from the image's
tokens. Keys: the tower's keys at that layer averaged over heads (the paper's "metric").

Where we depart from the paper:

* The paper selects and merges inside the CLIP tower, on the tower's output features before the projector; we
  merge the hidden states the language model receives (after the projector, scaled as its input embeddings).
  The projector is not linear, so a merged token is the mean of projected features, not the projection of the
  mean; selection is the same.
* The paper's contextual token is the target's features plus the mean of the tokens assigned to it; ours is the
  mean of the whole group (target included), which keeps merged tokens on the scale of the others.
* Targets are spread over all the non-dominant tokens (``i * m // c``), where the paper's stride ``m // c`` leaves
  the last ``m mod c`` tokens without a target of their own neighbourhood.
* The paper keeps the CLS token among the dominant ones (LLaVA's tower); the language model here receives no CLS
  token, so all dominant tokens are patch tokens.
* Kept tokens keep their original positions (contextual tokens the position of their target) and the budget is
  ``ceil(keep * n)`` per image, so any resolution and LLaVA-NeXT's crops work; protected tokens (LLaVA-NeXT's
  row-end newlines) are always kept, never counted, and never merged into.

Example:
    >>> import torch
    >>> from hf_tokred import TokenReductionConfig
    >>> from hf_tokred.vlm.base import ImageTokens
    >>> cfg = TokenReductionConfig(method="visionzip", keep=1 / 9)
    >>> g = torch.Generator().manual_seed(0)
    >>> image = ImageTokens(torch.randn(576, 8, generator=g), torch.rand(576, generator=g),
    ...                     torch.randn(576, 4, generator=g), (24, 24), torch.zeros(576, dtype=torch.bool))
    >>> sel = cfg.select(image, cfg.kept_count(576))
    >>> sel.index.shape, sel.hidden.shape
    (torch.Size([64]), torch.Size([64, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import param, register_method
from ...vlm.base import BeforeLLMConfig, ImageTokens, Selection


@register_method("visionzip")
@dataclass(kw_only=True)
class VisionZipConfig(BeforeLLMConfig):
    """Keep the tokens the vision tower attends to most, merge the rest into a few contextual tokens
    (arXiv 2412.04467).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="visionzip").params()
        {'keep': 0.25, 'contextual_fraction': 0.15625}
    """

    paper: ClassVar[str] = "2412.04467"
    status: ClassVar[str] = "experimental"

    contextual_fraction: float = param(10 / 64, float, low=0.0, high=1.0, high_open=True,
                                       help="share of each image's kept tokens that are merged contextual tokens "
                                            "(the rest are dominant tokens kept as they are; the paper's 10 of 64)")

    def select(self, image: ImageTokens, count: int) -> Selection:
        candidates = (~image.protected).nonzero().flatten()
        if count >= candidates.numel():
            return Selection(torch.arange(len(image), device=image.hidden.device))
        dominant, contextual = split_budget(count, self.contextual_fraction)
        importance = image.importance[candidates].float()
        order = torch.argsort(importance, descending=True, stable=True)
        kept = order[:dominant]
        hidden = image.hidden[candidates].float()
        rest = order[dominant:].sort().values  # the non-dominant tokens, in token order
        if contextual > 0:
            targets, merged = merge_into_targets(image.keys[candidates][rest], hidden[rest], contextual)
            kept = torch.cat([kept, rest[targets]])
            hidden = hidden.index_copy(0, rest[targets], merged)
        kept = kept.sort().values
        index = torch.cat([image.protected.nonzero().flatten(), candidates[kept]]).sort()
        new_hidden = image.hidden.float().index_copy(0, candidates[kept], hidden[kept])[index.values]
        return Selection(index.values, new_hidden.to(image.hidden.dtype))


def split_budget(count: int, contextual_fraction: float) -> tuple[int, int]:
    """``(dominant, contextual)`` tokens out of ``count``: ``contextual = round(count * contextual_fraction)``.

    Example:
        >>> split_budget(64, 10 / 64), split_budget(128, 10 / 64), split_budget(1, 10 / 64)
        ((54, 10), (108, 20), (1, 0))
    """
    contextual = min(count, int(round(count * contextual_fraction)))
    return count - contextual, contextual


def uniform_targets(tokens: int, targets: int) -> torch.Tensor:
    """Indices of ``targets`` tokens spread at a uniform stride over ``tokens`` tokens (``targets <= tokens``).

    Example:
        >>> uniform_targets(10, 3).tolist()
        [0, 3, 6]
    """
    return torch.arange(targets) * tokens // targets


def merge_into_targets(keys: torch.Tensor, hidden: torch.Tensor, targets: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``m`` tokens into ``targets`` of them: targets at a uniform stride (:func:`uniform_targets`), every
    other token assigned to the target whose L2-normalised key is most cosine-similar to its own; returns the
    targets' indices ``(targets,)`` and their new hidden states ``(targets, d)``, the float32 mean of each group's
    ``hidden`` rows (the target's own row included).

    Example:
        >>> import torch
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
        >>> hidden = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
        >>> idx, merged = merge_into_targets(keys, hidden, 2)   # targets 0 and 2 (both point along x)
        >>> idx.tolist(), [round(x, 4) for x in merged.flatten().tolist()]   # 1 and 3 join target 2
        ([0, 2], [1.0, 3.6667])
    """
    m = keys.shape[0]
    target_index = uniform_targets(m, targets).to(keys.device)
    normed = F.normalize(keys.float(), dim=-1)
    assignment = (normed @ normed[target_index].T).argmax(dim=-1)
    assignment[target_index] = torch.arange(targets, device=keys.device)  # a target always belongs to itself
    sums = torch.zeros(targets, hidden.shape[-1], device=hidden.device).index_add_(0, assignment, hidden.float())
    sizes = torch.zeros(targets, device=hidden.device).index_add_(0, assignment, torch.ones(m, device=hidden.device))
    return target_index, sums / sizes[:, None]
