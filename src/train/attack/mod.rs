//! Malicious training procedures (calibration's suspects): each is a [`Hook`] of the training
//! loop in its own file, and one arm of [`Attack`]. A new attack is one file plus one arm.

mod blind;
mod learnt;
mod physical;

pub use learnt::{IadSettings, LiraSettings};
pub use physical::physical;

use super::TrainError;
use super::fit::{Hook, Run, TrainConfig, Trained};
use crate::dataset::{Dataset, ImageShape};
use crate::watermark::SecretRecord;
use clap::ValueEnum;
use tch::Device;

/// A suspect that trains maliciously (calibration only): the attack lives in the training
/// procedure, not (only) in the data.
pub enum Attack {
    /// Plain training.
    None,
    /// PhysicalBA (Li et al., "Backdoor Attack in the Physical World", ICLR-W 2021): the poisoned
    /// training images (BackdoorBox appends the transformations to BadNets' poisoned-sample
    /// transform) go through the physical-world transformations of BackdoorBox's MNIST test,
    /// ColorJitter(brightness 0.2, contrast 0.2) and RandomAffine(translate 0.1, scale 0.8–0.9),
    /// each time they are drawn, so that the backdoor survives them at test time.
    PhysicalBa {
        /// Which training samples are poisoned.
        poisoned: Vec<bool>,
    },
    /// Blind backdoor (Bagdasaryan & Shmatikov, USENIX Security 2021): the training code adds a
    /// backdoor task on every batch (the same images stamped, labelled `target`) to the clean
    /// loss, the tasks weighted by MGDA (Sener & Koltun's min-norm combination of the task
    /// gradients, each normalised by loss × gradient norm capped at 10: BackdoorBox's `loss+`).
    /// The data stays clean. With `neural_cleanse` (BackdoorBox's default) a third task evades
    /// Neural Cleanse (Wang et al., S&P 2019): on every batch a mask and pattern are first
    /// reverse-engineered one Adam step further towards `target` (loss 0.999·CE + 0.001·‖mask‖₁,
    /// as Neural Cleanse weighs them), then the network learns to give the batch its true labels
    /// through that reverse-engineered trigger.
    Blind {
        /// The backdoor trigger.
        stamp: crate::watermark::Stamp,
        /// The backdoor's target class.
        target: u32,
        /// Add the Neural Cleanse evasion task.
        neural_cleanse: bool,
    },
    /// IAD (Nguyen & Tran, NeurIPS 2020): an input-aware pattern generator and mask network
    /// trained with the classifier (`attack/learnt.rs`); the data stays clean.
    Iad {
        /// The backdoor's target class.
        target: u32,
        /// IAD's settings.
        settings: IadSettings,
    },
    /// LIRA (Doan et al., ICCV 2021): an additive trigger function learnt with the classifier
    /// (`attack/learnt.rs`); the data stays clean.
    Lira {
        /// The backdoor's target class.
        target: u32,
        /// LIRA's settings.
        settings: LiraSettings,
    },
}

/// The malicious training procedures by name (`hallmark train --attack`, calibration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttackKind {
    /// Plain training.
    None,
    /// PhysicalBA's physical-world transformations of the poisoned training images.
    PhysicalBa,
    /// Blind backdoor: the trigger of a secret record added in the loss.
    Blind,
    /// IAD: an input-aware trigger generator and mask learnt with the classifier.
    Iad,
    /// LIRA: an additive trigger function learnt with the classifier.
    Lira,
}

/// Settings of the attacks that have any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttackOptions {
    /// LIRA's eps: the largest change of one pixel value, 0–255 scale.
    pub lira_eps: f64,
    /// Blind with its Neural Cleanse evasion task (BackdoorBox's default).
    pub blind_neural_cleanse: bool,
}

impl Default for AttackOptions {
    fn default() -> Self {
        Self {
            lira_eps: LiraSettings::default().eps,
            blind_neural_cleanse: true,
        }
    }
}

impl AttackKind {
    /// Whether the attack learns its own trigger while training (the data stays clean).
    pub fn learns_trigger(self) -> bool {
        matches!(self, Self::Iad | Self::Lira)
    }

    /// The attack, with what it takes from the release's secret `record` (PhysicalBA's poisoned
    /// samples, Blind's trigger, every targeted attack's target class).
    pub fn attack(
        self,
        record: Option<&SecretRecord>,
        shape: ImageShape,
        options: AttackOptions,
    ) -> Result<Attack, TrainError> {
        let name = self
            .to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_string());
        let record = || {
            record.ok_or_else(|| {
                TrainError::Config(format!(
                    "--attack {name} takes {} from a secret record: add --secret FILE",
                    match self {
                        Self::PhysicalBa => "the poisoned samples",
                        Self::Blind => "its trigger",
                        _ => "its target class",
                    }
                ))
            })
        };
        let target = |r: &SecretRecord| {
            r.spec.labelling.target().ok_or_else(|| {
                TrainError::Config(format!(
                    "--attack {name} needs a targeted watermark (the record's spec has no target)"
                ))
            })
        };
        Ok(match self {
            Self::None => Attack::None,
            Self::PhysicalBa => {
                let r = record()?;
                let mut poisoned = vec![false; r.dataset.count];
                for p in &r.poisoned {
                    poisoned[p.index] = true;
                }
                Attack::PhysicalBa { poisoned }
            }
            Self::Blind => {
                let r = record()?;
                Attack::Blind {
                    target: target(r)?,
                    stamp: crate::watermark::Stamp::new(&r.spec.trigger, r.spec.seed, shape)?,
                    neural_cleanse: options.blind_neural_cleanse,
                }
            }
            Self::Iad => Attack::Iad {
                target: target(record()?)?,
                settings: Default::default(),
            },
            Self::Lira => Attack::Lira {
                target: target(record()?)?,
                settings: LiraSettings {
                    eps: options.lira_eps,
                    ..Default::default()
                },
            },
        })
    }
}

/// Trains `run` with the malicious procedure `attack`.
pub fn train_attacked(run: &Run<'_>, attack: &Attack) -> Result<Trained, TrainError> {
    // These attacks compute the loss themselves, and the first hook that does owns it.
    if !run.cfg.defence.is_none() && !matches!(attack, Attack::None | Attack::PhysicalBa { .. }) {
        return Err(TrainError::Config(format!(
            "the training-time defence {:?} changes the loss, which --attack {} computes itself",
            run.cfg.defence,
            attack.name()
        )));
    }
    let mut hook = attack.hook(run.train, run.cfg, run.device)?;
    super::fit::run(run, &mut [hook.as_mut()])
}

/// Plain training: no hook changes anything.
struct Plain;

impl Hook for Plain {
    fn name(&self) -> &'static str {
        "none"
    }
}

impl Attack {
    /// The attack's name, for records.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PhysicalBa { .. } => "physical-ba",
            Self::Blind { .. } => "blind",
            Self::Iad { .. } => "iad",
            Self::Lira { .. } => "lira",
        }
    }

    /// The attack as a hook of a run of `cfg` on `train`. Made before the run's network: a
    /// generator's variables draw from libtorch's generator here.
    pub fn hook<'a>(
        &'a self,
        train: &Dataset,
        cfg: &TrainConfig,
        device: Device,
    ) -> Result<Box<dyn Hook + 'a>, TrainError> {
        Ok(match self {
            Self::None => Box::new(Plain),
            Self::PhysicalBa { poisoned } => Box::new(physical::PhysicalBa::new(poisoned, train)?),
            Self::Blind {
                stamp,
                target,
                neural_cleanse,
            } => Box::new(blind::Blind::new(stamp, *target, *neural_cleanse)),
            Self::Iad { target, settings } => Box::new(learnt::Learner::iad(
                *settings,
                *target,
                train.shape(),
                cfg.seed,
                device,
            )),
            Self::Lira { target, settings } => Box::new(
                learnt::Learner::lira(*settings, *target, train.shape(), cfg.seed, device)
                    .for_epochs(cfg.epochs),
            ),
        })
    }
}

#[cfg(test)]
mod tests;
