// The emulator's threads and barriers (see cuda_emu.h). A launch runs its grid's blocks one
// after another on the calling OS thread; a block's threads are fibers (ucontext) that the
// scheduler below switches between, each running until it waits at a barrier or returns.
// __syncthreads is a barrier of the block, a warp operation a barrier of its 32 lanes (a thread
// whose kernel returned leaves both). Between two __syncthreads a warp runs as far as it can
// before the next warp starts (warps in order in even blocks, in reverse in odd ones), so a
// missing __syncthreads shows as one warp reading what another has not written yet, or
// overwriting what another has not read yet. A pass
// over the block in which no thread arrives, leaves or returns is a deadlock (a barrier some
// threads never reach) and stops the process naming the block. Under AddressSanitizer every
// switch is announced to it (__sanitizer_start/finish_switch_fiber).
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define HELIX_EMU_ASAN 1
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace helix_emu {
namespace {

// Stack of each emulated thread: the kernel's frames, the Rust closure that calls it, and room
// for a panic's unwinding (AddressSanitizer's redzones make frames larger).
constexpr size_t kStackBytes = 1 << 16;

struct Scheduler;
thread_local Scheduler *scheduler = nullptr;

// Any change of a barrier or a thread: arrivals, departures, releases, returns.
thread_local uint64_t changes = 0;

void yield();

// Threads that return leave the barrier (as threads that exit on a GPU no longer hold up
// __syncthreads). A wait returns whether every thread the barrier started with took part.
struct Barrier {
  void reset(int n) {
    initial = expected = n;
    arrived = 0;
    complete = true;
  }
  bool arrive_and_wait() {
    ++changes;
    const uint64_t g = generation;
    if (++arrived == expected) {
      release();
      return complete;
    }
    while (generation == g) yield();
    // No later generation can complete before this thread arrives again.
    return complete;
  }
  void leave() {
    ++changes;
    --expected;
    if (arrived > 0 && arrived == expected) release();
  }
  void release() {
    complete = expected == initial;
    arrived = 0;
    ++generation;
  }
  int initial = 0, expected = 0, arrived = 0;
  uint64_t generation = 0;
  bool complete = true;
};

struct Warp {
  int lanes = 0;
  Barrier barrier;
  // Exchange areas, alternating by operation (see warp_slots in cuda_emu.h).
  alignas(64) unsigned char slots[2][32 * 64];
};

// A cp.async copy in flight (cuda_emu.h).
struct AsyncCopy {
  void *dst;
  const void *src;
  int bytes;
  bool valid;
};

struct Fiber {
  ucontext_t context;
  unsigned char *stack = nullptr;  // kStackBytes, a guard page below
  bool done = false;
  uint64_t warp_ops = 0;  // warp operations in this block: which exchange area is next
  void *fake_stack = nullptr;
  bool at_block_barrier = false;  // in __syncthreads, arrived in block_generation
  uint64_t block_generation = 0;
  std::vector<AsyncCopy> open_group;              // issued since the last commit
  std::deque<std::vector<AsyncCopy>> in_flight;  // committed groups, oldest first
};

struct Scheduler {
  Scheduler(int threads, size_t shared) : fibers(threads), dynamic(shared) {
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      warps.push_back(std::make_unique<Warp>());
      warps.back()->lanes = std::min(32, threads - 32 * w);
    }
    for (auto &f : fibers) {
      void *m = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) fail("cannot map a thread's stack");
      mprotect(m, 4096, PROT_NONE);  // an overflow faults instead of corrupting a neighbour
      f.stack = static_cast<unsigned char *>(m) + 4096;
    }
  }
  ~Scheduler() {
    for (auto &f : fibers) munmap(f.stack - 4096, kStackBytes + 4096);
  }

  ucontext_t main;
  void *main_fake_stack = nullptr;
  const void *main_bottom = nullptr;
  size_t main_size = 0;
  std::vector<Fiber> fibers;
  int current = 0;
  Barrier block_barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  // Exactly the launch's bytes on the heap, so AddressSanitizer sees a read past them.
  std::vector<unsigned char> dynamic;
  void (*body)(void *) = nullptr;
  void *ctx = nullptr;
};

void start_switch(void **fake_stack, const void *bottom, size_t size) {
#ifdef HELIX_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

void finish_switch(void *fake_stack, const void **bottom, size_t *size) {
#ifdef HELIX_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

// Back to the scheduler, until it switches to this thread again.
void yield() {
  Scheduler &s = *scheduler;
  Fiber &f = s.fibers[s.current];
  start_switch(&f.fake_stack, s.main_bottom, s.main_size);
  swapcontext(&f.context, &s.main);
  finish_switch(f.fake_stack, &s.main_bottom, &s.main_size);
}

void thread_entry() {
  Scheduler &s = *scheduler;
  finish_switch(nullptr, &s.main_bottom, &s.main_size);
  s.body(s.ctx);
  const int t = s.current;
  Fiber &me = s.fibers[t];
  const auto pending = [](const std::vector<AsyncCopy> &g) { return !g.empty(); };
  if (pending(me.open_group) || std::any_of(me.in_flight.begin(), me.in_flight.end(), pending))
    fail("a thread returned with cp.async copies it never waited for");
  s.warps[t / 32]->barrier.leave();
  s.block_barrier.leave();
  s.fibers[t].done = true;
  ++changes;
  start_switch(nullptr, s.main_bottom, s.main_size);  // this stack's frames end here
  setcontext(&s.main);
}

Warp &my_warp() { return *scheduler->warps[threadIdx.x / 32]; }

// Runs the block blockIdx: every thread from its start until all have returned.
void run_block(Scheduler &s, const dim3 &block) {
  s.block_barrier.reset(int(s.fibers.size()));
  for (auto &w : s.warps) w->barrier.reset(w->lanes);
  // Shared memory starts as 0xff bytes (NaN in every float type), so a kernel that reads
  // what it did not write sees it.
  std::fill(s.dynamic.begin(), s.dynamic.end(), 0xff);
  for (auto &f : s.fibers) {
    f.done = false;
    f.at_block_barrier = false;
    f.warp_ops = 0;
    f.open_group.clear();
    f.in_flight.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, thread_entry, 0);
  }
  const auto resume = [&](size_t t) {
    Fiber &f = s.fibers[t];
    s.current = int(t);
    threadIdx = {unsigned(t), 0, 0};
    blockDim = block;
    start_switch(&s.main_fake_stack, f.stack, kStackBytes);
    swapcontext(&s.main, &f.context);
    finish_switch(s.main_fake_stack, nullptr, nullptr);
  };
  const bool reversed = (blockIdx.x + blockIdx.y + blockIdx.z) % 2;
  const size_t warps = s.warps.size();
  for (;;) {
    bool live = false;
    const uint64_t before = changes;
    for (size_t i = 0; i < warps; ++i) {
      const size_t w = reversed ? warps - 1 - i : i;
      const size_t end = std::min(s.fibers.size(), 32 * (w + 1));
      // This warp's threads run until each has returned or waits at __syncthreads, or until a
      // round moves nothing (a deadlock, if no other warp moves either).
      for (;;) {
        const uint64_t warp_before = changes;
        bool ran = false;
        for (size_t t = 32 * w; t < end; ++t) {
          const Fiber &f = s.fibers[t];
          if (f.done) continue;
          live = true;
          if (f.at_block_barrier && f.block_generation == s.block_barrier.generation) continue;
          ran = true;
          resume(t);
        }
        if (!ran || changes == warp_before) break;
      }
    }
    if (!live) return;
    if (changes == before) {
      threadIdx = {0, 0, 0};
      fail("every thread waits at a barrier that some never reach: deadlock");
    }
  }
}

// Blocks run one at a time in the whole process: a __shared__ array is one static array.
std::mutex one_launch;

}  // namespace

void fail(const char *what) {
  std::fprintf(stderr, "helix-emu: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

void sync_block() {
  Fiber &f = scheduler->fibers[scheduler->current];
  f.at_block_barrier = true;
  f.block_generation = scheduler->block_barrier.generation;
  scheduler->block_barrier.arrive_and_wait();
  f.at_block_barrier = false;
}

void sync_warp() {
  Warp &w = my_warp();
  if (w.lanes != 32) fail("a warp-synchronous op in a warp of fewer than 32 threads");
  if (!w.barrier.arrive_and_wait()) fail("a warp-synchronous op after a lane of the warp exited");
}

unsigned char *warp_slots() {
  return my_warp().slots[scheduler->fibers[scheduler->current].warp_ops++ % 2];
}

unsigned char *dynamic_shared() { return scheduler->dynamic.data(); }

void async_copy(void *dst, const void *src, int bytes, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || (valid && reinterpret_cast<uintptr_t>(src) % bytes))
    fail("cp.async: an address not aligned to the copy's size");
  std::memset(dst, 0xff, bytes);
  scheduler->fibers[scheduler->current].open_group.push_back({dst, src, bytes, valid});
}

void async_commit() {
  Fiber &f = scheduler->fibers[scheduler->current];
  f.in_flight.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void async_wait(int in_flight) {
  Fiber &f = scheduler->fibers[scheduler->current];
  while (int(f.in_flight.size()) > in_flight) {
    for (const AsyncCopy &c : f.in_flight.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    }
    f.in_flight.pop_front();
  }
}

}  // namespace helix_emu

extern "C" {

// Runs body(ctx) in every thread of every block of the grid (1-D blocks: the kernels' own).
// Returns 0, or -1 for a launch the emulator does not take.
int helix_emu_launch(const unsigned grid[3], const unsigned block[3], size_t shared_bytes,
                     void (*body)(void *), void *ctx) {
  if (block[1] != 1 || block[2] != 1 || block[0] == 0 || block[0] > 1024) return -1;
  std::lock_guard<std::mutex> serial(helix_emu::one_launch);
  helix_emu::Scheduler s(int(block[0]), shared_bytes);
  s.body = body;
  s.ctx = ctx;
  helix_emu::scheduler = &s;
  gridDim = {grid[0], grid[1], grid[2]};
  const dim3 b = {block[0], block[1], block[2]};
  for (unsigned z = 0; z < grid[2]; ++z)
    for (unsigned y = 0; y < grid[1]; ++y)
      for (unsigned x = 0; x < grid[0]; ++x) {
        blockIdx = {x, y, z};
        helix_emu::run_block(s, b);
      }
  helix_emu::scheduler = nullptr;
  return 0;
}

// The Rust test harness keeps some memory to the end on purpose: leaks are not what the
// emulator checks.
const char *__asan_default_options() { return "detect_leaks=0"; }
}
