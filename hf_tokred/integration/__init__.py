"""Wiring of reductions into transformers models and diffusers pipelines.

``apply``/``remove`` dispatch on the object: a transformers ``PreTrainedModel``, or a diffusers
``DiffusionPipeline``/denoiser.
"""

from __future__ import annotations

from ..errors import ArgumentError, UnsupportedModelError
from . import delete_gate as _delete_gate  # noqa: F401  (registers the "mrt5" wiring: MrT5's delete gate)
from . import eagle as _eagle  # noqa: F401  (registers the "decoding" wiring: EAGLE's draft head)
from . import encoders as _encoders  # noqa: F401  (registers the "sequence" wiring)
from . import gist as _gist  # noqa: F401  (registers the "gist" wiring)
from . import hourglass as _hourglass  # noqa: F401  (registers the "token_pooling" wiring)
from . import icae as _icae  # noqa: F401  (registers the "icae" wiring)
from . import prefill as _prefill  # noqa: F401  (registers the "prefill" wiring: lazyllm)
from . import prompt as _prompt  # noqa: F401  (registers the "prompt" wiring)
from . import token_dropping as _token_dropping  # noqa: F401  (registers the "token_dropping" wiring)
from . import tokenskip as _tokenskip  # noqa: F401  (registers the "tokenskip" wiring)
from . import transformers as _transformers
from . import vlm as _vlm  # noqa: F401  (registers the "visual" wiring: visual-token methods)
from .transformers import build_cache, compress_context


def _is_diffusers_object(obj) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("diffusers.")


def _peft_base_model(obj):
    """The transformers model inside a peft ``PeftModel`` (its LoRA layers included), or None for anything else.

    The reduction goes onto that model: peft's ``generate``/``forward`` call it, so the reduced cache and hooks
    serve the adapted model, and ``merge_and_unload()`` returns it with the reduction still attached."""
    module = type(obj).__module__ or ""
    if module.startswith("peft.") and callable(getattr(obj, "get_base_model", None)):
        return obj.get_base_model()
    return None


# The keyword arguments apply() passes on (those of apply_to_model / apply_to_diffusers).
_TRANSFORMERS_KEYWORDS = ("weights_from", "hub_kwargs", "weights_required")
_DIFFUSERS_KEYWORDS = ("component",)


def _check_keywords(kwargs: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ArgumentError(
            f"{unknown[0]}: hf_tokred.apply got an unexpected keyword argument {unknown[0]!r}; for {what} it takes "
            f"{', '.join(allowed)}",
            field=unknown[0],
        )


def apply(model, config, **kwargs):
    """Attach a token reduction to a model or pipeline and return it.

    ``config`` is a :class:`~hf_tokred.TokenReductionConfig`, a dict, or a preset/folder/repo name.
    Re-applying replaces the previous reduction. On any error the model is left untouched. A peft
    ``PeftModel`` is reduced through its base model (and returned as it is). Keyword arguments:
    ``weights_from``, ``hub_kwargs``, ``weights_required`` for transformers models (where learned parts are
    loaded from, see ``apply_to_model``), ``component`` for diffusers pipelines; any other is an
    :class:`~hf_tokred.errors.ArgumentError` (a ``TypeError``) naming it.

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

    base = _peft_base_model(model)
    if isinstance(base, PreTrainedModel):
        _check_keywords(kwargs, _TRANSFORMERS_KEYWORDS, "a peft model")
        _transformers.apply_to_model(base, config, **kwargs)
        return model
    if isinstance(model, PreTrainedModel):
        _check_keywords(kwargs, _TRANSFORMERS_KEYWORDS, "a transformers model")
        return _transformers.apply_to_model(model, config, **kwargs)
    if _is_diffusers_object(model):
        from . import diffusers as _diffusers

        _check_keywords(kwargs, _DIFFUSERS_KEYWORDS, "a diffusers pipeline or denoiser")
        return _diffusers.apply_to_diffusers(model, config, **kwargs)
    raise UnsupportedModelError(
        f"hf_tokred.apply: expected a transformers PreTrainedModel, a peft PeftModel or a diffusers "
        f"pipeline/denoiser, got {type(model).__name__}"
    )


def remove(model):
    """Detach the token reduction; afterwards outputs are bit-identical to the untouched model.

    Example:
        >>> hf_tokred.remove(model)   # doctest: +SKIP
    """
    from transformers import PreTrainedModel

    base = _peft_base_model(model)
    if isinstance(base, PreTrainedModel):
        _transformers.remove_from_model(base)
        return model
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
    _prompt.install()
    _diffusers.install()


__all__ = ["apply", "build_cache", "compress_context", "install", "remove"]
