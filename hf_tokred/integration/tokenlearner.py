"""Wiring of TokenLearner (``hf_tokred.methods.encoder.tokenlearner``): plain torch hooks on two blocks.

* a forward pre-hook on the TokenLearner block replaces its input ``(B, P + N, C)`` (``P`` protected tokens,
  e.g. CLS) by ``(B, P + S', C)``: the protected tokens, then the learned tokens laid out as the model lays
  out its patch tokens (per frame on video models: ``S`` tokens per frame, in the model's frame order, so
  TimeSformer's divided attention still reshapes by frames). The later blocks run on the short sequence;
* with ``fuse=True``, a forward hook on the last block maps its output back to ``(B, P + N, C)`` with the
  TokenFuser, from the learned tokens and the states the TokenLearner block received.

Image and video encoders take no padding mask, so no mask has to follow the sequence. Inside
:func:`hf_tokred.training.dense_pass` the hooks do nothing (the dense teacher). ``remove()`` removes the hooks.

Example:
    >>> import hf_tokred, torch
    >>> from transformers import ViTConfig, ViTModel
    >>> vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
    ...                          num_attention_heads=2, intermediate_size=64)).eval()
    >>> _ = hf_tokred.apply(vit, {"method": "tokenlearner", "num_tokens": 4, "layer": 2})
    >>> vit(torch.randn(1, 3, 32, 32)).last_hidden_state.shape[1]       # CLS + 4 learned tokens
    5
"""

from __future__ import annotations

import torch

from ..errors import TokenReductionError, UnsupportedModelError
from .wiring import MODULES_ATTR, register_wiring

STATE_ATTR = "_hf_tokred_tokenlearner_counts"


def _hidden(args, kwargs):
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


def _replace(args, kwargs, hidden, positional):
    if positional:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Pass:
    """What the TokenLearner block saw in the current call (for the fuser)."""

    original: torch.Tensor | None = None
    learned_shape: tuple | None = None


class TokenLearnerWiring:
    """The hooks of one model (see the module docstring)."""

    def __init__(self, model, adapter, reducer):
        self.model = model
        self.adapter = adapter
        self.reducer = reducer
        self.blocks = adapter.blocks(model)
        self.layer = reducer.reducing_layer(len(self.blocks))
        self.protected = adapter.protected(model)
        self.video = hasattr(adapter, "by_frame")
        self.state = _Pass()
        self.token_counts: list[int] = []

    def module(self):
        modules = self.model._modules.get(MODULES_ATTR)
        if modules is None or "tokenlearner" not in modules:
            raise TokenReductionError("tokenlearner: the model's hf_tokred_modules['tokenlearner'] is missing")
        return modules["tokenlearner"]

    def active(self) -> bool:
        return not getattr(self.reducer, "_dense", False)

    def groups(self, patches: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(B, N, C)`` patch tokens -> ``(B, G, n, C)`` groups the maps act on, and the frame count."""
        if not self.video:
            return patches[:, None], 1
        per_frame = self.adapter.frame_tokens(self.model)
        if patches.shape[1] % per_frame:
            raise UnsupportedModelError(f"tokenlearner: {patches.shape[1]} patch tokens are not whole frames of "
                                        f"{per_frame} tokens")
        frames = patches.shape[1] // per_frame
        grouped = self.adapter.by_frame(patches, frames)
        if not self.reducer.per_frame:
            grouped = grouped.reshape(grouped.shape[0], 1, -1, grouped.shape[-1])
        return grouped, frames

    def ungroup(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, G, S, C)`` -> ``(B, G * S, C)`` in the model's token order."""
        if self.video and self.reducer.per_frame:
            return self.adapter.from_frames(tokens)
        return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])

    def learn(self, module, args, kwargs):
        self.state = _Pass()
        if not self.active():
            return None
        hidden, positional = _hidden(args, kwargs)
        protected, patches = hidden[:, : self.protected], hidden[:, self.protected:]
        grouped, _ = self.groups(patches)
        learned = self.module().learn(grouped)
        if self.reducer.fuse:
            self.state.original = grouped
        out = torch.cat([protected, self.ungroup(learned)], dim=1)
        return _replace(args, kwargs, out, positional)

    def fuse(self, module, args, kwargs, output):
        original = self.state.original
        if original is None:
            return None
        self.state = _Pass()
        hidden = output[0] if isinstance(output, tuple) else output
        protected, short = hidden[:, : self.protected], hidden[:, self.protected:]
        learned = self.groups_of_learned(short, original.shape[1])
        fused = self.module().fuse_back(learned, original)
        if self.video and self.reducer.per_frame:
            patches = self.adapter.from_frames(fused)
        elif self.video:
            patches = fused.reshape(fused.shape[0], -1, fused.shape[-1])
        else:
            patches = fused[:, 0]
        out = torch.cat([protected, patches], dim=1)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def groups_of_learned(self, short: torch.Tensor, groups: int) -> torch.Tensor:
        if self.video and self.reducer.per_frame:
            return self.adapter.by_frame(short, groups)
        return short[:, None]

    def install(self, applied) -> None:
        handle = self.blocks[self.layer].register_forward_pre_hook(self.learn, with_kwargs=True)
        applied.add_undo(handle.remove)
        if self.reducer.fuse:
            handle = self.blocks[-1].register_forward_hook(self.fuse, with_kwargs=True)
            applied.add_undo(handle.remove)


@register_wiring("tokenlearner")
def wire_tokenlearner(model, adapter, reducer, applied) -> None:
    """Attach TokenLearner (hooks, see the module docstring); ``num_tokens=0`` installs nothing (dense).

    Example:
        >>> model = hf_tokred.apply(vit, {"method": "tokenlearner", "num_tokens": 8})   # doctest: +SKIP
    """
    if type(reducer).__name__ != "TokenLearnerConfig":
        raise UnsupportedModelError(f"{reducer.method}: no tokenlearner wiring for this reducer")
    reducer.check_model(model, adapter)
    if reducer.num_tokens == 0:
        return
    TokenLearnerWiring(model, adapter, reducer).install(applied)


__all__ = ["TokenLearnerWiring", "wire_tokenlearner"]
