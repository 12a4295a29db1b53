"""The step record that crosses the Python/C++ boundary (docs/design.md §3: one step record, as flash-attention passes
one params struct).

The record :class:`StepCall` holds every field the launchers' ``Tensors`` and ``StepPlan`` need
(csrc/include/zsnr/step_plan.h); csrc/bindings.cpp reads it, in one function shared by ``_C`` and ``_C_cuda``, and
exports the names of the fields it reads as ``STEP_CALL_FIELDS`` (tests/backends/test_compiled_constants.py checks them
against the record's, and the codes below against the modules' exported enums).  A record is built by
:func:`step_call` only, from a step's tensors and :func:`describe`'s fields: the cpu and cuda backends, the
``torch.library`` op and the benchmark all go through it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _validate, coefficients as co
from ..noise import check_slice
from ..parameterization import PREDICTIONS, Parameterization

#: zsnr::DType
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: zsnr::SamplerKind: the samplers whose coefficients the compiled kernels compute themselves (the others run from
#: a coefficient table computed by the Python spec)
SAMPLER_CODES = {name: i for i, name in enumerate(co.SAMPLER_KINDS)}
#: zsnr::Prediction
PREDICTION_CODES = {name: i for i, name in enumerate(PREDICTIONS)}
#: zsnr::RescaleSpace
SPACE_CODES = {name: i for i, name in enumerate(_validate.RESCALE_SPACES)}
#: zsnr::StepError, the codes a step adds to coefficients.h's CoeffError
ERR_NEEDS_NOISE, ERR_NEEDS_HISTORY, ERR_MIXED_STAGES, ERR_BAD_ARGS = 100, 101, 102, 103
#: zsnr::kMaxHistory: the most remembered tensors a step reads
MAX_HISTORY = 3


class StepCall(NamedTuple):
    """One step as the compiled launchers take it.  Addresses are ``data_ptr()`` integers (0: none); array fields
    (``sigmas``, ``table``, ``seeds``) are an address or, for the cpu module, a list of numbers.

    A NamedTuple rather than a slots dataclass: it is built by one tuple allocation, where a dataclass takes 31
    attribute stores (0.34 us per step measured, about 3% of a small latent's whole step), and the modules read its
    fields by index, where an attribute read is a lookup per field."""

    dtype: int                # DTYPE_CODES
    batch: int
    n: int                    # elements per sample: every tensor is [batch][n]
    y: int
    f_cond: int
    f_uncond: int
    hist: tuple               # addresses of the remembered tensors, newest first (at most MAX_HISTORY)
    noise: int
    y_out: int
    d_out: int
    carry_out: int
    prediction: int           # PREDICTION_CODES; from here to rescale_space: describe()'s fields
    sigma_data: float
    sampler: int              # SAMPLER_CODES (ignored in table mode)
    stage: int
    solver_heun: int
    order: int
    eta: float
    s_noise: float
    guidance_scale: float
    guidance_rescale: float   # ignored without an unconditional output
    rescale_space: int        # SPACE_CODES
    n_sigma: int              # 1 (shared by the batch) or batch: sigma values, or table rows
    n_prev: int
    sigmas: object            # float64 [(4 + n_prev) * n_sigma], see describe (0 in table mode)
    table: object             # float64 [n_sigma][NUM_COEFFS] coefficient rows (table mode), or 0
    seeds: object             # uint64 [batch] Philox seeds, or 0
    step_index: int
    draw: int                 # the Philox draw within the step (docs/design.md §2.8): 0, or 1 for dpmpp_sde's stage 2
    slice_local: int          # where each sample's n elements lie in the sample the Philox noise is drawn for
    slice_total: int          # (noise.NoiseSlice, csrc/include/zsnr/philox.h): L, G, O; (n, n, 0) the whole sample
    slice_offset: int
    workspace: int            # the cuda module's device scratch (0 on the cpu)
    stream: int               # the cuda module's cudaStream_t (0 on the cpu)


_new = tuple.__new__


def step_call(y: torch.Tensor, f_cond, f_uncond, history, noise, y_out, d_out, carry_out, fields: tuple, n_sigma: int,
              n_prev: int, sigmas, table, seeds, step_index, draw: int = 0, workspace: int = 0,
              stream: int = 0, noise_slice=None) -> StepCall:
    """The record of one step over [batch][n] tensors (``None``: none); ``fields`` as :func:`describe` gives them.
    ``noise_slice``: where each sample's elements take their Philox noise, a :class:`zsnr_kernels.noise.NoiseSlice`
    with whole groups (:func:`kernel_slice`), or None for the whole sample.  Written out without helpers: this runs
    on every step."""
    batch = y.shape[0]  # len(y) costs three times as much (Tensor.__len__)
    n = y.numel() // batch
    if noise_slice is not None:
        kernel_slice(noise_slice, n)
    return _new(StepCall, (
        DTYPE_CODES[y.dtype], batch, n, y.data_ptr(), f_cond.data_ptr(),
        0 if f_uncond is None else f_uncond.data_ptr(), tuple([h.data_ptr() for h in history]) if history else (),
        0 if noise is None else noise.data_ptr(), y_out.data_ptr(), 0 if d_out is None else d_out.data_ptr(),
        0 if carry_out is None else carry_out.data_ptr(), *fields, n_sigma, n_prev, sigmas, table, seeds,
        0 if step_index is None else int(step_index) % 4294967296, draw,
        *((n, n, 0) if noise_slice is None else noise_slice), workspace, stream))


def kernel_slice(noise_slice, n: int):
    """``noise_slice`` (a :class:`zsnr_kernels.noise.NoiseSlice`, or None) if the compiled kernels can draw it for
    samples of ``n`` elements: it places them (:meth:`NoiseSlice.check`) and keeps groups of four whole (local, total
    and offset multiples of 4, csrc/include/zsnr/philox.h ``slice_groups_whole``); ValueError naming the fix
    otherwise.  The same rule for the cpu, cuda and triton kernels (the torch reference draws any slice)."""
    if check_slice(noise_slice, n) is None:
        return None
    if not noise_slice.groups_whole:
        raise ValueError(f"noise_slice={tuple(noise_slice)} splits the Philox groups of four elements (local, total "
                         "and offset must be multiples of 4 for the compiled kernels to draw it): pass the slice's "
                         "noise as noise= instead (zsnr_kernels.noise.normal(shape, seeds, step, draw, "
                         "noise_slice=...)), or use backend='torch'")
    return noise_slice


def describe(pz: Parameterization, args: list, sigma_eval: list, guidance_scale: float, guidance_rescale: float,
             rescale_space: str) -> tuple[tuple, list, int]:
    """A step's record less its tensors, from the spec's step arguments (one entry per sample or one for the
    batch) and the sigmas the model was called at: ``(fields, sigmas, n_prev)``.

    ``fields`` are the record's scalar fields, :data:`STEP_FIELDS` in order (a sampler the compiled kernels do not
    know gets code -1: such a step runs from a coefficient table); ``sigmas`` the sigma block as
    :attr:`StepCall.sigmas` holds it, [sigma | sigma_eval | sigma_next | sigma_hat_next (sigma_next where there is
    no churn) | sigma_prev ([n_prev][n_sigma])], each block one entry per entry of ``args``."""
    a0 = args[0]
    fields = (PREDICTION_CODES[pz.prediction], pz.sigma_data, SAMPLER_CODES.get(a0.sampler, -1), a0.stage,
              int(a0.solver_type == "heun"), a0.order, a0.eta, a0.s_noise, guidance_scale, guidance_rescale,
              SPACE_CODES[rescale_space])
    n_prev = len(a0.sigma_prev)
    if len(args) == 1:  # the common case, without the comprehensions (this runs on every step)
        return fields, [a0.sigma, sigma_eval[0], a0.sigma_next,
                        a0.sigma_next if a0.sigma_hat_next is None else a0.sigma_hat_next, *a0.sigma_prev], n_prev
    return fields, ([a.sigma for a in args] + list(sigma_eval) + [a.sigma_next for a in args]
                    + [a.sigma_next if a.sigma_hat_next is None else a.sigma_hat_next for a in args]
                    + [a.sigma_prev[k] for k in range(n_prev) for a in args]), n_prev


#: the fields :func:`describe` gives, which the ``torch.library`` op's schema carries one by one
STEP_FIELDS = ("prediction", "sigma_data", "sampler", "stage", "solver_heun", "order", "eta", "s_noise",
               "guidance_scale", "guidance_rescale", "rescale_space")
#: the fields of a step in table mode, where the sampler's are not read
TABLE_STEP = (0, 1.0, -1, 1, 0, 4, 0.0, 0.0)


