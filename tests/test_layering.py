"""The package's import graph, read from the source with ``ast`` (every import, those inside functions too):
no cycles, and the modules below the public API never import the package root.

A cycle makes the import order decide what works (a name used before its module finished loading); a low module
importing the root (``from . import __version__``) imports everything above it first.  The layers the design names
(math < backends < steps/sampling/plan < integrations/tools) are checked here once the package is laid out by
layer; today it is flat, and these are the rules that hold for it.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "zsnr_kernels"
ROOT_NAME = "zsnr_kernels"
COMPILED = {"_C", "_C_cuda"}  # the pybind11 modules (setup.py): imported as modules, not names of the root


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        mods[".".join([ROOT_NAME, *parts])] = path
    return mods


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package modules ``name`` imports (a ``from . import x`` of a non-module x is an import of the package
    that holds it)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == ROOT_NAME}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.split(".")[0] == ROOT_NAME:
                base = node.module
            else:
                continue
            for a in node.names:
                if a.name in COMPILED and base == ROOT_NAME:
                    continue
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_private_modules_do_not_import_the_package_root():
    """``_ext``, ``_cuda`` and the other private modules sit below the API the root assembles."""
    graph = _graph()
    offenders = sorted(m for m, deps in graph.items() if m.rsplit(".", 1)[-1].startswith("_")
                       and m != ROOT_NAME and ROOT_NAME in deps and not m.endswith("__main__"))
    assert not offenders, offenders


def test_the_reader_sees_every_module():
    """The graph is read from the files (a module the reader missed would pass everything above vacuously)."""
    graph = _graph()
    assert {f"{ROOT_NAME}.steps", f"{ROOT_NAME}._ext", f"{ROOT_NAME}._validate"} <= set(graph)
    assert f"{ROOT_NAME}._layout" in graph[f"{ROOT_NAME}._validate"]
