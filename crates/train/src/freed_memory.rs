//! How a run's allocators treat freed memory: they keep it.
//!
//! A training step allocates and frees the same large activation and gradient buffers every
//! step. Both allocators a run uses would otherwise hand freed memory back to the operating
//! system and map it again on the next step:
//! - on the CPU, glibc's malloc serves blocks above 128 KiB with fresh `mmap`s and trims freed
//!   heap tops, so each step faults in and zeroes every page again: on SmolLM2-135M (4 × 256
//!   tokens) that was 14 % of the step;
//! - on the GPU, cudarc allocates with `cuMemAllocAsync` from the device's memory pool, whose
//!   release threshold is 0 by default: every synchronisation (the loss read each step, the
//!   gradient norm, a label check) returns all the pool's unused memory to the driver, and the
//!   next step's allocations map (and the driver clears) gigabytes again. PyTorch's caching
//!   allocator never returns memory; with the threshold at its maximum the pool does the same.
//!
//! In both cases the peak a run holds stays what its step needs.

use std::sync::Once;

/// Serve every allocation from malloc's heap and never trim it, once per process. A no-op
/// outside glibc (musl, macOS), whose allocators have no such knobs.
pub fn keep_freed_host_memory() {
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

/// Keep the memory `cuda`'s stream-ordered allocations free in the device's memory pool
/// instead of releasing it at each synchronisation. A no-op where the driver has no memory
/// pools (cudarc then allocates with `cuMemAlloc`, which keeps nothing either way).
#[cfg(feature = "cuda")]
pub fn keep_freed_gpu_memory(cuda: &candle_core::CudaDevice) -> anyhow::Result<()> {
    use candle_core::cuda::cudarc::driver::{result, sys};
    let stream = cuda.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return Ok(());
    }
    context
        .bind_to_thread()
        .map_err(|e| anyhow::anyhow!("binding the CUDA context: {e:?}"))?;
    let mut threshold = u64::MAX;
    // SAFETY: the device is the context's own; the attribute's value is a u64, as the driver
    // documents for CU_MEMPOOL_ATTR_RELEASE_THRESHOLD.
    unsafe {
        let pool = result::device::get_mem_pool(context.cu_device())
            .map_err(|e| anyhow::anyhow!("reading the GPU's memory pool: {e:?}"))?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| anyhow::anyhow!("setting the GPU memory pool's release threshold: {e:?}"))?;
    }
    Ok(())
}
