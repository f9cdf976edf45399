"""DynamicViT (learned predictors, Gumbel soft masks in training, hard drop at inference): tiny ViT and BERT,
training with the plain loop, transformers.Trainer and accelerate, save/load and Hub push of trained predictors."""

from __future__ import annotations

import pytest
import torch
from conftest import faked_hub
from conftest import make_tiny_bert as make_bert
from conftest import make_tiny_vit as make_vit
from conftest import padded_bert_batch as padded_batch
from safetensors import safe_open
from transformers import AutoModel, TrainingArguments

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError
from hf_tokred.integration.encoders import source_map, token_counts, token_sizes
from hf_tokred.methods.encoder.dynamicvit import DynamicViTConfig, TokenPredictor, ratio_loss, stage_records
from hf_tokred.training import DynamicViTTrainer, dynamicvit_loss, freeze_backbone, predictors, train_dynamicvit

IMAGE, PATCH, LAYERS = 32, 4, 4





def randomize(model):
    """Give the predictors distinct random weights (as if trained) so that their choices matter."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in predictors(model).parameters():
            p.normal_(0, 0.5)


# ---------------------------------------------------------------------------------------------
# Config and predictor
# ---------------------------------------------------------------------------------------------


def test_config_fields_and_errors():
    cfg = TokenReductionConfig(method="dynamicvit", keep_rate=0.7)
    assert isinstance(cfg, DynamicViTConfig) and cfg.learned and cfg.paper == "2106.02034"
    assert cfg.reducing_layers(12) == [3, 6, 9] and cfg.schedule(4) == [None, 0.7, 0.7, 0.7]
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    for field, bad in (("keep_rate", 0.0), ("keep_rate", 1.5), ("gumbel_tau", 0.0), ("layers", [1, 1])):
        with pytest.raises(ConfigError) as info:
            TokenReductionConfig(method="dynamicvit", **{field: bad})
        assert info.value.field == field
    with pytest.raises(ConfigError, match="layers: block 7 does not exist"):
        hf_tokred.apply(make_vit(), {"method": "dynamicvit", "layers": [7]})


def test_predictor_uses_only_kept_tokens_for_its_global_part():
    torch.manual_seed(0)
    predictor = TokenPredictor(16)
    x = torch.randn(1, 6, 16)
    policy = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    changed = x.clone()
    changed[0, 3] = torch.randn(16)  # a dropped token changes: nobody else's score moves
    a, b = predictor(x, policy), predictor(changed, policy)
    keep = policy[0].bool()
    assert torch.equal(a[0, keep], b[0, keep]) and not torch.equal(a[0, 3], b[0, 3])
    assert torch.allclose(a.exp().sum(-1), torch.ones(1, 6))


# ---------------------------------------------------------------------------------------------
# Inference: hard drop
# ---------------------------------------------------------------------------------------------


def test_keep_rate_one_is_bit_identical_and_remove_restores(images):
    model = make_vit()
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
        hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 1.0})
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5})
        assert model(pixel_values=images).last_hidden_state.shape[1] < dense.shape[1]
        hf_tokred.remove(model)
        assert torch.equal(model(pixel_values=images).last_hidden_state, dense)
        assert not hasattr(model, "hf_tokred_modules")


def test_hard_drop_counts_cls_kept_and_batch_equals_rows(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5})  # stages before blocks 1, 2, 3
    randomize(model)
    assert not predictors(model).training  # an eval-mode model gets eval-mode predictors
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
        assert token_counts(model) == [65, 33, 17, 9]
        origin = source_map(model)
        assert origin[:, 0, 0].all() and (token_sizes(model) == 1).all()
        rows = torch.cat([model(pixel_values=images[i:i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(rows, out, rtol=1e-5, atol=1e-5)
    # the kept tokens differ between images: the predictors decide per image
    assert not torch.equal(origin[0], origin[1])


def test_padded_bert_batch_equals_each_row_alone():
    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1, 3]})
    randomize(model)
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        sizes = token_sizes(model)
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            real = sizes[row] > 0
            # CLS + ceil(0.6 * ceil(0.6 * (length - 1)))
            assert alone.shape[0] == int(real.sum()) == 1 + -(-3 * -(-3 * (length - 1) // 5) // 5)
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training: soft masks, losses, the three ways to train
# ---------------------------------------------------------------------------------------------


def test_training_mode_keeps_every_token_and_masks_dropped_keys():
    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5, "layers": [1, 2]})
    batch = padded_batch()
    predictors(model).train()
    torch.manual_seed(0)
    out = model(**batch).last_hidden_state
    assert out.shape == (3, 30, 64)  # nothing dropped in training
    records = stage_records(model)
    assert [r.target for r in records] == [0.5, 0.25]
    policy = records[-1].policy
    assert (policy[:, 0] == 1).all() and (policy * (1 - batch["attention_mask"])).sum() == 0
    assert set(policy.detach().unique().tolist()) <= {0.0, 1.0}  # hard Gumbel decisions, straight-through
    loss = ratio_loss(records)
    loss.backward()
    grads = [p.grad for p in predictors(model).parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.all(policy <= records[0].policy)  # a dropped token stays dropped
    # the soft mask reaches the attention: the hidden states differ from a dense pass
    with hf_tokred.training.dense_pass(model), torch.no_grad():
        dense = model(**batch).last_hidden_state
    assert not torch.allclose(out, dense)


def test_loss_needs_training_mode_and_a_dynamicvit_model():
    model = make_bert()
    with pytest.raises(TokenReductionError, match="no dynamicvit reduction"):
        train_dynamicvit(model, [padded_batch()], steps=1)
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5})
    with pytest.raises(TokenReductionError, match="eval mode"):
        dynamicvit_loss(model, padded_batch())


def test_train_then_save_load_gives_identical_outputs(tmp_path):
    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1, 2]})
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    before = {k: v.clone() for k, v in predictors(model).state_dict().items()}
    batches = [padded_batch(seed) for seed in range(3)]
    losses = train_dynamicvit(model, batches, steps=12, lr=3e-3)
    assert len(losses) == 12 and all(map(lambda v: v == v, losses))
    after = predictors(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())  # backbone frozen
    assert not model.training
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "hf_tokred" in k or "out_conv" in k]
    with safe_open(tmp_path / "token_reduction.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(f"dynamicvit.{k}" for k in after)
    again = AutoModel.from_pretrained(tmp_path).eval()
    for k, v in predictors(again).state_dict().items():
        assert torch.equal(v, after[k])
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)


def test_push_to_hub_uploads_trained_predictors_that_load_back(tmp_path):
    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1]})
    randomize(model)
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    with faked_hub() as hub:
        model.push_to_hub("me/bert-dynamicvit")
    assert {"token_reduction.safetensors", "token_reduction_config.json", "config.json"} <= set(hub.files)
    folder = hub.snapshot(tmp_path / "hub", "me/bert-dynamicvit")
    again = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_trainer_trains_only_the_predictors(tmp_path):
    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1, 2]})
    freeze_backbone(model)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    before = {k: v.clone() for k, v in predictors(model).state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=3, learning_rate=3e-3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = DynamicViTTrainer(model=model, args=args, train_dataset=_Rows(padded_batch(4)))
    result = trainer.train()
    assert result.global_step == 3 and result.training_loss == result.training_loss
    after = predictors(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())


def test_accelerate_loop():
    from accelerate import Accelerator

    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1]})
    params = freeze_backbone(model)
    before = {k: v.clone() for k, v in predictors(model).state_dict().items()}
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    predictors(model).train()
    for seed in range(2):
        loss = dynamicvit_loss(accelerator.unwrap_model(prepared), padded_batch(seed))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    after = predictors(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# Options: predictor width, fusing the dropped tokens, training the backbone
# ---------------------------------------------------------------------------------------------


def test_predictor_dim_and_fuse_fields_are_checked():
    cfg = TokenReductionConfig(method="dynamicvit", keep_rate=0.6, predictor_dim=16, fuse=True)
    assert TokenReductionConfig.from_dict(cfg.to_dict()) == cfg
    for field, bad in (("predictor_dim", 2), ("predictor_dim", 8.5), ("fuse", "yes")):
        with pytest.raises(ConfigError) as info:
            TokenReductionConfig(method="dynamicvit", **{field: bad})
        assert info.value.field == field
    model = make_vit()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5, "predictor_dim": 16})
    first = predictors(model)[0]
    assert first.in_conv[1].weight.shape == (16, 64) and first.out_conv[-1].weight.shape == (2, 4)


def test_fuse_keeps_the_dropped_tokens_as_one_token_per_stage(images):
    model = make_vit()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5, "fuse": True, "prop_attn": True})
    randomize(model)
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
        # 65 -> CLS + 32 kept + 1 fused = 34 -> CLS + ceil(0.5 * 33) + 1 = 19 -> CLS + ceil(0.5 * 18) + 1 = 11
        assert token_counts(model) == [65, 34, 19, 11]
        sizes = token_sizes(model)
        assert (sizes.sum(dim=1) == 65).all() and sizes[:, 0].eq(1).all()
        assert (sizes[:, -1] > 1).all()  # the last token carries the tokens the last stage dropped
        rows = torch.cat([model(pixel_values=images[i:i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(rows, out, rtol=1e-5, atol=1e-5)


def test_padded_bert_batch_with_fuse_equals_each_row_alone():
    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1, 3], "fuse": True})
    randomize(model)
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        sizes = token_sizes(model)
        assert sizes.sum(dim=1).tolist() == [30, 17, 9]  # padding is never fused into real tokens
        for row, length in enumerate((30, 17, 9)):
            alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).last_hidden_state[0]
            real = sizes[row] > 0
            assert alone.shape[0] == int(real.sum())
            torch.testing.assert_close(out[row][real], alone, rtol=1e-5, atol=1e-5)


def test_training_the_backbone_saves_its_weights_and_loads_back_identical(tmp_path):
    import copy

    teacher = make_bert()
    model = copy.deepcopy(teacher)
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1, 2], "predictor_dim": 32})
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    batches = [padded_batch(seed) for seed in range(3)]
    with pytest.raises(TokenReductionError, match="separate frozen teacher"):
        train_dynamicvit(model, batches, steps=1, train_backbone=True)
    with pytest.raises(TokenReductionError, match="backbone_lr"):
        train_dynamicvit(model, batches, steps=1, backbone_lr=1e-4)
    with pytest.raises(TokenReductionError, match="lr must be > 0"):
        train_dynamicvit(model, batches, steps=1, lr=0.0)
    losses = train_dynamicvit(model, batches, steps=6, train_backbone=True, teacher=teacher, backbone_lr=1e-3)
    assert len(losses) == 6 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    state = model.state_dict()
    changed = [k for k, v in backbone.items() if not torch.equal(v, state[k])]
    assert any(k.startswith("encoder.") for k in changed)
    assert all(torch.equal(v, p) for v, p in zip(teacher.state_dict().values(), backbone.values()))  # teacher frozen
    test = padded_batch(7)
    with torch.no_grad():
        out = model(**test).last_hidden_state
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        key = changed[-1]
        assert torch.equal(fh.get_tensor(key), state[key])
        assert not [k for k in fh.keys() if "hf_tokred" in k or "out_conv" in k]
    again = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules, batch order, fine-tuning through the hard reduction (fuse-aware)
# ---------------------------------------------------------------------------------------------


def test_lr_schedules_and_shuffled_batch_order():
    from hf_tokred.training import _batch_order, lr_factor

    assert [lr_factor("constant", s, 4) for s in range(4)] == [1.0] * 4
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [round(lr_factor("cosine", s, 4), 4) for s in range(4)] == [1.0, 0.8536, 0.5, 0.1464]
    assert _batch_order(3, 7, False, torch.Generator()) == [0, 1, 2, 0, 1, 2, 0]
    order = _batch_order(5, 12, True, torch.Generator().manual_seed(0))
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5)) and order[:5] != order[5:10]
    assert order == _batch_order(5, 12, True, torch.Generator().manual_seed(0))  # seeded
    model = make_bert()
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1]})
    with pytest.raises(TokenReductionError, match="lr_schedule must be one of constant, linear, cosine"):
        train_dynamicvit(model, [padded_batch()], steps=1, lr_schedule="step")
    # a decaying schedule and a shuffled order train (and are reproducible with the seed)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the predictors' initial weights
        hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.6, "layers": [1]})
        train_dynamicvit(model, [padded_batch(s) for s in range(3)], steps=4, lr_schedule="cosine", shuffle=True)
        runs.append({k: v.clone() for k, v in predictors(model).state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_pooled_cosine_loss_is_the_benchmark_metric():
    import copy

    from hf_tokred.bench.encoders import pooled_embeddings
    from hf_tokred.training import pooled_cosine_loss

    teacher = make_bert()
    model = copy.deepcopy(teacher)
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5, "layers": [1], "fuse": True})
    randomize(model)
    batch = {k: v[:, :17] for k, v in padded_batch(lengths=(17, 17)).items()}  # no padding, as in the benchmark
    with torch.no_grad():
        loss = pooled_cosine_loss(model, batch, teacher)
        assert model(**batch).last_hidden_state.shape[1] == 1 + 8 + 1  # CLS, ceil(0.5 * 16) kept, 1 fused
        reduced = pooled_embeddings(model, batch, reduced=True)
        dense = pooled_embeddings(teacher, batch, reduced=False)
    torch.testing.assert_close(loss, 1 - (reduced * dense).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 1.0})
    with torch.no_grad():
        assert pooled_cosine_loss(model, padded_batch(), teacher).abs() < 1e-6  # nothing reduced: the dense mean


def test_fine_tune_reduced_trains_the_backbone_with_fuse_and_loads_back_identical(tmp_path):
    import copy

    from hf_tokred.training import fine_tune_reduced

    teacher = make_bert()
    model = copy.deepcopy(teacher)
    hf_tokred.apply(model, {"method": "dynamicvit", "keep_rate": 0.5, "layers": [1, 2], "predictor_dim": 16,
                            "fuse": True})
    randomize(model)
    batches = [padded_batch(seed) for seed in range(3)]
    for kwargs, message in (({"teacher": None}, "separate frozen dense teacher"),
                            ({"teacher": model}, "separate frozen dense teacher"),
                            ({"teacher": teacher, "lr": -1.0}, "lr must be > 0"),
                            ({"teacher": teacher, "steps": 0}, "steps must be >= 1"),
                            ({"teacher": teacher, "lr_schedule": "warm"}, "lr_schedule must be one of")):
        with pytest.raises(TokenReductionError, match=message):
            fine_tune_reduced(model, batches, **kwargs)
    with pytest.raises(TokenReductionError, match="no sequence reduction attached"):
        fine_tune_reduced(make_bert(), batches, teacher=teacher)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred" not in k}
    scorers = {k: v.clone() for k, v in predictors(model).state_dict().items()}
    test = padded_batch(7)
    with torch.no_grad():
        model(**test)
        counts, sizes = token_counts(model), token_sizes(model)
    losses = fine_tune_reduced(model, batches, teacher=teacher, steps=8, lr=1e-3)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert not model.training and not predictors(model).training
    assert all(not p.requires_grad for p in model.parameters())
    state = model.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in backbone.items() if k.startswith("encoder."))
    assert all(torch.equal(v, predictors(model).state_dict()[k]) for k, v in scorers.items())  # predictors fixed
    assert all(torch.equal(v, p) for v, p in zip(teacher.state_dict().values(), backbone.values()))  # teacher frozen
    with torch.no_grad():
        out = model(**test).last_hidden_state
        # exact token counts and fused sizes as before: per stage CLS + ceil(0.5 n) kept + 1 fused token
        assert token_counts(model) == counts and torch.equal(token_sizes(model), sizes)
        assert sizes.sum(dim=1).tolist() == [30, 17, 9]
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**test).last_hidden_state, out)


def test_paragraph_stream_appends_source_docstrings_after_the_old_texts():
    import itertools

    from hf_tokred.bench.encoders import _module_docstrings, _paragraph_stream, _prose_paragraphs

    before = list(itertools.chain(_prose_paragraphs(), _module_docstrings()))
    stream = list(_paragraph_stream())
    # the evaluation and calibration texts are built from the same paragraphs in the same order as before
    assert stream[:len(before)] == before
    added = stream[len(before):]
    assert len(added) > 5000 and not set(added) & set(before) and len(set(added)) == len(added)


def test_cli_fine_tune_options_are_parsed_and_checked(capsys):
    from hf_tokred.cli import build_parser, main

    args = build_parser().parse_args(["encoders", "--method", "dynamicvit", "--finetune-steps", "5", "--finetune-lr",
                                      "1e-4", "--lr-schedule", "cosine", "--shuffle", "--fuse", "--dynamicvit-layers",
                                      "3"])
    assert (args.finetune_steps, args.finetune_lr, args.lr_schedule, args.shuffle, args.fuse) == (5, 1e-4, "cosine",
                                                                                                  True, True)
    assert args.dynamicvit_layers == [3]
    for argv, message in ((["--finetune-lr", "0"], "--finetune-lr: expected a learning rate > 0"),
                          (["--dynamicvit-layers", "-1"], "--dynamicvit-layers: expected block indices >= 0"),
                          (["--finetune-steps", "0"], "--finetune-steps"),
                          (["--lr-schedule", "step"], "--lr-schedule")):
        with pytest.raises(SystemExit) as info:
            main(["encoders", "--part", "quality", "--method", "dynamicvit", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.real_model
def test_quality_benchmark_fine_tunes_a_copy_through_the_hard_drop():
    from hf_tokred.bench.encoders import run_quality

    tome = ("tome", "tome", [{"ratio": 0.1}])
    record = run_quality(["dynamicvit", "tome"], texts=4, train_texts=4, train_steps=1, shuffle=True,
                         lr_schedule="linear", finetune_steps=2, finetune_lr=1e-3,
                         variants=[tome, ("dynamicvit", "dynamicvit", [{"keep_rate": 0.5, "layers": [2],
                                                                        "predictor_dim": 32, "fuse": True}]),
                                   ("tome again", "tome", [{"ratio": 0.1}])])
    first, trained, again = record["rows"]
    assert trained["finetune_steps"] == 2 and trained["finetune_lr"] == 1e-3 and trained["shuffle"]
    assert trained["lr_schedule"] == "linear" and trained["params"]["fuse"] and trained["flops_saved"] > 0
    # the fine-tuned copy does not leak into later rows
    assert again["cosine"] == first["cosine"] and again["flops_saved"] == first["flops_saved"]
