"""The README's sharded-sampling snippet runs as written, on a gloo group of one process (tests/tools/test_readme.py
counts it as covered by this test)."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import sys

import pytest
import torch

import zsnr_kernels as zk

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _sharded_cases as C  # noqa: E402


def test_readme_sharded_snippet_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "shard_dim" in b]
    assert blocks, "the README's sharded-sampling section lost its snippet"
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shape, dim, mix = C.LATENTS["frames"]
    ns = {"model": C.Model(mix), "noise": C.noise("frames"), "sigmas": C.SIGMAS}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        exec(blocks[0], ns)
    finally:
        dist.destroy_process_group()
    want = zk.sample(C.Model(mix), C.noise("frames"), C.SIGMAS, sampler="dpmpp_2m_sde", guidance_scale=7.5,
                     guidance_rescale=0.7, seed=2024, shard_dim=2)
    assert torch.equal(ns["x0"], want)
