//! Hypothesis tests for ownership verification. Every test is one-sided: H1 says the watermark
//! lifts the model's response by more than a margin `tau`.
//!
//! - [`paired_t`]: DVBW / UBW's probability test (Li et al., TIFS 2023; NeurIPS 2022), SciPy's
//!   `ttest_rel(P_w, P_b + tau, alternative='greater')`.
//! - [`wilcoxon`]: signed-rank test of the same differences, exact for small n.
//! - [`binomial`] and [`mcnemar`]: exact tests for label-only outcomes.
//! - [`Betting`]: an anytime-valid sequential test (testing by betting, Waudby-Smith & Ramdas,
//!   JRSS-B 2023) that may stop after any pair with its false-positive rate still at most alpha.
//!
//! Each returns the statistic, p-value, effect size and a one-sided lower confidence bound at
//! level 1 − alpha, the interval that matches a one-sided test: it lies above `tau` exactly when
//! the test rejects at alpha.

mod betting;
mod rank;

pub use betting::{Betting, BettingStep};
pub use rank::wilcoxon;

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};
use statrs::function::beta::beta_reg;

/// Why a test cannot be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    /// Too few observations.
    #[error("{test} needs at least {need} observations, got {got}")]
    TooFew {
        /// Which test.
        test: &'static str,
        /// Minimum.
        need: usize,
        /// Given.
        got: usize,
    },
    /// A value is not finite or out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The outcome of a one-sided test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// Name of the test.
    pub test: String,
    /// Observations used.
    pub n: usize,
    /// Test statistic (t, R+, successes, or wealth).
    pub statistic: f64,
    /// One-sided p-value in [0, 1].
    pub p_value: f64,
    /// Effect size: mean difference, Hodges–Lehmann estimate, or proportion.
    pub effect: f64,
    /// One-sided lower confidence bound for the effect at `ci_level`.
    pub ci_low: f64,
    /// Confidence level of `ci_low` (1 − alpha).
    pub ci_level: f64,
    /// The margin of the null hypothesis (effect ≤ tau).
    pub tau: f64,
}

impl TestResult {
    /// Whether H0 is rejected at `alpha`.
    pub fn rejects(&self, alpha: f64) -> bool {
        self.p_value < alpha
    }
}

fn check(values: &[f64], test: &'static str, need: usize) -> Result<(), StatsError> {
    if values.len() < need {
        return Err(StatsError::TooFew {
            test,
            need,
            got: values.len(),
        });
    }
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(StatsError::Invalid(format!(
            "{test}: observation {v} is not finite"
        )));
    }
    Ok(())
}

fn check_alpha(alpha: f64) -> Result<(), StatsError> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(StatsError::Invalid(format!(
            "alpha must be in (0, 1), got {alpha}"
        )))
    }
}

/// One-sided one-sample t-test of the paired differences `d`: H0 mean(d) ≤ tau, H1 mean(d) > tau.
///
/// When every difference is equal the standard error is 0; SciPy returns NaN there, this returns
/// p = 0 if the mean exceeds tau and p = 1 otherwise, which is the limit of the test.
pub fn paired_t(d: &[f64], tau: f64, alpha: f64) -> Result<TestResult, StatsError> {
    check(d, "paired t-test", 2)?;
    check_alpha(alpha)?;
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let se = (var / n).sqrt();
    let t_dist = StudentsT::new(0.0, 1.0, n - 1.0).expect("df >= 1");
    let (statistic, p_value, ci_low) = if se > 0.0 {
        let t = (mean - tau) / se;
        // sf(t) = cdf(−t) keeps small p-values accurate.
        (
            t,
            t_dist.cdf(-t),
            mean - t_dist.inverse_cdf(1.0 - alpha) * se,
        )
    } else {
        let p = if mean > tau { 0.0 } else { 1.0 };
        (if mean > tau { f64::MAX } else { f64::MIN }, p, mean)
    };
    Ok(TestResult {
        test: "paired t-test".into(),
        n: d.len(),
        statistic,
        p_value: p_value.clamp(0.0, 1.0),
        effect: mean,
        ci_low,
        ci_level: 1.0 - alpha,
        tau,
    })
}

/// P(X ≥ k) for X ~ Binomial(n, p), exact (regularised incomplete beta).
pub fn binomial_sf(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        1.0
    } else if k > n || p <= 0.0 {
        0.0
    } else if p >= 1.0 {
        1.0
    } else {
        beta_reg(k as f64, (n - k + 1) as f64, p)
    }
}

/// Exact one-sided binomial test: `k` successes in `n`, H0 p ≤ p0, H1 p > p0. The bound is
/// Clopper–Pearson's.
pub fn binomial(k: u64, n: u64, p0: f64, alpha: f64) -> Result<TestResult, StatsError> {
    check_alpha(alpha)?;
    if n == 0 {
        return Err(StatsError::TooFew {
            test: "binomial test",
            need: 1,
            got: 0,
        });
    }
    if k > n || !(0.0..=1.0).contains(&p0) {
        return Err(StatsError::Invalid(format!(
            "binomial test: k = {k}, n = {n}, p0 = {p0}"
        )));
    }
    let ci_low = if k == 0 {
        0.0
    } else {
        beta_quantile(alpha, k as f64, (n - k + 1) as f64)
    };
    Ok(TestResult {
        test: "exact binomial test".into(),
        n: n as usize,
        statistic: k as f64,
        p_value: binomial_sf(k, n, p0).clamp(0.0, 1.0),
        effect: k as f64 / n as f64,
        ci_low,
        ci_level: 1.0 - alpha,
        tau: p0,
    })
}

/// Exact one-sided McNemar test on paired binary outcomes: `n01` pairs hit only when triggered,
/// `n10` only when benign. H0: triggering does not raise the hit rate. The effect is the
/// difference in hit rates over all `n_pairs` pairs.
pub fn mcnemar(n01: u64, n10: u64, n_pairs: u64, alpha: f64) -> Result<TestResult, StatsError> {
    check_alpha(alpha)?;
    if n01 + n10 > n_pairs || n_pairs == 0 {
        return Err(StatsError::Invalid(format!(
            "McNemar: {n01} + {n10} discordant pairs of {n_pairs}"
        )));
    }
    let n = n01 + n10;
    let p_value = if n == 0 {
        1.0
    } else {
        binomial_sf(n01, n, 0.5)
    };
    Ok(TestResult {
        test: "exact McNemar test".into(),
        n: n_pairs as usize,
        statistic: n01 as f64,
        p_value,
        effect: (n01 as f64 - n10 as f64) / n_pairs as f64,
        ci_low: f64::NAN,
        ci_level: 1.0 - alpha,
        tau: 0.0,
    })
    .map(|mut r| {
        // Lower bound for the rate difference from the conditional (Clopper–Pearson) bound on
        // the share of discordant pairs that favour the trigger.
        r.ci_low = if n == 0 {
            0.0
        } else {
            let q = if n01 == 0 {
                0.0
            } else {
                beta_quantile(alpha, n01 as f64, (n - n01 + 1) as f64)
            };
            (2.0 * q - 1.0) * n as f64 / n_pairs as f64
        };
        r
    })
}

/// Quantile of the Beta(a, b) distribution by bisection on the regularised incomplete beta
/// (monotone, so bisection is exact to the last bits).
pub(crate) fn beta_quantile(p: f64, a: f64, b: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_reg(a, b, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests;
