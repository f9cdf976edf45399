"""Gist tokens (gist): config, dense equivalence, compress_context (k entries, batches, positions), training path,
save/load, the recipe, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import (
    assert_assisted_decoding_continues_a_cache_as_plain_generate,
    assert_loads_without_hf_tokred,
    exit_code,
    make_tiny_llama,
)
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import hf_tokred
from hf_tokred.errors import ConfigError, SideCarError, TokenReductionError
from hf_tokred.integration.gist import continuation_logits, gist_cache
from hf_tokred.methods.lm.gist import GistConfig, rouge_l
from hf_tokred.recipes import gist as recipe


def _cfg(**overrides):
    return {"method": "gist", "num_gist": 4, "rank": 4, **overrides}


def _randomize(model, seed: int = 1, scale: float = 0.05):
    """Give the attached gist parts non-zero weights (as a trained artefact has)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.hf_tokred_modules.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _rows(*lengths, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (n,), generator=generator).tolist() for n in lengths]


def _left_pad(rows):
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask


def _trained_model(**overrides):
    model = make_tiny_llama()
    hf_tokred.apply(model, _cfg(**overrides))
    _randomize(model)
    return model


# ---------------------------------------------------------------------------------------------
# config and bad input
# ---------------------------------------------------------------------------------------------


def test_config_fields_and_validation():
    cfg = hf_tokred.TokenReductionConfig(method="gist", num_gist=8)
    assert isinstance(cfg, GistConfig) and cfg.stage == "context" and cfg.wiring_key == "gist"
    assert (cfg.num_gist, cfg.rank, cfg.scaling, cfg.paper) == (8, 8, 2.0, "2304.08467")
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="gist", num_gist=0)
    assert err.value.field == "num_gist" and "num_gist" in str(err.value)
    with pytest.raises(ConfigError) as err:
        hf_tokred.TokenReductionConfig(method="gist", target_modules=["self_attn.q_proj"])
    assert err.value.field == "target_modules"
    assert GistConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_target_module_leaves_the_model_untouched():
    model = make_tiny_llama()
    ids = torch.tensor(_rows(9))
    with torch.no_grad():
        dense = model(ids).logits
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, _cfg(target_modules=["nope"]))
    assert err.value.field == "target_modules" and "q_proj" in str(err.value)
    assert not hasattr(model, "hf_tokred_modules") and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_compress_needs_the_reduction_and_real_tokens():
    model = make_tiny_llama()
    with pytest.raises(TokenReductionError, match="gist"):
        gist_cache(model, torch.tensor(_rows(5)))
    hf_tokred.apply(model, _cfg())
    with pytest.raises(TokenReductionError, match="no real token"):
        hf_tokred.compress_context(model, torch.tensor(_rows(5)), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TokenReductionError, match="LongTensor"):
        hf_tokred.compress_context(model, torch.randn(1, 5))


# ---------------------------------------------------------------------------------------------
# dense equivalence, remove, save/load
# ---------------------------------------------------------------------------------------------


def test_attached_gist_leaves_forward_and_generate_bit_identical_and_remove_restores():
    model = make_tiny_llama()
    ids = torch.tensor(_rows(12, seed=3))
    with torch.no_grad():
        dense = model(ids).logits
    dense_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    hf_tokred.apply(model, _cfg())  # fresh: lora_B zero
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), dense_gen)
    _randomize(model)  # trained parts: the LoRA still runs only inside the gist pass
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    hf_tokred.compress_context(model, ids)  # a compression in between leaves nothing switched on
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    hf_tokred.remove(model)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), dense_gen)


def test_save_load_identical_and_side_car_holds_the_learned_parts(tmp_path):
    model = _trained_model()
    ids, mask = _left_pad(_rows(11, 7))
    ctx = hf_tokred.compress_context(model, ids, mask)
    model.save_pretrained(tmp_path)
    side = load_file(os.path.join(tmp_path, "token_reduction.safetensors"))
    assert side["gist.weight"].shape == (4, 64)
    assert any(k.startswith("gist_lora.") and k.endswith("lora_B.weight") for k in side)
    base = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert not any("gist" in k or "lora" in k for k in base)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    again = hf_tokred.compress_context(loaded, ids, mask)
    for a, b in zip(ctx.cache.layers, again.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    question = torch.tensor(_rows(3, 3, seed=5))
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    out = model.generate(torch.cat([ctx.prefix_ids, question], -1), past_key_values=ctx.fresh_cache(), **kwargs)
    out2 = loaded.generate(torch.cat([again.prefix_ids, question], -1), past_key_values=again.fresh_cache(), **kwargs)
    assert torch.equal(out, out2)


def test_weights_of_another_shape_are_refused(tmp_path):
    model = _trained_model(num_gist=2)
    model.save_pretrained(tmp_path)
    other = make_tiny_llama()
    with pytest.raises(SideCarError, match="gist.weight"):
        hf_tokred.apply(other, _cfg(num_gist=4), weights_from=tmp_path)
    assert not hasattr(other, "hf_tokred_modules")
    wide = make_tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(SideCarError, match="shape"):
        hf_tokred.apply(wide, _cfg(num_gist=2), weights_from=tmp_path)


def test_a_process_that_never_imports_hf_tokred_loads_the_base_model(tmp_path):
    model = _trained_model()
    model.save_pretrained(tmp_path)
    ids = torch.tensor(_rows(10))
    with torch.no_grad():
        assert_loads_without_hf_tokred(tmp_path, ids, model(ids).logits)


# ---------------------------------------------------------------------------------------------
# compress_context: counts, batches, positions
# ---------------------------------------------------------------------------------------------


def test_compressed_context_holds_exactly_k_entries_per_layer():
    model = _trained_model(num_gist=3)
    ids, mask = _left_pad(_rows(13, 5))
    ctx = hf_tokred.compress_context(model, ids, mask)
    assert ctx.method == "gist" and ctx.entries == 3 and ctx.context_tokens == [13, 5]
    assert tuple(ctx.prefix_ids.shape) == (2, 3)
    assert len(ctx.cache.layers) == model.config.num_hidden_layers
    for layer in ctx.cache.layers:
        assert tuple(layer.keys.shape) == (2, 2, 3, 16) and tuple(layer.values.shape) == (2, 2, 3, 16)
    assert ctx.cache.get_seq_length() == 3
    fresh = ctx.fresh_cache()
    question = torch.tensor(_rows(4, 4, seed=2))
    model.generate(torch.cat([ctx.prefix_ids, question], -1), past_key_values=fresh, max_new_tokens=3, do_sample=False)
    assert fresh.get_seq_length() == 3 + 4 + 2 and ctx.cache.get_seq_length() == 3  # the stored cache is reused


def test_left_padded_batch_equals_each_row_alone():
    model = _trained_model()
    rows = _rows(14, 9, 3, seed=4)
    ids, mask = _left_pad(rows)
    batch = hf_tokred.compress_context(model, ids, mask)
    question = torch.tensor(_rows(5, 5, 5, seed=6))
    out = model.generate(torch.cat([batch.prefix_ids, question], -1), past_key_values=batch.fresh_cache(),
                         max_new_tokens=6, do_sample=False)
    for i, row in enumerate(rows):
        alone = hf_tokred.compress_context(model, torch.tensor([row]))
        for a, b in zip(batch.cache.layers, alone.cache.layers):
            torch.testing.assert_close(a.keys[i:i + 1], b.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values[i:i + 1], b.values, atol=1e-5, rtol=1e-5)
        single = model.generate(torch.cat([alone.prefix_ids, question[i:i + 1]], -1),
                                past_key_values=alone.fresh_cache(), max_new_tokens=6, do_sample=False)
        assert torch.equal(out[i:i + 1], single)


def test_gist_tokens_see_the_prompt_as_at_natural_positions():
    """The prompt runs at -L..-1 and the gist tokens at 0..k-1: values equal those of natural positions (L..L+k-1)
    and keys are those keys rotated back by L (RoPE depends only on position differences)."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make_tiny_llama()
    hf_tokred.apply(model, _cfg())  # fresh LoRA: a plain forward over [prompt, gist] is the same computation
    prompt = torch.tensor(_rows(10, seed=8))
    ctx = hf_tokred.compress_context(model, prompt)
    gist = model.hf_tokred_modules["gist"](1, torch.float32)
    embeds = torch.cat([model.get_input_embeddings()(prompt), gist], 1)
    natural = DynamicCache(config=model.config)
    with torch.no_grad():
        model(inputs_embeds=embeds, past_key_values=natural, use_cache=True)
    shift = torch.full((1, 4), 10)
    cos, sin = model.model.rotary_emb(natural.layers[0].keys, shift)
    for a, b in zip(ctx.cache.layers, natural.layers):
        torch.testing.assert_close(a.values, b.values[:, :, -4:], atol=1e-5, rtol=1e-5)
        rotated, _ = apply_rotary_pos_emb(a.keys, a.keys, cos, sin)
        torch.testing.assert_close(rotated, b.keys[:, :, -4:], atol=1e-5, rtol=1e-5)


def test_training_path_gives_the_logits_generate_sees():
    """continuation_logits (training) over the tail + generated answer = generate's own scores through the cache."""
    model = _trained_model()
    ids, mask = _left_pad(_rows(12, 6, seed=9))
    tail = torch.tensor(_rows(3, 3, seed=10))
    ctx = hf_tokred.compress_context(model, ids, mask)
    out = model.generate(torch.cat([ctx.prefix_ids, tail], -1), past_key_values=ctx.fresh_cache(), max_new_tokens=5,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    answer = out.sequences[:, 4 + 3:]
    with torch.no_grad():
        logits = continuation_logits(model, gist_cache(model, ids, mask), torch.cat([tail, answer], -1))
    for step, score in enumerate(out.scores):
        torch.testing.assert_close(logits[:, 3 - 1 + step], score, atol=1e-4, rtol=1e-4)


def test_gradients_reach_the_gist_embeddings_and_the_lora():
    model = make_tiny_llama()
    hf_tokred.apply(model, _cfg())
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.hf_tokred_modules.parameters())
    for p in params:
        p.requires_grad_(True)
    batch = [{"context": r, "tail": [5, 6], "answer": a} for r, a in zip(_rows(9, 4), _rows(6, 3, seed=1))]
    loss = recipe.gist_loss(model, batch, pad=0)
    loss.backward()
    holder = model.hf_tokred_modules
    assert holder["gist"].weight.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in holder["gist_lora"].named_parameters() if n.endswith("lora_B.weight")}
    # every block's key/value projections of the gist tokens are read by the continuation (the last block's other
    # layers only feed the gist tokens' own logits, which nothing reads)
    kv = [g for n, g in grads.items() if ".k_proj." in n or ".v_proj." in n]
    assert len(kv) == 2 * model.config.num_hidden_layers and all(g is not None and g.abs().sum() > 0 for g in kv)
    first = [g for n, g in grads.items() if ".layers.0." in n]
    assert len(first) == 7 and all(g.abs().sum() > 0 for g in first)
    assert all(p.grad is None for p in model.model.parameters())


# ---------------------------------------------------------------------------------------------
# recipe, ROUGE-L, CLI
# ---------------------------------------------------------------------------------------------


def test_rouge_l():
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == 0.75
    assert rouge_l([7, 8], [1, 2]) == 0.0 and rouge_l([], []) == 1.0
    assert recipe.mean_rouge_l([[1, 2], [3]], [[1, 2], [4]]) == 0.5


def test_answers_are_greedy_or_drawn_reproducibly_from_a_seed():
    model = _trained_model()
    data = [{"context": c, "tail": [5, 6], "answer": []} for c in _rows(9, 12, 7, seed=3)]
    kwargs = {"max_new_tokens": 6, "batch_size": 2}
    greedy = recipe.gist_answers(model, data, **kwargs)
    assert recipe.gist_answers(model, data, seed=5, **kwargs) == greedy  # the seed matters only when sampling
    state = torch.random.get_rng_state()
    drawn = recipe.gist_answers(model, data, temperature=1.5, top_p=1.0, seed=1, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    assert recipe.gist_answers(model, data, temperature=1.5, top_p=1.0, seed=1, **kwargs) == drawn
    assert recipe.gist_answers(model, data, temperature=1.5, top_p=1.0, seed=2, **kwargs) != drawn
    assert drawn != greedy and all(len(row) == 6 for row in drawn)
    for field, bad in (("temperature", {"temperature": -0.5}), ("top_p", {"top_p": 0.0}), ("mode", {"mode": "half"})):
        with pytest.raises(ConfigError) as excinfo:
            recipe.gist_answers(model, data, **bad, **kwargs)
        assert excinfo.value.field == field


def test_train_gist_lowers_the_loss_saves_and_resumes(tmp_path):
    from conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama()
    contexts, answers = _rows(10, 8, 12, 9, seed=11), _rows(5, 6, 4, 5, seed=12)
    data = [{"context": c, "tail": [5], "answer": a} for c, a in zip(contexts, answers)]
    out = tmp_path / "gist"
    recipe.train_gist(model, tokenizer, data=data, num_gist=2, rank=4, steps=12, batch_size=2, lr=1e-2,
                      embedding_lr=5e-2, output_dir=out, save_every=6, progress=False)
    losses = model.train_losses
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    for name in ("token_reduction.safetensors", "README.md", recipe.TRAINING_STATE, "config.json"):
        assert os.path.isfile(out / name)
    card = (out / "README.md").read_text()
    assert "steps: 12" in card and "seed 0" in card
    state = json.loads((out / recipe.TRAINING_STATE).read_text())
    assert state["step"] == 12 and state["examples"] == 4
    # a second call with the same data resumes from the checkpoint: nothing more to do, same weights
    again = make_tiny_llama()
    recipe.train_gist(again, tokenizer, data=data, num_gist=2, rank=4, steps=12, batch_size=2, lr=1e-2,
                      embedding_lr=5e-2, output_dir=out, save_every=6, progress=False)
    assert again.train_losses == losses
    for a, b in zip(model.hf_tokred_modules.parameters(), again.hf_tokred_modules.parameters()):
        assert torch.equal(a, b)


def test_task_probe_adds_its_weighted_loss_through_the_same_cache_and_is_trained(tmp_path):
    from conftest import make_tiny_tokenizer

    contexts, answers = _rows(10, 8, 12, 9, seed=11), _rows(5, 6, 4, 5, seed=12)
    probes = _rows(3, 4, 3, 5, seed=13)
    data = [{"context": c, "tail": [5], "answer": a, "probe_tail": [6, 7], "probe_answer": p}
            for c, a, p in zip(contexts, answers, probes)]
    model = _trained_model()
    plain = recipe.gist_loss(model, data[:2], pad=0)
    parts: dict = {}
    probed = recipe.gist_loss(model, data[:2], pad=0, probe_weight=0.5, parts=parts)
    # the answer term is untouched by the probe read beside it on a copy of the same cache
    assert parts["answer"] == plain.item() and parts["probe"] > 0
    assert probed.item() == pytest.approx(plain.item() + 0.5 * parts["probe"], rel=1e-6)
    alone = recipe.gist_loss(model, [{**e, "answer": e["probe_answer"], "tail": e["probe_tail"]} for e in data[:2]],
                             pad=0)
    assert parts["probe"] == pytest.approx(alone.item(), rel=1e-6)
    tokenizer = make_tiny_tokenizer()
    out = tmp_path / "gist"
    trained = make_tiny_llama()
    recipe.train_gist(trained, tokenizer, data=data, num_gist=2, rank=4, steps=4, batch_size=2, probe_weight=0.5,
                      output_dir=out, progress=False)
    state = json.loads((out / recipe.TRAINING_STATE).read_text())
    assert state["fingerprint"]["probe_weight"] == 0.5 and len(state["answer_losses"]) == 4
    assert all(total > answer for total, answer in zip(state["losses"], state["answer_losses"]))
    card = (out / "README.md").read_text()
    assert "0.5 x the cross-entropy of the system prompt's task" in card and "the answers' term alone" in card
    for bad_data, weight in ((data, -1.0), ([{k: e[k] for k in ("context", "tail", "answer")} for e in data], 0.5)):
        untouched = make_tiny_llama()
        with pytest.raises(ConfigError) as error:
            recipe.train_gist(untouched, tokenizer, data=bad_data, num_gist=2, rank=4, steps=1, probe_weight=weight,
                              progress=False)
        assert error.value.field == "probe_weight" and not hasattr(untouched, "hf_tokred_modules")


def test_distillation_reads_the_dense_distributions_and_its_top_1_is_the_greedy_cross_entropy(tmp_path):
    from conftest import make_tiny_tokenizer

    model = _trained_model()
    contexts = _rows(10, 8, 12, seed=21)
    with torch.no_grad():  # the dense model's greedy answers (plain generate stays dense with the gist attached)
        answers = [model.generate(torch.tensor([c + [5]]), max_new_tokens=5, do_sample=False)[0, -5:].tolist()
                   for c in contexts]
    data = [{"context": c, "tail": [5], "answer": a} for c, a in zip(contexts, answers)]
    batched = recipe.teacher_distributions(model, data, 8, pad=0, batch_size=3)
    for row, (ids, probs) in zip(data, batched):
        alone_ids, alone_probs = recipe.teacher_distributions(model, [row], 8, pad=0)[0]
        assert ids.shape == probs.shape == (5, 8) and torch.equal(ids, alone_ids)
        torch.testing.assert_close(probs, alone_probs)  # right padding changes nothing
        torch.testing.assert_close(probs.sum(-1), torch.ones(5))
        assert ids[:, 0].tolist() == row["answer"]  # the most likely token at each position is the greedy one
    # a one-token teacher at the greedy ids is the cross-entropy of the greedy answers
    top1 = [{**e, "teacher": t} for e, t in zip(data, recipe.teacher_distributions(model, data, 1, pad=0))]
    plain = recipe.gist_loss(model, top1, pad=0)
    assert recipe.gist_loss(model, top1, pad=0, distill=True).item() == pytest.approx(plain.item(), rel=1e-5)
    wide = [{**e, "teacher": t} for e, t in zip(data, batched)]
    assert 0 < recipe.gist_loss(model, wide, pad=0, distill=True).item() != pytest.approx(plain.item(), rel=1e-3)
    tokenizer = make_tiny_tokenizer()
    out = tmp_path / "gist"
    trained = make_tiny_llama()
    recipe.train_gist(trained, tokenizer, data=data, num_gist=2, rank=4, steps=6, batch_size=3, distill_top=8,
                      lr=1e-2, embedding_lr=5e-2, output_dir=out, progress=False)
    state = json.loads((out / recipe.TRAINING_STATE).read_text())
    assert state["fingerprint"]["distill_top"] == 8 and len(state["losses"]) == 6
    assert all(loss > 0 for loss in state["losses"]) and sum(state["losses"][-2:]) < sum(state["losses"][:2])
    assert "KL divergence from the dense model's next-token distributions" in (out / "README.md").read_text()
    assert "teacher" not in data[0]  # the caller's rows are left as they were
    # a finished run resumed trains nothing, so it reads no dense distributions either
    resumed = make_tiny_llama()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "teacher_distributions", lambda *args, **kwargs: pytest.fail("distributions re-read"))
        recipe.train_gist(resumed, tokenizer, data=data, num_gist=2, rank=4, steps=6, batch_size=3, distill_top=8,
                          lr=1e-2, embedding_lr=5e-2, output_dir=out, progress=False)
    assert resumed.train_losses == state["losses"]
    vocab = trained.config.vocab_size
    for bad in (-1, 1.5, True, vocab + 1):
        untouched = make_tiny_llama()
        with pytest.raises(ConfigError, match=f"distill_top: expected an int from 0 .off. to the vocabulary size {vocab}") as error:
            recipe.train_gist(untouched, tokenizer, data=data, num_gist=2, rank=4, steps=1, distill_top=bad,
                              progress=False)
        assert error.value.field == "distill_top" and not hasattr(untouched, "hf_tokred_modules")


def test_bench_counts_the_tasks_named_through_the_full_prompt_and_the_gist(monkeypatch):
    from hf_tokred.bench.lm_gist import _task_named
    from hf_tokred.recipes.lm_data import SYSTEM_TASKS

    chats = [[{"role": "system", "content": f"You are x. Your task: {task}. Follow these house rules:"},
              {"role": "user", "content": "passage"}] for task in SYSTEM_TASKS[:3]]
    data = [{"prompt": c, "context": [3, 4], "tail": [5], "answer": [6], "probe_tail": [7, 8]} for c in chats]
    data.append({"prompt": "a request", "context": [3], "tail": [5], "answer": [6]})  # no probe: not asked
    replies = {"full": [f"My task: {t}." for t in SYSTEM_TASKS[:2]]  # all three named, the third in other words
               + [f"The system asked me to {SYSTEM_TASKS[2].replace('list', 'write down')}."],
               "gist": [f"My task: {SYSTEM_TASKS[0]}.", f"My task: {SYSTEM_TASKS[0]}.", "I do not know."]}
    seen = []

    class Decoder:  # reply [i] of the last mode asked decodes to replies[mode][i]
        mode = None

        def decode(self, reply):
            return replies[self.mode][reply[0]]

    decoder = Decoder()

    def answers(model, rows, *, mode, **kwargs):
        seen.append((mode, [row["tail"] for row in rows]))
        decoder.mode = mode
        return [[i] for i in range(len(rows))]

    monkeypatch.setattr(recipe, "gist_answers", answers)
    assert _task_named(None, decoder, data) == {"of": 3, "full prompt": 3, "gist": 1}
    assert seen == [("full", [[7, 8]] * 3), ("gist", [[7, 8]] * 3)]  # asked after the prompt, in its place


def test_train_gist_takes_every_training_prompt_by_default(monkeypatch):
    from conftest import make_tiny_tokenizer

    real_gist_data, used = recipe.gist_data, []

    def recorded_gist_data(*args, **kwargs):
        data = real_gist_data(*args, **kwargs)
        used.append([row["prompt"] for row in data])
        return data

    monkeypatch.setattr(recipe, "gist_prompts", lambda tokenizer, split, **kwargs: [f"prompt {i}" for i in range(7)])
    monkeypatch.setattr("hf_tokred.recipes.lm_data.dense_generations",
                        lambda model, tokenizer, prompts, **kwargs: [[7, 8]] * len(prompts))
    monkeypatch.setattr(recipe, "split_prompt", lambda tokenizer, prompt: ([3, 4, 5, 6], [5]))  # no chat template
    monkeypatch.setattr(recipe, "gist_data", recorded_gist_data)
    tokenizer = make_tiny_tokenizer()
    recipe.train_gist(make_tiny_llama(), tokenizer, num_gist=2, rank=4, steps=1, progress=False)
    recipe.train_gist(make_tiny_llama(), tokenizer, num_gist=2, rank=4, steps=1, train_prompts=3, progress=False)
    assert used == [[f"prompt {i}" for i in range(7)], [f"prompt {i}" for i in range(3)]]
    with pytest.raises(ConfigError, match="count: expected 1..7"):
        recipe.gist_data(None, tokenizer, "train", 8)
    with pytest.raises(ConfigError, match=r"train_prompts: expected 1..7 \(train has 7 gist prompts\), got 8") as error:
        recipe.train_gist(make_tiny_llama(), tokenizer, num_gist=2, rank=4, steps=1, train_prompts=8, progress=False)
    assert error.value.field == "train_prompts"


def test_cli_parses_train_and_bench():
    from hf_tokred.bench.lm_gist import run_bench
    from hf_tokred.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "gist", "--num-gist", "4", "--steps", "3"])
    assert (args.num_gist, args.steps, args.batch_size) == (4, 3, 4)
    defaults = parser.parse_args(["train", "gist"])
    assert (defaults.steps, defaults.prompts) == (330, None)  # 2.5 passes over every training prompt
    assert exit_code(["train", "gist", "--num-gist", "0"]) == 2
    bench = parser.parse_args(["learned-lm", "gist", "--samples", "5", "--weights", "w"])
    assert (bench.samples, bench.weights) == (5, "w")
    assert exit_code(["learned-lm", "gist", "--weights", "/nonexistent/gist"]) == 1
    sampled = parser.parse_args(["learned-lm", "gist", "--temperature", "0.2", "--draws", "2"])
    assert (sampled.temperature, sampled.top_p, sampled.draws) == (0.2, 0.9, 2)
    assert bench.temperature == 0.0  # greedy unless asked
    assert exit_code(["learned-lm", "gist", "--top-p", "0"]) == 2
    assert bench.prompt_kind is None  # the kind the weights were trained on
    assert parser.parse_args(["learned-lm", "gist", "--prompt-kind", "system"]).prompt_kind == "system"
    assert parser.parse_args(["train", "gist", "--prompt-kind", "system"]).prompt_kind == "system"
    assert defaults.prompt_kind == "request"
    assert exit_code(["train", "gist", "--prompt-kind", "instruction"]) == 2
    assert defaults.task_probe == 0.0  # off unless asked
    assert parser.parse_args(["train", "gist", "--task-probe", "1"]).task_probe == 1.0
    assert exit_code(["train", "gist", "--task-probe", "-1"]) == 2
    assert defaults.distill_top is None  # the greedy answers' cross-entropy unless asked
    assert parser.parse_args(["train", "gist", "--distill-top", "32"]).distill_top == 32
    assert exit_code(["train", "gist", "--distill-top", "0"]) == 2
    with pytest.raises(ConfigError, match="draws"):
        run_bench("/nonexistent/gist", temperature=0.2, draws=1)


# ---------------------------------------------------------------------------------------------
# the embedded SmolLM2
# ---------------------------------------------------------------------------------------------


def test_smollm2_prompts_are_about_200_tokens_and_compress_to_8_entries():
    from hf_tokred.embedded import load_smollm2
    from hf_tokred.recipes.lm_data import chat_ids

    model, tokenizer = load_smollm2()
    prompts = recipe.gist_prompts(tokenizer, "heldout", 3)
    lengths = [len(chat_ids(tokenizer, p)) for p in prompts]
    assert all(190 <= n <= 200 for n in lengths), lengths
    context, tail = recipe.split_prompt(tokenizer, prompts[0])
    assert context + tail == list(chat_ids(tokenizer, prompts[0]))
    assert tokenizer.decode(tail).strip() == "<|im_start|>assistant"
    ids = torch.tensor([context])
    with torch.no_grad():
        dense = model(ids[:, :40]).logits
    hf_tokred.apply(model, {"method": "gist", "num_gist": 8})
    ctx = hf_tokred.compress_context(model, ids)
    assert ctx.entries == 8 and ctx.context_tokens == [len(context)]
    assert all(layer.keys.shape[2] == 8 for layer in ctx.cache.layers) and len(ctx.cache.layers) == 30
    with torch.no_grad():
        assert torch.equal(model(ids[:, :40]).logits, dense)


def test_smollm2_system_prompts_compress_the_system_turn_and_leave_the_user_passage():
    from transformers import AutoTokenizer

    from hf_tokred.embedded import smollm2_path
    from hf_tokred.recipes.lm_data import SYSTEM_RULES, chat_ids, system_prompts, system_task

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    chats = recipe.gist_prompts(tokenizer, "heldout", 4, kind="system")
    assert chats == recipe.gist_prompts(tokenizer, "heldout", 4, kind="system")
    for chat in chats:
        context, tail = recipe.split_prompt(tokenizer, chat)
        assert context + tail == list(chat_ids(tokenizer, chat))
        assert tokenizer.decode(context).startswith("<|im_start|>system\nYou are ")
        assert tokenizer.decode(tail) == f"<|im_start|>user\n{chat[1]['content']}<|im_end|>\n<|im_start|>assistant\n"
        # rules are added while the system turn fits 200 tokens: at most one rule (< 25 tokens) short of it
        assert 200 - 25 < len(context) <= 200, len(context)
    assert max(len(tokenizer(f"\n14. {rule}")["input_ids"]) for rule in SYSTEM_RULES) < 25
    # the splits share no passage and no system prompt; the default draws twelve rules
    train, heldout = system_prompts("train"), system_prompts("heldout")
    for turn in (0, 1):  # the system prompt, the user's passage
        assert not {chat[turn]["content"] for chat in train} & {chat[turn]["content"] for chat in heldout}
    assert all(len(c[0]["content"].splitlines()) == 13 for c in heldout[:5])
    # the task probe: a question after the system turn, the task it was drawn with as the answer
    for chat in chats:
        probe = recipe.task_probe(tokenizer, chat)
        assert tokenizer.decode(probe["probe_tail"]) == (f"<|im_start|>user\n{recipe.TASK_QUESTION}<|im_end|>\n"
                                                         "<|im_start|>assistant\n")
        assert tokenizer.decode(probe["probe_answer"]) == f"My task: {system_task(chat)}.<|im_end|>\n"
    assert all(system_task(chat) is not None for chat in heldout)
    assert recipe.task_probe(tokenizer, "Summarize this.") == {}
    assert recipe.task_probe(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]) == {}
    assert system_prompts("heldout", 3, seed=1) != system_prompts("heldout", 3)
    with pytest.raises(ConfigError, match="kind: expected one of request, system") as error:
        recipe.gist_prompts(tokenizer, "heldout", 3, kind="instruction")
    assert error.value.field == "kind"


def test_assisted_decoding_continues_the_gist_cache_as_plain_generate_does():
    """The gist entries' placeholder ids in the sequence must not reach the cache again (it would hold them twice)."""
    model = _trained_model()
    ctx = hf_tokred.compress_context(model, torch.tensor(_rows(11)))
    full = torch.cat([ctx.prefix_ids, torch.tensor(_rows(3, seed=5))], -1)
    assert_assisted_decoding_continues_a_cache_as_plain_generate(model, full, ctx.fresh_cache)
    hf_tokred.remove(model)
    assert "_get_candidate_generator" not in model.__dict__
