"""STViT: a few semantic tokens stand for the rest through the middle blocks (Chang et al., "Making Vision
Transformers Efficient from A Token Sparsification View", CVPR'23, arXiv 2303.11273).

At the input of block ``start`` the unprotected tokens are summarised into ``ceil(ratio * n)`` *semantic tokens*:
cluster centres initialised by pooling (consecutive windows of the tokens, in input order) and refined by
attention to every token (``iterations`` rounds: each token joins the centre it attends most to, by cosine
similarity of the hidden states, and each centre becomes its members' average weighted by that attention).
The blocks ``start .. end - 1`` run on the protected tokens (CLS) plus the semantic tokens. After block
``end - 1`` the full sequence is recovered: every token gets its own state from before the semantic stage plus
the update its semantic token received in the stage (``restore_update = "residual"``,
:mod:`hf_tokred.integration.encoders`), so the last blocks (``end`` on) see every token, and the output has the
input length.

Where we depart from the paper:

* The paper's semantic token generation module (STGM) refines the pooled centres with learned attention blocks
  (intra- and inter-window) and keeps them as soft mixtures of all tokens; here the refinement is a
  training-free attention step with a hard assignment (each token belongs to one semantic token, so the
  wiring's size bookkeeping, ``token_sizes`` and padding work unchanged). Pooling windows are consecutive runs
  of the token sequence (1-D; for an image grid these are raster runs, not 2-D windows).
* Recovery (STViT-R): the paper recovers the full sequence with an attention from the saved tokens to the
  semantic tokens; we give every token its carrier's residual update (Evo-ViT's fast path), which needs no
  parameters and returns a token that was its own semantic token exactly.
* The paper trains the whole network with the STGM; :func:`hf_tokred.recipes.stvit.train_stvit` fine-tunes the
  backbone through the semantic-token stage (no learned modules of its own).
* Padded batches (BERT): each row gets ``ceil(ratio * n)`` semantic tokens of its own ``n`` real tokens.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="stvit", ratio=0.25, start=1, end=5)
    >>> cfg.schedule(6), cfg.restore_after(6)
    ([None, 0.25, None, None, None, None], [4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...errors import ConfigError
from .base import EncoderReducerConfig, Reduction, ReductionContext, keep_counts


def semantic_slots(hidden: torch.Tensor, size: torch.Tensor, valid: torch.Tensor | None, protected: int,
                   counts: torch.Tensor, iterations: int = 1, temperature: float = 0.1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every token to a semantic token: ``(slot, weight)``, both ``(B, N)``.

    Protected tokens keep slots ``0..protected-1``; row ``b``'s real unprotected tokens go to ``counts[b]``
    semantic slots (``protected ..``), first by consecutive windows (pooling), then ``iterations`` times to the
    centre of highest cosine similarity (centres: size- and weight-weighted means of their members); empty
    centres are dropped and the slots renumbered in order. ``weight`` is each token's softmax attention
    (``cosine / temperature`` over the row's centres) to its centre (1 for protected tokens; differentiable);
    padding gets slot -1.

    Example:
        >>> import torch
        >>> h = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
        >>> slot, weight = semantic_slots(h, torch.ones(1, 5, 1), None, 1, torch.tensor([2]))
        >>> slot.tolist()
        [[0, 1, 1, 2, 2]]
    """
    batch, n, _ = hidden.shape
    device = hidden.device
    k_max = max(int(counts.max().item()), 1) if batch else 1
    real = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid.clone()
    real[:, :protected] = False
    # Position of each real unprotected token among its row's real tokens, then its pooling window.
    position = real.long().cumsum(dim=1) - 1
    total = real.sum(dim=1, keepdim=True).clamp(min=1)
    window = torch.div(position * counts[:, None], total, rounding_mode="floor").clamp(min=0)
    assign = torch.where(real, window, 0)
    centre_valid = torch.arange(k_max, device=device)[None] < counts[:, None]
    mass = (size[..., 0].float() * real)
    weight = mass.new_ones(batch, n)
    features = hidden.float()
    for _ in range(iterations + 1):
        w = (mass * weight)[..., None]
        centres = torch.zeros(batch, k_max, features.shape[-1], device=device).scatter_add_(
            1, assign[..., None].expand(-1, -1, features.shape[-1]), features * w)
        occupied = torch.zeros(batch, k_max, device=device).scatter_add_(1, assign, real.float()) > 0
        scores = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(
            centres, dim=-1).transpose(1, 2)
        scores = scores.masked_fill(~(centre_valid & occupied)[:, None, :], float("-inf"))
        attention = (scores / temperature).softmax(dim=-1)
        assign = torch.where(real, scores.argmax(dim=-1), 0)
        weight = torch.where(real, attention.gather(2, assign[..., None])[..., 0], torch.ones_like(mass))
    # Renumber the occupied centres 0.. in order, after the protected slots.
    used = torch.zeros(batch, k_max, dtype=torch.long, device=device).scatter_add_(1, assign, real.long()) > 0
    renumber = used.long().cumsum(dim=1) - 1
    slot = torch.where(real, renumber.gather(1, assign) + protected, -1)
    slot[:, :protected] = torch.arange(protected, device=device)
    return slot, weight


@register_method("stvit")
@dataclass(kw_only=True)
class STViTConfig(EncoderReducerConfig):
    """STViT (arXiv 2303.11273): semantic tokens stand for the rest in blocks ``start .. end - 1``; the full
    sequence is recovered for the last blocks.

    Fields:
        ratio: semantic tokens per unprotected real token (``ceil(ratio * n)`` per row; 1.0: dense).
        start: the block whose input is summarised (None: ``max(num_blocks // 4, 1)``).
        end: the first block that sees every token again (None: the last block, ``num_blocks - 1``).
        iterations: attention refinements of the pooled centres.
        temperature: softmax temperature of the refinement attention (cosine similarities).
        prop_attn: proportional attention (on by default: a semantic token weighs as the tokens it stands for).
        restore_length: see :class:`~hf_tokred.methods.encoder.base.EncoderReducerConfig` (the output already has
            the input length).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="stvit").stage_blocks(12)
        (3, 11)
    """

    paper = "2303.11273"
    status = "beta"  # held-out MiniLM cosine 0.9717 at 30 % saved (800 steps, stage to the last block), docs/methods.md
    # No modules of its own (learned = False): train_stvit fine-tunes the backbone through the stage.
    reduce_at = "input"
    restore_update = "residual"

    ratio: float = param(0.25, float, low=0.0, high=1.0, low_open=True,
                         help="semantic tokens per unprotected token")
    start: int | None = param(None, int, low=0, optional=True, help="block whose input is summarised")
    end: int | None = param(None, int, low=1, optional=True, help="first block that sees every token again")
    prop_attn: bool = param(True, bool, help="proportional attention: add log(size) to the attention logits")
    # 3 rounds: the clusters settle (MiniLM, training texts, training-free: 0.870 / 0.913 / 0.933 / 0.937 after
    # 0 / 1 / 3 / 5 rounds at ratio 0.4), each round costing one token-centre similarity (docs/encoders.md)
    iterations: int = param(3, int, low=0, help="attention refinements of the pooled centres")
    temperature: float = param(0.1, float, low=0.0, low_open=True, help="refinement softmax temperature")

    def validate(self) -> None:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ConfigError(f"end: must be after start ({self.start}), got {self.end}", field="end")

    def stage_blocks(self, num_blocks: int) -> tuple[int, int]:
        """``(start, end)`` in a model of ``num_blocks`` blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="stvit", start=2).stage_blocks(6)
            (2, 5)
        """
        start = max(num_blocks // 4, 1) if self.start is None else self.start
        end = num_blocks - 1 if self.end is None else self.end
        if start >= num_blocks:
            raise ConfigError(f"start: block {start} does not exist; the model has {num_blocks} blocks", field="start")
        if end > num_blocks:
            raise ConfigError(f"end: {end} is past the model's {num_blocks} blocks", field="end")
        if end <= start:
            raise ConfigError(f"end: the stage [{start}, {end}) is empty in a model of {num_blocks} blocks", field="end")
        return start, end

    def schedule(self, num_blocks: int) -> list[float | None]:
        """``ratio`` at ``start``, None elsewhere (all None at ratio 1).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="stvit", ratio=0.5, start=1, end=3).schedule(4)
            [None, 0.5, None, None]
        """
        start, _ = self.stage_blocks(num_blocks)
        return [self.ratio if (i == start and self.ratio < 1.0) else None for i in range(num_blocks)]

    def restore_after(self, num_blocks: int) -> list[int]:
        """The last block of the stage gives its output back at the full length (the recovery).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="stvit", start=1, end=6).restore_after(6)
            [5]
        """
        _, end = self.stage_blocks(num_blocks)
        return [end - 1] if self.ratio < 1.0 else []

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """Summarise the unprotected tokens into the semantic tokens of :func:`semantic_slots`.

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> ctx = ReductionContext(hidden=torch.randn(1, 9, 4), size=torch.ones(1, 9, 1), valid=None,
            ...                        protected=1, class_tokens=1, block=1, num_blocks=3, amount=0.25)
            >>> TokenReductionConfig(method="stvit").plan(ctx).num_slots <= 1 + 2
            True
        """
        counts = ctx.real_counts()
        semantic = keep_counts(counts, ctx.amount)
        if bool((semantic == counts).all()):
            return None
        slot, weight = semantic_slots(ctx.hidden, ctx.size, ctx.valid, ctx.protected, semantic,
                                      self.iterations, self.temperature)
        return Reduction.from_slots(slot, weight)


__all__ = ["STViTConfig", "semantic_slots"]
