"""The package's layers point one way.

Every ``import`` of every module in the package is parsed (function-level and ``TYPE_CHECKING``
imports too: a lazy import is still a dependency), mapped to the module it names, and checked:

    core         deltadiff/*.py            imports nothing else of ours (numpy, Pillow only)
    runtime      runtime/                  core
    model        model/                    core
    export       export/                   core, model, runtime
    calibration  calibration/              core, model, runtime, export
    benchmarks   benchmarks/               everything above
    cli          deltadiff/cli/            everything; imported by nothing in the package

and the module graph has no cycle. ``python tests/test_layers.py`` prints the layers, their
modules and the edges between layers.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package name -> folder, as pyproject.toml's package-dir maps them
FOLDERS = {
    "deltadiff": "deltadiff",
    "deltadiff.model": "model",
    "deltadiff.export": "export",
    "deltadiff.runtime": "runtime",
    "deltadiff.calibration": "calibration",
    "deltadiff.benchmarks": "benchmarks",
}
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "runtime": {"core"},
    "model": {"core"},
    "export": {"core", "model", "runtime"},
    "calibration": {"core", "model", "runtime", "export"},
    "benchmarks": {"core", "model", "runtime", "export", "calibration"},
    "cli": {"core", "model", "runtime", "export", "calibration", "benchmarks"},
}
ORDER = list(ALLOWED)


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, folder in FOLDERS.items():
        base = REPO / folder
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("").parts
            if pkg == "deltadiff" and rel[0] in {"model", "export", "runtime"}:
                continue
            out[".".join([pkg, *(p for p in rel if p != "__init__")])] = f
    return out


def layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return "core"


def imports(mod: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in ``path``."""
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = mod.split(".")[: len(mod.split(".")) - node.level + is_pkg]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:  # a name inside a module -> the module
                name = name.rpartition(".")[0]
            # a package's own __init__ is not a dependency of its submodules
            hit = (name, node.lineno)
            if name and name != mod and not mod.startswith(name + ".") and hit not in found:
                found.append(hit)
    return found


def graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    known = modules()
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    for mod, path in known.items():
        for target, line in imports(mod, path, known):
            edges[mod].setdefault(target, line)
    return known, edges


def upward_imports(known: dict[str, Path], edges: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for mod, targets in edges.items():
        for target, line in targets.items():
            a, b = layer(mod), layer(target)
            if a != b and b not in ALLOWED[a]:
                rel = known[mod].relative_to(REPO)
                bad.append(f"{rel}:{line}: {a} imports {b} ({target})")
    return sorted(bad)


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, {})))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def report() -> str:
    known, edges = graph()
    by_layer: dict[str, list[str]] = defaultdict(list)
    for mod in known:
        by_layer[layer(mod)].append(mod)
    between: dict[tuple[str, str], int] = defaultdict(int)
    for mod, targets in edges.items():
        for target in targets:
            if layer(mod) != layer(target):
                between[(layer(mod), layer(target))] += 1
    lines = []
    for name in ORDER:
        uses = ", ".join(f"{b} ({n})" for (a, b), n in sorted(between.items()) if a == name)
        lines.append(f"{name}: {len(by_layer[name])} modules; imports {uses or 'nothing of ours'}")
        lines += [f"    {m}" for m in sorted(by_layer[name])]
    return "\n".join(lines)


def test_every_module_is_in_a_layer() -> None:
    known = modules()
    assert {layer(m) for m in known} == set(ALLOWED)
    assert len(known) > 80  # the walk found the package, not an empty folder


def test_no_upward_import() -> None:
    known, edges = graph()
    bad = upward_imports(known, edges)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    _, edges = graph()
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_nothing_imports_the_cli() -> None:
    known, edges = graph()
    bad = [
        f"{m} imports {t}"
        for m, ts in edges.items()
        for t in ts
        if layer(t) == "cli" and layer(m) != "cli"
    ]
    assert not bad, bad


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The checker itself: an upward import inside a function and a two-module cycle."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from deltadiff.benchmarks.quality import evaluate\n")
    known = {"deltadiff.runtime.a": a, "deltadiff.benchmarks.quality": a}
    got = imports("deltadiff.runtime.a", a, known)
    assert got == [("deltadiff.benchmarks.quality", 2)]
    edges = {"deltadiff.runtime.a": {"deltadiff.benchmarks.quality": 2}}
    known = {"deltadiff.runtime.a": REPO / "runtime" / "a.py"}
    assert upward_imports(known, edges) == [
        "runtime/a.py:2: runtime imports benchmarks (deltadiff.benchmarks.quality)"
    ]
    assert cycles({"x": {"y": 1}, "y": {"x": 1}}) == [["x", "y"]]
    assert cycles({"x": {"y": 1}, "y": {}}) == []


if __name__ == "__main__":
    print(report())
    known, edges = graph()
    problems = upward_imports(known, edges) + [" <-> ".join(c) for c in cycles(edges)]
    print("\n".join(problems) or "no upward import, no cycle")
    sys.exit(1 if problems else 0)
