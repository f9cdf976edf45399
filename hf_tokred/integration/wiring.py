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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, MissingFileError, UnsupportedModelError

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


def get_applied(model) -> AppliedReduction | None:
    """The :class:`AppliedReduction` of a reduced model, or None."""
    return getattr(model, STATE_ATTR, None)


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


def config_from_saved(stored, config_file: str):
    """Parse a reduction saved in a model's config file; errors name the file and the dense fallback."""
    from ..config import TokenReductionConfig

    try:
        return TokenReductionConfig.coerce(stored)
    except ConfigError as err:
        raise type(err)(f"{config_file}: token_reduction: {err} ({DENSE_HINT})", field=err.field) from None
    except MissingFileError as err:
        raise MissingFileError(f"{config_file}: token_reduction: {err} ({DENSE_HINT})") from None
