"""The package's import structure (issue 18), read from the source (ASTs, no imports):
one direction of dependencies between the layers, no private name imported from
another module, no fxlens import inside a function (the way cycles get dodged), and
no module reaching back into the package `__init__` (which only re-exports)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first; a module may import from its own layer (without a cycle) or a lower one.
LAYERS = ("fxlens.errors", "fxlens.ir", "fxlens.discovery", "fxlens.passes", "fxlens.frontend",
          "fxlens.pipeline", "fxlens.interp", "fxlens.runtime", "fxlens.api", "fxlens.tools",
          "fxlens.__main__")


def package_sources() -> dict[str, str]:
    """module name -> source, for fxlens/ and the top-level passes/ (installed as fxlens.passes)."""
    out = {}
    for folder, prefix in ((ROOT / "fxlens", "fxlens"), (ROOT / "passes", "fxlens.passes")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path.read_text()
    return out


def layer(module: str) -> int | None:
    if module == "fxlens":
        return len(LAYERS)          # the package __init__: above everything
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def imports(name: str, source: str, is_package: bool):
    """(target module, imported names, line, at module level) of each fxlens import."""
    tree = ast.parse(source)
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fxlens":
                    yield alias.name, [], node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] == "fxlens":
                yield module, [a.name for a in node.names], node.lineno, id(node) in top


def violations(sources: dict[str, str]) -> list[str]:
    known = set(sources)
    packages = {m for m in known if any(o.startswith(m + ".") for o in known)} | {"fxlens"}
    found, edges = [], {}
    for name, source in sorted(sources.items()):
        for target, names, line, at_top in imports(name, source, name in packages):
            where = f"{name}:{line}"
            # `from pkg import submodule` imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            targets = subs if subs and len(subs) == len(names) else [target]
            if not at_top:
                found.append(f"{where}: function-level import of {target} (move the code to its layer)")
            if target == "fxlens" and not subs and name != "fxlens":
                found.append(f"{where}: imports the package __init__ (import from the module that defines it)")
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    found.append(f"{where}: imports the private {target}.{n}")
            for t in targets:
                if t.rsplit(".", 1)[-1].startswith("_") and not t.endswith("__"):
                    found.append(f"{where}: imports the private module {t}")
                lo, hi = layer(t), layer(name)
                if lo is not None and hi is not None and lo > hi and name != "fxlens":
                    found.append(f"{where}: {name} ({LAYERS[hi]}) imports {t}, a higher layer")
                if at_top and t != name:
                    edges.setdefault(name, set()).add(t)
    # cycles among module-level imports (within a layer; across layers the order forbids them)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                found.append("import cycle: " + " -> ".join(path[path.index(t):] + [t]) if t in path
                             else f"import cycle through {t}")
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def test_the_package_imports_in_one_direction():
    sources = package_sources()
    assert {"fxlens", "fxlens.api", "fxlens.passes", "fxlens.runtime.model"} <= set(sources)
    assert all(layer(m) is not None for m in sources if m != "fxlens"), \
        sorted(m for m in sources if layer(m) is None)
    assert violations(sources) == []


def test_the_check_fails_on_each_kind_of_bad_import():
    bad = {
        "fxlens": "from fxlens.api import from_pretrained\n",
        "fxlens.api": "",
        "fxlens.ir": "",
        "fxlens.ir.graph": "from fxlens.runtime.model import HookedModel\n",               # upward
        "fxlens.runtime": "",
        "fxlens.runtime.model": "def f():\n    from fxlens.ir import graph\n",           # in a function
        "fxlens.interp": "",
        "fxlens.interp.cache": "import fxlens\n",                                        # the package __init__
        "fxlens.interp.weights": "from fxlens.discovery.decoder import _Sites\n",         # private name
        "fxlens.discovery": "",
        "fxlens.discovery.decoder": "from .names import x\n",
        "fxlens.discovery.names": "from fxlens.discovery import decoder\n",              # cycle
    }
    found = violations(bad)
    assert any("fxlens.ir.graph:1" in v and "higher layer" in v for v in found), found
    assert any("fxlens.runtime.model:2" in v and "function-level" in v for v in found), found
    assert any("fxlens.interp.cache:1" in v and "package __init__" in v for v in found), found
    assert any("fxlens.interp.weights:1" in v and "private" in v for v in found), found
    assert any(v.startswith("import cycle") and "fxlens.discovery.names" in v for v in found), found
    assert not any(v.startswith("fxlens:") or v.startswith("fxlens.api") for v in found), found


def test_processing_defaults_are_said_once():
    """fxlens.from_pretrained's flag defaults are the ones HookedModel.from_pretrained applies."""
    from fxlens.api import from_pretrained
    from fxlens.runtime.build import DEFAULT_FLAGS

    params = inspect.signature(from_pretrained).parameters
    assert {f: params[f].default for f in DEFAULT_FLAGS} == DEFAULT_FLAGS
