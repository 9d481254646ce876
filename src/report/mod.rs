//! Verdict reports: one self-contained HTML document (inline CSS and SVG plots, no script, no
//! external resource) that puts a verification's verdict before a reader who is not a
//! statistician: the decision in one sentence, what it proves and what it does not, the
//! commitment, the settings, every test, plots of the evidence and a digest of the audit trail.
//! `hallmark report` and `GET /v1/verifications/{id}/report` build the same document from the
//! same verdict; it prints the sha256 of the verdict's canonical JSON, so a reader can tie the
//! document to the JSON it summarises.

mod pdf;
mod plot;
mod svg;

use crate::stats::{Betting, TestResult};
use crate::verify::{CombinedVerdict, Decision, MarginEffect, RankEffect, Verdict};
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
    Ok(render_html(&any_document(verdict, ctx)?))
}

/// The report of a verdict as a PDF document: the same content as [`html`], laid out on A4
/// pages by [`pdf`]'s writer (no browser).
pub fn pdf(verdict: &serde_json::Value, ctx: &Context) -> Result<Vec<u8>, NotAVerdict> {
    Ok(pdf::render(&any_document(verdict, ctx)?))
}

/// The document of a verdict JSON: one trigger's ([`Verdict`]), or a model's tested with
/// several triggers of one release ([`CombinedVerdict`], which holds `verdicts`).
fn any_document(verdict: &serde_json::Value, ctx: &Context) -> Result<Document, NotAVerdict> {
    let sha256 = verdict_sha256(verdict);
    Ok(if verdict.get("verdicts").is_some() {
        combined_document(&CombinedVerdict::deserialize(verdict)?, &sha256, ctx)
    } else {
        document(&Verdict::deserialize(verdict)?, &sha256, ctx)
    })
}

/// The report's title for a decision.
fn title(decision: Decision) -> &'static str {
    match decision {
        Decision::Used => "Used: evidence of training on the release",
        Decision::NotShown => "Not shown: no evidence of training on the release",
        Decision::Inconclusive => "Inconclusive",
    }
}

/// The decision about a model tested with several triggers, in one sentence.
pub fn combined_headline(c: &CombinedVerdict) -> String {
    let k = c.verdicts.len();
    let each = c.alpha / k as f64;
    let said: Vec<String> = c
        .verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| v.decision == Decision::Used)
        .map(|(i, v)| trigger_number(i, v).to_string())
        .collect();
    match c.decision {
        Decision::Used => format!(
            "The model was tested with {k} secret triggers of the release, chosen before \
             verifying, each at alpha {} = {} / {k}; {} {} found evidence that it was \
             trained on the watermarked release. The chance that a model not trained on it is \
             accused by any of the {k} is at most {} (adjusted p-value {}).",
            num(each),
            num(c.alpha),
            if said.len() == 1 {
                "trigger"
            } else {
                "triggers"
            },
            said.join(" and "),
            num(c.alpha),
            num(c.p_value)
        ),
        Decision::NotShown => format!(
            "The model was tested with {k} secret triggers of the release, each at alpha {}: \
             none found evidence that it was trained on the watermarked release.",
            num(each)
        ),
        Decision::Inconclusive => format!(
            "The model was tested with {k} triggers of the release, each at alpha {}: none \
             singles out this release, and one reacts as a public or crafted trigger does, so \
             the result is inconclusive.",
            num(each)
        ),
    }
}

/// The number of the `i`th trigger a combined verdict tested, within its release.
fn trigger_number(i: usize, v: &Verdict) -> usize {
    v.trigger.as_ref().map_or(i + 1, |t| t.number)
}

/// The document of a model tested with k triggers of one release, each at alpha / k: the
/// model's decision and why one trigger suffices (Bonferroni), a table of the triggers, then
/// each trigger's own report.
fn combined_document(c: &CombinedVerdict, sha256: &str, ctx: &Context) -> Document {
    let k = c.verdicts.len();
    let number = trigger_number;
    let mut b = vec![
        Block::Heading("Several triggers".into()),
        Block::Para(format!(
            "A release may carry secret triggers of several families, so that a defence that \
             removes one watermark may leave another. Each trigger was verified at alpha / {k} \
             and the model is accused when any one says used: by Bonferroni's inequality the \
             chance of accusing a model not trained on the release is then at most alpha = {}, \
             however the triggers' results depend on each other. The adjusted p-value is the \
             smallest trigger's times {k}. The {k} triggers must have been chosen before \
             verifying; testing another because one said not shown is a re-run that raises \
             that chance.",
            num(c.alpha)
        )),
        Block::Table(
            ["trigger", "kind", "decision", "p-value", "rank", "queries"]
                .map(String::from)
                .to_vec(),
            c.verdicts
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    vec![
                        number(i, v).to_string(),
                        v.rank.as_ref().map_or("–".into(), |r| escape(&r.kind)),
                        v.decision.as_str().into(),
                        num(v.p_value()),
                        v.rank.as_ref().map_or("–".into(), |r| {
                            format!("{} of {}", r.rank, r.controls + 1)
                        }),
                        v.queries.to_string(),
                    ]
                })
                .collect(),
        ),
        Block::Para(format!("Queries in all: {} images.", c.queries)),
    ];
    for (i, v) in c.verdicts.iter().enumerate() {
        let d = document(v, sha256, ctx);
        b.push(Block::Heading(format!(
            "Trigger {}: {}",
            number(i, v),
            d.title
        )));
        b.push(Block::Para(d.headline));
        b.extend(d.blocks);
    }
    Document {
        decision: c.decision.as_str(),
        title: title(c.decision),
        headline: combined_headline(c),
        blocks: b,
        sha256: sha256.to_string(),
    }
}

/// A plot of the report.
pub(crate) enum Plot {
    Histogram(Vec<f64>, f64),
    Rank(f64, Vec<f64>),
    Evidence(Vec<f64>, f64),
    Bars(Vec<(&'static str, usize)>),
}

impl Plot {
    fn draw(&self, c: &mut impl plot::Canvas) {
        match self {
            Plot::Histogram(d, tau) => plot::histogram(c, d, *tau),
            Plot::Rank(secret, controls) => plot::rank_strip(c, *secret, controls),
            Plot::Evidence(w, t) => plot::evidence(c, w, *t),
            Plot::Bars(items) => plot::bars(c, items),
        }
    }

    /// What the plot shows, for screen readers.
    fn label(&self) -> String {
        match self {
            Plot::Histogram(d, tau) => format!(
                "Histogram of {} paired differences between -1 and 1; margin tau {tau}",
                d.len()
            ),
            Plot::Rank(secret, controls) => format!(
                "Effect of the secret trigger, {secret:.3}, among {} controls of its family",
                controls.len()
            ),
            Plot::Evidence(w, t) => format!(
                "Wealth of the sequential test over {} pairs; it decides at {t}",
                w.len()
            ),
            Plot::Bars(items) => items
                .iter()
                .map(|(l, c)| format!("{l}: {c}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn svg(&self) -> String {
        svg::render(&self.label(), |c| self.draw(c))
    }
}

/// One piece of the report. Text is HTML (escaped; `<strong>`, `<code>`, `<sup>` and links
/// only), which the PDF writer reduces to plain text.
pub(crate) enum Block {
    Heading(String),
    Para(String),
    Bullets(Vec<String>),
    /// Rows of a key and a value.
    Facts(Vec<(String, String)>),
    /// A table with a header row; the first cell of each row heads it.
    Table(Vec<String>, Vec<Vec<String>>),
    Figure(Plot, String),
}

/// The report's content, whatever its format.
pub(crate) struct Document {
    /// `used`, `not_shown` or `inconclusive`.
    pub decision: &'static str,
    /// The decision's title.
    pub title: &'static str,
    /// The decision in one sentence (HTML).
    pub headline: String,
    pub blocks: Vec<Block>,
    /// sha256 of the verdict's canonical JSON.
    pub sha256: String,
}

fn test_cells(name: &str, t: &TestResult, alpha: f64) -> Vec<String> {
    vec![
        escape(name),
        t.n.to_string(),
        num(t.effect),
        num(t.ci_low),
        num(t.p_value),
        if t.p_value < alpha {
            "rejects H₀".into()
        } else {
            "does not reject".into()
        },
    ]
}

fn document(v: &Verdict, sha256: &str, ctx: &Context) -> Document {
    let alpha = v.config.alpha;
    let mut b = Vec::new();
    let title = title(v.decision);
    let (proves, not) = meaning(v);
    b.push(Block::Heading("What this shows".into()));
    b.push(Block::Bullets(proves));
    b.push(Block::Heading("What this does not show".into()));
    b.push(Block::Bullets(not));
    b.push(Block::Para(format!("Why: {}", escape(&v.reason))));

    // The release and the model.
    let mut facts = vec![(
        "Commitment of the secret record".to_string(),
        format!("<code>{}</code>", escape(&v.commitment)),
    )];
    if let Some(t) = &v.trigger {
        facts.push((
            "Trigger spent".into(),
            format!(
                "{} of {} (release commitment <code>{}</code>)",
                t.number,
                t.of,
                escape(&t.release_commitment)
            ),
        ));
    }
    if let Some(at) = &ctx.record_imported_at {
        facts.push(("Record imported".into(), escape(at)));
    }
    facts.push(("Model queried".into(), escape(&v.endpoint)));
    facts.push(("Protocol".into(), escape(&v.protocol)));
    if let Some(id) = &ctx.verification_id {
        facts.push((
            "Verification".into(),
            format!("<code>{}</code>", escape(id)),
        ));
    }
    if let Some(at) = &ctx.finished_at {
        facts.push(("Finished".into(), escape(at)));
    }
    facts.push((
        "Queries".into(),
        format!(
            "{} images ({} pairs in the margin test){}{}",
            v.queries,
            v.pairs,
            if v.decoys > 0 {
                format!(", and {} benign decoys", v.decoys)
            } else {
                String::new()
            },
            if v.echoes > 0 {
                format!(", and each asked again ({} echoes)", v.echoes)
            } else {
                String::new()
            }
        ),
    ));
    b.push(Block::Heading("The release and the model".into()));
    b.push(Block::Facts(facts));

    // Settings.
    let c = &v.config;
    let mut facts = vec![
        (
            "Significance level (alpha)".to_string(),
            format!(
                "{} — the largest chance of accusing a model not trained on the release",
                c.alpha
            ),
        ),
        (
            "Margin (tau)".into(),
            format!(
                "{} — a model's answers must change by more than this under the trigger",
                c.tau
            ),
        ),
        (
            "Design".into(),
            if c.sequential {
                format!(
                    "sequential, at most {} pairs, in rounds of {}",
                    c.m, c.batch_pairs
                )
            } else {
                format!("fixed, {} pairs", c.m)
            },
        ),
        (
            "Answers used".into(),
            if c.label_only {
                "predicted labels only".into()
            } else {
                "class probabilities".into()
            },
        ),
    ];
    if c.rank_effect == RankEffect::Scattered {
        facts.push((
            "Rank test's score".into(),
            "the target's gain, plus triggered answers scattered off the true class".into(),
        ));
    }
    if c.margin_effect == MarginEffect::TrueClass {
        facts.push((
            "Margin test's score".into(),
            "the true class's loss (wherever the triggered answer went)".into(),
        ));
    }
    if c.ask_twice {
        facts.push((
            "Asked twice".into(),
            "every image, the second time with 4 pixels one grey level off; an answer that \
             named another class the second time counted as withheld"
                .into(),
        ));
    }
    if let Some(seed) = c.seed {
        facts.push(("Seed".into(), seed.to_string()));
    }
    b.push(Block::Heading("Settings".into()));
    b.push(Block::Facts(facts));

    // Tests.
    let mut rows = vec![test_cells(
        &format!("{} (decides)", v.primary.test),
        &v.primary,
        alpha,
    )];
    for t in &v.secondary {
        rows.push(test_cells(
            &format!("{} (for information)", t.test),
            t,
            alpha,
        ));
    }
    if let Some(w) = &v.withheld {
        rows.push(test_cells(
            "withheld answers, exact McNemar (for information)",
            &w.test,
            alpha,
        ));
    }
    b.push(Block::Heading("Tests".into()));
    b.push(Block::Table(
        [
            "test",
            "pairs",
            "effect",
            "lower bound",
            "p-value",
            "at alpha",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    ));
    if let Some(r) = &v.rank {
        b.push(Block::Para(format!(
            "Rank test: the secret {} trigger ranks <strong>{} of {}</strong> \
             (p = {}; {} controls drawn from its family{}).",
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
        )));
    }
    if let Some(d) = &v.dispersion {
        b.push(Block::Para(format!(
            "Dispersion of an untargeted watermark: {} triggered answers moved, entropy {} nats \
             (at least {} needed): {}.",
            d.moved,
            num(d.entropy),
            num(d.threshold),
            if d.passed { "passed" } else { "not passed" }
        )));
    }

    // Plots.
    b.push(Block::Heading("Plots".into()));
    let diffs: Vec<f64> = v.trail.iter().map(|p| p.difference).collect();
    b.push(Block::Figure(
        Plot::Histogram(diffs, c.tau),
        format!(
            "Paired differences of the secret trigger: for each benign image, how much the \
             trigger moved the model's answer towards the watermark (1: fully, 0: not at all). \
             The dashed line is the margin tau = {}.",
            c.tau
        ),
    ));
    if let Some(r) = &v.rank {
        let controls: Vec<f64> = r.control_scores.iter().map(|s| s.effect).collect();
        b.push(Block::Figure(
            Plot::Rank(r.secret.effect, controls),
            format!(
                "The secret trigger (red diamond) among the {} controls of its family (grey), by \
                 mean effect on the images each was queried on; it ranks {} of {}.",
                r.controls,
                r.rank,
                r.controls + 1
            ),
        ));
    }
    if c.sequential && !v.trail.is_empty() {
        b.push(Block::Figure(
            Plot::Evidence(wealth_path(v), 1.0 / alpha),
            format!(
                "Evidence over the pairs queried: the sequential test's wealth (log scale). It \
                 decides when the wealth reaches 1/alpha = {} (dashed).",
                num(1.0 / alpha)
            ),
        ));
    }
    if let Some(w) = &v.withheld {
        b.push(Block::Figure(
            Plot::Bars(vec![
                ("benign", w.benign),
                ("triggered", w.triggered),
                ("both", w.both),
            ]),
            format!(
                "Answers the model's server withheld (refused, flattened or unsteady) among the \
                 margin test's pairs: {} benign, {} triggered, {} both; {} refused with an HTTP \
                 error{}.",
                w.benign,
                w.triggered,
                w.both,
                w.refused,
                if w.unsteady > 0 {
                    format!(", {} named another class when asked again", w.unsteady)
                } else {
                    String::new()
                }
            ),
        ));
    }

    // Audit trail.
    b.push(Block::Heading("Audit trail".into()));
    b.push(Block::Para(format!(
        "{} pairs, each with the sha256 of the benign and the triggered image and of the \
         model's answers to each. Digest of the trail (sha256 over one line per pair: index, \
         label, and the hashes of the benign image and of both answers): <code>{}</code>.{}",
        v.trail.len(),
        trail_digest(v),
        match &ctx.json_link {
            Some(l) => format!(
                " The full verdict, with every pair: <a href=\"{0}\">{0}</a>.",
                escape(l)
            ),
            None => String::new(),
        }
    )));
    let rows: Vec<Vec<String>> = v
        .trail
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, p)| {
            vec![
                (i + 1).to_string(),
                p.index.to_string(),
                p.label.to_string(),
                num(p.difference),
                format!("<code>{}</code>", escape(&p.triggered_response_sha256)),
            ]
        })
        .collect();
    b.push(Block::Table(
        [
            "pair",
            "image",
            "label",
            "difference",
            "triggered answer sha256",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    ));
    if v.trail.len() > 10 {
        b.push(Block::Para(format!(
            "The first 10 of {} pairs.",
            v.trail.len()
        )));
    }
    Document {
        decision: v.decision.as_str(),
        title,
        headline: headline(v),
        blocks: b,
        sha256: sha256.to_string(),
    }
}

fn render_html(d: &Document) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>hallmark verification report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <main>\n<h1>Verification report</h1>\n",
        escape(d.title)
    );
    let _ = writeln!(
        o,
        "<p class=\"decision {}\" role=\"status\"><strong>{}.</strong> {}</p>",
        d.decision,
        escape(d.title),
        d.headline
    );
    for block in &d.blocks {
        match block {
            Block::Heading(h) => {
                let _ = writeln!(o, "<h2>{}</h2>", escape(h));
            }
            Block::Para(p) => {
                let _ = writeln!(o, "<p>{p}</p>");
            }
            Block::Bullets(items) => {
                o.push_str("<ul>\n");
                for i in items {
                    let _ = writeln!(o, "<li>{i}</li>");
                }
                o.push_str("</ul>\n");
            }
            Block::Facts(rows) => {
                o.push_str("<table>\n");
                for (k, val) in rows {
                    let _ = writeln!(o, "<tr><th scope=\"row\">{k}</th><td>{val}</td></tr>");
                }
                o.push_str("</table>\n");
            }
            Block::Table(head, rows) => {
                o.push_str("<table>\n<tr>");
                for h in head {
                    let _ = write!(o, "<th scope=\"col\">{}</th>", escape(h));
                }
                o.push_str("</tr>\n");
                for r in rows {
                    o.push_str("<tr>");
                    for (i, cell) in r.iter().enumerate() {
                        if i == 0 {
                            let _ = write!(o, "<th scope=\"row\">{cell}</th>");
                        } else {
                            let _ = write!(o, "<td>{cell}</td>");
                        }
                    }
                    o.push_str("</tr>\n");
                }
                o.push_str("</table>\n");
            }
            Block::Figure(plot, caption) => {
                let _ = writeln!(
                    o,
                    "<figure>{}<figcaption>{caption}</figcaption></figure>",
                    plot.svg(),
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "<h2>This document</h2>\n<p>It summarises the verdict whose canonical JSON has sha256 \
         <code id=\"verdict-sha256\">{}</code>.</p>\n</main>\n</body>\n</html>",
        d.sha256
    );
    o
}

#[cfg(test)]
mod tests;
