//! AdamW's update of a list of parameters: on a GPU one launch per parameter dtype
//! (kernels/cuda/adamw.cu) that updates every parameter, its f32 master copy and its moments in
//! place; on the CPU the loop here, one pass per parameter, whose results replace the old
//! tensors. The unfused update in candle ops ([`crate::unfused::adamw_update`]) reads and writes
//! each tensor about fifteen times and costs five kernel launches per parameter: with a 7B
//! model's 448 LoRA adapter tensors, thousands of launches a step. Same operations, same order,
//! same f32 rounding as the unfused update, so the two agree to the last bit.

use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;

/// One step's constants, as f32 the way candle's f64 affine constants round.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// 1 − lr · weight_decay, for the parameters that take decay.
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
    /// What every gradient is multiplied by first: the clipping coefficient, or 1.
    pub grad_scale: f64,
}

impl AdamWStep {
    /// The constants of step `t` (from 1) at learning rate `lr`, as torch.optim.AdamW derives
    /// them, with gradients taken as they are.
    pub fn new(t: u64, lr: f64, [b1, b2]: [f64; 2], eps: f64, weight_decay: f64) -> Self {
        Self {
            decay: 1.0 - lr * weight_decay,
            c1: 1.0 - b1,
            b2,
            c2: 1.0 - b2,
            inv_bias2: 1.0 / (1.0 - b2.powi(t as i32)).sqrt(),
            eps,
            step_size: lr / (1.0 - b1.powi(t as i32)),
            grad_scale: 1.0,
        }
    }

    /// The same step on gradients scaled by `scale` (clip_grad_norm_'s coefficient).
    pub fn with_grad_scale(self, scale: f64) -> Self {
        Self {
            grad_scale: scale,
            ..self
        }
    }

    /// The constants the CUDA kernel takes, as f32 (a parameter's decay goes with its tensor).
    pub fn kernel_constants(&self) -> crate::launch::AdamWConstants {
        let f = |x: f64| x as f32;
        crate::launch::AdamWConstants {
            c1: f(self.c1),
            b2: f(self.b2),
            c2: f(self.c2),
            inv_bias2: f(self.inv_bias2),
            eps: f(self.eps),
            step_size: f(self.step_size),
            grad_scale: f(self.grad_scale),
        }
    }

    /// The constants for a parameter that takes no weight decay.
    pub fn without_decay(self) -> Self {
        Self { decay: 1.0, ..self }
    }
}

/// One parameter's tensors for [`adamw_step`].
///
/// On a GPU the moments and the master are written in place, so each must own its storage
/// (not share it with another tensor); on the CPU they are replaced by new tensors.
pub struct AdamWParam<'a> {
    /// f32, or bf16 / f16 with a master.
    pub param: &'a Var,
    /// The f32 weights a bf16 or f16 parameter is updated through; `None` for an f32 one.
    pub master: Option<&'a mut Tensor>,
    pub exp_avg: &'a mut Tensor,
    pub exp_avg_sq: &'a mut Tensor,
    /// f32, the parameter's shape.
    pub grad: &'a Tensor,
    /// Whether the step's weight decay applies (not to norms and biases).
    pub decays: bool,
}

impl AdamWParam<'_> {
    /// The parameter's weights as the update reads them (the master, or the parameter).
    fn weights(&self) -> &Tensor {
        match &self.master {
            Some(m) => m,
            None => self.param.as_tensor(),
        }
    }

    fn check(&self, device: &Device) -> Result<()> {
        match (self.param.dtype(), self.master.is_some()) {
            (DType::F32, false) | (DType::BF16 | DType::F16, true) => {}
            (dtype, has) => candle_core::bail!(
                "adamw: a {dtype:?} parameter {} an f32 master",
                if has { "with" } else { "without" }
            ),
        }
        let shape = self.param.shape();
        let f32_parts = [
            ("weights", self.weights()),
            ("exp_avg", &*self.exp_avg),
            ("exp_avg_sq", &*self.exp_avg_sq),
            ("gradient", self.grad),
        ];
        for (what, t) in f32_parts {
            if t.dtype() != DType::F32 || t.shape() != shape {
                candle_core::bail!(
                    "adamw: the {what} are {:?} {:?}, expected f32 {:?}",
                    t.dtype(),
                    t.dims(),
                    shape.dims()
                );
            }
            if !t.device().same_device(device) {
                candle_core::bail!("adamw: the {what} are on another device");
            }
        }
        Ok(())
    }
}

/// One AdamW step of every parameter in `params` with the constants `st` (each parameter's
/// weight decay as its `decays` says).
pub fn adamw_step(params: &mut [AdamWParam<'_>], st: &AdamWStep) -> Result<()> {
    let Some(first) = params.first() else {
        return Ok(());
    };
    let device = first.param.device().clone();
    for p in params.iter() {
        p.check(&device)?;
    }
    match &device {
        Device::Cpu => params.iter_mut().try_for_each(|p| step_on_cpu(p, st)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::tensor_list_cuda::adamw(params, st),
        other => candle_core::bail!("adamw: no kernel for {other:?}"),
    }
}

fn step_on_cpu(p: &mut AdamWParam<'_>, st: &AdamWStep) -> Result<()> {
    let st = match p.decays {
        true => *st,
        false => st.without_decay(),
    };
    let (w, m, v) = crate::elem::with_cpu_f32(
        [p.weights(), p.exp_avg, p.exp_avg_sq, p.grad],
        "adamw",
        |[w, m, v, g]| update_cpu(w, m, v, g, &st),
    )?;
    let shape = p.param.shape().clone();
    let tensor = |x: Vec<f32>| Tensor::from_vec(x, shape.clone(), &Device::Cpu);
    let w = tensor(w)?;
    *p.exp_avg = tensor(m)?;
    *p.exp_avg_sq = tensor(v)?;
    match &mut p.master {
        Some(master) => {
            p.param.set(&w.to_dtype(p.param.dtype())?)?;
            **master = w;
        }
        None => p.param.set(&w)?,
    }
    Ok(())
}

/// Elements per parallel task on the CPU.
const CHUNK: usize = 1 << 14;

/// (w', m', v') from w, m, v and g: the reference the CUDA kernel is compared with.
fn update_cpu(
    w: &[f32],
    m: &[f32],
    v: &[f32],
    g: &[f32],
    s: &AdamWStep,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = w.len();
    let f = |x: f64| x as f32;
    let (decay, c1, b2, c2, inv_bias2, eps, step_size, scale) = (
        f(s.decay),
        f(s.c1),
        f(s.b2),
        f(s.c2),
        f(s.inv_bias2),
        f(s.eps),
        f(s.step_size),
        f(s.grad_scale),
    );
    let (mut w_out, mut m_out, mut v_out) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    w_out
        .par_chunks_mut(CHUNK)
        .zip(m_out.par_chunks_mut(CHUNK))
        .zip(v_out.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((wo, mo), vo))| {
            for k in 0..wo.len() {
                let i = c * CHUNK + k;
                let gi = g[i] * scale;
                let wi = w[i] * decay;
                let mi = m[i] + (gi - m[i]) * c1;
                let vi = v[i] * b2 + (gi * gi) * c2;
                let denom = vi.sqrt() * inv_bias2 + eps;
                wo[k] = wi - (mi * step_size) / denom;
                mo[k] = mi;
                vo[k] = vi;
            }
        });
    (w_out, m_out, v_out)
}
