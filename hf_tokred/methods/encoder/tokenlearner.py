"""TokenLearner: a few learned tokens stand for all patch tokens (Ryoo et al., NeurIPS'21, arXiv 2106.11297).

Before one block (``layer``, default the middle of the network) a small MLP computes, from every patch
token, ``num_tokens`` attention logits; a softmax over the positions turns them into ``num_tokens`` spatial
attention maps, and each learned token is the map-weighted average of the patch tokens. The block and every
later block run on the protected tokens (CLS) plus the learned tokens only. On video models the maps are
computed per frame (``per_frame=True``, the paper's video setting: ``num_tokens`` per frame; TimeSformer's
divided attention needs the same count in every frame) or over all space-time tokens at once.

With ``fuse=True`` a TokenFuser (the paper's section 3.2) maps the learned tokens back to the input length
after the last block: the learned tokens are mixed across the token axis by a linear layer, and every
original position ``i`` (its state before the TokenLearner block) receives the sum of the mixed tokens
weighted by ``sigmoid(W x_i)``, added to its own state. ``last_hidden_state`` then has the input length
(per-token heads and mean pooling over the input tokens work).

The attention MLP (and the fuser) are learned parts (``learned = True``): attached as
``model.hf_tokred_modules["tokenlearner"]``, saved to ``token_reduction.safetensors``, trained with
:func:`hf_tokred.recipes.tokenlearner.train_tokenlearner` (distillation to the dense model, backbone frozen).

Where we depart from the paper:

* The attention maps are normalised with a softmax over positions (a weighted *average*), not the paper's
  sigmoid followed by spatial global average pooling: the learned tokens keep the scale of the patch
  tokens, so a model whose backbone is not re-trained with TokenLearner (our recipe trains only the
  TokenLearner) sees inputs of the scale it was trained on. The map MLP is LayerNorm, Linear(C, hidden_dim),
  GELU, Linear(hidden_dim, num_tokens) per token (the paper's v1.0 MLP; its v1.1 uses convolutions).
* The paper trains the whole network with TokenLearner from scratch or fine-tunes it; we distill the
  TokenLearner module(s) alone to the dense model (no labels), which is enough to make the module useful,
  not to reach the paper's accuracies.
* Text encoders (BERT, MiniLM) are refused: the maps are spatial (fixed image/frame grids); a text
  sequence has padding and variable length, and mean-pooled sentence embeddings need every token's size
  (see the limitations in docs/encoders.md).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="tokenlearner", num_tokens=8)
    >>> cfg.reducing_layer(12)
    6
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError, UnsupportedModelError
from .dynamicvit import _hidden_size

MODULE_NAME = "tokenlearner"

# Encoders whose patch tokens lie on a fixed image (or frame) grid, with plain position-independent blocks.
IMAGE_ADAPTERS = ("vit", "deit", "clip_vision", "clip", "siglip_vision", "siglip", "dinov2")
VIDEO_ADAPTERS = ("videomae", "timesformer")


def learn_tokens(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Learned tokens: ``(B, G, N, C)`` tokens and ``(B, G, N, S)`` map logits -> ``(B, G, S, C)``, each the
    softmax-over-positions weighted average of its group's ``N`` tokens.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[1.0], [3.0]]]])                     # B=1, G=1, N=2, C=1
        >>> learn_tokens(x, torch.zeros(1, 1, 2, 1)).flatten().tolist()  # equal logits: the mean
        [2.0]
    """
    weights = torch.softmax(logits.float(), dim=2).to(tokens.dtype)
    return torch.einsum("bgns,bgnc->bgsc", weights, tokens)


def fuse_tokens(learned: torch.Tensor, original: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """TokenFuser's output: every original token plus the learned tokens weighted by ``sigmoid(gate_logits)``.

    ``learned`` ``(B, G, S, C)`` (already mixed), ``original`` ``(B, G, N, C)``, ``gate_logits`` ``(B, G, N, S)``.

    Example:
        >>> import torch
        >>> fuse_tokens(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)).flatten().tolist()
        [0.5, 0.5]
    """
    gates = torch.sigmoid(gate_logits.float()).to(learned.dtype)
    return original + torch.einsum("bgns,bgsc->bgnc", gates, learned)


class TokenLearnerModule(nn.Module):
    """The learned parts: the map MLP and, with ``fuse``, the TokenFuser.

    Example:
        >>> import torch
        >>> module = TokenLearnerModule(16, 4, hidden_dim=8, fuse=True)
        >>> module.learn(torch.randn(2, 3, 10, 16)).shape
        torch.Size([2, 3, 4, 16])
    """

    def __init__(self, channels: int, num_tokens: int, hidden_dim: int, fuse: bool):
        super().__init__()
        self.num_tokens = num_tokens
        self.maps = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, num_tokens))
        self.fuse = fuse
        if fuse:
            # Starts as the identity over the token axis, and with small gates: the fused output starts near
            # the original tokens plus a little of every learned token.
            self.mix = nn.Linear(num_tokens, num_tokens, bias=False)
            with torch.no_grad():
                self.mix.weight.copy_(torch.eye(num_tokens))
            self.gate = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, num_tokens))
            with torch.no_grad():
                self.gate[1].bias.fill_(-2.0)

    def learn(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, G, N, C)`` -> ``(B, G, S, C)``."""
        return learn_tokens(tokens, self.maps(tokens))

    def fuse_back(self, learned: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """``(B, G, S, C)`` final learned tokens and ``(B, G, N, C)`` original tokens -> ``(B, G, N, C)``."""
        mixed = self.mix(learned.transpose(2, 3)).transpose(2, 3)
        return fuse_tokens(mixed, original, self.gate(original))

    def flops_per_token(self, channels: int) -> int:
        """Multiply-adds per input token of the map MLP plus the weighted sums (for the FLOP count)."""
        hidden = self.maps[1].out_features
        return channels * hidden + hidden * self.num_tokens + self.num_tokens * channels


@register_method("tokenlearner")
@dataclass(kw_only=True)
class TokenLearnerConfig(TokenReductionConfig):
    """TokenLearner (arXiv 2106.11297): before block ``layer`` the patch tokens become ``num_tokens`` learned
    tokens (per frame on video models); see the module docstring for TokenFuser and where we depart from the paper.

    Fields:
        num_tokens: learned tokens (per frame with ``per_frame``); 0 turns the method off (bit-identical to dense).
        layer: the block before which TokenLearner runs (default: the middle block, ``num_blocks // 2``).
        per_frame: on video models, learn ``num_tokens`` per frame (TimeSformer needs it) instead of over all
            space-time tokens. Ignored on images.
        fuse: TokenFuser after the last block: ``last_hidden_state`` comes back at the input length.
        hidden_dim: width of the map MLP.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="tokenlearner", num_tokens=8, layer=4).to_dict()["layer"]
        4
    """

    stage = "sequence"
    wiring = "tokenlearner"
    model_kinds = ("encoder",)
    learned = True
    paper = "2106.11297"
    status = "experimental"  # no figure on real weights (text refused, no image weights here)
    # the spatial maps need a patch grid: image towers and video (TimeSformer too, whose adapter refuses the rest)
    supported_adapters = ("clip", "clip_vision", "deit", "dinov2", "siglip", "siglip_vision", "vit", "videomae")

    num_tokens: int = param(8, int, low=0, help="learned tokens (per frame on video with per_frame); 0: off")
    layer: int | None = param(None, int, low=0, optional=True,
                              help="block before which TokenLearner runs (default: the middle block)")
    per_frame: bool = param(True, bool, help="video models: learn num_tokens per frame (else over all frames)")
    fuse: bool = param(False, bool, help="TokenFuser after the last block: return the input length")
    hidden_dim: int = param(64, int, low=1, help="width of the attention-map MLP")

    def reducing_layer(self, num_blocks: int) -> int:
        """The block before which TokenLearner runs in a model with ``num_blocks`` blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="tokenlearner", layer=2).reducing_layer(6)
            2
        """
        layer = num_blocks // 2 if self.layer is None else self.layer
        if layer >= num_blocks:
            raise ConfigError(f"layer: block {layer} does not exist; the model has {num_blocks} blocks "
                              f"(0..{num_blocks - 1})", field="layer")
        return layer

    def check_model(self, model, adapter) -> None:
        """Refuse models TokenLearner cannot act on (before anything is installed)."""
        name = getattr(adapter, "name", "?")
        if name not in IMAGE_ADAPTERS + VIDEO_ADAPTERS:
            raise UnsupportedModelError(
                f"tokenlearner: {type(model).__name__} ({name}) is not supported: TokenLearner's attention maps are "
                f"spatial, over the patch tokens of an image or of video frames ({', '.join(IMAGE_ADAPTERS + VIDEO_ADAPTERS)}"
                "); text encoders have padded, variable-length sequences and are not supported")
        self.reducing_layer(len(adapter.blocks(model)))
        if name in VIDEO_ADAPTERS and getattr(adapter, "row_multiple", False):
            if not self.per_frame:
                raise ConfigError(f"per_frame: {type(model).__name__}'s divided space-time attention needs the same "
                                  "number of tokens in every frame; use per_frame=True", field="per_frame")
            width = adapter.grid_width(model)
            if self.num_tokens % width:
                raise ConfigError(f"num_tokens: {type(model).__name__} reshapes every frame into rows of {width} "
                                  f"tokens; num_tokens must be a multiple of {width}, got {self.num_tokens}",
                                  field="num_tokens")

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The map MLP (and fuser), on the device and dtype of the TokenLearner block.

        Example:
            >>> list(cfg.learned_modules(vit, adapter))                # doctest: +SKIP
            ['tokenlearner']
        """
        self.check_model(model, adapter)
        blocks = adapter.blocks(model)
        block = blocks[self.reducing_layer(len(blocks))]
        channels = _hidden_size(model, block)
        module = TokenLearnerModule(channels, max(self.num_tokens, 1), self.hidden_dim, self.fuse)
        parameter = next(block.parameters(), None)
        if parameter is not None:
            module.to(device=parameter.device, dtype=parameter.dtype)
        return {MODULE_NAME: module}


from ...integration import tokenlearner as _wiring  # noqa: E402,F401  (registers the "tokenlearner" wiring)
