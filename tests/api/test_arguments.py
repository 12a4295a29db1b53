"""Arguments a user can get wrong in ways the shape/dtype checks do not see: ``out=`` sharing memory with an input,
autograd, ``step_index``, a ``first`` from another step, sigma types, misspelt options, and what ``sample()``
says about its callables.  Every refusal names the argument, says what to do, and leaves every tensor untouched; the
torch and cpu backends refuse alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rand as _rand, refused as _refused

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _ext.available(), reason="_C not built"))]
SHAPE = (2, 4, 8, 8)
N = 2 * 4 * 8 * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_overlapping_an_input_is_refused_unless_it_is_that_input(backend):
    flat = _rand(N + 64)
    y, f, d_prev, z = flat[:N].view(SHAPE), _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2), _rand(*SHAPE, seed=3)
    want = zk.euler_step(y.clone(), f, 5.0, 3.0, backend=backend).y
    shifted = flat[64:].view(SHAPE)  # one sample's worth of y written before it is read
    _refused(ValueError, "out overlaps y .*separate tensor", lambda: zk.euler_step(
        y, f, 5.0, 3.0, out=shifted, backend=backend), flat, f)
    g = torch.cat([f.flatten(), torch.zeros(8)])
    _refused(ValueError, r"out overlaps model_output\[1\] \(uncond\)", lambda: zk.euler_step(
        y, (f, g[:N].view(SHAPE)), 5.0, 3.0, guidance_scale=2.0, out=g[8:].view(SHAPE), backend=backend), flat, g)
    h = torch.cat([d_prev.flatten(), torch.zeros(4)])
    _refused(ValueError, r"out overlaps history\[0\]", lambda: zk.dpmpp_2m_step(
        y, f, 5.0, 3.0, history=[(6.0, h[:N].view(SHAPE))], out=h[4:].view(SHAPE), backend=backend), flat, h)
    w = torch.cat([z.flatten(), torch.zeros(4)])
    _refused(ValueError, "out overlaps noise", lambda: zk.euler_ancestral_step(
        y, f, 5.0, 3.0, noise=w[:N].view(SHAPE), out=w[4:].view(SHAPE), backend=backend), flat, w)
    _refused(ValueError, "stride-0", lambda: zk.euler_step(
        y, f, 5.0, 3.0, out=torch.zeros(1, 4, 8, 8).expand(SHAPE), backend=backend), flat)
    # the same view of an input is allowed (stepping in place), and so are interleaved views sharing no element
    torch.testing.assert_close(zk.euler_step(y.clone(), f, 5.0, 3.0, out=f.clone(), backend=backend).y, want)
    yy = y.clone()
    assert zk.euler_step(yy, f, 5.0, 3.0, out=yy, backend=backend).y is yy
    torch.testing.assert_close(yy, want)
    yy = y.clone()  # another layout of y's memory reaches the kernel as a copy: written after it was read
    torch.testing.assert_close(zk.euler_step(yy, f, 5.0, 3.0, out=yy.transpose(2, 3), backend=backend).y, want)
    pair = torch.stack([y, torch.zeros_like(y)], dim=-1)
    r = zk.euler_step(pair[..., 0], f, 5.0, 3.0, out=pair[..., 1], backend=backend)
    torch.testing.assert_close(r.y, want)
    torch.testing.assert_close(pair[..., 0], y)


def test_a_step_autograd_records_runs_on_the_reference():
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=1).requires_grad_()
    r = zk.euler_step(y, f, 5.0, 3.0)  # auto: the kernels have no backward, the reference does
    r.y.sum().backward()
    assert f.grad is not None and torch.all(f.grad != 0)
    if _ext.available():
        _refused(ValueError, "backend='cpu'.*requires grad.*backend='torch'.*no_grad", lambda: zk.euler_step(
            y, f, 5.0, 3.0, backend="cpu"), y)
        with torch.no_grad():
            torch.testing.assert_close(zk.euler_step(y, f, 5.0, 3.0, backend="cpu").y, r.y.detach())
    leaf = torch.zeros(SHAPE, requires_grad=True)
    _refused(ValueError, "out is a leaf tensor that requires grad", lambda: zk.euler_step(
        y, f.detach(), 5.0, 3.0, out=leaf), y, leaf.detach())
    with torch.inference_mode():
        frozen = torch.zeros(SHAPE)
    _refused(ValueError, "out was made under torch.inference_mode", lambda: zk.euler_step(
        y, f.detach(), 5.0, 3.0, out=frozen), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value,exc,match", [
    (-1, ValueError, r"step_index must be in \[0, 4294967296\)"), (2**32, ValueError, r"step_index must be in"),
    (1.5, TypeError, "step_index must be an int"), ("1", TypeError, "step_index must be an int"),
    (True, TypeError, "step_index must be an int"), (torch.tensor(2.0), TypeError, "step_index must be an int"),
    (torch.tensor(True), TypeError, "step_index must be an int"),
])
def test_step_index_is_checked_on_every_step(backend, value, exc, match):
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=1)
    _refused(exc, match, lambda: zk.euler_ancestral_step(y, f, 5.0, 3.0, seed=1, step_index=value,
                                                         backend=backend), y, f)
    _refused(exc, match, lambda: zk.euler_step(y, f, 5.0, 3.0, step_index=value, backend=backend), y, f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_like_step_indices_are_taken(backend):
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=1)
    want = zk.euler_ancestral_step(y, f, 5.0, 3.0, seed=1, step_index=3, backend=backend).y
    for v in (np.int64(3), torch.tensor(3)):
        torch.testing.assert_close(zk.euler_ancestral_step(y, f, 5.0, 3.0, seed=1, step_index=v,
                                                           backend=backend).y, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_stage_refuses_the_first_stage_of_another_step(backend):
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=1)
    first = zk.dpm_2_step(y, f, 5.0, 3.0, backend=backend)
    _refused(ValueError, r"first.sigma=3.87.* heun stage .*calls the model \(3.0\)", lambda: zk.heun_step(
        first.y, f, 5.0, 3.0, first=first, backend=backend), y, f, first.y)
    first = zk.heun_step(y, f, 5.0, 3.0, backend=backend)
    _refused(ValueError, "first.sigma", lambda: zk.heun_step(first.y, f, 5.0, 2.0, first=first, backend=backend),
             first.y)
    assert zk.heun_step(first.y, f, 5.0, 3.0, first=first, backend=backend).complete


def test_sigmas_must_be_real_numbers():
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=1)
    _refused(TypeError, "sigma must hold real numbers, got a torch.complex64", lambda: zk.euler_step(
        y, f, torch.tensor([5.0, 4.0], dtype=torch.complex64), 3.0), y)
    _refused(TypeError, "sigma_next must hold real numbers, got a torch.bool", lambda: zk.euler_step(
        y, f, 5.0, torch.tensor([True, False])), y)
    _refused(ValueError, "sigma is a meta tensor", lambda: zk.euler_step(y, f, torch.tensor(5.0, device="meta"),
                                                                          3.0), y)
    _refused(TypeError, "sigmas must hold real numbers", lambda: zk.sample(
        lambda y, s: y, y, torch.tensor([5.0, 0.0], dtype=torch.complex128)), y)
    want = zk.euler_step(y, f, 5.0, 3.0).y
    for sigma in (np.float32(5.0), np.int64(5), torch.tensor(5)):
        torch.testing.assert_close(zk.euler_step(y, f, sigma, 3.0).y, want, rtol=0, atol=0)


def test_an_unknown_keyword_names_the_step():
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=1)
    with pytest.raises(TypeError, match=r"euler_step\(\) got an unexpected keyword argument 'guidance'"):
        zk.euler_step(y, f, 5.0, 3.0, guidance=7.5)
    with pytest.raises(TypeError, match=r"dpmpp_2m_step\(\) got an unexpected keyword argument 'first'"):
        zk.dpmpp_2m_step(y, f, 5.0, 3.0, first=None)


def test_sample_names_the_callable_that_returned_a_wrong_tensor():
    noise = _rand(*SHAPE)
    sig = torch.tensor([5.0, 3.0, 0.0], dtype=torch.float64)
    _refused(TypeError, r"model\(y, sigma\)'s output has dtype torch.bfloat16 but noise has dtype torch.float32",
             lambda: zk.sample(lambda y, s: y.bfloat16(), noise, sig), noise)
    _refused(ValueError, r"noise_sampler\(sigma, sigma_next\)'s tensor has shape \(1, 4, 8, 8\) but noise has",
             lambda: zk.sample(lambda y, s: y, noise, sig, sampler="euler_ancestral",
                               noise_sampler=lambda a, b: torch.zeros(1, 4, 8, 8)), noise)


def test_small_mistakes_get_named():
    y, f = _rand(*SHAPE), _rand(*SHAPE, seed=1)
    _refused(ValueError, "noise=.*or seed=.*not both", lambda: zk.euler_ancestral_step(
        y, f, 5.0, 3.0, noise=torch.zeros_like(y), seed=1, step_index=0), y)
    _refused(ValueError, "seed is a meta tensor", lambda: zk.euler_ancestral_step(
        y, f, 5.0, 3.0, seed=torch.zeros(2, dtype=torch.int64, device="meta"), step_index=0), y)
    first = zk.heun_step(y, f, 5.0, 3.0)
    _refused(TypeError, "first.denoised must be the tensor", lambda: zk.heun_step(
        first.y, f, 5.0, 3.0, first=first._replace(denoised=None)), first.y)
    _refused(TypeError, "model_sigmas must be a 1-D table", lambda: zk.sample(
        lambda y, s: y, y, [5.0, 0.0], model_sigmas="abc"), y)
