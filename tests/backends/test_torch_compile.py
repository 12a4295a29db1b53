"""torch.compile readiness of the cpu backend (docs/design.md §3): the fused step is a torch.library op with a fake
implementation and an out= form (checked by ``torch.library.opcheck``); ``torch.compile(fullgraph=True)`` of a
whole sampling loop traces without a graph break and equals eager; eager calls never go through the op layer."""

from __future__ import annotations

import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext, ops as _ops

pytestmark = pytest.mark.skipif(not _ext.available(), reason="zsnr_kernels._C is not built")


def _op_args(y, *, f_uncond=None, history=(), want_d=True, sampler=0, n_prev=0, sigma_prev=(), rescale=0.0,
             want_carry=False):
    # (y, f_cond, f_uncond, history, noise, want_d, want_carry, backend, prediction, sigma_data, sampler, stage,
    #  solver_heun, order, eta, s_noise, sigmas [sigma, sigma_eval, sigma_next, sigma_hat_next, *sigma_prev], n_prev,
    #  guidance_scale, guidance_rescale, rescale_space, seeds, step_index)
    return (y, torch.randn_like(y), f_uncond, list(history), None, want_d, want_carry, "cpu", 0, 1.0, sampler, 1, 0, 4,
            1.0, 1.0, [5.0, 5.0, 3.0, 3.0, *sigma_prev], n_prev, 4.0, rescale, 0, None, 0)


@pytest.mark.parametrize("variant", ["plain", "guided_rescale", "history", "carry_asked_of_euler", "philox_slice"])
def test_opcheck(variant):
    from zsnr_kernels.backends import ops as _ops

    y = torch.randn(2, 3, 5, 7)
    kw = {}
    if variant == "guided_rescale":
        kw = dict(f_uncond=torch.randn_like(y), rescale=0.7)
    elif variant == "history":
        kw = dict(history=[torch.randn_like(y)], sampler=6, n_prev=1, sigma_prev=[9.0])  # dpmpp_2m
    elif variant == "carry_asked_of_euler":  # only LMS has a carry: an empty one, in the fake kernel too
        kw = dict(want_carry=True)
    args = _op_args(y, **kw)
    if variant == "philox_slice":  # euler_ancestral's noise, draw 1, of a slice: the record's draw and slice fields
        y = torch.randn(2, 4, 8)
        args = _op_args(y, sampler=1)
        args = args[:21] + (torch.tensor([5, 6]), 3, None, 1, [16, 64, 32])
    torch.library.opcheck(_ops.step, args)
    out = torch.empty_like(y)
    torch.library.opcheck(_ops.step_out, (out,) + args[:5] + args[7:])


def _model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.3

    def model(y, sigma):
        t = torch.atan(sigma).view(-1, 1, 1, 1).to(y.dtype)
        mixed = torch.einsum("ij,bjhw->bihw", w, y)
        return torch.tanh(mixed + 0.1 * t), torch.tanh(mixed)

    return model


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "dpmpp_sde"])  # dpmpp_sde: draws 0 and 1
def test_compiled_sampling_loop_has_no_graph_break_and_equals_eager(sampler):
    model = _model()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = [math.inf] + zk.schedules.karras(5, 0.05, 10.0).tolist()

    def run(n):
        return zk.sample(model, n, sigmas, sampler=sampler, guidance_scale=4.0, guidance_rescale=0.5, seed=[3, 4])

    eager = run(noise)
    compiled = torch.compile(run, fullgraph=True)(noise)  # fullgraph: any graph break is an error
    # the model itself is compiled too (inductor fuses its ops differently), hence float32 rounding, not equality
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_a_compiled_loop_compiles_once():
    """The host caches (parameterization, backend choice) stay out of the graph: a cache entry the first call
    added while it was traced would fail a guard on the second call and recompile the whole loop."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    run = torch.compile(lambda n: zk.sample(lambda y, s: torch.tanh(0.5 * y), n, [math.inf, 8.0, 3.0, 1.0, 0.0],
                                            sampler="dpmpp_2m", sigma_data=0.75), fullgraph=True, backend="aot_eager")
    for _ in range(3):
        run(noise)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_seed_tensor_is_a_graph_input():
    """A new image is a new seed, not a new graph: a seed passed as a tensor reaches the op as a tensor (Python
    int seeds are constants of the graph, as any int argument); and seed=None traces (seeds drawn as a tensor)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    sigmas = [math.inf, 8.0, 3.0, 1.0, 0.0]

    def run(n, seed):
        return zk.sample(lambda y, s: torch.tanh(0.5 * y), n, sigmas, sampler="euler_ancestral", seed=seed)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for seed in (7, 8, 2**63 + 5):
        got = compiled(noise, torch.tensor(seed - 2**64 if seed >= 2**63 else seed))
        assert torch.equal(got, run(noise, seed))
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.isfinite(torch.compile(lambda n: run(n, None), fullgraph=True, backend="aot_eager")(noise)).all()


def test_a_loop_stepping_in_place_traces_without_a_graph_break():
    """``out=y`` (the README's in-place loop) reaches the ``step_out`` op: its eager-only checks (inference flag,
    memory overlap) are skipped while tracing."""
    model = _model()

    def run(y):
        for s, sn in ((5.0, 3.0), (3.0, 1.0)):
            zk.euler_step(y, model(y, torch.full((y.shape[0],), s))[0], s, sn, out=y)
        return y

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eager = run(noise.clone())
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(noise.clone())
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


def test_eager_calls_bypass_the_op_layer(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the torch.library op was used by an eager call")

    monkeypatch.setattr(_ops, "fused_step_traced", refuse)
    y = torch.randn(1, 4, 8, 8)
    zk.euler_step(y, torch.randn_like(y), 5.0, 3.0, backend="cpu")
