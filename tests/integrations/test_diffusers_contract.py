"""The diffusers contract of ``zsnr_kernels.diffusers``, tried as a diffusers user tries a scheduler: every config
value its namesake takes, configs of the other schedulers a pipeline may ship with, the ``set_timesteps`` forms
(step counts up to the training table's, custom ``timesteps``/``sigmas``, the grids), stepping before
``set_timesteps``, and the attributes and types pipelines read.  Where diffusers gives a result, these give its result
on finite schedules (the tolerances of tests/integrations/test_diffusers_schedulers.py: diffusers' float32 tables,
1e-4 relative); where these refuse what diffusers takes, the refusal is one of ``_base.REFUSED``, named in the error
and in the package docstring.
"""

from __future__ import annotations

import inspect
import math
import typing
import warnings

import numpy as np
import pytest
import torch
from conftest import TinyNet
from test_diffusers_schedulers import (CONSISTENCY, DISCRETE, MIDPOINT_ATOL, MIDPOINTS, NO_SPACING, SD, ZERO_SNR, _abar,
                                      _loop, _noise, _own, _pair, _share_tables, _step_sigmas)

diffusers = pytest.importorskip("diffusers")
zd = pytest.importorskip("zsnr_kernels.diffusers")
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers  # noqa: E402
from zsnr_kernels.diffusers._base import REFUSED  # noqa: E402

F64 = torch.float64


def _ours(ref) -> zd._base._ZSNRScheduler:
    """The scheduler here built from diffusers scheduler ``ref``'s config (the one-line switch)."""
    return zd.SCHEDULERS[type(ref).__name__].from_config(ref.config)


def _both(ref, ours, net, noise, *, seed=None, rel=1e-4, atol_t=1e-2, **step_kw):
    """Run a pipeline's loop with both (schedules already set); check the final samples and model inputs agree to
    ``rel`` of their scale.  Timesteps found from sigmas may differ by diffusers' float32 rounding, ``atol_t`` (the
    net barely feels 1e-2; DPM-Solver truncates them to integers, 1 apart near one)."""
    assert len(ref.timesteps) == len(ours.timesteps)
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), rtol=0, atol=atol_t)
    a, ins_a = _loop(ref, net, noise, seed=seed, **step_kw)
    b, ins_b = _loop(ours, net, noise, seed=seed, **step_kw)
    assert torch.isfinite(b).all()
    for u, v in [(a, b), *zip(ins_a, ins_b)]:
        assert (u - v).abs().max().item() <= rel * max(u.abs().max().item(), 1.0), (u - v).abs().max().item()


# ------------------------------------------------------------------------------------------------- config walk

#: values to try for config keys whose annotation names none (Literal keys try their literals, bools the other one)
_TRY = {
    "num_train_timesteps": [500], "beta_start": [0.0002], "beta_end": [0.03],
    "beta_schedule": ["scaled_linear", "squaredcos_cap_v2", "exp", "laplace", "sigmoid", "cosine"],
    "trained_betas": [np.linspace(0.0001, 0.02, 1000).tolist()],
    "prediction_type": ["v_prediction", "sample", "original_sample", "flow_prediction"],
    "interpolation_type": ["log_linear"], "timestep_spacing": ["leading", "trailing", "linspace"],
    "steps_offset": [1], "clip_sample_range": [2.0], "dynamic_thresholding_ratio": [0.9], "sample_max_value": [2.0],
    "sigma_min": [0.1], "sigma_max": [10.0], "solver_order": [1, 3, 4], "flow_shift": [3.0],
    "lambda_min_clipped": [-5.1], "algorithm_type": ["deis"], "solver_type": ["logrho", "bh1", "bh2"],
}
#: what a tried value needs beside it to take effect (diffusers refuses the noise-prediction DPM-Solver ending at 0)
_WITH = {"sigma_min": {"use_karras_sigmas": True}, "sigma_max": {"use_karras_sigmas": True},
         "timestep_type": {"prediction_type": "v_prediction"}, "algorithm_type": {"final_sigmas_type": "sigma_min"}}
#: keys whose timesteps come from float sigmas (diffusers': float32), so float rounding apart
_FROM_SIGMAS = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "interpolation_type", "timestep_type", "sigma_min", "sigma_max"}


def _literals(hint) -> list:
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [v for arg in typing.get_args(hint) for v in _literals(arg)]  # inside Optional[...] and unions


def _tried(key: str, default, hint) -> list:
    values = _TRY.get(key, []) + _literals(hint) + ([not default] if isinstance(default, bool) else [])
    tried = []
    for v in values:
        if v != default and v not in tried:
            tried.append(v)
    return tried


def _same_schedule(ref, ours, grid: bool) -> None:
    """set_timesteps(8) of both: the same timesteps (a grid's to diffusers' float32 rounding of log sigma; DPM-Solver
    truncates those, within 1) and noise levels (alphas_cumprod; diffusers' zero-SNR 2**-24 is 0 here)."""
    for s in (ref, ours):
        s.set_timesteps(8)
    atol = (1 if not ours.timesteps.is_floating_point() else 1e-2) if grid else 1e-5
    seen = torch.ones_like(ref.timesteps, dtype=torch.bool)
    if type(ref).__name__ in MIDPOINTS:
        atol = max(atol, MIDPOINT_ATOL)
        seen = ref.timesteps.isfinite()  # diffusers' float32 sigma_down can be the root of a negative rounding error
    torch.testing.assert_close(ours.timesteps.double()[seen], ref.timesteps.double()[seen], rtol=0, atol=atol)
    if hasattr(ref, "sigmas"):
        torch.testing.assert_close(_abar(ours.sigmas), _abar(_step_sigmas(ref)), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", list(zd.SCHEDULERS))
def test_every_config_value_the_namesake_takes_is_taken(name):
    """Walk the namesake's __init__: every key is a key here with its default, and every value diffusers constructs
    with (each Literal, the other bool, a value for the rest) constructs here with the same config and gives the
    same set_timesteps schedule, or is refused with a ValueError naming it, for a reason listed in REFUSED and the
    package docstring.  The namesake's default config round-trips both ways."""
    ref_cls, cls = getattr(diffusers, name), zd.SCHEDULERS[name]
    hints = typing.get_type_hints(ref_cls.__init__)
    ref_params = dict(list(inspect.signature(ref_cls.__init__).parameters.items())[1:])
    ours_params = inspect.signature(cls.__init__).parameters
    for key, p in ref_params.items():
        assert key in ours_params and ours_params[key].default == p.default, key
    refused = set()
    for key, p in ref_params.items():
        for value in _tried(key, p.default, hints.get(key)):
            cfg = {**{k: v for k, v in _WITH.get(key, {}).items() if k in ref_params}, key: value}
            try:
                ref = ref_cls(**cfg)
            except (ValueError, NotImplementedError):
                continue  # diffusers refuses it too
            try:
                ours = cls(**cfg)
            except ValueError as exc:
                assert (key, value) in REFUSED and f"{key}={value!r}" in str(exc), (key, value, exc)
                assert f"``{key}" in zd.__doc__, key
                refused.add((key, value))
                continue
            for k in ref_params:
                assert ours.config[k] == ref.config[k], (key, value, k)
            _same_schedule(ref, ours, grid=key in _FROM_SIGMAS)
    assert refused <= set(REFUSED)
    ref = ref_cls()
    ours = cls.from_config(ref.config)
    back = ref_cls.from_config(ours.config)
    assert {k: ours.config[k] for k in ref_params} == {k: ref.config[k] for k in ref_params} == {
        k: back.config[k] for k in ref_params}


@pytest.fixture(scope="module")
def shipped():
    """Every scheduler diffusers lists as compatible, default-built, its config as a saved pipeline ships it: every
    key given (no ``_use_default_values``, which from_config reads as 'take your own default').  Built once: some
    (KDPM2) are slow to build and warn about numpy 2 in diffusers' own code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {e.name: {k: v for k, v in getattr(diffusers, e.name)().config.items() if k != "_use_default_values"}
                for e in KarrasDiffusionSchedulers}


@pytest.mark.parametrize("name", list(zd.SCHEDULERS))
def test_switching_from_every_compatible_scheduler(name, shipped):
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)`` from a pipeline shipped with any scheduler diffusers
    lists as compatible: where the namesake takes the config, so does X, with the namesake's config (UniPC's bh2
    and DEIS' logrho solver types become DPM-Solver's midpoint, DEIS' algorithm dpmsolver++) and timesteps."""
    ref_cls, cls = getattr(diffusers, name), zd.SCHEDULERS[name]
    keys = list(inspect.signature(ref_cls.__init__).parameters)[1:]
    for other, config in shipped.items():
        try:
            ref = ref_cls.from_config(config)
        except (ValueError, NotImplementedError, TypeError):  # (TypeError: EDM's grid of Euler's sigma_min=None)
            continue
        ours = cls.from_config(config)
        assert {k: ours.config[k] for k in keys} == {k: ref.config[k] for k in keys}, other
        _same_schedule(ref, ours, grid=False)
    if name == "DPMSolverMultistepScheduler":  # diffusers' own DPM-Solver refuses DEIS' algorithm with a final 0
        ours = cls.from_config(shipped["DEISMultistepScheduler"])
        assert (ours.config.solver_type, ours.config.algorithm_type) == ("midpoint", "dpmsolver++")


# -------------------------------------------------------- what broke where diffusers works (issue 18, item 1)


@pytest.mark.parametrize("T", [1000, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_takes_as_many_steps_as_training_timesteps(T, spacing):
    """set_timesteps(num_train_timesteps) returns diffusers' n timesteps (linspace and leading over n + 1 points
    repeat some: zero-length steps), and runs where diffusers' does (trailing: equal; linspace, where diffusers'
    second-order step divides by the zero log-ratio and returns NaN: finite; leading repeats timestep 0 n times,
    and diffusers' run, like this one, finds the second of them and steps past the end)."""
    cfg = dict(num_train_timesteps=T, timestep_spacing=spacing, prediction_type="v_prediction", **SD)
    ref, ours = _pair("DPMSolverMultistepScheduler", T, **cfg)
    assert torch.equal(ours.timesteps, ref.timesteps) and len(ours.timesteps) == T
    torch.testing.assert_close(_abar(ours.sigmas), _abar(ref.sigmas.double()), rtol=2e-5, atol=0)
    if T > 100:
        return  # the runs: on the small table
    net, noise = TinyNet(4, seed=3, dtype=torch.float32), _noise(shape=(1, 4, 4, 4))
    if spacing == "trailing":
        _both(ref, ours, net, noise)
    elif spacing == "linspace":
        assert torch.isfinite(_loop(ours, net, noise)[0]).all()


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_grid_to_final_sigma_min_finishes(name, grid):
    """final_sigmas_type="sigma_min" after a grid ending at sigma_min: the last step goes from sigma_min to itself
    (the formulas returned it a rounding error below the final sigma, 0.010000500037502566 vs ...575 on diffusers'
    default table, and the step refused to raise the noise level).  Equal to diffusers' run."""
    ref = getattr(diffusers, name)(final_sigmas_type="sigma_min", prediction_type="v_prediction", **{grid: True})
    ours = _ours(ref)
    for s in (ref, ours):
        s.set_timesteps(10)
    assert ours.sigmas[-1] == ours.sigmas[-2] == ours._train_sigmas[0]
    _both(ref, ours, TinyNet(4, seed=5, dtype=torch.float32), _noise())
    if name == "EulerDiscreteScheduler":  # a grid the config ends lower: the final sigma_min would raise the level
        low = zd.ZSNREulerDiscreteScheduler(final_sigmas_type="sigma_min", sigma_min=0.005, **{grid: True})
        with pytest.raises(ValueError, match="raises the noise level.*final_sigmas_type='zero'"):
            low.set_timesteps(10)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"])
def test_euler_family_steps_before_set_timesteps(name):
    """Training code and hand-built loops step without set_timesteps: over the training schedule (every timestep),
    as diffusers, here from img2img-style add_noise at timesteps[start] for a few evaluations."""
    ref = getattr(diffusers, name)(prediction_type="v_prediction", **SD)
    ours = _ours(ref)
    assert ours.num_inference_steps == ref.num_inference_steps
    assert torch.equal(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype))
    net, x0, z = TinyNet(4, seed=6, dtype=torch.float32), _noise(seed=1) * 0.5, _noise(seed=2)
    start = 400  # a first evaluation of a step (Heun lists every inner timestep twice)
    outs = []
    for s in (ref, ours):
        g = torch.Generator().manual_seed(3)
        kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
        x, inputs = s.add_noise(x0, z, s.timesteps[start:start + 1]), []
        for t in s.timesteps[start:start + 6]:
            inputs.append(s.scale_model_input(x, t))
            x = s.step(net(inputs[-1], t), t, x, **kw).prev_sample
        outs.append(inputs + [s.scale_model_input(x, s.timesteps[start + 6])])
    for u, v in zip(*outs):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4)


def test_types_pipelines_read():
    """init_noise_sigma is a tensor in the Euler family (pipelines call .cpu() or .to() on it), a float elsewhere;
    DDPM's previous_timestep returns diffusers' types and values (a tensor for a tensor, t - 1 before
    set_timesteps)."""
    for name in DISCRETE:
        ref = getattr(diffusers, name)(**SD)
        ours = _ours(ref)
        for s in (ref, ours):
            s.set_timesteps(5)
        assert type(ours.init_noise_sigma) is type(ref.init_noise_sigma), name
        if isinstance(ours.init_noise_sigma, torch.Tensor):
            assert ours.init_noise_sigma.cpu().ndim == 0
    ref, ours = diffusers.DDPMScheduler(), zd.ZSNRDDPMScheduler()
    assert ours.previous_timestep(7) == ref.previous_timestep(7) == 6
    for s in (ref, ours):
        s.set_timesteps(5)
    for t in ref.timesteps:
        got, want = ours.previous_timestep(t), ref.previous_timestep(t)
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got == want
    ours.set_timesteps(timesteps=[900, 500, 3])
    assert ours.custom_timesteps and ours.previous_timestep(torch.tensor(3)) == -1


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_and_ddpm_variances_pipelines_call(set_alpha_to_one):
    """CycleDiffusion, LEDITS++ and value-guided RL read DDIM's final_alpha_cumprod and _get_variance and DDPM's
    _get_variance: diffusers' values (float32 tables there), for every DDPM variance type."""
    ref = diffusers.DDIMScheduler(set_alpha_to_one=set_alpha_to_one, **SD)
    ours = _ours(ref)
    torch.testing.assert_close(ours.final_alpha_cumprod, ref.final_alpha_cumprod.double(), rtol=1e-6, atol=0)
    for t, prev in ((999, 899), (500, 480), (20, -80)):
        torch.testing.assert_close(ours._get_variance(t, prev), ref._get_variance(t, prev).double(), rtol=1e-4,
                                   atol=0)
    predicted = torch.linspace(-1, 1, 5)
    for kind in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range"):
        ref = diffusers.DDPMScheduler(variance_type=kind, **SD)
        ours = _ours(ref)
        for s in (ref, ours):
            s.set_timesteps(10)
        for t in (ref.timesteps[0], ref.timesteps[-1]):
            torch.testing.assert_close(ours._get_variance(t, predicted).double(),
                                       ref._get_variance(t, predicted).double(), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("name", DISCRETE)
def test_configs_diffusers_builds_are_built(name):
    """trained_betas of another length than num_train_timesteps, a one-entry table, beta_end = 1 (100 timesteps:
    the last alphas_cumprod is exactly 0, zero terminal SNR without the rescale): built, and run as diffusers where
    its run is finite (with beta_end = 1: the variance-preserving schedulers; diffusers' Euler family keeps
    x = x0 + inf noise there); from the last timestep, here, a finite run from sigma = inf.  The consistency
    schedulers (LCM, TCD) get a distillation schedule the table holds (original_inference_steps at most T; diffusers
    refuses more) and, being variance-preserving, are compared with beta_end = 1 too."""
    vp = name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", *CONSISTENCY)
    cases = [({"num_train_timesteps": 500, "trained_betas": zd.SCHEDULERS[name](**SD).betas.tolist()}, True),
             ({"num_train_timesteps": 1}, True),
             ({"num_train_timesteps": 100, "beta_end": 1.0, "timestep_spacing": "leading"}, vp)]
    net, noise = TinyNet(4, seed=7, dtype=torch.float32), _noise()
    for cfg, compare in cases:
        cfg = {**cfg, "prediction_type": "v_prediction"}
        if name in ("DDIMScheduler", "DDPMScheduler"):
            cfg["clip_sample"] = False
        if name in CONSISTENCY:
            cfg["original_inference_steps"] = min(cfg["num_train_timesteps"], 50)
        steps = min(cfg["num_train_timesteps"], 10)
        if name in NO_SPACING and cfg["num_train_timesteps"] == 1:  # diffusers' order list of 1 step of order 2 is
            with pytest.raises(IndexError):                            # empty there: it fails to index its end
                getattr(diffusers, name)(**_own(name, cfg))
            ours = zd.SCHEDULERS[name](**_own(name, cfg))
            ours.set_timesteps(1)
            assert torch.isfinite(_loop(ours, net, noise)[0]).all()
            continue
        ref, ours = _pair(name, steps, **cfg)
        if compare:
            _both(ref, ours, net, noise, seed=8)
    ours = zd.SCHEDULERS[name](**_own(name, dict(num_train_timesteps=100, beta_end=1.0, timestep_spacing="trailing",
                                                 prediction_type="v_prediction")))
    ours.set_timesteps(10)
    out, inputs = _loop(ours, net, noise, seed=9)
    assert torch.equal(inputs[0], noise) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- custom schedules and new options


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_custom_timesteps_and_sigmas(name):
    """set_timesteps(timesteps=...) (and sigmas=... where diffusers takes them): diffusers' schedule and run; the
    signature names them as diffusers' does (pipelines' retrieve_timesteps inspects it)."""
    ref_cls = getattr(diffusers, name)
    params = inspect.signature(ref_cls.set_timesteps).parameters
    assert list(inspect.signature(zd.SCHEDULERS[name].set_timesteps).parameters) == list(params)
    net, noise = TinyNet(4, seed=10, dtype=torch.float32), _noise()
    custom = [{"timesteps": [999, 850, 700, 500, 300, 120, 40, 5]}]
    if "sigmas" in params:
        custom.append({"sigmas": [14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0]})
    for kw in custom:
        ref = ref_cls(prediction_type="v_prediction", **SD)
        ours = _ours(ref)
        for s in (ref, ours):
            s.set_timesteps(**kw)
        assert ours.num_inference_steps == ref.num_inference_steps
        _both(ref, ours, net, noise)
    zsnr = zd.SCHEDULERS[name](**ZERO_SNR)
    zsnr.set_timesteps(timesteps=[999, 600, 200])
    assert zsnr.sigmas[0] == math.inf and torch.isfinite(_loop(zsnr, net, noise)[0]).all()
    with pytest.raises(ValueError, match="exactly one"):
        zsnr.set_timesteps(4, timesteps=[999, 500])
    if "sigmas" in params:
        zsnr.set_timesteps(sigmas=[math.inf, 3.0, 0.5, 0.0])
        assert zsnr.timesteps[0] == 999 and torch.isfinite(_loop(zsnr, net, noise)[0]).all()
        with pytest.raises(ValueError, match="raises the noise level.*sampling, not inversion"):
            zsnr.set_timesteps(sigmas=[0.5, 3.0, 0.0])


@pytest.mark.parametrize(("name", "config"), [
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True}),
    ("HeunDiscreteScheduler", {"use_beta_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}),
    ("DPMSolverMultistepScheduler", {"solver_order": 4, "algorithm_type": "deis", "solver_type": "bh2",
                                     "final_sigmas_type": "sigma_min"}),
])
def test_schedule_options(name, config):
    """Options that shape the schedule (beta and Lu grids, log-linear sigmas, EDM's continuous timesteps) or that
    diffusers renames: diffusers' run, on SD's table and at zero SNR (inf first, finite)."""
    ref = getattr(diffusers, name)(prediction_type="v_prediction", **config, **SD)
    ours = _ours(ref)
    for s in (ref, ours):
        s.set_timesteps(10)
    net, noise = TinyNet(4, seed=11, dtype=torch.float32), _noise()
    _both(ref, ours, net, noise, atol_t=1 if name == "DPMSolverMultistepScheduler" else 1e-2)
    zsnr = zd.SCHEDULERS[name](**{**ZERO_SNR, **config})
    zsnr.set_timesteps(10)
    out, inputs = _loop(zsnr, net, noise)
    assert zsnr.sigmas[0] == math.inf and torch.equal(inputs[0], noise) and torch.isfinite(out).all()


@pytest.mark.parametrize("variance_type", ["fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_variance_types(variance_type, spacing):
    """DDPM's other variance types scale the step's noise to diffusers' std (the learned ones from the second half
    of the model's output channels), on shared float64 tables: diffusers' images; fixed_large_log, whose noise is
    NaN in diffusers, is refused at the step, naming it."""
    ref, ours = _pair("DDPMScheduler", 10, variance_type=variance_type, timestep_spacing=spacing,
                      prediction_type="v_prediction", clip_sample=False, **SD)
    _share_tables(ref, ours)
    net = TinyNet(4, seed=12)

    def model(y, t):  # a variance-learning model: 8 channels for a 4-channel sample, the variance part in [-1, 1]
        f = net(y, t)
        if variance_type == "fixed_large":
            return f
        return torch.cat([f, f.tanh().abs() if variance_type == "learned" else f.tanh()], dim=1)

    a, _ = _loop(ref, model, _noise(F64), seed=13)
    b, _ = _loop(ours, model, _noise(F64), seed=13)
    assert (a - b).abs().max().item() <= 1e-8
    ours = zd.ZSNRDDPMScheduler(variance_type="fixed_large_log")
    ours.set_timesteps(5)
    x = _noise()
    with pytest.raises(ValueError, match="variance_type='fixed_large_log'.*use 'fixed_large'"):
        ours.step(x, ours.timesteps[0], x)


def test_noise_prediction_dpm_solver_is_refused_with_the_fix():
    for algorithm in ("dpmsolver", "sde-dpmsolver"):
        with pytest.raises(ValueError, match=f"algorithm_type='{algorithm}'.*use algorithm_type='{algorithm}\\+\\+'"):
            zd.ZSNRDPMSolverMultistepScheduler(algorithm_type=algorithm, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="use_flow_sigmas=True.*prediction='flow'"):
        zd.ZSNRDPMSolverMultistepScheduler(use_flow_sigmas=True)


@pytest.mark.parametrize("name", DISCRETE)
def test_more_steps_than_training_timesteps(name):
    """The Euler family and DPM-Solver take more steps than the table has timesteps, as diffusers (fractional
    linspace timesteps: diffusers' run; DPM-Solver repeats timesteps); DDIM, DDPM, LCM and TCD refuse, as diffusers
    does (the consistency schedulers with a distillation schedule of every timestep)."""
    cfg = {"num_train_timesteps": 20, "prediction_type": "v_prediction"}
    if name in CONSISTENCY:
        cfg["original_inference_steps"] = 20
    if name in ("DDIMScheduler", "DDPMScheduler", *CONSISTENCY):
        with pytest.raises(ValueError):
            getattr(diffusers, name)(**cfg).set_timesteps(30)
        with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, num_train_timesteps=20\]"):
            zd.SCHEDULERS[name](**cfg).set_timesteps(30)
        return
    ref, ours = _pair(name, 30, **cfg)
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSinglestepScheduler"):
        assert torch.equal(ours.timesteps, ref.timesteps) and len(ours.timesteps) == 30  # repeated: diffusers' NaN
        assert torch.isfinite(_loop(ours, TinyNet(4, seed=14, dtype=torch.float32), _noise())[0]).all()
    else:
        _both(ref, ours, TinyNet(4, seed=14, dtype=torch.float32), _noise(), seed=15)
