"""DyDiT: dynamic width over timesteps and dynamic tokens over space in DiT denoisers (Zhao et al., arXiv 2410.03456).

A diffusion transformer spends the same compute at every denoising step and on every patch, although
late (low-noise) steps and flat background patches need less. DyDiT adds two small learned routers to
every transformer block:

* **Timestep-wise dynamic width (TDW).** From the block's timestep embedding a linear router scores
  each attention head and each group of MLP hidden channels; at inference a head or group whose score
  is below one half is skipped (its rows of the query/key/value projections and its columns of the
  output projection are not computed). The decision depends on the timestep only, so it is the same
  for every token of a row.
* **Spatial-wise dynamic token (SDT).** A linear router on each token's MLP input decides whether the
  token goes through the block's MLP; a skipped token keeps its residual stream unchanged (its MLP
  output is zero), and the MLP runs only on the gathered kept tokens.

In training the hard decisions become straight-through Gumbel-sigmoid masks (the forward uses the
hard 0/1 decision, the gradient flows through the soft one), and a FLOPs loss
``(FLOPs_dynamic / FLOPs_dense - flops_ratio) ** 2`` pulls the expected compute to the target, as in the
paper (``hf_tokred.recipes.dydit.train_dydit``).

Routers start with zero weights and a positive bias: an untrained DyDiT keeps every head, channel
group and token and runs the dense blocks unchanged (bit-identical outputs).

Where we depart from the paper:

* Only the routers are trained (the paper fine-tunes the whole DiT with them), by distilling the routed
  model to the dense one (the same model with the routers forced on, :func:`forced_dense`) on random
  latents, timesteps and class labels, instead of the diffusion loss on ImageNet. With the backbone
  frozen, the reachable FLOPs saving at a given error is much smaller than the paper's.
* Decisions are taken per batch row from that row's own timestep embedding (the paper precomputes
  them per timestep); rows of a batch may differ, and then the union of the active heads/groups is
  computed and each row's inactive ones are zeroed, so a batch equals its rows one by one.
* The paper's SDT also lets tokens bypass the MLP only (attention always sees every token); we do the
  same. FLOPs of the adaLN modulation, embedders and the final layer are not in the FLOPs loss.
* Supported: diffusers' ``BasicTransformerBlock`` denoisers whose blocks have an ``attn1`` with a
  plain attention processor and a GELU ``FeedForward`` (``DiTTransformer2DModel``,
  ``PixArtTransformer2DModel``). DyDiT targets diffusion transformers; UNets are not supported.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> import hf_tokred.methods.diffusion.dydit  # noqa: F401  (registers "dydit")
    >>> cfg = TokenReductionConfig(method="dydit", flops_ratio=0.7)
    >>> type(cfg).__name__, cfg.learned, cfg.mlp_groups
    ('DyDiTConfig', True, 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import TokenReductionConfig, param, register_method

# Initial router bias: sigmoid(4) = 0.982, every decision "on" until training moves it.
ROUTER_BIAS = 4.0


@register_method("dydit")
@dataclass(kw_only=True)
class DyDiTConfig(TokenReductionConfig):
    """Learned timestep-wise head/channel routing and token-wise MLP skipping in DiT denoisers (arXiv 2410.03456).

    ``flops_ratio`` is the fraction of the blocks' attention+MLP FLOPs the routers are trained to keep
    (1.0: no saving asked). ``mlp_groups`` splits each MLP's hidden channels into that many groups the
    width router turns on/off (0: as many groups as attention heads, the paper's choice).
    ``width_routing`` / ``token_routing`` switch the two routers (TDW, SDT). ``gumbel_tau`` is the
    temperature of the straight-through Gumbel-sigmoid masks in training.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> import hf_tokred.methods.diffusion.dydit  # noqa: F401
        >>> TokenReductionConfig(method="dydit").to_dict()["flops_ratio"]
        0.7
    """

    stage: ClassVar[str] = "diffusion"
    model_kinds: ClassVar[tuple[str, ...]] = ("dit",)
    paper: ClassVar[str] = "2410.03456"
    status: ClassVar[str] = "experimental"
    supported_adapters: ClassVar[tuple[str, ...]] = ("dit", "pixart")  # BasicTransformerBlock denoisers
    learned: ClassVar[bool] = True

    flops_ratio: float = param(0.7, float, low=0.0, high=1.0, low_open=True,
                               help="training target: fraction of the blocks' attention+MLP FLOPs kept")
    mlp_groups: int = param(0, int, low=0, help="MLP hidden channel groups the width router gates (0 = heads)")
    width_routing: bool = param(True, bool, help="timestep-wise dynamic width: skip attention heads / MLP groups")
    token_routing: bool = param(True, bool, help="spatial-wise dynamic tokens: tokens may bypass the MLP")
    gumbel_tau: float = param(1.0, float, low=0.0, low_open=True, help="Gumbel-sigmoid temperature in training")

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """One :class:`DyDiTRouter` per transformer block, as ``hf_tokred_modules["dydit"]``."""
        from ...integration.dydit import dydit_targets

        routers = []
        for target in dydit_targets(model, self):
            weight = target.block_weight
            routers.append(DyDiTRouter(target.embedding_dim, target.dim, target.heads, target.groups)
                           .to(device=weight.device, dtype=weight.dtype))
        return {"dydit": nn.ModuleList(routers)}


class DyDiTRouter(nn.Module):
    """The two routers of one block: ``width`` (timestep embedding -> head and MLP-group logits), ``token``
    (token -> MLP keep logit). Zero weights and a positive bias: every decision starts "on".

    Example:
        >>> import torch
        >>> from hf_tokred.methods.diffusion.dydit import DyDiTRouter
        >>> router = DyDiTRouter(embedding_dim=16, dim=8, heads=2, groups=4)
        >>> router.width(torch.zeros(3, 16)).shape, bool((router.token(torch.zeros(1, 5, 8)) > 0).all())
        (torch.Size([3, 6]), True)
    """

    def __init__(self, embedding_dim: int, dim: int, heads: int, groups: int):
        super().__init__()
        self.heads, self.groups = heads, groups
        self.width = nn.Linear(embedding_dim, heads + groups)
        self.token = nn.Linear(dim, 1)
        for layer in (self.width, self.token):
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, ROUTER_BIAS)


def straight_through_mask(logits: torch.Tensor, tau: float, training: bool, noise: float = 1.0) -> torch.Tensor:
    """A 0/1 mask from router logits: hard ``logits > 0`` at inference; in training the hard decision of
    Gumbel-sigmoid samples with the gradient of the soft one (straight-through). ``noise`` scales the
    logistic noise (the trainer anneals it to 0, so that training ends on the inference decisions).

    Example:
        >>> import torch
        >>> from hf_tokred.methods.diffusion.dydit import straight_through_mask
        >>> straight_through_mask(torch.tensor([-1.0, 0.5]), 1.0, training=False).tolist()
        [0.0, 1.0]
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + noise * (torch.log(uniform) - torch.log1p(-uniform))) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def masked_heads_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
                           head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of ``(batch, tokens, heads * head_dim)`` projections, each head's output
    multiplied by ``head_mask`` ``(batch, heads)`` when given; returns ``(batch, tokens, heads * head_dim)``.

    Example:
        >>> import torch
        >>> from hf_tokred.methods.diffusion.dydit import masked_heads_attention
        >>> q = k = v = torch.randn(2, 5, 8)
        >>> out = masked_heads_attention(q, k, v, 2, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> out.shape, bool(out[0, :, 4:].eq(0).all())
        (torch.Size([2, 5, 8]), True)
    """
    batch, tokens, width = query.shape
    head_dim = width // heads

    def split(x):
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    if head_mask is not None:
        out = out * head_mask[:, :, None, None].to(out.dtype)
    return out.transpose(1, 2).reshape(batch, tokens, width)


def block_flops(tokens: int, dim: int, attention_width: int, mlp_hidden: int) -> tuple[float, float]:
    """Multiply-accumulates of one block's ``(attention, mlp)``: q/k/v/out projections plus the attention
    products, and the two MLP projections (what DyDiT's routers can skip).

    Example:
        >>> from hf_tokred.methods.diffusion.dydit import block_flops
        >>> block_flops(tokens=256, dim=1152, attention_width=1152, mlp_hidden=4608)
        (1509949440.0, 2717908992.0)
    """
    attention = 4.0 * tokens * dim * attention_width + 2.0 * tokens * tokens * attention_width
    return attention, 2.0 * tokens * dim * mlp_hidden


__all__ = ["ROUTER_BIAS", "DyDiTConfig", "DyDiTRouter", "block_flops", "masked_heads_attention",
           "straight_through_mask"]
