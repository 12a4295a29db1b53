"""The shared C++ coefficient functions (csrc/include/zsnr/coefficients.h) against the Python spec.

The kernels compute per-sample step coefficients in float64 from per-sample sigmas (docs/design.md §2.9) with the
header's ``ZSNR_HD`` functions; these must be the Python functions of :mod:`zsnr_kernels.coefficients`,
:mod:`zsnr_kernels.parameterization` and :func:`zsnr_kernels.schedules.quantize`, special cases at sigma = inf
and sigma_next = 0 included.  The Python side is built the way :mod:`zsnr_kernels.steps` builds it (churn folded
with ``with_churn`` into complete steps, stage 2 with the same sigmas as stage 1, history newest first).  Every
field must agree to 1e-13 relative (or 1e-300 absolute); flags and error-vs-exception behaviour must be identical.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from zsnr_kernels import coefficients as co
from zsnr_kernels import schedules
from zsnr_kernels.parameterization import PREDICTIONS, Parameterization, rescale_space_coeffs

_C = pytest.importorskip("zsnr_kernels._C", reason="compiled CPU module not built")
if not hasattr(_C, "step_coeffs"):
    pytest.skip("the compiled module predates the coefficient bindings; rebuild", allow_module_level=True)

INF = math.inf
RTOL, ATOL = 1e-13, 1e-300

# Enum values of coefficients.h, as the module exports them (tests/backends/test_compiled_constants.py checks them against
# the Python tables).
PRED = dict(_C.PREDICTIONS)  # v 0, eps 1, x0 2, flow 3
SPACE = dict(_C.RESCALE_SPACES)
KIND = dict(_C.SAMPLER_KINDS)
SAMPLERS = tuple(KIND)  # the samplers coefficients.h mirrors
OK, ERR_EPS_AT_INF, ERR_SIGMA_ORDER, ERR_DDIM_ETA, ERR_STAGE, ERR_CHURN, ERR_BAD_ARG = (
    _C.STEP_ERRORS[k] for k in ("ok", "eps_at_inf", "sigma_order", "ddim_eta", "stage", "churn", "bad_arg"))
TWO_STAGE = ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral")
CHURN_SAMPLERS = ("euler", "heun", "dpm_2")  # the samplers that fold the next step's churn in


# ------------------------------------------------------------------------------------------- the Python side


def py_step(pz, sampler, stage, sigma, sigma_next, sigma_hat_next, prev, eta, s_noise, solver_heun, order):
    """The spec's coefficients for one C++ ``StepArgs``, assembled as steps.py does."""
    prev = tuple(prev)
    if sampler == "euler":
        c = co.euler(pz, sigma, sigma_next)
    elif sampler == "euler_ancestral":
        c = co.ancestral(pz, sigma, sigma_next, eta, s_noise)
    elif sampler == "heun":
        c = co.heun(pz, sigma, sigma_next, stage)
    elif sampler == "dpm_2":
        c = co.dpm_2(pz, sigma, sigma_next, stage)
    elif sampler == "dpm_2_ancestral":
        c = co.dpm_2_ancestral(pz, sigma, sigma_next, eta, s_noise, stage=stage)
    elif sampler == "dpmpp_2s_ancestral":
        c = co.dpmpp_2s_ancestral(pz, sigma, sigma_next, eta, s_noise, stage=stage)
    elif sampler == "dpmpp_2m":
        c = co.dpmpp_2m(pz, sigma, sigma_next, prev[0] if prev else None)
    elif sampler == "dpmpp_2m_sde":
        c = co.dpmpp_2m_sde(pz, sigma, sigma_next, prev[0] if prev else None, eta, s_noise,
                            "heun" if solver_heun else "midpoint")
    elif sampler == "dpmpp_3m_sde":
        c = co.dpmpp_3m_sde(pz, sigma, sigma_next, prev[:2], eta, s_noise)
    elif sampler == "ddim":  # steps.ddim_step
        c = co.ancestral(pz, sigma, sigma_next, eta, 1.0, clamp=False)
    elif sampler == "ddpm":  # steps.ddpm_step
        c = co.ancestral(pz, sigma, sigma_next, 1.0, 1.0, clamp=False)
    elif sampler == "lms":
        c = co.lms(pz, sigma, sigma_next, prev[: order - 1], order)
    else:
        raise AssertionError(sampler)
    if sampler in CHURN_SAMPLERS and c.complete and sigma_hat_next != c.sigma_out:  # steps._two_stage
        c = co.with_churn(c, pz, sigma_hat_next, s_noise)
    if hasattr(co, "step_coeffs"):  # the shared Python dispatch must agree with the one written out here
        shared = co.step_coeffs(pz, co.StepArgs(sampler, sigma, sigma_next, stage, sigma_hat_next, prev, eta,
                                                s_noise, "heun" if solver_heun else "midpoint", order))
        assert shared == c, (shared, c)
    return c


def expected_error(exc: Exception) -> int:
    """The C++ error code that stands for a Python exception of the spec."""
    msg = str(exc)
    if "sigma > sigma_next" in msg or "math domain error" in msg or isinstance(exc, ZeroDivisionError):
        return ERR_SIGMA_ORDER
    if "DDIM variance" in msg:
        return ERR_DDIM_ETA
    if "first stage" in msg:
        return ERR_STAGE
    if "churn" in msg:
        return ERR_CHURN
    if "sigma = inf" in msg:
        return ERR_EPS_AT_INF
    raise AssertionError(f"unmapped exception {exc!r}")


def close(x: float, y: float) -> bool:
    if x == y:
        return True
    return abs(x - y) <= max(ATOL, RTOL * max(abs(x), abs(y)))


def c_step(pred, sd, sampler, stage, sigma, sn, shn, prev, eta, s_noise, solver_heun, order):
    return _C.step_coeffs(PRED[pred], sd, KIND[sampler], stage, sigma, sn, shn, list(prev), eta, s_noise,
                          solver_heun, order)


def check_case(pred, sd, sampler, stage, sigma, sn, shn, prev=(), eta=0.0, s_noise=1.0, solver_heun=0, order=4):
    """Compare one case; returns the Python coefficients (or None when both sides refused)."""
    args = (pred, sd, sampler, stage, sigma, sn, shn, prev, eta, s_noise, solver_heun, order)
    got = c_step(*args)
    try:
        want = py_step(Parameterization(pred, sd), sampler, stage, sigma, sn, shn, prev, eta, s_noise,
                       solver_heun, order)
    except (ValueError, ZeroDivisionError) as exc:
        assert got["error"] == expected_error(exc), (args, exc, got)
        return None
    assert got["error"] == OK, (args, got)
    assert got["complete"] == want.complete, (args, got, want)
    assert got["n_hist"] == len(want.h), (args, got, want)
    assert got["has_carry"] == (want.carry is not None), (args, got, want)
    pairs = [("a", want.a), ("b", want.b), ("e", want.e), ("sigma_out", want.sigma_out)]
    pairs += [(f"h[{k}]", w) for k, w in enumerate(want.h)]
    if want.carry is not None:
        pairs += [("g_y", want.carry[0]), ("g_d", want.carry[1])]
    for name, w in pairs:
        g = got["h"][int(name[2])] if name.startswith("h[") else got[name]
        assert close(g, w), (args, name, g, w)
    return want


# ------------------------------------------------------------------------------------------------- the cases


def _sigma_pairs() -> list[tuple[float, float]]:
    rng = np.random.default_rng(20240531)
    pairs = []
    for _ in range(14):  # finite, random
        s = float(10.0 ** rng.uniform(-2.5, 3.0))
        pairs.append((s, s * float(rng.uniform(0.05, 0.95))))
    pairs += [(INF, sn) for sn in (1e-3, 0.5, 14.6, 1e4, 1e150)]              # leaving sigma = inf
    pairs += [(s, 0.0) for s in (0.03, 1.0, 14.6, 1e150, INF)]                  # to sigma_next = 0
    pairs += [(1e150, 1e149), (1e300, 1e120), (3e5, 2e-3)]                      # huge and wide
    pairs += [(2.0, 2.0 * (1 - 1e-9)), (0.7, 0.7 * (1 - 1e-6)), (5.0, math.nextafter(5.0, 0.0))]  # close
    pairs += [(1.0, 1.0), (1.0, 2.0), (1.0, -0.5)]                              # invalid: both must refuse
    return pairs


PAIRS = _sigma_pairs()


def _histories(sigma: float, n_max: int) -> list[tuple[float, ...]]:
    """Decreasing-schedule histories above sigma, newest first, with and without an inf at the oldest end."""
    if sigma == INF:
        return [()]
    out = [()]
    for n in range(1, n_max + 1):
        steps = [1.7, 2.9, 1.3][:n]
        h, s = [], sigma
        for f in steps:
            s = s * f
            h.append(s)
        out.append(tuple(h))
        out.append(tuple(h[:-1]) + (INF,))
    return out


def _churn_targets(sn: float) -> list[float]:
    return [sn] if sn in (0.0, INF) or sn < 0 else [sn, sn * 1.1, sn * (1 + (math.sqrt(2) - 1))]


def _preds(sigma: float):
    for pred in ("v", "x0", "flow", "eps"):
        if pred == "eps" and sigma == INF:
            continue
        for sd in (1.0, 0.5):
            yield pred, sd


ETAS = (0.0, 0.5, 1.0, 1.5)


# --------------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2"])
def test_churn_samplers(sampler):
    """euler / heun / dpm_2 with churn targets and s_noise; stage 2 wherever stage 1 was partial."""
    n = 0
    for (sigma, sn), (pred, sd) in itertools.product(PAIRS, [("v", 1.0), ("x0", 0.5), ("flow", 1.0),
                                                             ("eps", 0.5), ("v", 0.5)]):
        if pred == "eps" and sigma == INF:
            continue
        for shn, s_noise in itertools.product(_churn_targets(sn), (1.0, 0.7, 0.0)):
            first = check_case(pred, sd, sampler, 1, sigma, sn, shn, s_noise=s_noise)
            n += 1
            if sampler != "euler" and first is not None and not first.complete:
                check_case(pred, sd, sampler, 2, sigma, sn, shn, s_noise=s_noise)
                n += 1
    assert n > 500


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim", "ddpm", "dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_ancestral_samplers(sampler):
    """eta in {0, 0.5, 1, 1.5} (1.5: k-diffusion's min() clamp, DDIM's refusal), s_noise, both stages."""
    two = sampler in TWO_STAGE
    for (sigma, sn), (pred, sd), eta, s_noise in itertools.product(PAIRS, _preds(INF), ETAS, (1.0, 0.6)):
        first = check_case(pred, sd, sampler, 1, sigma, sn, sn, eta=eta, s_noise=s_noise)
        if two and first is not None and not first.complete:
            check_case(pred, sd, sampler, 2, sigma, sn, sn, eta=eta, s_noise=s_noise)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lms"])
def test_multistep_samplers(sampler):
    """Histories (newest first, inf at the oldest end included), eta, solver type, LMS order."""
    depth = {"dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m_sde": 2, "lms": 3}[sampler]
    etas = ETAS if sampler in ("dpmpp_2m_sde", "dpmpp_3m_sde") else (0.0,)
    solvers = (0, 1) if sampler == "dpmpp_2m_sde" else (0,)
    orders = (1, 2, 3, 4) if sampler == "lms" else (4,)
    for (sigma, sn), (pred, sd) in itertools.product(PAIRS, _preds(INF)):
        if pred == "eps" and sigma == INF:
            continue
        for prev, eta, solver, order in itertools.product(_histories(sigma, depth), etas, solvers, orders):
            check_case(pred, sd, sampler, 1, sigma, sn, sn, prev, eta=eta, s_noise=0.8, solver_heun=solver,
                       order=order)


def test_every_sampler_eps_and_sigma_data():
    """Every sampler x prediction x sigma_data on finite pairs (eps only where sigma is finite)."""
    for sampler, (sigma, sn) in itertools.product(SAMPLERS, PAIRS[::3]):
        for pred, sd in _preds(sigma):
            prev = () if sigma == INF else (sigma * 2.0, sigma * 5.0, INF)
            first = check_case(pred, sd, sampler, 1, sigma, sn, sn, prev, eta=0.5)
            if first is not None and not first.complete:
                check_case(pred, sd, sampler, 2, sigma, sn, sn, eta=0.5)


def test_churn_only_for_churn_samplers():
    """Only euler/heun/dpm_2 fold churn; the other samplers ignore sigma_hat_next (coefficients.step_coeffs)."""
    for sampler in ("dpmpp_2m", "lms", "ddim", "euler_ancestral", "dpmpp_2m_sde", "dpm_2_ancestral"):
        for sigma, sn in ((3.0, 1.0), (INF, 2.0), (0.5, 0.1)):
            for eta in (0.0, 0.5):
                check_case("v", 1.0, sampler, 1, sigma, sn, sn * 1.3, (), eta=eta)
                plain = c_step("v", 1.0, sampler, 1, sigma, sn, sn, (), eta, 1.0, 0, 4)
                assert c_step("v", 1.0, sampler, 1, sigma, sn, sn * 1.3, (), eta, 1.0, 0, 4) == plain
    # churn targets below sigma_out or at inf are refused
    for shn in (0.5, INF, math.nan):
        assert c_step("v", 1.0, "euler", 1, 3.0, 1.0, shn, (), 0.0, 1.0, 0, 4)["error"] == ERR_CHURN


def test_stage2_after_complete_first_stage():
    """A two-stage step that finished in stage 1 has no stage 2 (Python: _no_stage2 or a meaningless value)."""
    for sampler in TWO_STAGE:
        for sigma, sn in ((INF, 1.0), (2.0, 0.0)):
            assert c_step("v", 1.0, sampler, 1, sigma, sn, sn, (), 0.5, 1.0, 0, 4)["complete"]
            got = c_step("v", 1.0, sampler, 2, sigma, sn, sn, (), 0.5, 1.0, 0, 4)
            assert got["error"] == ERR_STAGE and math.isnan(got["a"]), (sampler, sigma, sn)
        assert c_step("v", 1.0, sampler, 3, 2.0, 1.0, 1.0, (), 0.5, 1.0, 0, 4)["error"] == ERR_STAGE


def test_history_must_lie_above_sigma():
    """History sigmas not above sigma (impossible in a decreasing schedule) are refused, not divided by."""
    for sampler, prev in (("dpmpp_2m", (2.0,)), ("dpmpp_2m_sde", (1.0,)), ("dpmpp_3m_sde", (3.0, 2.5)),
                          ("lms", (3.0, 3.0)), ("dpmpp_2m", (INF,))):
        sigma = INF if prev == (INF,) else 2.0
        assert c_step("v", 1.0, sampler, 1, sigma, 1.0, 1.0, prev, 0.5, 1.0, 0, 4)["error"] == ERR_SIGMA_ORDER


def test_bad_enums():
    assert _C.step_coeffs(7, 1.0, 0, 1, 2.0, 1.0, 1.0, [], 0.0, 1.0, 0, 4)["error"] == ERR_BAD_ARG
    assert _C.step_coeffs(0, 1.0, 42, 1, 2.0, 1.0, 1.0, [], 0.0, 1.0, 0, 4)["error"] == ERR_BAD_ARG
    assert _C.step_coeffs(0, 1.0, KIND["lms"], 1, 2.0, 1.0, 1.0, [], 0.0, 1.0, 0, 0)["error"] == ERR_BAD_ARG
    assert _C.rescale_space_coeffs(0, 1.0, 2.0, 9)[0] == ERR_BAD_ARG
    assert _C.denoise_coeffs(9, 1.0, 2.0)[0] == ERR_BAD_ARG


def test_lms_inf_history_padding():
    """History points at sigma = inf are dropped and their weights padded with 0 at the end, as in Python."""
    got = c_step("v", 1.0, "lms", 1, 3.0, 1.0, 1.0, (5.0, INF), 0.0, 1.0, 0, 4)
    want = co.lms(Parameterization("v", 1.0), 3.0, 1.0, (5.0, INF), 4)
    assert got["n_hist"] == 2 and got["h"][1] == 0.0 and want.h[1] == 0.0
    assert close(got["h"][0], want.h[0])


# ----------------------------------------------------------------------------------- parameterization helpers


def _sigmas_for_pz():
    rng = np.random.default_rng(7)
    return [0.0, 1e-300, 1e-8, 0.03, 1.0, 14.6, 1e4, 1e150, 1e300, INF] + [float(10.0 ** v)
                                                                         for v in rng.uniform(-4, 4, 30)]


@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("sd", [1.0, 0.5])
def test_denoise_and_rescale_coeffs(pred, sd):
    pz = Parameterization(pred, sd)
    for sigma in _sigmas_for_pz():
        err, p, q = _C.denoise_coeffs(PRED[pred], sd, sigma)
        try:
            wp, wq = pz.denoise_coeffs(sigma)
        except ValueError as exc:
            assert err == ERR_EPS_AT_INF == expected_error(exc)
            for space in ("v", "x0"):
                assert _C.rescale_space_coeffs(PRED[pred], sd, sigma, SPACE[space])[0] == ERR_EPS_AT_INF
            assert _C.rescale_space_coeffs(PRED[pred], sd, sigma, SPACE["output"]) == (OK, 0.0, 1.0)
            continue
        assert err == OK and close(p, wp) and close(q, wq), (pred, sd, sigma, p, q, wp, wq)
        for space in SPACE:
            err, u, t = _C.rescale_space_coeffs(PRED[pred], sd, sigma, SPACE[space])
            wu, wt = rescale_space_coeffs(pz, sigma, space)
            assert err == OK and close(t, wt), (pred, sd, sigma, space)
            if space == "v" and pred == "eps":
                # u = p - sd^2 c_in cancels for small sigma; libm's hypot and CPython's may differ by an ulp,
                # so u agrees to an ulp of its terms, not of itself.
                assert abs(u - wu) <= RTOL * (abs(wp) + sd * sd * pz.c_in(sigma)), (sd, sigma, u, wu)
            else:
                assert close(u, wu), (pred, sd, sigma, space, u, wu)


# ----------------------------------------------------------------------------------------- churn_gamma, quantize


def test_churn_gamma():
    sigmas = [0.0, 0.01, 0.05, 1.0, 14.6, 50.0, 80.0, 1e150, INF]
    for sigma, n, s_churn, s_tmin, s_tmax in itertools.product(sigmas, (1, 10, 1000), (0.0, -1.0, 1.0, 40.0, 80.0),
                                                               (0.0, 0.05), (50.0, INF)):
        got = _C.churn_gamma(sigma, n, s_churn, s_tmin, s_tmax)
        want = co.churn_gamma(sigma, n, s_churn, s_tmin, s_tmax)
        assert got == want, (sigma, n, s_churn, s_tmin, s_tmax, got, want)


def _tables():
    sd = schedules.DiscreteSchedule.from_betas("scaled_linear").train_sigmas
    zsnr = schedules.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True).train_sigmas
    assert math.isinf(float(zsnr[-1]))
    with_zero = np.concatenate([[0.0], zsnr.numpy()[::-1]])  # descending, a 0 and an inf
    return {"sd": sd.tolist(), "zsnr": zsnr.tolist(), "zsnr_desc_with_0": with_zero.tolist()}


@pytest.mark.parametrize("name", ["sd", "zsnr", "zsnr_desc_with_0"])
@pytest.mark.parametrize("space", ["log", "linear"])
def test_quantize_sigma(name, space):
    table = _tables()[name]
    rng = np.random.default_rng(11)
    finite = [t for t in table if 0 < t < INF]
    sigmas = [0.0, INF, 1e-9, 1e-3, 1e300, max(finite) * 1.5, min(finite) * 0.5]
    sigmas += finite[::37] + [float(10.0 ** v) for v in rng.uniform(-2.5, 3.5, 200)]
    log_space = space == "log"
    for s in sigmas:
        got = _C.quantize_sigma(s, table, log_space)
        want = schedules.quantize(s, table, space)
        assert got == want, (name, space, s, got, want)
        assert got in (0.0, INF) or 0 < got < INF


def test_quantize_sigma_ties_and_passthrough():
    """Ties go to the first entry in table order; inf/0/NaN/negative pass through; unusable entries skipped."""
    assert _C.quantize_sigma(2.0, [1.0, 3.0], False) == 1.0 == schedules.quantize(2.0, [1.0, 3.0], "linear")
    assert _C.quantize_sigma(2.0, [3.0, 1.0], False) == 3.0 == schedules.quantize(2.0, [3.0, 1.0], "linear")
    assert _C.quantize_sigma(2.0, [4.0, 1.0], True) == 4.0 == schedules.quantize(2.0, [4.0, 1.0], "log")
    assert _C.quantize_sigma(1e6, [0.0, 2.0, INF], True) == 2.0
    assert _C.quantize_sigma(INF, [0.0, 2.0, INF], True) == INF
    assert _C.quantize_sigma(0.0, [1.0], True) == 0.0
    assert math.isnan(_C.quantize_sigma(math.nan, [1.0], True))
    assert _C.quantize_sigma(-1.0, [1.0], True) == -1.0
    assert _C.quantize_sigma(0.5, [0.0, INF], True) == 0.5
