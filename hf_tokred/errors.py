"""Error types raised by hf_tokred.

Every error the package raises on bad input is a :class:`TokenReductionError`, so callers can catch
one type. The subclasses also derive from the built-in type a transformers user would expect
(``ValueError`` for bad values, ``ImportError`` for a missing package).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> from hf_tokred.errors import ConfigError
    >>> try:
    ...     TokenReductionConfig(method="streamingllm", window=-1)
    ... except ConfigError as err:
    ...     print(err.field)
    window
"""

from __future__ import annotations


class TokenReductionError(Exception):
    """Base class of every error hf_tokred raises on bad input."""


class ConfigError(TokenReductionError, ValueError):
    """A field of a token-reduction config is missing, of the wrong type or out of range.

    ``field`` names the offending field (dotted for nested configs) when there is one.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnknownMethodError(ConfigError):
    """The ``method`` key is not in the registry."""


class SideCarError(ConfigError):
    """``token_reduction.safetensors`` (the learned parts of a reduction) is unreadable or does not fit the reduction.

    The message names the file and, where one is at fault, the tensor; ``field`` is the tensor's name.
    """


class ArgumentError(ConfigError, TypeError):
    """A call got a keyword argument it does not take (also a ``TypeError``, as Python raises for one)."""


class UnsupportedModelError(TokenReductionError, ValueError):
    """A reducer was asked to act on a model or architecture it does not support."""


class MissingFileError(TokenReductionError, FileNotFoundError):
    """A file the reduction needs (config, side-car weights) is missing."""


class MissingDependencyError(TokenReductionError, ImportError):
    """An optional package needed for this feature is not installed."""
