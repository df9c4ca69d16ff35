//! The GGUF importer's reader: header, metadata, tensor table, the llama hyper-parameters and
//! tensor plan taken from them, the rebuilt tokenizer, and every planned tensor de-quantized.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use candle_core::DType;
use helix_model::gguf::GgufModel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = Cursor::new(data);
    let Ok(model) = GgufModel::read(&mut reader, Path::new("fuzz.gguf"), DType::F32) else {
        return;
    };
    let tensors: Vec<(String, Vec<usize>)> = model
        .tensors()
        .map(|(name, shape)| (name.to_string(), shape.to_vec()))
        .collect();
    for (name, shape) in tensors {
        if let Ok(t) = model.tensor(&mut reader, &name) {
            assert_eq!(t.dims(), shape.as_slice(), "{name}");
        }
    }
});
