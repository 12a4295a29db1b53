"""The cpu kernels' thread pool (csrc/cpu/thread_pool.h): many short parallel steps from several Python threads at
once, with thread counts changing between them, give the 1-thread bits and never hang; a child forked after the
parent used the pool steps in parallel on a pool of its own."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import threading

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the cpu kernels are not built")

SHAPE = (2, 4, 64, 96)  # 24576 elements per sample: two chunks each, so every step is a parallel job


def _rand(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _step(y, fc, fu):
    """A guided, rescaled step with Philox noise: both the statistics pass and the element pass are pool jobs."""
    return zk.euler_ancestral_step(y, (fc, fu), 5.0, 2.0, seed=[1, 2], step_index=3, guidance_scale=4.0,
                                   guidance_rescale=0.7, backend="cpu").y


def test_concurrent_jobs_and_changing_thread_counts_give_the_one_thread_bits():
    inputs = [(_rand(3 * k), _rand(3 * k + 1), _rand(3 * k + 2)) for k in range(3)]
    zk.set_num_threads(1)
    try:
        want = [_step(*t) for t in inputs]
        failures, done = [], []

        def worker(k):
            for rep in range(60):
                if k == 0:
                    zk.set_num_threads(1 + rep % 4)  # 1 to 4 threads, changed while the others step
                if not torch.equal(_step(*inputs[k]), want[k]):
                    failures.append((k, rep))
            done.append(k)

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(done) == [0, 1, 2], "a step hung in the thread pool"
        assert failures == []
    finally:
        zk.set_num_threads(None)


def _child(y, fc, fu, queue):
    assert zk.get_num_threads() == 2  # the parent's setting; the child's own pool serves it
    queue.put(_step(y, fc, fu).numpy().tobytes())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_a_forked_child_runs_parallel_steps_on_a_pool_of_its_own():
    t = (_rand(10), _rand(11), _rand(12))
    zk.set_num_threads(2)
    try:
        want = _step(*t).numpy().tobytes()  # the parent's pool threads exist now; the child has none of them
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(*t, queue))
        child.start()
        try:
            got = queue.get(timeout=60)
        except queue_module.Empty:
            pytest.fail("the forked child hung in the kernels' thread pool")
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
        assert child.exitcode == 0 and got == want
    finally:
        zk.set_num_threads(None)
