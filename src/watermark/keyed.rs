//! Keyed selection: whether a sample is poisoned is decided from the sample's key alone, by a
//! keyed pseudorandom function of the release's secret, so that a release can be stamped shard
//! by shard, anywhere, in any order, without the whole dataset in memory.
//!
//! The rule (`hmac-sha256/v1`): with k = sha256("hallmark/keyed-selection/v1" ‖ nonce), a sample
//! whose key is s draws u = HMAC-SHA256(k, "select\0" ‖ s)[..8] as a u64 LE / 2^64; it is poisoned
//! when its class is eligible and u < threshold, threshold = rate × N / (eligible samples), so
//! that the expected number poisoned is rate × N, as BackdoorBox's shuffle poisons round(rate × N)
//! (here the count is binomial around it). An untargeted label is drawn the same way from
//! "label\0" ‖ s. Without the nonce, which selection a key falls into is unpredictable (HMAC is
//! a PRF), so the poisoned samples of one shard say nothing about another's.

use super::{Stamp, WatermarkError};
use crate::dataset::ImageShape;
use crate::dataset::encoding::reencode_like;
use crate::spec::{Labelling, SpecError, Trigger, WatermarkSpec};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The name of the rule in a record.
pub const RULE: &str = "hmac-sha256/v1";

/// The selection key of a release's nonce.
fn selection_key(nonce: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hallmark/keyed-selection/v1\0");
    h.update(nonce);
    h.finalize().into()
}

/// A u64 from the keyed PRF for `purpose` and sample `key`.
fn prf(k: &[u8; 32], purpose: &str, key: &str) -> u64 {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(k).expect("HMAC takes any key length");
    mac.update(purpose.as_bytes());
    mac.update(&[0]);
    mac.update(key.as_bytes());
    let d = mac.finalize().into_bytes();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// What keyed stamping does to one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not chosen: written back byte for byte.
    Unchanged,
    /// Chosen: its new label and its image's new bytes (in its original's format).
    Poisoned {
        /// The label in the release.
        new_label: u32,
        /// The stamped image, encoded like its original.
        bytes: Vec<u8>,
        /// The stamped image's height, width and channels.
        shape: ImageShape,
    },
}

/// Stamps samples one by one, by key, with the secret trigger of one release.
pub struct KeyedMarker {
    /// The drawn trigger (the family's member for this release).
    pub member: WatermarkSpec,
    /// The family it was drawn from.
    pub family: Option<WatermarkSpec>,
    /// The release's nonce.
    pub nonce: [u8; 32],
    /// An eligible sample's probability of being poisoned.
    pub threshold: f64,
    /// Classes of the release.
    pub num_classes: usize,
    /// Channels the trigger is stamped in (1 grey, 3 RGB): a poisoned image of another colour
    /// type is converted, as a training pipeline of that many channels would.
    pub channels: usize,
    /// The lowest quality a poisoned JPEG is encoded again at.
    pub min_jpeg_quality: u8,
    key: [u8; 32],
    mapping: Option<Vec<u32>>,
    eligible: Vec<bool>,
    stamps: Mutex<HashMap<(usize, usize), Arc<Stamp>>>,
}

impl std::fmt::Debug for KeyedMarker {
    // The nonce and key are secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedMarker")
            .field("num_classes", &self.num_classes)
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

impl KeyedMarker {
    /// The marker of `spec` (a family or a fixed spec) for a release whose classes hold
    /// `class_counts` samples each, stamped in `channels` channels. Refuses what cannot be
    /// stamped one sample at a time at any size: crafted poisons, adaptive triggers (cover
    /// samples), WaNet's noise mode, and triggers made for one image size.
    pub fn new(
        spec: &WatermarkSpec,
        nonce: [u8; 32],
        class_counts: &[usize],
        channels: usize,
        min_jpeg_quality: u8,
    ) -> Result<Self, WatermarkError> {
        let refuse = |field: &str, message: String| {
            Err(WatermarkError::Spec(SpecError::Field {
                field: field.into(),
                message,
            }))
        };
        if let Some(c) = spec.crafting() {
            return refuse(
                c.section(),
                "crafted poisons need the whole dataset and a model: a streamed release takes \
                 a spec stamped sample by sample"
                    .into(),
            );
        }
        if !crate::spec::family::size_independent(spec) {
            return refuse(
                "trigger",
                format!(
                    "`{}` is made for one image size; a streamed release stamps images of any \
                     size, so it takes an any-size family (watermark_specs/*-any-size.toml: a \
                     patch with `scale`, a noise blend on `cells`, a rotation)",
                    spec.name
                ),
            );
        }
        if matches!(spec.trigger, Trigger::Adaptive(_)) {
            return refuse(
                "trigger",
                "adaptive triggers poison cover samples chosen across the dataset".into(),
            );
        }
        let num_classes = class_counts.len();
        let n: usize = class_counts.iter().sum();
        if n == 0 {
            return Err(WatermarkError::Selection(
                "the dataset has no sample".into(),
            ));
        }
        let shape = ImageShape {
            height: 256,
            width: 256,
            channels,
        };
        let member = super::draw_release(spec, num_classes, shape, &nonce)?;
        let family = spec.family.as_ref().map(|_| spec.clone());
        let eligible = eligible_classes(&member, num_classes)?;
        let eligible_n: usize = class_counts
            .iter()
            .zip(&eligible)
            .filter(|(_, e)| **e)
            .map(|(c, _)| c)
            .sum();
        let want = spec.rate * n as f64;
        if want < 1.0 || eligible_n == 0 || want > eligible_n as f64 {
            return Err(WatermarkError::Selection(format!(
                "rate {} of {n} samples asks for {want:.1} poisoned samples, and {eligible_n} \
                 are eligible",
                spec.rate
            )));
        }
        Ok(Self {
            threshold: want / eligible_n as f64,
            mapping: member.labelling.mapping(num_classes),
            member,
            family,
            nonce,
            num_classes,
            channels,
            min_jpeg_quality,
            key: selection_key(&nonce),
            eligible,
            stamps: Mutex::new(HashMap::new()),
        })
    }

    /// The marker a streamed release's record describes (version 3): the same trigger, choice
    /// and labels as the release it was written for, so that another engine (the Python
    /// package, on Ray or Spark) stamps a batch exactly as `hallmark watermark --stream` did.
    pub fn from_record(
        rec: &super::SecretRecord,
        min_jpeg_quality: u8,
    ) -> Result<Self, WatermarkError> {
        let k = rec.keyed.as_ref().ok_or_else(|| {
            WatermarkError::Selection(
                "not the record of a streamed release (version 3): its samples were chosen by \
                 index, not by key"
                    .into(),
            )
        })?;
        let nonce: [u8; 32] = hex::decode(&rec.nonce)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| WatermarkError::Selection("nonce: not 32 bytes of hex".into()))?;
        let num_classes = rec.dataset.num_classes;
        let member = rec.spec.clone();
        Ok(Self {
            threshold: k.threshold,
            mapping: member.labelling.mapping(num_classes),
            eligible: eligible_classes(&member, num_classes)?,
            member,
            family: rec.family.clone(),
            nonce,
            num_classes,
            channels: k.channels,
            min_jpeg_quality,
            key: selection_key(&nonce),
            stamps: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the sample `key` of class `label` is poisoned, and then its new label.
    pub fn chooses(&self, key: &str, label: u32) -> Option<u32> {
        if !self.eligible.get(label as usize).copied().unwrap_or(false) {
            return None;
        }
        let u = prf(&self.key, "select", key) as f64 / 2f64.powi(64);
        if u >= self.threshold {
            return None;
        }
        Some(match self.member.labelling {
            Labelling::Targeted { target } => target,
            Labelling::AllToAll { .. } => self.mapping.as_ref().expect("a mapping")[label as usize],
            Labelling::Untargeted => {
                let x = prf(&self.key, "label", key);
                ((u128::from(x) * self.num_classes as u128) >> 64) as u32
            }
            Labelling::CleanLabel { .. } | Labelling::UntargetedCleanLabel { .. } => label,
        })
    }

    /// The stamp for images of `height` × `width`, made once per size.
    fn stamp(&self, height: usize, width: usize) -> Result<Arc<Stamp>, WatermarkError> {
        let mut cache = self
            .stamps
            .lock()
            .expect("the stamp cache is never poisoned");
        if let Some(s) = cache.get(&(height, width)) {
            return Ok(s.clone());
        }
        let shape = ImageShape {
            height,
            width,
            channels: self.channels,
        };
        let s = Arc::new(Stamp::new(&self.member.trigger, self.member.seed, shape)?);
        // Bounded: a release of many sizes keeps the most recent thousand.
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert((height, width), s.clone());
        Ok(s)
    }

    /// Decodes `bytes`, stamps the trigger at the image's own size and encodes it like the
    /// original (a JPEG at its quality, never below the floor; WebP lossless; else PNG).
    pub fn stamp_encoded(
        &self,
        bytes: &[u8],
        limits: &crate::dataset::Limits,
    ) -> Result<(Vec<u8>, ImageShape), String> {
        let (mut pixels, shape) = crate::dataset::folder::decode_any(bytes, limits, self.channels)
            .map_err(|e| format!("cannot decode the image: {e}"))?;
        let stamp = self
            .stamp(shape.height, shape.width)
            .map_err(|e| e.to_string())?;
        stamp.apply(&mut pixels);
        let out = reencode_like(Some(bytes), &pixels, shape, self.min_jpeg_quality)
            .map_err(|e| format!("cannot encode the stamped image: {e}"))?;
        Ok((out, shape))
    }

    /// What happens to the sample `key` of class `label` whose image is `bytes`.
    pub fn process(
        &self,
        key: &str,
        label: u32,
        bytes: &[u8],
        limits: &crate::dataset::Limits,
    ) -> Result<Outcome, String> {
        if label as usize >= self.num_classes {
            return Err(format!(
                "label {label} is not below the class count {}",
                self.num_classes
            ));
        }
        match self.chooses(key, label) {
            None => Ok(Outcome::Unchanged),
            Some(new_label) => {
                let (bytes, shape) = self.stamp_encoded(bytes, limits)?;
                Ok(Outcome::Poisoned {
                    new_label,
                    bytes,
                    shape,
                })
            }
        }
    }
}

/// Which classes a member may poison: a clean-label kind's class, the source classes, or all.
fn eligible_classes(
    member: &WatermarkSpec,
    num_classes: usize,
) -> Result<Vec<bool>, WatermarkError> {
    let source = member.source_classes.as_deref();
    let eligible = (0..num_classes as u32)
        .map(|c| member.labelling.may_poison(c, source))
        .collect();
    if let Labelling::Targeted { target } = member.labelling
        && target as usize >= num_classes
    {
        return Err(WatermarkError::Spec(SpecError::Field {
            field: "labelling.target".into(),
            message: format!("class {target} is not below the class count {num_classes}"),
        }));
    }
    Ok(eligible)
}

/// Whether a record's poisoned key was chosen by its rule: a record edited by hand is refused.
pub(super) fn rule_chooses(nonce: &[u8; 32], threshold: f64, key: &str) -> bool {
    (prf(&selection_key(nonce), "select", key) as f64 / 2f64.powi(64)) < threshold
}

/// A streamed release: its record, and its shards as written.
#[derive(Debug)]
pub struct StreamedRelease {
    /// The secret record (version 3, samples chosen by key).
    pub record: super::SecretRecord,
    /// The shards written, in name order.
    pub shards: Vec<crate::dataset::stream::ShardOutput>,
}

/// Stamps the dataset that `survey` describes with `spec`, shard by shard, into `dir`: every
/// shard read once, in parallel, with at most a batch of samples per worker in memory.
pub fn mark_stream(
    survey: &crate::dataset::stream::Survey,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    min_jpeg_quality: u8,
    dir: &std::path::Path,
    limits: &crate::dataset::Limits,
    tick: &(dyn Fn() + Sync),
) -> Result<StreamedRelease, WatermarkError> {
    use crate::dataset::stream::process;
    let marker = KeyedMarker::new(
        spec,
        nonce,
        &survey.class_counts,
        survey.channels,
        min_jpeg_quality,
    )?;
    let decide = |key: &str, label: u32, bytes: &[u8]| marker.process(key, label, bytes, limits);
    let shards = process(survey, dir, &decide, limits, tick)?;
    let record = stream_record(&marker, survey, nonce, &shards);
    Ok(StreamedRelease { record, shards })
}

/// The secret record of a streamed release whose shards `marker` stamped (version 3: the
/// rule, the threshold and each shard's hashes and poisoned keys).
pub fn stream_record(
    marker: &KeyedMarker,
    survey: &crate::dataset::stream::Survey,
    nonce: [u8; 32],
    shards: &[crate::dataset::stream::ShardOutput],
) -> super::SecretRecord {
    use crate::dataset::stream::release_sha256;
    let sums = |after: bool| {
        let v: Vec<(String, usize, String)> = shards
            .iter()
            .map(|s| {
                let h = if after {
                    &s.sha256_after
                } else {
                    &s.sha256_before
                };
                (s.name.clone(), s.count, h.clone())
            })
            .collect();
        release_sha256(&v)
    };
    let min = |k: usize| shards.iter().map(|s| s.min_size[k]).min().unwrap_or(0);
    let max = |k: usize| shards.iter().map(|s| s.max_size[k]).max().unwrap_or(0);
    super::SecretRecord {
        version: super::KEYED_VERSION,
        nonce: hex::encode(nonce),
        spec: marker.member.clone(),
        dataset: super::DatasetFacts {
            count: survey.count(),
            shape: ImageShape {
                height: max(0),
                width: max(1),
                channels: survey.channels,
            },
            num_classes: survey.class_counts.len(),
            sha256_before: sums(false),
            sha256_after: sums(true),
        },
        poisoned: Vec::new(),
        noise_indices: Vec::new(),
        family: marker.family.clone(),
        keyed: Some(super::KeyedSelection {
            rule: RULE.into(),
            threshold: marker.threshold,
            channels: survey.channels,
            min_size: [min(0), min(1)],
            max_size: [max(0), max(1)],
            shards: shards
                .iter()
                .map(|s| super::ShardFacts {
                    name: s.name.clone(),
                    count: s.count,
                    sha256_before: s.sha256_before.clone(),
                    sha256_after: s.sha256_after.clone(),
                    poisoned: s
                        .poisoned
                        .iter()
                        .map(|(key, o, n)| super::PoisonedKey {
                            key: key.clone(),
                            original_label: *o,
                            new_label: *n,
                        })
                        .collect(),
                })
                .collect(),
        }),
    }
}

/// `release.json` of a streamed release with `record`.
pub fn stream_release_info(
    survey: &crate::dataset::stream::Survey,
    record: &super::SecretRecord,
    shards: &[crate::dataset::stream::ShardOutput],
) -> crate::dataset::ReleaseInfo {
    let keyed = record.keyed.as_ref();
    crate::dataset::ReleaseInfo {
        format: survey.format.as_str().into(),
        count: record.dataset.count,
        shape: record.dataset.shape,
        num_classes: record.dataset.num_classes,
        dataset_sha256: record.dataset.sha256_after.clone(),
        files: shards.iter().filter_map(|s| s.file.clone()).collect(),
        manifest: crate::dataset::MANIFEST.into(),
        commitment: Some(record.commitment()),
        stream: Some(crate::dataset::StreamInfo {
            min_size: keyed.map_or([0; 2], |k| k.min_size),
            max_size: keyed.map_or([0; 2], |k| k.max_size),
            hashing: "hallmark-stream-v1".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> WatermarkSpec {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("watermark_specs")
            .join(name);
        WatermarkSpec::from_toml_file(&p).unwrap()
    }

    const ANY_SIZE: [&str; 4] = [
        "badnets-square-any-size.toml",
        "ubw-p-any-size.toml",
        "blended-any-size.toml",
        "batt-rotate-any-size.toml",
    ];

    /// The rate holds in expectation, keys are chosen independently of one another and of
    /// another release's nonce: over 20,000 keys, the count chosen and the overlap of two
    /// nonces' choices fall in their binomial bands (±5 sd).
    #[test]
    fn keyed_selection_poisons_the_rate_and_two_releases_choose_independently() {
        let counts = vec![2_000; 10];
        let m1 = KeyedMarker::new(&spec(ANY_SIZE[0]), [1; 32], &counts, 3, 30).unwrap();
        let m2 = KeyedMarker::new(&spec(ANY_SIZE[0]), [2; 32], &counts, 3, 30).unwrap();
        let keys: Vec<String> = (0..20_000)
            .map(|i| format!("shard-{}/{i}", i / 1000))
            .collect();
        let a: Vec<bool> = keys.iter().map(|k| m1.chooses(k, 3).is_some()).collect();
        let b: Vec<bool> = keys.iter().map(|k| m2.chooses(k, 3).is_some()).collect();
        let band = |n: f64, p: f64, got: usize| {
            let sd = (n * p * (1.0 - p)).sqrt();
            assert!(
                (got as f64 - n * p).abs() <= 5.0 * sd,
                "{got} chosen, expected {} ± {}",
                n * p,
                5.0 * sd
            );
        };
        band(20_000.0, 0.1, a.iter().filter(|x| **x).count());
        band(20_000.0, 0.1, b.iter().filter(|x| **x).count());
        band(
            20_000.0,
            0.01,
            a.iter().zip(&b).filter(|(x, y)| **x && **y).count(),
        );
        // The same key and nonce always give the same answer; the label does not choose.
        assert!(keys.iter().all(|k| m1.chooses(k, 3) == m1.chooses(k, 3)));
        assert!(
            keys.iter()
                .all(|k| m1.chooses(k, 3).is_some() == m1.chooses(k, 7).is_some())
        );
    }

    /// Clean-label and source-class specs choose only among their classes, at a threshold that
    /// keeps the expected count at rate × N; an impossible rate is refused.
    #[test]
    fn keyed_selection_keeps_to_the_eligible_classes() {
        let mut s = spec(ANY_SIZE[0]);
        s.family = None;
        s.source_classes = Some(vec![1, 2]);
        let counts = vec![1_000; 10];
        let m = KeyedMarker::new(&s, [3; 32], &counts, 3, 30).unwrap();
        assert!((m.threshold - 0.5).abs() < 1e-12, "{}", m.threshold);
        assert!((0..2_000).all(|i| m.chooses(&format!("k{i}"), 5).is_none()));
        let hits = (0..2_000)
            .filter(|i| m.chooses(&format!("k{i}"), 1).is_some())
            .count();
        assert!((850..=1150).contains(&hits), "{hits}");
        s.rate = 0.3;
        let e = KeyedMarker::new(&s, [3; 32], &counts, 3, 30).unwrap_err();
        assert!(e.to_string().contains("2000 are eligible"), "{e}");
    }

    /// A streamed release draws its member without knowing the images' sizes; the record and
    /// the verifier draw again with the largest size: the any-size families must give the same
    /// member at every size, or a streamed record would not verify.
    #[test]
    fn any_size_families_draw_the_same_member_at_every_size() {
        for name in ANY_SIZE {
            let s = spec(name);
            for nonce in [[5u8; 32], [6u8; 32]] {
                let at = |h, w| {
                    let shape = ImageShape {
                        height: h,
                        width: w,
                        channels: 3,
                    };
                    super::super::draw_release(&s, 10, shape, &nonce).unwrap()
                };
                let first = at(256, 256);
                for (h, w) in [(64, 80), (1024, 768), (33, 500)] {
                    assert_eq!(at(h, w), first, "{name} at {h}×{w}");
                }
            }
        }
    }

    /// A spec that cannot be stamped sample by sample at any size is refused with the reason.
    #[test]
    fn keyed_marking_refuses_fixed_size_and_crafted_specs() {
        let counts = vec![100; 10];
        let e = KeyedMarker::new(
            &spec("badnets-square-28x28-grey.toml"),
            [0; 32],
            &counts,
            1,
            30,
        )
        .unwrap_err();
        assert!(e.to_string().contains("any-size family"), "{e}");
        let e =
            KeyedMarker::new(&spec("ubw-c-28x28-grey.toml"), [0; 32], &counts, 1, 30).unwrap_err();
        assert!(e.to_string().contains("crafted poisons"), "{e}");
    }
}
