"""The encoder reducers' tensor functions against plain references, the attention statistics against the model's
own attention, and the reducer interface through test plugins (a two-step plan, a learned soft-mask pruner)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTForImageClassification, ViTModel

import hf_tokred
from hf_tokred.config import param, register_method
from hf_tokred.errors import TokenReductionError
from hf_tokred.integration.encoders import STATE_ATTR, token_counts, token_sizes
from hf_tokred.methods.encoder.atc import agglomerative_clusters
from hf_tokred.methods.encoder.ats import inverse_transform_sample
from hf_tokred.methods.encoder.base import (
    EncoderReducerConfig,
    KeepRateConfig,
    Reduction,
    SoftMask,
    keep_counts,
    keep_top,
    squeeze,
)
from hf_tokred.methods.encoder.tome import bipartite_soft_matching
from hf_tokred.methods.encoder.tps import squeeze_slots
from hf_tokred.methods.encoder.zero_tprune import pagerank, prune_by_importance_and_similarity

VISION = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=128)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_apply(slot, x, size, weight=None):
    """Slot-by-slot weighted average (the definition a Reduction must implement)."""
    batch, n, c = x.shape
    m = int(slot.max()) + 1
    weight = torch.ones(batch, n) if weight is None else weight
    out, out_size = torch.zeros(batch, m, c), torch.zeros(batch, m, 1)
    for b, s in itertools.product(range(batch), range(m)):
        members = (slot[b] == s).nonzero().flatten()
        if len(members) == 0:
            continue
        w = size[b, members, 0] * weight[b, members]
        out_size[b, s, 0] = size[b, members, 0].sum()
        if w.sum() > 0:
            out[b, s] = (w[:, None] * x[b, members]).sum(0) / w.sum()
    return out, out_size


# ---------------------------------------------------------------------------------------------
# Reduction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_reduction_from_slots_is_the_weighted_average_of_each_slot(weighted):
    g = gen(0)
    batch, n = 3, 11
    x = torch.randn(batch, n, 5, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    slot = torch.tensor([
        [0, 1, 1, 2, -1, 3, 3, 3, 4, -1, 2],
        [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, -1],   # more slots than row 0: row 0 gets a filler slot
        [0, 0, 0, 0, 1, 1, 1, -1, -1, -1, 2],
    ])
    weight = torch.rand(batch, n, generator=g) + 0.1 if weighted else None
    reduction = Reduction.from_slots(slot, weight)
    y, y_size = reduction.apply(x, size)
    ref, ref_size = reference_apply(slot, x, size, weight)
    assert reduction.num_slots == 7
    for b in range(batch):
        m = int(slot[b].max()) + 1
        assert torch.allclose(y[b, :m], ref[b, :m], atol=1e-6) and torch.equal(y_size[b, :m], ref_size[b, :m])
        assert (y_size[b, m:] == 0).all()
    assert torch.equal(reduction.slot_of(), slot)
    expanded = reduction.expand(y)
    kept = slot >= 0
    assert torch.equal(expanded[kept], y.gather(1, slot.clamp(min=0)[..., None].expand(-1, -1, 5))[kept])


def test_reduction_gradients_reach_every_member():
    x = torch.randn(1, 5, 3, requires_grad=True)
    reduction = Reduction.from_slots(torch.tensor([[0, 1, 1, 2, 2]]))
    y, _ = reduction.apply(x, torch.ones(1, 5, 1))
    y.sum().backward()
    assert torch.allclose(x.grad[0, :, 0], torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5]))


def test_keep_mask_and_keep_top():
    kept = torch.tensor([[True, False, True, True], [True, True, False, False]])
    reduction = Reduction.from_keep_mask(kept)
    assert reduction.keep.tolist()[0] == [0, 2, 3] and reduction.slot_valid.tolist() == [[True] * 3, [True, True, False]]
    score = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.3, 0.7]])
    top = keep_top(score, torch.tensor([2]), protected=1)
    assert top.keep.tolist() == [[0, 2, 5]] and top.src is None
    valid = torch.tensor([[True, True, True, True, False, False]])
    assert keep_top(score, torch.tensor([2]), protected=1, valid=valid).keep.tolist() == [[0, 2, 3]]
    assert keep_counts(torch.tensor([196, 3, 1, 0]), 0.5).tolist() == [98, 2, 1, 0]


def test_evit_fused_token_is_the_attention_weighted_average_of_the_rest():
    g = gen(1)
    x = torch.randn(2, 9, 4, generator=g)
    attention = torch.rand(2, 9, generator=g)
    reduction = keep_top(attention, torch.tensor([3, 3]), protected=1, fuse_rest=attention)
    y, size = reduction.apply(x, torch.ones(2, 9, 1))
    for b in range(2):
        order = attention[b, 1:].argsort(descending=True) + 1
        kept, rest = order[:3].sort().values, order[3:]
        assert torch.allclose(y[b, 1:4], x[b, kept])
        fused = (attention[b, rest, None] * x[b, rest]).sum(0) / attention[b, rest].sum()
        assert torch.allclose(y[b, 4], fused, atol=1e-6) and size[b, 4, 0] == 5


def test_tome_matching_as_a_reduction_matches_merge_wavg():
    from hf_tokred.methods.encoder.tome import merge_wavg

    g = gen(2)
    x = torch.randn(3, 17, 8, generator=g)
    size = torch.randint(1, 3, (3, 17, 1), generator=g).float()
    merge = bipartite_soft_matching(x, r=6, protected=1)
    y, s = merge.to_reduction().apply(x, size)
    y_ref, s_ref = merge_wavg(merge, x, size)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.equal(s, s_ref)


# ---------------------------------------------------------------------------------------------
# ATS, Zero-TPrune, ATC, TPS
# ---------------------------------------------------------------------------------------------


def test_ats_sampling_is_adaptive_and_respects_protected_and_padding():
    peaked = torch.tensor([[1.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    flat = torch.ones(1, 9)
    budget = torch.tensor([4])
    few = inverse_transform_sample(peaked, budget, protected=1)
    many = inverse_transform_sample(flat, budget, protected=1)
    assert few[0, 0] and many[0, 0]  # protected
    assert few[0, 1:].sum() < many[0, 1:].sum() == 4  # a dominant token takes most samples: fewer tokens
    assert few[0, 1]
    valid = torch.tensor([[True] * 6 + [False] * 3])
    padded = inverse_transform_sample(flat, torch.tensor([3]), protected=1, valid=valid)
    assert not padded[0, 6:].any() and padded[0, 1:6].sum() == 3
    # Batched rows sample exactly as alone, each with its own budget.
    scores = torch.rand(3, 12, generator=gen(3))
    budgets = torch.tensor([5, 2, 8])
    batched = inverse_transform_sample(scores, budgets, protected=1)
    for b in range(3):
        assert torch.equal(batched[b], inverse_transform_sample(scores[b:b + 1], budgets[b:b + 1], protected=1)[0])
        assert 1 <= batched[b, 1:].sum() <= budgets[b]


def test_pagerank_reaches_the_stationary_vector():
    attention = torch.softmax(torch.randn(2, 7, 7, generator=gen(4)), dim=-1)
    score = pagerank(attention, iterations=200)
    assert torch.allclose(torch.bmm(attention.transpose(1, 2), score[..., None])[..., 0], score, atol=1e-6)
    assert torch.allclose(score.sum(1), torch.ones(2))


def test_zero_tprune_stages():
    importance = torch.tensor([[10.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    metric = torch.randn(1, 7, 16, generator=gen(5))
    metric[0, 4] = metric[0, 1] * 2  # token 4 (a candidate: odd rank) duplicates token 1 (a target)
    # Only importance: the two least important go.
    keep = prune_by_importance_and_similarity(importance, metric, torch.tensor([2]), 1, None, 0.0)
    assert keep.tolist() == [[True] * 5 + [False] * 2]
    # Half by similarity: the least important (6) by importance, then the duplicate (4) by similarity.
    keep = prune_by_importance_and_similarity(importance, metric, torch.tensor([2]), 1, None, 0.5)
    assert keep.tolist() == [[True, True, True, True, False, True, False]]


def reference_clusters(metric, size, k, linkage):
    """Naive agglomerative clustering from member lists (no Lance-Williams), one row, no protected tokens."""
    x = torch.nn.functional.normalize(metric, dim=-1)
    d = 1 - x @ x.T
    clusters = [[i] for i in range(len(x))]

    def dist(a, b):
        pairs = torch.stack([d[i, j] for i in a for j in b])
        if linkage == "single":
            return pairs.min()
        if linkage == "complete":
            return pairs.max()
        w = torch.tensor([size[i] * size[j] for i in a for j in b])
        return (w * pairs).sum() / w.sum()

    while len(clusters) > k:
        a, b = min(itertools.combinations(range(len(clusters)), 2),
                   key=lambda p: float(dist(clusters[p[0]], clusters[p[1]])))
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return sorted(sorted(c) for c in clusters)


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_agglomerative_clustering_matches_a_naive_reference(linkage):
    g = gen(6)
    metric = torch.randn(2, 10, 6, generator=g)
    size = torch.randint(1, 4, (2, 10), generator=g).float()
    roots = agglomerative_clusters(metric, size, torch.tensor([4, 6]), protected=0, linkage=linkage)
    for b, k in enumerate([4, 6]):
        found = sorted(sorted((roots[b] == r).nonzero().flatten().tolist()) for r in roots[b].unique().tolist())
        assert found == reference_clusters(metric[b], size[b], k, linkage)
        assert all(roots[b, i] == min(c) for c in found for i in c)


def test_agglomerative_clustering_keeps_protected_and_padding_alone():
    metric = torch.ones(1, 6, 3)  # every token identical: protected and padding must still stay alone
    metric[0, :, 0] += torch.arange(6) * 1e-3
    valid = torch.tensor([[True, True, True, True, False, False]])
    roots = agglomerative_clusters(metric, torch.ones(1, 6), torch.tensor([1]), protected=1, valid=valid)
    assert roots.tolist() == [[0, 1, 1, 1, 4, 5]]


def test_tps_squeezes_pruned_tokens_into_their_most_similar_kept_token():
    g = gen(7)
    hidden = torch.randn(1, 8, 16, generator=g)
    kept = torch.tensor([[True, True, False, True, False, True, False, False]])
    hidden[0, 4] = hidden[0, 3] + 0.01 * torch.randn(16, generator=g)  # token 4 resembles kept token 3
    slot, weight = squeeze_slots(hidden, kept, protected=1)
    own = {0: 0, 1: 1, 3: 2, 5: 3}
    assert all(slot[0, i] == s for i, s in own.items())
    assert slot[0, 4] == own[3] and 0.99 < weight[0, 4] <= 1.0
    assert (slot[0, [2, 6, 7]] != 0).all()  # the protected CLS never hosts
    y, size = Reduction.from_slots(slot, weight).apply(hidden, torch.ones(1, 8, 1))
    assert size.sum() == 8 and y.shape == (1, 4, 16)


def test_squeezed_slots_are_anchored_by_their_kept_token():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])
    kept = torch.tensor([[False, False, True, True]])  # tokens 0 and 1 fold into the later tokens 2 and 3
    r = squeeze(hidden, kept, protected=0)
    assert r.keep.tolist() == [[2, 3]] and r.slot_of().tolist() == [[0, 1, 0, 1]]
    assert Reduction.from_slots(r.slot_of()).keep.tolist() == [[0, 1]]  # without anchors: the first member
    y, size = r.apply(hidden, torch.ones(1, 4, 1))
    assert size.flatten().tolist() == [2.0, 2.0] and y.shape == (1, 2, 2)
    with pytest.raises(TokenReductionError, match="not both"):
        keep_top(torch.rand(1, 4), torch.tensor([2]), 0, fuse_rest=torch.ones(1, 4), squeeze_into=hidden)


# ---------------------------------------------------------------------------------------------
# Attention statistics against the model's own attention
# ---------------------------------------------------------------------------------------------


@register_method("test_record_stats")
@dataclass(kw_only=True)
class RecordStats(EncoderReducerConfig):
    """Records what plan() sees; reduces nothing (the model stays dense)."""

    needs = frozenset({"cls_attention", "attention", "value_norm", "metric"})
    block: int = param(1, int, low=0)

    def schedule(self, num_blocks):
        return [i == self.block for i in range(num_blocks)]

    def plan(self, ctx):
        ctx.state.records["seen"] = ctx
        return None


@pytest.mark.parametrize("cls,config", [(ViTModel, ViTConfig(**VISION)), (SiglipVisionModel, SiglipVisionConfig(**VISION))])
def test_statistics_match_the_models_own_attention(cls, config):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=gen(8))
    with torch.no_grad():
        dense = model(pixel_values=pixels, output_attentions=True)
        hf_tokred.apply(model, RecordStats(block=1))
        out = model(pixel_values=pixels, output_attentions=True)
    assert torch.equal(out.last_hidden_state, dense.last_hidden_state)  # observing changes nothing
    seen = model.__dict__[STATE_ATTR].records["seen"]
    attention = dense.attentions[1]
    assert torch.allclose(seen.attention, attention, atol=1e-6)
    if seen.class_tokens:
        assert torch.allclose(seen.cls_attention, attention[:, :, 0].mean(1), atol=1e-6)
    else:  # SigLIP: attention received, averaged over heads and queries
        assert torch.allclose(seen.cls_attention, attention.mean(dim=(1, 2)), atol=1e-6)
    assert seen.metric.shape == (2, seen.num_tokens, 16) and seen.value_norm.shape == (2, seen.num_tokens)
    assert (seen.value_norm > 0).all() and not seen.training


# ---------------------------------------------------------------------------------------------
# The interface, through plugins: a two-step plan, a learned soft-mask pruner
# ---------------------------------------------------------------------------------------------


@register_method("test_prune_then_merge")
@dataclass(kw_only=True)
class PruneThenMerge(KeepRateConfig):
    """DiffRate-style: in each reducing block, prune by CLS attention, then merge with ToMe."""

    needs = frozenset({"cls_attention", "metric"})
    r: int = param(2, int, low=0)

    def plan(self, ctx):
        prune = keep_top(ctx.cls_attention, keep_counts(ctx.real_counts(), ctx.amount), ctx.protected, ctx.valid)
        metric = ctx.metric.gather(1, prune.keep[..., None].expand(-1, -1, ctx.metric.shape[-1]))
        merge = bipartite_soft_matching(metric, self.r, protected=ctx.protected).to_reduction()
        return [prune, merge]


def test_a_list_of_reductions_applies_in_sequence():
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**VISION)).eval()
    hf_tokred.apply(model, PruneThenMerge(keep_rate=0.5, layers=[1, 2], r=3, restore_length=True))
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32, generator=gen(9)))
    n1 = 1 + math.ceil(0.5 * 64) - 3
    n2 = 1 + math.ceil(0.5 * (n1 - 1)) - 3
    assert token_counts(model) == [65, n1, n2, 65]  # the last block's output is restored
    assert out.last_hidden_state.shape == (2, 65, 64)


@register_method("test_soft_pruner")
@dataclass(kw_only=True)
class SoftPruner(KeepRateConfig):
    """DynamicViT-style: a learned scorer before the reducing blocks; soft key weights in training, top-k in eval."""

    learned = True
    reduce_at = "input"

    def learned_modules(self, model, adapter):
        return {"scorer": torch.nn.Linear(model.config.hidden_size, 1)}

    def plan(self, ctx):
        logits = ctx.modules["scorer"](ctx.hidden)[..., 0]
        if ctx.training:
            weight = torch.sigmoid(logits)
            weight = torch.cat([torch.ones_like(weight[:, : ctx.protected]), weight[:, ctx.protected:]], dim=1)
            ctx.state.records.setdefault("weights", []).append(weight)
            return SoftMask(key_weight=weight)
        return keep_top(logits.detach(), keep_counts(ctx.real_counts(), ctx.amount), ctx.protected, ctx.valid)


def test_a_learned_soft_mask_pruner_trains_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VISION, num_labels=3))
    model.save_pretrained(tmp_path / "dense")
    model = ViTForImageClassification.from_pretrained(tmp_path / "dense",
                                                      token_reduction=SoftPruner(keep_rate=0.5, layers=[2]))
    pixels = torch.randn(2, 3, 32, 32, generator=gen(10))
    model.train()
    loss = model(pixel_values=pixels, labels=torch.tensor([0, 1])).loss
    weights = model.__dict__[STATE_ATTR].records["weights"]
    assert token_counts(model) == [65] * 4  # soft: nothing dropped in training
    (loss + weights[0].mean()).backward()
    scorer = model.hf_tokred_modules["scorer"]
    assert scorer.weight.grad is not None and scorer.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_()
        logits = model(pixel_values=pixels).logits
    assert token_counts(model) == [65, 65, 33, 33]  # hard drop at inference, before block 2
    model.save_pretrained(tmp_path / "reduced")
    again = ViTForImageClassification.from_pretrained(tmp_path / "reduced").eval()
    with torch.no_grad():
        assert torch.equal(again(pixel_values=pixels).logits, logits)
    assert torch.equal(token_sizes(again).sum(1), torch.full((2,), 33.0))
