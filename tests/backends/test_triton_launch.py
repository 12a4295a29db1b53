"""The grids the Triton launcher (``triton_kernels/combine.py::launch``) asks for, captured without a GPU.

CUDA takes up to 2**31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2: a grid of (blocks, batch) could
not launch a 2-D toy problem of 100k samples (issue 16).  The interpreter runs any grid, so only the grid itself can
show it; tests/backends/test_triton_kernels.py checks the indexing of a flat grid (per-sample coefficients, noise
and statistics of several samples and blocks) against the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
from zsnr_kernels.backends.triton_kernels import combine as C  # noqa: E402

CUDA_MAX_GRID = (2**31 - 1, 65535, 65535)  # gridDim.x, .y, .z


@pytest.fixture
def grids(monkeypatch):
    """Every ``kernel[grid](...)`` records (kernel name, grid) and launches nothing (the JIT's or the
    interpreter's launch alike)."""
    seen = []
    kernel_type = type(C._combine_kernel)
    monkeypatch.setattr(kernel_type, "__getitem__",
                        lambda fn, grid: lambda *args, **kwargs: seen.append((fn.fn.__name__, tuple(grid))))
    return seen


@pytest.mark.parametrize("batch, n", [(100_000, 2), (70_000, 4 * 32 * 32)], ids=["toy_2d", "large_batch"])
@pytest.mark.parametrize("rescale", [False, True])
def test_every_grid_axis_is_within_cuda_limits(grids, batch, n, rescale):
    """One program per (sample, block) of each pass, on axis 0 (the tensors are broadcast views: their values are
    never read)."""
    y = torch.empty(1, 1).expand(batch, n)
    table = torch.zeros((batch, C.NUM_COEFFS), dtype=torch.float64)
    C.launch(y, y, y if rescale else None, [], table, n_hist=0, rescale=rescale, noise_mode=2,
             seeds=torch.zeros(batch, dtype=torch.int64), y_out=y)
    assert [name for name, _ in grids] == (["_rescale_kernel"] if rescale else []) + ["_combine_kernel"]
    for name, grid in grids:
        assert 1 <= len(grid) <= len(CUDA_MAX_GRID), (name, grid)
        assert all(1 <= g <= limit for g, limit in zip(grid, CUDA_MAX_GRID)), (name, grid)
    block = C.launch_block(n, batch, y.element_size(), y.device)
    blocks = {"_combine_kernel": math.ceil(n / block), "_rescale_kernel": C.stats_blocks(n, y.element_size())}
    assert {name: math.prod(grid) for name, grid in grids} == {name: batch * blocks[name] for name, _ in grids}
