"""Evo-ViT: slow-fast token evolution (Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision
Transformer", AAAI'22, arXiv 2108.01390).

In every reducing block the tokens are split by a *global* class attention, a running average over the blocks
of the attention the CLS token pays each token: the top ``keep_rate`` fraction of the unprotected tokens are
*informative* and take the slow path (the block's attention and MLP); the others (*placeholders*) are summarised
into one *representative* token (their average weighted by the global attention) that goes through the block
with the informative ones. After the block every placeholder gets the representative's residual update
(``x_t + rep_out - rep_in``: the fast path), so the sequence keeps its full length between blocks and a
placeholder can become informative again later. The CLS token (and every protected token) always takes the
slow path.

How it is wired: ``reduce_at = "input"`` (the block runs on the informative tokens plus the representative),
``restore_after`` every reducing block and ``restore_update = "residual"`` (see
:mod:`hf_tokred.integration.encoders`): the restore gives a kept token exactly its block output and a
placeholder its own input plus the representative's update. On post-norm blocks (BERT, RoBERTa, DistilBERT:
``out = LN2(h + mlp(h))``, ``h = LN1(x + attn(x))``) the update is taken branch by branch, as the block applied
it to the representative: ``LN2(LN1(x_t + attn_rep) + mlp_rep)`` (adding the representative's post-norm output
difference to a placeholder's state would mix two LayerNorm scales).

Where we depart from the paper:

* The global attention of block ``i`` is the previous block's CLS-attention row (averaged over heads; the
  previous block ran on the reduced sequence when it reduced: the representative's attention is shared among
  its placeholders by their number), updated as ``g = ema * g + (1 - ema) * a`` from the first reducing block
  on (the paper's ``alpha``); the paper also updates it inside the block with the slow path's attention.
* The representative is the attention-*normalised* weighted average (EViT-style), so it stays at the scale of
  the other tokens on a model that was not trained with it; the paper trains the whole model with it
  (our :func:`hf_tokred.recipes.evo_vit.train_evo_vit` fine-tunes the backbone through the reduction instead).
* Proportional attention is on by default (``prop_attn``): as a key the representative weighs as the
  placeholders it stands for, which the paper, training the model with it, does not need.
* The paper's layer-to-layer token *ordering* for hardware efficiency (sorting tokens by global attention)
  is not needed here: the wiring gathers the kept tokens in input order.
* Models without a CLS token (SigLIP) rank tokens by the attention they receive (averaged over heads and real
  queries), as EViT does here. Padded batches (BERT): each row keeps ``ceil(keep_rate * n)`` of its own ``n``
  real tokens.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="evo_vit", keep_rate=0.5)
    >>> cfg.schedule(6), cfg.restore_after(6)
    ([None, 0.5, 0.5, 0.5, 0.5, 0.5], [1, 2, 3, 4, 5])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...errors import ConfigError
from .base import KeepRateConfig, Reduction, ReductionContext, keep_counts, keep_top

_RECORD = "evo_vit"


def spread_to_tokens(attention: torch.Tensor, slot_of: torch.Tensor, slot_size: torch.Tensor) -> torch.Tensor:
    """Attention over the slots of a reduced block ``(B, M)`` spread back to its input tokens ``(B, N)``: each token
    gets its slot's attention divided by the slot's size (a representative's attention is shared by its tokens);
    dropped tokens (slot -1) get 0.

    Example:
        >>> import torch
        >>> spread_to_tokens(torch.tensor([[0.5, 0.2, 0.3]]), torch.tensor([[0, 1, 2, 2, 2]]),
        ...                  torch.tensor([[1.0, 1.0, 3.0]])).tolist()
        [[0.5, 0.20000000298023224, 0.10000000149011612, 0.10000000149011612, 0.10000000149011612]]
    """
    per_token = attention.float() / slot_size.float().clamp_min(1.0)
    spread = per_token.gather(1, slot_of.clamp(min=0))
    return torch.where(slot_of >= 0, spread, torch.zeros_like(spread))


@register_method("evo_vit")
@dataclass(kw_only=True)
class EvoViTConfig(KeepRateConfig):
    """Evo-ViT (arXiv 2108.01390): per block, the top tokens by global CLS attention take the slow path, the others
    share the residual update of one representative token; the sequence keeps its length.

    Fields:
        keep_rate: fraction of the unprotected tokens on the slow path in each reducing block (1.0: dense).
        keep_rates: one fraction per reducing block, in block order, instead of ``keep_rate`` (a rate of 1.0
            leaves its block dense); e.g. a falling schedule keeps more tokens early, where every token is
            still distinct (docs/encoders.md).
        layers: reducing blocks; None for every block from ``num_blocks // 4`` (at least 1) to the last (the
            paper keeps the first blocks of DeiT dense). Block 0 cannot reduce: the ranking uses the previous
            block's attention.
        ema: weight of the running global attention against the previous block's attention (the paper's alpha).
        prop_attn: proportional attention (on by default: the representative stands for every placeholder, so
            as a key it weighs as all of them; the paper has no such term).
        restore_length: see :class:`~hf_tokred.methods.encoder.base.EncoderReducerConfig` (the output already has
            the input length, so it changes nothing).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="evo_vit", keep_rate=0.6, layers=[2, 3]).schedule(4)
        [None, None, 0.6, 0.6]
    """

    paper = "2108.01390"
    status = "beta"  # held-out MiniLM cosine 0.9713 at 30 % saved (ema=0, 2 seeds), target 0.97 (docs/methods.md)
    # No modules of its own (learned = False): the paper trains the whole model; train_evo_vit fine-tunes the backbone.
    needs = frozenset({"cls_attention"})
    reduce_at = "input"
    restore_update = "residual"

    keep_rate: float = param(0.5, float, low=0.0, high=1.0, low_open=True,
                             help="fraction of the unprotected tokens on the slow path in each reducing block")
    prop_attn: bool = param(True, bool, help="proportional attention: add log(size) to the attention logits")
    ema: float = param(0.5, float, low=0.0, high=1.0, high_open=True,
                       help="weight of the running global attention (the paper's alpha)")
    keep_rates: list[float] | None = param(None, float, low=0.0, high=1.0, low_open=True, sequence=True,
                                           optional=True, help="one slow-path fraction per reducing block, in "
                                           "block order (instead of keep_rate)")

    def validate(self) -> None:
        super().validate()
        if self.layers is not None and 0 in self.layers:
            raise ConfigError("layers: block 0 cannot reduce (Evo-ViT ranks tokens by the previous block's "
                              "attention); use blocks >= 1", field="layers")
        if self.keep_rates is not None and self.layers is not None:
            self._rates_by_block(sorted(self.layers))

    def _rates_by_block(self, layers: list[int]) -> dict[int, float]:
        """``keep_rates`` keyed by the reducing ``layers``; a ConfigError when their counts differ."""
        if len(layers) != len(self.keep_rates):
            raise ConfigError(f"keep_rates: expected one rate per reducing block ({len(layers)}: {layers}), got "
                              f"{len(self.keep_rates)}", field="keep_rates")
        return dict(zip(layers, self.keep_rates))

    def reducing_layers(self, num_blocks: int) -> list[int]:
        """The reducing blocks: ``layers``, or every block from ``max(num_blocks // 4, 1)`` on.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="evo_vit").reducing_layers(12)
            [3, 4, 5, 6, 7, 8, 9, 10, 11]
        """
        if self.layers is None:
            return list(range(max(num_blocks // 4, 1), num_blocks))
        return super().reducing_layers(num_blocks)

    def schedule(self, num_blocks: int) -> list[float | None]:
        """The slow-path fraction of every block: ``keep_rates`` in order over the reducing blocks (else
        ``keep_rate`` at each), None where a block is dense (not reducing, or at rate 1).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="evo_vit", layers=[2, 3, 4], keep_rates=[0.8, 1.0, 0.4]).schedule(5)
            [None, None, 0.8, None, 0.4]
        """
        if self.keep_rates is None:
            return super().schedule(num_blocks)
        rates = self._rates_by_block(self.reducing_layers(num_blocks))
        return [rates[i] if rates.get(i, 1.0) < 1.0 else None for i in range(num_blocks)]

    def restore_after(self, num_blocks: int) -> list[int]:
        """Every reducing block gives its output back at the full length (the fast path).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="evo_vit", layers=[2, 4]).restore_after(6)
            [2, 4]
        """
        return [i for i, amount in enumerate(self.schedule(num_blocks)) if amount]

    def plan(self, ctx: ReductionContext) -> Reduction | None:
        """Update the global attention, keep its top tokens, fuse the others into the representative.

        Example:
            >>> import torch
            >>> from hf_tokred import TokenReductionConfig
            >>> ctx = ReductionContext(hidden=torch.randn(1, 11, 4), size=torch.ones(1, 11, 1), valid=None,
            ...                        protected=1, class_tokens=1, block=1, num_blocks=2, amount=0.5,
            ...                        cls_attention=torch.rand(1, 11))
            >>> TokenReductionConfig(method="evo_vit").plan(ctx).num_slots      # CLS + 5 slow + representative
            7
        """
        records = ctx.state.records if ctx.state is not None else {}
        memory = records.get(_RECORD)
        attention = ctx.cls_attention
        if attention is None:
            raise ConfigError(f"layers: block {ctx.block} got no attention of the previous block to rank tokens by",
                              field="layers")
        attention = attention.float()
        if attention.shape[1] != ctx.num_tokens:
            # The previous block ran on its informative tokens plus the representative: back to every token.
            if memory is None or memory["slot_of"].shape[1] != ctx.num_tokens:
                raise ConfigError(f"layers: block {ctx.block}'s ranking attention covers {attention.shape[1]} tokens, "
                                  f"the block has {ctx.num_tokens}", field="layers")
            attention = spread_to_tokens(attention, memory["slot_of"], memory["slot_size"])
        if memory is not None and memory["global"].shape == attention.shape:
            attention = self.ema * memory["global"] + (1.0 - self.ema) * attention
        counts = ctx.real_counts()
        kept = keep_counts(counts, ctx.amount)
        reduction = keep_top(attention, kept, ctx.protected, ctx.valid, fuse_rest=attention)
        slot_of = reduction.slot_of()
        slot_size = torch.zeros(ctx.batch_size, reduction.num_slots, device=slot_of.device).scatter_add_(
            1, slot_of.clamp(min=0), (ctx.size[..., 0].float() * (slot_of >= 0)))
        records[_RECORD] = {"global": attention, "slot_of": slot_of, "slot_size": slot_size}
        return reduction


__all__ = ["EvoViTConfig", "spread_to_tokens"]
