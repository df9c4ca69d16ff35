//! What the emulator's tests share: seeded inputs and the comparison kernel-check uses.

#![allow(dead_code)]

use candle_core::DType;
use half::{bf16, f16};

/// Seeded values in [-scale, scale): kernel-check's generator (helix_kernels::check::seeded).
pub fn seeded(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    helix_kernels::check::seeded(seed, n)
        .into_iter()
        .map(|x| (x * f64::from(scale)) as f32)
        .collect()
}

/// A storage type of the kernels, to and from f32.
pub trait Element: Copy + Default + Send + Sync + 'static {
    const NAME: &'static str;
    const DTYPE: DType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    const DTYPE: DType = DType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    const DTYPE: DType = DType::BF16;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    const DTYPE: DType = DType::F16;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Values stored as T (rounded) and those same values in f32, for the reference.
pub fn stored<T: Element>(values: &[f32]) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = values.iter().map(|&v| T::from_f32(v)).collect();
    let f = t.iter().map(|v| v.to_f32()).collect();
    (t, f)
}

pub fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// max |got − want| / max |want|, as kernel-check measures a kernel against its reference;
/// panics naming `what` when it is above `tolerance` or when a value is not finite.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut diff = 0f32;
    let mut scale = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() == w.is_finite(),
            "{what}: element {i} is {g}, reference {w}"
        );
        if w.is_finite() {
            diff = diff.max((g - w).abs());
            scale = scale.max(w.abs());
        }
    }
    let rel = diff / scale.max(f32::MIN_POSITIVE);
    eprintln!("{what}: max |diff| {diff:.3e} of max |ref| {scale:.3e} ({rel:.2e})");
    assert!(
        rel <= tolerance,
        "{what}: {rel:.3e} relative to the reference, above {tolerance:.1e}"
    );
    rel
}

/// kernel-check's tolerance for a storage type: f32 sums in another order, or two units in
/// the last place of a 16-bit result.
pub fn tolerance<T: Element>() -> f32 {
    helix_kernels::check::tolerance(T::DTYPE)
}
