//! Text generation with a KV cache: greedy decoding and sampling (temperature, top-k, top-p).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::llama::{KvCache, Llama};

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: vec![],
        }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Generates up to `max_new_tokens` after `prompt` (batch of one); returns only the new tokens
/// (a stop token, if reached, is included). `on_token` sees each token as it is chosen.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    opts: &SamplingOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    generate_after(model, None, prompt, opts, on_token)
}

/// [`generate`] with `prefix` embeddings [n, H] (P-tuning's virtual tokens) before the prompt,
/// at positions 0‥n−1, as PEFT generates with a prompt-learning adapter.
pub fn generate_after(
    model: &Llama,
    prefix: Option<&Tensor>,
    prompt: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    opts.validate()?;
    if prompt.is_empty() {
        bail!("the prompt is empty: nothing to continue from");
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let mut first = true;
    for _ in 0..opts.max_new_tokens {
        let mut embeds = model.embed(&input)?;
        if let (true, Some(p)) = (first, prefix) {
            let p = p.to_dtype(embeds.dtype())?.to_device(embeds.device())?;
            embeds = Tensor::cat(&[p.unsqueeze(0)?, embeds], 1)?;
        }
        first = false;
        let logits = model
            .forward_cached_embeds(&embeds, &mut cache)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let next = choose(&logits.to_vec1::<f32>()?, opts, &mut rng);
        out.push(next);
        on_token(next)?;
        if opts.stop_tokens.contains(&next) {
            break;
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(out)
}

/// Picks the next token from one row of logits.
pub fn choose(logits: &[f32], opts: &SamplingOptions, rng: &mut StdRng) -> u32 {
    if opts.temperature == 0.0 {
        return argmax(logits);
    }
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / opts.temperature as f32))
        .collect();
    // Descending by logit, ties by id, so the result does not depend on sort stability.
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if opts.top_k > 0 {
        cand.truncate(opts.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| ((l - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= opts.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u: f64 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return cand[i].0;
        }
        u -= p;
    }
    cand[probs.len() - 1].0
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let o = SamplingOptions::default();
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(choose(&[0.1, 3.0, 3.0, -1.0], &o, &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_restricts_the_support() {
        let logits = [0.0f32, 2.0, 1.0, 5.0, 4.9];
        let mut rng = StdRng::seed_from_u64(7);
        let k1 = SamplingOptions {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(choose(&logits, &k1, &mut rng), 3);
        }
        // p(3) ≈ 0.50, p(4) ≈ 0.45: top_p 0.9 keeps exactly {3, 4}.
        let p = SamplingOptions {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[choose(&logits, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[1] + seen[2], 0, "{seen:?}");
        assert!(seen[3] > 100 && seen[4] > 100, "{seen:?}");
    }

    #[test]
    fn sampling_is_reproducible_from_the_seed() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let o = SamplingOptions {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.95,
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..30)
                .map(|_| choose(&logits, &o, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn invalid_options_are_named() {
        let o = SamplingOptions {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().to_string().contains("top_p"));
        let o = SamplingOptions {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }
}
