"""The transformers versions we support (5.23-5.25) name the cache argument differently (5.24 renamed
``past_key_values`` to ``cache``): hf_tokred passes it under the installed version's name, reads either name from a
user's call, and its own calls raise none of transformers' deprecation warnings."""

import inspect
import logging
import warnings

import torch
from conftest import make_tiny_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel

import hf_tokred
from hf_tokred.compat import CACHE_KWARG, CACHE_KWARGS, cache_in, output_cache, with_cache
from hf_tokred.kv.cache import TokenReductionCache


def test_the_cache_name_is_the_installed_models_own():
    assert CACHE_KWARG in inspect.signature(LlamaModel.forward).parameters
    assert CACHE_KWARG in inspect.signature(LlamaAttention.forward).parameters
    assert CACHE_KWARGS[0] == CACHE_KWARG and "past_key_values" in CACHE_KWARGS
    assert cache_in({"past_key_values": 1}) == 1 and cache_in({CACHE_KWARG: 2}) == 2 and cache_in(None) is None
    assert with_cache({"past_key_values": 1, "x": 0}, 3) == {"x": 0, CACHE_KWARG: 3}


class _DeprecationNotes(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        if "deprecated" in record.getMessage():
            self.messages.append(record.getMessage())


def _run_quietly(fn):
    """``fn()`` with transformers' deprecation warnings (Python warnings and its logger's notes) recorded."""
    notes = _DeprecationNotes()
    logger = logging.getLogger("transformers")
    logger.addHandler(notes)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        logger.removeHandler(notes)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and "past_key_values" in str(w.message)]
    return result, deprecations + [m for m in notes.messages if "past_key_values" in m]


def test_our_generate_paths_raise_no_cache_name_deprecation_and_take_either_name():
    prompt = torch.randint(3, 120, (1, 20), generator=torch.Generator().manual_seed(0))
    model = make_tiny_llama()
    hf_tokred.apply(model, {"method": "snapkv", "max_tokens": 12, "window_size": 4})
    out, deprecations = _run_quietly(lambda: model.generate(prompt, max_new_tokens=6, do_sample=False,
                                                            return_dict_in_generate=True))
    assert deprecations == [] and isinstance(output_cache(out), TokenReductionCache)

    # a user's cache under either name is the one used
    for name in CACHE_KWARGS:
        cache = hf_tokred.build_cache(model)
        again = model.generate(prompt, max_new_tokens=6, do_sample=False, **{name: cache})
        assert torch.equal(again, out.sequences) and cache.get_seq_length() == out.sequences.shape[1] - 1

    ctx, deprecations = _run_quietly(lambda: hf_tokred.compress_context(model, prompt[:, :15]))
    assert deprecations == [] and isinstance(ctx, TokenReductionCache)


def test_gist_eagle_and_the_tree_raise_no_cache_name_deprecation():
    prompt = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(1))
    gist = make_tiny_llama()
    hf_tokred.apply(gist, {"method": "gist", "num_gist": 2, "rank": 4})

    def gist_generate():
        ctx = hf_tokred.compress_context(gist, prompt)
        return gist.generate(ctx.prefix_ids, **{CACHE_KWARG: ctx.fresh_cache()}, max_new_tokens=4, do_sample=False)

    _, deprecations = _run_quietly(gist_generate)
    assert deprecations == []

    eagle = make_tiny_llama()
    hf_tokred.apply(eagle, {"method": "eagle", "draft_vocab": 64, "depth": 4, "top_k": 3, "min_confidence": 0.0})
    plain = eagle.generate(prompt, max_new_tokens=10, do_sample=False)
    chain, deprecations = _run_quietly(lambda: eagle.generate(
        prompt, max_new_tokens=10, do_sample=False, assistant_model=hf_tokred.eagle_assistant(eagle)))
    assert deprecations == [] and torch.equal(chain, plain)
    tree, deprecations = _run_quietly(lambda: eagle.generate(
        prompt, max_new_tokens=10, do_sample=False, custom_generate=hf_tokred.eagle_tree_decoding,
        return_dict_in_generate=True))
    assert deprecations == [] and torch.equal(tree.sequences, plain) and output_cache(tree) is not None
