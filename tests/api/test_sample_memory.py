"""sample() writes each state into the last one's memory where nothing else holds it (zsnr_kernels.sampling
._sole_owner): the same bits as fresh outputs, and never a tensor the caller, the model or the callback can see."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import sampling, steps

INF = float("inf")
SIGMAS = torch.tensor([INF, 14.6, 3.0, 0.9, 0.2, 0.0], dtype=torch.float64)
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_3m_sde", "lms", "heun", "ddim"]


def model(y, sigma):
    return 0.7 * y - 0.1, 0.5 * y


def run(sampler, **kw):
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    kept = noise.clone()
    x0 = zk.sample(model, noise, SIGMAS, sampler=sampler, guidance_scale=4.0, guidance_rescale=0.5, seed=11, **kw)
    assert torch.equal(noise, kept), "the caller's noise was written"
    return x0


@pytest.fixture
def outs(monkeypatch):
    """Whether each step call was given out= (the loop's own memory)."""
    seen = []
    real = steps._run

    def spy(*args, **kwargs):
        seen.append(kwargs.get("out") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "_run", spy)
    return seen


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_bits_as_fresh_outputs(monkeypatch, sampler, backend):
    if backend == "cpu" and zk.backends.registry.not_supported_reasons("cpu", torch.zeros(1)):
        pytest.skip("the cpu backend is not built")
    reused = run(sampler, backend=backend)
    monkeypatch.setattr(sampling, "_sole_owner", lambda y: False)
    assert torch.equal(reused, run(sampler, backend=backend))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "lms"])
def test_the_state_is_reused_after_the_first_step(outs, sampler):
    """The first step reads the caller's noise (a new state), every later one writes in place; a test that would
    pass vacuously if the reference counts were misread (calibration) and nothing were ever reused."""
    run(sampler)
    assert outs == [False] + [True] * (len(SIGMAS) - 2)


def test_two_stage_samplers_allocate(outs):
    run("heun")
    assert not any(outs)


def test_a_state_the_model_keeps_is_not_written(outs):
    kept = []

    def keeping(y, sigma):
        kept.append((y, y.clone()))
        return model(y, sigma)

    zk.sample(keeping, torch.randn(1, 2, 4, 4), SIGMAS, guidance_scale=2.0)
    assert all(torch.equal(y, value) for y, value in kept)
    assert not any(outs)


def test_a_view_the_model_keeps_is_not_written(outs):
    kept = []

    def keeping(y, sigma):
        kept.append((y[0, 1], y[0, 1].clone()))
        return model(y, sigma)

    zk.sample(keeping, torch.randn(1, 2, 4, 4), SIGMAS, guidance_scale=2.0)
    assert all(torch.equal(v, value) for v, value in kept)


def test_a_callback_sees_every_state_unchanged(outs):
    kept = []
    zk.sample(model, torch.randn(1, 2, 4, 4), SIGMAS, guidance_scale=2.0,
              callback=lambda d: kept.append((d["y"], d["y"].clone(), d["denoised"], d["denoised"].clone())))
    assert len(kept) == len(SIGMAS) - 1
    assert all(torch.equal(a, b) and torch.equal(c, d) for a, b, c, d in kept)
    assert not any(outs)


def test_final_sample_out():
    y = torch.randn(2, 3)
    want = zk.final_sample(y, sigma_data=0.5)
    assert torch.equal(zk.final_sample(y.clone(), sigma_data=0.5), want)
    o = y.clone()
    assert zk.final_sample(o, sigma_data=0.5, out=o) is o and torch.equal(o, want)
    with pytest.raises(ValueError, match="out has shape"):
        zk.final_sample(y, out=torch.empty(3, 2))


def test_no_reuse_while_a_debugger_traces(outs):
    """A trace function that reads frame.f_locals (pdb, debugpy) adds references: no reuse while one runs."""
    def tracer(frame, event, arg):
        frame.f_locals  # noqa: B018
        return tracer

    sys.settrace(tracer)
    try:
        run("euler")
    finally:
        sys.settrace(None)
    assert not any(outs)


def test_an_import_under_a_debugger_does_not_miscount():
    """The sole-owner count is measured untraced on first use, not at import (where a tracer reading f_locals would
    inflate it, and sample() would then overwrite states a model still holds)."""
    child = textwrap.dedent("""
        import sys
        def tracer(frame, event, arg):
            frame.f_locals
            return tracer
        sys.settrace(tracer)
        import torch, zsnr_kernels as zk
        sys.settrace(None)
        kept = []
        def model(y, sigma):
            kept.append((y, y.clone()))
            return -0.5 * y
        zk.sample(model, torch.randn(1, 4, 8, 8), torch.tensor([float("inf"), 3.0, 1.0, 0.3, 0.0]))
        assert all(torch.equal(y, v) for y, v in kept), "a state the model kept was overwritten"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
