//! The attention cases of [`super::run`]: the attention softmax's three kernels and the whole
//! FlashAttention forward and backward, each against the same written with candle ops in f32.

use candle_core::{DType, Result, Tensor, Var, D};

use super::{gradients_of, Case, Implementation, Outputs, SeededInput};

/// The three forward-only kernels of `attention_softmax` on scores [B, H, R, K] under a causal
/// mask (query r sees keys up to K − R + r): the row statistics (max, Σ exp), the probabilities and the
/// scores' gradient, against the same written with candle ops in f32.
pub(super) fn attention_softmax(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
    let dims = &case.dims[..];
    let (b, h, r, k) = (dims[0], dims[1], dims[2], dims[3]);
    let s = input(8, dims, 40.0)?;
    let dp = input(9, dims, 1.0)?;
    let d = input(10, &[b, h, r, 1], 0.5)?.to_dtype(DType::F32)?;
    let blocked: Vec<f32> = (0..b * r * k)
        .map(|i| match (i % k) <= k - r + (i / k) % r {
            true => 0.0,
            false => -1e30,
        })
        .collect();
    let bias = Tensor::from_vec(blocked, (b, 1, r, k), s.device())?.to_dtype(case.dtype)?;
    // A head dimension of 128: logits within ±3.5, far from a uniform softmax.
    let scale = 1.0 / 128f64.sqrt();
    let (stats, p, ds) = match implementation {
        Implementation::Fused => {
            use crate::attention_softmax::{probs, row_stats, softmax_grad};
            let stats = row_stats(&s, &bias, scale)?;
            let p = probs(&s, &bias, &stats, scale)?;
            let ds = softmax_grad(&p, &dp, &d, scale)?;
            (stats, p, ds)
        }
        Implementation::Unfused => {
            let v =
                (s.to_dtype(DType::F32)? * scale)?.broadcast_add(&bias.to_dtype(DType::F32)?)?;
            let max = v.max_keepdim(D::Minus1)?;
            let exp = v.broadcast_sub(&max)?.exp()?;
            let sum = exp.sum_keepdim(D::Minus1)?;
            let p = exp.broadcast_div(&sum)?.to_dtype(case.dtype)?;
            let ds = ((p.to_dtype(DType::F32)? * dp.to_dtype(DType::F32)?.broadcast_sub(&d)?)?
                * scale)?
                .to_dtype(case.dtype)?;
            (Tensor::cat(&[&max, &sum], D::Minus1)?, p, ds)
        }
    };
    Outputs::f32_on_cpu([("stats", stats), ("p", p), ("ds", ds)])
}

/// Causal attention over packed rows with `crate::flash` (CUDA kernels or the CPU's tiles,
/// `crate::flash_cpu`) against the whole score matrix written with candle ops in f32 and differentiated
/// by candle's autograd: output, log-sum-exp and the gradients of q, k and v for a seeded
/// output gradient. Row b holds b + 2 documents; the last row ends in padding (a segment of its
/// own).
pub(super) fn flash_attention(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
    let [b, hq, hkv, s, d] = case.dims[..] else {
        candle_core::bail!("flash_attention: dims {:?}", case.dims);
    };
    // Scores of a few units: a softmax far from uniform.
    let q = input(31, &[b, hq, s, d], 2.0)?;
    let k = input(32, &[b, hkv, s, d], 2.0)?;
    let v = input(33, &[b, hkv, s, d], 1.0)?;
    let dout = input(34, &[b, s, hq, d], 1.0)?;
    let dev = q.device().clone();
    let segments = flash_segments(b, s);
    // Non-decreasing ids: the CUDA kernels skip the key tiles of earlier documents.
    let seg = crate::flash::Segments::new(segments.clone(), b, &dev)?;
    let (out, lse, dq, dk, dv) = match implementation {
        Implementation::Fused => {
            // Each forward kernel by name (the default, Auto, picks by the grid, and would take
            // the 64-row one at these shapes): 128 query rows a block, or 64.
            let tile = match case.op {
                "flash_attention_rows64" => crate::flash::ForwardTile::Rows64,
                _ => crate::flash::ForwardTile::Rows128,
            };
            let (out, lse) = crate::flash::attention_with(&q, &k, &v, &seg, tile)?;
            let (dq, dk, dv) =
                crate::flash::attention_backward((&q, &k, &v), &seg, (&out, &lse), &dout)?;
            (out, lse, dq, dk, dv)
        }
        Implementation::Unfused => {
            let (qv, kv, vv) = (
                Var::from_tensor(&q)?,
                Var::from_tensor(&k)?,
                Var::from_tensor(&v)?,
            );
            let repeat = |t: &Tensor| {
                t.to_dtype(DType::F32)?
                    .unsqueeze(2)?
                    .broadcast_as((b, hkv, hq / hkv, s, d))?
                    .reshape((b, hq, s, d))
            };
            let bias: Vec<f32> = (0..b * s * s)
                .map(|x| {
                    let (row, i, j) = (x / (s * s), x / s % s, x % s);
                    let same = segments[row * s + i] == segments[row * s + j];
                    match j <= i && same {
                        true => 0.0,
                        false => -1e30,
                    }
                })
                .collect();
            let bias = Tensor::from_vec(bias, (b, 1, s, s), &dev)?;
            let scores = (qv
                .as_tensor()
                .to_dtype(DType::F32)?
                .matmul(&repeat(&kv)?.t()?)?
                / (d as f64).sqrt())?
            .broadcast_add(&bias)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let exp = scores.broadcast_sub(&max)?.exp()?;
            let sum = exp.sum_keepdim(D::Minus1)?;
            let lse = (sum.log()? + &max)?.squeeze(D::Minus1)?;
            let p = exp.broadcast_div(&sum)?;
            let out = p
                .matmul(&repeat(&vv)?)?
                .transpose(1, 2)?
                .to_dtype(case.dtype)?;
            let [dq, dk, dv] = gradients_of(&out, &dout, [&qv, &kv, &vv], "flash_attention")?;
            (out, lse.detach(), dq, dk, dv)
        }
    };
    Outputs::f32_on_cpu([
        ("out", out),
        ("lse", lse),
        ("dq", dq),
        ("dk", dk),
        ("dv", dv),
    ])
}

/// The FlashAttention case's segment ids, [b, s]: row r holds r + 2 documents and the last
/// row ends in padding (an id of its own); non-decreasing in every row.
pub fn flash_segments(b: usize, s: usize) -> Vec<u32> {
    (0..b)
        .flat_map(|row| {
            (0..s).map(move |i| match row + 1 == b && i >= s - s / 5 {
                true => u32::MAX,
                false => (i * (row + 2) / s) as u32,
            })
        })
        .collect()
}
