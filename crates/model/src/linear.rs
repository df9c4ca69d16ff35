//! The projection layers of the model, behind one trait so LoRA and tensor-parallel layers can
//! take a dense layer's place by name without changing the model.

use candle_core::{Result, Tensor};
use helix_ops::{
    copy_to_parallel_region, linear_base, reduce_from_parallel_region, BaseWeight, Projection,
    SharedCollective,
};

/// `y = f(x)` for x [..., in] → y [..., out].
pub trait Linear: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The layer's full-rank weight [out, in], as the checkpoint holds it (this rank's shard
    /// under tensor parallelism), or as QLoRA stores it (NF4).
    fn weight(&self) -> BaseWeight;
    /// The layer as a [`Projection`] that a decoder layer differentiated by hand
    /// ([`helix_ops::decoder_layer`]) runs: this rank's shard, which the decoder layer places
    /// as the model does (q/k/v/gate/up column-, o/down row-parallel). A LoRA layer with
    /// dropout draws its next mask here, as its `forward` would: ask once per forward that
    /// runs the projection. `None` (a layer that cannot be run so) keeps the decoder layer on
    /// the op graph.
    fn projection(&self) -> Option<Projection> {
        None
    }
}

/// `x Wᵀ` for x [..., in] and W [out, in] (see [`helix_ops::linear`]).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    helix_ops::linear(x, w)
}

/// `y = x Wᵀ`, W [out, in] as Hugging Face stores it (or in NF4). Llama has no biases.
#[derive(Debug, Clone)]
pub struct Dense {
    pub weight: BaseWeight,
}

impl Dense {
    pub fn new(weight: impl Into<BaseWeight>) -> Self {
        Self {
            weight: weight.into(),
        }
    }
}

impl Linear for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_base(x, &self.weight)
    }

    fn weight(&self) -> BaseWeight {
        self.weight.clone()
    }

    fn projection(&self) -> Option<Projection> {
        Some(Projection::Dense {
            weight: self.weight.clone(),
        })
    }
}

/// How the decoder layers' frozen projections are held (`model.quantize_base`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quantization {
    /// As loaded, in the model's dtype.
    #[default]
    None,
    /// NF4 (QLoRA, torchao's layout: [`helix_ops::nf4`]), dequantized where a product reads it.
    Nf4,
}

impl Quantization {
    /// `none` or `nf4`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Quantization::None),
            "nf4" => Some(Quantization::Nf4),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Nf4 => "nf4",
        }
    }
}

/// How a projection is split over a tensor-parallel group (Megatron's layers).
#[derive(Clone)]
pub enum Placement {
    /// The whole weight, on this rank alone.
    Whole,
    /// Output features split (q/k/v/gate/up): this rank holds rows of W and sees the whole
    /// input; its output is its slice of the features.
    Column(SharedCollective),
    /// Input features split (o/down): this rank holds the columns of W matching its slice of
    /// the input; the outputs are summed over the group.
    Row(SharedCollective),
}

impl Placement {
    /// `x Wᵀ` for this placement: the whole product, a column shard of it (the input's
    /// gradient summed over the group), or the sum of the ranks' partial products.
    pub fn forward(&self, x: &Tensor, w: &BaseWeight) -> Result<Tensor> {
        match self {
            Placement::Whole => linear_base(x, w),
            Placement::Column(g) => linear_base(&copy_to_parallel_region(x, g)?, w),
            Placement::Row(g) => reduce_from_parallel_region(&linear_base(x, w)?, g),
        }
    }
}

/// A dense projection with its tensor-parallel placement.
pub struct PlacedDense {
    pub dense: Dense,
    pub placement: Placement,
}

impl Linear for PlacedDense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.placement.forward(x, &self.dense.weight)
    }

    fn weight(&self) -> BaseWeight {
        self.dense.weight.clone()
    }

    fn projection(&self) -> Option<Projection> {
        self.dense.projection()
    }
}

/// Replaces a dense layer, given its checkpoint name prefix (e.g.
/// `model.layers.3.self_attn.q_proj`), its weight (this rank's shard) and its placement.
pub type LinearHook<'a> = dyn Fn(&str, Dense, &Placement) -> anyhow::Result<Box<dyn Linear>> + 'a;

/// The default hook: the dense layer as it is placed.
pub fn keep_dense(_name: &str, d: Dense, placement: &Placement) -> anyhow::Result<Box<dyn Linear>> {
    Ok(match placement {
        Placement::Whole => Box::new(d),
        p => Box::new(PlacedDense {
            dense: d,
            placement: p.clone(),
        }),
    })
}

/// How a tensor is divided over a tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it.
    Replicated,
    /// Rank r holds part r of `size` equal parts along this dimension.
    Dim(usize),
}

/// Whether projection `leaf` (`q_proj`, `o_proj`…) is split by output (column-parallel) or by
/// input (row-parallel) features.
pub fn is_row_parallel(leaf: &str) -> bool {
    matches!(leaf, "o_proj" | "down_proj")
}

/// How the model's weight `name` (a checkpoint name) is divided: the vocabulary rows of the
/// embedding and LM head, the output rows of q/k/v/gate/up, the input columns of o/down; norms
/// are replicated.
pub fn weight_split(name: &str) -> Split {
    let Some(stem) = name.strip_suffix(".weight") else {
        return Split::Replicated;
    };
    let leaf = stem.rsplit('.').next().unwrap_or(stem);
    match leaf {
        "embed_tokens" | "lm_head" => Split::Dim(0),
        "q_proj" | "k_proj" | "v_proj" | "gate_proj" | "up_proj" => Split::Dim(0),
        "o_proj" | "down_proj" => Split::Dim(1),
        _ => Split::Replicated,
    }
}

/// Rank `rank`'s part of the whole tensor `full` under `split` (over `size` ranks).
pub fn shard_of(full: &Tensor, split: Split, rank: usize, size: usize) -> Result<Tensor> {
    match split {
        Split::Replicated => Ok(full.clone()),
        Split::Dim(d) => {
            let n = full.dim(d)?;
            if n % size != 0 {
                candle_core::bail!(
                    "dimension {d} of {:?} does not split {size} ways",
                    full.dims()
                );
            }
            full.narrow(d, rank * n / size, n / size)?.contiguous()
        }
    }
}
