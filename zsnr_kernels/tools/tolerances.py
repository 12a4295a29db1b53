"""How close a backend must come to the float64 reference (docs/design.md §4), in one place: ``zsnr-kernels
selftest`` judges a machine by these numbers and the rule :func:`step_error`, and the tests that compare backends
import them, so the two cannot drift apart.

The reference is ``backend="torch"`` on float64 copies of the inputs (the eager reference runs in float64 when
given float64).  float16 and bfloat16 are storage formats: the kernels compute in float32 and round on store,
exactly what the torch backend does with inputs in that dtype, so their error is judged against PyTorch's own
error in that dtype (at most :data:`LOW_PRECISION_VS_TORCH` times it, flash-attention's rule, plus a slack of a few
float32 ulps of the output's scale) and also kept under a loose elementwise bound, :data:`STEP`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: (atol, rtol) of one step against the float64 reference, elementwise: |got - ref| <= atol + rtol |ref|.
#: float32: the terms of the combination reach |b q F| ~ 30 (guidance scale 4.5), whose float32 ulp is 1.9e-6,
#: so atol allows a few ulps of the largest term where the result cancels to ~0; rtol is ~8 ulps of the result.
#: NOTE: measured over every case of tests/backends/test_cpu_backend.py: max |err| 1.8e-5 at |y| = 133 (lms to
#: sigma 0: large LMS weights), 1.7e-6 at unit scale; max err / (|ref| + 1) = 2.8e-6; torch's own float32 error is
#: the same size (ratio <= 1.3).
#: float16/bfloat16: the math is float32, so the error is the rounding on store, half an ulp: 2**-11 resp. 2**-8
#: of |ref|; rtol is twice that.  NOTE: measured cpu/torch error ratio: at most 1.0 in both (max |err| 0.058 fp16,
#: 0.48 bf16, both at |y| ~ 130, where half an ulp is 0.03 resp. 0.5).
STEP = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-4, 1e-3),
    torch.bfloat16: (2e-3, 8e-3),
}
#: fp16/bf16: a backend's max error is at most this multiple of the torch backend's own in that dtype ...
LOW_PRECISION_VS_TORCH = 2.0
#: ... plus this many float32 ulps (:data:`F32_EPS`) of the output's scale, max(1, max |ref|): the rounding of the
#: float32 math, which the torch error need not show where it happens to round the other way
LOW_PRECISION_SLACK_ULPS = 4
F32_EPS = 2.0**-23

#: Philox normals of two backends, absolute: they share the integers and the uniforms bit for bit (§2.8) and differ
#: only in their log/cos/sin (each within a few ulp).  |normal| <= sqrt(-2 ln 1e-7) = 5.68, whose float32 ulp is
#: 4.8e-7; GPU approximate sin/cos (abs error ~1e-6 times r) stay below 1e-5 too.
#: NOTE: measured max |difference| 4.8e-7 (1 ulp at |z| ~ 4) over 640k normals between torch (CPU), the C++
#: module (glibc) and Triton's interpreter (numpy); 77-95% of the values agree bit for bit.
NORMAL_ATOL = 1e-5

#: A whole sampling run on two backends that may round a coefficient differently (the cuda backend computes a
#: step's coefficients on the device, whose log/expm1 differ from glibc's by an ulp), in units of the dtype's
#: epsilon times the result's scale, max(1, max |x0|): float32 rounding accumulated over the run's evaluations;
#: in fp16/bf16 a few ulps of the storage format.
RUN_ULPS = {
    torch.float32: 64,
    torch.float16: 4,
    torch.bfloat16: 4,
}


class StepError(NamedTuple):
    """How far one output of a step is from the float64 reference."""

    err: float                 # max |got - ref|
    used: float                # the worst element's share of what is allowed: the output passes where used <= 1
    torch_err: float | None    # max |torch backend - ref| in the same low-precision dtype (None for float32)


def step_error(got: torch.Tensor, ref64: torch.Tensor, torch_lp: torch.Tensor | None = None) -> StepError:
    """The error of ``got`` (a step's output in float32, float16 or bfloat16) against the float64 reference
    ``ref64`` under :data:`STEP`, and, where ``torch_lp`` (the torch backend's output in ``got``'s low-precision
    dtype) is given, under the low-precision rule too.  NaN anywhere makes ``used`` NaN, which fails ``<= 1``."""
    atol, rtol = STEP[got.dtype]
    ref64 = ref64.to(got.device)
    diff = (got.double() - ref64).abs()
    err = diff.max().item()
    used = (diff / (atol + rtol * ref64.abs())).max().item()
    torch_err = None
    if torch_lp is not None:
        torch_err = (torch_lp.double() - ref64).abs().max().item()
        slack = LOW_PRECISION_SLACK_ULPS * F32_EPS * max(1.0, ref64.abs().max().item())
        used = max(used, err / (LOW_PRECISION_VS_TORCH * torch_err + slack))
    return StepError(err, used, torch_err)


def run_allowed(x0: torch.Tensor) -> float:
    """The max abs difference :data:`RUN_ULPS` allows between two whole runs ending in ``x0``."""
    scale = max(1.0, x0.double().abs().max().item())
    return RUN_ULPS[x0.dtype] * torch.finfo(x0.dtype).eps * scale
