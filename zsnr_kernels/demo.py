"""``python -m zsnr_kernels demo``: what starting exactly at sigma = inf changes, measured on exact models.

Three small experiments on the CPU, float64, no downloads (a few seconds):

1. sigma = inf in the variance-exploding view (k-diffusion): ``x = noise * sigma_max`` is infinite and the first
   model input ``c_in * x = 0 * inf`` is NaN; this library's state ``y`` is the noise itself, finite.
2. :class:`~zsnr_kernels.models.GaussianModel` sampled from sigma = inf: error against the exact ODE solution
   for deterministic samplers and step counts; for ``euler_ancestral`` (seeded) the error of the samples' std.
3. :class:`~zsnr_kernels.models.ImageSetModel` (the ideal denoiser of :func:`~zsnr_kernels.models.builtin_images`):
   spread of the generated images' mean brightness under Stable Diffusion's schedule (scaled_linear betas,
   ``leading`` spacing, steps_offset=1, finite sigma_max) versus zero terminal SNR (rescaled betas, ``trailing``,
   sigmas[0] = inf), next to the data's (Lin et al. 2023, §3).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from . import sampling, schedules
from .models import GaussianModel, ImageSetModel, builtin_images
from .steps import initial_state

_F64 = torch.float64
BRIGHT = 0.6  # |mean brightness| above this counts as a very dark / very bright image


def _k_diffusion_at_inf(gen) -> list[str]:
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=_F64)
    x = noise * math.inf  # k-diffusion: x = noise * sigmas[0]
    c_in = 1.0 / math.sqrt(math.inf**2 + 1.0)  # VE wrapper's input scale at sigma = inf: 0
    model_in = x * c_in  # 0 * inf
    y, _ = initial_state(noise, math.inf)
    return [
        "1. sigma_max = inf",
        f"   k-diffusion   x = noise * sigma_max: {_share(~torch.isfinite(x)):.0%} non-finite; "
        f"model input c_in * x: {_share(torch.isnan(model_in)):.0%} NaN",
        f"   zsnr_kernels  y = initial_state(noise, inf): {_share(torch.isfinite(y)):.0%} finite, "
        f"max |y - noise| = {(y - noise).abs().max().item():.1e}",
    ]


def _share(mask: torch.Tensor) -> float:
    return mask.double().mean().item()


def _gaussian_table(gen, step_counts) -> list[str]:
    latent = (4, 8, 8)
    std = 0.2 + 1.8 * torch.rand(latent, generator=gen, dtype=_F64)
    mean = 0.5 * torch.randn(latent, generator=gen, dtype=_F64)
    model = GaussianModel(mean, std, prediction="v")
    noise = torch.randn((4,) + latent, generator=gen, dtype=_F64)
    exact = model.exact_sample(noise)
    lines = ["2. Gaussian data, sampled from sigma = inf ([inf] + Karras rho=7, 80 -> 0.002, 0), v-prediction",
             "   sampler          " + "".join(f"N={n:<10d}" for n in step_counts) + "(max |x0 - exact ODE solution|)"]
    for name in ("euler", "heun", "dpmpp_2m"):
        errs = []
        for n in step_counts:
            sig = schedules.karras(n, 0.002, math.inf, sigma_max_finite=80.0)
            out = sampling.sample(model, noise, sig, sampler=name, backend="torch")
            errs.append((out - exact).abs().max().item())
        lines.append(f"   {name:<16s} " + "".join(f"{e:<12.2e}" for e in errs))
    # stochastic: compare the per-element std of many samples with the data's
    many = torch.randn((512,) + latent, generator=gen, dtype=_F64)
    seeds = [1234 + i for i in range(many.shape[0])]  # one seed per sample: one int would repeat one stream
    errs = []
    for n in step_counts:
        sig = schedules.karras(n, 0.002, math.inf, sigma_max_finite=80.0)
        out = sampling.sample(model, many, sig, sampler="euler_ancestral", seed=seeds, backend="torch")
        errs.append(((out.std(0) / std) - 1).abs().mean().item())
    lines.append(f"   {'euler_ancestral':<16s} " + "".join(f"{e:<12.2e}" for e in errs)
                 + "(mean |std(samples)/std - 1|, 512 samples, seeds 1234+i)")
    return lines


def _brightness_stats(images: torch.Tensor) -> tuple[float, float, float]:
    m = images.flatten(1).mean(1)
    return m.std().item(), _share(m < -BRIGHT), _share(m > BRIGHT)


def _image_table(gen, num_samples: int, num_steps: int) -> list[str]:
    images = builtin_images(n=64, size=16)
    model = ImageSetModel(images, prediction="v", sigma_data=1.0)
    noise = torch.randn((num_samples,) + tuple(images.shape[1:]), generator=gen, dtype=_F64)
    sd = schedules.DiscreteSchedule.from_betas("scaled_linear")
    zsnr = schedules.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True)
    runs = [
        ("SD (leading, offset 1)", sd.sigmas(num_steps, "leading", steps_offset=1)),
        ("zero SNR (trailing)", zsnr.sigmas(num_steps, "trailing")),
    ]
    lines = [f"3. Ideal denoiser of {images.shape[0]} built-in 16x16 images, euler, {num_steps} steps, "
             f"{num_samples} samples, v-prediction",
             f"   {'schedule':<24s}{'sigma_max':>10s}{'std(mean)':>11s}{'dark':>7s}{'bright':>8s}"
             f"   (per-image mean brightness; dark/bright: |mean| > {BRIGHT})"]
    s, d, b = _brightness_stats(images)
    lines.append(f"   {'data':<24s}{'':>10s}{s:>11.3f}{d:>7.0%}{b:>8.0%}")
    for label, sig in runs:
        out = sampling.sample(model, noise, sig, sampler="euler", prediction="v", backend="torch")
        s, d, b = _brightness_stats(out)
        lines.append(f"   {label:<24s}{sig[0].item():>10.4g}{s:>11.3f}{d:>7.0%}{b:>8.0%}")
    return lines


def main(argv=None) -> int:
    """Run the demo and print its tables; ``--quick`` uses fewer steps and samples (for tests)."""
    ap = argparse.ArgumentParser(prog="python -m zsnr_kernels demo", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and samples (about a second)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the demo's noise (default 0)")
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    steps = (8, 16) if args.quick else (8, 16, 32, 64)
    lines = _k_diffusion_at_inf(gen)
    lines += [""] + _gaussian_table(gen, steps)
    lines += [""] + _image_table(gen, 64 if args.quick else 512, 10 if args.quick else 25)
    lines += ["", f"({time.perf_counter() - t0:.1f} s, float64 on the CPU, torch reference backend)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
