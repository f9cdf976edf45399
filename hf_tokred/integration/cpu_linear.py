"""oneDNN-packed linear weights for multi-token passes on a CPU: what makes verifying drafts cheap there.

Speculative decoding (EAGLE, prompt lookup) pays off when one forward pass over k drafted tokens costs about one
decoding step. On a GPU it does; on a CPU with PyTorch's default fp32 path it need not: ``nn.Linear`` goes to
MKL's GEMM, which on this project's AMD EPYC cores took 2-3x its one-row time for 2-8 rows, so a pass over 2-8
tokens of SmolLM2-135M cost 1.5-2.2 decoding steps (``docs/learned_lm.md``). oneDNN with
the weights reordered once into its blocked layout (what IPEX's ``optimize`` and ``torch.compile`` with freezing do
on a CPU) runs such a pass for little more than one step.

:func:`pack_linear_weights` gives every fp32 ``nn.Linear`` of a model such a packed copy. Calls over fewer than
``min_rows`` rows (one decoding step: 1 row) keep PyTorch's own path, so greedy decoding is bit-identical to the
unpacked model; calls over more rows (prefill, verification of drafts) use oneDNN, whose results differ from
MKL's in the last bits (as MKL's own results for different row counts do). The layers stay ``nn.Linear``
instances with the same parameters (state dict, tied weights and ``save_pretrained`` are unchanged); the packed
copy is extra memory (one more copy of the linear weights) and is rebuilt when a weight changes in place. Passes
that need gradients use PyTorch's path. :func:`unpack_linear_weights` undoes it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, UnsupportedModelError

MIN_ROWS = 2  # calls over fewer rows (a single decoding step) keep PyTorch's own path


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose passes over ``min_rows`` rows or more run oneDNN on a packed copy of the weight.

    Not built directly: :func:`pack_linear_weights` turns a model's ``nn.Linear`` layers into it in place (same
    object, same parameters) and :func:`unpack_linear_weights` turns them back."""

    _packed: torch.Tensor
    _packed_version: tuple[int, int]
    _min_rows: int

    def _weight_version(self) -> tuple[int, int]:
        # changes when the weight is written in place (_version) or its data replaced (.to(), .data =)
        return self.weight.data_ptr(), self.weight._version

    def _pack(self) -> None:
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        self._packed_version = self._weight_version()

    def __getstate__(self):
        # oneDNN's packed tensor cannot be copied or pickled: a copy (deepcopy) packs its own on first use.
        state = dict(self.__dict__)
        state.pop("_packed", None)
        state["_packed_version"] = (0, -1)
        return state

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // max(self.in_features, 1)
        needs_grad = torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad)
        if (rows < self._min_rows or needs_grad or self.weight.dtype != torch.float32
                or input.dtype != torch.float32 or input.device.type != "cpu"):
            return F.linear(input, self.weight, self.bias)
        if self._weight_version() != self._packed_version:  # the weight changed since it was packed
            self._pack()
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(input, self._packed, bias, "none", [], "")


def pack_linear_weights(model: nn.Module, min_rows: int = MIN_ROWS) -> nn.Module:
    """Give every fp32 ``nn.Linear`` of ``model`` (on the CPU) a oneDNN-packed weight used for calls over
    ``min_rows`` rows or more, and return the model.

    Single-token decoding steps keep PyTorch's own kernels (bit-identical outputs); multi-token passes (prefill,
    speculative verification) get oneDNN's, which on a CPU cost little more for a few rows than for one. Layers in
    another dtype or on another device are left as they are; a model with no fp32 CPU linear layer, or a PyTorch
    built without oneDNN, raises :class:`~hf_tokred.errors.UnsupportedModelError`, a bad ``min_rows``
    :class:`~hf_tokred.errors.ConfigError`, and the model is left untouched.

    Example:
        >>> import hf_tokred
        >>> from hf_tokred.integration.cpu_linear import pack_linear_weights, unpack_linear_weights
        >>> model = pack_linear_weights(model)                                   # doctest: +SKIP
        >>> model.generate(ids, assistant_model=hf_tokred.eagle_assistant(model))  # doctest: +SKIP
        >>> unpack_linear_weights(model)                                         # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"pack_linear_weights: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ConfigError(f"min_rows: expected an integer >= 1, got {min_rows!r}", field="min_rows")
    if not torch.backends.mkldnn.is_available():
        raise UnsupportedModelError("pack_linear_weights: this PyTorch build has no oneDNN (mkldnn) support")
    layers = [module for module in model.modules() if type(module) in (nn.Linear, PackedLinear)
              and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"]
    if not layers:
        raise UnsupportedModelError(f"pack_linear_weights: {type(model).__name__} has no fp32 nn.Linear layer on "
                                    "the CPU to pack")
    for layer in layers:
        if type(layer) is nn.Linear:  # a layer packed already keeps its packed weight (repacked when it changes)
            layer.__class__ = PackedLinear
            layer._pack()
        layer._min_rows = min_rows
    return model


def linear_as(reference: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A frozen linear layer over ``weight`` and ``bias`` that is packed as ``reference`` is (EAGLE's draft LM head:
    the model's LM head restricted to the draft vocabulary); ``reference`` itself when it holds these very tensors.

    Example:
        >>> from hf_tokred.integration.cpu_linear import linear_as
        >>> draft_head = linear_as(model.get_output_embeddings(), weight[vocab_ids])   # doctest: +SKIP
    """
    if weight is getattr(reference, "weight", None) and bias is getattr(reference, "bias", None):
        return reference
    with torch.device("meta"):  # no initialisation: the tensors are given
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    if type(reference) is PackedLinear:
        pack_linear_weights(layer, min_rows=reference._min_rows)
    return layer


def unpack_linear_weights(model: nn.Module) -> nn.Module:
    """Undo :func:`pack_linear_weights`: the layers become plain ``nn.Linear`` again (the packed copies are freed)
    and the model's outputs are bit-identical to before it was packed. Returns the model.

    Example:
        >>> from hf_tokred.integration.cpu_linear import unpack_linear_weights
        >>> unpack_linear_weights(model)                                         # doctest: +SKIP
    """
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear
            for name in ("_packed", "_packed_version", "_min_rows"):
                module.__dict__.pop(name, None)
    return model


__all__ = ["PackedLinear", "linear_as", "pack_linear_weights", "unpack_linear_weights"]
