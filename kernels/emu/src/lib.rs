//! The CUDA kernels of kernels/cuda run on the CPU: build.rs compiles the .cu sources as host
//! C++ against the emulator's stand-ins for CUDA (cuda_emu.h: threads, __syncthreads, warp
//! shuffles, ldmatrix and mma.sync lane by lane as the PTX ISA lays out their fragments), and
//! [`launch`] runs a kernel over a grid as CUDA would, each block's threads as fibers. The
//! tests (tests/*.rs) launch every kernel with the grids of [`helix_kernels::launch`], the ones
//! the CUDA launchers use, and compare what it writes with the CPU references. Under
//! AddressSanitizer (when the compiler has it) a read or write past a buffer, a shared array
//! or the dynamic shared memory stops the test, as `compute-sanitizer` memcheck would on a GPU.
//!
//! What a GPU run adds: the real tensor cores' summation order, timing, and the memory model.
//! `helix-train kernel-check` and scripts/gpu-check.sh remain the check on the device.

use std::ffi::c_void;

use helix_kernels::launch::Geometry;

pub mod kernels;

extern "C" {
    fn helix_emu_launch(
        grid: *const u32,
        block: *const u32,
        shared_bytes: usize,
        body: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
    ) -> i32;
}

extern "C" fn trampoline<F: Fn() + Sync>(ctx: *mut c_void) {
    // SAFETY: ctx is the &F that `launch` passed and keeps alive until every thread is joined.
    let body = unsafe { &*(ctx as *const F) };
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
        // Unwinding into C++ is undefined: stop here, as a GPU fault stops a kernel.
        eprintln!("helix-emu: a kernel thread panicked");
        std::process::abort();
    }
}

/// Runs `thread` in every thread of the grid: `threadIdx`, `blockIdx`, `blockDim` and
/// `gridDim` are set for the kernel it calls, and a block's threads run together (blocks one
/// after another). `thread` calls one kernel entry point of [`kernels`] with its arguments.
pub fn launch<F: Fn() + Sync>(geometry: Geometry, thread: F) {
    let Geometry {
        grid,
        block,
        shared_bytes,
    } = geometry;
    let grid = [grid.0, grid.1, grid.2];
    let block = [block.0, block.1, block.2];
    // SAFETY: the arrays and `thread` outlive the call, which joins every thread it starts.
    let rc = unsafe {
        helix_emu_launch(
            grid.as_ptr(),
            block.as_ptr(),
            shared_bytes as usize,
            trampoline::<F>,
            &thread as *const F as *mut c_void,
        )
    };
    assert_eq!(
        rc, 0,
        "the emulator takes 1-D blocks of 1 to 1,024 threads: {block:?}"
    );
}

/// A raw pointer that may be shared by the emulated threads, as a kernel argument is shared
/// by a GPU's threads.
#[derive(Clone, Copy, Debug)]
pub struct Ptr<T>(pub *mut T);

// SAFETY: the kernels decide which thread touches which element, as on a GPU; the emulator
// only hands the same address to every thread.
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    /// The address (a method, so a closure captures the whole `Ptr`, which is `Sync`).
    pub fn get(&self) -> *mut T {
        self.0
    }
    pub fn of(v: &mut [T]) -> Self {
        Self(v.as_mut_ptr())
    }
    pub fn read(v: &[T]) -> Self {
        Self(v.as_ptr() as *mut T)
    }
}
