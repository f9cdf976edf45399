"""What `apply` did to a model, and the per-stage wiring functions that do it.

Each stage (see :data:`hf_tokred.config.STAGES`) that can act on a model registers one function
``wire(model, adapter, reducer, applied)`` with :func:`register_wiring`. A wiring function installs
hooks or attention observers and records how to undo them in ``applied.undo`` so that ``remove()``
restores the model exactly. Wiring for a stage lives in the integration module for that kind of
model (``transformers.py`` for KV policies, ``encoders.py`` for sequence reducers, ``diffusers.py``
for diffusion), never in a method file.

Example:
    >>> from hf_tokred.integration.wiring import wiring_for
    >>> callable(wiring_for("kv_policy"))
    True
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, MissingFileError, TokenReductionError, UnsupportedModelError

STATE_ATTR = "_hf_tokred_applied"
MODULES_ATTR = "hf_tokred_modules"


@dataclass
class AppliedReduction:
    """Record kept on a reduced model (``model._hf_tokred_applied``): the config and how to undo it."""

    config: Any
    adapter: Any
    undo: list[Callable[[], None]] = field(default_factory=list)
    previous_attn_implementation: str | None = None

    def add_undo(self, fn: Callable[[], None]) -> None:
        """Register a callable run (last added first) by ``remove()``."""
        self.undo.append(fn)

    def run_undo(self) -> None:
        while self.undo:
            self.undo.pop()()


_WIRING: dict[str, Callable] = {}


def register_wiring(stage: str):
    """Decorator registering the function that attaches reducers of ``stage`` to a model."""

    def decorator(fn):
        _WIRING[stage] = fn
        return fn

    return decorator


def wiring_for(stage: str) -> Callable:
    """The wiring function for ``stage``, or raise :class:`UnsupportedModelError`."""
    try:
        return _WIRING[stage]
    except KeyError:
        raise UnsupportedModelError(f"reducers of stage {stage!r} cannot be attached to a model yet") from None


_CONTEXT_COMPRESSORS: dict[str, Callable] = {}


def register_context_compressor(key: str):
    """Decorator registering how a reducer of stage ``"context"`` (gist tokens, ICAE) compresses a context.

    The function ``compress(model, reducer, input_ids, attention_mask) -> CompressedContext`` is what
    :func:`hf_tokred.compress_context` calls when the attached reduction holds a reducer whose ``wiring_key`` is
    ``key``.
    """

    def decorator(fn):
        _CONTEXT_COMPRESSORS[key] = fn
        return fn

    return decorator


def context_compressor(key: str) -> Callable:
    """The function registered with :func:`register_context_compressor` for ``key``."""
    try:
        return _CONTEXT_COMPRESSORS[key]
    except KeyError:
        raise UnsupportedModelError(f"no context compressor is registered for {key!r}") from None


@dataclass
class CompressedContext:
    """A context compressed into a few cache entries (gist tokens' KV, ICAE's memory slots), to reuse across calls.

    ``cache`` holds ``prefix_ids.shape[1]`` entries per layer and row; ``prefix_ids`` are the ids that stand for
    them in ``generate``'s ``input_ids`` (``generate`` feeds only the ids after the cached ones), so a question is
    asked with ``model.generate(torch.cat([ctx.prefix_ids, question_ids], -1), past_key_values=ctx.fresh_cache())``.
    ``context_tokens`` is the number of real context tokens per row it stands for.
    """

    cache: Any
    prefix_ids: Any
    context_tokens: list[int]
    method: str

    @classmethod
    def of(cls, model, cache, entries: int, input_ids, attention_mask, method: str) -> CompressedContext:
        """The compressed context of ``input_ids`` (``attention_mask``: which are real tokens; None: all): ``cache``
        holding ``entries`` entries per row, each standing in ``prefix_ids`` as :func:`placeholder_id`.

        Example:
            >>> ctx = CompressedContext.of(model, cache, 4, input_ids, None, "icae")             # doctest: +SKIP
            >>> ctx.prefix_ids.shape                                                            # doctest: +SKIP
            torch.Size([1, 4])
        """
        import torch

        prefix = torch.full((input_ids.shape[0], entries), placeholder_id(model), dtype=torch.long,
                            device=input_ids.device)
        real = attention_mask.sum(1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(prefix)
        return cls(cache=cache, prefix_ids=prefix, context_tokens=[int(n) for n in real], method=method)

    def fresh_cache(self):
        """A copy of the cache for one ``generate`` call (generation appends to the cache it is given)."""
        import copy

        return copy.deepcopy(self.cache)

    @property
    def entries(self) -> int:
        """Cache entries per row and layer."""
        return int(self.prefix_ids.shape[1])


def placeholder_id(model) -> int:
    """The id standing for a compressed entry in ``prefix_ids``: the smallest id that is no pad, end or start token
    (``generate`` feeds only the ids after the cached ones, and a pad id there would make it mask the cached
    entries out when no attention mask is given).

    Example:
        >>> placeholder_id(model)                     # SmolLM2: 0, 1 and 2 are special           # doctest: +SKIP
        3
    """
    special = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if value is None:
                continue
            special.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return next(i for i in range(len(special) + 1) if i not in special)


def get_applied(model) -> AppliedReduction | None:
    """The :class:`AppliedReduction` of a reduced model, or None."""
    return getattr(model, STATE_ATTR, None)


def swap_reduction(target, attach, remove, adapter, cfg, modules) -> None:
    """Attach ``cfg`` to ``target`` in place of the reduction it carries, all or nothing.

    ``attach(target, adapter, cfg, modules)`` wires a reduction (and undoes itself when it fails); ``remove(target)``
    takes one off. If attaching the new reduction fails, the previous one goes back with its own learned modules;
    if even that fails, the target is left dense. The first error is raised either way. Shared by the transformers
    and diffusers integrations.

    Example:
        >>> swap_reduction(model, _attach, remove_from_model, adapter, cfg, modules)        # doctest: +SKIP
    """
    previous = get_applied(target)
    previous_modules = target._modules.get(MODULES_ATTR)
    if previous is not None:
        remove(target)
    try:
        attach(target, adapter, cfg, modules)
    except BaseException:
        if previous is not None:
            try:
                attach(target, previous.adapter, previous.config, previous_modules)
            except Exception:  # the first error is the one to report
                remove(target)
        raise


def attached_reducer(model, stage: str, cls, how: str):
    """The reducer of ``stage`` attached to ``model`` when it is a ``cls``; else a :class:`TokenReductionError`
    saying how to attach one (``how``: the call, e.g. ``"hf_tokred.apply(model, {'method': 'gist'})"``).

    Example:
        >>> attached_reducer(model, "context", GistConfig, "hf_tokred.apply(...)")          # doctest: +SKIP
    """
    applied = get_applied(model)
    reducer = applied.config.get(stage) if applied is not None else None
    if not isinstance(reducer, cls):
        raise TokenReductionError(f"{cls.method_key}: the model has no {cls.method_key} reduction attached; apply one "
                                  f"first ({how})")
    return reducer


class OneCallAtATime:
    """Refuses a forward call from a second thread while another thread's call of the same model runs.

    Some reductions keep the state of the running forward pass on the model: sequence reducers (ToMe and
    the other encoder methods, ``hf_tokred.integration.encoders.SequenceState``) and diffusion reducers (the
    token grid and the matchings of ``hf_tokred.integration.diffusers``). A second thread would overwrite it
    halfway through the first thread's pass and both would silently get wrong outputs, so the second call
    is refused instead. Nested calls from the same thread are allowed. (KV reductions keep their state in
    the cache each call builds and need no guard.)
    """

    def __init__(self, label: str):
        self.label = label
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.local = threading.local()

    def __reduce__(self):
        # copy.deepcopy(model) and pickling copy the hooks: a copy gets a fresh guard (a lock cannot be copied).
        return type(self), (self.label,)

    def enter(self, module, args, kwargs):
        me = threading.get_ident()
        with self.lock:
            if self.owner is not None and self.owner != me:
                raise TokenReductionError(
                    f"{self.label}: concurrent calls of one reduced {type(module).__name__} from several threads are "
                    "not supported for this reduction (it keeps the state of the running forward pass on the model); "
                    "give each thread its own model (load it again, or hf_tokred.apply the reduction to a copy of the "
                    "dense model) or serialize the calls with a lock"
                )
            self.owner = me
        self.local.depth = getattr(self.local, "depth", 0) + 1

    def exit(self, module, args, kwargs, output):
        depth = getattr(self.local, "depth", 0)
        if depth == 0:  # enter() refused this call (always_call hooks run even then)
            return None
        self.local.depth = depth - 1
        if depth == 1:
            with self.lock:
                self.owner = None
        return None


def guard_concurrent_calls(model, label: str, applied: AppliedReduction) -> None:
    """Install a :class:`OneCallAtATime` on ``model`` (plain torch hooks, removed by ``remove()``)."""
    guard = OneCallAtATime(label)
    pre = model.register_forward_pre_hook(guard.enter, with_kwargs=True)
    post = model.register_forward_hook(guard.exit, with_kwargs=True, always_call=True)
    applied.add_undo(pre.remove)
    applied.add_undo(post.remove)


DENSE_HINT = "load with token_reduction=False for the dense model"


def check_request(token_reduction, source):
    """Validate a ``from_pretrained(..., token_reduction=...)`` argument before anything is loaded.

    Returns None (not given), False (load dense) or a validated config; raises :class:`ConfigError`
    naming the source.

    Example:
        >>> check_request({"method": "streamingllm", "max_tokens": 8}, "repo").max_tokens
        8
    """
    from ..config import TokenReductionConfig

    if token_reduction is None or token_reduction is False:
        return token_reduction
    if token_reduction is True:
        raise ConfigError(
            "token_reduction: expected a TokenReductionConfig, a dict, a preset name, or False for a dense model; got True",
            field="token_reduction",
        )
    try:
        return TokenReductionConfig.coerce(token_reduction)
    except ConfigError as err:
        raise type(err)(f"the token_reduction argument for {source}: {err}", field=err.field) from None


def saved_config_path(source, subfolder: str | None = None) -> str:
    """The ``config.json`` a model was loaded from (a local path, or ``repo/sub/config.json``), for messages.

    Example:
        >>> saved_config_path("me/model", "unet")
        'me/model/unet/config.json'
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        return os.path.join(source, subfolder or "", "config.json")
    return "/".join(p for p in (source, subfolder, "config.json") if p)


def config_from_saved(stored, config_file: str, key: str = "token_reduction"):
    """Parse a reduction saved in a model's config file; errors name the file and the dense fallback.

    A checkpoint carries its reduction inline, as a dict (``save_pretrained`` writes nothing else). A
    string is accepted only when it names one of the package's own presets (:func:`hf_tokred.list_presets`):
    a path or a Hub repo id found in a downloaded file is never opened or fetched (it would read files of
    this machine, or download without the load's revision and token). ``None``/``False`` mean dense.

    Example:
        >>> config_from_saved({"method": "streamingllm", "max_tokens": 8}, "me/model/config.json").max_tokens
        8
        >>> try:
        ...     config_from_saved("/etc/passwd", "me/model/config.json")
        ... except ConfigError as err:
        ...     print("refused:", err.field)
        refused: token_reduction
    """
    from ..config import TokenReductionConfig, _preset_path, list_presets

    if stored is None or stored is False:
        return stored
    if isinstance(stored, str):
        preset = _preset_path(stored) if stored in list_presets() else None
        if preset is None:
            raise ConfigError(
                f"{config_file}: {key}: could not find {stored!r} among hf_tokred's presets "
                "(hf_tokred.list_presets()); a saved checkpoint holds its reduction inline as a dict, and a path or "
                f"Hub repo id in it is never followed ({DENSE_HINT}, or pass the reduction yourself with "
                "token_reduction=...)",
                field=key,
            )
        stored = TokenReductionConfig._from_json_file(preset, preset_name=stored)
    try:
        return TokenReductionConfig.coerce(stored)
    except ConfigError as err:
        raise type(err)(f"{config_file}: {key}: {err} ({DENSE_HINT})", field=err.field) from None
    except MissingFileError as err:
        raise MissingFileError(f"{config_file}: {key}: {err} ({DENSE_HINT})") from None


class UserRequest(dict):
    """The user's own ``token_reduction=`` argument while it rides on a transformers config.

    ``AutoModel*.from_pretrained`` and ``pipeline(model_kwargs=...)`` hand every keyword to ``AutoConfig``,
    which sets it on the config when ``config.json`` already has that key, and then logs and serializes the
    config. So the argument is put there as this dict subclass: JSON writes it as the config's dict (a
    ``TokenReductionConfig`` object would make ``json.dumps`` fail), and no ``config.json`` can produce the
    type, so the argument is never mistaken for a reduction saved in the file (a string there is refused,
    see :func:`config_from_saved`; the user's own may be a path, preset or repo id).

    Example:
        >>> request = UserRequest.wrap({"method": "streamingllm", "max_tokens": 8}, "me/model")
        >>> request["method"], request.config.max_tokens
        ('streamingllm', 8)
    """

    config = None

    @classmethod
    def wrap(cls, value, source):
        """Validate ``value`` as :func:`check_request` does; a config comes back wrapped, None/False as they are."""
        config = check_request(value, source)
        if config is None or config is False:
            return config
        request = cls(config.to_dict())
        request.config = config
        return request
