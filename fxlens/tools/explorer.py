"""Google's Model Explorer (`ai-edge-model-explorer`, the `fxlens[explorer]` extra).

`to_model_explorer(G)` turns the annotated graph of fxlens.tools.dump (`to_networkx`)
into Model Explorer's graph, built with its own `graph_builder` classes: one
GraphNode per FX node, keyed by the node's name, with an IncomingEdge per input.
Nodes are grouped by namespace along TransformerLens's structure: a hook node by
its site's name (`blocks.3.attn.hook_q` -> `blocks.3/attn`, `ln_final.hook_scale`
-> `ln_final`, `hook_embed` -> the top level), every other node by the sites of
the HF module group it belongs to (the ops of `transformer.h.3.attn` sit in
`blocks.3/attn` because that group's sites are `blocks.3.attn.*`), a group with
no sites by its HF name under its block (`blocks.3/rotary_emb`).

Each node carries the dump's annotations as attributes (op, target, args, HF
module path and class, site, sites found there, hook layout, the pass that
created or changed it) and its value's shape and dtype as output metadata.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import networkx as nx
import torch

from fxlens.errors import FxlensError

FORMAT = "model-explorer"
_HOOK_STYLE = {"backgroundColor": "#ffe08a", "borderColor": "#a07000"}
_FOUND_STYLE = {"backgroundColor": "#fff4cc"}


class ExplorerError(FxlensError):
    """Model Explorer is not installed, or cannot show what was asked."""


def graph_builder():
    """Model Explorer's graph_builder module, or a typed error naming the extra."""
    try:
        from model_explorer import graph_builder as gb
    except ImportError as exc:
        raise ExplorerError(
            f"the Model Explorer format needs the ai-edge-model-explorer package ({exc}); "
            "install the extra (`pip install fxlens[explorer]`, or scripts/setup.sh) "
            "or write another format (.html, .json, .dot, .txt)") from exc
    return gb


def site_namespace(site: str) -> str:
    """'blocks.3.attn.hook_q' -> 'blocks.3/attn'; 'ln_final.hook_scale' -> 'ln_final';
    'hook_embed' -> ''; an SAE's 'blocks.0.hook_resid_pre.hook_sae_acts_post'
    -> 'blocks.0/hook_resid_pre'."""
    parts = site.split(".")[:-1]
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
        parts = [f"blocks.{parts[1]}"] + parts[2:]
    return "/".join(parts)


def _group_namespaces(G: nx.DiGraph) -> dict[tuple[str, str], str]:
    """(section, HF group) -> its namespace: the most common namespace below the
    block among the group's sites, else the block's own (its residual adds), else
    the HF child name under the block, else the HF module path."""
    sites: dict[tuple[str, str], list[str]] = {}
    for _, d in G.nodes(data=True):
        found = sites.setdefault((d["section"], d["group"]), [])
        found += ([d["site"]] if d["site"] else []) + d["sites"]
    out = {}
    for (section, group), names in sites.items():
        spaces = Counter(site_namespace(s) for s in names)
        below = [ns for ns, _ in spaces.most_common() if "/" in ns or (ns and not ns.startswith("blocks."))]
        if below:
            out[section, group] = below[0]
        elif spaces:
            out[section, group] = spaces.most_common(1)[0][0]
        elif section.startswith("blocks."):
            child = group.rpartition(".")[2]
            # the group is the block itself (`transformer.h.3`): the block's namespace
            out[section, group] = section if child.isdigit() else f"{section}/{child}"
        else:
            out[section, group] = "" if group.startswith("(") else group
    return out


def _label(d: dict, name: str) -> str:
    if d["site"]:
        return d["site"]                     # what a user searches for
    if d["op"] == "call_function":
        # aten.addmm.default -> addmm
        target = d["target"]
        return target.split(".")[1] if target.startswith("aten.") else target
    if d["op"] == "get_attr":
        return d["target"]
    if d["op"] == "placeholder":
        return f"input {name}"
    return d["op"] if d["op"] != "call_module" else d["target"]


def to_model_explorer(G: nx.DiGraph):
    """The ops-level graph G as a Model Explorer `graph_builder.Graph`."""
    gb = graph_builder()
    spaces = _group_namespaces(G)
    order = sorted(G.nodes(data=True), key=lambda item: item[1]["order"])
    nodes = []
    for name, d in order:
        namespace = site_namespace(d["site"]) if d["site"] else spaces[d["section"], d["group"]]
        attrs = [("op", d["op"]), ("target", d["target"]), ("args", d["args"]),
                 ("hf_module", d["module"]), ("hf_class", d["module_class"]),
                 ("section", d["section"]), ("site", d["site"]), ("sites", ", ".join(d["sites"])),
                 ("hook_layout", d["layout"]), ("created_by", d["created_by"]),
                 ("changed_by", ", ".join(d["changed_by"]))]
        value = [gb.KeyValue(key="shape", value=d["shape"]), gb.KeyValue(key="dtype", value=d["dtype"])]
        style = _HOOK_STYLE if d["site"] else _FOUND_STYLE if d["sites"] else None
        nodes.append(gb.GraphNode(
            id=name, label=_label(d, name), namespace=namespace,
            attrs=[gb.KeyValue(key=k, value=str(v)) for k, v in attrs if v],
            incomingEdges=[gb.IncomingEdge(sourceNodeId=u, targetNodeInputId=str(i))
                           for i, u in enumerate(sorted(G.predecessors(name), key=lambda u: G.nodes[u]["order"]))],
            outputsMetadata=[gb.MetadataItem(id="0", attrs=[kv for kv in value if kv.value])],
            style=gb.GraphNodeStyle(**style) if style else None))
    groups: dict[str, dict[str, str]] = {}
    for (section, group), ns in spaces.items():
        if ns:
            attrs = groups.setdefault(ns, {})
            attrs["hf_modules"] = ", ".join(filter(None, [attrs.get("hf_modules"), group]))
    title = G.graph.get("title") or "fxlens"
    return gb.Graph(id=title + (f" after {G.graph['pass']}" if G.graph.get("pass") else ""),
                    nodes=nodes, groupNodeAttributes=groups)


def render_model_explorer(G: nx.DiGraph) -> str:
    """Model Explorer's graph JSON (`{"graphs": [...]}`, what its adapters
    return and its server sends to the page)."""
    return json.dumps({"graphs": [dataclasses.asdict(to_model_explorer(G))]}) + "\n"


# --- explore: the served view with activations overlaid -----------------------------------

def finite_norm(act) -> float:
    """The L2 norm of a tensor's finite entries (every element of the batch and
    positions together), as a Python float. Masked attention scores are -inf
    (`hook_attn_scores` above the diagonal): their norm is over the scores that
    take part. JSON has no Infinity, and the page refuses node data holding one."""
    act = act.detach().float()
    return float(act[torch.isfinite(act)].norm())


def activation_norms(model, tokens) -> dict[str, float]:
    """Each site's `finite_norm` over one `run_with_cache`."""
    _, cache = model.run_with_cache(tokens)
    return {name: finite_norm(act) for name, act in cache.items()}


def node_data(graph, norms: dict[str, float]):
    """Model Explorer node data: each hook node's activation norm, coloured on a
    linear gradient from the smallest norm (blue) to the largest (red)."""
    from model_explorer import node_data_builder as ndb
    site_of = {n.id: next(a.value for a in n.attrs if a.key == "site")
               for n in graph.nodes if any(a.key == "site" for a in n.attrs)}
    results = {nid: ndb.NodeDataResult(value=norms[site]) for nid, site in site_of.items() if site in norms}
    return ndb.ModelNodeData(graphsData={graph.id: ndb.GraphNodeData(
        results=results, gradient=[ndb.GradientItem(stop=0, bgColor="#d0e4ff"),
                                   ndb.GradientItem(stop=1, bgColor="#ff8a80")])})


def explorer_config(G: nx.DiGraph, norms: dict[str, float] | None, name: str):
    """A Model Explorer config holding the graph (as its PyTorch adapter's output
    is held: graphs_list with a `graphs://NAME/INDEX` source) and the norms."""
    import model_explorer
    graph = to_model_explorer(G)
    config = model_explorer.config()
    config.graphs_list.append({"graphs": [graph]})
    config.model_sources.append({"url": f"graphs://{name}/{len(config.graphs_list) - 1}"})
    if norms:
        config.add_node_data("activation norm", node_data(graph, norms), model_name=name)
    return config


def serve(config, port: int | None = None, host: str = "127.0.0.1") -> None:
    """Model Explorer's server on 127.0.0.1 only (it prints the URL with the port);
    blocks until interrupted."""
    import model_explorer
    import portpicker
    port = port or portpicker.pick_unused_port()
    print(f"fxlens explore: Model Explorer on http://{host}:{port}/", flush=True)
    model_explorer.visualize_from_config(config, host=host, port=port, no_open_in_browser=True)
