"""The sampler table (``zsnr_kernels.coefficients.SAMPLERS``): one row per sampler, read by ``sample()``, the step
functions, :class:`SamplingPlan`, the k-diffusion drop-ins and the backends.  A sampler added by a row alone (a
toy registered here, with no C++ mirror) runs through all of them on the torch and cpu backends."""

from __future__ import annotations

import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co, steps
from zsnr_kernels.backends import ext as _ext

INF = math.inf
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _ext.available(), reason="_C not built"))]
SIGMAS = [INF, 8.0, 3.0, 1.0, 0.4, 0.0]


def _model(y, sigma):
    """A v-model of unit-variance data centred at 0.3: smooth, the same on every backend."""
    s = sigma.view(-1, *([1] * (y.ndim - 1))).to(y.dtype)
    return torch.where(torch.isinf(s), -0.3 * torch.ones_like(y), 0.1 * y)


@pytest.fixture
def toys():
    """Three samplers that exist only as rows: Euler, Heun and DPM++ 2M coefficients under new names."""
    rows = [
        co.SamplerSpec("toy_euler", "single", co.SAMPLERS["euler"].coeffs, at_inf="as euler", churn=True,
                       s_noise=True),
        co.SamplerSpec("toy_heun", "two_stage", co.SAMPLERS["heun"].coeffs, at_inf="as heun"),
        co.SamplerSpec("toy_2m", "multistep", co.SAMPLERS["dpmpp_2m"].coeffs, at_inf="as dpmpp_2m", history=1,
                       keeps="denoised"),
    ]
    for row in rows:
        co.register_sampler(row)
    yield {"toy_euler": "euler", "toy_heun": "heun", "toy_2m": "dpmpp_2m"}
    for row in rows:
        co.unregister_sampler(row.name)


def test_the_kernel_codes_are_the_table_rows_with_a_mirror():
    assert co.SAMPLER_KINDS == tuple(name for name, spec in co.SAMPLERS.items() if spec.kernel)
    assert zk.SAMPLERS is co.SAMPLERS
    for name, spec in co.SAMPLERS.items():
        assert steps.step_function(name).__name__ == f"{name}_step"
        assert (spec.history > 0) == (spec.kind == "multistep")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_registered_sampler_runs_like_the_row_it_copies(toys, backend):
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for toy, builtin in toys.items():
        got = zk.sample(_model, noise, SIGMAS, sampler=toy, backend=backend)
        want = zk.sample(_model, noise, SIGMAS, sampler=builtin, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{toy} vs {builtin} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_registered_sampler_has_a_step_function_and_a_plan(toys, backend):
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    y, f = noise, _model(noise, torch.full((2,), INF, dtype=torch.float64))
    for toy, builtin in toys.items():
        got = steps.step_function(toy)(y, f, INF, 8.0, backend=backend)
        want = steps.step_function(builtin)(y, f, INF, 8.0, backend=backend)
        torch.testing.assert_close(got.y, want.y, rtol=1e-6, atol=1e-6)
        assert got.complete == want.complete
        plan = zk.SamplingPlan(SIGMAS, noise.shape, sampler=toy, backend=backend)
        torch.testing.assert_close(plan.run(_model, noise), zk.sample(_model, noise, SIGMAS, sampler=builtin,
                                                                      backend=backend), rtol=1e-6, atol=1e-6)


def test_the_generic_step_refuses_options_its_row_does_not_take(toys):
    y = torch.zeros(1, 2)
    unexpected = r"sampler_step\('{}', \.\.\.\) got an unexpected keyword argument '{}'"
    with pytest.raises(TypeError, match=unexpected.format("toy_euler", "history")):
        steps.sampler_step("toy_euler", y, y, 2.0, 1.0, history=[(3.0, y)])
    with pytest.raises(TypeError, match="unexpected keyword argument 'first'"):
        steps.sampler_step("toy_2m", y, y, 2.0, 1.0, first=object())
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):
        steps.sampler_step("toy_heun", y, y, 2.0, 1.0, eta=0.5)
    with pytest.raises(TypeError, match=unexpected.format("toy_heun", "etta")):
        steps.sampler_step("toy_heun", y, y, 2.0, 1.0, etta=0.5)


def test_a_named_sampler_runs_its_own_step_function_through_sampler_step():
    """Defaults, ranges and options are the named function's: DDIM's eta is 0 and at most 1, LMS's order 1..4."""
    g = torch.Generator().manual_seed(2)
    y, f = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    got = steps.sampler_step("ddim", y, f, 10.0, 5.0, backend="torch")
    assert torch.equal(got.y, zk.ddim_step(y, f, 10.0, 5.0, backend="torch").y)  # eta = 0: no noise needed
    with pytest.raises(ValueError, match="eta must be <= 1"):
        steps.sampler_step("ddim", y, f, 10.0, 5.0, eta=1.2, seed=0, step_index=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):
        steps.sampler_step("euler", y, f, 10.0, 5.0, eta=0.5)
    with pytest.raises(ValueError, match=r"order must be in \[1, 4\]"):
        steps.sampler_step("lms", y, f, 10.0, 5.0, order=7)
    with pytest.raises(TypeError, match="order must be an int"):
        steps.sampler_step("lms", y, f, 10.0, 5.0, order="4")


def test_a_second_call_names_the_generic_step_of_a_registered_sampler(toys):
    g = torch.Generator().manual_seed(3)
    y, f = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    r = steps.sampler_step("toy_heun", y, f, 3.0, 1.0, backend="torch")
    assert not r.complete
    with pytest.raises(ValueError, match=r"Call sampler_step\('toy_heun', \.\.\.\) with first\.y"):
        steps.sampler_step("toy_heun", y.clone(), f, 3.0, 1.0, first=r, backend="torch")


def test_registration_refuses_a_taken_name_a_claimed_mirror_and_a_malformed_row():
    with pytest.raises(ValueError, match="registered already"):
        co.register_sampler(co.SAMPLERS["euler"])
    with pytest.raises(ValueError, match="leave both False"):
        co.register_sampler(co.SamplerSpec("x", "single", co.SAMPLERS["euler"].coeffs, at_inf="", kernel=True))
    with pytest.raises(ValueError, match="leave both False"):
        co.register_sampler(co.SamplerSpec("x", "single", co.SAMPLERS["euler"].coeffs, at_inf="", step=True))
    with pytest.raises(ValueError, match="multistep"):
        co.SamplerSpec("x", "multistep", co.SAMPLERS["euler"].coeffs, at_inf="")
    with pytest.raises(ValueError, match="history 0"):
        co.SamplerSpec("x", "single", co.SAMPLERS["euler"].coeffs, at_inf="", history=2)
    with pytest.raises(ValueError, match="options may name"):
        co.SamplerSpec("x", "single", co.SAMPLERS["euler"].coeffs, at_inf="", options=(("foo", 1),))
    with pytest.raises(ValueError, match="not a registered sampler"):
        co.unregister_sampler("euler")
    with pytest.raises(TypeError):
        zk.SAMPLERS["x"] = co.SAMPLERS["euler"]  # read-only: rows go in through register_sampler


def test_a_row_that_keeps_a_derivative_and_adds_noise_is_refused_by_the_kernels_that_cannot():
    """The cpu and cuda element passes store a carry (LMS's derivative) or add noise, not both: such a registered row
    runs on torch (and Triton) and is refused, before anything runs, on cpu."""
    import dataclasses

    def coeffs(pz, s):
        c = co.lms(pz, s.sigma, s.sigma_next, tuple(s.sigma_prev), 4)
        return dataclasses.replace(c, e=0.1 if s.sigma != INF and s.sigma_next > 0 else 0.0)

    co.register_sampler(co.SamplerSpec("toy_noisy_lms", "multistep", coeffs, at_inf="", history=3,
                                       keeps="derivative", adds_noise=True))
    try:
        noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        run = lambda backend: zk.sample(_model, noise, SIGMAS, sampler="toy_noisy_lms", seed=[1, 2],  # noqa: E731
                                        backend=backend)
        assert torch.isfinite(run("torch")).all()
        if _ext.available():
            with pytest.raises(ValueError, match="keeps a derivative and adds noise.*cpu kernels"):
                run("cpu")
    finally:
        co.unregister_sampler("toy_noisy_lms")
