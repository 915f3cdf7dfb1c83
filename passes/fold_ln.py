"""fold_ln: LayerNorm -> LNPre and RMSNorm -> RMSPre, the norm's weight (and
bias) folded into every linear that reads it.

Matches   per norm exposed by expose_norms: normalized -> affine tail (x*w + b;
          Gemma's x*(1+w); casts) -> output, where the output (through view /
          transpose / split) feeds only linears: separate or fused q/k/v, gate
          and up projections, the unembedding, GPT-2's Conv1D (addmm).
Rewrites  tail(normalized) -> linear(W, b_lin)
            becomes normalized -> linear(W * a, b_lin + W @ c)
          where tail(x) = a*x + c per feature, found by evaluating the tail on
          constant inputs (so any affine form folds, with no per-model rule).
          LayerNorm readers are then centred over d_model (TransformerLens: the
          normalized input has mean 0, so that component of W is unused).
          A tied unembedding gets its own parameter; the embedding is untouched.
Requires  expose_norms, discover_sites.
Skips     a model whose blocks have post-norms only (OLMo 2; TransformerLens folds
          nothing there, not even ln_final), and (with the reason in the log) a
          norm that feeds anything but a linear:
          a post-norm feeding the residual add (Gemma 2, OLMo 2), a post-LN encoder.
          A tail that casts (bf16 / fp16 models: the norm computes in float32) leaves
          its cast: readers get `normalized` in the dtype the tail produced.
Invariant every folded norm's consumers read `normalized` (cast to the tail's
          output dtype, if it had another) directly: no affine tail remains.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import is_layout, linear_of, linear_parts, module_paths, move_handles, output_node
from fxlens.ir.params import Linear, get_tensor
from fxlens.ir.trace import CASTS
from fxlens.ir.pass_result import PassResult

NAME = "fold_ln"


def _readers(out: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Linears reading `out` through layout ops, and any other consumers."""
    linears, others, todo, seen = [], [], [out], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            lin = linear_of(u)
            if lin is not None and linear_parts(lin).x is n:
                linears.append(lin)
            elif u.op == "call_function" and is_layout(u):
                todo.append(u)
            else:
                others.append(u)
    return linears, others


def _tail(normalized: fx.Node, out: fx.Node) -> list[fx.Node]:
    """Nodes on the paths normalized -> out, in graph order."""
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    down, todo = set(), [normalized]
    while todo:
        for u in todo.pop().users:
            if u not in down and order[u] <= order[out]:
                down.add(u)
                todo.append(u)
    return sorted((n for n in down if n is out or _reaches(n, out)), key=order.__getitem__)


def _reaches(a: fx.Node, b: fx.Node) -> bool:
    todo, seen = [a], set()
    while todo:
        n = todo.pop()
        if n is b:
            return True
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def affine_of(gm: fx.GraphModule, normalized: fx.Node, tail: list[fx.Node], d: int):
    """(a, c) with tail(x) = a * x + c per feature, or None if the tail is not
    affine or reads anything but parameters and constants."""
    tail_set = set(tail)

    def value(n, env):
        if not isinstance(n, fx.Node):
            return n
        if n in env:
            return env[n]
        if n.op == "get_attr":
            t = get_tensor(gm, n.target)
            return t.double() if t.is_floating_point() else t
        if n.op != "call_function" or n in tail_set:
            raise LookupError(n.name)
        # parameter-only helpers such as Gemma's (1 + w)
        env[n] = n.target(*[value(a, env) for a in n.args],
                          **{k: value(v, env) for k, v in n.kwargs.items()})
        return env[n]

    def run(x):
        env = {normalized: x}
        for n in tail:
            if n.target in CASTS:        # x.type_as(input), .to(dtype): values pass unchanged
                env[n] = value(n.args[0], env)
                continue
            args = torch.utils._pytree.tree_map(lambda a: value(a, env), n.args)
            kwargs = torch.utils._pytree.tree_map(lambda a: value(a, env), n.kwargs)
            env[n] = n.target(*args, **kwargs)
        return env[tail[-1]].reshape(-1).double()

    dtype = torch.float64   # exact whatever the model's dtype: a bf16 tail's rounding is not its map
    try:
        with torch.no_grad():
            zero = torch.zeros(d, dtype=dtype)
            c = run(zero)
            a = run(torch.ones(d, dtype=dtype)) - c
            probe = torch.linspace(-3, 3, d, dtype=dtype)
            ok = torch.allclose(run(probe), a * probe.double() + c, rtol=1e-4, atol=1e-5)
    except (LookupError, RuntimeError, TypeError):
        return None
    return (a, c) if ok and a.shape == (d,) else None


def _in_dtype_of(graph: fx.Graph, normalized: fx.Node, out: fx.Node, tail: list[fx.Node]) -> fx.Node:
    """`normalized`, cast to the dtype `out` had: the tail's casts (HF norms compute
    in float32 and cast back, `weight * x.to(input_dtype)`) outlive the folded affine
    map, or a bf16 / fp16 linear would read a float32 input."""
    want = out.meta["val"].dtype
    if normalized.meta["val"].dtype == want:
        return normalized
    like = next((n for n in reversed(tail) if n.target in CASTS), out)   # where the tail cast
    with graph.inserting_after(normalized):
        cast = graph.call_function(torch.ops.aten._to_copy.default, (normalized,), {"dtype": want})
    cast.meta.update({k: v for k, v in like.meta.items() if not k.startswith("fxlens.")})
    cast.meta["val"] = normalized.meta["val"].to(want)
    cast.meta["fxlens.created_by"] = NAME
    return cast


def fold_ln(gm: fx.GraphModule, spec, log, center: bool = True) -> PassResult:
    graph = gm.graph
    blocks = getattr(spec, "blocks", ())     # a bare spec (norm_kinds only) in unit tests
    if blocks and all(b.ln1 is None and b.ln2 is None and (b.ln1_post or b.ln2_post) for b in blocks):
        # OLMo 2: TransformerLens leaves post-norm-only models unfolded, ln_final included
        reason = "the blocks normalise only their outputs (post-norms): nothing folded, as TransformerLens"
        log.skipped.append(f"{NAME}: {reason}")
        return PassResult(NAME, matched=0, skipped=(reason,))
    folded, skipped = 0, []
    for path, kind in spec.norm_kinds.items():
        nodes = [n for n in graph.nodes if path in module_paths(n)]
        normalized = next(n for n in nodes if n.meta.get("fxlens.norm_part") == "normalized"
                          and n.meta.get("fxlens.norm") == path)
        out = output_node(nodes)
        if out is None or out is normalized:
            continue
        linears, others = _readers(out)
        if others or not linears:
            what = ", ".join(f"{u.name} ({u.target})" for u in others[:3]) or "nothing"
            skipped.append(f"{path} feeds {what}, not only linears; left as it is")
            continue
        tail = _tail(normalized, out)
        coeffs = affine_of(gm, normalized, tail, normalized.meta["val"].shape[-1])
        if coeffs is None:
            skipped.append(f"{path}: its weight is not a per-feature affine map; left as it is")
            continue
        a, c = coeffs
        for node in linears:
            lin = Linear(node)
            w = lin.weight(gm).double()                  # [out, d_model]
            b = lin.bias(gm)
            new_w = w * a[None, :]                       # scale each input feature by the norm weight
            new_b = w @ c + (b.double() if b is not None else 0.0)  # the norm bias, mapped through W
            if kind == "LN" and center:
                new_w = new_w - new_w.mean(dim=1, keepdim=True)  # input is centred: drop the all-ones part
            dtype = lin.weight(gm).dtype
            lin.set_weight(gm, new_w.to(dtype), NAME, log)
            if b is not None or bool((c != 0).any()):
                if not lin.set_bias(gm, new_b.to(dtype), NAME, log):
                    raise PassError(NAME, f"{node.name} reads {path} and has no bias to take its "
                                          f"bias; pass fold_ln=False")
        folded_out = _in_dtype_of(graph, normalized, out, tail)
        out.replace_all_uses_with(folded_out)
        move_handles(out, folded_out)      # the spec's "value the MLP reads" (a shared norm's output)
        for n in reversed(tail):
            if not n.users:
                graph.erase_node(n)
        graph.eliminate_dead_code()
        folded += 1
        # invariant: the norm's consumers now read `normalized` itself
        if out in graph.nodes and out.users:
            raise PassError(NAME, f"{path}: the affine tail is still used after folding")
    log.skipped.extend(f"{NAME}: {s}" for s in skipped)
    graph.lint()
    gm.recompile()
    return PassResult(NAME, matched=folded, skipped=tuple(skipped))
