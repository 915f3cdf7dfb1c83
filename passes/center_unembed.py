"""center_unembed: make W_U mean-zero over the vocabulary.

Matches   the unembedding linear (the model's output embeddings).
Rewrites  W_U -> W_U - mean_vocab(W_U), b_U -> b_U - mean(b_U). Softmax is
          shift-invariant, so log-probs are unchanged while logits lose a
          per-position constant. A tied embedding keeps its own weights.
Requires  discover_sites; skipped when the logits pass a non-linear op before
          the output (Gemma 2's soft-capping), where the shift would matter.
Invariant W_U has mean ~0 over the vocabulary.
"""

from __future__ import annotations

from fxlens.errors import PassError
from fxlens.ir.graph import is_layout, site_node
from fxlens.ir.params import Linear
from fxlens.ir.pass_result import PassResult

NAME = "center_unembed"


def _reaches_output_through_layout(node) -> bool:
    n = node
    while True:
        users = list(n.users)
        if any(u.op == "output" for u in users):
            return True
        nxt = [u for u in users if is_layout(u)]
        if len(nxt) != 1:
            return False
        n = nxt[0]


def center_unembed(gm, spec, log) -> PassResult:
    node = site_node(gm, spec.unembed)
    if not _reaches_output_through_layout(node):
        reason = "the logits pass a non-linear op (soft-capping?) after the unembedding"
        log.skipped.append(f"{NAME}: {reason}")
        return PassResult(NAME, matched=0, skipped=(reason,))
    lin = Linear(node)                                    # W_U stored [d_vocab, d_model]
    lin.center_outputs(gm, NAME, log)
    if not lin.outputs_centred(gm):
        raise PassError(NAME, "W_U still has a mean component")
    gm.recompile()
    return PassResult(NAME, matched=1)
