"""The packages' layers, read from the code's own imports (every `import` and `from ... import`, inside
functions too, parsed with `ast`; nothing is imported). A package's face (distill/faces.py) counts as
importing the modules its EXPORTS table names. The rules (docs/architecture.md):

    data      imports none of teachers, student, distill, flows
    student   imports none of teachers, distill, flows
    teachers  imports neither distill nor flows
    distill   does not import teachers
    flows     may import everything; bench/ and tests/ are outside the rules

and no two modules import each other, directly or round a longer circle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "student", "teachers", "distill", "flows")
FORBIDDEN = {"data": {"teachers", "student", "distill", "flows"},
             "student": {"teachers", "distill", "flows"},
             "teachers": {"distill", "flows"},
             "distill": {"teachers"},
             "flows": set()}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports: `from pkg import sub` is pkg.sub when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "EXPORTS" for t in node.targets):
            out |= {f"{name}.{k.value}" for k in node.value.keys}  # a face's table of its modules
    return {m for m in out if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(name, path, known) for name, path in found.items()}


def test_the_graph_is_read():
    found = modules()
    assert {"distill.losses.language", "distill.config.load", "data.teacher_config", "flows.cli"} <= set(found)
    g = {name: imported(name, path, set(found)) for name, path in found.items()}
    assert "distill.losses.targets" in g["distill.losses.language"]
    assert "distill.losses.language" in g["distill.losses"]  # through the face's table


def test_no_layer_imports_one_above_it(graph):
    wrong = {f"{a} -> {b}" for a, targets in graph.items() for b in targets
             if b.split(".")[0] in FORBIDDEN[a.split(".")[0]]}
    assert sorted(wrong) == []


def test_no_circle(graph):
    """Tarjan's strongly connected components: any with two or more modules is a circle."""
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []
