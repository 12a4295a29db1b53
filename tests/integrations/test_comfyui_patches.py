"""The ZSNR Sampler's patches on a model's ``model_sampling`` (zsnr_kernels.comfyui.answering_at_inf), without
ComfyUI: runs that overlap on one object share them, the last one out restores what was there, and an instance
attribute another extension set stays in force at finite sigmas and comes back afterwards."""

from __future__ import annotations

import torch

from zsnr_kernels import comfyui as zc

AT_INF = torch.full((1,), zc.WRAPPER_SIGMA_AT_INF)
FINITE = torch.full((1,), 3.0)


class ModelSampling:  # the methods of ComfyUI's ModelSamplingDiscrete the patches wrap
    sigma_max = torch.tensor(1e4)

    def calculate_input(self, sigma, noise):
        return noise / (sigma.reshape(-1, 1) ** 2 + 1) ** 0.5

    def timestep(self, sigma):
        return sigma.log()

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.reshape(-1, 1)


def test_overlapping_runs_share_the_patches_and_the_last_restores():
    ms = ModelSampling()
    x = torch.ones(1, 3)
    a = zc.answering_at_inf(ms, (0.0, -1.0))
    b = zc.answering_at_inf(ms, (0.0, -1.0))
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # A leaves while B still samples: B's call at inf must still be answered
    assert torch.equal(ms.calculate_input(AT_INF, x), x)
    b.__exit__(None, None, None)
    assert "calculate_input" not in vars(ms) and not zc._PATCHED
    assert not torch.equal(ms.calculate_input(AT_INF, x), x)  # the class's method again


def test_an_existing_instance_attribute_is_kept_at_finite_sigma_and_restored():
    ms = ModelSampling()
    x = torch.ones(1, 3)
    mine = lambda sigma, noise: noise * 7.0  # noqa: E731  (another extension's patch)
    ms.__dict__["calculate_input"] = mine
    with zc.answering_at_inf(ms, (0.0, -1.0)):
        assert torch.equal(ms.calculate_input(FINITE, x), x * 7.0)
        assert torch.equal(ms.calculate_input(AT_INF, x), x)
        assert torch.equal(ms.calculate_denoised(AT_INF, x, 2 * x), -x)
    assert ms.__dict__["calculate_input"] is mine


def test_an_exception_inside_restores():
    ms = ModelSampling()
    try:
        with zc.answering_at_inf(ms, (0.0, -1.0)):
            raise RuntimeError("model failed")
    except RuntimeError:
        pass
    assert not vars(ms) and not zc._PATCHED
