//! AdamW's update of one f32 tensor (a parameter, or the f32 master copy of a bf16 one) as one
//! pass: kernels/cuda/adamw.cu on the GPU, the loop here on the CPU. The unfused update in
//! candle ops (crates/train/src/optim.rs) reads and writes the whole tensor about fifteen times
//! per step; for full SFT that dominated the optimizer's time. Same operations, same order, same
//! f32 rounding as the unfused update, so the two agree to the last bit on the CPU.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::packed;

/// One step's constants, as f32 the way candle's f64 affine constants round.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// 1 − lr · weight_decay, or 1 for a parameter without decay.
    pub decay: f64,
    /// 1 − β₁
    pub c1: f64,
    pub b2: f64,
    /// 1 − β₂
    pub c2: f64,
    /// 1 / √(1 − β₂ᵗ)
    pub inv_bias2: f64,
    pub eps: f64,
    /// lr / (1 − β₁ᵗ)
    pub step_size: f64,
}

impl AdamWStep {
    /// The constants of step `t` (from 1) at learning rate `lr`, as torch.optim.AdamW derives
    /// them; `weight_decay` 0 for a parameter that takes none.
    pub fn new(t: u64, lr: f64, [b1, b2]: [f64; 2], eps: f64, weight_decay: f64) -> Self {
        Self {
            decay: 1.0 - lr * weight_decay,
            c1: 1.0 - b1,
            b2,
            c2: 1.0 - b2,
            inv_bias2: 1.0 / (1.0 - b2.powi(t as i32)).sqrt(),
            eps,
            step_size: lr / (1.0 - b1.powi(t as i32)),
        }
    }
}

/// `(w', m', v')` from the f32 tensors w, m, v and the gradient g (all one shape).
pub fn adamw_update(
    w: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    step: AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    for (what, t) in [("w", w), ("m", m), ("v", v), ("g", g)] {
        if t.dtype() != DType::F32 || t.shape() != w.shape() {
            candle_core::bail!(
                "adamw: {what} is {:?} {:?}, expected f32 {:?}",
                t.dtype(),
                t.dims(),
                w.dims()
            );
        }
    }
    let op = AdamW {
        g: g.detach().contiguous()?,
        step,
    };
    let out = w.detach().contiguous()?.apply_op3_no_bwd(
        &m.detach().contiguous()?,
        &v.detach().contiguous()?,
        &op,
    )?;
    let part = |i: usize| out.get(i)?.reshape(w.shape());
    Ok((part(0)?, part(1)?, part(2)?))
}

struct AdamW {
    /// The gradient: a fourth input, read from its storage in the forward.
    g: Tensor,
    step: AdamWStep,
}

/// Elements per parallel task on the CPU.
const CHUNK: usize = 1 << 14;

fn update_cpu(w: &[f32], m: &[f32], v: &[f32], g: &[f32], s: &AdamWStep) -> Vec<f32> {
    let n = w.len();
    let f = |x: f64| x as f32;
    let (decay, c1, b2, c2, inv_bias2, eps, step_size) = (
        f(s.decay),
        f(s.c1),
        f(s.b2),
        f(s.c2),
        f(s.inv_bias2),
        f(s.eps),
        f(s.step_size),
    );
    let mut out = vec![0f32; 3 * n];
    let (w_out, rest) = out.split_at_mut(n);
    let (m_out, v_out) = rest.split_at_mut(n);
    w_out
        .par_chunks_mut(CHUNK)
        .zip(m_out.par_chunks_mut(CHUNK))
        .zip(v_out.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((wo, mo), vo))| {
            for k in 0..wo.len() {
                let i = c * CHUNK + k;
                let gi = g[i];
                let wi = w[i] * decay;
                let mi = m[i] + (gi - m[i]) * c1;
                let vi = v[i] * b2 + (gi * gi) * c2;
                let denom = vi.sqrt() * inv_bias2 + eps;
                wo[k] = wi - (mi * step_size) / denom;
                mo[k] = mi;
                vo[k] = vi;
            }
        });
    out
}

impl CustomOp3 for AdamW {
    fn name(&self) -> &'static str {
        "helix-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(w), CpuStorage::F32(m), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("adamw: w, m and v must be f32")
        };
        let (g_storage, g_layout) = self.g.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(g)) = &*g_storage else {
            candle_core::bail!("adamw: the gradient must be f32 on the cpu")
        };
        let out = update_cpu(
            packed(w, l1, "adamw w")?,
            packed(m, l2, "adamw m")?,
            packed(v, l3, "adamw v")?,
            packed(g, g_layout, "adamw g")?,
            &self.step,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((3, l1.shape().elem_count())),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (g_storage, g_layout) = self.g.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*g_storage else {
            candle_core::bail!("adamw: the gradient must be on the gpu")
        };
        let n = l1.shape().elem_count();
        let out = crate::cuda::adamw([(s1, l1), (s2, l2), (s3, l3), (g, g_layout)], n, &self.step)?;
        Ok((out, Shape::from((3, n))))
    }
}
