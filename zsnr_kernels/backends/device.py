"""A step as a device backend (cuda, triton) launches it: checked by the Python spec on the host, since a kernel
cannot raise, then laid out (:mod:`zsnr_kernels._layout`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import coefficients as co
from . import layout


@dataclass
class DeviceStep:
    """One step as a device backend (cuda, triton) launches it: validated by the Python spec on the host, the
    tensors laid out as ``[batch][n]``, the outputs allocated.  Built by :func:`device_step`."""

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
