// The kernels' thread pool: see thread_pool.h.
//
// One job at a time.  The job's tasks are handed out by one 64-bit word, claimed with compare-and-swap:
//   claim = generation (24 bits) | tasks (20 bits) | next task (20 bits)
// A thread claims task i by moving the word from (g, n, i) to (g, n, i + 1), and only if i < n; the generation
// makes a thread that read the word of an earlier job fail its compare-and-swap.  The job's body and context are
// written before the word of a job is published (release) and rewritten only after all of its tasks are done, so
// a thread that has claimed a task reads the job's own body.
#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#if __has_include(<pthread.h>)
#include <pthread.h>
#define ZSNR_HAVE_PTHREAD_ATFORK 1
#endif

namespace zsnr {
namespace cpu {
namespace {

constexpr int kTaskBits = 20;
constexpr uint64_t kTaskMask = (uint64_t{1} << kTaskBits) - 1;
constexpr uint32_t kGenMask = (uint32_t{1} << 24) - 1;
// NOTE: how long a pool thread spins after a job before it sleeps: long enough that the next step of a sampling
// loop (a few to tens of microseconds of Python later) finds it awake, short enough that a thread sharing its core
// with a busy process has not used up its share when the next job wakes it.
constexpr auto kSpin = std::chrono::microseconds(50);

inline uint64_t pack(uint32_t gen, int64_t tasks, int64_t next) {
  return (uint64_t{gen} << (2 * kTaskBits)) | (static_cast<uint64_t>(tasks) << kTaskBits) |
         static_cast<uint64_t>(next);
}

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct Pool {
  std::atomic<uint64_t> claim{0};
  std::atomic<int64_t> done{0};           // tasks the pool threads finished, this job
  std::atomic<int> helpers{0};            // pool threads the job may use (ids below it)
  std::atomic<uint32_t> gen{0};           // the newest job's generation, read while spinning
  void (*body)(void*, int64_t) = nullptr;  // the job's (see the top of this file)
  void* ctx = nullptr;
  std::mutex submit;                      // held by the thread running a job
  std::mutex m;                           // with cv: sleeping pool threads
  std::condition_variable cv;
  uint32_t published = 0;                 // gen, under m
  int started = 0;                        // pool threads started, under submit
};

// Claims and runs the current job's tasks until none is left; returns how many it ran.
int64_t take_tasks(Pool& p) {
  int64_t ran = 0;
  uint64_t c = p.claim.load(std::memory_order_acquire);
  for (;;) {
    const int64_t n = static_cast<int64_t>((c >> kTaskBits) & kTaskMask), i = static_cast<int64_t>(c & kTaskMask);
    if (i >= n) return ran;
    if (!p.claim.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    p.body(p.ctx, i);
    ++ran;
    c = p.claim.load(std::memory_order_acquire);
  }
}

void pool_thread(Pool* p, int id, uint32_t seen) {
  for (;;) {
    uint32_t g = p->gen.load(std::memory_order_acquire);
    if (g == seen) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int k = 1; g == seen; ++k) {
        pause();
        g = p->gen.load(std::memory_order_acquire);
        if (k % 256 == 0 && std::chrono::steady_clock::now() > until) break;
      }
    }
    if (g == seen) {
      std::unique_lock<std::mutex> lock(p->m);
      p->cv.wait(lock, [&] { return p->published != seen; });
      g = p->published;
    }
    seen = g;
    if (id < p->helpers.load(std::memory_order_relaxed)) {
      const int64_t ran = take_tasks(*p);
      if (ran > 0) p->done.fetch_add(ran, std::memory_order_release);
    }
  }
}

// The pool, made on first use.  An atomic pointer rather than a function-local static: a child forked while another
// thread ran a static's initializer would wait on its guard for good.
std::atomic<Pool*> g_pool{nullptr};

#if defined(ZSNR_HAVE_PTHREAD_ATFORK)
// Registered as the module loads, before any pool exists: a forked child has none of the pool's threads (and
// perhaps a mutex one of them held), so it drops the parent's pool (its copy is leaked) and makes its own on first
// use.
[[maybe_unused]] const int g_at_fork =
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_relaxed); });
#endif

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  Pool* made = new Pool;  // never destroyed: its threads are detached and may outlive static destruction
  if (g_pool.compare_exchange_strong(p, made, std::memory_order_acq_rel, std::memory_order_acquire)) return *made;
  delete made;  // another thread made the pool first (a Pool starts no thread before its first job)
  return *p;
}

void run_serial(int64_t tasks, void (*body)(void*, int64_t), void* ctx) {
  for (int64_t t = 0; t < tasks; ++t) body(ctx, t);
}

}  // namespace

void run_tasks(int64_t tasks, int threads, void (*body)(void*, int64_t), void* ctx) {
  if (threads <= 1 || tasks <= 1 || static_cast<uint64_t>(tasks) > kTaskMask) return run_serial(tasks, body, ctx);
  Pool& p = pool();
  std::unique_lock<std::mutex> job(p.submit, std::try_to_lock);
  if (!job.owns_lock()) return run_serial(tasks, body, ctx);  // another thread's job is running
  const int helpers = static_cast<int>(threads - 1 < tasks - 1 ? threads - 1 : tasks - 1);
  const uint32_t prev = p.gen.load(std::memory_order_relaxed);
  for (; p.started < helpers; ++p.started) {
    try {
      std::thread(pool_thread, &p, p.started, prev).detach();
    } catch (...) {  // no more threads: the job runs on those there are
      break;
    }
  }
  p.body = body;
  p.ctx = ctx;
  p.done.store(0, std::memory_order_relaxed);
  p.helpers.store(helpers < p.started ? helpers : p.started, std::memory_order_relaxed);
  const uint32_t g = (prev + 1) & kGenMask;
  p.claim.store(pack(g, tasks, 0), std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(p.m);
    p.published = g;
    p.gen.store(g, std::memory_order_release);
  }
  p.cv.notify_all();
  const int64_t mine = take_tasks(p);
  // the tasks pool threads have claimed are running: wait for them (a thread that has not woken yet claimed none)
  for (int k = 1; p.done.load(std::memory_order_acquire) + mine < tasks; ++k) {
    pause();
    if (k % 1024 == 0) std::this_thread::yield();
  }
}

}  // namespace cpu
}  // namespace zsnr
