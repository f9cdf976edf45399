"""Every method, one file each; importing this package registers them all."""

from .encoder import tome  # noqa: F401
from .kv import streamingllm  # noqa: F401
