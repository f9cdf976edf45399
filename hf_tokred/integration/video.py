"""Wiring of TESTA (``hf_tokred.methods.encoder.testa``) on video encoders: the encoder sequence wiring, told
the frame layout.

TESTA is an ordinary sequence reducer (its ``plan`` returns merges that the sequence wiring of
:mod:`hf_tokred.integration.encoders` applies, with sizes, proportional attention and ``restore_length``); it
only needs to know how many tokens one frame holds, which the video adapter
(:class:`~hf_tokred.model_patches.videomae.VideoEncoderAdapter`) says. This wiring checks the model, hands the
reducer that number, and installs the sequence wiring.

Example:
    >>> model = hf_tokred.apply(videomae, {"method": "testa", "temporal_r": 1, "spatial_r": 8})   # doctest: +SKIP
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .wiring import register_wiring, wiring_for

# Video encoders whose attention takes any token layout (joint space-time attention).
TESTA_ADAPTERS = ("videomae",)


@register_wiring("testa")
def wire_testa(model, adapter, reducer, applied) -> None:
    """Check the model is a supported video encoder, tell TESTA its frame size, and install the sequence wiring.

    Example:
        >>> model = hf_tokred.apply(videomae, {"method": "testa"})   # doctest: +SKIP
    """
    name = getattr(adapter, "name", "?")
    if name not in TESTA_ADAPTERS:
        raise UnsupportedModelError(
            f"{reducer.method} cannot act on {type(model).__name__} ({name}): TESTA merges frames and tokens across "
            f"frames of a video encoder with joint space-time attention ({', '.join(TESTA_ADAPTERS)}); TimeSformer's "
            "divided attention reshapes by a fixed frame count and XCLIP's vision tower runs frames as separate images")
    reducer._frame_tokens = adapter.frame_tokens(model)
    wiring_for("sequence")(model, adapter, reducer, applied)


__all__ = ["wire_testa"]
