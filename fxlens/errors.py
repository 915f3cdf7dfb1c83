"""Typed errors. Each says what was wrong and the way out."""

from __future__ import annotations

import difflib


class FxlensError(Exception):
    """Base class of every error fxlens raises on purpose."""


class CaptureError(FxlensError):
    """The checkpoint could not be loaded or exported to a graph."""


class UnmappableModelError(FxlensError):
    """Site discovery found a structure it cannot map to TransformerLens sites.

    `parts` is (what, found, missing) where discovery named them, so a caller
    that maps another kind of model can say its own scope (the encoder does)."""

    def __init__(self, message: str, parts: tuple[str, str, str] | None = None):
        super().__init__(message)
        self.parts = parts


class UnknownHookError(FxlensError, KeyError):
    """A hook name that the model does not have."""

    def __init__(self, name: str, known: list[str]):
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        super().__init__(
            f"unknown hook name {name!r}.{hint} `model.hook_names` lists all {len(known)} names.")
        self.name = name
        self.closest = close

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class HookReturnError(FxlensError):
    """A hook returned something that cannot replace the activation."""


class ContextLengthError(FxlensError, ValueError):
    """Input longer than the model's context."""


class SelfCheckError(FxlensError):
    """The instrumented graph does not reproduce the original model."""


class ProcessingError(FxlensError):
    """Weight processing was asked for and cannot be done."""


class PassError(FxlensError):
    """A compiler pass met a graph it cannot rewrite; names the pass and the node."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"{pass_name}: {message}")
        self.pass_name = pass_name


class HarvestError(FxlensError):
    """A harvest cannot run as asked (its corpus, its output folder, its settings)."""


class WeightEditError(FxlensError):
    """An edit of a weight view cannot be written back to the model's parameters exactly."""


class PaddingError(FxlensError, ValueError):
    """A padded batch (an attention mask with zeros) this model cannot run exactly."""


class InputError(FxlensError, ValueError):
    """Input a model call cannot take: token ids of the wrong shape, an empty
    batch, a names_filter that matches no hook."""


class NotApplicableError(FxlensError, NotImplementedError):
    """A TransformerLens method that has no meaning on a captured graph; the
    message says why and what to use instead."""


class SAEError(FxlensError, ValueError):
    """An SAE that cannot be spliced at its site: a hook name the model lacks, an
    input width other than the site's, or a kind fxlens does not splice (a transcoder)."""


class PipelineError(FxlensError):
    """The instrumented graph cannot be cut into pipeline stages, or the process
    world does not match the stages asked for."""


class StaleHandleError(FxlensError, LookupError):
    """A spec handle (a name the site discovery recorded in `node.meta["fxlens.handles"]`)
    names no node, or several, in the graph it is looked up in: a pass replaced the
    node without moving its handle."""

    def __init__(self, handle: str, found: str):
        super().__init__(
            f"spec handle {handle!r}: found {found} in this graph, expected exactly one node. "
            f"A pass replaced the node it named without moving the handle: that pass should call "
            f"fxlens.ir.graph.move_handles(old, new); meanwhile rebuild the model with from_pretrained "
            f"(discovery records the handles afresh)")
        self.handle = handle
        self.found = found
