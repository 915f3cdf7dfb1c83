"""List TransformerLens's public HookedTransformer / HookedRootModule names.

Writes tests/data/transformerlens_public_names.txt, which tests/test_tl_surface.py
checks against HookedModel. Run once when the reference changes:

    python scripts/tl_public_names.py [--reference FILE] [--base hook_points.py]
                                      [--cache ActivationCache.py] [-o OUT]

`--reference`: the HookedTransformer source in ../shared/reference/ (a line-numbered
coverage listing: one definition per `NNN def name(` line). `--base`: TransformerLens's
transformer_lens/hook_points.py of the same release (v2.18.0's HookedTransformer
matches the reference method for method); its HookedRootModule is read with `ast`.
`--cache`: its transformer_lens/ActivationCache.py (class ActivationCache). Without
--base / --cache the names already in OUT for that class are kept.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (/work/shared for /work/main; a worktree passes --reference)
REFERENCE = ROOT.parent / "shared" / "reference" / "transformerlens_HookedTransformer_source.txt"
OUT = ROOT / "tests" / "data" / "transformerlens_public_names.txt"


def reference_names(path: Path, cls: str = "HookedTransformer") -> list[str]:
    """Public `def`s after `class <cls>` in the coverage listing (its indentation is
    lost, but the class's methods are the only defs after the class line)."""
    text = path.read_text().replace("\xa0", " ")
    lines = [re.sub(r"^\d+", "", line).strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"class {cls}("))
    names = []
    for line in lines[start:]:
        m = re.match(r"def (\w+)\(", line)
        if m and not m.group(1).startswith("_") and m.group(1) not in names:
            names.append(m.group(1))
    return names


def class_names(path: Path, cls: str) -> list[str]:
    """Public methods of `cls` in a Python source file."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return [n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not n.name.startswith("_")]


def read_out(path: Path) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                owner, name = line.split()
                owners.setdefault(owner, []).append(name)
    return owners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--base", type=Path, help="TransformerLens's transformer_lens/hook_points.py")
    ap.add_argument("--cache", type=Path, help="TransformerLens's transformer_lens/ActivationCache.py")
    ap.add_argument("-o", "--out", type=Path, default=OUT)
    args = ap.parse_args()
    kept = read_out(args.out)
    owners = {"HookedTransformer": reference_names(args.reference)}
    base = class_names(args.base, "HookedRootModule") if args.base else kept.get("HookedRootModule", [])
    owners["HookedRootModule"] = [n for n in base if n not in owners["HookedTransformer"]]
    owners["ActivationCache"] = class_names(args.cache, "ActivationCache") if args.cache else \
        kept.get("ActivationCache", [])
    lines = ["# TransformerLens's public methods and properties (scripts/tl_public_names.py):",
             "# HookedTransformer from ../shared/reference/; HookedRootModule and ActivationCache from",
             "# the same release's hook_points.py and ActivationCache.py (v2.18.0). One `owner name` per line."]
    lines += [f"{owner} {name}" for owner, names in owners.items() for name in names]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{args.out}: {sum(map(len, owners.values()))} names")


if __name__ == "__main__":
    main()
