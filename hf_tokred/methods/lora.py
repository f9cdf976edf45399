"""LoRA as peft computes it, run by forward hooks: the low-rank adapter shared by the methods that train one.

TokenSkip, Gist tokens and ICAE fine-tune a decoder through a LoRA. Here the LoRA never replaces a module: each
targeted ``nn.Linear`` gets a forward hook adding ``lora_B(lora_A(x)) * scaling`` to its output, so the base
model's modules and state dict are untouched (``model.safetensors`` keeps the base weights under their own
names) and removing the hooks restores the dense model exactly. The weights follow peft's initialisation
(Kaiming-uniform ``lora_A``, zero ``lora_B``), so a fresh LoRA is a no-op.

Example:
    >>> import torch
    >>> from hf_tokred.methods.lora import LoRA
    >>> LoRA(16, 32, rank=4, scaling=2.0)(torch.ones(1, 16)).abs().sum().item()
    0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TokenReductionConfig, param
from ..errors import ConfigError, UnsupportedModelError

TARGETS_HELP = ("names (last path part, e.g. 'q_proj') of the Linear layers in the decoder blocks given a LoRA; "
                "empty = every Linear layer in the blocks")


@dataclass(kw_only=True)
class LoRAConfig(TokenReductionConfig):
    """Fields of a method that trains a LoRA (``rank``, ``alpha``, ``target_modules``), their checks, and the LoRA.

    A subclass may declare the three fields again to change their defaults (ICAE's LoRA targets the four attention
    projections); a subclass's :meth:`validate` calls ``super().validate()``.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="gist", rank=4, alpha=8.0).scaling
        2.0
    """

    rank: int = param(8, int, low=1, high=4096, help="LoRA rank r")
    alpha: float = param(16.0, float, low=0.0, high=1e6, low_open=True, help="LoRA alpha; scaling = alpha / rank")
    target_modules: list = param([], str, sequence=True, help=TARGETS_HELP)

    def validate(self) -> None:
        for i, name in enumerate(self.target_modules):
            if not name or "." in name:
                raise ConfigError(f"target_modules[{i}]: expected the last part of a module path (e.g. 'q_proj'), "
                                  f"got {name!r}", field="target_modules")

    @property
    def scaling(self) -> float:
        """LoRA's ``alpha / rank``."""
        return self.alpha / self.rank

    def lora_layers(self, model, adapter, seed: int = 0) -> LoRALayers:
        """A fresh :class:`LoRALayers` (``lora_B`` zero) on this config's targets in ``model``'s decoder blocks."""
        targets = lora_targets(model, adapter, self.target_modules, method=self.method_key)
        return LoRALayers(targets, self.rank, self.scaling, seed=seed)


def lora_targets(model, adapter, target_modules=(), *, method: str = "lora") -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers inside the decoder blocks that get a LoRA: ``{full module path: layer}``.

    ``target_modules`` filters by the last part of the path (``'q_proj'``); empty keeps every Linear layer of
    the blocks (the embedding and the LM head are never targeted). Raises
    :class:`~hf_tokred.errors.UnsupportedModelError` when the blocks hold no Linear layer and
    :class:`~hf_tokred.errors.ConfigError` (``target_modules``) for a name that matches nothing.

    Example:
        >>> from hf_tokred.model_patches import find_adapter
        >>> sorted({p.rsplit(".", 1)[1] for p in lora_targets(model, find_adapter(model), method="tokenskip")})   # doctest: +SKIP
        ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
    """
    blocks = {id(b) for b in adapter.blocks(model)}
    prefixes = [name + "." for name, module in model.named_modules() if id(module) in blocks]
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(name.startswith(p) for p in prefixes)}
    if not found:
        raise UnsupportedModelError(f"{method}: {type(model).__name__} has no nn.Linear layers in its decoder blocks "
                                    "to give a LoRA (Conv1D-style projections, as GPT-2's, are not supported)")
    if target_modules:
        available = sorted({name.rsplit(".", 1)[-1] for name in found})
        missing = [t for t in target_modules if t not in available]
        if missing:
            raise ConfigError(f"target_modules: {missing[0]!r} is no Linear layer of {type(model).__name__}'s blocks; "
                              f"they are {', '.join(available)}", field="target_modules")
        found = {name: m for name, m in found.items() if name.rsplit(".", 1)[-1] in target_modules}
    return found


class LoRA(nn.Module):
    """One Linear layer's low-rank update, as peft's ``lora.Linear`` computes it: ``lora_B(lora_A(x)) * scaling``.

    Example:
        >>> lora = LoRA(16, 32, rank=4, scaling=2.0)
        >>> lora(torch.zeros(1, 16)).shape, bool(lora.lora_B.weight.abs().sum() == 0)
        (torch.Size([1, 32]), True)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scaling = scaling
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """peft's initialisation (``init_lora_weights=True``): Kaiming-uniform ``lora_A``, zero ``lora_B``."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling

    def hook(self, module, args, output):
        """Forward hook of the targeted Linear layer: its output plus the update, in the output's dtype (as peft)."""
        x = args[0].to(self.lora_A.weight.dtype)
        return (output + self(x)).to(output.dtype)


class LoRALayers(nn.Module):
    """The LoRA of every targeted layer, stored under the layer's own path (``model.layers.0.self_attn.q_proj``).

    Each :class:`LoRA` sits on the device of its layer, in float32 (peft's ``autocast_adapter_dtype``) for a
    floating-point layer; :meth:`attach` registers the forward hooks and returns their handles.

    Example:
        >>> lora = LoRALayers(lora_targets(model, adapter), rank=8, scaling=2.0)          # doctest: +SKIP
        >>> lora.paths[:1]                                                                   # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj']
    """

    def __init__(self, targets: dict[str, nn.Linear], rank: int, scaling: float, seed: int = 0):
        super().__init__()
        self.paths = list(targets)
        self.rank, self.scaling = rank, scaling
        generator = torch.Generator().manual_seed(seed)
        for path, layer in targets.items():
            lora = LoRA(layer.in_features, layer.out_features, rank, scaling, generator)
            weight = layer.weight
            # float32 below single precision (peft's autocast_adapter_dtype) and for quantized integer weights
            dtype = weight.dtype if weight.is_floating_point() and weight.element_size() >= 4 else torch.float32
            lora.to(device=weight.device if weight.device.type != "meta" else "cpu", dtype=dtype)
            self._insert(path, lora)

    def _insert(self, path: str, lora: LoRA) -> None:
        node: nn.Module = self
        parts = path.split(".")
        for part in parts[:-1]:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        node.add_module(parts[-1], lora)

    def lora(self, path: str) -> LoRA:
        """The :class:`LoRA` of the layer at ``path``."""
        return self.get_submodule(path)

    def reset_parameters(self, seed: int = 0) -> None:
        """Fresh weights (peft's initialisation) for every layer, ``lora_A`` drawn from a generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        for path in self.paths:
            lora = self.lora(path)
            fresh = LoRA(lora.lora_A.in_features, lora.lora_B.out_features, self.rank, self.scaling, generator)
            with torch.no_grad():
                lora.lora_A.weight.copy_(fresh.lora_A.weight)
                lora.lora_B.weight.zero_()

    def attach(self, model) -> list:
        """Register the forward hook of every LoRA on its layer of ``model``; returns the hook handles."""
        return [model.get_submodule(path).register_forward_hook(self.lora(path).hook) for path in self.paths]


__all__ = ["LoRA", "LoRAConfig", "LoRALayers", "lora_targets"]
