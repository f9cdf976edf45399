"""Token Dropping (arXiv 2203.13240): the middle blocks of a BERT-family encoder see only the hard tokens (by the
running MLM loss of their ids); tiny random BertForMaskedLM for plumbing, the recipe and the CLI at tiny settings."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    TrainingArguments,
    ViTConfig,
    ViTModel,
)

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError, UnsupportedModelError
from hf_tokred.integration.token_dropping import (
    importance_table,
    keep_positions,
    last_drop,
    mlm_token_losses,
    track_importance,
)
from hf_tokred.methods.nlp.token_dropping import ImportanceTable
from hf_tokred.recipes.token_dropping import train_token_dropping

LAYERS, VOCAB, CLS, SEP, MASK, PAD = 4, 60, 2, 3, 4, 0
SPECIAL = [PAD, CLS, SEP, MASK]


def make_mlm(seed=0, layers=LAYERS, dropout=0.0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, pad_token_id=PAD)
    config._attn_implementation = "sdpa"
    return BertForMaskedLM(config).eval()


def cfg(**kw):
    return {"method": "token_dropping", "keep": 0.5, "keep_ids": SPECIAL, **kw}


def padded_batch(lengths=(12, 9, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, 0], ids[row, n - 1] = CLS, SEP
        ids[row, n:] = PAD
    return ids, mask


def block_lengths(model):
    """Record, for every block, the sequence length and the real tokens per row it receives."""
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is None:
            real = torch.full((hidden.shape[0],), hidden.shape[1])
        else:
            keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            real = keep.expand(hidden.shape[0], -1, -1, -1)[:, 0, -1 if keep.shape[-2] == 1 else 0].sum(-1)
        seen.append((hidden.shape[1], real.tolist()))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.bert.encoder.layer]
    return seen, handles


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_layers_and_schedule():
    c = TokenReductionConfig(method="token_dropping")
    assert c.layers(12) == (6, 11) and c.layers(6) == (3, 5) and c.restore_block(6) == 5
    assert c.schedule(6) == [None, None, None, 0.5, None, None]
    assert TokenReductionConfig(method="token_dropping", keep=1.0).schedule(6) == [None] * 6
    assert TokenReductionConfig.coerce(c.to_dict()) == c


@pytest.mark.parametrize("fields, field", [
    ({"keep": 0.0}, "keep"), ({"keep": 1.5}, "keep"), ({"drop_layer": 0}, "drop_layer"),
    ({"drop_layer": 3, "restore_layer": 3}, "drop_layer"), ({"beta": 1.0}, "beta"), ({"init_loss": -1.0}, "init_loss"),
    ({"keep_ids": [-1]}, "keep_ids"),
])
def test_bad_fields(fields, field):
    with pytest.raises(ConfigError) as err:
        TokenReductionConfig(method="token_dropping", **fields)
    assert err.value.field.split("[")[0] == field


@pytest.mark.parametrize("fields, field", [({"restore_layer": 4}, "restore_layer"), ({"drop_layer": 3}, "drop_layer")])
def test_layers_must_fit_the_model_and_leave_it_untouched(fields, field):
    model = make_mlm()
    ids, mask = padded_batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, cfg(**fields))
    assert err.value.field == field
    assert hf_tokred.integration.wiring.get_applied(model) is None and "hf_tokred_modules" not in model._modules
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_image_encoder_is_refused_untouched():
    vit = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                             intermediate_size=64)).eval()
    pixels = torch.randn(1, 3, 16, 16)
    before = vit(pixel_values=pixels).last_hidden_state
    with pytest.raises(UnsupportedModelError, match="does not read token ids"):
        hf_tokred.apply(vit, {"method": "token_dropping"})
    assert hf_tokred.integration.wiring.get_applied(vit) is None
    assert torch.equal(vit(pixel_values=pixels).last_hidden_state, before)


# ---------------------------------------------------------------------------------------------
# The reduction
# ---------------------------------------------------------------------------------------------


def test_keep_one_is_bit_identical_and_remove_restores():
    model, dense = make_mlm(), make_mlm()
    ids, mask = padded_batch()
    hf_tokred.apply(model, cfg(keep=1.0))
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, dense(input_ids=ids, attention_mask=mask).logits)
    hf_tokred.apply(model, cfg(keep=0.3))
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           dense(input_ids=ids, attention_mask=mask).logits)
    hf_tokred.remove(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, dense(input_ids=ids, attention_mask=mask).logits)


def test_exact_counts_forced_tokens_and_full_length_at_the_ends():
    model = make_mlm()
    hf_tokred.apply(model, cfg(keep=0.5))
    ids, mask = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[0, 4], labels[1, 6] = ids[0, 4], ids[1, 6]   # labelled positions must stay
    ids[0, 4] = MASK
    ids[2, 2] = SEP                                        # a keep_id in the middle of a row
    seen, handles = block_lengths(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()
    assert out.logits.shape[:2] == ids.shape                 # output at full length
    real = mask.sum(1)
    forced = torch.isin(ids, torch.tensor(SPECIAL)) & mask.bool() | (labels != -100)
    droppable = (real - forced.sum(1)).double()
    expected = (forced.sum(1) + torch.ceil(droppable * 0.5)).tolist()   # CLS is a keep_id here
    assert seen[0] == (12, real.tolist()) and seen[1] == (12, real.tolist())   # blocks 0, 1: full
    assert seen[2] == (max(expected), expected)                                 # block 2: the kept tokens only
    assert seen[3] == (12, real.tolist())      # block 3 (restore_layer, the last) sees every token again
    record = last_drop(model)
    assert record.kept.sum(1).tolist() == expected
    assert bool(record.kept[forced].all()) and not bool(record.kept[~mask.bool()].any())
    assert bool(record.forced[0, 4]) and bool(record.forced[2, 2])


def test_last_block_sees_full_length():
    model = make_mlm()
    hf_tokred.apply(model, cfg(keep=0.25, drop_layer=1, restore_layer=3))
    lengths = []
    handles = [layer.register_forward_hook(lambda m, a, o: lengths.append(o[0].shape[1] if isinstance(o, tuple)
                                                                          else o.shape[1]))
               for layer in model.bert.encoder.layer]
    ids, mask = padded_batch(lengths=(12, 12))
    model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    assert lengths[0] == 12 and lengths[1] < 12 and lengths[2] < 12 and lengths[3] == 12


def test_dropped_tokens_come_back_with_their_pre_drop_state():
    """With restore_layer = last, a dropped token enters the last block with its output of block drop_layer - 1."""
    model = make_mlm()
    hf_tokred.apply(model, cfg(keep=0.3))
    inputs = {}
    hooks = [model.bert.encoder.layer[1].register_forward_hook(lambda m, a, o: inputs.__setitem__("before", o[0]
                                                                if isinstance(o, tuple) else o)),
             model.bert.encoder.layer[3].register_forward_pre_hook(
                 lambda m, a, k: inputs.__setitem__("restored", a[0] if a else k["hidden_states"]), with_kwargs=True)]
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    dropped = ~last_drop(model).kept & mask.bool()
    assert bool(dropped.any())
    assert torch.equal(inputs["restored"][dropped], inputs["before"][dropped])


def test_padded_batch_equals_rows_alone():
    model = make_mlm()
    hf_tokred.apply(model, cfg(keep=0.4))
    ids, mask = padded_batch()
    batch = model(input_ids=ids, attention_mask=mask).logits
    for row, n in enumerate(mask.sum(1).tolist()):
        alone = model(input_ids=ids[row:row + 1, :n]).logits
        torch.testing.assert_close(batch[row:row + 1, :n], alone, rtol=0, atol=1e-5)


def test_table_ranks_the_kept_tokens():
    model = make_mlm()
    hf_tokred.apply(model, cfg(keep=0.5))
    table = importance_table(model)
    ids = torch.tensor([[CLS, 10, 11, 12, 13, 14, 15, SEP]])
    table.loss[[10, 12, 14]] = 1.0          # easy: dropped first
    model(input_ids=ids)
    assert last_drop(model).kept[0].tolist() == [True, False, True, False, True, False, True, True]
    with keep_positions(model, ids == 12):  # an explicit position to keep (e.g. a masked one)
        model(input_ids=ids)
    assert last_drop(model).kept[0, 3] and last_drop(model).kept.sum() == 6   # 3 forced + ceil(0.5 * 5)


def test_distilbert_and_roberta():
    torch.manual_seed(0)
    distil = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=2, hidden_dim=64,
                                                    max_position_embeddings=64, dropout=0.0,
                                                    attention_dropout=0.0)).eval()
    roberta = RobertaForMaskedLM(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=70,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    ids, mask = padded_batch()
    for model in (distil, roberta):
        model.config._attn_implementation = "sdpa"
        dense = copy.deepcopy(model)
        hf_tokred.apply(model, cfg(keep=0.5))
        out = model(input_ids=ids, attention_mask=mask).logits
        assert out.shape[:2] == ids.shape
        assert last_drop(model).kept.sum(1).tolist() != mask.sum(1).tolist()
        hf_tokred.remove(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           dense(input_ids=ids, attention_mask=mask).logits)


def test_inputs_embeds_is_a_clear_error():
    model = make_mlm()
    hf_tokred.apply(model, cfg())
    with pytest.raises(TokenReductionError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 8, 32))


# ---------------------------------------------------------------------------------------------
# The importance table
# ---------------------------------------------------------------------------------------------


def test_table_update_math():
    table = ImportanceTable(6, init_loss=10.0, beta=0.9)
    table.update(torch.tensor([[1, 2, -100], [1, 1, 5]]), torch.tensor([[2.0, 3.0, 99.0], [4.0, 6.0, 1.0]]))
    # id 1: seen 3 times, mean 4 -> 0.9**3 * 10 + (1 - 0.9**3) * 4; id 2: 0.9 * 10 + 0.1 * 3; id 5: 0.9 * 10 + 0.1
    expected = torch.tensor([10.0, 0.729 * 10 + 0.271 * 4, 9.3, 10.0, 10.0, 9.1])
    torch.testing.assert_close(table.loss, expected)
    assert table.count.tolist() == [0, 3, 1, 0, 0, 1]
    table.update(torch.tensor([2]), torch.tensor([1.0]))
    torch.testing.assert_close(table.loss[2], torch.tensor(0.9 * 9.3 + 0.1 * 1.0))
    # the same as one occurrence at a time when the losses are equal
    a, b = ImportanceTable(3, beta=0.8), ImportanceTable(3, beta=0.8)
    a.update(torch.tensor([1, 1]), torch.tensor([2.0, 2.0]))
    b.update(torch.tensor([1]), torch.tensor([2.0]))
    b.update(torch.tensor([1]), torch.tensor([2.0]))
    torch.testing.assert_close(a.loss, b.loss)
    with pytest.raises(TokenReductionError):
        table.update(torch.tensor([6]), torch.tensor([1.0]))


def test_mlm_token_losses_and_track_importance():
    model = make_mlm()
    hf_tokred.apply(model, cfg(beta=0.5))
    ids, mask = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    with track_importance(model):
        model.eval()(input_ids=ids, attention_mask=mask, labels=labels)     # eval: no update
        assert int(importance_table(model).count.sum()) == 0
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()
    token_ids, losses = mlm_token_losses(out.logits.detach(), labels)
    assert token_ids.tolist() == ids[:, 1].tolist()
    torch.testing.assert_close(losses.mean(), out.loss.detach())
    expected = ImportanceTable(VOCAB, beta=0.5)
    expected.update(token_ids, losses)
    torch.testing.assert_close(importance_table(model).loss, expected.loss)
    model.train()(input_ids=ids, attention_mask=mask, labels=labels)        # the hook is gone
    assert int(importance_table(model).count.sum()) == 3


def test_trainer_callback_updates_the_table(tmp_path):
    from transformers import Trainer

    from hf_tokred.training import TokenDroppingCallback

    model = make_mlm()
    hf_tokred.apply(model, cfg())
    ids, mask = padded_batch(lengths=(12, 12, 12, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    data = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[TokenDroppingCallback()]).train()
    assert int(importance_table(model).count.sum()) == 4                     # 2 steps x 2 rows x 1 label
    assert importance_table(model).count[ids[:, 3]].sum() >= 4


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = make_mlm()
    hf_tokred.apply(model, cfg(keep=0.4))
    table = importance_table(model)
    table.update(torch.arange(5, 40), torch.linspace(0.5, 9.0, 35))
    ids, mask = padded_batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "td")
    with safe_open(str(tmp_path / "td" / "token_reduction.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["token_dropping.count", "token_dropping.loss"]
    with safe_open(str(tmp_path / "td" / "model.safetensors"), "pt") as f:
        assert not any("hf_tokred" in k for k in f.keys())
    loaded = BertForMaskedLM.from_pretrained(tmp_path / "td").eval()          # re-attached without the kwarg
    assert torch.equal(importance_table(loaded).loss, table.loss)
    assert torch.equal(importance_table(loaded).count, table.count)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, before)
    dense = BertForMaskedLM.from_pretrained(tmp_path / "td", token_reduction=False).eval()
    hf_tokred.remove(model)
    assert torch.equal(dense(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)


# ---------------------------------------------------------------------------------------------
# Recipe and CLI
# ---------------------------------------------------------------------------------------------


class WordTokenizer:
    """A minimal masked-LM tokenizer over the tiny vocabulary (what the recipe uses of a tokenizer)."""

    cls_token_id, sep_token_id, mask_token_id, pad_token_id = CLS, SEP, MASK, PAD
    all_special_ids = SPECIAL

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5 + (sum(map(ord, w)) % (VOCAB - 5)) for w in text.split()]}

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]

    def save_pretrained(self, path):
        with open(os.path.join(path, "tokenizer_note.txt"), "w") as fh:
            fh.write("word tokenizer of the test")


TEXTS = [" ".join(f"w{(i * 7 + j) % 23}" for j in range(10 + i % 9)) for i in range(24)]


def train(tmp_path=None, steps=4, **kw):
    model = make_mlm(dropout=0.1)
    return train_token_dropping(model, TEXTS, tokenizer=WordTokenizer(), steps=steps, batch_size=4, max_length=16,
                                lr=1e-3, progress=False, output_dir=tmp_path, save_every=2, **kw)


def test_recipe_trains_reproducibly_and_saves_a_plain_checkpoint(tmp_path):
    start = make_mlm(dropout=0.1).state_dict()
    a = train(tmp_path / "a")
    b = train()
    assert a.train_losses == b.train_losses and 0 < a.kept_fraction < 1
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    changed = [k for k in start if not torch.equal(start[k], a.state_dict()[k])]
    assert "bert.encoder.layer.2.attention.self.query.weight" in changed     # the middle blocks train too
    assert hf_tokred.integration.wiring.get_applied(a) is None                # returned and saved without reduction
    config = json.load(open(tmp_path / "a" / "config.json"))
    assert "token_reduction" not in config and not (tmp_path / "a" / "token_reduction.safetensors").exists()
    assert (tmp_path / "a" / "README.md").exists()
    plain = BertModel.from_pretrained(tmp_path / "a").eval()                   # a plain BERT encoder
    ids, mask = padded_batch()
    torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).last_hidden_state,
                               a.bert(input_ids=ids, attention_mask=mask).last_hidden_state)
    base = train(dropping=False)
    assert base.train_losses != a.train_losses and base.kept_fraction == 1.0


def test_recipe_resumes_and_keeps_the_reduction_on_request(tmp_path):
    # a constant learning rate: a 2-step run is the first half of a 4-step one (a decay depends on the total)
    full = train(steps=4, keep_reduction=True, lr_schedule="constant")
    train(tmp_path, steps=2, keep_reduction=True, lr_schedule="constant")
    resumed = train(tmp_path, steps=4, keep_reduction=True, lr_schedule="constant")
    assert resumed.train_losses == full.train_losses
    assert torch.equal(importance_table(resumed).loss, importance_table(full).loss)
    assert int(importance_table(full).count.sum()) > 0
    loaded = BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(importance_table(loaded).loss, importance_table(full).loss)


def test_cli_train_and_bench(tmp_path, monkeypatch):
    from hf_tokred.cli import main
    from hf_tokred.recipes import token_dropping as recipe

    calls = {}

    def fake_train(model, texts, **kw):                 # the CLI's wiring; the loop itself is tested above
        calls.update(kw, texts=len(texts))
        trained = train(steps=2)
        return trained

    monkeypatch.setattr(recipe, "train_token_dropping", fake_train)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS))
    assert main(["train", "token_dropping", "--corpus", str(corpus), "--output", str(tmp_path / "out"), "--steps", "3",
                 "--keep", "0.25", "--no-progress"]) == 0
    assert calls["steps"] == 3 and calls["keep"] == 0.25 and calls["texts"] == len(TEXTS)
    assert calls["output_dir"] == str(tmp_path / "out") and calls["keep_reduction"] is False


@pytest.mark.real_model
def test_cli_bench_tiny(tmp_path):
    from hf_tokred.cli import main

    out = tmp_path / "bench.json"
    assert main(["nlp-bench", "token_dropping", "--steps", "2", "--batch-size", "2", "--max-length", "24",
                 "--paragraphs", "6", "--repeats", "1", "--json", str(out)]) == 0
    result = json.load(open(out))
    assert result["settings"]["drop_layer"] == 3 and result["settings"]["restore_layer"] == 5
    assert set(result["heldout"]) == {"original", "token_dropping", "baseline"}
    assert result["heldout"]["original"]["cosine_to_original"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < result["training"]["token_dropping"]["kept_fraction"] < 1
    assert result["encoder_flops"]["saved"] > 0 and set(result["forward_backward_s"]) == {"token_dropping", "baseline"}
