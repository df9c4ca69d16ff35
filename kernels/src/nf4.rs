//! NF4 storage of a frozen weight, for QLoRA (Dettmers et al. 2023): 4 bits an element plus a
//! byte per 64, where bf16 takes 16 bits. Laid out as torchao's `NF4Tensor` (torchtune's QLoRA)
//! lays it out, and rounded where it rounds, so helix quantizes a weight to the same codes and
//! dequantizes it to the same bits (tests/nf4.rs holds both to torchao's output):
//!
//! - the flattened weight in blocks of [`BLOCK`] elements, each divided by its absmax and
//!   stored as the nearest of the 16 NormalFloat levels ([`LEVELS`]), two codes a byte, the
//!   even element in the high nibble;
//! - the blocks' absmaxes less their mean, in groups of [`SCALER_BLOCK`], each group scaled
//!   by 256 / (2 · its absmax) and rounded to int8 ("double quantization");
//! - every step computed in f32 and rounded to the weight's dtype where torchao, computing in
//!   that dtype, stores a value.
//!
//! torchao needs whole groups of 256 blocks; here the last group may be shorter (SmolLM2's
//! 576 × 576 projections have 20¼ groups), with the same result wherever torchao runs. The
//! CUDA kernels (kernels/cuda/nf4.cu) quantize and dequantize on the device, the loops here on
//! the CPU, with the same bits; the scalers' double quantization, a pass over one value per 64
//! elements, runs on the host for both.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, packed_as, Elem};

/// Elements per block, each block scaled by its absmax.
pub const BLOCK: usize = 64;
/// Blocks per group of the double quantization, each group's int8 scalers sharing one factor.
pub const SCALER_BLOCK: usize = 256;
/// The NormalFloat levels as torchao lists them (rounded to the weight's dtype before use).
pub const LEVELS: [f32; 16] = [
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
    0.3379, 0.4407, 0.5626, 0.7230, 1.0,
];

/// A weight in NF4: its codes, int8 block scalers and their groups' factors on the weight's
/// device, and the scalers' mean.
#[derive(Clone, Debug)]
pub struct Nf4Weight {
    /// u8 [numel / 2]: element 2i's level in the high nibble, 2i + 1's in the low.
    codes: Tensor,
    /// u8 [numel / 64]: each block's absmax less the mean, times its group's factor, as int8
    /// (two's complement) bits.
    scalers: Tensor,
    /// [⌈blocks / 256⌉] in the weight's dtype: 256 / (2 · the group's largest |absmax − mean|).
    factors: Tensor,
    /// The blocks' mean absmax, a value of the weight's dtype.
    mean: f32,
    shape: Shape,
    dtype: DType,
}

impl Nf4Weight {
    /// `w` (f32, bf16 or f16, any shape whose element count is a multiple of [`BLOCK`]) in NF4,
    /// computed in its dtype on its device.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let dtype = w.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("NF4 quantizes f32, bf16 or f16 weights, not {dtype:?}");
        }
        let n = w.elem_count();
        if n == 0 || !n.is_multiple_of(BLOCK) {
            candle_core::bail!(
                "NF4 needs a multiple of {BLOCK} elements; a weight of shape {:?} has {n}",
                w.dims()
            );
        }
        let flat = w.flatten_all()?.contiguous()?;
        // abs and max are exact in any dtype.
        let absmax = flat.reshape((n / BLOCK, BLOCK))?.abs()?.max(1)?;
        let codes = flat.apply_op2_no_bwd(&absmax, &QuantizeCodes)?;
        let absmax_host: Vec<f32> = absmax.to_dtype(DType::F32)?.to_vec1()?;
        // candle's max passes over NaN, and a non-finite weight would quantize to a level: a
        // sum (in f32, which the weights' magnitudes cannot overflow) tells.
        let total = flat
            .to_dtype(DType::F32)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        if !total.is_finite() {
            let values: Vec<f32> = flat.to_dtype(DType::F32)?.to_vec1()?;
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                candle_core::bail!("NF4: element {i} of the weight is {v} (not finite)");
            }
        }
        let scalers = double_quantize(&absmax_host, rounding(dtype));
        if let Some(g) = scalers.factors.iter().position(|f| !f.is_finite()) {
            let group =
                &absmax_host[g * SCALER_BLOCK..absmax_host.len().min((g + 1) * SCALER_BLOCK)];
            let spread = group
                .iter()
                .fold(0f32, |m, a| m.max((a - scalers.mean).abs()));
            if spread > 0.0 {
                candle_core::bail!(
                    "NF4 in {dtype:?}: the block scales of group {g} spread {spread:e} about \
                     their mean, too little for a {dtype:?} factor (256 / (2 · {spread:e}) \
                     overflows); quantize in bf16 or f32"
                );
            }
        }
        let device = w.device();
        let groups = scalers.factors.len();
        let factors = Tensor::from_vec(scalers.factors, groups, device)?.to_dtype(dtype)?;
        let bits: Vec<u8> = scalers.quantized.iter().map(|&q| q as u8).collect();
        Ok(Self {
            codes,
            scalers: Tensor::from_vec(bits, n / BLOCK, device)?,
            factors,
            mean: scalers.mean,
            shape: w.shape().clone(),
            dtype,
        })
    }

    /// A weight from stored parts, as [`Nf4Weight::parts`] gives them (torchao's
    /// `quantized_data`, `quantized_scalers` as u8 bits, `quantization_factor` and
    /// `scaler_mean`), checked against `shape`.
    pub fn from_parts(
        codes: Tensor,
        scalers: Tensor,
        factors: Tensor,
        mean: f32,
        shape: impl Into<Shape>,
    ) -> Result<Self> {
        let shape = shape.into();
        let n = shape.elem_count();
        let blocks = n.div_ceil(BLOCK);
        let want = [
            ("codes", &codes, DType::U8, n / 2),
            ("scalers", &scalers, DType::U8, blocks),
            (
                "factors",
                &factors,
                factors.dtype(),
                blocks.div_ceil(SCALER_BLOCK),
            ),
        ];
        for (what, t, dtype, len) in want {
            if t.dtype() != dtype || t.dims() != [len] {
                candle_core::bail!(
                    "NF4 {what} of a {shape:?} weight must be {dtype:?} [{len}], not {:?} {:?}",
                    t.dtype(),
                    t.dims()
                );
            }
        }
        if !n.is_multiple_of(BLOCK) {
            candle_core::bail!("NF4 needs a multiple of {BLOCK} elements, not {shape:?}");
        }
        let dtype = factors.dtype();
        Ok(Self {
            codes,
            scalers,
            factors,
            mean,
            shape,
            dtype,
        })
    }

    /// The weight again, in its dtype and shape: each level times its block's scaler, as
    /// torchao's `get_original_weight` gives it.
    pub fn dequantize(&self) -> Result<Tensor> {
        self.codes
            .apply_op3_no_bwd(
                &self.scalers,
                &self.factors,
                &Dequantize { mean: self.mean },
            )?
            .reshape(self.shape.clone())
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The dtype the weight dequantizes to (and was quantized in).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// Bytes held: codes, scalers and factors.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count()
            + self.scalers.elem_count()
            + self.factors.elem_count() * self.dtype.size_in_bytes()
    }

    /// The stored parts: codes (u8), scalers (u8 holding int8 bits), factors, and the mean.
    pub fn parts(&self) -> (&Tensor, &Tensor, &Tensor, f32) {
        (&self.codes, &self.scalers, &self.factors, self.mean)
    }
}

/// The blocks' absmaxes, double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalers {
    /// One int8 per block.
    pub quantized: Vec<i8>,
    /// One factor per group of [`SCALER_BLOCK`] blocks (values of the weight's dtype).
    pub factors: Vec<f32>,
    /// The absmaxes' mean (a value of the weight's dtype).
    pub mean: f32,
}

/// torchao's `double_quantize_scalers` on the blocks' absmaxes (values of the weight's dtype),
/// `round` rounding to that dtype: the mean (summed in f64; torchao sums in f32, which can
/// differ in the last place of an f32 mean), each absmax less it, then per group the factor
/// 256 / (2 · its largest magnitude) and each value times it, rounded half to even and clamped
/// to int8. A group whose values all equal the mean has an infinite factor: its scalers are 0
/// and dequantize to the mean.
pub fn double_quantize(absmax: &[f32], round: fn(f32) -> f32) -> Scalers {
    let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
    let mean = round((sum / absmax.len().max(1) as f64) as f32);
    let centred: Vec<f32> = absmax.iter().map(|&a| round(a - mean)).collect();
    let mut quantized = Vec::with_capacity(absmax.len());
    let mut factors = Vec::with_capacity(absmax.len().div_ceil(SCALER_BLOCK));
    for group in centred.chunks(SCALER_BLOCK) {
        let largest = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        let factor = round(256.0 / round(2.0 * largest));
        factors.push(factor);
        quantized.extend(group.iter().map(|&v| {
            let q = round(v * factor).round_ties_even();
            match q.is_nan() {
                true => 0,
                false => q.clamp(-128.0, 127.0) as i8,
            }
        }));
    }
    Scalers {
        quantized,
        factors,
        mean,
    }
}

/// Rounding through `dtype` (identity for f32).
pub fn rounding(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::BF16 => <half::bf16 as Elem>::round,
        DType::F16 => <half::f16 as Elem>::round,
        _ => |v| v,
    }
}

/// The level nearest `x / absmax` in `T`: the quotient and each difference rounded to T, the
/// first level kept on a tie, level 0 for a NaN quotient (an all-zero block), as torch's min
/// over the differences picks.
#[inline(always)]
fn nearest_level<T: Elem>(x: f32, absmax: f32) -> u8 {
    let v = T::round(x / absmax);
    if v.is_nan() {
        return 0;
    }
    let mut best = 0u8;
    let mut best_diff = T::round(v - T::round(LEVELS[0])).abs();
    for (j, &level) in LEVELS.iter().enumerate().skip(1) {
        let d = T::round(v - T::round(level)).abs();
        if d < best_diff {
            best_diff = d;
            best = j as u8;
        }
    }
    best
}

/// Codes of w (packed, even length) given each block's absmax: the CPU reference of
/// `nf4_quantize_*`.
fn quantize_cpu<T: Elem>(w: &[T], absmax: &[T]) -> Vec<u8> {
    let mut codes = vec![0u8; w.len() / 2];
    codes
        .par_chunks_mut(BLOCK / 2)
        .zip(w.par_chunks(BLOCK))
        .zip(absmax.par_iter())
        .for_each(|((codes, block), a)| {
            let a = a.to_f32();
            for (c, pair) in codes.iter_mut().zip(block.chunks_exact(2)) {
                let hi = nearest_level::<T>(pair[0].to_f32(), a);
                let lo = nearest_level::<T>(pair[1].to_f32(), a);
                *c = hi << 4 | lo;
            }
        });
    codes
}

/// The weight from its codes: the CPU reference of `nf4_dequantize_*`.
fn dequantize_cpu<T: Elem>(codes: &[u8], scalers: &[u8], factors: &[T], mean: f32) -> Vec<T> {
    let levels = LEVELS.map(T::round);
    let mut w = vec![T::from_f32(0.0); codes.len() * 2];
    w.par_chunks_mut(BLOCK)
        .zip(codes.par_chunks(BLOCK / 2))
        .enumerate()
        .for_each(|(block, (w, codes))| {
            let factor = factors[block / SCALER_BLOCK].to_f32();
            let scale = T::round(T::round(scalers[block] as i8 as f32 / factor) + mean);
            for (pair, &c) in w.chunks_exact_mut(2).zip(codes) {
                pair[0] = T::from_f32(levels[(c >> 4) as usize] * scale);
                pair[1] = T::from_f32(levels[(c & 15) as usize] * scale);
            }
        });
    w
}

/// (w, absmax per block) → codes.
struct QuantizeCodes;

impl CustomOp2 for QuantizeCodes {
    fn name(&self) -> &'static str {
        "helix-nf4-quantize"
    }

    fn cpu_fwd(
        &self,
        w: &CpuStorage,
        wl: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let codes = dispatch_cpu!("NF4 quantize", (w, a), |T, (w, a)| -> u8 Ok::<
            _,
            candle_core::Error,
        >(quantize_cpu::<T>(
            packed(w, wl, "NF4 weight")?,
            packed(a, al, "NF4 absmax")?
        )))?;
        Ok((codes, Shape::from(wl.shape().elem_count() / 2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::nf4_quantize((w, wl), (a, al))?;
        Ok((out, Shape::from(wl.shape().elem_count() / 2)))
    }
}

/// (codes, scalers, factors) → the weight, flat, in the factors' dtype.
struct Dequantize {
    mean: f32,
}

impl CustomOp3 for Dequantize {
    fn name(&self) -> &'static str {
        "helix-nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
        f: &CpuStorage,
        fl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let codes = packed_as::<u8>(c, cl, "NF4 codes")?;
        let scalers = packed_as::<u8>(s, sl, "NF4 scalers")?;
        let out = dispatch_cpu!("NF4 dequantize", (f), |T, (f)| Ok::<_, candle_core::Error>(
            dequantize_cpu::<T>(codes, scalers, packed(f, fl, "NF4 factors")?, self.mean)
        ))?;
        Ok((out, Shape::from(codes.len() * 2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
        f: &candle_core::CudaStorage,
        fl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::nf4_dequantize((c, cl), (s, sl), (f, fl), self.mean)?;
        Ok((out, Shape::from(cl.shape().elem_count() * 2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip_and_blocks_scale_by_their_absmax() -> Result<()> {
        // A block holding exactly the levels times 0.5 (plus its absmax) dequantizes to itself
        // up to the scaler's int8 step; a zero block stays zero.
        let mut v = vec![0f32; 2 * BLOCK];
        for (i, x) in v.iter_mut().take(BLOCK).enumerate() {
            *x = LEVELS[i % 16] * 0.5;
        }
        let w = Tensor::from_vec(v.clone(), (2, BLOCK), &Device::Cpu)?;
        let q = Nf4Weight::quantize(&w)?;
        let codes: Vec<u8> = q.codes.to_vec1()?;
        assert_eq!(codes[0], 0x01, "levels 0 and 1 in the first byte");
        assert_eq!(codes[BLOCK / 2], 0x00, "an all-zero block takes level 0");
        let back: Vec<f32> = q.dequantize()?.flatten_all()?.to_vec1()?;
        for (got, want) in back.iter().zip(&v).take(BLOCK) {
            assert!((got - want).abs() < 0.5 / 127.0, "{got} vs {want}");
        }
        // The zero block's scaler is its absmax (0) less the mean, rounded to int8 steps.
        assert!(back[BLOCK..].iter().all(|x| x.abs() < 0.5 / 127.0));
        Ok(())
    }

    #[test]
    fn a_weight_not_in_whole_blocks_is_refused_naming_its_shape() {
        let w = Tensor::zeros((3, 10), DType::F32, &Device::Cpu).unwrap();
        let e = Nf4Weight::quantize(&w).unwrap_err().to_string();
        assert!(e.contains("[3, 10]") && e.contains("30"), "{e}");
    }

    #[test]
    fn non_finite_weights_and_f16_factors_that_overflow_are_refused() {
        let mut v = vec![0.01f32; 4 * BLOCK];
        v[130] = f32::NAN;
        let w = Tensor::from_vec(v, (4, BLOCK), &Device::Cpu).unwrap();
        let e = Nf4Weight::quantize(&w).unwrap_err().to_string();
        assert!(e.contains("element 130") && e.contains("NaN"), "{e}");
        // Block scales 0.01 and 0.0105 about a mean of 0.01025: 256 / (2 · 0.00025) is past
        // f16's 65,504. In bf16 the same weight quantizes.
        let v: Vec<f32> = (0..4 * BLOCK)
            .map(|i| {
                if (i / BLOCK).is_multiple_of(2) {
                    0.01
                } else {
                    0.0105
                }
            })
            .collect();
        let w = Tensor::from_vec(v, (4, BLOCK), &Device::Cpu).unwrap();
        let e = Nf4Weight::quantize(&w.to_dtype(DType::F16).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("F16") && e.contains("group 0"), "{e}");
        assert!(Nf4Weight::quantize(&w.to_dtype(DType::BF16).unwrap()).is_ok());
    }

    #[test]
    fn a_short_last_group_quantizes_as_its_own_group() {
        // 300 blocks: one group of 256, one of 44, each with its own factor; each group's
        // largest |absmax − mean| takes an int8 end, and every absmax comes back to within
        // half its group's step (a whole step where +128 is clamped to 127).
        let absmax: Vec<f32> = (0..300)
            .map(|i| match i < 256 {
                true => 0.01 + (i % 7) as f32 * 0.003,
                false => 0.5 + (i % 5) as f32 * 0.1,
            })
            .collect();
        let round = rounding(DType::F32);
        let s = double_quantize(&absmax, round);
        assert_eq!((s.quantized.len(), s.factors.len()), (300, 2));
        assert_ne!(s.factors[0], s.factors[1]);
        for (g, group) in s.quantized.chunks(SCALER_BLOCK).enumerate() {
            assert!(group.iter().any(|&q| q == 127 || q == -128), "group {g}");
        }
        for (i, (&q, &a)) in s.quantized.iter().zip(&absmax).enumerate() {
            let factor = s.factors[i / SCALER_BLOCK];
            let back = q as f32 / factor + s.mean;
            assert!(
                (back - a).abs() <= 1.0 / factor + 1e-6,
                "block {i}: {back} vs {a}"
            );
        }
    }
}
