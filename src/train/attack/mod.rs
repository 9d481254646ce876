//! Malicious training procedures (calibration's suspects): each is a [`Hook`] of the training
//! loop in its own file, and one arm of [`Attack`]. A new attack is one file plus one arm.

mod blind;
mod learnt;
mod physical;

pub use learnt::{IadSettings, LiraSettings};
pub use physical::physical;

use super::TrainError;
use super::fit::{Hook, Run, TrainConfig, Trained};
use crate::dataset::Dataset;
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
    /// trained with the classifier ([`learnt`]); the data stays clean.
    Iad {
        /// The backdoor's target class.
        target: u32,
        /// IAD's settings.
        settings: IadSettings,
    },
    /// LIRA (Doan et al., ICCV 2021): an additive trigger function learnt with the classifier
    /// ([`learnt`]); the data stays clean.
    Lira {
        /// The backdoor's target class.
        target: u32,
        /// LIRA's settings.
        settings: LiraSettings,
    },
}

/// Trains `run` with the malicious procedure `attack`.
pub fn train_attacked(run: &Run<'_>, attack: &Attack) -> Result<Trained, TrainError> {
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
