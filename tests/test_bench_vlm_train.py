"""Training the learned visual methods on the caption-as-image task (tune split), on a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
from test_bench_vlm import tiny, tokenizer  # noqa: F401  (fixtures)

from hf_tokred.bench.vlm import SPLITS, make_sample
from hf_tokred.bench.vlm_train import caption_batches, train_on_captions
from hf_tokred.integration.wiring import MODULES_ATTR, get_applied


def test_caption_batches_hold_the_dense_answer_as_target(tiny):  # noqa: F811
    model, tok = tiny
    batches, features = caption_batches(model, tok, 2)
    assert len(batches) == len(features) == 2
    for i, batch in enumerate(batches):
        answers = batch["answer_mask"]
        assert answers.shape == batch["input_ids"].shape and int(answers.sum()) == 8  # MAX_NEW_TOKENS
        assert bool(answers[0, -8:].all()) and not bool(answers[0, :-8].any())
        sample = make_sample(SPLITS["tune"] + i)
        assert sample.question in tok.decode(batch["input_ids"][0])


@pytest.mark.parametrize("method", ["dynamic_llava", "atp_llava"])
def test_train_on_captions_trains_only_the_method(tiny, method):  # noqa: F811
    model, tok = tiny
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        result = train_on_captions(model, tok, {"method": method, "keep": 0.25}, samples=2, steps=3, progress=False)
        assert len(result["losses"]) == 3 and result["steps"] == 3 and result["samples"] == 2
        assert get_applied(model).config.method == method
        assert not model._modules[MODULES_ATTR].training
        for k, v in model.state_dict().items():
            if MODULES_ATTR not in k:
                assert torch.equal(v, frozen[k]), k
    finally:
        import hf_tokred

        hf_tokred.remove(model)


def test_quality_rows_of_a_learned_method_train_first_and_detach_after(tiny):  # noqa: F811
    from hf_tokred.bench.vlm import run_quality

    model, tok = tiny
    result = run_quality(model, tok, configs=[{"method": "dynamic_llava", "keep": 0.5}], samples=2, train_steps=2,
                         train_samples=2)
    dense, learned = result["rows"]
    assert "training" not in dense and learned["training"]["steps"] == 2 and learned["training"]["samples"] == 2
    assert get_applied(model) is None  # the trained reduction is removed after its row


def test_method_params_reach_the_configs():
    from hf_tokred.cli import build_parser

    args = build_parser().parse_args(["vlm-bench", "--methods", "ivtp,dynamic_llava", "--param", "ivtp.group_size=576",
                                      "--train-steps", "5"])
    assert args.param == [("ivtp", "group_size", 576)] and args.train_steps == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["vlm-bench", "--param", "nope.k=1"])
