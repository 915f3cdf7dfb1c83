"""Interpretability on a hooked model: activation cache, weight views, TransformerLens surface, SAEs."""
