"""Loader of the compiled CPU module ``zsnr_kernels._C``.

The module is optional: if it fails to import (not built, built for another Python, a stale build of
another version), the reason is recorded once, one warning is logged (``logging``, so
that even ``-W error`` cannot turn it into an import failure), and the ``cpu``
backend reports itself unavailable.  Importing ``zsnr_kernels`` never fails because of it.

    from zsnr_kernels.backends import ext
    if ext.available():
        ext.C.philox_normal(...)

``ZSNR_CPU_ISA=baseline|avx2|avx512`` in the environment caps the instruction set the CPU kernels use (they
pick the best one the CPU has otherwise): every instruction set gives the same bits, and this is how a test run
checks it on one machine (``tests/backends/test_isa_matrix.py``).  A level the CPU lacks runs the best one below it.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from .._version import __version__

C: ModuleType | None = None
_why: str | None = None
#: ZSNR_CPU_ISA's names, in the order of ``_C.cpu_limit_isa``'s levels
ISA_LEVELS = ("baseline", "avx2", "avx512")
_isa_cap = -1  # the level ZSNR_CPU_ISA asks for (-1: none)


def _load() -> None:
    global C, _why
    try:
        from .. import _C as module
    except Exception as exc:  # ImportError, OSError (bad shared object), anything a broken build raises
        _why = f"zsnr_kernels._C failed to import ({type(exc).__name__}: {exc}); build it with `pip install .`"
    else:
        built = getattr(module, "__version__", None)
        if built != __version__:
            _why = f"zsnr_kernels._C is a stale build (version {built}, package {__version__}); rebuild it"
        else:
            C = module
    if _why is not None:
        logging.getLogger("zsnr_kernels").warning("%s", _why)
    _read_isa_cap()


def _read_isa_cap() -> None:
    global _isa_cap
    name = os.environ.get("ZSNR_CPU_ISA", "").strip().lower()
    if not name:
        return
    if name not in ISA_LEVELS:  # an environment variable is no argument to raise on at import: say so once
        logging.getLogger("zsnr_kernels").warning(
            "ZSNR_CPU_ISA=%r is not one of %s; ignored", name, ", ".join(ISA_LEVELS))
        return
    _isa_cap = ISA_LEVELS.index(name)
    restore_isa()


def restore_isa() -> str | None:
    """Lift a cap set with ``C.cpu_limit_isa`` back to ZSNR_CPU_ISA's (none when it is unset); returns the
    instruction set the kernels now use (``None`` without the compiled module)."""
    return C.cpu_limit_isa(_isa_cap) if C is not None else None


def available() -> bool:
    """Whether the compiled CPU module loaded."""
    return C is not None


def why_unavailable() -> str | None:
    """Why the compiled CPU module is unavailable, or ``None`` if it loaded."""
    return _why


def build_info() -> dict | None:
    """The compiled module's build metadata (compiler, flags, openmp, cuda), or ``None`` if unavailable."""
    return dict(C.build_info()) if C is not None else None


_load()
