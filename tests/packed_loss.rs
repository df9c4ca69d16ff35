//! Packing and padding are exact: the summed loss of packed rows (or of a dynamically padded
//! batch) equals the sum of the documents' losses computed one by one, each alone in a batch of
//! one with no mask, on a tiny Llama (f32). The one-by-one path is the one checked against
//! transformers in tests/transformers_parity.rs.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helix::data::{
    collate_packed, collate_padded, pack_first_fit_decreasing, Batch, LossMode, PadOptions, Sample,
};
use helix::model::{ForwardMask, Llama, LlamaConfig, LoadOptions, SafetensorsWeights};

fn tiny_model() -> Result<Llama> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gqa-untied-b3");
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    Llama::load(
        &cfg,
        &SafetensorsWeights::open_dir(&dir)?,
        &LoadOptions::inference(DType::F32, Device::Cpu),
    )
}

/// Documents of 2..=21 tokens with seeded ids; every other one has answer-only labels.
fn documents(n: usize, vocab: u64) -> Vec<Sample> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |m: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % m
    };
    (0..n)
        .map(|d| {
            let len = 2 + next(20) as usize;
            let ids: Vec<u32> = (0..len).map(|_| next(vocab) as u32).collect();
            let prompt_len = if d % 2 == 0 {
                next(len as u64 - 1) as usize
            } else {
                0
            };
            let loss = if d % 2 == 0 {
                LossMode::AnswerOnly
            } else {
                LossMode::WholeSequence
            };
            Sample::new(ids, prompt_len, d, loss)
        })
        .collect()
}

/// (summed loss, target tokens) of one document alone.
fn loss_alone(model: &Llama, s: &Sample) -> Result<(f64, usize)> {
    let dev = Device::Cpu;
    let pos: Vec<i64> = (0..s.input_ids.len() as i64).collect();
    let hidden = model.forward_hidden(
        &Tensor::new(s.input_ids.as_slice(), &dev)?.unsqueeze(0)?,
        &Tensor::new(pos.as_slice(), &dev)?.unsqueeze(0)?,
        &ForwardMask {
            key_valid: None,
            segment_ids: None,
        },
    )?;
    let labels = Tensor::new(s.labels.as_slice(), &dev)?.unsqueeze(0)?;
    let (sum, n) = model.loss_sum(&hidden, &labels, 7)?;
    Ok((sum.to_scalar::<f32>()? as f64, n))
}

fn loss_of_batch(model: &Llama, b: &Batch) -> Result<(f64, usize)> {
    let dev = Device::Cpu;
    let shape = (b.rows, b.seq_len);
    let hidden = model.forward_hidden(
        &Tensor::from_slice(&b.input_ids, shape, &dev)?,
        &Tensor::from_slice(&b.position_ids, shape, &dev)?,
        &ForwardMask {
            key_valid: b.key_valid.clone(),
            segment_ids: b.segment_ids.clone(),
        },
    )?;
    let labels = Tensor::from_slice(&b.labels, shape, &dev)?;
    let (sum, n) = model.loss_sum(&hidden, &labels, 7)?;
    assert_eq!(n, b.target_tokens);
    Ok((sum.to_scalar::<f32>()? as f64, n))
}

#[test]
fn packed_rows_give_the_token_weighted_loss_of_their_documents() -> Result<()> {
    let model = tiny_model()?;
    let vocab = model.config().vocab_size as u64;
    let docs = documents(12, vocab);
    let lens: Vec<usize> = docs.iter().map(|d| d.input_ids.len()).collect();
    let packing = pack_first_fit_decreasing(&lens, 32)?;
    assert!(
        packing.rows.len() < docs.len(),
        "nothing was packed together"
    );
    assert!(packing.rows.iter().any(|r| r.len() >= 3));

    let rows: Vec<Vec<&Sample>> = packing
        .rows
        .iter()
        .map(|r| r.iter().map(|&i| &docs[i]).collect())
        .collect();
    // One filler row, as the sampler adds on a short last step: it must add nothing.
    let opts = PadOptions {
        pad_id: 0,
        multiple_of: 1,
        filler_rows: 1,
    };
    let (packed_sum, packed_n) = loss_of_batch(&model, &collate_packed(&rows, 32, &opts)?)?;

    let mut alone_sum = 0.0;
    let mut weighted = 0.0;
    let mut alone_n = 0;
    for d in &docs {
        let (sum, n) = loss_alone(&model, d)?;
        alone_sum += sum;
        alone_n += n;
        if n > 0 {
            weighted += (sum / n as f64) * n as f64;
        }
    }
    assert_eq!(packed_n, alone_n);
    let (packed_mean, alone_mean) = (packed_sum / packed_n as f64, weighted / alone_n as f64);
    println!(
        "{} documents in {} rows of 32: packed mean loss {packed_mean:.7}, one by one \
         {alone_mean:.7}, |Δ| {:.2e}; summed |Δ| {:.2e}",
        docs.len(),
        packing.rows.len(),
        (packed_mean - alone_mean).abs(),
        (packed_sum - alone_sum).abs()
    );
    assert!((packed_mean - alone_mean).abs() < 1e-5);
    assert!((packed_sum - alone_sum).abs() < 1e-5 * alone_n as f64);
    Ok(())
}

#[test]
fn dynamically_padded_batches_give_the_loss_of_their_documents() -> Result<()> {
    let model = tiny_model()?;
    let docs = documents(6, model.config().vocab_size as u64);
    let refs: Vec<&Sample> = docs.iter().collect();
    let opts = PadOptions {
        pad_id: 3,
        multiple_of: 8,
        filler_rows: 0,
    };
    let batch = collate_padded(&refs, &opts)?;
    assert!(batch.key_valid.is_some());
    let (sum, n) = loss_of_batch(&model, &batch)?;
    let mut alone = (0.0, 0);
    for d in &docs {
        let (s, k) = loss_alone(&model, d)?;
        alone = (alone.0 + s, alone.1 + k);
    }
    assert_eq!(n, alone.1);
    let d = (sum / n as f64 - alone.0 / alone.1 as f64).abs();
    println!(
        "padded batch of {} to {}: mean-loss |Δ| {d:.2e}",
        docs.len(),
        batch.seq_len
    );
    assert!(d < 1e-5);
    Ok(())
}
