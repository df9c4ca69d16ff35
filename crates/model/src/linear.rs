//! The projection layers of the model, behind one trait so LoRA and tensor-parallel layers can
//! take a dense layer's place by name without changing the model.

use candle_core::{Result, Tensor};

/// `y = f(x)` for x [..., in] → y [..., out].
pub trait Linear: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The layer's frozen full-rank weight [out, in], as the checkpoint holds it.
    fn weight(&self) -> Tensor;
}

/// `x Wᵀ` for x [..., in] and W [out, in] (see [`helix_ops::linear`]).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    helix_ops::linear(x, w)
}

/// `y = x Wᵀ`, W [out, in] as Hugging Face stores it. Llama has no biases.
#[derive(Debug, Clone)]
pub struct Dense {
    pub weight: Tensor,
}

impl Dense {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }
}

impl Linear for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(x, &self.weight)
    }

    fn weight(&self) -> Tensor {
        self.weight.clone()
    }
}

/// Replaces a dense layer, given its checkpoint name prefix (e.g.
/// `model.layers.3.self_attn.q_proj`). The default keeps it dense.
pub type LinearHook<'a> = dyn Fn(&str, Dense) -> anyhow::Result<Box<dyn Linear>> + 'a;

pub fn keep_dense(_name: &str, d: Dense) -> anyhow::Result<Box<dyn Linear>> {
    Ok(Box::new(d))
}
