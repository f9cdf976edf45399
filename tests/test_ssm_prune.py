"""ssm_prune: token pruning that keeps the scan order, on tiny random Mamba and Mamba-2 models (slow torch path)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    Mamba2Config,
    Mamba2ForCausalLM,
    Mamba2Model,
    MambaConfig,
    MambaForCausalLM,
    MambaModel,
)

import hf_tokred
from hf_tokred.errors import ConfigError, UnsupportedModelError
from hf_tokred.integration.ssm import last_pruning
from hf_tokred.methods.ssm.ssm_prune import select_tokens, token_scores

VOCAB = 64


def mamba_config(layers=4):
    return MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=layers, expand=2,
                       conv_kernel=4)


def mamba2_config(layers=4):
    return Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=layers, expand=2,
                        head_dim=8, num_heads=8, n_groups=1, chunk_size=8, conv_kernel=4)


def build(kind, head=True, layers=4):
    torch.manual_seed(0)
    if kind == "mamba":
        cls = MambaForCausalLM if head else MambaModel
        return cls(mamba_config(layers)).eval()
    cls = Mamba2ForCausalLM if head else Mamba2Model
    return cls(mamba2_config(layers)).eval()


def ids(batch=2, n=13, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def backbone(model):
    return getattr(model, "backbone", model)


def reference_forward(model, input_ids, prune_layer, kept_index, with_head=True):
    """Dense blocks before ``prune_layer``, the later blocks on the gathered kept tokens, carried states elsewhere."""
    base = backbone(model)
    with torch.no_grad():
        hidden = base.embeddings(input_ids)
        for block in base.layers[:prune_layer]:
            hidden = block(hidden)
        carried = hidden.clone()
        kept = hidden.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        for block in base.layers[prune_layer:]:
            kept = block(kept)
        carried.scatter_(1, kept_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), kept)
        out = base.norm_f(carried)
        return model.lm_head(out) if with_head else out


def output(model, input_ids, **kwargs):
    with torch.no_grad():
        out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


KINDS = ["mamba", "mamba2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", [{"keep": 1.0, "layers": [1, 2]}, {"keep": 0.5, "layers": []}])
def test_noop_settings_are_bit_identical(kind, settings):
    model = build(kind)
    x = ids()
    dense = output(model, x)
    hf_tokred.apply(model, {"method": "ssm_prune", **settings})
    assert torch.equal(output(model, x), dense)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_the_dense_model(kind):
    model = build(kind)
    x = ids()
    dense = output(model, x)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [1]})
    assert not torch.equal(output(model, x), dense)
    hf_tokred.remove(model)
    assert torch.equal(output(model, x), dense)
    assert not hasattr(model.config, "token_reduction")


@pytest.mark.parametrize("kind", KINDS)
def test_matches_a_reference_scan_over_the_kept_tokens_in_order(kind):
    model = build(kind)
    x = ids(n=16)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [2]})
    pruned = output(model, x)
    record = last_pruning(model)
    assert record.tokens_per_block == [16, 16, 8, 8]
    assert record.kept.sum(1).tolist() == [8, 8]
    assert record.kept[:, 0].all() and record.kept[:, -1].all()  # protect_first / protect_last
    kept_index = torch.stack([row.nonzero().squeeze(1) for row in record.kept])  # ascending: the scan order
    hf_tokred.remove(model)
    expected = reference_forward(model, x, 2, kept_index)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_token_counts_over_several_pruning_blocks(kind):
    model = build(kind, head=False, layers=5)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [1, 3], "protect_first": 2})
    out = output(model, ids(batch=3, n=20))
    assert out.shape == (3, 20, 32)
    record = last_pruning(model)
    assert record.tokens_per_block == [20, 10, 10, 5, 5]
    assert record.kept.sum(1).tolist() == [5, 5, 5]
    assert record.kept[:, :2].all() and record.kept[:, -1].all()


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_equals_each_row_alone(kind):
    model = build(kind)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.6, "layers": [1, 2]})
    long, short = ids(batch=1, n=14, seed=3), ids(batch=1, n=9, seed=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    batched = output(model, batch, attention_mask=mask)
    counts = last_pruning(model).kept.sum(1).tolist()
    alone_long = output(model, long)
    alone_short = output(model, short)
    assert counts == [6, 4]  # ceil(0.6 * ceil(0.6 * 14)) = 6, ceil(0.6 * ceil(0.6 * 9)) = 4
    torch.testing.assert_close(batched[0], alone_long[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1, 5:], alone_short[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_continues_from_the_state_of_the_pruned_prefill(kind):
    model = build(kind)
    prompt, step = ids(batch=1, n=12, seed=5), torch.tensor([[7]])
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [2]})
    with torch.no_grad():
        prefill = model(input_ids=prompt, use_cache=True)
        kept_index = last_pruning(model).kept[0].nonzero().squeeze(1)
        decoded = model(input_ids=step, cache_params=prefill.cache_params, use_cache=True).logits[0, -1]
    assert last_pruning(model).tokens_per_block == [1, 1, 1, 1]  # one-token steps run dense
    hf_tokred.remove(model)
    # Reference without a cache: blocks 0-1 see the whole prompt and the new token, blocks 2-3 the kept ones and it.
    full = torch.cat([prompt, step], 1)
    expected = reference_forward(model, full, 2, torch.cat([kept_index, torch.tensor([12])]).unsqueeze(0))[0, -1]
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_runs_on_a_pruned_prompt(kind):
    model = build(kind)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [1]})
    out = model.generate(ids(batch=1, n=10), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 14)


@pytest.mark.parametrize("score", ["norm", "clipped"])
def test_training_mode_backward_and_other_scores(score):
    model = build("mamba").train()
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [1], "score": score})
    x = ids(n=10)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert backbone(model).layers[3].mixer.in_proj.weight.grad is not None
    model.activation_checkpointing_enable()
    with pytest.raises(hf_tokred.errors.TokenReductionError, match="checkpointing"):
        model(input_ids=x, labels=x)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_pass_runs_the_model_dense(kind):
    from hf_tokred.training import dense_pass

    model = build(kind)
    x = ids()
    dense = output(model, x)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [1]})
    with dense_pass(model):
        assert torch.equal(output(model, x), dense)
    assert not torch.equal(output(model, x), dense)


def test_scores_and_selection_keep_order_and_protected_tokens():
    hidden = torch.tensor([[[1.0], [9.0], [2.0], [8.0], [3.0], [0.5]]])
    scores = token_scores(hidden, None, "norm")
    chosen = select_tokens(scores, None, 0.5, protect_first=1, protect_last=1)
    assert chosen.index.tolist() == [[0, 1, 5]]  # ceil(0.5 * 6) = 3: both protected + the top score, in order
    assert select_tokens(scores, None, 1.0, 1, 1) is None
    valid = torch.tensor([[False, False, True, True, True, True]])
    chosen = select_tokens(scores, valid, 0.5, 1, 1)
    assert chosen.valid.sum().item() == 2 and chosen.index[chosen.valid].tolist() == [2, 5]


def test_bad_settings_and_unsupported_models_raise_clear_errors():
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="ssm_prune", keep=0.0)
    assert err.value.field == "keep"
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="ssm_prune", layers=[3, 1])
    assert err.value.field == "layers"
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="ssm_prune", score="attention")
    assert err.value.field == "score"
    model = build("mamba")
    before = copy.deepcopy(model.state_dict())
    x = ids()
    dense = output(model, x)
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, {"method": "ssm_prune", "layers": [4]})
    assert err.value.field == "layers" and "4 blocks" in str(err.value)
    assert hf_tokred.integration.wiring.get_applied(model) is None
    assert torch.equal(output(model, x), dense)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="ssm"):
        hf_tokred.apply(bert, {"method": "ssm_prune", "layers": [1]})


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_keep_the_reduction(kind, tmp_path):
    model = build(kind)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [1]})
    x = ids()
    pruned = output(model, x)
    model.save_pretrained(tmp_path / "pruned")
    again = type(model).from_pretrained(tmp_path / "pruned").eval()
    assert torch.equal(output(again, x), pruned)
    assert last_pruning(again).tokens_per_block == [13, 7, 7, 7]


def test_ssm_bench_reports_flops_and_exactness():
    import argparse

    from hf_tokred.bench.ssm import add_command, format_ssm, run_ssm

    record = run_ssm(24, ["0.5@1", "0.7@0,1"], num_layers=2, hidden_size=64, repeats=1, log=lambda *a: None)
    assert record["exactness"]["all_identical"]
    dense, half, twice = record["rows"]
    assert half["tokens_per_block"] == [24, 12] and twice["tokens_per_block"] == [17, 12]
    assert dense["flops_saved"] == 0 and 0 < half["flops_saved"] < twice["flops_saved"] < 0.5  # the LM head is not pruned
    assert "keep 0.5 @ [1]" in format_ssm(record)
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["ssm-bench", "--tokens", "64", "--settings", "0.6@3", "0.5@2,4"])
    assert args.settings[1] == {"method": "ssm_prune", "keep": 0.5, "layers": [2, 4]}
    with pytest.raises(SystemExit):
        parser.parse_args(["ssm-bench", "--settings", "half"])


@pytest.mark.parametrize("kind", KINDS)
def test_padded_generate_equals_each_row_alone(kind):
    model = build(kind)
    hf_tokred.apply(model, {"method": "ssm_prune", "keep": 0.5, "layers": [1, 2]})
    long, short = ids(batch=1, n=12, seed=6), ids(batch=1, n=8, seed=7)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    together = model.generate(batch, attention_mask=mask, **options)
    assert torch.equal(together[0, 12:], model.generate(long, **options)[0, 12:])
    assert torch.equal(together[1, 12:], model.generate(short, **options)[0, 8:])
