"""A step as a backend launches it from the Python spec's coefficients: checked on the host, since a device kernel
cannot raise, then laid out (:mod:`zsnr_kernels.backends.layout`); and the per-stream scratch of the device kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import coefficients as co
from . import layout
from .call import kernel_slice


def step_slice(noise_slice, y: torch.Tensor):
    """``noise_slice`` checked for the samples of ``y`` by the compiled kernels' one rule
    (:func:`zsnr_kernels.backends.call.kernel_slice`: a :class:`zsnr_kernels.noise.NoiseSlice` that places them, with
    whole groups of four), whether or not the step draws noise: a slice that does not fit y is the caller's error
    whatever the step, and the cpu backend's step record (``call.step_call``) refuses it on every step.  The device
    backends call this first, before the spec, any layout or launch, so that they refuse a bad slice with the cpu
    backend's exception and message, in its order, and leave every tensor untouched."""
    return None if noise_slice is None else kernel_slice(noise_slice, math.prod(y.shape[1:]))


@dataclass
class DeviceStep:
    """One step as a backend launches it from the spec's coefficients (triton; cuda and cpu for a sampler their
    kernels do not know): validated by the Python spec on the host, the tensors laid out as ``[batch][n]``, the
    outputs allocated.  Built by :func:`device_step`."""

    coeffs: list                   # StepCoeffs per entry of args
    n_hist: int                    # remembered tensors the step reads
    noisy: bool                    # some sample adds noise
    philox: bool                   # ... drawn in the kernel from seeds (no noise tensor)
    y: torch.Tensor                # the kernel's views of the inputs
    f_cond: torch.Tensor
    f_uncond: torch.Tensor | None
    noise: torch.Tensor | None
    history: list
    y_out: torch.Tensor            # `out` itself when its layout allows, else a temporary (see finish())
    d_out: torch.Tensor | None
    carry_out: torch.Tensor | None

    def finish(self, out: torch.Tensor | None) -> torch.Tensor:
        """y_out, copied into ``out`` when the kernel could not write there directly."""
        return layout.finish(self.y_out, out)


def device_step(y, f_cond, f_uncond, history, pz, args, sigma_eval, *, noise, seeds, want_denoised,
                out) -> DeviceStep:
    """Validate a step with the spec (raising its ValueError before anything reaches a device) and lay it out.

    A device kernel cannot report a refused step synchronously, so every error is found here, on the host."""
    cs, n_hist, noisy = co.spec_step(pz, args, sigma_eval, len(history), noise is not None or seeds is not None)
    philox = noisy and noise is None
    (y_k, fc_k, fu_k, z_k, *hist_k), y_out = layout.prepare(
        [y, f_cond, f_uncond, noise if noisy else None, *history[:n_hist]], philox, out)
    return DeviceStep(cs, n_hist, noisy, philox, y_k, fc_k, fu_k, z_k, hist_k, y_out,
                      torch.empty_like(y_k) if want_denoised else None,
                      torch.empty_like(y_k) if cs[0].carry is not None else None)


def spec_table_step(table_step, y, f_cond, f_uncond, history, pz, args, sigma_eval, *, guidance_scale: float,
                    guidance_rescale: float, rescale_space: str, noise, seeds, step_index, want_denoised: bool, out,
                    backend: str, carry_with_noise: bool = False, draw: int = 0, noise_slice=None):
    """A backend's ``fused_step`` from the spec's coefficients: validated and laid out (:func:`device_step`), its
    coefficient table built on the host and copied to y's device without a synchronisation, then run by the
    backend's ``table_step`` (Philox noise: draw ``draw`` of the step, at ``noise_slice``'s places).  Returns
    ``(y_out, denoised or None, carry or None, sigma_out list, complete)``.

    ``carry_with_noise``: whether the backend's element pass can store a carry (an LMS-style derivative) and add
    noise in one step (the Triton kernel can; the cpu and cuda element passes have no such variant, and no built-in
    sampler needs one), else such a step is refused before anything runs.  A bad ``noise_slice`` is refused first
    (:func:`step_slice`), drawing noise or not."""
    from .table import step_table

    step_slice(noise_slice, y)
    st = device_step(y, f_cond, f_uncond, history, pz, args, sigma_eval, noise=noise, seeds=seeds,
                     want_denoised=want_denoised, out=out)
    if st.carry_out is not None and st.noisy and not carry_with_noise:
        raise ValueError(f"sampler {args[0].sampler!r} keeps a derivative and adds noise in one step, which the "
                         f"{backend} kernels cannot do; use backend='torch' or 'triton'")
    phi = guidance_rescale if st.f_uncond is not None else 0.0
    table = step_table(pz, st.coeffs, sigma_eval, guidance_scale=guidance_scale, guidance_rescale=phi,
                       rescale_space=rescale_space)
    table_step(st.y, st.f_cond, st.f_uncond, st.history, layout.to_device(table, y.device),
               guidance_scale=guidance_scale, guidance_rescale=phi, rescale_space=rescale_space,
               noise_mode=(2 if st.philox else 1) if st.noisy else 0, noise=st.noise, seeds=seeds,
               step_index=0 if step_index is None else step_index, y_out=st.y_out, d_out=st.d_out,
               carry_out=st.carry_out, draw=draw, noise_slice=noise_slice)
    return st.finish(out), st.d_out, st.carry_out, [c.sigma_out for c in st.coeffs], st.coeffs[0].complete


_WORKSPACES: dict = {}


def stream_workspace(device, key, make):
    """The scratch ``make()`` returns for work enqueued now on ``device``: one per (device, its current stream,
    ``key``), made on first use, since launches on one stream are ordered and one scratch serves them all; inside a
    CUDA-graph capture a new one per call.

    A capture cannot share its stream's: every ``torch.cuda.graph`` without ``stream=`` captures on one side stream,
    and graphs replayed at once on different streams would use one scratch.  Made during the capture, the scratch
    comes from the graph's private memory pool, which the graph keeps for its life; the calls of one capture may
    reuse its memory in stream order, as each ``make()`` readies it again (its zeroing is captured with the step).
    Other work that may run concurrently needs its own scratch (a SamplingPlan owns one)."""
    if layout.capturing(device):
        return make()
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    k = (device.type, device.index, stream, key)
    ws = _WORKSPACES.get(k)
    if ws is None:
        ws = _WORKSPACES[k] = make()
    return ws
