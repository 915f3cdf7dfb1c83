"""The hooked models and how they run: HookedModel, HookedEncoder, compiled variants, KV cache, generation."""
