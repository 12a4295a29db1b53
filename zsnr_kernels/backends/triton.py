"""The ``triton`` backend: the Python spec's coefficients in a float64 table on the device, then the Triton kernels
of :mod:`zsnr_kernels.backends.triton_kernels.combine` (the rescale pass with its on-device fold, and the element pass).

Nothing in a step waits for the device: the coefficients are host values (validated here, so a refused call
raises before any launch), copied without a synchronisation (:func:`zsnr_kernels.backends.layout.to_device`).
Under ``TRITON_INTERPRET=1`` the same code runs on CPU tensors through Triton's interpreter, which is how the build
machines test it.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ..parameterization import Parameterization
from . import device as _device

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
               want_denoised: bool, out, draw: int = 0, noise_slice=None):
    """Run one step.  Returns ``(y_out, denoised or None, carry or None, sigma_out list, complete)``; raises the
    spec's ValueError (before any launch) for a step it refuses.  Philox noise (``seeds``) is draw ``draw`` of step
    ``step_index``, each element at its place in ``noise_slice`` (whole groups; None: the whole sample), which is
    checked first, drawing noise or not (:func:`zsnr_kernels.backends.device.step_slice`)."""
    return _device.spec_table_step(table_step, y, f_cond, f_uncond, history, pz, args, sigma_eval,
                                   guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                   rescale_space=rescale_space, noise=noise, seeds=seeds, step_index=step_index,
                                   want_denoised=want_denoised, out=out,
                                   backend="triton", carry_with_noise=True, draw=draw, noise_slice=noise_slice)


class PlanState:
    """What a :class:`zsnr_kernels.SamplingPlan` keeps for its steps on this backend: the block size of its latent's
    element pass, its own rescale workspace (replays of several captured plans may run concurrently; sized by the
    statistics pass's fixed chunk) and its seeds on the device."""

    __slots__ = ("block", "seeds", "workspace")

    def __init__(self, shape, dtype, device, seeds):
        from .triton_kernels import combine as K

        batch, n = shape[0], math.prod(shape[1:])
        element_size = torch.empty(0, dtype=dtype).element_size()
        self.block = K.launch_block(n, batch, element_size, device)
        self.workspace = K.Workspace(device, batch, K.stats_blocks(n, element_size))
        self.seeds = None if seeds is None else K.seed_tensor(seeds, batch, device)


def plan_state(shape, dtype, device, seeds) -> PlanState:
    """The per-plan state of :func:`table_step`."""
    return PlanState(shape, dtype, device, seeds)


def table_step(y, f_cond, f_uncond, history, table, *, guidance_scale: float, guidance_rescale: float,
               rescale_space: str, noise_mode: int, noise=None, seeds=None, step_index=0, y_out, d_out=None,
               carry_out=None, state=None, draw: int = 0, noise_slice=None) -> None:
    """One step of contiguous ``[batch][n]`` tensors from float64 coefficient rows (:func:`.combine.launch`):
    ``table`` a ``[1 or batch, NUM_COEFFS]`` tensor on y's device, ``history`` exactly the tensors its rows weight.
    ``noise_mode``: 0 none, 1 ``noise``, 2 Philox from ``seeds`` (uint64 per sample) or the plan's ``state``
    (:func:`plan_state`) at ``step_index`` and ``draw``, each element at its place in ``noise_slice`` (whole groups;
    None: the whole sample).  ``guidance_scale`` is the table's (column W).  A bad ``noise_slice`` is refused before
    anything runs, drawing noise or not, as the cpu and cuda launchers' step record refuses it
    (:func:`zsnr_kernels.backends.device.step_slice`): the launcher itself reads the slice only when it draws."""
    from .triton_kernels import combine as K

    _device.step_slice(noise_slice, y)
    seed_t = None
    if noise_mode == 2:
        seed_t = state.seeds if state is not None else K.seed_tensor(seeds, y.shape[0], y.device)
    rescale = f_uncond is not None and guidance_rescale != 0.0
    K.launch(y, f_cond, f_uncond, history, table, n_hist=len(history), rescale=rescale,
             with_y=rescale and rescale_space != "output", noise_mode=noise_mode, noise=noise, seeds=seed_t,
             step_index=step_index, draw=draw, noise_slice=noise_slice, y_out=y_out, d_out=d_out, carry_out=carry_out,
             block=None if state is None else state.block, workspace=None if state is None else state.workspace)
