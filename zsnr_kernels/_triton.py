"""The ``triton`` backend: the Python spec's coefficients in a float64 table on the device, then the Triton kernels
of :mod:`zsnr_kernels.triton_kernels.combine` (the rescale pass with its on-device fold, and the element pass).

Nothing in a step waits for the device: the coefficients are host values (validated here, so a refused call
raises before any launch), copied asynchronously through pinned memory.  Under ``TRITON_INTERPRET=1`` the same
code runs on CPU tensors through Triton's interpreter, which is how the build machines test it.
"""

from __future__ import annotations

import functools
import os

import torch

from . import _layout, _validate, coefficients as co
from .parameterization import Parameterization, rescale_space_coeffs

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def why_unavailable() -> str | None:
    """Why the Triton kernels cannot be imported here, or ``None``."""
    try:
        from .triton_kernels import combine  # noqa: F401
    except Exception as exc:  # ImportError without triton; anything a broken Triton install raises
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc}); pip install triton"
    return None


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(y: torch.Tensor) -> list[str]:
    """Why the Triton kernels cannot run a step on ``y`` (empty when they can)."""
    reasons = []
    why = why_unavailable()
    if why:
        reasons.append(why)
    if not y.is_cuda and not (y.device.type == "cpu" and interpreted()):
        reasons.append(f"y is on {y.device}, the triton backend runs on CUDA tensors (or on CPU tensors under "
                       "TRITON_INTERPRET=1)")
    if y.dtype not in DTYPES:
        reasons.append(f"the triton kernels store float32, float16 and bfloat16, not {y.dtype}")
    if y.numel() == 0:
        reasons.append("y is empty")
    return reasons


def fused_step(y, f_cond, f_uncond, history, pz: Parameterization, args: list, sigma_eval: list, *,
               guidance_scale: float, guidance_rescale: float, rescale_space: str, noise, seeds, step_index,
               want_denoised: bool, out):
    """Run one step.  Returns ``(y_out, denoised or None, carry or None, sigma_out list, complete)``; raises the
    spec's ValueError (before any launch) for a step it refuses."""
    from .triton_kernels import combine as K

    cs = [co.step_coeffs(pz, a) for a in args]
    pq = [pz.denoise_coeffs(s) for s in sigma_eval]
    n_hist = _validate.step_coeffs(cs, len(history))
    noisy = any(c.e != 0.0 for c in cs)
    if noisy and noise is None and seeds is None:
        raise ValueError(_validate.NEEDS_NOISE)
    rescale = f_uncond is not None and guidance_rescale != 0.0
    uv = [rescale_space_coeffs(pz, s, rescale_space) for s in sigma_eval] if rescale else [(0.0, 1.0)] * len(cs)
    philox = noisy and noise is None
    (y_k, fc_k, fu_k, z_k, *hist_k), kept = _layout.prepare(
        [y, f_cond, f_uncond, noise if noisy else None, *history[:n_hist]], philox)
    # in place into `out` (which may be y: each element is read before it is written) when it has the layout
    # the kernel sees; otherwise into a temporary copied into `out` at the end
    y_out = out if out is not None and kept and out.stride() == y.stride() else torch.empty_like(y_k)
    d_out = torch.empty_like(y_k) if want_denoised else None
    carry_out = torch.empty_like(y_k) if cs[0].carry is not None else None
    table = K.coefficient_table(cs, pq, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                rescale_uv=uv)
    K.launch(y_k, fc_k, fu_k, hist_k, K.to_device(table, y.device), n_hist=n_hist, rescale=rescale,
             with_y=any(u != 0.0 for u, _ in uv), noise_mode=(1 if noise is not None else 2) if noisy else 0,
             noise=z_k, seeds=K.seed_tensor(seeds, y.shape[0], y.device) if philox else None,
             step_index=0 if step_index is None else step_index, y_out=y_out, d_out=d_out, carry_out=carry_out)
    if out is not None and y_out is not out:
        out.copy_(y_out)
        y_out = out
    return y_out, d_out, carry_out, [c.sigma_out for c in cs], cs[0].complete
