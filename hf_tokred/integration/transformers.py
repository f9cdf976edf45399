"""transformers wiring: ``from_pretrained(..., token_reduction=cfg)``, save/load, ``generate()``.

``import hf_tokred`` calls :func:`install`, which wraps ``PreTrainedModel.from_pretrained``,
``save_pretrained`` and ``push_to_hub`` once. The wrappers only act on models that carry a
reduction; every other model goes straight to the original methods.

* The config is stored as a plain dict in ``config.json["token_reduction"]`` (a process that never
  imports hf_tokred loads a clean dense model from the same folder) plus a full copy in
  ``token_reduction_config.json``; learned parts go to ``token_reduction.safetensors``.
* When a KV policy is attached, ``model.generate`` (an instance attribute, the same mechanism
  transformers uses for Hub ``custom_generate``) builds a fresh :class:`TokenReductionCache` for each
  call unless ``past_key_values`` is passed.
"""

from __future__ import annotations

import functools
import inspect
import os
import types

import torch
from transformers import PreTrainedModel

from ..attention import REDUCED_IMPLEMENTATIONS, STOCK_IMPLEMENTATIONS
from ..config import WEIGHTS_NAME, TokenReductionConfig
from ..errors import ConfigError, MissingFileError, TokenReductionError, UnsupportedModelError
from ..kv.cache import TokenReductionCache
from .wiring import (
    MODULES_ATTR,
    STATE_ATTR,
    AppliedReduction,
    check_request,
    config_from_saved,
    get_applied,
    register_wiring,
    saved_config_path,
    wiring_for,
)

TAGS = ("token-reduction", "hf_tokred")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


# ---------------------------------------------------------------------------------------------
# apply / remove
# ---------------------------------------------------------------------------------------------


def check_supported(model: PreTrainedModel, config: TokenReductionConfig):
    """Every check `apply` makes before it touches the model; returns the model's adapter."""
    from ..model_patches import find_adapter, registered_adapters

    adapter = find_adapter(model)
    for reducer in config.iter_reducers():
        wiring_for(reducer.stage)
        if adapter.kind not in reducer.model_kinds:
            fits = ", ".join(
                f"{a.name} ({', '.join(a.examples or a.match)})" for a in registered_adapters() if a.kind in reducer.model_kinds
            )
            raise UnsupportedModelError(
                f"{reducer.method} acts on {'/'.join(reducer.model_kinds)} models ({fits}); "
                f"{type(model).__name__} is a {adapter.kind} model ({adapter.name})"
            )
        if reducer.stage in ("kv_policy", "kv_storage") and not adapter.has_kv_cache:
            raise UnsupportedModelError(
                f"{reducer.method} acts on the KV cache and {type(model).__name__} has no KV cache to reduce"
            )
    policy, storage = config.get("kv_policy"), config.get("kv_storage")
    if storage is not None:
        storage.check_model(model)  # e.g. a group size that does not divide the head dimension
        if policy is not None and not storage.composes_with_eviction:
            raise ConfigError(
                f"method: {storage.method} cannot be composed with the eviction policy {policy.method} "
                f"(kivi and kvquant storage can)",
                field="method",
            )
    if policy is not None and storage is not None and policy.evicted == "merge":
        raise ConfigError(
            f"evicted: {policy.method} with evicted='merge' averages stored keys in place, which compressed "
            f"storage ({storage.method}) cannot do; use evicted='drop' with it",
            field="evicted",
        )
    attn = model.config._attn_implementation
    if STOCK_IMPLEMENTATIONS.get(attn, attn) not in REDUCED_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attn_implementation: hf_tokred wraps {sorted(REDUCED_IMPLEMENTATIONS)}, the model uses {attn!r}; "
            "load it with attn_implementation='sdpa' or 'eager'"
        )
    return adapter


def apply_to_model(model: PreTrainedModel, config, *, weights_from: str | None = None, hub_kwargs: dict | None = None,
                   weights_required: bool = True):
    """Attach a reduction to a transformers model (``hf_tokred.apply`` for transformers models).

    ``weights_from`` is a folder or Hub repo holding ``token_reduction.safetensors`` for reductions
    with learned parts; when ``weights_required`` is False a missing file means fresh (untrained)
    parts. Every check runs before the model is touched; if attaching fails half-way the model is
    restored.
    """
    cfg = TokenReductionConfig.coerce(config)
    adapter = check_supported(model, cfg)
    weights_file = _resolve_weights(cfg, weights_from, hub_kwargs or {}, weights_required)
    if get_applied(model) is not None:
        remove_from_model(model)
    attn = model.config._attn_implementation
    applied = AppliedReduction(cfg, adapter, previous_attn_implementation=attn)
    setattr(model, STATE_ATTR, applied)
    try:
        _attach_learned_modules(model, adapter, cfg, applied, weights_file)
        for reducer in cfg.iter_reducers():
            wiring_for(reducer.stage)(model, adapter, reducer, applied)
        target = REDUCED_IMPLEMENTATIONS.get(attn, attn)
        if attn != target:
            model.set_attn_implementation(target)
            if model.config._attn_implementation != target:
                raise UnsupportedModelError(
                    f"{type(model).__name__} does not let hf_tokred set its attention implementation "
                    "(it does not use transformers' AttentionInterface)"
                )
        previous_tags = None if model.model_tags is None else list(model.model_tags)
        model.add_model_tags([*TAGS, f"hf_tokred-{cfg.method}"])
        applied.add_undo(lambda: setattr(model, "model_tags", previous_tags))
        model.config.token_reduction = cfg.to_dict()
    except BaseException:
        remove_from_model(model)
        raise
    return model


def remove_from_model(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`apply_to_model`; outputs are bit-identical to the model before it."""
    applied = get_applied(model)
    if applied is None:
        return model
    applied.run_undo()
    if MODULES_ATTR in model._modules:
        del model._modules[MODULES_ATTR]
    model.__dict__.pop("generate", None)
    if applied.previous_attn_implementation is not None and model.config._attn_implementation != applied.previous_attn_implementation:
        model.set_attn_implementation(applied.previous_attn_implementation)
    if "token_reduction" in model.config.__dict__:
        del model.config.token_reduction
    delattr(model, STATE_ATTR)
    return model


def _resolve_weights(cfg, weights_from, hub_kwargs, required) -> str | None:
    if not cfg.learned or weights_from is None:
        return None
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None}
    path = cached_file(os.fspath(weights_from), WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **kwargs)
    if path is None and required:
        raise MissingFileError(
            f"{WEIGHTS_NAME} is missing from {weights_from}: the {cfg.method} reduction has learned parts saved "
            "there; restore the file, or load with token_reduction=False for the dense model"
        )
    return path


def _attach_learned_modules(model, adapter, cfg, applied, weights_file) -> None:
    modules = {}
    for reducer in cfg.iter_reducers():
        modules.update(reducer.learned_modules(model, adapter))
    if not modules:
        return
    model.add_module(MODULES_ATTR, torch.nn.ModuleDict(modules))
    if weights_file is not None:
        from safetensors.torch import load_file

        state = load_file(weights_file)
        holder = model._modules[MODULES_ATTR]
        expected = set(holder.state_dict())
        if set(state) != expected:
            raise ConfigError(
                f"{WEIGHTS_NAME}: holds {sorted(set(state))[:6]}..., the {cfg.method} reduction expects "
                f"{sorted(expected)[:6]}...",
                field=WEIGHTS_NAME,
            )
        for name, tensor in holder.state_dict().items():
            tensor.copy_(state[name].to(device=tensor.device, dtype=tensor.dtype))


# ---------------------------------------------------------------------------------------------
# KV policies: a cache per generate() call
# ---------------------------------------------------------------------------------------------


@register_wiring("kv_policy")
@register_wiring("kv_storage")
def _wire_kv_cache(model, adapter, reducer, applied) -> None:
    # Base models (LlamaModel) cannot generate: they use the cache through build_cache(). A policy and a
    # storage composed together share one override (the second install is the same method).
    if model.can_generate():
        model.generate = types.MethodType(_generate_with_reduction, model)
    if getattr(reducer, "needs_token_ids", False):
        handle = model.register_forward_pre_hook(_record_input_ids, with_kwargs=True)
        applied.add_undo(handle.remove)


def _record_input_ids(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(cache, TokenReductionCache) and isinstance(input_ids, torch.Tensor):
        cache.record_input_ids(input_ids)


def build_cache(model, config: TokenReductionConfig | dict | None = None) -> TokenReductionCache:
    """A fresh :class:`TokenReductionCache` for ``model`` (for ``generate(past_key_values=...)``).

    ``config`` defaults to the KV policy attached with ``apply``/``from_pretrained``.

    Example:
        >>> cache = hf_tokred.build_cache(model)                      # doctest: +SKIP
        >>> model.generate(**inputs, past_key_values=cache)           # doctest: +SKIP
    """
    applied = get_applied(model)
    if config is None:
        if applied is None:
            raise TokenReductionError("build_cache: the model has no reduction attached; pass config= or apply one")
        config = applied.config
    cfg = TokenReductionConfig.coerce(config)
    policy, storage = cfg.get("kv_policy"), cfg.get("kv_storage")
    if policy is None and storage is None:
        raise ConfigError(
            f"build_cache: {cfg.method} holds no KV policy or KV storage (stages 'kv_policy', 'kv_storage')",
            field="method",
        )
    if applied is None:
        raise TokenReductionError("build_cache: apply the reduction first (hf_tokred.apply) so attention can evict")
    return TokenReductionCache(model, policy, storage)


def compress_context(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     config: TokenReductionConfig | dict | None = None) -> TokenReductionCache:
    """Prefill ``input_ids`` (a context shared by later questions) into a fresh cache and compress it.

    This is the *query-agnostic* mode: the policy decides what to keep without seeing the question.
    Pass the returned cache to ``generate`` with the context followed by the question; ``generate`` only
    feeds the tokens the cache has not seen. Prefill-once policies (SnapKV, PyramidKV) append the question
    and the answer without further eviction; per-step policies keep evicting as they decode. A cache
    serves one ``generate`` call: build one per question (``copy.deepcopy`` of a compressed cache works).

    Example:
        >>> model = hf_tokred.apply(model, {"method": "snapkv", "keep": 0.25})                  # doctest: +SKIP
        >>> cache = hf_tokred.compress_context(model, context_ids)                              # doctest: +SKIP
        >>> full = torch.cat([context_ids, question_ids], dim=-1)                               # doctest: +SKIP
        >>> model.generate(full, past_key_values=cache, max_new_tokens=20)                      # doctest: +SKIP
    """
    cache = build_cache(model, config)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # only the cache is wanted
    with torch.no_grad():
        model(**kwargs)
    return cache


def _generate_with_reduction(self, *args, **kwargs):
    applied = get_applied(self)
    policy = applied.config.get("kv_policy") if applied is not None else None
    storage = applied.config.get("kv_storage") if applied is not None else None
    generation_config = kwargs.get("generation_config") or self.generation_config
    use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
    if (policy or storage) is not None and kwargs.get("past_key_values") is None and use_cache is not False:
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            label = "+".join(c.method for c in (policy, storage) if c is not None)
            raise TokenReductionError(
                f"{label}: assisted decoding needs a cache it can crop, and this cache cannot be "
                "cropped; pass past_key_values=transformers.DynamicCache() to decode densely"
            )
        kwargs["past_key_values"] = TokenReductionCache(self, policy, storage)
    return type(self).generate(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained / push_to_hub
# ---------------------------------------------------------------------------------------------


def _from_pretrained(original, cls, pretrained_model_name_or_path, *model_args, token_reduction=None, **kwargs):
    request = check_request(token_reduction, pretrained_model_name_or_path)
    out = original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
    model = out[0] if isinstance(out, tuple) else out
    # Auto classes run AutoConfig first: when config.json already has the key, the user's argument lands
    # on the config instead of reaching us. Only a dict can come from the file itself.
    stored = model.config.__dict__.pop("token_reduction", None)
    from_file = request is None and isinstance(stored, dict)
    if request is None and stored is not None:
        source = saved_config_path(pretrained_model_name_or_path, kwargs.get("subfolder"))
        request = config_from_saved(stored, source) if from_file else check_request(stored, pretrained_model_name_or_path)
    if request is not None and request is not False:
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        # A reduction saved with the model must find its learned parts; a new one passed as an argument
        # starts them fresh unless the folder happens to hold them.
        apply_to_model(model, request, weights_from=pretrained_model_name_or_path, hub_kwargs=hub_kwargs,
                       weights_required=from_file)
    return out


def _save_pretrained(original, self, save_directory, *args, **kwargs):
    applied = get_applied(self)
    if applied is None:
        return original(self, save_directory, *args, **kwargs)
    push = kwargs.pop("push_to_hub", False)
    repo_id = kwargs.pop("repo_id", None)
    # Learned parts stay out of model.safetensors, so a process without hf_tokred loads a clean model.
    learned = self._modules.pop(MODULES_ATTR, None)
    try:
        result = original(self, save_directory, *args, **kwargs)
    finally:
        if learned is not None:
            self._modules[MODULES_ATTR] = learned
    if kwargs.get("is_main_process", True):
        applied.config.save_pretrained(save_directory)
        if learned is not None:
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous().cpu() for k, v in learned.state_dict().items()}
            save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    if push:
        return self.push_to_hub(repo_id or os.path.basename(os.path.normpath(save_directory)), **{
            k: kwargs[k] for k in ("token", "private", "commit_message") if k in kwargs})
    return result


def _push_to_hub(original, self, repo_id, *args, token_reduction_results=None, **kwargs):
    if get_applied(self) is None:
        if token_reduction_results is not None:
            raise TokenReductionError("push_to_hub: token_reduction_results given but the model has no reduction")
        return original(self, repo_id, *args, **kwargs)
    from .hub import push_reduced_model

    return push_reduced_model(self, repo_id, results=token_reduction_results, **kwargs)


def install() -> None:
    """Wrap ``PreTrainedModel.from_pretrained``/``save_pretrained``/``push_to_hub`` (idempotent)."""
    if getattr(PreTrainedModel, "_hf_tokred_installed", False):
        return
    original_from = PreTrainedModel.from_pretrained.__func__
    original_save = PreTrainedModel.save_pretrained
    original_push = PreTrainedModel.push_to_hub

    @functools.wraps(original_from)
    def from_pretrained(cls, *args, **kwargs):
        return _from_pretrained(original_from, cls, *args, **kwargs)

    @functools.wraps(original_save)
    def save_pretrained(self, *args, **kwargs):
        return _save_pretrained(original_save, self, *args, **kwargs)

    @functools.wraps(original_push)
    def push_to_hub(self, *args, **kwargs):
        return _push_to_hub(original_push, self, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    PreTrainedModel.save_pretrained = save_pretrained
    PreTrainedModel.push_to_hub = push_to_hub
    PreTrainedModel._hf_tokred_installed = True
    PreTrainedModel._hf_tokred_originals = (original_from, original_save, original_push)

