//! P-tuning (Liu et al. 2021, "GPT Understands, Too") as Hugging Face PEFT implements it: a
//! small trainable prompt encoder turns `num_virtual_tokens` learned embeddings into virtual
//! tokens that are prepended to every input; the language model stays frozen.
//!
//! The encoder is PEFT's `PromptEncoder`: an embedding table [n, D] followed by an MLP
//! (Linear–ReLU–Linear–ReLU–Linear) or a bidirectional LSTM and a two-layer MLP. Parameter names
//! are PEFT's module names, so an encoder state moves between helix and PyTorch unchanged. After
//! training only the encoder's output is kept: a lookup table [n, D] (PEFT's
//! `prompt_embeddings`), which is all generation needs.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use helix_model::ForwardMask;
use helix_ops::IGNORE_INDEX;

use crate::dropout::SeededDropout;
use crate::init::{rng_for, standard_normal, uniform};
use crate::DecoderInputs;

/// PEFT's `encoder_reparameterization_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncoderType {
    #[serde(rename = "MLP", alias = "mlp")]
    Mlp,
    #[serde(rename = "LSTM", alias = "lstm")]
    Lstm,
}

impl EncoderType {
    pub fn peft_name(self) -> &'static str {
        match self {
            EncoderType::Mlp => "MLP",
            EncoderType::Lstm => "LSTM",
        }
    }
}

/// The `[ptuning]` settings (PEFT's `PromptEncoderConfig` names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtuningConfig {
    pub num_virtual_tokens: usize,
    #[serde(default = "default_encoder")]
    pub encoder_reparameterization_type: EncoderType,
    /// Hidden width of the encoder; the model's hidden size when not set.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (PEFT ignores it for the MLP, which always has three linears).
    #[serde(default = "default_lstm_layers")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers (PEFT applies none in the MLP).
    #[serde(default)]
    pub encoder_dropout: f64,
}

fn default_encoder() -> EncoderType {
    EncoderType::Mlp
}

fn default_lstm_layers() -> usize {
    2
}

impl PtuningConfig {
    pub fn mlp(num_virtual_tokens: usize, encoder_hidden_size: usize) -> Self {
        Self {
            num_virtual_tokens,
            encoder_reparameterization_type: EncoderType::Mlp,
            encoder_hidden_size: Some(encoder_hidden_size),
            encoder_num_layers: 2,
            encoder_dropout: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            bail!("ptuning.num_virtual_tokens must be at least 1");
        }
        if self.encoder_hidden_size == Some(0) {
            bail!("ptuning.encoder_hidden_size must be at least 1");
        }
        if self.encoder_num_layers == 0 {
            bail!("ptuning.encoder_num_layers must be at least 1");
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            bail!(
                "ptuning.encoder_dropout must be in [0, 1), got {}",
                self.encoder_dropout
            );
        }
        Ok(())
    }
}

/// PEFT's prompt encoder, trainable, in f32.
pub struct PromptEncoder {
    pub cfg: PtuningConfig,
    token_dim: usize,
    hidden: usize,
    /// By PEFT's module names (`embedding.weight`, `mlp_head.0.weight`, `lstm_head.weight_ih_l0`…).
    params: Vec<(String, Var)>,
    dropout: SeededDropout,
}

impl PromptEncoder {
    /// The parameters' names and shapes, in PyTorch's `named_parameters` order.
    pub fn param_shapes(cfg: &PtuningConfig, token_dim: usize) -> Vec<(String, Vec<usize>)> {
        let n = cfg.num_virtual_tokens;
        let h = cfg.encoder_hidden_size.unwrap_or(token_dim);
        let d = token_dim;
        let mut out = vec![("embedding.weight".to_string(), vec![n, d])];
        let mut linear = |i: usize, out_dim: usize, in_dim: usize| {
            out.push((format!("mlp_head.{i}.weight"), vec![out_dim, in_dim]));
            out.push((format!("mlp_head.{i}.bias"), vec![out_dim]));
        };
        match cfg.encoder_reparameterization_type {
            EncoderType::Mlp => {
                linear(0, h, d);
                linear(2, h, h);
                linear(4, d, h);
            }
            EncoderType::Lstm => {
                let mut lstm = Vec::new();
                for l in 0..cfg.encoder_num_layers {
                    let input = if l == 0 { d } else { 2 * h };
                    for dir in ["", "_reverse"] {
                        lstm.push((format!("lstm_head.weight_ih_l{l}{dir}"), vec![4 * h, input]));
                        lstm.push((format!("lstm_head.weight_hh_l{l}{dir}"), vec![4 * h, h]));
                        lstm.push((format!("lstm_head.bias_ih_l{l}{dir}"), vec![4 * h]));
                        lstm.push((format!("lstm_head.bias_hh_l{l}{dir}"), vec![4 * h]));
                    }
                }
                linear(0, 2 * h, 2 * h);
                linear(2, d, 2 * h);
                out.splice(1..1, lstm);
            }
        }
        out
    }

    /// A fresh encoder initialised as PyTorch does: the embedding N(0, 1), linears
    /// U(±1/√fan_in), LSTM weights U(±1/√hidden); seeded from `seed` and each name.
    pub fn init(cfg: &PtuningConfig, token_dim: usize, seed: u64, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let hidden = cfg.encoder_hidden_size.unwrap_or(token_dim);
        let mut params = Vec::new();
        for (name, shape) in Self::param_shapes(cfg, token_dim) {
            let mut rng = rng_for(seed, &format!("prompt_encoder.{name}"));
            let var = if name == "embedding.weight" {
                standard_normal(&mut rng, &shape, dev)?
            } else if name.starts_with("lstm_head.") {
                uniform(&mut rng, &shape, 1.0 / (hidden as f64).sqrt(), dev)?
            } else {
                // A bias has the fan-in of the weight beside it.
                let weight = name.replace(".bias", ".weight");
                let fan_in = Self::param_shapes(cfg, token_dim)
                    .into_iter()
                    .find(|(n, _)| *n == weight)
                    .map(|(_, s)| s[1])
                    .expect("every bias has a weight");
                uniform(&mut rng, &shape, 1.0 / (fan_in as f64).sqrt(), dev)?
            };
            params.push((name, var));
        }
        Ok(Self {
            cfg: cfg.clone(),
            token_dim,
            hidden,
            params,
            dropout: SeededDropout::new(cfg.encoder_dropout, seed ^ 0x5054_554E),
        })
    }

    pub fn named_vars(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn dropout(&self) -> &SeededDropout {
        &self.dropout
    }

    /// A parameter; detached in eval mode, so no graph is recorded.
    fn p(&self, name: &str) -> Tensor {
        let t = self
            .params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
            .unwrap_or_else(|| panic!("prompt encoder has no parameter {name}"));
        match self.dropout.is_training() {
            true => t.clone(),
            false => t.detach(),
        }
    }

    fn linear(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.p(&format!("mlp_head.{i}.weight"));
        let b = self.p(&format!("mlp_head.{i}.bias"));
        x.matmul(&w.t()?)?.broadcast_add(&b)
    }

    /// The virtual tokens [n, D] (f32): the encoder applied to its embedding table.
    pub fn forward(&self) -> candle_core::Result<Tensor> {
        let x = self.p("embedding.weight");
        match self.cfg.encoder_reparameterization_type {
            EncoderType::Mlp => {
                let x = self.linear(0, &x)?.relu()?;
                let x = self.linear(2, &x)?.relu()?;
                self.linear(4, &x)
            }
            EncoderType::Lstm => {
                let mut x = x;
                for l in 0..self.cfg.encoder_num_layers {
                    if l > 0 {
                        // nn.LSTM's dropout acts on the outputs of every layer but the last.
                        x = self.dropout.apply(&x)?;
                    }
                    let fwd = self.lstm_direction(&x, l, "", false)?;
                    let bwd = self.lstm_direction(&x, l, "_reverse", true)?;
                    x = Tensor::cat(&[fwd, bwd], 1)?;
                }
                let x = self.linear(0, &x)?.relu()?;
                self.linear(2, &x)
            }
        }
    }

    /// One direction of one LSTM layer over the sequence x [T, in] → [T, hidden], with
    /// PyTorch's gate order (input, forget, cell, output).
    fn lstm_direction(
        &self,
        x: &Tensor,
        layer: usize,
        suffix: &str,
        reverse: bool,
    ) -> candle_core::Result<Tensor> {
        let h = self.hidden;
        let name = |k: &str| format!("lstm_head.{k}_l{layer}{suffix}");
        let w_hh = self.p(&name("weight_hh"));
        // The input part of every step at once: x W_ihᵀ + b_ih + b_hh, [T, 4h].
        let bias = (self.p(&name("bias_ih")) + self.p(&name("bias_hh")))?;
        let xw = x
            .matmul(&self.p(&name("weight_ih")).t()?)?
            .broadcast_add(&bias)?;
        let steps = x.dim(0)?;
        let mut h_t = Tensor::zeros((1, h), DType::F32, x.device())?;
        let mut c_t = h_t.clone();
        let mut outs = vec![None; steps];
        let order: Vec<usize> = if reverse {
            (0..steps).rev().collect()
        } else {
            (0..steps).collect()
        };
        for t in order {
            let gates = (xw.narrow(0, t, 1)? + h_t.matmul(&w_hh.t()?)?)?;
            let i = sigmoid(&gates.narrow(1, 0, h)?)?;
            let f = sigmoid(&gates.narrow(1, h, h)?)?;
            let g = gates.narrow(1, 2 * h, h)?.tanh()?;
            let o = sigmoid(&gates.narrow(1, 3 * h, h)?)?;
            c_t = ((f * &c_t)? + (i * g)?)?;
            h_t = (o * c_t.tanh()?)?;
            outs[t] = Some(h_t.clone());
        }
        let outs: Vec<Tensor> = outs.into_iter().map(|o| o.expect("every step")).collect();
        Tensor::cat(&outs, 0)
    }

    /// Sets every parameter from `tensors` (keys: `prefix` + the names of
    /// [`Self::named_vars`]); see [`crate::load_named_vars`].
    pub fn load_state(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        source: &std::path::Path,
    ) -> Result<()> {
        crate::load_named_vars(&self.params, tensors, prefix, source)
    }

    pub fn token_dim(&self) -> usize {
        self.token_dim
    }
}

/// σ(x) = (1 + tanh(x/2)) / 2: exact, and its gradient never meets inf/inf as 1/(1+e⁻ˣ)'s can.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

/// What produces the virtual tokens: the trainable encoder, or the table it left behind.
pub enum VirtualTokens {
    Encoder(PromptEncoder),
    Table(Tensor),
}

/// A P-tuning adapter on a model.
pub struct Ptuning {
    pub cfg: PtuningConfig,
    pub tokens: VirtualTokens,
}

impl Ptuning {
    pub fn num_virtual_tokens(&self) -> usize {
        self.cfg.num_virtual_tokens
    }

    /// The virtual tokens [n, D] in f32; differentiable with respect to the encoder.
    pub fn prompts(&self) -> candle_core::Result<Tensor> {
        match &self.tokens {
            VirtualTokens::Encoder(e) => e.forward(),
            VirtualTokens::Table(t) => Ok(t.clone()),
        }
    }

    /// The lookup table PEFT saves as `prompt_embeddings`: the encoder's output, detached.
    pub fn prompt_embeddings(&self) -> candle_core::Result<Tensor> {
        let train = self.set_training(false);
        let out = self.prompts().map(|t| t.detach());
        self.set_training(train);
        out
    }

    /// Trainable tensors, by PEFT's names (`prompt_encoder.default.<module>`); none for a table.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        match &self.tokens {
            VirtualTokens::Encoder(e) => e
                .named_vars()
                .iter()
                .map(|(n, v)| (format!("{ENCODER_PREFIX}{n}"), v.clone()))
                .collect(),
            VirtualTokens::Table(_) => Vec::new(),
        }
    }

    /// Sets train (dropout on) or eval mode; returns the previous mode.
    pub fn set_training(&self, on: bool) -> bool {
        match &self.tokens {
            VirtualTokens::Encoder(e) => {
                let was = e.dropout.is_training();
                e.dropout.set_training(on);
                was
            }
            VirtualTokens::Table(_) => false,
        }
    }

    /// Prepends the virtual tokens to a right-padded batch as PEFT's forward does: embeddings
    /// [B, n + S, H] in the model's dtype, positions 0‥n−1 then the inputs' shifted by n, labels
    /// with n ignored positions first, and the virtual tokens always attended to. Packed rows
    /// (segment ids) are refused: each document would need its own virtual tokens.
    pub fn prepend(
        &self,
        embeds: &Tensor,
        position_ids: &Tensor,
        labels: Option<&Tensor>,
        mask: &ForwardMask,
    ) -> Result<DecoderInputs> {
        if mask.segment_ids.is_some() {
            bail!("P-tuning does not support packed sequences (set data.packing = false)");
        }
        let n = self.num_virtual_tokens();
        let (b, s, d) = embeds.dims3()?;
        let prompts = self.prompts()?;
        if prompts.dims() != [n, d] {
            bail!(
                "virtual tokens have shape {:?}, the model's embeddings are {d} wide",
                prompts.dims()
            );
        }
        let prompts = prompts
            .to_dtype(embeds.dtype())?
            .unsqueeze(0)?
            .broadcast_as((b, n, d))?;
        let dev = embeds.device();
        let virtual_pos = Tensor::arange(0i64, n as i64, dev)?
            .unsqueeze(0)?
            .broadcast_as((b, n))?;
        let shifted = (position_ids.to_dtype(DType::I64)? + n as f64)?;
        let labels = match labels {
            Some(l) => Some(Tensor::cat(
                &[
                    Tensor::full(IGNORE_INDEX, (b, n), dev)?,
                    l.to_dtype(DType::I64)?,
                ],
                1,
            )?),
            None => None,
        };
        let key_valid = mask.key_valid.as_ref().map(|kv| {
            kv.chunks(s)
                .flat_map(|row| std::iter::repeat_n(1u8, n).chain(row.iter().copied()))
                .collect()
        });
        Ok(DecoderInputs {
            embeds: Tensor::cat(&[prompts, embeds.clone()], 1)?,
            position_ids: Tensor::cat(&[virtual_pos, shifted], 1)?,
            labels,
            mask: ForwardMask {
                key_valid,
                segment_ids: None,
            },
        })
    }
}

/// Where PEFT keeps the encoder in a model's state dict.
pub const ENCODER_PREFIX: &str = "prompt_encoder.default.";
