"""Wiring of Token Dropping (``method="token_dropping"``, arXiv 2203.13240) into BERT-family encoders.

The sequence itself is shortened and restored by the encoder sequence wiring
(:func:`hf_tokred.integration.encoders.wire_sequence_reducer`): a forward pre-hook before block ``drop_layer``
keeps the tokens :meth:`~hf_tokred.methods.nlp.token_dropping.TokenDroppingConfig.plan` chooses (the attention
mask of the middle blocks is gathered to them; a left-padded batch is re-ordered so that rows keep what they
keep alone), and, through the reducer's ``restore_block``, block ``restore_layer`` gets the full sequence back
with the dropped tokens' states from before ``drop_layer`` and the model's own mask. This module adds what the
ranking needs, all with plain hooks recorded for ``remove()``:

* a forward pre-hook on the input token embeddings (``model.get_input_embeddings()``) records the call's
  ``input_ids`` (the table is indexed by them);
* a forward pre-hook on the model records ``labels`` when the call has them (an MLM head's; every labelled
  position is kept), cleared by a forward hook when the call ends;
* a forward pre-hook on the first block turns them into the call's record: the ids and the positions that must
  stay (``keep_ids``, labelled positions, positions given to :func:`keep_positions`).

And the training side: :func:`mlm_token_losses` and :func:`update_importance` (what a training loop calls each
step) and :func:`track_importance`, a forward hook that updates the table from the logits and labels of every
training-mode forward pass (what :class:`hf_tokred.recipes.token_dropping.TokenDroppingCallback` installs on a
``transformers.Trainer``'s model).

Example:
    >>> import hf_tokred, torch
    >>> from transformers import BertConfig, BertForMaskedLM
    >>> bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
    ...                                   intermediate_size=64)).eval()
    >>> _ = hf_tokred.apply(bert, {"method": "token_dropping", "keep": 0.5, "keep_ids": [1, 2]})
    >>> ids = torch.tensor([[1, 7, 8, 9, 10, 11, 12, 2]])
    >>> bert(input_ids=ids).logits.shape[1]                       # full length again before the last block
    8
    >>> last_drop(bert).kept.sum().item()                         # [CLS], [SEP] and ceil(0.5 * 6) tokens
    5
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import TokenReductionError
from ..methods.nlp.token_dropping import (
    IGNORE_INDEX,
    MODULE_NAME,
    RECORD_KEY,
    DropRecord,
    ImportanceTable,
    check_text_encoder,
)
from .encoders import STATE_ATTR, wire_sequence_reducer
from .wiring import MODULES_ATTR, get_applied, register_wiring

INPUTS_ATTR = "_hf_tokred_token_dropping_inputs"


class _CallInputs:
    """What the hooks of one token-dropping model collect about the running call."""

    def __init__(self, forced_ids: torch.Tensor):
        self.forced_ids = forced_ids
        self.ids: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.keep_mask: torch.Tensor | None = None


def _inputs(model, what: str) -> _CallInputs:
    inputs = model.__dict__.get(INPUTS_ATTR) if get_applied(model) is not None else None
    if inputs is None:
        raise TokenReductionError(f"{what}: {type(model).__name__} has no token_dropping reduction attached "
                                  "(hf_tokred.apply(model, {'method': 'token_dropping'}))")
    return inputs


@register_wiring("token_dropping")
def wire_token_dropping(model, adapter, reducer, applied) -> None:
    """Attach Token Dropping: the encoder sequence wiring plus the hooks that record ids, labels and kept positions.

    Called by ``hf_tokred.apply``; every check runs before the first hook, and every hook is recorded in
    ``applied`` for ``remove()``.

    Example:
        >>> model = hf_tokred.apply(bert_mlm, {"method": "token_dropping", "keep": 0.5})     # doctest: +SKIP
    """
    embeddings = check_text_encoder(model, reducer)
    blocks = adapter.blocks(model)
    reducer.layers(len(blocks))
    forced_ids = torch.tensor(reducer.forced_ids(model), dtype=torch.long, device=embeddings.weight.device)
    wire_sequence_reducer(model, adapter, reducer, applied)
    state = model.__dict__[STATE_ATTR]
    inputs = _CallInputs(forced_ids)
    setattr(model, INPUTS_ATTR, inputs)
    applied.add_undo(lambda: model.__dict__.pop(INPUTS_ATTR, None))

    def record_ids(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input")
        inputs.ids = ids if torch.is_tensor(ids) and ids.dim() == 2 else None

    def record_labels(module, args, kwargs):
        labels = kwargs.get("labels")
        inputs.labels = labels if torch.is_tensor(labels) else None

    def end_call(module, args, kwargs, output):
        inputs.labels = None
        inputs.ids = None

    def start_record(module, args, kwargs):
        # Runs after the sequence wiring's own first-block pre-hook, which reset the call's records.
        ids, inputs.ids = inputs.ids, None
        if ids is None:
            state.records[RECORD_KEY] = {"ids": None}
            return None
        forced = torch.isin(ids, inputs.forced_ids.to(ids.device))
        labels = inputs.labels
        if labels is not None and labels.shape == ids.shape:
            forced |= labels.to(ids.device) != IGNORE_INDEX
        if inputs.keep_mask is not None:
            if inputs.keep_mask.shape != ids.shape:
                raise TokenReductionError(f"keep_positions: a mask of shape {tuple(inputs.keep_mask.shape)} for "
                                          f"input_ids of shape {tuple(ids.shape)}")
            forced |= inputs.keep_mask.to(device=ids.device, dtype=torch.bool)
        if state.input_valid is not None:
            forced &= state.input_valid
        state.records[RECORD_KEY] = {"ids": ids, "forced": forced}
        return None

    handles = [
        embeddings.register_forward_pre_hook(record_ids, with_kwargs=True),
        model.register_forward_pre_hook(record_labels, with_kwargs=True),
        model.register_forward_hook(end_call, with_kwargs=True, always_call=True),
        blocks[0].register_forward_pre_hook(start_record, with_kwargs=True),
    ]
    for handle in handles:
        applied.add_undo(handle.remove)


# ---------------------------------------------------------------------------------------------
# After a forward pass
# ---------------------------------------------------------------------------------------------


def last_drop(model) -> DropRecord:
    """What the middle blocks kept in the last forward pass (input order): ``kept`` and ``forced`` masks.

    Example:
        >>> record = last_drop(model)                                  # doctest: +SKIP
        >>> record.kept.sum(1)                                         # tokens per row in the middle blocks  # doctest: +SKIP
        tensor([17, 9])
    """
    _inputs(model, "last_drop")
    state = model.__dict__.get(STATE_ATTR)
    record = None if state is None else state.records.get(RECORD_KEY)
    if record is None or "kept" not in record:
        raise TokenReductionError("last_drop: no tokens were dropped in the last forward pass (run one first; with "
                                  "keep=1.0 nothing is ever dropped)")
    return DropRecord(kept=record["kept"], forced=record["forced"])


@contextlib.contextmanager
def keep_positions(model, mask: torch.Tensor):
    """Within this block every forward pass of ``model`` also keeps the positions where ``mask`` ``(B, N)`` is True
    (besides ``keep_ids`` and labelled positions), e.g. the masked positions when you run the encoder and the MLM
    head separately (``model.bert(...)`` then ``model.cls(...)`` on the masked states only).

    Example:
        >>> with keep_positions(model, labels != -100):                                # doctest: +SKIP
        ...     hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    """
    inputs = _inputs(model, "keep_positions")
    if not torch.is_tensor(mask) or mask.dim() != 2:
        raise TokenReductionError(f"keep_positions: expected a (batch, tokens) bool tensor, got "
                                  f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
    previous, inputs.keep_mask = inputs.keep_mask, mask.to(torch.bool)
    try:
        yield
    finally:
        inputs.keep_mask = previous


# ---------------------------------------------------------------------------------------------
# The importance table in training
# ---------------------------------------------------------------------------------------------


def importance_table(model) -> ImportanceTable:
    """The importance table attached to ``model`` (``model.hf_tokred_modules["token_dropping"]``).

    Example:
        >>> table = importance_table(model)                            # doctest: +SKIP
        >>> table.loss[tokenizer.convert_tokens_to_ids("the")]         # doctest: +SKIP
    """
    modules = model._modules.get(MODULES_ATTR)
    if get_applied(model) is None or modules is None or MODULE_NAME not in modules:
        raise TokenReductionError(f"importance_table: {type(model).__name__} has no token_dropping reduction attached "
                                  "(hf_tokred.apply(model, {'method': 'token_dropping'}))")
    return modules[MODULE_NAME]


def mlm_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, losses)``: the label and the cross-entropy of every labelled position (labels ``!= -100``).

    ``logits`` is ``(..., vocab)`` at the positions of ``labels`` (the full sequence, or only the masked positions
    with their labels). The mean of ``losses`` is the usual MLM loss.

    Example:
        >>> import torch
        >>> ids, losses = mlm_token_losses(torch.zeros(1, 3, 4), torch.tensor([[-100, 2, 3]]))
        >>> ids.tolist(), [round(v, 4) for v in losses.tolist()]
        ([2, 3], [1.3863, 1.3863])
    """
    if logits.shape[:-1] != labels.shape:
        raise TokenReductionError(f"mlm_token_losses: logits of shape {tuple(logits.shape)} for labels of shape "
                                  f"{tuple(labels.shape)}")
    labelled = labels != IGNORE_INDEX
    ids = labels[labelled]
    losses = torch.nn.functional.cross_entropy(logits[labelled].float(), ids, reduction="none")
    return ids, losses


def update_importance(model, token_ids: torch.Tensor, losses: torch.Tensor) -> None:
    """Fold one batch's per-token MLM losses into ``model``'s importance table (see ``ImportanceTable.update``).

    Example:
        >>> ids, losses = mlm_token_losses(logits, labels)            # doctest: +SKIP
        >>> loss = losses.mean(); loss.backward()                       # doctest: +SKIP
        >>> update_importance(model, ids, losses)                      # doctest: +SKIP
    """
    importance_table(model).update(token_ids, losses)


def track_importance(model):
    """Update ``model``'s importance table from every training-mode forward pass that has ``labels``.

    Installs a forward hook on ``model`` that computes the per-token losses from the output's ``logits`` and the
    call's ``labels`` (no gradients) and folds them into the table; evaluation passes (``model.eval()``) and calls
    without labels change nothing. Returns the hook's handle: ``handle.remove()``, or use it as a context manager.
    This is what :class:`~hf_tokred.recipes.token_dropping.TokenDroppingCallback` does for a ``Trainer``; use it
    directly in an accelerate or plain loop that calls ``model(**batch, labels=...)``.

    Example:
        >>> with track_importance(model):                               # doctest: +SKIP
        ...     loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    """
    table = importance_table(model)

    def hook(module, args, kwargs, output):
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None)
        if not module.training or not torch.is_tensor(labels) or logits is None:
            return None
        if logits.shape[:-1] != labels.shape:
            raise TokenReductionError(f"track_importance: the output logits {tuple(logits.shape)} are not per token of "
                                      f"labels {tuple(labels.shape)}; token_dropping needs a masked-LM head")
        with torch.no_grad():
            ids, losses = mlm_token_losses(logits.detach(), labels)
            table.update(ids, losses)
        return None

    return model.register_forward_hook(hook, with_kwargs=True)


__all__ = ["importance_table", "keep_positions", "last_drop", "mlm_token_losses", "track_importance",
           "update_importance", "wire_token_dropping"]
