"""The Triton combine kernel (triton_kernels/combine.py) against the Python spec and the CPU backend.

There is no GPU on the build machines, so the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors.  That
variable must be set before Triton sees a kernel, whatever other test modules of this process imported already,
so every launch runs in one fresh interpreter (the ``triton_results`` fixture): this process builds the cases
(inputs and float64 host coefficients), the child runs each through the coefficient table and
``combine.launch``, and the tests here compare
the results with ``zsnr_kernels.reference.fused_step`` in float64, with ``zsnr_kernels.noise.normal`` and with the
``cpu`` backend.

Tolerances: float32 storage, 1e-5 relative to the largest |value| (the kernel rounds each fma in float32,
a few ulp); fp16/bf16 storage, twice the error of the torch reference run in that dtype (both round the
float32 result once to the storage format); Philox normals, 1e-5 absolute (tests/math/test_noise_philox.py NORMAL_ATOL).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from zsnr_kernels import coefficients as co, euler_ancestral_step, noise as nz, reference  # noqa: E402
from zsnr_kernels.backends import ext as _ext  # noqa: E402
from zsnr_kernels import dpmpp_2m_step, lms_step  # noqa: E402
from zsnr_kernels.parameterization import parameterization, rescale_space_coeffs  # noqa: E402
from zsnr_kernels.tools import tolerances  # noqa: E402

INF = math.inf
SHAPE = (2, 3, 7, 9)  # n = 189 per sample: three blocks of 64 with a partial last one
BLOCK = 64
NORMAL_ATOL = tolerances.NORMAL_ATOL
F32_RTOL = 1e-5
SEEDS = [12345, 0xDEAD_BEEF_0BAD_F00D]

requires_C = pytest.mark.skipif(not _ext.available(), reason=f"zsnr_kernels._C: {_ext.why_unavailable()}")

CHILD = textwrap.dedent(
    """
    import os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from zsnr_kernels.backends.table import coefficient_table
    from zsnr_kernels.backends.triton_kernels import combine as K

    def one_or_many(v):
        return list(v) if isinstance(v, list) else [v]

    def run(y, fc, fu, hist, coeffs, *, denoise, guidance_scale=1.0, guidance_rescale=0.0, rescale_uv=(0.0, 1.0),
            noise=None, seeds=None, step_index=0, draw=0, want_denoised=True, want_carry=False, block=None):
        # one case through the backend's launcher: the table of its rows, then combine.launch
        cs, uv = one_or_many(coeffs), one_or_many(rescale_uv)
        table = coefficient_table(cs, one_or_many(denoise), guidance_scale=guidance_scale,
                                  guidance_rescale=guidance_rescale, rescale_uv=uv * (len(cs) // len(uv)))
        n_hist = max(len(c.h) for c in cs)
        noisy = any(c.e != 0.0 for c in cs)
        mode = (1 if noise is not None else 2) if noisy else 0
        out = [torch.empty_like(y), torch.empty_like(y) if want_denoised else None,
               torch.empty_like(y) if want_carry and cs[0].carry is not None else None]
        rescale = fu is not None and guidance_rescale != 0.0
        K.launch(y, fc, fu, hist[:n_hist], table, n_hist=n_hist, rescale=rescale,
                 with_y=any(u != 0.0 for u, _ in uv), noise_mode=mode, noise=noise,
                 seeds=K.seed_tensor(seeds, y.shape[0], y.device) if mode == 2 else None, step_index=step_index,
                 draw=draw, y_out=out[0], d_out=out[1], carry_out=out[2], block=block)
        return tuple(out)

    cases = torch.load(sys.argv[1], weights_only=False)
    torch.save({k: run(*c["args"], **c["kwargs"]) for k, c in cases.items()}, sys.argv[2])
    """
)


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _case(sampler, sigma, sigma_next, *, prediction="v", stage=1, sigma_prev=(), sigma_eval=None, guided=True,
          w=4.0, phi=0.0, space="output", n_hist=None, noise="none", dtype=torch.float32, shape=SHAPE,
          want_carry=False, step_index=3, draw=0, seed=0, seeds=None, block=BLOCK):
    """One step: inputs, the float64 host coefficients (per sample when a sigma is a list) and the launcher's
    keyword arguments.  The same dict drives the Triton child and the float64 reference."""
    pz = parameterization(prediction, 1.0)
    batch = shape[0]
    as_list = lambda v: v if isinstance(v, list) else [v] * batch  # noqa: E731
    sg, sn = as_list(sigma), as_list(sigma_next)
    se = as_list(sigma if sigma_eval is None else sigma_eval)
    args = [co.StepArgs(sampler, sg[i], sn[i], stage=stage, sigma_prev=tuple(sigma_prev)) for i in range(batch)]
    cs = [co.step_coeffs(pz, a) for a in args]
    pq = [pz.denoise_coeffs(s) for s in se]
    uv = [rescale_space_coeffs(pz, s, space) for s in se]
    y = _randn(shape, seed, dtype)
    fc = _randn(shape, seed + 1, dtype)
    fu = _randn(shape, seed + 2, dtype) if guided else None
    k = max(len(c.h) for c in cs) if n_hist is None else n_hist
    hist = [_randn(shape, seed + 10 + j, dtype) for j in range(k)]
    kwargs = dict(denoise=pq, guidance_scale=w if guided else 1.0, guidance_rescale=phi, rescale_uv=uv,
                  step_index=step_index, draw=draw, want_denoised=True, want_carry=want_carry, block=block)
    if noise == "tensor":
        kwargs["noise"] = _randn(shape, seed + 20, dtype)
    elif noise == "philox":
        kwargs["seeds"] = SEEDS[:batch] if seeds is None else seeds
    return dict(args=(y, fc, fu, hist, cs), kwargs=kwargs)


def _sample(case, k, **kwargs):
    """Sample ``k`` of a case with per-sample rows, alone (a batch of 1), with ``kwargs`` replacing the case's."""
    y, fc, fu, hist, cs = case["args"]
    one = lambda t: None if t is None else t[k:k + 1].clone()  # noqa: E731
    kw = {key: [v[k]] if isinstance(v, list) else v for key, v in case["kwargs"].items()}
    if "noise" in kw:
        kw["noise"] = one(kw["noise"])
    return dict(args=(one(y), one(fc), one(fu), [one(h) for h in hist], [cs[k]]), kwargs={**kw, **kwargs})


CASES = {
    "euler_rescale_output": _case("euler", 5.0, 2.0, phi=0.7, space="output"),
    "euler_rescale_x0": _case("euler", 5.0, 2.0, phi=0.7, space="x0", prediction="eps"),
    "euler_rescale_v": _case("euler", 5.0, 2.0, phi=0.7, space="v"),
    "euler_per_sample_rescale_x0": _case("euler", [INF, 5.0], [3.0, 0.5], phi=0.5, space="x0"),
    "euler_unguided": _case("euler", INF, 3.0, guided=False),
    "dpmpp_2m_history": _case("dpmpp_2m", 2.0, 1.0, sigma_prev=(5.0,), phi=0.7, space="v"),
    "lms_carry": _case("lms", 2.0, 1.0, sigma_prev=(3.0, 5.0, 8.0), want_carry=True, prediction="eps"),
    "euler_ancestral_noise_tensor": _case("euler_ancestral", 5.0, 2.0, noise="tensor", phi=0.3),
    "euler_ancestral_philox": _case("euler_ancestral", 5.0, 2.0, noise="philox", step_index=2**32 - 2),
    "heun_stage2": _case("heun", 5.0, 2.0, stage=2, sigma_eval=2.0, n_hist=1),
    "dpmpp_2m_fp16": _case("dpmpp_2m", 2.0, 1.0, sigma_prev=(5.0,), phi=0.7, dtype=torch.float16),
    "dpmpp_2m_bf16": _case("dpmpp_2m", 2.0, 1.0, sigma_prev=(5.0,), phi=0.7, dtype=torch.bfloat16),
    "euler_ancestral_bf16_philox": _case("euler_ancestral", 5.0, 2.0, noise="philox", dtype=torch.bfloat16),
    "lms_fp16_carry": _case("lms", 2.0, 1.0, sigma_prev=(3.0, 5.0, 8.0), want_carry=True, dtype=torch.float16),
    # pure noise: y_out = z exactly (a = b = 0, e = 1); n = 35 is not a multiple of 4
    "philox_only": dict(
        args=(torch.zeros(3, 5, 7), torch.zeros(3, 5, 7), None, [], co.StepCoeffs(a=0.0, b=0.0, e=1.0)),
        kwargs=dict(denoise=(0.0, 1.0), seeds=[0, 2**32, 2**64 - 1], step_index=2**32 - 2, draw=3,
                    want_denoised=False, block=16)),
}


def _cpu_noise_inputs():
    """euler_ancestral from sigma = inf with y = F = 0: y_out = s' u z, Philox noise of the cpu kernel."""
    pz = parameterization("v", 1.0)
    c = co.step_coeffs(pz, co.StepArgs("euler_ancestral", INF, 2.0))
    y = torch.zeros(3, 5, 7)
    return dict(args=(y, y.clone(), None, [], c),
                kwargs=dict(denoise=pz.denoise_coeffs(INF), seeds=[7, 2**63 + 5, 99], step_index=11,
                            want_denoised=False, block=16))


CASES["cpu_noise"] = _cpu_noise_inputs()

# The flat grid's indexing (program -> sample, block): five samples of three blocks each, every one with its own
# coefficient row, Philox seed and statistics
CASES["euler_ancestral_per_sample_batch5"] = _case(
    "euler_ancestral", [INF, 5.0, 2.0, 9.0, 1.0], [3.0, 2.0, 1.0, 4.0, 0.5], noise="philox", phi=0.5, space="v",
    shape=(5, 3, 7, 9), seeds=[1, 2**40 + 3, 5, 2**63 + 7, 9], seed=40)
# More statistics chunks than the fold reads at once (RBLOCK = 64 rows), a partial last one
CASES["rescale_many_chunks"] = _case("euler", 5.0, 2.0, phi=0.7, space="x0", prediction="eps", shape=(2, 66563),
                                     block=None, seed=50)
# Guidance rescale on four samples of 4800 elements (several statistics chunks, a partial last one), launched with
# two blocks and one sample at a time: the sums, and so the bits, depend on neither (docs/design.md §2.7).  Each
# sample's first element (the pivot the sums are taken from) lies PIVOT_OFFSET from the rest, so that a float32 sum
# taken over other blocks rounds differently: with the sums per launch block, blocks of 64 and 256 gave 7671 of
# 19200 y_out elements other bits, one sample at a time 14399 (0 without the offset; error against float64 4.8e-8
# relative, either way).
RESCALE_BATCH, PIVOT_OFFSET = 4, 10.0
CASES["rescale_block_64"] = _case("euler", [5.0, 2.0, 9.0, 1.0], [2.0, 1.0, 4.0, 0.5], phi=0.7, space="v",
                                  shape=(RESCALE_BATCH, 3, 40, 40), seed=30)
for _t in CASES["rescale_block_64"]["args"][:3]:
    _t.view(RESCALE_BATCH, -1)[:, 0] += PIVOT_OFFSET
CASES["rescale_block_256"] = {**CASES["rescale_block_64"], "kwargs": {**CASES["rescale_block_64"]["kwargs"],
                                                                      "block": 256}}
CASES.update({f"rescale_sample_{k}": _sample(CASES["rescale_block_64"], k, block=None) for k in range(RESCALE_BATCH)})


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """Every case of CASES run by combine.launch in one interpreter with TRITON_INTERPRET=1."""
    d = tmp_path_factory.mktemp("triton_combine")
    script, cases, result = d / "child.py", d / "cases.pt", d / "out.pt"
    script.write_text(CHILD)
    torch.save(CASES, cases)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script), str(cases), str(result)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(result, weights_only=False)


def _reference(case, dtype=torch.float64):
    """reference.fused_step on the case's stored inputs, math in ``dtype`` (float64: the exact answer)."""
    y, fc, fu, hist, cs = case["args"]
    kw = case["kwargs"]
    cs = cs if isinstance(cs, list) else [cs] * y.shape[0]
    batch = y.shape[0]
    pq = kw["denoise"] if isinstance(kw["denoise"], list) else [kw["denoise"]] * batch
    uv = kw.get("rescale_uv", (0.0, 1.0))
    uv = uv if isinstance(uv, list) else [uv] * batch
    col = lambda vals: torch.tensor(list(vals), dtype=torch.float64)  # noqa: E731
    n_hist = max(len(c.h) for c in cs)
    e, z = 0.0, None
    if any(c.e != 0.0 for c in cs):
        e = col(c.e for c in cs)
        z = kw["noise"] if "noise" in kw else nz.normal(tuple(y.shape), kw["seeds"], kw["step_index"], kw["draw"])
        z = z.to(dtype)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    carry = (col(c.carry[0] for c in cs), col(c.carry[1] for c in cs)) if kw.get("want_carry") else None
    return reference.fused_step(
        cast(y), cast(fc), cast(fu), p=col(v[0] for v in pq), q=col(v[1] for v in pq), a=col(c.a for c in cs),
        b=col(c.b for c in cs), history=tuple(cast(h) for h in hist[:n_hist]),
        h=tuple(col(c.h[k] for c in cs) for k in range(n_hist)), noise=z, e=e,
        guidance_scale=kw.get("guidance_scale", 1.0), guidance_rescale=kw.get("guidance_rescale", 0.0),
        rescale_uv=(col(v[0] for v in uv), col(v[1] for v in uv)), carry=carry)


def _max_err(got, want):
    return (got.to(torch.float64) - want.to(torch.float64)).abs().max().item()


FLOAT32_CASES = [k for k, c in CASES.items() if c["args"][0].dtype == torch.float32 and k != "cpu_noise"]
LOW_CASES = [k for k, c in CASES.items() if c["args"][0].dtype in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("key", FLOAT32_CASES)
def test_float32_matches_float64_reference(triton_results, key):
    got, want = triton_results[key], _reference(CASES[key])
    for name, g, w in zip(("y_out", "D", "carry"), got, want):
        if w is None or g is None:
            assert g is None or name == "D", f"{name}: kernel returned a tensor the spec does not produce"
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape
        scale = max(w.abs().max().item(), 1.0)
        assert _max_err(g, w) <= F32_RTOL * scale, f"{key} {name}: max error {_max_err(g, w):.3g}"


@pytest.mark.parametrize("key", LOW_CASES)
def test_low_precision_within_twice_the_torch_reference_error(triton_results, key):
    case = CASES[key]
    got, exact = triton_results[key], _reference(case)
    ref_low = _reference(case, dtype=case["args"][0].dtype)  # the torch reference in the storage dtype
    for name, g, w, r in zip(("y_out", "D", "carry"), got, exact, ref_low):
        if w is None or g is None:
            continue
        assert g.dtype == case["args"][0].dtype
        bound = 2.0 * _max_err(r, w) + 1e-6
        assert _max_err(g, w) <= bound, f"{key} {name}: {_max_err(g, w):.3g} > {bound:.3g}"


def test_philox_noise_matches_the_definition(triton_results):
    y_out, d, carry = triton_results["philox_only"]
    assert d is None and carry is None
    kw = CASES["philox_only"]["kwargs"]
    z = nz.normal(tuple(y_out.shape), kw["seeds"], kw["step_index"], kw["draw"])
    torch.testing.assert_close(y_out, z, rtol=0, atol=NORMAL_ATOL)


def test_explicit_noise_is_used_as_given(triton_results):
    """Swapping the tensor noise for Philox noise changes the result only through e z."""
    got = triton_results["euler_ancestral_noise_tensor"][0]
    case = CASES["euler_ancestral_noise_tensor"]
    e = case["args"][4][0].e
    no_noise = _reference({**case,
                           "args": case["args"][:4] + ([co.StepCoeffs(a=c.a, b=c.b) for c in case["args"][4]],)})
    torch.testing.assert_close((got.double() - no_noise[0]) / e, case["kwargs"]["noise"].double(), rtol=0, atol=1e-5)


@requires_C
def test_philox_noise_matches_the_cpu_backend(triton_results):
    case = CASES["cpu_noise"]
    y, kw = case["args"][0], case["kwargs"]
    res = euler_ancestral_step(y, y.clone(), INF, 2.0, seed=kw["seeds"], step_index=kw["step_index"], backend="cpu")
    c = case["args"][4]
    got = triton_results["cpu_noise"][0]
    torch.testing.assert_close(got, res.y, rtol=0, atol=NORMAL_ATOL * abs(c.e))
    z = nz.normal(tuple(y.shape), kw["seeds"], kw["step_index"], 0)
    torch.testing.assert_close(got / c.e, z, rtol=0, atol=NORMAL_ATOL)


@requires_C
@pytest.mark.parametrize("key", ["dpmpp_2m_history", "lms_carry", "euler_ancestral_philox",
                                 "euler_per_sample_rescale_x0"])
def test_triton_matches_cpu_backend(triton_results, key):
    """The same step on the cpu backend (its own coefficients, sums and kernel): float32, ~1e-6."""
    case = CASES[key]
    y, fc, fu, hist, cs = case["args"]
    kw = case["kwargs"]
    common = dict(backend="cpu", guidance_scale=kw["guidance_scale"], guidance_rescale=kw["guidance_rescale"])
    if key == "dpmpp_2m_history":
        res = dpmpp_2m_step(y, (fc, fu), 2.0, 1.0, history=[(5.0, hist[0])], rescale_space="v", **common)
    elif key == "lms_carry":
        res = lms_step(y, (fc, fu), 2.0, 1.0, history=list(zip((3.0, 5.0, 8.0), hist)), prediction="eps", **common)
    elif key == "euler_ancestral_philox":
        res = euler_ancestral_step(y, (fc, fu), 5.0, 2.0, seed=kw["seeds"], step_index=kw["step_index"], **common)
    else:
        from zsnr_kernels import euler_step
        res = euler_step(y, (fc, fu), [INF, 5.0], [3.0, 0.5], rescale_space="x0", **common)
    y_out, d, carry = triton_results[key]
    scale = max(res.y.abs().max().item(), 1.0)
    assert _max_err(y_out, res.y) <= 2e-6 * scale
    assert _max_err(d, res.denoised) <= 2e-6 * max(res.denoised.abs().max().item(), 1.0)
    if carry is not None:
        assert _max_err(carry, res.derivative) <= 2e-6 * max(res.derivative.abs().max().item(), 1.0)


def test_rescale_bits_depend_on_neither_the_launch_block_nor_the_batch(triton_results):
    """A batch of 4 launched with blocks of 64 and of 256 elements, and each sample alone with the block
    launch_block picks for it: the same bits (the statistics are summed per fixed chunk, not per launch block).
    NOTE: before the fix (sums per launch block) the outputs of the two blocks differed."""
    want = triton_results["rescale_block_64"]
    alone = [triton_results[f"rescale_sample_{k}"] for k in range(RESCALE_BATCH)]
    for i, name in enumerate(("y_out", "D")):
        assert (triton_results["rescale_block_256"][i] != want[i]).sum().item() == 0, f"{name}: block 256 != 64"
        assert (torch.cat([r[i] for r in alone]) != want[i]).sum().item() == 0, f"{name}: one at a time != batch"
