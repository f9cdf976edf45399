"""Every method, one file each; importing this package registers them all."""

from .diffusion import todo  # noqa: F401
from .encoder import tome  # noqa: F401
from .kv import fastgen  # noqa: F401
from .kv import h2o  # noqa: F401
from .kv import keydiff  # noqa: F401
from .kv import pyramidkv  # noqa: F401
from .kv import scissorhands  # noqa: F401
from .kv import snapkv  # noqa: F401
from .kv import streamingllm  # noqa: F401
from .kv import tova  # noqa: F401
