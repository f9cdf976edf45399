"""Microsoft's ``llmlingua`` 0.2.2 (PyPI) as a reference, run offline beside our prompt compressors.

:func:`reference_compress` runs ``llmlingua.PromptCompressor`` with the same scorer as
:func:`hf_tokred.compress_prompt` (a local causal-LM folder; the benchmark passes the embedded
SmolLM2-135M-Instruct, :func:`hf_tokred.embedded.smollm2_path`) at the same ``rate``, and counts the
original and the compressed prompt in the same way as ours: the scorer's tokenizer on the
instruction, documents and question joined by blank lines, without special tokens.

Methods, with llmlingua's documented settings (checked against the 0.2.2 source):

* ``"llmlingua"``: ``compress_prompt(context, question=question, rate=rate)`` with its defaults
  (coarse document filter when there are several documents, then the iterative token-level filter).
* ``"longllmlingua"``: the README's LongLLMLingua call, :data:`LONGLLMLINGUA_SETTINGS`
  (``condition_in_question="after_condition"``, ``reorder_context="sort"``,
  ``dynamic_context_compression_ratio=0.3``, ``condition_compare=True``, ``context_budget="+100"``,
  ``rank_method="longllmlingua"``).

Three things stand between llmlingua 0.2.2 and this environment (no internet, transformers 5.23); each is
handled here, on our own ``PromptCompressor`` object only, never globally or on ``import hf_tokred``:

* **tiktoken**: ``PromptCompressor.__init__`` calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")``,
  which downloads ``cl100k_base``. During the construction the name ``tiktoken`` *inside
  llmlingua.prompt_compressor* is replaced by a stand-in whose ``encoding_for_model`` returns
  :class:`ScorerTokenCounter` (``encode``/``decode`` backed by the scorer's tokenizer). In the
  LLMLingua/LongLLMLingua code path that object (``oai_tokenizer``) only *counts*: the ``origin_tokens`` and
  ``compressed_tokens`` that llmlingua reports. Its budgets (``target_token`` from ``rate``, the
  per-window ratios, the document budget) are counted with the scorer's own tokenizer
  (``get_token_length``), so the substitution changes no compressed prompt; it makes llmlingua's own
  report count in the scorer's tokenizer, as ours does. (Only the LLMLingua-2 path, not used here,
  budgets in ``oai_tokenizer`` tokens.)
* **KV cache**: 0.2.2 handles ``past_key_values`` as the legacy per-layer ``[key, value]`` lists (it
  unpacks ``for k, v in past_key_values``, slices and concatenates them, and passes lists back to the
  model). transformers 5 returns and accepts only ``Cache`` objects (``DynamicCache`` iterates as
  ``(key, value, sliding_window)`` triples), so the second 200-token window fails with
  ``ValueError: too many values to unpack``. :class:`LegacyCacheModel` wraps the compressor's model: it
  turns incoming lists into a ``DynamicCache`` and returns the output cache as a tuple of
  ``(key, value)`` pairs, which is what llmlingua was written for; the forward itself is unchanged.
* **remote code**: llmlingua defaults ``trust_remote_code`` to True; it is passed as False.

nltk (imported by llmlingua) needs data only for ``use_sentence_level_filter=True``, which neither
method uses, so no nltk data is needed.

Install: ``pip install "hf_tokred[llmlingua-reference]"`` (``llmlingua==0.2.2``; it keeps the pinned
torch and transformers and adds tiktoken, nltk, joblib, defusedxml, cloudpickle).

Example:
    >>> from hf_tokred.bench.llmlingua_reference import reference_available, reference_compress
    >>> from hf_tokred.embedded import smollm2_path
    >>> out = reference_compress("Some long context. " * 60, "What?", rate=0.5, method="llmlingua",
    ...                          model_folder=smollm2_path())                               # doctest: +SKIP
    >>> out["compressed_tokens"] < out["origin_tokens"]                                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import threading
import time
import types
from typing import Any
from unittest import mock

from ..compat import CACHE_KWARG, output_cache
from ..errors import ConfigError, MissingDependencyError, MissingFileError
from ..prompt.base import SEPARATOR, count_tokens  # counted and joined exactly as hf_tokred.compress_prompt does

LLMLINGUA_VERSION = "0.2.2"
INSTALL_HINT = 'pip install "hf_tokred[llmlingua-reference]"'
METHODS = ("llmlingua", "longllmlingua")
# The README's recommended LongLLMLingua call (parameter names as in llmlingua 0.2.2's compress_prompt).
LONGLLMLINGUA_SETTINGS: dict[str, Any] = {
    "condition_in_question": "after_condition",
    "reorder_context": "sort",
    "dynamic_context_compression_ratio": 0.3,
    "condition_compare": True,
    "context_budget": "+100",
    "rank_method": "longllmlingua",
}

_COMPRESSORS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def _installed_version() -> str | None:
    if importlib.util.find_spec("llmlingua") is None:
        return None
    try:
        return importlib.metadata.version("llmlingua")
    except importlib.metadata.PackageNotFoundError:
        return None


def reference_available() -> bool:
    """True when ``llmlingua`` 0.2.2 (and its tiktoken and nltk) is installed; nothing is imported.

    Example:
        >>> from hf_tokred.bench.llmlingua_reference import reference_available
        >>> isinstance(reference_available(), bool)
        True
    """
    return (_installed_version() == LLMLINGUA_VERSION and importlib.util.find_spec("tiktoken") is not None
            and importlib.util.find_spec("nltk") is not None)


def _require() -> None:
    version = _installed_version()
    if version is None:
        raise MissingDependencyError(f"the llmlingua reference needs the PyPI package 'llmlingua' "
                                     f"(version {LLMLINGUA_VERSION}), which is not installed; install it with: "
                                     f"{INSTALL_HINT}")
    if version != LLMLINGUA_VERSION:
        raise MissingDependencyError(f"the llmlingua reference is written for llmlingua {LLMLINGUA_VERSION} "
                                     f"(its KV-cache shim follows that version's code), but {version} is installed; "
                                     f"install the pinned one with: {INSTALL_HINT}")
    for module in ("tiktoken", "nltk"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"llmlingua needs {module!r}, which is not installed; install it with: "
                                         f"{INSTALL_HINT}")


class ScorerTokenCounter:
    """A tiktoken ``Encoding`` stand-in (``encode``/``decode``) backed by a Hugging Face tokenizer.

    ``encode`` adds no special tokens, like tiktoken and like hf_tokred's token counts.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from hf_tokred.bench.llmlingua_reference import ScorerTokenCounter
        >>> from hf_tokred.embedded import smollm2_path
        >>> counter = ScorerTokenCounter(AutoTokenizer.from_pretrained(smollm2_path()))  # doctest: +SKIP
        >>> counter.decode(counter.encode("hello world"))                                  # doctest: +SKIP
        'hello world'
    """

    name = "hf-tokenizer"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, **_ignored) -> list[int]:
        """Token ids of ``text``, no special tokens (tiktoken's keyword arguments are accepted and ignored)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, tokens) -> str:
        """The text of ``tokens``."""
        return self.tokenizer.decode(list(tokens))


class LegacyCacheModel:
    """Wraps a transformers 5 causal LM so that llmlingua 0.2.2's legacy tuple KV-cache code runs on it.

    A ``past_key_values`` given as a sequence of per-layer ``(key, value)`` pairs becomes a ``DynamicCache``
    (its layers concatenate, so the given tensors are never modified); the output's cache is returned
    as a tuple of ``(key, value)`` pairs. Every other attribute is the wrapped model's.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from hf_tokred.bench.llmlingua_reference import LegacyCacheModel
        >>> model = LegacyCacheModel(AutoModelForCausalLM.from_pretrained(folder))        # doctest: +SKIP
        >>> out = model(input_ids, use_cache=True)                                          # doctest: +SKIP
        >>> key, value = out.past_key_values[0]                                             # doctest: +SKIP
    """

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        model = self.__dict__.get("model")
        if model is None:  # not set up yet (copy, introspection): no forwarding
            raise AttributeError(name)
        return getattr(model, name)

    def __call__(self, *args, past_key_values=None, **kwargs):
        from transformers.cache_utils import Cache, DynamicCache

        if past_key_values is not None and not isinstance(past_key_values, Cache):
            past_key_values = DynamicCache([(layer[0], layer[1]) for layer in past_key_values])
        out = self.model(*args, **{CACHE_KWARG: past_key_values}, **kwargs)
        cache = output_cache(out)
        if isinstance(cache, Cache):
            setattr(out, CACHE_KWARG, tuple((layer.keys, layer.values) for layer in cache.layers))
        return out


def _compressor(model_folder: str, device: str):
    """llmlingua's PromptCompressor for ``model_folder``, built once per process and device."""
    key = (os.path.realpath(model_folder), device)
    with _LOCK:
        cached = _COMPRESSORS.get(key)
        if cached is not None:
            return cached
        import llmlingua.prompt_compressor as pc
        from transformers import AutoTokenizer

        counter = ScorerTokenCounter(AutoTokenizer.from_pretrained(model_folder, local_files_only=True))
        # Only the name bound inside llmlingua.prompt_compressor changes, and only during the construction.
        stand_in = types.SimpleNamespace(encoding_for_model=lambda _name: counter, get_encoding=lambda _name: counter)
        with mock.patch.object(pc, "tiktoken", stand_in):
            compressor = pc.PromptCompressor(model_name=model_folder, device_map=device,
                                             model_config={"trust_remote_code": False, "local_files_only": True})
        compressor.model.eval()
        compressor.model = LegacyCacheModel(compressor.model)
        _COMPRESSORS[key] = compressor
        return compressor


def _documents(context) -> list[str]:
    if isinstance(context, str):
        return [context]
    if isinstance(context, (list, tuple)) and context and all(isinstance(d, str) for d in context):
        return list(context)
    raise ConfigError("context: expected a string or a non-empty list of strings", field="context")


def reference_compress(context: list[str] | str, question: str, *, rate: float, method: str, model_folder: str,
                       device: str = "cpu", instruction: str = "") -> dict[str, Any]:
    """Compress a prompt with Microsoft's llmlingua 0.2.2, scored by the causal LM in ``model_folder``.

    ``method`` is ``"llmlingua"`` (its ``compress_prompt`` defaults) or ``"longllmlingua"`` (the README's
    settings, :data:`LONGLLMLINGUA_SETTINGS`). The ``PromptCompressor`` is built once per process for a
    folder and device and reused. Returns a dict: ``compressed_prompt``; ``origin_tokens`` and
    ``compressed_tokens``, counted like :func:`hf_tokred.compress_prompt` (the folder's tokenizer, no
    special tokens, on the non-blank instruction, documents and question joined by blank lines);
    ``target_tokens`` (``round(rate * origin_tokens)``, our budget at this rate, for comparison);
    ``method``; ``time_s`` (the ``compress_prompt`` call alone, not the construction); ``raw`` (llmlingua's
    own result dict). Raises :class:`~hf_tokred.errors.MissingDependencyError` when llmlingua 0.2.2 is
    not installed.

    Example:
        >>> from hf_tokred.bench.llmlingua_reference import reference_compress
        >>> from hf_tokred.embedded import smollm2_path
        >>> out = reference_compress(["doc one ...", "doc two ..."], "Which doc?", rate=0.5,
        ...                          method="longllmlingua", model_folder=smollm2_path())   # doctest: +SKIP
        >>> sorted(out)                                                                      # doctest: +SKIP
        ['compressed_prompt', 'compressed_tokens', 'method', 'origin_tokens', 'raw', 'target_tokens', 'time_s']
    """
    _require()
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}", field="method")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ConfigError(f"rate: expected a number in (0, 1], got {rate!r}", field="rate")
    if not isinstance(question, str):
        raise ConfigError(f"question: expected a string, got {type(question).__name__}", field="question")
    if not isinstance(instruction, str):
        raise ConfigError(f"instruction: expected a string, got {type(instruction).__name__}", field="instruction")
    if method == "longllmlingua" and not question.strip():
        raise ConfigError("question: LongLLMLingua needs a question", field="question")
    docs = _documents(context)
    folder = os.fspath(model_folder)
    if not os.path.isdir(folder):
        raise MissingFileError(f"model_folder: {folder!r} is not a local folder holding a causal LM")
    compressor = _compressor(folder, device)
    settings = dict(LONGLLMLINGUA_SETTINGS) if method == "longllmlingua" else {}
    started = time.perf_counter()
    raw = compressor.compress_prompt(docs, instruction=instruction, question=question, rate=float(rate), **settings)
    elapsed = time.perf_counter() - started
    tokenizer = compressor.tokenizer
    original = SEPARATOR.join(part for part in [instruction, *docs, question] if part.strip())
    origin_tokens = count_tokens(tokenizer, original)
    return {
        "compressed_prompt": raw["compressed_prompt"],
        "origin_tokens": origin_tokens,
        "compressed_tokens": count_tokens(tokenizer, raw["compressed_prompt"]),
        "target_tokens": round(rate * origin_tokens),
        "method": method,
        "time_s": elapsed,
        "raw": raw,
    }
