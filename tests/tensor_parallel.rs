//! Tensor parallelism (Megatron style) against transformers and PEFT: two ranks, each with its
//! shards of the tiny models, talking over the TCP backend (real sockets; the ranks are threads
//! of this test, each with its own connections). Every rank's logits (gathered), loss and its
//! shard of every gradient must match the single-device references: full SFT against
//! transformers, LoRA and P-tuning against PEFT.

mod common;
use common::{fixture, max_abs};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::model::linear::{shard_of, weight_split, Quantization, Split};
use helix::model::safetensors_write::save_tensors;
use helix::model::{ForwardMask, LlamaConfig, SafetensorsWeights};
use helix::ops::SharedCollective;
use helix::parallel::{StoreClient, StoreServer, TcpRing};
use helix::peft::ptuning::ENCODER_PREFIX;
use helix::peft::{
    load_customized, load_for_method_split, read_adapter, Adapter, Customized, Method, ModelBatch,
    ModelLoad,
};

const TP: usize = 2;

/// Runs `f` on `TP` ranks joined in one tensor-parallel ring; returns their results in order.
fn on_ranks<T, F>(f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(SharedCollective) -> Result<T> + Send + Clone + 'static,
{
    let t = Duration::from_secs(30);
    let server = StoreServer::start(0, "tp-test", t).unwrap();
    let addr = format!("127.0.0.1:{}", server.addr.port());
    let handles: Vec<_> = (0..TP)
        .map(|r| {
            let (addr, f) = (addr.clone(), f.clone());
            std::thread::spawn(move || -> Result<T> {
                let store = StoreClient::connect(&addr, "tp-test", r, t)?;
                let all: Vec<usize> = (0..TP).collect();
                let ring = TcpRing::join(&store, "tp", &all, r, "tp-test", "127.0.0.1", t)?;
                f(Arc::new(ring))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

fn load_st(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The hidden states and mean loss of `c` on a reference batch, with its real-token flags.
fn forward_loss(
    c: &Customized,
    batch: &HashMap<String, Tensor>,
) -> Result<(Tensor, Tensor, Vec<u8>)> {
    let valid: Vec<u8> = batch["attention_mask"]
        .flatten_all()?
        .to_vec1::<i64>()?
        .iter()
        .map(|&m| m as u8)
        .collect();
    let mask = ForwardMask {
        key_valid: Some(valid.clone()),
        segment_ids: None,
    };
    let ids = batch["input_ids"].to_dtype(DType::U32)?;
    let (hidden, labels) = c.forward(&ModelBatch {
        input_ids: &ids,
        position_ids: &batch["position_ids"],
        labels: Some(&batch["labels"]),
        mask: &mask,
    })?;
    let (sum, n) = c.model.loss_sum(&hidden, labels.as_ref().unwrap(), 4)?;
    Ok((hidden, (sum / n as f64)?, valid))
}

/// Loss and logits of the fixture batch on this rank's model; backward; this rank's worst
/// relative gradient difference from `reference`'s `grad.<name>` (sliced to the shard).
fn check(
    what: &str,
    c: &Customized,
    batch: &HashMap<String, Tensor>,
    reference: &HashMap<String, Tensor>,
    rank: usize,
) -> Result<(f32, f32, f32)> {
    let (hidden, loss, valid) = forward_loss(c, batch)?;
    let logits = c.model.logits(&hidden)?;
    let want = &reference["logits"];
    // Compare real positions (P-tuning adds its virtual tokens in front).
    let (b, s, v) = want.dims3()?;
    let extra = s - batch["input_ids"].dim(1)?;
    let keep: Vec<f32> = valid
        .chunks(s - extra)
        .flat_map(|row| std::iter::repeat_n(1.0, extra).chain(row.iter().map(|&m| m as f32)))
        .collect();
    let keep = Tensor::from_vec(keep, (b, s, 1), &Device::Cpu)?.broadcast_as((b, s, v))?;
    let d_logits = max_abs(&((&logits - want)? * keep)?);
    let d_loss = (loss.to_scalar::<f32>()? - reference["loss"].to_scalar::<f32>()?).abs();
    let grads = loss.backward()?;
    let mut worst = 0f32;
    let vars = c.trainable();
    for (name, var) in &vars {
        let full = reference
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{what}: no reference gradient for {name}"));
        let want = shard_of(full, c.split_of(name), rank, TP)?;
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        assert_eq!(got.dims(), want.dims(), "{what}: {name}");
        let rel = max_abs(&(got - &want)?) / max_abs(&want).max(1e-12);
        worst = worst.max(rel);
        assert!(
            rel <= 1e-4,
            "{what} rank {rank}: gradient of {name} differs by {rel:e}"
        );
    }
    assert!(
        d_logits <= 1e-4,
        "{what} rank {rank}: logits differ by {d_logits}"
    );
    assert!(
        d_loss <= 1e-5,
        "{what} rank {rank}: loss differs by {d_loss}"
    );
    Ok((d_logits, d_loss, worst))
}

fn report(what: &str, results: &[(f32, f32, f32)]) {
    let worst = |f: fn(&(f32, f32, f32)) -> f32| results.iter().map(f).fold(0f32, f32::max);
    println!(
        "{what} at TP={TP}: max |Δ logits| {:.2e}, |Δ loss| {:.2e}, worst relative Δ of a \
         gradient shard {:.2e}",
        worst(|r| r.0),
        worst(|r| r.1),
        worst(|r| r.2)
    );
}

fn open(name: &str) -> (LlamaConfig, SafetensorsWeights) {
    let dir = fixture(name);
    (
        LlamaConfig::from_file(&dir.join("config.json")).unwrap(),
        SafetensorsWeights::open_dir(&dir).unwrap(),
    )
}

macro_rules! sft_matches_transformers {
    ($test:ident, $name:literal) => {
        #[test]
        fn $test() {
            let results = on_ranks(|g| {
                let (cfg, w) = open($name);
                let rank = g.rank();
                let c = load_for_method_split(
                    &cfg,
                    &w,
                    &Method::FullSft,
                    0,
                    DType::F32,
                    &Device::Cpu,
                    Some(g),
                )?;
                let r = load_st(&fixture($name).join("reference.safetensors"));
                check(concat!($name, " SFT"), &c, &r, &r, rank)
            });
            report(concat!($name, " full SFT vs transformers"), &results);
        }
    };
}

sft_matches_transformers!(
    tiny_mha_untied_sft_at_tp2_matches_transformers,
    "tiny-mha-untied"
);
sft_matches_transformers!(
    tiny_gqa_tied_sft_at_tp2_matches_transformers,
    "tiny-gqa-tied"
);
sft_matches_transformers!(
    tiny_gqa_untied_b3_sft_at_tp2_matches_transformers,
    "tiny-gqa-untied-b3"
);

/// Sets the model's trainable tensors from whole tensors (a single-device adapter), each rank
/// taking its shard.
fn set_from_whole(
    c: &Customized,
    whole: &HashMap<String, Tensor>,
    prefix: &str,
    rank: usize,
) -> Result<()> {
    for (name, var) in c.trainable() {
        let key = name
            .strip_prefix(ENCODER_PREFIX)
            .map_or(name.clone(), |k| format!("{prefix}{k}"));
        let t = whole.get(&key).unwrap_or_else(|| panic!("no tensor {key}"));
        var.set(&shard_of(t, c.split_of(&name), rank, TP)?)?;
    }
    Ok(())
}

/// The PEFT adapter of fixture `name` in `kind` (`lora`, `ptuning`) loaded on both ranks of a
/// TP=2 group, each keeping its shard, against PEFT's reference logits, loss and gradients.
fn adapter_at_tp2_matches_peft(name: &'static str, kind: &'static str) -> Vec<(f32, f32, f32)> {
    on_ranks(move |g| {
        let (cfg, w) = open(name);
        let rank = g.rank();
        let dir = fixture(name).join(kind);
        let (method, whole, prefix) = match read_adapter(&dir, &Device::Cpu)? {
            Adapter::Lora { cfg, tensors } => (Method::Lora(cfg), tensors, ""),
            // The encoder, which PEFT's adapter file leaves out, from the reference script.
            Adapter::Ptuning { cfg, .. } => (
                Method::Ptuning(cfg),
                load_st(&dir.join("encoder.safetensors")),
                ENCODER_PREFIX,
            ),
        };
        let c = load_for_method_split(&cfg, &w, &method, 0, DType::F32, &Device::Cpu, Some(g))?;
        set_from_whole(&c, &whole, prefix, rank)?;
        let batch = load_st(&fixture(name).join("reference.safetensors"));
        check(
            name,
            &c,
            &batch,
            &load_st(&dir.join("reference.safetensors")),
            rank,
        )
    })
}

#[test]
fn lora_at_tp2_matches_peft() {
    for name in ["tiny-mha-untied", "tiny-gqa-tied", "tiny-gqa-untied-b3"] {
        let results = adapter_at_tp2_matches_peft(name, "lora");
        report(&format!("{name} LoRA vs PEFT"), &results);
    }
}

#[test]
fn ptuning_at_tp2_matches_peft() {
    for name in ["tiny-mha-untied", "tiny-gqa-untied-b3"] {
        let results = adapter_at_tp2_matches_peft(name, "ptuning");
        report(&format!("{name} P-tuning vs PEFT"), &results);
    }
}

/// What one rank of a QLoRA group computed: its dequantized weight shards, loss, and each
/// adapter gradient shard with its split.
type RankRun = (Vec<(String, Tensor)>, f32, GradShards);

/// Gradients by trainable name, each with how the tensor is split.
type GradShards = Vec<(String, Split, Tensor)>;

const QLORA_FIXTURE: &str = "tiny-gqa-tied";

/// The fixture's PEFT LoRA adapter on `weights`, this rank's part of it under `tp`.
fn lora_on(
    weights: &SafetensorsWeights,
    tp: Option<SharedCollective>,
    quantize_base: Quantization,
) -> Result<Customized> {
    let (cfg, _) = open(QLORA_FIXTURE);
    let rank = tp.as_ref().map_or(0, |g| g.rank());
    let adapter = fixture(QLORA_FIXTURE).join("lora");
    let Adapter::Lora { cfg: lora, tensors } = read_adapter(&adapter, &Device::Cpu)? else {
        panic!("a LoRA adapter");
    };
    let how = ModelLoad {
        tensor_parallel: tp,
        quantize_base,
        ..ModelLoad::new(DType::F32, Device::Cpu)
    };
    let c = load_customized(&cfg, weights, &Method::Lora(lora), 0, &how)?;
    set_from_whole(&c, &tensors, "", rank)?;
    Ok(c)
}

/// The loss of the fixture's batch and the gradient of every trainable tensor, with its split.
fn loss_and_grads(c: &Customized) -> Result<(f32, GradShards)> {
    let batch = load_st(&fixture(QLORA_FIXTURE).join("reference.safetensors"));
    let (_, loss, _) = forward_loss(c, &batch)?;
    let grads = loss.backward()?;
    let named = c
        .trainable()
        .into_iter()
        .map(|(k, v)| {
            let split = c.split_of(&k);
            (k, split, grads.get(&v).unwrap().clone())
        })
        .collect();
    Ok((loss.to_scalar::<f32>()?, named))
}

/// QLoRA under tensor parallelism: each rank quantizes its own shard, so the reference is LoRA
/// in one process on the checkpoint the ranks' dequantized shards make when put together; its
/// loss and each rank's shard of its gradients must agree.
#[test]
fn qlora_at_tp2_equals_lora_on_the_ranks_dequantized_shards() -> Result<()> {
    let ranks: Vec<RankRun> = on_ranks(|g| {
        let (_, w) = open(QLORA_FIXTURE);
        let c = lora_on(&w, Some(g), Quantization::Nf4)?;
        let (loss, grads) = loss_and_grads(&c)?;
        Ok((c.model.named_weights()?, loss, grads))
    });

    // The checkpoint the ranks computed with: their shards put together.
    let tmp = tempfile::tempdir()?;
    std::fs::copy(
        fixture(QLORA_FIXTURE).join("config.json"),
        tmp.path().join("config.json"),
    )?;
    let mut whole_weights = Vec::new();
    for (i, (key, first)) in ranks[0].0.iter().enumerate() {
        let t = match weight_split(key) {
            Split::Replicated => first.clone(),
            Split::Dim(d) => {
                let parts: Vec<&Tensor> = ranks.iter().map(|r| &r.0[i].1).collect();
                Tensor::cat(&parts, d)?
            }
        };
        whole_weights.push((key.clone(), t));
    }
    // They are NF4's: the projections moved from the checkpoint's, nothing else did.
    let original = load_st(&fixture(QLORA_FIXTURE).join("model.safetensors"));
    for (key, t) in &whole_weights {
        let moved = max_abs(&(t - &original[key])?) / max_abs(&original[key]);
        assert_eq!(
            moved > 1e-3,
            key.contains("_proj"),
            "{key} moved by {moved}"
        );
    }
    save_tensors(&tmp.path().join("model.safetensors"), &whole_weights)?;
    let dense = SafetensorsWeights::open_dir(tmp.path())?;
    let (loss, grads) = loss_and_grads(&lora_on(&dense, None, Quantization::None)?)?;
    let grads: HashMap<String, Tensor> = grads.into_iter().map(|(k, _, g)| (k, g)).collect();
    let mut worst = 0f32;
    for (rank, (_, rank_loss, rank_grads)) in ranks.iter().enumerate() {
        assert!(
            (rank_loss - loss).abs() <= 1e-5,
            "rank {rank}: {rank_loss} vs {loss}"
        );
        for (key, split, got) in rank_grads {
            let want = shard_of(&grads[key], *split, rank, TP)?;
            let rel = max_abs(&(got - &want)?) / max_abs(&want).max(1e-12);
            assert!(
                rel <= 1e-4,
                "rank {rank}: gradient of {key} differs by {rel:e}"
            );
            worst = worst.max(rel);
        }
    }
    println!(
        "QLoRA at TP={TP} vs LoRA on the ranks' dequantized shards: loss {loss:.6}, {} gradient \
         shards a rank, worst relative Δ {worst:.2e}",
        ranks[0].2.len()
    );
    Ok(())
}
