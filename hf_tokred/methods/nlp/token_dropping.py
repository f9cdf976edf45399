"""Token Dropping: drop the tokens the MLM finds easy from the middle layers of an encoder (Hou et al., ACL'22,
arXiv 2203.13240).

While an encoder is (continually) pretrained with masked language modelling, every token id keeps a running
average of the MLM loss the model made when it had to predict that id (the *importance table*, one number per
vocabulary entry). The first ``drop_layer`` blocks see the whole sequence; before block ``drop_layer`` each row
keeps only its "hard" tokens (highest table value) and the tokens that must stay (the ``[CLS]`` position, the
``keep_ids`` such as ``[SEP]``/``[MASK]``, and every position the MLM loss is computed on); the blocks
``drop_layer .. restore_layer - 1`` run on those; before block ``restore_layer`` the dropped tokens come back at
their original positions with the hidden states they had when they were dropped, so the last block(s) and the
MLM head see the full sequence and the loss is computed on every masked token. Only the middle blocks get
cheaper; nothing new is trained into the encoder, so the pretrained checkpoint is a plain BERT.

* **Learned part**: the importance table (:class:`ImportanceTable`, buffers ``loss`` and ``count`` of shape
  ``(vocab,)``), learned from the training batches' per-token MLM losses, saved to
  ``token_reduction.safetensors``. It is a module without parameters: the optimizer never sees it.
* **Training**: :func:`hf_tokred.training.train_token_dropping` (a plain loop; it updates the table from
  every step's per-token losses) or, with ``transformers.Trainer``,
  :class:`hf_tokred.recipes.token_dropping.TokenDroppingCallback`, which updates the table from the logits and
  ``labels`` of every training forward pass (no ``compute_loss`` override needed).
* **Inference**: the trained encoder needs nothing (save it with the reduction removed). Left attached, the
  reduction also drops by the table in eval mode: a faster, approximate encoder; ``keep=1.0`` is
  bit-identical to the dense model.

Where we depart from the paper (and from its TensorFlow code, ``official/projects/token_dropping``):

* ``keep`` is the fraction of the *droppable* tokens of each row that the middle blocks keep
  (``ceil(keep * n)``), on top of the tokens that must stay; the paper keeps a fixed number of tokens (256 of
  512) counting the always-kept ones. Every position with an MLM label is kept (the paper keeps ``[MASK]``
  through its allow-list, so the 10 % random / 10 % unchanged positions can be dropped there).
* The paper's transition layer (block ``L/2 - 1``: kept tokens as queries, all tokens as keys) is a full block
  here; the default ``drop_layer = L // 2`` makes the same number of blocks cheap minus that half block.
* The table update is order-independent: an id seen ``c`` times in a batch with mean loss ``m`` becomes
  ``beta**c * old + (1 - beta**c) * m`` (the code's per-occurrence moving average when the ``c`` losses are
  equal; its scatter update keeps an arbitrary one of duplicates). Ids never predicted keep ``init_loss`` (10,
  as in the code), so rare tokens stay in; ties keep the earlier token.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="token_dropping", keep=0.5)
    >>> cfg.schedule(6), cfg.restore_block(6)
    ([None, None, None, 0.5, None, None], 5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError
from ..encoder.base import keep_top

MODULE_NAME = "token_dropping"
RECORD_KEY = "token_dropping"
IGNORE_INDEX = -100


class ImportanceTable(nn.Module):
    """The importance of every token id: a running average of the MLM loss made predicting it.

    Buffers (saved to ``token_reduction.safetensors``): ``loss`` ``(vocab,)`` float32, starting at ``init_loss``,
    and ``count`` ``(vocab,)`` int64, how many times each id was predicted in training. :meth:`update` folds a
    batch of per-token losses in with the moving-average factor ``beta``.

    Example:
        >>> import torch
        >>> table = ImportanceTable(5, init_loss=10.0, beta=0.5)
        >>> table.update(torch.tensor([1, 1, 3]), torch.tensor([2.0, 4.0, 6.0]))
        >>> table.loss.tolist(), table.count.tolist()
        ([10.0, 4.75, 10.0, 8.0, 10.0], [0, 2, 0, 1, 0])
    """

    def __init__(self, vocab_size: int, init_loss: float = 10.0, beta: float = 0.995):
        super().__init__()
        self.beta = float(beta)
        self.register_buffer("loss", torch.full((vocab_size,), float(init_loss), dtype=torch.float32))
        self.register_buffer("count", torch.zeros(vocab_size, dtype=torch.long))

    @property
    def vocab_size(self) -> int:
        return self.loss.shape[0]

    @torch.no_grad()
    def update(self, token_ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold per-token losses into the table: ``token_ids`` (any shape, long) are the ids that were predicted
        (the labels), ``losses`` the loss of each; entries with id ``-100`` (no label) are skipped.

        An id seen ``c`` times with mean loss ``m`` becomes ``beta**c * old + (1 - beta**c) * m``.
        """
        ids = token_ids.reshape(-1).to(self.loss.device)
        values = losses.detach().reshape(-1).to(device=self.loss.device, dtype=torch.float32)
        if ids.shape != values.shape:
            raise TokenReductionError(f"token_dropping: {ids.numel()} token ids for {values.numel()} losses")
        keep = ids != IGNORE_INDEX
        ids, values = ids[keep].long(), values[keep]
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise TokenReductionError(f"token_dropping: token ids must be in [0, {self.vocab_size}) (the importance "
                                      f"table's vocabulary), got ids in [{int(ids.min())}, {int(ids.max())}]")
        if not bool(torch.isfinite(values).all()):
            raise TokenReductionError("token_dropping: the per-token losses hold NaN or infinite values")
        seen = torch.zeros_like(self.count).index_add_(0, ids, torch.ones_like(ids))
        total = torch.zeros_like(self.loss).index_add_(0, ids, values)
        hit = seen > 0
        mean = total[hit] / seen[hit]
        decay = torch.pow(torch.full_like(mean, self.beta), seen[hit].to(mean.dtype))
        self.loss[hit] = decay * self.loss[hit] + (1.0 - decay) * mean
        self.count += seen


@register_method("token_dropping")
@dataclass(kw_only=True)
class TokenDroppingConfig(TokenReductionConfig):
    """Token Dropping (arXiv 2203.13240): the middle blocks of a text encoder see only its hard tokens, ranked by
    the running MLM loss of each token id; see the module docstring for the training hooks and where we depart
    from the paper.

    Fields:
        keep: fraction of each row's droppable tokens the middle blocks keep (``ceil(keep * n)``; the paper drops
            about half). Tokens that must stay (position 0, ``keep_ids``, labelled positions) come on top.
            1.0 keeps everything and is bit-identical to the dense model.
        drop_layer: index of the first block that runs on the kept tokens (the number of full blocks before it;
            default: half the depth, the paper's placement). At least 1: the first block sees every token.
        restore_layer: index of the first block that sees the full sequence again (default: the last block, as in
            the paper). The dropped tokens come back there with the state they had before ``drop_layer``.
        keep_ids: token ids never dropped (e.g. ``tokenizer.all_special_ids``: ``[CLS]``, ``[SEP]``, ``[MASK]``,
            ``[UNK]``); default: the special ids the model's config names (``pad/bos/eos/sep/cls/mask_token_id``).
            Padding is handled as padding either way.
        init_loss: table value of an id never predicted yet (the official code's 10: rare tokens stay in).
        beta: moving-average factor of the table per occurrence (the official code's 0.995).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="token_dropping", keep=0.5, drop_layer=2).schedule(6)
        [None, None, 0.5, None, None, None]
    """

    stage = "sequence"
    wiring = "token_dropping"
    model_kinds = ("encoder",)
    learned = True
    paper = "2203.13240"
    status = "beta"
    # What the sequence wiring (hf_tokred/integration/encoders.py) reads off a reducer.
    needs: ClassVar[frozenset[str]] = frozenset()
    reduce_at: ClassVar[str] = "input"
    restore_length: ClassVar[bool] = True
    prop_attn: ClassVar[bool] = False

    keep: float = param(0.5, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of each row's droppable tokens the middle blocks keep")
    drop_layer: int | None = param(None, int, low=1, optional=True,
                                   help="first block that runs on the kept tokens (default: half the depth)")
    restore_layer: int | None = param(None, int, low=1, optional=True,
                                      help="first block that sees the full sequence again (default: the last block)")
    keep_ids: list[int] | None = param(None, int, low=0, sequence=True, optional=True,
                                       help="token ids never dropped (default: the special ids of the model config)")
    init_loss: float = param(10.0, float, low=0.0, help="table value of an id never predicted yet")
    beta: float = param(0.995, float, low=0.0, high=1.0, high_open=True,
                        help="moving-average factor of the importance table per occurrence")

    def validate(self) -> None:
        if self.drop_layer is not None and self.restore_layer is not None and self.drop_layer >= self.restore_layer:
            raise ConfigError(f"drop_layer: must be below restore_layer (the blocks drop_layer .. restore_layer - 1 run "
                              f"on the kept tokens), got drop_layer={self.drop_layer}, "
                              f"restore_layer={self.restore_layer}", field="drop_layer")

    # -- where it acts ----------------------------------------------------------------------------

    def layers(self, num_blocks: int) -> tuple[int, int]:
        """``(drop_layer, restore_layer)`` for a model with ``num_blocks`` blocks; raises ConfigError when they do
        not fit (the first and the last block must see every token).

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="token_dropping").layers(12)
            (6, 11)
        """
        restore = num_blocks - 1 if self.restore_layer is None else self.restore_layer
        drop = num_blocks // 2 if self.drop_layer is None else self.drop_layer
        if restore > num_blocks - 1:
            raise ConfigError(f"restore_layer: block {restore} does not exist or leaves no block to see the full "
                              f"sequence; the model has {num_blocks} blocks, so restore_layer <= {num_blocks - 1}",
                              field="restore_layer")
        if not 1 <= drop < restore:
            field = "drop_layer" if self.drop_layer is not None or self.restore_layer is None else "restore_layer"
            raise ConfigError(f"{field}: token dropping needs 1 <= drop_layer < restore_layer <= {num_blocks - 1} "
                              f"(a full block first, at least one dropped block, a full block last); got "
                              f"drop_layer={drop}, restore_layer={restore} for a model with {num_blocks} blocks",
                              field=field)
        return drop, restore

    def schedule(self, num_blocks: int) -> list[float | None]:
        """``keep`` at ``drop_layer`` (the block before which tokens are dropped), None elsewhere; all None when
        ``keep`` is 1 (nothing happens: the dense model)."""
        drop, _ = self.layers(num_blocks)
        return [self.keep if (i == drop and self.keep < 1.0) else None for i in range(num_blocks)]

    def restore_block(self, num_blocks: int) -> int:
        """The block before which the dropped tokens come back (read by the sequence wiring)."""
        return self.layers(num_blocks)[1]

    # -- learned part ------------------------------------------------------------------------------

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The importance table (one entry per row of the model's input token embeddings), on their device.

        Raises :class:`UnsupportedModelError` for an encoder that does not read token ids (a ViT), and
        :class:`ConfigError` when the layers do not fit the model's depth; both before the model is touched.

        Example:
            >>> modules = cfg.learned_modules(bert, adapter)           # doctest: +SKIP
            >>> modules["token_dropping"].loss.shape                   # doctest: +SKIP
            torch.Size([30522])
        """
        embeddings = check_text_encoder(model, self)
        self.layers(len(adapter.blocks(model)))
        table = ImportanceTable(embeddings.num_embeddings, self.init_loss, self.beta)
        return {MODULE_NAME: table.to(embeddings.weight.device)}

    def forced_ids(self, model) -> list[int]:
        """The ids never dropped: ``keep_ids``, or the special ids named by the model's config.

        Example:
            >>> from transformers import RobertaConfig
            >>> cfg.forced_ids(roberta)                                # doctest: +SKIP
            [0, 1, 2]
        """
        if self.keep_ids is not None:
            return sorted(set(self.keep_ids))
        config = getattr(model, "config", None)
        found = set()
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value >= 0:
                found.add(value)
        return sorted(found)

    # -- the decision -------------------------------------------------------------------------------

    def plan(self, ctx):
        """Keep, per row, the protected and forced tokens and the ``ceil(keep * n)`` droppable tokens of highest
        table value (ties: the earlier token); drop the rest (they come back before ``restore_layer``)."""
        record = ctx.state.records.get(RECORD_KEY)
        if record is None or record.get("ids") is None:
            raise TokenReductionError("token_dropping ranks tokens by their ids: call the model with input_ids (not "
                                      "inputs_embeds), with the reduction attached by hf_tokred.apply or "
                                      "from_pretrained")
        modules = ctx.modules
        if modules is None or MODULE_NAME not in modules:
            raise TokenReductionError("token_dropping: the model has no importance table "
                                      "(model.hf_tokred_modules['token_dropping']); attach the reduction with "
                                      "hf_tokred.apply or from_pretrained")
        table = modules[MODULE_NAME]
        anchor = ctx.state.anchor
        ids = record["ids"]
        if tuple(ids.shape) != tuple(ctx.state.origin.shape):
            raise TokenReductionError(f"token_dropping: input_ids of shape {tuple(ids.shape)} for an input of "
                                      f"{tuple(ctx.state.origin.shape)} tokens")
        ids = ids.to(anchor.device).gather(1, anchor)
        if int(ids.max()) >= table.vocab_size or int(ids.min()) < 0:
            raise TokenReductionError(f"token_dropping: input ids must be in [0, {table.vocab_size}) (the importance "
                                      "table's vocabulary)")
        forced = record["forced"].gather(1, anchor)
        real = torch.ones_like(forced) if ctx.valid is None else ctx.valid
        forced = forced & real
        forced[:, : ctx.protected] = False  # kept anyway (keep_top counts them apart)
        droppable = real & ~forced
        droppable[:, : ctx.protected] = False
        counts = forced.sum(dim=1) + torch.ceil(droppable.sum(dim=1).double() * ctx.amount - 1e-9).long()
        score = table.loss.to(anchor.device)[ids].masked_fill(forced, math.inf)
        reduction = keep_top(score, counts, ctx.protected, ctx.valid)
        kept = (reduction.slot_of() >= 0) & real
        record["kept"] = torch.zeros_like(kept).scatter_(1, anchor, kept)  # in input order, for last_drop()
        return reduction


def check_text_encoder(model, reducer=None) -> nn.Embedding:
    """The input token embeddings of ``model``, or :class:`UnsupportedModelError` when it does not read token ids.

    Token dropping ranks tokens by their ids, so it needs an encoder whose input embeddings are an
    ``nn.Embedding`` over a vocabulary (BERT, RoBERTa, DistilBERT); image encoders (ViT, CLIP's vision tower)
    are refused.

    Example:
        >>> check_text_encoder(bert).num_embeddings                     # doctest: +SKIP
        30522
    """
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise UnsupportedModelError(
            f"token_dropping ranks text tokens by the MLM loss of their ids; {type(model).__name__} does not read "
            f"token ids (its input embeddings are {type(embeddings).__name__}). Use a text encoder with a masked "
            "language model use: BertForMaskedLM, RobertaForMaskedLM, DistilBertForMaskedLM or their base models"
        )
    return embeddings


@dataclass
class DropRecord:
    """What the last forward pass of a token-dropping model kept (see :func:`last_drop`).

    Attributes:
        kept: ``(B, N_in)`` bool, input positions that ran through the middle blocks (padding is False).
        forced: ``(B, N_in)`` bool, real positions that had to stay: ``keep_ids``, labelled positions and those
            given to :func:`~hf_tokred.integration.token_dropping.keep_positions` (the protected first token is
            kept too, whatever its id).
    """

    kept: torch.Tensor
    forced: torch.Tensor


__all__ = ["DropRecord", "ImportanceTable", "TokenDroppingConfig", "check_text_encoder"]
