"""The training tools every encoder sequence reducer shares: dense_pass and fine_tune_reduced on any method."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

import hf_tokred
from hf_tokred.errors import TokenReductionError
from hf_tokred.training import dense_pass, fine_tune_reduced, pooled_cosine_loss


def make_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False).eval()


def batch(seed=0):
    ids = torch.randint(5, 64, (2, 20), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_dense_pass_runs_any_sequence_reducer_densely():
    dense = make_bert()
    model = hf_tokred.apply(copy.deepcopy(dense), {"method": "tome", "r": 4})
    inputs = batch()
    with torch.no_grad():
        assert model(**inputs).last_hidden_state.shape[1] == 20 - 3 * 4
        with dense_pass(model):
            inside = model(**inputs).last_hidden_state
        reduced_again = model(**inputs).last_hidden_state
    assert torch.equal(inside, dense(**inputs).last_hidden_state)
    assert reduced_again.shape[1] == 8
    with pytest.raises(TokenReductionError, match="no sequence reduction attached"):
        with dense_pass(make_bert()):
            pass


def test_fine_tune_reduced_adapts_the_backbone_to_a_training_free_reducer():
    teacher = make_bert()
    model = hf_tokred.apply(copy.deepcopy(teacher), {"method": "tome", "r": 4})
    batches = [batch(seed) for seed in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        start = pooled_cosine_loss(model, batches[0], teacher)
    losses = fine_tune_reduced(model, batches, teacher=teacher, steps=10, lr=1e-3, shuffle=False)
    with torch.no_grad():
        assert len(losses) == 10 and pooled_cosine_loss(model, batches[0], teacher) < start
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), make_bert().parameters()))  # teacher untouched


@pytest.mark.parametrize("config", [{"method": "avit", "target_depth": 0.6},
                                    {"method": "dynamicvit", "keep_rate": 0.7, "layers": [1]},
                                    {"method": "ia_red2", "keep_rate": 0.7, "layers": [1]}])
def test_learned_parts_start_from_the_same_weights_and_leave_the_global_rng_alone(config):
    parts = []
    for seed in (1, 2):  # whatever the caller's random state, the untrained parts are the same
        model = make_bert()
        torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        hf_tokred.apply(model, config)
        assert torch.equal(torch.random.get_rng_state(), state)
        parts.append(model.hf_tokred_modules.state_dict())
    assert parts[0].keys() == parts[1].keys() and parts[0]
    assert all(torch.equal(parts[0][name], parts[1][name]) for name in parts[0])


@pytest.mark.parametrize("config, trainer", [
    ({"method": "dynamicvit", "keep_rate": 0.7, "layers": [1]}, "train_dynamicvit"),
    ({"method": "avit", "target_depth": 0.6}, "train_avit"),
    ({"method": "ia_red2", "keep_rate": 0.7, "layers": [1]}, "train_ia_red2"),
    ({"method": "spvit", "keep_rate": 0.7, "layers": [1]}, "train_spvit"),
    ({"method": "evo_vit", "keep_rate": 0.7, "layers": [1]}, "train_evo_vit"),
    ({"method": "stvit", "ratio": 0.5, "start": 1}, "train_stvit"),
    ({"method": "tocom", "r": 4, "source_r": 2}, "train_tocom"),
    ({"method": "tome", "r": 4}, "fine_tune_reduced"),
])
def test_every_encoder_trainer_shows_a_progress_bar_unless_told_not_to(config, trainer, capsys):
    import hf_tokred.training as training

    teacher = make_bert()
    train = getattr(training, trainer)
    for progress, log_every in ((True, 0), (False, 0), (True, 1)):
        model = hf_tokred.apply(copy.deepcopy(teacher), config)
        losses = train(model, [batch()], teacher=teacher, steps=2, lr=1e-3, progress=progress, log_every=log_every,
                       log=print)
        captured = capsys.readouterr()
        assert len(losses) == 2
        assert ("2/2" in captured.err) == (progress and not log_every), (progress, log_every, captured.err)
        assert captured.out.count("loss") == (2 if log_every else 0)
