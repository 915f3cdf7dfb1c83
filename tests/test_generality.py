"""Generality: fxlens on tiny random-weight models of many HF architectures.

For each architecture (see tests/tiny_models.py) the model is built and
instrumented once per module, then checked against HuggingFace itself and
against identities that hold for any transformer:

  a. logits equal HF's;
  b. blocks.L.hook_resid_pre equals HF's hidden_states[L];
  c. blocks.L.attn.hook_pattern equals HF's attentions[L];
  d. the residual update adds up (resid_post - resid_pre = attn_out + mlp_out;
     resid_mid = resid_pre + attn_out);
  e. the hook names have TransformerLens's structure for the architecture,
     with k/v carrying the kv-head count under GQA/MQA;
plus internal identities of the sites: z = pattern @ v, the norms' scale and
normalized values recomputed from their input, rotary leaves position 0 and
the non-rotary dims alone, and mlp post = act(pre) (* pre_linear).

Tolerance: float32 throughout; a comparison passes when the largest absolute
difference is at most 1e-4 of the reference tensor's largest magnitude (the
project's standard: rounding stays ~1e-6 relative, a wrong site is O(1)).
"""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

import fxlens
from tiny_models import D_HEAD, D_MLP, D_MODEL, N_HEADS, N_LAYERS, VOCAB, tiny_model

BATCH, SEQ = 2, 7
RTOL = 1e-4   # relative to the reference tensor's max |value|, float32

# ---------------------------------------------------------------------------------------
# What each architecture is, in TransformerLens's terms.
#   norm       "LN" | "RMS"   kind of every norm (eps read from the HF config)
#   rotary     rotary positions (hook_rot_q / hook_rot_k)   rotary_dim: rotated dims per head
#   gated      gated MLP (mlp.hook_pre_linear)
#   parallel   attention and MLP both read resid_pre (no hook_resid_mid)
#   ln2        True: an MLP norm of its own; None: parallel block sharing ln1 (TransformerLens
#              ties ln2 to ln1 there; fxlens may or may not expose it -> not pinned)
#   pre_norms  ln1/ln2 before the branches; post_norms: norms after them (ln1_post/ln2_post
#              beside pre-norms; ln1/ln2 where they are the only ones, as TransformerLens)
#   n_kv       kv heads (GQA / MQA)
#   pos_embed  learned absolute positions (hook_pos_embed)
#   qk_norm    a norm sits between q/k and rotary (the rotary identities don't apply)
#   moe        routed experts: no single mlp.hook_pre / hook_post
#   pinned     confident of TransformerLens's exact hook list -> compare the whole list
# ---------------------------------------------------------------------------------------
_BASE = dict(norm="RMS", rotary=True, rotary_dim=D_HEAD, gated=True, parallel=False, ln2=True,
             pre_norms=True, post_norms=False, n_kv=2, pos_embed=False, qk_norm=False, moe=False,
             pinned=True)
FEATURES = {
    "gpt2": dict(_BASE, norm="LN", rotary=False, rotary_dim=None, gated=False, n_kv=N_HEADS, pos_embed=True),
    "llama": dict(_BASE),
    "mistral": dict(_BASE),
    "qwen2": dict(_BASE),
    # TransformerLens's Qwen3 may add attn.q_norm / attn.k_norm hooks: list not pinned
    "qwen3": dict(_BASE, qk_norm=True, pinned=False),
    "gemma": dict(_BASE),
    "gemma2": dict(_BASE, post_norms=True),
    "gemma2_sw": dict(_BASE, post_norms=True),
    "phi": dict(_BASE, norm="LN", rotary_dim=D_HEAD // 2, gated=False, parallel=True, ln2=True),
    "phi3": dict(_BASE),
    "falcon": dict(_BASE, norm="LN", gated=False, parallel=True, ln2=True, n_kv=1),
    "falcon_new": dict(_BASE, norm="LN", gated=False, parallel=True, ln2=True),
    "gpt_bigcode": dict(_BASE, norm="LN", rotary=False, rotary_dim=None, gated=False, n_kv=1, pos_embed=True),
    "stablelm": dict(_BASE, norm="LN", rotary_dim=D_HEAD // 4),
    "starcoder2": dict(_BASE, norm="LN", gated=False),
    # post-norms only, q/k norm over the flat projection; TransformerLens's naming of an
    # all-post-norm block is not certain: list not pinned
    "olmo2": dict(_BASE, pre_norms=False, ln2=True, post_norms=True, qk_norm=True, pinned=False),
    # TransformerLens's MoE has per-expert hooks: list not pinned
    "mixtral": dict(_BASE, moe=True, pinned=False),
}
ARCHS = list(FEATURES)

# TransformerLens's hook count (default hooks, 2 layers) where the list is pinned; phi and falcon
# share one norm between attention and MLP, exposed as ln1 and ln2 (TransformerLens ties ln2 to ln1).
N_HOOKS = {"gpt2": 40, "llama": 45, "mistral": 45, "qwen2": 45, "gemma": 45, "gemma2": 53, "gemma2_sw": 53,
           "phi": 41, "phi3": 45, "falcon": 41, "falcon_new": 41, "gpt_bigcode": 40,
           "stablelm": 45, "starcoder2": 43}


def expected_layer_names(f: dict) -> tuple[set, set]:
    """(required, forbidden) short names of one block's hooks."""
    req = {"hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
           "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_mlp_out", "hook_resid_post"}
    forb = set()
    ln = lambda tag: {f"{tag}.hook_scale", f"{tag}.hook_normalized"}  # noqa: E731
    if f["pre_norms"] or f["post_norms"]:
        req |= ln("ln1")        # post-norms only (OLMo 2): TransformerLens names them ln1 / ln2
    else:
        forb |= ln("ln1") | ln("ln2")
    if f["ln2"]:
        req |= ln("ln2")
    elif f["ln2"] is False:
        forb |= ln("ln2")
    if f["post_norms"] and f["pre_norms"]:
        req |= ln("ln1_post") | ln("ln2_post")
    else:
        forb |= ln("ln1_post") | ln("ln2_post")
    rot = {"attn.hook_rot_q", "attn.hook_rot_k"}
    (req if f["rotary"] else forb).update(rot)
    if f["parallel"]:
        forb.add("hook_resid_mid")
    else:
        req.add("hook_resid_mid")
    if not f["moe"]:
        req |= {"mlp.hook_pre", "mlp.hook_post"}
        (req if f["gated"] else forb).add("mlp.hook_pre_linear")
    return req, forb


def expected_global_names(f: dict) -> set:
    names = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized",
             "unembed.hook_in", "unembed.hook_out"}
    if f["pos_embed"]:
        names.add("hook_pos_embed")
    return names


# ---------------------------------------------------------------------------------------
# Build, instrument and run each model once per module.
# ---------------------------------------------------------------------------------------
class Run:
    def __init__(self, arch: str):
        self.arch = arch
        self.f = FEATURES[arch]
        self.hf = tiny_model(arch)
        self.tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            self.hf_logits = self.hf(self.tokens, use_cache=False).logits
            out = self.hf(self.tokens, use_cache=False, output_hidden_states=True, output_attentions=True)
        self.hidden_states = out.hidden_states
        self.attentions = out.attentions
        self.model = fxlens.from_pretrained_no_processing(self.hf)
        self.logits, self.cache = self.model.run_with_cache(self.tokens)
        self.names = list(self.model.hook_names)

    def eps(self) -> float:
        c = self.hf.config
        for k in ("layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "norm_epsilon"):
            v = getattr(c, k, None)
            if v is not None:
                return float(v)
        raise AssertionError("no eps in config")

    def act(self):
        c = self.hf.config
        for k in ("hidden_act", "hidden_activation", "activation_function", "activation"):
            v = getattr(c, k, None)
            if isinstance(v, str):
                return ACT2FN[v]
        raise AssertionError("no activation in config")


class Runs:
    def __init__(self):
        self._done: dict[str, Run | BaseException] = {}

    def __call__(self, arch: str) -> Run:
        if arch not in self._done:
            try:
                self._done[arch] = Run(arch)
            except Exception as exc:  # cached so every test of the arch reports it without rebuilding
                self._done[arch] = exc
        r = self._done[arch]
        if isinstance(r, BaseException):
            raise r
        return r


@pytest.fixture(scope="module")
def runs():
    return Runs()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """max |got - want| <= rtol * max |want| (float32; rtol 1e-4 is the project standard)."""
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"{what}: max abs err {err:.3g} > {rtol:g} x max|ref| {scale:.3g}"


def need(r: Run, name: str) -> torch.Tensor:
    assert name in r.cache, f"{r.arch}: no {name} in the cache (hooks: {[n for n in r.names if n.startswith('blocks.0.')]})"
    return r.cache[name]


# ---------------------------------------------------------------------------------------
# a-e
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(runs, arch):
    r = runs(arch)
    # 1e-4 x max|logit|, float32
    assert_close(r.logits, r.hf_logits, f"{arch} logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_pre_matches_hf_hidden_states(runs, arch):
    r = runs(arch)
    # hidden_states[n_layers] is after the final norm in HF: compare inputs of blocks only
    assert len(r.hidden_states) == N_LAYERS + 1
    for L in range(N_LAYERS):
        # 1e-4 x max|hidden state|, float32
        assert_close(need(r, f"blocks.{L}.hook_resid_pre"), r.hidden_states[L], f"{arch} resid_pre {L}")


@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_matches_hf_attentions(runs, arch):
    r = runs(arch)
    for L in range(N_LAYERS):
        # 1e-4 x max prob (<= 1), float32; masked entries are 0 in both
        assert_close(need(r, f"blocks.{L}.attn.hook_pattern"), r.attentions[L], f"{arch} pattern {L}")


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_stream_adds_up(runs, arch):
    r = runs(arch)
    for L in range(N_LAYERS):
        pre = need(r, f"blocks.{L}.hook_resid_pre")
        post = need(r, f"blocks.{L}.hook_resid_post")
        attn_out = need(r, f"blocks.{L}.hook_attn_out")
        mlp_out = need(r, f"blocks.{L}.hook_mlp_out")
        # 1e-4 x max|resid_post - resid_pre|, float32 (one rounding of each add)
        assert_close(attn_out + mlp_out, post - pre, f"{arch} block {L}: attn_out + mlp_out vs resid update")
        mid = f"blocks.{L}.hook_resid_mid"
        if mid in r.cache:
            # 1e-4 x max|resid_mid|, float32
            assert_close(pre + attn_out, r.cache[mid], f"{arch} block {L}: resid_pre + attn_out vs resid_mid")
        if L + 1 < N_LAYERS:
            # the next block starts where this one ends: exact same tensor value (0 tolerance)
            assert torch.equal(post, need(r, f"blocks.{L + 1}.hook_resid_pre")), f"{arch}: resid_post {L} != resid_pre {L + 1}"


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_names_structure(runs, arch):
    r = runs(arch)
    f = r.f
    req, forb = expected_layer_names(f)
    names = set(r.names)
    for L in range(N_LAYERS):
        have = {n[len(f"blocks.{L}."):] for n in names if n.startswith(f"blocks.{L}.")}
        missing, extra = req - have, have & forb
        assert not missing and not extra, \
            f"{arch} block {L}: missing {sorted(missing)}, unexpected {sorted(extra)}; has {sorted(have)}"
        if f["ln2"] is None and "ln2.hook_normalized" in have:
            # a shared norm exposed twice (TransformerLens ties ln2 to ln1): same values, 1e-4 x max|ln1|, float32
            assert_close(r.cache[f"blocks.{L}.ln2.hook_normalized"], r.cache[f"blocks.{L}.ln1.hook_normalized"],
                         f"{arch} tied ln2 vs ln1")
        if f["pinned"]:
            allowed = req | ({"ln2.hook_scale", "ln2.hook_normalized"} if f["ln2"] is None else set())
            assert have <= allowed, f"{arch} block {L}: hooks beyond TransformerLens's: {sorted(have - allowed)}"
    glob = {n for n in names if not n.startswith("blocks.")}
    assert expected_global_names(f) <= glob, f"{arch}: global hooks {sorted(glob)}"
    if f["pinned"]:
        assert glob == expected_global_names(f), f"{arch}: global hooks {sorted(glob)}"
        per_layer = len(req) + (2 if f["ln2"] is None and "blocks.0.ln2.hook_scale" in names else 0)
        assert len(r.names) == N_LAYERS * per_layer + len(glob), f"{arch}: {len(r.names)} hooks"
        n = N_HOOKS[arch]
        assert len(r.names) in (n if isinstance(n, tuple) else (n,)), f"{arch}: {len(r.names)} hooks, want {n}"
    # no hooks for layers that don't exist
    assert not any(n.startswith(f"blocks.{N_LAYERS}.") for n in names)


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_shapes(runs, arch):
    r = runs(arch)
    f = r.f
    b, s, h, kv, d = BATCH, SEQ, N_HEADS, f["n_kv"], D_HEAD
    want = {
        "hook_resid_pre": (b, s, D_MODEL), "hook_resid_mid": (b, s, D_MODEL), "hook_resid_post": (b, s, D_MODEL),
        "hook_attn_out": (b, s, D_MODEL), "hook_mlp_out": (b, s, D_MODEL),
        "attn.hook_q": (b, s, h, d), "attn.hook_k": (b, s, kv, d), "attn.hook_v": (b, s, kv, d),
        "attn.hook_rot_q": (b, s, h, d), "attn.hook_rot_k": (b, s, kv, d),
        "attn.hook_attn_scores": (b, h, s, s), "attn.hook_pattern": (b, h, s, s), "attn.hook_z": (b, s, h, d),
        "mlp.hook_pre": (b, s, D_MLP), "mlp.hook_pre_linear": (b, s, D_MLP), "mlp.hook_post": (b, s, D_MLP),
    }
    for tag in ("ln1", "ln2", "ln1_post", "ln2_post"):
        want[f"{tag}.hook_scale"] = (b, s, 1)
        want[f"{tag}.hook_normalized"] = (b, s, D_MODEL)
    for L in range(N_LAYERS):
        for short, shp in want.items():
            name = f"blocks.{L}.{short}"
            if name in r.cache:
                assert tuple(r.cache[name].shape) == shp, f"{arch} {name}: {tuple(r.cache[name].shape)} != {shp}"
    assert tuple(need(r, "hook_embed").shape) == (b, s, D_MODEL)
    assert tuple(need(r, "unembed.hook_out").shape) == (b, s, VOCAB)


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg(runs, arch):
    r = runs(arch)
    f, c = r.f, r.model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_vocab) == (N_LAYERS, D_MODEL, N_HEADS, D_HEAD, VOCAB)
    assert c.n_key_value_heads == (None if f["n_kv"] == N_HEADS else f["n_kv"]), f"{arch}: n_key_value_heads {c.n_key_value_heads}"
    assert c.parallel_attn_mlp == f["parallel"], f"{arch}: parallel_attn_mlp {c.parallel_attn_mlp}"
    assert c.positional_embedding_type == ("rotary" if f["rotary"] else "standard")
    assert c.rotary_dim == f["rotary_dim"], f"{arch}: rotary_dim {c.rotary_dim} != {f['rotary_dim']}"
    assert c.normalization_type == f["norm"], f"{arch}: normalization_type {c.normalization_type}"
    if f["pre_norms"]:
        assert c.use_normalization_before_and_after == f["post_norms"], \
            f"{arch}: use_normalization_before_and_after {c.use_normalization_before_and_after}"
    if not f["moe"]:
        assert c.gated_mlp == f["gated"] and c.d_mlp == D_MLP, f"{arch}: gated {c.gated_mlp}, d_mlp {c.d_mlp}"


# ---------------------------------------------------------------------------------------
# identities between sites
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_z_is_pattern_times_v(runs, arch):
    r = runs(arch)
    for L in range(N_LAYERS):
        pattern = need(r, f"blocks.{L}.attn.hook_pattern")           # [b, h, q, k]
        v = need(r, f"blocks.{L}.attn.hook_v")                       # [b, k, kv, d]
        v = v.repeat_interleave(N_HEADS // v.shape[2], dim=2)        # GQA: head i reads kv head i // group
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        # 1e-4 x max|z|, float32
        assert_close(need(r, f"blocks.{L}.attn.hook_z"), z, f"{arch} block {L}: z vs pattern @ v")


def _normalize(x: torch.Tensor, kind: str, eps: float):
    x = x.float()
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return scale, x / scale


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_sites_recompute(runs, arch):
    r = runs(arch)
    f = r.f
    checks = []
    for L in range(N_LAYERS):
        pre = need(r, f"blocks.{L}.hook_resid_pre")
        if f["pre_norms"]:
            checks.append((f"blocks.{L}.ln1", pre))
            mlp_in = pre if f["parallel"] else r.cache.cache_dict.get(f"blocks.{L}.hook_resid_mid")
            if f"blocks.{L}.ln2.hook_scale" in r.cache and mlp_in is not None:
                checks.append((f"blocks.{L}.ln2", mlp_in))
    checks.append(("ln_final", need(r, f"blocks.{N_LAYERS - 1}.hook_resid_post")))
    for tag, x in checks:
        scale, normalized = _normalize(x, f["norm"], r.eps())
        # 1e-4 x max|ref|, float32 (x / sqrt(v) vs x * rsqrt(v) differ by ~1e-7)
        assert_close(need(r, f"{tag}.hook_scale"), scale, f"{arch} {tag}.hook_scale")
        assert_close(need(r, f"{tag}.hook_normalized"), normalized, f"{arch} {tag}.hook_normalized")


@pytest.mark.parametrize("arch", [a for a in ARCHS if FEATURES[a]["rotary"] and not FEATURES[a]["qk_norm"]])
def test_rotary_sites(runs, arch):
    r = runs(arch)
    rd = FEATURES[arch]["rotary_dim"]
    for L in range(N_LAYERS):
        for x in "qk":
            raw = need(r, f"blocks.{L}.attn.hook_{x}")
            rot = need(r, f"blocks.{L}.attn.hook_rot_{x}")
            # position 0 rotates by angle 0: rot == raw there (1e-4 x max|raw|, float32)
            assert_close(rot[:, 0], raw[:, 0], f"{arch} block {L} rot_{x} at pos 0")
            # partial rotary passes the last d_head - rotary_dim dims through untouched
            if rd < D_HEAD:
                assert_close(rot[..., rd:], raw[..., rd:], f"{arch} block {L} rot_{x} pass-through dims")
            # a rotation keeps the norm of each (i, i + rd/2) pair (HF's rotate_half pairing)
            half = rd // 2
            pair = lambda t: (t[..., :half] ** 2 + t[..., half:rd] ** 2).sqrt()  # noqa: E731
            assert_close(pair(rot), pair(raw), f"{arch} block {L} rot_{x} pair norms")
            # and rotates something: positions > 0 differ
            assert (rot[:, 1:, :, :rd] - raw[:, 1:, :, :rd]).abs().max() > 1e-3, f"{arch} rot_{x} is not rotated"


@pytest.mark.parametrize("arch", [a for a in ARCHS if not FEATURES[a]["moe"]])
def test_mlp_sites(runs, arch):
    r = runs(arch)
    act = r.act()
    for L in range(N_LAYERS):
        pre = need(r, f"blocks.{L}.mlp.hook_pre")
        post = need(r, f"blocks.{L}.mlp.hook_post")
        want = act(pre)
        if FEATURES[arch]["gated"]:
            want = want * need(r, f"blocks.{L}.mlp.hook_pre_linear")
        # 1e-4 x max|post|, float32
        assert_close(post, want, f"{arch} block {L}: mlp post vs act(pre){' * pre_linear' if FEATURES[arch]['gated'] else ''}")


# ---------------------------------------------------------------------------------------
# Multi-head latent attention (DeepSeek-V2's MLA): q through a low-rank latent
# (q_a -> norm -> q_b), k and v up-projected from one latent (kv_a -> norm -> kv_b),
# and a rope key made once and expanded to every head, concatenated after the no-rope
# part. hook_q is q per head (no-rope ++ rope, before rotation), hook_rot_q the
# rotated q entering QK^T; hook_k is the assembled key entering QK^T (every head's
# copy of the shared rope part included), so it is also hook_rot_k; hook_v the values.
# Tolerance: the project's 1e-4 relative (float32 rounding ~1e-7 measured).
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mla():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import support_matrix
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mod
    hf = support_matrix.tiny_model("deepseek_v2")
    tokens = torch.randint(0, hf.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    seen = []   # HF's own q, k, v: the tensors its eager attention multiplies
    real = mod.eager_attention_forward

    def spy(module, q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return real(module, q, k, v, *args, **kwargs)
    mod.eager_attention_forward = spy
    try:
        with torch.no_grad():
            want = hf(tokens, use_cache=False).logits
    finally:
        mod.eager_attention_forward = real
    cap = fxlens.capture(hf)
    model = fxlens.from_pretrained_no_processing(cap)
    logits, cache = model.run_with_cache(tokens)
    return dict(hf=hf, mod=mod, tokens=tokens, want=want, hf_qkv=seen, cap=cap, model=model,
                logits=logits, cache=cache)


def test_mla_sites_are_hf_attention_inputs(mla):
    c = mla["hf"].config
    assert_close(mla["logits"], mla["want"], "deepseek_v2 logits")
    assert len(mla["hf_qkv"]) == c.num_hidden_layers
    for L, (q, k, v) in enumerate(mla["hf_qkv"]):       # HF: [batch, head, pos, d]
        cache = mla["cache"]
        assert_close(cache[f"blocks.{L}.attn.hook_rot_q"], q.transpose(1, 2), f"blocks.{L}.attn.hook_rot_q")
        assert_close(cache[f"blocks.{L}.attn.hook_k"], k.transpose(1, 2), f"blocks.{L}.attn.hook_k")
        assert_close(cache[f"blocks.{L}.attn.hook_rot_k"], k.transpose(1, 2), f"blocks.{L}.attn.hook_rot_k")
        assert_close(cache[f"blocks.{L}.attn.hook_v"], v.transpose(1, 2), f"blocks.{L}.attn.hook_v")
        # hook_q: the no-rope part as it enters QK^T, the rope part before rotation
        hq, nope = cache[f"blocks.{L}.attn.hook_q"], c.qk_nope_head_dim
        assert hq.shape == q.transpose(1, 2).shape
        assert_close(hq[..., :nope], q.transpose(1, 2)[..., :nope], f"blocks.{L}.attn.hook_q (no-rope part)")
        # rotation leaves position 0 alone
        assert_close(hq[:, 0], q.transpose(1, 2)[:, 0], f"blocks.{L}.attn.hook_q at position 0")
    names = set(mla["model"].hook_names)
    # the low-rank latents' norms (q_a_layernorm, kv_a_layernorm) are no TransformerLens sites
    assert not any(".q_norm." in n or ".k_norm." in n for n in names), sorted(names)


def test_mla_hook_edits_reach_the_scores(mla):
    """Doubling hook_k (all heads) and hook_v in block 1 gives what HF gives with its
    own key and value doubled."""
    mod, hf = mla["mod"], mla["hf"]
    real = mod.eager_attention_forward

    def doubled(module, q, k, v, *args, **kwargs):
        if module.layer_idx == 1:
            k, v = 2 * k, 2 * v
        return real(module, q, k, v, *args, **kwargs)
    mod.eager_attention_forward = doubled
    try:
        with torch.no_grad():
            want = hf(mla["tokens"], use_cache=False).logits
    finally:
        mod.eager_attention_forward = real
    got = mla["model"].run_with_hooks(mla["tokens"], fwd_hooks=[
        ("blocks.1.attn.hook_k", lambda x, hook: 2 * x), ("blocks.1.attn.hook_v", lambda x, hook: 2 * x)])
    assert_close(got, want, "deepseek_v2 logits with k and v doubled")
    assert (want - mla["want"]).abs().max() > 1e-3     # the edit changed something


def test_mla_processed_and_weights(mla):
    """fold_ln and the rest leave HF's log-probs; W_Q/W_K/W_V refuse, naming the latent."""
    processed = fxlens.from_pretrained(mla["cap"])
    got = processed(mla["tokens"])
    assert_close(got.log_softmax(-1), mla["want"].log_softmax(-1), "deepseek_v2 processed log-probs")
    for what in ("W_Q", "W_K", "W_V"):
        with pytest.raises(fxlens.errors.UnmappableModelError, match="latent|assembled"):
            getattr(processed.blocks[0].attn, what)
    c = mla["hf"].config
    assert processed.blocks[0].attn.W_O.shape == (c.num_attention_heads, c.v_head_dim, c.hidden_size)
    assert processed.cfg.rotary_dim == c.qk_rope_head_dim


def test_mla_without_q_latent_has_exact_w_q():
    """DeepSeek-V2-Lite's layout (q_lora_rank None: q_proj reads the residual stream):
    processed hook_q = ln1.hook_normalized @ W_Q + b_Q exactly as TransformerLens's;
    W_K still refuses (k assembled from kv_b and the shared rope key)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import support_matrix
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = support_matrix.tiny_config("deepseek_v2")
    cfg.q_lora_rank = None
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    support_matrix._perturb(hf, 1)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits
    model = fxlens.from_pretrained(hf)
    logits, cache = model.run_with_cache(tokens)
    assert_close(logits.log_softmax(-1), want.log_softmax(-1), "deepseek_v2 (no q latent) processed log-probs")
    for L in range(cfg.num_hidden_layers):
        attn = model.blocks[L].attn
        q = torch.einsum("bsm,hmd->bshd", cache[f"blocks.{L}.ln1.hook_normalized"], attn.W_Q) + attn.b_Q
        assert_close(q, cache[f"blocks.{L}.attn.hook_q"], f"blocks.{L}: ln1 @ W_Q + b_Q vs hook_q")
        with pytest.raises(fxlens.errors.UnmappableModelError, match="kv_b_proj"):
            attn.W_K
