"""The package's import graph, read from the source with ``ast`` (every import, those inside functions too):
no cycles, and no module imports one from a layer above its own.

A cycle makes the import order decide what works (a name used before its module finished loading); a low module
importing a high one (``from . import __version__`` from the root) imports everything above it first, and the
layers stop meaning anything.  The layers, lowest first (README "Layout"):

    base          _version, _validate (the argument checks every layer shares)
    math          parameterization, coefficients, schedules, noise, reference, samplers
    backends      zsnr_kernels.backends.*: registry, layout, the cpu/cuda/triton/torch backends, the torch.library op
    api           steps, sampling, plan
    integrations  k_diffusion, diffusers, tools.* (bench, demo, models ...), __main__, and the package root
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "zsnr_kernels"
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


#: module (or package prefix) -> layer; a module takes the layer of its longest listed prefix
LAYERS = {
    "_version": 0, "_validate": 0,
    "parameterization": 1, "coefficients": 1, "schedules": 1, "noise": 1, "reference": 1, "samplers": 1,
    "backends": 2,
    "steps": 3, "sampling": 3, "plan": 3, "distributed": 3,
    "k_diffusion": 4, "diffusers": 4, "comfyui": 4, "tools": 4, "__main__": 4, "": 4,
}
LAYER_NAMES = ("base", "math", "backends", "api", "integrations")


def layer(module: str) -> int:
    """The layer of a package module: every module must be listed (a new one is placed on purpose)."""
    rel = module[len(ROOT_NAME) + 1:] if module != ROOT_NAME else ""
    parts = rel.split(".") if rel else []
    for k in range(len(parts), -1, -1):
        key = ".".join(parts[:k])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/tools/test_layering.py")


def test_every_import_goes_down_or_across():
    graph = _graph()
    upward = sorted(f"{m} ({LAYER_NAMES[layer(m)]}) imports {d} ({LAYER_NAMES[layer(d)]})"
                    for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_reader_sees_every_module():
    """The graph is read from the files (a module the reader missed would pass everything above vacuously)."""
    graph = _graph()
    assert {f"{ROOT_NAME}.steps", f"{ROOT_NAME}.backends.ext", f"{ROOT_NAME}._validate",
            f"{ROOT_NAME}.backends.triton_kernels.combine", f"{ROOT_NAME}.tools.bench"} <= set(graph)
    assert f"{ROOT_NAME}.backends.layout" in graph[f"{ROOT_NAME}.backends.cpu"]
    assert f"{ROOT_NAME}.backends.registry" in graph[f"{ROOT_NAME}.steps"]


def test_the_rule_catches_an_upward_import():
    """The rule itself: a math module importing steps, or a backend importing the root, is named."""
    assert layer(f"{ROOT_NAME}.coefficients") < layer(f"{ROOT_NAME}.backends.cpu") < layer(f"{ROOT_NAME}.steps")
    assert layer(f"{ROOT_NAME}.backends.triton_kernels.combine") == LAYERS["backends"]
    assert layer(ROOT_NAME) == LAYERS["tools"]
