//! NF4 (QLoRA's frozen weights) against torchao's `NF4Tensor`, the quantization torchtune's
//! QLoRA uses: tests/fixtures/nf4/nf4.safetensors holds torchao's codes, scalers, factors, mean
//! and dequantized weight for three weights (scripts/nf4_reference.py).

use candle_core::{DType, Device, Tensor};
use helix::kernels::nf4::{rounding, Nf4Weight, LEVELS};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nf4/nf4.safetensors"
);

struct Torchao {
    weight: Tensor,
    codes: Vec<u8>,
    /// int8 bits.
    scalers: Vec<u8>,
    factors: Tensor,
    mean: f32,
    levels: Vec<f32>,
    dequantized: Tensor,
}

fn torchao(case: &str) -> Torchao {
    let bytes = std::fs::read(FIXTURE).expect("tests/fixtures/nf4/nf4.safetensors");
    let raw = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // candle has no int8: the scalers' bytes as they are.
    let scalers = raw
        .tensor(&format!("{case}.quantized_scalers"))
        .unwrap()
        .data()
        .to_vec();
    let mut t: std::collections::HashMap<String, Tensor> = [
        "weight",
        "quantized_data",
        "quantization_factor",
        "scaler_mean",
        "nf4",
        "dequantized",
    ]
    .iter()
    .map(|k| {
        let key = format!("{case}.{k}");
        let v = raw.tensor(&key).unwrap();
        let dtype = match v.dtype() {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::U8 => DType::U8,
            other => panic!("{key}: {other:?}"),
        };
        let t = Tensor::from_raw_buffer(v.data(), dtype, v.shape(), &Device::Cpu).unwrap();
        (key, t)
    })
    .collect();
    let mut take = |k: &str| t.remove(&format!("{case}.{k}")).unwrap();
    Torchao {
        weight: take("weight"),
        codes: take("quantized_data").to_vec1().unwrap(),
        scalers,
        factors: take("quantization_factor"),
        mean: values(&take("scaler_mean"))[0],
        levels: values(&take("nf4")),
        dequantized: take("dequantized"),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn bf16_weights_quantize_to_torchao_s_codes_and_dequantize_to_its_bits() {
    // bf16: torchao rounds every step to bf16 (ties among levels are common there: the first
    // level wins), an all-zero block takes level 0 and three outliers set their blocks' scales.
    for case in ["bf16", "bf16_wide"] {
        let r = torchao(case);
        let rounded = LEVELS.map(rounding(DType::BF16)).to_vec();
        assert_eq!(r.levels, rounded, "{case}: torchao's levels in bf16");
        let q = Nf4Weight::quantize(&r.weight).unwrap();
        let (codes, scalers, factors, mean) = q.parts();
        assert_eq!(codes.to_vec1::<u8>().unwrap(), r.codes, "{case}: codes");
        assert_eq!(
            scalers.to_vec1::<u8>().unwrap(),
            r.scalers,
            "{case}: scalers"
        );
        assert_eq!(values(factors), values(&r.factors), "{case}: factors");
        assert_eq!(mean, r.mean, "{case}: mean");
        let got = q.dequantize().unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(got.dims(), r.dequantized.dims());
        assert_eq!(values(&got), values(&r.dequantized), "{case}: dequantized");
    }
}

#[test]
fn torchao_s_stored_parts_dequantize_to_its_weight_bit_for_bit() {
    for case in ["bf16", "bf16_wide", "f32"] {
        let r = torchao(case);
        let n = r.codes.len();
        let q = Nf4Weight::from_parts(
            Tensor::from_vec(r.codes.clone(), n, &Device::Cpu).unwrap(),
            Tensor::from_vec(r.scalers.clone(), r.scalers.len(), &Device::Cpu).unwrap(),
            r.factors.clone(),
            r.mean,
            r.weight.shape().clone(),
        )
        .unwrap();
        assert_eq!(
            values(&q.dequantize().unwrap()),
            values(&r.dequantized),
            "{case}"
        );
    }
}

#[test]
fn f32_weights_quantize_to_torchao_s_codes_and_its_weight_to_the_mean_s_last_place() {
    // torchao sums the f32 absmaxes in f32 (cascaded), helix in f64: the means may differ in
    // the last place, which can move a scaler by one int8 step. The codes do not depend on it.
    let r = torchao("f32");
    let q = Nf4Weight::quantize(&r.weight).unwrap();
    let (codes, scalers, factors, mean) = q.parts();
    assert_eq!(codes.to_vec1::<u8>().unwrap(), r.codes, "codes");
    assert!(
        (mean - r.mean).abs() <= 2.0 * f32::EPSILON * r.mean.abs(),
        "{mean} vs {}",
        r.mean
    );
    let ours = scalers.to_vec1::<u8>().unwrap();
    let off = ours
        .iter()
        .zip(&r.scalers)
        .filter(|(a, b)| a != b)
        .map(|(&a, &b)| (a as i8 as i32 - b as i8 as i32).abs())
        .max()
        .unwrap_or(0);
    assert!(off <= 1, "a scaler differs by {off} int8 steps");
    let (fa, fb) = (values(factors), values(&r.factors));
    for (a, b) in fa.iter().zip(&fb) {
        assert!(
            (a - b).abs() <= 4.0 * f32::EPSILON * b.abs(),
            "factor {a} vs {b}"
        );
    }
    let got = values(&q.dequantize().unwrap());
    let want = values(&r.dequantized);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // One int8 step of a scaler is 1 / factor, times a level of at most 1.
    let step = fb.iter().map(|f| 1.0 / f).fold(0f32, f32::max);
    assert!(
        worst <= step * 1.0001,
        "worst {worst} against one scaler step {step}"
    );
}
