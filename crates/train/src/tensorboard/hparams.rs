//! TensorBoard's HParams dashboard: each run's config as hyperparameters, so runs written to
//! one `--logdir` can be compared in a table by their settings and final metrics, as
//! Lightning's `log_hyperparams` (NeMo) and torchtune's TensorBoard logger offer.
//!
//! The dashboard reads two summaries under the `hparams` plugin, each an `HParamsPluginData`
//! protobuf in the summary metadata's plugin content with an empty float tensor as its value:
//! a `SessionStartInfo` (the hyperparameters, a `google.protobuf.Value` each, and the start
//! time) when a run starts, and a `SessionEndInfo` (its status) when it ends. The experiment
//! (which hyperparameters and metrics make the table's columns) is left for the dashboard to
//! infer from the runs' start infos and scalar tags.

use anyhow::Result;
use serde_json::Value;

use super::{
    put_bytes, put_key, put_varint_field, unix_time, EventFile, TENSOR_DTYPE, TENSOR_SHAPE,
    WIRE_FIXED64,
};

/// The tags TensorBoard's hparams plugin reads (its `metadata.py`).
pub const SESSION_START_TAG: &str = "_hparams_/session_start_info";
pub const SESSION_END_TAG: &str = "_hparams_/session_end_info";

// HParamsPluginData's infos; their fields.
const PLUGIN_SESSION_START: u64 = 3;
const PLUGIN_SESSION_END: u64 = 4;
const START_HPARAMS: u64 = 1;
const START_TIME_SECS: u64 = 5;
const END_STATUS: u64 = 1;
const END_TIME_SECS: u64 = 2;
const MAP_KEY: u64 = 1;
const MAP_VALUE: u64 = 2;
// google.protobuf.Value's kinds.
const VALUE_NUMBER: u64 = 2;
const VALUE_STRING: u64 = 3;
const VALUE_BOOL: u64 = 4;
const DT_FLOAT: u64 = 1;
const SHAPE_DIM: u64 = 2;

/// One hyperparameter's value, as the dashboard shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum HParam {
    Number(f64),
    Text(String),
    Bool(bool),
}

/// How a run ended (`tensorboard.hparams.Status`'s values). A run stopped by a signal, to be
/// resumed, writes none: the dashboard shows it as unknown until a later run finishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStatus {
    /// It reached its last step and wrote its outputs.
    Success = 1,
    /// It stopped on a non-finite loss or gradient.
    Failure = 2,
}

/// The hyperparameters of a config (its JSON form, defaults filled in), by dotted key:
/// `optimizer.lr`, `lora.r`, `data.mix[1].weight`. A list of plain values is one
/// hyperparameter, its JSON text (`lora.target_modules`); unset keys are left out.
pub fn hparams_of(config: &Value) -> Vec<(String, HParam)> {
    let mut out = Vec::new();
    flatten("", config, &mut out);
    out
}

fn flatten(key: &str, v: &Value, out: &mut Vec<(String, HParam)>) {
    let join = |k: &str| match key.is_empty() {
        true => k.to_string(),
        false => format!("{key}.{k}"),
    };
    match v {
        Value::Null => {}
        Value::Bool(b) => out.push((key.into(), HParam::Bool(*b))),
        Value::Number(n) => out.push((key.into(), HParam::Number(n.as_f64().unwrap_or(f64::NAN)))),
        Value::String(s) => out.push((key.into(), HParam::Text(s.clone()))),
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{key}[{i}]"), item, out);
            }
        }
        Value::Array(_) => out.push((key.into(), HParam::Text(v.to_string()))),
        Value::Object(fields) => {
            for (k, item) in fields {
                flatten(&join(k), item, out);
            }
        }
    }
}

impl EventFile {
    /// Appends the run's `SessionStartInfo` at `step` (where it starts): its hyperparameters,
    /// started now.
    pub fn write_session_start(&mut self, step: u64, hparams: &[(String, HParam)]) -> Result<()> {
        let mut info = Vec::new();
        for (name, value) in hparams {
            let mut entry = Vec::new();
            put_bytes(&mut entry, MAP_KEY, name.as_bytes());
            put_bytes(&mut entry, MAP_VALUE, &protobuf_value(value));
            put_bytes(&mut info, START_HPARAMS, &entry);
        }
        put_double(&mut info, START_TIME_SECS, unix_time());
        let mut data = Vec::new();
        put_bytes(&mut data, PLUGIN_SESSION_START, &info);
        self.append_hparams(step, SESSION_START_TAG, &data)
    }

    /// Appends the run's `SessionEndInfo` at `step` (its last): `status`, ended now.
    pub fn write_session_end(&mut self, step: u64, status: SessionStatus) -> Result<()> {
        let mut info = Vec::new();
        put_varint_field(&mut info, END_STATUS, status as u64);
        put_double(&mut info, END_TIME_SECS, unix_time());
        let mut data = Vec::new();
        put_bytes(&mut data, PLUGIN_SESSION_END, &info);
        self.append_hparams(step, SESSION_END_TAG, &data)
    }

    /// An event at `step` holding `plugin_data` (an `HParamsPluginData`, version 0) under
    /// `tag`, its value the empty float tensor the plugin's own writer uses. (The plugin reads
    /// the infos whatever their step; the run's own keeps the file's steps in order.)
    fn append_hparams(&mut self, step: u64, tag: &str, plugin_data: &[u8]) -> Result<()> {
        let mut shape = Vec::new();
        put_bytes(&mut shape, SHAPE_DIM, &[]);
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, TENSOR_DTYPE, DT_FLOAT);
        put_bytes(&mut tensor, TENSOR_SHAPE, &shape);
        self.append_plugin_value(step, tag, ("hparams", plugin_data), &tensor)
    }
}

/// `v` as a `google.protobuf.Value`.
fn protobuf_value(v: &HParam) -> Vec<u8> {
    let mut out = Vec::new();
    match v {
        HParam::Number(n) => put_double(&mut out, VALUE_NUMBER, *n),
        HParam::Text(s) => put_bytes(&mut out, VALUE_STRING, s.as_bytes()),
        HParam::Bool(b) => put_varint_field(&mut out, VALUE_BOOL, u64::from(*b)),
    }
    out
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_key(out, field, WIRE_FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_flattens_to_dotted_keys() {
        let config = serde_json::json!({
            "optimizer": {"lr": 3e-4, "betas": [0.9, 0.999], "name": "adamw"},
            "lora": {"r": 8, "use_dora": false, "target_modules": ["q_proj", "v_proj"]},
            "data": {"mix": [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl"}], "cache_dir": null},
        });
        let mut got = hparams_of(&config);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want = [
            ("data.mix[0].path", HParam::Text("a.jsonl".into())),
            ("data.mix[0].weight", HParam::Number(2.0)),
            ("data.mix[1].path", HParam::Text("b.jsonl".into())),
            ("lora.r", HParam::Number(8.0)),
            (
                "lora.target_modules",
                HParam::Text(r#"["q_proj","v_proj"]"#.into()),
            ),
            ("lora.use_dora", HParam::Bool(false)),
            ("optimizer.betas", HParam::Text("[0.9,0.999]".into())),
            ("optimizer.lr", HParam::Number(3e-4)),
            ("optimizer.name", HParam::Text("adamw".into())),
        ];
        let want: Vec<(String, HParam)> = want.into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(got, want);
    }
}
