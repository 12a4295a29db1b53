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

from ..parameterization import Parameterization, rescale_space_coeffs
from . import device as _device, layout

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

    st = _device.device_step(y, f_cond, f_uncond, history, pz, args, sigma_eval, noise=noise, seeds=seeds,
                             want_denoised=want_denoised, out=out)
    rescale = st.f_uncond is not None and guidance_rescale != 0.0
    uv = [rescale_space_coeffs(pz, s, rescale_space) for s in sigma_eval] if rescale else [(0.0, 1.0)] * len(args)
    table = K.coefficient_table(st.coeffs, [pz.denoise_coeffs(s) for s in sigma_eval],
                                guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, rescale_uv=uv)
    K.launch(st.y, st.f_cond, st.f_uncond, st.history, layout.to_device(table, y.device), n_hist=st.n_hist,
             rescale=rescale, with_y=any(u != 0.0 for u, _ in uv),
             noise_mode=(2 if st.philox else 1) if st.noisy else 0, noise=st.noise,
             seeds=K.seed_tensor(seeds, y.shape[0], y.device) if st.philox else None,
             step_index=0 if step_index is None else step_index, y_out=st.y_out, d_out=st.d_out,
             carry_out=st.carry_out)
    return st.finish(out), st.d_out, st.carry_out, [c.sigma_out for c in st.coeffs], st.coeffs[0].complete
