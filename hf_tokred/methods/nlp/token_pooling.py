"""Dynamic Token Pooling: an hourglass decoder with variable-length segments (Nawrot et al., ACL'23, arXiv 2211.09761).

The decoder's first ``pre_layers`` layers run on every token. Each row is then cut into segments: a token whose
*boundary* is 1 ends its segment. The tokens of each complete segment are mean-pooled into one vector, and the
middle layers run on these pooled vectors only (a sequence about ``1 / boundary_rate`` times shorter), with the
attention mask and the rotary position embeddings of each segment's last token. The middle layers' update of a
segment (their output minus their pooled input) is then added back to every token from the segment's last token
up to the next segment's end -- the paper's upsampling by duplication with its causal shift: a token receives only
segments that END at or before it, so no token sees the future. The last ``post_layers`` layers run on every token
with the model's own mask and positions. :mod:`hf_tokred.integration.hourglass` wires this with hooks.

Where the boundaries come from (``boundaries``):

* ``"learned"``: a boundary predictor (a two-layer MLP on the hidden states after ``pre_layers``) gives each token a
  boundary probability. In training mode it draws hard boundaries from a Gumbel-sigmoid (relaxed Bernoulli at
  ``gumbel_temperature``) with a straight-through gradient, which reaches the predictor through the pooling and
  upsampling weights; :func:`binomial_prior_loss` pulls the number of boundaries toward ``boundary_rate`` (the paper's
  Binomial prior). At inference a token ends a segment when its probability exceeds 0.5.
* ``"whitespace"``: a token ends a segment when its id is in ``boundary_token_ids`` (the whitespace tokens of the
  vocabulary: :data:`BYTE_WHITESPACE_IDS` for the byte-level models of the recipe, :func:`whitespace_token_ids` for
  a tokenizer). No weights; the paper found whitespace (and Unigram) boundaries the best.

Where we depart from the paper:

* The paper's model is a post-norm Transformer-XL built for it; here the hourglass is put on the layers of any
  transformers decoder (Llama, Qwen2, Gemma, ...) with hooks, so the residual stream is the decoder's own. The
  middle layers' *update* ``m - p`` is added back to the full-resolution residual (the paper adds their output ``m``
  to it); with segments of one token this reproduces the dense layer stack exactly.
* No learned null group and no LayerNorm after pooling: tokens before their row's first segment end receive no update
  from the middle layers (the paper gives them a learned null vector), and the decoder layers normalise their input
  themselves.
* The paper's Unigram-supervised and entropy-spike predictors are not provided (they need a trained SentencePiece
  model or a pretrained LM's entropies). A predictor supervised by BCE on whitespace targets is not either: the
  whitespace ids themselves are known at inference, so ``"whitespace"`` uses them directly.
* The predictor's last bias starts at ``logit(boundary_rate)`` so training starts at the target rate.
* Decoding cannot use a KV cache (a segment grows as tokens arrive, so the pooled layers' keys change): ``generate()``
  recomputes the whole sequence at each step (``use_cache=False``, exact); asking for a cache is an error.

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="token_pooling", boundaries="whitespace", pre_layers=2, post_layers=2,
    ...                            boundary_token_ids=list(BYTE_WHITESPACE_IDS))
    >>> cfg.pooled_layers(12)
    [2, 3, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...config import TokenReductionConfig, param, register_method
from ...errors import ConfigError, UnsupportedModelError

MODULE_NAME = "token_pooling"

# Byte-level vocabulary of the recipe's models: ids 0..255 are the UTF-8 bytes, then the special tokens.
BYTE_PAD_ID, BYTE_BOS_ID, BYTE_EOS_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259
# ASCII whitespace bytes (tab, newline, vertical tab, form feed, carriage return, space).
BYTE_WHITESPACE_IDS = (9, 10, 11, 12, 13, 32)


def encode_bytes(text: str, bos: bool = False) -> list[int]:
    """The byte-level ids of ``text`` (its UTF-8 bytes, optionally after :data:`BYTE_BOS_ID`).

    Example:
        >>> encode_bytes("hé")
        [104, 195, 169]
    """
    return ([BYTE_BOS_ID] if bos else []) + list(text.encode("utf-8"))


def decode_bytes(ids) -> str:
    """Text of byte-level ids (special ids dropped, invalid UTF-8 replaced).

    Example:
        >>> decode_bytes([257, 104, 195, 169])
        'hé'
    """
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(v for v in values if 0 <= v < 256).decode("utf-8", errors="replace")


def whitespace_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's tokens whose text contains whitespace (``"\\n"``, ``" the"``, ...), for ``boundaries="whitespace"``.

    A segment then ends at the first token that holds the whitespace after a word: for tokenizers that attach the
    space to the next word (``"Ġthe"``), that token ends the segment, which keeps boundaries causal (deciding at a
    word's last token would need the next token).

    Example:
        >>> ids = whitespace_token_ids(tokenizer)                          # doctest: +SKIP
        >>> cfg = {"method": "token_pooling", "boundaries": "whitespace", "boundary_token_ids": ids}  # doctest: +SKIP
    """
    found = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and any(c.isspace() for c in text) and token_id not in tokenizer.all_special_ids:
            found.append(token_id)
    return found


# ---------------------------------------------------------------------------------------------
# Boundaries, pooling and upsampling (plain tensor functions)
# ---------------------------------------------------------------------------------------------


class BoundaryPredictor(nn.Module):
    """The paper's boundary predictor: ``Linear(D, W) -> GELU -> Linear(W, 1)``, a boundary logit per token.

    Example:
        >>> p = BoundaryPredictor(16, rate=0.25)
        >>> torch.sigmoid(p(torch.zeros(1, 3, 16))).round(decimals=2).tolist()
        [[0.25, 0.25, 0.25]]
    """

    def __init__(self, dim: int, width: int | None = None, rate: float = 0.25):
        super().__init__()
        width = dim if width is None else width
        self.net = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, 1))
        rate = min(max(rate, 1e-3), 1 - 1e-3)
        with torch.no_grad():  # start at the target rate: logit(rate)
            self.net[-1].bias.fill_(math.log(rate / (1 - rate)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)


def gumbel_sigmoid_boundaries(logits: torch.Tensor, temperature: float, threshold: float = 0.5) -> torch.Tensor:
    """Hard 0/1 boundaries drawn from a relaxed Bernoulli (Gumbel-sigmoid), with the straight-through gradient of the
    soft sample (the paper's training boundaries).

    Example:
        >>> b = gumbel_sigmoid_boundaries(torch.zeros(2, 5, requires_grad=True), 0.5)
        >>> sorted(set(b.detach().flatten().tolist())) <= [0.0, 1.0], b.requires_grad
        (True, True)
    """
    soft = torch.distributions.RelaxedBernoulli(torch.tensor(temperature, device=logits.device),
                                                logits=logits).rsample()
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


def whitespace_boundaries(input_ids: torch.Tensor, boundary_token_ids) -> torch.Tensor:
    """1.0 where ``input_ids`` holds one of ``boundary_token_ids`` (the token ends its segment), else 0.0.

    Example:
        >>> whitespace_boundaries(torch.tensor([[104, 105, 32, 121, 10]]), BYTE_WHITESPACE_IDS).tolist()
        [[0.0, 0.0, 1.0, 0.0, 1.0]]
    """
    ids = torch.as_tensor(list(boundary_token_ids), device=input_ids.device, dtype=input_ids.dtype)
    return torch.isin(input_ids, ids).float()


@dataclass
class PoolingPlan:
    """How one batch is pooled (see :func:`pooling_plan`).

    Attributes:
        pool: ``(B, S, L)`` mean-pooling weights (each complete segment's tokens, 1/size each).
        upsample: ``(B, L, S)`` 1 where token ``t`` receives segment ``s`` (the last segment ending at or before t).
        ends: ``(B, S)`` position of each segment's last token (any position for a padding slot).
        valid: ``(B, S)`` the slot holds a complete segment (rows with fewer segments are padded to ``S``).
        counts: ``(B,)`` complete segments per row.
    """

    pool: torch.Tensor
    upsample: torch.Tensor
    ends: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor


def pooling_plan(boundaries: torch.Tensor, real: torch.Tensor | None = None) -> PoolingPlan:
    """Segments of each row from its ``(B, L)`` 0/1 ``boundaries`` (1: the token ends its segment) among its ``real``
    tokens (padding is never pooled and never ends a segment).

    Tokens after a row's last boundary form no complete segment: they are not pooled (the segment may still grow),
    and like every token they receive the last segment that ended before them. Gradients of straight-through
    boundaries reach the weights as in the paper (``1 - (s - segment index)`` at the chosen entries).

    Example:
        >>> plan = pooling_plan(torch.tensor([[0., 1., 0., 0., 1., 0.]]))
        >>> plan.ends.tolist(), plan.counts.tolist()
        ([[1, 4]], [2])
        >>> plan.pool[0].tolist()
        [[0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.3333333432674408, 0.3333333432674408, 0.3333333432674408, 0.0]]
        >>> plan.upsample[0].argmax(-1).tolist(), plan.upsample[0].sum(-1).tolist()
        ([0, 0, 0, 0, 1, 1], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    """
    if real is None:
        real = torch.ones_like(boundaries, dtype=torch.bool)
    b = boundaries * real.to(boundaries.dtype)
    batch, length = b.shape
    hard = b.detach() > 0.5
    counts = hard.sum(dim=-1)
    slots = max(int(counts.max()), 1)
    device = b.device
    index = torch.arange(slots, device=device, dtype=b.dtype)
    inclusive = b.cumsum(dim=-1)
    before = inclusive - b  # segment index of each token: the boundaries strictly before it
    # Pooling: token t goes to slot before[t], when it lies in a complete segment (a boundary at or after it).
    complete = real & (hard.flip(-1).cumsum(-1).flip(-1) > 0)
    offset = index[None, :, None] - before[:, None, :]  # (B, S, L)
    pool = (offset.detach() == 0) & complete[:, None, :]
    pool = pool.to(b.dtype) * (1 - offset)
    pool = pool / pool.detach().sum(dim=-1, keepdim=True).clamp_min(1)
    # Upsampling: token t receives slot inclusive[t] - 1 (the last segment ending at or before t), if any.
    shift = (index[None, None, :] + 1) - inclusive[:, :, None]  # (B, L, S)
    upsample = ((shift.detach() == 0) & real[:, :, None]).to(b.dtype) * (1 - shift)
    positions = torch.arange(length, device=device).expand(batch, length)
    order = torch.where(hard, positions, length + positions).argsort(dim=-1)[:, :slots]
    valid = torch.arange(slots, device=device)[None, :] < counts[:, None]
    ends = torch.where(valid, order.clamp_max(length - 1), length - 1)
    return PoolingPlan(pool, upsample, ends, valid, counts)


def binomial_prior_loss(boundaries: torch.Tensor, real: torch.Tensor | None, rate: float) -> torch.Tensor:
    """The paper's prior: ``-log Binomial(n, rate).pmf(k) / n`` per row (``k`` boundaries among ``n`` real tokens),
    averaged over rows; differentiable in ``k`` (straight-through boundaries).

    Example:
        >>> b = torch.tensor([[1., 0., 0., 0.], [1., 1., 1., 1.]])
        >>> loss = binomial_prior_loss(b, None, 0.25)
        >>> round(loss.item(), 3)
        0.801
    """
    if real is None:
        real = torch.ones_like(boundaries, dtype=torch.bool)
    n = real.sum(dim=-1).to(boundaries.dtype).clamp_min(1)
    k = (boundaries * real.to(boundaries.dtype)).sum(dim=-1)
    rate = min(max(rate, 1e-6), 1 - 1e-6)
    log_pmf = (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1) + k * math.log(rate)
               + (n - k) * math.log(1 - rate))
    return (-log_pmf / n).mean()


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------


@register_method("token_pooling")
@dataclass(kw_only=True)
class TokenPoolingConfig(TokenReductionConfig):
    """Dynamic Token Pooling (arXiv 2211.09761): an hourglass of any transformers decoder whose middle layers run on
    mean-pooled variable-length segments; see the module docstring for the mechanism and where we depart from the paper.

    Fields:
        pre_layers: decoder layers run on every token before pooling (the paper's 2).
        post_layers: decoder layers run on every token after upsampling (the paper's 2); the layers between run
            pooled. ``pre_layers + post_layers`` equal to the depth pools nothing: the dense model.
        boundaries: ``"learned"`` (a boundary predictor, trained with Gumbel-sigmoid and the Binomial prior) or
            ``"whitespace"`` (segments end at ``boundary_token_ids``; no weights).
        boundary_rate: the fraction of tokens that end a segment, 1 / the shorten factor: the prior of the learned
            predictor (and its starting rate). 1.0 makes every token its own segment: the dense model.
        boundary_token_ids: token ids that end a segment with ``boundaries="whitespace"`` (e.g.
            :data:`BYTE_WHITESPACE_IDS`, or :func:`whitespace_token_ids` of a tokenizer).
        gumbel_temperature: temperature of the relaxed Bernoulli in training (the paper's 0.5).
        predictor_dim: width of the predictor's hidden layer (None: the model's hidden size).

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> TokenReductionConfig(method="token_pooling", boundary_rate=0.2).shorten_factor
        5.0
    """

    stage = "sequence"
    wiring = "token_pooling"
    model_kinds = ("decoder",)
    learned = True
    paper = "2211.09761"
    status = "experimental"

    pre_layers: int = param(2, int, low=0, help="decoder layers run on every token before pooling")
    post_layers: int = param(2, int, low=0, help="decoder layers run on every token after upsampling")
    boundaries: str = param("learned", str, choices=("learned", "whitespace"),
                            help="where segments end: a learned predictor, or whitespace token ids")
    boundary_rate: float = param(0.25, float, low=0.0, high=1.0, low_open=True,
                                 help="fraction of tokens ending a segment (1 / shorten factor); 1.0 is dense")
    boundary_token_ids: list | None = param(None, int, low=0, optional=True, sequence=True,
                                            help="token ids that end a segment (boundaries='whitespace')")
    gumbel_temperature: float = param(0.5, float, low=0.0, low_open=True, help="relaxed-Bernoulli temperature")
    predictor_dim: int | None = param(None, int, low=1, optional=True, help="predictor width (None: hidden size)")

    def validate(self) -> None:
        if self.boundaries == "whitespace" and not self.boundary_token_ids:
            raise ConfigError("boundary_token_ids: boundaries='whitespace' needs the token ids that end a segment "
                              "(e.g. hf_tokred.methods.nlp.token_pooling.BYTE_WHITESPACE_IDS for byte-level models, "
                              "or whitespace_token_ids(tokenizer))", field="boundary_token_ids")
        if self.boundaries == "learned" and self.boundary_token_ids is not None:
            raise ConfigError("boundary_token_ids: only used with boundaries='whitespace'; boundaries='learned' "
                              "predicts the boundaries", field="boundary_token_ids")
        # This instance has trainable parts only with a predictor (the class says the method may have some).
        self.learned = self.boundaries == "learned"

    @property
    def shorten_factor(self) -> float:
        """The expected shortening of the middle layers' sequence, ``1 / boundary_rate``."""
        return 1.0 / self.boundary_rate

    def pooled_layers(self, depth: int) -> list[int]:
        """Indices of the decoder layers that run pooled in a model of ``depth`` layers (empty: the dense model).

        Raises :class:`ConfigError` when ``pre_layers + post_layers`` exceeds ``depth``.
        """
        if self.pre_layers + self.post_layers > depth:
            raise ConfigError(
                f"pre_layers, post_layers: {self.pre_layers} + {self.post_layers} full-resolution layers exceed the "
                f"model's {depth} decoder layers; choose pre_layers + post_layers <= {depth} (equal pools nothing)",
                field="pre_layers")
        if self.boundary_rate >= 1.0:
            return []
        return list(range(self.pre_layers, depth - self.post_layers))

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The boundary predictor (``boundaries="learned"``) on the device and dtype of the first pooled layer.

        Example:
            >>> list(cfg.learned_modules(model, adapter))           # doctest: +SKIP
            ['token_pooling']
        """
        blocks = adapter.blocks(model)
        self.pooled_layers(len(blocks))  # a clear error before anything is attached
        if self.boundaries != "learned":
            return {}
        dim = getattr(model.config.get_text_config(decoder=True), "hidden_size", None)
        if not isinstance(dim, int):
            raise UnsupportedModelError(f"token_pooling: cannot find the hidden size of {type(model).__name__}")
        predictor = BoundaryPredictor(dim, self.predictor_dim, self.boundary_rate)
        first = blocks[min(self.pre_layers, len(blocks) - 1)]
        parameter = next(first.parameters(), None)
        if parameter is not None:
            predictor.to(device=parameter.device, dtype=parameter.dtype)
        predictor.train(model.training)
        return {MODULE_NAME: predictor}


__all__ = ["BYTE_BOS_ID", "BYTE_EOS_ID", "BYTE_PAD_ID", "BYTE_VOCAB_SIZE", "BYTE_WHITESPACE_IDS", "BoundaryPredictor",
           "PoolingPlan", "TokenPoolingConfig", "binomial_prior_loss", "decode_bytes", "encode_bytes",
           "gumbel_sigmoid_boundaries", "pooling_plan", "whitespace_boundaries", "whitespace_token_ids"]
