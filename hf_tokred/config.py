"""`TokenReductionConfig`: the one object that says how a model keeps fewer tokens.

A config is a dataclass whose ``method`` string is both the registry key and the JSON
discriminator, as ``quant_method`` is for transformers' quantization configs. Calling the base class
with ``method=...`` returns the registered subclass::

    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="streamingllm", sink_tokens=4, window=252)
    >>> type(cfg).__name__, cfg.max_tokens
    ('StreamingLLMConfig', 256)
    >>> TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    True

A new method is one file with a ``@register_method("key")`` dataclass whose fields are declared
with :func:`param`, so that every field is validated with an error naming it and its allowed
values. Several reducers acting at different places compose with :func:`compose`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

from .errors import ConfigError, MissingFileError, UnknownMethodError

CONFIG_NAME = "token_reduction_config.json"
# A preset of a learned method says where its learned parts come from (see _preset_learned).
PRESET_LEARNED_KEY = "hf_tokred_learned"
WEIGHTS_NAME = "token_reduction.safetensors"
VERSION_KEY = "hf_tokred_version"

# Every integer in a config (a token count, a layer index, a seed) is at most this in magnitude: larger values
# are no budget a model can use, and unbounded Python ints overflow later, inside torch (int64) or float().
MAX_INT = 2**31 - 1
# Lists/dicts in a config are at most this many levels deep (a composition's reducers are 2 levels:
# a list of dicts). Checked iteratively before anything recurses into the value, so a hostile file
# cannot reach RecursionError.
MAX_DEPTH = 8

# Where a reducer acts. One config may hold at most one reducer per stage: two KV policies (or two
# sequence reducers) would fight over the same tokens, so composition rejects them.
# "context" compresses a whole context into a few learned cache entries or memory slots (gist tokens, ICAE);
# "decoding" drafts tokens for the model to verify (EAGLE).
STAGES = ("sequence", "visual", "prompt", "prefill", "context", "kv_policy", "kv_storage", "diffusion", "decoding")

# What a method's ``status`` class attribute may say, and what each means (``hf-tokred methods`` and the
# generated table of docs/methods.md print these). A method that declares no status is registered as
# "experimental": a status is a claim about evidence, so it is never inherited from the base class.
STATUSES = {
    "stable": "everything its issue asks for works, is tested, and its benchmark targets are met",
    "beta": "works and is tested on the architectures listed, but parts of its issue are open "
            "(more architectures, options, or benchmark targets)",
    "experimental": "implemented and tested for correctness, but it misses its benchmark targets on the "
                    "reference model, or it declares no status",
}

_REGISTRY: dict[str, type[TokenReductionConfig]] = {}


def register_method(key: str):
    """Class decorator that registers a config subclass under ``key``.

    The class's ``status`` must be one of :data:`STATUSES`; a class that declares none is "experimental".

    Example:
        >>> from dataclasses import dataclass
        >>> from hf_tokred.config import TokenReductionConfig, register_method, param
        >>> @register_method("my_method")
        ... @dataclass(kw_only=True)
        ... class MyConfig(TokenReductionConfig):
        ...     stage = "kv_policy"
        ...     strength: float = param(0.5, float, low=0.0, high=1.0, help="how hard to prune")
        >>> TokenReductionConfig(method="my_method", strength=0.2).strength
        0.2
        >>> MyConfig.status
        'experimental'
    """
    if not isinstance(key, str) or not key or not key.replace("_", "").isalnum():
        raise ValueError(f"register_method: key must be a non-empty identifier-like string, got {key!r}")

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, TokenReductionConfig)):
            raise TypeError("register_method decorates TokenReductionConfig subclasses")
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must be a @dataclass (put @register_method above @dataclass)")
        if cls.stage not in STAGES and cls.stage != "composition":
            raise TypeError(f"{cls.__name__}.stage must be one of {STAGES}, got {cls.stage!r}")
        if not any("status" in vars(base) for base in cls.__mro__ if base is not TokenReductionConfig):
            cls.status = "experimental"
        if not isinstance(cls.status, str) or cls.status not in STATUSES:
            raise TypeError(f"{cls.__name__}.status must be one of {', '.join(map(repr, STATUSES))}, got {cls.status!r}")
        previous = _REGISTRY.get(key)
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {key!r} is already registered by {previous.__qualname__}")
        cls.method_key = key
        _REGISTRY[key] = cls
        return cls

    return decorator


def registered_methods() -> dict[str, type[TokenReductionConfig]]:
    """Return a copy of the registry: method key -> config class.

    Example:
        >>> import hf_tokred
        >>> "streamingllm" in hf_tokred.registered_methods()
        True
    """
    return dict(_REGISTRY)


def _lookup(method: Any) -> type[TokenReductionConfig]:
    if not isinstance(method, str):
        raise ConfigError(
            f"method: expected a string naming a registered method ({', '.join(sorted(_REGISTRY))}), "
            f"got {type(method).__name__}",
            field="method",
        )
    try:
        return _REGISTRY[method]
    except KeyError:
        raise UnknownMethodError(
            f"method: unknown method {method!r}; registered methods are: {', '.join(sorted(_REGISTRY))}",
            field="method",
        ) from None


# ---------------------------------------------------------------------------------------------
# Field specifications
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """What values a config field accepts. Built by :func:`param`."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    optional: bool = False
    sequence: bool = False
    help: str = ""

    def describe(self) -> str:
        """Human-readable description of the allowed values, used in error messages."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = {int: "an int", float: "a number", bool: "a bool", str: "a string"}.get(self.kind, self.kind.__name__)
            if self.low is not None or self.high is not None:
                def fmt(bound):  # ints exactly (2147483647, not 2.14748e+09)
                    return str(bound) if isinstance(bound, int) else f"{bound:g}"

                lo = "-inf" if self.low is None else fmt(self.low)
                hi = "inf" if self.high is None else fmt(self.high)
                text += f" in {'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"
        if self.sequence:
            text = f"a list of {text.removeprefix('a ').removeprefix('an ')}"
        if self.optional:
            text += " or None"
        return text


def param(default, kind: type, *, low=None, high=None, low_open=False, high_open=False, choices=None,
          optional=False, sequence=False, help: str = ""):
    """Declare a validated config field (a ``dataclasses.field`` carrying a :class:`ParamSpec`).

    Whatever the declared range, every int in any field is at most :data:`MAX_INT` (``2**31 - 1``) in
    magnitude and lists/dicts nest at most :data:`MAX_DEPTH` levels deep; ``check()`` enforces both on
    every field, declared with ``param`` or not.

    Example:
        >>> from dataclasses import dataclass
        >>> from hf_tokred.config import param
        >>> @dataclass
        ... class Demo:
        ...     keep: float = param(0.5, float, low=0.0, high=1.0, low_open=True, help="fraction kept")
        >>> Demo().keep
        0.5
    """
    spec = ParamSpec(kind, low, high, low_open, high_open, tuple(choices) if choices else None, optional, sequence, help)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"spec": spec, "help": help})
    return field(default=default, metadata={"spec": spec, "help": help})


class _ShortRepr(reprlib.Repr):
    """``repr`` for error messages: bounded in depth and length, and safe for huge ints (Python refuses to
    print an int of more than 4300 digits, which would turn a ConfigError into a ValueError)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxstring, self.maxother = 3, 6, 6, 60, 60

    def repr_int(self, x, level):
        if x.bit_length() > 64:
            return f"an int of about {int(x.bit_length() * 0.30103) + 1} digits"
        return repr(x)


_short_repr = _ShortRepr().repr


def _show(value: Any) -> str:
    """A short, always-printable description of ``value`` for error messages."""
    try:
        shown = _short_repr(value)
    except Exception:  # a user object whose __repr__ fails must not hide the config error
        shown = f"a {type(value).__name__}"
    return shown if len(shown) < 80 else shown[:77] + "..."


def _check_bounds(name: str, value: Any, spec: ParamSpec | None, ints: bool = True) -> None:
    """Reject ints beyond :data:`MAX_INT` and lists/dicts nested beyond :data:`MAX_DEPTH` anywhere in a field value.

    Runs before any other check of the field, without recursion, so neither a huge int nor a deeply nested
    value can raise anything but :class:`ConfigError` later (in ``float()``, ``repr()``, or a method's
    ``validate``). Inside a nested config (a dict with a registered ``method``, e.g. a composition's part)
    the message gives that config's field range.
    """
    stack = [(value, name, 0, spec)]
    while stack:
        item, where, depth, item_spec = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, int):
            if ints and abs(item) > MAX_INT:
                raise ConfigError(
                    f"{where}: expected {_bounded_description(item_spec)}, got {_show(item)} (integers in a config "
                    "are bounded by hf_tokred.config.MAX_INT = 2**31 - 1)",
                    field=re.sub(r"(\[\d+\])+$", "", where),  # the field (or nested field), not the list item
                )
        elif isinstance(item, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                raise ConfigError(
                    f"{where}: lists and dicts in a config nest at most {MAX_DEPTH} levels deep "
                    "(hf_tokred.config.MAX_DEPTH)",
                    field=name,
                )
            if isinstance(item, dict):
                method = item.get("method")
                nested = _REGISTRY.get(method) if isinstance(method, str) else None
                specs = {} if nested is None else {f.name: f.metadata.get("spec") for f in dataclasses.fields(nested)}
                stack.extend((v, f"{where}.{k}" if isinstance(k, str) else where, depth + 1,
                              specs.get(k) if isinstance(k, str) else None) for k, v in item.items())
            else:
                if item_spec is not None and item_spec.sequence:  # the items of a list field are its scalars
                    item_spec = dataclasses.replace(item_spec, sequence=False, optional=False)
                stack.extend((v, f"{where}[{i}]", depth + 1, item_spec) for i, v in enumerate(item))


def _bounded_description(spec: ParamSpec | None) -> str:
    """What a field accepts, with an int field's open ends closed at :data:`MAX_INT`."""
    if spec is None:
        return f"ints of at most {MAX_INT} in magnitude"
    if spec.kind is int and spec.choices is None:
        low = -MAX_INT if spec.low is None else max(spec.low, -MAX_INT)
        high = MAX_INT if spec.high is None else min(spec.high, MAX_INT)
        return dataclasses.replace(spec, low=low, high=high).describe()
    return spec.describe()


def _check_scalar(name: str, value: Any, spec: ParamSpec):
    def fail():
        return ConfigError(f"{name}: expected {spec.describe()}, got {_show(value)}", field=name)

    kind = spec.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        try:
            value = float(value)
        except OverflowError:  # an int beyond the float range (10**400)
            raise fail() from None
        if not math.isfinite(value):
            raise fail()
    elif kind is str:
        if not isinstance(value, str):
            raise fail()
    elif not isinstance(value, kind):
        raise fail()
    if spec.choices is not None and value not in spec.choices:
        raise fail()
    if spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low)):
        raise fail()
    if spec.high is not None and (value > spec.high or (spec.high_open and value == spec.high)):
        raise fail()
    return value


def _check_field(name: str, value: Any, spec: ParamSpec):
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{name}: expected {spec.describe()}, got None", field=name)
    if spec.sequence:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected {spec.describe()}, got {_show(value)}", field=name)
        return [_check_scalar(f"{name}[{i}]", v, spec) for i, v in enumerate(value)]
    return _check_scalar(name, value, spec)


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TokenReductionConfig:
    """Base class of every token-reduction config; also the factory for them.

    ``TokenReductionConfig(method="key", **params)`` returns the subclass registered under ``key``.
    Subclasses declare their fields with :func:`param` and may override :meth:`validate` for checks
    across fields. Class attributes describe the method: ``stage`` (where it acts, one of
    :data:`STAGES`), ``wiring`` (the wiring function that attaches it, when it is not the stage's own),
    ``model_kinds`` (adapter kinds it supports, see ``hf_tokred.model_patches``),
    ``learned`` (has trainable parts), ``paper`` (arXiv id; the venue for a paper with no preprint) and ``status``.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="streamingllm", max_tokens=512)
        >>> cfg.to_dict()["method"]
        'streamingllm'
    """

    method: str | None = None

    stage: ClassVar[str] = ""
    # Two methods may act at one stage (so they cannot be composed) but be attached differently, as MrT5's
    # delete gate and an encoder's ToMe both shorten a sequence; such a method names its own wiring.
    wiring: ClassVar[str | None] = None
    model_kinds: ClassVar[tuple[str, ...]] = ()
    learned: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    status: ClassVar[str] = "stable"
    method_key: ClassVar[str | None] = None
    # Set on a config read from a preset of a learned method: a PresetLearned (shipped weights or how to train).
    preset_learned: ClassVar[Any] = None

    def __new__(cls, *args, **kwargs):
        if args:
            raise ConfigError(f"{cls.__name__} takes keyword arguments only (method=..., <field>=...)")
        target = _lookup(kwargs.get("method")) if cls is TokenReductionConfig else cls
        if cls is not TokenReductionConfig and cls.method_key is None:
            raise ConfigError(f"{cls.__name__} is not a registered method; use @register_method")
        allowed = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: not a field of method {target.method_key!r}; allowed fields: "
                f"{', '.join(sorted(allowed - {'method'}))}",
                field=unknown[0],
            )
        return object.__new__(target)

    def __post_init__(self):
        self.check()

    # -- validation -------------------------------------------------------------------------

    def check(self) -> TokenReductionConfig:
        """Validate every field (again) and return ``self``; raises :class:`ConfigError`.

        ``apply`` calls this, so a field changed after construction is still checked.
        """
        if self.method is None:
            self.method = self.method_key
        if self.method != self.method_key:
            raise ConfigError(
                f"method: {type(self).__name__} is registered as {self.method_key!r}, got {self.method!r}",
                field="method",
            )
        fields = [f for f in dataclasses.fields(self) if f.name != "method"]
        for f in fields:  # every field first, so that validate() below only sees bounded values
            value = getattr(self, f.name)
            if not isinstance(value, TokenReductionConfig):
                _check_bounds(f.name, value, f.metadata.get("spec"))
        for f in fields:
            spec = f.metadata.get("spec")
            if spec is not None:
                setattr(self, f.name, _check_field(f.name, getattr(self, f.name), spec))
        self.validate()
        return self

    def validate(self) -> None:
        """Checks across fields; override in subclasses and raise :class:`ConfigError`."""

    # -- structure --------------------------------------------------------------------------

    @property
    def wiring_key(self) -> str:
        """The key of the wiring function that attaches this reducer (``wiring``, else ``stage``)."""
        return type(self).wiring or self.stage

    def iter_reducers(self) -> list[TokenReductionConfig]:
        """The single-stage reducers this config holds (itself, or the parts of a composition)."""
        return [self]

    def get(self, stage: str) -> TokenReductionConfig | None:
        """The reducer acting at ``stage`` (e.g. ``"kv_policy"``), or None."""
        return next((r for r in self.iter_reducers() if r.stage == stage), None)

    def learned_modules(self, model, adapter) -> dict[str, Any]:
        """Trainable parts this reducer adds to ``model``: ``{name: nn.Module}``; none by default.

        ``apply`` attaches them as ``model.hf_tokred_modules[name]`` (so ``.to()``, Trainer, peft and
        ``device_map`` see them), keeps them out of ``model.safetensors`` and saves them to
        ``token_reduction.safetensors``. Place each module on the device of the layer it serves.
        """
        return {}

    def params(self) -> dict[str, Any]:
        """The user-set parameters (every field but ``method``), JSON-ready."""
        return {k: v for k, v in self.to_dict().items() if k != "method"}

    # -- serialization ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serializable dict; the inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {"method": self.method_key}
        for f in dataclasses.fields(self):
            if f.name == "method":
                continue
            value = getattr(self, f.name)
            if isinstance(value, TokenReductionConfig):
                value = value.to_dict()
            elif isinstance(value, (list, tuple)):
                value = [v.to_dict() if isinstance(v, TokenReductionConfig) else v for v in value]
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """The config as indented JSON, with the hf_tokred version that wrote it."""
        from . import __version__

        return json.dumps({**self.to_dict(), VERSION_KEY: __version__}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> TokenReductionConfig:
        """Build a config from a dict such as ``config.json["token_reduction"]``.

        Raises :class:`ConfigError` (never anything else) for any malformed input.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig.from_dict({"method": "streamingllm", "max_tokens": 64}).max_tokens
            64
        """
        if not isinstance(data, dict):
            raise ConfigError(f"token_reduction: expected a dict with a 'method' key, got {type(data).__name__}")
        _check_bounds("token_reduction", data, None, ints=False)  # depth only; each field bounds its ints
        data = dict(data)
        version = data.pop(VERSION_KEY, None)
        if version is not None and not isinstance(version, str):
            raise ConfigError(f"{VERSION_KEY}: expected a string, got {type(version).__name__}", field=VERSION_KEY)
        if "method" not in data:
            raise ConfigError(
                f"method: missing; expected one of {', '.join(sorted(_REGISTRY))}", field="method"
            )
        target = _lookup(data["method"])
        if cls is not TokenReductionConfig and not issubclass(target, cls):
            raise ConfigError(f"method: {data['method']!r} is not a {cls.__name__}", field="method")
        if not all(isinstance(k, str) for k in data):
            raise ConfigError("token_reduction: every key must be a string")
        return target(**data)

    @classmethod
    def coerce(cls, value: Any) -> TokenReductionConfig:
        """Turn a config, a dict, or a preset/path/repo name into a validated config.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig.coerce({"method": "streamingllm", "max_tokens": 32}).method
            'streamingllm'
        """
        if isinstance(value, TokenReductionConfig):
            return value.check()
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            return cls.from_pretrained(value)
        raise ConfigError(
            "token_reduction: expected a TokenReductionConfig, a dict, a preset name or a path, "
            f"got {type(value).__name__}"
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``token_reduction_config.json`` into ``save_directory`` and return its path.

        Example:
            >>> import tempfile
            >>> from hf_tokred import TokenReductionConfig
            >>> d = tempfile.mkdtemp()
            >>> _ = TokenReductionConfig(method="streamingllm", max_tokens=64).save_pretrained(d)
            >>> TokenReductionConfig.from_pretrained(d).max_tokens
            64
        """
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs) -> TokenReductionConfig:
        """Load a config from a folder, a JSON file, a ``hub_configs/`` preset or a Hub repo.

        Preset names are the Hub model id followed by the purpose, e.g.
        ``"HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512"`` (see :func:`list_presets`). A Hub
        repo must hold ``token_reduction_config.json``; ``hub_kwargs`` (``revision``, ``token``,
        ``cache_dir``, ``subfolder``...) go to ``huggingface_hub.hf_hub_download``.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> cfg = TokenReductionConfig.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512")
            >>> cfg.max_tokens
            512
        """
        name = os.fspath(name_or_path)
        if os.path.isdir(name):
            path = os.path.join(name, hub_kwargs.get("subfolder") or "", CONFIG_NAME)
            if not os.path.isfile(path):
                raise MissingFileError(f"{path} does not exist: {name} holds no {CONFIG_NAME}")
            return cls._from_json_file(path)
        if os.path.isfile(name):
            return cls._from_json_file(name)
        preset = _preset_path(name)
        if preset is not None:
            return cls._from_json_file(preset, preset_name=name.removesuffix(".json"))
        if name.count("/") > 1:  # "org/model/purpose" can only be a preset, never a Hub repo id
            raise MissingFileError(
                f"{name!r} is not a folder, a file or a preset; presets are: {', '.join(list_presets())}"
            )
        return cls._from_json_file(_download(name, CONFIG_NAME, hub_kwargs))

    @classmethod
    def _from_json_file(cls, path: str, preset_name: str | None = None) -> TokenReductionConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            # RecursionError: json's decoder on a file nested thousands of levels deep
            raise ConfigError(f"{path}: not a readable JSON token-reduction config ({type(err).__name__}: {err})") from None
        learned = data.pop(PRESET_LEARNED_KEY, None) if preset_name is not None and isinstance(data, dict) else None
        try:
            cfg = cls.from_dict(data)
            if learned is not None or (preset_name is not None and cfg.learned):
                cfg.preset_learned = _preset_learned(learned, path, preset_name, cfg)
            return cfg
        except ConfigError as err:
            raise type(err)(f"{path}: {err}", field=err.field) from None

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    revision: str | None = None, commit_message: str | None = None):
        """Upload ``token_reduction_config.json`` to a Hub repo (created if needed).

        Use it to publish a reduction recipe on its own; a model's ``push_to_hub`` uploads the
        config together with the weights and a model card.

        Example:
            >>> cfg = TokenReductionConfig(method="streamingllm", max_tokens=512)  # doctest: +SKIP
            >>> cfg.push_to_hub("me/smollm2-streaming-512")                       # doctest: +SKIP
        """
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        operation = CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=self.to_json_string().encode())
        return api.create_commit(repo_id, operations=[operation], revision=revision,
                                 commit_message=commit_message or f"Upload {self.method_key} token-reduction config")


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------


@register_method("composed")
@dataclass(kw_only=True)
class ComposedConfig(TokenReductionConfig):
    """Several reducers acting at different stages, e.g. a sequence reducer plus a KV policy.

    Each stage holds at most one reducer; two KV policies are rejected. Build one with
    :func:`compose`.

    Example:
        >>> from hf_tokred import TokenReductionConfig, compose
        >>> cfg = compose({"method": "streamingllm", "max_tokens": 64})
        >>> [r.method for r in cfg.iter_reducers()]
        ['streamingllm']
    """

    stage: ClassVar[str] = "composition"
    status: ClassVar[str] = "beta"  # KV policy + storage runs and is benchmarked; cross-family parts need the VLM family
    reducers: list = field(default_factory=list)

    def validate(self) -> None:
        if not isinstance(self.reducers, (list, tuple)) or not self.reducers:
            raise ConfigError("reducers: expected a non-empty list of configs", field="reducers")
        parts, seen = [], {}
        for i, item in enumerate(self.reducers):
            # Refused before parsing the part: a composition nested in a composition would otherwise be parsed
            # (recursively, to any depth) only to be rejected afterwards.
            if isinstance(item, ComposedConfig) or (isinstance(item, dict) and item.get("method") == self.method_key):
                raise ConfigError(f"reducers[{i}]: compositions cannot be nested", field=f"reducers[{i}]")
            try:
                part = item.check() if isinstance(item, TokenReductionConfig) else TokenReductionConfig.from_dict(item)
            except ConfigError as err:
                raise ConfigError(f"reducers[{i}].{err}", field=f"reducers[{i}].{err.field or ''}".rstrip(".")) from None
            if isinstance(part, ComposedConfig):  # a registered subclass of the composition
                raise ConfigError(f"reducers[{i}]: compositions cannot be nested", field=f"reducers[{i}]")
            if part.stage in seen:
                raise ConfigError(
                    f"reducers: {seen[part.stage]!r} and {part.method!r} both act at stage {part.stage!r}; "
                    "a composition holds at most one reducer per stage",
                    field="reducers",
                )
            seen[part.stage] = part.method
            parts.append(part)
        self.reducers = parts

    def iter_reducers(self) -> list[TokenReductionConfig]:
        return list(self.reducers)

    @property
    def model_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        kinds = None
        for r in self.reducers:
            kinds = set(r.model_kinds) if kinds is None else kinds & set(r.model_kinds)
        return tuple(sorted(kinds or ()))

    @property
    def learned(self) -> bool:  # type: ignore[override]
        return any(r.learned for r in self.reducers)


def compose(*configs: TokenReductionConfig | dict) -> TokenReductionConfig:
    """Combine reducers that act at different stages into one config.

    Example:
        >>> from hf_tokred import compose
        >>> compose({"method": "streamingllm", "max_tokens": 64}).method
        'composed'
    """
    return ComposedConfig(reducers=list(configs))


# ---------------------------------------------------------------------------------------------
# Presets and Hub files
# ---------------------------------------------------------------------------------------------


def _presets_root():
    return resources.files("hf_tokred.hub_configs")


def list_presets() -> list[str]:
    """Names of the JSON presets in ``hub_configs/``, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512``.

    Example:
        >>> from hf_tokred import list_presets
        >>> "HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512" in list_presets()
        True
    """
    names = []

    def walk(node, prefix):
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith(("_", ".")):
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".json"):
                names.append(prefix + child.name[: -len(".json")])

    walk(_presets_root(), "")
    return sorted(names)


def _preset_path(name: str) -> str | None:
    parts = name.removesuffix(".json").split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    node = _presets_root()
    for p in parts[:-1]:
        node = node / p
    node = node / f"{parts[-1]}.json"
    return os.fspath(node) if node.is_file() else None


def _preset_learned(learned: Any, path: str, name: str, cfg: TokenReductionConfig) -> PresetLearned:
    """Where a preset of a learned method gets its learned parts: the ``"hf_tokred_learned"`` entry of its JSON.

    ``{"weights": "<file>.safetensors"}`` names trained parts shipped beside the JSON (small ones only);
    ``{"train": "<command>"}`` says how to train them (they are too large to ship). A preset of a learned method
    must have one of the two, so that applying it never silently starts from untrained parts.
    """
    if not cfg.learned:
        raise ConfigError(f"{PRESET_LEARNED_KEY}: {cfg.method} has no learned parts; remove the entry",
                          field=PRESET_LEARNED_KEY)
    if not (isinstance(learned, dict) and len(learned) == 1 and set(learned) <= {"weights", "train"}
            and isinstance(next(iter(learned.values())), str)):
        raise ConfigError(f'{PRESET_LEARNED_KEY}: a preset of the learned method {cfg.method} needs {{"weights": '
                          f'"<file>.safetensors"}} (trained parts shipped beside it) or {{"train": "<command>"}} (how '
                          f"to train them), got {learned!r}", field=PRESET_LEARNED_KEY)
    if "train" in learned:
        return PresetLearned(name, train=learned["train"])
    weights = learned["weights"]
    full = os.path.join(os.path.dirname(path), weights)
    if os.path.basename(weights) != weights or not weights.endswith(".safetensors") or not os.path.isfile(full):
        raise ConfigError(f"{PRESET_LEARNED_KEY}: weights must name a .safetensors file beside the preset, got "
                          f"{weights!r}", field=PRESET_LEARNED_KEY)
    return PresetLearned(name, weights=full)


@dataclass(frozen=True)
class PresetLearned:
    """Where the learned parts of a config read from a preset come from (see :func:`_preset_learned`)."""

    preset: str
    weights: str | None = None
    train: str | None = None


def _download(repo_id: str, filename: str, hub_kwargs: dict) -> str:
    """Resolve ``filename`` in a Hub repo (or the local HF cache when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    allowed = {"revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download"}
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as err:
        raise MissingFileError(
            f"could not find {filename} for {repo_id!r}: it is not a local folder, not a preset "
            f"(see hf_tokred.list_presets()), and the Hub lookup failed ({type(err).__name__})"
        ) from None
