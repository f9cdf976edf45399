"""Wiring of sequence reducers (stage ``"sequence"``: ToMe, EViT, ATS, ...) into transformers encoders.

A reducer (see :mod:`hf_tokred.methods.encoder.base`) decides, in some blocks, how the sequence shrinks;
this module does everything else with hooks, never with a copied ``forward``. Where inside a block the
sequence shrinks comes from the architecture's :class:`~hf_tokred.model_patches.encoder.EncoderAdapter`:

* **pre-norm blocks** (ViT, DeiT, CLIP, SigLIP, DINOv2, ModernBERT): a forward pre-hook on ``adapter.mlp_input`` (the
  norm before the MLP) reduces the post-attention residual stream ``h`` to ``m``, so the MLP runs on the
  reduced tokens; a forward hook on ``adapter.mlp_output`` expands the MLP branch ``f`` back to the block's
  length (each input token gets its slot's value) so the block's own residual add still works; the block's
  forward hook then returns ``m + f``, which equals the reduction (size-weighted average) of the block's
  output ``h + expand(f)`` (in training, where dropout/drop-path differ per token, it reduces that output
  instead). This is the paper's placement (between attention and MLP) and its arithmetic;
* **post-norm blocks** (BERT, RoBERTa/XLM-R, DistilBERT): a forward hook on ``adapter.attention_output`` reduces its output, and the
  rest of the block runs on the reduced tokens;
* otherwise (BEiT) the block's output is reduced (forward hook on the block).

Architectures are refused, before any hook is installed, when transformers does not mark their attention as
going through the attention interface (``_supports_attention_backend``; e.g. Data2VecVision), or when their
adapter gives a reason (``EncoderAdapter.refusal``).

Per block we also install a forward **pre-hook** on the block. On the first block it starts the call: it
reads the key-padding pattern from the mask the model built, re-orders a left-padded batch so real tokens
come first, and sets the sizes (1 per real token, 0 for padding) and the source map. Once the sequence has
changed it replaces the attention mask the model passes to the block (built once, for the input length)
with one for the current tokens: padding and filler slots masked out, plus ``log(size)`` (proportional
attention) and ``log(key_weight)`` (soft masks) when asked. The mask travels in the block's arguments, so
gradient checkpointing recomputes the block with the same mask.

An :class:`~hf_tokred.attention.AttentionObserver` on the attention module of every reducing block computes
the statistics the reducer asks for (``needs``: keys averaged over heads, CLS-attention row, full attention,
value norms) from the queries/keys/values the attention function already has: SDPA still does the heavy
work, only the CLS row (O(N)) or, for methods that need it, the full attention map is recomputed.

**Positions.** Every current token has an *anchor*: the input position of the token anchoring its slot (its
own for a kept token; for a merged token, the token the others went into). Whatever the model computed once
from input positions is read at the anchors once the sequence changed: a block's attention mask when it is
more than a key-padding mask (a local-attention window, a relative position bias added to the mask) has its
rows and columns gathered, the block keyword arguments the adapter names in ``position_inputs`` (rotary
``position_embeddings``) are gathered along the sequence, and the output of the adapter's ``position_bias``
module (BEiT's per-block relative position bias) has its rows and columns gathered. A kept token thus keeps
its exact position; a merged token takes its anchor's.

With ``restore_length=True`` the last block's output is expanded back to the input length and order through
the source map (``origin``: for every input token, the current token carrying it, -1 once dropped; dropped
tokens keep the state they had when dropped). A reducer may instead name a block before which the sequence
comes back (``restore_block(num_blocks)``, e.g. Token Dropping's last layer, which sees every token again):
that block's input is restored and it and the later blocks run at the input length with the model's own mask.
A reducer may also restore the sequence after some blocks' output as part of the method (``restore_after(num_blocks)``,
independent of ``restore_length``; Evo-ViT after every reducing block, STViT after its semantic-token stage).
How a carried token gets its state back is the reducer's ``restore_update``: ``"copy"`` (its carrier's state) or
``"residual"``: its own state at the reduction point plus the update its carrier received since
(``h_t + carrier_now - carrier_then``, accumulated over several reductions in ``SequenceState.offset``); a kept
token thus comes back exactly as it was computed, and tokens folded into a summary token share its update. On
post-norm blocks, whose adapter names the norms on the residual stream (``stream_norms``), the update is replayed
per norm instead: before each norm a folded token gets the branch its carrier got there and then goes through
the norm itself (``LN2(LN1(h_t + attn_c) + mlp_c)`` for BERT), so it ends at the scale of the block's outputs.
A left-padded batch, re-ordered real-tokens-first for the reduction, stays in that order after a restore inside
the model (later reductions see each row's CLS first, as the row alone does) and is put back in input order at
the model's output.

Every handle and observer is recorded with ``applied.add_undo`` so ``hf_tokred.remove`` restores the model
exactly. After a forward pass: :func:`token_sizes`, :func:`token_counts`, :func:`source_map`, :func:`unmerge`.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import ViTConfig, ViTModel
    >>> vit = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
    ...                          num_attention_heads=4, intermediate_size=128)).eval()
    >>> _ = hf_tokred.apply(vit, {"method": "tome", "r": 4})
    >>> vit(torch.randn(1, 3, 32, 32)).last_hidden_state.shape[1]          # 65 - 4 * 4
    49
    >>> token_sizes(vit).sum().item()
    65.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention import AttentionObserver, add_observer, mask_keep, remove_observer
from ..errors import TokenReductionError, UnsupportedModelError
from .wiring import MODULES_ATTR, get_applied, register_wiring

STATE_ATTR = "_hf_tokred_sequence_state"

# Heads that predict one output per input token: they need restore_length=True.
_PER_TOKEN_HEADS = (
    "ForMaskedLM",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMaskedImageModeling",
    "ForPreTraining",
    "LMHeadModel",
    "ForCausalLM",
)
# Models that read every block's hidden states at the input length (restore_length restores only the last).
_ALL_LAYER_READERS = ("Backbone", "ForSemanticSegmentation")


@dataclass
class _Pending:
    """One block's hard reduction between its reduction point and its output hook."""

    plans: list
    before: torch.Tensor  # the states at the reduction point, before reducing (for dropped tokens' archive)
    merged: torch.Tensor  # the reduced states at the reduction point
    size: torch.Tensor  # sizes after the reduction
    slot_of: torch.Tensor | None = None  # composite (B, N) slot map, computed once
    branch: torch.Tensor | None = None  # the MLP branch on reduced tokens (pre-norm blocks)

    def composite_slots(self) -> torch.Tensor:
        if self.slot_of is None:
            slots = self.plans[0].slot_of()
            for plan in self.plans[1:]:
                slots = torch.where(slots >= 0, plan.slot_of().gather(1, slots.clamp(min=0)), -1)
            self.slot_of = slots
        return self.slot_of

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        return y.gather(1, self.composite_slots().clamp(min=0)[..., None].expand(-1, -1, y.shape[-1]))


@dataclass
class _FastPath:
    """Evo-ViT's fast path through post-norm blocks: for every input token folded into another token, its state when
    first folded (``then``, ``(B, N_in, C)``) and that block (``since``, -1: never folded); per block run since,
    ``(block, origin, captures)``: the source map after the block and what the block's stream norms saw."""

    then: torch.Tensor
    since: torch.Tensor
    blocks: list

    def replay(self, norms: dict[int, list[torch.nn.Module]]) -> torch.Tensor:
        """Every folded token's state after the recorded blocks: before each norm of a block it gets the branch its
        carrier got there (the norm's input minus the stream entering the branch), then goes through the norm
        itself, as the carrier did. A token folded nowhere keeps ``then`` (unused)."""
        state = self.then
        for block, origin, captures in self.blocks:
            carrier = origin.clamp(min=0)[..., None].expand(-1, -1, state.shape[-1])
            updated = state
            stream = captures[0]
            for norm, (entering, leaving) in zip(norms[block], zip(captures[1::2], captures[2::2])):
                # norm.forward, not norm(...): the capturing hooks must not see the replay
                updated = norm.forward(updated + (entering - stream).gather(1, carrier))
                stream = leaving
            active = (self.since >= 0) & (self.since <= block) & (origin >= 0)
            state = torch.where(active[..., None], updated, state)
        return state


class SequenceState:
    """Per-call state of one reduced encoder, shared by the hooks of all its blocks.

    Attributes (valid after a forward pass):
        size: ``(B, N, 1)`` float32 token sizes (0 for padding and filler slots).
        padded: some tokens may be padding or filler (so masks are needed).
        origin: ``(B, N_in)`` long: for every input token (input order), the output token carrying it, or -1.
        anchor: ``(B, N)`` long: for every current token, the input position it stands at (see "Positions").
        token_counts: sequence length after each block of the last call.
        row_counts: real (non-padding, non-filler) tokens per row after each block, ``(B,)`` long tensors.
        records: free-form per-call storage for reducers (e.g. learned pruners' decisions for a loss).
    """

    def __init__(self, reducer, schedule: list, protected: int, class_tokens: int, point: str):
        self.reducer = reducer
        self.schedule = schedule
        self.protected = protected
        self.class_tokens = class_tokens
        self.point = point
        self.prop_attn = bool(getattr(reducer, "prop_attn", False))
        self.restore_length = bool(getattr(reducer, "restore_length", False))
        self.reduce_at = getattr(reducer, "reduce_at", "attention")
        self.needs = frozenset(getattr(reducer, "needs", ()))
        self.restore_update = getattr(reducer, "restore_update", "copy")
        self.restores = self.restore_length  # set by the wiring: the sequence comes back at the input length somewhere
        # set by the wiring for post-norm blocks with restore_update="residual": block -> its residual-stream norms
        self.stream_norms: dict[int, list[torch.nn.Module]] = {}
        self.modules = None
        self.reset()

    def reset(self) -> None:
        """Forget everything about the previous call (run by the first block's pre-hook)."""
        self.size: torch.Tensor | None = None
        self.padded = False
        self.changed = False
        self.input_valid: torch.Tensor | None = None
        self.real_first: tuple[torch.Tensor, torch.Tensor] | None = None  # a left-padded batch's (anchor, origin)
        self.reordered_only = False  # every input token is here, real tokens first (see _restore)
        self.origin: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None
        self.block_anchor: dict[int, torch.Tensor | None] = {}  # anchors at each block's input (None: unchanged)
        self.masks: dict[int, tuple[torch.Tensor, bool]] = {}  # id(mask) -> (mask, structured), this call's masks
        self.archive: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None  # restore_update="residual": (B, N_in, C) state at reduction - carrier's
        self.fast: _FastPath | None = None  # restore_update="residual" on post-norm blocks (stream_norms)
        self.captures: dict[int, list[torch.Tensor]] = {}  # block -> [its input, each stream norm's input and output]
        self.key_weight: torch.Tensor | None = None
        self.keep_self = True
        self.soft_eps = 1e-6
        self.entry: dict[int, tuple] = {}
        self.stats: dict[int, dict] = {}
        self.pending: dict[int, Any] = {}
        self.finished: set[int] = set()  # blocks whose output hook ran: a later mid-block call is a checkpoint replay
        self.token_counts: list[int] = []
        self.row_counts: list[torch.Tensor] = []
        self.records: dict[str, Any] = {}
        self.block_masks: dict[int, torch.Tensor | None] = {}  # mask_route != "block": each block's mask

    # -- the current tokens -------------------------------------------------------------------

    def valid(self) -> torch.Tensor | None:
        return self.size[..., 0] > 0 if self.padded else None

    def build_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention mask for the current tokens, ``(B, 1, 1, N)`` (``(B, 1, N, N)`` with a
        self-keeping soft mask), or None when every token is real and nothing biases attention."""
        size = self.size[..., 0]
        base = None
        if self.prop_attn:
            base = size.clamp_min(torch.finfo(torch.float32).tiny).log()
        if self.padded:
            base = (torch.zeros_like(size) if base is None else base).masked_fill(size <= 0, torch.finfo(torch.float32).min)
        if self.key_weight is None:
            return None if base is None else base[:, None, None, :].to(dtype)
        soft = (self.key_weight.float() + self.soft_eps).log()
        total = soft if base is None else base + soft
        mask = total[:, None, None, :]
        if self.keep_self:
            # Every token still attends to itself (DynamicViT): the diagonal carries no soft weight.
            n = size.shape[1]
            mask = mask.expand(-1, -1, n, -1).clone()
            index = torch.arange(n, device=size.device)
            mask[:, 0, index, index] = torch.zeros_like(size) if base is None else base
        return mask.to(dtype)

    def advance(self, pending: _Pending, block: int) -> None:
        """Record block ``block``'s hard reduction: sizes, padding, source map and (with ``restore_length``) dropped
        states."""
        slots = pending.composite_slots()
        origin = self.origin
        new_origin = torch.where(origin >= 0, slots.gather(1, origin.clamp(min=0)), -1)
        if self.restores:
            dropped = (origin >= 0) & (new_origin < 0)
            if bool(dropped.any()):
                channels = pending.before.shape[-1]
                states = pending.before.gather(1, origin.clamp(min=0)[..., None].expand(-1, -1, channels))
                archive = self.archive if self.archive is not None else torch.zeros_like(states)
                self.archive = torch.where(dropped[..., None], states, archive)
            if self.restore_update == "residual" and self.stream_norms:
                self._fold(pending, origin, new_origin, block)
            elif self.restore_update == "residual":
                # Each carried input token remembers (its state before this reduction) - (its carrier's state after
                # it); at the restore it gets carrier_now + this offset. A kept token's offset is exactly 0.
                channels = pending.before.shape[-1]
                then = pending.before.gather(1, origin.clamp(min=0)[..., None].expand(-1, -1, channels))
                carrier = pending.merged.gather(1, new_origin.clamp(min=0)[..., None].expand(-1, -1, channels))
                delta = torch.where((new_origin >= 0)[..., None], then - carrier, torch.zeros_like(then))
                self.offset = delta if self.offset is None else self.offset + delta
        self.origin = new_origin
        self.reordered_only = False
        for plan in pending.plans:
            self.anchor = self.anchor.gather(1, plan.keep)
        if self.key_weight is not None:
            for plan in pending.plans:
                self.key_weight = self.key_weight.gather(1, plan.keep)
        self.size = pending.size
        self.padded = self.padded or any(p.slot_valid is not None for p in pending.plans)
        self.changed = True

    def _fold(self, pending: _Pending, origin: torch.Tensor, new_origin: torch.Tensor, block: int) -> None:
        """Post-norm fast path: remember the state of every input token this reduction folds into another token
        (its carrier's state differs from its own) for the first time, and the block it happened at."""
        channels = pending.before.shape[-1]
        then = pending.before.gather(1, origin.clamp(min=0)[..., None].expand(-1, -1, channels))
        carrier = pending.merged.gather(1, new_origin.clamp(min=0)[..., None].expand(-1, -1, channels))
        folded = (new_origin >= 0) & (then != carrier).any(dim=-1)
        if self.fast is None:
            if not bool(folded.any()):
                return
            self.fast = _FastPath(then=torch.zeros_like(then), since=torch.full_like(origin, -1), blocks=[])
        new = folded & (self.fast.since < 0)
        self.fast.then = torch.where(new[..., None], then, self.fast.then)
        self.fast.since = torch.where(new, torch.full_like(origin, block), self.fast.since)

    def structured(self, mask: torch.Tensor) -> bool:
        """Whether ``mask`` (one the model passes to a block, at the input length) is more than a key-padding mask."""
        known = self.masks.get(id(mask))
        if known is None or known[0] is not mask:
            known = (mask, _mask_structure(mask, self.origin.shape[0], self.origin.shape[1])[1])
            self.masks[id(mask)] = known  # keeps the mask alive, so its id is not reused within the call
        return known[1]

    def follow_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The attention mask for the current tokens: hf_tokred's own terms (padding and filler slots,
        proportional attention, soft masks) plus, when the model's ``mask`` carries positions (a window, a
        bias), that mask read at the current tokens' anchors."""
        ours = self.build_mask(dtype)
        if mask is None or not self.structured(mask):
            return ours
        theirs = gather_positions(mask, self.anchor)
        if ours is None:
            return theirs
        if theirs.dtype == torch.bool:
            theirs = torch.zeros(theirs.shape, dtype=dtype, device=theirs.device).masked_fill(~theirs, torch.finfo(dtype).min)
        # Two masked terms must not add up to -inf: a row masked everywhere would give NaN in SDPA.
        return (theirs.to(dtype) + ours).clamp_min(torch.finfo(dtype).min)

    def soften(self, soft) -> None:
        """Record a soft mask: multiply its key weights into those of earlier soft masks."""
        weight = soft.key_weight
        self.key_weight = weight if self.key_weight is None else self.key_weight * weight
        self.keep_self = soft.keep_self
        self.soft_eps = soft.eps
        self.changed = True


# ---------------------------------------------------------------------------------------------
# Attention statistics
# ---------------------------------------------------------------------------------------------


def _scaling(module, head_dim: int) -> float:
    for name in ("scaling", "scale"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return head_dim ** -0.5


def _attention_probs(query, key, mask, scaling, rows=None) -> torch.Tensor:
    """Softmax attention (float32) of the first ``rows`` queries (all when None) over every key."""
    q = query if rows is None else query[:, :, :rows]
    logits = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask[:, :, : q.shape[2]]
        if m.dtype == torch.bool:
            # finite: a query that sees no key at all (padding outside every real token's local window) gets a
            # uniform row instead of NaN, which would spread into statistics that sum over queries
            logits = logits.masked_fill(~m, torch.finfo(logits.dtype).min)
        else:
            logits = logits + m.float()
    return logits.softmax(dim=-1)


def attention_statistics(module, query, key, value, mask, needs, class_tokens: int,
                         valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The statistics named in ``needs`` (see ``hf_tokred.methods.encoder.base.STATISTICS``), detached.

    Without class tokens, ``cls_attention`` is the attention each token receives, averaged over heads and
    over the real queries (SigLIP's fallback).

    Example:
        >>> import torch
        >>> q = k = v = torch.randn(1, 2, 5, 4)
        >>> s = attention_statistics(None, q, k, v, None, {"cls_attention", "metric"}, 1, None)
        >>> s["cls_attention"].shape, s["metric"].shape
        (torch.Size([1, 5]), torch.Size([1, 5, 4]))
    """
    out = {}
    with torch.no_grad():
        if "metric" in needs:
            out["metric"] = key.detach().mean(dim=1)
        if "value_norm" in needs:
            out["value_norm"] = value.detach().float().square().sum(dim=(1, 3)).sqrt()
        full = None
        scaling = _scaling(module, query.shape[-1])
        if "attention" in needs or ("cls_attention" in needs and class_tokens == 0):
            full = _attention_probs(query.detach(), key.detach(), mask, scaling)
            if "attention" in needs:
                out["attention"] = full
        if "cls_attention" in needs:
            if class_tokens > 0:
                rows = _attention_probs(query.detach(), key.detach(), mask, scaling, rows=class_tokens)
                out["cls_attention"] = rows.mean(dim=(1, 2))
            else:
                received = full.mean(dim=1)  # (B, N queries, N keys)
                if valid is None:
                    out["cls_attention"] = received.mean(dim=1)
                else:
                    weight = valid.float()[:, :, None]
                    out["cls_attention"] = (received * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    return out


class _Statistics(AttentionObserver):
    """Computes a reducer's statistics in one block's attention; stores them for block ``target``."""

    def __init__(self, state: SequenceState, target: int):
        self.state = state
        self.target = target

    def observe(self, module, query, key, value, attention_mask) -> None:
        state = self.state
        entry = state.entry.get(self.target if state.reduce_at == "attention" else self.target - 1)
        valid = None if entry is None else entry[1]
        state.stats[self.target] = attention_statistics(module, query, key, value, attention_mask, state.needs,
                                                        state.class_tokens, valid)


# How the mask of the current tokens reaches a block's attention (``EncoderAdapter.mask_route``): as the block's
# ``attention_mask`` argument; through an observer of hf_tokred's attention function (the block passes no mask on,
# e.g. BLIP-2's vision attention calls the interface with ``attention_mask=None``); or applied to the attention
# probabilities entering the module at ``adapter.attention_probs`` (BLIP's vision attention bypasses the interface):
# ``p * exp(mask)`` renormalised, which is softmax(logits + mask).
MASK_ROUTES = ("block", "attention", "probabilities")


class _MaskDelivery(AttentionObserver):
    """Hands block ``index``'s mask of the current tokens to hf_tokred's attention function (``mask_route="attention"``)."""

    def __init__(self, state: SequenceState, index: int):
        self.state = state
        self.index = index

    def prepare(self, module, query, key, value, attention_mask):
        mask = self.state.block_masks.get(self.index)
        if mask is None:
            return attention_mask
        if attention_mask is not None:
            raise TokenReductionError(f"{type(module).__name__}: the attention received a mask of its own although its "
                                      "adapter says the block passes none on (mask_route='attention')")
        return mask


def _probability_mask_hook(state: SequenceState, index: int):
    """Forward pre-hook on the module receiving block ``index``'s attention probabilities (``mask_route="probabilities"``)."""

    def hook(module, args):
        mask = state.block_masks.get(index)
        if mask is None:
            return None
        probs = args[0]
        weight = mask_keep(mask).to(probs.dtype) if mask.dtype == torch.bool else mask.float().exp().to(probs.dtype)
        probs = probs * weight
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        return (probs, *args[1:])

    return hook


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


def _hidden_and_mask(args, kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    return hidden, mask


def _with_hidden_and_mask(args, kwargs, hidden, mask):
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs = {**kwargs, "hidden_states": hidden}
    if len(args) > 1:
        args = (args[0], mask, *args[2:])
    else:
        kwargs = {**kwargs, "attention_mask": mask}
    return args, kwargs


def _mask_structure(mask: torch.Tensor, batch: int, n: int) -> tuple[torch.Tensor | None, bool]:
    """``(valid, structured)`` of a bidirectional attention mask ``(B|1, H|1, N|1, N)``.

    ``valid`` is the real-token mask ``(B, N)`` (a key no query may see is padding), or None when every token
    is real. ``structured`` says the mask is more than a key-padding mask: some real query may not see some
    real key (a local-attention window), or a float mask carries a bias besides 0 and "masked" (relative
    positions). A structured mask is tied to input positions and is read at the anchors once tokens move.

    Example:
        >>> import torch
        >>> window = (torch.arange(4)[:, None] - torch.arange(4)[None]).abs() <= 1
        >>> valid, structured = _mask_structure(window[None, None], 1, 4)
        >>> valid, structured
        (None, True)
    """
    keep = mask_keep(mask)
    if keep.dim() != 4 or keep.shape[-1] != n or keep.shape[-2] not in (1, n):
        raise TokenReductionError(
            f"sequence reduction expects a (batch, 1, {n}, {n}) attention mask, got {tuple(mask.shape)}"
        )
    keep = keep.expand(batch, -1, -1, -1)
    valid = keep.any(dim=-2).all(dim=1)
    padding_only = (keep == valid[:, None, None, :]) | ~valid[:, None, : keep.shape[-2], None]
    structured = not bool(padding_only.all())
    if not structured and mask.dtype != torch.bool:
        structured = bool(((mask != 0) & mask_keep(mask)).any())
    return (None if bool(valid.all()) else valid), structured


def gather_positions(pairwise: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Read a pairwise tensor over input positions ``(B|1, H, N_in|1, N_in)`` (an attention mask or bias) at the
    current tokens' input positions ``anchor`` ``(B, N)``: ``out[b, h, i, j] = pairwise[b, h, anchor[b, i],
    anchor[b, j]]`` (rows are kept as they are when there is one).

    Example:
        >>> import torch
        >>> bias = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> gather_positions(bias, torch.tensor([[0, 3]]))[0, 0].tolist()
        [[0.0, 3.0], [12.0, 15.0]]
    """
    batch, n = anchor.shape
    out = pairwise.expand(batch, *pairwise.shape[1:])
    heads = out.shape[1]
    if out.shape[2] != 1:
        out = out.gather(2, anchor[:, None, :, None].expand(-1, heads, -1, out.shape[3]))
    return out.gather(3, anchor[:, None, None, :].expand(-1, heads, out.shape[2], -1))


def gather_sequence(value: Any, anchor: torch.Tensor, name: str) -> Any:
    """Read per-token tensors over input positions (sequence on dim 1; a batch of 1 is broadcast), or a tuple or
    list of them, at ``anchor`` ``(B, N)``; None stays None.

    Example:
        >>> import torch
        >>> cos = torch.arange(4.0)[None, :, None]            # (1, N_in, D)
        >>> gather_sequence((cos, cos), torch.tensor([[0, 2], [1, 3]]), "x")[0][..., 0].tolist()
        [[0.0, 2.0], [1.0, 3.0]]
    """
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(gather_sequence(v, anchor, name) for v in value)
    if not torch.is_tensor(value) or value.dim() < 2 or value.shape[0] not in (1, anchor.shape[0]):
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise TokenReductionError(f"{name}: expected per-token tensors of shape (batch, tokens, ...), got {shape}")
    batch, n = anchor.shape
    full = value.expand(batch, *value.shape[1:])
    index = anchor.reshape(batch, n, *([1] * (full.dim() - 2))).expand(-1, -1, *full.shape[2:])
    return full.gather(1, index)


def _submodule(block, path, index, adapter, role):
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(
            f"block {index} ({type(block).__name__}) has no {role} module at {path!r} (adapter {adapter.name}); "
            "this transformers version lays the block out differently"
        ) from None


def _optional_submodule(block, path):
    """``block.get_submodule(path)``, or None when there is no path or no module there."""
    if path is None:
        return None
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _check_model(model, adapter, reducer) -> None:
    name = type(model).__name__
    refusal = adapter.refusal(model, reducer) if hasattr(adapter, "refusal") else None
    if refusal is not None:
        raise UnsupportedModelError(f"{reducer.method} cannot act on {name}: {refusal}")
    # transformers' own flag for "every attention module calls the attention interface": without it the
    # attention statistics, masks and position biases of a shortened sequence cannot reach the attention.
    bypass = not getattr(adapter, "uses_attention_interface", True)
    if bypass and getattr(reducer, "needs", ()):
        raise UnsupportedModelError(
            f"{reducer.method} needs attention statistics ({', '.join(sorted(reducer.needs))}); the attention of {name} "
            "does not go through transformers' attention interface, so only reducers that need none (madtp, "
            "dynamicvit) can act on it"
        )
    if not bypass and not getattr(type(model), "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{reducer.method} cannot act on {name}: its attention does not go through transformers' attention "
            "interface (the class does not set _supports_attention_backend), so hf_tokred can neither observe "
            "its attention nor give it the mask of a shortened sequence"
        )
    for suffix in _ALL_LAYER_READERS:
        if name.endswith(suffix):
            raise UnsupportedModelError(
                f"{reducer.method} shortens the sequence inside the encoder; {name} reads the hidden states of every "
                f"block at the input length and cannot use it. Use {', '.join(adapter.examples)}"
            )
    if not getattr(reducer, "restore_length", False) and not getattr(adapter, "cross_modal", False):
        for suffix in _PER_TOKEN_HEADS:
            if name.endswith(suffix):
                raise UnsupportedModelError(
                    f"{reducer.method} shortens the sequence; {name} predicts one output per input token: pass "
                    f"restore_length=True (the last hidden state comes back at the input length), or use the base "
                    f"model or a pooled head ({', '.join(adapter.examples)})"
                )
    if getattr(model.config, "is_decoder", False):
        raise UnsupportedModelError(
            f"{reducer.method} acts on bidirectional encoders; {name} is configured as a decoder (is_decoder=True)"
        )
    for attr in ("schedule", "plan"):
        if not callable(getattr(reducer, attr, None)):
            raise UnsupportedModelError(f"{reducer.method}: a sequence reducer must define {attr}()")
    if getattr(reducer, "reduce_at", "attention") not in ("attention", "input"):
        raise UnsupportedModelError(f"{reducer.method}: reduce_at must be 'attention' or 'input'")
    if getattr(reducer, "restore_update", "copy") not in ("copy", "residual"):
        raise UnsupportedModelError(f"{reducer.method}: restore_update must be 'copy' or 'residual'")


def _plans(result, method: str):
    """Normalise what ``plan()`` returned: (list of Reductions, SoftMask or None)."""
    from ..methods.encoder.base import Reduction, SoftMask

    if result is None:
        return [], None
    if isinstance(result, SoftMask):
        return [], result
    if isinstance(result, Reduction):
        return [result], None
    if isinstance(result, (list, tuple)) and all(isinstance(r, Reduction) for r in result):
        return list(result), None
    raise TokenReductionError(f"{method}: plan() must return a Reduction, a list of them, a SoftMask or None; "
                              f"got {type(result).__name__}")


@register_wiring("sequence")
def wire_sequence_reducer(model, adapter, reducer, applied) -> None:
    """Install a sequence reducer (``reducer.schedule`` / ``reducer.plan``) on every block of an encoder.

    Called by ``hf_tokred.apply`` for reducers of stage ``"sequence"``; all checks run before any hook is
    installed, and every hook is recorded in ``applied`` for ``remove()``.

    Example:
        >>> import hf_tokred
        >>> model = hf_tokred.apply(bert_model, {"method": "tome", "r": 2})   # doctest: +SKIP
    """
    _check_model(model, adapter, reducer)
    blocks = adapter.blocks(model)
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__}: no blocks found at {adapter.layers!r} (adapter {adapter.name})")
    schedule = list(reducer.schedule(len(blocks)))
    if len(schedule) != len(blocks):
        raise TokenReductionError(f"{reducer.method}: schedule() gave {len(schedule)} entries for {len(blocks)} blocks")
    point = getattr(adapter, "reduce_point", "block_output")
    if reducer.reduce_at == "input":
        point = "input"
    attentions = [_submodule(block, adapter.attention, i, adapter, "attention") for i, block in enumerate(blocks)]
    mids = []
    for i, block in enumerate(blocks):
        if point == "mlp":
            mids.append((_submodule(block, adapter.mlp_input, i, adapter, "MLP input"),
                         _submodule(block, adapter.mlp_output, i, adapter, "MLP output")))
        elif point == "attention_output":
            mids.append((_submodule(block, adapter.attention_output, i, adapter, "attention output"), None))
        else:
            mids.append((None, None))
    position_inputs = tuple(getattr(adapter, "position_inputs", ()))
    bias_path = getattr(adapter, "position_bias", None)
    bias_length = getattr(adapter, "position_bias_length", None)
    # The position-bias module is optional per block (BEiT builds it only with use_relative_position_bias).
    biases = [_optional_submodule(block, bias_path) for block in blocks]
    protected = adapter.protected(model) if hasattr(adapter, "protected") else adapter.protected_tokens
    class_tokens = getattr(adapter, "class_tokens", min(protected, 1))

    route = getattr(adapter, "mask_route", "block")
    if route not in MASK_ROUTES:
        raise UnsupportedModelError(f"adapter {adapter.name}: mask_route must be one of {MASK_ROUTES}, got {route!r}")
    state = SequenceState(reducer, schedule, protected, class_tokens, point)
    setattr(model, STATE_ATTR, state)
    applied.add_undo(lambda: model.__dict__.pop(STATE_ATTR, None))
    last = len(blocks) - 1
    reducing = any(schedule)
    # The block whose *input* gets the input length back (None: the last block's output, see restore_length).
    restore_at = getattr(reducer, "restore_block", None)
    restore_block = restore_at(len(blocks)) if callable(restore_at) and state.restore_length else None
    after = getattr(reducer, "restore_after", None)
    restore_after = frozenset(after(len(blocks)) if callable(after) else ())
    bad = sorted(i for i in restore_after if not isinstance(i, int) or not 0 <= i <= last)
    if bad:
        raise TokenReductionError(f"{reducer.method}: restore_after() named block {bad[0]}; the model has blocks 0..{last}")
    state.restores = state.restore_length or bool(restore_after)
    norm_paths = tuple(getattr(adapter, "stream_norms", ()))
    if state.restore_update == "residual" and norm_paths and state.restores:
        if state.reduce_at != "input":
            raise UnsupportedModelError(f"{reducer.method}: on post-norm blocks restore_update='residual' needs "
                                        "reduce_at='input' (the carrier's update is replayed through whole blocks)")
        state.stream_norms = {i: [_submodule(block, path, i, adapter, "residual-stream norm") for path in norm_paths]
                              for i, block in enumerate(blocks)}

    def context(index, hidden, size, valid, training):
        from ..methods.encoder.base import ReductionContext

        stats = state.stats.pop(index, {})
        return ReductionContext(
            hidden=hidden, size=size, valid=valid, protected=protected, class_tokens=class_tokens, block=index,
            num_blocks=len(blocks), amount=schedule[index], training=training, modules=model._modules.get(MODULES_ATTR),
            state=state, **stats,
        )

    def decide(index, hidden, training):
        """Run the reducer at block ``index``; returns (pending hard reduction or None, soft mask or None)."""
        if getattr(reducer, "_dense", False):  # hf_tokred.training.dense_pass: the model runs dense (a teacher)
            return None, None
        size, valid = state.entry[index]
        if state.needs and index not in state.stats and state.reduce_at == "attention":
            raise TokenReductionError(
                f"{reducer.method}: the attention of block {index} reported no statistics; the model's attention "
                f"implementation is {model.config._attn_implementation!r}, hf_tokred needs 'hf_tokred_sdpa' or "
                "'hf_tokred_eager' (set by hf_tokred.apply)"
            )
        plans, soft = _plans(reducer.plan(context(index, hidden, size, valid, training)), reducer.method)
        if not plans:
            return None, soft
        merged, new_size = hidden, size
        for plan in plans:
            merged, new_size = plan.apply(merged, new_size)
        return _Pending(plans, hidden, merged, new_size), soft

    def start(hidden, mask):
        batch, n = hidden.shape[:2]
        state.reset()
        state.modules = model._modules.get(MODULES_ATTR)
        valid = None
        if mask is not None:
            valid, structured = _mask_structure(mask, batch, n)
            state.masks[id(mask)] = (mask, structured)
        state.input_valid = valid
        state.padded = valid is not None
        state.size = (torch.ones(batch, n, 1, dtype=torch.float32, device=hidden.device) if valid is None
                      else valid.to(torch.float32)[..., None])
        state.origin = torch.arange(n, device=hidden.device).expand(batch, n)
        state.anchor = state.origin
        if valid is not None and reducing:
            hidden = _real_tokens_first(state, hidden)
        return hidden

    def make_pre_hook(index):
        def pre_hook(module, args, kwargs):
            hidden, mask = _hidden_and_mask(args, kwargs)
            if index == 0:
                hidden = start(hidden, mask)
            restored = index == restore_block and state.changed
            if restored:
                # Back at the input layout: the model's own mask and position inputs apply again.
                hidden = _restore(state, hidden)
            if point == "input" and schedule[index]:
                state.entry[index] = (state.size, state.valid())
                pending, soft = decide(index, hidden, module.training)
                if pending is not None:
                    state.advance(pending, index)
                    hidden = pending.merged
                if soft is not None:
                    state.soften(soft)
            state.entry[index] = (state.size, state.valid())
            state.block_anchor[index] = state.anchor if state.changed else None
            if state.fast is not None and index in state.stream_norms:
                state.captures[index] = [hidden]  # the stream entering the block's first branch
            if not state.changed:
                return _with_hidden_and_mask(args, dict(kwargs), hidden, mask) if restored else None
            current = state.follow_mask(mask, hidden.dtype)
            if route == "block":
                args, kwargs = _with_hidden_and_mask(args, dict(kwargs), hidden, current)
            else:  # the block does not hand a mask to its attention: the attention's own hook applies it
                state.block_masks[index] = current
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": hidden}
            for name in position_inputs:
                if kwargs.get(name) is not None:
                    kwargs[name] = gather_sequence(kwargs[name], state.anchor, f"{type(module).__name__} {name}")
            return args, kwargs

        return pre_hook

    def make_mlp_input_hook(index, block):
        def hook(module, args):
            pending, soft = decide(index, args[0], block.training)
            state.pending[index] = (pending, soft)
            if pending is None:
                return None
            return (pending.merged, *args[1:])

        return hook

    def make_mlp_output_hook(index):
        def hook(module, args, output):
            if index in state.finished:  # gradient-checkpointing replay: nothing reads the reduction afterwards
                pending = state.pending.pop(index, (None, None))[0]
            else:
                pending = state.pending.get(index, (None, None))[0]
            if pending is None:
                return None
            pending.branch = output
            return pending.expand(output)

        return hook

    def make_attention_output_hook(index, block):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            pending, soft = decide(index, hidden, block.training)
            if index not in state.finished:  # not a gradient-checkpointing replay
                state.pending[index] = (pending, soft)
            if pending is None:
                return None
            return (pending.merged, *output[1:]) if isinstance(output, tuple) else pending.merged

        return hook

    def make_hook(index, block):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            changed = False
            pending, soft = state.pending.pop(index, (None, None))
            if point == "block_output" and schedule[index]:
                pending, soft = decide(index, hidden, block.training)
            if pending is not None:
                if point == "mlp":
                    if pending.branch is not None and not block.training:
                        hidden = pending.merged + pending.branch
                    else:
                        size = state.entry[index][0]
                        for plan in pending.plans:
                            hidden, size = plan.apply(hidden, size)
                elif point == "block_output":
                    hidden = pending.merged
                state.advance(pending, index)
                changed = True
            if soft is not None:
                state.soften(soft)
            if state.fast is not None and index in state.captures:
                state.fast.blocks.append((index, state.origin, state.captures.pop(index)))
            state.stats.pop(index, None)
            state.finished.add(index)
            final = index == last and (state.restore_length or state.reordered_only)
            if state.changed and (final or index in restore_after):
                # Every input token again; a left-padded batch stays real-tokens-first until the model's output,
                # so that later reductions see each row's tokens (its CLS first) as the row alone does.
                hidden = _restore(state, hidden, real_first=index < last)
                changed = True
            state.token_counts.append(hidden.shape[1])
            state.row_counts.append((state.size[..., 0] > 0).sum(dim=1))
            if not changed:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def make_bias_pre_hook(index):
        def pre_hook(module, args, kwargs):
            # Build the bias for the input grid, not for the current (shorter) length; it is gathered after.
            if state.block_anchor.get(index) is None or bias_length not in kwargs:
                return None
            return args, {**kwargs, bias_length: state.origin.shape[1]}

        return pre_hook

    def make_bias_hook(index):
        def hook(module, args, output):
            anchor = state.block_anchor.get(index)  # this block's own (also in a gradient-checkpointing replay)
            if anchor is None:
                return None
            n = state.origin.shape[1]
            if output.dim() != 4 or output.shape[-2:] != (n, n):
                raise TokenReductionError(
                    f"{type(module).__name__} (block {index}) returned a position bias of shape {tuple(output.shape)}; "
                    f"sequence reduction expects (batch, heads, {n}, {n}) over the input tokens"
                )
            return gather_positions(output, anchor)

        return hook

    def make_stream_norm_hook(index, count):
        def hook(module, args, output):
            captures = state.captures.get(index)
            if captures is not None and len(captures) < 1 + 2 * count:  # not a gradient-checkpointing replay
                captures += [args[0], output]

        return hook

    def statistics_target(index):
        """The block whose plan uses the statistics of block ``index``'s attention, or None."""
        if not state.needs:
            return None
        if state.reduce_at == "attention":
            return index if schedule[index] else None
        return index + 1 if index < last and schedule[index + 1] else None

    for index, (block, attention, (mid_in, mid_out)) in enumerate(zip(blocks, attentions, mids)):
        handles = [
            block.register_forward_pre_hook(make_pre_hook(index), with_kwargs=True, prepend=True),
            block.register_forward_hook(make_hook(index, block), prepend=True),
        ]
        if schedule[index] and point == "mlp":
            handles.append(mid_in.register_forward_pre_hook(make_mlp_input_hook(index, block), prepend=True))
            handles.append(mid_out.register_forward_hook(make_mlp_output_hook(index), prepend=True))
        elif schedule[index] and point == "attention_output":
            handles.append(mid_in.register_forward_hook(make_attention_output_hook(index, block), prepend=True))
        if biases[index] is not None and reducing:
            if bias_length is not None:
                handles.append(biases[index].register_forward_pre_hook(make_bias_pre_hook(index), with_kwargs=True,
                                                                       prepend=True))
            handles.append(biases[index].register_forward_hook(make_bias_hook(index), prepend=True))
        for norm in state.stream_norms.get(index, ()):
            handles.append(norm.register_forward_hook(make_stream_norm_hook(index, len(norm_paths))))
        for handle in handles:
            applied.add_undo(handle.remove)
        if route == "attention" and reducing:
            delivery = _MaskDelivery(state, index)
            add_observer(attention, delivery)
            applied.add_undo(lambda attention=attention, delivery=delivery: remove_observer(attention, delivery))
        elif route == "probabilities" and reducing:
            probs = _submodule(block, adapter.attention_probs, index, adapter, "attention probabilities")
            handle = probs.register_forward_pre_hook(_probability_mask_hook(state, index), prepend=True)
            applied.add_undo(handle.remove)
        target = statistics_target(index)
        if target is not None:
            observer = _Statistics(state, target)
            add_observer(attention, observer)
            applied.add_undo(lambda attention=attention, observer=observer: remove_observer(attention, observer))
    install = getattr(reducer, "install", None)
    if callable(install):  # extra hooks a method needs beyond the blocks (e.g. madtp's text guidance)
        install(model, adapter, applied)


def _real_tokens_first(state: SequenceState, hidden: torch.Tensor) -> torch.Tensor:
    """Move padding after the real tokens (left-padded batches) so that rows reduce as when run alone."""
    valid = state.input_valid
    prefix = torch.arange(valid.shape[1], device=valid.device) < valid.sum(dim=1, keepdim=True)
    if torch.equal(prefix, valid):
        return hidden
    permutation = (~valid).to(torch.uint8).argsort(dim=1, stable=True)
    state.size = prefix.to(torch.float32)[..., None]
    state.anchor = permutation
    state.origin = torch.empty_like(permutation).scatter_(
        1, permutation, torch.arange(valid.shape[1], device=valid.device).expand_as(permutation))
    state.real_first = (state.anchor, state.origin)
    state.changed = True
    return hidden.gather(1, permutation[..., None].expand(-1, -1, hidden.shape[-1]))


def _restore(state: SequenceState, hidden: torch.Tensor, real_first: bool = False) -> torch.Tensor:
    """``hidden`` at the input length and order (see ``restore_length``, ``restore_after``, ``restore_update``);
    with ``real_first``, a batch that was re-ordered real-tokens-first (left padding) keeps that order, and
    hf_tokred keeps building the blocks' masks."""
    origin = state.origin
    full = hidden.gather(1, origin.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    if state.offset is not None:
        full = full + state.offset.to(full.dtype)  # zero for kept and dropped tokens
    if state.fast is not None:
        folded = (state.fast.since >= 0) & (origin >= 0)
        full = torch.where(folded[..., None], state.fast.replay(state.stream_norms).to(full.dtype), full)
    state.fast = None
    state.captures = {}
    if state.archive is not None:
        full = torch.where((origin >= 0)[..., None], full, state.archive.to(full.dtype))
    state.offset = None
    state.archive = None
    batch, n = origin.shape
    state.padded = state.input_valid is not None
    if real_first and state.real_first is not None:
        state.anchor, state.origin = state.real_first
        state.size = (state.input_valid.sum(dim=1, keepdim=True) > torch.arange(n, device=hidden.device)).to(
            torch.float32)[..., None]
        state.changed = state.reordered_only = True
        return full.gather(1, state.anchor[..., None].expand(-1, -1, full.shape[-1]))
    state.size = (torch.ones(batch, n, 1, dtype=torch.float32, device=hidden.device) if state.input_valid is None
                  else state.input_valid.to(torch.float32)[..., None])
    state.origin = torch.arange(n, device=hidden.device).expand(batch, n)
    state.anchor = state.origin
    state.reordered_only = False
    # The model's own mask and position inputs apply again (a soft mask still has to be added by hf_tokred).
    state.changed = state.key_weight is not None
    return full


def _state(model, what: str) -> SequenceState:
    state = model.__dict__.get(STATE_ATTR) if get_applied(model) is not None else None
    if state is None:
        raise TokenReductionError(f"{what}: {type(model).__name__} has no sequence reduction (e.g. tome) attached")
    if state.size is None:
        raise TokenReductionError(f"{what}: run a forward pass first")
    return state


def token_sizes(model) -> torch.Tensor:
    """Sizes ``(B, N_out)`` of the output tokens of the last forward pass of a model reduced by a sequence reducer.

    A size counts the input tokens a token stands for (0 for padding and filler slots); with a merging
    method each row sums to its number of real input tokens (pruning drops some). Use it for size-weighted
    pooling: ``(h * s[..., None]).sum(1) / s.sum(1, keepdim=True)``. With ``restore_length`` every real
    input position has size 1.

    Example:
        >>> out = model(**batch).last_hidden_state                               # doctest: +SKIP
        >>> s = token_sizes(model)                                               # doctest: +SKIP
        >>> pooled = (out * s[..., None]).sum(1) / s.sum(1, keepdim=True)        # doctest: +SKIP
    """
    return _state(model, "token_sizes").size[..., 0]


def token_counts(model) -> list[int]:
    """The sequence length after each block in the last forward pass.

    Example:
        >>> hf_tokred.integration.encoders.token_counts(vit)      # doctest: +SKIP
        [61, 57, 53, 49]
    """
    return list(_state(model, "token_counts").token_counts)


def source_map(model) -> torch.Tensor:
    """``(B, N_out, N_in)`` bool: which input tokens each output token of the last forward pass carries.

    Input tokens are in input order (a left-padded batch's re-ordering is undone). A token dropped by a
    pruning method belongs to no output token.

    Example:
        >>> m = hf_tokred.integration.encoders.source_map(vit)    # doctest: +SKIP
        >>> m.sum(-1)                                             # = token_sizes(vit) for merging methods  # doctest: +SKIP
    """
    state = _state(model, "source_map")
    origin = state.origin
    batch, n_in = origin.shape
    n_out = state.size.shape[1]
    out = torch.zeros(batch, n_out + 1, n_in, dtype=torch.bool, device=origin.device)
    rows = torch.where(origin >= 0, origin, n_out)
    out.scatter_(1, rows[:, None, :], True)
    return out[:, :n_out]


def unmerge(model, tensor: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Expand ``tensor`` ``(B, N_out, ...)`` from the last forward pass's output tokens to the input tokens.

    Every input token gets the value of the output token carrying it; tokens dropped by pruning get ``fill``.
    Use it on anything computed per output token (a dense head's predictions, attention maps).

    Example:
        >>> out = vit(pixels).last_hidden_state                              # doctest: +SKIP
        >>> full = hf_tokred.integration.encoders.unmerge(vit, out)          # (B, N_in, C)  # doctest: +SKIP
    """
    state = _state(model, "unmerge")
    origin = state.origin
    if tensor.shape[:2] != (origin.shape[0], state.size.shape[1]):
        raise TokenReductionError(
            f"unmerge: expected a tensor of shape ({origin.shape[0]}, {state.size.shape[1]}, ...) (the output tokens "
            f"of the last forward pass), got {tuple(tensor.shape)}"
        )
    index = origin.clamp(min=0).reshape(*origin.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    full = tensor.gather(1, index)
    dropped = (origin < 0).reshape(*origin.shape, *([1] * (tensor.dim() - 2)))
    return full.masked_fill(dropped, fill)


__all__ = ["SequenceState", "attention_statistics", "source_map", "token_counts", "token_sizes", "unmerge",
           "wire_sequence_reducer"]
