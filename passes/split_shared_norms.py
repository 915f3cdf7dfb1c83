"""split_shared_norms: one norm per reading sublayer, like TransformerLens's ln1 / ln2.

Matches   an `aten.layer_norm` / `aten.rms_norm` node whose users lead (through
          layout ops) only to linears, of two or more sibling modules: a parallel
          block's attention and MLP sharing one norm (GPT-J, Phi, Falcon-7B).
Rewrites  ln(x) -> {attention's linears, MLP's linears}
            becomes ln(x) -> attention's linears;  ln'(x) -> MLP's linears
          where ln' is a copy of the node (same weight and bias), made for each
          reader module after the first in graph order, with module path
          `<norm path>@<reader module>`. Site discovery then finds the MLP's own
          norm (TransformerLens copies ln1 into ln2 there: `ln2.hook_scale` /
          `ln2.hook_normalized`, each hook moving only its own sublayer's input),
          and fold_ln folds each copy into its own readers.
Requires  nothing; runs before expose_norms. A norm spelled as an RMS chain of
          elementwise ops is left shared (no ln2 sites, as before).
Invariant every split norm's users lead to linears of one module only.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import is_layout, linear_of, linear_parts, module_path, module_paths
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten
NAME = "split_shared_norms"
NORM_OPS = (aten.layer_norm.default, aten.rms_norm.default)


def _reader_module(user: fx.Node, norm: fx.Node, parent: str) -> str | None:
    """The child of `parent` whose linears `user` (a user of `norm`) feeds, or None
    when it feeds anything else or linears of several children."""
    linears, todo, src = [], [user], {user: norm}
    while todo:
        n = todo.pop()
        lin = linear_of(n)
        if lin is not None and linear_parts(lin).x is src[n]:
            linears.append(lin)
        elif n.op == "call_function" and is_layout(n):
            for u in n.users:
                src[u] = n
                todo.append(u)
        else:
            return None
    children = {next((p for p in module_paths(lin) if p.startswith(parent + ".")
                      and "." not in p[len(parent) + 1:]), None) for lin in linears}
    return children.pop() if len(children) == 1 else None


def split_shared_norms(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    split, made = [], []
    for norm in [n for n in graph.nodes if n.op == "call_function" and n.target in NORM_OPS]:
        path = module_path(norm)
        parent = path.rpartition(".")[0]
        groups: dict[str | None, list[fx.Node]] = {}
        for u in sorted(norm.users, key=order.__getitem__):
            groups.setdefault(_reader_module(u, norm, parent), []).append(u)
        if None in groups or len(groups) < 2:
            continue
        for child, users in list(groups.items())[1:]:
            with graph.inserting_after(norm):
                copy = graph.node_copy(norm)
            copy.meta = dict(norm.meta)
            stack = dict(norm.meta.get("nn_module_stack") or {})
            last, (_, cls) = list(stack.items())[-1]
            stack[f"{last}@{child}"] = (f"{path}@{child.rpartition('.')[2]}", cls)
            del stack[last]
            copy.meta["nn_module_stack"] = stack
            for u in users:
                u.replace_input_with(norm, copy)
            split.append(f"{path} -> {child}")
            made.append((copy, parent))
        made.append((norm, parent))
    # invariant: each split norm (and copy) now feeds one module's linears
    for node, parent in made:
        if len({_reader_module(u, node, parent) for u in node.users}) != 1:
            raise PassError(NAME, f"{node.name} still feeds several modules after splitting")
    graph.lint()
    gm.recompile()
    return PassResult(NAME, matched=len(split), details={"split": split})
