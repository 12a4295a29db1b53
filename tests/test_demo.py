"""The demo (``python -m zsnr_kernels demo``) runs quickly and prints finite numbers in its tables."""

from __future__ import annotations

import math
import re

from zsnr_kernels import demo


def test_demo_quick(capsys):
    assert demo.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for needle in ("100% NaN", "100% finite", "euler ", "heun ", "dpmpp_2m ", "euler_ancestral ",
                   "data ", "SD (leading, offset 1)", "zero SNR (trailing)"):
        assert needle in out, needle
    rows = [ln for ln in out.splitlines() if re.match(r"\s+(euler|heun|dpmpp_2m|euler_ancestral)\s", ln)]
    assert len(rows) == 4
    for ln in rows:
        nums = [float(v) for v in re.findall(r"\d\.\d+e[+-]\d+", ln)]
        assert len(nums) == 2 and all(math.isfinite(v) for v in nums), ln
    zsnr = next(ln for ln in out.splitlines() if "zero SNR (trailing)" in ln)
    assert " inf " in zsnr
    assert all("nan" not in ln.lower() for ln in rows + [zsnr])
