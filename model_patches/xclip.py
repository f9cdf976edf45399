"""X-CLIP (``XCLIPModel``): recognised so that sequence reducers refuse it with the reason, not as an unknown model.

X-CLIP's vision tower runs every frame as a separate image (the batch holds ``batch * frames`` images) and, in
every block, exchanges one *message token* per frame through a cross-frame attention (``XCLIPVisionEncoderLayer``:
``message_fc``, ``message_ln``, ``message_attn``), then a prompt generator and a multi-frame integration
transformer read the per-frame CLS tokens. A reducer that shortens each frame's sequence (ToMe, EViT, ...) would
need each image of the batch handled alike and would not touch the frame axis; TESTA's temporal aggregation needs
the frames in one sequence. Neither is wired yet, so the adapter states it (``unsupported``) and every sequence
reducer raises :class:`~hf_tokred.errors.UnsupportedModelError` with that reason.

Example:
    >>> from hf_tokred.model_patches.xclip import XCLIP
    >>> XCLIP.unsupported.startswith("its vision tower runs every frame as a separate image")
    True
"""

from . import register_adapter
from .encoder import EncoderAdapter

XCLIP = EncoderAdapter(
    name="xclip",
    kind="encoder",
    match=("xclip",),
    layers="vision_model.encoder.layers",
    attention="self_attn",
    protected_tokens=1,
    class_tokens=1,
    unsupported=("its vision tower runs every frame as a separate image and exchanges per-frame message tokens across "
                 "frames in every block; sequence reducers (and TESTA's frame merging) are not wired for that layout "
                 "yet; use VideoMAE (tome, testa, tokenlearner) or TimeSformer (tokenlearner)"),
    examples=("XCLIPModel",),
)
register_adapter(XCLIP)
