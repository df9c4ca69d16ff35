//! The TOML run config as `helix-train --config` reads it: parse, `--set` overrides, and every
//! check a run makes before anything loads. Input: the file's text, then optionally a NUL byte
//! and one `--set` override per line.
#![no_main]

use std::path::Path;

use helix_train::config::ConfigFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, sets) = text.split_once('\0').unwrap_or((text, ""));
    let sets: Vec<String> = sets.lines().map(str::to_string).collect();
    let path = Path::new("fuzz.toml");
    let cfg = match ConfigFile::from_str_with(path, file, &sets) {
        Ok(cfg) => cfg,
        Err(e) => {
            // Errors name the file, or the `--set` they come from.
            let msg = format!("{e:#}");
            assert!(msg.contains("fuzz.toml") || msg.contains("--set"), "{msg}");
            return;
        }
    };
    for ranks in [1, 2, 3, 8] {
        let _ = cfg.validate_training(ranks);
        let _ = cfg.accumulation(ranks);
    }
    let _ = cfg.method();
    let _ = cfg.model_dtype();
    let _ = cfg.resume();
    let _ = cfg.tokenizer_dir(path);
    let _ = cfg.numerics();
    if let Ok(data) = cfg.data(path) {
        let _ = data.validate();
        let _ = data.uses_chat_template();
        for source in data.train_sources().into_iter().flatten() {
            let _ = source.read_options(data.skip_invalid);
        }
    }
});
