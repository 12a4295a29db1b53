"""The ``cuda`` backend: the compiled CUDA kernels of ``csrc/cuda`` (module ``zsnr_kernels._C_cuda``).

The module is optional and loaded on first use: if it was not built (no nvcc at install time) or fails to load,
the reason is recorded and logged once (a warning for a broken or stale build), and the backend reports itself
unavailable; ``import zsnr_kernels`` never
fails because of it.  It links the CUDA runtime statically, so it loads without a CUDA toolkit, and without a
driver or a device :func:`why_unavailable` says so.

A step is validated on the host first (the Python spec's coefficients, so a refused call raises before any
launch and leaves every tensor untouched); then the sigma arrays and seeds go to the device without a
synchronisation (:func:`zsnr_kernels.backends.layout.to_device`), and the kernels run on PyTorch's current stream:
coefficients (on the device, by the shared header), the rescale statistics with the fold (only with guidance
rescale), the element pass.  In table mode (:func:`table_step`: a SamplingPlan's float64 coefficient rows, or a
sampler the kernels do not know) the first launch is skipped.  Nothing waits for the device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path

import torch

from .. import coefficients as co, noise as _noise
from .._version import __version__
from ..parameterization import Parameterization
from . import device as _device, layout, table as _table
from .call import DTYPE_CODES, SAMPLER_CODES, SPACE_CODES, TABLE_STEP, describe, step_call


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


def _workspace(m, device, batch: int, n: int) -> torch.Tensor:
    """The device scratch of the step kernels for (batch, n) on ``device`` (:func:`.device.stream_workspace`: one per
    stream, or the call's own inside a graph capture): zeroed when allocated, and the kernels leave their counters
    at zero after each step."""
    return _device.stream_workspace(device, ("cuda", batch, n), lambda: torch.zeros(
        m.workspace_bytes(batch, n), dtype=torch.uint8, device=device))


def _on(device):
    """The CUDA device guard of ``device`` (a no-op for the stand-in tests on CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _stream(device) -> int:
    """PyTorch's current stream on ``device`` as a cudaStream_t integer (never the legacy default stream unless
    that is what PyTorch is using)."""
    return torch.cuda.current_stream(device).cuda_stream


def fused_step(y, f_cond, f_uncond, history, pz: Parameterization, args: list, sigma_eval: list, *,
               guidance_scale: float, guidance_rescale: float, rescale_space: str, noise, seeds, step_index,
               want_denoised: bool, out, draw: int = 0, noise_slice=None):
    """Enqueue one step.  Returns ``(y_out, denoised or None, carry or None, sigma_out list, complete)``; raises the
    spec's ValueError (before any launch) for a step it refuses.  A sampler the kernels do not know runs from the
    spec's coefficient table (:func:`table_step`).  Philox noise (``seeds``) is draw ``draw`` of step
    ``step_index``, each element at its place in ``noise_slice`` (whole groups; None: the whole sample)."""
    if args[0].sampler not in SAMPLER_CODES:
        return _device.spec_table_step(table_step, y, f_cond, f_uncond, history, pz, args, sigma_eval,
                                       guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                       rescale_space=rescale_space, noise=noise, seeds=seeds, step_index=step_index,
                                       want_denoised=want_denoised, out=out,
                                       backend="cuda", draw=draw, noise_slice=noise_slice)
    _device.step_slice(noise_slice, y)  # before the spec, as the cpu backend's record refuses it, noise or not
    cs, n_hist, noisy = co.spec_step(pz, args, sigma_eval, len(history), noise is not None or seeds is not None)
    fields, sigmas, n_prev = describe(pz, args, sigma_eval, guidance_scale, guidance_rescale, rescale_space)
    y_out, d_out, carry_out, _ = launch(
        y, f_cond, f_uncond, history[:n_hist], noise if noisy else None, seeds if noisy else None, step_index, fields,
        sigmas, n_prev, len(args), want_denoised, cs[0].carry is not None, out, draw, noise_slice)
    return y_out, d_out, carry_out, [c.sigma_out for c in cs], cs[0].complete


def launch(y, f_cond, f_uncond, history, noise, seeds, step_index, fields: tuple, sigmas: list, n_prev: int,
           n_sigma: int, want_denoised: bool, want_carry: bool, out, draw: int = 0, noise_slice=None):
    """Enqueue one step checked by the spec from its record's fields and sigma block
    (:func:`zsnr_kernels.backends.call.describe`): ``history`` exactly the tensors the step reads, ``noise`` or
    ``seeds`` only when it adds noise (Philox: draw ``draw``, at ``noise_slice``'s places).  Returns ``(y_out, D or
    None, carry or None, None)`` (errors stay on the device: the spec raised them before)."""
    philox = seeds is not None and noise is None
    (y_k, fc_k, fu_k, z_k, *hist_k), y_out = layout.prepare([y, f_cond, f_uncond, noise, *history], philox, out)
    d_out = torch.empty_like(y_k) if want_denoised else None
    carry_out = torch.empty_like(y_k) if want_carry else None
    device = y.device
    sig_t = layout.to_device(torch.tensor(sigmas, dtype=torch.float64), device)
    seed_t = _seed_tensor(seeds, device) if philox else None
    m = module()
    ws = _workspace(m, device, y_k.shape[0], y_k.numel() // y_k.shape[0])
    _run(m, device, step_call(y_k, fc_k, fu_k, hist_k, z_k, y_out, d_out, carry_out, fields, n_sigma, n_prev,
                              sig_t.data_ptr(), 0, layout.ptr(seed_t), step_index, draw, ws.data_ptr(), _stream(device),
                              noise_slice))
    return layout.finish(y_out, out), d_out, carry_out, None


def _seed_tensor(seeds, device) -> torch.Tensor:
    return layout.to_device(torch.tensor(_noise.seed_bits(seeds), dtype=torch.int64), device)


def _run(m, device, call) -> None:
    """Launch a record on ``device``."""
    with _on(device):  # the runtime launches on its current device: make it y's
        err = m.fused_step(call)
    if err:
        raise RuntimeError(f"the cuda backend failed to launch a step: {m.error_string(err)} (cudaError {err})")


class PlanState:
    """What a :class:`zsnr_kernels.SamplingPlan` keeps for its steps on this backend: its own workspace (replays of
    several captured plans may run concurrently) and its seeds on the device."""

    __slots__ = ("seeds", "workspace")

    def __init__(self, shape, device, seeds):
        batch = shape[0]
        n = 1
        for v in shape[1:]:
            n *= v
        self.workspace = torch.zeros(module().workspace_bytes(batch, n), dtype=torch.uint8, device=device)
        self.seeds = None if seeds is None else _seed_tensor(seeds, device)


def plan_state(shape, dtype, device, seeds) -> PlanState:
    """The per-plan state of :func:`table_step`."""
    return PlanState(shape, device, seeds)


def table_step(y, f_cond, f_uncond, history, table, *, guidance_scale: float, guidance_rescale: float,
               rescale_space: str, noise_mode: int, noise=None, seeds=None, step_index=0, y_out, d_out=None,
               carry_out=None, state=None, draw: int = 0, noise_slice=None) -> None:
    """Enqueue one step of contiguous ``[batch][n]`` tensors from float64 coefficient rows (table mode of
    csrc/cuda/step.cuh: no coefficient launch): ``table`` a contiguous ``[1 or batch, NUM_COEFFS]`` tensor on y's
    device, ``history`` exactly the tensors its rows weight.  ``noise_mode``: 0 none, 1 ``noise``, 2 Philox from
    ``seeds`` (uint64 per sample) or the plan's ``state`` (:func:`plan_state`) at ``step_index`` and ``draw``, each
    element at its place in ``noise_slice`` (whole groups; None: the whole sample), refused first when bad, drawing
    noise or not (:func:`zsnr_kernels.backends.device.step_slice`)."""
    _device.step_slice(noise_slice, y)
    device = y.device
    seed_t = None
    if noise_mode == 2:
        seed_t = state.seeds if state is not None else _seed_tensor(seeds, device)
    fields = (*TABLE_STEP, guidance_scale, guidance_rescale, SPACE_CODES[rescale_space])
    m = module()
    ws = state.workspace if state is not None else _workspace(m, device, y.shape[0], y.numel() // y.shape[0])
    _run(m, device, step_call(y, f_cond, f_uncond, history, noise if noise_mode == 1 else None, y_out, d_out,
                              carry_out, fields, table.shape[0], 0, 0, _table.address(table, y), layout.ptr(seed_t),
                              step_index, draw, ws.data_ptr(), _stream(device), noise_slice))
