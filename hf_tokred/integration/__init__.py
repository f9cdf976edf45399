"""Wiring of reductions into transformers models and diffusers pipelines.

``apply``/``remove`` dispatch on the object: a transformers ``PreTrainedModel``, or a diffusers
``DiffusionPipeline``/denoiser.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from . import encoders as _encoders  # noqa: F401  (registers the "sequence" wiring)
from . import transformers as _transformers
from .transformers import build_cache, compress_context


def _is_diffusers_object(obj) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("diffusers.")


def apply(model, config, **kwargs):
    """Attach a token reduction to a model or pipeline and return it.

    ``config`` is a :class:`~hf_tokred.TokenReductionConfig`, a dict, or a preset/folder/repo name.
    Re-applying replaces the previous reduction. On any error the model is left untouched.

    Example:
        >>> import hf_tokred
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        >>> model = hf_tokred.apply(model, {"method": "streamingllm", "max_tokens": 64})
        >>> model.config._attn_implementation
        'hf_tokred_sdpa'
        >>> _ = hf_tokred.remove(model)
        >>> model.config._attn_implementation
        'sdpa'
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return _transformers.apply_to_model(model, config, **kwargs)
    if _is_diffusers_object(model):
        from . import diffusers as _diffusers

        return _diffusers.apply_to_diffusers(model, config, **kwargs)
    raise UnsupportedModelError(
        f"hf_tokred.apply: expected a transformers PreTrainedModel or a diffusers pipeline/denoiser, "
        f"got {type(model).__name__}"
    )


def remove(model):
    """Detach the token reduction; afterwards outputs are bit-identical to the untouched model.

    Example:
        >>> hf_tokred.remove(model)   # doctest: +SKIP
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return _transformers.remove_from_model(model)
    if _is_diffusers_object(model):
        from . import diffusers as _diffusers

        return _diffusers.remove_from_diffusers(model)
    raise UnsupportedModelError(f"hf_tokred.remove: unsupported object {type(model).__name__}")


def install() -> None:
    """Install the from_pretrained/save_pretrained wrappers (idempotent; done by ``import hf_tokred``)."""
    from . import diffusers as _diffusers

    _transformers.install()
    _diffusers.install()


__all__ = ["apply", "build_cache", "compress_context", "install", "remove"]
