//! Learning-rate schedules, as transformers' `get_*_schedule_with_warmup` compute them: a linear
//! warmup from 0, then cosine (down to `min_lr`), linear (down to `min_lr`) or constant.
//! `lr(step)` is the rate of the optimizer step that follows `step` completed steps.

use anyhow::{bail, Result};

use crate::config::suggest;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

impl ScheduleKind {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "cosine" => Self::Cosine,
            "linear" => Self::Linear,
            "constant" => Self::Constant,
            other => bail!(
                "schedule.name = \"{other}\": use cosine, linear or constant{}",
                suggest(other, &["cosine", "linear", "constant"])
            ),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_ratio` rounds up, as transformers' `get_warmup_steps`.
    pub fn new(
        kind: ScheduleKind,
        max_lr: f64,
        min_lr: f64,
        warmup_steps: Option<u64>,
        warmup_ratio: Option<f64>,
        total_steps: u64,
    ) -> Self {
        let warmup = warmup_steps
            .unwrap_or_else(|| warmup_ratio.map_or(0, |r| (r * total_steps as f64).ceil() as u64));
        Self {
            kind,
            max_lr,
            min_lr,
            warmup_steps: warmup,
            total_steps,
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.max_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        let min_ratio = self.min_lr / self.max_lr;
        let factor = match self.kind {
            ScheduleKind::Constant => return self.max_lr,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            ScheduleKind::Linear => (1.0 - progress).max(0.0),
        };
        self.max_lr * (factor * (1.0 - min_ratio) + min_ratio).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_reaches_min_lr_at_the_last_step() {
        let s = Schedule::new(ScheduleKind::Cosine, 1e-3, 1e-4, Some(10), None, 110);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12, "halfway: {}", s.lr(60));
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        let l = Schedule::new(ScheduleKind::Linear, 1e-3, 0.0, None, Some(0.05), 100);
        assert_eq!(l.warmup_steps, 5);
        assert!((l.lr(55) - 1e-3 * 45.0 / 95.0).abs() < 1e-12);
        assert_eq!(l.lr(100), 0.0);
        let c = Schedule::new(ScheduleKind::Constant, 2e-5, 0.0, Some(3), None, 100);
        assert_eq!(c.lr(99), 2e-5);
        assert!(ScheduleKind::parse("cosin")
            .unwrap_err()
            .to_string()
            .contains("`cosine`"));
    }
}
