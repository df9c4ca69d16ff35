//! Running the CPU references' row loops compiled for AVX2 + FMA where the CPU has them.
//!
//! A release build targets baseline x86-64 (SSE2), so the loops vectorise 4 wide at most and
//! [`crate::exp::exp`] pays for conversions SSE2 lacks. The row bodies are inlined into a
//! function compiled with AVX2 enabled, chosen once at run time (as the gemm crate chooses its
//! matmul kernels). Results do not depend on the choice: Rust never contracts a · b + c into
//! an FMA, and the reductions keep their lane order either way.

/// `f()`, compiled with AVX2 and FMA enabled when this CPU has both. Only code inlined into
/// the AVX2 function gets the features: mark `f` `#[inline(always)]` (a closure that is not
/// inlined is compiled for SSE2, as a row loop of `low_rank` was).
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU was just found to have the features `run` is compiled for.
        return unsafe { run(f) };
    }
    f()
}
