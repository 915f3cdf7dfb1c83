"""Graph dumps: every format names every hook, JSON round-trips through
networkx, and the HTML page's search works in a real (headless) browser."""

import base64
import json
import os
import re
import shutil
import subprocess

import networkx as nx
import pytest
import torch

import fxlens
from conftest import DATA, oracle_model
from fxlens.tools import dump

ARTIFACTS = DATA.parent / "artifacts"   # gitignored; CI keeps the screenshot
CHROMIUM = "/usr/bin/chromium"
# headless, offline, and a fresh profile each run (--user-data-dir is added per call)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,900"]
SEARCH = "blocks.1.attn.hook_pattern"


@pytest.fixture(scope="module")
def gpt2():
    return oracle_model("gpt2")


@pytest.fixture(scope="module")
def graph(gpt2):
    return dump.to_networkx(gpt2.graph_module, "gpt2")


def names_in(text: str, names) -> set:
    """The hook names that appear whole in `text` (not inside a longer name
    such as the node `fxlens_hooks_hook_embed`)."""
    return {n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", text)}


def need_tool(path: str | None, what: str) -> str:
    """CI installs the tool (.ci/run), so there it must be present; elsewhere skip."""
    if path and os.path.exists(path):
        return path
    message = f"{what} is not installed; `bash .ci/run` (or apt-get install) provides it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.parametrize("level", dump.LEVELS)
@pytest.mark.parametrize("fmt", dump.FORMATS)
def test_every_format_names_every_hook(gpt2, graph, fmt, level):
    if fmt == "svg":
        need_tool(shutil.which("dot"), "graphviz (`dot`)")
    text = dump.render(graph, fmt, level)
    if fmt == "dot":
        text = text.replace("\\l", "\n")   # graphviz's left-justified line break
    assert names_in(text, gpt2.hook_names) == set(gpt2.hook_names)


def test_json_loads_back_into_networkx(gpt2, graph):
    data = json.loads(dump.render(graph, "json"))
    G = nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
    fx_graph = gpt2.graph_module.graph
    assert G.number_of_nodes() == len(fx_graph.nodes)
    assert G.number_of_edges() == len({(i, n) for n in fx_graph.nodes for i in n.all_input_nodes})
    sites = {d["site"]: d for _, d in G.nodes(data=True) if d["site"]}
    assert set(sites) == set(gpt2.hook_names)


def test_collapsed_view_is_one_node_per_module(graph):
    Q = dump.collapse(graph)
    assert "transformer.h.1.attn" in Q and "transformer.h.1.mlp" in Q
    attn = Q.nodes["transformer.h.1.attn"]
    assert attn["section"] == "blocks.1" and attn["module_class"] == "GPT2Attention"
    assert SEARCH in attn["sites"]
    assert attn["site_shapes"][attn["sites"].index(SEARCH)] == "[batch, 4, pos, pos]"
    # every op lands in exactly one module, and the modules keep the dataflow
    assert sum(d["n_ops"] for _, d in Q.nodes(data=True)) == graph.number_of_nodes()
    assert Q.has_edge("transformer.h.1.ln_1", "transformer.h.1.attn")


def test_nodes_carry_op_shape_module_site_and_pass(graph):
    hook = next(d for _, d in graph.nodes(data=True) if d["site"] == SEARCH)
    assert (hook["op"], hook["target"], hook["created_by"]) == ("call_module", "HookPoint", "insert_hooks")
    assert (hook["shape"], hook["dtype"], hook["module"]) == ("[batch, 4, pos, pos]", "float32",
                                                              "transformer.h.1.attn")
    found = next(d for _, d in graph.nodes(data=True) if SEARCH in d["sites"])
    assert found["target"] == "aten.softmax.int" and found["created_by"] == ""
    scale = next(d for _, d in graph.nodes(data=True) if "blocks.0.ln1.hook_scale" in d["sites"])
    assert scale["created_by"] == "expose_norms" and scale["module"] == "transformer.h.0.ln_1"
    param = graph.nodes["transformer_h_0_attn_c_attn_weight"]
    assert (param["op"], param["shape"], param["module"]) == ("get_attr", "[64, 192]",
                                                              "transformer.h.0.attn.c_attn")


def test_changed_parameters_show_the_pass(gpt2, monkeypatch):
    node = next(n for n in gpt2.graph_module.graph.nodes if n.op == "get_attr")
    monkeypatch.setitem(node.meta, "fxlens.changed_by", ["fold_ln", "center_writing_weights"])
    text = dump.render(gpt2.graph_module, "txt")
    line = next(x for x in text.splitlines() if x.strip().startswith(node.name + " "))
    assert "changed_by=fold_ln,center_writing_weights" in line


def test_processed_model_dump_names_the_weight_passes():
    model = fxlens.from_pretrained(DATA / "models" / "gpt2")
    G = dump.to_networkx(model.graph_module)
    changed = {p for _, d in G.nodes(data=True) for p in d["changed_by"]}
    assert "fold_ln" in changed
    text = dump.render(G, "txt")
    assert re.search(r"c_attn\.weight .*changed_by=.*fold_ln", text)


def test_svg_without_graphviz_says_how_to_get_it(graph, monkeypatch):
    monkeypatch.setattr(dump.shutil, "which", lambda name: None)
    with pytest.raises(dump.DumpError, match="graphviz.*apt-get install graphviz"):
        dump.render(graph, "svg")


def test_format_from_suffix_or_flag(tmp_path):
    assert dump.format_of("g.HTML") == "html"
    assert dump.format_of("g.out", "dot") == "dot"
    with pytest.raises(dump.DumpError, match="suffix"):
        dump.format_of("g.png")
    with pytest.raises(dump.DumpError, match="does not exist"):
        dump.check_writable(tmp_path / "missing" / "g.txt")
    with pytest.raises(dump.DumpError, match="cannot write"):
        dump.write_text(tmp_path / "missing" / "g.txt", "")


def test_html_page_is_self_contained(graph):
    page = dump.render(graph, "html")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)


def _chromium(args: list[str], tmp_path, name: str) -> subprocess.CompletedProcess:
    exe = need_tool(shutil.which("chromium") or CHROMIUM, "Chromium")
    profile = tmp_path / f"profile-{name}"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_html_search_finds_a_hook_in_headless_chromium(graph, tmp_path):
    page = tmp_path / "gpt2.html"
    page.write_text(dump.render(graph, "html"))
    # the page runs the search named in its URL, as typing it in the box does
    url = f"{page.as_uri()}#search={SEARCH}"
    dom = _chromium(["--dump-dom", url], tmp_path, "dom").stdout
    hook_id, hook = next((n, d) for n, d in graph.nodes(data=True) if d["site"] == SEARCH)

    results = re.search(r'<section id="results">(.*?)</section>', dom, re.S)
    assert results, f"no search results in the rendered page:\n{dom[:2000]}"
    first = re.search(r'<li class="result" data-id="([^"]+)" data-site="([^"]*)"', results.group(1))
    assert first.groups() == (hook_id, SEARCH)

    details = re.search(r'<section id="details"([^>]*)>(.*?)</section>', dom, re.S)
    assert f'data-site="{SEARCH}"' in details.group(1)
    assert f'<dd data-key="shape">{hook["shape"]}</dd>' in details.group(2)
    assert '<dd data-key="module path">transformer.h.1.attn</dd>' in details.group(2)
    # the tree opened blocks.1 and its attention and marked the hook's row
    assert re.search(rf'<div class="op hook selected" data-id="{hook_id}"', dom)
    assert re.search(r'<details class="section" data-section="blocks.1" open="">', dom)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dump_html_search.png"
    shot.unlink(missing_ok=True)
    _chromium([f"--screenshot={shot}", url], tmp_path, "shot")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_explorer_json_loads_with_its_own_classes(gpt2, graph):
    """`--format model-explorer`: the JSON reads back into Model Explorer's
    graph_builder dataclasses (dacite, strict: no unknown field), every hook is
    a node in its TransformerLens namespace, every edge names a node."""
    import dacite                      # Model Explorer's own dependency
    from model_explorer import graph_builder as gb
    data = json.loads(dump.render(graph, "model-explorer"))
    (g,) = [dacite.from_dict(gb.Graph, d, config=dacite.Config(strict=True)) for d in data["graphs"]]
    by_id = {n.id: n for n in g.nodes}
    assert len(by_id) == len(g.nodes) == len(gpt2.graph_module.graph.nodes)
    hooks = {n.label: n for n in g.nodes if any(a.key == "site" for a in n.attrs)}
    assert set(hooks) == set(gpt2.hook_names)
    assert hooks[SEARCH].namespace == "blocks.1/attn"
    assert hooks["blocks.1.hook_resid_mid"].namespace == "blocks.1"
    assert hooks["ln_final.hook_scale"].namespace == "ln_final"
    # the ops around a hook share its module's namespace; the HF path rides along
    pattern = hooks[SEARCH]
    attrs = {a.key: a.value for a in pattern.attrs}
    assert attrs["hf_module"] == "transformer.h.1.attn" and attrs["created_by"] == "insert_hooks"
    assert {a.key: a.value for a in pattern.outputsMetadata[0].attrs} == {
        "shape": "[batch, 4, pos, pos]", "dtype": "float32"}
    producer = by_id[pattern.incomingEdges[0].sourceNodeId]
    assert producer.namespace == "blocks.1/attn"
    edges = [(e.sourceNodeId, n.id) for n in g.nodes for e in n.incomingEdges]
    assert all(u in by_id for u, _ in edges)
    assert len(edges) == graph.number_of_edges()


@pytest.fixture(scope="module")
def explore(gpt2):
    """One `fxlens explore MODEL --prompt` server for the module's tests: (port, the
    page's URL it prints, which names the graph and node data to open)."""
    import sys

    import portpicker
    port = portpicker.pick_unused_port()
    model_dir = DATA / "models" / "gpt2"
    proc = subprocess.Popen([sys.executable, "-m", "fxlens", "explore", str(model_dir), "--prompt", "Hello world",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = ""
        for line in proc.stdout:         # the server prints its URL once it answers
            seen += line
            if "Press Ctrl+C" in line:
                break
        assert f"http://127.0.0.1:{port}/" in seen, seen[-2000:]
        page = re.search(rf"^(http://127\.0\.0\.1:{port}/\?data=\S+)$", seen, re.M)
        assert page, seen[-2000:]
        yield port, page.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _explore_norms(gpt2) -> dict[str, float]:
    from fxlens.tools.explorer import finite_norm
    _, cache = gpt2.run_with_cache(gpt2.to_tokens("Hello world"))
    return {name: finite_norm(act) for name, act in cache.items()}


def test_explore_serves_the_graph_with_activation_norms(gpt2, explore):
    """`fxlens explore MODEL --prompt`: Model Explorer's server on 127.0.0.1 sends
    the graph (every hook a node) and node data = each site's activation norm,
    as one run_with_cache computes it, in JSON a browser parses (no Infinity:
    the -inf of masked scores are left out of the norm)."""
    import urllib.request
    port, _ = explore

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return json.loads(r.read())
    (g,) = get("/api/v1/load_graphs_json?graph_index=0")["graphs"]
    hooks = {n["label"]: n["id"] for n in g["nodes"] if any(a["key"] == "site" for a in n["attrs"])}
    assert set(hooks) == set(gpt2.hook_names)
    content = get("/api/v1/load_node_data?node_data_index=0")["content"]
    data = json.loads(content, parse_constant=lambda c: pytest.fail(f"{c} in the node data: not JSON"))
    results = data[g["id"]]["results"]
    # the same weights and tokens in another process: float32 norms agree to rounding
    for name, norm in _explore_norms(gpt2).items():
        assert results[hooks[name]]["value"] == pytest.approx(norm, rel=1e-5)
    scores = gpt2.run_with_cache(gpt2.to_tokens("Hello world"))[1]["blocks.0.attn.hook_attn_scores"]
    assert torch.isinf(scores).any() and results[hooks["blocks.0.attn.hook_attn_scores"]]["value"] > 0


# Model Explorer draws the graph with WebGL: software GL (SwiftShader) in headless Chromium
EXPLORER_FLAGS = [f for f in CHROMIUM_FLAGS if f != "--disable-gpu"] + [
    "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
# the pixels of a screenshot, decoded by the browser itself: how many, how many
# in the commonest colour (the background), how many distinct colours
_PIXELS = """(async (png) => {
  const img = new Image(); img.src = "data:image/png;base64," + png; await img.decode();
  const c = document.createElement("canvas"); c.width = img.width; c.height = img.height;
  const ctx = c.getContext("2d"); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, img.width, img.height).data, counts = new Map();
  for (let i = 0; i < d.length; i += 4) {
    const k = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2]; counts.set(k, (counts.get(k) || 0) + 1); }
  return {pixels: d.length / 4, background: Math.max(...counts.values()), colours: counts.size};
})"""
_RECT = "(() => {{ const r = document.querySelector({!r}).getBoundingClientRect(); " \
        "return {{x: Math.round(r.x), y: Math.round(r.y), width: Math.round(r.width), height: Math.round(r.height)}}; }})()"
_INFO = "[...document.querySelectorAll('info-panel tr')].map(r => r.innerText.split('\\t').map(s => s.trim()))"


_SEARCH_LEAF = ("(() => { const tree = document.querySelector('search-bar .search-results-container');"
    " if (!tree) return null;"
    " const rows = [...tree.querySelectorAll('mat-tree-node')]"
    "   .map(n => n.innerText.split('\\n').map(s => s.trim()));"
    " const leaf = [...tree.querySelectorAll('mat-tree-node.leaf')]"
    f"   .find(n => n.innerText.split('\\n')[0].trim() == {json.dumps(SEARCH)});"
    " if (!leaf) return null; const r = leaf.getBoundingClientRect();"
    " return {rows, x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")


def test_explore_page_draws_the_graph_and_finds_a_hook_in_headless_chromium(gpt2, explore, tmp_path):
    """The page `fxlens explore` serves, in headless Chromium driven over the DevTools
    protocol (tests/cdp.py): once the info panel counts every node of the graph,
    typing a hook's name into Model Explorer's search box lists it under its
    TransformerLens namespace, selecting the result shows its site, HF module and
    activation norm, and the screenshot (tests/artifacts/explore_search.png) has the
    graph drawn on its canvas."""
    from cdp import Browser, CDPError
    exe = need_tool(shutil.which("chromium") or CHROMIUM, "Chromium")
    _, url = explore
    # 180 s a DevTools call: a SwiftShader screenshot took over 60 s on the loaded 2-core machine
    browser = Browser(exe, [*EXPLORER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"], tmp_path / "chromium.log",
                      timeout=180)
    try:
        browser.page("Page.enable")
        browser.page("Page.navigate", url=url)
        # loaded: the panel counts the graph's nodes once the page has processed it
        # ("Converting" and "Processing graph" come first)
        n_nodes = len(gpt2.graph_module.graph.nodes)
        browser.wait_for("[...document.querySelectorAll('info-panel tr')].some(r => "
                         f"r.innerText.replace(/\\s+/g, ' ').trim() == 'op node count {n_nodes}')",
                         120, "the graph's node count in the info panel")

        # search: type the name into the search box; the results list it by its label
        browser.evaluate("document.querySelector('search-bar input').focus()")
        browser.type_text(SEARCH)
        # the shared CI machine is slow and busy: waits are generous, never the pass criterion
        hit = browser.wait_for(_SEARCH_LEAF, 60, f"a search result named {SEARCH}")
        # the results are grouped by namespace: the hook's is <root> / blocks.1 / attn
        heads = [row[-1] for row in hit["rows"] if "/" in row[-1]]
        assert heads == ["<root> / blocks.1 / attn"], hit["rows"]

        # Alt+click locates and selects it: the info panel shows the hook node. A click that
        # lands while the results list is still laying out selects nothing, so it is retried
        # on the result's current position (a few times, then the failure is reported)
        info_rows = (f"(() => {{ const rows = {_INFO}; return rows.some(r => r[0] == 'op name' && r[1] == "
                     f"{json.dumps(SEARCH)}) && rows.some(r => r[0] == 'activation norm') ? rows : null; }})()")
        for attempt in range(4):
            browser.click(hit["x"], hit["y"], alt=True)
            try:
                rows = browser.wait_for(info_rows, 20, f"the info panel of {SEARCH}")
                break
            except CDPError:
                if attempt == 3:
                    raise
                hit = browser.wait_for(_SEARCH_LEAF, 60, f"a search result named {SEARCH}")
        info = dict(row[:2] for row in rows if len(row) >= 2)
        assert info["site"] == SEARCH and info["namespace"] == "blocks.1/attn"
        assert info["hf_module"] == "transformer.h.1.attn" and info["created_by"] == "insert_hooks"
        # the norm the page shows is the one run_with_cache gives here (float32 in another process)
        assert float(info["activation norm"]) == pytest.approx(_explore_norms(gpt2)[SEARCH], rel=1e-5)

        # the screenshot shows the graph drawn (WebGL): its canvas holds more than background
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "explore_search.png"
        shot.unlink(missing_ok=True)
        png = browser.save_screenshot(shot)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        canvas = browser.evaluate(_RECT.format("webgl-renderer canvas.main"))
        assert canvas["width"] > 300 and canvas["height"] > 300, canvas
        seen = browser.evaluate(f"{_PIXELS}({json.dumps(base64.b64encode(png).decode())}, {json.dumps(canvas)})")
        # a blank canvas is one colour; nodes, labels and edges give hundreds
        assert seen["colours"] > 50 and seen["pixels"] - seen["background"] > 0.02 * seen["pixels"], seen
    finally:
        browser.close()
