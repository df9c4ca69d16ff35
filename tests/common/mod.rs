//! Helpers shared by the workspace integration tests (each test file includes this module).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;

/// A committed fixture directory: tests/fixtures/<name>.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// max |t| over every element, as f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|a| a.to_dtype(candle_core::DType::F32))
        .and_then(|a| a.to_scalar::<f32>())
        .expect("max |t| of a tensor")
}
