//! Verification protocols: was a suspicious model trained on the watermarked release?
//!
//! The auditor holds the secret record and benign held-out images (never training images). Two
//! tests must both reject for a `used` verdict:
//!
//! 1. **The margin test** of the secret trigger. For each drawn image x the model is queried on x
//!    and on its triggered copy x', and the paired differences are tested:
//!    - targeted (DVBW, Li et al., TIFS 2023): x from classes other than the target t,
//!      D = p(t | x') − p(t | x); H1: E[D] > tau;
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
//!    reached, then its mean effect, then a tie-break drawn from the record. Because the
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
use crate::spec::family::{derived_seed, has_exchangeable_controls};
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

/// The settings of a verification as plain data; [`VerifyConfig::new`] checks them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyFields {
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
    /// Research override of the seed the image order, the controls and the tie-breaks derive
    /// from; absent, they derive from the record, so that no choice of the auditor changes a
    /// verdict. An override is written in the verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Controls drawn from the family (K); absent: the fewest that let the rank test reach
    /// alpha, ⌈1/alpha⌉ − 1 (99 at alpha 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controls: Option<usize>,
    /// Images every trigger is queried on in the rank test's first round (default 1; 2 keeps a
    /// learnt trigger that fails on its first image in the race at the price of K + 1 queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_images: Option<usize>,
    /// Each round of the rank test keeps the better 1/reduction of the remaining triggers
    /// (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduction: Option<usize>,
}

impl Default for VerifyFields {
    fn default() -> Self {
        Self {
            m: 100,
            tau: 0.2,
            alpha: 0.01,
            label_only: false,
            sequential: false,
            batch_pairs: 4,
            seed: None,
            controls: None,
            first_images: None,
            reduction: None,
        }
    }
}

impl VerifyFields {
    /// The number of controls the rank test draws.
    pub fn control_count(&self) -> usize {
        self.controls
            .unwrap_or_else(|| ((1.0 / self.alpha) - 1e-9).ceil() as usize - 1)
    }

    /// Images per trigger in the rank test's first round.
    pub fn first_image_count(&self) -> usize {
        self.first_images.unwrap_or(1)
    }

    /// The fraction 1/reduction of the remaining triggers each round of the rank test keeps.
    pub fn reduction_factor(&self) -> usize {
        self.reduction.unwrap_or(3)
    }
}

/// Settings of a verification, every one in its range: made only by [`VerifyConfig::new`] (or
/// read back from a report, checked the same way), read through its fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "VerifyFields", into = "VerifyFields")]
pub struct VerifyConfig(VerifyFields);

impl std::ops::Deref for VerifyConfig {
    type Target = VerifyFields;
    fn deref(&self) -> &VerifyFields {
        &self.0
    }
}

impl TryFrom<VerifyFields> for VerifyConfig {
    type Error = SettingError;
    fn try_from(f: VerifyFields) -> Result<Self, SettingError> {
        Self::new(f)
    }
}

impl From<VerifyConfig> for VerifyFields {
    fn from(c: VerifyConfig) -> Self {
        c.0
    }
}

impl VerifyConfig {
    /// Checks the settings; the error names the setting (by its name in the HTTP API) and its
    /// range.
    pub fn new(f: VerifyFields) -> Result<Self, SettingError> {
        in_range("m", f.m, 2, 10_000)?;
        if !(0.0..1.0).contains(&f.tau) {
            return Err(SettingError::new(
                "tau",
                format!("in [0, 1), got {}", f.tau),
            ));
        }
        if !(f.alpha > 0.0 && f.alpha < 1.0) {
            return Err(SettingError::new(
                "alpha",
                format!("in (0, 1), got {}", f.alpha),
            ));
        }
        in_range("round", f.batch_pairs, 1, 1000)?;
        if let Some(n) = f.first_images {
            in_range("first_images", n, 1, 100)?;
        }
        if let Some(n) = f.reduction {
            in_range("reduction", n, 2, 10)?;
        }
        let k = f.control_count();
        if k > 100_000 {
            return Err(SettingError::new(
                "controls",
                format!("at most 100000, got {k}"),
            ));
        }
        if 1.0 / (k as f64 + 1.0) > f.alpha + 1e-12 {
            return Err(SettingError::new(
                "controls",
                format!(
                    "with {k} controls the smallest rank p-value is 1/{}, above alpha {}; \
                     draw at least {}",
                    k + 1,
                    f.alpha,
                    ((1.0 / f.alpha) - 1e-9).ceil() as usize - 1
                ),
            ));
        }
        Ok(Self(f))
    }

    /// The same settings with `change` made to them, checked again.
    pub fn with(&self, change: impl FnOnce(&mut VerifyFields)) -> Result<Self, SettingError> {
        let mut f = self.0.clone();
        change(&mut f);
        Self::new(f)
    }
}

/// What a user may say about the test: `hallmark verify`'s flags and the HTTP API's fields,
/// each left to its default when absent.
#[derive(Debug, Clone, Default)]
pub struct VerifySettings {
    /// Pairs (fixed design) or the most pairs (sequential); default 100.
    pub m: Option<usize>,
    /// Margin of the null hypothesis (default 0.2).
    pub tau: Option<f64>,
    /// Significance level (default 0.01).
    pub alpha: Option<f64>,
    /// Use only predicted labels.
    pub label_only: bool,
    /// Stop as soon as the evidence is decisive.
    pub sequential: bool,
    /// Pairs per round in sequential mode (default 4).
    pub round: Option<usize>,
    /// Research override of the seed.
    pub seed: Option<u64>,
    /// Controls of the rank test.
    pub controls: Option<usize>,
    /// Images each trigger is queried on in the rank test's first round.
    pub first_images: Option<usize>,
}

impl VerifySettings {
    /// The checked configuration.
    pub fn into_config(self) -> Result<VerifyConfig, SettingError> {
        let d = VerifyFields::default();
        VerifyConfig::new(VerifyFields {
            m: self.m.unwrap_or(d.m),
            tau: self.tau.unwrap_or(d.tau),
            alpha: self.alpha.unwrap_or(d.alpha),
            label_only: self.label_only,
            sequential: self.sequential,
            batch_pairs: self.round.unwrap_or(d.batch_pairs),
            seed: self.seed,
            controls: self.controls,
            first_images: self.first_images,
            reduction: None,
        })
    }
}

/// The conclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Both tests rejected: evidence the model was trained on the release.
    Used,
    /// No such evidence.
    NotShown,
    /// Both tests rejected, but the controls are not exchangeable with the secret (a fixed,
    /// public trigger, or a crafted kind without a family), so the rank p-value is not proof.
    Inconclusive,
}

impl Decision {
    /// The decision's name, as written in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Used => "used",
            Self::NotShown => "not_shown",
            Self::Inconclusive => "inconclusive",
        }
    }

    /// The decision named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Used, Self::NotShown, Self::Inconclusive]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
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

/// The single independent-trigger control of verdicts made before the rank test (read back
/// from stored verdicts, never produced).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Control {
    /// The kind of the random trigger used.
    pub kind: String,
    /// Its test on the same images.
    pub result: TestResult,
    /// Whether it rejected H0.
    pub rejected: bool,
    /// Its pairs.
    pub trail: Vec<PairRecord>,
}

/// One trigger's score in the rank test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TriggerScore {
    /// The last elimination round the trigger took part in (0 = the first).
    pub round: usize,
    /// Its mean paired difference over the images it was queried on.
    pub effect: f64,
    /// Images it was queried on.
    pub images: usize,
}

/// The rank test of the secret trigger against controls of its family.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankTest {
    /// The trigger kind.
    pub kind: String,
    /// Whether the controls are drawn from the family the secret was drawn from (otherwise the
    /// p-value is not exact and `used` is not given).
    pub exchangeable: bool,
    /// Controls drawn (K).
    pub controls: usize,
    /// The secret's score.
    pub secret: TriggerScore,
    /// Each control's score, in draw order.
    pub control_scores: Vec<TriggerScore>,
    /// The secret's rank among the K + 1 (1 = first).
    pub rank: usize,
    /// (1 + controls scoring at least as high) / (K + 1).
    pub p_value: f64,
    /// Whether p ≤ alpha.
    pub rejected: bool,
    /// Images sent for the rank test: triggered images, and benign ones the margin test had not
    /// asked for.
    pub queries: usize,
}

/// UBW's prediction dispersibility of an untargeted watermark's triggered answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dispersion {
    /// Pairs whose triggered label differs from the benign one.
    pub moved: usize,
    /// Entropy (nats) of the labels they moved to.
    pub entropy: f64,
    /// The least entropy accepted: half of ln(C − 1), C the number of classes.
    pub threshold: f64,
    /// Whether the answers are dispersed enough.
    pub passed: bool,
}

/// Everything a verification found, and everything needed to reproduce it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// The conclusion.
    pub decision: Decision,
    /// Why, in one sentence.
    #[serde(default)]
    pub reason: String,
    /// Which protocol ran.
    pub protocol: String,
    /// Commitment of the secret record verified (of the trigger spent, in a release with
    /// several).
    pub commitment: String,
    /// In a release with several triggers: which one this verification spent, and the
    /// commitments that tie it to the release's published commitment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<crate::watermark::SpentTrigger>,
    /// The endpoint queried.
    pub endpoint: String,
    /// The settings.
    pub config: VerifyConfig,
    /// The margin test of the secret trigger.
    pub primary: TestResult,
    /// Other tests on the same pairs, for information (after sequential stopping they are not
    /// valid tests).
    pub secondary: Vec<TestResult>,
    /// The rank test against the family's controls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<RankTest>,
    /// The dispersion check of untargeted watermarks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispersion: Option<Dispersion>,
    /// The single control of older verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    /// Pairs tested by the margin test.
    pub pairs: usize,
    /// Images sent to the model, the controls' included.
    pub queries: usize,
    /// Every pair of the margin test, in query order.
    pub trail: Vec<PairRecord>,
}

impl Verdict {
    /// The p-value of the decision: `used` needs both the margin test and the rank test to
    /// reject, an intersection-union test whose p-value is the larger of the two (the rank
    /// test's is never below 1/(K + 1)).
    pub fn p_value(&self) -> f64 {
        match &self.rank {
            Some(r) => self.primary.p_value.max(r.p_value),
            None => self.primary.p_value,
        }
    }
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
    let nonce = hex::decode(&record.nonce)
        .map_err(|_| VerifyError::Invalid("the record's nonce is not hex".into()))?;
    let base = cfg
        .seed
        .unwrap_or_else(|| derived_seed(&nonce, "verify", 0));
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

    // 1. The margin test.
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
            let d = difference(&kind, pool.label(i), b, &w, cfg.label_only)?;
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
            fixed_tests(&kind, &trail, &benign_answers, &diffs, cfg)?
                .into_iter()
                .collect(),
        )
    } else {
        let mut t = fixed_tests(&kind, &trail, &benign_answers, &diffs, cfg)?;
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
             from a family (a fixed or crafted trigger), so this is not proof that the model was \
             trained on this release"
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
        control: None,
        pairs: trail.len(),
        queries,
        trail,
    })
}

/// The controls' specs: drawn from the record's family when it has one, otherwise (version 1
/// records, public triggers, crafted kinds) random triggers of the same kind and target.
fn controls(
    record: &SecretRecord,
    nonce: &[u8],
    cfg: &VerifyConfig,
    k: usize,
) -> Result<(Vec<WatermarkSpec>, bool), VerifyError> {
    let shape = record.dataset.shape;
    let seed = |j: usize| match cfg.seed {
        Some(s) => derived_seed(&s.to_le_bytes(), "control", j as u64),
        None => derived_seed(nonce, "control", j as u64),
    };
    match &record.family {
        Some(f) if has_exchangeable_controls(f) => {
            let drawn = (0..k)
                .map(|j| {
                    crate::spec::family::draw(f, record.dataset.num_classes, shape, seed(j))
                        .map_err(|e| VerifyError::Watermark(e.into()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((drawn, true))
        }
        _ => {
            let drawn = (0..k)
                .map(|j| {
                    let mut c = record.spec.clone();
                    c.trigger = random_trigger(&record.spec.trigger, shape, seed(j))?;
                    Ok(c)
                })
                .collect::<Result<Vec<_>, VerifyError>>()?;
            Ok((drawn, false))
        }
    }
}

/// Stamps each image with the stamp it names (an index into `stamps`). Costly stamps run on
/// tokio's blocking pool: some triggers run a network for every image (ISSBA's encoder, IAD's
/// and LIRA's generators), which must not hold up the runtime's other tasks (the service's
/// requests, a job's heartbeats); a patch, blend or warp takes microseconds and is done here.
async fn stamp_all(
    stamps: &Arc<Vec<Stamp>>,
    work: Vec<(usize, Vec<u8>)>,
) -> Result<Vec<Vec<u8>>, VerifyError> {
    let run = |stamps: &[Stamp], work: Vec<(usize, Vec<u8>)>| -> Vec<Vec<u8>> {
        work.into_iter()
            .map(|(j, mut img)| {
                stamps[j].apply(&mut img);
                img
            })
            .collect()
    };
    if !work.iter().any(|(j, _)| stamps[*j].is_costly()) {
        return Ok(run(stamps, work));
    }
    let stamps = stamps.clone();
    tokio::task::spawn_blocking(move || run(&stamps, work))
        .await
        .map_err(|e| VerifyError::Invalid(format!("stamping failed: {e}")))
}

/// Scores the secret and the K controls by successive elimination and ranks the secret.
#[allow(clippy::too_many_arguments)]
async fn rank_test(
    endpoint: &dyn ModelEndpoint,
    record: &SecretRecord,
    nonce: &[u8],
    base: u64,
    cfg: &VerifyConfig,
    order: &[usize],
    benign: &mut Benign<'_>,
    secret_stamp: &Stamp,
    secret_answers: &HashMap<usize, (String, Prediction)>,
    queries: &mut usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<RankTest, VerifyError> {
    let pool = benign.pool;
    let shape = pool.shape();
    let k = cfg.control_count();
    let (specs, exchangeable) = controls(record, nonce, cfg, k)?;
    // Trigger 0 is the secret; the procedure below never treats it apart from the others (its
    // answers already asked by the margin test are reused, which changes no score).
    let classes = record.dataset.num_classes;
    let mut kinds = vec![kind_of(&record.spec, classes)];
    for c in &specs {
        kinds.push(kind_of(c, classes));
    }
    let secret = secret_stamp.clone();
    let stamps = tokio::task::spawn_blocking(move || {
        let mut stamps = vec![secret];
        for c in &specs {
            stamps.push(Stamp::new(&c.trigger, c.seed, shape)?);
        }
        Ok::<_, WatermarkError>(stamps)
    })
    .await
    .map_err(|e| VerifyError::Invalid(format!("making the controls failed: {e}")))??;
    let stamps = Arc::new(stamps);
    let total = k + 1;
    let mut ties = Rng::new(base, Stream::Ties);
    let tie: Vec<u64> = (0..total).map(|_| ties.u64()).collect();
    // Each trigger's images: the first of the shared order its target allows.
    let mut next = vec![0usize; total];
    let mut sums = vec![0f64; total];
    let mut counts = vec![0usize; total];
    let mut reached = vec![0usize; total];
    let mut alive: Vec<usize> = (0..total).collect();
    let mut own_queries = 0usize;
    let mut round = 0usize;
    let first = cfg.first_image_count();
    let reduction = cfg.reduction_factor();
    loop {
        // More images for every remaining trigger: `first` in the first round, then one.
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(alive.len());
        for &j in &alive {
            let kind = &kinds[j];
            for _ in 0..if round == 0 { first } else { 1 } {
                let pos = (next[j]..order.len()).find(|&p| kind.allows(pool.label(order[p])));
                if let Some(p) = pos {
                    next[j] = p + 1;
                    picks.push((j, order[p]));
                }
            }
        }
        if picks.is_empty() {
            break;
        }
        let needed: Vec<usize> = picks.iter().map(|&(_, i)| i).collect();
        let sent = benign.fetch(endpoint, &needed).await?;
        *queries += sent;
        own_queries += sent;
        let to_ask: Vec<(usize, usize)> = picks
            .iter()
            .copied()
            .filter(|&(j, i)| !(j == 0 && secret_answers.contains_key(&i)))
            .collect();
        let work = to_ask
            .iter()
            .map(|&(j, i)| (j, pool.image(i).to_vec()))
            .collect();
        let images = stamp_all(&stamps, work).await?;
        let mut answers: HashMap<(usize, usize), Prediction> = HashMap::new();
        for (chunk_pairs, chunk_images) in to_ask.chunks(256).zip(images.chunks(256)) {
            let a = endpoint.predict(chunk_images, shape).await?;
            check_count(&a, chunk_images.len())?;
            own_queries += chunk_images.len();
            *queries += chunk_images.len();
            progress(*queries);
            for (&(j, i), w) in chunk_pairs.iter().zip(a) {
                answers.insert((j, i), w);
            }
        }
        for &(j, i) in &picks {
            let w = match answers.get(&(j, i)) {
                Some(w) => w,
                None => &secret_answers[&i].1,
            };
            let d = difference(
                &kinds[j],
                pool.label(i),
                &benign.answers[&i],
                w,
                cfg.label_only,
            )?;
            sums[j] += d;
            counts[j] += 1;
            reached[j] = round;
        }
        if alive.len() <= 1 {
            break;
        }
        // Keep the better 1/reduction: by mean effect, then by the drawn tie-break.
        let mean = |j: usize| sums[j] / counts[j].max(1) as f64;
        alive.sort_by(|&a, &b| {
            mean(b)
                .total_cmp(&mean(a))
                .then_with(|| tie[b].cmp(&tie[a]))
        });
        alive.truncate(alive.len().div_ceil(reduction));
        round += 1;
    }
    let score = |j: usize| TriggerScore {
        round: reached[j],
        effect: sums[j] / counts[j].max(1) as f64,
        images: counts[j],
    };
    // A control ranks above the secret when it reached a later round, or the same round with a
    // higher mean effect, or the same effect with a higher tie-break.
    let key = |j: usize| (reached[j], sums[j] / counts[j].max(1) as f64, tie[j]);
    let better = |j: usize| {
        let (a, b) = (key(j), key(0));
        a.0.cmp(&b.0)
            .then_with(|| a.1.total_cmp(&b.1))
            .then_with(|| a.2.cmp(&b.2))
            .is_ge()
    };
    let above = (1..total).filter(|&j| better(j)).count();
    let p_value = (1 + above) as f64 / total as f64;
    Ok(RankTest {
        kind: record.spec.trigger.kind().to_string(),
        exchangeable,
        controls: k,
        secret: score(0),
        control_scores: (1..total).map(score).collect(),
        rank: 1 + above,
        p_value,
        rejected: p_value <= cfg.alpha + 1e-12,
        queries: own_queries,
    })
}

/// UBW's prediction dispersibility (Li et al., NeurIPS 2022) over the secret's pairs: the entropy
/// of the labels that triggered answers moved to, among pairs whose label moved.
fn dispersion(benign: &[Prediction], triggered: &[Prediction], classes: usize) -> Dispersion {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut moved = 0usize;
    for (b, w) in benign.iter().zip(triggered) {
        if let (Some(lb), Some(lw)) = (b.label(), w.label())
            && lb != lw
        {
            moved += 1;
            *counts.entry(lw).or_default() += 1;
        }
    }
    let entropy = if moved == 0 {
        0.0
    } else {
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / moved as f64;
                -p * p.ln()
            })
            .sum()
    };
    let threshold = 0.5 * ((classes.max(2) - 1) as f64).ln();
    Dispersion {
        moved,
        entropy,
        threshold,
        passed: moved >= 2 && entropy >= threshold,
    }
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
