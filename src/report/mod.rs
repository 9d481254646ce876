//! Verdict reports: one self-contained HTML document (inline CSS and SVG plots, no script, no
//! external resource) that puts a verification's verdict before a reader who is not a
//! statistician: the decision in one sentence, what it proves and what it does not, the
//! commitment, the settings, every test, plots of the evidence and a digest of the audit trail.
//! `hallmark report` and `GET /v1/verifications/{id}/report` build the same document from the
//! same verdict; it prints the sha256 of the verdict's canonical JSON, so a reader can tie the
//! document to the JSON it summarises.

mod plot;
mod svg;

use crate::stats::{Betting, TestResult};
use crate::verify::{Decision, Verdict};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt::Write;

/// Facts about a verdict that the verdict itself does not hold: where it came from.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The verification's id in the service, if it has one.
    pub verification_id: Option<String>,
    /// When the verification finished (RFC 3339), if known.
    pub finished_at: Option<String>,
    /// When the secret record was imported into the service (RFC 3339), if known.
    pub record_imported_at: Option<String>,
    /// Where the full verdict JSON is: a URL or a file name.
    pub json_link: Option<String>,
}

/// sha256 (hex) of a verdict's canonical JSON (keys sorted, no whitespace), as the reader holds
/// it: the file `hallmark verify --report` wrote, or the `verdict` of a verification from the
/// service (redacted for an auditor: then of what the auditor sees). One verdict gives one hash
/// however its JSON is spaced or ordered.
pub fn verdict_sha256(verdict: &serde_json::Value) -> String {
    let json = serde_json::to_vec(verdict).expect("JSON values serialise");
    hex::encode(Sha256::digest(json))
}

/// Unix milliseconds as an RFC 3339 UTC time, `2026-12-04T15:21:06Z` (Hinnant's days-to-civil
/// algorithm).
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Why a JSON value cannot be reported.
#[derive(Debug, thiserror::Error)]
#[error("not a hallmark verdict: {0}")]
pub struct NotAVerdict(#[from] serde_json::Error);

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A p-value or small number as a reader expects it: 0.0042, 3.1 × 10⁻⁷.
fn num(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    if x == 0.0 || (1e-3..1e4).contains(&x.abs()) {
        return format!("{}", (x * 10_000.0).round() / 10_000.0);
    }
    let e = x.abs().log10().floor() as i32;
    let m = x / 10f64.powi(e);
    format!("{m:.1} × 10<sup>{e}</sup>")
}

/// The decision in one sentence, for a reader who is not a statistician.
pub fn headline(v: &Verdict) -> String {
    match v.decision {
        Decision::Used => format!(
            "The model reacts to this release's secret trigger as only a model trained on the \
             release is expected to, and more than to {} drawn at random: this is evidence that \
             it was trained on the watermarked release (the chance of so strong a result for a \
             model that was not is at most {}).",
            match &v.rank {
                Some(r) if r.rank > 1 => format!(
                    "all but {} of {} other triggers of the same family",
                    r.rank - 1,
                    r.controls
                ),
                Some(r) => format!("any of {} other triggers of the same family", r.controls),
                None => "triggers of the same family".to_string(),
            },
            num(v.p_value())
        ),
        Decision::NotShown => "The verification found no evidence that the model was trained on \
                               the watermarked release."
            .to_string(),
        Decision::Inconclusive => "The model reacts to the trigger, but the trigger is public or \
                                   crafted, so its reaction does not single out this release: \
                                   the result is inconclusive."
            .to_string(),
    }
}

/// What the verdict proves and what it does not, as bullet points.
pub fn meaning(v: &Verdict) -> (Vec<String>, Vec<String>) {
    let alpha = v.config.alpha;
    let tau = v.config.tau;
    let mut proves = Vec::new();
    let mut not = Vec::new();
    match v.decision {
        Decision::Used => {
            proves.push(format!(
                "The secret trigger changes the model's answers by more than the margin {tau} \
                 allowed to any model (margin test, p = {}).",
                num(v.primary.p_value)
            ));
            if let Some(r) = &v.rank {
                proves.push(format!(
                    "The secret trigger ranks {} of {} among triggers of its family: a model not \
                     trained on this release could not tell the secret from the others, so it \
                     would rank anywhere with equal chance (rank test, p = {}).",
                    r.rank,
                    r.controls + 1,
                    num(r.p_value)
                ));
            }
            proves.push(format!(
                "Both tests had to agree; the chance that a model not trained on the release is \
                 declared to be is at most alpha = {alpha}, whatever the seed or order chosen."
            ));
            not.push(
                "Who trained the model, or when; only that its training data included this \
                 release's poisoned samples."
                    .into(),
            );
            not.push(
                "How much of the release was used: a few percent of it can suffice to carry the \
                 watermark."
                    .into(),
            );
        }
        Decision::NotShown => {
            proves.push(format!(
                "Under these settings (margin {tau}, alpha {alpha}), the model's answers did not \
                 single out this release's secret trigger."
            ));
            not.push(
                "That the model was not trained on the release: a thief may have removed or \
                 weakened the watermark, or the model may not have learnt it."
                    .into(),
            );
        }
        Decision::Inconclusive => {
            proves.push(
                "The model's answers change under the trigger more than the margin allows.".into(),
            );
            not.push(
                "That the model was trained on this release: the controls cannot be drawn like \
                 the secret, so a model trained on another release with a like trigger could \
                 answer the same."
                    .into(),
            );
        }
    }
    (proves, not)
}

fn test_row(out: &mut String, name: &str, t: &TestResult, alpha: f64) {
    let _ = writeln!(
        out,
        "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        escape(name),
        t.n,
        num(t.effect),
        num(t.ci_low),
        num(t.p_value),
        if t.p_value < alpha {
            "rejects H₀"
        } else {
            "does not reject"
        }
    );
}

/// The wealth of the sequential betting test after each pair of the trail, replayed in query
/// order (the test observes the pairs in that order).
fn wealth_path(v: &Verdict) -> Vec<f64> {
    let Ok(mut b) = Betting::new(v.config.tau, v.config.alpha) else {
        return Vec::new();
    };
    v.trail
        .iter()
        .map_while(|p| b.observe(p.difference.clamp(-1.0, 1.0)).ok())
        .map(|s| s.wealth)
        .collect()
}

/// sha256 (hex) over the audit trail's pairs, one line each: index, label, the benign image's
/// hash and the hashes of the two answers (what the owner's and an auditor's views share).
fn trail_digest(v: &Verdict) -> String {
    let mut h = Sha256::new();
    for p in &v.trail {
        h.update(format!(
            "{} {} {} {} {}\n",
            p.index,
            p.label,
            p.benign_sha256,
            p.benign_response_sha256,
            p.triggered_response_sha256
        ));
    }
    hex::encode(h.finalize())
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#1a1a1a;\
background:#fff;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.5}\
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #bbb}\
.decision{font-size:1.15rem;padding:1rem;border-left:.4rem solid;margin:1rem 0}\
.used{border-color:#8a1c1c;background:#fbeaea}.not_shown{border-color:#1f5f2e;background:#e9f5ec}\
.inconclusive{border-color:#7a5b00;background:#fbf4dc}\
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #999;padding:.25rem .5rem;\
text-align:left;vertical-align:top}th{background:#eee}code{font-size:.85rem;word-break:break-all}\
figure{margin:1rem 0}figcaption{font-size:.9rem;color:#333}\
@media print{body{margin:0}h2{page-break-after:avoid}figure{page-break-inside:avoid}}";

/// The report of a verdict (its JSON as the reader holds it) as one self-contained HTML
/// document.
pub fn html(verdict: &serde_json::Value, ctx: &Context) -> Result<String, NotAVerdict> {
    let v = Verdict::deserialize(verdict)?;
    Ok(html_of(&v, &verdict_sha256(verdict), ctx))
}

fn html_of(v: &Verdict, sha256: &str, ctx: &Context) -> String {
    let alpha = v.config.alpha;
    let mut o = String::new();
    let decision = v.decision.as_str();
    let title = match v.decision {
        Decision::Used => "Used: evidence of training on the release",
        Decision::NotShown => "Not shown: no evidence of training on the release",
        Decision::Inconclusive => "Inconclusive",
    };
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>hallmark verification report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <main>\n<h1>Verification report</h1>\n",
        escape(title)
    );
    let _ = writeln!(
        o,
        "<p class=\"decision {decision}\" role=\"status\"><strong>{}.</strong> {}</p>",
        escape(title),
        headline(v)
    );
    let (proves, not) = meaning(v);
    o.push_str("<h2>What this shows</h2>\n<ul>\n");
    for p in proves {
        let _ = writeln!(o, "<li>{p}</li>");
    }
    o.push_str("</ul>\n<h2>What this does not show</h2>\n<ul>\n");
    for p in not {
        let _ = writeln!(o, "<li>{p}</li>");
    }
    o.push_str("</ul>\n");
    let _ = writeln!(o, "<p>Why: {}</p>", escape(&v.reason));

    // The release and the model.
    o.push_str("<h2>The release and the model</h2>\n<table>\n");
    let mut row = |k: &str, val: String| {
        let _ = writeln!(o, "<tr><th scope=\"row\">{k}</th><td>{val}</td></tr>");
    };
    row(
        "Commitment of the secret record",
        format!("<code>{}</code>", escape(&v.commitment)),
    );
    if let Some(t) = &v.trigger {
        row(
            "Trigger spent",
            format!(
                "{} of {} (release commitment <code>{}</code>)",
                t.number,
                t.of,
                escape(&t.release_commitment)
            ),
        );
    }
    if let Some(at) = &ctx.record_imported_at {
        row("Record imported", escape(at));
    }
    row("Model queried", escape(&v.endpoint));
    row("Protocol", escape(&v.protocol));
    if let Some(id) = &ctx.verification_id {
        row("Verification", format!("<code>{}</code>", escape(id)));
    }
    if let Some(at) = &ctx.finished_at {
        row("Finished", escape(at));
    }
    row(
        "Queries",
        format!(
            "{} images ({} pairs in the margin test){}",
            v.queries,
            v.pairs,
            if v.decoys > 0 {
                format!(", and {} benign decoys", v.decoys)
            } else {
                String::new()
            }
        ),
    );
    o.push_str("</table>\n");

    // Settings.
    let c = &v.config;
    o.push_str("<h2>Settings</h2>\n<table>\n");
    let mut row = |k: &str, val: String| {
        let _ = writeln!(o, "<tr><th scope=\"row\">{k}</th><td>{val}</td></tr>");
    };
    row(
        "Significance level (alpha)",
        format!(
            "{} — the largest chance of accusing a model not trained on the release",
            c.alpha
        ),
    );
    row(
        "Margin (tau)",
        format!(
            "{} — a model's answers must change by more than this under the trigger",
            c.tau
        ),
    );
    row(
        "Design",
        if c.sequential {
            format!(
                "sequential, at most {} pairs, in rounds of {}",
                c.m, c.batch_pairs
            )
        } else {
            format!("fixed, {} pairs", c.m)
        },
    );
    row(
        "Answers used",
        if c.label_only {
            "predicted labels only".into()
        } else {
            "class probabilities".into()
        },
    );
    if let Some(seed) = c.seed {
        row("Seed", seed.to_string());
    }
    o.push_str("</table>\n");

    // Tests.
    o.push_str(
        "<h2>Tests</h2>\n<table>\n<tr><th scope=\"col\">test</th><th scope=\"col\">pairs</th>\
         <th scope=\"col\">effect</th><th scope=\"col\">lower bound</th><th scope=\"col\">p-value</th>\
         <th scope=\"col\">at alpha</th></tr>\n",
    );
    test_row(
        &mut o,
        &format!("{} (decides)", v.primary.test),
        &v.primary,
        alpha,
    );
    for t in &v.secondary {
        test_row(&mut o, &format!("{} (for information)", t.test), t, alpha);
    }
    if let Some(w) = &v.withheld {
        test_row(
            &mut o,
            "withheld answers, exact McNemar (for information)",
            &w.test,
            alpha,
        );
    }
    o.push_str("</table>\n");
    if let Some(r) = &v.rank {
        let _ = writeln!(
            o,
            "<p>Rank test: the secret {} trigger ranks <strong>{} of {}</strong> \
             (p = {}; {} controls drawn from its family{}).</p>",
            escape(&r.kind),
            r.rank,
            r.controls + 1,
            num(r.p_value),
            r.controls,
            if r.exchangeable {
                ""
            } else {
                ", not exchangeable with the secret: the p-value is not proof"
            }
        );
    }
    if let Some(d) = &v.dispersion {
        let _ = writeln!(
            o,
            "<p>Dispersion of an untargeted watermark: {} triggered answers moved, entropy {} nats \
             (at least {} needed): {}.</p>",
            d.moved,
            num(d.entropy),
            num(d.threshold),
            if d.passed { "passed" } else { "not passed" }
        );
    }

    // Plots.
    o.push_str("<h2>Plots</h2>\n");
    let diffs: Vec<f64> = v.trail.iter().map(|p| p.difference).collect();
    let _ = writeln!(
        o,
        "<figure>{}<figcaption>Paired differences of the secret trigger: for each benign image, \
         how much the trigger moved the model's answer towards the watermark (1: fully, 0: not \
         at all). The dashed line is the margin tau = {}.</figcaption></figure>",
        svg::histogram(&diffs, v.config.tau),
        v.config.tau
    );
    if let Some(r) = &v.rank {
        let controls: Vec<f64> = r.control_scores.iter().map(|s| s.effect).collect();
        let _ = writeln!(
            o,
            "<figure>{}<figcaption>The secret trigger (red) among the {} controls of its family \
             (grey), by mean effect on the images each was queried on; it ranks {} of {}.\
             </figcaption></figure>",
            svg::rank_strip(r.secret.effect, &controls),
            r.controls,
            r.rank,
            r.controls + 1
        );
    }
    if c.sequential && !v.trail.is_empty() {
        let wealth = wealth_path(v);
        let _ = writeln!(
            o,
            "<figure>{}<figcaption>Evidence over the pairs queried: the sequential test's wealth \
             (log scale). It decides when the wealth reaches 1/alpha = {} (dashed).\
             </figcaption></figure>",
            svg::evidence(&wealth, 1.0 / alpha),
            num(1.0 / alpha)
        );
    }
    if let Some(w) = &v.withheld {
        let _ = writeln!(
            o,
            "<figure>{}<figcaption>Answers the model's server withheld (refused or flattened) \
             among the margin test's pairs: {} benign, {} triggered, {} both; {} refused with an \
             HTTP error.</figcaption></figure>",
            svg::bars(&[
                ("benign", w.benign),
                ("triggered", w.triggered),
                ("both", w.both)
            ]),
            w.benign,
            w.triggered,
            w.both,
            w.refused
        );
    }

    // Audit trail.
    o.push_str("<h2>Audit trail</h2>\n");
    let _ = writeln!(
        o,
        "<p>{} pairs, each with the sha256 of the benign and the triggered image and of the \
         model's answers to each. Digest of the trail (sha256 over one line per pair: index, \
         label, and the hashes of the benign image and of both answers): <code>{}</code>.{}</p>",
        v.trail.len(),
        trail_digest(v),
        match &ctx.json_link {
            Some(l) => format!(
                " The full verdict, with every pair: <a href=\"{0}\">{0}</a>.",
                escape(l)
            ),
            None => String::new(),
        }
    );
    o.push_str(
        "<table>\n<tr><th scope=\"col\">pair</th><th scope=\"col\">image</th>\
         <th scope=\"col\">label</th><th scope=\"col\">difference</th>\
         <th scope=\"col\">triggered answer sha256</th></tr>\n",
    );
    for (i, p) in v.trail.iter().take(10).enumerate() {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            i + 1,
            p.index,
            p.label,
            num(p.difference),
            escape(&p.triggered_response_sha256)
        );
    }
    o.push_str("</table>\n");
    if v.trail.len() > 10 {
        let _ = writeln!(o, "<p>The first 10 of {} pairs.</p>", v.trail.len());
    }
    let _ = writeln!(
        o,
        "<h2>This document</h2>\n<p>It summarises the verdict whose canonical JSON has sha256 \
         <code id=\"verdict-sha256\">{sha256}</code>.</p>\n</main>\n</body>\n</html>"
    );
    o
}

#[cfg(test)]
mod tests;
