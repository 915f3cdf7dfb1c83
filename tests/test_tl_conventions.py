"""TransformerLens's conventions beyond the four oracle architectures.

References are TransformerLens 3.9's own activations on the same tiny weights
(tests/data/tl_ref, made by scripts/tl_references.py): raw = TL's
from_pretrained_no_processing, processed = TL's from_pretrained defaults, each
against fxlens's namesake on the saved checkpoint.

Tolerance: RTOL (conftest) = 1e-4 of the tensor's largest magnitude: TL agrees
with HF to <= 2e-5 on these models' log-probs (tl_ref/README.md), so 1e-4
separates float32 reordering from a real mistake (a missing sqrt(d_model) scale
moves gemma's resid_pre by 6). Attention scores are compared at unmasked
entries only (TL holds -inf where HF holds the dtype's minimum).
"""

import functools
import json
import re
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fxlens
from conftest import DATA, RTOL, rel_err

REF = DATA / "tl_ref"
ARCHS = sorted(p.parent.name for p in REF.glob("*/hooks.json"))

# TL hooks fxlens does not yet give TL's tensor for (blocks.L. = every layer), per arch;
# a "processed:" prefix limits an entry to that mode. The test asserts the failing set is
# exactly this, so a fix (or a regression) fails until the table says so.
KNOWN_GAPS: dict[str, dict[str, str]] = {}


def _known_gaps(arch: str, mode: str) -> set[str]:
    out = set()
    for name in KNOWN_GAPS.get(arch, {}):
        where, _, short = name.rpartition(":")
        if where in ("", mode):
            out.add(short)
    return out


@functools.lru_cache(maxsize=None)
def _captured(arch: str):
    return fxlens.capture(REF / arch / "hf")


@functools.lru_cache(maxsize=None)
def _model(arch: str, mode: str):
    load = fxlens.from_pretrained if mode == "processed" else fxlens.from_pretrained_no_processing
    # no self-check against HF: the comparison below is against TL, which agrees with HF
    return load(_captured(arch), self_check=False)


def _ref(arch: str, what: str) -> dict:
    return load_file(REF / arch / f"{what}.safetensors")


def _compare(arch: str, mode: str) -> dict[str, str]:
    """TL hook name -> what differs, for every TL hook fxlens misses or gets wrong."""
    model = _model(arch, mode)
    tokens = _ref(arch, "tokens")["tokens"]
    shapes = json.loads((REF / arch / "hooks.json").read_text())["modes"][mode]["hooks"]
    ref = _ref(arch, mode)
    _, cache = model.run_with_cache(tokens)
    bad = {}
    for name, want in ref.items():
        if name not in cache:
            bad[name] = "missing"
            continue
        got = cache[name]
        if list(got.shape) != shapes[name]:
            bad[name] = f"shape {list(got.shape)} != {shapes[name]}"
            continue
        if name.endswith("hook_attn_scores"):
            keep = torch.isfinite(want)
            got, want = got[keep], want[keep]
        err = rel_err(got, want)
        if not err <= RTOL:
            bad[name] = f"rel err {err:.2e}"
    return bad


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_transformerlens_hook_matches(arch, mode):
    bad = _compare(arch, mode)
    layerless = {re.sub(r"^blocks\.\d+\.", "blocks.L.", name) for name in bad}
    assert layerless == _known_gaps(arch, mode), bad


def test_bloom_alibi_scores_are_relative_to_the_query():
    """HF's ALiBi adds slope_h * key_pos to the scores; TransformerLens (and fxlens's
    hook_attn_scores, after the relative_bias pass) slope_h * (key_pos - query_pos).
    Without the pass the scores differ from TransformerLens's by one constant per query
    row (the pattern does not), so this fails if the pass stops matching."""
    from fxlens.passes import relative_bias
    gm = _captured("bloom").graph_module()
    assert relative_bias(gm).matched == 2          # one baddbmm per layer, two layers
    assert relative_bias(gm).matched == 0          # and the rewrite is not matched again
    tokens = _ref("bloom", "tokens")["tokens"]
    ref = _ref("bloom", "raw")
    _, cache = _model("bloom", "raw").run_with_cache(tokens)
    for L in range(2):
        want, got = ref[f"blocks.{L}.attn.hook_attn_scores"], cache[f"blocks.{L}.attn.hook_attn_scores"]
        keep = torch.isfinite(want)
        assert rel_err(got[keep], want[keep]) <= RTOL
        # at key = query the ALiBi term is 0: the score is q.k / sqrt(d_head) alone
        q, k = cache[f"blocks.{L}.attn.hook_q"], cache[f"blocks.{L}.attn.hook_k"]   # [b, s, h, d]
        qk = torch.einsum("bshd,bshd->bhs", q, k) / q.shape[-1] ** 0.5
        assert rel_err(torch.diagonal(got, dim1=-2, dim2=-1), qk) <= RTOL


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformerlens(arch, mode):
    tokens = _ref(arch, "tokens")["tokens"]
    want = _ref(arch, f"{mode}_logits")["logits"]
    assert rel_err(_model(arch, mode)(tokens), want) <= RTOL


@pytest.mark.parametrize("arch", ARCHS)
def test_w_e_is_the_embedding_as_it_enters_the_residual_stream(arch):
    """TransformerLens folds an embedding scale (Gemma's sqrt(d_model)) into W_E, so
    W_E[tokens] is hook_embed; where a norm follows the embedding (BLOOM's embed.ln, inside
    TL's Embed) W_E is the table before it: W_E[tokens] centred over its scale is
    embed.ln.hook_normalized."""
    tokens = _ref(arch, "tokens")["tokens"]
    ref = _ref(arch, "raw")
    rows = _model(arch, "raw").W_E[tokens]
    if "embed.ln.hook_normalized" in ref:
        got = (rows - rows.mean(-1, keepdim=True)) / ref["embed.ln.hook_scale"]
        assert rel_err(got, ref["embed.ln.hook_normalized"]) <= RTOL
    else:
        assert rel_err(rows, ref["hook_embed"]) <= RTOL


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "olmo2"])
def test_q_norm_hooks_edit_the_query(arch):
    """attn.q_norm.hook_normalized is in TL's layout (rows of [b*s*h, d_head] per head,
    or [b, s, h*d]) and writes back: returning it unchanged keeps the logits, zeroing it
    makes every query 0, so each row of the pattern is uniform over its unmasked keys."""
    model = _model(arch, "raw")
    tokens = _ref(arch, "tokens")["tokens"]
    name = "blocks.0.attn.q_norm.hook_normalized"
    want = _ref(arch, "raw_logits")["logits"]
    same = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x.clone())])
    assert rel_err(same, want) <= RTOL
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_pattern"])
    with model.hooks(fwd_hooks=[(name, lambda x, hook: torch.zeros_like(x))]):
        _, zeroed = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_pattern"])
    pattern = zeroed["blocks.0.attn.hook_pattern"]
    n = tokens.shape[1]
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    assert rel_err(pattern, uniform.expand_as(pattern)) <= RTOL
    assert rel_err(cache["blocks.0.attn.hook_pattern"], uniform.expand_as(pattern)) > 0.1


@pytest.mark.parametrize("arch", ["olmo2", "gemma2", "gemma3", "qwen3"])
def test_cfg_norm_placement_is_transformerlens(arch):
    """use_normalization_before_and_after: norms on both sides of each sublayer (Gemma 2/3);
    post-norms alone (OLMo 2) are TL's plain ln1/ln2. TL's processed model folds nothing
    in a post-norm-only model (normalization_type stays RMS, not RMSPre)."""
    modes = json.loads((REF / arch / "hooks.json").read_text())["modes"]
    for mode in ("raw", "processed"):
        cfg, tl_cfg = _model(arch, mode).cfg, modes[mode]["cfg"]
        assert cfg.use_normalization_before_and_after == tl_cfg["use_normalization_before_and_after"], mode
        assert cfg.normalization_type == tl_cfg["normalization_type"], mode


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("arch", ["phi", "gptj"])
def test_shared_norm_hooks_move_only_their_sublayer(arch, mode):
    """A parallel block's one norm is TL's ln1 for attention and ln2 for the MLP: a hook
    on ln2.hook_normalized changes mlp_out and leaves attn_out alone, and the reverse."""
    model = _model(arch, mode)
    tokens = _ref(arch, "tokens")["tokens"]
    outs = ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    _, base = model.run_with_cache(tokens, names_filter=outs)
    for ln, moved, kept in (("ln1", outs[0], outs[1]), ("ln2", outs[1], outs[0])):
        with model.hooks(fwd_hooks=[(f"blocks.0.{ln}.hook_normalized", lambda x, hook: x * 0.5)]):
            _, cache = model.run_with_cache(tokens, names_filter=outs)
        assert torch.equal(cache[kept], base[kept]), (ln, kept)
        assert rel_err(cache[moved], base[moved]) > 1e-2, (ln, moved)


# fxlens orders hook names by a fixed canonical rank; OLMo 2's post-only ln1/ln2 run after
# the sublayer in TL, but are ranked where pre-norms sit.
ORDER_GAPS = {"olmo2"}


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_names_are_transformerlens_names(arch):
    """The golden list: fxlens's hook names are TL's (less the listed gaps), none beyond,
    in TL's order."""
    for mode in ("raw", "processed"):
        want = list(json.loads((REF / arch / "hooks.json").read_text())["modes"][mode]["hooks"])
        gaps = _known_gaps(arch, mode)
        got = _model(arch, mode).hook_names
        # a gap fxlens has the hook for (a value that differs, as BLOOM's scores) stays listed
        want = [n for n in want if n in got or re.sub(r"^blocks\.\d+\.", "blocks.L.", n) not in gaps]
        assert set(got) == set(want), (mode, sorted(set(got) ^ set(want)))
        assert (got == want) == (arch not in ORDER_GAPS), mode


CFG_FIELDS = ["n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_key_value_heads",
              "normalization_type", "positional_embedding_type", "rotary_dim", "rotary_base",
              "parallel_attn_mlp", "gated_mlp", "use_normalization_before_and_after", "use_qk_norm",
              "act_fn", "eps", "n_ctx", "num_experts", "experts_per_token", "attn_scores_soft_cap",
              "output_logits_soft_cap", "original_architecture"]
# arch -> {field: why fxlens differs from TL 3.9}
CFG_GAPS = {
    "qwen3": {"n_ctx": "TL caps Qwen3 at 2048 whatever the checkpoint says; fxlens reads the checkpoint (128)"},
    "olmo": {"eps": "OLMo's config names no eps (its LayerNorm fixes 1e-5); fxlens reads eps from the config"},
    "bloom": {"act_fn": "BLOOM's config names no activation (its MLP hard-codes the tanh GELU, which TL "
                        "knows by architecture); fxlens reads act_fn from the config and leaves it None"},
    "olmo2": {"use_qk_norm": "TL keys OLMo 2's q/k norms off the architecture name and leaves the flag False"},
    "mistral": {"n_ctx": "TL caps Mistral at 2048 whatever the checkpoint says; fxlens reads the checkpoint (128)"},
    "olmoe": {"use_qk_norm": "TL keys OLMoE's q/k norms off the architecture name and leaves the flag False",
              "n_key_value_heads": "TL's OLMoE config leaves it None (one k/v head per head); fxlens writes "
                                   "the count, 4 = n_heads, as TL does for OLMo"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_local_attention_is_transformerlens(arch):
    """Local (sliding-window) and global layers: TL's use_local_attn, and where it is
    on, its attn_types per layer and window_size (gemma2, gemma3, gpt_neo here)."""
    tl_cfg = json.loads((REF / arch / "hooks.json").read_text())["modes"]["raw"]["cfg"]
    cfg = _model(arch, "raw").cfg
    assert cfg.use_local_attn == tl_cfg["use_local_attn"]
    if tl_cfg["use_local_attn"]:
        assert (cfg.attn_types, cfg.window_size) == (tl_cfg["attn_types"], tl_cfg["window_size"])


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_is_transformerlens_cfg(arch):
    for mode in ("raw", "processed"):
        tl_cfg = json.loads((REF / arch / "hooks.json").read_text())["modes"][mode]["cfg"]
        cfg = _model(arch, mode).cfg
        differ = {f for f in CFG_FIELDS if getattr(cfg, f) != tl_cfg[f]}
        assert differ == set(CFG_GAPS.get(arch, {})), {f: (getattr(cfg, f), tl_cfg[f]) for f in differ}


def test_expert_hooks_edit_only_their_experts_rows():
    """mlp.experts.E.hook_post holds expert E's rows in TransformerLens's order (the
    tokens that chose E in slot 0, then in slot 1) and writes back: zeroing expert 1's
    rows takes from each token that chose it exactly its routing weight times expert
    1's down projection of its row (a hand computation from the router's cache and the
    checkpoint's w2), and nothing from the other tokens; returning the rows unchanged
    keeps the logits."""
    model = _model("mixtral", "raw")
    tokens = _ref("mixtral", "tokens")["tokens"]
    site, mlp_out = "blocks.0.mlp.experts.1.hook_post", "blocks.0.hook_mlp_out"
    router = ["blocks.0.mlp.hook_expert_weights", "blocks.0.mlp.hook_expert_indices"]
    _, base = model.run_with_cache(tokens, names_filter=[*router, site, mlp_out])
    with model.hooks(fwd_hooks=[(site, lambda x, hook: torch.zeros_like(x))]):
        _, cut = model.run_with_cache(tokens, names_filter=[mlp_out])
    same = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda x, hook: x.clone())])
    assert rel_err(same, _ref("mixtral", "raw_logits")["logits"]) <= RTOL

    top, chosen = base[router[0]].topk(2, dim=-1)               # Mixtral renormalises its top 2
    top = top / top.sum(-1, keepdim=True)
    assert torch.equal(chosen, base[router[1]])
    slot, token = torch.where(chosen.T == 1)                    # TransformerLens's row order
    w2 = load_file(REF / "mixtral" / "hf" / "model.safetensors")[
        "model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    taken = torch.zeros(chosen.shape[0], w2.shape[0])
    taken.index_add_(0, token, top[token, slot, None] * (base[site] @ w2.T))
    want = base[mlp_out].flatten(0, 1) - taken
    assert rel_err(cut[mlp_out].flatten(0, 1), want) <= RTOL
    untouched = torch.ones(chosen.shape[0], dtype=torch.bool)
    untouched[token] = False
    assert untouched.any() and torch.equal(cut[mlp_out].flatten(0, 1)[untouched],
                                           base[mlp_out].flatten(0, 1)[untouched])


@pytest.mark.parametrize("arch", ["olmoe", "granitemoe"])
def test_expert_sites_hold_each_experts_routed_rows(arch):
    """Other routed-expert models (OLMoE: full-softmax router; GraniteMoE: softmax
    over the top-k logits only, so no hook_expert_weights) get the same per-expert
    sites from the routing's dataflow: expert E's hook_gate / hook_pre / hook_post
    are gate, up and act(gate) * up of the rows that chose E, slot by slot then
    token by token, computed by hand from what HF's experts module receives (its
    hidden rows and top-k indices, caught with a forward hook) and its weights."""
    sys.path.insert(0, str(DATA.parent.parent / "scripts"))
    import support_matrix
    hf = support_matrix.tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.from_pretrained_no_processing(hf)
    experts = next(m for m in hf.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter))
    seen = {}
    handle = experts.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], chosen=args[1]))
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf(tokens, use_cache=False)
    handle.remove()
    _, cache = model.run_with_cache(tokens)
    n_experts = experts.gate_up_proj.shape[0]
    rows = 0
    for e in range(n_experts):
        slot, token = torch.where(seen["chosen"].T == e)
        with torch.no_grad():
            gate, up = (seen["x"][token] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            post = experts.act_fn(gate) * up
        for site, want in (("hook_gate", gate), ("hook_pre", up), ("hook_post", post)):
            got = cache[f"blocks.0.mlp.experts.{e}.{site}"]
            assert got.shape == want.shape and (want.numel() == 0 or rel_err(got, want) <= RTOL), (e, site)
        rows += len(token)
    assert rows == tokens.numel() * seen["chosen"].shape[-1]
    assert model.cfg.d_mlp == experts.gate_up_proj.shape[1] // 2 and model.cfg.gated_mlp
