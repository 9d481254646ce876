//! A training run's settings and what each epoch reports: plain data, shared by the loop, its
//! checkpoints and the records of trained models.

pub use super::defence::TrainingDefence;
use super::model::Arch;
use super::{TrainError, metrics};
use serde::{Deserialize, Serialize};

/// Learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// `lr · gamma^(number of milestones ≤ epoch)` (BackdoorBox's `adjust_learning_rate`).
    Step {
        /// Epochs (0-based) at which the rate is multiplied by gamma.
        milestones: Vec<usize>,
        /// Factor.
        gamma: f64,
    },
    /// `lr · (1 + cos(π · epoch / epochs)) / 2`.
    Cosine,
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Network.
    pub arch: Arch,
    /// Epochs.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Random crop after zero padding by this many pixels (0: none).
    pub crop_padding: usize,
    /// Random horizontal flip.
    pub flip: bool,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Epochs over which the learning rate rises linearly from 0, step by step (BackdoorBox's
    /// `warmup_epoch`); 0 for none. Keeps a network without batch norm from diverging in its
    /// first steps at a high rate.
    #[serde(default)]
    pub warmup_epochs: usize,
    /// A training-time defence (none by default).
    #[serde(default, skip_serializing_if = "TrainingDefence::is_none")]
    pub defence: TrainingDefence,
}

impl TrainConfig {
    /// The same settings with another seed.
    pub fn with_seed(&self, seed: u64) -> Self {
        Self {
            seed,
            ..self.clone()
        }
    }

    /// The learning rate during `epoch` (0-based).
    pub fn lr_at(&self, epoch: usize) -> f64 {
        match &self.schedule {
            Schedule::Step { milestones, gamma } => {
                self.lr * gamma.powi(milestones.iter().filter(|m| **m <= epoch).count() as i32)
            }
            Schedule::Cosine => {
                self.lr
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * epoch as f64 / self.epochs as f64).cos())
            }
        }
    }

    pub(crate) fn check(&self) -> Result<(), TrainError> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(TrainError::Config(
                "epochs and batch size must be at least 1".into(),
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && (0.0..1.0).contains(&self.momentum))
            || self.weight_decay < 0.0
        {
            return Err(TrainError::Config(
                "need lr > 0, momentum in [0, 1), weight decay ≥ 0".into(),
            ));
        }
        Ok(())
    }
}

/// What one epoch gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean training loss.
    pub loss: f64,
    /// Training images per second.
    pub images_per_second: f64,
    /// Metrics on the evaluation sets, where given.
    pub metrics: Option<metrics::Metrics>,
}
