"""Prompt compressors: text in, shorter text out (used through ``hf_tokred.compress_prompt``)."""
