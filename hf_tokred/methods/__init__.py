"""Every method, one file each; importing this package registers them all."""

from .diffusion import todo  # noqa: F401
from .encoder import tome  # noqa: F401
from .kv import streamingllm  # noqa: F401
