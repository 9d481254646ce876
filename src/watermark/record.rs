//! The secret record of a watermark and its public commitment.

use super::WatermarkError;
use crate::Invalid;
use crate::dataset::ImageShape;
use crate::spec::{WatermarkSpec, canonical_json, sha256_hex};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version of the record format written today for a release made in memory. Version 2 added
/// `family` (the trigger's family, from which the release's secret trigger and the verifier's
/// controls are drawn); version 1 records, whose trigger was written in the spec, are read and
/// verified as before.
pub const VERSION: u32 = 2;

/// Version of the record of a streamed release ([`KeyedSelection`]): its samples are chosen by
/// key, not by index.
pub const KEYED_VERSION: u32 = 3;

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
    /// A streamed release (version 3): the rule that chose its samples by key and, per shard,
    /// the samples it poisoned; `poisoned` is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed: Option<KeyedSelection>,
}

/// How a streamed release chose its samples ([`super::keyed`]) and which it poisoned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyedSelection {
    /// The rule ([`super::keyed::RULE`]).
    pub rule: String,
    /// An eligible sample's probability of being poisoned.
    pub threshold: f64,
    /// The channels the trigger was stamped in.
    pub channels: usize,
    /// The smallest image (height, width) of the release.
    pub min_size: [usize; 2],
    /// The largest image (height, width) of the release.
    pub max_size: [usize; 2],
    /// The release's shards, in name order.
    pub shards: Vec<ShardFacts>,
}

/// One shard of a streamed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardFacts {
    /// File name.
    pub name: String,
    /// Samples in it.
    pub count: usize,
    /// sha256 of its samples before stamping (keys, labels and image bytes, in order).
    pub sha256_before: String,
    /// The same, as released.
    pub sha256_after: String,
    /// Its poisoned samples, in shard order.
    pub poisoned: Vec<PoisonedKey>,
}

/// One poisoned sample of a streamed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoisonedKey {
    /// The sample's key (a Parquet row's number, a WebDataset sample's key).
    pub key: String,
    /// Label before.
    pub original_label: u32,
    /// Label in the release.
    pub new_label: u32,
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
    /// How many samples the release poisoned (by index, or by key in a streamed release).
    pub fn poisoned_count(&self) -> usize {
        self.poisoned.len()
            + self.keyed.as_ref().map_or(0, |k| {
                k.shards.iter().map(|s| s.poisoned.len()).sum::<usize>()
            })
    }

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
        load_file(path, Self::from_json)
    }

    /// Parses and checks a record's JSON.
    pub fn from_json(text: &str) -> Result<Self, WatermarkError> {
        let err = |message: String| WatermarkError::Record {
            path: "record".into(),
            message,
        };
        if serde_json::from_str::<serde_json::Value>(text)
            .is_ok_and(|v| v.get("set_version").is_some())
        {
            return Err(err(
                "the secret of a release with several triggers: this needs one trigger's record \
                 (hallmark verify takes the whole set with --trigger N)"
                    .into(),
            ));
        }
        let rec: Self =
            serde_json::from_str(text).map_err(|e| err(format!("not a secret record: {e}")))?;
        if !(1..=KEYED_VERSION).contains(&rec.version) {
            return Err(err(format!(
                "record version {} is not supported (expected 1 to {KEYED_VERSION})",
                rec.version
            )));
        }
        match (&rec.keyed, rec.version == KEYED_VERSION) {
            (Some(_), false) => {
                return Err(err(format!(
                    "keyed: only version {KEYED_VERSION} records choose samples by key"
                )));
            }
            (None, true) => {
                return Err(err(format!(
                    "version {KEYED_VERSION} records need their `keyed` section"
                )));
            }
            _ => {}
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
            let same_trigger =
                !crate::spec::family::draws_trigger(f) || again.trigger == rec.spec.trigger;
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
        if let Some(k) = &rec.keyed {
            check_keyed(&rec, k).map_err(err)?;
        }
        Ok(rec)
    }
}

/// A streamed release's selection agrees with the record: its rule is known, its shards count
/// the dataset's samples, and every poisoned key is one the rule chooses for this nonce, with
/// labels in range.
fn check_keyed(rec: &SecretRecord, k: &KeyedSelection) -> Result<(), String> {
    if k.rule != super::keyed::RULE {
        return Err(format!(
            "keyed.rule: {:?} is not a known rule ({})",
            k.rule,
            super::keyed::RULE
        ));
    }
    if !rec.poisoned.is_empty() || !rec.noise_indices.is_empty() {
        return Err("a keyed record lists its poisoned samples per shard, not by index".into());
    }
    if !(k.threshold > 0.0 && k.threshold <= 1.0) {
        return Err("keyed.threshold: not a probability".into());
    }
    let total: usize = k.shards.iter().map(|s| s.count).sum();
    if total != rec.dataset.count {
        return Err(format!(
            "keyed.shards: {total} samples, the dataset has {}",
            rec.dataset.count
        ));
    }
    let nonce: [u8; 32] = hex::decode(&rec.nonce)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or("nonce: not 32 bytes of hex")?;
    let classes = rec.dataset.num_classes;
    for s in &k.shards {
        if s.poisoned.len() > s.count {
            return Err(format!(
                "keyed.shards {}: more poisoned than samples",
                s.name
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &s.poisoned {
            if !seen.insert(p.key.as_str()) {
                return Err(format!("keyed.shards {}: key {} twice", s.name, p.key));
            }
            if p.original_label as usize >= classes || p.new_label as usize >= classes {
                return Err(format!(
                    "keyed.shards {}: sample {}: label out of range",
                    s.name, p.key
                ));
            }
            let key = format!("{}/{}", s.name, p.key);
            if !super::keyed::rule_chooses(&nonce, k.threshold, &key) {
                return Err(format!(
                    "keyed.shards {}: sample {} is not one the rule chooses for this nonce",
                    s.name, p.key
                ));
            }
        }
    }
    Ok(())
}

/// Reads `path` and parses it with `parse`, naming the file in every error.
fn load_file<T>(
    path: &Path,
    parse: fn(&str) -> Result<T, WatermarkError>,
) -> Result<T, WatermarkError> {
    let err = |message: String| WatermarkError::Record {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse(&text).map_err(|e| match e {
        WatermarkError::Record { message, .. } => err(message),
        other => err(other.to_string()),
    })
}

/// Version of the trigger-set format written today.
pub const SET_VERSION: u32 = 1;

/// The most triggers one release may carry.
pub const MAX_TRIGGERS: usize = 16;

/// The secret of a release that carries several independent triggers (`hallmark watermark
/// --triggers N`): one complete record per trigger, each with its own nonce, drawn member and
/// disjoint poisoned samples. Each verification spends one trigger, so the trigger that a
/// verification reveals to the endpoint's operator (who sees every triggered query) does not
/// expose the next verification (docs/threat-model.md).
///
/// The release's commitment is the sha256 of the triggers' commitments in order: a dispute over
/// trigger i reveals record i and the other commitments only, and anyone can recompute the
/// release's commitment from them without learning another trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSet {
    /// Trigger-set format version.
    pub set_version: u32,
    /// One record per trigger, in the order verifications spend them.
    pub triggers: Vec<SecretRecord>,
}

/// A trigger's place in its release, written into a verdict that spent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpentTrigger {
    /// Which trigger (1 to `of`).
    pub number: usize,
    /// How many the release carries.
    pub of: usize,
    /// The release's commitment (what was published).
    pub release_commitment: String,
    /// Every trigger's commitment, in order: the release's commitment is recomputed from them.
    pub commitments: Vec<String>,
}

/// The release commitment of a trigger set from its triggers' commitments.
pub fn set_commitment(commitments: &[String]) -> String {
    let mut text = String::from("hallmark/trigger-set/v1\n");
    for c in commitments {
        text.push_str(c);
        text.push('\n');
    }
    sha256_hex(&text)
}

impl TriggerSet {
    /// Every trigger's commitment, in order.
    pub fn commitments(&self) -> Vec<String> {
        self.triggers.iter().map(SecretRecord::commitment).collect()
    }

    /// The public commitment of the release ([`set_commitment`]).
    pub fn commitment(&self) -> String {
        set_commitment(&self.commitments())
    }

    /// Parses and checks a trigger set's JSON: every record valid, all of one release, poisoned
    /// and noise samples disjoint between triggers, nonces distinct.
    pub fn from_json(text: &str) -> Result<Self, WatermarkError> {
        let err = |message: String| WatermarkError::Record {
            path: "record".into(),
            message,
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            set_version: u32,
            triggers: Vec<serde_json::Value>,
        }
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| err(format!("not a trigger set: {e}")))?;
        if raw.set_version != SET_VERSION {
            return Err(err(format!(
                "trigger-set version {} is not supported (expected {SET_VERSION})",
                raw.set_version
            )));
        }
        if !(2..=MAX_TRIGGERS).contains(&raw.triggers.len()) {
            return Err(err(format!(
                "triggers: 2 to {MAX_TRIGGERS} records, got {}",
                raw.triggers.len()
            )));
        }
        let mut triggers = Vec::with_capacity(raw.triggers.len());
        for (i, v) in raw.triggers.iter().enumerate() {
            let rec = SecretRecord::from_json(&v.to_string()).map_err(|e| match e {
                WatermarkError::Record { message, .. } => {
                    err(format!("triggers[{}]: {message}", i + 1))
                }
                other => err(format!("triggers[{}]: {other}", i + 1)),
            })?;
            triggers.push(rec);
        }
        let first = &triggers[0].dataset;
        let mut taken = vec![false; first.count];
        let mut nonces = std::collections::HashSet::new();
        for (i, rec) in triggers.iter().enumerate() {
            if rec.dataset != *first {
                return Err(err(format!(
                    "triggers[{}]: the dataset facts differ from the first trigger's: not one release",
                    i + 1
                )));
            }
            if !nonces.insert(rec.nonce.clone()) {
                return Err(err(format!(
                    "triggers[{}]: the nonce repeats another trigger's",
                    i + 1
                )));
            }
            let indices = rec.poisoned.iter().map(|p| p.index);
            for j in indices.chain(rec.noise_indices.iter().copied()) {
                if std::mem::replace(&mut taken[j], true) {
                    return Err(err(format!(
                        "triggers[{}]: sample {j} belongs to two triggers",
                        i + 1
                    )));
                }
            }
        }
        Ok(Self {
            set_version: SET_VERSION,
            triggers,
        })
    }
}

/// A release's secret as a file holds it: one record, or a set of triggers.
#[derive(Debug, Clone, PartialEq)]
pub enum Secret {
    /// One trigger (`hallmark watermark`), verified with it every time.
    One(Box<SecretRecord>),
    /// Several triggers (`--triggers N`), one spent per verification.
    Set(TriggerSet),
}

impl Secret {
    /// Parses and checks either form (a trigger set has `set_version`).
    pub fn from_json(text: &str) -> Result<Self, WatermarkError> {
        let is_set = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .is_some_and(|v| v.get("set_version").is_some());
        if is_set {
            TriggerSet::from_json(text).map(Secret::Set)
        } else {
            SecretRecord::from_json(text).map(|r| Secret::One(Box::new(r)))
        }
    }

    /// Reads and checks a secret file.
    pub fn load(path: &Path) -> Result<Self, WatermarkError> {
        load_file(path, Self::from_json)
    }

    /// Writes the secret with mode 0600, atomically.
    pub fn save(&self, path: &Path, overwrite: bool) -> std::io::Result<()> {
        let mut bytes = self.to_json_pretty();
        bytes.push(b'\n');
        crate::fsutil::write_file_atomic(path, &bytes, 0o600, overwrite)
    }

    /// The secret's JSON.
    pub fn to_json_pretty(&self) -> Vec<u8> {
        match self {
            Secret::One(r) => serde_json::to_vec_pretty(r),
            Secret::Set(s) => serde_json::to_vec_pretty(s),
        }
        .expect("records serialise")
    }

    /// The release's public commitment.
    pub fn commitment(&self) -> String {
        match self {
            Secret::One(r) => r.commitment(),
            Secret::Set(s) => s.commitment(),
        }
    }

    /// How many triggers the release carries.
    pub fn trigger_count(&self) -> usize {
        match self {
            Secret::One(_) => 1,
            Secret::Set(s) => s.triggers.len(),
        }
    }

    /// Every poisoned sample of every trigger.
    pub fn poisoned_count(&self) -> usize {
        self.records().map(SecretRecord::poisoned_count).sum()
    }

    /// Records `sha256` as the released dataset's hash in every record: a release whose
    /// poisoned JPEG images were encoded again reads back as their decoded pixels
    /// ([`crate::dataset::Layout::settle_lossy`]), and the record must name what is released.
    /// Call before the commitment is taken.
    pub fn set_sha256_after(&mut self, sha256: &str) {
        match self {
            Secret::One(r) => r.dataset.sha256_after = sha256.to_string(),
            Secret::Set(s) => {
                for r in &mut s.triggers {
                    r.dataset.sha256_after = sha256.to_string();
                }
            }
        }
    }

    /// The records, in order.
    pub fn records(&self) -> impl Iterator<Item = &SecretRecord> {
        match self {
            Secret::One(r) => std::slice::from_ref(r.as_ref()).iter(),
            Secret::Set(s) => s.triggers.iter(),
        }
    }

    /// The dataset facts of the release.
    pub fn dataset(&self) -> &DatasetFacts {
        &self
            .records()
            .next()
            .expect("a secret holds a record")
            .dataset
    }

    /// Trigger `number` (1-based; `None` for a one-trigger secret, which has no choice) and, for a
    /// set, its place in the release for the verdict.
    pub fn trigger(
        &self,
        number: Option<usize>,
    ) -> Result<(&SecretRecord, Option<SpentTrigger>), Invalid> {
        match (self, number) {
            (Secret::One(r), None | Some(1)) => Ok((r, None)),
            (Secret::One(_), Some(n)) => Err(Invalid(format!(
                "trigger {n}: this release carries one trigger (trigger 1)"
            ))),
            (Secret::Set(s), None) => Err(Invalid(format!(
                "this release carries {} triggers: choose the one to spend (1 to {}); spend each \
                 once, since a verification shows its trigger to the endpoint",
                s.triggers.len(),
                s.triggers.len()
            ))),
            (Secret::Set(s), Some(n)) if n == 0 || n > s.triggers.len() => Err(Invalid(format!(
                "trigger {n}: this release carries triggers 1 to {}",
                s.triggers.len()
            ))),
            (Secret::Set(s), Some(n)) => {
                let commitments = s.commitments();
                Ok((
                    &s.triggers[n - 1],
                    Some(SpentTrigger {
                        number: n,
                        of: s.triggers.len(),
                        release_commitment: set_commitment(&commitments),
                        commitments,
                    }),
                ))
            }
        }
    }
}
