"""The fused ``cpu`` backend (csrc/cpu/) against the float64 reference and against itself (docs/design.md §2.3,
§2.7-2.9, §4; issue 3 item 5).

Oracle: the same step function with ``backend="torch"`` on float64 copies of the inputs (the eager reference runs
in float64 when given float64).  float32 results must lie within ``tolerances.STEP[float32]`` of it.  float16 and
bfloat16 are storage formats: the kernels compute in float32 and round on store, exactly what the torch backend
does with inputs in that dtype, so their error against float64 is judged against PyTorch's own error in that
dtype -- at most twice it, plus a slack of a few float32 ulps of the output's scale (flash-attention's "at most
twice PyTorch's error") -- and also kept under a loose absolute bound, ``tolerances.STEP[dtype]``.

Explicit ``noise=`` tensors are used wherever the comparison is against float64 (the Philox normals are float32
numbers, so seeds would make the reference unfair); the seed path is tested separately against
``zsnr_kernels.noise.normal`` and against the torch backend with the same seed.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest
import torch
from conftest import TinyNet, isa_level_of

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co, noise as zn
from zsnr_kernels.backends import call, cpu as _cpu, ext as _ext
from zsnr_kernels.parameterization import parameterization
from zsnr_kernels.tools import tolerances

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"zsnr_kernels._C not built: {_ext.why_unavailable()}")

INF = math.inf
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# tolerances: zsnr_kernels/tools/tolerances.py (shared with `zsnr-kernels selftest`), with their measurements




@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Run this module with one OpenMP thread (restored afterwards).  Results do not depend on the thread count
    (fixed chunks, reduced in a fixed order; test_results_do_not_depend_on_the_thread_count checks it), and on a
    busy 2-core machine OpenMP's spinning barriers made the module 10x slower with two threads.
    NOTE: measured on the 2-core build machine under load average ~4: 130 s with 2 threads, 11 s with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- helpers


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LAYOUTS = ("contiguous", "channels_last", "sliced")


def _layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (any dtype) in the given memory layout; the logical values are unchanged."""
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if values.ndim == 4 else torch.channels_last_3d
        return values.contiguous(memory_format=fmt)
    if layout == "sliced":  # a [..., ::2] view of a twice-as-wide buffer: every stride differs from dense
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view
    raise ValueError(layout)


# name -> (shape, layout of tensor k: a function of k).  "mixed" gives every tensor of one call another layout,
# so the glue must copy them to one element order.
SHAPES = {
    "batch1": ((1, 4, 64, 64), lambda k: "contiguous"),
    "odd": ((3, 4, 97, 131), lambda k: "contiguous"),
    "odd_small": ((3, 4, 29, 43), lambda k: "contiguous"),  # every sampler runs here (kept small for speed)
    "video5d": ((1, 16, 5, 12, 20), lambda k: "contiguous"),
    "channels_last": ((2, 4, 33, 40), lambda k: "channels_last"),
    "channels_last_3d": ((2, 3, 4, 9, 10), lambda k: "channels_last"),
    "sliced": ((2, 4, 32, 40), lambda k: "sliced"),
    "mixed": ((2, 3, 17, 19), lambda k: LAYOUTS[k % 3]),
}

TENSOR_NAMES = ("y", "fc", "fu", "h0", "h1", "h2", "z")


def _inputs(shape_name: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random step inputs in ``dtype`` and the shape's layouts: y (unit scale), the model outputs F_c, F_u, three
    remembered tensors and unit noise z.  Values are drawn in float64 and rounded to ``dtype`` once, so the
    float64 copies (:func:`_as64`) hold exactly the same numbers."""
    shape, layout_of = SHAPES[shape_name]
    out = {}
    for k, name in enumerate(TENSOR_NAMES):
        v = _randn(shape, 1000 * seed + k)
        if name == "fc":  # a conditional output correlated with the unconditional one, as real models give
            v = 0.8 * _randn(shape, 1000 * seed + 2) + 0.6 * v
        out[name] = _layout(v.to(dtype), layout_of(k))
    return out


def _as64(t: dict) -> dict:
    return {k: v.double() for k, v in t.items()}


def _as_dtype(t: dict, dtype) -> dict:
    return {k: v.to(dtype) for k, v in t.items()}


GUIDANCE = {
    "none": {},
    "cfg": {"guidance_scale": 4.5},
    "rescale_output": {"guidance_scale": 4.5, "guidance_rescale": 0.7, "rescale_space": "output"},
    "rescale_v": {"guidance_scale": 4.5, "guidance_rescale": 0.7, "rescale_space": "v"},
    "rescale_x0": {"guidance_scale": 4.5, "guidance_rescale": 0.7, "rescale_space": "x0"},
}


@dataclass(frozen=True)
class Case:
    """One step call: ``zk.<step>(y, F, sigma, sigma_next, **kwargs)`` with ``prev`` history sigmas (newest first,
    tensors h0, h1, h2) and, for ``stage2``, the second call of a two-stage sampler (first.denoised = h0)."""

    id: str
    step: str
    sigma: float
    sigma_next: float
    kwargs: tuple = ()
    prev: tuple = ()
    stage2: bool = False

    @property
    def fn(self):
        return getattr(zk, self.step + "_step")

    def first_sigma(self) -> float:
        """The sigma the first stage hands to the second (where the model is evaluated the second time)."""
        one = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
        r = self.fn(one, one, self.sigma, self.sigma_next, backend="torch", noise=one, **dict(self.kwargs))
        assert not r.complete, f"{self.id}: the first stage is already the whole step"
        return r.sigma


def _call(case: Case, t: dict, backend: str, guidance: str = "none", **extra) -> zk.StepResult:
    """Run ``case`` on the tensors ``t`` with ``backend``; explicit noise t["z"] (used only if the step adds some)."""
    g = GUIDANCE[guidance]
    model_output = (t["fc"], t["fu"]) if "guidance_scale" in g else t["fc"]
    kw = dict(case.kwargs, **g, **extra)
    if "seed" not in kw and "noise" not in kw:
        kw["noise"] = t["z"]
    if case.prev:
        kw["history"] = [(s, t[f"h{k}"]) for k, s in enumerate(case.prev)]
    if case.stage2:
        kw["first"] = zk.StepResult(t["y"], case.first_sigma(), t["h0"], complete=False)
    return case.fn(t["y"], model_output, case.sigma, case.sigma_next, backend=backend, **kw)


def _outputs(r: zk.StepResult) -> dict[str, torch.Tensor]:
    return {k: v for k, v in (("y", r.y), ("denoised", r.denoised), ("derivative", r.derivative)) if v is not None}


def _max_err(got: torch.Tensor, ref64: torch.Tensor) -> float:
    return (got.double() - ref64).abs().max().item()


def _check(got: torch.Tensor, ref64: torch.Tensor, torch_lp: torch.Tensor | None, dtype, what: str) -> float:
    """Assert the cpu result ``got`` is close enough to the float64 reference (tolerances.step_error: STEP, and in
    fp16/bf16 at most LOW_PRECISION_VS_TORCH times PyTorch's own error); returns its max abs error."""
    assert got.dtype == dtype and got.shape == ref64.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    e = tolerances.step_error(got, ref64, torch_lp)
    assert e.used <= 1, (f"{what}: max error {e.err:.3g} uses {e.used:.2f} of the tolerance (STEP[{dtype}] = "
                         f"{tolerances.STEP[dtype]}" + ("" if e.torch_err is None else
                                                       f", torch's own {dtype} error {e.torch_err:.3g}") + ")")
    return e.err


def _compare_to_reference(case: Case, shape: str, dtype, guidance: str, seed: int = 0) -> dict[str, float]:
    t = _inputs(shape, dtype, seed)
    got = _call(case, t, "cpu", guidance)
    ref = _call(case, _as64(t), "torch", guidance)
    lp = _call(case, t, "torch", guidance) if dtype != torch.float32 else None
    assert got.complete == ref.complete and got.sigma == ref.sigma
    g, r = _outputs(got), _outputs(ref)
    assert g.keys() == r.keys(), f"cpu returned {sorted(g)}, reference {sorted(r)}"
    errs = {}
    for k in r:
        errs[k] = _check(g[k], r[k], None if lp is None else _outputs(lp)[k], dtype, f"{case.id} {shape} {k}")
    return errs


# --------------------------------------------------------------------------- 1. every sampler vs float64

_S, _N = 6.0, 2.5        # a finite step
_HAT = 3.2               # a churn target above sigma_next
_PREV = (9.0, 14.0, 20.0)  # remembered sigmas, newest first

CASES = [
    Case("euler_inf", "euler", INF, _N),
    Case("euler", "euler", _S, _N),
    Case("euler_to_0", "euler", _S, 0.0),
    Case("euler_churn", "euler", _S, _N, (("sigma_hat_next", _HAT),)),
    Case("euler_churn_inf", "euler", INF, _N, (("sigma_hat_next", _HAT), ("s_noise", 1.003))),
    Case("euler_ancestral_inf", "euler_ancestral", INF, _N),
    Case("euler_ancestral", "euler_ancestral", _S, _N, (("eta", 0.8),)),
    Case("euler_ancestral_to_0", "euler_ancestral", _S, 0.0),
    Case("ddim_eta0_inf", "ddim", INF, _N, (("eta", 0.0),)),
    Case("ddim_eta0", "ddim", _S, _N, (("eta", 0.0),)),
    Case("ddim_eta05_inf", "ddim", INF, _N, (("eta", 0.5),)),
    Case("ddim_eta05", "ddim", _S, _N, (("eta", 0.5),)),
    Case("ddpm_inf", "ddpm", INF, _N),
    Case("ddpm", "ddpm", _S, _N),
    Case("heun_inf", "heun", INF, _N),
    Case("heun_s1", "heun", _S, _N),
    Case("heun_s2", "heun", _S, _N, stage2=True),
    Case("heun_s2_churn", "heun", _S, _N, (("sigma_hat_next", _HAT),), stage2=True),
    Case("heun_to_0", "heun", _S, 0.0),
    Case("dpm_2_inf", "dpm_2", INF, _N),
    Case("dpm_2_s1", "dpm_2", _S, _N),
    Case("dpm_2_s2", "dpm_2", _S, _N, stage2=True),
    Case("dpm_2_ancestral_inf", "dpm_2_ancestral", INF, _N),
    Case("dpm_2_ancestral_s1", "dpm_2_ancestral", _S, _N),
    Case("dpm_2_ancestral_s2", "dpm_2_ancestral", _S, _N, stage2=True),
    Case("dpmpp_2s_ancestral_inf_s1", "dpmpp_2s_ancestral", INF, _N),
    Case("dpmpp_2s_ancestral_inf_s2", "dpmpp_2s_ancestral", INF, _N, stage2=True),
    Case("dpmpp_2s_ancestral_inf_eta05", "dpmpp_2s_ancestral", INF, _N, (("eta", 0.5),)),
    Case("dpmpp_2s_ancestral_s1", "dpmpp_2s_ancestral", _S, _N),
    Case("dpmpp_2s_ancestral_s2", "dpmpp_2s_ancestral", _S, _N, stage2=True),
    Case("dpmpp_2m_inf", "dpmpp_2m", INF, _N),
    Case("dpmpp_2m_h1", "dpmpp_2m", _S, _N, prev=_PREV[:1]),
    Case("dpmpp_2m_prev_inf", "dpmpp_2m", _S, _N, prev=(INF,)),
    Case("dpmpp_2m_to_0", "dpmpp_2m", _S, 0.0, prev=_PREV[:1]),
    Case("dpmpp_2m_sde_inf", "dpmpp_2m_sde", INF, _N),
    Case("dpmpp_2m_sde_midpoint", "dpmpp_2m_sde", _S, _N, (("solver_type", "midpoint"),), prev=_PREV[:1]),
    Case("dpmpp_2m_sde_heun", "dpmpp_2m_sde", _S, _N, (("solver_type", "heun"), ("eta", 0.7)), prev=_PREV[:1]),
    Case("dpmpp_2m_sde_to_0", "dpmpp_2m_sde", _S, 0.0, prev=_PREV[:1]),
    Case("dpmpp_3m_sde_inf", "dpmpp_3m_sde", INF, _N),
    Case("dpmpp_3m_sde_h0", "dpmpp_3m_sde", _S, _N),
    Case("dpmpp_3m_sde_h1", "dpmpp_3m_sde", _S, _N, prev=_PREV[:1]),
    Case("dpmpp_3m_sde_h2", "dpmpp_3m_sde", _S, _N, (("s_noise", 0.9),), prev=_PREV[:2]),
    Case("lms_inf", "lms", INF, _N),
    Case("lms_h1", "lms", _S, _N, prev=_PREV[:1]),
    Case("lms_h2", "lms", _S, _N, prev=_PREV[:2]),
    Case("lms_h3", "lms", _S, _N, prev=_PREV[:3]),
    Case("lms_h3_to_0", "lms", _S, 0.0, prev=_PREV[:3]),
]
CASE_BY_ID = {c.id: c for c in CASES}


def test_cases_cover_every_sampler():
    assert {c.step for c in CASES} == set(co.SAMPLER_KINDS)


@pytest.mark.parametrize("guidance", ["none", "rescale_output"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sampler_matches_float64_reference(case, dtype, guidance):
    """Every sampler and stage, on an odd shape: y, D and the LMS derivative."""
    _compare_to_reference(case, "odd_small", dtype, guidance)


# churn noise; a second stage (D_1 as history); two history tensors and noise; three history tensors and a carry
LAYOUT_CASES = ["euler_churn", "heun_s2", "dpmpp_3m_sde_h2", "lms_h3"]


@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", LAYOUT_CASES)
def test_shapes_layouts_and_guidance_match_float64_reference(case_id, dtype, shape, guidance):
    """Batch 1, odd sizes, 5-D video, channels_last (2-D and 3-D), sliced views and mixed layouts, with every
    guidance mode (plain, CFG, and the rescale in each space)."""
    _compare_to_reference(CASE_BY_ID[case_id], shape, dtype, guidance)


@pytest.mark.parametrize("prediction,sigma", [("eps", _S), ("x0", INF), ("flow", INF), ("v", INF)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parameterizations_match_float64_reference(prediction, sigma, dtype):
    """The kernel's D = p y + q F for every prediction type (sigma_data 0.5 to exercise it), rescale in v space."""
    case = Case(f"euler_{prediction}", "euler", sigma, _N, (("prediction", prediction), ("sigma_data", 0.5)))
    _compare_to_reference(case, "channels_last", dtype, "rescale_v")


# ------------------------------------------------------------------------------------ 3. Philox noise


def test_in_kernel_noise_equals_noise_normal():
    """With y = F = 0 the step is y' = e z: the kernel's normals equal ``noise.normal`` to float rounding
    (odd per-sample size, so the last Philox group is partial; per-sample seeds spanning 64 bits)."""
    shape, seeds, step_index = (3, 5, 7, 11), [0, 2**32 + 7, 2**64 - 1], 17
    zero = torch.zeros(shape)
    r = zk.euler_ancestral_step(zero, zero, INF, _N, seed=seeds, step_index=step_index, backend="cpu")
    e = co.step_coeffs(parameterization("v"), co.StepArgs("euler_ancestral", INF, _N)).e
    z = zn.normal(shape, seeds, step_index, dtype=torch.float32)
    torch.testing.assert_close(r.y / e, z, atol=tolerances.NORMAL_ATOL, rtol=0)


def test_philox_words_of_every_instruction_set_equal_the_definition(isa_level):
    """The element pass's Philox words (vector code in csrc/cpu/philox_simd.h, scalar for the tail) equal the
    shared scalar philox4x32_10 bit for bit, across the 2**32 carry of the group index and for a tail shorter than
    a vector block."""
    seed, step, draw, g0, ng = 2**63 + 2**40 + 12345, 9, 1, 2**32 - 37, 1003
    got = torch.empty(ng, 4, dtype=torch.uint32)
    _ext.C.cpu_philox_rows(got.data_ptr(), seed, step, draw, g0, ng)
    want = torch.empty(ng, 4, dtype=torch.uint32)
    low = 2**32 - g0  # groups whose index fits in 32 bits: counter (g, 0, step, draw), then (g - 2**32, 1, ...)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    _ext.C.philox4x32(want.data_ptr(), low, k0, k1, g0, 0, step, draw)
    _ext.C.philox4x32(want[low:].data_ptr(), ng - low, k0, k1, 0, 1, step, draw)
    assert torch.equal(got, want)


def test_noise_of_every_instruction_set_equals_noise_normal(isa_level):
    """The element pass's normals (vector log/sin/cos of kernels_impl.h) equal ``noise.normal`` to float rounding
    under each instruction set, including a partial last group."""
    seed, step, draw, n = 2**64 - 3, 11, 1, 4099
    got = torch.empty(n)
    _ext.C.cpu_philox_normals(got.data_ptr(), seed, step, draw, n)
    want = zn.normal((1, n), [seed], step, draw=draw, dtype=torch.float32)[0]
    assert (got - want).abs().max().item() < tolerances.NORMAL_ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_stores_of_every_instruction_set_round_like_pytorch(isa_level, dtype):
    """float32 -> float16 / bfloat16 as the element pass stores them (F16C's VCVTPS2PH for fp16, AVX512-BF16's
    VCVTNEPS2BF16 for bf16 where the CPU has them, with the portable conversion for vectors the instruction
    rounds differently: NaNs, and for bf16 denormals, which it flushes to zero; under AVX2 bf16 by integer
    rounding in vectors, NaNs and denormals included): round to nearest even like
    PyTorch for every value, denormals, ties, overflow to inf and -0 included.  NaNs: fp16 gives the canonical
    quiet NaN, bf16 the payload, quieted."""
    g = torch.Generator().manual_seed(7)
    top = torch.randint(0, 2**16, (4096,), generator=g, dtype=torch.int64)
    scale = torch.randn(4096, generator=g) * 2.0 ** torch.randint(-30, 20, (4096,), generator=g)
    patterns = [
        # first, two whole 16-value vectors (AVX2's bf16 store converts 16 at a time): NaNs whose rounding would
        # carry into the next bf16 (signalling, payload 0xFFFF), -NaN; then without a NaN: ties at the largest
        # finite bf16 (rounding to inf), below it, and among denormals
        torch.tensor([0x7F80FFFF, 0x7FBFFFFF, 0xFF80FFFF, 0x7FFFFFFF, 0xFFC08000, 0x7F808000, 0x7F800001,
                      0xFF800001, 0x3F800000, 0x3F808000, 0, 0x80000000, 0x00008000, 0x7F7F8000, 0x1, 0xFFFFFFFF]),
        torch.tensor([0x7F7F8000, 0xFF7F8000, 0x7F7F7FFF, 0x7F7EFFFF, 0x7F7E8000, 0x00008000, 0x00018000,
                      0x80008000, 0x80018000, 0x007F8000, 0x007FFFFF, 0x00000001, 0x007F7FFF, 0x7F800000,
                      0xFF800000, 0x3F818000]),
        torch.randint(0, 2**32, (20000,), generator=g, dtype=torch.int64),  # every class, some NaN/denormal vectors
        (top << 16) | 0x8000,                                              # bf16 ties
        (top << 16) | torch.randint(0, 2**16, (4096,), generator=g, dtype=torch.int64),
        torch.randint(1, 2**23, (64,), generator=g, dtype=torch.int64),    # whole vectors of denormals
        scale.view(torch.int32).to(torch.int64) & 0xFFFFFFFF,              # fp16's range, subnormals, overflow
        (scale.half().float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF) | 0x1000,  # fp16 ties
        torch.tensor([0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x80000000, 0, 0x7F800000, 0xFF800000, 0x00800000,
                      0x007FFFFF, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x1,
                      0x477FF000, 0x477FEFFF, 0x33800000, 0x33000000, 0x33000001, 0xB3000000]),
    ]
    bits = torch.cat(patterns).to(torch.uint32)
    src = bits.view(torch.float32).clone()
    n = src.numel() - 5  # a partial last vector
    got = torch.empty(src.numel(), dtype=dtype)
    _ext.C.cpu_half_stores(_cpu.DTYPE_CODES[dtype], src.data_ptr(), got.data_ptr(), n)
    got, want, src = got[:n], src[:n].to(dtype), src[:n]
    nan = torch.isnan(src)
    assert torch.isnan(got[nan].float()).all()
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    if dtype == torch.float16:  # float_to_fp16's canonical quiet NaN, with the sign (PyTorch's own may keep
        canonical = ((bits[:n].to(torch.int64) >> 16 & 0x8000) | 0x7E00).to(torch.int16)  # the payload)
        assert torch.equal(got[nan].view(torch.int16), canonical[nan])
    else:
        quiet = (bits[:n].to(torch.int64) >> 16 | 0x40).to(torch.int16)  # float_to_bf16's NaN
        assert torch.equal(got[nan].view(torch.int16), quiet[nan])


@pytest.mark.parametrize("daz", [False, True], ids=["", "flush_denormal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_loads_of_every_instruction_set_are_exact(isa_level, dtype, daz):
    """Every float16 / bfloat16 bit pattern (subnormals, infinities, NaNs) loads as PyTorch converts it (F16C's
    VCVTPH2PS for fp16 where the CPU has it, else the portable bit formula); NaNs stay NaNs with their sign.  Also
    with ``torch.set_flush_denormal(True)`` (denormals-are-zero on the calling thread, where the loads run): fp16
    subnormals are normal floats and must not load as 0 on one instruction set or in a tile's tail only."""
    src = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    n = src.numel() - 3  # a partial last vector
    got = torch.empty(src.numel(), dtype=torch.float32)
    if daz and not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no denormals-are-zero mode")
    try:
        _ext.C.cpu_half_loads(_cpu.DTYPE_CODES[dtype], src.data_ptr(), got.data_ptr(), n)
    finally:
        torch.set_flush_denormal(False)
    got, want = got[:n], src[:n].float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rescale_sums_of_every_instruction_set_are_one_definition(dtype):
    """The statistics pass (blocked float sums of each RescaleSum, blocks added in double in a fixed order) gives
    the same bits under every instruction set and the float64 sums to 1e-6 of their scale, for a sample size that
    leaves partial blocks and lanes.  The sums are of G_c/s = b F_c + a y and G/s = b (F_u + w (F_c - F_u)) + a y,
    each less its value at the sample's first element (combine.h rescale_terms), with s = u or t, whichever is
    larger in magnitude (combine.h rescale_weights: one sample of each kind here), w, a and b rounded to float."""
    levels = _supported_isa_levels()
    batch, n = 2, 3 * 16384 + 300 + 7
    w, us, ts = 4.5, [-0.3, 3.0], [1.0, -0.7]  # sample 0: a = -0.3, b = 1; sample 1: a = 1, b = -0.7/3
    g = torch.Generator().manual_seed(3)
    fc, fu, y = (torch.randn(batch, n, generator=g).to(dtype) + 0.25 for _ in range(3))
    results = {}
    try:
        for level in levels:
            _ext.C.cpu_limit_isa(level)
            results[level] = {
                with_y: _ext.C.cpu_rescale_sums(_cpu.DTYPE_CODES[dtype], batch, n, fc.data_ptr(), fu.data_ptr(),
                                                y.data_ptr(), with_y, w, us, ts)
                for with_y in (0, 1)}
    finally:
        _ext.restore_isa()
    for level in levels[1:]:
        assert results[level] == results[levels[0]], level
    c, u, v = (t.double() - t.double()[:, :1] for t in (fc, fu, y))  # less each sample's first element
    wa = torch.tensor([-0.3, 1.0], dtype=torch.float32).double()[:, None]
    wb = torch.tensor([1.0, -0.7 / 3.0], dtype=torch.float32).double()[:, None]
    for with_y in (0, 1):
        e = wa * v if with_y else torch.zeros_like(v)
        b = wb if with_y else 1.0
        gc, gg = b * c + e, b * (u + w * (c - u)) + e
        terms = [gc, gc * gc, gg, gg * gg]  # combine.h's RescaleSum order
        want = torch.stack([t.sum(1) for t in terms], 1)
        scale = torch.stack([t.abs().sum(1) for t in terms], 1)
        got = torch.tensor(results[levels[0]][with_y], dtype=torch.float64).view(batch, -1)
        assert ((got - want).abs() <= 1e-6 * scale).all(), with_y


def _near_equal_outputs(n: int, eps: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 y, F_c, F_u of shape (2, n) with F_c = F_u + eps * noise (the conditional output close to the
    unconditional one)."""
    g = torch.Generator().manual_seed(seed)
    y, fu, d = (torch.randn(2, n, generator=g, dtype=torch.float64) for _ in range(3))
    return y.float(), (fu + eps * d).float(), fu.float()


@pytest.mark.parametrize("n", [16, 35, 4096])
@pytest.mark.parametrize("space", ["output", "v", "x0"])
def test_rescale_of_nearly_equal_outputs_at_a_large_scale_is_as_accurate_as_torch(space, n):
    """Issue 13 item 15: w = 12, phi = 1 and F_c within 1e-2 or 1e-3 of F_u.  The variance of the guided output
    was assembled as w^2 S_cc + (1-w)^2 S_uu + 2w(1-w) S_cu from float32-accumulated sums, which cancel: the
    float32 cpu step was 19-460x further from float64 than the float32 torch reference (16-4096 elements).  Now
    the statistics are the guided output's own moments (combine.h RescaleSum), and the cpu error is within 3x of
    the torch backend's.
    NOTE: measured max error over the 8 inputs of each case, cpu/torch: before the fix 44-461x at 16 and 35
    elements (cpu 2.8e-5 to 1.9e-4), 19-29x at 4096; after it 0.54-1.0x (cpu <= 7.3e-7)."""
    kw = dict(guidance_scale=12.0, guidance_rescale=1.0, rescale_space=space, prediction="eps")
    err = {"cpu": 0.0, "torch": 0.0}
    for eps in (1e-2, 1e-3):
        for seed in range(4):
            y, fc, fu = _near_equal_outputs(n, eps, seed)
            want = zk.euler_step(y.double(), (fc.double(), fu.double()), 5.0, 3.0, backend="torch", **kw).y
            for backend in err:
                got = zk.euler_step(y, (fc, fu), 5.0, 3.0, backend=backend, **kw).y
                err[backend] = max(err[backend], _max_err(got, want))
    assert err["cpu"] <= 3.0 * err["torch"], err


def _supported_isa_levels() -> list[int]:
    try:
        return sorted({isa_level_of(_ext.C.cpu_limit_isa(level)) for level in range(len(_ext.ISA_LEVELS))})
    finally:
        _ext.restore_isa()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_instruction_set_gives_the_same_bits(dtype):
    """The AVX2 and AVX-512 kernels round like the baseline ones (explicit fmaf, no contraction), so their steps
    agree bit for bit: seeded noise (vector and scalar Philox), guidance rescale statistics, history, odd sizes."""
    levels = _supported_isa_levels()
    if len(levels) < 2:
        pytest.skip("this CPU runs only the baseline kernels")
    t = _inputs("odd", dtype, seed=5)
    runs = (("euler_ancestral_inf", "rescale_x0"), ("dpmpp_3m_sde_h2", "cfg"), ("lms_h3", "none"))
    seeded = {"seed": [4, 2**40, 2**64 - 1], "step_index": 3}
    results = {}
    try:
        for level in levels:
            _ext.C.cpu_limit_isa(level)
            results[level] = [_outputs(_call(CASE_BY_ID[c], t, "cpu", g, **(seeded if c in NOISY else {})))
                              for c, g in runs]
    finally:
        _ext.restore_isa()
    for level in levels[1:]:
        for run, a, b in zip(runs, results[levels[0]], results[level]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (run, level)


NOISY = ["euler_ancestral_inf", "euler_churn", "ddim_eta05", "ddpm", "dpm_2_ancestral_s2", "dpmpp_2s_ancestral_s2",
         "dpmpp_2m_sde_heun", "dpmpp_3m_sde_h2"]


@pytest.mark.parametrize("shape", ["odd", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", NOISY)
def test_seeded_step_matches_reference(case_id, dtype, shape):
    """A seeded step on cpu against the float64 reference given the float32 Philox normals of the same seed (the
    torch backend rounds its noise to y's dtype first, so its low-precision error is the larger one); in float32,
    cpu and torch with the same seed agree to float rounding."""
    case = CASE_BY_ID[case_id]
    t = _inputs(shape, dtype, seed=3)
    seed = dict(seed=[11, 2**40 + 3], step_index=5) if SHAPES[shape][0][0] == 2 else dict(seed=99, step_index=5)
    got = _call(case, t, "cpu", "cfg", **seed)
    z = zn.normal(tuple(t["y"].shape), seed["seed"], seed["step_index"], dtype=torch.float32).double()
    ref = _call(case, dict(_as64(t), z=z), "torch", "cfg")
    same_seed = _call(case, t, "torch", "cfg", **seed)
    for k, r in _outputs(ref).items():
        lp = _outputs(same_seed)[k]
        _check(_outputs(got)[k], r, lp if dtype != torch.float32 else None, dtype, f"{case_id} {k}")
        if dtype == torch.float32:
            torch.testing.assert_close(_outputs(got)[k], lp, atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", ["euler_ancestral", "dpmpp_3m_sde_h2", "euler_churn"])
def test_batch_of_8_with_per_sample_seeds_equals_8_batches_of_1(case_id, dtype):
    """Bit-exact on cpu: the noise counter is per sample, the statistics are per sample."""
    case = CASE_BY_ID[case_id]
    seeds = [1, 2, 3, 2**32, 2**63 + 1, 12345, 0, 2**64 - 1]
    shape = (8, 3, 11, 13)  # 429 elements per sample: not a multiple of 4
    t = {k: _randn(shape, i).to(dtype) for i, k in enumerate(TENSOR_NAMES)}
    del t["z"]
    batch = _call(case, t, "cpu", "rescale_x0", seed=seeds, step_index=4)
    for i, s in enumerate(seeds):
        one = _call(case, {k: v[i:i + 1] for k, v in t.items()}, "cpu", "rescale_x0", seed=s, step_index=4)
        for k, v in _outputs(one).items():
            assert torch.equal(_outputs(batch)[k][i:i + 1], v), f"sample {i} {k}"


def test_seeded_noise_ignores_the_memory_layout():
    """Philox noise is indexed by the logical element order: channels_last and sliced y give the same result as
    contiguous y, bit for bit."""
    case = CASE_BY_ID["dpmpp_3m_sde_h2"]
    for shape in ("channels_last", "sliced"):
        t = _inputs(shape, torch.float32, seed=5)
        dense = {k: v.contiguous() for k, v in t.items()}
        a = _call(case, t, "cpu", "cfg", seed=[3, 4], step_index=2)
        b = _call(case, dense, "cpu", "cfg", seed=[3, 4], step_index=2)
        assert torch.equal(a.y, b.y) and torch.equal(a.denoised, b.denoised), shape


# ------------------------------------------------------------------------------------------ 2. sample()

SAMPLE_RUNS = [
    ("euler", {}),
    ("euler", {"s_churn": 2.0, "s_tmin": 0.2, "s_tmax": 50.0}),
    ("euler_ancestral", {}),
    ("heun", {"s_churn": 1.5}),
    ("dpm_2", {}),
    ("dpm_2", {"s_churn": 1.5, "s_noise": 0.0}),  # the churn raises sigma without noise (the kernel's e = 0)
    ("dpm_2_ancestral", {"eta": 0.7}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_3m_sde", {}),
    ("ddim", {"eta": 0.5}),
    ("ddpm", {}),
    ("lms", {}),
]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg_rescale"])
@pytest.mark.parametrize("sampler,kw", SAMPLE_RUNS, ids=[s + "".join(f"_{k}" for k in kw) for s, kw in SAMPLE_RUNS])
def test_sample_cpu_equals_torch(sampler, kw, guided):
    """A whole run from sigma = inf (seeded where the sampler draws noise), float32, cpu vs torch backend."""
    net, net_u = TinyNet(4, seed=1), TinyNet(4, seed=2)

    def model(y, s):
        return (net(y, s), net_u(y, s)) if guided else net(y, s)

    noise = _randn((2, 4, 24, 20), 7).float()
    sigmas = torch.cat([torch.tensor([INF], dtype=torch.float64), zk.schedules.karras(7, 0.05, 20.0)])
    extra = dict(guidance_scale=3.0, guidance_rescale=0.6) if guided else {}
    a = zk.sample(model, noise, sigmas, sampler=sampler, seed=[5, 6], backend="cpu", **kw, **extra)
    b = zk.sample(model, noise, sigmas, sampler=sampler, seed=[5, 6], backend="torch", **kw, **extra)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    # float32 rounding accumulated over up to 14 model evaluations; |x0| <= ~11.
    # NOTE: measured max |cpu - torch| over these runs: 5.2e-6 (dpmpp_3m_sde with CFG + rescale).
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-6)


# ------------------------------------------------------------------------------------ 4. out= and in place


@pytest.mark.parametrize("case_id", ["euler_inf", "euler_churn", "dpmpp_3m_sde_h2", "heun_s2", "lms_h3"])
@pytest.mark.parametrize("shape", ["odd", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_aliasing_y_equals_fresh_output(case_id, shape, dtype):
    """``out=y`` writes in place (the statistics pass of the x0-space rescale reads y before it is overwritten;
    fp16 and bf16 results go through float tiles, each tile read before it is written) and gives the values of
    a fresh output; the result is ``out`` itself."""
    case = CASE_BY_ID[case_id]
    t = _inputs(shape, dtype, seed=2)
    fresh = _call(case, t, "cpu", "rescale_x0", seed=[8, 9, 10][: t["y"].shape[0]], step_index=1)
    y = t["y"]
    before = y.clone()
    inplace = _call(case, t, "cpu", "rescale_x0", seed=[8, 9, 10][: y.shape[0]], step_index=1, out=y)
    assert inplace.y is y and y.stride() == _layout(before, SHAPES[shape][1](0)).stride()
    assert torch.equal(y, fresh.y) and not torch.equal(y, before)
    for k in ("denoised", "derivative"):
        if getattr(fresh, k) is not None:
            assert torch.equal(getattr(inplace, k), getattr(fresh, k)), k


@pytest.mark.parametrize("out_layout", LAYOUTS)
@pytest.mark.parametrize("y_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_with_another_layout(y_layout, out_layout, dtype):
    """``out`` in any layout receives the values of a fresh output and is the returned y."""
    t = {k: _layout(_randn((2, 4, 16, 18), i).to(dtype), y_layout) for i, k in enumerate(TENSOR_NAMES)}
    case = CASE_BY_ID["dpmpp_2m_sde_heun"]
    fresh = _call(case, t, "cpu", "rescale_output")
    out = _layout(torch.full_like(fresh.y.contiguous(), float("nan")), out_layout)
    r = _call(case, t, "cpu", "rescale_output", out=out)
    assert r.y is out and torch.equal(out, fresh.y)
    assert torch.equal(r.denoised, fresh.denoised)


def test_return_denoised_false():
    """D is skipped where nothing needs it (euler) and still returned where the sampler remembers it."""
    t = _inputs("batch1", torch.float32)
    off = dict(return_denoised=False)
    assert _call(CASE_BY_ID["euler"], t, "cpu", "cfg", **off).denoised is None
    assert _call(CASE_BY_ID["lms_h2"], t, "cpu", "cfg", **off).denoised is None
    for cid in ("dpmpp_2m_h1", "heun_s1", "dpmpp_3m_sde_h1", "dpmpp_2m_sde_heun"):
        off_r, on_r = _call(CASE_BY_ID[cid], t, "cpu", "cfg", **off), _call(CASE_BY_ID[cid], t, "cpu", "cfg")
        assert off_r.denoised is not None and torch.equal(off_r.denoised, on_r.denoised), cid
        assert torch.equal(off_r.y, on_r.y), cid
    # the y of a step does not depend on whether D is written
    e_off, e_on = _call(CASE_BY_ID["euler"], t, "cpu", "cfg", **off), _call(CASE_BY_ID["euler"], t, "cpu", "cfg")
    assert torch.equal(e_off.y, e_on.y)


# ------------------------------------------------------------------------------- 5. per-sample sigmas

PER_SAMPLE = [
    # step, sigma, sigma_next, kwargs, history sigmas per sample (newest first).  A sample at sigma = inf has no
    # history (its sigma_prev would have to lie above inf), so the multistep rows start sample 0 at 6 with
    # sigma_prev = inf, the documented "no history yet" marker.
    ("euler", [INF, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {}, []),
    ("euler", [INF, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {"sigma_hat_next": [3.0, 2.0, 0.0, 1.4]}, []),
    ("euler_ancestral", [INF, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {"eta": 0.9}, []),
    ("ddim", [INF, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {"eta": 0.5}, []),
    ("ddpm", [INF, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {}, []),
    ("heun", [9.0, 6.0, 0.7, 3.0], [2.5, 2.0, 0.1, 1.0], {}, []),
    ("dpmpp_2m", [6.0, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {}, [[INF, 9.0, 1.5, 5.0]]),
    ("dpmpp_2m_sde", [6.0, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {"solver_type": "heun"}, [[INF, 9.0, 1.5, 5.0]]),
    ("dpmpp_3m_sde", [6.0, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {}, [[9.0, 9.0, 1.5, 5.0], [INF, 14.0, 3.0, 8.0]]),
    ("lms", [6.0, 6.0, 0.7, 3.0], [2.5, 2.0, 0.0, 1.0], {}, [[9.0, 9.0, 1.5, 5.0], [INF, 14.0, 3.0, 8.0]]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("step,sig,nxt,kw,prev", PER_SAMPLE,
                         ids=[f"{p[0]}{'_churn' if 'sigma_hat_next' in p[3] else ''}" for p in PER_SAMPLE])
def test_per_sample_sigmas_equal_one_call_per_sample(step, sig, nxt, kw, prev, dtype):
    """(B,) sigma tensors (one sample leaving inf, one going to 0) with per-sample seeds and the v-space rescale
    equal one cpu call per sample, bit for bit; in float32 the batch also matches the torch backend."""
    fn = getattr(zk, step + "_step")
    t = {k: _randn((4, 3, 9, 10), 50 + i).to(dtype) for i, k in enumerate(TENSOR_NAMES)}
    seeds = [21, 22, 23, 24]
    col = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    common = dict(guidance_scale=4.0, guidance_rescale=0.7, rescale_space="v", step_index=3)

    def batched(backend):
        kwb = {k: col(v) if isinstance(v, list) else v for k, v in kw.items()}
        if prev:
            kwb["history"] = [(col(s), t[f"h{k}"]) for k, s in enumerate(prev)]
        return fn(t["y"], (t["fc"], t["fu"]), col(sig), col(nxt), seed=seeds, backend=backend, **kwb, **common)

    got = batched("cpu")
    assert isinstance(got.sigma, torch.Tensor) and got.sigma.shape == (4,)
    for i in range(4):
        sl = slice(i, i + 1)
        kwi = {k: v[i] if isinstance(v, list) else v for k, v in kw.items()}
        if prev:
            kwi["history"] = [(s[i], t[f"h{k}"][sl]) for k, s in enumerate(prev)]
        one = fn(t["y"][sl], (t["fc"][sl], t["fu"][sl]), sig[i], nxt[i], seed=seeds[i], backend="cpu", **kwi,
                 **common)
        assert float(got.sigma[i]) == one.sigma
        for k, v in _outputs(one).items():
            assert torch.equal(_outputs(got)[k][sl], v), f"sample {i} {k}"
    if dtype == torch.float32:
        for k, v in _outputs(batched("torch")).items():
            torch.testing.assert_close(_outputs(got)[k], v, atol=2e-5, rtol=2e-6)


# ------------------------------------------------------------------------------------------ 6. threads


def test_concurrent_threads_equal_sequential_calls():
    """4 Python threads running 6-step loops on different inputs at once (the kernel releases the GIL) give the
    results of the same loops run one after another."""
    shape = (2, 4, 96, 96)  # several chunks per sample: the statistics pass reduces across them
    inputs = [(_randn(shape, 10 + i).float(), _randn(shape, 20 + i).float()) for i in range(4)]
    sigmas = [INF, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0]

    def loop(k: int):
        y, f = inputs[k]
        hist = []
        for i in range(len(sigmas) - 1):
            fc, fu = torch.tanh(f + 0.1 * y), 0.5 * f
            r = zk.dpmpp_3m_sde_step(y, (fc, fu), sigmas[i], sigmas[i + 1], history=hist, seed=[k, k + 100],
                                     step_index=i, guidance_scale=5.0, guidance_rescale=0.7, backend="cpu")
            hist = [(sigmas[i], r.denoised)] + hist[:1]
            y = r.y
        return y

    sequential = [loop(k) for k in range(4)]
    results: list = [None] * 4
    errors: list = []
    barrier = threading.Barrier(4)

    def worker(k):
        try:
            barrier.wait()
            for _ in range(3):
                results[k] = loop(k)
                assert torch.equal(results[k], sequential[k])
        except BaseException as exc:  # noqa: BLE001 (reported in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for k in range(4):
        assert torch.equal(results[k], sequential[k]), k


# ------------------------------------------------------------------------------------------ 7. refusals


def test_cpu_refuses_float64_and_auto_falls_back_to_torch():
    t = _as64(_inputs("batch1", torch.float32))
    with pytest.raises(ValueError, match="cpu.*float64"):
        _call(CASE_BY_ID["euler"], t, "cpu")
    auto, ref = _call(CASE_BY_ID["euler"], t, "auto"), _call(CASE_BY_ID["euler"], t, "torch")
    assert auto.y.dtype == torch.float64 and torch.equal(auto.y, ref.y)


def test_auto_uses_the_cpu_kernels_for_cpu_tensors():
    t = _inputs("odd", torch.float32)
    for cid in ("euler_inf", "dpmpp_3m_sde_h2"):
        auto, cpu = _call(CASE_BY_ID[cid], t, "auto", "rescale_v"), _call(CASE_BY_ID[cid], t, "cpu", "rescale_v")
        assert torch.equal(auto.y, cpu.y)


def test_cpu_refuses_other_devices():
    y = torch.zeros(1, 4, 8, 8, device="meta")
    with pytest.raises(ValueError, match=r"backend='cpu'.*meta"):
        zk.euler_step(y, y, INF, 1.0, backend="cpu")


def _untouched_after(expect_exc, match, call, tensors):
    """``call()`` raises ``expect_exc`` and every tensor in ``tensors`` keeps its values (bit for bit)."""
    before = [t.clone() for t in tensors]
    with pytest.raises(expect_exc, match=match):
        call()
    for k, (t, b) in enumerate(zip(tensors, before)):
        assert torch.equal(t, b), f"tensor {k} was modified by a refused call ({match})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bad_input_raises_before_writing(dtype):
    """Every refusal leaves y (passed as out=), the model outputs, history and noise untouched; the checks done
    in Python and the ones the kernel reports (missing noise, eps at inf, mixed stages) alike."""
    t = _inputs("batch1", dtype)
    y, fc, fu, h0, z = t["y"], t["fc"], t["fu"], t["h0"], t["z"]
    all_t = [y, fc, fu, h0, z]
    hist = [(9.0, h0)]
    run = zk.dpmpp_2m_sde_step
    cases = [
        (ValueError, "shape", lambda: run(y, (fc, fu[:, :3]), _S, _N, history=hist, noise=z, guidance_scale=3.0,
                                          backend="cpu", out=y)),
        (TypeError, "dtype", lambda: run(y, (fc, fu), _S, _N, history=[(9.0, h0.double())], noise=z,
                                         guidance_scale=3.0, backend="cpu", out=y)),
        (TypeError, "dtype", lambda: run(y, (fc, fu), _S, _N, history=hist, noise=z.double(), guidance_scale=3.0,
                                         backend="cpu", out=y)),
        (ValueError, "shape", lambda: run(y, (fc, fu), _S, _N, history=hist, noise=z, guidance_scale=3.0,
                                          backend="cpu", out=h0[:, :, :4])),
        (ValueError, "adds noise", lambda: run(y, (fc, fu), _S, _N, history=hist, guidance_scale=3.0,
                                               backend="cpu", out=y)),
        (ValueError, "step_index", lambda: run(y, (fc, fu), _S, _N, history=hist, seed=1, guidance_scale=3.0,
                                               backend="cpu", out=y)),
        (ValueError, "eps", lambda: zk.euler_step(y, fc, INF, _N, prediction="eps", backend="cpu", out=y)),
        (ValueError, "pair", lambda: zk.euler_step(y, fc, _S, _N, guidance_scale=3.0, backend="cpu", out=y)),
        (ValueError, "history sigmas", lambda: run(y, (fc, fu), _S, _N, history=[(3.0, h0)], noise=z,
                                                   guidance_scale=3.0, backend="cpu", out=y)),
        (ValueError, "guidance_rescale", lambda: zk.euler_step(y, (fc, fu), _S, _N, guidance_scale=3.0,
                                                               guidance_rescale=1.5, backend="cpu", out=y)),
        (TypeError, r"model_output\[0\] \(cond\) has dtype", lambda: zk.euler_step(
            y, (fc.double(), fu), _S, _N, guidance_scale=3.0, backend="cpu", out=y)),
        (ValueError, r"model_output\[1\] \(uncond\) has shape", lambda: zk.euler_step(
            y, (fc, fu[:, :3]), _S, _N, guidance_scale=3.0, backend="cpu", out=y)),
    ]
    for exc, match, call in cases:
        _untouched_after(exc, match, call, all_t)


def test_binding_refuses_a_sigma_block_of_the_wrong_length():
    """``_C.fused_step`` takes the sigmas as one block of (4 + n_prev) * n_sigma values (bindings.cpp ``Step``); a
    block of another length is refused before the kernel reads past its end."""
    y = torch.randn(2, 8)
    out = torch.empty_like(y)
    fields, _, _ = call.describe(parameterization("v", 1.0), [co.StepArgs("euler", 5.0, 3.0)], [5.0], 1.0, 0.0,
                                 "output")

    def record(sigmas, n_sigma, n_prev):
        return call.step_call(y, y, None, [], None, out, None, None, fields, n_sigma, n_prev, sigmas, 0, 0, 0)

    res = _ext.C.fused_step(record([5.0, 5.0, 3.0, 3.0], 1, 0))
    assert res[0] == 0 and res[3] == [3.0]
    for sigmas, n_sigma, n_prev, match in [([5.0, 5.0, 3.0], 1, 0, "sigmas must hold"),
                                           ([5.0, 5.0, 3.0, 3.0], 1, 1, "sigmas must hold"),
                                           ([5.0] * 4, 0, 0, "n_sigma"), ([5.0] * 4, 1, -1, "n_prev")]:
        before = out.clone()
        with pytest.raises(ValueError, match=match):
            _ext.C.fused_step(record(sigmas, n_sigma, n_prev))
        assert torch.equal(out, before)


def test_binding_refuses_what_is_not_a_step_record():
    with pytest.raises(ValueError, match="StepCall record"):
        _ext.C.fused_step((0,) * 5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("step", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lms"])
def test_history_sigmas_must_lie_above_sigma(step, backend):
    """Both backends refuse remembered sigmas that are not above sigma (newest first, growing with age) with the
    same ValueError, instead of dividing by log(1) = 0 or letting the kernel fail with an internal code."""
    t = _inputs("batch1", torch.float32)
    fn = getattr(zk, step + "_step")
    for prev in ((3.0,), (_S,), (9.0, 7.0)):
        if step in ("dpmpp_2m", "dpmpp_2m_sde") and len(prev) > 1:
            continue  # they remember one evaluation only
        hist = [(s, t[f"h{k}"]) for k, s in enumerate(prev)]
        kw = {} if step in ("dpmpp_2m", "lms") else {"noise": t["z"]}
        _untouched_after(ValueError, "history sigmas must be above", lambda: fn(
            t["y"], t["fc"], _S, _N, history=hist, backend=backend, out=t["y"], **kw), list(t.values()))


def test_mixed_stage_refusal_leaves_out_untouched():
    """The kernel detects per-sample sigmas that put samples in different stages before writing anything."""
    t = {k: _randn((2, 3, 8, 8), i).float() for i, k in enumerate(TENSOR_NAMES)}
    y = t["y"]
    _untouched_after(ValueError, "stages", lambda: zk.heun_step(
        y, t["fc"], torch.tensor([_S, _S], dtype=torch.float64), torch.tensor([_N, 0.0], dtype=torch.float64),
        backend="cpu", out=y), [y, t["fc"]])


# ------------------------------------------------------------------------------------------ 8. determinism


def _big_step(dtype, threads: int):
    shape = (1, 16, 128, 128)  # 16 chunks of 16384 elements in one sample
    t = {k: _randn(shape, 70 + i).to(dtype) for i, k in enumerate(TENSOR_NAMES)}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _call(CASE_BY_ID["dpmpp_3m_sde_h2"], t, "cpu", "rescale_x0", seed=3, step_index=7)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_call_twice_is_bit_identical(dtype):
    a, b = _big_step(dtype, 1), _big_step(dtype, 1)
    assert torch.equal(a.y, b.y) and torch.equal(a.denoised, b.denoised)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_results_do_not_depend_on_the_thread_count(dtype):
    """The statistics pass sums fixed chunks and reduces them in a fixed order, so 1, 2 and 3 OpenMP threads
    (the kernel shares PyTorch's OpenMP runtime, so torch.set_num_threads sets its team size) agree bit for bit."""
    a = _big_step(dtype, 1)
    for n in (2, 3):
        b = _big_step(dtype, n)
        assert torch.equal(a.y, b.y) and torch.equal(a.denoised, b.denoised), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_which_thread_takes_which_chunk(dtype):
    """The threads take the fixed chunks as they finish the last (schedule(dynamic) in kernels_impl.h), so which
    thread sums or updates which chunk varies from call to call; with another process keeping a core busy it
    varies more (the thread sharing that core takes fewer).  The partial sums are stored per chunk and reduced in
    chunk order, so every call with 2 or 3 threads equals the 1-thread call bit for bit."""
    a = _big_step(dtype, 1)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for rep in range(4):
            for n in (2, 3):
                b = _big_step(dtype, n)
                assert torch.equal(a.y, b.y) and torch.equal(a.denoised, b.denoised), (rep, n)
    finally:
        busy.kill()
        busy.wait()


def test_set_num_threads_applies_to_every_python_thread():
    """zsnr_kernels.set_num_threads is global (omp_set_num_threads is per calling thread) and changes no result."""
    shape = (2, 4, 96, 96)
    y, f = _randn(shape, 1).float(), _randn(shape, 2).float()

    def step():
        return zk.euler_ancestral_step(y, (f, 0.5 * f), 5.0, 2.0, seed=[1, 2], step_index=0, guidance_scale=3.0,
                                       guidance_rescale=0.7, backend="cpu").y

    default = zk.get_num_threads()
    try:
        zk.set_num_threads(2)
        two = step()
        zk.set_num_threads(1)
        seen = []
        th = threading.Thread(target=lambda: seen.append((zk.get_num_threads(), step())))
        th.start()
        th.join()
        assert seen[0][0] == 1 and torch.equal(seen[0][1], two)
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="positive int"):
                zk.set_num_threads(bad)
    finally:
        zk.set_num_threads(None)
    assert zk.get_num_threads() == default


def _available_memory() -> int:
    """Bytes the kernel says a new allocation can take now (MemAvailable; 0 where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def _philox_normals(seed: int, step_index: int, lo: int, hi: int) -> torch.Tensor:
    """The docs/design.md §2.8 normals of elements lo..hi-1 of one sample, from their global element index (what
    ``noise.normal`` would give, without allocating the whole sample)."""
    g = torch.arange(lo // 4, (hi + 3) // 4, dtype=torch.int64)
    normals = zn.group_normals(seed & 0xFFFFFFFF, seed >> 32, g, step_index, 0)
    return normals[lo - 4 * (lo // 4):][:hi - lo]


def test_a_latent_over_2_31_elements():
    """64-bit indexing (issue 3 item 2): one sample of n > 2**31 bfloat16 elements, a guided + rescaled Euler step
    then a seeded Euler ancestral step, both in place.  The inputs repeat a random pattern of period P (prime, so
    an index wrapped at 2**31 or 2**32 reads a different value); windows of whole periods at the start, across
    2**31 and at the end are compared with the torch backend on those windows alone.  Whole periods have the
    statistics of the whole sample up to the 1/(N-1) of std, which cancels in the rescale ratio; the noise of a
    window comes from its global element indices (Philox counter g = j // 4 split into two words)."""
    if _available_memory() < 12 * 2**30:  # checked when the test runs, not when it is collected
        pytest.skip("needs 12 GiB free: two bfloat16 latents of 2**31 elements (their size is the point)")
    seed, step_index = 2**40 + 7, 3
    for lo, hi in ((0, 103), (5, 50)):  # the helper is noise.normal's definition
        assert torch.equal(_philox_normals(seed, step_index, lo, hi), zn.normal((1, hi), seed, step_index)[0, lo:])
    period = 1021
    m = (2**31 + period) // period + 1
    n = period * m                                   # 2**31 + 1988: not a multiple of 16 either
    gen = torch.Generator().manual_seed(31)
    y = torch.randn(period, generator=gen).bfloat16().repeat(m).view(1, n)
    fcu = torch.randn(period, generator=gen).bfloat16().repeat(m + 1)[:n + 1]
    f_cond, f_uncond = fcu[None, :n], fcu[None, 1:]  # the pattern and its rotation by one
    starts = [0, (2**31 // period - 1) * period, n - 3 * period]
    windows = [slice(s, s + 3 * period) for s in starts]
    assert windows[1].start < 2**31 < windows[1].stop
    before = [(y[:, w].clone(), f_cond[:, w].clone(), f_uncond[:, w].clone()) for w in windows]
    guided = dict(guidance_scale=4.0, guidance_rescale=0.7, return_denoised=False)
    r = zk.euler_step(y, (f_cond, f_uncond), 3.0, 2.0, out=y, backend="cpu", **guided)
    assert r.y is y
    zk.euler_ancestral_step(y, f_cond, 2.0, 1.0, seed=seed, step_index=step_index, out=y, return_denoised=False,
                            backend="cpu")
    for w, (y0, fc, fu) in zip(windows, before):
        ref = zk.euler_step(y0, (fc, fu), 3.0, 2.0, backend="torch", **guided).y  # rounded to bf16, as in place
        z = _philox_normals(seed, step_index, w.start, w.stop).view(1, -1)  # float32, as the kernel draws them
        ref = zk.euler_ancestral_step(ref.float(), fc.float(), 2.0, 1.0, noise=z, backend="torch").y
        torch.testing.assert_close(y[:, w].float(), ref, atol=tolerances.STEP[torch.bfloat16][0],
                                   rtol=tolerances.STEP[torch.bfloat16][1], msg=lambda m, s=w.start: f"window {s}: {m}")


# ------------------------------------------------------------------- table mode: one coefficient record

_TWO_STAGE = ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral")
_TABLE_SIGMAS = [(6.0, 2.5), (4.0, 1.0), (9.0, 3.0)]  # per sample (sigma, sigma_next)


def _table_args(sampler: str, stage: int, per_sample: bool) -> tuple[list, list]:
    """Step arguments (one per sample, or one for the batch) and where the model was called."""
    pz = parameterization("v", 1.0)
    args, sigma_eval = [], []
    for s, sn in _TABLE_SIGMAS[:3 if per_sample else 1]:
        a = co.StepArgs(sampler, s, sn, stage=stage, sigma_prev=(1.5 * s, 2.2 * s, 3.1 * s), eta=0.5)
        args.append(a)
        sigma_eval.append(co.step_coeffs(pz, a._replace(stage=1)).sigma_out if stage == 2 else s)
    return args, sigma_eval


def _cpp_rows(pz, args, sigma_eval, w: float, phi: float, space: str) -> torch.Tensor:
    """The coefficient table of a step from the C++ coefficient functions (zsnr/coefficients.h through the test
    bindings): the very numbers the computed path rounds, so both paths must give the same bits."""
    from zsnr_kernels.backends import table as T

    rows = []
    for a, se in zip(args, sigma_eval, strict=True):
        c = _ext.C.step_coeffs(call.PREDICTION_CODES[pz.prediction], pz.sigma_data, call.SAMPLER_CODES[a.sampler],
                               a.stage, a.sigma, a.sigma_next, a.sigma_next if a.sigma_hat_next is None else
                               a.sigma_hat_next, list(a.sigma_prev), a.eta, a.s_noise, int(a.solver_type == "heun"),
                               a.order)
        assert c["error"] == 0
        err, p, q = _ext.C.denoise_coeffs(call.PREDICTION_CODES[pz.prediction], pz.sigma_data, se)
        u, t = 0.0, 1.0
        if phi:
            err, u, t = _ext.C.rescale_space_coeffs(call.PREDICTION_CODES[pz.prediction], pz.sigma_data, se,
                                                    call.SPACE_CODES[space])
        row = [0.0] * T.NUM_COEFFS
        row[T.W], row[T.P], row[T.Q], row[T.A], row[T.B], row[T.E] = w, p, q, c["a"], c["b"], c["e"]
        for k, hk in enumerate(c["h"]):
            row[T.H0 + k] = hk
        if c["has_carry"]:
            row[T.GY], row[T.GD] = c["g_y"], c["g_d"]
        row[T.U], row[T.T], row[T.PHI] = u, t, phi
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def _table_case(sampler, stage, per_sample, dtype, guided):
    pz = parameterization("v", 1.0)
    args, sigma_eval = _table_args(sampler, stage, per_sample)
    shape = (3, 4, 9, 13)
    y, fc, fu = (_randn(shape, k).to(dtype) for k in range(3))
    hist = [_randn(shape, 10 + k).to(dtype) for k in range(3)]
    w, phi, space = (4.5, 0.7, "x0") if guided else (1.0, 0.0, "output")
    return pz, args, sigma_eval, y, fc, fu if guided else None, hist, w, phi, space


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


_TABLE_CASES = [(s, 1) for s in co.SAMPLER_KINDS] + [(s, 2) for s in _TWO_STAGE]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "rescale_x0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("sampler,stage", _TABLE_CASES, ids=[f"{s}_s{k}" for s, k in _TABLE_CASES])
def test_table_mode_equals_computed_coefficients_bit_for_bit(sampler, stage, per_sample, dtype, guided):
    """A step run from a coefficient table (csrc/include/zsnr/step_plan.h table mode: each column rounded to float32
    as the computed path rounds, the rescale folded from p, q, u, t in float64) gives the same bits as the same step
    whose coefficients the kernel computes from the sampler and its sigmas, Philox noise included."""
    if not _ext.available():
        pytest.skip("zsnr_kernels._C is not built")
    pz, args, sigma_eval, y, fc, fu, hist, w, phi, space = _table_case(sampler, stage, per_sample, dtype, guided)
    seeds = [5, 2**63 + 7, 2**64 - 1]
    kw = dict(guidance_scale=w, guidance_rescale=phi, rescale_space=space, noise=None, seeds=seeds, step_index=7,
              want_denoised=True, out=None)
    want_y, want_d, want_carry, _, _ = _cpu.fused_step(y, fc, fu, hist, pz, args, sigma_eval, **kw)
    cs = [co.step_coeffs(pz, a) for a in args]
    n_hist = max(len(c.h) for c in cs)
    table = _cpp_rows(pz, args, sigma_eval, w, phi, space)
    got_y, got_d = torch.empty_like(y), torch.empty_like(y)
    got_carry = torch.empty_like(y) if cs[0].carry is not None else None
    _cpu.table_step(y, fc, fu, hist[:n_hist], table, guidance_scale=w, guidance_rescale=phi, rescale_space=space,
                    noise_mode=2 if any(c.e != 0.0 for c in cs) else 0, seeds=seeds, step_index=7, y_out=got_y,
                    d_out=got_d, carry_out=got_carry)
    assert torch.equal(got_y, want_y) and torch.equal(got_d, want_d)
    assert (got_carry is None) == (want_carry is None)
    if got_carry is not None:
        assert torch.equal(got_carry, want_carry)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_3m_sde", "lms"])
def test_a_sampler_without_a_cpp_mirror_runs_from_the_spec_table(monkeypatch, sampler):
    """cpu.fused_step runs a sampler the kernels do not know from the Python spec's coefficient table: here the
    kernels are told they know none, and the step equals the computed one to the float32 rounding of the ~1 ulp
    float64 differences between the spec and coefficients.h."""
    if not _ext.available():
        pytest.skip("zsnr_kernels._C is not built")
    pz, args, sigma_eval, y, fc, fu, hist, w, phi, space = _table_case(sampler, 1, True, torch.float32, True)
    kw = dict(guidance_scale=w, guidance_rescale=phi, rescale_space=space, noise=None, seeds=[1, 2, 3],
              step_index=4, want_denoised=True, out=None)
    want = _cpu.fused_step(y, fc, fu, hist, pz, args, sigma_eval, **kw)
    monkeypatch.setattr(_cpu, "SAMPLER_CODES", {})
    got = _cpu.fused_step(y, fc, fu, hist, pz, args, sigma_eval, **kw)
    for g, v in zip(got[:3], want[:3], strict=True):
        assert (g is None) == (v is None)
        if g is not None:
            torch.testing.assert_close(g, v, rtol=4 * tolerances.F32_EPS, atol=4 * tolerances.F32_EPS * v.abs().max().item())
    assert got[3:] == want[3:]


def test_table_mode_refuses_a_carry_with_noise():
    """The element pass has no variant that both draws noise and writes a carry (LMS never draws noise): a table
    asking for both is refused, not silently run without its noise."""
    if not _ext.available():
        pytest.skip("zsnr_kernels._C is not built")
    from zsnr_kernels.backends import table as T

    y = _randn((2, 3, 5), 0)
    row = [0.0] * T.NUM_COEFFS
    row[T.W], row[T.A], row[T.B], row[T.E], row[T.GY], row[T.GD], row[T.T] = 1.0, 0.5, 0.5, 0.3, 1.0, -1.0, 1.0
    out, carry = torch.zeros_like(y), torch.zeros_like(y)
    with pytest.raises(RuntimeError, match="coefficient table"):
        _cpu.table_step(y, y, None, [], torch.tensor([row], dtype=torch.float64), guidance_scale=1.0,
                        guidance_rescale=0.0, rescale_space="output", noise_mode=2, seeds=[1, 2], step_index=0,
                        y_out=out, carry_out=carry)
    assert not out.any() and not carry.any()
