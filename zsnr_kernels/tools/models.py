"""Analytic models whose exact denoiser is known in closed form, for convergence tests and demos (docs/design.md §4).

Both models are called like a network, ``model(y, sigma) -> F``: ``y = c_in(sigma) * x`` is the model input and
``sigma`` a float64 (B,) tensor (inf allowed); F is the raw output for the model's ``prediction``, i.e. the F with
``D = p*y + q*F`` for ``(p, q) = Parameterization.denoise_coeffs(sigma)``.  The denoiser D is written directly in
terms of y through ``a = 1/sigma`` where sigma is large, so everything is finite at sigma = inf (where x is not).

* :class:`GaussianModel`: data x0 ~ N(mean, diag(std^2)); the probability-flow ODE has a closed-form solution
  (:meth:`GaussianModel.exact_sample`, :meth:`GaussianModel.exact_sample_from`).
* :class:`ImageSetModel`: the ideal denoiser of a small fixed set of images (a softmax-weighted mean);
  :func:`builtin_images` builds such a set across the whole brightness range, without downloads.

All math runs in float64; outputs come back in y's dtype.
"""

from __future__ import annotations

import math

import torch

from ..parameterization import parameterization

__all__ = ["GaussianModel", "ImageSetModel", "GuidedPair", "builtin_images"]

_F64 = torch.float64


def _sigma_column(sigma, y: torch.Tensor) -> torch.Tensor:
    """sigma as a float64 (B, 1, ..., 1) tensor broadcastable against y."""
    s = torch.as_tensor(sigma, dtype=_F64, device=y.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(y.shape[0])
    if s.numel() != y.shape[0]:
        raise ValueError(f"sigma has {s.numel()} values for a batch of {y.shape[0]}")
    if torch.isnan(s).any() or (s < 0).any():
        raise ValueError("sigma must be >= 0 and not NaN")
    return s.reshape((-1,) + (1,) * (y.ndim - 1))


class _AnalyticModel:
    """Shared part: the parameterization and the map from an exact D to the raw model output F."""

    def __init__(self, prediction: str = "v", sigma_data: float = 1.0):
        self.pz = parameterization(prediction, sigma_data)

    @property
    def prediction(self) -> str:
        return self.pz.prediction

    @property
    def sigma_data(self) -> float:
        return self.pz.sigma_data

    def _x_over_sigma2(self, sig: torch.Tensor):
        """(u, v) with x/sigma^2 = u*y and 1/sigma^2 = v, finite for every sigma > 0 including inf.

        x = y / c_in: for v/eps/x0, u = sqrt(sigma^2 + sd^2)/sigma^2 = a*sqrt(1 + sd^2 a^2) with a = 1/sigma;
        for flow, u = (1 + sigma)/sigma^2 = a + a^2.
        """
        a = 1.0 / sig  # 0 at inf
        if self.pz.prediction == "flow":
            u = a + a * a
        else:
            u = a * torch.sqrt(1.0 + (self.pz.sigma_data * a) ** 2)
        return u, a * a

    def _output(self, d: torch.Tensor, y64: torch.Tensor, sigma: torch.Tensor, dtype) -> torch.Tensor:
        """F = (D - p*y)/q per sample (eps-prediction raises at sigma = inf, as the library does)."""
        pq = [self.pz.denoise_coeffs(float(s)) for s in sigma.reshape(-1).tolist()]
        shape = (-1,) + (1,) * (y64.ndim - 1)
        p = torch.tensor([c[0] for c in pq], dtype=_F64, device=y64.device).reshape(shape)
        q = torch.tensor([c[1] for c in pq], dtype=_F64, device=y64.device).reshape(shape)
        if (q == 0).any():
            raise ValueError("the model output is undefined at sigma = 0 for this prediction (q = 0)")
        return ((d - p * y64) / q).to(dtype)


class GaussianModel(_AnalyticModel):
    """Exact model of Gaussian data x0 ~ N(mean, diag(std^2)), element-wise.

    ``mean`` and ``std`` are floats or tensors broadcastable to the latent's non-batch shape; ``std > 0``.  In the
    VE view (x = x0 + sigma*eps) the exact denoiser is ``D = mean + std^2/(std^2 + sigma^2) * (x - mean)``; with
    ``x/sigma^2 = u*y`` it is ``D = (mean + std^2*u*y)/(1 + std^2/sigma^2)``, finite at sigma = inf (D = mean).
    """

    def __init__(self, mean=0.0, std=1.0, prediction: str = "v", sigma_data: float = 1.0):
        super().__init__(prediction, sigma_data)
        self.mean = torch.as_tensor(mean, dtype=_F64)
        self.std = torch.as_tensor(std, dtype=_F64)
        if not (self.std > 0).all() or not torch.isfinite(self.std).all():
            raise ValueError("std must be finite and > 0")
        if not torch.isfinite(self.mean).all():
            raise ValueError("mean must be finite")

    def denoise(self, y: torch.Tensor, sigma) -> torch.Tensor:
        """The exact denoised prediction D(y, sigma) in float64."""
        y64 = y.to(_F64)
        sig = _sigma_column(sigma, y)
        u, inv2 = self._x_over_sigma2(sig)
        var = (self.std ** 2).to(y.device)
        mean = self.mean.to(y.device)
        return (mean + var * u * y64) / (1.0 + var * inv2)

    def __call__(self, y: torch.Tensor, sigma) -> torch.Tensor:
        sig = _sigma_column(sigma, y)
        return self._output(self.denoise(y, sig), y.to(_F64), sig, y.dtype)

    def exact_sample(self, noise: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE solution from sigma = inf: ``x0 = mean + std * noise``.

        Along the ODE, x(sigma) - mean is proportional to sqrt(std^2 + sigma^2), and y -> noise as sigma -> inf.
        """
        n = noise.to(_F64)
        return (self.mean.to(n.device) + self.std.to(n.device) * n).to(noise.dtype)

    def exact_sample_from(self, noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
        """The ODE solution from the start state of ``initial_state(noise, sigma_max)`` (x = sigma_max * noise).

        ``x0 = mean + std / sqrt(std^2 + sigma_max^2) * (x - mean)``; equals :meth:`exact_sample` at inf.
        """
        sigma_max = float(sigma_max)
        if math.isinf(sigma_max):
            return self.exact_sample(noise)
        n = noise.to(_F64)
        mean, std = self.mean.to(n.device), self.std.to(n.device)
        x = self.pz.to_x(n * self.pz.noise_scale(sigma_max), sigma_max)
        return (mean + std / torch.sqrt(std ** 2 + sigma_max ** 2) * (x - mean)).to(noise.dtype)


class GuidedPair:
    """Two models called together, ``model(y, sigma) -> (F_cond, F_uncond)``, for classifier-free guidance.

    With two :class:`GaussianModel` of the same ``std`` (and prediction), guidance scale w gives exactly the
    Gaussian model of mean ``mean_u + w (mean_c - mean_u)`` (D is affine in the mean), so
    :meth:`exact_sample` is known: see :meth:`guided_model`.
    """

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond

    def __call__(self, y: torch.Tensor, sigma):
        return self.cond(y, sigma), self.uncond(y, sigma)

    def guided_model(self, w: float) -> GaussianModel:
        """The single Gaussian model equal to guidance at scale ``w`` (only for Gaussians of equal std)."""
        c, u = self.cond, self.uncond
        if not (isinstance(c, GaussianModel) and isinstance(u, GaussianModel)):
            raise TypeError("guided_model needs two GaussianModel instances")
        if c.pz != u.pz or not torch.equal(*torch.broadcast_tensors(c.std, u.std)):
            raise ValueError("guided_model needs equal std and parameterization")
        return GaussianModel(u.mean + w * (c.mean - u.mean), c.std, c.prediction, c.sigma_data)


def guided(cond, uncond) -> GuidedPair:
    """``GuidedPair(cond, uncond)``: a model returning ``(F_cond, F_uncond)``."""
    return GuidedPair(cond, uncond)


class ImageSetModel(_AnalyticModel):
    """The ideal denoiser of a fixed set of images (the exact denoiser of the empirical data distribution).

    ``D(x, sigma) = sum_k w_k img_k`` with ``w = softmax_k(-|x - img_k|^2 / (2 sigma^2))``.  Dropping |x|^2 (the
    same for every k), the logits are ``(x/sigma^2) . img_k - |img_k|^2 / (2 sigma^2) = u (y . img_k) - v |img_k|^2/2``
    (see ``_x_over_sigma2``): all 0 at sigma = inf, where D is the mean image.  ``images`` is (K, *latent_shape).
    """

    def __init__(self, images: torch.Tensor, prediction: str = "v", sigma_data: float = 0.5):
        super().__init__(prediction, sigma_data)
        imgs = torch.as_tensor(images, dtype=_F64)
        if imgs.ndim < 2 or imgs.shape[0] < 1 or not torch.isfinite(imgs).all():
            raise ValueError("images must be a finite (K, ...) tensor with K >= 1")
        self.images = imgs
        self._flat = imgs.reshape(imgs.shape[0], -1)
        self._half_sq = 0.5 * (self._flat ** 2).sum(1)

    def denoise(self, y: torch.Tensor, sigma) -> torch.Tensor:
        """The exact denoised prediction D(y, sigma) in float64."""
        y64 = y.to(_F64)
        sig = _sigma_column(sigma, y).reshape(-1, 1)
        u, inv2 = self._x_over_sigma2(sig)
        flat = self._flat.to(y.device)
        logits = u * (y64.reshape(y.shape[0], -1) @ flat.T) - inv2 * self._half_sq.to(y.device)
        return (torch.softmax(logits, dim=1) @ flat).reshape(y.shape)

    def __call__(self, y: torch.Tensor, sigma) -> torch.Tensor:
        sig = _sigma_column(sigma, y)
        return self._output(self.denoise(y, sig), y.to(_F64), sig, y.dtype)


def builtin_images(n: int = 64, size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic set of ``n`` small images (n, channels, size, size), float64 in [-1, 1].

    Each image is a flat background plus a few smooth blobs and a soft-edged disc.  The background levels are
    evenly spread over [-0.9, 0.9] (shuffled), so the set's mean brightness spans very dark to very bright.
    """
    if n < 1 or size < 2 or channels < 1:
        raise ValueError("need n >= 1, size >= 2, channels >= 1")
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1.0, 1.0, size, dtype=_F64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    levels = torch.linspace(-0.9, 0.9, n, dtype=_F64)[torch.randperm(n, generator=g)]
    out = torch.empty(n, channels, size, size, dtype=_F64)
    for k in range(n):
        r = lambda *s: torch.rand(*s, generator=g, dtype=_F64)  # noqa: E731
        img = levels[k] + 0.1 * (r(channels, 1, 1) - 0.5)
        for _ in range(3):  # smooth blobs
            cx, cy, w = (2 * r(3) - 1).tolist()
            w = 0.4 + 0.2 * w  # width in 0.2 .. 0.6
            amp = 0.6 * (2 * r(channels, 1, 1) - 1)
            img = img + amp * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w ** 2))
        cx, cy, rad = (1.2 * r(3) - 0.6).tolist()
        rad = 0.45 + rad / 4  # radius in 0.3 .. 0.6
        disc = torch.sigmoid((rad - torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)) * 12.0)
        img = img + 0.5 * (2 * r(channels, 1, 1) - 1) * disc
        out[k] = img.clamp(-1.0, 1.0)
    return out
