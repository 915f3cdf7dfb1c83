"""Annotated graph dumps: what the compiler did, for people to read.

One networkx DiGraph is built from the FX graph (`to_networkx`); every format
is derived from it:

  txt   a readable listing, one line per node (or per module)
  dot   graphviz source, clustered by block and module
  svg   the dot source laid out by graphviz's `dot` program
  html  one self-contained page (no network): browse blocks, expand modules
        to ops, search a hook name, see its shape and module path
  json  networkx node-link data (`networkx.node_link_data`)
  model-explorer  Google Model Explorer's graph JSON, nodes in TransformerLens
        namespaces (`blocks.3/attn`): see fxlens.tools.explorer

Two levels: "ops" (every FX node) and "modules" (the quotient graph over
module groups: one node per block child such as `transformer.h.0.attn`, or per
module outside the blocks).

Every op node carries: op and target, shape and dtype (symbolic sizes named
batch / pos), the module path it came from (`meta["nn_module_stack"]`), its
site (`meta["fxlens.site"]` on hook nodes, `meta["fxlens.sites"]` on the node a
site was found on), and the pass that created it (`meta["fxlens.created_by"]`)
or changed it (`meta["fxlens.changed_by"]`, on parameters).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx

from fxlens.errors import FxlensError
from fxlens.tools import explorer
from fxlens.ir.graph import module_paths
from fxlens.discovery.names import canonical_order

FORMATS = ("txt", "dot", "svg", "html", "json", "model-explorer")
# the formats a file's suffix names (Model Explorer's is JSON too: ask for it by name)
SUFFIXES = FORMATS[:5]
LEVELS = ("ops", "modules")

# export's placeholder for nodes outside any module (sym_size of the inputs)
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"
_INPUTS, _OUTPUT, _ROOT = "(inputs)", "(output)", "(model)"
_BLOCK_ITEM = re.compile(r"^(.+)\.(\d+)$")


class DumpError(FxlensError):
    """A dump could not be made or written; says why and the way out."""


# --- the graph -------------------------------------------------------------------------

def to_networkx(gm: fx.GraphModule, title: str = "", pass_name: str | None = None) -> nx.DiGraph:
    """The FX graph as a networkx DiGraph: one node per FX node (keyed by its
    name), an edge from each input to its user, attributes as strings and lists
    so that node-link JSON round-trips."""
    graph = gm.graph
    symbols = _symbol_names(graph)
    blocks = _block_list(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    G = nx.DiGraph(title=title, level="ops", symbols=symbols, block_list=blocks or "",
                   **({"pass": pass_name} if pass_name else {}),
                   **({"capture": gm.meta["fxlens.capture"]} if "fxlens.capture" in gm.meta else {}))
    for node in graph.nodes:
        G.add_node(node.name, **_node_attrs(gm, node, order, symbols, blocks))
    G.add_edges_from((inp.name, node.name) for node in graph.nodes for inp in node.all_input_nodes)
    _place_parameters(G, graph, order)
    _assign_sections(G)
    G.graph["n_sites"] = len(site_names(G))
    return G


def _node_attrs(gm: fx.GraphModule, node: fx.Node, order: dict, symbols: dict, blocks: str | None) -> dict:
    module = _module_of(node)
    block = _block_of(module, blocks)
    group = _group(node, module, block, blocks)
    v = node.meta.get("val")
    return {
        "order": order[node],
        "op": node.op,
        "target": _target(node),
        "args": _args(node),
        "shape": _shape(v, symbols),
        "dtype": _dtype(v),
        "module": module,
        "module_class": _module_class(node, module),
        "block": block,
        "group": group,
        "group_class": _module_class(node, group),
        "site": node.meta.get("fxlens.site", ""),
        "sites": [s[0] for s in node.meta.get("fxlens.sites") or ()],
        "layout": _layout(gm, node),
        "created_by": node.meta.get("fxlens.created_by", ""),
        "changed_by": list(node.meta.get("fxlens.changed_by") or ()),
        "rank": order[node],      # reading position; see _place_parameters
    }


def _symbol_names(graph: fx.Graph) -> dict[str, str]:
    """Export names the dynamic sizes s0, s1...; the token input's two dims are
    the batch and the position, so say that."""
    for node in graph.nodes:
        v = node.meta.get("val")
        if node.op == "placeholder" and isinstance(v, torch.Tensor) and v.dim() == 2:
            return {str(d): name for d, name in zip(v.shape, ("batch", "pos"))
                    if isinstance(d, torch.SymInt)}
    return {}


def _dim(d, symbols: dict) -> str:
    text = str(d)
    if isinstance(d, torch.SymInt):
        text = re.sub(r"\bs\d+\b", lambda m: symbols.get(m.group(0), m.group(0)), text)
    return text


def _shape(v, symbols: dict) -> str:
    if isinstance(v, torch.Tensor):
        return "[" + ", ".join(_dim(d, symbols) for d in v.shape) + "]"
    if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v):
        return "(" + ", ".join(_shape(x, symbols) for x in v) + ")"
    if isinstance(v, torch.SymInt):
        return "= " + _dim(v, symbols)
    return ""


def _dtype(v) -> str:
    if isinstance(v, torch.Tensor):
        return str(v.dtype).removeprefix("torch.")
    if isinstance(v, (list, tuple)):
        kinds = {_dtype(x) for x in v} - {""}
        return ",".join(sorted(kinds))
    if isinstance(v, torch.SymInt):
        return "int"
    return ""


def _target(node: fx.Node) -> str:
    if node.op == "call_function":
        # aten ops print as `aten.addmm.default`; Python callables by name (`getitem`)
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target)
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_module" and "fxlens.site" in node.meta:
        return "HookPoint"
    return str(node.target)


def _args(node: fx.Node, limit: int = 120) -> str:
    """The arguments as FX prints them, node names bare: `(view_1, 64, 2)`."""
    def show(a):
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            inner = ", ".join(show(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        return repr(a) if not isinstance(a, torch.SymInt) else str(a)
    parts = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _module_of(node: fx.Node) -> str:
    """The innermost module that produced the node; a parameter's owner."""
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    paths = [p for p in module_paths(node) if p != _NO_MODULE]
    return paths[-1] if paths else ""


def _module_class(node: fx.Node, module: str) -> str:
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if path == module:
            name = cls.__name__ if isinstance(cls, type) else str(cls)
            return name.rpartition(".")[2]
    return ""


# What a hook sees when the graph holds the value in another layout (see
# fxlens.ir.hook_points.Layout); the node's own shape is the graph's.
LAYOUT_NOTES = {
    "bhsd": "hooks see dims 1 and 2 swapped: [batch, pos, head, d_head]",
    "flat": "hooks see the last dim split into [head, d_head]",
    "scores": "hooks see masked entries as -inf",
    "batch": "hooks see it expanded over the batch",
    "tokens": "hooks see dim 0 split into [batch, pos]",
    "squeeze3": "hooks see the size-1 group axis dropped: [batch, pos, kv_head, d_head]",
}


def _layout(gm: fx.GraphModule, node: fx.Node) -> str:
    """How a hook shows its value when that differs from the graph's."""
    if node.op != "call_module" or "fxlens.site" not in node.meta:
        return ""
    layout = getattr(gm.get_submodule(node.target), "layout", None)
    kind = getattr(layout, "kind", "same")
    return "" if kind == "same" else f"{kind}: {LAYOUT_NOTES.get(kind, 'see fxlens.ir.hook_points.Layout')}"


def _block_list(graph: fx.Graph) -> str | None:
    """The path of the block ModuleList (`transformer.h`, `model.layers`).

    Dumps run after any pass, before site discovery too, so provenance is all
    there is: of the module paths ending in an index, take the list that most
    nodes were produced in (an MoE's experts list holds fewer nodes than the
    blocks that contain it)."""
    weight: dict[str, int] = {}
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            m = _BLOCK_ITEM.match(path)
            if m:
                weight[m.group(1)] = weight.get(m.group(1), 0) + 1
    return max(weight, key=weight.get) if weight else None


def _block_of(module: str, blocks: str | None) -> str:
    """'transformer.h.3.attn' -> 'blocks.3' (TransformerLens's name for it)."""
    if blocks and module.startswith(blocks + "."):
        index = module[len(blocks) + 1:].partition(".")[0]
        if index.isdigit():
            return f"blocks.{index}"
    return ""


def _group(node: fx.Node, module: str, block: str, blocks: str | None) -> str:
    """The collapsed view's unit: a block's direct child (`transformer.h.0.attn`),
    the block itself for its residual adds, or the module outside the blocks."""
    if node.op == "placeholder":
        return _INPUTS
    if node.op == "output":
        return _OUTPUT
    if block:
        index = block.split(".")[1]
        head = f"{blocks}.{index}"
        child = module[len(head) + 1:].partition(".")[0]
        return f"{head}.{child}" if child else head
    return module or _ROOT


def _place_parameters(G: nx.DiGraph, graph: fx.Graph, order: dict) -> None:
    """An exported graph lists every parameter at the top; a reader wants each
    one just before the op that first reads it, in that op's group (a tied
    `lm_head.weight` then shows up beside the embedding that reads it)."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.users:
            first = min(node.users, key=order.__getitem__)
            d, reader = G.nodes[node.name], G.nodes[first.name]
            d["rank"] = order[first] - 0.5
            d["group"], d["block"] = reader["group"], reader["block"]


def _assign_sections(G: nx.DiGraph) -> None:
    """Sections: `embed` (before the first block), `blocks.L`, `final` (after)."""
    first = min((d["rank"] for _, d in G.nodes(data=True) if d["block"]), default=0)
    for _, d in G.nodes(data=True):
        d["section"] = d["block"] or ("embed" if d["rank"] < first else "final")


def sections(G: nx.DiGraph) -> list[str]:
    """Section names in execution order."""
    firsts: dict[str, float] = {}
    for _, d in G.nodes(data=True):
        firsts[d["section"]] = min(firsts.get(d["section"], d["rank"]), d["rank"])
    rank = {"embed": 0, "final": 2}
    return sorted(firsts, key=lambda s: (rank.get(s, 1), firsts[s]))


def site_names(G: nx.DiGraph) -> list[str]:
    """Every site in the graph: hooked, or found and not yet hooked."""
    names = {d["site"] for _, d in G.nodes(data=True) if d["site"]}
    names |= {s for _, d in G.nodes(data=True) for s in d["sites"]}
    return canonical_order(names)


def _reading_order(item) -> tuple:
    return item[1]["rank"], item[1]["order"]


# --- the collapsed view ----------------------------------------------------------------

def collapse(G: nx.DiGraph) -> nx.DiGraph:
    """The modules level: networkx's quotient graph over the module groups of
    each section (the model's root module runs both before and after the blocks).

    The relation is read off G's edges once, because quotient_graph's default
    compares every pair of groups node by node (quadratic in the graph)."""
    members: dict[tuple, list[str]] = {}
    for n, d in sorted(G.nodes(data=True), key=_reading_order):
        members.setdefault((d["section"], d["group"]), []).append(n)
    key_of = {n: key for key, ns in members.items() for n in ns}
    crossing = {(key_of[u], key_of[v]) for u, v in G.edges if key_of[u] != key_of[v]}
    Q = nx.quotient_graph(
        G, list(members.values()),
        edge_relation=lambda b, c: (key_of[next(iter(b))], key_of[next(iter(c))]) in crossing,
        node_data=lambda b: _group_attrs(G, b),
        edge_data=lambda b, c: {})
    repeated = {g for g, n in Counter(g for _, g in members).items() if n > 1}

    def label(key):
        section, group = key
        return f"{group} [{section}]" if group in repeated else group

    Q = nx.relabel_nodes(Q, {b: label(key_of[next(iter(b))]) for b in Q.nodes})
    Q.graph.update(G.graph, level="modules")
    return Q


def _group_attrs(G: nx.DiGraph, members: Iterable[str]) -> dict:
    ds = sorted((G.nodes[n] for n in members), key=lambda d: (d["rank"], d["order"]))
    hooks = {d["site"]: d["shape"] for d in ds if d["site"]}
    found = [s for d in ds for s in d["sites"] if s not in hooks]
    sites = canonical_order(list(hooks) + found)
    ops: dict[str, int] = {}
    for d in ds:
        if d["op"] == "call_function":
            ops[d["target"]] = ops.get(d["target"], 0) + 1
    first = ds[0]
    return {
        "order": first["order"],
        "rank": first["rank"],
        "op": "module",
        "target": ", ".join(f"{k} x{v}" if v > 1 else k for k, v in ops.items()),
        "n_ops": len(ds),
        # the group's last value: what it hands on
        "shape": next((d["shape"] for d in reversed(ds) if d["shape"]), ""),
        "dtype": next((d["dtype"] for d in reversed(ds) if d["dtype"]), ""),
        "module": first["group"],
        "module_class": _class_of(ds),
        "section": first["section"],
        "block": first["block"],
        "group": first["group"],
        "sites": sites,
        "site_shapes": [hooks.get(s, "") for s in sites],
        "site": "",
        "created_by": sorted({d["created_by"] for d in ds} - {""}),
        "changed_by": sorted({p for d in ds for p in d["changed_by"]}),
    }


def _class_of(ds: list[dict]) -> str:
    return next((d["group_class"] for d in ds if d["group_class"]), "")


# --- formats ---------------------------------------------------------------------------

def render_text(G: nx.DiGraph) -> str:
    lines = [_headline(G)]
    if G.graph.get("capture"):
        lines.append(f"capture: {G.graph['capture']}")
    if G.graph.get("symbols"):
        lines.append("sizes: " + ", ".join(f"{k} = {v}" for k, v in G.graph["symbols"].items()))
    by_section = _by_section(G)
    for section in sections(G):
        lines.append(f"\n== {section} ==")
        if G.graph["level"] == "modules":
            lines.extend(_module_line(n, G.nodes[n]) for n in by_section[section])
            continue
        group = None
        for n in by_section[section]:
            d = G.nodes[n]
            if d["group"] != group:
                group = d["group"]
                cls = _class_of([G.nodes[m] for m in by_section[section] if G.nodes[m]["group"] == group])
                lines.append(f"-- {group}" + (f" ({cls})" if cls else ""))
            lines.append(_op_line(n, d))
    return "\n".join(lines) + "\n"


def _headline(G: nx.DiGraph) -> str:
    after = f" after pass {G.graph['pass']}" if G.graph.get("pass") else ""
    n_sites = G.graph.get("n_sites", 0)
    return (f"fxlens graph{after}: {G.graph.get('title') or 'model'} -- "
            f"{G.number_of_nodes()} {'modules' if G.graph['level'] == 'modules' else 'nodes'}, "
            f"{n_sites} hook sites")


def _by_section(G: nx.DiGraph) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n, d in sorted(G.nodes(data=True), key=_reading_order):
        out.setdefault(d["section"], []).append(n)
    # keep each group's nodes together, groups in order of their first node
    for section, ns in out.items():
        first = {}
        for n in ns:
            first.setdefault(G.nodes[n]["group"], len(first))
        ns.sort(key=lambda n: (first[G.nodes[n]["group"]], G.nodes[n]["rank"], G.nodes[n]["order"]))
    return out


def _notes(d: dict) -> str:
    notes = []
    if d["site"]:
        notes.append(f"site={d['site']}" + (f" (layout {d['layout'].partition(':')[0]})" if d["layout"] else ""))
    if d["sites"] and d["op"] != "module":
        notes.append("sites=" + ",".join(d["sites"]))
    if d["created_by"]:
        notes.append("created_by=" + (d["created_by"] if isinstance(d["created_by"], str)
                                      else ",".join(d["created_by"])))
    if d["changed_by"]:
        notes.append("changed_by=" + ",".join(d["changed_by"]))
    return "  ".join(notes)


def _op_line(n: str, d: dict) -> str:
    call = f"{d['target']}({d['args']})" if d["op"].startswith("call") else f"{d['op']} {d['target']}"
    value = f"{d['shape']} {d['dtype']}".strip()
    return f"  {n:32s} = {call:60s} : {value:28s} @{d['module'] or '-'}  {_notes(d)}".rstrip()


def _module_line(n: str, d: dict) -> str:
    cls = f" ({d['module_class']})" if d["module_class"] else ""
    out = [f"  {n}{cls}: {d['n_ops']} nodes -> {d['shape']} {d['dtype']}".rstrip()]
    out += [f"      {s:40s} {shape}".rstrip() for s, shape in zip(d["sites"], d["site_shapes"])]
    notes = _notes(d)
    if notes:
        out.append(f"      {notes}")
    return "\n".join(out)


def render_dot(G: nx.DiGraph) -> str:
    """Graphviz source with one cluster per section (and per module at the ops
    level). Written here rather than by networkx's DOT writers: those need pydot
    or pygraphviz, and neither draws clusters from node attributes."""
    ids = {n: f"n{i}" for i, n in enumerate(G.nodes)}
    out = ["digraph fxlens {", f"  label={_q(_headline(G))}; labelloc=t; rankdir=TB;",
           '  node [shape=box, fontname="Helvetica", fontsize=10]; edge [color="#888888"];']
    by_section = _by_section(G)
    for i, section in enumerate(sections(G)):
        out.append(f"  subgraph cluster_s{i} {{ label={_q(section)}; style=rounded; color=\"#4a6fa5\";")
        if G.graph["level"] == "modules":
            out += [f"    {ids[n]} [{_dot_attrs(n, G.nodes[n])}];" for n in by_section[section]]
        else:
            out += _dot_groups(G, by_section[section], ids, i)
        out.append("  }")
    out += [f"  {ids[u]} -> {ids[v]};" for u, v in G.edges]
    out.append("}")
    return "\n".join(out) + "\n"


def _dot_groups(G: nx.DiGraph, nodes: list[str], ids: dict, section: int) -> list[str]:
    out, groups = [], {}
    for n in nodes:
        groups.setdefault(G.nodes[n]["group"], []).append(n)
    for j, (group, ns) in enumerate(groups.items()):
        out.append(f"    subgraph cluster_s{section}_g{j} {{ label={_q(group)}; style=dashed; color=\"#999999\";")
        out += [f"      {ids[n]} [{_dot_attrs(n, G.nodes[n])}];" for n in ns]
        out.append("    }")
    return out


def _dot_attrs(n: str, d: dict) -> str:
    if d["op"] == "module":
        rows = [n, f"{d['n_ops']} nodes -> {d['shape']} {d['dtype']}"]
        rows += [f"{s} {shape}".strip() for s, shape in zip(d["sites"], d["site_shapes"])]
    else:
        rows = [n, d["target"] if d["op"] != "placeholder" else "input",
                f"{d['shape']} {d['dtype']}".strip(), f"@{d['module']}" if d["module"] else ""]
        rows += [d["site"]] + [f"site: {s}" for s in d["sites"]]
    rows += [f"by {x}" for x in ([d["created_by"]] if isinstance(d["created_by"], str) else d["created_by"])
             if x] + [f"changed by {x}" for x in d["changed_by"]]
    label = "\\l".join(_escape_dot(r) for r in rows if r) + "\\l"
    style = ', style=filled, fillcolor="#ffe08a"' if d["site"] else \
        (', style=filled, fillcolor="#fff4cc"' if d["sites"] else "")
    return f'label="{label}"{style}'


def _escape_dot(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _q(text: str) -> str:
    return f'"{_escape_dot(text)}"'


def render_svg(G: nx.DiGraph) -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise DumpError("SVG needs graphviz's `dot` program, which is not installed "
                        "(apt-get install graphviz); write .dot, .html or .txt instead")
    proc = subprocess.run([dot, "-Tsvg"], input=render_dot(G), capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no message"])[0]
        raise DumpError(f"graphviz `dot` failed on the graph: {first}; write .dot or .html instead")
    return proc.stdout


def node_link(G: nx.DiGraph) -> dict:
    return nx.node_link_data(G, edges="edges")


def render_json(G: nx.DiGraph) -> str:
    return json.dumps(node_link(G), indent=1) + "\n"


def render_html(G: nx.DiGraph) -> str:
    """One page, no network: data, style and script inline. Its tree is the
    collapsed view (sections -> modules, with their sites); a module expands to
    its ops. `page.html#search=NAME` opens with that search done."""
    data = {"graph": node_link(G), "tree": _tree(G)}
    text = json.dumps(data, separators=(",", ":"))
    text = text.replace("</", "<\\/")  # a '</script>' inside a string must not end the tag
    return _PAGE.replace("{{TITLE}}", html.escape(_headline(G))).replace("{{DATA}}", text)


def _tree(G: nx.DiGraph) -> list[dict]:
    """[{section, groups: [{group, cls, ids, sites}]}] in execution order."""
    by_section = _by_section(G)
    tree = []
    for section in sections(G):
        groups: dict[str, list[str]] = {}
        for n in by_section[section]:
            groups.setdefault(G.nodes[n]["group"], []).append(n)
        tree.append({"section": section, "groups": [
            {"group": g, "cls": _class_of([G.nodes[n] for n in ns]), "ids": ns,
             "sites": canonical_order(G.nodes[n]["site"] for n in ns if G.nodes[n]["site"])}
            for g, ns in groups.items()]})
    return tree


def render_model_explorer(G: nx.DiGraph) -> str:
    render = explorer.render_model_explorer   # the optional extra (model_explorer) is imported on use
    return render(G)


RENDERERS = {"txt": render_text, "dot": render_dot, "svg": render_svg, "json": render_json,
             "html": render_html, "model-explorer": render_model_explorer}


# --- files -----------------------------------------------------------------------------

def format_of(path: str | Path, fmt: str | None = None) -> str:
    """The format asked for, or the one the file's suffix names."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DumpError(f"unknown dump format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in SUFFIXES:
        raise DumpError(f"cannot tell the dump format of {str(path)!r} from its suffix; name the file "
                        f"{', '.join('.' + f for f in SUFFIXES)} or pass --format")
    return suffix


def check_writable(path: str | Path) -> Path:
    """Fail before the slow work, not after it, when the output cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DumpError(f"cannot write {str(path)!r}: it is a directory; name a file")
    if not parent.is_dir():
        raise DumpError(f"cannot write {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise DumpError(f"cannot write {str(path)!r}: permission denied")
    return path


def write_text(path: str | Path, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise DumpError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc


def render(gm_or_graph, fmt: str, level: str = "ops", title: str = "", pass_name: str | None = None) -> str:
    """One format of a GraphModule (or of a graph already built by to_networkx).
    HTML and Model Explorer always hold the ops: their namespaces are the collapsed view."""
    if level not in LEVELS:
        raise DumpError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    G = gm_or_graph if isinstance(gm_or_graph, nx.DiGraph) else to_networkx(gm_or_graph, title, pass_name)
    if level == "modules" and fmt not in ("html", "model-explorer"):
        G = collapse(G)
    return RENDERERS[fmt](G)


def dump(gm: fx.GraphModule, path: str | Path, fmt: str | None = None, level: str = "ops",
         title: str = "", pass_name: str | None = None) -> Path:
    """Write `gm` to `path` in the format its suffix (or `fmt`) names."""
    fmt = format_of(path, fmt)
    path = check_writable(path)
    write_text(path, render(gm, fmt, level, title, pass_name))
    return path


def per_pass_path(path: str | Path, index: int, pass_name: str) -> Path:
    """graph.html -> graph.01-expose_norms.html"""
    path = Path(path)
    return path.with_name(f"{path.stem}.{index:02d}-{pass_name}{path.suffix}")


class PerPassDumper:
    """An `on_pass` callback that writes the graph after each pass, numbered in
    pipeline order, for debugging the compiler."""

    def __init__(self, path: str | Path, fmt: str | None = None, level: str = "ops", title: str = ""):
        self.path, self.fmt, self.level, self.title = Path(path), format_of(path, fmt), level, title
        self.written: list[Path] = []

    def __call__(self, pass_name: str, gm: fx.GraphModule, result) -> None:
        # the graph keeps changing after this call: render it now
        out = per_pass_path(self.path, len(self.written) + 1, pass_name)
        write_text(out, render(gm, self.fmt, self.level, self.title, pass_name))
        self.written.append(out)


# The page: plain HTML, CSS and JavaScript with the graph inlined, so it opens
# from disk with no network. Op rows are built when a module is opened: a real
# model has thousands of nodes.
_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{TITLE}}</title>
<style>
/* a fixed-height app: the tree and the side panel scroll on their own, the header stays */
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#222;height:100vh;display:flex;flex-direction:column}
header{flex:0 0 auto;background:#f4f6fa;border-bottom:1px solid #ccd;padding:6px 12px}
header h1{font-size:15px;margin:0 0 4px}
#search{width:420px;font:13px monospace;padding:3px 6px}
#count{margin-left:8px;color:#555}
button{font-size:12px;margin-left:6px}
main{flex:1 1 auto;display:flex;min-height:0}
#tree{flex:1 1 60%;padding:6px 12px;min-width:0;overflow:auto}
aside{flex:0 0 38%;overflow:auto;border-left:1px solid #ccd;padding:6px 12px}
details{margin:1px 0}
details.section>summary{font-weight:600;padding:2px 0}
details.group{margin-left:18px}
details.group>summary{font-weight:400}
.meta,.cls{color:#777;font-size:12px}
.hooks{color:#8a5a00;font:11px monospace}
.ops{margin-left:22px;font:12px monospace}
.op{padding:1px 4px;cursor:pointer;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.op:hover{background:#eef}
.op.hook{background:#fff0c0}
.op.found{background:#fff8e0}
.op.selected{outline:2px solid #d04000;background:#ffd8c0}
.op .shape{color:#06c}.op .site{color:#8a5a00;font-weight:600}.op .by{color:#080}
#results ol{padding-left:20px;margin:4px 0}
.result{cursor:pointer;font:12px monospace;margin:2px 0}
.result:hover{background:#eef}
.result .shape{color:#06c}.result .module{color:#777}
#details dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;font:12px monospace}
#details dt{color:#555}#details dd{margin:0;word-break:break-all}
a.node{color:#06c;cursor:pointer;margin-right:6px}
</style></head>
<body>
<header><h1>{{TITLE}}</h1>
<input id="search" type="search" placeholder="search a hook name, node or module (e.g. blocks.1.attn.hook_pattern)" autofocus>
<span id="count"></span>
<button id="expand">expand all</button><button id="collapse">collapse all</button>
</header>
<main><nav id="tree"></nav>
<aside><section id="results"></section><section id="details"><p class="meta">Open a block, then a module, to see its ops;
click an op or search a hook name to see its shape, module path and the pass that made it.</p></section></aside></main>
<script id="graph-data" type="application/json">{{DATA}}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("graph-data").textContent);
const NODES = new Map(DATA.graph.nodes.map(n => [n.id, n]));
const INPUTS = new Map(), USERS = new Map();
for (const e of DATA.graph.edges) {
  (USERS.get(e.source) || USERS.set(e.source, []).get(e.source)).push(e.target);
  (INPUTS.get(e.target) || INPUTS.set(e.target, []).get(e.target)).push(e.source);
}
const GROUP_EL = new Map();   // "section|group" -> its <details>
const ROW_EL = new Map();     // node id -> its row, once built

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}
const short = (name, prefix) => name.startsWith(prefix + ".") ? name.slice(prefix.length + 1) : name;

function buildTree() {
  const tree = document.getElementById("tree");
  for (const sec of DATA.tree) {
    const nOps = sec.groups.reduce((a, g) => a + g.ids.length, 0);
    const nSites = sec.groups.reduce((a, g) => a + g.sites.length, 0);
    const s = el("details", {class: "section", "data-section": sec.section},
      el("summary", {}, el("b", {}, sec.section), " ",
        el("span", {class: "meta"}, `${sec.groups.length} modules · ${nOps} nodes · ${nSites} sites`)));
    for (const g of sec.groups) {
      const d = el("details", {class: "group", "data-group": g.group},
        el("summary", {}, el("b", {}, g.group), " ", el("span", {class: "cls"}, g.cls), " ",
          el("span", {class: "meta"}, `${g.ids.length} nodes`), " ",
          el("span", {class: "hooks"}, g.sites.map(x => short(x, sec.section)).join(" "))));
      d.fxIds = g.ids;
      d.addEventListener("toggle", () => { if (d.open) buildRows(d); });
      GROUP_EL.set(sec.section + "|" + g.group, d);
      s.append(d);
    }
    tree.append(s);
  }
}

function buildRows(d) {
  if (d.fxBuilt) return;
  d.fxBuilt = true;
  const box = el("div", {class: "ops"});
  for (const id of d.fxIds) {
    const n = NODES.get(id);
    const cls = "op" + (n.site ? " hook" : n.sites.length ? " found" : "");
    // the site first: long calls are cut at the right edge
    const row = el("div", {class: cls, "data-id": id, "data-site": n.site || "", title: n.module},
      n.site ? el("span", {class: "site"}, n.site + " ") : null,
      n.sites.length ? el("span", {class: "site"}, "[sites: " + n.sites.join(", ") + "] ") : null,
      el("span", {class: "shape"}, `${n.shape} ${n.dtype}`), " ",
      n.created_by ? el("span", {class: "by"}, "by " + n.created_by + " ") : null,
      n.changed_by.length ? el("span", {class: "by"}, "changed by " + n.changed_by.join(", ") + " ") : null,
      id, " = ", n.op.startsWith("call") ? `${n.target}(${n.args})` : `${n.op} ${n.target}`);
    row.addEventListener("click", () => select(id));
    ROW_EL.set(id, row);
    box.append(row);
  }
  d.append(box);
}

function nodeLinks(ids) {
  const span = el("span", {});
  for (const id of ids || []) {
    const a = el("a", {class: "node", "data-goto": id}, NODES.get(id).site || id);
    a.addEventListener("click", () => select(id));
    span.append(a);
  }
  return span;
}

function select(id) {
  const n = NODES.get(id);
  if (!n) return;
  // reveal: open the section and the module, build the rows, mark the row
  const g = GROUP_EL.get(n.section + "|" + n.group);
  g.parentElement.open = true; g.open = true; buildRows(g);
  document.querySelectorAll(".op.selected").forEach(r => r.classList.remove("selected"));
  const row = ROW_EL.get(id);
  row.classList.add("selected");
  row.scrollIntoView({block: "center"});
  const rows = [
    ["node", id], ["site", n.site], ["sites found here", n.sites.join(", ")], ["op", n.op],
    ["target", n.target], ["args", n.args], ["shape", n.shape], ["dtype", n.dtype],
    ["hook layout", n.layout], ["module path", n.module], ["module class", n.module_class],
    ["section", n.section], ["created by", n.created_by], ["changed by", n.changed_by.join(", ")]];
  const dl = el("dl", {});
  for (const [k, v] of rows) if (v) dl.append(el("dt", {}, k), el("dd", {"data-key": k}, v));
  dl.append(el("dt", {}, "inputs"), el("dd", {"data-key": "inputs"}, nodeLinks(INPUTS.get(id))));
  dl.append(el("dt", {}, "users"), el("dd", {"data-key": "users"}, nodeLinks(USERS.get(id))));
  const box = document.getElementById("details");
  box.replaceChildren(el("h3", {}, n.site || id), dl);
  box.setAttribute("data-id", id);
  box.setAttribute("data-site", n.site || "");
}

// Rank: the hook of that exact name, then hooks containing the text, then
// nodes whose name, module or target contain it.
function search(q) {
  q = q.trim().toLowerCase();
  const box = document.getElementById("results");
  const count = document.getElementById("count");
  if (!q) { box.replaceChildren(); count.textContent = ""; return; }
  const hits = [];
  for (const n of NODES.values()) {
    const site = (n.site || "").toLowerCase();
    let rank = site === q ? 0 : site.includes(q) ? 1 : n.sites.some(s => s.toLowerCase().includes(q)) ? 2 :
      (n.id.toLowerCase().includes(q) || n.module.toLowerCase().includes(q) ||
       n.target.toLowerCase().includes(q)) ? 3 : -1;
    if (rank >= 0) hits.push([rank, n.order, n]);
  }
  hits.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  count.textContent = `${hits.length} match${hits.length === 1 ? "" : "es"}`;
  const ol = el("ol", {});
  for (const [, , n] of hits.slice(0, 200)) {
    const li = el("li", {class: "result", "data-id": n.id, "data-site": n.site || ""},
      el("b", {}, n.site || n.id), " ", el("span", {class: "shape"}, n.shape), " ",
      el("span", {class: "module"}, n.module));
    li.addEventListener("click", () => select(n.id));
    ol.append(li);
  }
  box.replaceChildren(el("h3", {}, "search results"), ol);
  if (hits.length && (hits[0][0] === 0 || hits.length === 1)) select(hits[0][2].id);
}

function fromHash() {
  const m = /(?:^#|&)search=([^&]*)/.exec(location.hash);
  if (m) {
    const q = decodeURIComponent(m[1]);
    document.getElementById("search").value = q;
    search(q);
  }
}

buildTree();
const input = document.getElementById("search");
input.addEventListener("input", () => {
  search(input.value);
  history.replaceState(null, "", "#search=" + encodeURIComponent(input.value));
});
document.getElementById("expand").addEventListener("click", () =>
  document.querySelectorAll("details").forEach(d => { d.open = true; if (d.fxIds) buildRows(d); }));
document.getElementById("collapse").addEventListener("click", () =>
  document.querySelectorAll("details").forEach(d => { d.open = false; }));
window.addEventListener("hashchange", fromHash);
fromHash();
</script>
</body></html>
"""
