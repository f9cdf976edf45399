"""TESTA: temporal then spatial token aggregation inside a video encoder (Ren et al., EMNLP'23, arXiv 2310.19060).

In some blocks (``layers``, default: every block but the last) the tokens of a video are aggregated in two steps,
after the block's attention (the ToMe placement):

* **temporal aggregation**: the current frames are paired, frame ``2k+1`` with its neighbour ``2k``; every token
  of the odd frame is matched to its most similar token of the even frame (cosine of the keys averaged over
  heads); the ``temporal_r`` pairs whose tokens match best (mean similarity) are merged: the odd frame
  disappears, each of its tokens folded into its match (size-weighted average). The clip then has
  ``temporal_r`` fewer frames;
* **spatial aggregation**: within every remaining frame, ToMe's bipartite soft matching merges ``spatial_r``
  tokens, so every frame keeps the same number of tokens.

Merged tokens carry sizes (how many input patches they hold); ``prop_attn`` adds ``log(size)`` to attention and
``restore_length`` gives ``last_hidden_state`` back at the input length, as for every encoder reducer. The tokens
stay grouped frame by frame, frames in order.

Supported: ``VideoMAEModel`` / ``VideoMAEForVideoClassification`` (joint space-time attention, no class token;
frame-major tokens; a "frame" is one tube slot of ``tubelet_size`` frames).

Where we depart from the paper:

* Training-free: the paper fine-tunes the video-language model (its temporal/spatial aggregation modules sit in a
  pre-trained and then fine-tuned encoder); we merge in a frozen model, as ToMe does.
* The paper aggregates frames with a learned-free similarity over whole frames and works on the video towers of
  video-language models (TimeSformer-style divided attention in its VindLU backbone); we implement it on
  VideoMAE's joint space-time attention, whose attention takes any token layout. TimeSformer (its divided
  attention reshapes by ``config.num_frames``, so frames cannot merge) and ``XCLIPModel`` (its vision tower runs
  frames as separate images, exchanging one message token per frame) are not supported.
* Frame pairs are fixed adjacent pairs ``(2k, 2k+1)`` of the current frames (the paper's bipartite split of the
  frame sequence into alternating sets, restricted to neighbours); frames pair again after each merge.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="testa", temporal_r=1, spatial_r=4, layers=[0, 2])
    >>> cfg.schedule(4)
    [(1, 4), None, (1, 4), None]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError
from .base import EncoderReducerConfig, Reduction
from .tome import bipartite_soft_matching


def temporal_merge(metric: torch.Tensor, frames: int, r: int) -> Reduction:
    """Merge ``r`` adjacent frame pairs of ``metric`` ``(B, F * n, C)`` (frame-major, ``frames`` frames).

    Frame ``2k+1``'s tokens fold into their most similar tokens of frame ``2k``; the pairs with the highest mean
    best-match similarity merge. The output keeps the remaining frames in order, ``n`` tokens each.

    Example:
        >>> import torch
        >>> m = torch.tensor([[[1.0, 0], [0, 1], [1, 0.1], [0.1, 1], [1, 0], [0, 1], [-1, 0], [0, -1]]])
        >>> red = temporal_merge(m, frames=4, r=1)                  # frames 0/1 are alike, 2/3 are not
        >>> red.keep.tolist(), red.src.tolist(), red.dst.tolist()
        ([[0, 1, 4, 5, 6, 7]], [[2, 3]], [[0, 1]])
    """
    batch, total, channels = metric.shape
    n = total // frames
    pairs = frames // 2
    r = min(r, pairs)
    device = metric.device
    with torch.no_grad():
        grid = torch.nn.functional.normalize(metric.float(), dim=-1).reshape(batch, frames, n, channels)
        even, odd = grid[:, 0: 2 * pairs: 2], grid[:, 1: 2 * pairs: 2]  # (B, K, n, C)
        similarity = odd @ even.transpose(2, 3)  # (B, K, n_odd, n_even)
        best, partner = similarity.max(dim=-1)  # (B, K, n)
        chosen = best.mean(-1).argsort(dim=-1, descending=True, stable=True)[:, :r]  # (B, r) pair indices
        removed = torch.zeros(batch, frames, dtype=torch.bool, device=device)
        removed.scatter_(1, 2 * chosen + 1, True)
        frame_ids = torch.arange(frames, device=device)
        kept_frames = (removed.long() * frames + frame_ids).argsort(dim=-1)[:, : frames - r]  # in order
        slot_of_frame = torch.zeros(batch, frames, dtype=torch.long, device=device)
        slot_of_frame.scatter_(1, kept_frames, torch.arange(frames - r, device=device).expand(batch, -1))
        token = torch.arange(n, device=device)
        keep = (kept_frames[..., None] * n + token).reshape(batch, -1)
        odd_frames = 2 * chosen + 1  # (B, r)
        src = (odd_frames[..., None] * n + token).reshape(batch, -1)
        pair_partner = partner.gather(1, chosen[..., None].expand(-1, -1, n))  # (B, r, n)
        dst = (slot_of_frame.gather(1, odd_frames - 1)[..., None] * n + pair_partner).reshape(batch, -1)
    return Reduction(keep=keep, num_tokens=total, src=src, dst=dst)


def spatial_merge(metric: torch.Tensor, frames: int, r: int) -> Reduction:
    """ToMe's bipartite soft matching within every frame of ``metric`` ``(B, F * n, C)``: ``r`` merges per frame.

    Example:
        >>> import torch
        >>> red = spatial_merge(torch.randn(2, 3 * 8, 4), frames=3, r=2)
        >>> red.keep.shape, red.src.shape
        (torch.Size([2, 18]), torch.Size([2, 6]))
    """
    batch, total, channels = metric.shape
    n = total // frames
    merge = bipartite_soft_matching(metric.reshape(batch * frames, n, channels), r)
    local = merge.to_reduction()
    m = local.num_slots
    device = metric.device
    token_offset = (torch.arange(frames, device=device) * n).repeat(batch)[:, None]
    slot_offset = (torch.arange(frames, device=device) * m).repeat(batch)[:, None]
    keep = (local.keep + token_offset).reshape(batch, -1)
    if local.src is None:
        return Reduction(keep=keep, num_tokens=total)
    src = (local.src + token_offset).reshape(batch, -1)
    dst = (local.dst + slot_offset).reshape(batch, -1)
    return Reduction(keep=keep, num_tokens=total, src=src, dst=dst)


@register_method("testa")
@dataclass(kw_only=True)
class TESTAConfig(EncoderReducerConfig):
    """TESTA (arXiv 2310.19060): temporal then spatial token aggregation in video encoders (training-free here);
    see the module docstring for where we depart from the paper.

    Fields:
        temporal_r: adjacent frame pairs merged in each aggregating block (each removes one frame); 0: none.
        spatial_r: tokens merged within every frame in each aggregating block (ToMe's r, per frame); 0: none.
        layers: the aggregating blocks (default: every block but the last).
        restore_length, prop_attn: as for every encoder reducer.

    With ``temporal_r=0`` and ``spatial_r=0`` nothing is installed that changes the outputs (bit-identical).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="testa", temporal_r=1, spatial_r=8).schedule(3)
        [(1, 8), (1, 8), None]
    """

    wiring = "testa"
    needs = frozenset({"metric"})
    paper = "2310.19060"
    status = "beta"
    supported_adapters = ("videomae",)  # frames: the video adapter says how many tokens one holds

    temporal_r: int = param(1, int, low=0, help="adjacent frame pairs merged per aggregating block")
    spatial_r: int = param(8, int, low=0, help="tokens merged within every frame per aggregating block")
    layers: list[int] | None = param(None, int, low=0, sequence=True, optional=True,
                                     help="indices of the aggregating blocks (default: all but the last)")

    def validate(self) -> None:
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers: expected distinct block indices, got {self.layers!r}", field="layers")

    def schedule(self, num_blocks: int) -> list:
        """``(temporal_r, spatial_r)`` at the aggregating blocks, None elsewhere (all None when both are 0)."""
        layers = range(num_blocks - 1) if self.layers is None else self.layers
        bad = [i for i in layers if i >= num_blocks]
        if bad:
            raise ConfigError(f"layers: block {bad[0]} does not exist; the model has {num_blocks} blocks "
                              f"(0..{num_blocks - 1})", field="layers")
        active = self.temporal_r > 0 or self.spatial_r > 0
        return [(self.temporal_r, self.spatial_r) if (active and i in set(layers)) else None for i in range(num_blocks)]

    def plan(self, ctx):
        """Temporal then spatial aggregation of one block (a list of one or two Reductions)."""
        frame_tokens = getattr(self, "_frame_tokens", None)
        if frame_tokens is None:
            raise TokenReductionError("testa: attach it with hf_tokred.apply (the wiring tells it the frame layout)")
        temporal_r, spatial_r = ctx.amount
        state = ctx.state
        anchor = state.anchor if state is not None and state.anchor is not None else None
        if anchor is None:
            frames = ctx.num_tokens // frame_tokens
        else:
            frames = int((anchor[0] // frame_tokens).unique().numel())
        if ctx.valid is not None or ctx.protected:
            raise TokenReductionError("testa: expected a video encoder without padding or class tokens")
        plans = []
        metric = ctx.metric
        if temporal_r and frames >= 2:
            plan = temporal_merge(metric, frames, temporal_r)
            plans.append(plan)
            per_frame = ctx.num_tokens // frames
            frames -= plan.src.shape[1] // per_frame
            metric = metric.gather(1, plan.keep[..., None].expand(-1, -1, metric.shape[-1]))
        n = metric.shape[1] // frames
        if spatial_r and n >= 2:
            plans.append(spatial_merge(metric, frames, min(spatial_r, n // 2)))
        return plans or None


from ...integration import video as _wiring  # noqa: E402,F401  (registers the "testa" wiring)
