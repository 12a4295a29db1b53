"""The backend registry (zsnr_kernels/backends/registry.py): one row per backend, ``auto``'s order, the reasons a
backend cannot serve a call, and ``use_backend``."""

from __future__ import annotations

import threading

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext, registry

requires_C = pytest.mark.skipif(not _ext.available(), reason="zsnr_kernels._C is not built")


def test_every_backend_module_has_the_backend_functions():
    assert zk.BACKENDS == ("auto", *(b.name for b in registry.REGISTRY))
    for b in registry.REGISTRY:
        m = b.load()
        for fn in ("not_supported_reasons", "fused_step"):
            assert callable(getattr(m, fn, None)), f"backends.{b.module} lacks {fn}"
        assert (b.auto_cpu is not None) or (b.auto_cuda is not None), f"{b.name} is in neither auto order"


def test_the_reference_serves_every_tensor_and_unknown_names_are_named():
    assert registry.not_supported_reasons("torch", torch.zeros(1, dtype=torch.float64)) == []
    assert "unknown backend 'tpu'" in registry.not_supported_reasons("tpu", torch.zeros(1))[0]
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch'"):
        registry.resolve("tpu", torch.zeros(1))


@requires_C
def test_auto_takes_the_first_backend_of_its_order_that_can():
    assert registry.resolve("auto", torch.zeros(2, 3)) == "cpu"
    assert registry.resolve("auto", torch.zeros(2, 3, dtype=torch.float64)) == "torch"  # the kernels store no fp64
    assert registry.resolve("auto", torch.zeros(2, 3), needs_grad=True) == "torch"


@requires_C
def test_use_backend_sets_what_auto_means_inside_the_block_and_nests():
    y = torch.zeros(2, 3)
    with zk.use_backend("torch") as name:
        assert name == "torch"
        assert registry.resolve("auto", y) == "torch"
        assert registry.resolve("cpu", y) == "cpu"  # an explicit backend still wins
        with zk.use_backend("cpu"):
            assert registry.resolve("auto", y) == "cpu"
            # held to an explicit backend's rule, and the error names the block
            with pytest.raises(ValueError, match=r"requires grad.*use_backend\('cpu'\)"):
                registry.resolve("auto", y, needs_grad=True)
            with pytest.raises(ValueError, match=r"float64.*use_backend\('cpu'\)"):
                registry.resolve("auto", y.double())
        assert registry.resolve("auto", y) == "torch"
    assert registry.resolve("auto", y) == "cpu"


@requires_C
def test_use_backend_is_per_thread():
    y, seen, inside, done = torch.zeros(2, 3), [], threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen.append(registry.resolve("auto", y))
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with zk.use_backend("torch"):
        inside.set()
        done.wait()
    t.join()
    assert seen == ["cpu"]


def test_use_backend_refuses_an_unknown_name_at_the_with():
    with pytest.raises(ValueError, match="backend must be one of"):
        with zk.use_backend("gpu"):
            pass
    with pytest.raises(TypeError, match="backend name"):
        with zk.use_backend(3):
            pass


@requires_C
def test_a_step_inside_use_backend_runs_there():
    """The reference and the kernels round differently in float32: the block's choice shows in the bits."""
    g = torch.Generator().manual_seed(0)
    y, f = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    kw = dict(guidance_scale=1.0)
    ref = zk.heun_step(y, f, 3.0, 1.0, backend="torch", **kw)
    with zk.use_backend("torch"):
        got = zk.heun_step(y, f, 3.0, 1.0, **kw)
    assert torch.equal(got.y, ref.y)
    cpu = zk.heun_step(y, f, 3.0, 1.0, backend="cpu", **kw)
    assert not torch.equal(ref.y, cpu.y)  # else this test could not tell the backends apart
    assert torch.equal(zk.heun_step(y, f, 3.0, 1.0, **kw).y, cpu.y)
