"""NLP sequence reducers: MrT5, Dynamic Token Pooling, Token Dropping, TokenSkip."""
