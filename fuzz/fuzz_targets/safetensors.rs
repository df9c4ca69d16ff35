//! The safetensors reader helix loads models and checkpoints with: a sharded checkpoint's
//! `model.safetensors.index.json`, and a weights file's header and tensor table, then every
//! tensor read whole and as a tensor-parallel half.
#![no_main]

use std::path::{Component, Path};

use candle_core::{DType, Device};
use helix_model::weights::{shard_names_from_index_bytes, SafetensorsWeights, ShardPart};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let index = Path::new("model.safetensors.index.json");
    if let Ok(names) = shard_names_from_index_bytes(index, data) {
        assert!(!names.is_empty());
        for n in &names {
            // Every shard the index names must stay inside the model directory.
            let inside = Path::new(n)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            assert!(inside && !n.split(['/', '\\']).any(|s| s == ".."), "{n:?}");
        }
    }

    let Ok(weights) = SafetensorsWeights::from_bytes(Path::new("model.safetensors"), data.to_vec())
    else {
        return;
    };
    let names: Vec<String> = weights.names().map(str::to_string).collect();
    for name in names {
        let shape = weights.shape_of(&name).expect("listed").to_vec();
        if let Ok(t) = weights.load(&name, shape.as_slice(), DType::F32, &Device::Cpu) {
            assert_eq!(t.dims(), shape.as_slice());
        }
        for dim in 0..shape.len().min(2) {
            let part = ShardPart {
                dim,
                index: 1,
                parts: 2,
            };
            let _ = weights.load_shard(&name, shape.as_slice(), part, DType::F32, &Device::Cpu);
        }
    }
});
