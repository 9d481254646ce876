//! What a verification concludes: the decision, the tests behind it, and the audit trail.

use super::*;

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

    /// The decision about a model verified with several triggers of one release, each at
    /// alpha / k: `used` when any trigger's is, else `inconclusive` when any is, else
    /// `not_shown` (see [`CombinedVerdict`]).
    pub fn of_any(decisions: impl IntoIterator<Item = Self>) -> Self {
        decisions
            .into_iter()
            .fold(Self::NotShown, |acc, d| match (acc, d) {
                (Self::Used, _) | (_, Self::Used) => Self::Used,
                (Self::Inconclusive, _) | (_, Self::Inconclusive) => Self::Inconclusive,
                _ => Self::NotShown,
            })
    }
}

/// The Bonferroni-adjusted p-value of k tests of one hypothesis: the smallest p-value times k,
/// at most 1 (at most alpha exactly when some test rejected at alpha / k).
pub fn bonferroni(p_values: &[f64]) -> f64 {
    let k = p_values.len() as f64;
    (p_values.iter().copied().fold(1.0_f64, f64::min) * k).min(1.0)
}

/// A model verified on one endpoint with k triggers of one release (chosen before verifying),
/// each at alpha / k: it is accused when any trigger's verdict is `used`, so an innocent model
/// is accused with probability at most alpha whatever the dependence between the triggers'
/// verdicts (Bonferroni's inequality). A release with triggers of several families
/// (`hallmark watermark --also-spec`) is verified this way, so that a defence that removed one
/// watermark does not decide the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CombinedVerdict {
    /// The conclusion about the model ([`Decision::of_any`]).
    pub decision: Decision,
    /// The smallest of the triggers' p-values times k, at most 1 ([`bonferroni`]).
    pub p_value: f64,
    /// The model's significance level; each trigger was verified at alpha / k.
    pub alpha: f64,
    /// Images sent to the model, every trigger's together (benign decoys not counted, as in
    /// [`Verdict::queries`]).
    pub queries: usize,
    /// Each trigger's verdict, in the order verified.
    pub verdicts: Vec<Verdict>,
}

impl CombinedVerdict {
    /// Combines the verdicts of the triggers chosen for one model, verified at alpha / k each.
    pub fn new(alpha: f64, verdicts: Vec<Verdict>) -> Self {
        let p: Vec<f64> = verdicts.iter().map(Verdict::p_value).collect();
        Self {
            decision: Decision::of_any(verdicts.iter().map(|v| v.decision)),
            p_value: bonferroni(&p),
            alpha,
            queries: verdicts.iter().map(|v| v.queries).sum(),
            verdicts,
        }
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
    /// sha256 of the triggered image's pixels (absent where the verdict is shown to anyone but
    /// the watermark's owner).
    #[serde(default)]
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
    /// The controls that rank at or above the secret, best first, by their draw index (control
    /// j of `hallmark spec controls`): which members of the family moved the model as far.
    #[serde(default)]
    pub above: Vec<usize>,
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

/// Answers withheld among the margin test's pairs: a gate in front of the model refused the
/// request or flattened the answer. A withheld triggered answer with its benign twin answered
/// counts as the largest effect (1), for the secret and for every control alike, so a gate that
/// withholds what it finds suspicious gives evidence instead of ending the verification; a
/// withheld benign answer makes its pair count 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Withheld {
    /// Pairs whose benign answer was withheld.
    pub benign: usize,
    /// Pairs whose triggered answer was withheld.
    pub triggered: usize,
    /// Pairs with both withheld.
    pub both: usize,
    /// Withheld answers refused with an HTTP status (the rest were flattened or unsteady).
    pub refused: usize,
    /// Withheld answers that were unsteady: asked twice, the server named two classes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unsteady: usize,
    /// Exact McNemar test that triggered answers are withheld more often than benign ones
    /// (reported beside the decision, which already counts withheld answers through the margin
    /// and rank tests).
    pub test: crate::stats::TestResult,
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
    /// Answers the endpoint withheld (refused or flattened) among the margin test's pairs, when
    /// it withheld any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<Withheld>,
    /// The single control of older verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    /// Pairs tested by the margin test.
    pub pairs: usize,
    /// Images sent to the model, the controls' included.
    pub queries: usize,
    /// Benign decoys sent besides (their answers unused).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub decoys: usize,
    /// Echoes sent besides: with `ask_twice`, every image again with a few pixels one grey level
    /// off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub echoes: usize,
    /// Every pair of the margin test, in query order.
    pub trail: Vec<PairRecord>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
