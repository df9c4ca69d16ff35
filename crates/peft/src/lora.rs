//! LoRA (Hu et al. 2021) as Hugging Face PEFT implements it: `y = x Wᵀ + s · B(A(dropout(x)))`
//! with A [r, in], B [out, r], s = alpha / r (or alpha / √r with rsLoRA). W stays frozen, in the
//! model's dtype (bf16 is fine); A and B train in f32.
//!
//! DoRA (Liu et al. 2024, PEFT's `use_dora`) adds a trainable magnitude m [out]: each output
//! row of W + s·BA is rescaled to length m, `y = m / ‖W + s·BA‖ ⊙ (x Wᵀ + s · B(A x))`, the
//! norm (per row, f32) treated as a constant in the backward as the paper's section 4.3 and
//! PEFT do. m starts at ‖W‖, so a new adapter changes nothing. Under tensor parallelism m
//! follows the output features: split with a column-parallel W, whose rank holds whole rows;
//! whole beside a row-parallel W, whose rows' squared lengths are summed over the group.
//!
//! A [`LoraLinear`] takes a dense projection's place through the model's linear hook
//! ([`LoraBuilder::hook`]); [`LoraAdapters`] keeps a handle on every one of them for the
//! trainer (parameters), export, merge and unmerge.

use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use helix_model::linear::{keep_dense, matmul_t, Dense, Linear, Placement};
use helix_ops::{
    copy_to_parallel_region, linear_base, reduce_from_parallel_region, BaseWeight, Projection,
};
use serde::{Deserialize, Serialize};

use crate::dropout::SeededDropout;
use crate::init::{fnv1a, uniform};

/// The seven Llama projections, by PEFT's names.
pub const LLAMA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The `[peft]` settings of a LoRA run (PEFT's `LoraConfig` names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude per output feature beside A and B.
    #[serde(default)]
    pub use_dora: bool,
}

fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

impl LoraConfig {
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: target_modules.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            use_dora: false,
        }
    }

    /// What the adapter is called: "DoRA" with `use_dora`, else "LoRA".
    pub fn name(&self) -> &'static str {
        match self.use_dora {
            true => "DoRA",
            false => "LoRA",
        }
    }

    /// alpha / r, or alpha / √r with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora.r must be at least 1");
        }
        // Zero would leave the adapter out of the output, and A without a gradient.
        if !(self.lora_alpha.is_finite() && self.lora_alpha != 0.0) {
            bail!(
                "lora.lora_alpha must be a finite nonzero number, got {}",
                self.lora_alpha
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!(
                "lora.lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            );
        }
        if self.target_modules.is_empty() {
            bail!("lora.target_modules is empty");
        }
        for t in &self.target_modules {
            if !LLAMA_TARGETS.contains(&t.as_str()) {
                bail!(
                    "lora.target_modules: unknown module '{t}' (Llama has {})",
                    LLAMA_TARGETS.join(", ")
                );
            }
        }
        Ok(())
    }

    /// `key: mine vs other's` for each setting that differs (`target_modules` in any order).
    pub fn differences(&self, other: &LoraConfig) -> Vec<String> {
        let sorted = |c: &LoraConfig| {
            let mut t = c.target_modules.clone();
            t.sort();
            t.dedup();
            t
        };
        let mut out = Vec::new();
        let mut differ = |key: &str, a: String, b: String| {
            if a != b {
                out.push(format!("lora.{key}: {a} vs {b}"));
            }
        };
        differ("r", self.r.to_string(), other.r.to_string());
        differ(
            "lora_alpha",
            self.lora_alpha.to_string(),
            other.lora_alpha.to_string(),
        );
        differ(
            "lora_dropout",
            self.lora_dropout.to_string(),
            other.lora_dropout.to_string(),
        );
        differ(
            "target_modules",
            format!("{:?}", sorted(self)),
            format!("{:?}", sorted(other)),
        );
        differ(
            "use_rslora",
            self.use_rslora.to_string(),
            other.use_rslora.to_string(),
        );
        differ(
            "use_dora",
            self.use_dora.to_string(),
            other.use_dora.to_string(),
        );
        out
    }

    /// Whether the projection at `prefix` (`model.layers.3.self_attn.q_proj`) gets an adapter.
    pub fn targets(&self, prefix: &str) -> bool {
        let leaf = prefix.rsplit('.').next().unwrap_or(prefix);
        self.target_modules.iter().any(|t| t == leaf)
    }
}

/// What DoRA adds to a LoRA layer.
struct Dora {
    /// The trained magnitude [out], f32.
    magnitude: Var,
    /// ‖W‖² per row [out], f32: fixed with W, so kept (a row-parallel rank's: its columns').
    base_row_sq: Tensor,
}

/// A frozen dense projection plus a trainable low-rank update.
pub struct LoraLinear {
    /// Checkpoint prefix, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// The checkpoint's weight, never modified (NF4 under QLoRA).
    base: BaseWeight,
    a: Var,
    b: Var,
    /// DoRA's part; `None` for plain LoRA.
    dora: Option<Dora>,
    scaling: f64,
    dropout: SeededDropout,
    /// W + s·BA while merged: the base stays untouched, so unmerging is exact.
    merged: RwLock<Option<BaseWeight>>,
    /// How the base is split over a tensor-parallel group; the adapters follow it.
    placement: Placement,
}

impl LoraLinear {
    pub fn a(&self) -> &Var {
        &self.a
    }

    pub fn b(&self) -> &Var {
        &self.b
    }

    /// DoRA's magnitude vector, when the layer has one.
    pub fn magnitude(&self) -> Option<&Var> {
        self.dora.as_ref().map(|d| &d.magnitude)
    }

    /// A and B as the forward uses them. In eval mode the adapters are constants: no graph is
    /// recorded, so activations are freed as the forward goes (validation, generation).
    fn adapters(&self) -> (Tensor, Tensor) {
        match self.dropout.is_training() {
            true => (self.a.as_tensor().clone(), self.b.as_tensor().clone()),
            false => (self.a.as_tensor().detach(), self.b.as_tensor().detach()),
        }
    }

    /// Whether the layer, run on its own, is one LoRA op ([`helix_ops::lora_linear`]): the
    /// whole weight on this rank and no dropout.
    fn is_one_op(&self) -> bool {
        matches!(self.placement, Placement::Whole) && self.dropout.is_identity()
    }

    /// The next dropout mask, (p, its key), counted as drawn; `None` where dropout is the
    /// identity. A row-parallel rank drops only its slice of the input: it mixes its rank
    /// into the key, so the ranks' slices are not dropped alike.
    fn next_mask(&self) -> Option<(f64, u64)> {
        let (p, key) = self.dropout.next_mask()?;
        Some(match &self.placement {
            Placement::Row(g) => (p, helix_ops::dropout_key(key, g.rank() as u64, 0)),
            _ => (p, key),
        })
    }

    /// The frozen base weight, as loaded (or quantized).
    pub fn base_weight(&self) -> BaseWeight {
        self.base.clone()
    }

    /// W + s·BA, computed in f32 (W dequantized under QLoRA); with DoRA, each row rescaled
    /// to its magnitude.
    /// Under tensor parallelism this rank's shard of it (a row-parallel rank's rows rescaled
    /// by the whole rows' lengths: every rank of the group must call this, in the same order).
    pub fn merged_f32(&self) -> candle_core::Result<Tensor> {
        let delta = (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?;
        let merged = (self.base.tensor()?.to_dtype(DType::F32)? + delta)?;
        match &self.dora {
            None => Ok(merged),
            Some(dora) => {
                let norms = whole_rows(&self.placement, merged.sqr()?.sum(1)?)?.sqrt()?;
                let scale = (dora.magnitude.as_tensor() / norms)?;
                merged.broadcast_mul(&scale.unsqueeze(1)?)
            }
        }
    }

    /// DoRA as PEFT computes it, `y + (g − 1) ⊙ y_d + g ⊙ s · u_d` with g = m / ‖W + s·BA‖
    /// (per output row, a constant in the backward: no gradient reaches A or B through it),
    /// y = x Wᵀ, and y_d, u_d the base product and the low-rank update of the dropped input
    /// (x itself without dropout). Rearranged as `(x − x_d) Wᵀ + g ⊙ LoRA(x_d)`, the LoRA
    /// projection runs as [`helix_ops::lora_linear`], one op that keeps only its input and
    /// rank-r activation, and without dropout the first term is gone: DoRA is LoRA's output
    /// scaled per feature. The scaling and sum are f32, rounded once to the model's dtype (a
    /// bf16 model's LoRA output is rounded before it, where PEFT rounds once).
    fn dora_forward(&self, x: &Tensor, dora: &Dora) -> candle_core::Result<Tensor> {
        let (a, b) = self.adapters();
        let m = match self.dropout.is_training() {
            true => dora.magnitude.as_tensor().clone(),
            false => dora.magnitude.as_tensor().detach(),
        };
        let g = m.broadcast_div(&self.dora_norm(dora, &a.detach(), &b.detach())?)?;
        if !matches!(self.placement, Placement::Whole) {
            return self.placed_dora_forward(x, &g, (&a, &b));
        }
        let dtype = x.dtype();
        let scaled = |lora: Tensor| lora.to_dtype(DType::F32)?.broadcast_mul(&g);
        match self.next_mask() {
            None => {
                let lora = helix_ops::lora_linear(x, &self.base, &a, &b, self.scaling)?;
                scaled(lora)?.to_dtype(dtype)
            }
            Some((p, key)) => {
                let xd = helix_ops::dropout(&x.to_dtype(DType::F32)?, p, key)?.to_dtype(dtype)?;
                let lora = helix_ops::lora_linear(&xd, &self.base, &a, &b, self.scaling)?;
                let dropped = linear_base(&(x - &xd)?, &self.base)?.to_dtype(DType::F32)?;
                (dropped + scaled(lora)?)?.to_dtype(dtype)
            }
        }
    }

    /// DoRA on a tensor-parallel rank, PEFT's formula term by term with this rank's placement:
    /// `y + (g − 1) ⊙ y_d + g ⊙ s · u_d`, y and y_d the base products of x and of the dropped
    /// x (through `Placement::forward`: the input's gradient summed over a column-parallel
    /// group, the partial products over a row-parallel one), u_d the low-rank update of the
    /// dropped x as the LoRA path under tensor parallelism computes it; g this rank's output
    /// features' (split with a column-parallel W, whole beside a row-parallel one). In f32,
    /// rounded once to the model's dtype.
    fn placed_dora_forward(
        &self,
        x: &Tensor,
        g: &Tensor,
        (a, b): (&Tensor, &Tensor),
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        let y = f32(self.placement.forward(x, &self.base)?)?;
        let (y_d, x_d) = match self.next_mask() {
            None => (y.clone(), x.to_dtype(DType::F32)?),
            Some((p, key)) => {
                let x_d = helix_ops::dropout(&x.to_dtype(DType::F32)?, p, key)?;
                let y_d = self.placement.forward(&x_d.to_dtype(dtype)?, &self.base)?;
                (f32(y_d)?, x_d)
            }
        };
        let u_d = (matmul_t(&self.placed_low(&x_d, a)?, b)? * self.scaling)?;
        let scaled = y_d.broadcast_mul(&(g - 1.0)?)?;
        (y + scaled)?.add(&u_d.broadcast_mul(g)?)?.to_dtype(dtype)
    }

    /// The rank-r activation x·Aᵀ of x [.., in] (f32, dropped where dropout asks) as B reads
    /// it under this placement (NeMo's LoRA on Megatron layers):
    /// - column-parallel: A is replicated, B holds this rank's output rows; x·Aᵀ enters B
    ///   through `copy_to`, so A's gradient is summed over the group. x itself is not copied
    ///   again: its gradient from this path is already whole.
    /// - row-parallel: A holds this rank's input columns; the partial x·Aᵀ are summed before
    ///   B (replicated), so B's gradient is whole on every rank.
    fn placed_low(&self, x: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
        let low = matmul_t(x, a)?;
        match &self.placement {
            Placement::Whole => Ok(low),
            Placement::Column(g) => copy_to_parallel_region(&low, g),
            Placement::Row(g) => reduce_from_parallel_region(&low, g),
        }
    }

    /// ‖W + s·BA‖ per row, without forming W + s·BA (an [out, in] tensor and three passes
    /// over it per projection and step): ‖W‖² (kept) + 2s·Σ_k B ⊙ (W Aᵀ) + s²·Σ_k B ⊙ (B A Aᵀ),
    /// products of rank r. A row-parallel rank's terms cover its columns: summed over the
    /// group (A Aᵀ = Σ over the ranks of their columns' products).
    fn dora_norm(&self, dora: &Dora, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let wa = matmul_t(&self.base.tensor()?.to_dtype(DType::F32)?, a)?;
        let bg = b.matmul(&a.matmul(&a.t()?)?)?;
        let cross = (b * &wa)?.sum(1)?;
        let square = (b * &bg)?.sum(1)?;
        let s = self.scaling;
        let sq = ((&dora.base_row_sq + (cross * (2.0 * s))?)? + (square * (s * s))?)?;
        whole_rows(&self.placement, sq)?.relu()?.sqrt()
    }

    pub fn is_merged(&self) -> bool {
        self.merged.read().unwrap().is_some()
    }

    pub fn dropout(&self) -> &SeededDropout {
        &self.dropout
    }
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(w) = self.merged.read().unwrap().as_ref() {
            return self.placement.forward(x, w);
        }
        if let Some(dora) = &self.dora {
            return self.dora_forward(x, dora);
        }
        let (a, b) = self.adapters();
        if self.is_one_op() {
            // One op with its own backward: the graph keeps x and the low-rank activation only.
            return helix_ops::lora_linear(x, &self.base, &a, &b, self.scaling);
        }
        let y = self.placement.forward(x, &self.base)?;
        let xf = x.to_dtype(DType::F32)?;
        let xf = match self.next_mask() {
            Some((p, key)) => helix_ops::dropout(&xf, p, key)?,
            None => xf,
        };
        let update = matmul_t(&self.placed_low(&xf, &a)?, &b)?;
        let dtype = y.dtype();
        y + (update * self.scaling)?.to_dtype(dtype)?
    }

    fn weight(&self) -> BaseWeight {
        self.base_weight()
    }

    fn projection(&self) -> Option<Projection> {
        if let Some(w) = self.merged.read().unwrap().as_ref() {
            // This rank's shard of W + s·BA: B's rows or A's columns follow W's split.
            return Some(Projection::Dense { weight: w.clone() });
        }
        if self.dora.is_some() {
            return None; // DoRA runs on the op graph
        }
        let (a, b) = self.adapters();
        Some(Projection::Lora {
            weight: self.base.clone(),
            a,
            b,
            scaling: self.scaling,
            // The mask this forward draws, as `forward` would draw it.
            dropout: self.next_mask(),
        })
    }
}

/// The model's projection → LoRA hook, and the adapters it created.
pub struct LoraBuilder {
    cfg: LoraConfig,
    seed: u64,
    layers: Mutex<Vec<Arc<LoraLinear>>>,
}

/// Forwards to the shared layer so [`LoraAdapters`] can reach it after the model owns it.
struct SharedLora(Arc<LoraLinear>);

impl Linear for SharedLora {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(x)
    }
    fn weight(&self) -> BaseWeight {
        self.0.weight()
    }
    fn projection(&self) -> Option<Projection> {
        self.0.projection()
    }
}

impl LoraBuilder {
    pub fn new(cfg: LoraConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            seed,
            layers: Mutex::new(Vec::new()),
        })
    }

    /// Wraps every targeted projection; pass as `LoadOptions::linear_hook`.
    pub fn hook(
        &self,
        prefix: &str,
        dense: Dense,
        placement: &Placement,
    ) -> Result<Box<dyn Linear>> {
        if !self.cfg.targets(prefix) {
            return keep_dense(prefix, dense, placement);
        }
        let layer = Arc::new(self.new_layer(prefix, dense.weight, placement)?);
        self.layers.lock().unwrap().push(layer.clone());
        Ok(Box::new(SharedLora(layer)))
    }

    /// PEFT's initialisation: A Kaiming-uniform with a = √5, i.e. U(±1/√in); B zeros. Each
    /// layer's generator is seeded from the run's seed and the layer's name, so the values do
    /// not depend on load order — nor on tensor parallelism: a row-parallel rank draws the whole
    /// A and keeps its columns, so every split starts from the same adapters.
    fn new_layer(
        &self,
        prefix: &str,
        weight: BaseWeight,
        placement: &Placement,
    ) -> Result<LoraLinear> {
        let (out_dim, in_dim) = weight.dims2()?;
        let r = self.cfg.r;
        let layer_seed = self.seed ^ fnv1a(prefix);
        let mut rng = rand::SeedableRng::seed_from_u64(layer_seed);
        let dev = weight.device().clone();
        let a = match placement {
            Placement::Row(g) => {
                let full_in = in_dim * g.size();
                let full = uniform(&mut rng, &[r, full_in], 1.0 / (full_in as f64).sqrt(), &dev)?;
                let part = full
                    .as_tensor()
                    .narrow(1, g.rank() * in_dim, in_dim)?
                    .contiguous()?;
                Var::from_tensor(&part)?
            }
            _ => uniform(&mut rng, &[r, in_dim], 1.0 / (in_dim as f64).sqrt(), &dev)?,
        };
        // With B = 0, ‖W + s·BA‖ = ‖W‖: the magnitude PEFT starts from (a row-parallel
        // rank's columns' squares summed over the group for it).
        let dora = match self.cfg.use_dora {
            true => {
                let base_row_sq = weight.tensor()?.to_dtype(DType::F32)?.sqr()?.sum(1)?;
                let whole = whole_rows(placement, base_row_sq.clone())?;
                Some(Dora {
                    magnitude: Var::from_tensor(&whole.sqrt()?)?,
                    base_row_sq,
                })
            }
            false => None,
        };
        Ok(LoraLinear {
            name: prefix.to_string(),
            base: weight,
            a,
            b: Var::zeros((out_dim, r), DType::F32, &dev)?,
            dora,
            scaling: self.cfg.scaling(),
            dropout: SeededDropout::new(self.cfg.lora_dropout, layer_seed.rotate_left(17)),
            merged: RwLock::new(None),
            placement: placement.clone(),
        })
    }

    /// The adapters, once the model is loaded.
    pub fn finish(self) -> Result<LoraAdapters> {
        let layers = self.layers.into_inner().unwrap();
        if layers.is_empty() {
            bail!(
                "lora.target_modules {:?} matched no layer of the model",
                self.cfg.target_modules
            );
        }
        Ok(LoraAdapters {
            cfg: self.cfg,
            layers,
        })
    }
}

/// Every LoRA layer of a model.
pub struct LoraAdapters {
    pub cfg: LoraConfig,
    pub layers: Vec<Arc<LoraLinear>>,
}

impl LoraAdapters {
    /// Trainable tensors under PEFT's saved names
    /// (`base_model.model.<prefix>.lora_A.weight`, `….lora_B.weight`, and DoRA's
    /// `….lora_magnitude_vector`, which PEFT saves without `.weight`).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::with_capacity(3 * self.layers.len());
        for l in &self.layers {
            out.push((peft_key(&l.name, "lora_A"), l.a.clone()));
            out.push((peft_key(&l.name, "lora_B"), l.b.clone()));
            if let Some(m) = l.magnitude() {
                out.push((magnitude_key(&l.name), m.clone()));
            }
        }
        out
    }

    /// Train mode applies dropout; eval mode does not.
    pub fn set_training(&self, on: bool) {
        for l in &self.layers {
            l.dropout.set_training(on);
        }
    }

    /// Applies W + s·BA (rounded to the base dtype) in every layer instead of W and the
    /// low-rank path: faster inference. The base weights are kept, so [`Self::unmerge`] is exact
    /// (an NF4 base is kept too, beside a dense merged weight per layer). Under tensor
    /// parallelism every rank of the group must call it (DoRA's row norms are summed over it).
    pub fn merge(&self) -> Result<()> {
        for l in &self.layers {
            if l.is_merged() {
                bail!("{}: already merged", l.name);
            }
            let w = l.merged_f32()?.to_dtype(l.base.dtype())?;
            *l.merged.write().unwrap() = Some(w.into());
        }
        Ok(())
    }

    /// Back to W and the low-rank path.
    pub fn unmerge(&self) -> Result<()> {
        for l in &self.layers {
            if !l.is_merged() {
                bail!("{}: not merged", l.name);
            }
            *l.merged.write().unwrap() = None;
        }
        Ok(())
    }

    /// W + s·BA (in f32) for the checkpoint weight `name`
    /// (`model.layers.0.self_attn.q_proj.weight`) when an adapter sits there: what a merged
    /// export writes.
    pub fn merged_weight(&self, name: &str) -> Result<Option<Tensor>> {
        match self
            .layers
            .iter()
            .find(|l| name.strip_suffix(".weight") == Some(l.name.as_str()))
        {
            Some(l) => Ok(Some(l.merged_f32()?)),
            None => Ok(None),
        }
    }
}

/// PEFT's key for an adapter weight of the projection at `prefix`.
pub fn peft_key(prefix: &str, which: &str) -> String {
    format!("base_model.model.{prefix}.{which}.weight")
}

/// Squared row lengths [out] of this rank's part of W-shaped rows under `placement`, as the
/// whole rows': a row-parallel rank holds some columns of every row, so the parts are summed
/// over the group (every rank of it must call this).
fn whole_rows(placement: &Placement, partial: Tensor) -> candle_core::Result<Tensor> {
    match placement {
        Placement::Row(g) => g.all_reduce_sum(&partial),
        _ => Ok(partial),
    }
}

/// PEFT's key for DoRA's magnitude of the projection at `prefix`.
pub fn magnitude_key(prefix: &str) -> String {
    format!("base_model.model.{prefix}.lora_magnitude_vector")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `cfg`'s adapter on one random `q_proj` of [out, in], seeded with `seed`.
    pub(super) fn one_layer(
        cfg: LoraConfig,
        seed: u64,
        (out, inp): (usize, usize),
    ) -> Result<(Box<dyn Linear>, LoraAdapters)> {
        let builder = LoraBuilder::new(cfg, seed)?;
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?;
        let layer = builder.hook(
            "model.layers.0.self_attn.q_proj",
            Dense::new(w),
            &Placement::Whole,
        )?;
        Ok((layer, builder.finish()?))
    }

    #[test]
    fn eval_mode_computes_the_same_without_recording_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        let (layer, adapters) = one_layer(LoraConfig::new(2, 4.0, &["q_proj"]), 1, (3, 4))?;
        adapters.layers[0]
            .b()
            .set(&Tensor::ones((3, 2), DType::F32, &dev)?)?;
        let x = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let train = layer.forward(&x)?;
        assert!(
            train.track_op(),
            "training records the graph to the adapters"
        );
        adapters.set_training(false);
        let eval = layer.forward(&x)?;
        assert!(
            !eval.track_op(),
            "eval mode keeps no activations for a backward"
        );
        assert_eq!(eval.to_vec2::<f32>()?, train.to_vec2::<f32>()?);
        Ok(())
    }
}

#[cfg(test)]
mod dora_tests {
    use super::*;
    use candle_core::Device;

    /// One DoRA layer on `q_proj` with dropout `p`, its adapters and magnitude set away from
    /// their initial values so that every term counts.
    fn dora_layer(p: f64) -> Result<(Box<dyn Linear>, LoraAdapters)> {
        let dev = Device::Cpu;
        let mut cfg = LoraConfig::new(3, 6.0, &["q_proj"]);
        cfg.lora_dropout = p;
        cfg.use_dora = true;
        let (layer, adapters) = super::tests::one_layer(cfg, 11, (5, 4))?;
        let l = &adapters.layers[0];
        l.b().set(&Tensor::randn(0f32, 0.5, (5, 3), &dev)?)?;
        let m = l.magnitude().unwrap();
        m.set(&(m.as_tensor() * Tensor::new(&[0.5f32, 1.5, 0.8, 1.2, 2.0], &dev)?)?)?;
        Ok((layer, adapters))
    }

    /// The rearranged forward (LoRA as one op, scaled) against PEFT's formula composed from
    /// plain ops with the same dropout mask: `y + (g − 1) ⊙ drop(x) Wᵀ + g ⊙ s · B A drop(x)`,
    /// g = m / ‖W + s·BA‖ held constant; outputs and the gradients of x, A, B and m.
    #[test]
    fn dora_equals_peft_s_formula_with_and_without_dropout() -> Result<()> {
        let dev = Device::Cpu;
        for p in [0.0, 0.4] {
            let (layer, adapters) = dora_layer(p)?;
            let l = &adapters.layers[0];
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?)?;
            let got = layer.forward(x.as_tensor())?;
            // The reference draws the same mask: a twin layer's first one.
            let (_, twin) = dora_layer(p)?;
            let mask = twin.layers[0].next_mask();
            let (a, b, m) = (l.a().as_tensor(), l.b().as_tensor(), l.magnitude().unwrap());
            let w = l.base_weight().tensor()?;
            let s = l.scaling;
            let xd = match mask {
                Some((p, key)) => helix_ops::dropout(x.as_tensor(), p, key)?,
                None => x.as_tensor().clone(),
            };
            let norm = (w.clone() + (b.matmul(a)? * s)?)?
                .sqr()?
                .sum(1)?
                .sqrt()?
                .detach();
            let g = m.as_tensor().broadcast_div(&norm)?;
            let y = x.as_tensor().broadcast_matmul(&w.t()?)?;
            let yd = xd.broadcast_matmul(&w.t()?)?;
            let u = xd.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
            let want = ((y + yd.broadcast_mul(&(&g - 1.0)?)?)? + (u.broadcast_mul(&g)? * s)?)?;
            let d = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "p = {p}: outputs differ by {d}");
            // Gradients of a weighted sum, so each output element counts differently.
            let weights = Tensor::randn(0f32, 1.0, got.dims(), &dev)?;
            let g_got = (&got * &weights)?.sum_all()?.backward()?;
            let g_want = (&want * &weights)?.sum_all()?.backward()?;
            for (name, v) in [
                ("x", x.as_tensor()),
                ("A", a),
                ("B", b),
                ("m", m.as_tensor()),
            ] {
                let (gg, gw) = (g_got.get(v).unwrap(), g_want.get(v).unwrap());
                let d = (gg - gw)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                let scale = gw.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(
                    d <= 1e-5 * scale.max(1.0),
                    "p = {p}: d{name} differs by {d}"
                );
            }
        }
        Ok(())
    }
}
