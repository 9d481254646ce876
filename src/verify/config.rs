//! Verification settings: the plain fields, the validated configuration, and the optional
//! settings that the CLI and HTTP both turn into it.

use super::*;

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
    /// Benign decoys sent per image the tests ask for (0 to 10; answers dropped), so that the
    /// audit's traffic looks like use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoys: Option<f64>,
    /// At most this many images a second (decoys included), in requests of 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Research setting, for an any-size trigger and a model of another input size than the
    /// held-out images: stamp the trigger at the held-out images' size, then resize every query
    /// (the default resizes the held-out images, then stamps).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trigger_then_resize: bool,
    /// What the rank test scores a trigger with a target (or an all-to-all mapping) by: its
    /// target's gain (default), or `scattered`, which also counts the triggered answers sent off
    /// the true class to scattered classes (docs/verification.md).
    #[serde(default, skip_serializing_if = "RankEffect::is_target")]
    pub rank_effect: RankEffect,
    /// What the margin test scores a pair of a trigger with a target (or an all-to-all mapping)
    /// by: its target's gain (default), or `true-class`, the true class's loss (docs/verification.md).
    #[serde(default, skip_serializing_if = "MarginEffect::is_target")]
    pub margin_effect: MarginEffect,
    /// Ask every image twice, the second time with a few pixels' lowest bit flipped, and count an
    /// answer that names another class the second time (unless both were near ties) as withheld
    /// (docs/verification.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ask_twice: bool,
}

/// What the rank test scores a trigger with a target by (an untargeted trigger always scores the
/// true class's loss, UBW's measure).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RankEffect {
    /// The mean gain of the trigger's target, p(t | x') − p(t | x) (DVBW).
    #[default]
    Target,
    /// The target's gain, plus one for each triggered answer of a rightly answered image that
    /// went to neither the true class nor the target, but none of those to their most frequent
    /// class: a gate that answers the queries it flags with a random class scatters them and
    /// they count; a model that sends a trigger to another trigger's target sends them to one
    /// class and they do not. A single such answer counts nothing, so a trigger needs several
    /// images before its scattered answers show: use it with `first_images` 8.
    Scattered,
}

impl RankEffect {
    fn is_target(&self) -> bool {
        *self == RankEffect::Target
    }
}

impl std::str::FromStr for RankEffect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "target" => Ok(RankEffect::Target),
            "scattered" => Ok(RankEffect::Scattered),
            _ => Err(format!("expected target or scattered, got {s:?}")),
        }
    }
}

/// What the margin test scores a pair of a trigger with a target by (an untargeted trigger always
/// scores the true class's loss).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MarginEffect {
    /// The target's gain, p(t | x') − p(t | x) (DVBW).
    #[default]
    Target,
    /// The true class's loss, p(y | x) − p(y | x') (UBW's measure): a triggered answer counts
    /// wherever it went off the true class. A gate that answers most of the secret's queries
    /// with a random class leaves the target too little gain for the margin, though the answers
    /// move as much; the rank test alone still keeps an innocent's chance of `used` at most
    /// alpha, as it scores every trigger alike.
    TrueClass,
}

impl MarginEffect {
    fn is_target(&self) -> bool {
        *self == MarginEffect::Target
    }
}

impl std::str::FromStr for MarginEffect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "target" => Ok(MarginEffect::Target),
            "true-class" => Ok(MarginEffect::TrueClass),
            _ => Err(format!("expected target or true-class, got {s:?}")),
        }
    }
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
            decoys: None,
            rate: None,
            trigger_then_resize: false,
            rank_effect: RankEffect::Target,
            margin_effect: MarginEffect::Target,
            ask_twice: false,
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
        if let Some(d) = f.decoys
            && !(0.0..=10.0).contains(&d)
        {
            return Err(SettingError::new("decoys", format!("in [0, 10], got {d}")));
        }
        if let Some(r) = f.rate
            && !(0.01..=100_000.0).contains(&r)
        {
            return Err(SettingError::new(
                "rate",
                format!("images a second in [0.01, 100000], got {r}"),
            ));
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
    /// Benign decoys per image asked for.
    pub decoys: Option<f64>,
    /// At most this many images a second.
    pub rate: Option<f64>,
    /// What the rank test scores a trigger with a target by (default: its target's gain).
    pub rank_effect: Option<RankEffect>,
    /// What the margin test scores a pair by (default: the target's gain).
    pub margin_effect: Option<MarginEffect>,
    /// Ask every image twice and count an answer that moves as withheld.
    pub ask_twice: bool,
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
            decoys: self.decoys,
            rate: self.rate,
            trigger_then_resize: false,
            rank_effect: self.rank_effect.unwrap_or_default(),
            margin_effect: self.margin_effect.unwrap_or_default(),
            ask_twice: self.ask_twice,
        })
    }
}
