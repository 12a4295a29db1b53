"""Device-resident sampling (zsnr_kernels.plan.SamplingPlan) against the normal sampling loop.

A plan records ``sample()``'s steps once, precomputes every coefficient into a device table and reuses a fixed
set of buffers; run on the same backend it must give the same samples as ``sample()``: bit for bit on the cpu
and torch backends here, and on the triton backend under Triton's interpreter (the kernels read the same
coefficients, from a table row instead of a per-step upload).  With a GPU, the whole loop captured in one CUDA
graph must replay to the eager result.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext
from zsnr_kernels.plan import SamplingPlan

INF = math.inf
SIGMAS = [INF, 9.0, 4.0, 2.0, 1.0, 0.4, 0.1, 0.0]
requires_C = pytest.mark.skipif(not _ext.available(), reason=f"zsnr_kernels._C: {_ext.why_unavailable()}")


def model(y, sigma):
    f = 0.6 * y + 0.2 * torch.sin(3.0 * y)
    return f, 0.5 * f - 0.1


def _setting(sampler):
    prediction = "eps" if sampler == "lms" else "v"
    return prediction, SIGMAS[1:] if prediction == "eps" else SIGMAS


def _noise(dtype=torch.float32):
    return torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("space", ["output", "x0"])
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_C), "torch"])
@pytest.mark.parametrize("sampler", list(zk.SAMPLERS))
def test_plan_equals_sample(sampler, backend, space):
    """Bit for bit, the rescale in the x0 space too (there the torch backend folds q u / t into p: the plan's
    table columns and sample()'s Python floats must give the same number)."""
    prediction, sigmas = _setting(sampler)
    kw = dict(sampler=sampler, prediction=prediction, guidance_scale=3.0, guidance_rescale=0.7, seed=[11, 12],
              backend=backend, rescale_space=space)
    noise = _noise()
    plan = SamplingPlan(sigmas, noise.shape, **kw)
    assert torch.equal(plan.run(model, noise), zk.sample(model, noise, sigmas, **kw))
    # a plan is reusable: a second run from other noise equals sample() on that noise
    other = _noise() * 0.5
    assert torch.equal(plan.run(model, other), zk.sample(model, other, sigmas, **kw))


@requires_C
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_plan_in_bfloat16_equals_sample(sampler):
    kw = dict(sampler=sampler, guidance_scale=3.0, guidance_rescale=0.5, rescale_space="x0", seed=7)
    noise = _noise(torch.bfloat16)
    plan = SamplingPlan(SIGMAS, noise.shape, dtype=torch.bfloat16, **kw)
    assert torch.equal(plan.run(model, noise), zk.sample(model, noise, SIGMAS, **kw))


def test_step_by_step_equals_run_and_model_sees_the_planned_sigmas():
    noise = _noise()
    plan = SamplingPlan(SIGMAS, noise.shape, sampler="heun", backend="torch")
    seen = []

    def spy(y, sigma):
        seen.append(sigma.clone())
        return model(y, sigma)[0]

    want = zk.sample(spy, noise, SIGMAS, sampler="heun", backend="torch")
    plan.start(noise)
    for k in range(plan.evaluations):
        assert torch.equal(plan.model_sigma(k), seen[k])
        plan.step(k, model(plan.model_input(k), plan.model_sigma(k))[0])
    assert torch.equal(plan.result(), want)
    assert plan.evaluations == len(seen) == 12  # Heun: an Euler step from inf, then two evaluations per step


@pytest.mark.parametrize(("sampler", "buffers"), [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpmpp_3m_sde", 3)])
def test_buffers_are_reused(sampler, buffers):
    """The state is updated in place; only what a later step reads gets its own buffer."""
    plan = SamplingPlan(SIGMAS, (1, 4, 8, 8), sampler=sampler, backend="torch", seed=1)
    assert plan._n_buffers == buffers


@pytest.mark.filterwarnings("ignore:guidance_scale=1.0 with a:UserWarning")  # this file's model returns a pair
def test_plan_refuses_evaluations_out_of_order():
    """The plan reuses its buffers, so an evaluation stepped twice, skipped or swapped computes garbage: refused,
    as are indices out of range and noise of another dtype."""
    plan = SamplingPlan(SIGMAS, (2, 4, 6, 5), sampler="dpmpp_2m")
    noise = _noise()
    with pytest.raises(ValueError, match=r"call start\(noise\) before step"):
        plan.step(0, model(plan.model_input(0), plan.model_sigma(0)))
    plan.start(noise)
    with pytest.raises(ValueError, match=r"step\(1\) out of order: the plan expects evaluation 0"):
        plan.step(1, model(plan.model_input(1), plan.model_sigma(1)))
    plan.step(0, model(plan.model_input(0), plan.model_sigma(0)))
    with pytest.raises(ValueError, match="expects evaluation 1"):
        plan.step(0, model(plan.model_input(0), plan.model_sigma(0)))
    with pytest.raises(ValueError, match=r"k must be in \[0, "):
        plan.model_input(-1)
    assert plan.model_input(np.int64(1)) is plan.model_input(torch.tensor(1))
    with pytest.raises(TypeError, match="noise has dtype torch.float64 but the plan runs in torch.float32"):
        plan.start(noise.double())
    for k in range(1, plan.evaluations):
        plan.step(k, model(plan.model_input(k), plan.model_sigma(k)))
    assert torch.equal(plan.result(), zk.sample(model, noise, SIGMAS, sampler="dpmpp_2m"))


def test_plan_checks_its_inputs():
    plan = SamplingPlan(SIGMAS, (2, 4, 6, 5), backend="torch")
    with pytest.raises(ValueError, match="shape"):
        plan.start(torch.zeros(1, 4, 6, 5))
    with pytest.raises(ValueError, match="shape"):
        SamplingPlan(SIGMAS, (0, 4))
    with pytest.raises(ValueError, match="eps"):
        SamplingPlan(SIGMAS, (2, 4), prediction="eps")  # no denoised prediction at sigma = inf


CHILD = textwrap.dedent(
    """
    import math, sys
    import torch
    import zsnr_kernels as zk
    from zsnr_kernels.plan import SamplingPlan

    def model(y, sigma):
        f = 0.6 * y + 0.2 * torch.sin(3.0 * y)
        return f, 0.5 * f - 0.1

    out = {}
    sig = [math.inf, 9.0, 4.0, 2.0, 1.0, 0.4, 0.1, 0.0]
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    for sampler in zk.SAMPLERS:
        prediction = "eps" if sampler == "lms" else "v"
        s = sig[1:] if prediction == "eps" else sig
        kw = dict(sampler=sampler, prediction=prediction, guidance_scale=3.0, guidance_rescale=0.7, seed=[11, 12],
                  backend="triton")
        plan = SamplingPlan(s, noise.shape, **kw)
        out[sampler] = (plan.run(model, noise), zk.sample(model, noise, s, **kw))
    torch.save(out, sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def triton_runs(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("plan") / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("sampler", list(zk.SAMPLERS))
def test_triton_plan_equals_triton_sample(triton_runs, sampler):
    """The table-driven Triton steps equal the per-step Triton path (interpreter, CPU tensors)."""
    planned, stepped = triton_runs[sampler]
    assert torch.isfinite(planned).all()
    assert torch.equal(planned, stepped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "heun"])
def test_cuda_graph_replay_equals_eager(sampler, backend):
    """Capture a whole run once, replay it with two fresh noises: each replay equals an eager run of the plan on that
    noise (so the graph reads its input, and the rescale counters are reset between replays), and that run equals
    ``sample()`` on the same backend: bit for bit on Triton, which reads the same host coefficients; within float32
    rounding on cuda, whose ``sample()`` computes the coefficients on the device (CUDA's log/expm1 differ from
    glibc's by an ulp) while the plan reads the host's."""
    reasons = zk.backends.registry.not_supported_reasons(backend, torch.zeros(1, device="cuda"))
    if reasons:
        pytest.skip("; ".join(reasons))
    kw = dict(sampler=sampler, guidance_scale=3.0, guidance_rescale=0.7, seed=[11, 12], backend=backend)
    plan = SamplingPlan(SIGMAS, (2, 4, 6, 5), device="cuda", **kw)
    assert plan.backend == backend
    static_noise = _noise().cuda()
    plan.run(model, static_noise)                         # compiles the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_x0 = plan.run(model, static_noise)
    for scale in (0.5, 2.0):
        noise = _noise().cuda() * scale
        static_noise.copy_(noise)
        graph.replay()
        torch.cuda.synchronize()
        eager = plan.run(model, noise)
        assert torch.equal(static_x0, eager)
        stepped = zk.sample(model, noise, SIGMAS, **kw)
        if backend == "triton":
            assert torch.equal(eager, stepped)
        else:
            torch.testing.assert_close(eager, stepped, rtol=1e-5, atol=1e-5)
