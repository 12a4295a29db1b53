"""An opt-in setting of the process's C allocator, for loops that allocate a step's outputs afresh every step.

PyTorch's CPU tensors come from ``malloc`` (``posix_memalign``) and go back with ``free``; it keeps no cache.  glibc
serves a block of a few MB from its heap once its dynamic mmap threshold has risen above the block's size (it
rises to the size of the largest mmapped block freed, up to 32 MiB), and returns the top of the heap to the OS
whenever the free memory there exceeds twice that threshold.  A step that returns two new tensors of size S (the
state and D) and a loop that frees the last step's two can therefore meet the trim exactly: the threshold is S
after the first step, the two freed blocks make 2S at the top, glibc returns them, and the next step page-faults
2 S / 4 KiB fresh pages back in.  Whether a process is in that state depends on what it allocated and freed
before.

NOTE: measured on the 2-core build machine (AMD EPYC, a VM), a guided, rescaled Euler step at (1,16,21,60,104) in
float32, 2 threads, new outputs and D returned, in processes that first ran a SamplingPlan and three ``sample()``
calls: 4064-4093 minor page faults per step (``getrusage``) and 5.3-10.1 ms against 0.6-0.85 ms in place, in
four processes out of six; in the others 0 faults and 1.0-1.3 ms.  With :func:`retain_freed_memory` called first,
0 faults and 1.0-1.2 ms in every process.  The library itself avoids the pattern where it owns the tensors:
``sample()`` writes each state into the last one's memory (see ``zsnr_kernels.sampling``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from .. import _validate

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2), the cap of its dynamic one
MMAP_THRESHOLD_MAX = 32 << 20
_C_INT_MAX = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library when it is glibc (it exports ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (an AttributeError where the C library is not glibc)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Opt in: keep up to ``limit_bytes`` of freed memory at the top of glibc's heap for reuse, instead of returning
    it to the OS, and serve every allocation up to 32 MiB from the heap; for loops of step functions that return new
    tensors every step (the default: ``out=None``) in a process whose heap makes glibc return them every step.

    It sets glibc's ``M_MMAP_THRESHOLD`` to 32 MiB (the cap of its dynamic threshold, so no block that the dynamic
    threshold would have put on the heap is mmapped now) and ``M_TRIM_THRESHOLD`` to ``limit_bytes``, for the whole
    process and for good (glibc cannot be told to go back to its dynamic thresholds; the same settings at start-up:
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment).  The cost: the
    process's resident memory does not shrink below its peak heap use by more than ``limit_bytes``'s worth of
    returns.  Blocks above 32 MiB are mmapped and page-faulted on every allocation with or without it: for those,
    pass ``out=`` (the fastest form anyway), or run with jemalloc or tcmalloc (``LD_PRELOAD``).

    Returns True where glibc took both settings, False where the C library is not glibc (musl, macOS, Windows:
    their allocators have other policies) or refused one (the mmap threshold is set first and stays set if glibc
    then refuses the trim threshold; both values here are within glibc's limits, so that would be a glibc change).  See :mod:`zsnr_kernels.backends.host_memory` for the
    mechanism and the measured effect.
    """
    limit = _validate.integer("limit_bytes", limit_bytes, lo=0)
    if limit > _C_INT_MAX:
        raise ValueError(f"limit_bytes must be at most {_C_INT_MAX} (mallopt takes a C int), got {limit}")
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
