"""Loader of the compiled CPU module ``zsnr_kernels._C``.

The module is optional: if it fails to import (not built, built for another Python, a stale build of
another version), the reason is recorded once, one warning is logged (``logging``, so
that even ``-W error`` cannot turn it into an import failure), and the ``cpu``
backend reports itself unavailable.  Importing ``zsnr_kernels`` never fails because of it.

    from zsnr_kernels import _ext
    if _ext.available():
        _ext.C.philox_normal(...)
"""

from __future__ import annotations

import logging
from types import ModuleType

from . import __version__

C: ModuleType | None = None
_why: str | None = None


def _load() -> None:
    global C, _why
    try:
        from . import _C as module
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
