"""Wiring of the prompt stage (``llmlingua``, ``longllmlingua``): not attachable to a model yet.

Prompt compressors rewrite prompt text and are used through :func:`hf_tokred.compress_prompt`. Until
``generate()``/``pipeline()`` compress their prompt themselves, attaching one (``hf_tokred.apply``,
``from_pretrained(token_reduction=...)``) refuses with a message that names ``compress_prompt``, instead of
silently doing nothing; ``apply`` leaves the model as it was.

Example:
    >>> import hf_tokred
    >>> from hf_tokred.integration.wiring import wiring_for
    >>> wiring_for("prompt").__name__
    'refuse_prompt_stage'
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .wiring import register_wiring


@register_wiring("prompt")
def refuse_prompt_stage(model, adapter, reducer, applied) -> None:
    """Refuse to attach a prompt compressor, naming :func:`hf_tokred.compress_prompt`."""
    raise UnsupportedModelError(
        f"{reducer.method} is a prompt compressor: it rewrites prompt text and is used through "
        f"hf_tokred.compress_prompt(context, question=..., method={reducer.method!r}, rate=...) for now; "
        "attaching it to a model (apply, from_pretrained(token_reduction=...)) so that generate() and pipelines "
        "compress their prompt is not wired yet"
    )
