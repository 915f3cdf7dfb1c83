"""fold_value_biases: move each head's value bias into the output bias.

Matches   per block, the value projection's bias b_V [kv_head, d_head] (its
          columns found by index tracing, so fused QKV works) and the output
          projection W_O [head, d_head, d_model], b_O.
Rewrites  b_V -> 0, b_O -> b_O + sum_h b_V[kv(h)] @ W_O[h]. Attention patterns
          sum to 1, so a value bias adds the same b_V @ W_O at every position.
          Under GQA head h reads kv head h // (n_heads / n_kv_heads).
Requires  discover_sites (and fold_ln first, if it runs, as TransformerLens).
Skips     (with the reason in the log) a block whose v or z reaches its projection
          through an op that computes with the values (BitNet's sub-norm, a gate),
          and a block whose pattern@V operand is not the softmax itself (through
          layout ops, over the same keys): GPT-OSS's attention sinks take a softmax
          over keys + a sink column and drop the sink, so rows sum to less than 1.
Invariant the value columns of the projection's bias are zero.
"""

from __future__ import annotations

import torch

from fxlens.errors import PassError
from fxlens.ir.graph import SOFTMAX_OPS, is_layout, same_size, shape, site_node, walk_back
from fxlens.ir.params import Linear
from fxlens.ir.pass_result import PassResult
from fxlens.discovery.columns import w_o

NAME = "fold_value_biases"


def _pattern_not_stochastic(z) -> str | None:
    """Why the operand multiplying V in `z` (pattern @ V) may have rows that do not
    sum to 1, or None when it is a softmax over exactly those keys."""
    z = walk_back(z, is_layout)[-1]    # the product itself where z is its unfolded layout (BLOOM's bmm)
    chain = walk_back(z.args[0], lambda n: n.op == "call_module" or is_layout(n))
    soft = chain[-1]
    if soft.target not in SOFTMAX_OPS:
        return f"the pattern reaches pattern@V through {soft.name} ({soft.target}), not a softmax"
    keys, over = shape(z.args[0])[-1], shape(soft)[-1]
    if not same_size(keys, over) or soft.args[1] not in (-1, len(shape(soft)) - 1):
        return (f"the softmax {soft.name} runs over {over} entries but pattern@V reads {keys} keys "
                f"(an attention sink): its rows do not sum to 1")
    return None


def fold_value_biases(gm, spec, log, maps) -> PassResult:
    n, skipped = 0, []
    for b, m in zip(spec.blocks, maps):
        if not b.has_attn:
            continue        # a mixer block: no value bias
        v_proj = Linear(site_node(gm, b.qkv["v"][1]))
        why = _pattern_not_stochastic(site_node(gm, b.z))
        if why is not None:
            if v_proj.bias(gm) is not None:
                skipped.append(f"block {b.layer}: {why}; the value bias is left as it is")
            continue
        if m.v is None or m.o is None:
            # v or z reaches its projection through a value-computing op (a norm, a gate):
            # b_V @ W_O is then not the same at every position, so nothing folds
            if v_proj.bias(gm) is not None:
                why = "; ".join([f"{r} through {m.unmapped[r]}" for r in ("v", "o") if r in m.unmapped]
                                + [m.indirect[r] for r in ("v",) if r in m.indirect])
                skipped.append(f"block {b.layer}: the value bias is not constant at the output "
                               f"({why}); left as it is")
            continue
        v_lin, v_cols = m.get("v", f"{NAME}: block {b.layer}")
        bias = v_lin.bias(gm)
        if bias is None or not bool(bias[v_cols].any()):
            continue
        b_v = bias[v_cols]                                       # [kv_head, d_head]
        b_v = b_v.repeat_interleave(b.n_heads // b_v.shape[0], dim=0)  # [head, d_head]
        o_lin, o_cols = m.get("o", f"{NAME}: block {b.layer}")
        delta = torch.einsum("hd,hdm->m", b_v.double(), w_o(gm, o_lin, o_cols).double())
        b_o = o_lin.bias(gm)
        new_o = (b_o.double() if b_o is not None else 0.0) + delta
        if not o_lin.set_bias(gm, new_o.to(bias.dtype), NAME, log):
            raise PassError(NAME, f"{o_lin.node.name} cannot take a bias; pass fold_value_biases=False")
        new_bias = bias.clone()
        new_bias[v_cols] = 0.0
        v_lin.set_bias(gm, new_bias, NAME, log)
        if v_lin.bias(gm)[v_cols].any():
            raise PassError(NAME, f"block {b.layer}: value bias not zero after folding")
        n += 1
    log.skipped.extend(f"{NAME}: {s}" for s in skipped)
    gm.recompile()
    return PassResult(NAME, matched=n, skipped=tuple(skipped))
