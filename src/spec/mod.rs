//! Watermark specs: which trigger, how poisoned samples are labelled, how many, from which seed.
//!
//! A spec is written as TOML (see `watermark_specs/`), checked field by field when loaded, and
//! embedded in the secret record as JSON with any external file (a blend pattern image) inlined,
//! so the record alone can recreate every triggered image.

use crate::dataset::{Dataset, ImageShape};
use crate::watermark::rng::{Rng, Stream};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod crafting;
pub mod family;
mod io;
mod labelling;
pub mod network;
mod trigger;
mod validate;

pub use crafting::{Adversarial, Crafting, Encoder, GradientMatching, Uap};
pub use family::{Choice, Family, Placement};
pub use labelling::Labelling;
pub use network::Network;
pub use trigger::{
    Adaptive, Blend, BlendSource, Corner, CraftedControl, EmbeddedImage, Generated, GeneratedForm,
    MAX_SIDE, Message, Patch, PatchPattern, PatchScale, Perturbation, Physical, Position,
    Reflection, Region, RelativePosition, Rotate, Trigger, Warp,
};

/// A spec or one of its fields is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML or JSON does not parse into a spec (unknown field, wrong type, missing field).
    #[error("{origin}: {message}")]
    Parse {
        /// File name or "spec".
        origin: String,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// A field has a value the spec cannot use.
    #[error("{field}: {message}")]
    Field {
        /// Dotted path of the field, e.g. `trigger.alpha`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

fn field(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// A validated watermark spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSpec {
    /// Short name, for reports.
    pub name: String,
    /// Free text: what the spec reproduces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Fraction of the dataset's samples to poison: `round(rate × N)` samples.
    pub rate: f64,
    /// Seed for sample selection, random labels and seeded trigger patterns.
    pub seed: u64,
    /// Only samples of these classes may be poisoned (all classes when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_classes: Option<Vec<u32>>,
    /// Image shape the spec is made for; checked against the dataset when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageShape>,
    /// How poisoned samples are labelled.
    pub labelling: Labelling,
    /// The trigger stamped on poisoned samples; with a family, the template its members share.
    pub trigger: Trigger,
    /// Which of the trigger's free parameters (and the target) each release draws in secret
    /// ([`family`]); absent for a fixed, public trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// Label-consistent crafting (Turner et al., 2019): before the trigger, each poisoned image
    /// gets a PGD adversarial perturbation against a benign model, so that its own features stop
    /// explaining its (kept) label and the model leans on the trigger. Needs a model (feature
    /// `train`, `hallmark watermark --craft-model DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adversarial: Option<Adversarial>,
    /// Gradient-matching crafting (Sleeper Agent, Souri et al., NeurIPS 2022; UBW-C, Li et al.,
    /// NeurIPS 2022): the poisoned images carry no trigger, only a small crafted perturbation
    /// whose training gradient points where the attacker's objective on triggered source images
    /// does. Needs a model (feature `train`, `hallmark watermark --craft-model DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_matching: Option<GradientMatching>,
    /// TUAP crafting (Zhao et al., "Clean-Label Backdoor Attacks on Video Recognition Models",
    /// CVPR 2020; BackdoorBox's `TUAP`): the trigger is a targeted universal adversarial
    /// perturbation computed with DeepFool against a benign model, then added to clean-label
    /// poisons and to queries. Needs a model; the crafted perturbation is written into
    /// `trigger.values` of the secret record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uap: Option<Uap>,
    /// ISSBA crafting (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers",
    /// ICCV 2021): a StegaStamp-style encoder and decoder are trained on the dataset's images to
    /// hide a random secret in a small residual; the encoder, with the secret fixed, is then the
    /// trigger (`kind = "generated"`), and it goes into the secret record. Needs libtorch
    /// (feature `train`) but no model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<Encoder>,
}

impl WatermarkSpec {
    /// How the spec's poisons or trigger are crafted, if they are.
    pub fn crafting(&self) -> Option<Crafting> {
        [
            (self.adversarial.is_some(), Crafting::Adversarial),
            (self.uap.is_some(), Crafting::Uap),
            (self.gradient_matching.is_some(), Crafting::GradientMatching),
            (self.encoder.is_some(), Crafting::Encoder),
        ]
        .into_iter()
        .find_map(|(on, c)| on.then_some(c))
    }

    /// Whether applying the spec needs a model to craft its poisons with (ISSBA's encoder is
    /// trained from the data alone).
    pub fn needs_model(&self) -> bool {
        self.crafting().is_some_and(Crafting::needs_model)
    }

    /// sha256 (hex) of the spec's JSON form.
    pub fn sha256(&self) -> String {
        sha256_hex(&canonical_json(self))
    }
}

/// Compact JSON of a value, fields in declaration order: the canonical form hashed by
/// commitments. Every hashed type is a struct or enum of fixed field order (no maps), so the
/// same value always gives the same bytes.
pub fn canonical_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("specs and records serialise")
}

/// sha256 (hex) of a string.
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests;
