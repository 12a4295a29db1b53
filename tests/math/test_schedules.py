"""Tests of zsnr_kernels.schedules against diffusers and k-diffusion, plus the zero-SNR (sigma = inf) ends."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import _kdiffusion  # noqa: E402

from zsnr_kernels import schedules as S  # noqa: E402

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale  # noqa: E402

INF = math.inf
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
F32_EPS = 2.0**-24


@pytest.fixture(scope="module")
def kd():
    sampling, external = _kdiffusion.load()
    return sampling, external


@pytest.fixture(scope="module")
def sd():
    return S.DiscreteSchedule.from_betas("scaled_linear")


@pytest.fixture(scope="module")
def zsnr():
    return S.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True)


class float64_default:
    """Run k-diffusion's grid builders (torch.linspace with the default dtype) in float64."""

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


# ---------------------------------------------------------------------------------------------------------------
# betas, zero terminal SNR, sigmas


@pytest.mark.parametrize("kind", S.BETA_SCHEDULES)
def test_betas_match_diffusers(kind):
    ours = S.betas(kind, 1000, 0.00085, 0.012)
    theirs = DDIMScheduler(**{**SD, "beta_schedule": kind}).betas
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    if kind == "squaredcos_cap_v2":
        # diffusers computes these in Python floats and casts: exactly ours rounded to float32
        assert torch.equal(ours.float(), theirs)
    else:
        # diffusers' float32 torch.linspace: a few float32 ulp
        torch.testing.assert_close(ours, theirs.double(), rtol=4 * F32_EPS, atol=0)


def test_betas_linear_defaults_match_ddpm_defaults():
    ours = S.betas("linear", 1000, 0.0001, 0.02)
    theirs = DDIMScheduler().betas  # linear, 1e-4 .. 0.02
    torch.testing.assert_close(ours, theirs.double(), rtol=4 * F32_EPS, atol=0)


def test_rescale_zero_terminal_snr_refuses_a_beta_of_one_before_the_last():
    """alphas_cumprod would reach 0 early and the rescale divide by it (diffusers returns NaN)."""
    with pytest.raises(ValueError, match=r"alphas_cumprod is 0 at timestep 1, before the last"):
        S.rescale_zero_terminal_snr([0.1, 1.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="underflows"):  # no beta of 1: the product underflows
        S.rescale_zero_terminal_snr([0.9999] * 1000)
    assert S.rescale_zero_terminal_snr([0.1, 0.2, 0.5, 1.0])[-1].item() == 1.0


@pytest.mark.parametrize("kind", S.BETA_SCHEDULES)
def test_rescale_zero_terminal_snr(kind):
    b = S.betas(kind)
    z = S.rescale_zero_terminal_snr(b)
    ac, ac0 = S.alphas_cumprod(z), S.alphas_cumprod(b)
    assert ac[-1].item() == 0.0  # bit-exact zero
    assert z[-1].item() == 1.0
    assert z[0].item() == b[0].item() and ac[0].item() == ac0[0].item()  # first value kept exactly
    assert bool((ac[:-1] > 0).all()) and bool((ac[1:] < ac[:-1]).all())
    sig = S.sigmas_from_alphas_cumprod(ac)
    assert sig[-1].item() == INF and bool(torch.isfinite(sig[:-1]).all())
    # Lin et al.: sqrt(abar) is an affine image of the original sqrt(abar)
    a, a_old = ac.sqrt(), ac0.sqrt()
    expected = (a_old - a_old[-1]) * a_old[0] / (a_old[0] - a_old[-1])
    torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-15)

    # diffusers' function run in float64 gives the same betas, except that it recomputes beta[0] as
    # 1 - sqrt(1 - beta[0])**2 (one ulp of 1 away); we keep beta[0] exactly.
    theirs64 = diffusers_rescale(b.clone())
    assert abs(theirs64[0].item() - b[0].item()) <= 4e-16
    torch.testing.assert_close(z[1:], theirs64[1:], rtol=1e-10, atol=1e-15)

    # diffusers' scheduler does it all in float32: cumprod over 1000 steps, then 1 - abar[t]/abar[t-1] with
    # cancellation where beta is small, so its betas are off by up to ~120 float32 ulps of 1 (absolute).  Its
    # alphas_cumprod still ends in exactly 0 too.
    sched = DDIMScheduler(**{**SD, "beta_schedule": kind, "rescale_betas_zero_snr": True})
    torch.testing.assert_close(z, sched.betas.double(), rtol=0, atol=256 * F32_EPS)
    torch.testing.assert_close(ac, sched.alphas_cumprod.double(), rtol=0, atol=16 * F32_EPS)
    assert sched.alphas_cumprod[-1].item() == 0.0


def test_sigmas_from_alphas_cumprod_edges():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = S.sigmas_from_alphas_cumprod([1.0, 0.5, 0.2, 0.0])
    assert s.tolist() == [0.0, 1.0, 2.0, INF]
    d = DDIMScheduler(**SD)
    torch.testing.assert_close(
        S.sigmas_from_alphas_cumprod(d.alphas_cumprod),
        ((1 - d.alphas_cumprod.double()) / d.alphas_cumprod.double()) ** 0.5,
        rtol=1e-15,
        atol=0,
    )


def test_discrete_schedule_properties(sd, zsnr):
    assert sd.num_train_timesteps == zsnr.num_train_timesteps == 1000
    assert not sd.zero_terminal_snr and zsnr.zero_terminal_snr
    assert sd.sigma_max == sd.sigma_max_finite == sd.train_sigmas[-1].item() < 20
    assert zsnr.sigma_max == INF and zsnr.sigma_max_finite == zsnr.train_sigmas[-2].item() > 1000
    assert sd.sigma_min == zsnr.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert zsnr.alphas_cumprod[-1].item() == 0.0
    assert zsnr.log_sigmas[-1].item() == INF
    # from_sigmas / from_alphas_cumprod round trip
    again = S.DiscreteSchedule.from_sigmas(zsnr.train_sigmas)
    assert torch.equal(again.train_sigmas, zsnr.train_sigmas)
    torch.testing.assert_close(again.alphas_cumprod, zsnr.alphas_cumprod, rtol=1e-13, atol=0)
    # the schedule owns a copy
    src = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(S.betas()))
    ds = S.DiscreteSchedule.from_sigmas(src)
    src[0] = 123.0
    assert ds.train_sigmas[0].item() != 123.0


# ---------------------------------------------------------------------------------------------------------------
# timesteps and discrete sampling schedules


SPACING_CASES = [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)]


@pytest.mark.parametrize("spacing,offset", SPACING_CASES)
def test_timesteps_match_diffusers(spacing, offset):
    sched = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    for steps in range(1, 61):
        sched.set_timesteps(steps)
        ours = S.timesteps(steps, 1000, spacing, offset)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, sched.timesteps), (spacing, offset, steps)


@pytest.mark.parametrize("T", [1000, 999, 1024, 37])
@pytest.mark.parametrize("spacing,offset", SPACING_CASES)
def test_timesteps_match_diffusers_every_step_count(T, spacing, offset):
    """Every S in 1..T.  For trailing spacing numpy's float arange returns S + 1 values for some S (T = 1000:
    S = 61, 103, ...), so diffusers ends with a spurious timestep -1; we return the first S of its values."""
    sched = DDIMScheduler(**{**SD, "num_train_timesteps": T}, timestep_spacing=spacing, steps_offset=offset)
    extra = []
    for steps in range(1, T + 1):
        sched.set_timesteps(steps)
        ours = S.timesteps(steps, T, spacing, offset)
        theirs = sched.timesteps
        if len(theirs) != steps:
            assert spacing == "trailing" and len(theirs) == steps + 1 and theirs[-1].item() == -1
            extra.append(steps)
            theirs = theirs[:steps]
        assert torch.equal(ours, theirs), (T, spacing, offset, steps)
    if spacing == "trailing" and T == 1000:
        assert extra[:3] == [61, 103, 121]


@pytest.mark.parametrize("spacing,offset", SPACING_CASES)
@pytest.mark.parametrize("zero", [False, True])
def test_discrete_sigmas(spacing, offset, zero, sd, zsnr):
    model = zsnr if zero else sd
    for steps in range(1, 61):
        sig = model.sigmas(steps, spacing, offset)
        ts = model.timesteps(steps, spacing, offset)
        assert sig.dtype == torch.float64 and sig.shape == (steps + 1,)
        assert sig[-1].item() == 0.0 and not bool(torch.isnan(sig).any())
        assert bool((sig[1:] < sig[:-1]).all())
        assert torch.equal(sig[:-1], model.train_sigmas[ts])
        # trailing and linspace (S > 1) both start at timestep T - 1: inf for a zero-SNR model
        starts_at_last = spacing == "trailing" or (spacing == "linspace" and steps > 1)
        assert (sig[0].item() == INF) == (zero and starts_at_last)


def test_sigmas_offset_past_the_end(sd):
    with pytest.raises(ValueError, match="steps_offset"):
        sd.sigmas(1000, "leading", 1)


# ---------------------------------------------------------------------------------------------------------------
# continuous grids


def _kd_grid(sampling, kind, n, smin, smax, rho):
    if kind == "karras":
        return sampling.get_sigmas_karras(n, smin, smax, rho=rho)
    if kind == "exponential":
        return sampling.get_sigmas_exponential(n, smin, smax)
    return sampling.get_sigmas_polyexponential(n, smin, smax, rho=rho)


def _our_grid(kind, n, smin, smax, rho, **kw):
    if kind == "karras":
        return S.karras(n, smin, smax, rho=rho, **kw)
    if kind == "exponential":
        return S.exponential(n, smin, smax, **kw)
    return S.polyexponential(n, smin, smax, rho=rho, **kw)


@pytest.mark.parametrize("kind", ["karras", "exponential", "polyexponential"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 47])
@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_grids_match_kdiffusion(kd, kind, n, rho):
    sampling, _ = kd
    smin, smax = 0.0291675, 14.614642
    ours = _our_grid(kind, n, smin, smax, rho)
    assert ours.dtype == torch.float64 and ours.shape == (n + 1,) and ours[-1].item() == 0.0
    with float64_default():
        theirs = _kd_grid(sampling, kind, n, smin, smax, rho)
    assert torch.equal(ours, theirs)
    # k-diffusion's default float32 build agrees to float32 rounding, amplified up to rho-fold by the power
    torch.testing.assert_close(ours, _kd_grid(sampling, kind, n, smin, smax, rho).double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("n", [1, 2, 10, 33])
def test_vp_matches_kdiffusion(kd, n):
    sampling, _ = kd
    with float64_default():
        assert torch.equal(S.vp(n), sampling.get_sigmas_vp(n))
        assert torch.equal(S.vp(n, 10.0, 0.5, 1e-2), sampling.get_sigmas_vp(n, 10.0, 0.5, 1e-2))


@pytest.mark.parametrize("kind", ["karras", "exponential", "polyexponential"])
@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_grids_from_inf(kd, kind, n, zsnr):
    sampling, _ = kd
    smin, top = zsnr.sigma_min, zsnr.sigma_max_finite
    ours = _our_grid(kind, n, smin, INF, 7.0, sigma_max_finite=top)
    assert ours.shape == (n + 1,) and not bool(torch.isnan(ours).any())
    assert ours[0].item() == INF and ours[-1].item() == 0.0
    assert bool((ours[1:] < ours[:-1]).all())
    if n > 1:
        assert ours[1].item() == pytest.approx(top, rel=1e-14)
        with float64_default():
            assert torch.equal(ours[1:], _kd_grid(sampling, kind, n - 1, smin, top, 7.0))
    else:
        assert ours.tolist() == [INF, 0.0]
    assert torch.equal(zsnr.grid(kind, n, **({} if kind == "exponential" else {"rho": 7.0})), ours)


def test_grid_from_inf_needs_sigma_max_finite():
    for fn in (S.karras, S.exponential, S.polyexponential):
        with pytest.raises(ValueError, match="sigma_max_finite"):
            fn(10, 0.03, INF)
    # a finite sigma_max ignores sigma_max_finite
    assert torch.equal(S.karras(10, 0.03, 14.6, sigma_max_finite=5.0), S.karras(10, 0.03, 14.6))


def test_grid_convenience(sd):
    assert torch.equal(sd.grid("karras", 12), S.karras(12, sd.sigma_min, sd.sigma_max))
    assert torch.equal(sd.grid("karras", 12, rho=5.0, sigma_max=3.0), S.karras(12, sd.sigma_min, 3.0, 5.0))
    assert torch.equal(sd.grid("vp", 12), S.vp(12))


# ---------------------------------------------------------------------------------------------------------------
# sigma <-> t


def test_sigma_to_t_nearest_round_trip(sd, zsnr):
    for model in (sd, zsnr):
        t = model.sigma_to_t(model.train_sigmas, "nearest")
        assert t.dtype == torch.int64 and torch.equal(t, torch.arange(1000))
        assert torch.equal(model.t_to_sigma(t), model.train_sigmas)
        for i in (0, 1, 500, 998, 999):
            assert model.sigma_to_t(model.train_sigmas[i].item()) == i
            assert model.t_to_sigma(i) == model.train_sigmas[i].item()


def test_sigma_to_t_interp_round_trip(sd, zsnr):
    t = torch.linspace(0, 998, 2001, dtype=torch.float64)
    for model in (sd, zsnr):
        back = model.sigma_to_t(model.t_to_sigma(t), "interp")
        torch.testing.assert_close(back, t, rtol=0, atol=1e-9)


def test_sigma_to_t_ends(sd, zsnr):
    for model in (sd, zsnr):
        for mode in ("nearest", "interp"):
            assert model.sigma_to_t(INF, mode) == 999
            assert model.sigma_to_t(0.0, mode) == 0
            assert model.sigma_to_t(model.sigma_min / 10, mode) == 0
            out = model.sigma_to_t(torch.tensor([INF, 0.0, 1.0]), mode)
            assert not bool(torch.isnan(out.double()).any())
    # above the largest finite sigma of a zero-SNR model: weight 0 towards log(inf)
    for mode in ("nearest", "interp"):
        assert zsnr.sigma_to_t(zsnr.sigma_max_finite * 10, mode) == 998
        assert sd.sigma_to_t(sd.sigma_max * 10, mode) == 999
    assert zsnr.t_to_sigma(998.5) == INF and zsnr.t_to_sigma(999) == INF
    assert zsnr.t_to_sigma(998.0) == zsnr.sigma_max_finite
    assert math.isfinite(sd.t_to_sigma(998.5))


def test_sigma_to_t_matches_kdiffusion(kd, sd):
    _, external = kd
    ref = external.DiscreteSchedule(sd.train_sigmas, quantize=False)
    sig = torch.cat([torch.logspace(-2, 1.3, 777, dtype=torch.float64), sd.train_sigmas[::7]])
    assert torch.equal(sd.sigma_to_t(sig, "nearest"), ref.sigma_to_t(sig, quantize=True))
    torch.testing.assert_close(sd.sigma_to_t(sig, "interp"), ref.sigma_to_t(sig), rtol=0, atol=1e-12)
    # k-diffusion casts t to float32: compare at t exactly representable in float32
    t = torch.arange(0, 999 * 8 + 1, dtype=torch.float64) / 8
    torch.testing.assert_close(sd.t_to_sigma(t), ref.t_to_sigma(t), rtol=1e-14, atol=0)


def test_t_to_sigma_integer_tensors(zsnr):
    t = torch.tensor([999, 0, 500])
    assert torch.equal(zsnr.t_to_sigma(t), zsnr.train_sigmas[t])


# ---------------------------------------------------------------------------------------------------------------
# quantization


def _brute(s: float, table: list[float], space: str) -> float:
    if s == 0 or s == INF:
        return s
    best, best_d = None, INF
    for v in table:
        if not (0 < v < INF):
            continue
        d = abs(math.log(s) - math.log(v)) if space == "log" else abs(s - v)
        if d < best_d:
            best, best_d = v, d
    return best


@pytest.mark.parametrize("space", ["log", "linear"])
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_quantize_against_brute_force(space, order, zsnr):
    table = zsnr.train_sigmas if order == "ascending" else zsnr.train_sigmas.flip(0)
    sig = torch.cat([torch.tensor([INF, 0.0, 1e9, 1e-9]), torch.logspace(-3, 4, 300, dtype=torch.float64)])
    got = S.quantize(sig, table, space)
    want = [_brute(s, table.tolist(), space) for s in sig.tolist()]
    assert got.tolist() == want
    assert got[0].item() == INF and got[1].item() == 0.0
    assert got[2].item() == zsnr.sigma_max_finite  # never the inf entry


def test_quantize_types_and_dtypes(zsnr):
    t = zsnr.train_sigmas
    assert isinstance(S.quantize(2.0, t), float)
    assert S.quantize(INF, t) == INF and S.quantize(0.0, t) == 0.0
    x = torch.tensor([[3.0, INF], [0.0, 0.5]], dtype=torch.float32)
    y = S.quantize(x, t)
    assert y.dtype == torch.float32 and y.shape == (2, 2)
    assert torch.equal(y, zsnr.quantize(x))
    assert y[0, 1].item() == INF and y[1, 0].item() == 0.0
    # the caller's tensor is untouched
    assert x[0, 0].item() == 3.0
    # a schedule (descending, with inf first and a final 0) as the table
    sched = zsnr.sigmas(10, "trailing")
    q = S.quantize(torch.tensor([5000.0, 1e-6, 2.0], dtype=torch.float64), sched)
    assert q.tolist() == [sched[1].item(), sched[-2].item(), _brute(2.0, sched.tolist(), "log")]


def test_quantize_matches_kdiffusion(kd, sd):
    _, external = kd
    ref = external.DiscreteSchedule(sd.train_sigmas, quantize=True)
    sig = torch.logspace(-2, 1.3, 999, dtype=torch.float64)
    # (ref.t_to_sigma would return exp(log(sigma)), which is not bit-exact: index the table instead)
    assert torch.equal(S.quantize(sig, sd.train_sigmas), sd.train_sigmas[ref.sigma_to_t(sig)])


def test_quantize_linear_vs_log_differ():
    table = [1.0, 3.0]
    # the log midpoint is sqrt(3) = 1.732, the linear one 2
    assert S.quantize(1.7, table, "log") == S.quantize(1.7, table, "linear") == 1.0
    assert S.quantize(1.9, table, "log") == 3.0
    assert S.quantize(1.9, table, "linear") == 1.0


_sigma = st.one_of(
    st.just(0.0), st.just(INF), st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)
)
_table = st.lists(
    st.one_of(st.just(INF), st.just(0.0), st.floats(min_value=1e-200, max_value=1e200)), min_size=1, max_size=20
).filter(lambda t: any(0 < v < INF for v in t))


@settings(max_examples=300, deadline=None)
@given(sigmas=st.lists(_sigma, min_size=1, max_size=10), table=_table, space=st.sampled_from(["log", "linear"]))
def test_quantize_properties(sigmas, table, space):
    q = S.quantize(torch.tensor(sigmas, dtype=torch.float64), table, space)
    assert not bool(torch.isnan(q).any())
    finite_table = {v for v in table if 0 < v < INF}
    for s, v in zip(sigmas, q.tolist()):
        if s in (0.0, INF):
            assert v == s
        else:
            assert v in finite_table
    assert torch.equal(S.quantize(q, table, space), q)  # idempotent
    assert [S.quantize(s, table, space) for s in sigmas] == q.tolist()  # scalar path agrees


@settings(max_examples=200, deadline=None)
@given(t=st.floats(min_value=0, max_value=999))
def test_t_to_sigma_never_nan(t):
    model = S.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True)
    s = model.t_to_sigma(t)
    assert not math.isnan(s) and s > 0
    back = model.sigma_to_t(s, "interp")
    if s < INF:
        assert back == pytest.approx(t, abs=1e-6)
    else:
        assert t > 998


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: S.betas("cosine"), "kind"),
        (lambda: S.betas("linear", 1), "num_train_timesteps"),
        (lambda: S.betas("linear", 1000, -1.0, 0.01), "beta_start"),
        (lambda: S.betas("scaled_linear", 1000, 0.001, 1.5), "beta_end"),
        (lambda: S.rescale_zero_terminal_snr([0.1, float("nan")]), "betas"),
        (lambda: S.rescale_zero_terminal_snr([0.1, 2.0]), "betas"),
        (lambda: S.alphas_cumprod([[0.1]]), "betas"),
        (lambda: S.sigmas_from_alphas_cumprod([1.5]), "alphas_cumprod"),
        (lambda: S.timesteps(0), "num_steps"),
        (lambda: S.timesteps(1001), "num_steps"),
        (lambda: S.timesteps(10, spacing="uniform"), "spacing"),
        (lambda: S.timesteps(10, steps_offset=-1), "steps_offset"),
        (lambda: S.karras(0, 0.1, 10.0), "n"),
        (lambda: S.karras(10, 0.0, 10.0), "sigma_min"),
        (lambda: S.karras(10, -1.0, 10.0), "sigma_min"),
        (lambda: S.karras(10, 1.0, 0.5), "sigma_max"),
        (lambda: S.karras(10, 0.1, float("nan")), "sigma_max"),
        (lambda: S.karras(10, 0.1, 10.0, rho=0.0), "rho"),
        (lambda: S.exponential(10, 0.1, INF, sigma_max_finite=INF), "sigma_max_finite"),
        (lambda: S.exponential(10, 0.1, INF, sigma_max_finite=0.05), "sigma_max_finite"),
        (lambda: S.vp(10, eps_s=0.0), "eps_s"),
        (lambda: S.quantize(-1.0, [1.0]), "sigmas"),
        (lambda: S.quantize(torch.tensor([1.0, -2.0]), [1.0]), "sigmas"),
        (lambda: S.quantize(1.0, [1.0], space="cubic"), "space"),
        (lambda: S.quantize(1.0, [INF, 0.0]), "table"),
        (lambda: S.quantize(1.0, [-1.0, 1.0]), "table"),
        (lambda: S.DiscreteSchedule.from_sigmas([2.0, 1.0]), "train_sigmas"),
        (lambda: S.DiscreteSchedule.from_sigmas([1.0, INF, 3.0]), "train_sigmas"),
        (lambda: S.DiscreteSchedule.from_sigmas([1.0]), "train_sigmas"),
        (lambda: S.DiscreteSchedule.from_betas("scaled_linear").grid("ddim", 10), "kind"),
        (lambda: S.DiscreteSchedule.from_betas("scaled_linear").sigma_to_t(1.0, "round"), "mode"),
        (lambda: S.DiscreteSchedule.from_betas("scaled_linear").sigma_to_t(-1.0), "sigma"),
        (lambda: S.DiscreteSchedule.from_betas("scaled_linear").t_to_sigma(1000), "t"),
        (lambda: S.DiscreteSchedule.from_betas("scaled_linear").t_to_sigma(torch.tensor([-0.5])), "t"),
    ],
)
def test_bad_input_raises_value_error(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: S.timesteps(2.5), "num_steps"),
        (lambda: S.timesteps(True), "num_steps"),
        (lambda: S.betas("linear", "1000"), "num_train_timesteps"),
        (lambda: S.karras(10, "0.1", 10.0), "sigma_min"),
        (lambda: S.karras(10, 0.1, 10.0, rho=True), "rho"),
        (lambda: S.quantize(1.0, [1.0], space=3), "space"),
        (lambda: S.quantize(1.0, [[1.0], ["a"]]), "table"),
        (lambda: S.DiscreteSchedule.from_betas("scaled_linear").t_to_sigma("3"), "t"),
    ],
)
def test_bad_type_raises_type_error(call, name):
    """The schedules speak the steps' dialect: a wrong type is a TypeError, a wrong value a ValueError, each naming
    the argument."""
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        call()
