//! The sections of specs whose poisons are crafted with a model or whose trigger is made by
//! training: label-consistent PGD, gradient matching, ISSBA's encoder, TUAP.

use super::*;

/// Settings of ISSBA's encoder training (BackdoorBox's `encoder_schedule` names: a 20-bit secret,
/// the first epochs on the secret alone; fewer epochs and images than its 20 epochs by default,
/// for a CPU).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encoder {
    /// Bits of the hidden secret.
    #[serde(default = "default_secret_size")]
    pub secret_size: usize,
    /// Training epochs of the encoder and decoder.
    #[serde(default = "default_enc_epochs")]
    pub epochs: usize,
    /// First epochs with the secret's loss only (no image loss).
    #[serde(default = "default_secret_only_epochs")]
    pub secret_only_epochs: usize,
    /// Training images (drawn with the spec's seed; all when larger than the dataset).
    #[serde(default = "default_enc_samples")]
    pub samples: usize,
    /// Weight of the residual's mean square (on the [0, 1] scale) against the secret's
    /// cross-entropy.
    #[serde(default = "default_image_weight")]
    pub image_weight: f64,
    /// Adam's learning rate.
    #[serde(default = "default_enc_lr")]
    pub lr: f64,
}

fn default_secret_size() -> usize {
    20
}
fn default_enc_epochs() -> usize {
    6
}
fn default_secret_only_epochs() -> usize {
    2
}
fn default_enc_samples() -> usize {
    10_000
}
fn default_image_weight() -> f64 {
    10.0
}
fn default_enc_lr() -> f64 {
    1e-3
}

/// Settings of TUAP crafting, BackdoorBox's names and defaults (eps on the 0–255 scale; its
/// MNIST tests use 0.3, i.e. 76.5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uap {
    /// L∞ bound of the perturbation, 0–255 scale.
    pub eps: f64,
    /// Stop once the perturbation sends at least 1 − delta of the samples to the target.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// DeepFool's overshoot.
    #[serde(default = "default_overshoot")]
    pub overshoot: f64,
    /// DeepFool iterations per sample.
    #[serde(default = "default_max_iter_df")]
    pub max_iter_df: usize,
    /// Fraction of the training set the perturbation is computed on.
    #[serde(default = "default_p_samples")]
    pub p_samples: f64,
    /// Passes over those samples at most (BackdoorBox's `max_iter_uni`, unbounded there).
    #[serde(default = "default_max_passes")]
    pub max_passes: usize,
    /// Controls a release of a TUAP family is crafted with, for the verifier's rank test: at
    /// least the K it asks for (99 at alpha 0.01, K + 1 ≥ 1/alpha).
    #[serde(
        default = "default_uap_controls",
        skip_serializing_if = "is_default_uap_controls"
    )]
    pub controls: usize,
}

fn default_uap_controls() -> usize {
    99
}
fn is_default_uap_controls(n: &usize) -> bool {
    *n == default_uap_controls()
}

fn default_delta() -> f64 {
    0.2
}
fn default_overshoot() -> f64 {
    0.02
}
fn default_max_iter_df() -> usize {
    50
}
fn default_p_samples() -> f64 {
    0.01
}
fn default_max_passes() -> usize {
    10
}

/// Settings of gradient-matching crafting, on the 0–255 pixel scale. Defaults follow the UBW-C
/// code (eps 16, beta 2, 250 iterations, the surrogate retrained every 50); the surrogate's
/// retraining length is ours to choose on a CPU (the code retrains 40 epochs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradientMatching {
    /// Largest change of one pixel value (L∞ ball), 0–255 scale.
    pub eps: f64,
    /// Weight of the prediction entropy in the untargeted objective (UBW-C's beta); unused by
    /// targeted (Sleeper Agent) specs.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Optimisation steps of the perturbations.
    #[serde(default = "default_craft_iterations")]
    pub iterations: usize,
    /// Retrain the surrogate model on the current poisons every this many steps (0: never).
    #[serde(default = "default_retrain_every")]
    pub retrain_every: usize,
    /// Epochs of each surrogate retraining.
    #[serde(default = "default_retrain_epochs")]
    pub retrain_epochs: usize,
    /// Triggered source-class training images whose objective the poisons' gradient matches.
    #[serde(default = "default_sources")]
    pub sources: usize,
}

fn default_beta() -> f64 {
    2.0
}
fn default_craft_iterations() -> usize {
    250
}
fn default_retrain_every() -> usize {
    50
}
fn default_retrain_epochs() -> usize {
    2
}
fn default_sources() -> usize {
    1000
}

/// PGD settings of label-consistent crafting, on the 0–255 pixel scale (BackdoorBox's
/// `LabelConsistent` defaults: eps 8, step 1.5, 100 steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adversarial {
    /// Largest change of one pixel value (L∞ ball), 0–255 scale.
    pub eps: f64,
    /// Step size of one PGD iteration, 0–255 scale.
    pub step: f64,
    /// PGD iterations.
    pub steps: usize,
}

/// How a spec's poisons or trigger are made by the trainer, by the spec section that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crafting {
    /// `[adversarial]`: label-consistent PGD perturbations against a benign model.
    Adversarial,
    /// `[uap]`: TUAP, a targeted universal adversarial perturbation found with a benign model.
    Uap,
    /// `[gradient_matching]`: Sleeper Agent or UBW-C poisons matched to a surrogate's gradients.
    GradientMatching,
    /// `[encoder]`: ISSBA's encoder, trained on the data alone.
    Encoder,
}

impl Crafting {
    /// The spec section that asks for it.
    pub fn section(self) -> &'static str {
        match self {
            Self::Adversarial => "adversarial",
            Self::Uap => "uap",
            Self::GradientMatching => "gradient_matching",
            Self::Encoder => "encoder",
        }
    }

    /// What it is, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Adversarial => "label-consistent PGD",
            Self::Uap => "TUAP (universal adversarial perturbation)",
            Self::GradientMatching => "gradient matching",
            Self::Encoder => "ISSBA encoder",
        }
    }

    /// Whether crafting needs a benign model (everything but ISSBA's encoder).
    pub fn needs_model(self) -> bool {
        self != Self::Encoder
    }

    /// Whether the crafting makes the trigger itself (TUAP's perturbation, ISSBA's encoder), so
    /// nothing can be stamped before it has run.
    pub fn makes_trigger(self) -> bool {
        matches!(self, Self::Uap | Self::Encoder)
    }
}

impl WatermarkSpec {
    /// Checks the crafting sections (`[adversarial]`, `[gradient_matching]`, `[encoder]`,
    /// `[uap]`).
    pub(super) fn validate_crafting(&self) -> Result<(), SpecError> {
        if let Some(a) = self.adversarial {
            if !matches!(self.labelling, Labelling::CleanLabel { .. }) {
                return Err(field(
                    "adversarial",
                    "label-consistent crafting needs labelling.kind = \"clean_label\"",
                ));
            }
            if !(a.eps.is_finite() && a.eps > 0.0 && a.eps <= 255.0) {
                return Err(field(
                    "adversarial.eps",
                    format!("must be in (0, 255], got {}", a.eps),
                ));
            }
            if !(a.step.is_finite() && a.step > 0.0 && a.step <= 255.0) {
                return Err(field(
                    "adversarial.step",
                    format!("must be in (0, 255], got {}", a.step),
                ));
            }
            if a.steps == 0 || a.steps > 10_000 {
                return Err(field(
                    "adversarial.steps",
                    format!("must be 1 to 10000, got {}", a.steps),
                ));
            }
        }
        if let Some(g) = self.gradient_matching {
            if !self.labelling.keeps_labels() {
                return Err(field(
                    "gradient_matching",
                    "gradient matching keeps labels: labelling.kind must be \"clean_label\" \
                     (Sleeper Agent) or \"untargeted_clean_label\" (UBW-C)",
                ));
            }
            if self.adversarial.is_some() {
                return Err(field(
                    "gradient_matching",
                    "a spec has either [adversarial] or [gradient_matching] crafting, not both",
                ));
            }
            if self.source_classes.is_none() {
                return Err(field(
                    "source_classes",
                    "gradient matching needs the source classes whose triggered images it aims at",
                ));
            }
            if !(g.eps.is_finite() && g.eps > 0.0 && g.eps <= 255.0) {
                return Err(field(
                    "gradient_matching.eps",
                    format!("must be in (0, 255], got {}", g.eps),
                ));
            }
            if !(g.beta.is_finite() && (0.0..=100.0).contains(&g.beta)) {
                return Err(field(
                    "gradient_matching.beta",
                    format!("must be in [0, 100], got {}", g.beta),
                ));
            }
            if g.iterations == 0 || g.iterations > 100_000 {
                return Err(field(
                    "gradient_matching.iterations",
                    format!("must be 1 to 100000, got {}", g.iterations),
                ));
            }
            if g.retrain_every > 0 && g.retrain_epochs == 0 {
                return Err(field(
                    "gradient_matching.retrain_epochs",
                    "must be at least 1 when retrain_every is set",
                ));
            }
            if g.sources == 0 {
                return Err(field("gradient_matching.sources", "must be at least 1"));
            }
        } else if matches!(self.labelling, Labelling::UntargetedCleanLabel { .. }) {
            return Err(field(
                "labelling",
                "untargeted_clean_label (UBW-C) is crafted by gradient matching: add a \
                 [gradient_matching] section",
            ));
        }
        if let Some(e) = self.encoder {
            if !matches!(
                &self.trigger,
                Trigger::Generated(Generated {
                    form: GeneratedForm::Additive,
                    ..
                })
            ) {
                return Err(field(
                    "trigger.kind",
                    "an [encoder] spec's trigger is the trained encoder: kind = \"generated\", \
                     form = \"additive\"",
                ));
            }
            if !matches!(
                self.labelling,
                Labelling::Targeted { .. } | Labelling::AllToAll { .. }
            ) {
                return Err(field(
                    "labelling.kind",
                    "ISSBA is poison-label: labelling.kind must be \"targeted\" or \"all_to_all\"",
                ));
            }
            if self.adversarial.is_some() || self.gradient_matching.is_some() || self.uap.is_some()
            {
                return Err(field("encoder", "a spec has one kind of crafting"));
            }
            if !(1..=256).contains(&e.secret_size) {
                return Err(field("encoder.secret_size", "must be 1 to 256 bits"));
            }
            if e.epochs == 0 || e.epochs > 10_000 || e.secret_only_epochs > e.epochs {
                return Err(field(
                    "encoder.epochs",
                    "must be 1 to 10000, and secret_only_epochs at most epochs",
                ));
            }
            if e.samples == 0 {
                return Err(field("encoder.samples", "must be at least 1"));
            }
            if !(e.image_weight.is_finite() && e.image_weight >= 0.0) {
                return Err(field("encoder.image_weight", "must be finite and ≥ 0"));
            }
            if !(e.lr.is_finite() && e.lr > 0.0 && e.lr < 1.0) {
                return Err(field("encoder.lr", "must be in (0, 1)"));
            }
        }
        if let Some(u) = self.uap {
            if !matches!(self.labelling, Labelling::CleanLabel { .. }) {
                return Err(field(
                    "uap",
                    "TUAP is clean-label: labelling.kind must be \"clean_label\"",
                ));
            }
            if !matches!(self.trigger, Trigger::Perturbation(_)) {
                return Err(field(
                    "trigger.kind",
                    "a [uap] spec's trigger is the crafted perturbation: kind = \"perturbation\"",
                ));
            }
            if self.adversarial.is_some() || self.gradient_matching.is_some() {
                return Err(field("uap", "a spec has one kind of crafting"));
            }
            if !(u.eps.is_finite() && u.eps > 0.0 && u.eps <= 255.0) {
                return Err(field(
                    "uap.eps",
                    format!("must be in (0, 255], got {}", u.eps),
                ));
            }
            if !(u.delta.is_finite() && (0.0..1.0).contains(&u.delta)) {
                return Err(field(
                    "uap.delta",
                    format!("must be in [0, 1), got {}", u.delta),
                ));
            }
            if !(u.overshoot.is_finite() && (0.0..=1.0).contains(&u.overshoot)) {
                return Err(field(
                    "uap.overshoot",
                    format!("must be in [0, 1], got {}", u.overshoot),
                ));
            }
            if !(u.p_samples.is_finite() && u.p_samples > 0.0 && u.p_samples <= 1.0) {
                return Err(field(
                    "uap.p_samples",
                    format!("must be in (0, 1], got {}", u.p_samples),
                ));
            }
            if u.max_iter_df == 0 || u.max_passes == 0 {
                return Err(field(
                    "uap",
                    "max_iter_df and max_passes must be at least 1",
                ));
            }
            if !(1..=9999).contains(&u.controls) {
                return Err(field("uap.controls", "must be 1 to 9999"));
            }
        }
        Ok(())
    }
}
