"""State-space model (Mamba) token reducers."""
