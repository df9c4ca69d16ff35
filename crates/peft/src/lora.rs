//! LoRA (Hu et al. 2021) as Hugging Face PEFT implements it: `y = x Wᵀ + s · B(A(dropout(x)))`
//! with A [r, in], B [out, r], s = alpha / r (or alpha / √r with rsLoRA). W stays frozen, in the
//! model's dtype (bf16 is fine); A and B train in f32.
//!
//! A [`LoraLinear`] takes a dense projection's place through the model's linear hook
//! ([`LoraBuilder::hook`]); [`LoraAdapters`] keeps a handle on every one of them for the
//! trainer (parameters), export, merge and unmerge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use helix_model::linear::{matmul_t, Dense, Linear};
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
            bail!("peft.r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!(
                "peft.lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            );
        }
        if self.target_modules.is_empty() {
            bail!("peft.target_modules is empty");
        }
        for t in &self.target_modules {
            if !LLAMA_TARGETS.contains(&t.as_str()) {
                bail!(
                    "peft.target_modules: unknown module '{t}' (Llama has {})",
                    LLAMA_TARGETS.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Whether the projection at `prefix` (`model.layers.3.self_attn.q_proj`) gets an adapter.
    pub fn targets(&self, prefix: &str) -> bool {
        let leaf = prefix.rsplit('.').next().unwrap_or(prefix);
        self.target_modules.iter().any(|t| t == leaf)
    }
}

/// A frozen dense projection plus a trainable low-rank update.
pub struct LoraLinear {
    /// Checkpoint prefix, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    base: RwLock<Tensor>,
    a: Var,
    b: Var,
    scaling: f64,
    dropout: SeededDropout,
    merged: AtomicBool,
}

impl LoraLinear {
    pub fn a(&self) -> &Var {
        &self.a
    }

    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The frozen base weight as it stands (merged or not).
    pub fn base_weight(&self) -> Tensor {
        self.base.read().unwrap().clone()
    }

    /// s · B A in the base weight's dtype: what merging adds.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let base_dtype = self.base.read().unwrap().dtype();
        (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?.to_dtype(base_dtype)
    }

    pub fn dropout(&self) -> &SeededDropout {
        &self.dropout
    }
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = matmul_t(x, &self.base.read().unwrap())?;
        if self.merged.load(Ordering::Acquire) {
            return Ok(y);
        }
        let xf = self.dropout.apply(&x.to_dtype(DType::F32)?)?;
        let update = matmul_t(&matmul_t(&xf, self.a.as_tensor())?, self.b.as_tensor())?;
        let dtype = y.dtype();
        y + (update * self.scaling)?.to_dtype(dtype)?
    }

    fn weight(&self) -> Tensor {
        self.base_weight()
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
    fn weight(&self) -> Tensor {
        self.0.weight()
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
    pub fn hook(&self, prefix: &str, dense: Dense) -> Result<Box<dyn Linear>> {
        if !self.cfg.targets(prefix) {
            return Ok(Box::new(dense));
        }
        let layer = Arc::new(self.new_layer(prefix, dense.weight)?);
        self.layers.lock().unwrap().push(layer.clone());
        Ok(Box::new(SharedLora(layer)))
    }

    /// PEFT's initialisation: A Kaiming-uniform with a = √5, i.e. U(±1/√in); B zeros. Each
    /// layer's generator is seeded from the run's seed and the layer's name, so the values do
    /// not depend on load order.
    fn new_layer(&self, prefix: &str, weight: Tensor) -> Result<LoraLinear> {
        let (out_dim, in_dim) = weight.dims2()?;
        let r = self.cfg.r;
        let layer_seed = self.seed ^ fnv1a(prefix);
        let mut rng = rand::SeedableRng::seed_from_u64(layer_seed);
        let dev = weight.device().clone();
        let a = uniform(&mut rng, &[r, in_dim], 1.0 / (in_dim as f64).sqrt(), &dev)?;
        Ok(LoraLinear {
            name: prefix.to_string(),
            base: RwLock::new(weight),
            a,
            b: Var::zeros((out_dim, r), DType::F32, &dev)?,
            scaling: self.cfg.scaling(),
            dropout: SeededDropout::new(self.cfg.lora_dropout, layer_seed.rotate_left(17)),
            merged: AtomicBool::new(false),
        })
    }

    /// The adapters, once the model is loaded.
    pub fn finish(self) -> Result<LoraAdapters> {
        let layers = self.layers.into_inner().unwrap();
        if layers.is_empty() {
            bail!(
                "peft.target_modules {:?} matched no layer of the model",
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
    /// (`base_model.model.<prefix>.lora_A.weight`, `….lora_B.weight`).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::with_capacity(2 * self.layers.len());
        for l in &self.layers {
            out.push((peft_key(&l.name, "lora_A"), l.a.clone()));
            out.push((peft_key(&l.name, "lora_B"), l.b.clone()));
        }
        out
    }

    /// Train mode applies dropout; eval mode does not.
    pub fn set_training(&self, on: bool) {
        for l in &self.layers {
            l.dropout.set_training(on);
        }
    }

    /// W ← W + s·BA in every layer; the adapters then add nothing until [`Self::unmerge`].
    pub fn merge(&self) -> Result<()> {
        for l in &self.layers {
            if l.merged.load(Ordering::Acquire) {
                bail!("{}: already merged", l.name);
            }
            let delta = l.delta()?; // before the write lock: delta() reads the base's dtype
            let mut w = l.base.write().unwrap();
            *w = (&*w + delta)?;
            l.merged.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// W ← W − s·BA: undoes [`Self::merge`] (up to rounding in the base dtype).
    pub fn unmerge(&self) -> Result<()> {
        for l in &self.layers {
            if !l.merged.load(Ordering::Acquire) {
                bail!("{}: not merged", l.name);
            }
            let delta = l.delta()?;
            let mut w = l.base.write().unwrap();
            *w = (&*w - delta)?;
            l.merged.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// `W + s·BA` (computed in f32) for the checkpoint weight `name`
    /// (`model.layers.0.self_attn.q_proj.weight`) when an adapter sits there: what a merged
    /// export writes, without touching the frozen base.
    pub fn merged_weight(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(l) = self
            .layers
            .iter()
            .find(|l| name.strip_suffix(".weight") == Some(l.name.as_str()))
        else {
            return Ok(None);
        };
        let w = l.base_weight().to_dtype(DType::F32)?;
        if l.merged.load(Ordering::Acquire) {
            return Ok(Some(w));
        }
        let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scaling)?;
        Ok(Some((w + delta)?))
    }
}

/// PEFT's key for an adapter weight of the projection at `prefix`.
pub fn peft_key(prefix: &str, which: &str) -> String {
    format!("base_model.model.{prefix}.{which}.weight")
}
