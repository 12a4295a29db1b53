"""zsnr_kernels.retain_freed_memory: glibc's trim of a loop's freed step outputs, and the opt-in that stops it.

Each case runs in a fresh interpreter: the setting is for the whole process and for good."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

import zsnr_kernels as zk
from zsnr_kernels.backends import host_memory

glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="the C library is not glibc")

# The pattern of a step function in a loop: two new blocks of S bytes a step (the state and D), the last step's two
# freed.  An mmapped block of S freed first sets glibc's dynamic threshold to S: the two freed blocks then make 2S at
# the top of the heap, which glibc returns to the OS, and the next step faults 2S / 4 KiB pages back in.
LOOP = textwrap.dedent("""
    import ctypes, resource, sys
    import zsnr_kernels as zk
    if sys.argv[1] == "retain":
        assert zk.retain_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 8 << 20
    def touched():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        return p
    libc.free(touched())
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a, b = touched(), touched()
        libc.free(a)
        libc.free(b)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults[2:]))
""")
PAGES = 2 * (8 << 20) // 4096


def faults_per_step(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@glibc
def test_glibc_returns_a_loops_outputs_and_the_opt_in_keeps_them():
    assert faults_per_step("default") >= PAGES * 9 // 10  # the mechanism the docstring describes, still there
    assert faults_per_step("retain") < PAGES // 100


@glibc
def test_it_says_whether_it_applied():
    done = subprocess.run([sys.executable, "-c", "import zsnr_kernels as zk; print(zk.retain_freed_memory(0))"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-1] == "True", done.stderr


def test_limit_is_checked():
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        zk.retain_freed_memory(1.5)
    with pytest.raises(ValueError, match="limit_bytes must be >= 0"):
        zk.retain_freed_memory(-1)
    with pytest.raises(ValueError, match="limit_bytes must be at most 2147483647"):
        zk.retain_freed_memory(1 << 31)


@pytest.mark.skipif(platform.system() != "Linux" or host_memory._glibc() is not None, reason="glibc is here")
def test_other_c_libraries_are_left_alone():
    assert zk.retain_freed_memory() is False
