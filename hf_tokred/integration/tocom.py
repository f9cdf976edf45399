"""Wiring of ToCom (``method="tocom"``): ToMe's sequence wiring plus the plug-in's low-rank deltas.

:func:`wire_tocom` first installs the encoder sequence wiring (``hf_tokred/integration/encoders.py``, which
runs ToMe's merging through :meth:`ToComConfig.plan`), then one forward hook per linear layer named in the
plug-in (``model.hf_tokred_modules["tocom"]``, a :class:`~hf_tokred.methods.encoder.tocom.TokenCompensator`)
that adds the layer's delta to its output. The hooks look the plug-in up on every call, so plug-ins loaded
later by ``from_pretrained`` are the ones used; every hook is recorded for ``remove()``, which gives back the
dense model bit for bit. The deltas are skipped while the plug-in is disabled (:func:`plugin_off`) or the
model runs dense (:func:`hf_tokred.training.dense_pass`).

Example:
    >>> import hf_tokred
    >>> hf_tokred.apply(bert, {"method": "tocom", "r": 4, "source_r": 2})     # doctest: +SKIP
    >>> with plugin_off(bert):                                                 # doctest: +SKIP
    ...     plain_tome = bert(**batch).last_hidden_state
"""

from __future__ import annotations

import contextlib

from ..errors import UnsupportedModelError
from .wiring import MODULES_ATTR, register_wiring, wiring_for

MODULE_NAME = "tocom"


def _delta_hook(model, reducer, key: str):
    def hook(module, args, output):
        plug = model._modules.get(MODULES_ATTR)
        plug = None if plug is None else plug[MODULE_NAME] if MODULE_NAME in plug else None
        if plug is None or not plug.enabled or getattr(reducer, "_dense", False):
            return None
        return output + plug[key](args[0])

    return hook


@register_wiring("tocom")
def wire_tocom(model, adapter, reducer, applied) -> None:
    """Attach ToMe's merging (the sequence wiring) and the plug-in's delta hooks; every hook is undone by ``remove()``.

    Example:
        >>> model = hf_tokred.apply(bert, {"method": "tocom", "r": 4})        # doctest: +SKIP
    """
    modules = model._modules.get(MODULES_ATTR)
    if modules is None or MODULE_NAME not in modules:
        raise UnsupportedModelError("tocom: the plug-in (model.hf_tokred_modules['tocom']) was not built; attach the "
                                    "reduction with hf_tokred.apply or from_pretrained")
    plug = modules[MODULE_NAME]
    blocks = adapter.blocks(model)
    targets = []
    for key, (index, path) in plug.paths.items():
        if index >= len(blocks):
            raise UnsupportedModelError(f"tocom: the plug-in has a delta for block {index}; the model has {len(blocks)}")
        targets.append((key, blocks[index].get_submodule(path)))
    wiring_for("sequence")(model, adapter, reducer, applied)
    for key, linear in targets:
        handle = linear.register_forward_hook(_delta_hook(model, reducer, key))
        applied.add_undo(handle.remove)


@contextlib.contextmanager
def plugin_off(model):
    """Within this block the ToCom plug-in of ``model`` adds nothing: plain ToMe at the configured degree.

    Example:
        >>> with plugin_off(model), torch.no_grad():                  # doctest: +SKIP
        ...     without = model(**batch).last_hidden_state
    """
    from ..methods.encoder.tocom import compensator

    plug = compensator(model)
    previous = plug.enabled
    plug.enabled = False
    try:
        yield model
    finally:
        plug.enabled = previous


@contextlib.contextmanager
def source_pass(model):
    """Within this block the model runs as it was tuned: ToMe at the config's source degree, plug-in off (the
    teacher of :func:`hf_tokred.recipes.tocom.train_tocom`).

    Example:
        >>> with source_pass(model), torch.no_grad():                  # doctest: +SKIP
        ...     teacher_out = model(**batch)
    """
    from .wiring import get_applied

    reducer = get_applied(model).config.get("sequence")
    previous = getattr(reducer, "_source_pass", False)
    reducer._source_pass = True
    try:
        with plugin_off(model):
            yield model
    finally:
        reducer._source_pass = previous


__all__ = ["plugin_off", "source_pass", "wire_tocom"]
