"""diffusers schedulers that start exactly at zero terminal SNR, on the fused steps of :mod:`zsnr_kernels.steps`.

Each class here is a real diffusers scheduler (``SchedulerMixin`` + ``ConfigMixin``) with the config keys of the
diffusers scheduler it is named after, so a pipeline takes it unchanged and switching is one line::

    pipe.scheduler = ZSNREulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = ZSNRDPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")   # zero terminal SNR

* :class:`ZSNRDDIMScheduler` (``DDIMScheduler``): :func:`~zsnr_kernels.ddim_step`
* :class:`ZSNRDDPMScheduler` (``DDPMScheduler``): :func:`~zsnr_kernels.ddpm_step`
* :class:`ZSNREulerDiscreteScheduler` (``EulerDiscreteScheduler``): :func:`~zsnr_kernels.euler_step`
* :class:`ZSNREulerAncestralDiscreteScheduler` (``EulerAncestralDiscreteScheduler``):
  :func:`~zsnr_kernels.euler_ancestral_step`
* :class:`ZSNRHeunDiscreteScheduler` (``HeunDiscreteScheduler``): :func:`~zsnr_kernels.heun_step`
* :class:`ZSNRDPMSolverMultistepScheduler` (``DPMSolverMultistepScheduler``, ``dpmsolver++`` and
  ``sde-dpmsolver++``): :func:`~zsnr_kernels.dpmpp_2m_step`, :func:`~zsnr_kernels.dpmpp_2m_sde_step`,
  :func:`~zsnr_kernels.dpmpp_3m_sde_step`
* :class:`ZSNRLMSDiscreteScheduler` (``LMSDiscreteScheduler``): :func:`~zsnr_kernels.lms_step`
* :class:`ZSNRUniPCMultistepScheduler` (``UniPCMultistepScheduler``): :func:`~zsnr_kernels.unipc_step`, the
  corrector and the predictor in one pass
* :class:`ZSNRKDPM2DiscreteScheduler` (``KDPM2DiscreteScheduler``): :func:`~zsnr_kernels.dpm_2_step`
* :class:`ZSNRKDPM2AncestralDiscreteScheduler` (``KDPM2AncestralDiscreteScheduler``):
  :func:`~zsnr_kernels.dpm_2_ancestral_step`
* :class:`ZSNREDMEulerScheduler` (``EDMEulerScheduler``): :func:`~zsnr_kernels.euler_step` with EDM's
  preconditioning (``sigma_data``)
* :class:`ZSNREDMDPMSolverMultistepScheduler` (``EDMDPMSolverMultistepScheduler``): the DPM-Solver++ steps above
  with EDM's preconditioning
* :class:`ZSNRFlowMatchEulerDiscreteScheduler` (``FlowMatchEulerDiscreteScheduler``): :func:`~zsnr_kernels.euler_step`
  (``stochastic_sampling``: :func:`~zsnr_kernels.lcm_step`) on a flow model (``prediction="flow"``), and
  :class:`ZSNRFlowMatchHeunDiscreteScheduler` (``FlowMatchHeunDiscreteScheduler``):
  :func:`~zsnr_kernels.heun_flow_step`.  Their sample is diffusers' own x_t = (1 - t) x0 + t noise, which is this
  library's state for flow; t = 1, where diffusers' schedules start, is sigma = inf exactly.  They are listed in
  :data:`FLOW_SCHEDULERS` (see their docstrings for what they take and refuse).

* :class:`ZSNRDPMSolverSDEScheduler` (``DPMSolverSDEScheduler``, k-diffusion's ``sample_dpmpp_sde``):
  :func:`~zsnr_kernels.dpmpp_sde_step`, diffusers' Brownian tree noise (``noise_sampler_seed``)
* :class:`ZSNRLCMScheduler` (``LCMScheduler``): the consistency model's D' = c_skip y + c_out D (one elementwise
  pass), then :func:`~zsnr_kernels.lcm_step` on D' as an x0-prediction; ``step`` returns ``prev_sample`` and
  ``denoised`` (what ``LatentConsistencyModelPipeline`` decodes), as diffusers'
* :class:`ZSNRTCDScheduler` (``TCDScheduler``): :func:`~zsnr_kernels.euler_step` (DDIM, eta = 0) to the intermediate
  timestep s = floor((1 - gamma) t') with TCD's renoising from s to t' folded in as EDM churn (``sigma_hat_next``);
  ``step`` returns ``prev_sample`` and ``pred_noised_sample``

* :class:`ZSNRDPMSolverSinglestepScheduler` (``DPMSolverSinglestepScheduler``, ``dpmsolver++`` and
  ``sde-dpmsolver++``, orders 1-3): :func:`~zsnr_kernels.coefficients.dpmpp_singlestep`, each step one fused pass
  from the state its group of steps started at (run through ``steps.sampler_step`` with the row
  :data:`~zsnr_kernels.coefficients.DPMPP_SINGLESTEP`, a row the steps run by name that the sampler table does not
  list)

:data:`SCHEDULERS` maps each diffusers class name to the class here.

The package is laid out as diffusers' ``schedulers``: one module per scheduler (``scheduling_ddim``,
``scheduling_ddpm``, ``scheduling_euler_discrete``, ``scheduling_euler_ancestral_discrete``,
``scheduling_heun_discrete``, ``scheduling_dpmsolver_multistep``, ``scheduling_dpmsolver_sde``, ``scheduling_dpmsolver_singlestep``, ``scheduling_lms_discrete``,
``scheduling_k_dpm_2_discrete``, ``scheduling_k_dpm_2_ancestral_discrete``, ``scheduling_unipc_multistep``,
``scheduling_edm_euler``, ``scheduling_edm_dpmsolver_multistep``, ``scheduling_flow_match_euler_discrete``,
``scheduling_flow_match_heun_discrete``, ``scheduling_lcm``, ``scheduling_tcd``) and ``_base`` for what they share (the output class, the base scheduler,
the timestep- and step-indexed walks, the EDM grids, the config and table helpers, and the one place a model output
becomes F, guidance included).  Import the classes
from ``zsnr_kernels.diffusers``.

**What the pipeline holds.**  The ``sample`` a pipeline keeps between steps is this library's state, the model
input y = c_in(sigma) x (docs/design.md §2.1), finite at every sigma including sigma = inf.  For the
variance-preserving schedulers (DDIM, DDPM, DPM-Solver) that is exactly diffusers' sample.  diffusers'
Euler-family schedulers keep the variance-exploding x = x0 + sigma eps instead, which is infinite at zero terminal
SNR; diffusers therefore replaces the last ``alphas_cumprod`` (0) by 2**-24, a sigma_max of 4096.  Here:

* ``sigmas[0]`` is exactly inf with ``rescale_betas_zero_snr=True`` and a spacing that reaches the last training
  timestep (``trailing``, ``linspace``); the model is called there at that timestep (T - 1), with y = the noise.
* ``init_noise_sigma`` is the noise scale of the first model input, the factor diffusers' first
  ``scale_model_input(noise * init_noise_sigma)`` applies: s(sigma_0) = sigma_0 / sqrt(sigma_0^2 + 1) (1 at
  sigma_0 = inf) for the Euler family with ``linspace``/``trailing`` spacing, 1 otherwise (a 0-d tensor in the
  Euler family, a float in the others, as diffusers' types).
* ``scale_model_input`` returns the sample unchanged: it already is the model input.
* ``step`` maps (y, model output) to the next y with the library's fused step (``backend``, default ``"auto"``);
  after the last step y at sigma = 0 is x0, what the pipeline decodes.
* ``add_noise`` returns the y of the noisy sample, sqrt(abar) x0 + sqrt(1 - abar) noise (the noise itself at zero
  SNR).

The step from sigma = inf is first order for every sampler (docs/design.md §2.3); an ``epsilon``-prediction model
cannot be evaluated there and ``step`` says so.  ``HeunDiscreteScheduler``, ``LMSDiscreteScheduler`` and the two
``KDPM2`` schedulers have no ``rescale_betas_zero_snr``; the classes here add it.  The EDM schedulers have no
training table: zero terminal SNR there is ``sigma_max=float("inf")`` with ``sigma_max_finite`` (a key of these
classes only), see :class:`ZSNREDMEulerScheduler`.

**Guidance inside the step.**  Pipelines guide before ``step``, in eager PyTorch (F = F_u + w (F_c - F_u), then
``rescale_noise_cfg``), so the fused guidance pass never runs there.  Every ``step`` here also takes the pair
``model_output=(noise_pred_cond, noise_pred_uncond)`` with the keywords ``guidance_scale`` (w) and
``guidance_rescale`` (phi), both off by default: the fused step then forms F and rescales it in the model output's
own space (``rescale_space="output"``, where diffusers' ``rescale_noise_cfg`` acts), giving the pipeline's result to
float32 rounding.  A pipeline uses it from a loop that hands both halves of its doubled-batch UNet call to
``step`` (tests/integrations/test_diffusers_pipelines.py has a ``StableDiffusionPipeline`` subclass doing it).
Where the guided output of a sample has std 0 the rescale factor is 1 (diffusers divides by 0 there).

**Parity with diffusers** on finite schedules (``tests/integrations/test_diffusers_schedulers.py``,
``tests/integrations/test_diffusers_contract.py``): same timesteps, model inputs and results to float32 rounding
(float64 where diffusers computes in the sample's dtype, once both use the same tables).  Every config value the
diffusers scheduler takes is taken (other schedulers' configs too, renamed as diffusers renames them: UniPC's and
DEIS' solver types become DPM-Solver's ``midpoint``, DPM-Solver's and DEIS' UniPC's ``bh2``), and so are custom ``timesteps=``/``sigmas=`` in
``set_timesteps`` where diffusers takes them, step counts beyond the table where diffusers takes them, and ``step``
before ``set_timesteps`` (the training schedule).  Noise for the stochastic samplers is drawn from the ``generator``
argument with diffusers' own ``randn_tensor`` calls (shape, dtype), so a generator seed gives diffusers' images.

Refused although diffusers takes them (a ValueError names the option, why, and what to use instead):

* ``algorithm_type="dpmsolver"``/``"sde-dpmsolver"``, the noise-prediction DPM-Solver (deprecated in diffusers):
  its multistep update combines earlier noise predictions, which the fused multistep steps do not keep (they
  remember denoised predictions).  ``dpmsolver++``/``sde-dpmsolver++`` have the same first-order step.
  Likewise UniPC's ``predict_x0=False`` (its noise-prediction form; ``True`` is diffusers' default) and its
  ``solver_p`` (another scheduler as predictor, outside the fused pass).
* UniPC's ``solver_order`` above 3: it remembers four or more predictions, and the fused kernels read at most
  three.
* Flow matching -- ``use_flow_sigmas``, ``use_dynamic_shifting`` (and ``set_timesteps(mu=)``),
  ``prediction_type="flow_prediction"``: such models keep x = (1 - t) x0 + t noise, not these variance-preserving
  tables; :func:`zsnr_kernels.sample` takes them with ``prediction="flow"`` on sigma = t / (1 - t).
* Euler's ``s_churn`` in ``step``: diffusers adds the churn noise after the model call, which is no fused step;
  ``zsnr_kernels.sample(..., s_churn=)`` adds it before the call, as EDM does.
* DDPM's ``variance_type="fixed_large_log"`` at ``step``: diffusers' step takes the square root of log(beta_t) < 0
  there (NaN noise); ``_get_variance`` returns diffusers' value.
* A schedule that raises the noise level (ascending custom ``timesteps``/``sigmas``: inversion; a final
  ``sigma_min`` above a grid the config ends lower): the fused steps integrate towards sigma = 0.
* ``rescale_betas_zero_snr`` on a one-entry table (diffusers returns NaN betas); a step at a timestep whose
  alphas_cumprod lies outside [0, 1] (betas above 1; diffusers computes NaN there).
* Values diffusers refuses only later -- an unknown ``prediction_type`` at ``step``, ``timestep_spacing``,
  ``interpolation_type`` or ``final_sigmas_type`` at ``set_timesteps`` -- are refused when the scheduler is built.

Deviations by design or from diffusers' own faults:

* The state is the model input y (above), not diffusers' variance-exploding x for the Euler family; the step from
  sigma = inf is first order, and an ``epsilon``-prediction model cannot be evaluated there.
* No noise is drawn for a step that adds none (diffusers draws, and multiplies by 0 or adds 1e-10 z, at the last
  step of Euler ancestral, DDPM, DDIM with eta > 0 and SDE-DPM-Solver++): the images are the same, the generator is
  left one draw earlier after the run.  DDPM's posterior variance is not clamped to 1e-20 (diffusers adds 1e-10 z
  at its last step).
* ``sde-dpmsolver++`` with ``solver_order=3`` follows k-diffusion's ``sample_dpmpp_3m_sde``: diffusers' third-order
  SDE update has the wrong sign on the 1/2 of its second-difference weight (it integrates to
  (1 - e^{-2h})/(4h^2) - 1/(2h) + 1/2; diffusers writes - 1/2).  The deterministic orders 1-3 match diffusers.
  Likewise the singlestep ``sde-dpmsolver++`` of order 3 with ``solver_type="heun"`` takes the integral's weight
  (diffusers' singlestep update has the same sign error); its other orders and types match diffusers.
* Zero-length steps (timesteps a spacing repeats when the step count nears the table's) leave the sample as it
  is; DPM-Solver and UniPC keep their history over them, singlestep DPM-Solver starts a new group of steps after
  them, where diffusers divides by their zero log-ratio and returns NaN.
* UniPC's ``bh1`` to a final sigma of 0 returns the last D (the limit: that step is first order), where diffusers
  returns NaN (it multiplies B(h) = -inf by its zero first-order residual).
* ``trailing`` step counts for which numpy's ``arange`` yields one value too many (T = 1000: 61, 103, 121, ...)
  give the requested number of steps, not diffusers' extra timestep -1.
* Tables and grids are float64 (diffusers: float32), so Karras/exponential/beta timesteps, found from log sigmas,
  move by up to 1e-2.  DPM-Solver's integer ones are equal for Karras and Lu (rounded); its exponential and beta
  ones are truncated, as in diffusers, and so may differ by 1 where t lies within 1e-2 of an integer (on SD's
  table diffusers' float32 t(sigma_max) = 998.9999997 truncates to 998; in float64 here it is 999).  Custom
  ``sigmas=`` are taken in float64 (diffusers rounds them to float32).  A training sigma above 1e30 is inf (a
  float32 alphas_cumprod, diffusers', underflows to 0 there).
* With ``leading`` spacing and no configured grid ``sigma_max``, ``init_noise_sigma`` does not depend on
  ``set_timesteps`` having run.  diffusers' Euler family computes it from the current sigmas, so a pipeline that
  reads it first (``LDMPipeline``) starts a ``leading`` schedule from its training sigma_max there, not from the
  schedule's first sigma; with ``linspace``/``trailing`` both are the same.  (With a Karras or exponential grid and
  a configured ``sigma_max`` it changes with ``set_timesteps``, as in diffusers.)
* Pipelines that drive the scheduler's sigmas or internals themselves instead of calling ``step`` on the latents
  they keep -- ``StableDiffusionLatentUpscalePipeline`` reads ``scheduler.sigmas`` and preconditions its own model
  inputs, LEDITS++ runs DPM-Solver's ``model_outputs`` and update functions -- assume diffusers' latents and
  internals and are not supported.
* ``prev_sample`` keeps the sample's dtype (diffusers' Euler family returns the model output's dtype).  Euler
  ancestral also takes ``prediction_type="sample"``, and DPM-Solver's learned-variance models keep the first half
  of their output channels for every prediction type (diffusers: the first 3 channels, epsilon only).
* LMS raises its order with the derivatives remembered in the run (diffusers: with the step index, so an img2img
  run that starts mid-schedule weighs its one derivative with a fourth-order coefficient) and integrates its
  coefficients exactly (diffusers: ``scipy.integrate.quad`` to 1e-4).
* KDPM2's midpoint timesteps are interpolated from float64 sigmas (diffusers: float32, whose ancestral sigma_down
  cancels for short schedules): up to 1e-2 apart.  Its step from sigma = inf keeps a placeholder evaluation, as
  Heun's.
* EDM's ``"epsilon"`` (EDM's F-parameterization) is the v-prediction of -F: the output is negated before the fused
  step, one elementwise pass.  ``init_noise_sigma`` is the scale of diffusers' first model input,
  sqrt(sigma_max^2 + 1) c_in(sigma_max) (diffusers draws x = sqrt(sigma_max^2 + 1) noise whatever ``sigma_data``).
  ``sde-dpmsolver++`` of order 3, which fails in diffusers' EDM variant, is k-diffusion's 3M SDE.
* LCM and TCD walk integer timesteps of the distillation schedule and, as diffusers, never read
  ``timestep_spacing``, ``steps_offset`` nor ``set_alpha_to_one`` (taken; an unknown spacing is not refused), nor
  TCD's ``clip_sample``/``thresholding``.  LCM's boundary condition D' is formed eagerly before its fused step (the
  guidance of a ``(cond, uncond)`` pair too); TCD's ``pred_noised_sample`` costs a second fused pass where the step
  adds noise.  With custom ``timesteps`` cut by ``strength`` LCM's last step returns D' (diffusers' step counter
  never reaches ``num_inference_steps - 1`` there, so it noises D' back to the last timestep; its pipelines decode
  ``denoised``, the same in both), and TCD draws no noise where s = t' (diffusers draws and multiplies by 0).
  A step past the end of the schedule raises (diffusers noises on), custom timesteps must lie in [0, T - 1]
  (diffusers reads alphas_cumprod[-1] for -1) and TCD's ``eta`` outside [0, 1] is a ValueError (diffusers asserts).
  At zero terminal SNR diffusers' LCM and TCD keep alphas_cumprod[-1] = 0 and are exact for v/x0 models too.
* A saved config names these classes (``_class_name``), which ``DiffusionPipeline.from_pretrained`` cannot look up
  in diffusers: load the pipeline, then set ``pipe.scheduler = ZSNR...Scheduler.from_pretrained(path,
  subfolder="scheduler")``.
"""

from __future__ import annotations

# _base first: it makes every diffusers import of the package, behind the "needs the diffusers package" error
from ._base import ZSNRSchedulerOutput
from .scheduling_ddim import ZSNRDDIMScheduler
from .scheduling_ddpm import ZSNRDDPMScheduler
from .scheduling_dpmsolver_multistep import ZSNRDPMSolverMultistepScheduler
from .scheduling_dpmsolver_sde import ZSNRDPMSolverSDEScheduler
from .scheduling_dpmsolver_singlestep import ZSNRDPMSolverSinglestepScheduler
from .scheduling_edm_dpmsolver_multistep import ZSNREDMDPMSolverMultistepScheduler
from .scheduling_edm_euler import ZSNREDMEulerScheduler
from .scheduling_euler_ancestral_discrete import ZSNREulerAncestralDiscreteScheduler
from .scheduling_euler_discrete import ZSNREulerDiscreteScheduler
from .scheduling_flow_match_euler_discrete import ZSNRFlowMatchEulerDiscreteScheduler
from .scheduling_flow_match_heun_discrete import ZSNRFlowMatchHeunDiscreteScheduler
from .scheduling_heun_discrete import ZSNRHeunDiscreteScheduler
from .scheduling_k_dpm_2_ancestral_discrete import ZSNRKDPM2AncestralDiscreteScheduler
from .scheduling_k_dpm_2_discrete import ZSNRKDPM2DiscreteScheduler
from .scheduling_lcm import ZSNRLCMScheduler, ZSNRLCMSchedulerOutput
from .scheduling_lms_discrete import ZSNRLMSDiscreteScheduler
from .scheduling_tcd import ZSNRTCDScheduler, ZSNRTCDSchedulerOutput
from .scheduling_unipc_multistep import ZSNRUniPCMultistepScheduler

__all__ = [
    "FLOW_SCHEDULERS",
    "SCHEDULERS",
    "ZSNRDDIMScheduler",
    "ZSNRDDPMScheduler",
    "ZSNRDPMSolverMultistepScheduler",
    "ZSNRDPMSolverSDEScheduler",
    "ZSNRDPMSolverSinglestepScheduler",
    "ZSNREDMDPMSolverMultistepScheduler",
    "ZSNREDMEulerScheduler",
    "ZSNREulerAncestralDiscreteScheduler",
    "ZSNREulerDiscreteScheduler",
    "ZSNRFlowMatchEulerDiscreteScheduler",
    "ZSNRFlowMatchHeunDiscreteScheduler",
    "ZSNRHeunDiscreteScheduler",
    "ZSNRKDPM2AncestralDiscreteScheduler",
    "ZSNRKDPM2DiscreteScheduler",
    "ZSNRLCMScheduler",
    "ZSNRLCMSchedulerOutput",
    "ZSNRLMSDiscreteScheduler",
    "ZSNRUniPCMultistepScheduler",
    "ZSNRSchedulerOutput",
    "ZSNRTCDScheduler",
    "ZSNRTCDSchedulerOutput",
]


#: diffusers scheduler class name -> the class here that takes its config
SCHEDULERS = {
    "DDIMScheduler": ZSNRDDIMScheduler,
    "DDPMScheduler": ZSNRDDPMScheduler,
    "EulerDiscreteScheduler": ZSNREulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": ZSNREulerAncestralDiscreteScheduler,
    "HeunDiscreteScheduler": ZSNRHeunDiscreteScheduler,
    "DPMSolverMultistepScheduler": ZSNRDPMSolverMultistepScheduler,
    "DPMSolverSDEScheduler": ZSNRDPMSolverSDEScheduler,
    "DPMSolverSinglestepScheduler": ZSNRDPMSolverSinglestepScheduler,
    "LMSDiscreteScheduler": ZSNRLMSDiscreteScheduler,
    "KDPM2DiscreteScheduler": ZSNRKDPM2DiscreteScheduler,
    "KDPM2AncestralDiscreteScheduler": ZSNRKDPM2AncestralDiscreteScheduler,
    "UniPCMultistepScheduler": ZSNRUniPCMultistepScheduler,
    "LCMScheduler": ZSNRLCMScheduler,
    "TCDScheduler": ZSNRTCDScheduler,
    "EDMEulerScheduler": ZSNREDMEulerScheduler,
    "EDMDPMSolverMultistepScheduler": ZSNREDMDPMSolverMultistepScheduler,
}

#: the flow-matching schedulers (diffusers class name -> the class here), apart from :data:`SCHEDULERS`: their sample
#: is x_t = (1 - t) x0 + t noise on flow times, not a training table of betas, so they take none of the other
#: schedulers' configs nor those schedulers theirs
FLOW_SCHEDULERS = {
    "FlowMatchEulerDiscreteScheduler": ZSNRFlowMatchEulerDiscreteScheduler,
    "FlowMatchHeunDiscreteScheduler": ZSNRFlowMatchHeunDiscreteScheduler,
}
