"""Model parameterizations: the input scale c_in and the affine map from model output F to denoised D.

docs/design.md §2.1-2.2.  The state this library stores is the model input ``y = c_in(sigma) * x``
(``x = x0 + sigma*eps`` in the variance-exploding view), finite at every sigma in [0, inf].  Writing
``s(sigma) = sigma * c_in(sigma)`` for the noise scale of y (1 at sigma = inf), a noisy state is
``y = c_in * x0 + s * eps`` and the denoised prediction is affine in the model output::

    D = p(sigma) * y + q(sigma) * F

=========  =====================  =======================================  ==================
prediction c_in(sigma)            p, q                                     at sigma = inf
=========  =====================  =======================================  ==================
``v``      1/sqrt(sigma^2+sd^2)   p = sd^2 c_in,  q = -sd s                p = 0, q = -sd
``eps``    1/sqrt(sigma^2+sd^2)   p = 1/c_in,     q = -sigma               undefined (refused)
``x0``     1/sqrt(sigma^2+sd^2)   p = 0,          q = 1                    p = 0, q = 1
``flow``   1/(1+sigma)            p = 1,          q = -s                   p = 1, q = -1
=========  =====================  =======================================  ==================

(``sd`` is ``sigma_data``; for ``flow`` the rectified-flow time is t = sigma/(1+sigma) = s and y = x_t.)
All functions here are float64 host math on Python floats, written through ratios that stay finite at both ends
(``sigma/sqrt(sigma^2+sd^2)`` is computed as ``1/hypot(1, sd/sigma)``, never inf/inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _validate

PREDICTIONS = ("v", "eps", "x0", "flow")
#: The sigma_data accepted: with every positive sigma in [1e-30, 1e30] (the steps' range), sigma_data/sigma,
#: 1/sigma_data and the LMS derivative's scale stay finite in float32.
SIGMA_DATA_MIN, SIGMA_DATA_MAX = 1e-8, 1e8

_INF = math.inf


@dataclass(frozen=True)
class Parameterization:
    """What the model predicts (``prediction``) and the data scale ``sigma_data`` it was trained with.

    Instances are cheap, hashable and compare by value.  Construct through :func:`parameterization` to get
    argument validation with a clear message.
    """

    prediction: str = "v"
    sigma_data: float = 1.0

    def c_in(self, sigma: float) -> float:
        """Input scale: y = c_in(sigma) * x.  0 at sigma = inf; 1/sigma_data (1 for flow) at sigma = 0."""
        if self.prediction == "flow":
            return 1.0 / (1.0 + sigma)
        return 1.0 / math.hypot(sigma, self.sigma_data)

    def noise_scale(self, sigma: float) -> float:
        """s(sigma) = sigma * c_in(sigma), the scale of the unit noise inside y: 0 at sigma = 0, 1 at inf."""
        if sigma == 0.0:
            return 0.0
        if self.prediction == "flow":
            return 1.0 / (1.0 + 1.0 / sigma)
        return 1.0 / math.hypot(1.0, self.sigma_data / sigma)

    def denoise_coeffs(self, sigma: float) -> tuple[float, float]:
        """(p, q) with D = p*y + q*F for a model output F evaluated at ``sigma``."""
        pred, sd = self.prediction, self.sigma_data
        if pred == "v":
            return sd * sd * self.c_in(sigma), -sd * self.noise_scale(sigma)
        if pred == "x0":
            return 0.0, 1.0
        if pred == "flow":
            return 1.0, -self.noise_scale(sigma)
        # eps
        if sigma == _INF:
            raise ValueError(
                "an eps-prediction model cannot be evaluated at sigma = inf: D = x - sigma*eps has no limit "
                "there (Lin et al. 2023, §3.2). Use a v- or x0-prediction model (prediction='v' or 'x0'), "
                "or start from a finite sigma_max (sigmas[0] < inf)."
            )
        return math.hypot(sigma, sd), -sigma

    def to_y(self, x, sigma: float):
        """Variance-exploding latent x (x0 + sigma*eps) -> model input y.  Not defined for x at sigma = inf."""
        if sigma == _INF:
            raise ValueError("x is infinite at sigma = inf; the state there is y = noise itself")
        return x * self.c_in(sigma)

    def to_x(self, y, sigma: float):
        """Model input y -> variance-exploding latent x = y / c_in(sigma).  None at sigma = inf (x is infinite)."""
        if sigma == _INF:
            return None
        return y / self.c_in(sigma)


def parameterization(prediction: str = "v", sigma_data: float = 1.0) -> Parameterization:
    """Validated constructor: ``prediction`` in ``PREDICTIONS``, ``sigma_data`` a real number (a Python or numpy
    scalar, or a one-element tensor) in [SIGMA_DATA_MIN, SIGMA_DATA_MAX] (cached: the step functions call it on every
    step)."""
    compiling = torch.compiler.is_compiling()  # traced, the cache stays out of the graph: a lookup that missed
    # while the first call was traced would be a guard that the second call fails, recompiling the whole loop
    if type(prediction) is str and type(sigma_data) is float and not compiling:  # seen before: one dict lookup
        pz = _known.get((prediction, sigma_data))
        if pz is not None:
            return pz
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    sigma_data = _validate.real("sigma_data", sigma_data)  # the real-option check every option shares
    if not sigma_data > 0.0:
        raise ValueError(f"sigma_data must be > 0 (the standard deviation of the data: 1.0 for SD-family models, "
                         f"0.5 for EDM), got {sigma_data}")
    if not SIGMA_DATA_MIN <= sigma_data <= SIGMA_DATA_MAX:
        raise ValueError(f"sigma_data={sigma_data!r} is outside [{SIGMA_DATA_MIN:g}, {SIGMA_DATA_MAX:g}] (beyond it "
                         "sigma_data/sigma and 1/sigma_data overflow float32 or float64 at accepted sigmas); it is "
                         "the standard deviation of the data: 1.0 for SD-family models, 0.5 for EDM")
    if compiling:
        return Parameterization(prediction, sigma_data)
    if len(_known) >= 64:
        _known.clear()
    pz = _known[(prediction, sigma_data)] = Parameterization(prediction, sigma_data)
    return pz


_known: dict[tuple[str, float], Parameterization] = {}  # the validated ones, so one dict lookup per call


def rescale_space_coeffs(pz: Parameterization, sigma: float, space: str) -> tuple[float, float]:
    """(u, t) such that the guidance rescale (§2.7) acts on G = u*y + t*F, up to a per-sample scale.

    ``output``: G = F (the paper, diffusers).  ``x0``: G = D = p y + q F.  ``v``: the v-prediction of the same D,
    v = (D - p_v y_v)/q_v with y_v = (c_v/c) y the v-model input (ComfyUI's RescaleCFG); dropping the common
    factor 1/q_v, u = p - sd^2 c_v^2/c and t = q, where c_v^2/c = c for v/eps/x0 models and
    (1 + sigma)/(sigma^2 + sd^2) for flow (0 at sigma = inf).
    """
    if space == "output":
        return 0.0, 1.0
    p, q = pz.denoise_coeffs(sigma)
    if space == "x0":
        return p, q
    sd2 = pz.sigma_data * pz.sigma_data
    if pz.prediction == "flow":
        cv2_over_c = 0.0 if sigma == _INF else (1.0 + sigma) / (sigma * sigma + sd2)
    else:
        cv2_over_c = pz.c_in(sigma)
    return p - sd2 * cv2_over_c, q
