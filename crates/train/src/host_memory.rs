//! How a CPU run's allocator treats freed memory.
//!
//! A training step on the CPU allocates and frees the same large activation and gradient
//! buffers every step. glibc's malloc serves blocks above 128 KiB with fresh `mmap`s and hands
//! freed heap tops back to the kernel, so each step faults in and zeroes every page of them
//! again: on SmolLM2-135M (4 × 256 tokens) that was 14 % of the step. Keeping freed memory in
//! the process turns those into reuse; the peak resident size stays what the step needs.

use std::sync::Once;

/// Serve every allocation from malloc's heap and never trim it, once per process. A no-op
/// outside glibc (musl, macOS), whose allocators have no such knobs.
pub fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets allocator parameters; it is called before the step's
        // threads allocate (and glibc takes its own lock for it in any case).
        unsafe {
            // 0 mmapped blocks: large buffers come from (and return to) the heap.
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // Never give the heap's free top back to the kernel.
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}
