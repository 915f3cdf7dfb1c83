"""fxlens compiler passes. Each is one function `name(gm, ...) -> PassResult`.

Installed as `fxlens.passes` (see pyproject.toml); the folder lives at the top
of the repository as the brief asks.
"""

from .center_unembed import center_unembed
from .center_writing_weights import center_writing_weights
from .expose_norms import expose_norms
from .fold_ln import fold_ln
from .fold_value_biases import fold_value_biases
from .fuse_attention import fuse_attention
from .insert_hooks import insert_hooks, remove_hooks
from .kv_cache import kv_decode, kv_prefill
from .opt_in import materialise_opt_in
from .relative_bias import relative_bias
from .refactor_attn import refactor_factored_attn_matrices
from .specialise import specialise
from .split_shared_norms import split_shared_norms

__all__ = ["expose_norms", "insert_hooks", "remove_hooks", "materialise_opt_in", "fold_ln", "center_writing_weights",
           "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices", "fuse_attention",
           "specialise", "split_shared_norms", "relative_bias", "kv_prefill", "kv_decode"]
