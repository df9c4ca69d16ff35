//! `helix-train kernel-check`: the fused kernels on this build's device against their CPU
//! references (on a CPU build, the references against the unfused ops), forward and every
//! gradient, f32 and bf16, and on a GPU each op's fused and unfused step time side by side.
//! scripts/gpu-check.sh runs it on the device.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use helix_ops::kernel_check::{cases, compare, run, Case, Implementation};

/// Prints one line per compared tensor and returns whether every one is within tolerance;
/// for the cases of the ops in `only` alone, when it names any.
pub fn kernel_check(device: &Device, repeats: usize, only: &[String]) -> Result<bool> {
    let mut selected = cases();
    if !only.is_empty() {
        let mut ops: Vec<&str> = Vec::new();
        for c in &selected {
            if !ops.contains(&c.op) {
                ops.push(c.op);
            }
        }
        if let Some(op) = only.iter().find(|op| !ops.contains(&op.as_str())) {
            bail!(
                "kernel-check --op {op}: no such op (ops: {})",
                ops.join(", ")
            );
        }
        selected.retain(|c| only.iter().any(|op| op == c.op));
    }
    let on_gpu = !device.is_cpu();
    println!(
        "{} against the CPU references (tolerance: max |Δ| ≤ t · max |reference|)",
        match on_gpu {
            true => "CUDA kernels",
            false => "no GPU in this build: CPU references against the unfused ops",
        }
    );
    let mut all_ok = true;
    for case in selected {
        let want = match on_gpu {
            true => run(&case, Implementation::Fused, &Device::Cpu)?,
            false => run(&case, Implementation::Unfused, &Device::Cpu)?,
        };
        let got = run(&case, Implementation::Fused, device)?;
        let t = case.tolerance();
        for (name, diff, scale) in compare(&want, &got)? {
            let ok = diff <= t * scale && scale > 0.0;
            all_ok &= ok;
            println!(
                "{:<40} {:<7} max |Δ| {diff:9.3e} of {scale:9.3e} (t {t:.1e}) {}",
                case.label(),
                name,
                if ok { "ok" } else { "FAILED" }
            );
        }
        if on_gpu && repeats > 0 {
            let fused = median_ms(&case, Implementation::Fused, device, repeats)?;
            let unfused = median_ms(&case, Implementation::Unfused, device, repeats)?;
            println!(
                "{:<40} forward + backward: fused {fused:.3} ms, unfused {unfused:.3} ms ({:.2}×)",
                case.label(),
                unfused / fused
            );
        }
    }
    Ok(all_ok)
}

/// Median wall time of one forward + backward (inputs made and results copied back included,
/// the same for both implementations).
fn median_ms(case: &Case, imp: Implementation, device: &Device, repeats: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(repeats);
    run(case, imp, device)?;
    for _ in 0..repeats {
        let t = Instant::now();
        run(case, imp, device)?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    crate::progress::median(times).context("no timed repeat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_selects_its_cases_and_an_unknown_one_lists_them() {
        assert!(kernel_check(&Device::Cpu, 0, &["rope".into(), "swiglu".into()]).unwrap());
        let err = kernel_check(&Device::Cpu, 0, &["rope".into(), "ropes".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--op ropes") && err.contains("flash_attention"),
            "{err}"
        );
    }
}
