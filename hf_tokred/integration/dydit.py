"""diffusers wiring of ``dydit`` (DyDiT, arXiv 2410.03456): routed heads, MLP channel groups and MLP tokens.

Per transformer block of a DiT-family denoiser (``BasicTransformerBlock``):

* a hook on the block's timestep embedder (``norm1.emb.timestep_embedder`` in DiT, the denoiser's shared
  ``adaln_single.emb.timestep_embedder`` in PixArt) records its output, the router's input;
* a hook on the self-attention ``attn1`` replaces the call by one over the active heads only (their rows
  of ``to_q``/``to_k``/``to_v`` and columns of ``to_out``); when every head of every row is active it calls
  the attention unchanged, so an untrained DyDiT is bit-identical to dense;
* a hook on the feed-forward ``ff`` runs the MLP on the kept tokens only (gathered over the batch) and on
  the active hidden-channel groups only; skipped tokens get a zero MLP output (their residual stream
  passes unchanged).

In training mode of the routers (``model.hf_tokred_modules.train()``) the same hooks compute the dense
attention/MLP and multiply by straight-through masks instead, and accumulate the FLOPs the masks keep,
which :func:`kept_flops_ratio` returns for the FLOPs loss. :func:`forced_dense` turns every router on
(the dense teacher in training). The learned routers are ``model.hf_tokred_modules["dydit"]``, saved to
``token_reduction.safetensors`` by ``save_pretrained`` (``hf_tokred.integration.diffusers``).

Example:
    >>> import hf_tokred
    >>> from diffusers import DiTTransformer2DModel
    >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
    ...                             sample_size=8, num_embeds_ada_norm=10)
    >>> dit = hf_tokred.apply(dit, {"method": "dydit"})
    >>> len(dit.hf_tokred_modules["dydit"]), sorted(dit.transformer_blocks[0].ff._diffusers_hook.hooks)
    (2, ['hf_tokred_dydit'])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from ..errors import ConfigError, TokenReductionError, UnsupportedModelError
from ..methods.diffusion.dydit import block_flops, masked_heads_attention, straight_through_mask
from .diffusers import HOOK_PREFIX, _register_hook, register_diffusion_wiring

HOOK_NAME = f"{HOOK_PREFIX}_dydit"
PROCESSORS = (AttnProcessor2_0, AttnProcessor)


@dataclass
class DyDiTTarget:
    """What DyDiT routes in one block: its self-attention, feed-forward and timestep embedder, and sizes."""

    block: torch.nn.Module
    attn: Attention
    ff: FeedForward
    embedder: torch.nn.Module
    embedding_dim: int
    dim: int
    heads: int
    groups: int
    mlp_hidden: int

    @property
    def block_weight(self) -> torch.Tensor:
        return self.attn.to_q.weight


def _attention_problem(attn) -> str | None:
    if attn is None:
        return ("it has no self-attention attn1; DyDiT routes BasicTransformerBlock denoisers "
                "(DiTTransformer2DModel, PixArtTransformer2DModel)")
    if not isinstance(attn, Attention):
        return f"attn1 is a {type(attn).__name__}, not a diffusers Attention"
    if attn.is_cross_attention:
        return "attn1 is a cross-attention"
    if getattr(attn, "fused_projections", False):
        return "its attention projections are fused; call unfuse_qkv_projections() first"
    for name in ("group_norm", "spatial_norm", "norm_cross", "norm_q", "norm_k"):
        if getattr(attn, name, None) is not None:
            return f"its attention applies {name}, which the head-sliced attention does not"
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        return "its attention has a residual connection or rescales its output"
    if abs(attn.scale - (attn.inner_dim // attn.heads) ** -0.5) > 1e-12:
        return "its attention scale is not 1/sqrt(head_dim)"
    if type(attn.processor) not in PROCESSORS:
        return (f"its attention processor {type(attn.processor).__name__} is not one of "
                f"{', '.join(p.__name__ for p in PROCESSORS)}")
    return None


def _feed_forward_problem(ff) -> str | None:
    if not isinstance(ff, FeedForward):
        return f"ff is a {type(ff).__name__}, not a diffusers FeedForward"
    net = list(ff.net)
    if len(net) < 3 or type(net[0]) is not GELU or not isinstance(net[2], torch.nn.Linear):
        return "its feed-forward is not GELU projection -> dropout -> linear"
    if not all(isinstance(m, torch.nn.Dropout) for m in (net[1], *net[3:])):
        return "its feed-forward has layers other than dropout after the output projection"
    return None


def _timestep_embedder(denoiser, block):
    emb = getattr(getattr(block, "norm1", None), "emb", None)
    if emb is None:
        emb = getattr(getattr(denoiser, "adaln_single", None), "emb", None)
    embedder = getattr(emb, "timestep_embedder", None)
    if embedder is None or not isinstance(getattr(embedder, "linear_2", None), torch.nn.Linear):
        return None
    return embedder


def dydit_targets(denoiser, reducer) -> list[DyDiTTarget]:
    """The blocks DyDiT routes, after every check (raises :class:`UnsupportedModelError` / :class:`ConfigError`).

    Example:
        >>> from hf_tokred.integration.dydit import dydit_targets
        >>> [t.heads for t in dydit_targets(dit, cfg)]          # doctest: +SKIP
        [16, 16]
    """
    blocks = getattr(denoiser, "transformer_blocks", None)
    if not blocks:
        raise UnsupportedModelError(f"dydit: {type(denoiser).__name__} has no transformer_blocks (DyDiT routes DiT blocks)")
    found = []
    for index, block in enumerate(blocks):
        where = f"dydit: transformer_blocks[{index}] ({type(block).__name__})"
        attn, ff = getattr(block, "attn1", None), getattr(block, "ff", None)
        problem = _attention_problem(attn) or _feed_forward_problem(ff)
        if problem is not None:
            raise UnsupportedModelError(f"{where}: {problem}")
        embedder = _timestep_embedder(denoiser, block)
        if embedder is None:
            raise UnsupportedModelError(f"{where}: no timestep embedder (norm1.emb or adaln_single.emb) feeds it; "
                                        "the width router needs the timestep embedding")
        mlp_hidden = ff.net[0].proj.out_features
        groups = reducer.mlp_groups or attn.heads
        if mlp_hidden % groups:
            raise ConfigError(f"mlp_groups: {groups} does not divide the MLP width {mlp_hidden} of {where[7:]}",
                              field="mlp_groups")
        found.append(DyDiTTarget(block, attn, ff, embedder, embedder.linear_2.out_features, attn.query_dim,
                                 attn.heads, groups, mlp_hidden))
    return found


class DyDiTState:
    """Per-call state shared by a denoiser's DyDiT hooks: timestep embeddings, FLOPs kept, forced-dense flag."""

    def __init__(self, reducer, routers):
        self.reducer = reducer
        self.routers = routers
        self.embeddings: dict[int, torch.Tensor] = {}
        self.force_dense = False
        self.noise = 1.0  # scale of the Gumbel noise in training (annealed by the trainer)
        self.kept: torch.Tensor | float = 0.0
        self.dense = 0.0

    def reset(self) -> None:
        self.embeddings.clear()
        self.kept, self.dense = 0.0, 0.0

    def record(self, dense: float, kept_fraction: torch.Tensor | float) -> None:
        """Add a sub-layer's dense MACs and the fraction of them each row keeps (tensor ``(batch,)`` or float)."""
        self.dense += dense
        self.kept = self.kept + dense * kept_fraction

    def embedding(self, embedder, batch: int) -> torch.Tensor:
        temb = self.embeddings.get(id(embedder))
        if temb is None:
            raise TokenReductionError("dydit: the block ran without its timestep embedding in this call; "
                                      "call the denoiser itself, not a block alone")
        return temb.expand(batch, -1) if temb.shape[0] == 1 and batch != 1 else temb


class _RootHook(ModelHook):
    def __init__(self, state: DyDiTState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.reset()
        return args, kwargs


class _EmbeddingHook(ModelHook):
    def __init__(self, state: DyDiTState):
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        self.state.embeddings[id(module)] = output
        return output


class DyDiTAttentionHook(ModelHook):
    """Self-attention over the heads the width router keeps (see the module docstring)."""

    def __init__(self, state: DyDiTState, index: int, target: DyDiTTarget):
        super().__init__()
        self.state, self.index, self.target = state, index, target

    def new_forward(self, attn, *args, **kwargs):
        original = self.fn_ref.original_forward
        state, reducer = self.state, self.state.reducer
        hidden = args[0] if args else kwargs["hidden_states"]
        if state.force_dense or not reducer.width_routing:
            if hidden.ndim == 3:  # the kept-FLOPs fraction stays one of the blocks' attention + MLP
                state.record(block_flops(hidden.shape[1], attn.query_dim, attn.inner_dim, 0)[0], 1.0)
            return original(*args, **kwargs)
        extra = [*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states")]
        if any(v is not None for v in extra) or hidden.ndim != 3:
            raise UnsupportedModelError("dydit: the routed self-attention takes (batch, tokens, channels) hidden "
                                        "states only (no encoder_hidden_states or attention_mask)")
        router = state.routers[self.index]
        batch, tokens, _ = hidden.shape
        heads = self.target.heads
        logits = router.width(state.embedding(self.target.embedder, batch))[:, :heads]
        dense, _ = block_flops(tokens, attn.query_dim, attn.inner_dim, 0)
        if router.training:
            mask = straight_through_mask(logits, reducer.gumbel_tau, True, state.noise)
            out = masked_heads_attention(attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden), heads, mask)
            state.record(dense, mask.mean(1))
            return attn.to_out[1](attn.to_out[0](out))
        on = logits > 0
        state.record(dense, on.float().mean(1))
        if bool(on.all()):
            return original(*args, **kwargs)
        head_dim = attn.inner_dim // heads
        active = on.any(0).nonzero().flatten()
        out_proj = attn.to_out[0]
        if active.numel() == 0:  # no head at all: the attention adds only its output bias
            out = hidden.new_zeros(batch, tokens, out_proj.out_features)
            return attn.to_out[1](out + out_proj.bias if out_proj.bias is not None else out)
        columns = (active[:, None] * head_dim + torch.arange(head_dim, device=active.device)).flatten()

        def project(linear):
            bias = linear.bias[columns] if linear.bias is not None else None
            return F.linear(hidden, linear.weight[columns], bias)

        # Rows of the batch may keep different heads: compute their union, zero each row's inactive ones.
        row_mask = None if bool((on == on[:1]).all()) else on[:, active].to(hidden.dtype)
        out = masked_heads_attention(project(attn.to_q), project(attn.to_k), project(attn.to_v), active.numel(),
                                     row_mask)
        return attn.to_out[1](F.linear(out, out_proj.weight[:, columns], out_proj.bias))


class DyDiTFeedForwardHook(ModelHook):
    """The MLP on the kept tokens and the active channel groups only (see the module docstring)."""

    def __init__(self, state: DyDiTState, index: int, target: DyDiTTarget):
        super().__init__()
        self.state, self.index, self.target = state, index, target

    def new_forward(self, ff, hidden, *args, **kwargs):
        original = self.fn_ref.original_forward
        state, reducer, target = self.state, self.state.reducer, self.target
        batch, tokens, dim = hidden.shape
        _, dense = block_flops(tokens, dim, 0, target.mlp_hidden)
        if state.force_dense or not (reducer.width_routing or reducer.token_routing):
            state.record(dense, 1.0)
            return original(hidden, *args, **kwargs)
        router = state.routers[self.index]
        group_logits = token_logits = None
        if reducer.width_routing:
            group_logits = router.width(state.embedding(target.embedder, batch))[:, target.heads:]
        if reducer.token_routing:
            token_logits = router.token(hidden).squeeze(-1)
        gelu, dropouts, out_proj = ff.net[0], [ff.net[1], *ff.net[3:]], ff.net[2]
        group_size = target.mlp_hidden // target.groups
        if router.training:
            inner = gelu(hidden)
            kept = 1.0
            if group_logits is not None:
                groups = straight_through_mask(group_logits, reducer.gumbel_tau, True, state.noise)
                inner = (inner.view(batch, tokens, target.groups, group_size) * groups[:, None, :, None]).flatten(2)
                kept = kept * groups.mean(1)
            out = out_proj(dropouts[0](inner))
            for dropout in dropouts[1:]:
                out = dropout(out)
            if token_logits is not None:
                keep = straight_through_mask(token_logits, reducer.gumbel_tau, True, state.noise)
                out = out * keep[..., None]
                kept = kept * keep.mean(1)
            state.record(dense, kept)
            return out
        groups_on = group_logits > 0 if group_logits is not None else None
        keep = token_logits > 0 if token_logits is not None else None
        kept_fraction = torch.ones(batch, device=hidden.device)
        if groups_on is not None:
            kept_fraction = kept_fraction * groups_on.float().mean(1)
        if keep is not None:
            kept_fraction = kept_fraction * keep.float().mean(1)
        state.record(dense, kept_fraction)
        if (groups_on is None or bool(groups_on.all())) and (keep is None or bool(keep.all())):
            return original(hidden, *args, **kwargs)
        if keep is None:
            keep = torch.ones(batch, tokens, dtype=torch.bool, device=hidden.device)
        rows = keep.nonzero()[:, 0]
        gathered = hidden[keep]  # (kept tokens of all rows, dim)
        weight, bias = gelu.proj.weight, gelu.proj.bias
        if groups_on is None:
            inner = gelu(gathered)
            out_weight = out_proj.weight
        else:
            active = groups_on.any(0).nonzero().flatten()
            if active.numel() == 0:
                inner = None
            else:
                columns = (active[:, None] * group_size + torch.arange(group_size, device=active.device)).flatten()
                inner = gelu.gelu(F.linear(gathered, weight[columns], bias[columns] if bias is not None else None))
                if not bool((groups_on == groups_on[:1]).all()):  # rows differ: zero each row's inactive groups
                    inner = inner * groups_on[rows][:, active].repeat_interleave(group_size, 1).to(inner.dtype)
                out_weight = out_proj.weight[:, columns]
        if inner is None:  # no channel group at all: the MLP adds only its output bias to kept tokens
            out_kept = gathered.new_zeros(gathered.shape[0], out_proj.out_features)
            if out_proj.bias is not None:
                out_kept = out_kept + out_proj.bias
        else:
            out_kept = F.linear(dropouts[0](inner), out_weight, out_proj.bias)
        for dropout in dropouts[1:]:
            out_kept = dropout(out_kept)
        out = out_kept.new_zeros(batch, tokens, out_kept.shape[-1])
        out[keep] = out_kept
        return out


def _state(denoiser) -> DyDiTState:
    registry = denoiser.__dict__.get("_diffusers_hook")
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is None:
        raise TokenReductionError(f"{type(denoiser).__name__} has no dydit reduction applied")
    return hook.state


def kept_flops_ratio(denoiser) -> torch.Tensor:
    """The fraction of the routed attention+MLP MACs each row kept in the denoiser's last call, ``(batch,)``
    (differentiable in training mode of the routers: the FLOPs loss reads it).

    Example:
        >>> from hf_tokred.integration.dydit import kept_flops_ratio
        >>> kept_flops_ratio(dit)                       # doctest: +SKIP
        tensor([0.6412, 0.6412])
    """
    state = _state(denoiser)
    if not state.dense:
        raise TokenReductionError("dydit: the denoiser has not been called since the reduction was applied")
    kept = state.kept / state.dense
    return kept if isinstance(kept, torch.Tensor) else torch.tensor([kept])


@contextlib.contextmanager
def forced_dense(denoiser):
    """Within the block, every router of the denoiser's DyDiT is on: outputs are bit-identical to dense.

    Example:
        >>> from hf_tokred.integration.dydit import forced_dense
        >>> with forced_dense(dit):                     # doctest: +SKIP
        ...     teacher = dit(latents, timestep=t, class_labels=y).sample
    """
    state = _state(denoiser)
    previous, state.force_dense = state.force_dense, True
    try:
        yield denoiser
    finally:
        state.force_dense = previous


def _check(denoiser, adapter, reducer) -> None:
    dydit_targets(denoiser, reducer)


def _attach(denoiser, adapter, reducer, applied, grid) -> None:
    holder = denoiser._modules.get("hf_tokred_modules")
    routers = holder["dydit"] if holder is not None and "dydit" in holder else None
    if routers is None:
        raise TokenReductionError("dydit: its routers (hf_tokred_modules['dydit']) are not attached")
    state = DyDiTState(reducer, routers)
    targets = dydit_targets(denoiser, reducer)
    _register_hook(denoiser, _RootHook(state), HOOK_NAME, applied)
    for embedder in {id(t.embedder): t.embedder for t in targets}.values():
        _register_hook(embedder, _EmbeddingHook(state), HOOK_NAME, applied)
    for index, target in enumerate(targets):
        _register_hook(target.attn, DyDiTAttentionHook(state, index, target), HOOK_NAME, applied)
        _register_hook(target.ff, DyDiTFeedForwardHook(state, index, target), HOOK_NAME, applied)


register_diffusion_wiring("dydit", check=_check, attach=_attach)

__all__ = ["DyDiTAttentionHook", "DyDiTFeedForwardHook", "DyDiTState", "DyDiTTarget", "dydit_targets",
           "forced_dense", "kept_flops_ratio"]
