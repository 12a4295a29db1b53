"""zsnr-kernels: fused diffusion-sampler steps that start exactly at zero terminal SNR (sigma = inf).

The state is the model input y = c_in(sigma) * x, finite at every sigma (docs/design.md §2.1); every sampler step is
one linear combination of y, the denoised prediction and remembered tensors with host-side float64 coefficients.

* :func:`sample` runs a whole schedule; the ``*_step`` functions are one model evaluation each, for your own loop;
  :class:`SamplingPlan` plans a whole run once so that it steps without host synchronisation (CUDA graphs).
* :mod:`zsnr_kernels.schedules` builds schedules (zero-terminal-SNR rescale, diffusers' spacings, Karras ...).
* :mod:`zsnr_kernels.coefficients` holds the host coefficients, :mod:`zsnr_kernels.reference` the eager spec.
* :mod:`zsnr_kernels.k_diffusion` and :mod:`zsnr_kernels.diffusers` meet users where they are: drop-ins for
  k-diffusion's samplers and schedulers for diffusers pipelines (imported on first use).
* :func:`use_backend` picks the backend of every step in a block (``backend="auto"`` otherwise picks it per
  tensor: :data:`BACKENDS`).
* :func:`set_num_threads` sets how many threads the ``cpu`` kernels use (their own pool, which a forked child
  starts anew with the parent's setting; see :func:`set_num_threads` for the PyTorch ops a step may run there).
* :func:`retain_freed_memory` (opt-in, glibc) keeps glibc from returning a loop's freed step outputs to the OS and
  page-faulting them back in on the next step.
"""

from ._version import __version__  # noqa: E402

from . import coefficients, noise, reference, schedules  # noqa: E402
from .parameterization import PREDICTIONS, Parameterization, parameterization
from .backends.cpu import get_num_threads, set_num_threads
from .backends.host_memory import retain_freed_memory
from .backends.registry import BACKENDS, use_backend
from .plan import SamplingPlan
from .sampling import SAMPLERS, sample
from .steps import (
    StepResult,
    churn_step,
    ddim_step,
    ddpm_step,
    dpm_2_ancestral_step,
    dpm_2_step,
    dpmpp_2m_sde_step,
    dpmpp_2m_step,
    dpmpp_2s_ancestral_step,
    dpmpp_3m_sde_step,
    dpmpp_sde_step,
    dpmpp_2m_cfg_pp_step,
    dpmpp_2s_ancestral_cfg_pp_step,
    euler_ancestral_cfg_pp_step,
    euler_ancestral_step,
    euler_cfg_pp_step,
    euler_step,
    final_sample,
    heun_flow_step,
    heun_step,
    initial_state,
    lcm_step,
    lms_step,
    res_multistep_step,
    unipc_step,
    to_x,
    to_y,
)


__all__ = [
    "BACKENDS", "PREDICTIONS", "Parameterization", "SAMPLERS", "SamplingPlan", "StepResult", "churn_step",
    "coefficients",
    "ddim_step", "ddpm_step", "dpm_2_ancestral_step", "dpm_2_step", "dpmpp_2m_sde_step", "dpmpp_2m_step",
    "dpmpp_2s_ancestral_step", "dpmpp_3m_sde_step", "dpmpp_sde_step", "euler_ancestral_step", "euler_step", "final_sample",
    "get_num_threads", "heun_flow_step", "heun_step", "initial_state", "lcm_step", "lms_step", "noise", "parameterization", "reference",
    "res_multistep_step", "retain_freed_memory",
    "euler_cfg_pp_step", "euler_ancestral_cfg_pp_step", "dpmpp_2m_cfg_pp_step", "dpmpp_2s_ancestral_cfg_pp_step", "sample", "schedules", "set_num_threads", "to_x", "to_y", "unipc_step", "use_backend",
]


def __getattr__(name: str):
    """The integrations load on first use (``zsnr_kernels.diffusers`` needs the diffusers package)."""
    if name in ("k_diffusion", "diffusers"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
