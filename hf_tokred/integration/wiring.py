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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedModelError

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
