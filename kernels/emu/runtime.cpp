// The emulator's threads and barriers (see cuda_emu.h). A launch runs its grid's blocks one
// after another on the calling OS thread; a block's threads are fibers (ucontext) that the
// scheduler below switches between, each running until it waits at a barrier or returns.
// __syncthreads is a barrier of the block, a warp operation a barrier of its 32 lanes (a thread
// whose kernel returned leaves both). A thread runs as far as it can before the others start,
// so a missing __syncthreads shows as a read of what the others have not written yet. A pass
// over the block in which no thread arrives, leaves or returns is a deadlock (a barrier some
// threads never reach) and stops the process naming the block. Under AddressSanitizer every
// switch is announced to it (__sanitizer_start/finish_switch_fiber).
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
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

struct Fiber {
  ucontext_t context;
  unsigned char *stack = nullptr;  // kStackBytes, a guard page below
  bool done = false;
  uint64_t warp_ops = 0;  // warp operations in this block: which exchange area is next
  void *fake_stack = nullptr;
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
    f.warp_ops = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, thread_entry, 0);
  }
  for (;;) {
    bool live = false;
    const uint64_t before = changes;
    for (size_t t = 0; t < s.fibers.size(); ++t) {
      Fiber &f = s.fibers[t];
      if (f.done) continue;
      live = true;
      s.current = int(t);
      threadIdx = {unsigned(t), 0, 0};
      blockDim = block;
      start_switch(&s.main_fake_stack, f.stack, kStackBytes);
      swapcontext(&s.main, &f.context);
      finish_switch(s.main_fake_stack, nullptr, nullptr);
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

void sync_block() { scheduler->block_barrier.arrive_and_wait(); }

void sync_warp() {
  Warp &w = my_warp();
  if (w.lanes != 32) fail("a warp-synchronous op in a warp of fewer than 32 threads");
  if (!w.barrier.arrive_and_wait()) fail("a warp-synchronous op after a lane of the warp exited");
}

unsigned char *warp_slots() {
  return my_warp().slots[scheduler->fibers[scheduler->current].warp_ops++ % 2];
}

unsigned char *dynamic_shared() { return scheduler->dynamic.data(); }

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
