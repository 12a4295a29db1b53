"""``python -m zsnr_kernels demo``: what starting exactly at sigma = inf changes, measured on exact models.

Three small experiments on the CPU, float64, one thread, no downloads (about 4 s):

1. sigma = inf in the variance-exploding view (k-diffusion): ``x = noise * sigma_max`` is infinite and the first
   model input ``c_in * x = 0 * inf`` is NaN; this library's state ``y`` is the noise itself, finite.
2. :class:`~zsnr_kernels.tools.models.GaussianModel` sampled from sigma = inf: error against the exact ODE solution
   for deterministic samplers and step counts; for ``euler_ancestral`` (seeded) the error of the samples' std.
3. :class:`~zsnr_kernels.tools.models.ImageSetModel` (the ideal denoiser of :func:`~zsnr_kernels.tools.models.builtin_images`):
   spread of the generated images' mean brightness under Stable Diffusion's schedule (scaled_linear betas,
   ``leading`` spacing, steps_offset=1, finite sigma_max) versus zero terminal SNR (rescaled betas, ``trailing``,
   sigmas[0] = inf), next to the data's (Lin et al. 2023, §3), for a few samplers and step counts.  The same
   noise and seeds serve both schedules.  A PNG (no matplotlib needed) shows the image grids, sorted by
   brightness, and the brightness histograms of one of the runs.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import sampling, schedules
from ..steps import initial_state
from . import cli as _cli, png as _png
from .models import GaussianModel, ImageSetModel, builtin_images

_F64 = torch.float64
BRIGHT = 0.6  # |mean brightness| above this counts as a very dark / very bright image
SAMPLERS = ("euler", "dpmpp_2m", "euler_ancestral")
STEP_COUNTS = (10, 25, 50)
FIGURE_RUN = ("euler", 25)  # the run drawn in the PNG (--quick: the first sampler and step count)
DEFAULT_PNG = "zsnr_demo.png"


def _k_diffusion_at_inf(gen) -> list[str]:
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=_F64)
    x = noise * math.inf  # k-diffusion: x = noise * sigmas[0]
    c_in = 1.0 / math.sqrt(math.inf**2 + 1.0)  # VE wrapper's input scale at sigma = inf: 0
    model_in = x * c_in  # 0 * inf
    y, _ = initial_state(noise, math.inf)
    return [
        "1. sigma_max = inf",
        (f"   k-diffusion   x = noise * sigma_max: {_share(~torch.isfinite(x)):.0%} non-finite; "
         f"model input c_in * x: {_share(torch.isnan(model_in)):.0%} NaN"),
        (f"   zsnr_kernels  y = initial_state(noise, inf): {_share(torch.isfinite(y)):.0%} finite, "
         f"max |y - noise| = {(y - noise).abs().max().item():.1e}"),
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


def _brightness(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean brightness (images in [-1, 1])."""
    return images.flatten(1).mean(1)


@dataclass
class Spread:
    """Spread of per-image mean brightness: its std and the shares of very dark and very bright images."""

    std: float
    dark: float
    bright: float

    @classmethod
    def of(cls, images: torch.Tensor) -> Spread:
        m = _brightness(images)
        return cls(m.std().item(), _share(m < -BRIGHT), _share(m > BRIGHT))

    def cells(self) -> str:
        return f"{self.std:>7.3f}{self.dark:>7.0%}{self.bright:>7.0%}"


@dataclass
class ImageRun:
    """One sampler and step count under both schedules."""

    sampler: str
    steps: int
    sd_sigma_max: float
    sd: torch.Tensor     # samples under SD's schedule
    zsnr: torch.Tensor   # samples from sigma = inf


def _image_runs(gen, num_samples: int, samplers, step_counts) -> tuple[torch.Tensor, list[ImageRun]]:
    """The built-in images and one :class:`ImageRun` per sampler and step count (same noise and seeds for all)."""
    images = builtin_images(n=64, size=16)
    model = ImageSetModel(images, prediction="v", sigma_data=1.0)
    noise = torch.randn((num_samples,) + tuple(images.shape[1:]), generator=gen, dtype=_F64)
    seed = int(torch.randint(2**31, (1,), generator=gen))  # sample i of a stochastic sampler: Philox seed + i
    sd = schedules.DiscreteSchedule.from_betas("scaled_linear")
    zsnr = schedules.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True)
    runs = []
    for name in samplers:
        for n in step_counts:
            sd_sig = sd.sigmas(n, "leading", steps_offset=1)
            out = [sampling.sample(model, noise, sig, sampler=name, prediction="v", seed=seed, backend="torch")
                   for sig in (sd_sig, zsnr.sigmas(n, "trailing"))]
            runs.append(ImageRun(name, n, sd_sig[0].item(), *out))
    return images, runs


def _image_table(images: torch.Tensor, runs: list[ImageRun]) -> list[str]:
    data = Spread.of(images)
    n = runs[0].sd.shape[0]
    group = f"{'sigma_max':>10s}{'std':>7s}{'dark':>7s}{'bright':>7s}"
    lines = [f"3. Ideal denoiser of {images.shape[0]} built-in 16x16 images, {n} samples, v-prediction",
             "   the brightness experiment of Lin et al. 2023, sec. 3",
             "   SD: scaled_linear betas, leading spacing, steps_offset 1",
             "   zero SNR: the same betas rescaled to zero terminal SNR, trailing spacing, sigma_max = inf",
             f"   std: std of the per-image mean brightness; dark / bright: share with mean < -{BRIGHT} / > {BRIGHT}",
             f"   data: std {data.std:.3f}, dark {data.dark:.0%}, bright {data.bright:.0%}",
             f"   {'':22s}{'SD (leading, offset 1)':>31s}   {'zero SNR (trailing)':>31s}",
             f"   {'sampler':<16s}{'steps':>6s}{group}   {group}"]
    closer, gap_sd, gap_zsnr = 0, 0.0, 0.0
    for r in runs:
        s, z = Spread.of(r.sd), Spread.of(r.zsnr)
        lines.append(f"   {r.sampler:<16s}{r.steps:>6d}{r.sd_sigma_max:>10.2f}{s.cells()}   {'inf':>10s}{z.cells()}")
        closer += abs(z.std - data.std) < abs(s.std - data.std)
        gap_sd += abs(s.std - data.std) / len(runs)
        gap_zsnr += abs(z.std - data.std) / len(runs)
    lines.append(f"   zero SNR's std is closer to the data's in {closer} of {len(runs)} runs; mean |std - data std|: "
                 f"SD {gap_sd:.3f}, zero SNR {gap_zsnr:.3f}")
    return lines


# ------------------------------------------------------------------------------------------------- the figure

GRID_COLS = 8        # images per grid row
GRID_SCALE = 2       # each image pixel becomes GRID_SCALE x GRID_SCALE figure pixels
GRID_GAP = 2         # pixels between images
HIST_BINS = 20       # over mean brightness [-1, 1]
_BG, _INK, _GAP, _GRAY = (255, 255, 255), (0, 0, 0), (70, 110, 160), (120, 120, 120)
_SD, _ZSNR, _DATA = (215, 110, 30), (40, 95, 190), (60, 60, 60)       # the two schedules' colours, the data's
_DARK_ZONE, _BRIGHT_ZONE = (215, 215, 228), (250, 238, 190)          # backgrounds of |mean| > BRIGHT


def to_gray(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (K, 1, H, W) to uint8 gray levels: ``round((v + 1) * 127.5)``, clamped to [0, 255]."""
    return ((images[:, 0].double() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def image_grid(images: torch.Tensor, cols: int = GRID_COLS, scale: int = GRID_SCALE, gap: int = GRID_GAP) -> np.ndarray:
    """An RGB grid (rows of ``cols`` images, left to right, top to bottom) of (K, 1, H, W) images in [-1, 1].

    Image k is :func:`to_gray` of it with each pixel repeated ``scale`` x ``scale`` times, its top-left corner at
    row ``(k // cols) * (H * scale + gap)``, column ``(k % cols) * (W * scale + gap)``; the gaps are coloured.
    """
    gray = to_gray(images).repeat(scale, 1).repeat(scale, 2)
    k, h, w = gray.shape
    rows = -(-k // cols)
    grid = np.empty((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), np.uint8)
    grid[:] = _GAP
    for i in range(k):
        r, c = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = gray[i, :, :, None]
    return grid


def by_brightness(images: torch.Tensor) -> torch.Tensor:
    """The images sorted from darkest to brightest mean (stable)."""
    return images[torch.argsort(_brightness(images), stable=True)]


def histogram(images: torch.Tensor) -> np.ndarray:
    """Images per brightness bin over [-1, 1] (:data:`HIST_BINS` bins; means outside fall into the end bins)."""
    m = _brightness(images).clamp(-1.0, 1.0)
    idx = ((m + 1.0) / 2.0 * HIST_BINS).floor().clamp(max=HIST_BINS - 1).long()
    return np.bincount(idx.numpy(), minlength=HIST_BINS)


def _nice_step(top: float, ticks: int = 5) -> int:
    """A round tick step (1, 2, 5 x 10^k) giving about ``ticks`` ticks up to ``top``."""
    raw = max(top / ticks, 1e-9)
    mag = 10 ** math.floor(math.log10(raw))
    return max(1, int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)))


def _text(fig, x, y, text, color=_INK, align="left"):
    """draw_text, left-, centre- or right-aligned at x, kept inside the figure."""
    w = _png.text_width(text)
    x = {"left": x, "center": x - w // 2, "right": x - w}[align]
    _png.draw_text(fig, max(0, min(x, fig.shape[1] - w)), max(0, y), text, color)


def _draw_histogram(fig, x, y, w, h, counts, n, share_max, color, data_share=None, label=""):
    """One histogram of per-image mean brightness at (x, y), plot area w x h: count axis (its scale set by
    ``share_max``, the largest share of any panel, so that heights compare across panels), the dark and bright
    zones shaded with their counts and shares, and the data's share per bin as black ticks (``data_share``)."""
    base = y + h
    bar_w = w // HIST_BINS

    def px(t):  # brightness -> x pixel
        return x + round((t + 1.0) / 2.0 * bar_w * HIST_BINS)

    fig[y:base, x:px(-BRIGHT)] = _DARK_ZONE
    fig[y:base, px(BRIGHT):px(1.0)] = _BRIGHT_ZONE
    top = share_max * n
    for b, c in enumerate(counts):
        bh = round(c / top * h)
        if bh:
            fig[base - bh:base, x + b * bar_w + 1:x + (b + 1) * bar_w] = color
        if data_share is not None and data_share[b] > 0:
            dy = base - round(data_share[b] * n / top * h)
            fig[max(dy - 1, y):dy + 1, x + b * bar_w:x + (b + 1) * bar_w + 1] = _INK
    # axes: counts on the left, brightness below
    fig[y:base + 1, x - 1] = _INK
    fig[base, x - 1:px(1.0) + 1] = _INK
    step = _nice_step(top)
    for v in range(0, int(top) + 1, step):
        ty = base - round(v / top * h)
        fig[ty, x - 5:x - 1] = _INK
        _text(fig, x - 7, ty - 4, str(v), align="right")
    for t in (-1.0, -BRIGHT, 0.0, BRIGHT, 1.0):
        tx = px(t)
        fig[base:base + 5, tx] = _INK
        _text(fig, tx, base + 8, f"{t:g}", align="center")
    _text(fig, px(0.0), base + 22, "MEAN BRIGHTNESS", align="center")
    _text(fig, x, y - 14, label)
    # dark / bright shares, in their zones
    m = counts  # counts per bin: the zones are whole bins (BRIGHT = 0.6 is a bin edge)
    dark = int(m[:round((1 - BRIGHT) / 2 * HIST_BINS)].sum())
    bright = int(m[round((1 + BRIGHT) / 2 * HIST_BINS):].sum())
    _text(fig, x + 3, y + 3, f"DARK {dark}")
    _text(fig, x + 3, y + 15, f"{dark / n:.0%}")
    _text(fig, px(1.0) - 3, y + 3, f"BRIGHT {bright}", align="right")
    _text(fig, px(1.0) - 3, y + 15, f"{bright / n:.0%}", align="right")


def _draw_spread(fig, x, y, w, runs: list[ImageRun], data_std: float) -> int:
    """The std of mean brightness of every run under both schedules on one axis, the data's as a vertical line:
    the table of part 3 at a glance.  Returns the y below it."""
    row_h, label_w = 16, 170
    stds = [(Spread.of(r.sd).std, Spread.of(r.zsnr).std) for r in runs]
    lo = math.floor((min(min(p) for p in stds + [(data_std,)]) - 0.02) * 20) / 20
    hi = math.ceil((max(max(p) for p in stds + [(data_std,)]) + 0.02) * 20) / 20
    ax0, ax1 = x + label_w, x + w

    def px(v):
        return ax0 + round((v - lo) / (hi - lo) * (ax1 - ax0))

    top, bottom = y, y + row_h * len(runs)
    fig[top - 4:bottom + 4, px(data_std) - 1:px(data_std) + 1] = _DATA
    for i, (r, (s_sd, s_z)) in enumerate(zip(runs, stds)):
        cy = top + i * row_h + row_h // 2
        _text(fig, x, cy - 5, f"{r.sampler} {r.steps}")
        a, b = sorted((px(s_sd), px(s_z)))
        fig[cy, a:b + 1] = _GRAY
        fig[cy - 4:cy + 5, px(s_sd) - 4:px(s_sd) + 5] = _SD
        fig[cy - 4:cy + 5, px(s_z) - 4:px(s_z) + 5] = _ZSNR
    fig[bottom + 4, ax0:ax1 + 1] = _INK
    v = lo
    while v <= hi + 1e-9:
        fig[bottom + 4:bottom + 9, px(v)] = _INK
        _text(fig, px(v), bottom + 12, f"{v:.2f}", align="center")
        v = round(v + 0.05, 10)
    _text(fig, px(data_std), top - 18, f"DATA {data_std:.3f}", align="center")
    _text(fig, (ax0 + ax1) // 2, bottom + 26, "STD OF MEAN BRIGHTNESS", align="center")
    return bottom + 40


def render_figure(images: torch.Tensor, run: ImageRun, num_shown: int = 64,
                  runs: list[ImageRun] | None = None) -> np.ndarray:
    """The demo's figure (RGB uint8).

    Top: for the data, SD's schedule and zero SNR, a grid of the first ``num_shown`` images sorted by mean
    brightness (:func:`image_grid` of :func:`by_brightness`) and its spread.  Middle: the histograms of mean
    brightness over all images of ``run`` (counts on a common scale of shares), the very dark and very bright
    zones (|mean| > :data:`BRIGHT`) shaded with their counts, the data's shares as ticks.  Bottom: the std of mean
    brightness of every run in ``runs`` (default: ``run``) under both schedules against the data's.
    """
    runs = runs or [run]
    n = run.sd.shape[0]
    panels = [("data", f"{images.shape[0]} built-in images", images, _DATA),
              ("SD: leading spacing, offset 1", f"sigma max {run.sd_sigma_max:.2f}", run.sd, _SD),
              ("zero SNR: trailing spacing", "sigma max inf", run.zsnr, _ZSNR)]
    grids = [image_grid(by_brightness(imgs[:num_shown])) for *_, imgs, _ in panels]
    counts = [histogram(imgs) for *_, imgs, _ in panels]
    shares = [c / c.sum() for c in counts]
    share_max = max(float(sh.max()) for sh in shares)
    pw, gh = grids[0].shape[1], grids[0].shape[0]
    margin, sep, line = 20, 70, 14
    left = margin + 40                     # room for the first histogram's count labels
    top = margin + 3 * line + 8            # title lines
    grid_y = top + 3 * line + 4            # panel title, subtitle, spread
    hist_y = grid_y + gh + 36
    hist_h = 150
    spread_y = hist_y + hist_h + 84
    spread_h = 16 * len(runs) + 40
    height = spread_y + spread_h + margin + 10
    width = left + 3 * pw + 2 * sep + margin
    fig = np.empty((height, width, 3), np.uint8)
    fig[:] = _BG
    _text(fig, margin, margin, f"Lin et al. 2023 sec. 3, ideal denoiser of {images.shape[0]} images: "
          f"{run.sampler}, {run.steps} steps, {n} samples per schedule, same noise")
    _text(fig, margin, margin + line, "SD's schedule (finite sigma max) narrows the spread of brightness: fewer "
          "very dark and very bright images")
    _text(fig, margin, margin + 2 * line, f"(mean < -{BRIGHT} or > {BRIGHT}, shaded) than the data has; starting at "
          "sigma = inf (zero SNR) comes closer. Grids: dark to bright")
    for i, ((title, subtitle, imgs, color), grid, cnt) in enumerate(zip(panels, grids, counts)):
        x = left + i * (pw + sep)
        sp = Spread.of(imgs)
        fig[top:top + 10, x:x + 10] = color
        _text(fig, x + 14, top, title)
        _text(fig, x, top + line, subtitle + (f", first {num_shown} of {imgs.shape[0]}"
                                             if imgs.shape[0] > num_shown else ""))
        _text(fig, x, top + 2 * line, f"std {sp.std:.3f}  dark {sp.dark:.0%}  bright {sp.bright:.0%}")
        fig[grid_y:grid_y + gh, x:x + pw] = grid
        _draw_histogram(fig, x, hist_y, pw, hist_h, cnt, imgs.shape[0], share_max, color,
                        data_share=shares[0] if i else None,
                        label=f"per bin, of {imgs.shape[0]}" + ("; black: data" if i else ""))
    data_std = Spread.of(images).std
    closer = sum(abs(Spread.of(r.zsnr).std - data_std) < abs(Spread.of(r.sd).std - data_std) for r in runs)
    _text(fig, margin, spread_y - 44, f"Spread of every run: std of mean brightness, orange SD, blue zero SNR, line "
          f"data. Zero SNR is closer to the data in {closer} of {len(runs)}")
    _draw_spread(fig, margin, spread_y, width - 2 * margin, runs, data_std)
    return fig


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``python -m zsnr_kernels demo`` and :func:`main`)."""
    ap.add_argument("--quick", action="store_true", help="fewer steps, runs and samples (about a second)")
    ap.add_argument("--seed", type=_cli.seed64, default=0, help="seed of the demo's noise (default 0)")
    ap.add_argument("--png", type=_cli.output_path, default=DEFAULT_PNG, metavar="PATH",
                    help=f"where to write the figure of part 3 (default {DEFAULT_PNG} in the current directory)")
    ap.add_argument("--no-png", dest="png", action="store_const", const=None, help="write no figure")


def main(argv=None) -> int:
    """Run the demo, print its tables and write the figure; ``--quick`` uses fewer runs and samples (for tests)."""
    ap = argparse.ArgumentParser(prog="python -m zsnr_kernels demo", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The demo with parsed options (see :func:`add_arguments`); runs torch on one thread (restored after)."""
    # NOTE: the demo's tensors are small (512 x 256 float64); intra-op threads only add synchronization.  On the
    # 2-core build machine with another process busy, 2 threads took 12-54 s, 1 thread 5 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    lines = _k_diffusion_at_inf(gen)
    lines += [""] + _gaussian_table(gen, (8, 16) if args.quick else (8, 16, 32, 64))
    if args.quick:
        samplers, step_counts, shown = SAMPLERS[:1] + SAMPLERS[-1:], (10,), (SAMPLERS[0], 10)
    else:
        samplers, step_counts, shown = SAMPLERS, STEP_COUNTS, FIGURE_RUN
    images, runs = _image_runs(gen, 64 if args.quick else 512, samplers, step_counts)
    lines += [""] + _image_table(images, runs)
    if args.png:
        fig_run = next(r for r in runs if (r.sampler, r.steps) == shown)
        _png.write_png(args.png, render_figure(images, fig_run, runs=runs))
        lines.append(f"   wrote {args.png}: image grids and brightness histograms of {fig_run.sampler}, "
                     f"{fig_run.steps} steps, and the spread of every run")
    lines += ["", f"({time.perf_counter() - t0:.1f} s, float64 on one CPU thread, torch reference backend)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
