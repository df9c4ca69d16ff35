//! What a run shows and records: a progress bar on a terminal (plain log lines otherwise),
//! `metrics.jsonl` with one line per step (and the same scalars as TensorBoard events when
//! asked), and `loss.png` / `lr.png` drawn from it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::plot::{Chart, Series};
use crate::tensorboard::{unix_time, EventFile, StepScalars};

/// One line of metrics.jsonl. A training step fills the training fields; a validation pass
/// adds `val_loss` (step 0 is the validation before training).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Non-padding tokens the step processed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_time_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Time the step waited for the previous checkpoint to finish writing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ckpt_stall_s: Option<f64>,
    /// When the line was written, in seconds since the Unix epoch (TensorBoard's wall time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_time: Option<f64>,
}

impl StepMetrics {
    /// The fields this step has, under the TensorBoard tags they are logged as.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        [
            ("train/loss", self.loss),
            ("train/lr", self.lr),
            ("train/grad_norm", self.grad_norm),
            ("train/tokens", self.tokens.map(|t| t as f64)),
            ("train/tokens_per_s", self.tokens_per_s),
            ("train/step_time_s", self.step_time_s),
            ("train/ckpt_stall_s", self.ckpt_stall_s),
            ("val/loss", self.val_loss),
        ]
        .into_iter()
        .filter_map(|(tag, v)| Some((tag, v?)))
        .collect()
    }
}

/// `output_dir/metrics.jsonl`, appended line by line, and with `tensorboard` the same scalars
/// in an event file under `output_dir/tensorboard/`.
pub struct MetricsLog {
    pub path: PathBuf,
    file: File,
    tensorboard: Option<EventFile>,
}

impl MetricsLog {
    /// Opens the log for a run starting after `resumed_step` completed steps: lines of later
    /// steps (written after the checkpoint a resumed run starts from) are dropped, so the log
    /// holds each step once. With `tensorboard`, a new event file in `output_dir/tensorboard`
    /// replaces helix's earlier ones there: the kept lines, then each step as it is written.
    pub fn open(output_dir: &Path, resumed_step: u64, tensorboard: bool) -> Result<Self> {
        let path = output_dir.join("metrics.jsonl");
        // The kept lines as they were written, not re-serialized.
        let kept: Vec<(String, StepMetrics)> = if resumed_step > 0 && path.exists() {
            read_metrics_lines(&path)?
                .into_iter()
                .filter(|(_, m)| m.step <= resumed_step)
                .collect()
        } else {
            Vec::new()
        };
        // TensorBoard's history first: if a kill comes between the two, the next open still
        // finds the kept lines, and TensorBoard has never shown more than they hold.
        let tensorboard = if tensorboard {
            let history: Vec<StepScalars> = kept
                .iter()
                .map(|(_, m)| (m.wall_time, m.step, m.scalars()))
                .collect();
            Some(EventFile::create(
                &output_dir.join("tensorboard"),
                &history,
            )?)
        } else {
            None
        };
        let mut text = kept
            .iter()
            .map(|(line, _)| line.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        helix_model::safetensors_write::write_atomic(&path, |w| Ok(w.write_all(text.as_bytes())?))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            path,
            file,
            tensorboard,
        })
    }

    /// The TensorBoard event file being written, if any: for what a run records there beside
    /// its steps (the config in the Text tab, the HParams session).
    pub fn tensorboard(&mut self) -> Option<&mut EventFile> {
        self.tensorboard.as_mut()
    }

    /// The TensorBoard event file being written, if any.
    pub fn event_file(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(|e| e.path.as_path())
    }

    /// Appends `m`, stamped with the time now.
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let m = StepMetrics {
            wall_time: Some(unix_time()),
            ..m.clone()
        };
        let line = serde_json::to_string(&m)?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        if let Some(events) = &mut self.tensorboard {
            events.write_scalars(m.wall_time, m.step, &m.scalars())?;
        }
        Ok(())
    }
}

pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    Ok(read_metrics_lines(path)?
        .into_iter()
        .map(|(_, m)| m)
        .collect())
}

/// Each line of `metrics.jsonl` with what it says.
fn read_metrics_lines(path: &Path) -> Result<Vec<(String, StepMetrics)>> {
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(f).lines().collect::<std::io::Result<_>>()?;
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(m) => out.push((line.clone(), m)),
            // A line cut by a kill mid-write can only be the last one; it is dropped.
            Err(_) if Some(i) == last => {}
            Err(e) => anyhow::bail!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Draws `loss.png` (training loss per step, validation loss where measured) and `lr.png`.
pub fn write_plots(output_dir: &Path, metrics: &[StepMetrics]) -> Result<Vec<PathBuf>> {
    let pick = |f: fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|m| f(m).map(|v| (m.step as f64, v)))
            .collect()
    };
    let (loss, val, lr) = (pick(|m| m.loss), pick(|m| m.val_loss), pick(|m| m.lr));
    let mut loss_series = vec![Series {
        name: "training loss",
        points: &loss,
        color: [31, 119, 180],
        markers: false,
    }];
    if !val.is_empty() {
        loss_series.push(Series {
            name: "validation loss",
            points: &val,
            color: [255, 127, 14],
            markers: true,
        });
    }
    let charts = [
        (
            "loss.png",
            Chart {
                title: "Training and validation loss",
                x_label: "step",
                y_label: "loss",
                series: loss_series,
            },
        ),
        (
            "lr.png",
            Chart {
                title: "Learning rate",
                x_label: "step",
                y_label: "learning rate",
                series: vec![Series {
                    name: "learning rate",
                    points: &lr,
                    color: [44, 160, 44],
                    markers: false,
                }],
            },
        ),
    ];
    let mut written = Vec::new();
    for (name, chart) in charts {
        let path = output_dir.join(name);
        chart.write_png(&path, 900, 540)?;
        written.push(path);
    }
    Ok(written)
}

/// The progress bar, or plain lines when stderr is not a terminal (Slurm logs, CI).
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Shows anything at all (rank 0 of a multi-process job; the others are quiet).
    visible: bool,
    total: u64,
    start: Instant,
    first_step: u64,
}

impl Progress {
    pub fn new(total: u64, first_step: u64, visible: bool) -> Self {
        let bar = (visible && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
                )
                .expect("a valid template"),
            );
            bar.set_position(first_step);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            bar,
            visible,
            total,
            start: Instant::now(),
            first_step,
        }
    }

    /// Shows a finished training step.
    pub fn step(&self, m: &StepMetrics) {
        if !self.visible {
            return;
        }
        let msg = format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss.unwrap_or(f64::NAN),
            m.lr.unwrap_or(0.0),
            m.tokens_per_s.unwrap_or(0.0)
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(msg);
            }
            None => {
                let done = m.step.saturating_sub(self.first_step).max(1) as f64;
                let per_step = self.start.elapsed().as_secs_f64() / done;
                let eta = per_step * self.total.saturating_sub(m.step) as f64;
                eprintln!(
                    "step {}/{} {msg} grad_norm {:.3} step {:.2}s ETA {}",
                    m.step,
                    self.total,
                    m.grad_norm.unwrap_or(f64::NAN),
                    m.step_time_s.unwrap_or(0.0),
                    format_secs(eta)
                );
            }
        }
    }

    /// A line above the bar (or a plain line).
    pub fn println(&self, msg: impl AsRef<str>) {
        if !self.visible {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(msg.as_ref()),
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The middle value of `xs` (the upper one of the two middles for an even count), as the step
/// times, collective timings and throughputs this crate reports are summarised; `None` when
/// empty.
pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied()
}

/// The most resident memory this process has held (Linux's VmHWM), in bytes; `None` where the
/// kernel does not report it.
pub fn peak_host_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(status_field(&status, "VmHWM:")? * 1024)
}

/// A `/proc/<pid>/status` field's number (`VmRSS:  1234 kB` → 1234).
pub fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_log_drops_the_steps_after_its_checkpoint() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let mut log = MetricsLog::open(tmp.path(), 0, false)?;
        for step in 0..=12 {
            log.write(&StepMetrics {
                step,
                loss: Some(1.0 / (step + 1) as f64),
                ..Default::default()
            })?;
        }
        drop(log);
        let mut log = MetricsLog::open(tmp.path(), 10, false)?;
        log.write(&StepMetrics {
            step: 11,
            loss: Some(0.5),
            ..Default::default()
        })?;
        let m = read_metrics(&tmp.path().join("metrics.jsonl"))?;
        let steps: Vec<u64> = m.iter().map(|m| m.step).collect();
        assert_eq!(steps, (0..=11).collect::<Vec<_>>());
        assert_eq!(m[11].loss, Some(0.5));
        // A last line cut by a kill is dropped; damage elsewhere is an error with the line.
        let path = tmp.path().join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(&path, format!("{text}{{\"step\": 12, \"lo"))?;
        assert_eq!(read_metrics(&path)?.len(), 12);
        std::fs::write(&path, format!("{{\"st\n{text}"))?;
        assert!(read_metrics(&path)
            .unwrap_err()
            .to_string()
            .contains("metrics.jsonl:1"));
        std::fs::write(&path, text)?;
        // A fresh run starts an empty log.
        MetricsLog::open(tmp.path(), 0, false)?;
        assert!(read_metrics(&tmp.path().join("metrics.jsonl"))?.is_empty());
        let plots = write_plots(tmp.path(), &m)?;
        assert!(plots.iter().all(|p| p.exists()));
        Ok(())
    }

    #[test]
    fn a_resumed_log_keeps_its_lines_byte_for_byte_and_reads_floats_exactly() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("metrics.jsonl");
        // Values whose shortest spelling serde_json's default float parser reads a bit off.
        let lines = "{\"step\":1,\"loss\":1.6062922044233843}\n\
                     {\"step\":2,\"val_loss\":1.4149011884416853,\"lr\":1e-30}\n";
        std::fs::write(&path, format!("{lines}{{\"step\":3,\"loss\":2.0}}\n"))?;
        drop(MetricsLog::open(tmp.path(), 2, false)?);
        assert_eq!(std::fs::read_to_string(&path)?, lines);
        let m = read_metrics(&path)?;
        assert_eq!(
            m[0].loss.map(f64::to_bits),
            Some(1.6062922044233843f64.to_bits())
        );
        assert_eq!(
            m[1].val_loss.map(f64::to_bits),
            Some(1.4149011884416853f64.to_bits())
        );
        Ok(())
    }
}
