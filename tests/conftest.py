"""Shared fixtures: tiny random models built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import os

# The suite never touches the network; huggingface_hub reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_tokred  # noqa: E402,F401  (installs the wrappers before any model is loaded)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Every test runs with one torch thread: the models here are tiny, and on a 2-core machine (CI's, or one
    shared with other jobs) OpenMP's barriers make each small op wait for a busy core, far slower than one
    thread. Benchmarks that take --threads restore this afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama_config(**overrides) -> LlamaConfig:
    params = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=127,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    # never stop early on a random eos: generation lengths must be exact in tests
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    model = make_tiny_llama()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    return path


def make_tiny_tokenizer(path=None):
    """A word-level fast tokenizer over a 128-token vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "<unk>"] + [f"w{i}" for i in range(124)] + ["</s>"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer


def exit_code(argv) -> int:
    """The ``hf-tokred`` CLI's status for ``argv``, whether returned or raised by argparse as SystemExit."""
    from hf_tokred.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def assert_left_padded_batch_equals_rows_alone(model, max_new_tokens: int = 12, layer: int = 1) -> None:
    """Greedy generation of three left-padded rows of different lengths gives what each row gives alone: the same
    tokens, the same scores, and the same real tokens held in cache layer ``layer`` (positions shifted by the
    row's padding), for a model with a KV policy applied."""
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in (26, 9, 17)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **kwargs)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row):]), f"row {i}"
        for step_b, step_a in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_b[i], step_a[0], atol=1e-5, rtol=1e-5)
        kept_b, kept_a = batched.past_key_values.layers[layer], alone.past_key_values.layers[layer]
        pad = width - len(row)
        held_b = torch.where(kept_b.valid[i], kept_b.positions[i] - pad, -1).sort(dim=-1).values
        held_a = torch.where(kept_a.valid[0], kept_a.positions[0], -1).sort(dim=-1).values
        assert torch.equal(held_b[held_b >= 0], held_a[held_a >= 0])


def assert_assisted_decoding_continues_a_cache_as_plain_generate(model, full, fresh_cache, extras=None,
                                                                  max_new_tokens: int = 12) -> None:
    """Over a cache that already holds part of ``full`` (``fresh_cache()`` makes a new one), every assisted decoding
    of ``extras`` (default: prompt lookup and a tiny assistant model) gives plain ``generate()``'s output and leaves
    the cache plain ``generate()`` leaves (transformers feeds its first pass the whole sequence; the cached part
    must not reach the cache again)."""
    extras = extras or [{"prompt_lookup_num_tokens": 3}, {"assistant_model": make_tiny_llama(seed=3)}]
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    plain_cache = fresh_cache()
    plain = model.generate(full, past_key_values=plain_cache, **kwargs)
    for extra in extras:
        cache = fresh_cache()
        assert torch.equal(model.generate(full, past_key_values=cache, **extra, **kwargs), plain), list(extra)
        assert cache.get_seq_length() == plain_cache.get_seq_length() == plain.shape[1] - 1, list(extra)
        if hasattr(cache, "stored_lengths"):
            assert cache.stored_lengths() == plain_cache.stored_lengths(), list(extra)


def make_tiny_vit(image: int = 32, patch: int = 4, layers: int = 4):
    """A seeded random ViT (64 patches + CLS at the defaults), SDPA attention, no pooler, eval mode."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=image, patch_size=patch, hidden_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=128)
    config._attn_implementation = "sdpa"
    return ViTModel(config, add_pooling_layer=False).eval()


def make_tiny_bert(layers: int = 4):
    """A seeded random 4-layer BERT (hidden 64, 64-token vocabulary), SDPA attention, no pooler, no dropout, eval."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False).eval()


def padded_bert_batch(seed: int = 2, lengths=(30, 17, 9)) -> dict:
    """Right-padded rows of random ids for :func:`make_tiny_bert` (id 2 first, as a CLS), with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids[:, 0] = 2
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def images():
    """Three random 32x32 RGB images (for :func:`make_tiny_vit`)."""
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def realigned(loaded):
    """``loaded`` (a model or a diffusers pipeline just loaded from disk) with every parameter and buffer copied
    into freshly allocated memory; returns it.

    ``from_pretrained`` leaves the weights where they sit in the safetensors file's buffer, at offsets that need not
    be 32- or 64-byte aligned, and on some CPUs (seen on AMD EPYC with torch 2.13) a matmul rounds differently on
    such operands: the loaded model's outputs then differ from the same weights' in memory by about 1e-7 though every
    weight is equal (plain diffusers does this too, without hf_tokred). Tests that compare a loaded model bit for
    bit with one built in memory realign it first."""
    modules = loaded.components.values() if hasattr(loaded, "components") else [loaded]
    with torch.no_grad():
        for module in modules:
            if isinstance(module, torch.nn.Module):
                for tensor in list(module.parameters()) + list(module.buffers()):
                    tensor.data = tensor.data.clone()
    return loaded


def assert_loads_without_hf_tokred(folder, ids: torch.Tensor, expected_logits: torch.Tensor) -> None:
    """A fresh Python process that never imports hf_tokred loads ``folder`` with transformers alone and gets
    ``expected_logits`` (the dense model's) for ``ids``: a reduced model's checkpoint stays a plain checkpoint."""
    import os
    import subprocess
    import sys
    import tempfile
    import textwrap

    with tempfile.TemporaryDirectory() as work:
        expected = os.path.join(work, "expected.pt")
        torch.save(expected_logits, expected)
        script = textwrap.dedent(f"""
            import sys, torch
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
            with torch.no_grad():
                logits = model(torch.tensor({ids.tolist()!r})).logits
            assert torch.equal(logits, torch.load({expected!r})), "logits differ from the dense model's"
            assert "hf_tokred" not in sys.modules
            print("dense ok")
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dense ok" in result.stdout


class FakeHub:
    """Records what ``push_to_hub`` would upload (the transport replaced at the ``HfApi`` level, see
    :func:`faked_hub`): the repos created and every commit's files (name -> bytes)."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, api, repo_id, **kwargs):
        from huggingface_hub.hf_api import RepoUrl

        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, **kwargs):
        from unittest import mock

        files = {}
        for op in operations:
            source = op.path_or_fileobj
            if isinstance(source, (str, os.PathLike)):
                with open(source, "rb") as fh:
                    files[op.path_in_repo] = fh.read()
            else:
                files[op.path_in_repo] = source if isinstance(source, bytes) else source.read()
        self.commits.append({"repo_id": repo_id, "files": files, "message": kwargs.get("commit_message")})
        return mock.MagicMock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    @property
    def files(self) -> dict:
        """Every file uploaded so far, the latest commit's version of each."""
        return {name: data for commit in self.commits for name, data in commit["files"].items()}

    def snapshot(self, cache_dir, repo_id: str, sha: str = "0123456789abcdef0123456789abcdef01234567"):
        """Lay out what was pushed to ``repo_id`` as a download would leave it in the Hugging Face cache
        ``cache_dir``; returns the snapshot folder."""
        files = {name: data for commit in self.commits if commit["repo_id"] == repo_id
                 for name, data in commit["files"].items()}
        assert files, f"nothing was pushed to {repo_id}"
        folder = hf_cache_snapshot(cache_dir, repo_id, sha)
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        return folder


def hf_cache_snapshot(cache_dir, repo_id: str, sha: str):
    """An empty snapshot folder of ``repo_id`` at revision ``sha`` (``refs/main`` pointing at it) in the Hugging
    Face cache ``cache_dir``: what ``from_pretrained(repo_id, cache_dir=...)`` reads offline."""
    from pathlib import Path

    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    folder = repo_dir / "snapshots" / sha
    folder.mkdir(parents=True)
    return folder


@contextlib.contextmanager
def faked_hub():
    """Within the block ``push_to_hub`` uploads to a :class:`FakeHub` (yielded) instead of the network."""
    from unittest import mock

    from huggingface_hub import HfApi

    hub = FakeHub()
    with (
        mock.patch.object(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw)),
        mock.patch.object(HfApi, "create_commit",
                          lambda api, repo_id, operations, **kw: hub.create_commit(api, repo_id, operations, **kw)),
    ):
        yield hub


@pytest.fixture
def fake_hub():
    """A :class:`FakeHub` that ``push_to_hub`` uploads to for the test's duration."""
    with faked_hub() as hub:
        yield hub
