//! Verification protocols: was a suspicious model trained on the watermarked release?
//!
//! The auditor holds the secret record and benign held-out images (never training images). Two
//! tests must both reject for a `used` verdict:
//!
//! 1. **The margin test** of the secret trigger. For each drawn image x the model is queried on x
//!    and on its triggered copy x', and the paired differences are tested:
//!    - targeted (DVBW, Li et al., TIFS 2023): x from classes other than the target t,
//!      D = p(t | x') − p(t | x); H1: E\[D\] > tau;
//!    - untargeted (UBW, Li et al., NeurIPS 2022): D = p(y | x) − p(y | x') on the true label y;
//!    - label only: D from indicator outcomes; the fixed design uses an exact binomial test of the
//!      watermark success rate among pairs whose benign answer is not already the watermark's
//!      outcome (H0: rate ≤ tau), with the exact McNemar test beside it;
//!    - sequential: pairs are drawn with replacement batch by batch and tested by betting, which
//!      may stop as soon as the evidence is decisive without raising the false-positive rate.
//! 2. **The rank test** against K controls drawn from the secret's family (`spec::family`). Under
//!    H0 (the model was not trained with this release) the secret is one more independent draw of
//!    the family, so its effect is exchangeable with the controls' and its rank is uniform: the
//!    rank p-value (1 + #controls that score at least as high) / (K + 1) is exact for every
//!    innocent model, whatever it learnt elsewhere, another release of the same family included.
//!    The K + 1 triggers are scored by successive elimination, which treats them all alike: the
//!    first round queries every trigger on `first_images` images (the first of a shared order
//!    that its target allows), each later round queries the survivors on one more image, and
//!    every round keeps the better third (`reduction`); a trigger's score is the round it
//!    reached, then its mean effect, then a tie-break drawn from the record; a tie for the lead
//!    (above tau) at a round's cut is first asked up to four more images. Because the
//!    procedure never looks at which trigger is the secret, the scores stay exchangeable. With
//!    K = 99 that is 100 + 34 + 12 + 4 + 2 + 1 triggered queries, about as many as DVBW spends
//!    on the secret alone.
//!
//! Untargeted watermarks must also scatter the model's answers: the triggered predictions that
//! move away from the benign label must spread over the classes (UBW's prediction dispersibility
//! D_p), which a targeted backdoor at the same spot does not.
//!
//! Every choice (the image order, the controls, the tie-breaks) derives from the record's nonce,
//! so re-running a verification repeats its verdict; a research seed may override it and is then
//! written in the verdict.

use crate::dataset::{Dataset, ImageShape};
use crate::endpoint::{EndpointError, ModelEndpoint, Prediction, SettingError, in_range};
use crate::spec::family::{derived_seed, draws_trigger, has_exchangeable_controls};
use crate::spec::{
    BlendSource, Labelling, Patch, PatchPattern, Position, Rotate, Trigger, WatermarkSpec,
};
use crate::stats::{self, Betting, StatsError, TestResult};
use crate::watermark::rng::{Rng, Stream};
use crate::watermark::{SecretRecord, Stamp, WatermarkError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

mod config;
mod control;
pub mod hygiene;
pub mod twice;
mod verdict;

pub use config::{MarginEffect, RankEffect, VerifyConfig, VerifyFields, VerifySettings};
pub use control::{control_specs, random_trigger};
use control::{dispersion, rank_test, stamp_all};
pub use verdict::{
    CombinedVerdict, Control, Decision, Dispersion, PairRecord, RankTest, TriggerScore, Verdict,
    Withheld, bonferroni,
};

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

#[derive(Debug, Clone)]
enum Kind {
    Targeted(u32),
    /// All-to-all: class y is sent to π(y).
    Mapped(Arc<[u32]>),
    Untargeted,
}

impl Kind {
    /// The class a triggered image of class `label` should be sent to (none: untargeted).
    fn sends(&self, label: u32) -> Option<u32> {
        match self {
            Kind::Targeted(t) => Some(*t),
            Kind::Mapped(m) => m.get(label as usize).copied(),
            Kind::Untargeted => None,
        }
    }

    /// Whether an image of class `label` can show the trigger's effect: never one already of the
    /// class it is sent to (DVBW).
    fn allows(&self, label: u32) -> bool {
        match self {
            Kind::Untargeted => true,
            k => k.sends(label).is_some_and(|t| t != label),
        }
    }
}

fn kind_of(spec: &WatermarkSpec, num_classes: usize) -> Kind {
    match spec.labelling {
        Labelling::Targeted { target } | Labelling::CleanLabel { target } => Kind::Targeted(target),
        Labelling::AllToAll { .. } => Kind::Mapped(
            spec.labelling
                .mapping(num_classes)
                .unwrap_or_default()
                .into(),
        ),
        Labelling::Untargeted | Labelling::UntargetedCleanLabel { .. } => Kind::Untargeted,
    }
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn answer_sha(p: &Prediction) -> String {
    sha(serde_json::to_string(p)
        .expect("predictions serialise")
        .as_bytes())
}

/// Benign answers, asked once per image.
struct Benign<'a> {
    pool: &'a Dataset,
    answers: HashMap<usize, Prediction>,
}

impl Benign<'_> {
    /// Asks the endpoint for the images of `indices` not asked yet; returns the queries sent.
    async fn fetch(
        &mut self,
        endpoint: &dyn ModelEndpoint,
        indices: &[usize],
    ) -> Result<usize, VerifyError> {
        let mut missing: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|i| !self.answers.contains_key(i))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(0);
        }
        let images: Vec<Vec<u8>> = missing
            .iter()
            .map(|&i| self.pool.image(i).to_vec())
            .collect();
        let answers = endpoint.predict(&images, self.pool.shape()).await?;
        check_count(&answers, images.len())?;
        for (i, a) in missing.iter().zip(answers) {
            self.answers.insert(*i, a);
        }
        Ok(images.len())
    }
}

/// An endpoint that resizes every image to `to` before the model sees it.
struct Resizing<'a> {
    inner: &'a dyn ModelEndpoint,
    to: ImageShape,
}

#[async_trait::async_trait]
impl ModelEndpoint for Resizing<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn input_shape(&self) -> Option<ImageShape> {
        self.inner.input_shape()
    }

    async fn predict(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        if shape.channels != self.to.channels {
            return Err(EndpointError::Config(format!(
                "the model takes {} images, the queries are {shape}",
                self.to
            )));
        }
        let resized: Vec<Vec<u8>> = images
            .iter()
            .map(|img| crate::dataset::resize_image(img, shape, self.to.height, self.to.width))
            .collect();
        self.inner.predict(&resized, self.to).await
    }
}

/// Verifies the model behind `endpoint` with each trigger a verification spent, in turn: one,
/// or several that test one model together (each at the alpha of `cfg`, alpha / k, for a
/// [`CombinedVerdict`]). Each verdict carries its trigger's place in the release; `progress`
/// counts the queries of all.
pub async fn verify_each(
    endpoint: &dyn ModelEndpoint,
    records: &[(SecretRecord, Option<crate::watermark::SpentTrigger>)],
    pool: &Dataset,
    cfg: &VerifyConfig,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Verdict>, VerifyError> {
    let mut verdicts = Vec::with_capacity(records.len());
    let mut before = 0;
    for (record, spent) in records {
        let offset = |q: usize| progress(before + q);
        let mut v = verify(endpoint, record, pool, cfg, &offset).await?;
        before += v.queries;
        v.trigger = spent.clone();
        verdicts.push(v);
    }
    Ok(verdicts)
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
    // Queries go at the model's input size where the endpoint says it. An any-size trigger is
    // stamped on held-out images resized to it (resize, then trigger: the trigger is drawn
    // crisp at the size the model sees, as the thief's resized training images carried it); a
    // trigger drawn in pixels needs held-out images of the release's size.
    let any_size = crate::spec::family::size_independent(spec);
    let want = endpoint.input_shape().unwrap_or(pool.shape());
    let resize = any_size && want != pool.shape();
    // The research order: stamp at the held-out size, then resize each query on its way out.
    let resize_last = resize && cfg.trigger_then_resize;
    let resizing;
    let endpoint: &dyn ModelEndpoint = if resize_last {
        resizing = Resizing {
            inner: endpoint,
            to: want,
        };
        &resizing
    } else {
        endpoint
    };
    let resized;
    let pool = if resize && !resize_last {
        if want.channels != pool.shape().channels {
            return Err(VerifyError::Invalid(format!(
                "the model takes {want} images, the held-out images are {}",
                pool.shape()
            )));
        }
        resized = pool
            .resized(want.height, want.width)
            .map_err(|e| VerifyError::Invalid(e.to_string()))?;
        &resized
    } else {
        pool
    };
    let shape = pool.shape();
    if !any_size && shape != record.dataset.shape {
        return Err(VerifyError::Invalid(format!(
            "held-out images are {shape}, the watermarked dataset's were {}",
            record.dataset.shape
        )));
    }
    if any_size && shape.channels != record.dataset.shape.channels {
        return Err(VerifyError::Invalid(format!(
            "held-out images have {} channels, the watermarked dataset's had {}",
            shape.channels, record.dataset.shape.channels
        )));
    }
    let nonce = control::record_nonce(record)?;
    let base = cfg
        .seed
        .unwrap_or_else(|| derived_seed(&nonce, "verify", 0));
    // Every query goes out shuffled, with the decoys and pacing asked for.
    let hygienic =
        hygiene::Hygienic::new(endpoint, pool, cfg.decoys.unwrap_or(0.0), cfg.rate, base);
    // Asked twice, each copy goes out in its own shuffled request.
    let twice = twice::Twice::new(&hygienic, base);
    let endpoint: &dyn ModelEndpoint = if cfg.ask_twice { &twice } else { &hygienic };
    let kind = kind_of(spec, record.dataset.num_classes);
    let allowed = |l: u32| spec.source_classes.as_ref().is_none_or(|s| s.contains(&l));
    // One shared order of the held-out images of the source classes (all classes when none are
    // named); each trigger takes the images its target allows, never of the target class (DVBW;
    // Sleeper Agent and UBW-C aim at their source classes only).
    let mut order: Vec<usize> = (0..pool.len())
        .filter(|&i| allowed(pool.label(i)))
        .collect();
    let n = order.len();
    Rng::new(base, Stream::Selection).choose_front(&mut order, n);
    let candidates: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| kind.allows(pool.label(i)))
        .collect();
    if candidates.len() < 2 || (!cfg.sequential && candidates.len() < cfg.m) {
        return Err(VerifyError::Invalid(format!(
            "{} eligible held-out images, the test needs {}",
            candidates.len(),
            if cfg.sequential { 2 } else { cfg.m }
        )));
    }
    let (trigger, seed) = (spec.trigger.clone(), spec.seed);
    let secret_stamp = tokio::task::spawn_blocking(move || Stamp::new(&trigger, seed, shape))
        .await
        .map_err(|e| VerifyError::Invalid(format!("making the trigger failed: {e}")))??;
    let stamps = Arc::new(vec![secret_stamp]);
    let mut benign = Benign {
        pool,
        answers: HashMap::new(),
    };
    // Triggered answers of the secret by image, shared with the rank test.
    let mut secret_answers: HashMap<usize, (String, Prediction)> = HashMap::new();

    // 1. The margin test. With `MarginEffect::TrueClass` a targeted trigger's pairs are scored as
    // an untargeted one's, by the true class's loss; the images stay those its target allows.
    let margin = match cfg.margin_effect {
        MarginEffect::Target => kind.clone(),
        MarginEffect::TrueClass => Kind::Untargeted,
    };
    let mut draw = Rng::new(base, Stream::Noise);
    let mut betting = Betting::new(cfg.tau, cfg.alpha)?;
    let mut trail: Vec<PairRecord> = Vec::new();
    let mut benign_answers: Vec<Prediction> = Vec::new();
    let mut triggered_answers: Vec<Prediction> = Vec::new();
    let mut queries = 0usize;
    let round = if cfg.sequential { cfg.batch_pairs } else { 32 };
    while trail.len() < cfg.m {
        let take = round.min(cfg.m - trail.len());
        let indices: Vec<usize> = if cfg.sequential {
            (0..take)
                .map(|_| candidates[draw.below(candidates.len() as u64) as usize])
                .collect()
        } else {
            candidates[trail.len()..trail.len() + take].to_vec()
        };
        queries += benign.fetch(endpoint, &indices).await?;
        let work = indices
            .iter()
            .map(|&i| (0, pool.image(i).to_vec()))
            .collect();
        let images = stamp_all(&stamps, work).await?;
        let answers = endpoint.predict(&images, shape).await?;
        check_count(&answers, images.len())?;
        queries += images.len();
        progress(queries);
        for ((&i, img), w) in indices.iter().zip(&images).zip(answers) {
            let b = &benign.answers[&i];
            let d = difference(&margin, pool.label(i), b, &w, cfg.label_only)?;
            if cfg.sequential {
                betting.observe(d)?;
            }
            trail.push(PairRecord {
                index: i,
                label: pool.label(i),
                benign_sha256: sha(pool.image(i)),
                triggered_sha256: sha(img),
                benign_response_sha256: answer_sha(b),
                triggered_response_sha256: answer_sha(&w),
                difference: d,
            });
            benign_answers.push(b.clone());
            secret_answers
                .entry(i)
                .or_insert_with(|| (sha(img), w.clone()));
            triggered_answers.push(w);
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
            fixed_tests(&margin, &trail, &benign_answers, &diffs, cfg)?
                .into_iter()
                .collect(),
        )
    } else {
        let mut t = fixed_tests(&margin, &trail, &benign_answers, &diffs, cfg)?;
        let first = t.remove(0);
        (first, t)
    };

    // 2. The rank test against the family's controls.
    let rank = rank_test(
        endpoint,
        record,
        &nonce,
        base,
        cfg,
        &order,
        &mut benign,
        &stamps[0],
        &secret_answers,
        &mut queries,
        progress,
    )
    .await?;

    // 3. Untargeted watermarks scatter their answers.
    let dispersion = matches!(kind, Kind::Untargeted).then(|| {
        dispersion(
            &benign_answers,
            &triggered_answers,
            record.dataset.num_classes,
        )
    });

    // 4. What the endpoint withheld.
    let withheld = withheld_counts(&benign_answers, &triggered_answers, cfg)?;
    if withheld.as_ref().is_some_and(|w| w.benign == trail.len()) {
        return Err(VerifyError::Invalid(format!(
            "the endpoint withheld every benign answer ({} of {}): it answers no query, so \
             nothing can be tested",
            trail.len(),
            trail.len()
        )));
    }

    let margin = primary.rejects(cfg.alpha);
    let dispersed = dispersion.as_ref().is_none_or(|d| d.passed);
    let (decision, reason) = match (margin, rank.rejected, dispersed, rank.exchangeable) {
        (true, true, true, true) => (
            Decision::Used,
            format!(
                "the secret trigger moves the model by more than tau, and more than {} of the {} \
                 triggers of its family drawn at random do (rank p = {:.3}): evidence the model \
                 was trained on this release",
                if rank.rank == 1 {
                    "every one".to_string()
                } else {
                    format!("all but {}", rank.rank - 1)
                },
                rank.controls,
                rank.p_value
            ),
        ),
        (true, true, true, false) => (
            Decision::Inconclusive,
            "the trigger moves the model more than its controls, but it was not drawn in secret \
             from a family (a fixed or learnt trigger, or a crafted one whose record carries no \
             controls of its family), so this is not proof that the model was trained on this \
             release"
                .to_string(),
        ),
        (false, _, _, _) => (
            Decision::NotShown,
            format!(
                "the secret trigger's effect is not shown to exceed tau {} (p = {:.3})",
                cfg.tau, primary.p_value
            ),
        ),
        (true, false, _, _) => (
            Decision::NotShown,
            format!(
                "the model reacts to the secret trigger, but as much as to triggers of its family \
                 drawn at random (rank {} of {}, p = {:.3}): that is not specific to this release",
                rank.rank,
                rank.controls + 1,
                rank.p_value
            ),
        ),
        (true, true, false, _) => (
            Decision::NotShown,
            "the secret trigger moves the model, but its answers do not scatter over the classes \
             as an untargeted watermark's do (a targeted backdoor at the same place?)"
                .to_string(),
        ),
    };
    let mut reason = reason;
    if let Some(w) = &withheld {
        reason.push_str(&format!(
            "; the endpoint withheld {} of {} triggered answers and {} of {} benign ones \
             (McNemar p = {:.3}{}), each withheld triggered answer counted as the largest effect \
             for the secret and its controls alike",
            w.triggered,
            trail.len(),
            w.benign,
            trail.len(),
            w.test.p_value,
            if w.unsteady > 0 {
                format!(
                    "; {} of them named another class when asked again",
                    w.unsteady
                )
            } else {
                String::new()
            }
        ));
    }
    if let Some(s) = cfg.seed {
        reason.push_str(&format!(
            " (research seed {s} replaced the record's own draw of images and controls)"
        ));
    }
    Ok(Verdict {
        decision,
        reason,
        protocol: format!(
            "{}, {}{}",
            match kind {
                Kind::Targeted(t) => format!("targeted (target {t})"),
                Kind::Mapped(_) => "all-to-all (each class to its own)".into(),
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
        trigger: None,
        endpoint: endpoint.describe(),
        config: cfg.clone(),
        primary,
        secondary,
        rank: Some(rank),
        dispersion,
        withheld,
        control: None,
        pairs: trail.len(),
        queries,
        decoys: hygienic.decoys_sent(),
        echoes: twice.echoes_sent(),
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
    kind: &Kind,
    label: u32,
    b: &Prediction,
    w: &Prediction,
    label_only: bool,
) -> Result<f64, VerifyError> {
    // A withheld answer (refused or flattened) says nothing about the model's scores: a withheld
    // triggered answer is the largest effect, a withheld benign one leaves the pair at 0, for
    // every trigger alike (docs/verification.md).
    match (b.is_withheld(), w.is_withheld()) {
        (true, _) => return Ok(0.0),
        (false, true) => return Ok(1.0),
        (false, false) => {}
    }
    let missing =
        || VerifyError::Invalid("the endpoint gives labels only; use the label-only test".into());
    let hit = |p: &Prediction, c: u32| -> Result<f64, VerifyError> {
        Ok(if p.label().ok_or_else(missing)? == c {
            1.0
        } else {
            0.0
        })
    };
    Ok(match (kind.sends(label), label_only) {
        (Some(t), false) => {
            w.prob_bounds(t).ok_or_else(missing)?.0 - b.prob_bounds(t).ok_or_else(missing)?.1
        }
        (None, false) => {
            b.prob_bounds(label).ok_or_else(missing)?.0
                - w.prob_bounds(label).ok_or_else(missing)?.1
        }
        (Some(t), true) => hit(w, t)? - hit(b, t)?,
        (None, true) => hit(b, label)? - hit(w, label)?,
    })
}

/// Counts of withheld answers among the pairs (`None` when none was withheld), with the exact
/// McNemar test of triggered against benign withholding.
fn withheld_counts(
    benign: &[Prediction],
    triggered: &[Prediction],
    cfg: &VerifyConfig,
) -> Result<Option<Withheld>, VerifyError> {
    let pairs: Vec<(bool, bool)> = benign
        .iter()
        .zip(triggered)
        .map(|(b, w)| (b.is_withheld(), w.is_withheld()))
        .collect();
    let count = |f: &dyn Fn(&(bool, bool)) -> bool| pairs.iter().filter(|p| f(p)).count();
    let (b, w, both) = (count(&|p| p.0), count(&|p| p.1), count(&|p| p.0 && p.1));
    if b + w == 0 {
        return Ok(None);
    }
    let refused = benign
        .iter()
        .chain(triggered)
        .filter(|p| matches!(p, Prediction::Withheld { status: Some(_) }))
        .count();
    let unsteady = benign
        .iter()
        .chain(triggered)
        .filter(|p| matches!(p, Prediction::Unsteady { .. }))
        .count();
    let mut test = stats::mcnemar(
        (w - both) as u64,
        (b - both) as u64,
        pairs.len() as u64,
        cfg.alpha,
    )?;
    test.test = "exact McNemar test of withheld triggered against benign answers".into();
    Ok(Some(Withheld {
        benign: b,
        triggered: w,
        both,
        refused,
        unsteady,
        test,
    }))
}

/// The fixed-design tests, the deciding one first.
fn fixed_tests(
    kind: &Kind,
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
        .map(|(p, b)| match kind.sends(p.label) {
            Some(t) => b.label() != Some(t),
            None => b.label() == Some(p.label),
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

#[cfg(test)]
mod tests;
