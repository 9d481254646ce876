//! Verification protocols: was a suspicious model trained on the watermarked release?
//!
//! The auditor holds the secret record and benign held-out images (never training images). For
//! each drawn image x the model is queried on x and on its triggered copy x', and the paired
//! differences are tested:
//!
//! - targeted (DVBW, Li et al., TIFS 2023): x from classes other than the target t,
//!   D = p(t | x') − p(t | x); H1: E[D] > tau;
//! - untargeted (UBW, Li et al., NeurIPS 2022): D = p(y | x) − p(y | x') on the true label y;
//! - label only: D from indicator outcomes; the fixed design uses an exact binomial test of the
//!   watermark success rate among pairs whose benign answer is not already the watermark's
//!   outcome (H0: rate ≤ tau), with the exact McNemar test beside it;
//! - sequential: pairs are drawn with replacement batch by batch and tested by betting, which may
//!   stop as soon as the evidence is decisive without raising the false-positive rate.
//!
//! Every verdict also runs the independent-trigger control: the same images with a fresh random
//! trigger of the same kind. A model that reacts to any such trigger is reported as inconclusive,
//! not as a thief.

use crate::dataset::{Dataset, ImageShape};
use crate::endpoint::{EndpointError, ModelEndpoint, Prediction};
use crate::spec::{BlendSource, Labelling, Patch, PatchPattern, Position, Rotate, Trigger};
use crate::stats::{self, Betting, StatsError, TestResult};
use crate::watermark::rng::{Rng, Stream};
use crate::watermark::{SecretRecord, Stamp, WatermarkError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a verification could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The model endpoint failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The record or its trigger is unusable.
    #[error(transparent)]
    Watermark(#[from] WatermarkError),
    /// A test could not be computed.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// The request does not fit the data.
    #[error("{0}")]
    Invalid(String),
}

/// Settings of a verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyConfig {
    /// Pairs of the fixed design; the most pairs the sequential design may use.
    pub m: usize,
    /// Margin of the null hypothesis.
    pub tau: f64,
    /// Significance level.
    pub alpha: f64,
    /// Use only predicted labels.
    pub label_only: bool,
    /// Stop as soon as the betting test decides.
    pub sequential: bool,
    /// Pairs queried per round in sequential mode.
    pub batch_pairs: usize,
    /// Seed of the image draw and the control trigger.
    pub seed: u64,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            m: 100,
            tau: 0.2,
            alpha: 0.01,
            label_only: false,
            sequential: false,
            batch_pairs: 4,
            seed: 0,
        }
    }
}

/// The conclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// H0 rejected and the control did not fire: evidence the model was trained on the release.
    Used,
    /// H0 not rejected.
    NotShown,
    /// Both the secret trigger and a random one move the model: no conclusion.
    Inconclusive,
}

/// One queried pair, for the audit trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairRecord {
    /// Index of the benign image in the held-out set.
    pub index: usize,
    /// Its true label.
    pub label: u32,
    /// sha256 of the benign image's pixels.
    pub benign_sha256: String,
    /// sha256 of the triggered image's pixels.
    pub triggered_sha256: String,
    /// sha256 of the benign answer (canonical JSON).
    pub benign_response_sha256: String,
    /// sha256 of the triggered answer.
    pub triggered_response_sha256: String,
    /// The paired difference tested.
    pub difference: f64,
}

/// The independent-trigger control.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Control {
    /// The kind of the random trigger used (the same kind as the secret one). The trigger itself
    /// is drawn from the secret's kind and shape with the verification's seed
    /// ([`random_trigger`]), so the owner reproduces it from the record; it is not stored, as
    /// parts of it are taken from the secret.
    pub kind: String,
    /// Its test on the same images.
    pub result: TestResult,
    /// Whether it rejected H0.
    pub rejected: bool,
    /// Its pairs (benign answers are shared with the main test).
    pub trail: Vec<PairRecord>,
}

/// Everything a verification found, and everything needed to reproduce it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// The conclusion.
    pub decision: Decision,
    /// Which protocol ran.
    pub protocol: String,
    /// Commitment of the secret record verified.
    pub commitment: String,
    /// The endpoint queried.
    pub endpoint: String,
    /// The settings.
    pub config: VerifyConfig,
    /// The test that decides.
    pub primary: TestResult,
    /// Other tests on the same pairs, for information (after sequential stopping they are not
    /// valid tests).
    pub secondary: Vec<TestResult>,
    /// The independent-trigger control.
    pub control: Control,
    /// Pairs tested.
    pub pairs: usize,
    /// Images sent to the model, the control's included.
    pub queries: usize,
    /// Every pair, in query order.
    pub trail: Vec<PairRecord>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Targeted(u32),
    Untargeted,
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn answer_sha(p: &Prediction) -> String {
    sha(serde_json::to_string(p)
        .expect("predictions serialise")
        .as_bytes())
}

/// Verifies `record` against `endpoint` with images from `pool`. `progress` is told the number
/// of images queried so far.
pub async fn verify(
    endpoint: &dyn ModelEndpoint,
    record: &SecretRecord,
    pool: &Dataset,
    cfg: &VerifyConfig,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Verdict, VerifyError> {
    let spec = &record.spec;
    let shape = pool.shape();
    if shape != record.dataset.shape {
        return Err(VerifyError::Invalid(format!(
            "held-out images are {shape}, the watermarked dataset's were {}",
            record.dataset.shape
        )));
    }
    if cfg.m < 2
        || !(0.0..1.0).contains(&cfg.tau)
        || !(cfg.alpha > 0.0 && cfg.alpha < 1.0)
        || cfg.batch_pairs == 0
    {
        return Err(VerifyError::Invalid(
            "need m ≥ 2, tau in [0, 1), alpha in (0, 1), batch ≥ 1".into(),
        ));
    }
    let kind = match spec.labelling {
        Labelling::Targeted { target } | Labelling::CleanLabel { target } => Kind::Targeted(target),
        Labelling::Untargeted | Labelling::UntargetedCleanLabel { .. } => Kind::Untargeted,
    };
    // Held-out images of the source classes (all classes when none are named), never of the
    // target class (DVBW; Sleeper Agent and UBW-C aim at their source classes only).
    let candidates: Vec<usize> = (0..pool.len())
        .filter(|&i| {
            let l = pool.label(i);
            spec.source_classes.as_ref().is_none_or(|s| s.contains(&l))
                && match kind {
                    Kind::Targeted(t) => l != t,
                    Kind::Untargeted => true,
                }
        })
        .collect();
    if candidates.len() < 2 || (!cfg.sequential && candidates.len() < cfg.m) {
        return Err(VerifyError::Invalid(format!(
            "{} eligible held-out images, the test needs {}",
            candidates.len(),
            if cfg.sequential { 2 } else { cfg.m }
        )));
    }
    let stamp = Stamp::new(&spec.trigger, spec.seed, shape)?;
    let control_trigger = random_trigger(&spec.trigger, shape, cfg.seed)?;
    let control_stamp = Stamp::new(&control_trigger, cfg.seed ^ 0x5eed_c0de, shape)?;

    let mut draw = Rng::new(cfg.seed, Stream::Selection);
    let mut order: Vec<usize> = candidates.clone();
    if !cfg.sequential {
        draw.choose_front(&mut order, cfg.m);
        order.truncate(cfg.m);
    }
    let mut betting = Betting::new(cfg.tau, cfg.alpha)?;
    let mut trail: Vec<PairRecord> = Vec::new();
    let mut benign_answers: Vec<Prediction> = Vec::new();
    let mut queries = 0usize;
    let round = if cfg.sequential { cfg.batch_pairs } else { 32 };
    while trail.len() < cfg.m {
        let take = round.min(cfg.m - trail.len());
        let indices: Vec<usize> = if cfg.sequential {
            (0..take)
                .map(|_| candidates[draw.below(candidates.len() as u64) as usize])
                .collect()
        } else {
            order[trail.len()..trail.len() + take].to_vec()
        };
        let mut images = Vec::with_capacity(2 * take);
        for &i in &indices {
            let benign = pool.image(i).to_vec();
            let mut triggered = benign.clone();
            stamp.apply(&mut triggered);
            images.push(benign);
            images.push(triggered);
        }
        let answers = endpoint.predict(&images, shape).await?;
        check_count(&answers, images.len())?;
        queries += images.len();
        progress(queries);
        for (k, &i) in indices.iter().enumerate() {
            let (b, w) = (&answers[2 * k], &answers[2 * k + 1]);
            let d = difference(kind, pool.label(i), b, w, cfg.label_only)?;
            if cfg.sequential {
                betting.observe(d)?;
            }
            trail.push(PairRecord {
                index: i,
                label: pool.label(i),
                benign_sha256: sha(&images[2 * k]),
                triggered_sha256: sha(&images[2 * k + 1]),
                benign_response_sha256: answer_sha(b),
                triggered_response_sha256: answer_sha(w),
                difference: d,
            });
            benign_answers.push(b.clone());
        }
        // A whole round is queried before looking: its pairs are paid for, so all are observed
        // (the betting p-value keeps its running maximum, so a rejection stands).
        if cfg.sequential && betting.rejected() {
            break;
        }
    }
    let diffs: Vec<f64> = trail.iter().map(|p| p.difference).collect();
    let (primary, secondary) = if cfg.sequential {
        (
            betting.result(),
            fixed_tests(kind, &trail, &benign_answers, &diffs, cfg)?
                .into_iter()
                .collect(),
        )
    } else {
        let mut t = fixed_tests(kind, &trail, &benign_answers, &diffs, cfg)?;
        let first = t.remove(0);
        (first, t)
    };

    // The control: the same images with a random trigger of the same kind; benign answers reused.
    let mut control_images = Vec::with_capacity(trail.len());
    for p in &trail {
        let mut img = pool.image(p.index).to_vec();
        control_stamp.apply(&mut img);
        control_images.push(img);
    }
    let control_answers = endpoint.predict(&control_images, shape).await?;
    check_count(&control_answers, control_images.len())?;
    queries += control_images.len();
    progress(queries);
    let mut control_trail = Vec::with_capacity(trail.len());
    for ((p, b), (img, w)) in trail
        .iter()
        .zip(&benign_answers)
        .zip(control_images.iter().zip(&control_answers))
    {
        control_trail.push(PairRecord {
            triggered_sha256: sha(img),
            triggered_response_sha256: answer_sha(w),
            difference: difference(kind, p.label, b, w, cfg.label_only)?,
            ..p.clone()
        });
    }
    let control_diffs: Vec<f64> = control_trail.iter().map(|p| p.difference).collect();
    let control_result =
        fixed_tests(kind, &control_trail, &benign_answers, &control_diffs, cfg)?.remove(0);
    let control_rejected = control_result.rejects(cfg.alpha);
    let decision = match (primary.rejects(cfg.alpha), control_rejected) {
        (true, false) => Decision::Used,
        (true, true) => Decision::Inconclusive,
        (false, _) => Decision::NotShown,
    };
    Ok(Verdict {
        decision,
        protocol: format!(
            "{}, {}{}",
            match kind {
                Kind::Targeted(t) => format!("targeted (target {t})"),
                Kind::Untargeted => "untargeted".into(),
            },
            if cfg.label_only {
                "labels"
            } else {
                "probabilities"
            },
            if cfg.sequential { ", sequential" } else { "" }
        ),
        commitment: record.commitment(),
        endpoint: endpoint.describe(),
        config: cfg.clone(),
        primary,
        secondary,
        control: Control {
            kind: control_trigger.kind().to_string(),
            result: control_result,
            rejected: control_rejected,
            trail: control_trail,
        },
        pairs: trail.len(),
        queries,
        trail,
    })
}

fn check_count(answers: &[Prediction], n: usize) -> Result<(), VerifyError> {
    if answers.len() != n {
        return Err(VerifyError::Invalid(format!(
            "the endpoint gave {} answers for {n} images",
            answers.len()
        )));
    }
    Ok(())
}

/// The paired difference of one pair. With top-k answers the bounds are taken so that the
/// difference is never overstated.
fn difference(
    kind: Kind,
    label: u32,
    b: &Prediction,
    w: &Prediction,
    label_only: bool,
) -> Result<f64, VerifyError> {
    let missing =
        || VerifyError::Invalid("the endpoint gives labels only; use the label-only test".into());
    let hit = |p: &Prediction, c: u32| -> Result<f64, VerifyError> {
        Ok(if p.label().ok_or_else(missing)? == c {
            1.0
        } else {
            0.0
        })
    };
    Ok(match (kind, label_only) {
        (Kind::Targeted(t), false) => {
            w.prob_bounds(t).ok_or_else(missing)?.0 - b.prob_bounds(t).ok_or_else(missing)?.1
        }
        (Kind::Untargeted, false) => {
            b.prob_bounds(label).ok_or_else(missing)?.0
                - w.prob_bounds(label).ok_or_else(missing)?.1
        }
        (Kind::Targeted(t), true) => hit(w, t)? - hit(b, t)?,
        (Kind::Untargeted, true) => hit(b, label)? - hit(w, label)?,
    })
}

/// The fixed-design tests, the deciding one first.
fn fixed_tests(
    kind: Kind,
    trail: &[PairRecord],
    benign: &[Prediction],
    diffs: &[f64],
    cfg: &VerifyConfig,
) -> Result<Vec<TestResult>, VerifyError> {
    if !cfg.label_only {
        if diffs.len() < 2 {
            return Ok(vec![no_evidence("paired t-test", diffs.len(), cfg)]);
        }
        return Ok(vec![
            stats::paired_t(diffs, cfg.tau, cfg.alpha)?,
            stats::wilcoxon(diffs, cfg.tau, cfg.alpha)?,
        ]);
    }
    // Pairs where the benign answer is not already the watermark's outcome: for a targeted
    // watermark, benign not predicted as the target; for an untargeted one, benign correct.
    let eligible: Vec<bool> = trail
        .iter()
        .zip(benign)
        .map(|(p, b)| match kind {
            Kind::Targeted(t) => b.label() != Some(t),
            Kind::Untargeted => b.label() == Some(p.label),
        })
        .collect();
    let n0 = eligible.iter().filter(|e| **e).count() as u64;
    let k = diffs
        .iter()
        .zip(&eligible)
        .filter(|(d, e)| **e && **d > 0.0)
        .count() as u64;
    let n01 = diffs.iter().filter(|d| **d > 0.0).count() as u64;
    let n10 = diffs.iter().filter(|d| **d < 0.0).count() as u64;
    let primary = if n0 == 0 {
        no_evidence("exact binomial test", 0, cfg)
    } else {
        let mut r = stats::binomial(k, n0, cfg.tau, cfg.alpha)?;
        r.test = "exact binomial test of the watermark success rate".into();
        r
    };
    Ok(vec![
        primary,
        stats::mcnemar(n01, n10, diffs.len() as u64, cfg.alpha)?,
    ])
}

fn no_evidence(test: &str, n: usize, cfg: &VerifyConfig) -> TestResult {
    TestResult {
        test: test.into(),
        n,
        statistic: 0.0,
        p_value: 1.0,
        effect: 0.0,
        ci_low: f64::NAN,
        ci_level: 1.0 - cfg.alpha,
        tau: cfg.tau,
    }
}

/// A fresh random trigger of the same kind as `t`, for the independent-trigger control: a random
/// pattern of the same size at a random position (patches), fresh noise of the same alpha and
/// region (blends), a freshly drawn field (warps).
pub fn random_trigger(t: &Trigger, shape: ImageShape, seed: u64) -> Result<Trigger, VerifyError> {
    let mut rng = Rng::new(seed, Stream::Pattern);
    Ok(match t {
        Trigger::Patch(p) => {
            let rows = p.rows(shape.width).map_err(WatermarkError::from)?;
            let (ph, pw) = (rows.len(), rows[0].len());
            let matrix: Vec<Vec<u8>> = (0..ph)
                .map(|_| (0..pw).map(|_| rng.byte()).collect())
                .collect();
            let r = rng.below((shape.height - ph + 1) as u64) as i64;
            let c = rng.below((shape.width - pw + 1) as u64) as i64;
            Trigger::Patch(Patch {
                pattern: PatchPattern::Matrix(matrix),
                size: None,
                thickness: None,
                value: None,
                position: Position::At([r, c]),
                alpha: p.alpha,
            })
        }
        Trigger::Blend(b) => {
            let mut c = b.clone();
            c.source = BlendSource::Noise;
            c.image = None;
            c.pattern = None;
            Trigger::Blend(c)
        }
        Trigger::Warp(w) => Trigger::Warp(w.clone()),
        Trigger::Adaptive(a) => {
            let mut c = a.clone();
            for (k, p) in c.pieces.iter_mut().enumerate() {
                *p = random_trigger(p, shape, seed.wrapping_add(k as u64 + 1))?;
            }
            Trigger::Adaptive(c)
        }
        // A random inner trigger under the same transformations.
        Trigger::Physical(p) => {
            let mut c = p.clone();
            c.inner = Box::new(random_trigger(&p.inner, shape, seed.wrapping_add(1))?);
            Trigger::Physical(c)
        }
        // The same networks' outputs turned by 180°.
        Trigger::Generated(g) => {
            let mut c = g.clone();
            c.turned = !g.turned;
            Trigger::Generated(c)
        }
        // Random signs at the same magnitudes.
        Trigger::Perturbation(p) => Trigger::Perturbation(crate::spec::Perturbation {
            values: p
                .values
                .iter()
                .map(|&v| if rng.below(2) == 0 { v } else { -v })
                .collect(),
        }),
        // The same images turned by 180°, drawn with the control's own seed.
        Trigger::Reflection(r) => {
            use base64::Engine as _;
            let mut c = r.clone();
            for e in &mut c.candidates {
                let px = e.pixels().map_err(WatermarkError::from)?;
                let turned: Vec<u8> = px
                    .chunks(e.shape.channels)
                    .rev()
                    .flatten()
                    .copied()
                    .collect();
                e.pixels_b64 = base64::engine::general_purpose::STANDARD.encode(turned);
            }
            Trigger::Reflection(c)
        }
        // The other direction, at a random magnitude around the secret one.
        Trigger::Rotate(r) => {
            let scale = 0.5 + rng.below(1001) as f64 / 1000.0;
            let magnitude = (r.angle.abs() * scale).clamp(1.0, 180.0);
            Trigger::Rotate(Rotate {
                angle: -r.angle.signum() * magnitude,
            })
        }
    })
}

#[cfg(test)]
mod tests;
