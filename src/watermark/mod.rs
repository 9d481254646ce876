//! Stamping a dataset with a watermark and recording the secret needed to verify it later.
//!
//! Deterministic from (spec, seed, dataset): the same inputs give the same poisoned indices, labels
//! and pixels. Selection follows BackdoorBox (`core/attacks/BadNets.py`): shuffle the eligible
//! indices and poison the first `round(rate × N)`, N being the dataset's size; samples of the
//! target class may be chosen unless source classes restrict the choice. Untouched samples stay
//! byte-identical.

mod generator;
mod physical;
mod record;
mod reflect;
pub mod rng;
mod trigger;
mod warp;

pub use record::{DatasetFacts, PoisonedSample, SecretRecord};
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
    if let Some(section) = spec.crafting() {
        return Err(WatermarkError::Spec(SpecError::Field {
            field: section.into(),
            message: if spec.needs_model() {
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
    if spec.family.is_some() {
        let drawn = draw_release(spec, dataset.num_classes(), dataset.shape(), &nonce)?;
        let mut marked = apply_crafted(dataset, &drawn, nonce, craft)?;
        marked.record.family = Some(spec.clone());
        return Ok(marked);
    }
    spec.check_fits(dataset)?;
    let n = dataset.len();
    let mut hashes = image_sha256s(dataset);
    let sha256_before = dataset_sha256(dataset, &hashes);

    let mut eligible: Vec<usize> = match (&spec.labelling, &spec.source_classes) {
        (
            Labelling::CleanLabel { target: c }
            | Labelling::UntargetedCleanLabel { poison_class: c },
            _,
        ) => (0..n).filter(|&i| dataset.label(i) == *c).collect(),
        (_, Some(src)) => (0..n)
            .filter(|&i| src.contains(&dataset.label(i)))
            .collect(),
        (_, None) => (0..n).collect(),
    };
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
                | Labelling::UntargetedCleanLabel { poison_class: c } => {
                    format!(" (clean-label: class {c} only)")
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
    let poisoned: Vec<PoisonedSample> = chosen
        .iter()
        .map(|&index| {
            let original_label = dataset.label(index);
            let new_label = match spec.labelling {
                Labelling::Targeted { target } => target,
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
            let mut rest: Vec<usize> = (0..n).filter(|&i| !marked[i]).collect();
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
            let mut rest: Vec<usize> = (0..n).filter(|&i| !marked[i]).collect();
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
