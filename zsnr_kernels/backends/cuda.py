"""The ``cuda`` backend: the compiled CUDA kernels of ``csrc/cuda`` (module ``zsnr_kernels._C_cuda``).

The module is optional and loaded on first use: if it was not built (no nvcc at install time) or fails to load,
the reason is recorded and logged once (a warning for a broken or stale build), and the backend reports itself
unavailable; ``import zsnr_kernels`` never
fails because of it.  It links the CUDA runtime statically, so it loads without a CUDA toolkit, and without a
driver or a device :func:`why_unavailable` says so.

A step is validated on the host first (the Python spec's coefficients, so a refused call raises before any
launch and leaves every tensor untouched); then the sigma arrays and seeds go to the device through pinned
memory, asynchronously, and the kernels run on PyTorch's current stream: coefficients (on the device, by the
shared header), the rescale statistics with the fold (only with guidance rescale), the element pass.  Nothing
waits for the device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path

import torch

from .. import noise as _noise
from .._version import __version__
from ..parameterization import Parameterization
from . import device as _device, layout
from .cpu import DTYPE_CODES, PREDICTION_CODES, SAMPLER_CODES, SPACE_CODES, sigma_block


@functools.cache
def _load():
    """``(module, None)`` or ``(None, why)``; logged once."""
    why, broken = None, False
    try:
        from .. import _C_cuda as module
    except ModuleNotFoundError:  # not built (no nvcc at install time): normal on CPU-only machines
        module, why = None, "zsnr_kernels._C_cuda is not built (" + _build_reason() + ")"
    except Exception as exc:  # OSError (bad shared object), anything a broken build raises
        module, broken = None, True
        why = f"zsnr_kernels._C_cuda failed to import ({type(exc).__name__}: {exc}); rebuild it"
    else:
        if getattr(module, "__version__", None) != __version__:
            why = f"zsnr_kernels._C_cuda is a stale build (version {module.__version__}); rebuild it"
            module, broken = None, True
    if why is not None:  # a broken build is worth a warning; a missing one only a note (see `zsnr-kernels info`)
        logging.getLogger("zsnr_kernels").log(logging.WARNING if broken else logging.INFO, "%s", why)
    return module, why


def _build_reason() -> str:
    """Why setup.py skipped the CUDA module, from the build metadata next to the package."""
    try:
        info = json.loads((Path(__file__).parents[1] / "_build_info.json").read_text())
        cuda = info.get("cuda") or {}
    except (OSError, ValueError):
        return "no build metadata; install with nvcc on PATH or CUDA_HOME set: pip install ."
    return f"{cuda.get('why', 'unknown reason')}; install with nvcc on PATH or CUDA_HOME set, ZSNR_BUILD_CUDA=1"


def module():
    """The loaded ``_C_cuda`` module, or ``None``."""
    return _load()[0]


@functools.cache
def why_unavailable() -> str | None:
    """Why the CUDA kernels cannot run on this machine (module missing, no driver, no device), or ``None``."""
    m, why = _load()
    if m is None:
        return why
    err, count = m.device_count()
    if err:
        return device_error(m, err)
    if count == 0:
        return "no CUDA device (the CUDA runtime found none)"
    return None


# cudaGetDeviceCount's codes that mean "no GPU here": without an NVIDIA driver the static runtime answers
# cudaErrorInsufficientDriver (35), whose text "CUDA driver version is insufficient for CUDA runtime version" reads
# like an upgrade is due; cudaErrorNoDevice (100).
_NO_DRIVER, _NO_DEVICE = 35, 100


def _driver_present() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def device_error(m, err: int) -> str:
    """What cudaGetDeviceCount's error ``err`` means here, in words."""
    if err == _NO_DEVICE or (err == _NO_DRIVER and not _driver_present()):
        return ("no CUDA device (" + ("no NVIDIA driver is installed: libcuda.so.1 not found" if err == _NO_DRIVER
                                      else "the driver found none") + f"; cudaError {err})")
    if err == _NO_DRIVER:
        return ("no usable CUDA device: the NVIDIA driver is older than this module's CUDA runtime "
                f"({m.error_string(err)})")
    return f"no usable CUDA device ({m.error_string(err)}; cudaError {err})"


def build_info() -> dict | None:
    """Runtime version and device count of the loaded module, or ``None``."""
    m = module()
    if m is None:
        return None
    err, count = m.device_count()
    return {"cuda_runtime_version": m.cuda_runtime_version, "devices": count if not err else 0,
            "device_error": device_error(m, err) if err else None}


def arch_supported(archs: str, major: int, minor: int) -> bool:
    """Whether a module built for ``archs`` ("80;90": SASS for each, PTX of the last) runs on compute capability
    major.minor: SASS of the same major version and no higher minor, or PTX of no higher capability (JIT)."""
    built = sorted(int(a) for a in archs.split(";") if a.strip())
    cc = 10 * major + minor
    return any(a // 10 == major and a <= cc for a in built) or (bool(built) and built[-1] <= cc)


@functools.cache
def _device_reason(index: int) -> str | None:
    m = module()
    major, minor = torch.cuda.get_device_capability(index)
    if not arch_supported(m.archs, major, minor):
        return (f"zsnr_kernels._C_cuda was built for compute capabilities {m.archs}, not this device's "
                f"{major}.{minor}; rebuild with ZSNR_CUDA_ARCHS including {major}{minor}")
    return None


def not_supported_reasons(y: torch.Tensor) -> list[str]:
    """Why the CUDA kernels cannot run a step on ``y`` (empty when they can)."""
    reasons = []
    why = why_unavailable()
    if why:
        reasons.append(why)
    if not y.is_cuda:
        reasons.append(f"y is on {y.device}, the cuda backend runs on CUDA tensors")
    elif not why:
        arch = _device_reason(y.device.index)
        if arch:
            reasons.append(arch)
    if y.dtype not in DTYPE_CODES:
        reasons.append(f"the cuda kernels store float32, float16 and bfloat16, not {y.dtype}")
    if y.numel() == 0:
        reasons.append("y is empty")
    return reasons


class _Workspace:
    """The device scratch of the step kernels for one (device, stream, batch, n): zeroed once when allocated
    (the kernels leave their counters at zero after each step).  One per stream, so that steps enqueued on
    different streams never share one."""

    _cache: dict = {}  # noqa: RUF012 (the cache is the class's)

    @classmethod
    def get(cls, m, device, batch: int, n: int) -> torch.Tensor:
        key = (device.index, _stream(device), batch, n)
        ws = cls._cache.get(key)
        if ws is None:
            ws = cls._cache[key] = torch.zeros(m.workspace_bytes(batch, n), dtype=torch.uint8, device=device)
        return ws


def _on(device):
    """The CUDA device guard of ``device`` (a no-op for the stand-in tests on CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _stream(device) -> int:
    """PyTorch's current stream on ``device`` as a cudaStream_t integer (never the legacy default stream unless
    that is what PyTorch is using)."""
    return torch.cuda.current_stream(device).cuda_stream


def fused_step(y, f_cond, f_uncond, history, pz: Parameterization, args: list, sigma_eval: list, *,
               guidance_scale: float, guidance_rescale: float, rescale_space: str, noise, seeds, step_index,
               want_denoised: bool, out):
    """Enqueue one step.  Returns ``(y_out, denoised or None, carry or None, sigma_out list, complete)``; raises the
    spec's ValueError (before any launch) for a step it refuses."""
    m = module()
    st = _device.device_step(y, f_cond, f_uncond, history, pz, args, sigma_eval, noise=noise, seeds=seeds,
                             want_denoised=want_denoised, out=out)
    a0 = args[0]
    sigmas, n_prev = sigma_block(args, sigma_eval)
    device = y.device
    sig_t = layout.to_device(torch.tensor(sigmas, dtype=torch.float64), device)
    seed_t = None
    if st.philox:
        seed_t = layout.to_device(torch.tensor(_noise.seed_bits(seeds), dtype=torch.int64), device)
    batch = y.shape[0]
    n = y.numel() // batch
    ws = _Workspace.get(m, device, batch, n)
    with _on(device):  # the runtime launches on its current device: make it y's
        err = m.fused_step(
            DTYPE_CODES[y.dtype], batch, n, st.y.data_ptr(), st.f_cond.data_ptr(), layout.ptr(st.f_uncond),
            [h.data_ptr() for h in st.history], layout.ptr(st.noise), st.y_out.data_ptr(), layout.ptr(st.d_out),
            layout.ptr(st.carry_out), PREDICTION_CODES[pz.prediction], pz.sigma_data,
            SAMPLER_CODES[a0.sampler], a0.stage, int(a0.solver_type == "heun"), a0.order, a0.eta, a0.s_noise,
            sig_t.data_ptr(), len(args), n_prev, guidance_scale, guidance_rescale if f_uncond is not None else 0.0,
            SPACE_CODES[rescale_space], layout.ptr(seed_t), 0 if step_index is None else int(step_index) % 2**32, 0,
            ws.data_ptr(), _stream(device))
    if err:
        raise RuntimeError(f"the cuda backend failed to launch a step: {m.error_string(err)} (cudaError {err})")
    return st.finish(out), st.d_out, st.carry_out, [c.sigma_out for c in st.coeffs], st.coeffs[0].complete
