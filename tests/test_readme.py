"""The README's snippets run, offline, on tiny random models, and show what they claim.

Every ```python block of README.md runs in README order in one namespace, as a reader following along
would run them. A block whose first line starts with ``>>>`` is a doctest (its outputs and error messages are
compared, whitespace-normalized); any other block is executed, and the claims its comments make are checked
right after it by the function of ``CHECKS`` whose key the block contains. The namespace starts with what the
README says the snippets assume: ``repo`` (a causal LM folder with its tokenizer), ``vit_repo``, ``bert_repo``
and ``pipe_repo``. Hub uploads go to a fake HfApi (as in test_hub.py). The ``hf-tokred`` lines of the CLI
section must parse.
"""

from __future__ import annotations

import doctest
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import faked_hub, make_tiny_llama

import hf_tokred
from hf_tokred.integration.wiring import get_applied

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language`` in README.md."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


# ---------------------------------------------------------------------------------------------
# The models the snippets assume
# ---------------------------------------------------------------------------------------------


def _tiny_repos(root: Path) -> dict[str, str]:
    from test_diffusers import tiny_dit_pipeline
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    repo = root / "tiny-llama"
    # SmolLM2's real tokenizer (text round-trips through it: the prompt-compression snippet rewrites text)
    from transformers import AutoTokenizer

    from hf_tokred.embedded import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    make_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(repo)
    tokenizer.save_pretrained(repo)

    vit_repo = root / "tiny-vit"
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
                                              num_attention_heads=4, intermediate_size=128, num_labels=3))
    vit.save_pretrained(vit_repo)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_repo)

    bert_repo = root / "tiny-bert"
    bert_repo.mkdir()
    words = "the a cat dog sat on mat token merging is fast and good very small model".split()
    (bert_repo / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab=str(bert_repo / "vocab.txt")).save_pretrained(bert_repo)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert_repo)

    pipe_repo = root / "tiny-dit-pipeline"
    tiny_dit_pipeline().save_pretrained(pipe_repo)

    from vlm_models import llava, llava_processor

    vlm_repo = root / "tiny-llava"
    llava()[0].save_pretrained(vlm_repo)
    llava_processor().save_pretrained(vlm_repo)
    return {"repo": str(repo), "vit_repo": str(vit_repo), "bert_repo": str(bert_repo), "pipe_repo": str(pipe_repo),
            "vlm_repo": str(vlm_repo)}


# ---------------------------------------------------------------------------------------------
# What the plain blocks claim, checked right after the block holding the key
# ---------------------------------------------------------------------------------------------


def _check_cache(ns):
    cache = ns["cache"]
    assert max(cache.stored_lengths()) <= 512  # "tokens held per layer (<= 512)"
    assert cache.get_seq_length() > 1000  # every token seen is counted, not only those held
    assert cache.kv_bytes() > 0
    assert ns["out"].shape[-1] == ns["inputs"]["input_ids"].shape[-1] + 1000


def _check_attach(ns):
    assert get_applied(ns["model"]).config == ns["cfg"]


def _check_encoders(ns):
    from PIL import Image

    assert get_applied(ns["vit"]).config.method == "tome"
    image = Image.new("RGB", (40, 48), (120, 30, 200))
    assert len(ns["classifier"](image)) == 3
    assert get_applied(ns["embedder"].model).config.method == "tome"
    assert len(ns["embedder"]("the cat sat on the mat")[0]) > 0
    assert get_applied(ns["generator"].model).config == ns["cfg"]
    assert ns["generator"]("w1 w2 w3", max_new_tokens=3, do_sample=False)[0]["generated_text"]


def _check_save_and_push(ns):
    saved = json.loads(Path("out/config.json").read_text())
    assert saved["token_reduction"] == ns["cfg"].to_dict()
    assert get_applied(ns["again"]).config == ns["cfg"]
    assert get_applied(ns["dense"]) is None
    hub = ns["fake_hub"]
    model_card = hub.commits[-2]["files"]["README.md"].decode()
    assert hub.commits[-2]["repo_id"] == "me/model-streaming"
    assert "AutoModelForCausalLM.from_pretrained(\"me/model-streaming\")" in model_card
    assert "huggingface.co//" not in model_card and "base_model" not in model_card  # loaded from a local folder
    assert list(hub.commits[-1]["files"]) == ["token_reduction_config.json"]


def _check_presets_and_diffusers(ns):
    saved = json.loads(Path("out-pipe/transformer/config.json").read_text())
    assert saved["_token_reduction"]["method"] == "tome_sd"  # apply replaced the todo of from_pretrained


def _check_query_agnostic(ns):
    context, question = ns["context_ids"], ns["question_ids"]
    assert ns["out"].shape[-1] == context.shape[-1] + question.shape[-1] + 32
    assert ns["cache"].get_seq_length() == context.shape[-1]  # the deep copy was used; the cache is as compressed


def _check_storage(ns):
    assert Path("out-kvquant/token_reduction.safetensors").is_file()
    assert ns["out"].shape[-1] == ns["inputs"]["input_ids"].shape[-1] + 32
    fresh = hf_tokred.apply(make_tiny_llama(), {"method": "kvquant", "bits": 3})
    with pytest.raises(hf_tokred.TokenReductionError, match=re.escape("hf_tokred.calibrate(model, texts)")):
        hf_tokred.build_cache(fresh)  # "kvquant refuses to run before calibrate()", and says what to run


def _check_compose(ns):
    applied = get_applied(ns["model"]).config
    assert applied.get("kv_policy").method == "tova" and applied.get("kv_storage").method == "kivi"
    assert ns["out"].shape[-1] == ns["inputs"]["input_ids"].shape[-1] + 32
    with pytest.raises(hf_tokred.ConfigError, match="both act at stage 'kv_policy'"):
        hf_tokred.compose({"method": "tova", "keep": 0.5}, {"method": "snapkv", "keep": 0.5})
    cross = hf_tokred.compose({"method": "tome", "r": 4}, {"method": "streamingllm", "max_tokens": 512})
    with pytest.raises(hf_tokred.UnsupportedModelError):  # "apply refuses such a composition"
        hf_tokred.apply(make_tiny_llama(), cross)


def _check_prompt_compression(ns):
    from hf_tokred.integration.prompt import last_compression

    result = ns["result"]
    assert result["budget_met"] and "71432" in result["compressed_prompt"]
    assert abs(result["compressed_tokens"] - result["origin_tokens"] / 2) <= 0.02 * result["origin_tokens"] / 2 + 1
    [stats] = last_compression(ns["model"])
    assert stats["budget_met"] and stats["compressed_tokens"] < 0.6 * stats["origin_tokens"]
    assert ns["out"].shape[-1] == ns["inputs"]["input_ids"].shape[-1] + 16


def _check_vlm(ns):
    applied = get_applied(ns["vlm"]).config
    assert applied.get("visual").method == "visionzip" and applied.get("kv_storage").method == "kivi"
    assert ns["out"].shape[-1] > ns["inputs"]["input_ids"].shape[-1]  # the prompt, then the new tokens
    cache = hf_tokred.build_cache(ns["vlm"])
    ns["vlm"].generate(**ns["inputs"], max_new_tokens=2, past_key_values=cache)
    images = int((ns["inputs"]["input_ids"] == ns["vlm"].config.image_token_id).sum())
    assert max(cache.stored_lengths()) < ns["inputs"]["input_ids"].shape[-1] - images // 2  # "a quarter of each image"


def _check_mrt5(ns):
    kept = ns["kept_mask"](ns["encoded"])
    assert kept.sum(1).tolist() == ns["batch"]["attention_mask"].sum(1).tolist()  # a fresh gate keeps every byte
    assert ns["encoded"].last_hidden_state.shape[1] == kept.shape[1]
    assert get_applied(ns["byt5"]).config.method == "mrt5"
    assert ns["answer"].shape[0] == 2 and ns["answer"].shape[1] <= 9


def _check_learned_encoder(ns):
    from safetensors.torch import load_file

    saved = load_file("out-ia-red2/token_reduction.safetensors")
    assert saved and all(key.startswith("ia_red2.") for key in saved)  # the interpreters, apart from the weights
    assert get_applied(ns["bert"]).config.method == "ia_red2"


def _check_learned_lm(ns):
    dense = ns["drafting"].generate(**ns["inputs"], max_new_tokens=8, do_sample=False)
    assert torch.equal(ns["out"], dense)  # "verified: the model's own greedy output"
    assert ns["ctx"].entries == 4 and all(layer.keys.shape[-2] == 4 for layer in ns["ctx"].cache.layers)
    assert ns["answer"].shape[1] == 4 + ns["question"].shape[1] + 4


CHECKS = {
    "assistant_model=hf_tokred.eagle_assistant(drafting)": _check_learned_lm,
    "train_ia_red2(bert, batches": _check_learned_encoder,
    "hf_tokred.apply(byt5, {": _check_mrt5,
    "AutoModelForImageTextToText.from_pretrained(vlm_repo": _check_vlm,
    '"method": "longllmlingua", "rate": 0.5}': _check_prompt_compression,
    "hf_tokred.build_cache(model)": _check_cache,
    "hf_tokred.remove(model)": _check_attach,
    'pipeline("image-classification"': _check_encoders,
    'model.save_pretrained("out")': _check_save_and_push,
    "DiffusionPipeline.from_pretrained(pipe_repo": _check_presets_and_diffusers,
    "hf_tokred.compress_context(model, context_ids)": _check_query_agnostic,
    'hf_tokred.calibrate(model, ["': _check_storage,
    '"method": "tova", "keep": 0.5}, {"method": "kivi"': _check_compose,
}


def test_readme_python_snippets_run_and_show_what_they_claim(tmp_path, monkeypatch):
    namespace = {"__name__": "readme", **_tiny_repos(tmp_path / "repos")}
    monkeypatch.chdir(tmp_path)  # the snippets save to "out", "out-pipe", ...
    blocks = readme_blocks("python")
    assert len(blocks) >= 10, "README.md lost its python snippets"
    used = set()
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False)
    with faked_hub() as hub:
        namespace["fake_hub"] = hub
        for line, code in blocks:
            where = f"README.md:{line}"
            if code.lstrip().startswith(">>>"):
                test = parser.get_doctest(code, namespace, where, str(README), line)
                report = []
                result = runner.run(test, out=report.append, clear_globs=False)
                assert result.failed == 0, f"{where}: the doctest fails:\n" + "".join(report)
                namespace.update(test.globs)  # DocTest ran on a copy; later blocks use its names (cfg, ...)
                continue
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the README's own code, on tiny local models
            for key, check in CHECKS.items():
                if key in code:
                    check(namespace)
                    used.add(key)
    assert used == set(CHECKS), f"README snippets no longer hold: {sorted(set(CHECKS) - used)}"


def test_readme_cli_lines_parse():
    from hf_tokred.cli import build_parser

    lines = [line.split("#")[0].strip() for _, code in readme_blocks("bash") for line in code.splitlines()
             if line.startswith("hf-tokred ")]
    assert len(lines) >= 8
    for line in lines:
        argv = shlex.split(line)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse's exit on a bad option
            pytest.fail(f"README: `{line}` does not parse (exit {exc.code})")


def test_readme_mentions_what_fastgen_and_kvquant_need():
    text = README.read_text(encoding="utf-8")
    assert "hf_tokred.calibrate(model, texts)" in text
    assert "special_token_ids" in text and "punctuation_token_ids" in text and "token_ids_from_tokenizer" in text
