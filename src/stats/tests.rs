//! Tests of `stats`.

use super::*;
use proptest::prelude::*;
use serde_json::Value;

fn fixtures() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/stats_scipy.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The cases under `key`: at least five of them, so that a fixture emptied or renamed by mistake
/// fails the test instead of leaving its loop with nothing to check.
fn cases<'a>(f: &'a Value, key: &str) -> &'a [Value] {
    let cases = f[key]
        .as_array()
        .unwrap_or_else(|| panic!("stats_scipy.json has no {key}"));
    assert!(
        cases.len() >= 5,
        "stats_scipy.json: {} cases of {key}",
        cases.len()
    );
    cases
}

fn close(a: f64, b: f64, rel: f64, what: &str) {
    let tol = rel * b.abs().max(1e-300);
    assert!(
        (a - b).abs() <= tol.max(1e-15),
        "{what}: {a} vs SciPy {b} (rel {rel})"
    );
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn paired_t_matches_scipy() {
    let f = fixtures();
    for c in cases(&f, "ttest") {
        let r = paired_t(
            &floats(&c["d"]),
            c["tau"].as_f64().unwrap(),
            c["alpha"].as_f64().unwrap(),
        )
        .unwrap();
        close(r.statistic, c["statistic"].as_f64().unwrap(), 1e-9, "t");
        close(r.p_value, c["pvalue"].as_f64().unwrap(), 1e-9, "t p-value");
        close(
            r.ci_low,
            c["ci_low"].as_f64().unwrap(),
            1e-9,
            "t lower bound",
        );
    }
}

#[test]
fn wilcoxon_matches_scipy() {
    let f = fixtures();
    for (key, rel) in [("wilcoxon_exact", 1e-9), ("wilcoxon_approx", 1e-6)] {
        for c in cases(&f, key) {
            let r = wilcoxon(&floats(&c["d"]), c["tau"].as_f64().unwrap(), 0.01).unwrap();
            assert_eq!(
                r.test.contains("exact"),
                key == "wilcoxon_exact",
                "{key}: {}",
                r.test
            );
            close(r.statistic, c["statistic"].as_f64().unwrap(), 1e-12, key);
            close(r.p_value, c["pvalue"].as_f64().unwrap(), rel, key);
        }
    }
}

#[test]
fn binomial_and_mcnemar_match_scipy() {
    let f = fixtures();
    for c in cases(&f, "binomial") {
        let r = binomial(
            c["k"].as_u64().unwrap(),
            c["n"].as_u64().unwrap(),
            c["p0"].as_f64().unwrap(),
            c["alpha"].as_f64().unwrap(),
        )
        .unwrap();
        close(r.p_value, c["pvalue"].as_f64().unwrap(), 1e-9, "binomial p");
        close(
            r.ci_low,
            c["ci_low"].as_f64().unwrap(),
            1e-9,
            "Clopper-Pearson",
        );
    }
    for c in cases(&f, "mcnemar") {
        let (a, b) = (c["n01"].as_u64().unwrap(), c["n10"].as_u64().unwrap());
        let r = mcnemar(a, b, a + b + 5, 0.01).unwrap();
        close(r.p_value, c["pvalue"].as_f64().unwrap(), 1e-9, "McNemar");
    }
}

#[test]
fn constant_differences_give_the_limit_not_nan() {
    assert_eq!(paired_t(&[0.9; 5], 0.2, 0.01).unwrap().p_value, 0.0);
    assert_eq!(paired_t(&[0.1; 5], 0.2, 0.01).unwrap().p_value, 1.0);
    assert!(paired_t(&[0.5], 0.2, 0.01).is_err());
    assert!(paired_t(&[0.5, f64::NAN], 0.2, 0.01).is_err());
}

#[test]
fn betting_rejects_a_strong_watermark_within_a_few_dozen_pairs() {
    let mut b = Betting::new(0.2, 0.01).unwrap();
    let mut steps = 0;
    for i in 0.. {
        let s = b.observe(if i % 10 == 3 { 0.6 } else { 0.97 }).unwrap();
        steps = s.n;
        if s.rejected {
            break;
        }
        assert!(i < 100, "never rejected");
    }
    assert!(steps <= 20, "{steps} pairs");
    assert!(b.p_value() <= 0.01);
}

/// Draws from a three-point distribution on {−1, tau', 1} with mean exactly `mean`.
fn null_draw(rng: &mut crate::watermark::rng::Rng, mean: f64, mass_at_bounds: f64) -> f64 {
    let u = rng.unit_f32() as f64;
    if u < mass_at_bounds {
        // ±1 with P(+1) = (1 + mean)/2 keeps the mean.
        if (rng.unit_f32() as f64) < (1.0 + mean) / 2.0 {
            1.0
        } else {
            -1.0
        }
    } else {
        mean
    }
}

#[test]
fn betting_keeps_its_false_positive_rate_under_the_null_at_any_stop() {
    use crate::watermark::rng::{Rng, Stream};
    // 2,000 seeded runs of 500 pairs each at the boundary null E[D] = tau, heavy point masses at
    // the bounds; a run counts as a false positive if it ever rejects.
    let (runs, alpha) = (2000, 0.01);
    let mut false_positives = 0;
    for seed in 0..runs {
        let mut rng = Rng::new(seed, Stream::Pattern);
        let mut b = Betting::new(0.2, alpha).unwrap();
        for _ in 0..500 {
            if b.observe(null_draw(&mut rng, 0.2, 0.8)).unwrap().rejected {
                false_positives += 1;
                break;
            }
        }
    }
    // Binomial(2000, 0.01) has mean 20; its 99.9% upper point is 36.
    assert!(
        false_positives <= 36,
        "{false_positives} of {runs} runs rejected a true null"
    );
}

#[test]
fn fixed_tests_reject_at_about_alpha_under_a_simulated_null() {
    use crate::watermark::rng::{Rng, Stream};
    let (runs, alpha, m) = (2000u64, 0.01, 30);
    let (mut t_rej, mut w_rej) = (0, 0);
    for seed in 0..runs {
        let mut rng = Rng::new(seed, Stream::Labels);
        // Normal-ish differences with mean exactly tau (sum of uniforms).
        let d: Vec<f64> = (0..m)
            .map(|_| 0.2 + (0..6).map(|_| rng.unit_f32() as f64 - 0.5).sum::<f64>() * 0.2)
            .collect();
        t_rej += paired_t(&d, 0.2, alpha).unwrap().rejects(alpha) as u32;
        w_rej += wilcoxon(&d, 0.2, alpha).unwrap().rejects(alpha) as u32;
    }
    // The binomial(2000, 0.01) 99.9% band is [7, 36].
    for (name, r) in [("t", t_rej), ("wilcoxon", w_rej)] {
        assert!((7..=36).contains(&r), "{name}: {r} rejections of {runs}");
    }
}

#[test]
fn the_exact_binomial_test_never_rejects_more_often_than_alpha_under_the_null() {
    use crate::watermark::rng::{Rng, Stream};
    // Successes with probability exactly p0 = tau; an exact test of discrete data is
    // conservative, so only the upper end of the 99.9% band applies.
    let (runs, alpha, n) = (2000u64, 0.01, 60);
    let mut rejections = 0;
    for seed in 0..runs {
        let mut rng = Rng::new(seed, Stream::Noise);
        let k = (0..n).filter(|_| (rng.unit_f32() as f64) < 0.2).count() as u64;
        rejections += binomial(k, n, 0.2, alpha).unwrap().rejects(alpha) as u32;
    }
    assert!(rejections <= 36, "{rejections} of {runs}");
}

proptest! {
    #[test]
    fn p_values_lie_in_the_unit_interval(d in proptest::collection::vec(-1.0f64..1.0, 2..60), tau in 0.0f64..0.5, k in 0u64..50, extra in 0u64..50) {
        for r in [paired_t(&d, tau, 0.01).unwrap(), wilcoxon(&d, tau, 0.01).unwrap(), binomial(k, k + extra + 1, tau, 0.01).unwrap(),
                  mcnemar(k, extra, k + extra + 1, 0.01).unwrap()] {
            prop_assert!((0.0..=1.0).contains(&r.p_value), "{}: {}", r.test, r.p_value);
        }
        let mut b = Betting::new(tau, 0.01).unwrap();
        for x in &d {
            let s = b.observe(*x).unwrap();
            prop_assert!((0.0..=1.0).contains(&s.p_value) && s.wealth >= 0.0);
        }
    }
}
