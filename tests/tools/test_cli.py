"""The command line, run as a user runs it: ``python -m zsnr_kernels info | demo | bench`` in a subprocess.

The PNG files are read back with a decoder written here from the PNG specification (signature, chunk CRCs, IHDR,
the zlib stream of filtered scanlines), independent of the package's encoder; the demo's data grid is compared
pixel for pixel with the built-in images.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from zsnr_kernels.backends import ext as _ext
from zsnr_kernels.tools.models import builtin_images

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel (8-bit depths)


def _cli(*args, cwd, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "zsnr_kernels", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def read_png(path) -> np.ndarray:
    """Decode an 8-bit non-interlaced PNG: (H, W, channels) uint8.  Checks the signature and every chunk's CRC."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body), kind
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + n
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0 and color in CHANNELS, header
    bpp = CHANNELS[color]
    raw = zlib.decompress(idat)
    stride = width * bpp
    assert len(raw) == height * (1 + stride)
    out = np.zeros((height, stride), np.int64)
    for y in range(height):
        ftype, line = raw[y * (1 + stride)], np.frombuffer(raw, np.uint8, stride, y * (1 + stride) + 1).astype(np.int64)
        prev = out[y - 1] if y else np.zeros(stride, np.int64)
        if ftype in (0, 2):
            out[y] = (line + (prev if ftype == 2 else 0)) % 256
        else:  # Sub, Average, Paeth depend on the left neighbour: byte by byte
            row = out[y]
            for x in range(stride):
                left, upleft = (row[x - bpp], prev[x - bpp]) if x >= bpp else (0, 0)
                pred = {1: left, 3: (left + prev[x]) // 2, 4: _paeth(left, prev[x], upleft)}[ftype]
                row[x] = (line[x] + pred) % 256
    return out.astype(np.uint8).reshape(height, width, bpp)


def _find(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``small`` occurs in ``big`` (both (H, W, C) uint8)."""
    first, step = small[0].tobytes(), small.shape[2]
    hits = []
    for y in range(big.shape[0] - small.shape[0] + 1):
        line = big[y].tobytes()
        x = line.find(first)
        while x >= 0:
            if x % step == 0 and (big[y:y + small.shape[0], x // step:x // step + small.shape[1]] == small).all():
                hits.append((y, x // step))
            x = line.find(first, x + 1)
    return hits


def test_info(tmp_path):
    out = _cli("info", cwd=tmp_path)
    assert "zsnr-kernels" in out and "backends for CPU tensors" in out and "auto ->" in out


@pytest.mark.parametrize("err,driver,want", [
    (35, False, "no CUDA device (no NVIDIA driver is installed"),   # the static runtime's answer without a driver
    (100, True, "no CUDA device (the driver found none"),
    (35, True, "the NVIDIA driver is older than this module's CUDA runtime (insufficient driver)"),
    (999, True, "no usable CUDA device (unknown error; cudaError 999)"),
])
def test_cuda_device_errors_in_words(monkeypatch, err, driver, want):
    """cudaGetDeviceCount's error without a driver reads "CUDA driver version is insufficient ..."; info says what it
    means on the machine instead."""
    from types import SimpleNamespace

    from zsnr_kernels.backends import cuda as _cuda

    monkeypatch.setattr(_cuda, "_driver_present", lambda: driver)
    m = SimpleNamespace(error_string={35: "insufficient driver", 100: "no device", 999: "unknown error"}.get)
    assert want in _cuda.device_error(m, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_info_without_a_gpu_says_no_cuda_device(tmp_path):
    out = _cli("info", cwd=tmp_path)
    assert "insufficient" not in out
    from zsnr_kernels.backends import cuda as _cuda

    if _cuda.module() is not None:  # the CUDA module is built here: it loads and reports the missing device
        assert "no CUDA device" in out


def test_version(tmp_path):
    from zsnr_kernels import __version__

    assert _cli("--version", cwd=tmp_path).strip() == f"zsnr-kernels {__version__}"


def test_help(tmp_path):
    out = _cli("demo", "--help", cwd=tmp_path)
    assert "--png" in out and "--no-png" in out and "--quick" in out
    out = _cli("bench", "--help", cwd=tmp_path)
    for option in ("--quick", "--ops", "--shapes", "--dtypes", "--backends", "--csv", "--png"):
        assert option in out, option


@pytest.mark.parametrize("args,message", [
    (("demo", "--quick", "--png", "/no/such/dir/x.png"), "argument --png: the directory of '/no/such/dir/x.png'"),
    (("demo", "--seed", str(2**64)), "argument --seed: 18446744073709551616 is outside"),
    (("bench", "--csv", "."), "argument --csv: '.' is a directory"),
    (("bench", "--png", "/no/such/dir/b.png"), "argument --png: the directory"),
])
def test_bad_options_are_refused_before_the_run(tmp_path, args, message):
    """An unwritable output or an out-of-range seed is an argparse error (exit status 2) up front, not a traceback
    after the whole run."""
    from zsnr_kernels.__main__ import main

    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as err:
        main(list(args))
    assert exc.value.code == 2 and message in err.getvalue()


def test_console_script_is_the_module_main():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["zsnr-kernels"].split(":")
    import importlib

    from zsnr_kernels.__main__ import main

    assert getattr(importlib.import_module(module), func) is main


def test_demo_writes_its_figure(tmp_path):
    """Default path in the current directory; the data panel holds the built-in images sorted by brightness."""
    from zsnr_kernels.tools import demo

    out = _cli("demo", "--quick", cwd=tmp_path)
    assert "zero SNR (trailing)" in out and f"wrote {demo.DEFAULT_PNG}" in out
    fig = read_png(tmp_path / demo.DEFAULT_PNG)
    assert fig.shape[2] == 3 and fig.shape[0] > 300 and fig.shape[1] > 800

    images = builtin_images(n=64, size=16)
    images = images[torch.argsort(images.mean(dim=(1, 2, 3)), stable=True)]
    s, gap, cols, size = demo.GRID_SCALE, demo.GRID_GAP, demo.GRID_COLS, 16
    pitch = size * s + gap
    gray = np.clip(np.round((images[:, 0].numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)
    first = np.kron(gray[0], np.ones((s, s), np.uint8))[:, :, None].repeat(3, 2)
    hits = _find(fig, first)
    assert hits, "the darkest image is not in the figure"
    y0, x0 = hits[0]  # the data panel comes first (leftmost, topmost)
    for k in range(64):
        r, c = divmod(k, cols)
        cell = fig[y0 + r * pitch:y0 + r * pitch + size * s, x0 + c * pitch:x0 + c * pitch + size * s]
        assert (cell == np.kron(gray[k], np.ones((s, s), np.uint8))[:, :, None]).all(), k


def test_demo_no_png(tmp_path):
    _cli("demo", "--quick", "--no-png", cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not _ext.available(), reason="the compiled cpu backend is not built")
def test_bench_csv_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = _cli("bench", "--quick", "--ops", "euler", "--shapes", "1x4x8x8", "1x4x16x16", "--dtypes", "float32",
               "--no-compile", "--no-overhead", "--csv", "b.csv", "--png", "b.png", cwd=tmp_path)
    assert "wrote b.csv" in out and "wrote b.png" in out
    with open(tmp_path / "b.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    from zsnr_kernels.tools.bench import COLUMNS

    assert list(rows[0])[:len(COLUMNS)] == COLUMNS
    assert [(r["shape"], r["backend"]) for r in rows] == [("1x4x8x8", "cpu"), ("1x4x8x8", "eager"),
                                                          ("1x4x16x16", "cpu"), ("1x4x16x16", "eager")]
    assert all(math.isfinite(float(r["gbps"])) and float(r["gbps"]) > 0 for r in rows)
    img = read_png(tmp_path / "b.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
