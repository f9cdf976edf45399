"""hf_tokred: token reduction for Hugging Face transformers and diffusers models.

``import hf_tokred`` registers the reduction-aware attention functions and wraps
``from_pretrained``/``save_pretrained`` (of transformers models and diffusers pipelines) so that a
``token_reduction=`` argument works and saved reductions come back on load.

Example:
    >>> import hf_tokred
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="streamingllm", sink_tokens=4, max_tokens=512)
    >>> model = AutoModelForCausalLM.from_pretrained(repo, token_reduction=cfg)   # doctest: +SKIP
    >>> model.generate(**inputs)                     # uses a compressed cache   # doctest: +SKIP
"""

__version__ = "0.1.0"

from . import methods  # noqa: F401  (registers every method)
from .attention import register as _register_attention
from .calibration import calibrate
from .config import TokenReductionConfig, compose, list_presets, register_method, registered_methods
from .errors import (
    ConfigError,
    MissingDependencyError,
    MissingFileError,
    TokenReductionError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .integration import apply, build_cache, compress_context, install, remove
from .integration.eagle import eagle_assistant
from .integration.eagle_tree import eagle_tree_decoding
from .kv.cache import TokenReductionCache
from .prompt import compress_prompt

_register_attention()
install()

__all__ = [
    "ConfigError",
    "MissingDependencyError",
    "MissingFileError",
    "TokenReductionCache",
    "TokenReductionConfig",
    "TokenReductionError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "apply",
    "build_cache",
    "calibrate",
    "compress_context",
    "compress_prompt",
    "compose",
    "eagle_assistant",
    "eagle_tree_decoding",
    "list_presets",
    "register_method",
    "registered_methods",
    "remove",
]
