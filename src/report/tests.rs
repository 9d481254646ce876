//! Tests of `report`.

use super::*;
use serde_json::json;

/// A sequential verdict over `diffs`, its margin test computed by the betting test itself.
fn verdict(decision: &str, diffs: &[f64], rank: usize, endpoint: &str) -> serde_json::Value {
    let mut b = Betting::new(0.2, 0.01).unwrap();
    for &d in diffs {
        b.observe(d).unwrap();
    }
    let primary = b.result();
    let trail: Vec<_> = diffs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            json!({"index": i * 7, "label": i % 10, "benign_sha256": format!("{i:064x}"),
                "triggered_sha256": format!("{:064x}", i + 1000),
                "benign_response_sha256": format!("{:064x}", i + 2000),
                "triggered_response_sha256": format!("{:064x}", i + 3000), "difference": d})
        })
        .collect();
    let controls: Vec<_> = (0..99)
        .map(|k| json!({"round": 0, "effect": (k as f64) / 400.0, "images": 1}))
        .collect();
    json!({
        "decision": decision,
        "reason": "the reason <as written>",
        "protocol": "targeted (target 4), probabilities, sequential",
        "commitment": "ca4faa5e",
        "endpoint": endpoint,
        "config": {"m": 100, "tau": 0.2, "alpha": 0.01, "label_only": false, "sequential": true,
                   "batch_pairs": 4},
        "primary": primary,
        "secondary": [],
        "rank": {"kind": "patch", "exchangeable": true, "controls": 99,
                 "secret": {"round": 5, "effect": 0.78, "images": 6},
                 "control_scores": controls, "rank": rank, "p_value": rank as f64 / 100.0,
                 "rejected": rank == 1, "queries": 160},
        "withheld": {"benign": 1, "triggered": 7, "both": 0, "refused": 8,
                     "test": {"test": "exact McNemar", "n": 8, "statistic": 7.0, "p_value": 0.035,
                              "effect": 0.875, "ci_low": 0.5, "ci_level": 0.99, "tau": 0.5}},
        "pairs": diffs.len(),
        "queries": 200,
        "trail": trail,
    })
}

fn report(v: &serde_json::Value) -> String {
    html(v, &Context::default()).unwrap()
}

#[test]
fn a_used_verdict_reads_as_used_with_every_test_and_plot() {
    let diffs: Vec<f64> = (0..24)
        .map(|i| 0.6 + 0.3 * ((i % 5) as f64 / 4.0))
        .collect();
    let v = verdict("used", &diffs, 1, "http://models.example/v2/models/m");
    let h = report(&v);
    assert!(h.starts_with("<!DOCTYPE html>"));
    assert!(
        h.contains("evidence that it was trained on the watermarked release"),
        "{h}"
    );
    assert!(h.contains("ranks <strong>1 of 100</strong>"));
    assert!(h.contains("more than to any of 99 other triggers"));
    // With more controls, a secret ranked second may still decide: the sentence says so.
    let mut second = v.clone();
    second["rank"]["rank"] = json!(2);
    assert!(report(&second).contains("more than to all but 1 of 99 other triggers"));
    // Histogram, rank strip, evidence and withheld answers: four plots, each described.
    assert_eq!(h.matches("<svg").count(), 4);
    assert_eq!(h.matches("</svg>").count(), 4);
    assert_eq!(h.matches("role=\"img\"").count(), 4);
    assert_eq!(h.matches("<figcaption>").count(), 4);
    // Self-contained: no script, nothing fetched.
    assert!(!h.contains("<script"));
    assert!(!h.contains("src=\""));
    assert!(!h.contains("href=\"http"));
    assert!(h.contains(&format!(
        "<code id=\"verdict-sha256\">{}</code>",
        verdict_sha256(&v)
    )));
    // The first 10 pairs of 24.
    assert!(h.contains("The first 10 of 24 pairs."));
    // The wealth the plot draws ends where the test decided.
    let parsed: Verdict = serde_json::from_value(v).unwrap();
    let w = wealth_path(&parsed);
    assert_eq!(w.len(), 24);
    let end = parsed.primary.statistic;
    assert!((w[23] - end).abs() < 1e-9 * end.max(1.0));
}

#[test]
fn not_shown_and_inconclusive_say_what_they_do_not_prove() {
    let diffs = vec![0.01; 30];
    let h = report(&verdict("not_shown", &diffs, 40, "e"));
    assert!(h.contains("found no evidence"));
    assert!(h.contains("That the model was not trained on the release"));
    assert!(h.contains("class=\"decision not_shown\""));
    let h = report(&verdict("inconclusive", &diffs, 1, "e"));
    assert!(h.contains("inconclusive"));
    assert!(h.contains("class=\"decision inconclusive\""));
}

#[test]
fn a_rank_test_that_counted_scattered_answers_says_so_in_the_settings() {
    let diffs = vec![0.5; 20];
    let mut v = verdict("used", &diffs, 1, "e");
    assert!(!report(&v).contains("scattered off the true class"));
    v["config"]["rank_effect"] = json!("scattered");
    let h = report(&v);
    assert!(
        h.contains("plus triggered answers scattered off the true class"),
        "{h}"
    );
}

#[test]
fn a_margin_test_that_scored_the_true_class_says_so_in_the_settings() {
    let mut v = verdict("used", &[0.5; 20], 1, "e");
    assert!(!report(&v).contains("wherever the triggered answer went"));
    v["config"]["margin_effect"] = json!("true-class");
    let h = report(&v);
    assert!(h.contains("Margin test"), "{h}");
    assert!(
        h.contains("s loss (wherever the triggered answer went)"),
        "{h}"
    );
}

#[test]
fn a_verification_that_asked_twice_says_so_and_counts_the_unsteady_answers() {
    let mut v = verdict("used", &[0.5; 20], 1, "e");
    assert!(!report(&v).contains("Asked twice"));
    v["config"]["ask_twice"] = json!(true);
    v["echoes"] = json!(40);
    v["withheld"]["refused"] = json!(0);
    v["withheld"]["unsteady"] = json!(8);
    let h = report(&v);
    assert!(h.contains("Asked twice"), "{h}");
    assert!(h.contains("each asked again (40 echoes)"), "{h}");
    assert!(h.contains("8 named another class when asked again"), "{h}");
}

#[test]
fn what_the_verdict_holds_is_escaped() {
    let v = verdict("used", &[0.9; 10], 1, "http://x/<script>alert(1)</script>");
    let ctx = Context {
        json_link: Some("/v1/verifications/a\"b".into()),
        ..Context::default()
    };
    let h = html(&v, &ctx).unwrap();
    assert!(!h.contains("<script>"));
    assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(h.contains("the reason &lt;as written&gt;"));
    assert!(h.contains("/v1/verifications/a&quot;b"));
}

#[test]
fn the_sha256_is_of_the_verdict_whatever_its_json_spacing() {
    let v = verdict("used", &[0.9; 10], 1, "e");
    let pretty = serde_json::to_string_pretty(&v).unwrap();
    let back: serde_json::Value = serde_json::from_str(&pretty).unwrap();
    assert_eq!(verdict_sha256(&back), verdict_sha256(&v));
    let mut other = v.clone();
    other["queries"] = json!(201);
    assert_ne!(verdict_sha256(&other), verdict_sha256(&v));
}

#[test]
fn an_auditors_redacted_verdict_is_reported_without_what_it_lacks() {
    let mut v = verdict("used", &[0.9; 10], 1, "e");
    for p in v["trail"].as_array_mut().unwrap() {
        p.as_object_mut().unwrap().remove("triggered_sha256");
    }
    v.as_object_mut().unwrap().remove("withheld");
    let h = report(&v);
    assert_eq!(h.matches("<svg").count(), 3);
    assert!(!h.contains(&format!("{:064x}", 1000)));
    // Not a verdict: an error, not a panic.
    assert!(html(&json!({"decision": "used"}), &Context::default()).is_err());
}

#[test]
fn times_are_utc() {
    assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc(1_796_397_666_000), "2026-12-04T15:21:06Z");
    assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
}

#[test]
fn numbers_read_as_a_reader_expects() {
    assert_eq!(num(0.01), "0.01");
    assert_eq!(num(0.0), "0");
    assert_eq!(num(3.1e-7), "3.1 × 10<sup>-7</sup>");
    assert_eq!(num(f64::NAN), "–");
}

#[test]
fn a_verdict_as_pdf_is_a_well_formed_file_with_its_hash_on_every_page() {
    let diffs: Vec<f64> = (0..24)
        .map(|i| 0.6 + 0.3 * ((i % 5) as f64 / 4.0))
        .collect();
    let v = verdict("used", &diffs, 1, "http://models.example/v2/models/m");
    let doc = pdf(&v, &Context::default()).unwrap();
    assert!(doc.starts_with(b"%PDF-1.4\n"));
    assert!(doc.ends_with(b"%%EOF\n"));
    let text = String::from_utf8_lossy(&doc).into_owned();
    // The cross-reference table points at each object's start.
    let xref: usize = text
        .rsplit_once("startxref\n")
        .unwrap()
        .1
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Everything from the table on is ASCII.
    let table = std::str::from_utf8(&doc[xref..]).unwrap();
    assert!(table.starts_with("xref\n0 "));
    for (i, line) in table
        .lines()
        .skip(3)
        .take_while(|l| l.ends_with(" n "))
        .enumerate()
    {
        let at: usize = line[..10].parse().unwrap();
        assert!(
            doc[at..].starts_with(format!("{} 0 obj\n", i + 1).as_bytes()),
            "object {} is not at {at}",
            i + 1
        );
    }
    let pages = text.matches("/Type /Page ").count();
    assert!(pages >= 2, "{pages} pages");
    let sha = verdict_sha256(&v);
    assert!(text.matches(&format!("sha256 {sha})")).count() >= pages);
    assert!(text.contains("(Used: evidence of training on the release.)"));
    // One verdict, one file.
    assert_eq!(pdf(&v, &Context::default()).unwrap(), doc);
    // Four plots' worth of drawing: the rank strip's 99 controls are circles.
    assert!(text.matches(" c f").count() >= 99);
}

/// A model tested with two triggers of one release (`verify --trigger 1,2`): the report leads
/// with the model's decision, says why one trigger suffices at alpha / 2, tables both, and
/// carries each trigger's own report; the PDF renders the same.
#[test]
fn a_model_tested_with_two_triggers_is_reported_with_each() {
    let diffs: Vec<f64> = (0..24)
        .map(|i| 0.6 + 0.3 * ((i % 5) as f64 / 4.0))
        .collect();
    let mut first = verdict("used", &diffs, 1, "e");
    first["trigger"] = json!({"number": 1, "of": 2, "release_commitment": "ab", "commitments": []});
    let mut second = verdict("not_shown", &[0.01; 30], 13, "e");
    second["trigger"] =
        json!({"number": 2, "of": 2, "release_commitment": "ab", "commitments": []});
    for v in [&mut first, &mut second] {
        v["config"]["alpha"] = json!(0.005);
    }
    let combined = json!({"decision": "used", "p_value": 0.01, "alpha": 0.01, "queries": 400,
                          "verdicts": [first, second]});
    let h = report(&combined);
    assert!(h.contains("class=\"decision used\""), "{h}");
    assert!(
        h.contains("tested with 2 secret triggers of the release, chosen before verifying, each at alpha 0.005 = 0.01 / 2; trigger 1 found evidence"),
        "{h}"
    );
    assert!(h.contains("<h2>Trigger 1: Used: evidence of training on the release</h2>"));
    assert!(h.contains("<h2>Trigger 2: Not shown: no evidence of training on the release</h2>"));
    assert!(h.contains("<td>13 of 100</td>"), "{h}");
    // Both triggers' plots.
    assert_eq!(h.matches("<svg").count(), 8);
    assert!(h.contains(&verdict_sha256(&combined)));
    let doc = pdf(&combined, &Context::default()).unwrap();
    assert!(doc.ends_with(b"%%EOF\n"));
    // Neither kind of verdict is taken for the other.
    let mut broken = combined.clone();
    broken["verdicts"] = json!("none");
    assert!(html(&broken, &Context::default()).is_err());
}
