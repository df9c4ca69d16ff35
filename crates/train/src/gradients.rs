//! One optimizer step's gradients: each micro-batch forward and backward — keeping every
//! activation, or with activation checkpointing keeping only each decoder layer's input and
//! recomputing the layer in backward — summed over the step, then reduced over data-parallel
//! ranks; and the global norm of the result.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use helix_data::Batch;
use helix_model::linear::Split;
use helix_model::ForwardMask;
use helix_ops::with_backward;
use helix_parallel::Job;
use helix_peft::{Customized, ModelBatch};
use serde::{Deserialize, Serialize};

use helix_kernels::sums_of_squares;

use crate::optim::Grads;

/// What the backward pass may keep of the forward's activations (`trainer.activation_checkpointing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCheckpointing {
    /// Every activation of every layer, from the forward until its backward.
    #[default]
    None,
    /// Each decoder layer's input only; the backward recomputes the layer's forward before
    /// going through it (one extra forward per step; the gradients do not change).
    Full,
}

impl ActivationCheckpointing {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Full => "full",
        }
    }
}

/// How [`forward_backward`] computes and reduces a step's gradients.
#[derive(Clone, Debug)]
pub struct GradientOptions {
    /// Rows per chunk of the fused LM head + cross-entropy.
    pub loss_chunk_rows: usize,
    /// Elements per data-parallel all-reduce / reduce-scatter bucket.
    pub bucket_elems: usize,
    pub activation_checkpointing: ActivationCheckpointing,
}

impl Default for GradientOptions {
    fn default() -> Self {
        Self {
            loss_chunk_rows: crate::config::default_loss_chunk(),
            bucket_elems: usize::MAX,
            activation_checkpointing: ActivationCheckpointing::None,
        }
    }
}

/// A host batch on the model's device.
pub(crate) struct DeviceBatch {
    input_ids: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    mask: ForwardMask,
}

impl DeviceBatch {
    pub(crate) fn new(b: &Batch, dev: &Device) -> Result<Self> {
        let shape = (b.rows, b.seq_len);
        Ok(Self {
            input_ids: Tensor::from_vec(b.input_ids.clone(), shape, dev)?,
            position_ids: Tensor::from_vec(b.position_ids.clone(), shape, dev)?,
            labels: Tensor::from_vec(b.labels.clone(), shape, dev)?,
            mask: ForwardMask {
                key_valid: b.key_valid.clone(),
                segment_ids: b.segment_ids.clone(),
            },
        })
    }

    pub(crate) fn model_batch(&self) -> ModelBatch<'_> {
        ModelBatch {
            input_ids: &self.input_ids,
            position_ids: &self.position_ids,
            labels: Some(&self.labels),
            mask: &self.mask,
        }
    }
}

/// One optimizer step's forward and backward over its micro-batches and every data-parallel
/// rank's: the loss is the sum over all of them divided by the step's target tokens over all
/// ranks, so a long answer weighs what its tokens weigh wherever it lands. Returns that loss,
/// the tokens all ranks processed, and the f32 gradients (summed over ranks: the same on each;
/// under ZeRO-1, `zero1` gives the owners, each rank keeps only the gradients it owns).
pub fn forward_backward(
    model: &Customized,
    batches: &[Batch],
    opts: &GradientOptions,
    job: &Job,
    zero1: Option<&[(String, usize)]>,
) -> Result<(f64, u64, Grads)> {
    let dev = model.model.device().clone();
    let mut targets = [batches
        .iter()
        .map(|b| model.count_targets(&b.labels, b.seq_len))
        .sum::<usize>() as f64];
    job.sum_f64(&mut targets)?;
    let denom = targets[0].max(1.0);
    let vars = model.trainable();
    let mut grads = Grads::new();
    let mut sums = [
        0f64,
        batches.iter().map(|b| b.real_tokens).sum::<usize>() as f64,
    ];
    for b in batches {
        let t = DeviceBatch::new(b, &dev)?;
        let mut add = |store: &GradStore| add_grads(store, &vars, &mut grads);
        sums[0] += match opts.activation_checkpointing {
            ActivationCheckpointing::None => {
                let (sum, _) = model.loss_sum(&t.model_batch(), opts.loss_chunk_rows)?;
                let loss = sum.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
                add(&(sum / denom)?.backward()?)?;
                loss
            }
            ActivationCheckpointing::Full => {
                checkpointed_backward(model, &t.model_batch(), opts.loss_chunk_rows, denom, add)?
            }
        };
    }
    job.sum_f64(&mut sums)?;
    match zero1 {
        // ZeRO-1: each rank receives the summed gradients of the parameters it owns only.
        Some(order) => {
            let (names, owners): (Vec<&String>, Vec<usize>) =
                order.iter().map(|(n, o)| (n, *o)).unzip();
            let mut tensors = names
                .iter()
                .map(|n| {
                    grads
                        .get(*n)
                        .cloned()
                        .with_context(|| format!("no gradient for {n}"))
                })
                .collect::<Result<Vec<_>>>()?;
            job.reduce_scatter_tensors(&mut tensors, &owners, opts.bucket_elems)?;
            grads = names
                .into_iter()
                .zip(owners)
                .zip(tensors)
                .filter(|((_, o), _)| *o == job.dp.index)
                .map(|((n, _), t)| (n.clone(), t))
                .collect();
        }
        None if job.world > 1 => {
            let names: Vec<String> = grads.keys().cloned().collect();
            let mut tensors: Vec<Tensor> = names.iter().map(|n| grads[n].clone()).collect();
            job.all_reduce_tensors(&mut tensors, opts.bucket_elems)?;
            grads = names.into_iter().zip(tensors).collect();
        }
        None => {}
    }
    Ok((sums[0] / denom, sums[1] as u64, grads))
}

/// Adds the f32 gradients in `store` of the trainable tensors into `grads`, by name.
fn add_grads(store: &GradStore, vars: &[(String, Var)], grads: &mut Grads) -> Result<()> {
    for (name, var) in vars {
        let Some(g) = store.get(var) else { continue };
        let g = g.to_dtype(DType::F32)?;
        let acc = match grads.remove(name) {
            Some(acc) => (acc + g)?,
            None => g,
        };
        grads.insert(name.clone(), acc);
    }
    Ok(())
}

/// The backward of one micro-batch with activation checkpointing (Megatron's "full"
/// recomputation, per decoder layer). The forward runs the layers without a graph and keeps
/// only each layer's input; the LM head and loss run with one and are differentiated first;
/// then, last layer first, each layer's forward is run again from its saved input, with the
/// dropout counters it started from (so it draws the same masks), and differentiated with the
/// gradient of its output. Memory holds the layer inputs and one layer's activations instead
/// of every layer's. `add` receives each part's gradients; returns the summed loss.
fn checkpointed_backward(
    model: &Customized,
    batch: &ModelBatch,
    chunk_rows: usize,
    denom: f64,
    mut add: impl FnMut(&GradStore) -> Result<()>,
) -> Result<f64> {
    let llama = &model.model;
    let inputs = model.decoder_inputs(batch)?;
    let Some(labels) = &inputs.labels else {
        bail!("activation checkpointing needs labels");
    };
    let ctx = llama.layer_context(&inputs.embeds, &inputs.position_ids, &inputs.mask)?;
    let mut saved = Vec::with_capacity(llama.num_layers());
    // Under sequence parallelism the layers, and so the saved inputs, hold this rank's chunk
    // of the tokens; the whole embeddings are then kept only where a gradient reaches them
    // through the chunk (P-tuning, full SFT).
    let entry = llama.enter_layers(&inputs.embeds, &ctx)?;
    drop(inputs.embeds);
    let mut x = entry.detach();
    for i in 0..llama.num_layers() {
        let dropout_state = model.rng_state();
        // Detaching drops the layer's graph, and with it every activation but the output.
        let y = llama.forward_layer(i, &x, &ctx)?.detach();
        saved.push((std::mem::replace(&mut x, y), dropout_state));
    }
    let dropout_after = model.rng_state();

    let last = Var::from_tensor(&x)?;
    drop(x);
    let hidden = llama.final_norm(last.as_tensor(), &ctx)?;
    let (sum, _) = llama.loss_sum(&hidden, labels, chunk_rows)?;
    let loss = sum.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
    let store = (sum / denom)?.backward()?;
    add(&store)?;
    let mut grad = gradient_of(&store, &last, "the last decoder layer's output")?;
    drop(store);

    while let Some((x, dropout_state)) = saved.pop() {
        let i = saved.len();
        model.set_rng_state(&dropout_state)?;
        let input = Var::from_tensor(&x)?;
        drop(x);
        let y = llama.forward_layer(i, input.as_tensor(), &ctx)?;
        let store = backward_from(&y, grad)?;
        add(&store)?;
        grad = gradient_of(&store, &input, &format!("decoder layer {i}'s input"))?;
    }
    model.set_rng_state(&dropout_after)?;
    // The embeddings and P-tuning's virtual tokens, when they train.
    if entry.track_op() {
        add(&backward_from(&entry, grad)?)?;
    }
    Ok(loss)
}

/// Back-propagates `grad` (d loss / d `y`) through the graph that produced `y`.
fn backward_from(y: &Tensor, grad: Tensor) -> Result<GradStore> {
    // A scalar whose backward hands `grad` to `y`: candle seeds a backward with ones only.
    let zero = Tensor::zeros((), DType::F32, y.device())?;
    let seed = with_backward(y, zero, move |_| Ok(grad.clone()))?;
    Ok(seed.backward()?)
}

fn gradient_of(store: &GradStore, var: &Var, what: &str) -> Result<Tensor> {
    store
        .get(var)
        .cloned()
        .with_context(|| format!("the loss does not depend on {what}"))
}

/// The L2 norm of all gradients of the model, whatever its split: shards' squares are summed
/// over the tensor-parallel group, replicated tensors counted once (Megatron's clip_grad_norm);
/// under ZeRO-1 (`owned_only`) each data-parallel rank holds its own parameters' gradients,
/// so the squares are summed over that group too.
pub(crate) fn global_grad_norm(
    grads: &Grads,
    model: &Customized,
    job: &Job,
    owned_only: bool,
) -> Result<f64> {
    // Every gradient's sum of squares in one pass (one copy from a GPU), added in name order.
    let sums = sums_of_squares(&grads.values().collect::<Vec<_>>())?;
    let (mut sharded, mut replicated) = ([0f64], 0f64);
    for (name, sum) in grads.keys().zip(sums) {
        match model.split_of(name) {
            Split::Replicated => replicated += sum,
            Split::Dim(_) => sharded[0] += sum,
        }
    }
    job.tp.all_reduce_sum(&mut sharded)?;
    let mut total = [sharded[0] + replicated];
    if owned_only {
        job.dp.all_reduce_sum(&mut total)?;
    }
    Ok(total[0].sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_data::LossMode;
    use helix_data::{collate_padded, PadOptions, Sample};
    use helix_model::{LlamaConfig, SafetensorsWeights};
    use helix_peft::{load_for_method, LoraConfig, Method, PtuningConfig, LLAMA_TARGETS};
    use std::path::{Path, PathBuf};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    fn load(name: &str, method: &Method) -> Result<Customized> {
        let dir = fixture(name);
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(&dir)?;
        load_for_method(&cfg, &weights, method, 3, DType::F32, &Device::Cpu)
    }

    /// The loss of a step is its micro-batches' summed loss over the step's target tokens:
    /// two micro-batches of one row give the loss and gradients of one micro-batch of both.
    #[test]
    fn accumulated_micro_batches_equal_one_batch_of_their_rows() -> Result<()> {
        let mut lora = LoraConfig::new(4, 8.0, &LLAMA_TARGETS);
        lora.lora_dropout = 0.0;
        let model = load("tiny-gqa-untied-b3", &Method::Lora(lora))?;
        // Non-zero B so every adapter weight has a gradient.
        for (_, v) in model.trainable() {
            v.set(&(v.as_tensor().ones_like()? * 0.05)?)?;
        }
        let a = Sample::new(vec![3, 9, 4, 17, 8, 11, 2], 2, 0, LossMode::AnswerOnly);
        let b = Sample::new(vec![5, 6, 30, 2], 1, 1, LossMode::AnswerOnly);
        let pad = PadOptions::default();
        let one = [collate_padded(&[&a, &b], &pad)?];
        let two = [collate_padded(&[&a], &pad)?, collate_padded(&[&b], &pad)?];
        let job = Job::single(std::time::Duration::from_secs(1));
        let opts = GradientOptions {
            loss_chunk_rows: 64,
            ..Default::default()
        };
        let (l1, _, g1) = forward_backward(&model, &one, &opts, &job, None)?;
        let (l2, _, g2) = forward_backward(&model, &two, &opts, &job, None)?;
        assert!((l1 - l2).abs() < 1e-6 * l1, "{l1} vs {l2}");
        assert_eq!(g1.len(), model.trainable().len());
        for (name, g) in &g1 {
            let d = (g - &g2[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
            let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d <= 1e-5 * m, "{name}: {d} of {m}");
        }
        // And it is the mean over target tokens: (5 + 3) targets, not a mean of two means.
        let (sum_a, na) = {
            let t = DeviceBatch::new(&two[0], &Device::Cpu)?;
            let (s, n) = model.loss_sum(&t.model_batch(), 64)?;
            (s.to_scalar::<f32>()? as f64, n)
        };
        let (sum_b, nb) = {
            let t = DeviceBatch::new(&two[1], &Device::Cpu)?;
            let (s, n) = model.loss_sum(&t.model_batch(), 64)?;
            (s.to_scalar::<f32>()? as f64, n)
        };
        assert_eq!((na, nb), (5, 3));
        assert!((l2 - (sum_a + sum_b) / 8.0).abs() < 1e-9);
        Ok(())
    }

    /// Two padded rows and one packed row of two documents, as the trainer collates them.
    fn batches() -> Result<Vec<Batch>> {
        use helix_data::collate_packed;
        let a = Sample::new(
            vec![3, 9, 4, 17, 8, 11, 2, 5, 6],
            3,
            0,
            LossMode::AnswerOnly,
        );
        let b = Sample::new(vec![5, 6, 30, 2], 1, 1, LossMode::AnswerOnly);
        let c = Sample::new(vec![7, 1, 12, 13, 14], 2, 2, LossMode::WholeSequence);
        Ok(vec![
            collate_padded(&[&a, &b], &PadOptions::default())?,
            collate_packed(&[vec![&b, &c]], 10, &PadOptions::default())?,
        ])
    }

    /// One fixture per method, with LoRA's dropout, and whether the method takes packed rows.
    fn method_cases(lora_dropout: f64) -> [(&'static str, Method, bool); 4] {
        let mut lora = LoraConfig::new(4, 8.0, &LLAMA_TARGETS);
        lora.lora_dropout = lora_dropout;
        let dora = LoraConfig {
            use_dora: true,
            ..lora.clone()
        };
        [
            ("tiny-gqa-untied-b3", Method::Lora(lora), true),
            ("tiny-mha-untied", Method::Lora(dora), true),
            ("tiny-gqa-tied", Method::FullSft, true),
            (
                "tiny-mha-untied",
                Method::Ptuning(PtuningConfig::mlp(3, 16)),
                false,
            ),
        ]
    }

    /// The largest |a − b| over two gradients and the largest |a|.
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        Ok((diff, max))
    }

    /// Recomputing each decoder layer in backward gives the gradients of the backward that kept
    /// every activation, bit for bit (the same operations in the same order), for every method,
    /// with dropout on (the recomputed layer draws its first forward's masks) over two steps.
    #[test]
    fn full_activation_checkpointing_gives_the_plain_backwards_gradients() -> Result<()> {
        let cases = method_cases(0.1);
        let job = Job::single(std::time::Duration::from_secs(1));
        for (fixture, method, packed) in cases {
            let batches = batches()?;
            let batches = if packed { &batches[..] } else { &batches[..1] };
            let mut losses = Vec::new();
            let mut grads = Vec::new();
            for mode in [ActivationCheckpointing::None, ActivationCheckpointing::Full] {
                let model = load(fixture, &method)?;
                // Non-zero LoRA B so every adapter weight has a gradient.
                for (name, v) in model.trainable() {
                    if name.contains("lora_B") {
                        v.set(&(v.as_tensor().ones_like()? * 0.05)?)?;
                    }
                }
                let opts = GradientOptions {
                    loss_chunk_rows: 5,
                    activation_checkpointing: mode,
                    ..Default::default()
                };
                let mut run = Vec::new();
                for _ in 0..2 {
                    let (loss, _, g) = forward_backward(&model, batches, &opts, &job, None)?;
                    losses.push(loss);
                    run.push(g);
                }
                grads.push((run, model.rng_state()));
            }
            let name = method.name();
            assert_eq!(&losses[..2], &losses[2..], "{name}: losses");
            let ((plain, plain_rng), (full, full_rng)) = (&grads[0], &grads[1]);
            assert_eq!(
                plain_rng, full_rng,
                "{name}: dropout counters after the steps"
            );
            for (step, (p, f)) in plain.iter().zip(full).enumerate() {
                assert_eq!(p.len(), f.len(), "{name}: tensors with gradients");
                assert!(!p.is_empty());
                for (key, g) in p {
                    let (diff, max) = max_diff(g, &f[key])?;
                    assert!(max > 0.0, "{name} {key}: no gradient");
                    // A tied embedding's two uses (lookup and LM head) are summed in another
                    // order when the head is differentiated in a backward of its own.
                    let tol = match key.as_str() {
                        "model.embed_tokens.weight" => 1e-6 * max,
                        _ => 0.0,
                    };
                    assert!(
                        diff <= tol,
                        "{name} step {step} {key}: differs by {diff} of {max}"
                    );
                }
            }
        }
        Ok(())
    }

    /// One step's loss and gradients for every method (LoRA with `lora_dropout`), on packed
    /// and padded batches, with the model set up by `configure(model, false)` and by
    /// `configure(model, true)`: the two must agree within 2e-5 of each gradient's largest
    /// value.
    fn both_setups_agree(
        what: &str,
        lora_dropout: f64,
        configure: impl Fn(&mut Customized, bool) -> Result<()>,
    ) -> Result<()> {
        let job = Job::single(std::time::Duration::from_secs(1));
        for (fixture, method, packed) in method_cases(lora_dropout) {
            let batches = batches()?;
            let batches = if packed { &batches[..] } else { &batches[..1] };
            let mut runs = Vec::new();
            for on in [false, true] {
                let mut model = load(fixture, &method)?;
                configure(&mut model, on)?;
                for (name, v) in model.trainable() {
                    if name.contains("lora_B") {
                        v.set(&(v.as_tensor().ones_like()? * 0.05)?)?;
                    }
                }
                let opts = GradientOptions {
                    loss_chunk_rows: 5,
                    ..Default::default()
                };
                runs.push(forward_backward(&model, batches, &opts, &job, None)?);
            }
            let name = method.name();
            let ((off_loss, _, off), (on_loss, _, on)) = (&runs[0], &runs[1]);
            assert!(
                (off_loss - on_loss).abs() <= 1e-6 * off_loss.abs(),
                "{name}: loss {off_loss} without {what}, {on_loss} with"
            );
            assert_eq!(off.len(), on.len(), "{name}: tensors with gradients");
            for (key, g) in off {
                let (diff, max) = max_diff(g, &on[key])?;
                assert!(max > 0.0, "{name} {key}: no gradient");
                assert!(
                    diff <= 2e-5 * max,
                    "{name} {key}: {what} differs by {diff} of {max}"
                );
            }
        }
        Ok(())
    }

    /// The whole model's step with each decoder layer as one hand-differentiated op gives the
    /// losses and gradients of the layers run op by op on candle's autograd, LoRA with and
    /// without dropout (the one-op layers draw the masks the LoRA layers would).
    #[test]
    fn fused_layers_give_the_op_by_op_gradients() -> Result<()> {
        for lora_dropout in [0.0, 0.1] {
            both_setups_agree("fused layers", lora_dropout, |model, on| {
                model.model.set_fused_layers(on);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The whole model's step attending the FlashAttention way (segment masks, the CPU's tiled
    /// kernels) gives the losses and gradients of the chunked attention under bias masks.
    #[test]
    fn flash_attention_gives_the_chunked_gradients() -> Result<()> {
        use helix_ops::AttentionKernel::{Chunked, Flash};
        both_setups_agree("flash attention", 0.0, |model, on| {
            model
                .model
                .set_attention(if on { Flash } else { Chunked })?;
            Ok(())
        })
    }
}
