"""The spec names graph nodes by handle, never by fx.Node (issue 18).

A pass that rewrites the graph (attn.hook_result replaces the output projection)
must not leave the spec pointing at a removed node: passes look the nodes up by
handle in the graph they run on (`fxlens.ir.graph.site_node`), and a handle no
node carries any more is a StaleHandleError, not a stale object.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
from conftest import DATA
from tiny_models import tiny_model

import fxlens
from fxlens.discovery.config import PerLayer
from fxlens.discovery.decoder import BlockSpec, ModelSpec
from fxlens.errors import NotApplicableError, StaleHandleError
from fxlens.ir.graph import HANDLES, linear_parts, site_node
from fxlens.runtime.compiled import copy_graph_module

TOKS = torch.randint(7, 250, (2, 5), generator=torch.Generator().manual_seed(0))


def _walk(obj, path="spec"):
    """(path, value) of everything reachable from a spec through dataclass fields and containers."""
    yield path, obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(k, f"{path}[{k!r}] (key)")
            yield from _walk(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


def _handles(spec: ModelSpec) -> list[str]:
    """Every node handle the spec holds."""
    out = [h for h in (spec.embed, spec.embed_out, spec.pos_embed, spec.unembed) if h is not None]
    for b in spec.blocks:
        out += [h for pair in list(b.qkv.values()) + list(b.mlp_proj.values()) for h in pair]
        out += [h for h in (b.o_proj, b.z, b.writer, b.post, b.resid_pre, b.resid_mid, b.mlp_in)
                if h is not None]
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])
def test_no_fx_node_is_reachable_from_the_spec(arch):
    model = fxlens.from_pretrained_no_processing(tiny_model(arch))
    found = [(p, type(v).__name__) for p, v in _walk(model.spec) if isinstance(v, fx.Node)]
    assert found == []
    # and it does hold the handles passes need, each naming one node of the graph
    handles = _handles(model.spec)
    assert {b.z for b in model.spec.blocks} | {b.o_proj for b in model.spec.blocks} <= set(handles)
    assert all(site_node(model.graph_module, h).graph is model.graph_module.graph for h in handles)


def test_no_fx_node_is_reachable_from_an_encoder_spec():
    model = fxlens.encoder_from_pretrained_no_processing(DATA / "models" / "bert")
    assert [p for p, v in _walk(model.spec) if isinstance(v, fx.Node)] == []
    assert all(isinstance(b, BlockSpec) for b in model.spec.blocks)
    for h in _handles(model.spec):
        site_node(model.graph_module, h)


def test_handles_follow_the_hook_result_rewrite():
    """attn.hook_result replaces block 0's output projection by a per-head sum: the
    node the discovery found is gone from the graph, the handle names its
    replacement, and every other handle still resolves to a live node."""
    model = fxlens.from_pretrained(tiny_model("gpt2"))
    gm = model.graph_module
    spec = model.spec
    old_o = site_node(gm, spec.blocks[0].o_proj)
    w_target = linear_parts(old_o).w.target
    w_o, b_o = model.W_O.clone(), model.b_O.clone()
    logits = model(TOKS)

    _, cache = model.run_with_cache(TOKS, names_filter="blocks.0.attn.hook_result")
    assert cache["blocks.0.attn.hook_result"].shape == (2, 5, model.cfg.n_heads, model.cfg.d_model)
    gm = model.graph_module
    assert old_o not in gm.graph.nodes                       # the rewrite removed it
    new_o = site_node(gm, spec.blocks[0].o_proj)
    assert new_o is not old_o and new_o.target is torch.ops.aten.add.Tensor   # sum over heads + b_O
    assert linear_parts(new_o).w.target == w_target       # the same W_O parameter, read per head
    live = set(gm.graph.nodes)
    for h in _handles(spec):
        assert site_node(gm, h) in live, h
    # the weight views read through the handles: unchanged, and the model too
    torch.testing.assert_close(model.W_O, w_o, rtol=0, atol=0)
    torch.testing.assert_close(model.b_O, b_o, rtol=0, atol=0)
    torch.testing.assert_close(model(TOKS), logits, rtol=1e-5, atol=1e-5)   # per-head sum: reordered adds
    # an edit of W_O after the rewrite reaches the per-head projection
    before = model(TOKS)
    model.blocks[0].W_O[0] = 0.0
    assert not torch.allclose(model(TOKS), before)


def test_a_removed_node_is_a_stale_handle_error():
    model = fxlens.from_pretrained_no_processing(tiny_model("gpt2"))
    gm, _ = copy_graph_module(model.graph_module)
    handle = model.spec.blocks[1].z
    z = site_node(gm, handle)
    # a pass that replaces the node without moving its handle
    with gm.graph.inserting_after(z):
        twin = gm.graph.call_function(z.target, z.args, z.kwargs)
    z.replace_all_uses_with(twin)
    gm.graph.erase_node(z)
    with pytest.raises(StaleHandleError, match=r"'blocks\.1\.attn\.z': found no node.*move_handles") as err:
        site_node(gm, handle)
    assert err.value.handle == handle
    # the model's own graph is untouched (the copy shares no handle sets with it)
    assert site_node(model.graph_module, handle).op == "call_function"
    # two nodes claiming one handle are refused too
    twin.meta[HANDLES] = frozenset({handle})
    other = site_node(gm, model.spec.blocks[0].z)
    other.meta[HANDLES] = other.meta[HANDLES] | {handle}
    with pytest.raises(StaleHandleError, match="found 2 nodes"):
        site_node(gm, handle)


# --- cfg from every block -------------------------------------------------------------

def test_cfg_says_per_layer_where_blocks_differ():
    """qwen3_moe with mlp_only_layers=[1]: block 0 routes 4 experts of width 32,
    block 1 is a dense MLP of width 128. cfg reading block 0 alone would claim 4
    experts and d_mlp 32 for both."""
    model = fxlens.from_pretrained_no_processing(tiny_model("qwen3_moe_mixed"))
    cfg = model.cfg
    assert [(layer.d_mlp, layer.num_experts, layer.experts_per_token) for layer in cfg.layers] == \
        [(32, 4, 2), (128, None, None)]
    assert isinstance(cfg.d_mlp, PerLayer) and list(cfg.d_mlp) == [32, 128]
    assert list(cfg.num_experts) == [4, None] and list(cfg.experts_per_token) == [2, None]
    assert cfg.gated_mlp is True and cfg.n_heads == 4 and cfg.n_key_value_heads == 2   # the same in both
    # the widths are the sites': expert 0's rows in block 0, the dense MLP's in block 1
    _, cache = model.run_with_cache(TOKS, names_filter=["blocks.0.mlp.experts.0.hook_post",
                                                        "blocks.1.mlp.hook_post"])
    assert cache["blocks.0.mlp.experts.0.hook_post"].shape[-1] == cfg.layers[0].d_mlp
    assert cache["blocks.1.mlp.hook_post"].shape[-1] == cfg.layers[1].d_mlp
    # what needs one width refuses, naming the per-layer way
    with pytest.raises(NotApplicableError, match=r"cfg.d_mlp = PerLayer\(\[32, 128\]\).*cfg.layers\[layer\].d_mlp"):
        cache.stack_neuron_results(2)


def test_cfg_local_and_global_layers():
    """gemma2's layer_types (sliding, full): TransformerLens's attn_types per layer."""
    model = fxlens.from_pretrained_no_processing(tiny_model("gemma2"))
    cfg = model.cfg
    assert cfg.use_local_attn and cfg.attn_types == ["local", "global"] and cfg.window_size == 128
    assert [(layer.attn_type, layer.window_size) for layer in cfg.layers] == [("local", 128), ("global", None)]


def test_cfg_of_uniform_blocks_is_one_value_per_field():
    model = fxlens.from_pretrained_no_processing(tiny_model("llama"))
    cfg = model.cfg
    assert not any(isinstance(v, PerLayer) for v in vars(cfg).values())
    assert cfg.d_mlp == 128 and cfg.num_experts is None and not cfg.use_local_attn and cfg.attn_types is None
    assert len(cfg.layers) == cfg.n_layers and all(layer == cfg.layers[0] for layer in cfg.layers)


def test_a_norm_module_called_twice_gives_each_call_its_own_sites():
    """One norm module applied twice in a block (the llama block's post-attention norm
    replaced by its input norm: one module path, two calls): ln1 is the norm of
    resid_pre and ln2 of resid_mid, each its own call's, and the logits stay HF's,
    raw and processed."""
    hf = tiny_model("llama")
    for layer in hf.model.layers:
        layer.post_attention_layernorm = layer.input_layernorm
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    eps = hf.config.rms_norm_eps
    # float32 throughout: 1e-5 of the values' scale is rounding, a wrong call's input is O(1) off
    for load in (fxlens.from_pretrained_no_processing, fxlens.from_pretrained):
        model = load(hf)
        logits, cache = model.run_with_cache(ids)
        torch.testing.assert_close(logits.log_softmax(-1), want.log_softmax(-1), rtol=0, atol=1e-4)
        if load is fxlens.from_pretrained:
            continue
        for L in range(model.cfg.n_layers):
            for ln, source in (("ln1", "hook_resid_pre"), ("ln2", "hook_resid_mid")):
                x = cache[f"blocks.{L}.{source}"]
                rms = x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
                torch.testing.assert_close(cache[f"blocks.{L}.{ln}.hook_normalized"], x * rms, rtol=1e-5, atol=1e-5)
