//! Inverted dropout whose mask is a function of a key and the element's index (a
//! counter-based generator, SplitMix64's output function over key + (i + 1)·γ), so the mask is
//! drawn where the tensor lives — kernels/cuda/dropout.cu on a GPU, the loop here on the CPU,
//! the same bits on both — and drawn again for the backward instead of kept. A host generator
//! drawing element by element and copying the mask over took 62 ms for one 2,048 × 4,096 mask
//! on the development CPU: for a 7B LoRA step with dropout on every projection, many seconds.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_cpu, packed, Elem};

/// `x · keep / (1 − p)`, keep = 1 for the elements whose [`element_bits`] fall below
/// [`keep_threshold`]`(p)`, 0 for the others; the product in f32, rounded once to x's dtype.
/// The same `key` gives the same mask, on any device: the backward applies it to the gradient
/// ([`Dropout`]'s `bwd`), and a layer differentiated by hand draws it again from the key.
pub fn dropout(x: &Tensor, p: f64, key: u64) -> Result<Tensor> {
    match DropoutMask::new(p, key)? {
        None => Ok(x.clone()),
        Some(mask) => apply_mask(x, &mask),
    }
}

/// x under `mask`, as [`dropout`] drops it.
pub fn apply_mask(x: &Tensor, mask: &DropoutMask) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout(*mask))
}

/// The mask of [`dropout`] at rate p under a key, for kernels that apply it to an operand as
/// they read it (`helix_kernels::low_rank`'s dropped products): element i of the packed tensor
/// is multiplied by [`DropoutMask::factor`]`(i)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    // Read in place by the CUDA launchers, whose kernel arguments borrow them.
    pub(crate) key: u64,
    pub(crate) threshold: u32,
    pub(crate) scale: f32,
}

impl DropoutMask {
    /// The mask at rate `p` under `key`; `None` at p = 0 (nothing dropped, nothing scaled).
    pub fn new(p: f64, key: u64) -> Result<Option<Self>> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout: p = {p} must be in [0, 1)");
        }
        Ok((p > 0.0).then(|| Self {
            key,
            threshold: keep_threshold(p),
            scale: (1.0 / (1.0 - p)) as f32,
        }))
    }

    /// The key the mask is drawn from.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// [`keep_threshold`]`(p)`: an element is kept when its bits fall below it.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// 1 / (1 − p) in f32: what a kept element is multiplied by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// What element `i` is multiplied by: the scale where kept, 0 where dropped.
    #[inline(always)]
    pub fn factor(&self, i: u64) -> f32 {
        match element_bits(self.key, i) < self.threshold {
            true => self.scale,
            false => 0.0,
        }
    }
}

/// The mask's 32 random bits at element `i` of the tensor dropped under `key`.
#[inline(always)]
pub fn element_bits(key: u64, i: u64) -> u32 {
    let mut z = key.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// An element is kept when its bits are below this: ⌊(1 − p) · 2³²⌋, so it is kept with
/// probability 1 − p to within 2⁻³².
pub fn keep_threshold(p: f64) -> u32 {
    ((1.0 - p) * 4_294_967_296.0).floor().min(u32::MAX as f64) as u32
}

/// A key for the `call`-th mask of a generator seeded `seed` on stream `stream` (a
/// data-parallel rank's own masks): distinct calls, streams and seeds give unrelated keys.
pub fn dropout_key(seed: u64, stream: u64, call: u64) -> u64 {
    let mix = |z: u64| u64::from(element_bits(z, 0)) << 32 | u64::from(element_bits(z, 1));
    mix(mix(mix(seed) ^ stream) ^ call)
}

#[derive(Clone, Copy)]
struct Dropout(DropoutMask);

/// Elements per parallel task on the CPU.
const CHUNK: usize = 1 << 14;

fn dropout_cpu<T: Elem>(x: &[T], mask: &DropoutMask) -> Result<Vec<T>> {
    let mut y = vec![T::from_f32(0.0); x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (y, x))| {
            let first = (c * CHUNK) as u64;
            for (i, (y, x)) in y.iter_mut().zip(x).enumerate() {
                *y = T::from_f32(x.to_f32() * mask.factor(first + i as u64));
            }
        });
    Ok(y)
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "helix-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_cpu!("dropout", (s), |T, (x)| dropout_cpu::<T>(
            packed(x, l, "dropout input")?,
            &self.0
        ))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::dropout(s, l, &self.0)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // The same mask and scale on the gradient.
        Ok(Some(apply_mask(dy, &self.0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn drops_about_p_scales_the_rest_and_repeats_from_the_key() -> Result<()> {
        let x = Tensor::ones(100_000, DType::F32, &Device::Cpu)?;
        for p in [0.05, 0.1, 0.5] {
            let y = dropout(&x, p, 42)?.to_vec1::<f32>()?;
            let dropped = y.iter().filter(|v| **v == 0.0).count() as f64 / y.len() as f64;
            // 4 standard deviations of the binomial fraction.
            let sd = (p * (1.0 - p) / y.len() as f64).sqrt();
            assert!((dropped - p).abs() < 4.0 * sd, "p {p}: dropped {dropped}");
            let scale = (1.0 / (1.0 - p)) as f32;
            assert!(y.iter().all(|&v| v == 0.0 || v == scale), "p {p}");
            assert_eq!(dropout(&x, p, 42)?.to_vec1::<f32>()?, y, "the same key");
            let other = dropout(&x, p, 43)?.to_vec1::<f32>()?;
            let same = y.iter().zip(&other).filter(|(a, b)| a == b).count();
            // Two independent masks agree where both keep or both drop.
            let agree = (1.0 - p).powi(2) + p * p;
            assert!(
                (same as f64 / y.len() as f64 - agree).abs() < 0.01,
                "p {p}: keys 42 and 43 agree on {same}"
            );
        }
        assert_eq!(dropout(&x, 0.0, 1)?.to_vec1::<f32>()?, x.to_vec1::<f32>()?);
        assert!(dropout(&x, 1.0, 1).is_err());
        Ok(())
    }

    #[test]
    fn neighbouring_elements_and_keys_are_uncorrelated() {
        // Dropping element i says nothing of element i + 1, nor of the same element under the
        // next call's key: each pair's joint rate is the product of the rates.
        let (p, n) = (0.3, 200_000u64);
        let t = keep_threshold(p);
        let dropped = |key: u64, i: u64| element_bits(key, i) >= t;
        let key = dropout_key(1234, 0, 0);
        let next = dropout_key(1234, 0, 1);
        let (mut both_i, mut both_key) = (0u64, 0u64);
        for i in 0..n {
            both_i += u64::from(dropped(key, i) && dropped(key, i + 1));
            both_key += u64::from(dropped(key, i) && dropped(next, i));
        }
        for (what, both) in [("neighbours", both_i), ("consecutive keys", both_key)] {
            let rate = both as f64 / n as f64;
            assert!((rate - p * p).abs() < 0.005, "{what}: joint rate {rate}");
        }
        assert_ne!(dropout_key(1, 0, 0), dropout_key(1, 1, 0));
        assert_ne!(dropout_key(1, 0, 0), dropout_key(2, 0, 0));
    }

    #[test]
    fn the_gradient_takes_the_same_mask() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 53), &Device::Cpu)?)?;
            let xd = x.as_tensor().to_dtype(dtype)?;
            let y = dropout(&xd, 0.2, 7)?;
            let r = Tensor::randn(0f32, 1.0, (37, 53), &Device::Cpu)?.to_dtype(dtype)?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            let g = g.get(x.as_tensor()).expect("x's gradient");
            let want = dropout(&r, 0.2, 7)?.to_dtype(DType::F32)?;
            let diff = (g - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?}");
            // y is x where kept, scaled, rounded once.
            let (xv, yv) = (
                xd.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            );
            let t = keep_threshold(0.2);
            for (i, (x, y)) in xv.iter().zip(&yv).enumerate() {
                let want = match element_bits(7, i as u64) < t {
                    true => Tensor::new(x * 1.25, &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_dtype(DType::F32)?
                        .to_scalar::<f32>()?,
                    false => 0.0,
                };
                assert_eq!(*y, want, "{dtype:?} element {i}");
            }
        }
        Ok(())
    }
}
