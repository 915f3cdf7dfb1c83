"""Weight views that edit the model.

TransformerLens's weights are parameters, so `model.blocks[0].attn.W_O[h] = 0`
ablates a head. fxlens reads its weights out of the graph's stored tensors
through the column maps (`fxlens.discovery.columns`): `W_Q[L]` gathers rows of a fused
QKV projection, `W_K` under GQA repeats each kv head, `model.W_O` stacks the
layers. A gather is a copy, so an `EditableWeight` remembers where each of its
entries came from and writes every in-place edit back there:

    view  = read(param)                   # [head, d_model, d_head], a copy
    index = read(arange(param.numel()))   # same layout: the flat position of each entry

After an in-place op on the view, or on any view of it (`W_O[L]`, `W_O[L, h]`,
`W_O.T`), the entries that changed are scattered into the parameter at
`index`; the graph, and every compiled variant (they read the same tensors),
see the edit at the next call. The write is checked by reading back: where one
stored entry appears several times (GQA's repeated kv heads) and the copies now
disagree, or where an entry is stored nowhere (zeros standing in for a missing
bias), nothing is written and `WeightEditError` says what to edit instead.
Results of other ops (`W_O * 2`, `W_O @ x`) are plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

from fxlens.errors import WeightEditError

# Tensor methods that write their first argument in place without a trailing "_"
_INPLACE_DUNDERS = frozenset(f"__i{op}__" for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
    "lshift", "rshift")) | {"__setitem__"}


@dataclass
class Source:
    """Where the entries `view[sel]` are stored: `param`'s flat positions `index`
    (same shape as `view[sel]`). `param=None`: stored nowhere (`why` says so)."""

    sel: tuple
    param: torch.Tensor | None
    index: torch.Tensor | None
    why: str = ""


class EditableWeight(torch.Tensor):
    """A tensor whose in-place edits are written back to the parameters (see the module docstring)."""

    _fxlens_root: "EditableWeight"
    _fxlens_sources: list
    _fxlens_name: str

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _mutated(func, args, kwargs)
        root = target._fxlens_root if target is not None else None
        with torch._C.DisableTorchFunctionSubclass():
            before = root.clone() if root is not None else None
            out = func(*args, **kwargs)
            if root is not None:
                root._write_back(before)
        roots = [t._fxlens_root for t in tree_leaves((args, kwargs)) if isinstance(t, EditableWeight)]
        return _rewrap(out, roots)

    def _write_back(self, before: torch.Tensor) -> None:
        """Scatter the entries that differ from `before` into the parameters (runs
        with torch-function dispatch off: `self` behaves as a plain tensor)."""
        done = []
        try:
            for src in self._fxlens_sources:
                new, old = self[src.sel], before[src.sel]
                changed = ~_same(new, old)
                if not changed.any():
                    continue
                if src.param is None:
                    raise WeightEditError(f"{self._fxlens_name}: {src.why}")
                pos = src.index[changed]
                where = torch.unravel_index(pos, src.param.shape)
                stored = src.param    # in place on the parameter: its version counter moves
                done.append((stored, where, stored[where].clone()))
                with torch.no_grad():
                    stored.index_put_(where, new[changed].to(stored.dtype))
                # read back: an entry stored once but shown several times must agree
                touched = torch.isin(src.index, pos)
                fresh = stored[torch.unravel_index(src.index[touched], src.param.shape)]
                if not _same(fresh, new[touched].to(stored.dtype)).all():
                    raise WeightEditError(
                        f"{self._fxlens_name}: this view shows some stored weights more than once "
                        f"(grouped-query attention repeats each kv head for several query heads), "
                        f"and the edit gave the copies different values. Edit the kv heads "
                        f"themselves (`model.blocks[L].attn._W_K` / `_W_V`, `_b_K` / `_b_V`: "
                        f"[kv_head, ...]), or change one query head's keys with a hook on "
                        f"`blocks.L.attn.hook_k`.")
        except WeightEditError:
            with torch.no_grad():
                for stored, where, prev in reversed(done):
                    stored.index_put_(where, prev)
                self.copy_(before)
            raise

    def __reduce_ex__(self, proto):
        # pickles (torch.save) as the plain tensor it shows
        with torch._C.DisableTorchFunctionSubclass():
            return self.clone().__reduce_ex__(proto)

    def __deepcopy__(self, memo):
        with torch._C.DisableTorchFunctionSubclass():
            return self.clone()


def editable(value: torch.Tensor, sources: list[Source], name: str) -> EditableWeight:
    """Wrap `value` (a tensor of its own, not a view of a parameter)."""
    out = value.as_subclass(EditableWeight)
    out._fxlens_root, out._fxlens_sources, out._fxlens_name = out, sources, name
    return out


def read_param(param: torch.Tensor, read, name: str) -> EditableWeight:
    """`read(param)` (a gather / permute of the stored tensor) as an editable view."""
    grid = torch.arange(param.numel(), device=param.device).view(param.shape)
    index = read(grid)
    value = read(param.detach()).clone()
    return editable(value, [Source((...,), param, index)], name)


def read_only(value: torch.Tensor, name: str, why: str) -> EditableWeight:
    """Values stored nowhere (zeros for a missing bias, a computed table): any edit raises."""
    return editable(value.detach().clone(), [Source((...,), None, None, why)], name)


def stack(views: list[torch.Tensor], name: str) -> torch.Tensor:
    """`torch.stack` over layers, still writing back to each layer's parameters."""
    with torch._C.DisableTorchFunctionSubclass():
        value = torch.stack([v.clone() for v in views])
    sources = []
    for layer, v in enumerate(views):
        if not isinstance(v, EditableWeight):    # a plain view of a parameter
            v = read_param(v, lambda t: t, name)
        for src in v._fxlens_root._fxlens_sources:
            sources.append(Source((layer, *src.sel), src.param, src.index, src.why))
    return editable(value, sources, name)


def _mutated(func, args, kwargs) -> EditableWeight | None:
    """The EditableWeight `func` writes in place, if any."""
    out = kwargs.get("out")
    if isinstance(out, EditableWeight):
        return out
    name = getattr(func, "__name__", "")
    inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))
    if inplace and args and isinstance(args[0], EditableWeight):
        return args[0]
    return None


def _rewrap(out, roots: list[EditableWeight]):
    """Views of an EditableWeight stay editable; every other result is a plain tensor."""
    if isinstance(out, (tuple, list)):
        return type(out)(_rewrap(o, roots) for o in out)
    if not isinstance(out, torch.Tensor) or isinstance(out, EditableWeight):
        return out
    ptr = out.untyped_storage().data_ptr() if out.numel() else None
    for root in roots:
        with torch._C.DisableTorchFunctionSubclass():
            same = ptr is not None and root.untyped_storage().data_ptr() == ptr
        if same:
            view = out.as_subclass(EditableWeight)
            view._fxlens_root, view._fxlens_sources, view._fxlens_name = root, [], root._fxlens_name
            return view
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise equality where NaN equals NaN."""
    return (a == b) | (a.isnan() & b.isnan())
