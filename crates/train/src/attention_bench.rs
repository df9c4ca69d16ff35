//! `helix-train attention-bench`: causal attention alone, forward and backward timed apart, at
//! one shape (default: a Llama-2-7B layer's, 32 heads of 128 over 2,048 tokens, bf16), through
//! `helix_kernels::flash`: the CUDA kernels on a GPU, the CPU's tiles otherwise. The inputs are
//! random and laid out as the model hands them over (q, k, v views of [B, S, heads, D]
//! projections; one document per row). scripts/gpu_attention_pytorch.py times PyTorch's
//! `scaled_dot_product_attention` at the same shape with the same FLOP count, and
//! scripts/gpu-bench.sh prints the two side by side.
//!
//! FLOPs count the causal half of the matmuls, as FlashAttention's own benchmarks do: the
//! forward's q kᵀ and P v are 4·B·Hq·D·S(S+1)/2, the backward's five matmuls 2.5 times that.
//! The recomputed scores of the dq kernel are not counted.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use helix_kernels::flash::{self, ForwardTile, Segments};
use serde_json::json;

/// The shape and the timing of one run.
#[derive(Clone, Debug)]
pub struct AttentionBenchOptions {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Query rows a block of the GPU's forward kernel takes (the CPU's tiles ignore it).
    pub forward_tile: ForwardTile,
    pub warmup: usize,
    pub repeats: usize,
}

/// Median times (ms) and the TFLOP/s they give.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionTimes {
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub forward_tflops: f64,
    pub backward_tflops: f64,
    /// Forward and backward together.
    pub tflops: f64,
}

/// FLOPs of the forward and of the backward at this shape (the module's count).
pub fn attention_flops(o: &AttentionBenchOptions) -> (f64, f64) {
    let pairs = (o.seq * (o.seq + 1) / 2) as f64;
    let forward = 4.0 * (o.batch * o.q_heads * o.head_dim) as f64 * pairs;
    (forward, 2.5 * forward)
}

/// Times `repeats` forwards and backwards on `device` after `warmup` untimed ones.
pub fn attention_bench(device: &Device, o: &AttentionBenchOptions) -> Result<AttentionTimes> {
    let AttentionBenchOptions {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        seq: s,
        head_dim: d,
        dtype,
        ..
    } = *o;
    if b == 0 || hq == 0 || hkv == 0 || s == 0 || d == 0 {
        bail!("attention-bench: every dimension must be at least 1 (batch {b}, heads {hq}, kv heads {hkv}, seq {s}, head dim {d})");
    }
    if hq % hkv != 0 {
        bail!("attention-bench: --heads {hq} is not a multiple of --kv-heads {hkv}");
    }
    if o.repeats == 0 {
        bail!("attention-bench: --repeats must be at least 1");
    }
    if device.is_cuda() && !flash::gpu_supports(dtype, d) {
        bail!(
            "attention-bench: the CUDA kernels take bf16 or f16 at head dim {:?}, not {dtype:?} at {d}",
            flash::GPU_HEAD_DIMS
        );
    }
    // Drawn on the CPU (a GPU build need not load cuRAND) in the projections' layout,
    // [B, S, heads, D].
    let random = |heads: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (b, s, heads, d), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    // q, k, v read heads first through strides, as attention reads the projections.
    let (q, k, v) = (
        random(hq)?.transpose(1, 2)?,
        random(hkv)?.transpose(1, 2)?,
        random(hkv)?.transpose(1, 2)?,
    );
    let dout = random(hq)?;
    let segments = Segments::new(vec![0; b * s], b, device)?;

    let mut forward_ms = Vec::with_capacity(o.repeats);
    let mut backward_ms = Vec::with_capacity(o.repeats);
    for i in 0..o.warmup + o.repeats {
        device.synchronize()?;
        let t = Instant::now();
        let (out, lse) = flash::attention_with(&q, &k, &v, &segments, o.forward_tile)
            .context("attention forward")?;
        device.synchronize()?;
        let forward = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let grads = flash::attention_backward((&q, &k, &v), &segments, (&out, &lse), &dout)
            .context("attention backward")?;
        device.synchronize()?;
        let backward = t.elapsed().as_secs_f64() * 1e3;
        drop(grads);
        if i >= o.warmup {
            forward_ms.push(forward);
            backward_ms.push(backward);
        }
    }
    let forward_ms = crate::progress::median(forward_ms).context("no timed repeat")?;
    let backward_ms = crate::progress::median(backward_ms).context("no timed repeat")?;
    let (f, bw) = attention_flops(o);
    let tflops = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;
    Ok(AttentionTimes {
        forward_ms,
        backward_ms,
        forward_tflops: tflops(f, forward_ms),
        backward_tflops: tflops(bw, backward_ms),
        tflops: tflops(f + bw, forward_ms + backward_ms),
    })
}

/// The forward kernel asked for: its query rows a block, or "auto" (chosen by the grid).
fn forward_rows_label(tile: ForwardTile) -> &'static str {
    match tile {
        ForwardTile::Auto => "auto",
        ForwardTile::Rows64 => "64",
        ForwardTile::Rows128 => "128",
    }
}

/// A rate in TFLOP/s, or GFLOP/s below one TFLOP/s (a CPU's).
fn rate(tflops: f64) -> String {
    match tflops >= 1.0 {
        true => format!("{tflops:.1} TFLOP/s"),
        false => format!("{:.1} GFLOP/s", tflops * 1e3),
    }
}

/// Runs [`attention_bench`] and prints one line, or one JSON object with `json`.
pub fn print_attention_bench(device: &Device, o: &AttentionBenchOptions, json: bool) -> Result<()> {
    let t = attention_bench(device, o)?;
    let implementation = match flash::runs_on_gpu(device, o.dtype, o.head_dim) {
        true => "flash_cuda",
        false => "flash_cpu",
    };
    if json {
        println!(
            "{}",
            json!({
                "implementation": implementation,
                "batch": o.batch, "q_heads": o.q_heads, "kv_heads": o.kv_heads,
                "seq": o.seq, "head_dim": o.head_dim, "dtype": format!("{:?}", o.dtype).to_lowercase(),
                "forward_rows_per_block": forward_rows_label(o.forward_tile),
                "forward_ms": t.forward_ms, "backward_ms": t.backward_ms,
                "forward_tflops": t.forward_tflops, "backward_tflops": t.backward_tflops,
                "tflops": t.tflops,
            })
        );
    } else {
        println!(
            "causal attention ({implementation}{}), {} x {} tokens, {} heads over {} KV heads of {}, {:?}: \
             forward {:.3} ms ({}), backward {:.3} ms ({}), together {} (median of {})",
            match implementation {
"flash_cuda" => format!(", forward query rows a block: {}", forward_rows_label(o.forward_tile)),
                _ => String::new(),
            },
            o.batch, o.seq, o.q_heads, o.kv_heads, o.head_dim, o.dtype,
            t.forward_ms,
            rate(t.forward_tflops),
            t.backward_ms,
            rate(t.backward_tflops),
            rate(t.tflops),
            o.repeats
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(seq: usize) -> AttentionBenchOptions {
        AttentionBenchOptions {
            batch: 2,
            q_heads: 4,
            kv_heads: 2,
            seq,
            head_dim: 16,
            dtype: DType::F32,
            forward_tile: ForwardTile::default(),
            warmup: 0,
            repeats: 3,
        }
    }

    #[test]
    fn flops_count_the_causal_half_of_each_matmul() {
        // 3 tokens: 6 (query, key) pairs; each pair is a D-long dot product in q kᵀ and in P v.
        let (f, b) = attention_flops(&options(3));
        assert_eq!(f, 2.0 * 4.0 * 6.0 * (2.0 * 16.0) * 2.0);
        assert_eq!(b, 2.5 * f);
    }

    #[test]
    fn times_the_cpu_tiles_and_rejects_bad_shapes() {
        let t = attention_bench(&Device::Cpu, &options(70)).unwrap();
        assert!(t.forward_ms > 0.0 && t.backward_ms > 0.0, "{t:?}");
        let expected = attention_flops(&options(70));
        let together = (expected.0 + expected.1) / ((t.forward_ms + t.backward_ms) * 1e-3) / 1e12;
        assert!((t.tflops - together).abs() <= 1e-9 * together, "{t:?}");
        let bad = AttentionBenchOptions {
            kv_heads: 3,
            ..options(8)
        };
        let err = attention_bench(&Device::Cpu, &bad).unwrap_err().to_string();
        assert!(err.contains("--kv-heads 3"), "{err}");
    }
}
