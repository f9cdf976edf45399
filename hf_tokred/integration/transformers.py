"""transformers wiring: ``from_pretrained(..., token_reduction=cfg)``, save/load, ``generate()``.

``import hf_tokred`` calls :func:`install`, which wraps ``PreTrainedModel.from_pretrained``,
``save_pretrained`` and ``push_to_hub`` once. The wrappers only act on models that carry a
reduction; every other model goes straight to the original methods.

* The config is stored as a plain dict in ``config.json["token_reduction"]`` (a process that never
  imports hf_tokred loads a clean dense model from the same folder) plus a full copy in
  ``token_reduction_config.json``; learned parts go to ``token_reduction.safetensors``.
* When a KV policy is attached, ``model.generate`` (an instance attribute, the same mechanism
  transformers uses for Hub ``custom_generate``) builds a fresh :class:`TokenReductionCache` for each
  call unless a cache is passed (``past_key_values``; ``cache`` from transformers 5.24). A cache serves one
  ``generate`` call: a second one is an error (it would silently continue from the first call's tokens).
* ``PretrainedConfig.from_dict`` is wrapped too: ``AutoModel*.from_pretrained`` and ``pipeline()`` hand a
  ``token_reduction=`` argument to ``AutoConfig``, which may keep it on the config; it is kept there as a
  :class:`~hf_tokred.integration.wiring.UserRequest`, so that it serializes and is never taken for the
  file's own (a file may only hold an inline dict or a preset name).
* ``save_pretrained`` owns ``token_reduction_config.json`` and ``token_reduction.safetensors``: it writes
  what the current reduction needs and deletes the rest (both, for a dense model).
"""

from __future__ import annotations

import functools
import inspect
import os
import types

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..attention import REDUCED_IMPLEMENTATIONS, STOCK_IMPLEMENTATIONS
from ..compat import CACHE_KWARG, cache_in, with_cache
from ..config import CONFIG_NAME, WEIGHTS_NAME, TokenReductionConfig
from ..errors import ConfigError, MissingFileError, SideCarError, TokenReductionError, UnsupportedModelError
from ..kv.cache import TokenReductionCache, partial_prompt_reducer
from ..kv.policy import prompt_once_policies
from .wiring import (
    MODULES_ATTR,
    STATE_ATTR,
    AppliedReduction,
    UserRequest,
    check_request,
    config_from_saved,
    context_compressor,
    get_applied,
    guard_concurrent_calls,
    register_wiring,
    saved_config_path,
    swap_reduction,
    wiring_for,
)

TAGS = ("token-reduction", "hf_tokred")
# Stages whose wiring keeps the state of the running forward pass on the model (see wiring.OneCallAtATime);
# KV reductions keep theirs in the cache each call builds, so threads may share a model.
_PER_MODEL_STATE_STAGES = ("sequence", "visual")
# Set on a TokenReductionCache once a generate() call has fed it tokens (copy.deepcopy copies the mark).
_CONSUMED = "_hf_tokred_consumed"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


# ---------------------------------------------------------------------------------------------
# apply / remove
# ---------------------------------------------------------------------------------------------


def check_supported(model: PreTrainedModel, config: TokenReductionConfig):
    """Every check `apply` makes before it touches the model; returns the model's adapter."""
    from ..model_patches import find_adapter, registered_adapters

    adapter = find_adapter(model)
    for reducer in config.iter_reducers():
        wiring_for(reducer.wiring_key)
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
    if policy is not None:
        policy.check_model(model)  # e.g. layer kinds without a KV cache, a `layers` choice that selects nothing
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
    parts. Everything that can fail without touching the model runs first: the config is validated,
    the model checked, the learned parts built and their file read and checked. Only then is a
    previous reduction swapped out; if attaching still fails, the previous reduction (with its
    learned parts) is put back, so a failed ``apply`` leaves the model exactly as it was.
    """
    cfg = TokenReductionConfig.coerce(config)
    adapter = check_supported(model, cfg)
    weights_file = _resolve_weights(cfg, weights_from, hub_kwargs or {}, weights_required)
    modules = _build_learned_modules(model, adapter, cfg, weights_file)
    swap_reduction(model, _attach, remove_from_model, adapter, cfg, modules)
    return model


def _attach(model, adapter, cfg, modules) -> None:
    """Attach a validated ``cfg`` with its built learned ``modules`` (or None); undone completely on failure."""
    attn = model.config._attn_implementation
    applied = AppliedReduction(cfg, adapter, previous_attn_implementation=attn)
    setattr(model, STATE_ATTR, applied)
    try:
        if modules is not None:
            model.add_module(MODULES_ATTR, modules)
        for reducer in cfg.iter_reducers():
            wiring_for(reducer.wiring_key)(model, adapter, reducer, applied)
        if any(r.stage in _PER_MODEL_STATE_STAGES for r in cfg.iter_reducers()):
            guard_concurrent_calls(model, cfg.method, applied)
        target = REDUCED_IMPLEMENTATIONS.get(attn, attn)
        # An adapter whose attention bypasses the interface (BLIP's vision tower) applies masks through its own hooks.
        if attn != target and getattr(adapter, "uses_attention_interface", True):
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
    if not cfg.learned:
        return None
    path = None
    if weights_from is not None:
        from transformers.utils import cached_file

        kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None}
        path = cached_file(os.fspath(weights_from), WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **kwargs)
    if path is None and required and weights_from is not None:
        raise MissingFileError(
            f"{WEIGHTS_NAME} is missing from {weights_from}: the {cfg.method} reduction has learned parts saved "
            "there; restore the file, or load with token_reduction=False for the dense model"
        )
    preset = cfg.preset_learned
    if path is None and preset is not None:  # a preset's parts: shipped with it, or trained by the user first
        if preset.weights is None:
            raise MissingFileError(
                f"the preset {preset.preset} ({cfg.method}) ships no trained parts (too large for the package): "
                f"train them with `{preset.train}`, then load the folder it saves "
                "(from_pretrained(folder), or hf_tokred.apply(model, folder))"
            )
        path = preset.weights
    return path


# The seed of the CPU generator under which learned parts are built (their initial weights); see _build_learned_modules.
LEARNED_INIT_SEED = 0


def _build_learned_modules(model, adapter, cfg, weights_file) -> torch.nn.ModuleDict | None:
    """The reduction's learned parts as one ``ModuleDict`` (not yet attached), loaded from ``weights_file``.

    Untrained parts start from the same weights on every apply: each reducer's parts are built under the CPU
    generator seeded with :data:`LEARNED_INIT_SEED` (re-seeded per reducer, so a reducer's parts do not depend on
    what it is composed with; the caller's random state is restored afterwards), so a training run is
    reproducible from its trainer's ``seed`` alone.
    """
    modules = {}
    with torch.random.fork_rng(devices=[]):
        for reducer in cfg.iter_reducers():
            torch.manual_seed(LEARNED_INIT_SEED)
            modules.update(reducer.learned_modules(model, adapter))
    if not modules:
        return None
    holder = torch.nn.ModuleDict(modules)
    if weights_file is not None:
        load_side_car(holder, weights_file, cfg.method)
    return holder


_DTYPE_FAMILIES = {"floating": "a floating-point", "complex": "a complex", "bool": "a bool", "integer": "an integer"}


def _dtype_family(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def load_side_car(holder: torch.nn.Module, path: str, method: str) -> None:
    """Copy the tensors of ``token_reduction.safetensors`` at ``path`` into ``holder``, after checking all of them.

    Every tensor must exist under the expected name, with exactly the expected shape, in the same dtype
    family (a floating-point tensor may be cast to another floating dtype, e.g. one saved in bfloat16 loaded
    into a float32 model; an integer one must fit the expected integer dtype; nothing crosses families),
    and floating values must be finite. Raises :class:`~hf_tokred.errors.SideCarError` naming the file and
    the tensor; ``holder`` is only written once every tensor has passed.

    Example:
        >>> load_side_car(model.hf_tokred_modules, "saved/token_reduction.safetensors", "kvquant")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    def fail(message, tensor=None):
        return SideCarError(f"{path}: {message} ({WEIGHTS_NAME} holds the learned parts of the {method} reduction; "
                            "re-save it from the trained model, or load with token_reduction=False for the dense model)",
                            field=tensor)

    try:
        state = load_file(path)
    except Exception as err:  # safetensors raises SafetensorError/OSError/ValueError for damaged files
        raise fail(f"not a readable safetensors file ({type(err).__name__}: {err})") from None
    expected = holder.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"missing tensor(s) {', '.join(missing[:6])}" if missing else "",
                 f"unexpected tensor(s) {', '.join(unexpected[:6])}" if unexpected else ""]
        raise fail(f"{'; '.join(p for p in parts if p)}; the reduction expects {', '.join(sorted(expected)[:12])}",
                   (missing or unexpected)[0])
    converted = {}
    for name, target in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise fail(f"tensor {name!r} has shape {tuple(tensor.shape)}, the reduction expects {tuple(target.shape)}", name)
        have, want = _dtype_family(tensor.dtype), _dtype_family(target.dtype)
        if have != want:
            raise fail(f"tensor {name!r} is {tensor.dtype}, the reduction expects {_DTYPE_FAMILIES[want]} tensor "
                       f"({target.dtype})", name)
        if want == "integer" and tensor.numel():
            info = torch.iinfo(target.dtype)
            low, high = int(tensor.min()), int(tensor.max())
            if low < info.min or high > info.max:
                raise fail(f"tensor {name!r} holds values in [{low}, {high}], outside the range of its dtype "
                           f"{target.dtype}", name)
        value = tensor.to(dtype=target.dtype)
        if want in ("floating", "complex") and not bool(torch.isfinite(value).all()):
            raise fail(f"tensor {name!r} holds NaN or infinite values"
                       f"{' after the cast to ' + str(target.dtype) if tensor.dtype != target.dtype else ''}", name)
        converted[name] = value
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(converted[name].to(device=target.device))


# ---------------------------------------------------------------------------------------------
# KV policies: a cache per generate() call
# ---------------------------------------------------------------------------------------------


@register_wiring("kv_policy")
@register_wiring("kv_storage")
def _wire_kv_cache(model, adapter, reducer, applied) -> None:
    # Base models (LlamaModel) cannot generate: they use the cache through build_cache(). A policy and a
    # storage composed together share one override (the second install is the same method).
    # A prompt compressor composed with it installs its own generate(), which calls this one.
    install_generate(model, applied)
    if getattr(reducer, "needs_token_ids", False):
        handle = model.register_forward_pre_hook(_record_input_ids, with_kwargs=True)
        applied.add_undo(handle.remove)


def install_generate(model, applied) -> None:
    """Give ``model`` the ``generate()`` that builds a TokenReductionCache per call (KV and prefill stages), unless
    a prompt compressor is attached: its own ``generate()`` calls this one after compressing the prompt."""
    if model.can_generate() and applied.config.get("prompt") is None:
        model.generate = types.MethodType(_generate_with_reduction, model)


def _record_input_ids(module, args, kwargs):
    cache = cache_in(kwargs)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(cache, TokenReductionCache) and isinstance(input_ids, torch.Tensor):
        cache.record_input_ids(input_ids)


def build_cache(model, config: TokenReductionConfig | dict | None = None) -> TokenReductionCache:
    """A fresh :class:`TokenReductionCache` for ``model`` (for ``generate(past_key_values=...)``).

    ``config`` defaults to the KV policy attached with ``apply``/``from_pretrained``. A cache serves one
    ``generate`` call; passing it to a second one raises :class:`TokenReductionError`.

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
    if policy is None and storage is None and partial_prompt_reducer(cfg) is None:
        raise ConfigError(
            f"build_cache: {cfg.method} holds no KV policy, KV storage, prefill reducer or visual-token method "
            "(stages 'kv_policy', 'kv_storage', 'prefill', 'visual')",
            field="method",
        )
    if applied is None:
        raise TokenReductionError("build_cache: apply the reduction first (hf_tokred.apply) so attention can evict")
    return TokenReductionCache(model, policy, storage)


def compress_context(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     config: TokenReductionConfig | dict | None = None):
    """Prefill ``input_ids`` (a context shared by later questions) into a fresh cache and compress it.

    With a KV policy (or storage) the result is a :class:`TokenReductionCache`. With a context compressor
    attached (stage ``"context"``: ``gist``, ``icae``) it is a
    :class:`~hf_tokred.integration.wiring.CompressedContext`: the context as a few learned cache entries, asked
    with ``model.generate(torch.cat([ctx.prefix_ids, question_ids], -1), past_key_values=ctx.fresh_cache())``.

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
    applied = get_applied(model)
    cfg = TokenReductionConfig.coerce(config) if config is not None else applied.config if applied else None
    context = cfg.get("context") if cfg is not None else None
    if context is not None:  # gist tokens, ICAE: the context becomes a few learned cache entries
        if applied is None or applied.config.get("context") is None:
            raise TokenReductionError(f"compress_context: attach the {context.method} reduction first (hf_tokred.apply)")
        return context_compressor(context.wiring_key)(model, applied.config.get("context"), input_ids, attention_mask)
    cache = build_cache(model, config)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_KWARG: cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # only the cache is wanted
    with torch.no_grad():
        model(**kwargs)
    return cache


def _generate_with_reduction(self, *args, **kwargs):
    # KV policies and storages, and a prefill reducer (lazyllm, whose later layers hold part of the prompt), all
    # need a TokenReductionCache; TokenReductionCache reads the prefill reducer from the model itself.
    applied = get_applied(self)
    config = applied.config if applied is not None else None
    policy, storage = (config.get(stage) if config is not None else None for stage in ("kv_policy", "kv_storage"))
    prefill = partial_prompt_reducer(config) if config is not None else None
    label = "+".join(c.method for c in (prefill, policy, storage) if c is not None)
    generation_config = kwargs.get("generation_config") or self.generation_config
    use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
    cache = cache_in(kwargs)
    if label and cache is None and use_cache is not False:
        implementation = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
        if implementation is not None:
            # transformers would report "passing both cache_implementation and past_key_values", which the user
            # did not do: the cache below is ours.
            raise TokenReductionError(
                f"{label}: cache_implementation={implementation!r} (a generate() argument or set in the model's "
                "generation_config): a model with a KV or prefill reduction builds its own cache "
                "(a TokenReductionCache) for every generate() call, so it cannot use another cache implementation; "
                f"to decode densely, call hf_tokred.remove(model) or pass {CACHE_KWARG}=transformers.DynamicCache()"
            )
        cache = TokenReductionCache(self, policy, storage)
        with_cache(kwargs, cache)
    if not isinstance(cache, TokenReductionCache):
        return type(self).generate(self, *args, **kwargs)
    assisted = kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None
    if assisted and not cache.is_croppable:
        raise TokenReductionError(
            f"{cache.label}: assisted decoding takes back rejected draft tokens (Cache.crop), and this cache "
            f"evicts or compresses while decoding, so it cannot; a policy that compresses the prompt once "
            f"({', '.join(prompt_once_policies())}) works with it, or pass {CACHE_KWARG}=transformers.DynamicCache() "
            "to decode densely"
        )
    if getattr(cache, _CONSUMED, False):
        raise TokenReductionError(
            f"{getattr(cache, 'label', 'hf_tokred')}: this TokenReductionCache was already used by a generate() call "
            "and holds that call's tokens (possibly evicted), so reusing it would silently change the output; build a fresh cache with "
            "hf_tokred.build_cache(model) for every call, or keep the cache from hf_tokred.compress_context and pass "
            "copy.deepcopy(cache) to each generate()"
        )
    seen = cache.get_seq_length()
    previous = self.__dict__.get(_CANDIDATES)
    if assisted and seen == 0:
        self.__dict__[_CANDIDATES] = functools.partial(_prompt_before_drafts, _factory_in_place(self))
    prefix = skip_cached_prefix_once(self, cache) if assisted and seen else None
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        if prefix is not None:
            prefix.remove()
        if assisted and seen == 0:
            _restore_factory(self, previous)
        if cache.get_seq_length() != seen:  # a call that failed before feeding any token leaves it reusable
            setattr(cache, _CONSUMED, True)


_CANDIDATES = "_get_candidate_generator"


def _factory_in_place(model):
    """The candidate-generator factory assisted decoding would call now: the instance-level one a reduction
    installed, else the class's (bound to ``model``)."""
    return model.__dict__.get(_CANDIDATES) or types.MethodType(type(model)._get_candidate_generator, model)


def _restore_factory(model, previous) -> None:
    """Put back the instance-level factory ``previous`` (None: there was none, the class's applies again)."""
    if previous is None:
        model.__dict__.pop(_CANDIDATES, None)
    else:
        model.__dict__[_CANDIDATES] = previous


def _prompt_before_drafts(build, *args, **kwargs):
    """The model's candidate generator, made to propose nothing in its first round, so the first forward pass
    of assisted decoding carries the prompt alone, as plain ``generate()`` feeds it. A policy that compresses the
    prompt scores it in that pass: draft tokens fed with it (prompt lookup finds some in the prompt) would change
    what it keeps and could not be taken back exactly. ``build`` is the factory in place before."""
    generator = build(*args, **kwargs)
    drafting = generator.get_candidates
    rounds = 0

    def get_candidates(input_ids, *rest, **options):
        nonlocal rounds
        candidates, logits = drafting(input_ids, *rest, **options)
        rounds += 1
        return (input_ids, None) if rounds == 1 else (candidates, logits)

    generator.get_candidates = get_candidates  # on this generation's own generator object
    return generator


def skip_cached_prefix_once(model, cache):
    """Make the next forward pass of ``model`` over ``cache`` skip the prompt tokens the cache already holds; returns
    a handle whose ``remove()`` withdraws it (it withdraws itself after the model's next forward pass, whatever its
    cache). Asked twice for one cache before that pass (two reductions that both wrap assisted decoding), it slices
    once.

    transformers' assisted decoding (5.23-5.25) feeds its first forward pass the whole ``input_ids``, even when the
    cache passed to ``generate()`` already holds a prefix of them (a reused system prompt, a
    :func:`compress_context` cache); plain ``generate()`` slices that prefix off first. Fed again, the prefix's
    entries would sit in the cache twice (a ``DynamicCache``) or on top of its compressed copy (a
    ``TokenReductionCache``), and the output would no longer be plain ``generate()``'s. As plain ``generate()``
    does, a pass with a 2D ``attention_mask`` is sliced only when its ``input_ids`` are as long as the mask (the
    full sequence).

    Example:
        >>> handle = skip_cached_prefix_once(model, cache)                                 # doctest: +SKIP
        >>> model.generate(full_ids, past_key_values=cache, prompt_lookup_num_tokens=3)    # doctest: +SKIP
    """
    pending = cache.__dict__.get(_PENDING_SLICE)
    if pending is not None:
        return pending

    def hook(module, args, kwargs):
        handle.remove()
        ids, held = kwargs.get("input_ids"), cache.get_seq_length()
        mask = kwargs.get("attention_mask")
        full = mask is None or (mask.dim() == 2 and ids is not None and mask.shape[-1] == ids.shape[-1])
        if cache_in(kwargs) is not cache or args or ids is None or not held or ids.shape[-1] <= held \
                or not full:
            return None
        kwargs = {**kwargs, "input_ids": ids[:, held:]}
        for name in ("position_ids", "cache_position"):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.shape[-1] == ids.shape[-1]:
                kwargs[name] = value[..., held:]
        return args, kwargs

    hook_handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def withdraw():
        hook_handle.remove()
        cache.__dict__.pop(_PENDING_SLICE, None)

    handle = cache.__dict__[_PENDING_SLICE] = types.SimpleNamespace(remove=withdraw)
    return handle


def skip_cached_prefix_of_call(model, model_kwargs) -> None:
    """:func:`skip_cached_prefix_once` for the cache an assisted-decoding call got (``model_kwargs`` of
    ``_get_candidate_generator``), when it already holds tokens; a KV policy's ``generate()`` has asked already,
    and a cache is sliced once.

    Example:
        >>> skip_cached_prefix_of_call(model, {"past_key_values": cache})   # doctest: +SKIP
    """
    cache = cache_in(model_kwargs)
    if cache is not None and cache.get_seq_length():
        skip_cached_prefix_once(model, cache)


_PENDING_SLICE = "_hf_tokred_pending_prefix_slice"  # on a cache: the handle of its not yet run slicing hook


def wrap_candidate_factory(model, applied, wrap) -> None:
    """Replace ``model``'s instance-level ``_get_candidate_generator`` (what transformers' assisted decoding asks
    for its drafter) by ``wrap(previous)``: ``previous`` is the factory in place, another reduction's instance-level
    one or else the class's (bound to ``model``). Undone with the reduction.

    Example:
        >>> wrap_candidate_factory(model, applied, lambda previous: types.MethodType(my_factory, model))
        ... # doctest: +SKIP
    """
    previous = model.__dict__.get(_CANDIDATES)
    model.__dict__[_CANDIDATES] = wrap(_factory_in_place(model))
    applied.add_undo(lambda: _restore_factory(model, previous))


def install_prefix_slicing(model, applied) -> None:
    """Wrap ``model``'s candidate-generator factory so that assisted decoding over a cache that already holds part
    of the prompt (a context compressor's ``fresh_cache()``) feeds its first pass only the rest, as plain
    ``generate()`` does (:func:`skip_cached_prefix_once`); undone with the reduction.

    Example:
        >>> install_prefix_slicing(model, get_applied(model))   # by the gist and icae wiring   # doctest: +SKIP
    """
    if not model.can_generate():
        return

    def wrap(previous):
        def get_candidate_generator(self, *args, **kwargs):
            generator = previous(*args, **kwargs)
            skip_cached_prefix_of_call(self, kwargs.get("model_kwargs", args[4] if len(args) > 4 else None))
            return generator

        return types.MethodType(get_candidate_generator, model)

    wrap_candidate_factory(model, applied, wrap)


# ---------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained / push_to_hub
# ---------------------------------------------------------------------------------------------


def _from_pretrained(original, cls, pretrained_model_name_or_path, *model_args, token_reduction=None, **kwargs):
    # The user's argument may arrive here as a keyword, or (through AutoModel*/pipeline, whose AutoConfig keeps
    # keys config.json already has) on the config, wrapped by _config_from_dict as a UserRequest.
    if isinstance(token_reduction, UserRequest):
        token_reduction = token_reduction.config
    request = check_request(token_reduction, pretrained_model_name_or_path)
    given = kwargs.get("config")
    if request is None and isinstance(given, PretrainedConfig) and isinstance(given.__dict__.get("token_reduction"), UserRequest):
        request = given.__dict__["token_reduction"].config
    out = original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
    model = out[0] if isinstance(out, tuple) else out
    stored = model.config.__dict__.pop("token_reduction", None)
    if isinstance(stored, UserRequest):
        request, stored = (stored.config if request is None else request), None
    from_file = request is None and stored is not None
    if from_file:
        source = saved_config_path(pretrained_model_name_or_path, kwargs.get("subfolder"))
        request = config_from_saved(stored, source)
    if request is not None and request is not False:
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        # A reduction saved with the model must find its learned parts; a new one passed as an argument
        # starts them fresh unless the folder happens to hold them.
        apply_to_model(model, request, weights_from=pretrained_model_name_or_path, hub_kwargs=hub_kwargs,
                       weights_required=from_file)
    return out


def _config_from_dict(original, cls, config_dict, **kwargs):
    # AutoConfig.from_pretrained (run by AutoModel*.from_pretrained and by pipeline() with model_kwargs) passes
    # every keyword here, and this sets those that config.json already has on the config, then logs and
    # serializes it: a TokenReductionConfig there would make json.dumps fail, and a plain value could not be
    # told apart from one the file itself holds (which must be a dict, never a path). Wrap the user's.
    value = kwargs.get("token_reduction")
    if "token_reduction" in kwargs and not isinstance(value, UserRequest):
        if value is None:  # "not given", as for a model class: the file's reduction applies
            del kwargs["token_reduction"]
        else:
            kwargs["token_reduction"] = UserRequest.wrap(value, config_dict.get("_name_or_path") or "from_pretrained")
    return original(cls, config_dict, **kwargs)


def _save_pretrained(original, self, save_directory, *args, **kwargs):
    applied = get_applied(self)
    if applied is None:
        result = original(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            # save_pretrained owns these files: a folder re-used for a dense save must not keep a reduction
            # (hf_tokred.apply(model, folder) reads token_reduction_config.json) or learned parts from before.
            _remove_files(save_directory, (CONFIG_NAME, WEIGHTS_NAME))
        return result
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
        else:  # learned parts of an earlier reduction saved here would be loaded into this one
            _remove_files(save_directory, (WEIGHTS_NAME,))
    if push:
        return self.push_to_hub(repo_id or os.path.basename(os.path.normpath(save_directory)), **{
            k: kwargs[k] for k in ("token", "private", "commit_message") if k in kwargs})
    return result


def _remove_files(folder, names) -> None:
    for name in names:
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)


def _push_to_hub(original, self, repo_id, *args, token_reduction_results=None, **kwargs):
    if get_applied(self) is None:
        if token_reduction_results is not None:
            raise TokenReductionError("push_to_hub: token_reduction_results given but the model has no reduction")
        return original(self, repo_id, *args, **kwargs)
    from .hub import push_reduced_model

    return push_reduced_model(self, repo_id, results=token_reduction_results, **kwargs)


def install() -> None:
    """Wrap ``PreTrainedModel.from_pretrained``/``save_pretrained``/``push_to_hub`` and ``PretrainedConfig.from_dict`` (idempotent)."""
    if getattr(PreTrainedModel, "_hf_tokred_installed", False):
        return
    original_from = PreTrainedModel.from_pretrained.__func__
    original_save = PreTrainedModel.save_pretrained
    original_push = PreTrainedModel.push_to_hub
    original_config_from_dict = PretrainedConfig.__dict__["from_dict"].__func__

    @functools.wraps(original_from)
    def from_pretrained(cls, *args, **kwargs):
        return _from_pretrained(original_from, cls, *args, **kwargs)

    @functools.wraps(original_save)
    def save_pretrained(self, *args, **kwargs):
        return _save_pretrained(original_save, self, *args, **kwargs)

    @functools.wraps(original_push)
    def push_to_hub(self, *args, **kwargs):
        return _push_to_hub(original_push, self, *args, **kwargs)

    @functools.wraps(original_config_from_dict)
    def config_from_dict(cls, *args, **kwargs):
        return _config_from_dict(original_config_from_dict, cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    PreTrainedModel.save_pretrained = save_pretrained
    PreTrainedModel.push_to_hub = push_to_hub
    PretrainedConfig.from_dict = classmethod(config_from_dict)
    PreTrainedModel._hf_tokred_installed = True
    PreTrainedModel._hf_tokred_originals = (original_from, original_save, original_push)
    PretrainedConfig._hf_tokred_original_from_dict = original_config_from_dict
