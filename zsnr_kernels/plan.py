"""Device-resident sampling (docs/design.md §3): a whole run planned once, then stepped with no host synchronisation.

:class:`SamplingPlan` records what :func:`zsnr_kernels.sample` does for a schedule -- every model evaluation, its
step arguments, which remembered tensors it reads -- by running ``sample()`` itself once on tiny host tensors, so
the plan cannot drift from the sampling loop.  It then

* computes every evaluation's coefficients once (the Python spec, float64) into one table on the latent's device,
  ``[evaluations, 1, NUM_COEFFS]`` (:mod:`zsnr_kernels.backends.table`), and the sigmas the model is called at into
  ``[evaluations, batch]``;
* gives every tensor of the run (the state, the remembered D or LMS derivatives, the first stage of a two-stage
  step) a fixed buffer, reusing a buffer once its contents are dead (exact aliasing, which every kernel allows);
* runs evaluation k from row k of the table with the backend's ``table_step`` (the backend the registry
  resolves: ``cuda`` or ``triton`` on CUDA tensors, ``cpu`` or ``torch`` on CPU tensors).  On CUDA the kernels read
  the row on the device (one launch, two with guidance rescale, whose factor is folded on the device) and draw
  Philox noise from seeds uploaded once: no step reads a device value on the host or copies host memory to the
  device.

So a whole loop, model included, can be captured in one CUDA graph (``torch.cuda.graph``) and replayed with new
noise copied into the same input tensor (see the README).  On the ``torch`` backend the reference reads the
table's columns as device tensors.

A sharded latent (``process_group=``, ``shard_dim=``: each rank plans and runs its slice, :mod:`zsnr_kernels.distributed`)
is planned too: the plan learns the slices' layout when it is built (a collective every rank of the group makes, as
``sample()`` does at the start of a run), shares the group's first rank's seeds when it drew its own, and its steps
draw their noise at the slice's global indices (in the kernel: :func:`zsnr_kernels.distributed.kernel_noise_slice`).
With guidance rescale each step computes the factor of the full latent (one ``all_gather`` of the row statistics,
read on the host) and runs its row with the factor folded in, as sharded ``sample()`` steps do; such a step waits
for the device and communicates, so a sharded plan with guidance rescale cannot be captured in a CUDA graph.

Not planned: EDM churn (``s_churn``), ``noise_sampler`` noise and per-sample sigma schedules; those runs use
:func:`zsnr_kernels.sample`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate, coefficients as co, distributed, sampling, steps
from .backends import layout as _layout, registry as _backend, table as _table
from .parameterization import parameterization

__all__ = ["SamplingPlan"]

@dataclass
class _Eval:
    """One recorded model evaluation and the step that consumes it.  Slots name the run's tensors."""

    model_slot: int                    # the state the model is called with
    y_slot: int                        # the step's y
    hist_slots: list[int]              # remembered tensors, newest first
    args: co.StepArgs
    sigma_eval: float
    step_index: int | None
    y_out: int
    draw: int = 0                      # the Philox draw of its noise within the step (dpmpp_sde's stage 2: 1)
    d_out: int = -1                    # -1: not produced
    carry_out: int = -1
    coeffs: co.StepCoeffs | None = None


class _Recorder:
    """Collects the steps of one ``sample()`` run on tiny tensors, naming every tensor by a slot number."""

    def __init__(self, guided: bool):
        self.guided = guided
        self.slot_of: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive, so that their ids are never reused
        self.evals: list[_Eval] = []
        self.model_calls: list[tuple[int, torch.Tensor]] = []
        self.initial: int | None = None
        self.seeds: list[int] | None = None

    def _new(self, t: torch.Tensor) -> int:
        self.slot_of[id(t)] = len(self.keep)
        self.keep.append(t)
        return len(self.keep) - 1

    def _slot(self, t: torch.Tensor) -> int:
        slot = self.slot_of.get(id(t))
        if slot is None:  # only the initial state enters the loop from outside
            if self.initial is not None:
                raise RuntimeError("zsnr_kernels.plan: the sampling loop read a tensor it did not produce")
            slot = self.initial = self._new(t)
        return slot

    def model(self, y: torch.Tensor, sigma: torch.Tensor):
        self.model_calls.append((self._slot(y), sigma.detach().clone()))
        zero = torch.zeros_like(y)
        return (zero, zero.clone()) if self.guided else zero

    def step(self, y, history, args, sigma_eval, result, *, seeds, step_index, guided, draw=0):
        if len(args) != 1:
            raise ValueError("a SamplingPlan needs one sigma schedule for the whole batch, not per-sample sigmas")
        if seeds is not None:
            self.seeds = list(seeds)
        e = _Eval(self.model_calls[-1][0], self._slot(y), [self._slot(h) for h in history], args[0],
                  sigma_eval[0], step_index, y_out=-1, draw=draw)
        e.y_out = self._new(result.y)
        if result.denoised is not None:
            e.d_out = self._new(result.denoised)
        if result.derivative is not None:
            e.carry_out = self._new(result.derivative)
        self.evals.append(e)


class SamplingPlan:
    """A whole sampling run, planned once for a latent shape, device and dtype; see the module docstring.

    Takes :func:`zsnr_kernels.sample`'s arguments (less ``model``, ``noise``, ``callback``, ``disable``,
    ``noise_sampler``, ``model_sigmas`` and churn), plus the latent's ``shape``, ``dtype`` and ``device``.
    ``seed`` (one int per sample, or an int s: sample i gets s + i) fixes the Philox noise of stochastic
    samplers; a stochastic plan without one draws its seeds once from torch's generator, when it is built (as
    ``sample()`` does per run), so every run of the plan adds the same noise.

    ``process_group``, ``shard_dim``: ``shape`` is this rank's slice of the latent along ``shard_dim`` (module
    docstring); every rank of the group builds its plan (a collective) and runs it, the same evaluations in the same
    order.  The gathered slices equal ``sample(..., process_group=, shard_dim=)`` and one process's run.

    A plan on CUDA tensors runs the ``cuda`` or ``triton`` kernels (``backend``, as for a step) and can be
    captured in a CUDA graph.  One on the ``torch`` backend (float64, or no kernels) computes its Philox noise with
    PyTorch ops from host seeds, which copy host memory: do not capture a stochastic one.

        plan = SamplingPlan(sigmas, noise.shape, sampler="dpmpp_2m", device="cuda", dtype=torch.bfloat16,
                            guidance_scale=7.5, guidance_rescale=0.7)
        x0 = plan.run(model, noise)          # the same samples as sample(model, noise, sigmas, ...)

    or, step by step (what :meth:`run` does; capturable in a CUDA graph as a whole):

        plan.start(noise)
        for k in range(plan.evaluations):
            plan.step(k, model(plan.model_input(k), plan.model_sigma(k)))
        x0 = plan.result()
    """

    def __init__(self, sigmas, shape, *, sampler="euler", dtype=torch.float32, device="cpu", prediction="v",
                 sigma_data=1.0, guidance_scale=1.0, guidance_rescale=0.0, rescale_space="output", eta=1.0,
                 s_noise=1.0, solver_type=None, order=None, disable_corrector=(), seed=None, backend="auto",
                 process_group=None, shard_dim=None):
        shape = tuple(int(v) for v in shape)
        if len(shape) < 1 or min(shape) < 1:
            raise ValueError(f"shape must be a non-empty latent shape with positive sizes, got {shape}")
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        probe = torch.empty(0, dtype=dtype, device=self.device).new_empty(shape[:1] + (1,) * (len(shape) - 1))
        self.backend = _backend.resolve(backend, probe)
        # a sharded latent: the slices' layout, learned now (a collective every rank makes, as sample() does)
        self.shard = None
        if process_group is not None or shard_dim is not None:
            like = torch.empty((), dtype=dtype, device=self.device).expand(shape)  # the slice's shape, no memory
            self.shard = distributed.layout(like, process_group, shard_dim, refresh=True)
        self.pz = parameterization(prediction, sigma_data)
        self.guidance_scale, self.guidance_rescale, self.rescale_space = _validate.guidance(
            guidance_scale, guidance_rescale, rescale_space)
        self.guided = self.guidance_scale != 1.0
        batch = shape[0]

        # record sample() on (batch, 1) float64 host tensors; a noisy step names its seeds and step index
        rec = _Recorder(self.guided)
        with steps.recording(rec):
            sampling.sample(rec.model, torch.zeros(batch, 1, dtype=torch.float64), sigmas, sampler=sampler,
                            prediction=prediction, sigma_data=sigma_data, guidance_scale=guidance_scale,
                            guidance_rescale=guidance_rescale, rescale_space=rescale_space, eta=eta,
                            s_noise=s_noise, solver_type=solver_type, order=order,
                            disable_corrector=disable_corrector, seed=seed, backend="torch")
        self.seeds = rec.seeds  # None for a deterministic run (which drew none)
        if self.shard is not None and seed is None and self.seeds is not None:  # drawn here: each rank's differ
            self.seeds = distributed.agree_seeds(self.shard, self.seeds, like)
        vals = _validate.sigmas(sigmas, final_zero=False)
        self._initial_scale, self._final_sigma = self.pz.noise_scale(vals[0]), vals[-1]
        self._evals = rec.evals
        self._next = None  # the evaluation step() takes next; None before start()
        self._initial = rec.initial
        self._final = rec.evals[-1].y_out
        self._assign_buffers(len(rec.keep))

        # the coefficients of every evaluation (float64, on the device) and the model's sigmas
        rows = []
        for e in self._evals:
            e.coeffs = co.step_coeffs(self.pz, e.args)
            rows.append(_table.step_table(self.pz, [e.coeffs], [e.sigma_eval], guidance_scale=self.guidance_scale,
                                          guidance_rescale=self.guidance_rescale, rescale_space=self.rescale_space))
        host = torch.stack(rows)
        self.table = host.to(self.device)                                     # [evaluations, 1, NUM_COEFFS]
        # sharded: the rows on the host (for the rescale factor's fold) and the slice the kernels draw noise for
        self._rows = host.tolist() if self.shard is not None else None
        self._noise_slice = (None if self.shard is None
                             else distributed.kernel_noise_slice(self.shard, self.backend))
        self.sigmas = torch.stack([s for _, s in rec.model_calls]).to(self.device)  # [evaluations, batch]
        self._run = _backend.module(self.backend)
        self._state = self._run.plan_state(shape, dtype, self.device, self.seeds)
        self._buffers = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self._n_buffers)]

    # ------------------------------------------------------------------------------------------------ planning

    def _assign_buffers(self, n_slots: int) -> None:
        """Map the run's tensors (slots) to as few buffers as their lifetimes allow: a slot's buffer is free
        after the last step that reads it, and may then receive an output of that very step."""
        last = [-1] * n_slots
        for k, e in enumerate(self._evals):
            for s in (e.model_slot, e.y_slot, *e.hist_slots):
                last[s] = k
        last[self._final] = len(self._evals)  # read by result()
        buf = [-1] * n_slots
        free: list[int] = []
        n_buffers = 0

        def take() -> int:
            nonlocal n_buffers
            if free:
                return free.pop()
            n_buffers += 1
            return n_buffers - 1

        buf[self._initial] = take()
        for k, e in enumerate(self._evals):
            for s in {e.model_slot, e.y_slot, *e.hist_slots}:
                if last[s] == k:
                    free.append(buf[s])
            for s in (e.y_out, e.d_out, e.carry_out):
                if s >= 0 and last[s] > k:  # outputs nobody reads are not stored
                    buf[s] = take()
        self._buf = buf
        self._n_buffers = n_buffers

    # --------------------------------------------------------------------------------------------- execution

    @property
    def evaluations(self) -> int:
        """How many times the model is called."""
        return len(self._evals)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """Copy the initial state (``noise`` scaled for sigmas[0]; the noise itself at inf) into the plan's
        state buffer and return that buffer."""
        _validate.tensor("noise", noise)
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"noise must have the plan's shape {self.shape}, got {tuple(noise.shape)}")
        y = self._buffers[self._buf[self._initial]]
        if noise.dtype != y.dtype:
            raise TypeError(f"noise has dtype {noise.dtype} but the plan runs in {y.dtype}; cast the noise, or build "
                            "the plan with its dtype")
        y.copy_(noise)
        if self._initial_scale != 1.0:
            y.mul_(self._initial_scale)
        self._next = 0
        return y

    def _evaluation(self, k) -> int:
        """``k`` as an evaluation index (an int, numpy int or 0-d integer tensor) in range."""
        return _validate.index("k", k, len(self._evals))

    def model_input(self, k: int) -> torch.Tensor:
        """The tensor to call the model with at evaluation ``k`` (a buffer of the plan: read it, do not keep it)."""
        return self._buffers[self._buf[self._evals[self._evaluation(k)].model_slot]]

    def model_sigma(self, k: int) -> torch.Tensor:
        """The sigmas (float64, shape (batch,), on the plan's device; inf allowed) to call the model at."""
        return self.sigmas[self._evaluation(k)]

    def step(self, k: int, model_output) -> None:
        """Consume the model's output of evaluation ``k`` (``F`` or ``(F_cond, F_uncond)``): the evaluations in
        order, 0, 1, ..., after :meth:`start` (the plan's buffers are reused, so another order computes garbage)."""
        if self._next is None:
            raise ValueError("call start(noise) before step()")
        k = self._evaluation(k)
        if k != self._next:
            raise ValueError(f"step({k}) out of order: the plan expects evaluation {self._next} next (each once, in "
                             "order; start() begins a run again)")
        e = self._evals[k]
        y = self._buffers[self._buf[e.y_slot]]
        f_cond, f_uncond = _validate.model_output(model_output, y, self.guidance_scale)
        hist = [self._buffers[self._buf[s]] for s in e.hist_slots[:len(e.coeffs.h)]]
        out = {name: self._buffers[self._buf[s]] if s >= 0 and self._buf[s] >= 0 else None
               for name, s in (("y", e.y_out), ("d", e.d_out), ("carry", e.carry_out))}
        for name, o in out.items():  # the plan's buffers are apart; a model could return a view of one
            if o is not None:
                _validate.apart(f"the plan's {name} buffer", o, (f_cond, f_uncond), lambda k: "model_output")
        f_cond = f_cond.contiguous()
        f_uncond = None if f_uncond is None else f_uncond.contiguous()
        step_index = 0 if e.step_index is None else e.step_index
        table, phi = self.table[k], self.guidance_rescale if f_uncond is not None else 0.0
        noise_mode, noise, noise_slice = (2 if e.coeffs.e != 0.0 else 0), None, None
        if self.shard is not None:  # the slice's noise at its global indices; the rescale factor of the full latent
            if noise_mode == 2 and self._noise_slice is None:  # a slice the kernels cannot draw: drawn beside
                noise_mode, noise = 1, distributed.global_normal(self.shard, y, self.seeds, step_index, e.draw)
            noise_slice = self._noise_slice
            if phi:
                row = self._rows[k][0]
                factors = distributed.rescale_factors(self.shard, y, f_cond, f_uncond, self.guidance_scale, phi,
                                                      [(row[_table.U], row[_table.T])])
                table = _layout.to_device(torch.tensor(distributed.rows_with_factors([row], factors),
                                                       dtype=torch.float64), self.device)
                phi = 0.0
        self._run.table_step(
            y, f_cond, f_uncond, hist, table, guidance_scale=self.guidance_scale, guidance_rescale=phi,
            rescale_space=self.rescale_space, noise_mode=noise_mode, noise=noise, seeds=self.seeds,
            step_index=step_index, y_out=out["y"], d_out=out["d"],
            carry_out=out["carry"] if e.coeffs.carry is not None else None, state=self._state, draw=e.draw,
            noise_slice=noise_slice)
        self._next = k + 1

    def result(self) -> torch.Tensor:
        """x0, the clean latent, from the final state (a new tensor), once every evaluation has been stepped (not
        checked: a captured CUDA graph replays the steps without this object seeing them); x at the last sigma for a
        schedule that ends above 0, as :func:`zsnr_kernels.sample`."""
        return steps.final_sample(self._buffers[self._buf[self._final]], prediction=self.pz.prediction,
                                  sigma_data=self.pz.sigma_data, sigma=self._final_sigma)

    def run(self, model, noise: torch.Tensor) -> torch.Tensor:
        """The whole run: :meth:`start`, every evaluation, :meth:`result`.  ``model(y, sigma)`` as in
        :func:`zsnr_kernels.sample`."""
        self.start(noise)
        for k in range(self.evaluations):
            self.step(k, model(self.model_input(k), self.model_sigma(k)))
        return self.result()
