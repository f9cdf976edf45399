"""DCP: Dynamic Context Pruning (Anagnostidis et al., "Dynamic Context Pruning for Efficient and Interpretable
Autoregressive Transformers", NeurIPS'23, arXiv 2305.15805).

DCP adds to every layer a small learned *interaction* between the current token and each earlier one: the
query side and the key side are projected to a few dimensions (``rank``), and their dot product plus a bias is
a gate logit ``g[n, j]`` (token ``n`` deciding about context token ``j``). A token stays in the context while
every later token has kept it: its keep probability at step ``n`` is ``prod_{m=j+1..n} sigmoid(g[m, j])``, so a
token once dropped is dropped for good and its KV entry can be freed. In training the gates are soft and their
log (a sum of log-sigmoids) is added to the attention logits, so the language-modelling loss reaches the
projections; a regulariser pulls the dropped fraction toward a target.

Here DCP is a KV policy (stage ``"kv_policy"``, per-step compression, :mod:`hf_tokred.kv.policy`): each layer's
cache accumulates, for every stored token, the log keep probability ``sum_m logsigmoid(g[m, j])`` over every
query that has seen it (the prompt's queries at prefill, then one per decoding step), and once the cache is over
its budget the token with the lowest accumulated value is evicted and its KV entry freed. ``sparsity`` (the
fraction of the context dropped; ``keep = 1 - sparsity``) sets the budget; the sinks and recent window shared
by every hf_tokred policy are protected. The learned part (:class:`DCPGates`, one query and one key projection
and a bias per layer and KV head) is ``model.hf_tokred_modules["dcp"]``, saved to ``token_reduction.safetensors``;
train it with :func:`hf_tokred.training.train_dcp` (``hf-tokred train dcp``).

**Dense-equivalent**: ``sparsity=0`` (``keep=1.0``) never evicts and computes no gate: outputs are
bit-identical to the dense model.

Where we depart from the paper:

* **budget instead of a threshold**: the paper drops a token as soon as its gate reaches exactly zero (a sparse
  sigmoid), so the memory saved varies with the text; we keep a user-set budget (``sparsity``) and drop the
  tokens with the lowest accumulated log keep probability, so the cache size is known in advance and the trained
  gates serve any sparsity;
* **inputs of the projections**: the paper projects the layer's hidden states; ours project what the cache
  already holds, the post-RoPE queries (the query heads sharing a KV head, concatenated) and stored keys, each
  RMS-normalised per head, so no extra per-token state is kept; one interaction per KV head (GQA) rather than
  per layer;
* **soft gate**: a plain sigmoid (no alpha-sigmoid annealed toward sparsity); the regulariser is quadratic
  around the target fraction of dropped (query, key) pairs per layer (the paper: a linear penalty with a weight
  gamma), and the loss is the KL divergence to the dense model's next-token distribution (the paper: the
  language-modelling loss while fine-tuning the whole model; here the model stays frozen).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="dcp", sparsity=0.5)
    >>> cfg.keep, cfg.budget(1000)
    (0.5, 500)
    >>> TokenReductionConfig(method="dcp", keep=0.75).sparsity
    0.25
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError
from ...kv.policy import KVPolicyConfig

MODULE_NAME = "dcp"
DEFAULT_SPARSITY = 0.5
INIT_BIAS = 5.0  # sigmoid(5) = 0.993 per step: a token seen by ~100 later queries keeps about half its weight
INIT_SCALE = 0.1  # initial size of the interaction term against the bias
_QUERY_CHUNK = 256  # queries scored at once at prefill (bounds the (queries, slots) buffer)


def _rms_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)


class DCPGates(nn.Module):
    """The learned interactions of every decoder layer: per layer and KV head, a query projection
    ``(groups * head_dim, rank)``, a key projection ``(head_dim, rank)`` and a bias.

    Example:
        >>> import torch
        >>> gates = DCPGates(num_layers=2, kv_heads=1, groups=2, head_dim=4, rank=3)
        >>> gates.logits(0, torch.randn(1, 2, 5, 4), torch.randn(1, 1, 7, 4)).shape
        torch.Size([1, 1, 5, 7])
    """

    def __init__(self, num_layers: int, kv_heads: int, groups: int, head_dim: int, rank: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # applying the reduction leaves the global RNG alone
        q_in, k_in = groups * head_dim, head_dim
        self.query = nn.Parameter(torch.randn(num_layers, kv_heads, q_in, rank, generator=generator) / math.sqrt(q_in))
        self.key = nn.Parameter(torch.randn(num_layers, kv_heads, k_in, rank, generator=generator) * INIT_SCALE
                                / math.sqrt(k_in))
        self.bias = nn.Parameter(torch.full((num_layers, kv_heads), INIT_BIAS))
        self.rank = rank

    def logits(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Gate logits ``(batch, kv_heads, q, slots)`` of queries ``(batch, heads, q, dim)`` against keys
        ``(batch, kv_heads, slots, dim)`` at decoder layer ``layer_idx`` (float32)."""
        return self.logits_of_features(layer_idx, query, self.key_features(layer_idx, keys))

    def key_features(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """The keys' low-rank gate features ``(batch, kv_heads, slots, rank)``: computed once, scored by many queries."""
        return torch.einsum("bhkd,hdr->bhkr", _rms_normalize(keys), self.key[layer_idx])

    def logits_of_features(self, layer_idx: int, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` against keys already turned into :meth:`key_features`."""
        batch, heads, length, dim = query.shape
        kv_heads = features.shape[1]
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, length, dim).transpose(2, 3)
        grouped = _rms_normalize(grouped).reshape(batch, kv_heads, length, -1)
        q = torch.einsum("bhqd,hdr->bhqr", grouped, self.query[layer_idx])
        return q @ features.transpose(-1, -2) / math.sqrt(self.rank) + self.bias[layer_idx][None, :, None, None]


def soft_log_mask(gates: DCPGates, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, sink_tokens: int = 0,
                  window: int = 0) -> torch.Tensor:
    """The training mask of one layer for a full causal sequence: ``(batch, kv_heads, n, n)`` log keep
    probabilities ``M[n, j] = sum_{j < m <= n} logsigmoid(g[m, j])`` (0 on the diagonal, for the first
    ``sink_tokens`` keys and the last ``window`` positions before each query), ``-inf`` above the diagonal.

    Example:
        >>> import torch
        >>> gates = DCPGates(num_layers=1, kv_heads=1, groups=1, head_dim=4, rank=2)
        >>> mask = soft_log_mask(gates, 0, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
        >>> bool(mask[0, 0, 0, 0] == 0), bool(mask[0, 0, 0, 1] == float("-inf")), bool(mask[0, 0, 2, 0] < 0)
        (True, True, True)
    """
    n = query.shape[-2]
    logits = gates.logits(layer_idx, query, keys)
    rows = torch.arange(n, device=query.device)
    later = rows[:, None] > rows[None, :]  # query m strictly after key j
    log_keep = torch.nn.functional.logsigmoid(logits).masked_fill(~later, 0.0).cumsum(dim=-2)
    protected = (rows[None, :] < sink_tokens) | (rows[:, None] - rows[None, :] < window)
    log_keep = log_keep.masked_fill(protected, 0.0)
    return log_keep.masked_fill(rows[:, None] < rows[None, :], float("-inf"))


def accumulated_log_keep(gates: DCPGates, layer_idx: int, query: torch.Tensor, keys: torch.Tensor,
                         key_positions: torch.Tensor, first_query: int) -> torch.Tensor:
    """``sum_m logsigmoid(g[m, j])`` over this call's queries ``m`` (at positions ``first_query`` onwards) that
    come after each stored key ``j``: ``(batch, kv_heads, slots)``, what a cache layer adds to its tokens'
    scores after an attention call."""
    total = torch.zeros(key_positions.shape, dtype=torch.float32, device=keys.device)
    features = gates.key_features(layer_idx, keys)
    for start in range(0, query.shape[-2], _QUERY_CHUNK):
        chunk = query[:, :, start:start + _QUERY_CHUNK]
        positions = torch.arange(first_query + start, first_query + start + chunk.shape[-2], device=keys.device)
        # only the slots up to the last one holding a key before this chunk's last query can gain a term: at
        # prefill (slots in position order) that is the lower triangle of the (queries, slots) block, not all of it
        before = (key_positions < positions[-1]).flatten(0, -2).any(dim=0).nonzero()
        if before.numel() == 0:
            continue
        width = int(before[-1]) + 1
        later = key_positions[:, :, None, :width] < positions[None, None, :, None]
        logs = torch.nn.functional.logsigmoid(gates.logits_of_features(layer_idx, chunk, features[:, :, :width]))
        total[..., :width] += logs.masked_fill(~later, 0.0).sum(dim=2)
    return total


def _model_shape(model) -> dict:
    """Layers, KV heads, query groups and head size of a decoder (from its config)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        heads, layers = int(config.num_attention_heads), int(config.num_hidden_layers)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError) as err:
        raise UnsupportedModelError(f"dcp: {type(model).__name__}'s config does not describe its attention heads "
                                    f"({err})") from None
    return {"num_layers": layers, "kv_heads": kv_heads, "groups": heads // kv_heads, "head_dim": head_dim}


@register_method("dcp")
@dataclass(kw_only=True)
class DCPConfig(KVPolicyConfig):
    """Learned interaction gates that drop context tokens for good during generation (arXiv 2305.15805).

    Set the budget with ``sparsity`` (fraction of the context dropped), or with the base policy's ``keep`` or
    ``max_tokens``; with none of them ``sparsity`` is 0.5. The trained gates come from ``weights_from`` /
    ``from_pretrained`` (the folder ``hf-tokred train dcp`` saves).
    """

    paper: ClassVar[str] = "2305.15805"
    status: ClassVar[str] = "beta"  # target met (+1.4% ppl at 50%), but training-free h2o does better: docs/learned_lm.md
    learned: ClassVar[bool] = True
    compression: ClassVar[str] = "step"
    buffers: ClassVar[tuple[str, ...]] = ("log_keep",)

    sparsity: float | None = param(None, float, low=0.0, high=1.0, high_open=True, optional=True,
                                   help="fraction of the context's tokens dropped (0 = dense; keep = 1 - sparsity); "
                                        "0.5 when no budget is set")
    rank: int = param(16, int, low=1, high=1024, help="size of the learned query/key interaction vectors")

    def validate(self) -> None:
        if self.sparsity is not None:
            implied = 1.0 - self.sparsity
            if self.max_tokens is not None:
                raise ConfigError(f"sparsity: set either sparsity or max_tokens, not both (got sparsity={self.sparsity}, "
                                  f"max_tokens={self.max_tokens})", field="sparsity")
            if self.keep is not None and not math.isclose(self.keep, implied, abs_tol=1e-9):
                raise ConfigError(f"sparsity: sparsity={self.sparsity} means keep={implied:g}, but keep={self.keep}; "
                                  "set one of them", field="sparsity")
            self.keep = round(implied, 12)
        elif self.keep is None and self.max_tokens is None:
            self.sparsity, self.keep = DEFAULT_SPARSITY, 1.0 - DEFAULT_SPARSITY
        elif self.keep is not None:
            self.sparsity = round(1.0 - self.keep, 12)
        super().validate()

    # -- learned part --------------------------------------------------------------------------

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """``{"dcp": DCPGates}`` sized for ``model`` (every decoder layer), on the device of its attention.

        A file trained for another base model (other layer count, head size or KV heads) fails the shape check
        of ``token_reduction.safetensors`` with the tensor's name and both shapes.
        """
        shape = _model_shape(model)
        if shape["num_layers"] != len(adapter.attention_modules(model)):
            raise UnsupportedModelError(f"dcp: {type(model).__name__} has {len(adapter.attention_modules(model))} "
                                        f"attention modules but {shape['num_layers']} layers in its config")
        gates = DCPGates(rank=self.rank, **shape)
        device = next(iter(model.parameters())).device
        return {MODULE_NAME: gates.to(device)}

    def bind(self, model) -> DCPConfig:
        holder = model._modules.get("hf_tokred_modules")
        gates = holder[MODULE_NAME] if holder is not None and MODULE_NAME in holder else None
        if gates is None:
            raise TokenReductionError("dcp: the model carries no trained gates (model.hf_tokred_modules['dcp']); "
                                      "attach them with hf_tokred.apply(model, cfg, weights_from=folder) or "
                                      "from_pretrained(folder) of a folder saved by `hf-tokred train dcp`")
        bound = copy.copy(self)
        bound._gates = gates
        return bound

    def __deepcopy__(self, memo):
        # The fields are plain values; a copied cache shares the model's gates instead of copying them.
        copied = copy.copy(self)
        memo[id(self)] = copied
        return copied

    def _gates_of(self) -> DCPGates:
        gates = self.__dict__.get("_gates")
        if gates is None:
            raise TokenReductionError("dcp: the policy is not bound to a model; build its cache with "
                                      "hf_tokred.build_cache(model) or generate()")
        return gates

    # -- scoring -------------------------------------------------------------------------------

    def accumulate(self, layer, module, query):
        gates = self._gates_of()
        first = layer.seen - query.shape[-2]
        layer.buffers["log_keep"] += accumulated_log_keep(gates, layer.layer_idx, query, layer.keys,
                                                          layer.positions, first)

    def score(self, layer, module, query):
        return self.pooled(layer, layer.buffers["log_keep"])
