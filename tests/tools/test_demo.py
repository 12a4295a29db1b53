"""The demo (``python -m zsnr_kernels demo``): its tables, its figure, and the PNG writer the figure needs.

The figure is checked against Pillow's PNG decoder (an independent implementation of the format) and against the
images themselves; the SD sigma_max the table prints against diffusers' scheduler.
"""

from __future__ import annotations

import math
import re
import struct
import zlib

import numpy as np
import pytest

from zsnr_kernels.tools import demo, png as _png
from zsnr_kernels.tools.models import builtin_images

PART3_ROW = re.compile(r"^   (euler|dpmpp_2m|euler_ancestral)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s+(\d+)%\s+inf"
                       r"\s+([\d.]+)\s+(\d+)%\s+(\d+)%$")


def _decode_pil(data: bytes) -> np.ndarray:
    Image = pytest.importorskip("PIL.Image")
    import io

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def test_demo_quick(capsys, tmp_path):
    png = tmp_path / "demo.png"
    assert demo.main(["--quick", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    for needle in ("100% NaN", "100% finite", "SD (leading, offset 1)", "zero SNR (trailing)", f"wrote {png}"):
        assert needle in out, needle
    part2 = out[out.index("2. Gaussian"):out.index("3. Ideal")]
    rows = [ln for ln in part2.splitlines() if re.match(r"\s+(euler|heun|dpmpp_2m|euler_ancestral)\s", ln)]
    assert len(rows) == 4
    for ln in rows:
        nums = [float(v) for v in re.findall(r"\d\.\d+e[+-]\d+", ln)]
        assert len(nums) == 2 and all(math.isfinite(v) for v in nums), ln
    part3 = [m for m in map(PART3_ROW.match, out.splitlines()) if m]
    assert [(m[1], int(m[2])) for m in part3] == [("euler", 10), ("euler_ancestral", 10)]
    assert png.read_bytes().startswith(_png.PNG_SIGNATURE)


def test_demo_statistics_match_an_independent_computation(capsys):
    """The data line is the std and tails of the built-in images' means; SD's sigma_max is diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    assert demo.main(["--quick", "--no-png"]) == 0
    out = capsys.readouterr().out
    means = builtin_images(n=64, size=16).mean(dim=(1, 2, 3))
    want = (f"data: std {means.std().item():.3f}, dark {(means < -0.6).double().mean().item():.0%}, "
            f"bright {(means > 0.6).double().mean().item():.0%}")
    assert want in out
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(10)
    row = next(m for m in map(PART3_ROW.match, out.splitlines()) if m)
    assert float(row[3]) == pytest.approx(sched.sigmas[0].item(), abs=5e-3)


def test_image_grid_places_each_image():
    images = builtin_images(n=5, size=4)
    grid = demo.image_grid(images, cols=3, scale=2, gap=1)
    assert grid.shape == (2 * 8 + 1, 3 * 8 + 2, 3)
    for k in range(5):
        r, c = divmod(k, 3)
        cell = grid[r * 9:r * 9 + 8, c * 9:c * 9 + 8]
        want = np.clip(np.round((images[k, 0].numpy() + 1.0) * 127.5), 0, 255)
        assert (cell == np.kron(want, np.ones((2, 2)))[:, :, None]).all(), k
    assert (grid[8, :] == grid[8, 0]).all() and tuple(grid[8, 0]) != tuple(grid[0, 0])  # the gap row


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (5, 3, 3), (16, 1, 3)])
def test_png_roundtrip_through_pillow(shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    data = _png.encode_png(pixels)
    assert (_decode_pil(data) == pixels).all()


def test_png_chunks_and_crcs():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    data = _png.encode_png(pixels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        if kind == b"IHDR":
            assert struct.unpack(">IIBBBBB", body) == (3, 2, 8, 2, 0, 0, 0)
        if kind == b"IDAT":
            raw = np.frombuffer(zlib.decompress(body), np.uint8).reshape(2, 1 + 9)
            assert (raw[:, 0] == 0).all() and (raw[:, 1:] == pixels.reshape(2, 9)).all()
        pos += 12 + n
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_png_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        _png.encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        _png.encode_png(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="no glyph for '@'"):
        _png.draw_text(np.zeros((10, 10, 3), np.uint8), 0, 0, "a@", (0, 0, 0))


def test_draw_text_inks_glyph_cells():
    img = np.zeros((12, 40), np.uint8)
    end = _png.draw_text(img, 1, 1, "l1", 255, scale=2)
    assert end == 1 + 2 * 4 * 2 and _png.text_width("l1", 2) == 14
    # "L": the left column of 5 rows and the bottom row of 3 cells, each cell 2x2 pixels.
    assert (img[1:11, 1:3] == 255).all() and (img[9:11, 1:7] == 255).all() and (img[1:9, 3:7] == 0).all()
    inked = np.flatnonzero(img[:, 9:].any(0))
    assert (inked[0], inked[-1]) == (0, 5)  # "1" inks pixel columns 9 .. 14


def test_histogram_zones_are_the_tables_dark_and_bright_shares():
    """The histogram's end bins beyond +-BRIGHT hold exactly the images the table counts as very dark / bright."""
    images = builtin_images(n=64, size=16)
    counts = demo.histogram(images)
    assert counts.sum() == 64
    edge = round((1 - demo.BRIGHT) / 2 * demo.HIST_BINS)
    assert -1 + 2 * edge / demo.HIST_BINS == pytest.approx(-demo.BRIGHT)  # the zones are whole bins
    spread = demo.Spread.of(images)
    assert counts[:edge].sum() == round(spread.dark * 64) and counts[-edge:].sum() == round(spread.bright * 64)


def test_figure_shows_both_schedules_and_every_run(capsys, tmp_path):
    """The figure draws each schedule's histogram in its colour and one marker pair per run of the table."""
    png = tmp_path / "demo.png"
    assert demo.main(["--quick", "--png", str(png)]) == 0
    fig = _decode_pil(png.read_bytes())
    runs = len([ln for ln in capsys.readouterr().out.splitlines() if PART3_ROW.match(ln)])
    for colour in (demo._SD, demo._ZSNR, demo._DARK_ZONE, demo._BRIGHT_ZONE):
        assert (fig == colour).all(axis=2).any(), colour
    # the spread chart: one 9x9 marker per run and schedule, in rows below the histograms
    sd_rows = np.flatnonzero((fig == demo._SD).all(axis=2).sum(axis=1) == 9)
    zsnr_rows = np.flatnonzero((fig == demo._ZSNR).all(axis=2).sum(axis=1) == 9)
    assert len(sd_rows) == len(zsnr_rows) == 9 * runs
