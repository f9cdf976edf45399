"""Learned reducers for language models: drafting (EAGLE), context compression (Gist tokens, ICAE) and learned
KV eviction during generation (Dynamic Context Pruning)."""
