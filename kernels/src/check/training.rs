//! The training cases of [`super::run`] that are not one element-wise op: the LM head's
//! cross-entropy kernels, LoRA's rank-r products, AdamW over a list of parameters and the
//! gradients' sums of squares, each against the same written with candle ops.

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::{Case, Implementation, Outputs, SeededInput};

/// The two forward-only kernels of `cross_entropy` on logits [N, V]: the row statistics (max,
/// Σ exp, target logit) and the logits' gradient, with every third row's target held elsewhere
/// (−1) and every fifth row ignored (weight 0), against the same written with candle ops in f32.
pub(super) fn cross_entropy(
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
    // Each statistic on its own: Σ exp is two orders above the logits.
    let stat = |i: usize| stats.narrow(1, i, 1);
    Outputs::f32_on_cpu([
        ("row max", stat(0)?),
        ("Σ exp", stat(1)?),
        ("target logit", stat(2)?),
        ("dlogits", grad),
    ])
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

/// LoRA's three rank-r products on x [n, k] and y [n, c] in the case's dtype, f32 A [r, k] and
/// Bᵀ [r, c]: x Aᵀ, y + l Bᵀ (also added to an acc [n, c] in the same pass) and the adapter
/// gradient lᵀ x, against the same as f32 candle matmuls; and their `_under` forms with
/// LoRA's dropout mask at p 0.1 (x dropped in x Aᵀ and lᵀ x; the product l A dropped in the input
/// gradient y + l A, here with y [n, k]), against the mask's values multiplied in.
pub(super) fn low_rank(
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
    // The dropped forms' input gradient: y and acc [n, k], as x's gradient is.
    let dy = input(26, &[n, k], 1.0)?;
    let dacc = input(27, &[n, k], 1.0)?;
    let (p, key) = (0.1, crate::dropout::dropout_key(1234, 0, 5));
    let (low, sum, sum_to, grad, dropped) = match implementation {
        Implementation::Fused => {
            use crate::low_rank::*;
            let mask = crate::dropout::DropoutMask::new(p, key)?.expect("p > 0");
            let low = project(&x, &a)?;
            let mask = Some(&mask);
            let dropped_low = project_under(&x, &a, mask)?;
            let dropped = [
                outer_sum_under(&dropped_low, &x, mask)?,
                add_product_under(&dy, &dropped_low, &a, mask)?,
                add_product_to_under(&dacc, &dy, &dropped_low, &a, mask)?,
                dropped_low,
            ];
            (
                low.clone(),
                add_product(&y, &low, &bt)?,
                add_product_to(&acc, &y, &low, &bt)?,
                outer_sum(&low, &x)?,
                dropped,
            )
        }
        Implementation::Unfused => {
            let x32 = x.to_dtype(DType::F32)?;
            let low = x32.matmul(&a.t()?)?;
            let sum = (y.to_dtype(DType::F32)? + low.matmul(&bt)?)?.to_dtype(y.dtype())?;
            let sum_to = (&acc + &sum)?;
            let grad = low.t()?.matmul(&x32)?;
            let mask = crate::unfused::dropout_mask(&[n, k], p, key, x.device())?;
            let x_dropped = (&x32 * &mask)?;
            let dropped_low = x_dropped.matmul(&a.t()?)?;
            let input_grad = (dy.to_dtype(DType::F32)? + (dropped_low.matmul(&a)? * &mask)?)?
                .to_dtype(dy.dtype())?;
            let dropped = [
                dropped_low.t()?.matmul(&x_dropped)?,
                input_grad.clone(),
                (&dacc + &input_grad)?,
                dropped_low,
            ];
            (low, sum, sum_to, grad, dropped)
        }
    };
    let [dropped_grad, dropped_sum, dropped_sum_to, dropped_low] = dropped;
    Outputs::f32_on_cpu([
        ("x Aᵀ", low),
        ("y + l Bᵀ", sum),
        ("acc + (y + l Bᵀ)", sum_to),
        ("lᵀ x", grad),
        ("(dropped x) Aᵀ", dropped_low),
        ("dy + mask ⊙ (l A)", dropped_sum),
        ("acc + (dy + mask ⊙ (l A))", dropped_sum_to),
        ("lᵀ (dropped x)", dropped_grad),
    ])
}

/// Three AdamW steps of three parameters in the case's dtype (the case's shape, a vector that
/// takes no decay, a 3 × 5 matrix), the second step with weight decay and the third on
/// gradients scaled by 0.5 (clipping): every parameter, master and moment after them.
pub(super) fn adamw(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
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
pub(super) fn sum_squares(
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

/// NF4's codes (as f32) and the weight dequantized from them, for a weight of the case's
/// shape whose blocks span a hundredfold range of scales; unfused, the codes are the argmin
/// over the 16 level differences (candle keeps the first on a tie, and index 0 where all are
/// NaN, as torch does) and the weight the levels gathered times the scalers, each step in the
/// case's dtype. The scalers' double quantization is [`crate::nf4::double_quantize`] on the
/// host for both.
pub(super) fn nf4(
    case: &Case,
    implementation: Implementation,
    input: &SeededInput<'_>,
) -> Result<Outputs> {
    use crate::nf4::{double_quantize, rounding, Nf4Weight, BLOCK, LEVELS, SCALER_BLOCK};
    let dims = &case.dims[..];
    let n: usize = dims.iter().product();
    let spread = input(13, &[n / BLOCK, 1], 1.0)?
        .to_dtype(DType::F32)?
        .affine(2.0, 0.0)?
        .exp()?
        .to_dtype(case.dtype)?;
    let w = input(12, &[n / BLOCK, BLOCK], 0.05)?.broadcast_mul(&spread)?;
    let (codes, dequantized) = match implementation {
        Implementation::Fused => {
            let q = Nf4Weight::quantize(&w.reshape(dims)?)?;
            (q.parts().0.clone(), q.dequantize()?)
        }
        Implementation::Unfused => {
            let dtype = case.dtype;
            let absmax = w.abs()?.max_keepdim(1)?;
            let levels = Tensor::new(&LEVELS, w.device())?.to_dtype(dtype)?;
            let scaled = w.broadcast_div(&absmax)?.unsqueeze(2)?;
            let level = scaled
                .broadcast_sub(&levels.reshape((1, 1, 16))?)?
                .abs()?
                .argmin(2)?;
            let pairs = level.reshape((n / 2, 2))?.to_dtype(DType::U32)?;
            let codes = ((pairs.narrow(1, 0, 1)? * 16.0)? + pairs.narrow(1, 1, 1)?)?
                .flatten_all()?
                .to_dtype(DType::U8)?;
            let host: Vec<f32> = absmax.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let s = double_quantize(&host, rounding(dtype));
            let group_of: Vec<u32> = (0..host.len()).map(|b| (b / SCALER_BLOCK) as u32).collect();
            let factor = Tensor::new(s.factors.as_slice(), w.device())?
                .to_dtype(dtype)?
                .index_select(&Tensor::new(group_of.as_slice(), w.device())?, 0)?;
            let q: Vec<f32> = s.quantized.iter().map(|&q| q as f32).collect();
            let scale = (Tensor::new(q.as_slice(), w.device())?
                .to_dtype(dtype)?
                .div(&factor)?
                + f64::from(s.mean))?;
            let w = levels
                .index_select(&level.flatten_all()?, 0)?
                .reshape((n / BLOCK, BLOCK))?
                .broadcast_mul(&scale.unsqueeze(1)?)?;
            (codes, w)
        }
    };
    Outputs::f32_on_cpu([
        ("codes", codes.to_dtype(DType::F32)?),
        ("w", dequantized.reshape(dims)?),
    ])
}
