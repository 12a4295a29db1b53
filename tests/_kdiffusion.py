"""Load ``k_diffusion.sampling`` and ``k_diffusion.external`` from the unmodified k-diffusion package.

Why a loader: ``k_diffusion/__init__.py`` imports the whole training stack (``utils`` needs torchvision,
wandb, kornia, clean-fid ...), and PyPI's torchvision does not import beside the torch 2.13.0 CPU build this
project tests with.  The two modules the tests use as oracles need only ``utils.append_dims``, so we register a
bare ``k_diffusion`` package whose ``utils`` carries that one function, then execute the package's own
``sampling.py`` and ``external.py`` files unchanged.  ``k-diffusion`` is installed with ``--no-deps`` for the
same reason (its dependency list would pull a CUDA build of torch).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


def _append_dims(x, target_dims):
    """k_diffusion.utils.append_dims, verbatim in behaviour: append trailing singleton dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def load():
    """Return ``(sampling, external)``, the k-diffusion modules, loaded once per process."""
    if "k_diffusion.sampling" in sys.modules and "k_diffusion.external" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    root = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"] = pkg
    sys.modules["k_diffusion.utils"] = utils
    mods = []
    for name in ("sampling", "external"):
        full = f"k_diffusion.{name}"
        loader = importlib.machinery.SourceFileLoader(full, f"{root}/{name}.py")
        mod_spec = importlib.util.spec_from_loader(full, loader)
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[full] = mod
        loader.exec_module(mod)
        setattr(pkg, name, mod)
        mods.append(mod)
    return tuple(mods)
