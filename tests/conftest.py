"""Shared fixtures: small deterministic networks used as models, the k-diffusion oracle loader, and the CUDA
module's interface run on the CPU kernels (the cuda backend's host side tested without a GPU)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def inductor_cache_dir(capability: str) -> str:
    """torch.compile's on-disk cache for runs under one PyTorch CPU capability (``get_cpu_capability()``'s name).

    Inductor's FX graph cache does not key on the vector width it generated code for (PyTorch 2.13): a graph cached
    by a run under ATEN_CPU_CAPABILITY=avx2 (tests/backends/test_isa_matrix.py's subprocesses) came back in a run with
    AVX-512, was compiled with 16-lane vectors for loops tiled by 8, and stored past its buffers (heap corruption,
    "malloc(): unaligned tcache chunk detected"), and the reverse gave NaN.  So each capability gets its own folder,
    and the matrix hands each of its subprocesses the folder of its own capability."""
    import getpass
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}", f"zsnr-tests-{capability}")


if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(torch.backends.cpu.get_cpu_capability())


class TinyNet:
    """A small fixed nonlinear network F(y, t) of the model input and a time feature: a stand-in for a UNet.

    Deterministic (seeded weights), smooth in y and t, and it mixes channels, so sampler bugs cannot hide behind
    an element-wise model.  ``t`` is whatever conditioning the caller passes (sigma, k-diffusion's t ...).
    """

    def __init__(self, channels: int, seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g, dtype=torch.float64) / math.sqrt(channels)
        self.bias = torch.randn(channels, generator=g, dtype=torch.float64) * 0.1

    def __call__(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(torch.float64).reshape((-1,) + (1,) * (y.ndim - 1))
        feat = torch.atan(tt)  # finite at sigma = inf
        w = self.w.to(y.dtype)
        mixed = torch.einsum("ij,bj...->bi...", w, y)
        bias = self.bias.to(y.dtype).reshape((1, -1) + (1,) * (y.ndim - 2))
        return torch.tanh(mixed + bias + 0.3 * y * torch.cos(feat).to(y.dtype)) + 0.1 * torch.sin(3 * feat).to(y.dtype)


def rand(*shape, seed=0):
    """Standard normal float32 values of ``shape`` from a generator seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def refused(exc, match, fn, *tensors):
    """``fn()`` raises ``exc`` matching ``match`` and writes none of ``tensors``."""
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        fn()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def pytest_report_header(config):
    """The instruction sets this run uses: the CPU kernels' (capped by ZSNR_CPU_ISA) and PyTorch's own (capped by
    ATEN_CPU_CAPABILITY), since oracles computed by PyTorch round differently under each."""
    from zsnr_kernels.backends import ext as _ext

    kernels = _ext.C.cpu_isa() if _ext.available() else f"unavailable ({_ext.why_unavailable()})"
    return f"cpu kernels: {kernels}; torch cpu capability: {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(scope="session")
def kdiff():
    """(k_diffusion.sampling, k_diffusion.external), from the unmodified package (see tests/_kdiffusion.py)."""
    import _kdiffusion

    return _kdiffusion.load()


def isa_level_of(used: str) -> int:
    """The level (the index in zsnr_kernels.backends.ext.ISA_LEVELS) of an instruction-set name as
    ``_C.cpu_limit_isa`` and ``_C.cpu_isa`` give it (``"avx2+fma+f16c"`` is level 1)."""
    from zsnr_kernels.backends import ext as _ext

    return next(level for level, name in enumerate(_ext.ISA_LEVELS) if used.startswith(name))


@pytest.fixture(params=[0, 1, 2], ids=["baseline", "avx2", "avx512"])
def isa_level(request):
    """Cap the cpu kernels at one instruction set (skipped where this CPU lacks it or the kernels are not built);
    the cap is lifted afterwards."""
    from zsnr_kernels.backends import ext as _ext

    if not _ext.available():
        pytest.skip(f"zsnr_kernels._C: {_ext.why_unavailable()}")
    try:
        used = isa_level_of(_ext.C.cpu_limit_isa(request.param))
        if used < request.param:
            pytest.skip("this CPU lacks the instruction set")
        yield used
    finally:
        _ext.restore_isa()


class CudaOnCpu:
    """The ``_C_cuda`` interface that ``zsnr_kernels/backends/cuda.py`` calls, executed by the CPU kernels of ``_C``
    on CPU memory: every launch is recorded in ``calls`` (what the host side marshalled) and run, so a test sees both
    what reached the launcher and its result."""

    cuda_runtime_version = 0

    def __init__(self):
        self.calls = []

    def device_count(self):
        return 0, 1

    def workspace_bytes(self, batch, n):
        return 64

    def error_string(self, code):
        return f"error {code}"

    def fused_step(self, call):
        import ctypes

        from zsnr_kernels.backends import ext

        n_sigma, n_prev, batch = call.n_sigma, call.n_prev, call.batch
        vals = list((ctypes.c_double * (n_sigma * (4 + n_prev))).from_address(call.sigmas)) if call.sigmas else 0
        seed_list = list((ctypes.c_uint64 * batch).from_address(call.seeds)) if call.seeds else []
        table = list((ctypes.c_double * (n_sigma * 16)).from_address(call.table)) if call.table else None
        self.calls.append(dict(n_sigma=n_sigma, sigmas=vals, seeds=seed_list, table=table, stream=call.stream,
                               workspace=call.workspace))
        res = ext.C.fused_step(call._replace(sigmas=vals, seeds=seed_list or 0, workspace=0, stream=0))
        return res[0]


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """The cuda backend with :class:`CudaOnCpu` as its compiled module (on CPU tensors, stream 1234)."""
    from zsnr_kernels.backends import cuda

    fake = CudaOnCpu()
    monkeypatch.setattr(cuda, "module", lambda: fake)
    monkeypatch.setattr(cuda, "_stream", lambda device: 1234)
    return fake
