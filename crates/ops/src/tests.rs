//! Fused/explicit-backward ops against the plain candle op graph, which candle differentiates on
//! its own: the two must agree in value and gradient.

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::*;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn softmax_backward_matches_op_graph() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 5, 7), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (3, 5, 7), &dev)?;
    let fused = (softmax_last_dim(x.as_tensor())? * &w)?.sum_all()?;
    let plain = (candle_nn::ops::softmax(x.as_tensor(), D::Minus1)? * &w)?.sum_all()?;
    assert!(max_abs_diff(&fused, &plain) < 1e-5);
    let g1 = fused.backward()?.get(&x).unwrap().clone();
    let g2 = plain.backward()?.get(&x).unwrap().clone();
    assert!(max_abs_diff(&g1, &g2) < 1e-5, "{}", max_abs_diff(&g1, &g2));
    Ok(())
}

fn plain_cross_entropy(h: &Tensor, w: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&h.matmul(&w.t()?)?, D::Minus1)?;
    let mut total = Tensor::zeros((), DType::F32, h.device())?;
    for (i, &l) in labels.iter().enumerate() {
        if l != IGNORE_INDEX {
            total = (total - logp.get(i)?.get(l as usize)?)?;
        }
    }
    Ok(total)
}

#[test]
fn chunked_cross_entropy_matches_plain_graph_in_value_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 6), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (11, 6), &dev)?)?;
    let labels = vec![3i64, -100, 10, 0, 5, -100, 7, 7, 1];
    let lt = Tensor::new(labels.as_slice(), &dev)?;
    assert_eq!(count_targets(&lt)?, 7);
    for chunk in [1, 4, 9, 100] {
        let fused = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &lt, chunk)?;
        let plain = plain_cross_entropy(h.as_tensor(), w.as_tensor(), &labels)?;
        assert!(max_abs_diff(&fused, &plain) < 1e-4, "chunk {chunk}");
        // Without tracked inputs: the same value, and no gradient work.
        let untracked =
            linear_cross_entropy(&h.as_tensor().detach(), &w.as_tensor().detach(), &lt, chunk)?;
        assert!(max_abs_diff(&untracked, &plain) < 1e-4, "chunk {chunk}");
        // The gradients are taken in the forward for the loss sum; what flows back scales them.
        let (gf, gp) = ((fused * 0.37)?.backward()?, (plain * 0.37)?.backward()?);
        for v in [&h, &w] {
            let d = max_abs_diff(gf.get(v).unwrap(), gp.get(v).unwrap());
            assert!(d < 1e-5, "chunk {chunk}: grad diff {d}");
        }
    }
    Ok(())
}

/// Ignored rows skip the head: with the first and last rows ignored, or all of them, the loss
/// and both gradients are the plain graph's (zero for ignored rows of the hidden states).
#[test]
fn ignored_rows_skip_the_head_and_get_zero_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &dev)?)?;
    for labels in [vec![-100i64, 2, 6, -100, 0, -100], vec![-100; 6]] {
        let lt = Tensor::new(labels.as_slice(), &dev)?;
        let fused = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &lt, 2)?;
        let plain = plain_cross_entropy(h.as_tensor(), w.as_tensor(), &labels)?;
        assert!(max_abs_diff(&fused, &plain) < 1e-5, "{labels:?}");
        let gf = fused.backward()?;
        let dh = gf.get(&h).expect("a gradient for the hidden states");
        let want = match labels.iter().all(|&l| l == IGNORE_INDEX) {
            true => h.as_tensor().zeros_like()?,
            false => plain.backward()?.get(&h).unwrap().clone(),
        };
        assert!(max_abs_diff(dh, &want) < 1e-5, "{labels:?}");
        for (row, &l) in labels.iter().enumerate() {
            if l == IGNORE_INDEX {
                let zero = dh.get(row)?.abs()?.sum_all()?.to_scalar::<f32>()?;
                assert_eq!(zero, 0.0, "row {row} of {labels:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn frozen_lm_head_gets_no_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 6), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (11, 6), &dev)?;
    let lt = Tensor::new(&[1i64, 2, 3, 4], &dev)?;
    let loss = linear_cross_entropy(h.as_tensor(), &w, &lt, 2)?;
    let grads = loss.backward()?;
    assert!(grads.get(&w).is_none());
    assert!(grads.get(&h).is_some());
    Ok(())
}

#[test]
fn out_of_vocabulary_label_is_an_error() -> Result<()> {
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (2, 6), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (11, 6), &dev)?;
    let err = linear_cross_entropy(&h, &w, &Tensor::new(&[1i64, 11], &dev)?, 2).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    Ok(())
}

#[test]
fn mask_blocks_future_padding_and_other_documents() -> Result<()> {
    let spec = MaskSpec {
        batch: 1,
        q_len: 4,
        kv_len: 4,
        q_offset: 0,
        key_valid: Some(vec![1, 1, 1, 0]),
        segment_ids: Some(vec![0, 0, 1, 1]),
    };
    let bias = attention_bias(&spec, DType::F32, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let allowed: Vec<u8> = bias.iter().map(|&b| (b == 0.0) as u8).collect();
    #[rustfmt::skip]
    let expected = vec![
        1, 0, 0, 0,
        1, 1, 0, 0,
        0, 0, 1, 0,
        0, 0, 1, 0,
    ];
    assert_eq!(allowed, expected);
    Ok(())
}

#[test]
fn rope_rotates_pairs_half_a_head_apart() -> Result<()> {
    // Position 1 with theta such that the first frequency is 1 rad: (x0, x2) rotate by 1 rad.
    let table = RopeTable::new(4, 10000.0, &RopeScaling::None, &Device::Cpu)?;
    let (cos, sin) = table.cos_sin(&Tensor::new(&[[1i64]], &Device::Cpu)?, DType::F32)?;
    let x = Tensor::new(&[1f32, 0.0, 0.0, 0.0], &Device::Cpu)?.reshape((1, 1, 1, 4))?;
    let y = apply_rope(&x, &cos, &sin)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(
        (y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6,
        "{y:?}"
    );
    Ok(())
}

#[test]
fn linear_with_a_frozen_weight_matches_matmul_and_skips_the_weight_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
    let mix = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev)?;
    let y = linear(x.as_tensor(), &w)?;
    let plain = x.as_tensor().broadcast_matmul(&w.t()?)?;
    assert!(max_abs_diff(&y, &plain) < 1e-5);
    let g = (y * &mix)?.sum_all()?.backward()?;
    let gp = (plain * &mix)?.sum_all()?.backward()?;
    let (gx, gx_plain) = (g.get(&x).unwrap(), gp.get(&x).unwrap());
    assert!(max_abs_diff(gx, gx_plain) < 1e-5);
    // Nothing weight-shaped was computed, where candle's own matmul computes it.
    let weight_shaped = |g: &candle_core::backprop::GradStore| {
        g.get_ids()
            .any(|id| g.get_id(*id).unwrap().dims() == [8, 5])
    };
    assert!(!weight_shaped(&g));
    assert!(weight_shaped(&gp));

    // A trainable weight (full SFT) still gets its gradient.
    let wv = Var::from_tensor(&w)?;
    let g = (linear(x.as_tensor(), wv.as_tensor())? * &mix)?
        .sum_all()?
        .backward()?;
    let gw = g.get(&wv).expect("a trainable weight has a gradient");
    let want = mix
        .reshape((6, 5))?
        .t()?
        .matmul(&x.as_tensor().reshape((6, 8))?)?;
    assert!(max_abs_diff(gw, &want) < 1e-5);
    Ok(())
}

/// The chunked attention against its plain autograd definition: GQA (4 query heads over 2 KV
/// heads), a packed row with two documents, a padded row, chunks of 5 query rows (the last one
/// short), then queries that see earlier keys (a KV cache). Output and dq, dk, dv.
#[test]
fn chunked_attention_matches_the_plain_definition_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    for (q_len, kv_len) in [(13usize, 13usize), (4, 11)] {
        let (b, hq, hkv, d) = (2, 4, 2, 8);
        let var = |shape: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap())
        };
        let (q, k, v) = (
            var((b, hq, q_len, d))?,
            var((b, hkv, kv_len, d))?,
            var((b, hkv, kv_len, d))?,
        );
        let mut segments = vec![0u32; b * kv_len];
        for s in &mut segments[6..kv_len] {
            *s = 1;
        }
        let mut valid = vec![1u8; b * kv_len];
        for f in &mut valid[2 * kv_len - 3..] {
            *f = 0;
        }
        let spec = MaskSpec {
            batch: b,
            q_len,
            kv_len,
            q_offset: kv_len - q_len,
            key_valid: Some(valid),
            segment_ids: Some(segments),
        };
        let bias = attention_bias(&spec, DType::F32, &dev)?;
        let mix = Tensor::randn(0f32, 1.0, (b, hq, q_len, d), &dev)?;
        let plain = plain_causal_attention(&q, &k, &v, &bias)?;
        let gp = (&plain * &mix)?.sum_all()?.backward()?;
        for rows in [5, q_len] {
            let y = crate::attention::causal_attention_in_chunks(&q, &k, &v, &bias, rows)?;
            assert!(
                max_abs_diff(&y, &plain) < 1e-5,
                "out, {rows} rows per chunk"
            );
            let g = (&y * &mix)?.sum_all()?.backward()?;
            for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
                let diff = max_abs_diff(g.get(x).unwrap(), gp.get(x).unwrap());
                assert!(
                    diff < 1e-5,
                    "{name}: {diff:e} with {rows} rows per chunk, {q_len} queries"
                );
            }
        }
    }
    Ok(())
}

/// The one-op LoRA projection against the composed ops (candle differentiates those): the
/// output and the gradients of x, A and B; W, frozen, gets none.
#[test]
fn lora_linear_matches_the_composed_ops() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (4, 8), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (5, 4), &dev)?)?;
    let mix = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev)?;
    let s = 0.5;
    let y = lora_linear(&x, &w.clone().into(), &a, &b, s)?;
    let composed = (x.broadcast_matmul(&w.t()?)?
        + (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * s)?)?;
    assert!(max_abs_diff(&y, &composed) < 1e-5);
    let g = (y * &mix)?.sum_all()?.backward()?;
    let gc = (composed * &mix)?.sum_all()?.backward()?;
    for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
        let diff = max_abs_diff(g.get(v).unwrap(), gc.get(v).unwrap());
        assert!(diff < 1e-5, "d{name}: {diff:e}");
    }
    assert!(!g
        .get_ids()
        .any(|id| g.get_id(*id).unwrap().dims() == [5, 8]));
    Ok(())
}

/// The one-op attention block against the same steps one by one with candle's autograd: heads
/// split, RoPE, the plain attention, heads merged; GQA, a packed row with padding; output and
/// the gradients of the three projections' outputs; under both masks (the chunked attention's
/// bias, the FlashAttention reference's segments). Padding rows do not count: a padding query
/// sees other keys under the two masks, and no real query sees it.
#[test]
fn rope_attention_matches_the_steps_one_by_one() -> Result<()> {
    let dev = Device::Cpu;
    let (b, s, hq, hkv, d) = (2, 9, 4, 2, 8);
    let var = |w: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, w), &dev).unwrap());
    let (q, k, v) = (var(hq * d)?, var(hkv * d)?, var(hkv * d)?);
    let positions = Tensor::arange(0i64, s as i64, &dev)?
        .unsqueeze(0)?
        .repeat((b, 1))?;
    let (cos, sin) =
        RopeTable::new(d, 10000.0, &RopeScaling::None, &dev)?.cos_sin(&positions, DType::F32)?;
    let valid = [vec![1u8; s], [vec![1u8; s - 2], vec![0; 2]].concat()].concat();
    let spec = MaskSpec {
        batch: b,
        q_len: s,
        kv_len: s,
        q_offset: 0,
        key_valid: Some(valid.clone()),
        segment_ids: Some([vec![0u32; 4], vec![1; s - 4], vec![0; s]].concat()),
    };
    let real = Tensor::from_vec(
        valid.iter().map(|&v| f32::from(v)).collect::<Vec<_>>(),
        (b, s, 1),
        &dev,
    )?;
    let bias = attention_bias(&spec, DType::F32, &dev)?;
    let heads = |t: &Tensor, n: usize| t.reshape((b, s, n, d))?.transpose(1, 2);
    let steps = plain_causal_attention(
        &apply_rope(&heads(&q, hq)?, &cos, &sin)?,
        &apply_rope(&heads(&k, hkv)?, &cos, &sin)?,
        &heads(&v, hkv)?,
        &bias,
    )?
    .transpose(1, 2)?
    .reshape((b, s, hq * d))?;
    let mix = Tensor::randn(0f32, 1.0, (b, s, hq * d), &dev)?.broadcast_mul(&real)?;
    let gs = (&steps * &mix)?.sum_all()?.backward()?;
    for flash in [false, true] {
        let mask = AttentionMask::new(&spec, DType::F32, &dev, flash)?;
        assert_eq!(matches!(mask, AttentionMask::Segments(_)), flash);
        let block = rope_attention((&q, &k, &v), (&cos, &sin), &mask, (hq, hkv))?;
        let diff = max_abs_diff(&block.broadcast_mul(&real)?, &steps.broadcast_mul(&real)?);
        assert!(diff < 1e-5, "flash {flash}: out {diff:e}");
        let g = (&block * &mix)?.sum_all()?.backward()?;
        for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            let diff = max_abs_diff(g.get(x).unwrap(), gs.get(x).unwrap());
            assert!(diff < 1e-5, "flash {flash}: {name}: {diff:e}");
        }
    }
    Ok(())
}

/// Segment ids say what the bias says: the document of each token, padding its own; a mask
/// with a KV cache has no segment form.
#[test]
fn segment_mask_gives_padding_a_document_of_its_own() -> Result<()> {
    let dev = Device::Cpu;
    let spec = MaskSpec {
        batch: 2,
        q_len: 3,
        kv_len: 3,
        q_offset: 0,
        key_valid: Some(vec![1, 1, 1, 1, 1, 0]),
        segment_ids: Some(vec![0, 1, 1, 4, 4, 4]),
    };
    let AttentionMask::Segments(seg) = AttentionMask::new(&spec, DType::F32, &dev, true)? else {
        panic!("asked for segments");
    };
    assert_eq!(
        seg.ids.to_vec2::<u32>()?,
        [[0, 1, 1], [4, 4, u32::MAX]],
        "ids by row"
    );
    assert!(seg.ordered, "documents in order, padding last");
    let left_padded = MaskSpec {
        key_valid: Some(vec![0, 1, 1, 1, 1, 1]),
        ..spec.clone()
    };
    let AttentionMask::Segments(seg) = AttentionMask::new(&left_padded, DType::F32, &dev, true)?
    else {
        panic!("asked for segments");
    };
    assert!(!seg.ordered, "padding first: ids fall after it");
    let cached = MaskSpec {
        q_offset: 2,
        kv_len: 5,
        ..spec
    };
    let err = AttentionMask::new(&cached, DType::F32, &dev, true).unwrap_err();
    assert!(err.to_string().contains("self-attention"), "{err}");
    Ok(())
}

/// Padding flags or document ids of the wrong length are an error naming them, in both mask
/// forms.
#[test]
fn a_mask_of_the_wrong_length_names_its_field() -> Result<()> {
    let dev = Device::Cpu;
    let spec = MaskSpec {
        batch: 2,
        q_len: 3,
        kv_len: 3,
        q_offset: 0,
        key_valid: Some(vec![1; 5]),
        segment_ids: None,
    };
    let short_ids = MaskSpec {
        key_valid: None,
        segment_ids: Some(vec![0; 7]),
        ..spec.clone()
    };
    for flash in [false, true] {
        let err = AttentionMask::new(&spec, DType::F32, &dev, flash).unwrap_err();
        assert!(
            err.to_string()
                .contains("key_valid has 5 entries, expected 6"),
            "{err}"
        );
        let err = AttentionMask::new(&short_ids, DType::F32, &dev, flash).unwrap_err();
        assert!(
            err.to_string()
                .contains("segment_ids has 7 entries, expected 6"),
            "{err}"
        );
    }
    Ok(())
}
