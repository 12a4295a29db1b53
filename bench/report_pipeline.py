"""One diffusers pipeline step's sampler time, in one process: what runs between one UNet call and the next, for the
stock pipeline's eager path and for the fused path of the ``zsnr_kernels.diffusers`` schedulers (issue 18).

    python bench/report_pipeline.py [--shapes 1x4x128x128 2x4x128x128] [--dtypes float32 bfloat16]
                                    [--schedulers euler ddim dpmpp_2m dpmpp_2s] [--budget 0.5] [--rounds 7]
                                    [--threads N]

* eager: what ``StableDiffusionPipeline.__call__`` does with the two halves of its doubled-batch UNet output,
  ``noise_pred_uncond + w (noise_pred_text - noise_pred_uncond)``, ``rescale_noise_cfg(noise_pred,
  noise_pred_text, guidance_rescale=phi)``, then the diffusers scheduler's ``step``;
* fused: the ZSNR scheduler of the same name, ``step((noise_pred_text, noise_pred_uncond), t, latents,
  guidance_scale=w, guidance_rescale=phi)``: guidance, its rescale and the update in the library's fused step (on
  CPU tensors the ``cpu`` kernels: one statistics pass and one update pass).

w = 7.5, phi = 0.7 (Lin et al.), a v-prediction model on SD's table, a mid-schedule step of a 25-step schedule (the
multistep schedulers with their history filled; singlestep DPM-Solver at the second step of a group, which reads
the group's start state).  Before timing, each pair is checked to compute the same latents.  All variants of a shape
and dtype are timed interleaved, ``--rounds`` rounds of samples of back-to-back calls
(:func:`zsnr_kernels.tools.bench.measure`), about ``--budget`` seconds each; the medians are printed with the load
average and the CPU time other processes took meanwhile (the machine may be shared: then the ratios are the figure
to read, and even they move).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import zsnr_kernels as zk
from zsnr_kernels.tools import bench

W, PHI = bench.GUIDANCE, bench.RESCALE
STEPS, AT = 25, 11  # the schedule's length and the step timed (mid-schedule; singlestep's order 2 there)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
#: name -> (diffusers class, its config beside SD's, the latents' space: "ve" (Euler: x) or "vp" (the model input))
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "ve"),
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}, "vp"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, "vp"),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"solver_order": 2}, "vp"),
}


def _pair(name: str):
    """(diffusers scheduler, ZSNR scheduler), both with the schedule set."""
    import diffusers

    import zsnr_kernels.diffusers as zd

    cls_name, extra, _ = SCHEDULERS[name]
    ref = getattr(diffusers, cls_name)(**SD, **extra)
    ours = zd.SCHEDULERS[cls_name].from_config(ref.config)
    for s in (ref, ours):
        s.set_timesteps(STEPS)
    return ref, ours


def _variants(name: str, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, d_prev: torch.Tensor):
    """(eager, fused, check): the two step functions of ``name``, each stepping the same step on every call, and
    a function returning (eager's result in the ZSNR state, fused's result)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    ref, ours = _pair(name)
    space = SCHEDULERS[name][2]
    t = ref.timesteps[AT]
    sig = ref.sigmas.double() if hasattr(ref, "sigmas") else None
    if space == "ve":  # diffusers' Euler latents are x; the ZSNR state is the model input y = x / sqrt(sigma^2 + 1)
        sigma, sigma_next = float(sig[AT]), float(sig[AT + 1])
        y = (latents.double() / math.hypot(sigma, 1.0)).to(latents.dtype)
        to_ours = lambda x: x.double() / math.hypot(sigma_next, 1.0)  # noqa: E731
    else:
        y, to_ours = latents, lambda x: x.double()  # noqa: E731

    def reset_ref():
        if name == "euler":
            ref._step_index = AT
            ref.is_scale_input_called = True  # the pipeline scaled the UNet's input (diffusers warns otherwise)
        elif name == "dpmpp_2m":
            ref._step_index = AT
            ref.model_outputs = [None, d_prev]  # step() shifts it: d_prev becomes the previous output
            ref.lower_order_nums = 2
        elif name == "dpmpp_2s":  # the second step of a group: order 2 from the group's start state
            ref._step_index = AT
            ref.model_outputs = [None, d_prev]
            ref.sample = latents

    def reset_ours():
        if name in ("euler", "dpmpp_2m", "dpmpp_2s"):
            ours._step_index = AT
        if name == "dpmpp_2m":
            ours._history = [(float(ours.sigmas[AT - 1]), d_prev)]
            ours.lower_order_nums = 2
        elif name == "dpmpp_2s":
            ours._group = ((float(ours.sigmas[AT - 1]), latents), [(float(ours.sigmas[AT - 1]), d_prev)])

    if name == "dpmpp_2s":
        assert ref.order_list[AT] == ours.order_list[AT] == 2, ref.order_list

    def eager():
        reset_ref()
        guided = uncond + W * (cond - uncond)
        guided = rescale_noise_cfg(guided, cond, guidance_rescale=PHI)
        return ref.step(guided, t, latents).prev_sample

    def fused():
        reset_ours()
        return ours.step((cond, uncond), t, y, guidance_scale=W, guidance_rescale=PHI).prev_sample

    return eager, fused, lambda: (to_ours(eager()), fused().double())


def run(shapes, dtypes, names, *, budget: float, rounds: int, device: str = "cpu", out=None) -> list[dict]:
    """Time every scheduler's eager and fused pipeline step at each shape and dtype; print and return the rows."""
    out = out or sys.stdout
    rows = []
    threads = zk.get_num_threads() if device == "cpu" else 0
    print(f"Pipeline step (CFG w={W} + rescale phi={PHI} + scheduler step), {device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} torch threads, cpu backend threads "
          f"{threads if device == 'cpu' else '-'}; median us per step of interleaved rounds", file=out)
    print(f"  {'scheduler':10s} {'shape':>12s} {'dtype':9s} {'eager us':>10s} {'fused us':>10s} {'eager/fused':>11s}"
          f" {'load':>5s} {'others':>6s}", file=out)
    for shape in shapes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            latents, cond, uncond, d_prev = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                                             for _ in range(4))
            fns, checks = {}, {}
            for name in names:
                eager, fused, check = _variants(name, latents, cond, uncond, d_prev)
                want, got = check()
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                scale = max(want.abs().max().item(), 1.0)
                if not torch.isfinite(got).all() or (got - want).abs().max().item() > tol * scale:
                    raise AssertionError(f"{name} {bench.fmt_shape(shape)} {dtype}: the fused step differs from the "
                                         f"eager one by {(got - want).abs().max().item():.3g}")
                fns[f"{name}/eager"], fns[f"{name}/fused"] = eager, fused
            load, others = os.getloadavg()[0], bench.others_cpu()
            m = bench.measure(fns, budget, rounds, device=device)
            used = others()
            for name in names:
                e, f = m[f"{name}/eager"] * 1e6, m[f"{name}/fused"] * 1e6
                row = {"scheduler": name, "shape": bench.fmt_shape(shape), "dtype": str(dtype)[6:], "eager_us": e,
                       "fused_us": f, "x": e / f, "loadavg": load, "others_cpu": used}
                rows.append(row)
                print(f"  {name:10s} {row['shape']:>12s} {row['dtype']:9s} {e:10.1f} {f:10.1f} {row['x']:10.2f}x "
                      f"{load:5.2f} {used:6.2f}", file=out)
            if device == "cpu" and bench.contended(used, threads):
                print(f"  (other processes used {used:.2f} cores of {os.cpu_count()} meanwhile: these times are "
                      "unreliable; read the ratios, and rerun on an idle machine)", file=out)
    print(f"load average after: {os.getloadavg()[0]:.2f}", file=out)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", type=bench.parse_shape, default=[(1, 4, 128, 128), (2, 4, 128, 128)])
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32", "bfloat16"])
    ap.add_argument("--schedulers", nargs="+", choices=list(SCHEDULERS), default=list(SCHEDULERS))
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of samples per variant (default 0.5)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, help="threads of PyTorch's ops and of the cpu kernels (default: as they "
                    "are); on a machine other processes keep busy, fewer than the free cores avoid OpenMP waits for "
                    "parked threads, which dwarf a step")
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
        zk.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    return run(a.shapes, [getattr(torch, d) for d in a.dtypes], a.schedulers, budget=a.budget, rounds=a.rounds,
               device=a.device)


if __name__ == "__main__":
    main()
