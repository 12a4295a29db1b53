"""``ZSNRFlowMatchEulerDiscreteScheduler`` and ``ZSNRFlowMatchHeunDiscreteScheduler`` against diffusers'
``FlowMatchEulerDiscreteScheduler`` and ``FlowMatchHeunDiscreteScheduler``: the config keys, the schedules, the loops
(same model, schedule and noise), exactness at t = 1 (sigma = inf), and real flow pipelines (StableDiffusion3 and Flux
built from tiny random transformers and VAEs, prompt embeddings passed in: no text encoder, no download).

Tolerances.  diffusers builds its schedules in float64 and rounds them to float32 (custom sigmas: rounded first,
shifted in float32), and both flow schedulers upcast the sample to float32 before every update, whatever the model's
dtype: its loops carry float32 rounding.  So against diffusers itself, 2e-5 relative to the latents' scale (measured:
at most 2e-5, Heun, whose last correction weighs the predictor difference by (t - t')/(2 t')).  Exactness is checked
against diffusers' update formulas transcribed in float64 on diffusers' own (float32) times shared with the scheduler
here: 1e-12.
"""

from __future__ import annotations

import inspect
import math
import typing

import pytest
import torch
from conftest import TinyNet

diffusers = pytest.importorskip("diffusers")
zd = pytest.importorskip("zsnr_kernels.diffusers")

import zsnr_kernels as zk  # noqa: E402
from zsnr_kernels import schedules as S  # noqa: E402

F64 = torch.float64
EULER, HEUN = "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"
T = 1000


def _noise(dtype=torch.float32, seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _net(dtype=torch.float32, seed=3):
    net = TinyNet(4, seed=seed, dtype=dtype)
    return lambda x, t: net(x, t / T)  # a flow transformer takes t * 1000: fed back as the flow time


def _loop(sched, net, noise, *, seed=None, **step_kw):
    """A flow pipeline's loop (SD3's): the latents are the noise, then per timestep model and ``step``.  Returns the
    final latents and every model input."""
    if seed is not None:
        step_kw["generator"] = torch.Generator().manual_seed(seed)
    x, inputs = noise.clone(), []
    for t in sched.timesteps:
        inputs.append(x)
        x = sched.step(net(x, t.expand(x.shape[0])), t, x, **step_kw).prev_sample
    return x, inputs


def _pair(name, set_kw=None, **config):
    ref = getattr(diffusers, name)(**config)
    ours = zd.FLOW_SCHEDULERS[name].from_config(ref.config)
    set_kw = {"num_inference_steps": 7} if set_kw is None else set_kw
    ref.set_timesteps(**set_kw)
    ours.set_timesteps(**set_kw)
    return ref, ours


def _rel(a, b) -> float:
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1.0)


def _same_schedule(ref, ours, atol=2e-7, exact=False):
    """diffusers' float32 schedule: times to its rounding (custom sigmas: rounded before the shift, 2e-7), timesteps
    t * 1000 to float32 rounding of 1000 (6e-5) more.  ``exact``: a schedule diffusers computes in float64 (from a
    step count), whose float64 times here round to diffusers' float32 ones, timesteps equal."""
    if exact:
        assert torch.equal(ours.sigmas.float(), ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == F64 and len(ours.sigmas) == len(ref.sigmas)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=0, atol=atol)
    assert ours.timesteps.dtype == torch.float32 and len(ours.timesteps) == len(ref.timesteps)
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), rtol=0, atol=T * atol + 1.3e-4)


# ------------------------------------------------------------------------------------------------- config walk

#: values to try for config keys whose annotation names none (Literal keys try their literals, bools the other one)
_TRY = {"num_train_timesteps": [500], "shift": [3.0], "base_shift": [0.3], "max_shift": [1.5],
        "base_image_seq_len": [128], "max_image_seq_len": [2048], "shift_terminal": [0.1]}
#: what set_timesteps needs for a tried value (diffusers refuses use_dynamic_shifting without mu)
_SET = {"use_dynamic_shifting": {"mu": 0.7}}


def _tried(key, default, hint) -> list:
    lits = []
    if typing.get_origin(hint) is typing.Literal:
        lits = list(typing.get_args(hint))
    values = _TRY.get(key, []) + lits + ([not default] if isinstance(default, bool) else [])
    return [v for i, v in enumerate(values) if v != default and v not in values[:i]]


@pytest.mark.parametrize("name", [EULER, HEUN])
def test_every_config_value_the_namesake_takes_is_taken(name):
    """Walk the namesake's __init__: every key is a key here with its default, every value diffusers constructs with
    constructs here with the same config and gives diffusers' set_timesteps schedule and the same run on it (none is
    refused: the flow schedulers take all of diffusers' config).  The default config round-trips both ways."""
    ref_cls, cls = getattr(diffusers, name), zd.FLOW_SCHEDULERS[name]
    hints = typing.get_type_hints(ref_cls.__init__)
    ref_params = dict(list(inspect.signature(ref_cls.__init__).parameters.items())[1:])
    ours_params = inspect.signature(cls.__init__).parameters
    assert list(ours_params)[1:] == list(ref_params)
    for key, p in ref_params.items():
        assert ours_params[key].default == p.default, key
    net, noise = _net(), _noise()
    walked = 0
    for key, p in ref_params.items():
        for value in _tried(key, p.default, hints.get(key)):
            ref = ref_cls(**{key: value})
            ours = cls(**{key: value})
            assert {k: ours.config[k] for k in ref_params} == {k: ref.config[k] for k in ref_params}, (key, value)
            for s in (ref, ours):
                s.set_timesteps(8, **_SET.get(key, {}))
            _same_schedule(ref, ours, exact=key != "invert_sigmas")  # diffusers: 1 - t in float32
            a, _ = _loop(ref, net, noise, seed=1)
            b, _ = _loop(ours, net, noise, seed=1)
            assert _rel(a, b) <= 2e-5, (key, value, _rel(a, b))
            walked += 1
    assert walked >= (14 if name == EULER else 2)
    ref = ref_cls()
    ours = cls.from_config(ref.config)
    back = ref_cls.from_config(ours.config)
    assert {k: ours.config[k] for k in ref_params} == {k: ref.config[k] for k in ref_params} == {
        k: back.config[k] for k in ref_params}
    assert list(inspect.signature(cls.set_timesteps).parameters) == list(
        inspect.signature(ref_cls.set_timesteps).parameters)  # pipelines' retrieve_timesteps inspects it
    ref_step = list(inspect.signature(ref_cls.step).parameters)
    assert list(inspect.signature(cls.step).parameters)[: len(ref_step)] == ref_step  # positional as diffusers'


@pytest.mark.parametrize("source", [
    (EULER, {"shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "linear", "shift_terminal": 0.05}),
    (HEUN, {"shift": 2.5, "num_train_timesteps": 800}),
    ("FlowMatchLCMScheduler", {"shift": 3.0}),
])
@pytest.mark.parametrize("name", [EULER, HEUN])
def test_from_config_of_a_sibling(name, source):
    """``X.from_config(pipe.scheduler.config)`` from any flow sibling's config (the ZSNR classes' own included) takes
    what diffusers' namesake takes from it: the same config (keys it lacks dropped, its own defaults for the rest)."""
    src_name, src_cfg = source
    src = getattr(diffusers, src_name)(**src_cfg)
    want = getattr(diffusers, name).from_config(src.config)
    keys = list(inspect.signature(getattr(diffusers, name).__init__).parameters)[1:]
    for config in (src.config, zd.FLOW_SCHEDULERS.get(src_name, type(src)).from_config(src.config).config):
        got = zd.FLOW_SCHEDULERS[name].from_config(config)
        assert {k: got.config[k] for k in keys} == {k: want.config[k] for k in keys}


# ----------------------------------------------------------------------------------------------- the loops


EULER_CASES = [
    ({}, {}),
    ({"shift": 3.0}, {}),
    ({"use_dynamic_shifting": True}, {"mu": 0.8}),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.3}),
    ({"shift": 3.0, "shift_terminal": 0.1}, {}),
    ({"shift": 3.0, "use_karras_sigmas": True}, {}),
    ({"use_exponential_sigmas": True}, {}),
    ({"shift": 2.0, "use_beta_sigmas": True}, {}),
    ({"invert_sigmas": True, "shift": 3.0}, {}),
    ({"stochastic_sampling": True, "shift": 3.0}, {}),
    ({"use_dynamic_shifting": True}, {"num_inference_steps": None, "sigmas": [1.0, 0.8, 0.55, 0.3, 0.1], "mu": 0.9}),
    ({"shift": 3.0}, {"num_inference_steps": None, "timesteps": [1000.0, 800.0, 500.0, 200.0]}),
    ({"shift": 3.0}, {"num_inference_steps": 4, "sigmas": [1.0, 0.7, 0.4, 0.2], "timesteps": [999.0, 700, 400, 20]}),
]


def _case_id(case):
    cfg, kw = case
    return ",".join(f"{k}={v}" for k, v in {**cfg, **kw}.items() if v is not None) or "default"


@pytest.mark.filterwarnings("ignore:.*timesteps. were passed without")
@pytest.mark.parametrize("case", EULER_CASES, ids=_case_id)
def test_euler_loop_equals_diffusers(case):
    """Every option of FlowMatchEuler, run as a pipeline runs it: diffusers' schedule, model inputs and latents (its
    float32 rounding); the first time is 1 (inverted: diffusers' 0) and the first model input is the noise itself.
    Stochastic sampling draws its noise from the generator as diffusers does (same images)."""
    cfg, kw = case
    ref, ours = _pair(EULER, {"num_inference_steps": 7, **kw}, **cfg)
    _same_schedule(ref, ours, exact=not kw and not cfg.get("invert_sigmas"))
    assert ours.sigmas[0] == (0.0 if cfg.get("invert_sigmas") else 1.0)
    net, noise = _net(), _noise()
    a, ins_a = _loop(ref, net, noise, seed=5)
    b, ins_b = _loop(ours, net, noise, seed=5)
    assert torch.equal(ins_b[0], noise) and torch.isfinite(b).all()
    for u, v in [(a, b), *zip(ins_a, ins_b)]:
        assert _rel(u, v) <= 2e-5, _rel(u, v)


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"num_train_timesteps": 500, "shift": 1.7}])
@pytest.mark.parametrize("n", [1, 2, 9])
def test_heun_loop_equals_diffusers(config, n):
    """FlowMatchHeun: diffusers' 2n - 1 timesteps (every inner time twice), model inputs and latents, from t = 1,
    where both take the full two-evaluation step.  Heun's correction weighs the difference of the two denoised
    predictions by (t - t')/(2 t'), 500 for the two-step schedule 1 -> 0.001, so diffusers' float32 rounding is
    amplified there: 5e-5 (measured 2.1e-5)."""
    ref, ours = _pair(HEUN, {"num_inference_steps": n}, **config)
    _same_schedule(ref, ours, exact=True)
    assert ours.sigmas[0] == 1.0 and len(ours.timesteps) == 2 * n - 1
    net, noise = _net(), _noise()
    a, ins_a = _loop(ref, net, noise)
    b, ins_b = _loop(ours, net, noise)
    assert torch.equal(ins_b[0], noise) and torch.isfinite(b).all()
    for u, v in [(a, b), *zip(ins_a, ins_b)]:
        assert _rel(u, v) <= 5e-5, _rel(u, v)


def _transcribed(name, sigmas, timesteps, net, noise, inverted=False):
    """diffusers' step formulas in float64 on its own times: Euler x + (s' - s) v; Heun's first evaluation
    x + (s' - s) v_1, its second x + (s' - s)(v_1 + v_2)/2 (from the x of the first)."""
    x, first = noise.clone(), None
    for k, t in enumerate(timesteps):
        v = net(x, t.expand(x.shape[0]))
        if name == EULER:
            x = x + (sigmas[k + 1] - sigmas[k]) * v
        elif first is None:
            dt = sigmas[k + 1] - sigmas[k]
            first = (x, v, dt) if k < len(timesteps) - 1 else None
            x = x + dt * v
        else:
            x0, v1, dt = first
            first = None
            x = x0 + dt * (v1 + v) / 2
    return x


@pytest.mark.parametrize(("name", "config"), [(EULER, {"shift": 3.0}), (EULER, {"invert_sigmas": True}),
                                              (EULER, {"use_karras_sigmas": True}), (HEUN, {}), (HEUN, {"shift": 3.0})])
def test_float64_runs_are_diffusers_formulas_exactly(name, config):
    """On diffusers' own times (shared), in float64: the fused steps are diffusers' updates to 1e-12 (diffusers itself
    rounds the sample to float32 at every step, so it is compared above)."""
    ref, ours = _pair(name, {"num_inference_steps": 9}, **config)
    ours.sigmas, ours.timesteps = ref.sigmas.double().clone(), ref.timesteps.clone()
    net, noise = _net(F64), _noise(F64)
    want = _transcribed(name, ref.sigmas.double().tolist(), ref.timesteps, net, noise)
    got, inputs = _loop(ours, net, noise)
    assert got.dtype == F64 and torch.equal(inputs[0], noise)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [EULER, HEUN])
def test_first_step_is_the_exact_step_from_sigma_inf(name):
    """t = 1 is sigma = inf: the first evaluation's update is the library's step from inf on the noise itself
    (Euler's y' = t_1 y + (1 - t_1) D, D = y - v; Heun's predictor the same), equal to diffusers' x + (t_1 - 1) v
    in float64, and pred_original_sample is D = noise - v."""
    ref, ours = _pair(name, {"num_inference_steps": 5}, shift=3.0)
    noise, net = _noise(F64), _net(F64)
    t0 = ours.timesteps[0]
    v = net(noise, t0.expand(2))
    out = ours.step(v, t0, noise)
    t1 = float(ours.sigmas[1])
    torch.testing.assert_close(out.prev_sample, noise + (t1 - 1.0) * v, rtol=0, atol=1e-14)
    torch.testing.assert_close(out.pred_original_sample, noise - v, rtol=0, atol=0)
    fn = zk.euler_step if name == EULER else zk.heun_flow_step
    r = fn(noise, v, math.inf, float(S.flow_time_to_sigma([t1])[0]), prediction="flow", backend="torch")
    torch.testing.assert_close(out.prev_sample, r.y, rtol=0, atol=0)
    assert ours.step(v, t0, noise, return_dict=False)[0].shape == noise.shape  # a tuple, as diffusers'


# ----------------------------------------------------------------------------------- what pipelines do besides


def test_heun_second_evaluation_on_replaced_latents_is_diffusers():
    """A pipeline that blends other latents in between Heun's two evaluations (inpainting) or replaces them in a
    callback: diffusers finishes from the sample it stored at the first evaluation; so does this."""
    ref, ours = _pair(HEUN, {"num_inference_steps": 5}, shift=3.0)
    ours.sigmas = ref.sigmas.double().clone()
    net, noise = _net(F64), _noise(F64)
    known = _noise(F64, seed=9)
    outs = []
    for s in (ref, ours):
        x = noise.clone()
        for k, t in enumerate(s.timesteps):
            x = s.step(net(x, t.expand(2)), t, x).prev_sample.double()
            if k % 2 == 0:  # after each first evaluation: blend in a known region
                x = torch.cat([x[:, :2], 0.3 * x[:, 2:] + 0.7 * known[:, 2:]], dim=1)
        outs.append(x)
    assert _rel(outs[0], outs[1]) <= 2e-6  # diffusers rounds the sample to float32
    ours.set_timesteps(5)
    x = noise.clone()
    r = ours.step(net(x, ours.timesteps[0].expand(2)), ours.timesteps[0], x).prev_sample
    r.mul_(0.5)
    with pytest.raises(ValueError, match="edited in place"):
        ours.step(net(r, ours.timesteps[1].expand(2)), ours.timesteps[1], r)


@pytest.mark.parametrize("name", [EULER, HEUN])
def test_guidance_inside_the_step(name):
    """step(model_output=(cond, uncond), guidance_scale=w, guidance_rescale=phi): the pipeline's eager CFG and
    rescale_noise_cfg, then step (float32 rounding)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    net_c, net_u, noise = _net(seed=3), _net(seed=4), _noise()
    runs = []
    for fused in (False, True):
        s = zd.FLOW_SCHEDULERS[name](shift=3.0)
        s.set_timesteps(5)
        x = noise.clone()
        for t in s.timesteps:
            fc, fu = net_c(x, t.expand(2)), net_u(x, t.expand(2))
            if fused:
                x = s.step((fc, fu), t, x, guidance_scale=4.0, guidance_rescale=0.7).prev_sample
            else:
                f = rescale_noise_cfg(fu + 4.0 * (fc - fu), fc, guidance_rescale=0.7)
                x = s.step(f, t, x).prev_sample
        runs.append(x)
    assert _rel(runs[0], runs[1]) <= 1e-5


@pytest.mark.parametrize("name", [EULER, HEUN])
def test_scale_noise_and_img2img_start(name):
    """scale_noise is diffusers' forward process t noise + (1 - t) x0 at the evaluation of a timestep (by timestep,
    or from begin_index as img2img pipelines set it); a run started there equals diffusers'."""
    ref, ours = _pair(name, {"num_inference_steps": 6}, shift=3.0)
    x0, z = _noise(seed=1) * 0.5, _noise(seed=2)
    start = 2 if name == EULER else 4  # a first evaluation of a step (Heun lists inner times twice)
    outs = []
    for s in (ref, ours):
        s.set_begin_index(start)
        t0 = s.timesteps[start:start + 1]
        x = s.scale_noise(x0, t0, z)
        outs.append(x)
        net = _net()
        for t in s.timesteps[start:]:
            x = s.step(net(x, t.expand(2)), t, x).prev_sample
        outs.append(x)
    for u, v in zip(outs[:2], outs[2:]):
        assert _rel(u, v) <= 2e-5
    e = zd.FLOW_SCHEDULERS[name](shift=3.0)
    e.set_timesteps(6)
    torch.testing.assert_close(e.scale_noise(x0, e.timesteps[0:1], z), z, rtol=0, atol=0)  # t = 1: the noise


@pytest.mark.parametrize("name", [EULER, HEUN])
def test_save_load_and_half_precision_latents(name, tmp_path):
    """save_pretrained / from_pretrained round-trips the config (and diffusers' namesake loads it); bfloat16 latents
    with a bfloat16 model stay bfloat16 and follow the float32 run to bfloat16 rounding, as diffusers' do (measured:
    6e-3 and 7e-3 for Euler and Heun, diffusers' own the same).  Heun steps them in float32, as diffusers does: its
    correction weighs the predictor by up to (t - t')/(2 t') (24 on this schedule's last step), which took bfloat16
    state to 1.2e-1."""
    ours = zd.FLOW_SCHEDULERS[name](shift=3.0)
    ours.save_pretrained(tmp_path)
    loaded = zd.FLOW_SCHEDULERS[name].from_pretrained(tmp_path)
    keys = list(inspect.signature(getattr(diffusers, name).__init__).parameters)[1:]
    assert {k: loaded.config[k] for k in keys} == {k: ours.config[k] for k in keys}
    assert getattr(diffusers, name).from_pretrained(tmp_path).config.shift == 3.0
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        loaded.set_timesteps(6)
        out, _ = _loop(loaded, lambda x, t: _net()(x.float(), t).to(dtype), _noise().to(dtype))
        assert out.dtype == dtype
        runs.append(out.float())
    assert _rel(runs[0], runs[1]) <= 1e-2


def test_refusals_name_the_option_and_the_fix():
    s = zd.ZSNRFlowMatchEulerDiscreteScheduler()
    s.set_timesteps(4)
    x = _noise()
    with pytest.raises(ValueError, match="per_token_timesteps.*one noise level per sample"):
        s.step(x, s.timesteps[0], x, per_token_timesteps=torch.ones(2, 64))
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 0, x)
    with pytest.raises(ValueError, match="`mu` must be passed"):
        zd.ZSNRFlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4)
    s.set_timesteps(sigmas=[0.2, 0.6, 1.0])  # ascending: diffusers would add noise (inversion)
    with pytest.raises(ValueError, match="raises the noise level.*sampling, not inversion"):
        s.step(x, s.timesteps[0], x)
    h = zd.ZSNRFlowMatchHeunDiscreteScheduler()
    h.set_timesteps(4)
    with pytest.raises(ValueError, match="s_churn=0.5.*Use s_churn=0"):
        h.step(x, h.timesteps[0], x, s_churn=0.5)
    out = h.step(x, h.timesteps[0], x, s_churn=0.5, s_tmax=0.5)  # churn outside [s_tmin, s_tmax]: none, taken
    assert torch.isfinite(out.prev_sample).all()
    with pytest.raises(ValueError, match="only one of"):
        zd.ZSNRFlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


def test_pipelines_read_sigmas_as_flow_times():
    """LTX-2 and Cosmos read (and Cosmos writes) ``scheduler.sigmas`` as diffusers' flow times: they are, and a
    value written in place is the one the step uses, as in diffusers."""
    ref, ours = _pair(EULER, {"num_inference_steps": 5}, shift=3.0)
    for s in (ref, ours):
        s.sigmas[-1] = s.sigmas[-2]  # Cosmos2: the last step to its own time
    net, noise = _net(), _noise()
    a, _ = _loop(ref, net, noise)
    b, _ = _loop(ours, net, noise)
    assert _rel(a, b) <= 2e-5


# ---------------------------------------------------------------------------------------------- pipelines


def _sd3(scheduler):
    torch.manual_seed(0)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8,
        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tr, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_run(pipe, steps=6, output_type="latent"):
    g = torch.Generator().manual_seed(0)
    pe, pp = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=0.5 * pe,
                negative_pooled_prompt_embeds=0.5 * pp, guidance_scale=3.0, num_inference_steps=steps, height=8,
                width=8, generator=torch.Generator().manual_seed(1), output_type=output_type).images


@pytest.mark.parametrize(("name", "config"), [(EULER, {"shift": 3.0}), (EULER, {"shift": 3.0, "shift_terminal": 0.1}),
                                              (HEUN, {"shift": 3.0})])
def test_stable_diffusion_3_pipeline(name, config):
    """StableDiffusion3Pipeline (tiny random SD3Transformer2DModel and VAE, classifier-free guidance, prompt
    embeddings given): the one-line switch gives diffusers' latents and decoded images (float32 rounding), the
    scheduler starting at t = 1 = sigma = inf."""
    pipe = _sd3(getattr(diffusers, name)(**config))
    want, want_img = _sd3_run(pipe), _sd3_run(pipe, output_type="np")
    pipe.scheduler = zd.FLOW_SCHEDULERS[name].from_config(pipe.scheduler.config)
    got, got_img = _sd3_run(pipe), _sd3_run(pipe, output_type="np")
    assert pipe.scheduler.sigmas[0] == 1.0
    assert torch.isfinite(got).all() and _rel(want, got) <= 2e-5, _rel(want, got)
    assert _rel(torch.as_tensor(want_img), torch.as_tensor(got_img)) <= 1e-4


def test_flux_pipeline_dynamic_shifting():
    """FluxPipeline (tiny random FluxTransformer2DModel): it passes custom sigmas linspace(1, 1/n, n) and mu from the
    image's token count to set_timesteps of a use_dynamic_shifting config: diffusers' latents."""
    torch.manual_seed(0)
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=4,
        sample_size=16, shift_factor=0.1159, scaling_factor=0.3611).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      shift=3.0)
    pipe = diffusers.FluxPipeline(transformer=tr, vae=vae, scheduler=sched, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe(prompt_embeds=torch.randn(2, 5, 16, generator=g),
                    pooled_prompt_embeds=torch.randn(2, 8, generator=g),
                    num_inference_steps=6, height=16, width=16, generator=torch.Generator().manual_seed(1),
                    output_type="latent", guidance_scale=3.5).images

    want = run()
    pipe.scheduler = zd.ZSNRFlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    got = run()
    assert pipe.scheduler.sigmas[0] == 1.0
    assert torch.isfinite(got).all() and _rel(want, got) <= 2e-5, _rel(want, got)
