//! Causal attention on the CPU, forward and backward, the two ways `model.attention` offers:
//! the chunked matmuls (`helix_ops::causal_attention`, bias mask, candle's autograd) and the
//! FlashAttention tiles (`helix::kernels::flash`, segment ids), at one SmolLM2-135M layer's
//! shape in the `smollm2_step` bench (4 rows × 256 tokens, 9 query heads, 3 KV heads, head_dim
//! 64), f32, side by side in one run.
//!
//!     cargo bench --bench cpu_attention

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use helix::kernels::flash::{attention, attention_backward, Segments};
use helix::ops::{attention_bias, causal_attention, MaskSpec};

const BATCH: usize = 4;
const SEQ: usize = 256;
const Q_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn cpu_attention(c: &mut Criterion) {
    // What helix-train does on the CPU (helix_train::device).
    helix::train::freed_memory::keep_freed_host_memory();
    let dev = Device::Cpu;
    let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).expect("randn");
    let q = randn(&[BATCH, Q_HEADS, SEQ, HEAD_DIM]);
    let k = randn(&[BATCH, KV_HEADS, SEQ, HEAD_DIM]);
    let v = randn(&[BATCH, KV_HEADS, SEQ, HEAD_DIM]);
    let mut g = c.benchmark_group("cpu_attention");
    g.sample_size(20).warm_up_time(Duration::from_secs(2));

    let spec = MaskSpec {
        batch: BATCH,
        q_len: SEQ,
        kv_len: SEQ,
        ..Default::default()
    };
    let bias = attention_bias(&spec, DType::F32, &dev).expect("bias");
    let (qv, kv, vv) = (
        Var::from_tensor(&q).expect("var"),
        Var::from_tensor(&k).expect("var"),
        Var::from_tensor(&v).expect("var"),
    );
    let dy = randn(&[BATCH, Q_HEADS, SEQ, HEAD_DIM]);
    g.bench_function("chunked_forward_backward", |b| {
        b.iter(|| {
            let y = causal_attention(&qv, &kv, &vv, &bias).expect("forward");
            let grads = (y * &dy)
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward());
            grads.expect("backward")
        })
    });

    let segments = Segments::new(vec![0; BATCH * SEQ], BATCH, &dev).expect("segments");
    // The output's gradient heads merged, [B, S, H, D], as the kernels take it.
    let dy = randn(&[BATCH, SEQ, Q_HEADS, HEAD_DIM]);
    g.bench_function("flash_forward_backward", |b| {
        b.iter(|| {
            let (out, lse) = attention(&q, &k, &v, &segments).expect("forward");
            attention_backward((&q, &k, &v), &segments, (&out, &lse), &dy).expect("backward")
        })
    });
    g.finish();
}

criterion_group!(benches, cpu_attention);
criterion_main!(benches);
