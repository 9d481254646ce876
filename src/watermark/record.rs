//! The secret record of a watermark and its public commitment.

use super::WatermarkError;
use crate::dataset::ImageShape;
use crate::spec::{WatermarkSpec, canonical_json, sha256_hex};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version of the record format written today. Version 2 added `family` (the trigger's family,
/// from which the release's secret trigger and the verifier's controls are drawn); version 1
/// records, whose trigger was written in the spec, are read and verified as before.
pub const VERSION: u32 = 2;

/// Everything needed to verify a watermark later: keep it secret.
///
/// Its commitment (sha256 of its canonical JSON) is public: published with the release, it proves
/// the watermark existed before any dispute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRecord {
    /// Record format version.
    pub version: u32,
    /// 32 random bytes (hex) that keep the commitment from revealing a guessable spec.
    pub nonce: String,
    /// The spec, with any pattern image inlined.
    pub spec: WatermarkSpec,
    /// The dataset before and after watermarking.
    pub dataset: DatasetFacts,
    /// Poisoned samples, by index, with original and new labels.
    pub poisoned: Vec<PoisonedSample>,
    /// Samples modified without relabelling (WaNet's noise mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noise_indices: Vec<usize>,
    /// The spec as written, with its `[family]` section, when the trigger in `spec` was drawn
    /// from it for this release (seed derived from the nonce): the verifier draws its controls
    /// from it. Absent for a fixed, public trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<WatermarkSpec>,
}

/// Facts about the watermarked dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetFacts {
    /// Number of samples.
    pub count: usize,
    /// Image shape.
    pub shape: ImageShape,
    /// Number of classes.
    pub num_classes: usize,
    /// Dataset sha256 before watermarking.
    pub sha256_before: String,
    /// Dataset sha256 of the release.
    pub sha256_after: String,
}

/// One poisoned sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoisonedSample {
    /// Index in the dataset.
    pub index: usize,
    /// Label before.
    pub original_label: u32,
    /// Label in the release.
    pub new_label: u32,
}

impl SecretRecord {
    /// The public commitment: sha256 (hex) of the record's canonical JSON.
    pub fn commitment(&self) -> String {
        sha256_hex(&canonical_json(self))
    }

    /// Writes the record with mode 0600, atomically.
    pub fn save(&self, path: &Path, overwrite: bool) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("records serialise");
        bytes.push(b'\n');
        crate::fsutil::write_file_atomic(path, &bytes, 0o600, overwrite)
    }

    /// Reads and checks a record file.
    pub fn load(path: &Path) -> Result<Self, WatermarkError> {
        let err = |message: String| WatermarkError::Record {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_json(&text).map_err(|e| match e {
            WatermarkError::Record { message, .. } => err(message),
            other => err(other.to_string()),
        })
    }

    /// Parses and checks a record's JSON.
    pub fn from_json(text: &str) -> Result<Self, WatermarkError> {
        let err = |message: String| WatermarkError::Record {
            path: "record".into(),
            message,
        };
        let rec: Self =
            serde_json::from_str(text).map_err(|e| err(format!("not a secret record: {e}")))?;
        if !(1..=VERSION).contains(&rec.version) {
            return Err(err(format!(
                "record version {} is not supported (expected 1 to {VERSION})",
                rec.version
            )));
        }
        rec.spec.validate().map_err(|e| err(format!("spec.{e}")))?;
        if rec.spec.family.is_some() {
            return Err(err(
                "spec.family: a record's spec holds the drawn trigger, not a family".into(),
            ));
        }
        if let Some(f) = &rec.family {
            if rec.version < 2 {
                return Err(err("family: version 1 records have no family".into()));
            }
            f.validate().map_err(|e| err(format!("family.{e}")))?;
            if f.family.is_none() {
                return Err(err("family: the spec has no [family] section".into()));
            }
            // The drawn trigger must be the family's draw for this nonce: a record edited by hand
            // (another target, another patch) is refused rather than verified.
            let nonce = hex::decode(&rec.nonce).map_err(|_| err("nonce: not hex".into()))?;
            let again = super::draw_release(f, rec.dataset.num_classes, rec.dataset.shape, &nonce)
                .map_err(|e| err(format!("family: {e}")))?;
            let same_trigger = !crate::spec::family::has_exchangeable_controls(f)
                || again.trigger == rec.spec.trigger;
            if again.labelling != rec.spec.labelling || !same_trigger {
                return Err(err(
                    "spec: the trigger is not the family's draw for this record's nonce".into(),
                ));
            }
        }
        let d = &rec.dataset;
        let mut last = None;
        for p in &rec.poisoned {
            if p.index >= d.count || last.is_some_and(|l| p.index <= l) {
                return Err(err(format!(
                    "poisoned index {} is out of order or out of range",
                    p.index
                )));
            }
            if p.original_label as usize >= d.num_classes || p.new_label as usize >= d.num_classes {
                return Err(err(format!("sample {}: label out of range", p.index)));
            }
            last = Some(p.index);
        }
        if rec.noise_indices.iter().any(|&i| i >= d.count) {
            return Err(err("noise index out of range".into()));
        }
        Ok(rec)
    }
}
