"""lcm: latent consistency sampling (k-diffusion's and ComfyUI's ``sample_lcm``), against an independent float64
loop in k-diffusion's variable x, from a finite schedule and from sigma = inf."""

from __future__ import annotations

import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.parameterization import parameterization

INF = math.inf


def lcm_reference(D, noise, sigmas, noises):
    """sample_lcm in x (VE): x = noise * sigma_0; D; x = D + sigma' z_i (no noise at sigma' = 0)."""
    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        d = D(x, sigmas[i])
        x = d + sigmas[i + 1] * noises[i] if sigmas[i + 1] > 0 else d
    return x


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_lcm_equals_sample_lcm_on_a_finite_schedule(prediction):
    pz = parameterization(prediction, 1.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    sigmas = [14.6, 7.0, 2.5, 0.8, 0.2, 0.0]
    noises = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in sigmas[:-1]]

    def D(x, sigma):
        return torch.tanh(0.4 * x) / (1.0 + 0.1 * sigma) + 0.05

    def model(y, sigma):  # the raw output whose denoised prediction is D(x, sigma), x = y / c_in(sigma)
        s = float(sigma[0])
        x = y / pz.c_in(s)
        p, q = pz.denoise_coeffs(s)  # D = p y + q F
        return (D(x, s) - p * y) / q

    calls = iter(range(len(sigmas)))
    ours = zk.sample(model, noise, torch.tensor(sigmas, dtype=torch.float64), sampler="lcm", prediction=prediction,
                     noise_sampler=lambda s, sn: noises[next(calls)])
    want = lcm_reference(D, noise, sigmas, noises)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def test_lcm_from_inf_is_the_same_step():
    """The state's weight is 0 at every sigma: from inf the step is D renoised, with the v model's D = -F there."""
    pz = parameterization("v", 1.0)
    y, f, z = (torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
               for k in range(3))
    r = zk.lcm_step(y, f, INF, 4.0, noise=z)
    p, q = pz.denoise_coeffs(INF)
    torch.testing.assert_close(r.y, pz.c_in(4.0) * (p * y + q * f) + pz.noise_scale(4.0) * z, rtol=1e-14, atol=0)
    assert r.sigma == 4.0 and r.complete


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_agree_with_philox_noise(dtype):
    g = torch.Generator().manual_seed(1)
    y, fc, fu = (torch.randn(3, 4, 6, 6, generator=g).to(dtype) for _ in range(3))
    kw = dict(guidance_scale=3.0, guidance_rescale=0.5, seed=[5, 6, 7], step_index=2)
    ref = zk.lcm_step(y.double(), (fc.double(), fu.double()), 6.0, 1.5, backend="torch", **kw).y
    for backend in ("torch", "cpu"):
        if zk.backends.registry.not_supported_reasons(backend, y):
            continue
        got = zk.lcm_step(y, (fc, fu), 6.0, 1.5, backend=backend, **kw).y
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
