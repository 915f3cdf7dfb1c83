"""Index tracing: which output columns of a projection hold head h's q (or k, v).

A fused QKV projection is split by views, chunks and slices whose layout
differs per architecture (GPT-2 [q|k|v], GPT-NeoX per-head interleaved,
Falcon grouped). Instead of reading that from a table, run the graph once on a
one-token input with each traced projection's output replaced by its column
indices, and read where they land: the values at a site are then the source
columns of each (head, d_head) position.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from fxlens.ir.graph import is_layout


CASTS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten._to_copy.default,
          torch.ops.aten.type_as.default}


class NotIndex:
    """What reaches a sink when the path from a source is not index movement alone:
    `node` is the first op on it that computes with the values (a norm, a gate)."""

    def __init__(self, node: fx.Node):
        self.node = node

    def __repr__(self) -> str:
        return f"{self.node.name} ({self.node.target})"


_SIZES = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)   # sizes read off a traced value


def _moves_values(n: fx.Node) -> bool:
    """Ops that only move, select or cast values (index tracing passes through them)."""
    return n.op == "call_module" or is_layout(n)   # call_module: hook points, identity unhooked


def trace_indices(gm: fx.GraphModule, sources, sinks) -> dict[fx.Node, torch.Tensor | NotIndex]:
    """Values reaching each sink when every source emits `arange` (batch 1, pos 1).

    Only the nodes between sources and sinks run (views, splits, the symbolic
    sizes they read), in float64 whatever the model's dtype, so the indices are
    exact; dtype casts on the way are skipped. A sink that a source reaches
    through an op that computes with the values (BitNet's sub-norm before
    o_proj, a sigmoid gate on the attention output) has no column map: it gets
    a `NotIndex` naming that op, and nothing upstream of the op is run."""
    sources = set(sources)
    ids = torch.zeros(1, 1, dtype=torch.long)
    env: dict[fx.Node, object] = {}
    carries = set(sources)            # nodes whose value derives from a source
    for n in gm.graph.nodes:
        if n not in carries and any(a in carries for a in n.all_input_nodes):
            carries.add(n)

    def value(node):
        stack = [node]
        while stack:
            n = stack[-1]
            if n in env:
                stack.pop()
                continue
            if n.op == "placeholder":
                env[n] = ids
            elif n.op == "get_attr":
                env[n] = functools.reduce(getattr, n.target.split("."), gm)  # e.g. Falcon's k/v index
            elif n in sources:
                shape = [1 if not isinstance(d, int) else d for d in n.meta["val"].shape]
                env[n] = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float64).reshape(shape)
            elif n in carries and not _moves_values(n) and not isinstance(n.meta.get("val"), _SIZES):
                env[n] = NotIndex(n)
            else:
                pending = [a for a in n.all_input_nodes if a not in env]
                if pending:
                    stack.extend(pending)
                    continue
                broken = next((env[a] for a in n.all_input_nodes if isinstance(env[a], NotIndex)), None)
                if broken is not None:
                    env[n] = broken
                    stack.pop()
                    continue
                args = torch.utils._pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args)
                kwargs = torch.utils._pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.kwargs)
                if n.op == "call_module":       # hook points: identity while no hook is attached
                    env[n] = gm.get_submodule(n.target)(*args, **kwargs)
                else:
                    env[n] = args[0] if n.target in CASTS else n.target(*args, **kwargs)
            stack.pop()
        return env[node]

    out = {}
    for s in sinks:
        v = value(s)
        out[s] = v if isinstance(v, NotIndex) else v.round().long()
    return out


def apply_chain(gm: fx.GraphModule, start: fx.Node, end: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """Run the chain start -> ... -> end on `x` in place of start's value; each
    chain node reads the one before it plus values computed from parameters and
    constants only (Gemma's `torch.tensor(sqrt(d_model))`)."""
    on_chain, cur = {end}, end
    while cur is not start:
        cur = next(a for a in cur.all_input_nodes if a is start or start in _inputs_closure(a))
        on_chain.add(cur)
    env = {start: x}

    def value(a):
        if not isinstance(a, fx.Node):
            return a
        if a not in env:
            if a.op == "get_attr":
                env[a] = functools.reduce(getattr, a.target.split("."), gm)   # a parameter or constant
            else:
                args = torch.utils._pytree.tree_map(value, a.args)
                kwargs = torch.utils._pytree.tree_map(value, a.kwargs)
                env[a] = a.target(*args, **kwargs)
        return env[a]
    return value(end)


def _inputs_closure(node: fx.Node) -> set:
    out, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in out:
                out.add(a)
                todo.append(a)
    return out


class _Recorder(fx.Interpreter):
    def __init__(self, gm, node):
        super().__init__(gm)
        self.node, self.value = node, None

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.node:
            self.value = out.detach().clone()
        return out


def values_at(gm: fx.GraphModule, node: fx.Node, n_pos: int) -> torch.Tensor:
    """The value of `node` for one sequence of `n_pos` tokens, batch dim dropped."""
    ids = torch.zeros(1, n_pos, dtype=torch.long, device=next(gm.parameters()).device)
    rec = _Recorder(gm, node)
    with torch.no_grad():
        rec.run(ids)
    return rec.value.reshape(n_pos, -1)
