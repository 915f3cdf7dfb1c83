"""fxlens compiler passes. Each is one function `name(gm, ...) -> PassResult`.

Installed as `fxlens.passes` (see pyproject.toml); the folder lives at the top
of the repository as the brief asks.
"""

from .expose_norms import expose_norms
from .insert_hooks import insert_hooks
from .opt_in import materialise_opt_in

__all__ = ["expose_norms", "insert_hooks", "materialise_opt_in"]
