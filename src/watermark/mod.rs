//! Stamping a dataset with a watermark and recording the secret needed to verify it later.
//!
//! Deterministic from (spec, seed, dataset): the same inputs give the same poisoned indices, labels
//! and pixels. Selection follows BackdoorBox (`core/attacks/BadNets.py`): shuffle the eligible
//! indices and poison the first `round(rate × N)`, N being the dataset's size; samples of the
//! target class may be chosen unless source classes restrict the choice. Untouched samples stay
//! byte-identical.

mod generator;
pub mod keyed;
mod physical;
mod record;
mod reflect;
pub mod rng;
mod trigger;
mod warp;

pub use record::{
    DatasetFacts, KEYED_VERSION, KeyedSelection, MAX_TRIGGERS, PoisonedKey, PoisonedSample, Secret,
    SecretRecord, ShardFacts, SpentTrigger, TriggerSet, set_commitment,
};
pub use trigger::{Stamp, blend_byte};
pub use warp::WarpField;

use crate::dataset::{Dataset, DatasetError, dataset_sha256, image_sha256s};
use crate::spec::{Labelling, SpecError, Trigger, WatermarkSpec};
use rayon::prelude::*;
use rng::{Rng, Stream};

/// Why a watermark could not be applied or a record not used.
#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    /// The spec does not fit the dataset.
    #[error("spec: {0}")]
    Spec(#[from] SpecError),
    /// The dataset is unusable.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Not enough eligible samples for the requested rate.
    #[error("{0}")]
    Selection(String),
    /// Crafting the poisoned samples with a model failed.
    #[error("crafting: {0}")]
    Craft(String),
    /// A secret record is malformed.
    #[error("{path}: {message}")]
    Record {
        /// The record file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Number of samples to poison: `round(rate × n)`, halves rounded away from zero.
pub fn poison_count(rate: f64, n: usize) -> usize {
    (rate * n as f64).round() as usize
}

/// A watermarked dataset's secret record, with the sha256 of every image after stamping (what
/// the release's manifest needs).
#[derive(Debug)]
pub struct Watermarked {
    /// The secret record.
    pub record: SecretRecord,
    /// sha256 of each image, in dataset order, after watermarking.
    pub image_hashes: Vec<[u8; 32]>,
}

impl Watermarked {
    /// The release of this one record.
    pub fn into_release(self) -> WatermarkedRelease {
        WatermarkedRelease {
            secret: Secret::One(Box::new(self.record)),
            image_hashes: self.image_hashes,
        }
    }
}

/// Stamps `dataset` in place as `spec` says and returns the secret record.
///
/// `nonce` is 32 random bytes that make the published commitment hiding: without it, anyone could
/// test guessed specs against the commitment.
pub fn apply(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
) -> Result<SecretRecord, WatermarkError> {
    apply_with_hashes(dataset, spec, nonce).map(|w| w.record)
}

/// [`apply`], also returning the images' sha256 after stamping.
pub fn apply_with_hashes(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
) -> Result<Watermarked, WatermarkError> {
    if let Some(crafting) = spec.crafting() {
        return Err(WatermarkError::Spec(SpecError::Field {
            field: crafting.section().into(),
            message: if crafting.needs_model() {
                "crafting the poisons needs a benign model (feature `train`: \
                 hallmark watermark --craft-model DIR)"
            } else {
                "the encoder is trained first (feature `train`: hallmark watermark)"
            }
            .into(),
        }));
    }
    apply_crafted(dataset, spec, nonce, &mut |_, _| Ok(()))
}

/// Crafts the release of a spec that cannot be stamped from the spec alone (poisons crafted
/// with a model, a trigger made by training: [`crate::spec::Crafting`]). The trainer provides
/// one (`train::craft::Crafter`, feature `train`).
pub trait Craft {
    /// Watermarks `dataset` with `spec` (one trigger).
    fn craft(
        &self,
        dataset: &mut Dataset,
        spec: &WatermarkSpec,
        nonce: [u8; 32],
    ) -> Result<Watermarked, WatermarkError>;
}

/// Watermarks `dataset` with `triggers` triggers of `spec`: the one entry point of the CLI, the
/// service's jobs and calibration. A spec with crafting goes to `craft` (one trigger only);
/// without a crafter, such a spec is refused with what it needs.
pub fn mark(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    triggers: usize,
    craft: Option<&dyn Craft>,
) -> Result<WatermarkedRelease, WatermarkError> {
    match (spec.crafting(), craft) {
        (Some(_), Some(c)) if triggers == 1 => {
            c.craft(dataset, spec, nonce).map(Watermarked::into_release)
        }
        _ => apply_triggers(dataset, spec, nonce, triggers),
    }
}

/// The trigger a release of `spec` carries: the member of the spec's family drawn with a seed
/// derived from the record's nonce (the spec itself when it has no family).
pub fn draw_release(
    spec: &WatermarkSpec,
    num_classes: usize,
    shape: crate::dataset::ImageShape,
    nonce: &[u8],
) -> Result<WatermarkSpec, WatermarkError> {
    let seed = crate::spec::family::derived_seed(nonce, "trigger", 0);
    Ok(crate::spec::family::draw(spec, num_classes, shape, seed)?)
}

/// Changes the chosen samples before their trigger is stamped (label-consistent crafting), or
/// instead of it (gradient matching: the poisons carry no trigger).
pub type Crafter<'a> = dyn FnMut(&mut Dataset, &[usize]) -> Result<(), WatermarkError> + 'a;

/// [`apply_with_hashes`] with `craft` run on the chosen samples (sorted indices) after they are
/// chosen and before they are stamped; the record describes the crafted release.
pub fn apply_crafted(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    craft: &mut Crafter<'_>,
) -> Result<Watermarked, WatermarkError> {
    apply_member(dataset, spec, nonce, craft, &[])
}

/// A release's secret and the sha256 of every image after stamping.
#[derive(Debug)]
pub struct WatermarkedRelease {
    /// The secret: one record, or a set of triggers.
    pub secret: Secret,
    /// sha256 of each image, in dataset order, after watermarking.
    pub image_hashes: Vec<[u8; 32]>,
}

impl WatermarkedRelease {
    /// Settles the changed images that `layout` will store lossily
    /// ([`crate::dataset::Layout::settle_lossy`]) and, where any changed, names the dataset they
    /// decode to in every record; before the commitment is taken.
    pub fn settle(
        &mut self,
        layout: &mut crate::dataset::Layout,
        dataset: &mut Dataset,
    ) -> Result<(), DatasetError> {
        if layout.settle_lossy(dataset, &mut self.image_hashes)? > 0 {
            self.secret
                .set_sha256_after(&dataset_sha256(dataset, &self.image_hashes));
        }
        Ok(())
    }
}

/// The nonce of trigger `index` of a set, derived from the release's secret nonce, so that a
/// re-run repeats the release and revealing one trigger's record reveals no other's nonce.
pub fn trigger_nonce(master: &[u8; 32], index: usize) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"hallmark/trigger-nonce/v1\0");
    h.update(master);
    h.update((index as u64).to_le_bytes());
    h.finalize().into()
}

/// Stamps `dataset` with `count` independent triggers of `spec` (one record when `count` is 1,
/// exactly as [`apply_with_hashes`]): each draws its own member of the family from its own nonce
/// ([`trigger_nonce`]) and poisons `spec.rate` of the samples, disjoint from the other
/// triggers' (so the release poisons `count × rate` in all).
pub fn apply_triggers(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    count: usize,
) -> Result<WatermarkedRelease, WatermarkError> {
    if count == 1 {
        return apply_with_hashes(dataset, spec, nonce).map(Watermarked::into_release);
    }
    if !(2..=record::MAX_TRIGGERS).contains(&count) {
        return Err(WatermarkError::Selection(format!(
            "triggers: 1 to {}, got {count}",
            record::MAX_TRIGGERS
        )));
    }
    apply_trigger_specs(dataset, &vec![spec; count], nonce)
}

/// Stamps `dataset` with one independent trigger of each spec of `specs` (2 to
/// [`record::MAX_TRIGGERS`] of them; the same family may repeat, and families may differ: a
/// patch and a blend, say, so that a defence that removes one need not remove the other).
/// Trigger `i` draws its member of `specs[i]`'s family from its own nonce ([`trigger_nonce`])
/// and poisons that spec's `rate` of the samples, disjoint from the other triggers'. Every spec
/// must be a family without crafting and fit the dataset.
pub fn apply_trigger_specs(
    dataset: &mut Dataset,
    specs: &[&WatermarkSpec],
    nonce: [u8; 32],
) -> Result<WatermarkedRelease, WatermarkError> {
    let count = specs.len();
    if !(2..=record::MAX_TRIGGERS).contains(&count) {
        return Err(WatermarkError::Selection(format!(
            "triggers: 2 to {} in a set, got {count}",
            record::MAX_TRIGGERS
        )));
    }
    for spec in specs {
        if spec.family.is_none() {
            return Err(WatermarkError::Spec(SpecError::Field {
                field: "family".into(),
                message: format!(
                    "`{}`: a spec without a [family] section has one fixed trigger; a release \
                     with several triggers needs a family to draw each from",
                    spec.name
                ),
            }));
        }
        if let Some(crafting) = spec.crafting() {
            return Err(WatermarkError::Spec(SpecError::Field {
                field: crafting.section().into(),
                message: format!(
                    "`{}`: a release with several triggers needs specs without crafting",
                    spec.name
                ),
            }));
        }
    }
    let mut taken = vec![false; dataset.len()];
    let mut records: Vec<SecretRecord> = Vec::with_capacity(count);
    let mut hashes = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let w = apply_member(
            dataset,
            spec,
            trigger_nonce(&nonce, i),
            &mut |_, _| Ok(()),
            &taken,
        )
        .map_err(|e| match e {
            WatermarkError::Selection(m) => {
                WatermarkError::Selection(format!("trigger {} of {count}: {m}", i + 1))
            }
            other => other,
        })?;
        for j in w.record.poisoned.iter().map(|p| p.index) {
            taken[j] = true;
        }
        for &j in &w.record.noise_indices {
            taken[j] = true;
        }
        records.push(w.record);
        hashes = w.image_hashes;
    }
    // Every record describes the whole release: the dataset before any trigger, after all.
    let before = records[0].dataset.sha256_before.clone();
    let after = records[count - 1].dataset.sha256_after.clone();
    for r in &mut records {
        r.dataset.sha256_before = before.clone();
        r.dataset.sha256_after = after.clone();
    }
    Ok(WatermarkedRelease {
        secret: Secret::Set(TriggerSet {
            set_version: record::SET_VERSION,
            triggers: records,
        }),
        image_hashes: hashes,
    })
}

/// [`apply_crafted`] choosing poisoned (and cover or noise) samples only among those not
/// `taken` by another trigger of the release (`taken` empty: every sample is free).
fn apply_member(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    craft: &mut Crafter<'_>,
    taken: &[bool],
) -> Result<Watermarked, WatermarkError> {
    if spec.family.is_some() {
        let drawn = draw_release(spec, dataset.num_classes(), dataset.shape(), &nonce)?;
        let mut marked = apply_member(dataset, &drawn, nonce, craft, taken)?;
        marked.record.family = Some(spec.clone());
        return Ok(marked);
    }
    let free = |i: &usize| !taken.get(*i).copied().unwrap_or(false);
    spec.check_fits(dataset)?;
    let n = dataset.len();
    let mut hashes = image_sha256s(dataset);
    let sha256_before = dataset_sha256(dataset, &hashes);

    let source = spec.source_classes.as_deref();
    let mut eligible: Vec<usize> = (0..n)
        .filter(|&i| spec.labelling.may_poison(dataset.label(i), source))
        .collect();
    eligible.retain(free);
    let k = poison_count(spec.rate, n);
    if k == 0 {
        return Err(WatermarkError::Selection(format!(
            "rate {} of {n} samples rounds to no sample at all",
            spec.rate
        )));
    }
    if k > eligible.len() {
        return Err(WatermarkError::Selection(format!(
            "rate {} of {n} samples asks for {k} poisoned samples, but only {} are eligible{}",
            spec.rate,
            eligible.len(),
            match spec.labelling {
                Labelling::CleanLabel { target: c }
                | Labelling::UntargetedCleanLabel {
                    poison_class: Some(c),
                } => format!(" (clean-label: class {c} only)"),
                Labelling::UntargetedCleanLabel { poison_class: None } => {
                    " (clean-label: classes other than the source classes only)".to_string()
                }
                _ if spec.source_classes.is_some() => " (source classes only)".to_string(),
                _ => String::new(),
            }
        )));
    }
    Rng::new(spec.seed, Stream::Selection).choose_front(&mut eligible, k);
    let mut chosen = eligible[..k].to_vec();
    chosen.sort_unstable();

    let mut label_rng = Rng::new(spec.seed, Stream::Labels);
    let mapping = spec.labelling.mapping(dataset.num_classes());
    let poisoned: Vec<PoisonedSample> = chosen
        .iter()
        .map(|&index| {
            let original_label = dataset.label(index);
            let new_label = match spec.labelling {
                Labelling::Targeted { target } => target,
                Labelling::AllToAll { .. } => {
                    mapping.as_ref().expect("an all-to-all mapping")[original_label as usize]
                }
                Labelling::Untargeted => label_rng.below(dataset.num_classes() as u64) as u32,
                Labelling::CleanLabel { .. } | Labelling::UntargetedCleanLabel { .. } => {
                    original_label
                }
            };
            PoisonedSample {
                index,
                original_label,
                new_label,
            }
        })
        .collect();

    craft(dataset, &chosen)?;
    let shape = dataset.shape();
    let stamp = Stamp::new(&spec.trigger, spec.seed, shape)?;
    let mut marked = vec![false; n];
    chosen.iter().for_each(|&i| marked[i] = true);

    let noise_indices = match (&spec.trigger, &stamp) {
        // Adaptive triggers: each poisoned and each cover sample carries `per_sample` random
        // pieces at their training weight (Qi et al., ICLR 2023).
        (Trigger::Adaptive(a), _) => {
            let pieces = a
                .pieces
                .iter()
                .map(|p| Stamp::new(p, spec.seed, shape))
                .collect::<Result<Vec<_>, _>>()?;
            let mut rest: Vec<usize> = (0..n).filter(|i| !marked[*i] && free(i)).collect();
            let m = poison_count(a.cover_rate, n).min(rest.len());
            let mut cover_rng = Rng::new(spec.seed, Stream::Noise);
            cover_rng.choose_front(&mut rest, m);
            let mut cover = rest[..m].to_vec();
            cover.sort_unstable();
            let mut rng = Rng::new(spec.seed, Stream::Pieces);
            let mut order: Vec<usize> = (0..pieces.len()).collect();
            for &i in chosen.iter().chain(&cover) {
                rng.choose_front(&mut order, a.per_sample);
                for &k in &order[..a.per_sample] {
                    pieces[k].apply(dataset.image_mut(i));
                }
            }
            cover
        }
        (Trigger::Warp(w), Stamp::Warp(field)) if w.noise => {
            stamp_all(dataset, &stamp, &marked);
            let mut rng = Rng::new(spec.seed, Stream::Noise);
            let mut rest: Vec<usize> = (0..n).filter(|i| !marked[*i] && free(i)).collect();
            // BackdoorBox: num_cross = int(num_bd * cross_ratio).
            let m = ((k as f64 * w.cross_ratio) as usize).min(rest.len());
            rng.choose_front(&mut rest, m);
            let mut noise = rest[..m].to_vec();
            noise.sort_unstable();
            for &i in &noise {
                field.apply(dataset.image_mut(i), Some(&mut rng));
            }
            noise
        }
        // Gradient-matching poisons carry only their crafted perturbation.
        _ if spec.gradient_matching.is_some() => Vec::new(),
        _ => {
            stamp_all(dataset, &stamp, &marked);
            Vec::new()
        }
    };

    for p in &poisoned {
        dataset.set_label(p.index, p.new_label)?;
    }
    for &i in chosen.iter().chain(&noise_indices) {
        hashes[i] = sha2::Digest::finalize(sha2::Digest::chain_update(
            sha2::Sha256::default(),
            dataset.image(i),
        ))
        .into();
    }
    let sha256_after = dataset_sha256(dataset, &hashes);
    let record = SecretRecord {
        version: record::VERSION,
        nonce: hex::encode(nonce),
        spec: spec.clone(),
        dataset: DatasetFacts {
            count: n,
            shape,
            num_classes: dataset.num_classes(),
            sha256_before,
            sha256_after,
        },
        poisoned,
        noise_indices,
        family: None,
        keyed: None,
    };
    Ok(Watermarked {
        record,
        image_hashes: hashes,
    })
}

/// Stamps every marked image, in parallel.
fn stamp_all(dataset: &mut Dataset, stamp: &Stamp, marked: &[bool]) {
    let len = dataset.shape().len();
    dataset
        .pixels_mut()
        .par_chunks_mut(len)
        .zip(marked.par_iter())
        .with_min_len(256)
        .filter(|(_, m)| **m)
        .for_each(|(img, _)| stamp.apply(img));
}

/// 32 bytes from the operating system's random source, for a record's nonce.
pub fn random_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the operating system provides randomness");
    n
}

#[cfg(test)]
mod tests;
