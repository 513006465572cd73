"""Dependencies between tandem's modules run one way: no two modules import each other,
directly or through others, at the top of the file or inside a function (a package's
__init__, which re-exports its modules, is left out)."""

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "python")


def _modules():
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "tandem")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _imports(name, path, modules):
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_tandem_imports_itself_through_others():
    modules = _modules()
    packages = {m for m, p in modules.items() if p.endswith("__init__.py")}
    graph = {m: _imports(m, p, modules) - packages for m, p in modules.items() if m not in packages}
    assert "tandem.pipeline.events" in graph["tandem.pipeline.lower"]  # the walk sees imports
    assert "tandem.cli.train_pipeline" in graph["tandem.cli.train_loop"]  # in functions too
    assert _cycles(graph) == []
