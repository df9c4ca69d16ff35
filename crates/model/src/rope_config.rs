//! RoPE's base and frequency scaling as `config.json` states them: `rope_theta` and
//! `rope_scaling` (transformers 4), or one `rope_parameters` object holding both (transformers 5).
//! A scaling helix cannot compute is an error, since running it unscaled would silently move
//! every position the checkpoint was trained with.

use anyhow::{bail, Context, Result};
use helix_ops::RopeScaling;
use serde_json::{Map, Value};

/// transformers' default base when `rope_theta` is absent.
const DEFAULT_THETA: f64 = 10_000.0;

/// `(rope_theta, scaling)` from the keys of `config.json`; `max_position_embeddings` is YaRN's
/// original context when its `original_max_position_embeddings` is absent, as in transformers.
pub fn read_rope(
    rope_theta: Option<f64>,
    rope_scaling: Option<&Value>,
    rope_parameters: Option<&Value>,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling)> {
    let theta = rope_theta.unwrap_or(DEFAULT_THETA);
    let from_scaling = parse_scaling("rope_scaling", rope_scaling, max_position_embeddings)?;
    let Some(params) = rope_parameters.filter(|v| !v.is_null()) else {
        return Ok((check_theta("rope_theta", theta)?, from_scaling));
    };
    let obj = params
        .as_object()
        .context("rope_parameters: expected an object or null")?;
    let fields = Fields {
        key: "rope_parameters",
        obj,
    };
    let theta_p = fields.optional("rope_theta")?.unwrap_or(theta);
    let theta_p = check_theta("rope_parameters.rope_theta", theta_p)?;
    let from_params = parse_scaling("rope_parameters", Some(params), max_position_embeddings)?;
    // A file carrying both spellings must not say two things.
    if rope_scaling.is_some_and(|v| !v.is_null()) && from_scaling != from_params {
        bail!(
            "rope_parameters ({from_params:?}) and rope_scaling ({from_scaling:?}) disagree; \
             remove one"
        );
    }
    if rope_theta.is_some_and(|t| t != theta_p) {
        bail!("rope_parameters.rope_theta {theta_p} and rope_theta {theta} disagree; remove one");
    }
    Ok((theta_p, from_params))
}

fn check_theta(key: &str, theta: f64) -> Result<f64> {
    if !(theta > 1.0) || !theta.is_finite() {
        bail!("{key} must be a finite number above 1, got {theta}");
    }
    Ok(theta)
}

/// One scaling object; `key` names it in errors (`rope_scaling` or `rope_parameters`).
fn parse_scaling(key: &str, v: Option<&Value>, max_positions: usize) -> Result<RopeScaling> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let obj = v
        .as_object()
        .with_context(|| format!("{key}: expected an object or null"))?;
    let field = Fields { key, obj };
    // transformers reads "rope_type", and "type" from configs written before it was renamed;
    // LlamaConfig copies a "type" over "rope_type", so "type" wins where both are present.
    let named = ["type", "rope_type"]
        .into_iter()
        .find_map(|name| obj.get(name).map(|t| (name, t)));
    let kind = match named {
        // rope_parameters may hold only the base.
        None if key == "rope_parameters" => "default",
        None => bail!("{key}: missing 'rope_type'"),
        Some((name, t)) => t
            .as_str()
            .with_context(|| format!("{key}.{name}: expected a string, found {t}"))?,
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: field.positive("factor", kind)?,
        },
        "llama3" => {
            let low_freq_factor = field.positive("low_freq_factor", kind)?;
            let high_freq_factor = field.positive("high_freq_factor", kind)?;
            if !(high_freq_factor > low_freq_factor) {
                bail!(
                    "{key}: high_freq_factor ({high_freq_factor}) must be above \
                     low_freq_factor ({low_freq_factor})"
                );
            }
            RopeScaling::Llama3 {
                factor: field.positive("factor", kind)?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: field
                    .positive("original_max_position_embeddings", kind)?,
            }
        }
        "yarn" => {
            let factor = field.positive("factor", kind)?;
            // transformers' `get("x") or default`: null and 0 take the default too.
            let or = |name: &str, default: f64| -> Result<f64> {
                Ok(field
                    .optional(name)?
                    .filter(|&x| x != 0.0)
                    .unwrap_or(default))
            };
            let mscale_of = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match field.optional("attention_factor")? {
                Some(a) if a < 0.0 => bail!("{key}.attention_factor must not be negative, got {a}"),
                Some(a) => a,
                None => match (or("mscale", 0.0)?, or("mscale_all_dim", 0.0)?) {
                    (m, all) if m != 0.0 && all != 0.0 => {
                        mscale_of(factor, m) / mscale_of(factor, all)
                    }
                    _ => mscale_of(factor, 1.0),
                },
            };
            // transformers' `get("truncate", True)`: absent truncates, null does not.
            let truncate = match obj.get("truncate") {
                None => true,
                Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => bail!("{key}.truncate: expected true or false, found {other}"),
            };
            let original = or("original_max_position_embeddings", max_positions as f64)?;
            if !(original > 0.0) {
                bail!("{key}.original_max_position_embeddings must be positive, got {original}");
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: or("beta_fast", 32.0)?,
                beta_slow: or("beta_slow", 1.0)?,
                attention_factor,
                truncate,
            }
        }
        "dynamic" => bail!(
            "{key}: rope_type 'dynamic' is not supported (transformers recomputes its \
             frequencies from the longest sequence each batch reaches, so a position's \
             rotation would depend on the batch; supported: default, linear, llama3, yarn)"
        ),
        other => {
            bail!("{key}: rope_type '{other}' is not supported (supported: default, linear, llama3, yarn)")
        }
    })
}

/// Numeric keys of one scaling object, named `key.name` in errors.
struct Fields<'a> {
    key: &'a str,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn optional(&self, name: &str) -> Result<Option<f64>> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let x = v.as_f64().with_context(|| {
                    format!("{}.{name}: expected a number, found {v}", self.key)
                })?;
                if !x.is_finite() {
                    bail!("{}.{name} must be finite", self.key);
                }
                Ok(Some(x))
            }
        }
    }

    fn positive(&self, name: &str, kind: &str) -> Result<f64> {
        let x = self.optional(name)?.with_context(|| {
            format!("{}: rope_type '{kind}' needs a numeric '{name}'", self.key)
        })?;
        if !(x > 0.0) {
            bail!("{}.{name} must be positive, got {x}", self.key);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scaling(v: Value) -> Result<RopeScaling> {
        Ok(read_rope(Some(500_000.0), Some(&v), None, 4096)?.1)
    }

    #[test]
    fn reads_each_supported_type() {
        assert_eq!(scaling(Value::Null).unwrap(), RopeScaling::None);
        assert_eq!(
            scaling(json!({"type": "linear", "factor": 2})).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        let llama31 = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"});
        assert_eq!(
            scaling(llama31).unwrap(),
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            }
        );
        // YaRN's defaults: beta 32 / 1, attention factor 0.1 ln(factor) + 1, the original
        // context from max_position_embeddings, truncation on.
        let RopeScaling::Yarn {
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
            ..
        } = scaling(json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": null})).unwrap()
        else {
            panic!("not yarn")
        };
        assert_eq!(
            (
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate
            ),
            (4096.0, 32.0, 1.0, true)
        );
        assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        let RopeScaling::Yarn {
            attention_factor, ..
        } = scaling(
            json!({"rope_type": "yarn", "factor": 4.0, "mscale": 2.0, "mscale_all_dim": 1.0}),
        )
        .unwrap()
        else {
            panic!("not yarn")
        };
        let m = |x: f64| 0.1 * x * 4f64.ln() + 1.0;
        assert!((attention_factor - m(2.0) / m(1.0)).abs() < 1e-15);
    }

    #[test]
    fn type_wins_over_rope_type_and_a_null_truncate_does_not_truncate() {
        // transformers' LlamaConfig copies "type" over "rope_type".
        assert_eq!(
            scaling(json!({"rope_type": "default", "type": "linear", "factor": 2.0})).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        let truncate = |v: Value| match scaling(v).unwrap() {
            RopeScaling::Yarn { truncate, .. } => truncate,
            other => panic!("{other:?}"),
        };
        assert!(truncate(json!({"rope_type": "yarn", "factor": 2.0})));
        assert!(!truncate(
            json!({"rope_type": "yarn", "factor": 2.0, "truncate": null})
        ));
        assert!(!truncate(
            json!({"rope_type": "yarn", "factor": 2.0, "truncate": false})
        ));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192}),
                "rope_scaling: rope_type 'llama3' needs a numeric 'high_freq_factor'",
            ),
            (
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
                "high_freq_factor (1) must be above low_freq_factor (4)",
            ),
            (
                json!({"rope_type": "linear", "factor": -2.0}),
                "rope_scaling.factor must be positive",
            ),
            (
                json!({"rope_type": "yarn", "factor": "4"}),
                "rope_scaling.factor: expected a number",
            ),
            (
                json!({"rope_type": "dynamic", "factor": 2.0}),
                "rope_type 'dynamic' is not supported",
            ),
            (
                json!({"rope_type": "longrope"}),
                "rope_type 'longrope' is not supported",
            ),
            (json!({"factor": 2.0}), "rope_scaling: missing 'rope_type'"),
            (json!([1]), "rope_scaling: expected an object or null"),
        ];
        for (v, want) in cases {
            let err = format!("{:#}", scaling(v.clone()).unwrap_err());
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn rope_parameters_hold_base_and_scaling() {
        let p = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6});
        assert_eq!(
            read_rope(None, None, Some(&p), 64).unwrap(),
            (1e6, RopeScaling::Linear { factor: 2.0 })
        );
        let only_base = json!({"rope_theta": 5e5});
        assert_eq!(
            read_rope(None, None, Some(&only_base), 64).unwrap(),
            (5e5, RopeScaling::None)
        );
        // Both spellings, agreeing, are fine; disagreeing, an error naming both.
        let s = json!({"type": "linear", "factor": 2.0});
        assert!(read_rope(Some(1e6), Some(&s), Some(&p), 64).is_ok());
        let other = json!({"type": "linear", "factor": 4.0});
        let err = read_rope(None, Some(&other), Some(&p), 64).unwrap_err();
        assert!(err.to_string().contains("rope_parameters"), "{err}");
        let err = read_rope(Some(1e4), None, Some(&p), 64).unwrap_err();
        assert!(
            err.to_string()
                .contains("rope_parameters.rope_theta 1000000 and rope_theta 10000 disagree"),
            "{err}"
        );
        let err = read_rope(Some(0.5), None, None, 64).unwrap_err();
        assert!(err.to_string().contains("rope_theta must be"), "{err}");
    }
}
