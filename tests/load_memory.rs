//! Loading keeps one copy of the weights in memory: the checkpoint is memory-mapped (file pages,
//! which the kernel can drop) and each tensor is copied once into its own buffer. Gated on the
//! real SmolLM2 directory (HELIX_SMOLLM2_DIR), whose f32 weights are 538 MB.

use candle_core::{DType, Device};
use helix::model::ModelDir;

/// Anonymous (non-file) resident memory of this process, in bytes.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn loading_holds_one_copy_of_the_weights() -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("HELIX_SMOLLM2_DIR") else {
        eprintln!("skipped: set HELIX_SMOLLM2_DIR (see .ci/run)");
        return Ok(());
    };
    let before = rss_anon();
    let model_dir = ModelDir::open(std::path::Path::new(&dir))?;
    let weight_bytes: u64 = model_dir.config.num_parameters() as u64 * 4;
    let model = model_dir.load_inference(DType::F32, &Device::Cpu)?;
    let grown = rss_anon().saturating_sub(before);
    println!(
        "weights {:.0} MB, anonymous memory grew by {:.0} MB ({:.2}x)",
        weight_bytes as f64 / 1e6,
        grown as f64 / 1e6,
        grown as f64 / weight_bytes as f64
    );
    assert!(
        grown as f64 <= 1.15 * weight_bytes as f64,
        "loading took {grown} bytes for {weight_bytes} of weights"
    );
    drop(model);
    Ok(())
}
