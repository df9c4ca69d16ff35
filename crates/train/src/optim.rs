//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias correction, same
//! order of operations), with f32 state and f32 master weights for parameters held in bf16 or
//! f16; and gradient clipping by global norm as `torch.nn.utils.clip_grad_norm_`.
//!
//! Weight decay skips 1-D tensors (norm weights, biases), as Megatron / NeMo and the Hugging
//! Face Trainer do.
//!
//! With ZeRO-1 ([`AdamW::shard_state`], NeMo's distributed optimizer) each data-parallel rank
//! keeps the moments and master weights of the parameters it owns only, receives only their
//! summed gradients (a reduce-scatter), updates those, and gathers the updated parameters from
//! their owners ([`AdamW::sync_params`]): optimizer memory falls as 1/DP and gradient traffic
//! halves, while every rank computes what one process would.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use helix_kernels::{adamw_step, sums_of_squares, AdamWParam, AdamWStep};

/// Gradients by parameter name, in f32. Ordered, so sums over them (the global norm) are the
/// same in every process: bit-exact resume depends on it.
pub type Grads = BTreeMap<String, Tensor>;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

struct ParamState {
    name: String,
    var: Var,
    /// The data-parallel rank that keeps this parameter's state and updates it.
    owner: usize,
    /// The f32 copy the update is applied to when the parameter is not f32.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// This process's data-parallel rank (every parameter's owner without ZeRO-1).
    me: usize,
    sharded: bool,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                // Each state tensor owns its storage: on a GPU the update writes them in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                let master = match var.dtype() {
                    DType::F32 => None,
                    _ => Some(var.as_tensor().to_dtype(DType::F32)?),
                };
                Ok(ParamState {
                    decay: var.rank() >= 2,
                    owner: 0,
                    name,
                    master,
                    exp_avg: zeros()?,
                    exp_avg_sq: zeros()?,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            params,
            me: 0,
            sharded: false,
            step: 0,
        })
    }

    /// ZeRO-1 over `size` data-parallel ranks: every parameter gets an owner (the largest first,
    /// to the least loaded rank) and this rank drops the state of the others.
    pub fn shard_state(&mut self, rank: usize, size: usize) -> Result<()> {
        let mut order: Vec<usize> = (0..self.params.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.params[i].var.elem_count()));
        let mut load = vec![0usize; size];
        for i in order {
            let owner = (0..size).min_by_key(|&r| (load[r], r)).expect("size > 0");
            load[owner] += self.params[i].var.elem_count();
            self.params[i].owner = owner;
        }
        self.me = rank;
        self.sharded = size > 1;
        for p in self.params.iter_mut().filter(|p| p.owner != rank) {
            let none = Tensor::zeros(0, DType::F32, p.var.device())?;
            p.exp_avg = none.clone();
            p.exp_avg_sq = none;
            p.master = None;
        }
        Ok(())
    }

    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|p| {
                (p.exp_avg.elem_count()
                    + p.exp_avg_sq.elem_count()
                    + p.master.as_ref().map_or(0, |m| m.elem_count()))
                    * 4
            })
            .sum()
    }

    /// ZeRO-1's layout: every parameter name with its owner, grouped by owner in rank order
    /// (the order [`helix_parallel::Job::reduce_scatter_tensors`] and
    /// [`helix_parallel::Job::all_gather_tensors`] take).
    pub fn owner_order(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.owner))
            .collect();
        out.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        out
    }

    /// After a ZeRO-1 step: every parameter from its owner, gathered over the data-parallel
    /// group in buckets, so all ranks hold the same weights.
    pub fn sync_params(&self, job: &helix_parallel::Job, bucket_elems: usize) -> Result<()> {
        let by_name: HashMap<&str, &ParamState> =
            self.params.iter().map(|p| (p.name.as_str(), p)).collect();
        let order = self.owner_order();
        let owners: Vec<usize> = order.iter().map(|(_, o)| *o).collect();
        let mut tensors = order
            .iter()
            .map(|(n, _)| Ok(by_name[n.as_str()].var.as_tensor().to_dtype(DType::F32)?))
            .collect::<Result<Vec<_>>>()?;
        job.all_gather_tensors(&mut tensors, &owners, bucket_elems)?;
        for ((name, owner), t) in order.iter().zip(tensors) {
            if *owner != self.me {
                let var = &by_name[name.as_str()].var;
                var.set(&t.to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Whether this rank keeps (and checkpoints) the state of parameter `name`.
    pub fn owns(&self, name: &str) -> bool {
        self.params
            .iter()
            .any(|p| p.name == name && p.owner == self.me)
    }

    /// One update with `grads` (f32, by parameter name) at learning rate `lr`, each gradient
    /// first multiplied by `grad_scale` (the clipping coefficient from [`clip_scale`], or 1).
    /// Every parameter this rank owns is updated in one pass over its tensors: on a GPU one
    /// launch per parameter dtype ([`helix_kernels::adamw_step`]).
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let st = AdamWStep::new(
            self.step,
            lr,
            self.cfg.betas,
            self.cfg.eps,
            self.cfg.weight_decay,
        )
        .with_grad_scale(grad_scale);
        let me = self.me;
        let mut params = self
            .params
            .iter_mut()
            .filter(|p| p.owner == me)
            .map(|p| {
                let grad = grads
                    .get(&p.name)
                    .with_context(|| format!("no gradient for {}", p.name))?;
                Ok(AdamWParam {
                    param: &p.var,
                    master: p.master.as_mut(),
                    exp_avg: &mut p.exp_avg,
                    exp_avg_sq: &mut p.exp_avg_sq,
                    grad,
                    decays: p.decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        adamw_step(&mut params, &st).context("AdamW step")?;
        Ok(())
    }

    /// The state a checkpoint saves: `exp_avg.<name>`, `exp_avg_sq.<name>` and, for parameters
    /// not held in f32, `master.<name>` — of the parameters this rank owns (all of them without
    /// ZeRO-1). On a GPU the next step updates them in place: copy what must outlive it
    /// (the checkpoint's snapshot does, before training goes on).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in self.params.iter().filter(|p| p.owner == self.me) {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.clone()));
            out.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone()));
            if let Some(m) = &p.master {
                out.push((format!("master.{}", p.name), m.clone()));
            }
        }
        out
    }

    /// Restores [`Self::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        let get = |key: String, like: &Var| -> Result<Tensor> {
            let t = tensors
                .get(&key)
                .with_context(|| format!("optimizer state has no {key}"))?;
            if t.dims() != like.dims() {
                bail!(
                    "optimizer state {key} has shape {:?}, the parameter {:?}",
                    t.dims(),
                    like.dims()
                );
            }
            // A copy of its own: on a GPU the step updates it in place.
            Ok(t.to_dtype(DType::F32)?.to_device(like.device())?.copy()?)
        };
        for p in self.params.iter_mut().filter(|p| p.owner == self.me) {
            p.exp_avg = get(format!("exp_avg.{}", p.name), &p.var)?;
            p.exp_avg_sq = get(format!("exp_avg_sq.{}", p.name), &p.var)?;
            if p.master.is_some() {
                p.master = Some(get(format!("master.{}", p.name), &p.var)?);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of `grads` and the coefficient that clips it to `max_norm` (0 = no
/// clipping), as `clip_grad_norm_` computes them; [`AdamW::step`] applies the coefficient.
/// The squares are taken in one pass and added in name order, so every process sums alike
/// ([`helix_kernels::sums_of_squares`]).
pub fn clip_grad_norm(grads: &Grads, max_norm: f64) -> Result<(f64, f64)> {
    let squares: f64 = sums_of_squares(&grads.values().collect::<Vec<_>>())?
        .iter()
        .sum();
    let norm = squares.sqrt();
    Ok((norm, clip_scale(norm, max_norm)))
}

/// What the gradients are multiplied by so their norm `norm` is at most `max_norm`:
/// max_norm / (norm + 1e-6) when that is below 1, else 1 (and 1 when `max_norm` is 0).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    match max_norm > 0.0 {
        true => (max_norm / (norm + 1e-6)).min(1.0),
        false => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Schedule, ScheduleKind};
    use candle_core::Device;

    fn reference() -> HashMap<String, Tensor> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/optim/reference.safetensors");
        candle_core::safetensors::load(p, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
    }

    /// The one-pass update (helix_kernels::adamw_step, its CPU loop; the GPU's kernel is
    /// compared with that loop by kernel-check and in the emulator) equals the candle-op update
    /// to the last bit, with and without weight decay and with a clipping scale, over several
    /// steps.
    #[test]
    fn one_pass_adamw_equals_the_candle_op_update_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let n = 40_000; // more than one parallel chunk of the loop
        let mut w = Tensor::randn(0f32, 1.0, n, &dev)?;
        let mut m = Tensor::zeros(n, DType::F32, &dev)?;
        let mut v = m.clone();
        let param = Var::from_tensor(&w)?;
        let (mut m2, mut v2) = (m.clone(), v.clone());
        for t in 1..=4 {
            let g = Tensor::randn(0f32, 0.1, n, &dev)?;
            let decay = if t % 2 == 0 { 0.1 } else { 0.0 };
            let scale = if t == 3 { 0.25 } else { 1.0 };
            let st = AdamWStep::new(t, 1e-3, [0.9, 0.95], 1e-8, decay).with_grad_scale(scale);
            (w, m, v) = helix_kernels::unfused::adamw_update(&w, &m, &v, &g, &st)?;
            let mut one = [AdamWParam {
                param: &param,
                master: None,
                exp_avg: &mut m2,
                exp_avg_sq: &mut v2,
                grad: &g,
                decays: true,
            }];
            adamw_step(&mut one, &st)?;
            let w2 = param.as_tensor();
            for (what, a, b) in [("w", &w, w2), ("m", &m, &m2), ("v", &v, &v2)] {
                let (a, b) = (a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
                let differ = a
                    .iter()
                    .zip(&b)
                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "step {t}: {differ} of {n} values of {what} differ"
                );
            }
        }
        Ok(())
    }

    /// Six steps of clipping, the schedule and AdamW against torch.optim.AdamW +
    /// clip_grad_norm_ + transformers' cosine schedule (scripts/make_optim_reference.py); the
    /// same run with one parameter in bf16 keeps an f32 master that follows the f32 run.
    #[test]
    fn adamw_clipping_and_schedule_match_pytorch() -> Result<()> {
        let r = reference();
        let names = ["w", "emb", "norm"];
        for dtype in [DType::F32, DType::BF16] {
            let vars: Vec<(String, Var)> = names
                .iter()
                .map(|n| {
                    let t = r[&format!("init.{n}")].clone();
                    let t = if *n == "w" { t.to_dtype(dtype)? } else { t };
                    Ok((n.to_string(), Var::from_tensor(&t)?))
                })
                .collect::<Result<_>>()?;
            let cfg = AdamWConfig {
                betas: [0.9, 0.95],
                eps: 1e-8,
                weight_decay: 0.1,
            };
            let mut opt = AdamW::new(vars.clone(), cfg)?;
            let sched = Schedule::new(ScheduleKind::Cosine, 1e-2, 1e-3, Some(2), None, 6);
            for k in 0..6 {
                let lr = sched.lr(k);
                let want_lr = r[&format!("lr.{k}")].to_scalar::<f64>()?;
                assert!((lr - want_lr).abs() <= 1e-15 * want_lr.max(1.0), "lr {k}");
                let grads: Grads = names
                    .iter()
                    .map(|n| (n.to_string(), r[&format!("grad.{k}.{n}")].clone()))
                    .collect();
                let (norm, scale) = clip_grad_norm(&grads, 1.0)?;
                let want = r[&format!("norm.{k}")].to_scalar::<f64>()?;
                assert!(
                    (norm - want).abs() < 1e-6 * want,
                    "norm {k}: {norm} vs {want}"
                );
                opt.step(&grads, lr, scale)?;
                for (n, v) in &vars {
                    let want = &r[&format!("param.{k}.{n}")];
                    let got = match opt
                        .state_tensors()
                        .iter()
                        .find(|(k, _)| *k == format!("master.{n}"))
                    {
                        Some((_, m)) => m.clone(),
                        None => v.as_tensor().clone(),
                    };
                    if v.dtype() == DType::F32 {
                        let rel = max_rel(&got, want);
                        assert!(rel < 1e-5, "step {k} {n}: {rel:e}");
                    } else {
                        // The bf16 run starts from rounded weights; its updates must be torch's.
                        let init = &r[&format!("init.{n}")];
                        let start = init.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
                        let (moved, want_moved) = ((&got - &start)?, (want - init)?);
                        let d = (&moved - &want_moved)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?;
                        let scale = want_moved.abs()?.max_all()?.to_scalar::<f32>()?;
                        assert!(d <= 1e-3 * scale + 1e-7, "bf16 master, step {k} {n}: {d:e}");
                    }
                    if v.dtype() == DType::BF16 {
                        assert_eq!(
                            v.as_tensor().to_dtype(DType::F32)?.to_vec2::<f32>()?,
                            got.to_dtype(DType::BF16)?
                                .to_dtype(DType::F32)?
                                .to_vec2::<f32>()?,
                            "the bf16 parameter is its master rounded"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn schedules_match_transformers() {
        let r = reference();
        for (name, kind, min_lr) in [
            ("cosine", ScheduleKind::Cosine, 1e-4),
            ("linear", ScheduleKind::Linear, 0.0),
            ("constant", ScheduleKind::Constant, 0.0),
        ] {
            let s = Schedule::new(kind, 1e-3, min_lr, Some(5), None, 50);
            let want = r[&format!("sched.{name}")].to_vec1::<f64>().unwrap();
            for (step, w) in want.iter().enumerate() {
                let got = s.lr(step as u64);
                assert!((got - w).abs() <= 1e-15, "{name} step {step}: {got} vs {w}");
            }
        }
    }

    #[test]
    fn state_round_trips_and_decay_skips_vectors() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &dev)?)?;
        let b = Var::from_tensor(&Tensor::ones(2, DType::F32, &dev)?)?;
        let cfg = AdamWConfig {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let params = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
        let mut opt = AdamW::new(params.clone(), cfg)?;
        let zero: Grads = [
            ("w".to_string(), Tensor::zeros((2, 2), DType::F32, &dev)?),
            ("b".to_string(), Tensor::zeros(2, DType::F32, &dev)?),
        ]
        .into();
        opt.step(&zero, 0.1, 1.0)?;
        // Zero gradient: only decay moves w (by lr · wd); b is a vector and stays.
        assert_eq!(w.as_tensor().to_vec2::<f32>()?, vec![vec![0.95f32; 2]; 2]);
        assert_eq!(b.as_tensor().to_vec1::<f32>()?, vec![1.0f32; 2]);
        let saved: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut again = AdamW::new(params, cfg)?;
        again.load_state(&saved, opt.step)?;
        assert_eq!(again.step, 1);
        let err = again
            .load_state(&HashMap::new(), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exp_avg.w"), "{err}");
        Ok(())
    }
}
