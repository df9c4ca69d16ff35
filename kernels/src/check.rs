//! Comparing implementations of the fused ops on seeded inputs: the fused kernels on one device
//! against the CPU references (what `helix-train kernel-check` runs on the GPU), or against the
//! unfused definition written with plain candle ops (the CPU tests). Forward values and every
//! input gradient are compared, for f32 and bf16.

use candle_core::{DType, Device, Result, Tensor, Var, D};

/// Which implementation computes an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// This crate's custom op (CUDA kernel or CPU reference, by device).
    Fused,
    /// The op written with plain candle ops, each stored in the dtype as PyTorch's are.
    Unfused,
}

/// One op on one shape and dtype.
#[derive(Clone, Debug)]
pub struct Case {
    pub op: &'static str,
    pub dtype: DType,
    pub dims: Vec<usize>,
}

impl Case {
    pub fn label(&self) -> String {
        format!("{} {:?} {:?}", self.op, self.dtype, self.dims)
    }
}

/// The cases compared: each op at a small odd shape and at Llama-2-7B's widths.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for (op, dims) in [
            ("rms_norm", vec![3, 5, 67]),
            ("rms_norm", vec![2, 256, 4096]),
            ("swiglu", vec![3, 7, 33]),
            ("swiglu", vec![2, 256, 11008]),
            ("swiglu_backward_and_output", vec![3, 7, 33]),
            ("swiglu_backward_and_output", vec![2, 256, 11008]),
            ("rope", vec![2, 3, 5, 8]),
            ("rope", vec![2, 32, 256, 128]),
            ("rope_merged", vec![2, 3, 5, 8]),
            ("rope_merged", vec![2, 32, 256, 128]),
            ("attention_softmax", vec![2, 3, 5, 37]),
            ("attention_softmax", vec![1, 32, 128, 2048]),
            ("cross_entropy", vec![5, 37]),
            ("cross_entropy", vec![256, 32000]),
        ] {
            out.push(Case { op, dtype, dims });
        }
    }
    // LoRA's rank-r path: activations in the model's dtype, adapters in f32; [rows, in, out,
    // r]: a shape of remainders (rows past a 64-row block, columns past the CPU loops' 8- and
    // 32-wide passes, ranks past a group of four), then a 7B projection's, at rank 20 (ranks
    // past 16 take a second block or pass of each CUDA kernel) and as the 7B LoRA bench runs
    // it (2,048 rows, rank 8).
    for dtype in [DType::F32, DType::BF16] {
        for dims in [
            vec![7, 13, 11, 3],
            vec![70, 45, 37, 6],
            vec![1024, 576, 1536, 8],
            vec![600, 4096, 11008, 20],
            vec![2048, 4096, 11008, 8],
        ] {
            out.push(Case {
                op: "low_rank",
                dtype,
                dims,
            });
        }
    }
    // Whole-attention FlashAttention: [batch, query heads, kv heads, seq, head_dim]; the CUDA
    // kernels take bf16 and f16 at head_dim 64 and 128. Sequences end mid-tile.
    for dtype in [DType::BF16, DType::F16] {
        for dims in [vec![2, 4, 2, 150, 64], vec![1, 8, 2, 600, 128]] {
            out.push(Case {
                op: "flash_attention",
                dtype,
                dims,
            });
        }
    }
    // AdamW over a list of parameters in one launch (the case's shape, a vector without
    // decay, a small matrix): f32 parameters, and bf16 ones with f32 masters.
    for dtype in [DType::F32, DType::BF16] {
        for dims in [vec![1001], vec![4096, 4096]] {
            out.push(Case {
                op: "adamw",
                dtype,
                dims,
            });
        }
    }
    // The gradients' sums of squares, over the case's shape and two smaller tensors.
    for dims in [vec![3, 1001], vec![4096, 4096]] {
        out.push(Case {
            op: "sum_squares",
            dtype: DType::F32,
            dims,
        });
    }
    out
}

/// The forward value and the input gradients, in f32 on the CPU.
pub struct Outputs {
    pub tensors: Vec<(&'static str, Tensor)>,
}

/// Runs `case` with `implementation` on `device`: seeded inputs (the same on every device),
/// forward, and backward of Σ y · r for a seeded r.
pub fn run(case: &Case, implementation: Implementation, device: &Device) -> Result<Outputs> {
    let dims = &case.dims[..];
    let input = |seed: u64, dims: &[usize], scale: f64| -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = seeded(seed, n)
            .into_iter()
            .map(|x| (x * scale) as f32)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?
            .to_dtype(case.dtype)?
            .to_device(device)
    };
    let var = |t: Tensor| Var::from_tensor(&t);
    let (y, vars, names): (Tensor, Vec<Var>, Vec<&'static str>) = match case.op {
        "rms_norm" => {
            let x = var(input(1, dims, 2.0)?)?;
            let w = var(input(2, &dims[dims.len() - 1..], 1.0)?)?;
            let y = match implementation {
                Implementation::Fused => crate::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?,
                Implementation::Unfused => unfused_rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?,
            };
            (y, vec![x, w], vec!["dx", "dw"])
        }
        "swiglu" => {
            let g = var(input(3, dims, 3.0)?)?;
            let u = var(input(4, dims, 1.0)?)?;
            let y = match implementation {
                Implementation::Fused => crate::swiglu(g.as_tensor(), u.as_tensor())?,
                Implementation::Unfused => (g.as_tensor().silu()? * u.as_tensor())?,
            };
            (y, vec![g, u], vec!["d gate", "d up"])
        }
        "rope" | "rope_merged" => {
            let (b, h, s, d) = (dims[0], dims[1], dims[2], dims[3]);
            let angles = input(6, &[b, 1, s, d / 2], 3.0)?.to_dtype(DType::F32)?;
            let angles = Tensor::cat(&[&angles, &angles], D::Minus1)?;
            let cos = angles.cos()?.to_dtype(case.dtype)?;
            let sin = angles.sin()?.to_dtype(case.dtype)?;
            match case.op {
                "rope" => {
                    let x = var(input(5, dims, 1.0)?)?;
                    let y = match implementation {
                        Implementation::Fused => crate::rope(x.as_tensor(), &cos, &sin)?,
                        Implementation::Unfused => crate::unfused::rope(x.as_tensor(), &cos, &sin)?,
                    };
                    (y, vec![x], vec!["dx"])
                }
                // As attention runs it: x the heads of a projection's [B, S, H · D] output
                // (a strided view), rotated into heads merged [B, S, H, D].
                _ => {
                    let x = var(input(5, &[b, s, h, d], 1.0)?)?;
                    let heads = x.as_tensor().transpose(1, 2)?;
                    let y = match implementation {
                        Implementation::Fused => crate::rope_merging_heads(&heads, &cos, &sin)?,
                        Implementation::Unfused => crate::unfused::rope(&heads, &cos, &sin)?
                            .transpose(1, 2)?
                            .contiguous()?,
                    };
                    (y, vec![x], vec!["dx"])
                }
            }
        }
        "attention_softmax" => return attention_softmax(case, implementation, &input),
        "cross_entropy" => return cross_entropy(case, implementation, &input),
        "adamw" => return adamw(case, implementation, &input),
        "sum_squares" => return sum_squares(case, implementation, &input),
        "low_rank" => return low_rank(case, implementation, &input),
        "swiglu_backward_and_output" => {
            return swiglu_backward_and_output(case, implementation, &input)
        }
        "flash_attention" => return flash_attention(case, implementation, &input),
        other => candle_core::bail!("no op {other}"),
    };
    let r = input(7, y.dims(), 1.0)?.to_dtype(DType::F32)?;
    let grads = (y.to_dtype(DType::F32)? * r)?.sum_all()?.backward()?;
    let mut tensors = vec![("y", y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)];
    for (v, name) in vars.iter().zip(names) {
        let g = grads
            .get(v)
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: no {name}", case.label())))?;
        tensors.push((name, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?));
    }
    Ok(Outputs { tensors })
}

/// Makes a case's seeded input: (seed, dims, scale) → a tensor in the case's dtype and device.
type SeededInput<'a> = dyn Fn(u64, &[usize], f64) -> Result<Tensor> + 'a;

/// The three forward-only kernels of `attention_softmax` on scores [B, H, R, K] under a causal
/// mask (query r sees keys up to K − R + r): the row statistics (max, Σ exp), the probabilities and the
/// scores' gradient, against the same written with candle ops in f32.
fn attention_softmax(
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
    let cpu = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    Ok(Outputs {
        tensors: vec![("stats", cpu(stats)?), ("p", cpu(p)?), ("ds", cpu(ds)?)],
    })
}

/// The two forward-only kernels of `cross_entropy` on logits [N, V]: the row statistics (max,
/// Σ exp, target logit) and the logits' gradient, with every third row's target held elsewhere
/// (−1) and every fifth row ignored (weight 0), against the same written with candle ops in f32.
fn cross_entropy(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
    let (n, v) = (case.dims[0], case.dims[1]);
    // Logits within ±12: a peaked softmax, as a trained LM head's is.
    let x = input(15, &case.dims, 12.0)?;
    let dev = x.device().clone();
    let (targets, weights) = cross_entropy_targets(n, v);
    let t = Tensor::new(targets.as_slice(), &dev)?;
    let w = Tensor::new(weights.as_slice(), &dev)?;
    let (stats, grad) = match implementation {
        Implementation::Fused => {
            use crate::cross_entropy::{logit_grad, logit_stats};
            let stats = logit_stats(&x, &t)?;
            let lse = (stats.narrow(1, 1, 1)?.log()? + stats.narrow(1, 0, 1)?)?;
            let terms = Tensor::cat(&[&lse, &w.unsqueeze(1)?], 1)?;
            let grad = logit_grad(&x, &t, &terms)?;
            (stats, grad)
        }
        Implementation::Unfused => {
            let x32 = x.to_dtype(DType::F32)?;
            let max = x32.max_keepdim(D::Minus1)?;
            let sum = x32.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
            let here = t.ge(0i64)?.to_dtype(DType::F32)?.unsqueeze(1)?;
            let picked = (x32.gather(&t.clamp(0i64, v as i64)?.unsqueeze(1)?, 1)? * &here)?;
            let lse = (sum.log()? + &max)?;
            let classes = Tensor::arange(0i64, v as i64, &dev)?.unsqueeze(0)?;
            let onehot = classes
                .broadcast_eq(&t.unsqueeze(1)?)?
                .to_dtype(DType::F32)?;
            let grad = (x32.broadcast_sub(&lse)?.exp()? - onehot)?
                .broadcast_mul(&w.unsqueeze(1)?)?
                .to_dtype(case.dtype)?;
            (Tensor::cat(&[&max, &sum, &picked], 1)?, grad)
        }
    };
    let cpu = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    // Each statistic on its own: Σ exp is two orders above the logits.
    let stat = |i: usize| cpu(stats.narrow(1, i, 1)?);
    Ok(Outputs {
        tensors: vec![
            ("row max", stat(0)?),
            ("Σ exp", stat(1)?),
            ("target logit", stat(2)?),
            ("dlogits", cpu(grad)?),
        ],
    })
}

/// The cross-entropy case's targets and row weights for `n` rows over `v` classes: every
/// third row's target held elsewhere (−1), every fifth row ignored (weight 0).
pub fn cross_entropy_targets(n: usize, v: usize) -> (Vec<i64>, Vec<f32>) {
    let targets = (0..n)
        .map(|r| match r % 3 {
            2 => -1,
            _ => ((r * 7919) % v) as i64,
        })
        .collect();
    let weights = (0..n).map(|r| f32::from(u8::from(r % 5 != 4))).collect();
    (targets, weights)
}

/// The gradients of `vars` under candle's autograd for the output gradient `dy` of `y` (the
/// backward of Σ y · dy in f32).
fn gradients_of<const N: usize>(
    y: &Tensor,
    dy: &Tensor,
    vars: [&Var; N],
    op: &str,
) -> Result<[Tensor; N]> {
    let grads = (y.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
    let mut out = Vec::with_capacity(N);
    for v in vars {
        let g = grads
            .get(v)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: no gradient")))?;
        out.push(g);
    }
    Ok(out.try_into().expect("one gradient per var"))
}

/// SwiGLU's backward with the forward's output from the same pass (what the decoder layer's
/// backward calls) against candle's autograd of silu(gate) · up and that product itself.
fn swiglu_backward_and_output(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
    let dims = &case.dims[..];
    let (g, u, dy) = (
        input(3, dims, 3.0)?,
        input(4, dims, 1.0)?,
        input(7, dims, 1.0)?,
    );
    let (dg, du, y) = match implementation {
        Implementation::Fused => crate::swiglu_backward_and_output(&g, &u, &dy)?,
        Implementation::Unfused => {
            let (gv, uv) = (Var::from_tensor(&g)?, Var::from_tensor(&u)?);
            let y = (gv.as_tensor().silu()? * uv.as_tensor())?;
            let [dg, du] = gradients_of(&y, &dy, [&gv, &uv], "swiglu")?;
            (dg, du, y)
        }
    };
    let cpu = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    Ok(Outputs {
        tensors: vec![("d gate", cpu(dg)?), ("d up", cpu(du)?), ("y", cpu(y)?)],
    })
}

/// LoRA's three rank-r products on x [n, k] and y [n, c] in the case's dtype, f32 A [r, k] and
/// Bᵀ [r, c]: x Aᵀ, y + l Bᵀ (also added to an acc [n, c] in the same pass) and the adapter
/// gradient lᵀ x, against the same as f32 candle matmuls.
fn low_rank(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
    let (n, k, c, r) = (case.dims[0], case.dims[1], case.dims[2], case.dims[3]);
    // x and y in the case's dtype, the adapters in f32 (as LoRA keeps them).
    let x = input(21, &[n, k], 1.0)?;
    let a = input(22, &[r, k], 0.1)?.to_dtype(DType::F32)?;
    let bt = input(23, &[r, c], 0.1)?.to_dtype(DType::F32)?;
    let y = input(24, &[n, c], 1.0)?;
    let acc = input(25, &[n, c], 1.0)?;
    let (low, sum, sum_to, grad) = match implementation {
        Implementation::Fused => {
            use crate::low_rank::{add_product, add_product_to, outer_sum, project};
            let low = project(&x, &a)?;
            (
                low.clone(),
                add_product(&y, &low, &bt)?,
                add_product_to(&acc, &y, &low, &bt)?,
                outer_sum(&low, &x)?,
            )
        }
        Implementation::Unfused => {
            let x32 = x.to_dtype(DType::F32)?;
            let low = x32.matmul(&a.t()?)?;
            let sum = (y.to_dtype(DType::F32)? + low.matmul(&bt)?)?.to_dtype(y.dtype())?;
            let sum_to = (&acc + &sum)?;
            let grad = low.t()?.matmul(&x32)?;
            (low, sum, sum_to, grad)
        }
    };
    let cpu = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    Ok(Outputs {
        tensors: vec![
            ("x Aᵀ", cpu(low)?),
            ("y + l Bᵀ", cpu(sum)?),
            ("acc + (y + l Bᵀ)", cpu(sum_to)?),
            ("lᵀ x", cpu(grad)?),
        ],
    })
}

/// Causal attention over packed rows with `crate::flash` (CUDA kernels or the CPU's tiles,
/// `crate::flash_cpu`) against the whole score matrix written with candle ops in f32 and differentiated
/// by candle's autograd: output, log-sum-exp and the gradients of q, k and v for a seeded
/// output gradient. Row b holds b + 2 documents; the last row ends in padding (a segment of its
/// own).
fn flash_attention(
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
            let (out, lse) = crate::flash::attention(&q, &k, &v, &seg)?;
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
    let cpu = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    Ok(Outputs {
        tensors: vec![
            ("out", cpu(out)?),
            ("lse", cpu(lse)?),
            ("dq", cpu(dq)?),
            ("dk", cpu(dk)?),
            ("dv", cpu(dv)?),
        ],
    })
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

/// Three AdamW steps of three parameters in the case's dtype (the case's shape, a vector that
/// takes no decay, a 3 × 5 matrix), the second step with weight decay and the third on
/// gradients scaled by 0.5 (clipping): every parameter, master and moment after them.
fn adamw(case: &Case, implementation: Implementation, input: &SeededInput<'_>) -> Result<Outputs> {
    let shapes = [case.dims.clone(), vec![37], vec![3, 5]];
    let names = [
        ["w", "m", "v", "master"],
        ["vector w", "vector m", "vector v", "vector master"],
        ["small w", "small m", "small v", "small master"],
    ];
    struct State {
        param: Var,
        master: Option<Tensor>,
        m: Tensor,
        v: Tensor,
    }
    let mut states = shapes
        .iter()
        .enumerate()
        .map(|(i, dims)| {
            let w = input(11 + 10 * i as u64, dims, 1.0)?;
            let master = match case.dtype {
                DType::F32 => None,
                _ => Some(w.to_dtype(DType::F32)?),
            };
            let zeros = || Tensor::zeros(dims.as_slice(), DType::F32, w.device());
            Ok(State {
                param: Var::from_tensor(&w)?,
                master,
                m: zeros()?,
                v: zeros()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for t in 1..=3u64 {
        let decay = if t == 2 { 0.1 } else { 0.0 };
        let scale = if t == 3 { 0.5 } else { 1.0 };
        let st = crate::AdamWStep::new(t, 1e-3, [0.9, 0.95], 1e-8, decay).with_grad_scale(scale);
        let grads = shapes
            .iter()
            .enumerate()
            .map(|(i, dims)| input(11 + 10 * i as u64 + t, dims, 0.1)?.to_dtype(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        match implementation {
            Implementation::Fused => {
                let mut params: Vec<crate::AdamWParam> = states
                    .iter_mut()
                    .zip(&grads)
                    .enumerate()
                    .map(|(i, (s, g))| crate::AdamWParam {
                        param: &s.param,
                        master: s.master.as_mut(),
                        exp_avg: &mut s.m,
                        exp_avg_sq: &mut s.v,
                        grad: g,
                        decays: i != 1,
                    })
                    .collect();
                crate::adamw_step(&mut params, &st)?;
            }
            Implementation::Unfused => {
                for (i, (s, g)) in states.iter_mut().zip(&grads).enumerate() {
                    let st = if i == 1 { st.without_decay() } else { st };
                    let w = match &s.master {
                        Some(m) => m.clone(),
                        None => s.param.as_tensor().clone(),
                    };
                    let (w, m, v) = crate::unfused::adamw_update(&w, &s.m, &s.v, g, &st)?;
                    s.param.set(&w.to_dtype(case.dtype)?)?;
                    if s.master.is_some() {
                        s.master = Some(w);
                    }
                    (s.m, s.v) = (m, v);
                }
            }
        }
    }
    let cpu = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    let mut tensors = Vec::new();
    for (s, [w, m, v, master]) in states.iter().zip(names) {
        tensors.push((w, cpu(s.param.as_tensor())?));
        tensors.push((m, cpu(&s.m)?));
        tensors.push((v, cpu(&s.v)?));
        if let Some(t) = &s.master {
            tensors.push((master, cpu(t)?));
        }
    }
    Ok(Outputs { tensors })
}

/// Σ x² of three f32 tensors (the case's shape, 4,097 elements: one past a block, and 5):
/// [`crate::sums_of_squares`] against candle's square and sum in f64.
fn sum_squares(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
    let tensors = [
        input(41, &case.dims, 1.0)?,
        input(42, &[4097], 3.0)?,
        input(43, &[5], 0.5)?,
    ];
    let sums = match implementation {
        Implementation::Fused => crate::sums_of_squares(&tensors.iter().collect::<Vec<_>>())?,
        Implementation::Unfused => tensors
            .iter()
            .map(|t| t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>())
            .collect::<Result<_>>()?,
    };
    let sums: Vec<f32> = sums.into_iter().map(|s| s as f32).collect();
    let one = |i: usize| Tensor::new(&sums[i..=i], &Device::Cpu);
    Ok(Outputs {
        tensors: vec![
            ("Σ x²", one(0)?),
            ("Σ x², 4097", one(1)?),
            ("Σ x², 5", one(2)?),
        ],
    })
}

/// How far `got` is from `want`, tensor by tensor: (name, max |got − want|, max |want|).
pub fn compare(want: &Outputs, got: &Outputs) -> Result<Vec<(&'static str, f32, f32)>> {
    want.tensors
        .iter()
        .zip(&got.tensors)
        .map(|((name, a), (_, b))| {
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            Ok((*name, diff, scale))
        })
        .collect()
}

/// The largest difference allowed relative to the largest reference value: f32 rounding of
/// sums taken in another order, or for bf16 two units in the last place (8 bits of mantissa)
/// where the last rounding of an f32 value falls the other way.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 2e-5,
        _ => 2.0 / 128.0,
    }
}

/// Deterministic values in [-1, 1) (xorshift), the same on every machine.
pub fn seeded(seed: u64, n: usize) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

fn unfused_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let rstd = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = x32.broadcast_mul(&rstd)?.to_dtype(x.dtype())?;
    // The product in f32, rounded once, is what a bf16 multiply computes; through f32, the
    // weight's gradient is summed over rows in f32 as PyTorch sums it (candle would in bf16).
    normed
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?
        .to_dtype(x.dtype())
}
