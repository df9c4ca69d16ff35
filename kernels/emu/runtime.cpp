// The emulator's threads and barriers (see cuda_emu.h). A launch starts blockDim OS threads
// that run the grid's blocks one after another: each thread runs its part of a block, leaves
// the block's barriers when its kernel returns, and waits for the others before the next
// block. Barriers wait on a futex, so the 31 other lanes of a warp wake at once without
// queueing on a lock. A barrier that waits more than a minute is a deadlock (a __syncthreads
// or a warp operation some threads never reach) and stops the process naming the block and
// thread.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_emu.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace helix_emu {
namespace {

// Threads that exit leave the barrier (as threads that exit on a GPU no longer hold up
// __syncthreads). A wait returns whether every thread the barrier started with took part.
class Barrier {
 public:
  explicit Barrier(int expected) { reset(expected); }

  // Only while no thread is waiting on it.
  void reset(int expected) {
    initial_ = expected_ = expected;
    arrived_ = 0;
    complete_.store(true, std::memory_order_relaxed);
  }

  // `last` runs in the last thread to arrive, before the others go on.
  template <typename F> bool arrive_and_wait(const char *what, F &&last) {
    uint32_t generation;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation = generation_.load(std::memory_order_relaxed);
      if (++arrived_ == expected_) {
        last();
        release();
        return complete_.load(std::memory_order_relaxed);
      }
    }
    wait_past(generation, what);
    // No later generation can complete before this thread arrives again.
    return complete_.load(std::memory_order_relaxed);
  }
  bool arrive_and_wait(const char *what) {
    return arrive_and_wait(what, [] {});
  }

  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    complete_.store(expected_ == initial_, std::memory_order_relaxed);
    arrived_ = 0;
    generation_.fetch_add(1, std::memory_order_release);
    syscall(SYS_futex, &generation_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }

  void wait_past(uint32_t generation, const char *what) {
    const timespec step = {1, 0};
    for (int waited = 0; generation_.load(std::memory_order_acquire) == generation;) {
      // Returns at once if the generation has moved on since the load.
      syscall(SYS_futex, &generation_, FUTEX_WAIT_PRIVATE, generation, &step, nullptr, 0);
      if (generation_.load(std::memory_order_acquire) != generation) break;
      timespec now;
      clock_gettime(CLOCK_MONOTONIC, &now);
      if (waited == 0) waited = int(now.tv_sec);
      if (int(now.tv_sec) - waited > 60) fail(what);
    }
  }

  std::mutex mutex_;
  std::atomic<uint32_t> generation_{0};
  int initial_ = 0;
  int expected_ = 0;
  int arrived_ = 0;
  std::atomic<bool> complete_{true};
};

struct Warp {
  explicit Warp(int lanes) : barrier(lanes), lanes(lanes) {}
  Barrier barrier;
  const int lanes;
  alignas(64) unsigned char slots[2][32 * 64];
};

struct Block {
  Block(int threads, size_t shared) : threads(threads), barrier(threads), dynamic(shared) {
    for (int w = 0; w < (threads + 31) / 32; ++w)
      warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
    reset();
  }
  // For the next block: full barriers, and shared memory filled with 0xff bytes (NaN in
  // every float type), so a kernel that reads what it did not write sees it.
  void reset() {
    barrier.reset(threads);
    for (auto &w : warps) w->barrier.reset(w->lanes);
    std::fill(dynamic.begin(), dynamic.end(), 0xff);
  }
  const int threads;
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  // Exactly the launch's bytes on the heap, so AddressSanitizer sees a read past them.
  std::vector<unsigned char> dynamic;
};

thread_local Block *current = nullptr;
// Warp operations this thread has done in the current block (which area is next).
thread_local uint64_t warp_ops = 0;
// Blocks run one at a time in the whole process: a __shared__ array is one static array.
std::mutex one_launch;

Warp &my_warp() { return *current->warps[threadIdx.x / 32]; }

}  // namespace

void fail(const char *what) {
  std::fprintf(stderr, "helix-emu: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

void sync_block() { current->barrier.arrive_and_wait("__syncthreads waited a minute: deadlock"); }

void sync_warp() {
  Warp &w = my_warp();
  if (w.lanes != 32) fail("a warp-synchronous op in a warp of fewer than 32 threads");
  if (!w.barrier.arrive_and_wait("a warp-synchronous op waited a minute: deadlock"))
    fail("a warp-synchronous op after a lane of the warp exited");
}

unsigned char *warp_slots() { return my_warp().slots[warp_ops++ % 2]; }

unsigned char *dynamic_shared() { return current->dynamic.data(); }

}  // namespace helix_emu

extern "C" {

// Runs body(ctx) in every thread of every block of the grid (1-D blocks: the kernels' own).
// Returns 0, or -1 for a launch the emulator does not take.
int helix_emu_launch(const unsigned grid[3], const unsigned block[3], size_t shared_bytes,
                     void (*body)(void *), void *ctx) {
  if (block[1] != 1 || block[2] != 1 || block[0] == 0 || block[0] > 1024) return -1;
  const int threads = static_cast<int>(block[0]);
  const uint64_t blocks = uint64_t(grid[0]) * grid[1] * grid[2];
  std::lock_guard<std::mutex> serial(helix_emu::one_launch);
  helix_emu::Block b(threads, shared_bytes);
  helix_emu::Barrier between(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = {unsigned(t), 0, 0};
      blockDim = {block[0], block[1], block[2]};
      gridDim = {grid[0], grid[1], grid[2]};
      helix_emu::current = &b;
      for (uint64_t i = 0; i < blocks; ++i) {
        blockIdx = {unsigned(i % grid[0]), unsigned(i / grid[0] % grid[1]),
                    unsigned(i / grid[0] / grid[1])};
        helix_emu::warp_ops = 0;
        body(ctx);
        b.warps[t / 32]->barrier.leave();
        b.barrier.leave();
        between.arrive_and_wait("a block's threads did not all finish", [&] { b.reset(); });
      }
    });
  for (auto &th : pool) th.join();
  return 0;
}

// The Rust test harness keeps some memory to the end on purpose: leaks are not what the
// emulator checks.
const char *__asan_default_options() { return "detect_leaks=0"; }
}
