//! Umbrella crate of the helix workspace: re-exports the crates so the top-level `tests/` and
//! `benches/` can reach every part. The `helix-train` binary lives in `crates/train`.

pub use helix_ckpt as ckpt;
pub use helix_data as data;
pub use helix_kernels as kernels;
pub use helix_model as model;
pub use helix_ops as ops;
pub use helix_parallel as parallel;
pub use helix_peft as peft;
pub use helix_train as train;
