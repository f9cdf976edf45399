"""Visual-token methods for vision-language models (one file each)."""
