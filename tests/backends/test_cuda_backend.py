"""The ``cuda`` backend: its host side here, its kernels wherever a GPU exists.

Without a GPU, :mod:`zsnr_kernels.backends.cuda` is exercised up to the compiled launcher: a stand-in for the
``_C_cuda`` module unpacks exactly what the real one would receive (the device sigma array
[sigma | sigma_eval | sigma_next | sigma_hat_next | sigma_prev], the uint64 seed bits, flags and pointers) and
runs the CPU kernels with it, which share the step plan (zsnr/step_plan.h) with the CUDA launcher.  The result
must equal the cpu backend's bit for bit: a wrongly packed argument cannot pass.

With a GPU (skipped here), the real backend runs against the cpu backend and the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co
from zsnr_kernels.backends import cpu as _cpu, cuda as _cuda, ext as _ext
from zsnr_kernels.parameterization import parameterization

INF = math.inf
requires_C = pytest.mark.skipif(not _ext.available(), reason=f"zsnr_kernels._C: {_ext.why_unavailable()}")


@pytest.fixture
def stand_in(cuda_on_cpu):
    return cuda_on_cpu


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    # name: (sampler, per-sample (sigma, sigma_next), StepArgs extras, sigma_eval, guided, rescale, history, seeds)
    "euler_rescale_per_sample": ("euler", [(INF, 5.0), (7.0, 2.0), (3.0, 0.0)], {}, None, True, 0.7, 0, None),
    "dpmpp_3m_sde_philox": ("dpmpp_3m_sde", [(2.0, 1.0), (3.0, 1.5), (4.0, 2.0)],
                            {"sigma_prev": (6.0, 9.0), "eta": 0.8}, None, True, 0.0, 2, [5, 2**63 + 7, 2**64 - 1]),
    "heun_stage_2": ("heun", [(5.0, 2.0)] * 3, {"stage": 2}, 2.0, False, 0.0, 1, None),
    "dpm_2_churn": ("dpm_2", [(5.0, 2.0)] * 3, {"sigma_hat_next": 2.5}, None, False, 0.0, 0, None),
    "lms_carry": ("lms", [(2.0, 1.0)] * 3, {"sigma_prev": (3.0, 5.0, 8.0)}, None, False, 0.0, 3, None),
    # one sigma for the whole batch (n_sigma = 1)
    "shared_sigma_ancestral": ("euler_ancestral", [(5.0, 2.0)], {}, None, True, 0.5, 0, [1, 2, 3]),
}


@requires_C
@pytest.mark.parametrize("name", list(CASES))
def test_host_side_marshals_what_the_launcher_expects(stand_in, name):
    sampler, sig, extra, s_eval, guided, phi, n_hist, seeds = CASES[name]
    pz = parameterization("eps" if sampler == "lms" else "v", 1.0)
    args = [co.StepArgs(sampler, s, sn, **extra) for s, sn in sig]  # one entry: shared by the batch
    sigma_eval = [s if s_eval is None else s_eval for s, _ in sig]
    shape = (3, 4, 5, 7)
    y, fc = _randn(shape, 1), _randn(shape, 2)
    fu = _randn(shape, 3) if guided else None
    hist = [_randn(shape, 10 + k) for k in range(n_hist)]
    kw = dict(guidance_scale=3.0 if guided else 1.0, guidance_rescale=phi, rescale_space="output", noise=None,
              seeds=seeds, step_index=7, want_denoised=True, out=None)
    got = _cuda.fused_step(y, fc, fu, hist, pz, args, sigma_eval, **kw)
    want = _cpu.fused_step(y, fc, fu, hist, pz, args, sigma_eval, **kw)
    for g, w in zip(got[:3], want[:3], strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(g, w)
    assert got[3:] == want[3:]
    call = stand_in.calls[-1]
    assert call["stream"] == 1234 and call["n_sigma"] == len(args)
    assert call["sigmas"][len(args):2 * len(args)] == sigma_eval  # the sigma_eval block
    if seeds is not None:
        assert call["seeds"] == seeds


@requires_C
def test_explicit_noise_and_out_in_place(stand_in):
    """Explicit noise tensors and out=y (in place) reach the launcher as the cpu backend gets them."""
    pz = parameterization("v", 1.0)
    y, f, z = _randn((2, 4, 5, 7), 1), _randn((2, 4, 5, 7), 2), _randn((2, 4, 5, 7), 3)
    args = [co.StepArgs("euler_ancestral", 5.0, 2.0)]
    kw = dict(guidance_scale=1.0, guidance_rescale=0.0, rescale_space="output", noise=z, seeds=None,
              step_index=None, want_denoised=False)
    want = _cpu.fused_step(y.clone(), f, None, [], pz, args, [5.0], out=None, **kw)[0]
    y_in = y.clone()
    got = _cuda.fused_step(y_in, f, None, [], pz, args, [5.0], out=y_in, **kw)[0]
    assert got is y_in and torch.equal(got, want)
    assert stand_in.calls[-1]["seeds"] == []


@requires_C
def test_refused_step_raises_before_any_launch(stand_in):
    pz = parameterization("v", 1.0)
    y = _randn((2, 3), 0)
    before = y.clone()
    with pytest.raises(ValueError, match="noise"):
        _cuda.fused_step(y, y, None, [], pz, [co.StepArgs("euler_ancestral", 5.0, 2.0)], [5.0],
                         guidance_scale=1.0, guidance_rescale=0.0, rescale_space="output", noise=None, seeds=None,
                         step_index=None, want_denoised=False, out=None)
    assert stand_in.calls == [] and torch.equal(y, before)


@requires_C
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("noisy", [False, True], ids=["plain", "philox"])
def test_table_step_reaches_the_launcher_in_table_mode(stand_in, per_sample, noisy):
    """cuda.table_step hands the launcher the coefficient rows (table mode: no sigmas, no sampler) and equals the
    cpu backend's table_step bit for bit."""
    from zsnr_kernels.backends import table as T

    pz = parameterization("v", 1.0)
    sig = [(5.0, 2.0), (7.0, 3.0), (4.0, 1.5)][:3 if per_sample else 1]
    sampler = "euler_ancestral" if noisy else "dpmpp_2m"
    cs = [co.step_coeffs(pz, co.StepArgs(sampler, s, sn, sigma_prev=(2 * s,))) for s, sn in sig]
    table = T.step_table(pz, cs, [s for s, _ in sig], guidance_scale=3.0, guidance_rescale=0.6, rescale_space="v")
    shape = (3, 4, 5, 7)
    y, fc, fu = _randn(shape, 1), _randn(shape, 2), _randn(shape, 3)
    hist = [_randn(shape, 4)][:max(len(c.h) for c in cs)]
    outs = {}
    for name, backend in (("cuda", _cuda), ("cpu", _cpu)):
        y_out, d_out = torch.empty_like(y), torch.empty_like(y)
        backend.table_step(y, fc, fu, hist, table, guidance_scale=3.0, guidance_rescale=0.6, rescale_space="v",
                           noise_mode=2 if noisy else 0, seeds=[5, 2**63 + 7, 2**64 - 1], step_index=3,
                           y_out=y_out, d_out=d_out)
        outs[name] = (y_out, d_out)
    assert all(torch.equal(g, w) for g, w in zip(outs["cuda"], outs["cpu"]))
    call = stand_in.calls[-1]
    assert call["sigmas"] == 0 and call["n_sigma"] == len(sig) and call["table"] == table.view(-1).tolist()
    assert call["seeds"] == ([5, 2**63 + 7, 2**64 - 1] if noisy else [])


@requires_C
def test_a_sampler_without_a_cpp_mirror_runs_from_the_table(stand_in, monkeypatch):
    """A sampler the kernels do not know runs from the spec's table on the cuda backend as on the cpu one."""
    pz = parameterization("v", 1.0)
    args = [co.StepArgs("dpmpp_3m_sde", 2.0 + i, 1.0 + i, sigma_prev=(6.0 + i, 9.0 + i), eta=0.8) for i in range(3)]
    y, fc = _randn((3, 4, 5, 7), 1), _randn((3, 4, 5, 7), 2)
    hist = [_randn((3, 4, 5, 7), 10 + k) for k in range(2)]
    kw = dict(guidance_scale=1.0, guidance_rescale=0.0, rescale_space="output", noise=None, seeds=[4, 5, 6],
              step_index=2, want_denoised=True, out=None)
    monkeypatch.setattr(_cuda, "SAMPLER_CODES", {})
    monkeypatch.setattr(_cpu, "SAMPLER_CODES", {})
    got = _cuda.fused_step(y, fc, None, hist, pz, args, [a.sigma for a in args], **kw)
    want = _cpu.fused_step(y, fc, None, hist, pz, args, [a.sigma for a in args], **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[3:] == want[3:]
    assert stand_in.calls[-1]["table"] is not None


@requires_C
@pytest.mark.parametrize("table", [False, True], ids=["sigmas", "table"])
def test_a_captured_step_has_its_own_workspace_and_copies_no_host_memory(stand_in, monkeypatch, table):
    """Inside a CUDA-graph capture (faked: these are CPU tensors) a step equals the cpu backend's, its sigmas, table
    and seeds reach the launcher without a copy from pinned memory, and its workspace is not its stream's (the one
    an eager step on the same stream uses), which every graph captured without ``stream=`` would share."""
    from zsnr_kernels.backends import layout

    if table:  # the spec's coefficient table, as for a sampler the kernels do not know
        monkeypatch.setattr(_cuda, "SAMPLER_CODES", {})
    pz = parameterization("v", 1.0)
    args = [co.StepArgs("dpmpp_3m_sde", 5.0 + i, 2.0 + i, sigma_prev=(8.0 + i, 11.0 + i), eta=0.8) for i in range(3)]
    y, fc, fu = _randn((3, 4, 5, 7), 1), _randn((3, 4, 5, 7), 2), _randn((3, 4, 5, 7), 3)
    hist = [_randn((3, 4, 5, 7), 10 + k) for k in range(2)]
    kw = dict(guidance_scale=3.0, guidance_rescale=0.7, rescale_space="output", noise=None, seeds=[4, 2**64 - 1, 6],
              step_index=2, want_denoised=True, out=None)
    want = _cpu.fused_step(y, fc, fu, hist, pz, args, [a.sigma for a in args], **kw)
    _cuda.fused_step(y, fc, fu, hist, pz, args, [a.sigma for a in args], **kw)
    eager_workspace = stand_in.calls[-1]["workspace"]  # kept by the stream's cache, so no new one can share it

    def pin_memory(self, *args, **kwargs):
        raise AssertionError("a per-step value was copied from pinned host memory inside a capture")

    monkeypatch.setattr(layout, "capturing", lambda device: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    got = _cuda.fused_step(y, fc, fu, hist, pz, args, [a.sigma for a in args], **kw)
    assert all(torch.equal(g, w) for g, w in zip(got[:2], want[:2])) and got[3:] == want[3:]
    call = stand_in.calls[-1]
    assert call["workspace"] != eager_workspace and call["seeds"] == [4, 2**64 - 1, 6]
    assert (call["table"] is not None) == table


def test_unavailable_backend_says_why():
    reasons = _cuda.not_supported_reasons(torch.zeros(2))
    assert any("CUDA tensors" in r for r in reasons)
    if not torch.cuda.is_available():
        assert _cuda.why_unavailable()
        with pytest.raises(ValueError, match="backend='cuda' cannot run this step"):
            zk.euler_step(torch.zeros(2, 3), torch.zeros(2, 3), 2.0, 1.0, backend="cuda")


# --------------------------------------------------------------------------------------------- on a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _require(backend: str) -> None:
    """Skip unless ``backend`` can run on this GPU (the cuda module built, Triton installed)."""
    reasons = zk._backend.not_supported_reasons(backend, torch.zeros(1, device="cuda"))
    if reasons:
        pytest.skip("; ".join(reasons))


def _gpu_model(y, sigma):
    f = 0.6 * y + 0.2 * torch.sin(3.0 * y)
    return f, 0.5 * f - 0.1


@gpu
@requires_C
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("sampler", list(zk.SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_backend_equals_cpu_backend(backend, sampler, dtype):
    _require(backend)
    prediction = "eps" if sampler == "lms" else "v"
    sigmas = [INF, 9.0, 4.0, 2.0, 1.0, 0.4, 0.1, 0.0][1 if prediction == "eps" else 0:]
    noise = _randn((2, 4, 16, 12), 0).to(dtype)
    kw = dict(sampler=sampler, prediction=prediction, guidance_scale=3.0, guidance_rescale=0.7, seed=[11, 12])
    got = zk.sample(_gpu_model, noise.cuda(), sigmas, backend=backend, **kw).cpu()
    want = zk.sample(_gpu_model, noise, sigmas, backend="cpu", **kw)
    tol = 64 * torch.finfo(torch.float32).eps if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    scale = max(want.abs().max().item(), 1.0)
    assert (got.double() - want.double()).abs().max().item() <= tol * scale


@gpu
@requires_C
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_philox_noise_matches_the_cpu_backend(backend):
    """euler_ancestral from inf with y = F = 0 writes s' u z: the noise itself, scaled.  The Philox integers are
    the same bits on every backend; the normals differ by the last ulp of log/sincos (libdevice vs the CPU's
    polynomials)."""
    _require(backend)
    y = torch.zeros(3, 5, 7)
    cpu = zk.euler_ancestral_step(y, y, INF, 2.0, seed=[7, 2**63 + 5, 99], step_index=11, backend="cpu").y
    gpu_y = zk.euler_ancestral_step(y.cuda(), y.cuda(), INF, 2.0, seed=[7, 2**63 + 5, 99], step_index=11,
                                    backend=backend).y.cpu()
    torch.testing.assert_close(gpu_y, cpu, rtol=0, atol=4e-7 * cpu.abs().max().item())


def test_built_cuda_module_loads_anywhere():
    """The CUDA module links the runtime statically: where setup.py built it, it imports even without a driver
    (then it reports no device), and its version matches the package's."""
    import json
    from pathlib import Path

    info_path = Path(zk.__file__).parent / "_build_info.json"
    if not info_path.exists():
        pytest.skip("no build metadata (the package was not built here)")
    cuda = json.loads(info_path.read_text()).get("cuda") or {}
    if not cuda.get("built"):
        pytest.skip(f"the CUDA module was not built: {cuda.get('why')}")
    m = _cuda.module()
    assert m is not None, _cuda._load()[1]
    assert m.__version__ == zk.__version__ and m.workspace_bytes(2, 10**6) > 0
    err, count = m.device_count()
    if not torch.cuda.is_available():
        assert err != 0 or count == 0
        assert _cuda.why_unavailable()


class _FakeCudaTensor:
    """What ``_backend.resolve`` reads of a tensor, for a CUDA tensor on GPU ``index`` (no GPU needed)."""

    is_cpu, is_cuda, dtype = False, True, torch.float32

    def __init__(self, index):
        self.device = torch.device("cuda", index)

    def get_device(self):
        return self.device.index

    def numel(self):
        return 4


def test_backend_choice_is_remembered_per_gpu(monkeypatch):
    """``auto`` checks each GPU (the cuda kernels may not be built for one GPU's architecture): a choice remembered
    for GPU 0 is not reused for GPU 1."""
    from zsnr_kernels.backends import registry as _backend

    def reasons(backend, y):
        return ["no kernels for this GPU"] if backend in ("cuda", "triton") and y.device.index == 1 else []

    monkeypatch.setattr(_backend, "_resolved", {})
    monkeypatch.setattr(_backend, "not_supported_reasons", reasons)
    assert _backend.resolve("auto", _FakeCudaTensor(0)) == "cuda"
    assert _backend.resolve("auto", _FakeCudaTensor(1)) == "torch"
    assert _backend.resolve("auto", _FakeCudaTensor(0)) == "cuda"
