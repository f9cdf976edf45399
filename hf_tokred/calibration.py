"""``hf_tokred.calibrate``: fit the learned parts of an attached reduction on representative text.

Only ``kvquant`` needs this (its codebooks and key channel ranges are fitted on text; until then the cache
refuses to build). The result lives on the model and is saved by ``save_pretrained`` into
``token_reduction.safetensors``, so calibration runs once per model. DiffRate's schedule search is a different
kind of calibration (it returns a new config for a FLOPs target): see
``hf_tokred.methods.encoder.diffrate.calibrate``.
"""

from __future__ import annotations

import os

from .errors import ConfigError, TokenReductionError


def calibrate(model, texts, tokenizer=None, *, max_length: int = 2048, max_tokens_per_layer: int = 32768):
    """Calibrate the ``kvquant`` storage attached to ``model`` on ``texts``; returns the calibration module.

    Args:
        model: a causal LM carrying a ``kvquant`` reduction, alone or in a composition
            (``from_pretrained(..., token_reduction=...)`` or :func:`hf_tokred.apply`).
        texts: a string, or a list of strings, or token ids (a list of ints, a list of such lists, or 1-D/2-D
            tensors). A few thousand tokens of text like the model's real inputs are enough.
        tokenizer: turns strings into token ids. When omitted and ``texts`` holds strings, the tokenizer saved
            in the model's folder (``model.config._name_or_path``) is used.
        max_length: each text is cut to this many tokens.
        max_tokens_per_layer: at most this many tokens per layer enter the k-means fits.

    Raises :class:`~hf_tokred.TokenReductionError` when the model carries no ``kvquant`` reduction, and
    :class:`~hf_tokred.ConfigError` naming ``tokenizer`` or ``texts`` when the input cannot be used.

    Example:
        >>> import hf_tokred
        >>> model = AutoModelForCausalLM.from_pretrained(repo, token_reduction={"method": "kvquant", "bits": 3})  # doctest: +SKIP
        >>> hf_tokred.calibrate(model, ["a few thousand tokens of representative text ..."], tokenizer)  # doctest: +SKIP
        >>> model.save_pretrained("smol-kvquant")      # the codebooks go to token_reduction.safetensors  # doctest: +SKIP
    """
    from .integration.wiring import get_applied
    from .methods.kv import kvquant

    applied = get_applied(model)
    storage = None if applied is None else applied.config.get("kv_storage")
    if not isinstance(storage, kvquant.KVQuantConfig):
        attached = "no reduction" if applied is None else f"{applied.config.method!r}"
        raise TokenReductionError(
            f"calibrate: the model carries {attached}; hf_tokred.calibrate fits kvquant, so attach one first, e.g. "
            "hf_tokred.apply(model, {'method': 'kvquant', 'bits': 3}) (DiffRate schedules are calibrated with "
            "hf_tokred.methods.encoder.diffrate.calibrate)"
        )
    if isinstance(texts, (list, tuple)) and not texts:
        raise ConfigError("texts: expected a string, a list of strings or token ids, got an empty list", field="texts")
    has_strings = isinstance(texts, str) or (isinstance(texts, (list, tuple)) and any(isinstance(t, str) for t in texts))
    if has_strings and tokenizer is None:
        tokenizer = _tokenizer_beside(model)
    return kvquant.calibrate(model, texts, tokenizer, max_length=max_length, max_tokens_per_layer=max_tokens_per_layer)


def _tokenizer_beside(model):
    """The tokenizer saved in the folder (or Hub cache) the model was loaded from, or a ConfigError naming
    ``tokenizer``."""
    source = getattr(model.config, "_name_or_path", "") or ""
    reason = "the model was not loaded from a folder or the Hub"
    if source:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means: no usable tokenizer next to the model
            where = f"the model's folder {source!r}" if os.path.isdir(source) else f"{source!r}"
            reason = f"none could be loaded from {where}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    raise ConfigError(
        f"tokenizer: texts holds strings and no tokenizer was passed ({reason}); pass tokenizer=..., or token ids "
        "instead of strings",
        field="tokenizer",
    )
