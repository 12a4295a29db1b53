"""The README's Python snippets run as written (with a stand-in network)."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.3
    ns = {
        "unet": lambda y, t, cond: torch.tanh(torch.einsum("ij,bjhw->bihw", w, y) * cond + 1e-3 * torch.as_tensor(t).float().view(-1, 1, 1, 1)),
        "text_cond": 1.0,
        "empty_cond": 0.5,
    }
    exec(blocks[0].replace("64, 64", "8, 8"), ns)
    assert torch.isfinite(ns["x0"]).all()
    ns["noise"] = torch.randn(1, 4, 8, 8, generator=g)
    exec(blocks[1], ns)
    assert torch.isfinite(ns["x0"]).all() and ns["sigma"] == 0.0
