"""MrT5: a learned delete gate shortens a byte-level T5's encoder sequence (Kallini et al., ICLR'25, arXiv 2410.20771).

After one early encoder block a *delete gate* scores every token from its hidden state ``H``::

    G = k * sigmoid(-(LayerNorm(H) @ W + b))          # k = gate_scale < 0, so G lies in [k, 0]

``G`` near 0 means *keep*, near ``k`` means *delete*. The gate is a ``LayerNorm(d_model)`` and a
``Linear(d_model, 1)``: :class:`DeleteGate`, the reduction's learned part, saved to
``token_reduction.safetensors`` (``model.safetensors`` stays the dense T5's).

* **Where** (``gate_layer``): the number of encoder blocks that run on the full sequence. The gate reads the
  output of the ``gate_layer``-th block (block index ``gate_layer - 1``) and blocks ``gate_layer ..`` (0-based)
  run on the shortened sequence. The default ``gate_layer=3`` puts the gate "after layer 3", after the third
  block, as the reference code documents its ``delete_gate_layer=3`` ("the 3rd layer"). At least one block must
  be left to run shortened: ``1 <= gate_layer < number of encoder blocks``.
* **Inference** (the encoder in eval mode): *hard deletion*. A real token is deleted when ``G < threshold``
  (strictly; the paper writes ``<=``, which differs only for ``G`` exactly at the threshold and would make
  ``threshold = gate_scale`` delete saturated tokens). The end-of-sequence token (``</s>``,
  ``config.eos_token_id``) is never deleted, and a row keeps at least its last real token. Each row keeps its
  own count: kept tokens are packed to the left, in order, and the batch is padded to its longest row; the
  later blocks get the attention mask of the packed rows and T5's relative position bias gathered at the kept
  tokens' *original* positions, so a kept token sees the others at the distances it saw them before.
* **Training** (the encoder in training mode): *soft deletion*, the paper's recipe. Nothing is removed; ``G``
  is added to the attention logits of every later encoder block as a bias over the keys (folded into the
  position bias T5 hands from block to block), and — our choice, so that the decoder learns to do without what
  hard deletion will hide from it — to the decoder's cross-attention logits too. The regulariser
  ``alpha * mean(G)`` over real tokens pushes towards deletion and the paper's PI controller sets ``alpha`` for
  a deletion rate of ``target_deletion`` (:func:`hf_tokred.training.train_mrt5`,
  :mod:`hf_tokred.recipes.mrt5`).

The encoder returns a :class:`~hf_tokred.integration.delete_gate.MrT5EncoderOutput` (a
``BaseModelOutputWithPastAndCrossAttentions``) with three more fields: ``attention_mask`` (the mask of the
returned, possibly shorter sequence: :func:`kept_mask`), ``kept_positions`` (each returned token's index in the
input, -1 for padding) and ``delete_gate`` (``G`` at the input's length, for the regulariser).
``T5ForConditionalGeneration``'s ``forward`` (with or without ``labels``) and ``generate`` (greedy, sampling,
beam search) give the decoder's cross-attention the shortened mask by themselves.

No-op: ``threshold = gate_scale`` deletes nothing (``G >= gate_scale`` always) and then the gate is not even
run, in training mode too: outputs are bit-identical to the dense model.

Where we depart from the paper:

* the models are ByT5-shaped T5s trained from scratch here (no pretrained ByT5 weights are available offline),
  with the gate trained jointly from the start rather than by continued pretraining of ByT5;
* no Gumbel noise on the gate logits, no ``softmax1`` attention, no mixing of hard and soft deletion in
  training, and the gate starts at "keep" (bias +3: ``G`` about ``0.05 * k``, well above any threshold);
* the soft gate also biases the decoder's cross-attention (see above);
* ``</s>`` is protected and every row keeps a token (the paper's code may delete any byte).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="mrt5", gate_layer=2, threshold=-15.0)
    >>> cfg.deletes_nothing, TokenReductionConfig(method="mrt5", threshold=-30.0).deletes_nothing
    (False, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError

MODULE_NAME = "mrt5"
# The gate's bias at creation: sigmoid(-3) = 0.047, so a fresh gate gives G = 0.047 * gate_scale (keep).
INITIAL_BIAS = 3.0


class DeleteGate(nn.Module):
    """MrT5's delete gate: ``G = scale * sigmoid(-(LayerNorm(h) @ W + b))``, one value per token, in ``[scale, 0]``.

    ``forward(hidden)`` takes ``(B, L, d_model)`` and returns ``G`` as ``(B, L)`` in the gate's dtype. ``scale``
    is the config's ``gate_scale`` (negative); it is not a parameter and is not saved.

    Example:
        >>> import torch
        >>> gate = DeleteGate(16, scale=-30.0)
        >>> g = gate(torch.randn(2, 5, 16))
        >>> g.shape, bool((g <= 0).all() and (g >= -30).all()), bool((g > -15).all())
        (torch.Size([2, 5]), True, True)
    """

    def __init__(self, d_model: int, scale: float = -30.0):
        super().__init__()
        self.scale = float(scale)
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, 1)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, 0.02)
            self.proj.bias.fill_(INITIAL_BIAS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.proj(self.norm(hidden.to(self.proj.weight.dtype))).squeeze(-1)
        return self.scale * torch.sigmoid(-logits)


def keep_decisions(gate: torch.Tensor, threshold: float, valid: torch.Tensor | None = None,
                   protected: torch.Tensor | None = None) -> torch.Tensor:
    """Which tokens hard deletion keeps: ``(B, L)`` bool, True for kept *real* tokens (padding is never "kept").

    A real token is kept when ``gate >= threshold`` or it is ``protected``; a row left with no kept token keeps
    its last real token (a row with no real token at all keeps its first slot).

    Example:
        >>> import torch
        >>> g = torch.tensor([[-20.0, -1.0, -20.0, -20.0], [-20.0, -20.0, -20.0, -1.0]])
        >>> valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
        >>> keep_decisions(g, -15.0, valid, protected=torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]]).bool()).int().tolist()
        [[0, 1, 1, 0], [0, 1, 0, 0]]
    """
    if valid is None:
        valid = torch.ones_like(gate, dtype=torch.bool)
    keep = gate >= threshold
    if protected is not None:
        keep = keep | protected
    keep = keep & valid
    empty = ~keep.any(dim=1)
    if bool(empty.any()):
        positions = torch.arange(gate.shape[1], device=gate.device)
        last = torch.where(valid, positions, -1).amax(dim=1).clamp_min(0)
        keep[empty, last[empty]] = True
    return keep


def pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pack the kept tokens of every row: ``(index, kept)``, both ``(B, Lk)`` with ``Lk`` the longest row.

    ``index[b, j]`` is the input position of row ``b``'s ``j``-th kept token (0 in padding slots) and ``kept``
    says which slots hold one. Kept tokens stay in their order.

    Example:
        >>> import torch
        >>> index, kept = pack_kept(torch.tensor([[True, False, True, True], [False, True, False, False]]))
        >>> index.tolist(), kept.int().tolist()
        ([[0, 2, 3], [1, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    counts = keep.sum(dim=1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    # A stable sort of "not kept" moves the kept positions to the front in their order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    kept = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return torch.where(kept, order, 0), kept


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``(B, L, D)`` at ``index`` ``(B, Lk)``; padding slots are zero.

    Example:
        >>> import torch
        >>> h = torch.arange(6.0).view(1, 3, 2)
        >>> gather_tokens(h, torch.tensor([[2, 0]]), torch.tensor([[True, False]])).tolist()
        [[[4.0, 5.0], [0.0, 0.0]]]
    """
    picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    return torch.where(kept[..., None], picked, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def gather_position_bias(bias: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """An attention bias ``(1 or B, H, L, L)`` over input positions, at the kept tokens: ``(B, H, Lk, Lk)``.

    Rows (queries) and columns (keys) are both taken at ``index``, so a kept token keeps the relative-position
    bias of its original distances to the other kept tokens.

    Example:
        >>> import torch
        >>> bias = torch.arange(9.0).view(1, 1, 3, 3)
        >>> gather_position_bias(bias, torch.tensor([[0, 2]])).tolist()
        [[[[0.0, 2.0], [6.0, 8.0]]]]
    """
    batch, width = index.shape
    heads, length = bias.shape[1], bias.shape[-1]
    bias = bias.expand(batch, heads, length, length)
    rows = bias.gather(2, index[:, None, :, None].expand(batch, heads, width, length))
    return rows.gather(3, index[:, None, None, :].expand(batch, heads, width, width))


def kept_mask(outputs) -> torch.Tensor:
    """The attention mask of an MrT5 encoder's (possibly shortened) output: ``(B, Lk)``, 1 for kept tokens.

    ``outputs`` is what the reduced ``T5EncoderModel`` (or ``model.get_encoder()``) returned: a
    :class:`~hf_tokred.integration.delete_gate.MrT5EncoderOutput`; this is its ``attention_mask`` field.
    Pass it with ``last_hidden_state`` to whatever reads the encoder's output (a pooling, a decoder).

    Example:
        >>> out = encoder(input_ids=ids, attention_mask=mask)              # doctest: +SKIP
        >>> pooled = (out.last_hidden_state * kept_mask(out)[..., None]).sum(1) / kept_mask(out).sum(1, keepdim=True)  # doctest: +SKIP
    """
    mask = getattr(outputs, "attention_mask", None)
    if mask is None:
        raise TokenReductionError(
            f"kept_mask: {type(outputs).__name__} carries no attention_mask; pass the output of the encoder of a model "
            "reduced with mrt5 (hf_tokred.apply(model, {'method': 'mrt5', ...})), called with return_dict=True"
        )
    return mask


def deletion_rate(outputs, attention_mask: torch.Tensor | None = None) -> float:
    """Fraction of the input's real tokens that hard deletion removed, for an MrT5 encoder output.

    ``attention_mask`` is the input's mask (None: no padding). The result is ``1 - kept / real`` over the batch.

    Example:
        >>> out = encoder(input_ids=ids, attention_mask=mask)              # doctest: +SKIP
        >>> deletion_rate(out, mask)                                        # doctest: +SKIP
        0.48
    """
    kept = kept_mask(outputs)
    gate = getattr(outputs, "delete_gate", None)
    if attention_mask is not None:
        real = int(attention_mask.sum())
    elif gate is not None:
        real = gate.numel()
    else:
        raise TokenReductionError("deletion_rate: pass the input's attention_mask")
    return 1.0 - int(kept.sum()) / max(real, 1)


@register_method("mrt5")
@dataclass(kw_only=True)
class MrT5Config(TokenReductionConfig):
    """MrT5 (arXiv 2410.20771): a learned delete gate after encoder block ``gate_layer`` of a T5 (ByT5) deletes
    tokens for the rest of the encoder and for the decoder. See the module docstring for the gate, the training
    (soft) and inference (hard) paths, the outputs and where we depart from the paper.

    Fields:
        gate_layer: how many encoder blocks run before the gate, on the full sequence; the later blocks see the
            shortened one. Default 3 ("after layer 3", the reference code's ``delete_gate_layer``). In
            ``[1, number of encoder blocks - 1]``.
        gate_scale: the gate's scale ``k`` (negative): ``G`` lies in ``[k, 0]``. Default -30 (the reference code's
            ``sigmoid_mask_scale``).
        threshold: hard deletion removes a real token when ``G < threshold``; in ``[gate_scale, 0]``. Default -15
            (half the scale, the reference code's ``deletion_threshold``). ``threshold = gate_scale`` deletes
            nothing (the no-op, bit-identical to the dense model).
        target_deletion: the fraction of real tokens the training regulariser's PI controller aims to delete
            (default 0.5). Inference does not read it; it records what the gate was trained for.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="mrt5", gate_layer=2).to_dict()["gate_layer"]
        2
    """

    stage = "sequence"
    wiring = "mrt5"
    model_kinds = ("seq2seq",)
    learned = True
    paper = "2410.20771"
    status = "beta"

    gate_layer: int = param(3, int, low=1, help="number of encoder blocks before the delete gate (it acts after "
                                                "block index gate_layer - 1)")
    gate_scale: float = param(-30.0, float, low=-1000.0, high=0.0, high_open=True,
                              help="the gate's scale k < 0: G = k * sigmoid(-(LN(H) W + b)) lies in [k, 0]")
    threshold: float = param(-15.0, float, low=-1000.0, high=0.0,
                             help="hard deletion removes a token when G < threshold; threshold = gate_scale deletes "
                                  "nothing")
    target_deletion: float = param(0.5, float, low=0.0, high=1.0, high_open=True,
                                   help="deletion rate the training regulariser aims for")

    def validate(self) -> None:
        if self.threshold < self.gate_scale:
            raise ConfigError(
                f"threshold: expected a number in [gate_scale, 0] = [{self.gate_scale:g}, 0] (G never goes below "
                f"gate_scale; threshold = gate_scale deletes nothing), got {self.threshold:g}",
                field="threshold",
            )

    @property
    def deletes_nothing(self) -> bool:
        """True when no token can be deleted (``threshold == gate_scale``): the gate is not run at all."""
        return self.threshold <= self.gate_scale

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The delete gate (``model.hf_tokred_modules["mrt5"]``), on the encoder's device, in float32 or the
        encoder's floating dtype; checks the model class and ``gate_layer`` first.

        Example:
            >>> cfg.learned_modules(model, adapter)["mrt5"].proj.weight.shape      # doctest: +SKIP
            torch.Size([1, 256])
        """
        supported = getattr(adapter, "supported_classes", ())
        if type(model).__name__ not in supported:
            raise UnsupportedModelError(
                f"mrt5 acts on {', '.join(supported) or 'T5 models'}; {type(model).__name__} reads the encoder's "
                "output per input token (or is not a T5), which a shortened encoder output would misalign"
            )
        blocks = adapter.encoder_blocks(model)
        if self.gate_layer >= len(blocks):
            raise ConfigError(
                f"gate_layer: expected a number of blocks before the gate in [1, {len(blocks) - 1}] "
                f"({type(model).__name__} has {len(blocks)} encoder blocks and at least one must run on the "
                f"shortened sequence), got {self.gate_layer}",
                field="gate_layer",
            )
        d_model = getattr(model.config, "d_model", None)
        if not isinstance(d_model, int):
            raise UnsupportedModelError(f"mrt5: {type(model).__name__}'s config has no integer d_model")
        gate = DeleteGate(d_model, self.gate_scale)
        parameter = next(blocks[self.gate_layer - 1].parameters(), None)
        if parameter is not None:
            dtype = parameter.dtype if parameter.is_floating_point() else None
            gate.to(device=parameter.device, dtype=dtype)
        gate.train(model.training)
        return {MODULE_NAME: gate}
