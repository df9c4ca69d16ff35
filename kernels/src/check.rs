//! Comparing implementations of the fused ops on seeded inputs: the fused kernels on one device
//! against the CPU references (what `helix-train kernel-check` runs on the GPU), or against the
//! unfused definition written with plain candle ops (the CPU tests). Forward values and every
//! input gradient are compared, for f32 and bf16.

use candle_core::{DType, Device, Result, Tensor, Var, D};

mod attention;
mod training;

pub use attention::flash_segments;
use attention::{attention_softmax, flash_attention};
pub use training::cross_entropy_targets;
use training::{adamw, cross_entropy, low_rank, nf4, sum_squares};

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

    /// The case's [`tolerance`]: none for NF4, whose codes and dequantized bits every
    /// implementation must give exactly.
    pub fn tolerance(&self) -> f32 {
        match self.op {
            "nf4" => 0.0,
            _ => tolerance(self.dtype),
        }
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
            ("dropout", vec![3, 7, 33]),
            ("dropout", vec![2048, 4096]),
        ] {
            out.push(Case { op, dtype, dims });
        }
    }
    // LoRA's rank-r path: activations in the model's dtype, adapters in f32; [rows, in, out,
    // r]: a shape of remainders (rows past a 64-row block, columns past the CPU loops' 8- and
    // 32-wide passes, ranks past a group of four), rank 72 (above the CUDA kernels' 64: f32
    // matmuls on a GPU), then a 7B projection's, at rank 20 (ranks past 16 take a second block
    // or pass of each CUDA kernel) and as the 7B LoRA bench runs it (2,048 rows, rank 8).
    for dtype in [DType::F32, DType::BF16] {
        for dims in [
            vec![7, 13, 11, 3],
            vec![70, 45, 37, 6],
            vec![300, 200, 150, 72],
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
    // kernels take bf16 and f16 at head_dim 64 and 128. Sequences end mid-tile. On a GPU the
    // forward is the kernel of 128 query rows a block, and in bf16 also the 64-row one.
    for dtype in [DType::BF16, DType::F16] {
        for dims in [vec![2, 4, 2, 150, 64], vec![1, 8, 2, 600, 128]] {
            let ops: &[&'static str] = match dtype {
                DType::BF16 => &["flash_attention", "flash_attention_rows64"],
                _ => &["flash_attention"],
            };
            for &op in ops {
                out.push(Case {
                    op,
                    dtype,
                    dims: dims.clone(),
                });
            }
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
    // QLoRA's NF4 weights: 15 blocks (one short group of scalers), and a 7B attention
    // projection. Compared exactly ([`Case::tolerance`]).
    for dtype in [DType::F32, DType::BF16] {
        for dims in [vec![3, 320], vec![4096, 4096]] {
            out.push(Case {
                op: "nf4",
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

impl Outputs {
    /// Named tensors from any device and dtype, as f32 on the CPU.
    fn f32_on_cpu<const N: usize>(named: [(&'static str, Tensor); N]) -> Result<Self> {
        let tensors = named
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        Ok(Self { tensors })
    }
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
        "dropout" => {
            // LoRA's dropout at PEFT's usual p, on a key as a run draws its first.
            let (p, key) = (0.1, crate::dropout::dropout_key(1234, 0, 0));
            let x = var(input(8, dims, 2.0)?)?;
            let y = match implementation {
                Implementation::Fused => crate::dropout(x.as_tensor(), p, key)?,
                Implementation::Unfused => {
                    let mask = crate::unfused::dropout_mask(dims, p, key, x.device())?;
                    (x.as_tensor().to_dtype(DType::F32)? * mask)?.to_dtype(case.dtype)?
                }
            };
            (y, vec![x], vec!["dx"])
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
        "nf4" => return nf4(case, implementation, &input),
        "swiglu_backward_and_output" => {
            return swiglu_backward_and_output(case, implementation, &input)
        }
        "flash_attention" | "flash_attention_rows64" => {
            return flash_attention(case, implementation, &input)
        }
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
    Outputs::f32_on_cpu([("d gate", dg), ("d up", du), ("y", y)])
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
