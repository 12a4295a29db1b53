"""The tensor mirrors of unipc and the CFG++ rows (``coefficients._TENSOR_COEFFS``, docs/design.md §2.9) equal their
float coefficient functions per sample, on batches that mix sigma = inf, sigma_next = 0, remembered sigmas at inf,
every UniPC order 1-3 with every corrector order 0-3 and both variants, and every CFG++ stage and eta.

Tolerance.  Each mirror repeats its float function operation by operation (UniPC's elimination with the same pivots
and the same sums in the same order, its phi series summed term by term to the same stopping point: those are the
same bits, tested below), so the only differences are torch's log, expm1, hypot and sqrt against libm's, each within
an ulp (torch's vectorised float64 sqrt is not always libm's correctly rounded one).  An ulp of an input moves a
weight by a few ulps of the terms it is formed from, which can be larger than the weight itself where they cancel
(CFG++'s c'(1 - sigma_mid/sigma) for a short step), so the D weights (b, b_u, h) are compared against the largest
D weight of the step, c_in(sigma_out) included (the sum of a CFG++ step's D weights), and the others (a, e,
sigma_out, carry) against themselves:

* CFG++: REL_CFG_PP = 8 ulps.  Measured over 40 random seeds of these rows: at most 2.4 ulps.
* UniPC's y weight (a quotient of noise scales, no solve): REL_A = 4 ulps; measured at most 2 ulps (15 seeds).
* UniPC's D and history weights come out of a small Vandermonde solve, whose conditioning amplifies the input ulps
  (the recursion for phi_k at |h| >= 1/2 also loses about a digit to cancellation): REL_UNIPC = 2e-14 (90 ulps) of the
  step's largest weight.  Measured over 15 random seeds of these schedules (log-sigma steps from 1e-3 to 3,
  consecutive ones within a factor 30 of each other, as schedules are, and one step of 8 after shorter ones): at most
  2.7e-15 (12 ulps); most samples are the same bits.  (For
  pathological histories, steps 1e9 times shorter than their neighbours, the float path's own result has lost most of
  its digits to the conditioning, and the two differ by as much: 2e-7 at such a step.)

Where a coefficient's limit is exact (sigma = inf, sigma_next = 0, a dropped point) both sides are the same bits."""

from __future__ import annotations

import math
import random

import pytest
import torch

from zsnr_kernels import coefficients as co
from zsnr_kernels.parameterization import parameterization

INF = math.inf
F64 = torch.float64
EPS = 2.0**-52
REL_CFG_PP = 8 * EPS
REL_UNIPC = 2e-14
REL_A = 4 * EPS
PREDICTIONS = [("v", 1.0), ("x0", 0.5), ("flow", 1.0), ("eps", 0.5)]


def _col(vals):
    return torch.tensor(vals, dtype=F64)


def _close(got: float, want: float, scale: float, rel: float) -> bool:
    return got == want or abs(got - want) <= rel * scale


# ------------------------------------------------------------------------------------------------------------ UniPC


def _histories(rng: random.Random, depth: int, n: int):
    """n (sigma, sigma_next, sigma_prev) rows with ``depth`` remembered sigmas: random schedules (log-sigma steps
    from 1e-3 to 3, one next to the other within a factor 30), and the edges: sigma' = 0, the oldest remembered
    sigma at inf (dropped from the order conditions), small steps (|h| < 1/2: the phi series), a step of 8 after
    shorter ones; with no history, sigma = inf (to a finite sigma' and to 0)."""
    rows = []
    while len(rows) < n:
        kind = len(rows) % 6
        s = math.exp(rng.uniform(-5.0, 5.0))
        base = math.exp(rng.uniform(math.log(1e-3), math.log(3.0)))
        step = lambda: base * math.exp(rng.uniform(-1.7, 1.7))  # noqa: E731 -- within a factor 30 of each other
        if kind == 3:
            base = rng.uniform(0.005, 0.2)  # many steps: |h| well below 1/2
        sn = 0.0 if kind == 1 else s * math.exp(-(8.0 if kind == 4 else step()))
        prev, below = [], s
        for k in range(depth):
            below = INF if (kind in (2, 5) and k == depth - 1) else below * math.exp(step())
            prev.append(below)
        rows.append((s, sn, prev))
    if depth == 0:  # the step from sigma = inf (only without history: a remembered sigma is above sigma)
        rows[0] = (INF, rows[0][1] or 2.0, [])
        rows[5] = (INF, 0.0, [])
    return rows


def _unipc_cases():
    for depth in range(4):
        for order in range(1, 4):
            for corrector in range(depth + 1):
                for variant in co.UNIPC_VARIANTS:
                    yield depth, order, corrector, variant


@pytest.mark.parametrize("prediction,sd", PREDICTIONS)
def test_unipc_mirror_equals_the_float_coefficients(prediction, sd):
    pz = parameterization(prediction, sd)
    rng = random.Random(17)
    checked = 0
    for depth, order, corrector, variant in _unipc_cases():
        rows = _histories(rng, depth, 24)
        a = co.StepArgs("unipc", _col([r[0] for r in rows]), _col([r[1] for r in rows]),
                        sigma_prev=tuple(_col([r[2][k] for r in rows]) for k in range(depth)), order=order,
                        corrector=corrector, solver_type=variant)
        got, ok = co._TENSOR_COEFFS["unipc"](pz, a)
        assert ok.tolist() == [True] * len(rows)
        full = co.step_coeffs_tensor(pz, a)  # the whole device path: the same numbers, every check passed
        assert full.ok.all() and not full.noisy and full.complete
        assert torch.equal(full.a, got.a) and torch.equal(full.b, got.b) and len(full.h) == len(got.h) == depth
        assert all(torch.equal(x, y) for x, y in zip(full.h, got.h))
        for i, (s, sn, prev) in enumerate(rows):
            want = co.step_coeffs(pz, a._replace(sigma=s, sigma_next=sn, sigma_prev=tuple(prev)))
            hs = list(want.h) + [0.0] * (depth - len(want.h))
            scale = max([abs(want.b)] + [abs(v) for v in hs])
            where = (depth, order, corrector, variant, s, sn, prev)
            assert _close(got.a[i].item(), want.a, abs(want.a), REL_A), where
            assert _close(got.b[i].item(), want.b, scale, REL_UNIPC), where
            for k in range(depth):
                assert _close(got.h[k][i].item(), hs[k], scale, REL_UNIPC), (where, k)
            assert got.sigma_out[i].item() == want.sigma_out
            checked += 1
    assert checked == 24 * sum(1 for _ in _unipc_cases())


def test_unipc_mirror_is_exact_at_the_ends():
    """Where the float path takes a limit, the mirror gives the same bits: the step from inf and to 0 (Euler),
    bh2's corrector after a remembered sigma = inf (weights +-1/2 of sigma'/sigma), bh1's skipped there, a dropped
    oldest point (weight exactly 0)."""
    pz = parameterization("v")
    cases = [  # sigma, sigma_next, sigma_prev, order, corrector, variant
        (INF, 3.0, (), 2, 0, "bh2"), (INF, 0.0, (), 3, 0, "bh1"), (2.0, 0.0, (5.0, 9.0, 20.0), 3, 3, "bh2"),
        (2.0, 1.0, (INF,), 2, 1, "bh2"), (2.0, 1.0, (INF,), 2, 1, "bh1"), (2.0, 1.0, (5.0, INF), 3, 2, "bh1"),
        (2.0, 1.0, (5.0, 9.0, INF), 3, 3, "bh2"), (2.0, 0.5, (4.0, INF), 3, 0, "bh2"),
    ]
    for s, sn, prev, order, corrector, variant in cases:
        a = co.StepArgs("unipc", s, sn, sigma_prev=prev, order=order, corrector=corrector, solver_type=variant)
        want = co.step_coeffs(pz, a)
        got, ok = co._TENSOR_COEFFS["unipc"](pz, a._replace(sigma=_col([s]), sigma_next=_col([sn]),
                                                            sigma_prev=tuple(_col([p]) for p in prev)))
        assert bool(ok)
        if INF in (s,) or sn == 0.0:
            assert (got.b.item(), [h.item() for h in got.h]) == (want.b, list(want.h)), (s, sn, prev)
        for k, p in enumerate(prev):
            if p == INF and k > 0:  # a dropped point: weight exactly 0 (the corrector's oldest point is prev[k])
                assert got.h[k].item() == want.h[k] == 0.0, (s, sn, prev, k)


def test_unipc_mirror_solves_and_sums_like_the_float_path():
    """The batched elimination and the phi series are the float path's operations: the same bits, pivot swaps
    included; above |z| = 1/2 phi is the same recursion from torch's expm1 (an ulp from libm's, amplified by the
    recursion's cancellation: 1e-14)."""
    rng = random.Random(3)
    for m in (1, 2, 3):
        lhs = [[rng.uniform(-3.0, 3.0) for _ in range(m)] for _ in range(m)]
        rows = [[[rng.uniform(-3.0, 3.0) for _ in range(m)] for _ in range(m)] for _ in range(40)]
        rhs = [[rng.uniform(-1.0, 1.0) for _ in range(m)] for _ in range(40)]
        rows[0] = lhs
        got = co._t_solve([[_col([r[i][j] for r in rows]) for j in range(m)] for i in range(m)],
                          [_col([v[i] for v in rhs]) for i in range(m)])
        for n, (r, v) in enumerate(zip(rows, rhs)):
            assert [x[n].item() for x in got] == co._solve(r, v)
    zs = [0.0, 1e-9, -1e-3, 0.2, -0.3, 0.49999, -0.49999, 0.5, -0.5, -1.0, -7.5, -40.0, -INF]
    stacked = co._t_phi_scaled([(3, _col(zs)), (1, _col(zs)), (2, _col(zs[::-1]))])
    alone = co._t_phi_scaled([(2, _col(zs[::-1]))])[0]  # one k alone: the same bits
    torch.testing.assert_close(stacked[2], alone, rtol=0.0, atol=0.0, equal_nan=True)
    for k, got in ((3, stacked[0]), (1, stacked[1]), (2, stacked[2].flip(0))):
        for z, g in zip(zs, got.tolist()):
            want = co._phi_scaled(k, z) if z != -INF else None
            if want is None:
                continue
            if abs(z) < 0.5:
                assert g == want, (k, z)
            else:
                assert g == pytest.approx(want, rel=1e-14, abs=0.0), (k, z)


def test_unipc_mirror_refuses_what_the_float_path_refuses():
    """A remembered sigma not above sigma (or not growing with age) is ok False for that sample only; the orders,
    the variant and the history depth are host values, refused at once as the float path refuses them."""
    pz = parameterization("v")
    a = co.StepArgs("unipc", _col([2.0, 2.0, 2.0]), _col([1.0, 1.0, 0.0]),
                    sigma_prev=(_col([4.0, 1.5, 4.0]), _col([8.0, 8.0, 3.0])), order=3, corrector=2,
                    solver_type="bh2")
    _, ok = co._TENSOR_COEFFS["unipc"](pz, a)
    assert ok.tolist() == [True, False, False]
    for i in (1, 2):
        with pytest.raises(ValueError, match="history sigmas"):
            co.step_coeffs(pz, a._replace(sigma=2.0, sigma_next=a.sigma_next[i].item(),
                                          sigma_prev=tuple(p[i].item() for p in a.sigma_prev)))
    for bad, match in (({"order": 4}, "order"), ({"corrector": 3}, "corrector of order 3"),
                       ({"solver_type": "midpoint"}, "solver_type")):
        with pytest.raises(ValueError, match=match):
            co._TENSOR_COEFFS["unipc"](pz, a._replace(**bad))


# ------------------------------------------------------------------------------------------------------------ CFG++

CFG_PP = ["euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"]


def _cfg_pp_rows(rng: random.Random, with_prev: bool, n: int = 32):
    rows = []
    while len(rows) < n:
        kind = len(rows) % 5
        # from inf (kind 0: to a finite sigma', without history, which would have to lie above inf), inf to 0 (kind 3)
        s = INF if kind == 3 or (kind == 0 and not with_prev) else math.exp(rng.uniform(-6.0, 6.0))
        sn = 0.0 if kind in (1, 3) else (math.exp(rng.uniform(-4.0, 4.0)) if s == INF else
                                         s * math.exp(-rng.uniform(1e-3, 4.0)))
        if with_prev and s == INF:
            if sn != 0.0:
                continue  # a remembered sigma must be above sigma = inf: only the step to 0, which reads none
            prev = INF  # unchecked at sigma' = 0, as on the float path
        else:
            prev = INF if kind == 2 else s * math.exp(rng.uniform(1e-3, 4.0))
        rows.append((s, sn, prev))
    return rows


def _value(v, i):
    return v[i].item() if isinstance(v, torch.Tensor) else float(v)


@pytest.mark.parametrize("prediction,sd", PREDICTIONS)
@pytest.mark.parametrize("sampler", CFG_PP)
def test_cfg_pp_mirrors_equal_the_float_coefficients(sampler, prediction, sd):
    """Every coefficient (a, b, b_u, e, h, carry, carry_u, sigma_out) per sample, for eta below, at and above 1 (the
    clamp) and 0, both stages of dpmpp_2s_ancestral_cfg_pp (a sample whose step ended after its first call keeps
    its state in the second: a = 1, every other weight 0)."""
    pz = parameterization(prediction, sd)
    spec = co.SAMPLERS[sampler]
    rng = random.Random(5)
    for eta in ((0.0, 0.4, 1.0, 1.6) if spec.eta else (1.0,)):
        for with_prev in ((False, True) if spec.kind == "multistep" else (False,)):
            rows = _cfg_pp_rows(rng, with_prev)
            for stage in ((1, 2) if spec.kind == "two_stage" else (1,)):
                a = co.StepArgs(sampler, _col([r[0] for r in rows]), _col([r[1] for r in rows]), stage=stage,
                                sigma_prev=(_col([r[2] for r in rows]),) if with_prev else (), eta=eta, s_noise=0.7)
                got, ok = co._TENSOR_COEFFS[sampler](pz, a)
                assert bool(torch.as_tensor(ok).all())
                full = co.step_coeffs_tensor(pz, a)
                assert full.ok.all() and torch.equal(torch.as_tensor(full.b_u), torch.as_tensor(got.b_u))
                assert torch.equal(torch.as_tensor(full.carry_u), torch.as_tensor(got.carry_u))
                assert full.noisy == spec.stochastic(eta)
                for i, (s, sn, prev) in enumerate(rows):
                    fa = a._replace(sigma=s, sigma_next=sn, sigma_prev=(prev,) if with_prev else ())
                    where = (eta, stage, s, sn, prev)
                    if stage == 2 and co.step_coeffs(pz, fa._replace(stage=1)).complete:
                        kept = (got.a[i].item(), got.b[i].item(), got.b_u[i].item(), got.e[i].item(),
                                [h[i].item() for h in got.h])
                        assert kept == (1.0, 0.0, 0.0, 0.0, [0.0, 0.0]), where
                        continue
                    want = co.step_coeffs(pz, fa)
                    pairs = [("a", want.a, got.a), ("b", want.b, got.b), ("b_u", want.b_u, got.b_u),
                             ("e", want.e, got.e), ("sigma_out", want.sigma_out, got.sigma_out)]
                    assert len(got.h) >= len(want.h)
                    hs = list(want.h) + [0.0] * (len(got.h) - len(want.h))  # 0, not absent, on the device
                    pairs += [(f"h{k}", w, g) for k, (w, g) in enumerate(zip(hs, got.h))]
                    if want.carry is not None:
                        pairs += [("carry_y", want.carry[0], got.carry[0]), ("carry_d", want.carry[1], got.carry[1]),
                                  ("carry_u", want.carry_u, got.carry_u)]
                    else:  # complete steps of the float path carry nothing; the device's first call carries D_u
                        assert got.carry is None or (stage == 1 and spec.kind == "two_stage")
                    # the weights of D, D_u and the history against the largest of them (c_in(sigma_out) is their
                    # plain sampler's sum), the others against themselves
                    d_scale = max([abs(want.b), abs(want.b_u), pz.c_in(want.sigma_out)] + [abs(v) for v in hs])
                    for name, w, g in pairs:
                        scale = d_scale if name in ("b", "b_u") or name.startswith("h") else abs(w)
                        assert _close(_value(g, i), w, scale, REL_CFG_PP), (name, where, w, _value(g, i))


def test_cfg_pp_mirrors_are_exact_at_the_ends():
    """From sigma = inf D_u has weight exactly 0 (the plain sampler's step); at sigma' = 0 the step is D (and no
    noise); dpmpp_2s_ancestral_cfg_pp at eta = 1 keeps both calls from inf, with y' = c'(D_1 - D_u1 + D_u2) + noise."""
    pz = parameterization("v")
    a = co.StepArgs("dpmpp_2s_ancestral_cfg_pp", _col([INF, INF, 3.0]), _col([2.0, 2.0, 0.0]), eta=1.0)
    one = co._TENSOR_COEFFS["dpmpp_2s_ancestral_cfg_pp"](pz, a)[0]
    c2, s2 = pz.c_in(2.0), pz.noise_scale(2.0)
    assert one.a.tolist() == [s2, s2, 0.0] and one.sigma_out.tolist() == [2.0, 2.0, 0.0]
    assert one.b_u.tolist() == [c2, c2, 0.0] and one.b.tolist() == [0.0, 0.0, pz.c_in(0.0)]
    two = co._TENSOR_COEFFS["dpmpp_2s_ancestral_cfg_pp"](pz, a._replace(stage=2))[0]
    assert two.a.tolist() == [0.0, 0.0, 1.0] and two.b.tolist() == [0.0, 0.0, 0.0]
    assert two.b_u.tolist() == [c2, c2, 0.0] and [h.tolist() for h in two.h] == [[c2, c2, 0.0], [-c2, -c2, 0.0]]
    for name in ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp"):
        b = co.StepArgs(name, _col([INF, 5.0]), _col([2.0, 0.0]), eta=0.5)
        got = co._TENSOR_COEFFS[name](pz, b)[0]
        assert got.b_u.tolist() == [0.0, 0.0] and got.b.tolist() == [c2, pz.c_in(0.0)], name
        assert got.a[1].item() == 0.0 and _value(got.e, 1) == 0.0


def test_dpmpp_2m_cfg_pp_mirror_refuses_a_history_below_sigma():
    pz = parameterization("v")
    a = co.StepArgs("dpmpp_2m_cfg_pp", _col([2.0, 2.0, 2.0]), _col([1.0, 1.0, 0.0]),
                    sigma_prev=(_col([4.0, 1.0, 1.0]),))
    assert co._TENSOR_COEFFS["dpmpp_2m_cfg_pp"](pz, a)[1].tolist() == [True, False, True]  # unchecked at sigma' = 0


def test_every_built_in_row_has_a_tensor_mirror():
    """Every row of the table but a registered one has its mirror, and a step with device sigmas uses it."""
    missing = [name for name in co.SAMPLERS if name not in co._TENSOR_COEFFS]
    assert missing == [], (f"{missing} have no tensor mirror in coefficients._TENSOR_COEFFS: with per-sample sigmas on "
                           "the device they are stepped from host values, a device-to-host read per step (§2.9)")
    for name in co.SAMPLERS:
        assert co.has_tensor_coeffs(name), name
