"""The layout's import rules (README "Layout"): no import cycle between our modules, also
through imports inside functions; libraries never import a top-level script or demo/; trainers/
do not import datasets_scripts/; modeling_clipcap/ (the remote code) imports nothing of ours;
common/ (the small helpers) is the lowest layer: it imports nothing of ours either; publishing/
imports only common/, metrics/, modeling_clipcap/ and evaluation/.

Imports are read from the source (ast), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("common", "modeling_clipcap", "trainers", "metrics", "evaluation", "datasets_scripts", "publishing")
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in LIBRARIES:
        for f in (ROOT / pkg).rglob("*.py"):
            if f.is_symlink():  # files vendored into metric module folders: counted once, at their home
                continue
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `path` (module `name`) imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            out.update(f"{base}.{a.name}" for a in node.names)
            out.add(base)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target in _imports(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_our_modules():
    assert _cycles(_graph()) == []


def test_imports_point_one_way():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        top = {i.split(".")[0] for i in _imports(name, path)}
        pkg = name.split(".")[0]
        if top & (SCRIPTS | {"demo"}) - {pkg}:
            bad.append(f"{name} imports {sorted(top & (SCRIPTS | {'demo'}))}")
        if pkg == "trainers" and "datasets_scripts" in top:
            bad.append(f"{name} imports datasets_scripts")
        if pkg in ("common", "modeling_clipcap") and top & (set(LIBRARIES) - {pkg}):
            bad.append(f"{name} imports {sorted(top & set(LIBRARIES))}")
        if pkg == "publishing" and top & {"trainers", "datasets_scripts"}:
            bad.append(f"{name} imports {sorted(top & {'trainers', 'datasets_scripts'})}")
    assert bad == []


def test_the_model_does_not_import_its_pipeline():
    graph = _graph()
    assert "modeling_clipcap.pipeline_clipcap" not in graph["modeling_clipcap.modeling_clipcap"]
    assert "modeling_clipcap.pipeline_clipcap" in graph["modeling_clipcap"]  # the package registers it
