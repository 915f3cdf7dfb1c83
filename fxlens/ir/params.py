"""Reading and rewriting the parameters a graph uses.

The captured graph shares its parameter tensors with the HF model, so a pass
never edits a tensor in place: it installs a new Parameter, and where one
`get_attr` feeds several ops (tied embeddings) it gives the rewritten op a
parameter of its own. Every change is recorded on the get_attr node
(`meta["fxlens.changed_by"]`) and in the ProcessingLog.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import linear_of, linear_parts

aten = torch.ops.aten


@dataclass
class ProcessingLog:
    """What weight processing did: flags applied, parameters changed, rewrites skipped."""

    applied: dict = field(default_factory=dict)
    changed: dict = field(default_factory=dict)   # parameter target -> [pass names]
    skipped: list = field(default_factory=list)   # "pass: reason"

    def record(self, target: str, pass_name: str) -> None:
        passes = self.changed.setdefault(target, [])
        if pass_name not in passes:
            passes.append(pass_name)

    def __getitem__(self, flag: str) -> bool:
        return self.applied[flag]

    def get(self, flag: str, default=None):
        return self.applied.get(flag, default)

    def __iter__(self):
        return iter(self.applied)

    def items(self):
        return self.applied.items()

    def __repr__(self) -> str:
        return (f"ProcessingLog(applied={self.applied}, {len(self.changed)} parameters changed, "
                f"skipped={self.skipped})")


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def new_param(gm: fx.GraphModule, near: str, stem: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `value` as a fresh parameter beside the get_attr target `near`
    (named `stem`, `stem1`, ... so no pass overwrites another's) and return a
    get_attr node for it, placed before `before`."""
    prefix, _, _ = near.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    n = 0
    while hasattr(owner, f"{stem}{n or ''}"):
        n += 1
    attr = f"{stem}{n or ''}"
    owner.register_parameter(attr, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{prefix + '.' if prefix else ''}{attr}")


def set_param(gm: fx.GraphModule, node: fx.Node, user: fx.Node, value: torch.Tensor,
              pass_name: str, log: ProcessingLog | None) -> fx.Node:
    """Make `user` read `value` where it read the get_attr `node`. Returns the
    get_attr node now feeding `user` (a new one if `node` had other users)."""
    value = torch.nn.Parameter(value.detach().clone(), requires_grad=False)
    prefix, _, attr = node.target.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    if len(node.users) == 1:
        if not isinstance(getattr(owner, attr), torch.nn.Parameter):   # a buffer or plain tensor
            delattr(owner, attr)
        owner.register_parameter(attr, value)
        target = node.target
    else:
        # the get_attr feeds other ops too (tied weights): give `user` its own
        new = new_param(gm, node.target, f"{attr}_{pass_name}", value, before=node)
        target = new.target
        new.meta.update({k: v for k, v in node.meta.items() if k != "fxlens.changed_by"})
        new.meta["fxlens.changed_by"] = list(node.meta.get("fxlens.changed_by", []))
        user.replace_input_with(node, new)
        node = new
    node.meta.setdefault("fxlens.changed_by", []).append(pass_name)
    if log is not None:
        log.record(target, pass_name)
    return node


@dataclass
class Linear:
    """A linear of the graph with its weight in HF's [out, in] convention,
    whatever its storage (`aten.linear` [out, in]; GPT-2 Conv1D `addmm` [in, out];
    Falcon's `x @ W.T`; the per-head output projection of attn.hook_result).
    `node` is a live node: one kept across passes is looked up by its spec
    handle (`fxlens.ir.graph.site_node`) when needed, not stored."""

    node: fx.Node

    @property
    def parts(self):
        # a bias added by a pass makes `add(op, b)` the linear's result
        lin = linear_of(self.node)
        parts = linear_parts(lin) if lin is not None else None
        if parts is None:
            raise PassError("linear", f"{self.node.name} ({self.node.target}) is not a linear; a pass "
                                      f"rewrote it without moving its spec handle to its replacement")
        return parts

    def weight(self, gm) -> torch.Tensor:
        p = self.parts
        w = get_tensor(gm, p.w.target)
        return w if p.out_in else w.t()

    def bias(self, gm) -> torch.Tensor | None:
        b = self.parts.b
        return get_tensor(gm, b.target) if b is not None else None

    def set_weight(self, gm, w: torch.Tensor, pass_name: str, log) -> None:
        p = self.parts
        w = w if p.out_in else w.t()
        set_param(gm, p.w, p.w_user, w.contiguous(), pass_name, log)

    def center_outputs(self, gm, pass_name: str, log) -> None:
        """W -> W - mean over outputs, b -> b - mean(b): every output vector loses
        its component along the all-ones direction."""
        w = self.weight(gm)                              # [out, in]
        self.set_weight(gm, w - w.mean(0, keepdim=True), pass_name, log)
        b = self.bias(gm)
        if b is not None:
            self.set_bias(gm, b - b.mean(), pass_name, log)

    def outputs_centred(self, gm) -> bool:
        """Invariant check: float32 leaves ~1e-7 relative rounding; half precision its own epsilon."""
        w = self.weight(gm)
        tol = 16 * torch.finfo(w.dtype).eps * max(1.0, w.abs().max().item())
        return bool(w.float().mean(0).abs().max() <= tol)

    def set_bias(self, gm, b: torch.Tensor, pass_name: str, log) -> bool:
        """Set the bias, adding one to a bias-free `aten.linear`. False if it cannot."""
        p = self.parts
        if p.b is not None:
            set_param(gm, p.b, p.b_user, b, pass_name, log)
            return True
        if self.node.target not in (aten.linear.default, aten.matmul.default, aten.mm.default,
                                    aten.sum.dim_IntList):
            return False
        bnode = new_param(gm, p.w.target, f"bias_{pass_name}", b, before=self.node)
        target = bnode.target
        bnode.meta["fxlens.changed_by"] = [pass_name]
        bnode.meta["val"] = b
        if self.node.target is aten.linear.default:
            args = list(self.node.args) + [None] * (3 - len(self.node.args))
            args[2] = bnode
            self.node.args = tuple(args)
        else:  # x @ W.T (and the per-head sum) has no bias slot: add one after it
            with gm.graph.inserting_after(self.node):
                add = gm.graph.call_function(aten.add.Tensor, (self.node, bnode))
            add.meta.update({k: v for k, v in self.node.meta.items() if k in ("val", "nn_module_stack")})
            add.meta["fxlens.created_by"] = pass_name
            self.node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        if log is not None:
            log.record(target, pass_name)
        return True
