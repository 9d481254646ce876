//! Wilcoxon signed-rank test (one-sided, H1: the differences are shifted above tau), with the
//! Hodges–Lehmann estimate and its distribution-free lower confidence bound.
//!
//! As SciPy's `wilcoxon(d - tau, alternative='greater')`: zero differences are dropped
//! (`zero_method='wilcox'`); the exact null distribution is used when at most 50 differences
//! remain and none were zero or tied, otherwise the normal approximation with the tie correction
//! of the variance and a continuity correction of 0.5 (SciPy's `correction=True`).

use super::{StatsError, TestResult, check, check_alpha};
use statrs::distribution::{ContinuousCDF, Normal};

const EXACT_MAX: usize = 50;

/// Wilcoxon signed-rank test of H0: the differences `d` are symmetric about a value ≤ tau.
pub fn wilcoxon(d: &[f64], tau: f64, alpha: f64) -> Result<TestResult, StatsError> {
    check(d, "Wilcoxon signed-rank test", 1)?;
    check_alpha(alpha)?;
    let x: Vec<f64> = d.iter().map(|v| v - tau).filter(|v| *v != 0.0).collect();
    let zeros = d.len() - x.len();
    let n = x.len();
    let (ranks, tie_term) = abs_ranks(&x);
    let r_plus: f64 = x
        .iter()
        .zip(&ranks)
        .filter(|(v, _)| **v > 0.0)
        .map(|(_, r)| r)
        .sum();
    let exact = n <= EXACT_MAX && zeros == 0 && tie_term == 0.0;
    let p_value = if n == 0 {
        1.0
    } else if exact {
        let counts = signed_rank_counts(n);
        let total: f64 = counts.iter().sum();
        let k = r_plus.round() as usize;
        counts[k.min(counts.len())..].iter().sum::<f64>() / total
    } else {
        let nf = n as f64;
        let mean = nf * (nf + 1.0) / 4.0;
        let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term / 48.0;
        if var <= 0.0 {
            if r_plus > mean { 0.0 } else { 1.0 }
        } else {
            let z = (r_plus - mean - 0.5) / var.sqrt();
            Normal::standard().cdf(-z)
        }
    };
    let (effect, ci_low) = hodges_lehmann(d, alpha);
    Ok(TestResult {
        test: if exact {
            "Wilcoxon signed-rank (exact)"
        } else {
            "Wilcoxon signed-rank (normal approximation)"
        }
        .into(),
        n: d.len(),
        statistic: r_plus,
        p_value: p_value.clamp(0.0, 1.0),
        effect,
        ci_low,
        ci_level: 1.0 - alpha,
        tau,
    })
}

/// Average ranks of |x| (1-based) and the tie term Σ(t³ − t) over groups of tied values.
fn abs_ranks(x: &[f64]) -> (Vec<f64>, f64) {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()));
    let mut ranks = vec![0.0; x.len()];
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && x[order[j]].abs() == x[order[i]].abs() {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0;
        order[i..j].iter().for_each(|&k| ranks[k] = avg);
        let t = (j - i) as f64;
        tie_term += t * t * t - t;
        i = j;
    }
    (ranks, tie_term)
}

/// Number of subsets of {1..n} with each rank sum: the exact null distribution of R+ times 2^n.
fn signed_rank_counts(n: usize) -> Vec<f64> {
    let max = n * (n + 1) / 2;
    let mut c = vec![0f64; max + 1];
    c[0] = 1.0;
    for k in 1..=n {
        for s in (k..=max).rev() {
            c[s] += c[s - k];
        }
    }
    c
}

/// Hodges–Lehmann estimate (median of the Walsh averages) and the one-sided lower confidence
/// bound W_(M − c + 1), c the critical value of R+ at alpha over all n differences.
fn hodges_lehmann(d: &[f64], alpha: f64) -> (f64, f64) {
    let n = d.len();
    let mut w: Vec<f64> = Vec::with_capacity(n * (n + 1) / 2);
    for i in 0..n {
        for j in i..n {
            w.push((d[i] + d[j]) / 2.0);
        }
    }
    // Order statistics by selection: O(n²), where sorting the n(n+1)/2 averages is O(n² log n).
    let m = w.len();
    let kth = |w: &mut Vec<f64>, k: usize| *w.select_nth_unstable_by(k, f64::total_cmp).1;
    let median = if m % 2 == 1 {
        kth(&mut w, m / 2)
    } else {
        let hi = kth(&mut w, m / 2);
        // After selecting m/2, everything before it is smaller: the lower middle is their max.
        let lo = w[..m / 2].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo + hi) / 2.0
    };
    // c = the smallest k with P(R+ ≥ k) ≤ alpha.
    let c = if n <= EXACT_MAX {
        let counts = signed_rank_counts(n);
        let total: f64 = counts.iter().sum();
        let mut tail = 0.0;
        let mut c = m + 1;
        for k in (0..=m).rev() {
            tail += counts[k] / total;
            if tail > alpha {
                break;
            }
            c = k;
        }
        c
    } else {
        let nf = n as f64;
        let mean = nf * (nf + 1.0) / 4.0;
        let sd = (nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0).sqrt();
        ((mean + Normal::standard().inverse_cdf(1.0 - alpha) * sd + 0.5).ceil() as usize).min(m + 1)
    };
    let low = if c > m {
        f64::NEG_INFINITY
    } else {
        kth(&mut w, m - c)
    };
    (median, low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_distribution_has_the_right_total_and_symmetry() {
        let c = signed_rank_counts(10);
        assert_eq!(c.iter().sum::<f64>(), 1024.0);
        assert_eq!(c[0], c[55]);
        assert_eq!(c[1], 1.0);
        assert_eq!(c[3], 2.0); // {3}, {1, 2}
    }

    #[test]
    fn ties_get_average_ranks() {
        let (r, t) = abs_ranks(&[1.0, -1.0, 2.0]);
        assert_eq!(r, vec![1.5, 1.5, 3.0]);
        assert_eq!(t, 6.0);
    }

    #[test]
    fn hodges_lehmann_is_the_median_of_walsh_averages() {
        let (m, low) = hodges_lehmann(&[1.0, 2.0, 3.0], 0.2);
        assert_eq!(m, 2.0);
        assert!(low <= m);
    }
}
