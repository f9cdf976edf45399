"""Every method, one file each; importing this package registers them all."""

from .kv import streamingllm  # noqa: F401
