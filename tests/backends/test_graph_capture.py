"""Device steps inside a CUDA-graph capture, with the capture faked on the CPU (no GPU on the build machines).

A fake CUDA runtime stands in for the parts of ``torch.cuda`` the host side asks: which device is current, its
current stream, and whether that stream is capturing.  Two things must hold inside a capture:

* the scratch of the device kernels is the capture's own: every ``torch.cuda.graph`` without ``stream=`` captures on
  PyTorch's one default capture stream, so a scratch per stream would be shared by graphs replayed at once;
* no per-step value is copied from host memory: a captured copy reads its pinned block again at every replay, long
  after the step returned, and older PyTorch may have recycled the block by then.

The cuda backend's whole host side under a capture is in tests/backends/test_cuda_backend.py (its stand-in
launcher); the real capture and replay run in tests/api/test_plan.py where a GPU exists.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from zsnr_kernels import noise as _noise
from zsnr_kernels.backends import device as _device, layout

GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """The fake runtime: ``state.current`` (the current device's index), ``state.streams`` (each device's current
    stream handle) and ``state.capturing`` (the devices whose current stream is capturing).  The workspace cache
    starts empty and is restored afterwards."""
    state = SimpleNamespace(current=0, streams={0: 7, 1: 7}, capturing=set())

    @contextlib.contextmanager
    def device_guard(device):
        before, state.current = state.current, torch.device(device).index
        try:
            yield
        finally:
            state.current = before

    def current_stream(device=None):
        index = state.current if device is None or torch.device(device).index is None else torch.device(device).index
        return SimpleNamespace(cuda_stream=state.streams[index])

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.current in state.capturing)
    monkeypatch.setattr(_device, "_WORKSPACES", {})
    return state


def _maker():
    made = []

    def make():
        made.append(object())
        return made[-1]

    return make, made


def test_each_capture_has_its_own_workspace(fake_cuda):
    """Two graphs captured without ``stream=`` (so on one stream) get distinct scratch, as do two steps of one
    capture; eager calls on one stream share theirs, and another stream gets its own."""
    make, made = _maker()
    key = ("cuda", 2, 100)
    eager = _device.stream_workspace(GPU0, key, make)
    assert _device.stream_workspace(GPU0, key, make) is eager
    fake_cuda.streams[0] = 8
    assert _device.stream_workspace(GPU0, key, make) is not eager

    fake_cuda.streams[0] = 9  # torch.cuda.graph's default capture stream, shared by every capture without stream=
    fake_cuda.capturing = {0}
    first_graph = _device.stream_workspace(GPU0, key, make)
    second_graph = _device.stream_workspace(GPU0, key, make)
    assert first_graph is not second_graph
    assert len(made) == 4  # the eager scratch of streams 7 and 8, one per captured call

    fake_cuda.capturing = set()  # eager work on the capture stream after the captures keeps its own
    assert _device.stream_workspace(GPU0, key, make) not in (first_graph, second_graph)
    fake_cuda.streams[0] = 7
    assert _device.stream_workspace(GPU0, key, make) is eager


def test_capture_is_asked_of_the_tensors_device(fake_cuda):
    """A step on GPU 1 while GPU 0 is current is captured if GPU 1's current stream is capturing."""
    fake_cuda.capturing = {1}
    assert layout.capturing(GPU1) and not layout.capturing(GPU0)
    assert fake_cuda.current == 0
    assert not layout.capturing(torch.device("cpu"))


@pytest.fixture
def no_pinned_copies(monkeypatch):
    """Fails a test that copies from pinned host memory; memory on the fake GPU is the CPU's."""
    def pin_memory(self, *args, **kwargs):
        raise AssertionError("a per-step value was copied from pinned host memory inside a capture")

    zeros = torch.zeros
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: zeros(*a, **k))


def test_a_captured_upload_copies_no_host_memory(fake_cuda, no_pinned_copies):
    """Inside a capture the step's sigmas, coefficient rows and seeds reach the device bit for bit without a copy
    from host memory (the values travel as kernel arguments)."""
    fake_cuda.capturing = {0}
    sigmas = torch.tensor([math.inf, 5.0, -0.0, 0.0, 5e-324, -math.inf, 1e308, math.nan], dtype=torch.float64)
    rows = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # > 96 values
    seeds = torch.tensor(_noise.seed_bits([0, 2**63, 2**64 - 1, 5]), dtype=torch.int64)
    for t in (sigmas, rows, seeds, torch.empty(0, 16, dtype=torch.float64)):
        got = layout.to_device(t, GPU0)
        assert got.dtype == t.dtype and got.shape == t.shape
        bits = torch.int64 if t.dtype == torch.float64 else t.dtype
        assert torch.equal(got.view(bits), t.view(bits))


def test_an_eager_upload_goes_through_pinned_memory(fake_cuda, monkeypatch):
    """Outside a capture the copy stays the asynchronous one from pinned memory."""
    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: SimpleNamespace(
        to=lambda device, non_blocking: copies.append((device, non_blocking)) or "on the device"))
    assert layout.to_device(torch.zeros(3, dtype=torch.float64), GPU0) == "on the device"
    assert copies == [(GPU0, True)]
