"""The import graph of the ``fusesteer`` package, read from the source with :mod:`ast` (nothing is imported):
no import cycle among its modules, no module over 700 lines, and ``fusesteer.bench`` never importing
``fusesteer.commands``.

Edges of the cycle check: **module-level imports only**, i.e. the ``import`` / ``from ... import`` statements
executed when the module itself is imported: at the top level and inside top-level ``if`` / ``try`` / ``with``
blocks and class bodies, but not inside a function (those run on a call, after every module is loaded) and not
under ``if TYPE_CHECKING:`` (never run). An edge goes to the module the statement names: ``import a.b`` and
``from a import b`` (``b`` a submodule) give ``a.b``; ``from a.b import name`` (``name`` not a submodule) gives
``a.b``, the module that must define it. Importing ``a.b`` also runs the package ``a``'s ``__init__`` first, but
that implied edge to a parent package is not counted: the parent is already in ``sys.modules`` (partly
initialised) by the time its submodules run, which is how every package whose ``__init__`` imports its
submodules works.

The bench check is stricter: no import of ``fusesteer.commands`` anywhere in ``fusesteer/bench/``, function
bodies included (the `fusesteer bench` verb calls into the suites, never the other way).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fusesteer"
MAX_LINES = 700


def _modules(pkg: Path = PKG) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under ``pkg`` (``__init__.py`` names its package)."""
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, module_level_only: bool):
    """The Import / ImportFrom nodes of ``tree``: all of them, or only those run at the module's import."""
    if not module_level_only:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))
            for name in ("handlers",):  # try/except handlers are not stmts themselves
                for h in getattr(node, name, ()):
                    todo.extend(h.body)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` statement starts from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(module_level_only: bool = True, pkg: Path = PKG) -> dict[str, set[str]]:
    """{module: the fusesteer modules it imports} (see the module docstring for what counts as an edge)."""
    mods = _modules(pkg)
    top = pkg.name
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node in _import_nodes(tree, module_level_only):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _resolve(mod, is_pkg, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                if t != mod and (t == top or t.startswith(top + ".")):
                    # the named module, or (a name inside a package not known here) its nearest known parent
                    while t not in mods and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t in mods and t != mod:
                        graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # iterative DFS: no recursion limit on deep graphs
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def test_graph_reader_sees_real_edges():
    """The reader is not vacuous: known module-level edges are there, function-level ones only on request."""
    g = import_graph()
    assert "fusesteer.bench" in g and "fusesteer.bench.common" in g
    assert "fusesteer.bench.options" in g["fusesteer.commands.bench"]  # module level
    assert "fusesteer.bench.interpreter" in g["fusesteer.bench.common"]  # `from .interpreter import ...`
    assert "fusesteer.bench.traffic" in g["fusesteer.bench.gpu_kernels"]  # `from . import traffic as TR`
    assert "fusesteer.bench.runner" not in g["fusesteer.commands.bench"]  # imported inside run()
    assert "fusesteer.bench.runner" in import_graph(module_level_only=False)["fusesteer.commands.bench"]


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_fusesteer():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles in fusesteer/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_bench_never_imports_commands():
    g = import_graph(module_level_only=False)
    bad = {m: sorted(t for t in ts if t == "fusesteer.commands" or t.startswith("fusesteer.commands."))
           for m, ts in g.items() if m == "fusesteer.bench" or m.startswith("fusesteer.bench.")}
    assert not {m: t for m, t in bad.items() if t}, bad


def test_no_module_over_700_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
