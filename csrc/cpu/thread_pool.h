// The threads of the CPU kernels' element and statistics passes: run_tasks(tasks, threads, body) calls body(task)
// once for every task in [0, tasks), on the calling thread and up to threads - 1 pool threads, which take the
// tasks one at a time as they finish the last (the kernels' tasks are fixed chunks, and their results never depend
// on which thread ran a task).
//
// Why not an OpenMP loop: an OpenMP parallel region ends in a barrier that waits for every thread of the team,
// including one that has not started yet.  Beside another busy process on a 2-core machine, the second OpenMP
// worker spins between calls (libgomp's default wait policy), the scheduler parks it behind the busy process, and
// the step waits for it at the barrier: means of 1.6-2.4x the 1-thread step, calls of 5-16 ms (notes in
// kernels_impl.h).  Here the caller takes tasks itself and then waits only for tasks a pool thread has already
// started; a pool thread that wakes late finds nothing left and goes back to sleep.  Pool threads spin briefly
// after a job (back-to-back steps find them awake), then sleep on a condition variable, so a sleeping thread
// woken by the next job is scheduled promptly rather than queued behind a busy process.
//
// A caller that finds the pool busy (a second Python thread stepping at the same time: the kernels run without the
// GIL) runs its tasks itself.  A process forked from one that used the pool starts a pool of its own (the parent's
// threads were not copied).  More than 2^20 - 1 tasks (2^34 elements in 16384-element chunks) run on the caller.
#pragma once

#include <cstdint>
#include <type_traits>

namespace zsnr {
namespace cpu {

// body(ctx, task) for every task in [0, tasks): on the calling thread alone when threads <= 1 or tasks <= 1.
void run_tasks(int64_t tasks, int threads, void (*body)(void* ctx, int64_t task), void* ctx);

template <class Body>
void run_tasks(int64_t tasks, int threads, Body&& body) {
  using B = std::remove_reference_t<Body>;
  run_tasks(
      tasks, threads, [](void* ctx, int64_t task) { (*static_cast<B*>(ctx))(task); },
      const_cast<void*>(static_cast<const void*>(&body)));
}

}  // namespace cpu
}  // namespace zsnr
