"""TokenSkip (tokenskip): problems, compressed traces, the LoRA hooks, the control, save/load, the recipe, the CLI."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from safetensors.torch import load_file

import hf_tokred
from hf_tokred.errors import ConfigError, TokenReductionError, UnsupportedModelError
from hf_tokred.methods.nlp.tokenskip import TokenSkipConfig, build_controls, export_peft_adapter
from hf_tokred.prompt.base import Scorer
from hf_tokred.recipes import tokenskip as recipe
from hf_tokred.recipes.tokenskip import (
    check_problem,
    generate_problems,
    parse_answer,
    prompt_ids,
    tokenskip_examples,
)


def _domain_tokenizer():
    """A word-level fast tokenizer over the generator's words, with every digit a token of its own (as SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    words = {"Question", "Answer", ":", ".", "The", "answer", "is"} | set("0123456789")
    for problem in generate_problems(60, "train") + generate_problems(60, "heldout"):
        for text in (problem.question, problem.reasoning):
            words |= {piece for piece, _ in split.pre_tokenize_str(text)}
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "<unk>", "</s>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


TOKENIZER = _domain_tokenizer()
EOS = TOKENIZER.eos_token_id


def _model(seed: int = 0):
    return make_tiny_llama(seed, vocab_size=len(TOKENIZER), eos_token_id=EOS)


def _cfg(**overrides):
    params = dict(method="tokenskip", ratio=0.5, ratios=[0.5, 1.0], control_ids=build_controls(TOKENIZER, [0.5, 1.0]))
    params.update(overrides)
    return hf_tokred.TokenReductionConfig(**params)


def _randomize(model, seed: int = 1):
    """Give the attached LoRA non-zero weights (a trained adapter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.hf_tokred_modules.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def _ids(*lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, len(TOKENIZER), (n,), generator=generator).tolist() for n in lengths]


def _scorer():
    return Scorer(_model(3), TOKENIZER)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

_SOLVE = {
    "shopping": lambda n: n["a"] * n["p"] + n["b"] * n["q"],
    "shopping_change": lambda n: n["bill"] - (n["a"] * n["p"] + n["b"] * n["q"]),
    "ages": lambda n: n["a"] * n["k"] + n["y"],
    "ages_grandfather": lambda n: n["a"] * n["k"] + n["d"] + n["y"],
    "rates": lambda n: n["r"] * n["h"] * n["d"],
    "rates_boxes": lambda n: n["r"] * n["h"] * n["d"] / n["b"],
    "remainders": lambda n: (n["n"] // n["b"]) * n["p"],
    "travel": lambda n: n["v"] * n["h"] + n["w"] * n["g"],
    "savings": lambda n: (n["s"] * n["weeks"] - n["spent"]) / n["k"],
}


def test_problems_are_checked_and_answers_recomputed():
    problems = generate_problems(120, "train") + generate_problems(60, "heldout", seed=3)
    assert {p.kind for p in problems} == set(_SOLVE)
    for p in problems:
        check_problem(p)
        assert 2 <= len(p.steps) <= 4
        in_question = re.findall(r"\d+", p.question)
        assert all(str(v) in in_question for v in p.numbers.values()), p.question
        assert _SOLVE[p.kind](p.numbers) == p.answer > 0, p.question  # recomputed from the question's numbers
        assert p.steps[-1].count(str(p.answer)) >= 1
    assert generate_problems(30, "train") == generate_problems(30, "train")  # seeded
    assert generate_problems(10, "train")[:5] == generate_problems(5, "train")
    assert [p.question for p in generate_problems(10, "train")] != [p.question for p in generate_problems(10, "heldout")]
    broken = generate_problems(1)[0]
    broken.steps[0] = broken.steps[0].replace(" = ", " = 1")
    with pytest.raises(TokenReductionError, match="wrong step"):
        check_problem(broken)
    with pytest.raises(ConfigError) as err:
        generate_problems(3, "test")
    assert err.value.field == "split"


def test_parse_answer():
    assert parse_answer("Step 1: 3 * 4 = 12.\nThe answer is 12.") == 12
    assert parse_answer("The answer is 1,200 dollars") == 1200
    assert parse_answer("so 5 and then 7") == 7
    assert parse_answer("no number") is None


def test_traces_compressed_keep_digits_equations_and_answer():
    cfg = _cfg()
    problems = generate_problems(12, "train")
    examples = tokenskip_examples(problems, TOKENIZER, cfg, seed=0, method="llmlingua", scorer=_scorer())
    assert {e["ratio"] for e in examples} == {0.5, 1.0}
    for problem, example in zip(problems, examples):
        prompt = prompt_ids(TOKENIZER, problem.question) + cfg.control(example["ratio"])
        assert example["input_ids"][:len(prompt)] == prompt
        assert example["labels"][:len(prompt)] == [-100] * len(prompt)
        response = example["labels"][len(prompt):]
        assert response == example["input_ids"][len(prompt):] and response[-1] == EOS
        text = TOKENIZER.decode(response[:-1])
        assert text.endswith(TOKENIZER.decode(TOKENIZER(problem.answer_line)["input_ids"]))  # answer line never cut
        original = TOKENIZER.decode(TOKENIZER(problem.reasoning)["input_ids"])
        assert re.findall(r"\d", text.rsplit("The answer", 1)[0]) == re.findall(r"\d", original)  # every digit kept
        assert text.count("=") == original.count("=") and text.count("Step") == original.count("Step")
        if example["ratio"] == 1.0:
            assert example["compressed_tokens"] == example["origin_tokens"]
        else:
            assert example["compressed_tokens"] < example["origin_tokens"]
    summary = recipe.compression_summary(examples)
    assert [r["ratio"] for r in summary] == [0.5, 1.0] and summary[1]["achieved"] == 1.0
    assert 0.5 <= summary[0]["achieved"] < 1.0


# ---------------------------------------------------------------------------------------------
# config, controls, errors
# ---------------------------------------------------------------------------------------------


def test_build_controls_and_config_fields():
    controls = build_controls(TOKENIZER, [0.5, 1.0])
    vocab = TOKENIZER.get_vocab()
    assert controls == [[EOS, vocab["0"], vocab["."], vocab["5"], EOS], [EOS, vocab["1"], vocab["."], vocab["0"], EOS]]
    with pytest.raises(ConfigError) as err:  # a tokenizer without digits cannot tell the ratios apart
        build_controls(make_tiny_tokenizer(), [0.5, 0.6])
    assert err.value.field == "control_ids"
    cfg = _cfg()
    assert cfg.control() == controls[0] and cfg.control(1.0) == controls[1] and cfg.scaling == 2.0
    assert hf_tokred.TokenReductionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TokenSkipConfig.stage == "prompt" and TokenSkipConfig.learned and TokenSkipConfig.model_kinds == ("decoder",)


@pytest.mark.parametrize("overrides, field", [
    ({"ratio": 0.6}, "ratio"),  # not among the trained ratios
    ({"rank": 0}, "rank"),
    ({"rank": -2}, "rank"),
    ({"alpha": 0.0}, "alpha"),
    ({"ratios": []}, "ratios"),
    ({"ratios": [0.5, 0.5, 1.0], "control_ids": []}, "ratios"),
    ({"ratios": [0.5, 1.5]}, "ratios"),
    ({"control_ids": [[5]]}, "control_ids"),  # one list per ratio
    ({"control_ids": [[5], [5]]}, "control_ids"),  # the same control twice
    ({"control_ids": [[5], []]}, "control_ids"),
    ({"control_ids": [[5], [-1]]}, "control_ids"),
    ({"control_ids": [[5], ["a"]]}, "control_ids"),
    ({"target_modules": ["model.q_proj"]}, "target_modules"),
])
def test_bad_fields_are_refused(overrides, field):
    with pytest.raises(ConfigError) as err:
        _cfg(**overrides)
    assert err.value.field.split("[")[0] == field  # a list item is named ratios[1]


def _untouched(model, dense_logits, ids):
    assert "hf_tokred_modules" not in model._modules and not hasattr(model, "_hf_tokred_applied")
    assert "generate" not in model.__dict__ and model.config._attn_implementation == "sdpa"
    assert torch.equal(model(ids).logits, dense_logits)


def test_errors_at_apply_leave_the_model_untouched():
    model = _model()
    ids = torch.tensor(_ids(6))
    dense = model(ids).logits
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, _cfg(target_modules=["nope_proj"]))
    assert err.value.field == "target_modules" and "q_proj" in str(err.value)
    _untouched(model, dense, ids)
    with pytest.raises(ConfigError) as err:
        hf_tokred.apply(model, _cfg(control_ids=[[len(TOKENIZER) + 5], [3]]))
    assert err.value.field == "control_ids"
    _untouched(model, dense, ids)
    base = model.model  # a decoder that cannot generate
    with pytest.raises(UnsupportedModelError, match="cannot generate"):
        hf_tokred.apply(base, _cfg())
    assert "hf_tokred_modules" not in base._modules
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="decoder"):
        hf_tokred.apply(bert, _cfg())
    assert "hf_tokred_modules" not in bert._modules


# ---------------------------------------------------------------------------------------------
# inference: no-op, control, padding, peft, save/load
# ---------------------------------------------------------------------------------------------


def test_noop_is_bit_identical_and_remove_restores():
    model = _model()
    ids = torch.tensor(_ids(9, 9, seed=2))
    dense_logits = model(ids).logits
    dense_out = model.generate(ids, max_new_tokens=5, do_sample=False)
    hf_tokred.apply(model, _cfg(control_ids=[]))  # fresh adapter (lora_B = 0), no control
    assert torch.equal(model(ids).logits, dense_logits)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), dense_out)
    _randomize(model)
    assert not torch.equal(model(ids).logits, dense_logits)
    hf_tokred.remove(model)
    assert torch.equal(model(ids).logits, dense_logits)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), dense_out)


def test_control_suffix_is_appended_exactly_and_left_out_of_the_output():
    model = _model()
    cfg = _cfg()
    hf_tokred.apply(model, cfg)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append((k["input_ids"].clone(), k.get(
        "attention_mask"))) if not seen else None, with_kwargs=True)
    rows = _ids(5, 8, seed=4)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for b, row in enumerate(rows):  # left-padded
        ids[b, 8 - len(row):] = torch.tensor(row)
        mask[b, 8 - len(row):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    handle.remove()
    fed, fed_mask = seen[0]
    control = cfg.control()
    assert control == build_controls(TOKENIZER, [0.5])[0]
    for b, row in enumerate(rows):
        assert fed[b][fed_mask[b].bool()].tolist() == row + control
    assert out.shape == (2, 12) and torch.equal(out[:, :8], ids)  # the caller's prompt, then 4 new tokens
    hf_tokred.apply(model, _cfg(ratio=1.0))  # another ratio: its own control
    seen.clear()
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].clone()) if not seen else None,
                                             with_kwargs=True)
    model.generate(torch.tensor([rows[1]]), max_new_tokens=1, do_sample=False)
    handle.remove()
    assert seen[0][0].tolist() == rows[1] + build_controls(TOKENIZER, [1.0])[0]


def test_padded_batches_equal_rows_alone():
    model = _model()
    hf_tokred.apply(model, _cfg())
    _randomize(model)
    rows = _ids(4, 9, 6, seed=5)
    alone = [model.generate(torch.tensor([r]), max_new_tokens=6, do_sample=False)[0, len(r):].tolist() for r in rows]
    width = max(map(len, rows))
    for side in ("left", "right"):
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[b, span] = torch.tensor(row)
            mask[b, span] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[:, :width], ids)
        assert [out[b, width:].tolist() for b in range(len(rows))] == alone, side


def test_text_generation_pipeline():
    from transformers import pipeline

    model = _model()
    hf_tokred.apply(model, _cfg())
    _randomize(model)
    prompt = "Question: Tom has 5 cookies . Answer :"
    generator = pipeline("text-generation", model=model, tokenizer=TOKENIZER)
    text = generator(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    ids = TOKENIZER(prompt, return_tensors="pt")["input_ids"]
    new = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    assert text.startswith(prompt) and text[len(prompt):].strip() == TOKENIZER.decode(new).strip()


def test_hooks_equal_peft_lora(tmp_path):
    import peft

    model = _model()
    hf_tokred.apply(model, _cfg(target_modules=["q_proj", "v_proj", "down_proj"], rank=4, alpha=12.0))
    _randomize(model)
    ids = torch.tensor(_ids(7, 7, seed=6))
    ours = model(ids).logits
    folder = export_peft_adapter(model, tmp_path / "peft")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 12.0 and len(adapter_config["target_modules"]) == 6
    reference = peft.PeftModel.from_pretrained(_model(), folder).eval()
    assert torch.equal(reference(ids).logits, ours)
    with pytest.raises(TokenReductionError, match="no tokenskip"):
        export_peft_adapter(_model(), tmp_path / "none")


def test_save_load_reattaches_and_keeps_base_weights_clean(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = _model()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor(_ids(6, 6, seed=7))
    dense_logits = model(ids).logits
    hf_tokred.apply(model, _cfg())
    _randomize(model)
    logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(dense_state) and all(torch.equal(saved[k], dense_state[k]) for k in saved)
    side = load_file(tmp_path / "token_reduction.safetensors")
    assert side and all(k.startswith("tokenskip.model.layers.") and ".lora_" in k for k in side)
    assert len(side) == 2 * 7 * 2  # lora_A and lora_B of the 7 Linear layers of both blocks
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.generation_config.eos_token_id = None
    assert loaded.config.token_reduction["control_ids"] == _cfg().control_ids
    assert torch.equal(loaded(ids).logits, logits)
    assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False), out)
    plain = LlamaForCausalLM._hf_tokred_originals[0](LlamaForCausalLM, tmp_path)  # what a process without hf_tokred loads
    assert torch.equal(plain(ids).logits, dense_logits)
    other = AutoModelForCausalLM.from_pretrained(tmp_path, token_reduction={**loaded.config.token_reduction, "ratio": 1.0})
    assert torch.equal(other(ids).logits, logits) and other.config.token_reduction["ratio"] == 1.0
    with pytest.raises(ConfigError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path, token_reduction={**loaded.config.token_reduction, "ratio": 0.7})
    assert err.value.field == "ratio"


# ---------------------------------------------------------------------------------------------
# the recipe and the CLI
# ---------------------------------------------------------------------------------------------


def _examples(count=6):
    return tokenskip_examples(generate_problems(count, "train"), TOKENIZER, _cfg(), method="llmlingua", scorer=_scorer())


def _train(examples, **kwargs):
    model = _model()
    hf_tokred.apply(model, _cfg())
    base = {k: v.clone() for k, v in model.state_dict().items() if "hf_tokred_modules" not in k}
    # a constant learning rate: 2 steps then 2 more (resumed) are then the same as 4 steps at once
    model = recipe.train_tokenskip(model, TOKENIZER, examples=examples, batch_size=2, lr=1e-2, lr_schedule="constant",
                                   progress=False, **kwargs)
    return model, base


def test_recipe_trains_only_the_lora_reproducibly_and_resumes(tmp_path):
    from hf_tokred.training import train_tokenskip

    assert train_tokenskip is recipe.train_tokenskip
    examples = _examples()
    model, base = _train(examples, steps=4, seed=1)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the base model is frozen
    lora = {k: v for k, v in state.items() if "hf_tokred_modules" in k}
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert len(model.train_losses) == 4 and not any(p.requires_grad for p in model.parameters())
    again, _ = _train(examples, steps=4, seed=1)
    assert again.train_losses == model.train_losses
    assert all(torch.equal(again.state_dict()[k], v) for k, v in lora.items())
    first, _ = _train(examples, steps=2, seed=1, output_dir=tmp_path, save_every=1)
    assert first.train_losses == model.train_losses[:2]
    resumed, _ = _train(examples, steps=4, seed=1, output_dir=tmp_path, save_every=1)
    assert resumed.train_losses == model.train_losses
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in lora.items())
    assert {"README.md", "tokenskip_training.json", "token_reduction.safetensors"} <= set(os.listdir(tmp_path))
    assert not any("lora" in k for k in load_file(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        _train(examples, steps=0)
    assert err.value.field == "steps"


def _patch_embedded(monkeypatch):
    import hf_tokred.embedded

    monkeypatch.setattr(hf_tokred.embedded, "load_smollm2", lambda *a, **k: (_model(), TOKENIZER))
    scorer = _scorer()
    original = recipe.compress_trace
    monkeypatch.setattr(recipe, "compress_trace", lambda text, rate, **kw: original(
        text, rate, **{**kw, "method": "llmlingua", "classifier": None, "scorer": scorer}))


def test_cli_train_and_bench(tmp_path, monkeypatch, capsys):
    from hf_tokred.cli import main

    _patch_embedded(monkeypatch)
    output = tmp_path / "out"
    assert main(["train", "tokenskip", "--steps", "2", "--batch-size", "2", "--heldout", "2", "--output", str(output),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "saved to" in printed and "accuracy" in printed
    assert json.loads((output / "config.json").read_text())["token_reduction"]["ratio"] == 0.6
    report = tmp_path / "bench.json"
    assert main(["nlp-bench", "tokenskip", "--steps", "1", "--batch-size", "2", "--heldout", "2", "--max-new-tokens",
                 "3", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert set(result["runs"]) == {"tokenskip", "uncompressed"} and result["budget"]["steps"] == 1
    assert result["runs"]["tokenskip"]["ratio"] == 0.6 and 0 <= result["runs"]["uncompressed"]["accuracy"] <= 1
    assert "held-out" in capsys.readouterr().out


def test_composes_with_a_kv_policy():
    from hf_tokred.compat import cache_in
    from hf_tokred.kv.cache import TokenReductionCache

    model = _model()
    hf_tokred.apply(model, hf_tokred.compose(_cfg(), {"method": "streamingllm", "sink_tokens": 2, "window": 6}))
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["input_ids"].clone(), cache_in(k))), with_kwargs=True)
    row = _ids(10, seed=8)[0]
    out = model.generate(torch.tensor([row]), max_new_tokens=3, do_sample=False)
    handle.remove()
    assert seen[0][0][0].tolist() == row + _cfg().control() and isinstance(seen[0][1], TokenReductionCache)
    assert out.shape == (1, 13) and out[0, :10].tolist() == row
    with pytest.raises(ConfigError, match="stage 'prompt'"):
        hf_tokred.compose(_cfg(), {"method": "llmlingua", "rate": 0.5})
