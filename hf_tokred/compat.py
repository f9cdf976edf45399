"""What differs between the transformers versions hf_tokred supports (5.23 to 5.25).

transformers 5.24 renamed the cache argument of every model's ``forward``, of ``generate()`` and of the model
outputs from ``past_key_values`` to ``cache``; the old name still works there until 5.40, with a deprecation
warning. hf_tokred passes and reads the cache under :data:`CACHE_KWARG`, the name the installed version uses,
and reads both names from a user's call (a ``generate(past_key_values=...)`` written for 5.23 keeps working).

Example:
    >>> from hf_tokred.compat import CACHE_KWARG, cache_in
    >>> CACHE_KWARG in ("cache", "past_key_values")
    True
    >>> cache_in({"past_key_values": "a cache"})
    'a cache'
"""

from __future__ import annotations

from typing import Any


def _installed_cache_kwarg() -> str:
    # generate() keeps its model-input cache under the first of these names (5.24+: "cache"; 5.23: "past_key_values").
    from transformers.generation.utils import ALL_CACHE_NAMES

    return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


CACHE_KWARG = _installed_cache_kwarg()
CACHE_KWARGS = tuple(dict.fromkeys((CACHE_KWARG, "past_key_values")))  # every name a call may carry the cache under


def cache_in(kwargs: dict[str, Any] | None) -> Any:
    """The cache a forward or ``generate()`` call got, under either name (None if it got none).

    Example:
        >>> cache_in({"input_ids": None})
        >>> cache_in({CACHE_KWARG: "a cache"})
        'a cache'
    """
    for name in CACHE_KWARGS:
        value = (kwargs or {}).get(name)
        if value is not None:
            return value
    return None


def with_cache(kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """``kwargs`` with ``cache`` under :data:`CACHE_KWARG` and no other cache name (in place; also returned).

    Example:
        >>> kwargs = with_cache({"past_key_values": None, "use_cache": True}, "a cache")
        >>> kwargs == {"use_cache": True, CACHE_KWARG: "a cache"}
        True
    """
    for name in CACHE_KWARGS:
        kwargs.pop(name, None)
    kwargs[CACHE_KWARG] = cache
    return kwargs


def output_cache(output: Any) -> Any:
    """The cache a model output or a ``generate()`` output holds (None if it holds none).

    Example:
        >>> from transformers.modeling_outputs import CausalLMOutputWithPast
        >>> output_cache(CausalLMOutputWithPast()) is None
        True
    """
    return getattr(output, CACHE_KWARG, None)
