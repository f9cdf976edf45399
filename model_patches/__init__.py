"""Per-architecture adapters: small declarative records, never a copied ``forward``.

An adapter says what kind of model an architecture is (a decoder with a KV cache, an encoder, a
UNet or DiT denoiser), where its list of blocks is, which attribute of a block is its attention,
and which leading tokens must never be reduced. Reducers read this record instead of hard-coding
``model.model.layers[i].self_attn``. Installed as ``hf_tokred.model_patches``.

Adding an architecture is one ``register_adapter(ModelAdapter(...))`` call in a file of this folder,
imported below. Architectures can also be recognised by what they do: a *detector* registered with
:func:`register_detector` is asked about every model no adapter names, and returns an adapter built for
that model or a sentence saying why it cannot work (:mod:`.decoder` recognises every decoder whose
attention calls transformers' attention interface this way).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_tokred.model_patches import find_adapter
    >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    >>> find_adapter(LlamaForCausalLM(cfg)).kind
    'decoder'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_tokred.errors import UnsupportedModelError

KINDS = ("decoder", "encoder", "unet", "dit", "seq2seq", "ssm")


@dataclass(frozen=True)
class ModelAdapter:
    """What hf_tokred needs to know about one architecture.

    Attributes:
        name: short name shown in errors and ``hf-tokred methods`` (``"llama"``).
        kind: one of :data:`KINDS`; reducers declare the kinds they support.
        match: transformers ``config.model_type`` values, or diffusers class names, this adapter covers.
        library: ``"transformers"`` or ``"diffusers"``.
        layers: qualified-name suffix of the ``nn.ModuleList`` of blocks (``"layers"``, ``"transformer_blocks"``).
        attention: dotted path, inside a block, of the module that calls the attention function.
        has_kv_cache: the model decodes with a KV cache (KV policies need it).
        protected_tokens: leading tokens never merged or dropped (CLS, distillation token).
        examples: model classes users load, shown in error messages.
    """

    name: str
    kind: str
    match: tuple[str, ...]
    library: str = "transformers"
    layers: str = "layers"
    attention: str = "self_attn"
    has_kv_cache: bool = False
    protected_tokens: int = 0
    examples: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ModelAdapter.kind must be one of {KINDS}, got {self.kind!r}")

    def block_lists(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
        """Every ``nn.ModuleList`` of blocks in ``model`` (UNets have one per resolution level)."""
        suffix = "." + self.layers
        return [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and (name == self.layers or name.endswith(suffix))
        ]

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """All blocks of ``model`` in execution order of their lists."""
        return [block for _, blocks in self.block_lists(model) for block in blocks]

    def attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention module of every block (blocks without one are skipped)."""
        found = []
        for block in self.blocks(model):
            try:
                found.append(block.get_submodule(self.attention))
            except AttributeError:  # e.g. UNet blocks without self-attention
                continue
        return found


_ADAPTERS: list[ModelAdapter] = []
_DETECTORS: list = []


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Add an architecture adapter (replacing one with the same name).

    Example:
        >>> from hf_tokred.model_patches import ModelAdapter, register_adapter
        >>> _ = register_adapter(ModelAdapter(name="llama", kind="decoder", match=("llama",), has_kv_cache=True,
        ...                                   examples=("LlamaForCausalLM", "LlamaModel")))
    """
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != adapter.name]
    _ADAPTERS.append(adapter)
    return adapter


def register_detector(detect) -> None:
    """Add a fallback that recognises models no registered adapter names, by what they do.

    ``detect(model)`` returns a :class:`ModelAdapter` for ``model``, a sentence saying why ``model`` cannot
    work (shown in the error), or None when ``model`` is not of its kind. Adapters that name a model's type
    win over detectors.

    Example:
        >>> from hf_tokred.model_patches import register_detector
        >>> register_detector(lambda model: None)  # a detector that never recognises anything
    """
    if detect not in _DETECTORS:
        _DETECTORS.append(detect)


def registered_adapters() -> list[ModelAdapter]:
    """All registered adapters."""
    return list(_ADAPTERS)


def _model_key(model) -> tuple[str, str]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return "transformers", model_type
    return "diffusers", type(model).__name__


def supported_names(library: str | None = None) -> str:
    """Comma-separated list of supported architectures with example classes, for error messages."""
    return "; ".join(
        f"{a.name} ({', '.join(a.examples or a.match)})" for a in _ADAPTERS
        if library in (None, a.library) and getattr(a, "unsupported", None) is None  # refused ones say why elsewhere
    )


def find_adapter(model) -> ModelAdapter:
    """Return the adapter for ``model`` or raise :class:`UnsupportedModelError` naming the supported ones.

    Example:
        >>> import torch
        >>> from hf_tokred.model_patches import find_adapter
        >>> find_adapter(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        hf_tokred.errors.UnsupportedModelError: Linear is not supported by hf_tokred. Supported architectures: ...
    """
    library, key = _model_key(model)
    for adapter in _ADAPTERS:
        if adapter.library == library and key in adapter.match:
            return adapter
    reasons = []
    for detect in _DETECTORS:
        found = detect(model)
        if isinstance(found, ModelAdapter):
            return found
        if found:
            reasons.append(found)
    what = f"{type(model).__name__} (model_type {key!r})" if library == "transformers" else type(model).__name__
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise UnsupportedModelError(
        f"{what} is not supported by hf_tokred{why}. Supported architectures: {supported_names()}"
    )


# Importing registers the adapters.
from . import beit, bert, clip, cohere2, data2vec_vision, decoder, deit, dinov2, distilbert, dit, flux, modernbert, pixart, roberta, sd3, siglip, t5, unet, vit, vlm, blip  # noqa: E402,F401,I001
from . import mamba, timesformer, videomae, xclip  # noqa: E402,F401,I001
