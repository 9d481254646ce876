//! The calibration table: one row per trained model, its rates, markdown and plot.

use crate::Invalid;
use crate::train::metrics::Metrics;
use crate::verify::{Decision, Verdict};
use serde::{Deserialize, Serialize};

/// What a calibrated model was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// The watermarked release (should be detected).
    Watermarked,
    /// The clean dataset (must not be accused).
    Clean,
    /// Data watermarked with a different secret trigger (must not be accused).
    OtherTrigger,
    /// A release of another family, typically with its trigger at the same place (a BadNets
    /// patch beside UBW-P's): a model with a real backdoor that is not this one (must not be
    /// accused).
    OtherFamily,
}

impl ModelKind {
    /// Whether a detection is a true positive.
    pub fn should_detect(self) -> bool {
        self == Self::Watermarked
    }
}

/// One calibrated model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// What it was trained on.
    pub kind: ModelKind,
    /// Index of the watermarked model whose secret it was verified with.
    pub index: usize,
    /// Training seed.
    pub seed: u64,
    /// Metrics on the test set (ASR of the verified watermark).
    pub metrics: Metrics,
    /// The verification's decision.
    pub decision: Decision,
    /// Its p-value.
    pub p_value: f64,
    /// Its effect size.
    pub effect: f64,
    /// Images sent to the model.
    pub queries: usize,
    /// Pairs tested.
    pub pairs: usize,
    /// The secret's rank p-value among controls of its family.
    #[serde(default)]
    pub rank_p: Option<f64>,
    /// Its rank among the K + 1 triggers.
    #[serde(default)]
    pub rank: Option<usize>,
    /// The best controls (at most three, by draw index) that ranked at or above the secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub above: Vec<usize>,
    /// The thief's defence the model went through before it was verified (none: as trained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defence: Option<String>,
    /// Answers withheld (refused or flattened) for benign and for triggered queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<(usize, usize)>,
    /// For a release with several triggers, each trigger's own verdict (each verified at
    /// alpha / k); the row's decision is `used` when any is, its p-value the smallest times k
    /// (Bonferroni), its effect and rank those of that trigger, its queries the sum. Empty for a
    /// release of one trigger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<TriggerResult>,
}

/// One trigger's verdict of a model verified with each trigger of a release of several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerResult {
    /// The trigger's family (its spec's name).
    pub spec: String,
    /// Its attack success rate (targeted) or triggered misclassification (untargeted).
    pub asr: Option<f64>,
    /// Its decision at alpha / k.
    pub decision: Decision,
    /// Its p-value (unadjusted).
    pub p_value: f64,
    /// Its effect size.
    pub effect: f64,
    /// Its rank among the K + 1 triggers.
    pub rank: Option<usize>,
    /// Its rank p-value.
    pub rank_p: Option<f64>,
    /// Images sent to the model for it.
    pub queries: usize,
}

impl Row {
    /// A row from a model's metrics and its verdict.
    pub fn new(kind: ModelKind, index: usize, seed: u64, metrics: Metrics, v: &Verdict) -> Self {
        Self {
            kind,
            index,
            seed,
            metrics,
            decision: v.decision,
            p_value: v.primary.p_value,
            effect: v.primary.effect,
            queries: v.queries,
            pairs: v.pairs,
            rank_p: v.rank.as_ref().map(|r| r.p_value),
            rank: v.rank.as_ref().map(|r| r.rank),
            above: v
                .rank
                .as_ref()
                .map_or_else(Vec::new, |r| r.above.iter().take(3).copied().collect()),
            defence: None,
            withheld: v.withheld.as_ref().map(|w| (w.benign, w.triggered)),
            triggers: Vec::new(),
        }
    }

    /// The row of a model verified with every trigger of its release: `rows[j]` is its row for
    /// trigger `j` alone (verified at alpha / k, k the number of triggers), `specs[j]` names that
    /// trigger's family. One trigger gives its row unchanged. The model is accused when any
    /// trigger's verdict is `used`: with each at alpha / k, the chance that an innocent model is
    /// accused by any is at most alpha (Bonferroni), whatever the dependence between them.
    pub fn combine(specs: &[String], rows: Vec<Row>) -> Self {
        assert!(
            !rows.is_empty() && rows.len() == specs.len(),
            "one row and one spec name per trigger"
        );
        if rows.len() == 1 {
            return rows.into_iter().next().expect("one row");
        }
        let decision = Decision::of_any(rows.iter().map(|r| r.decision));
        let p: Vec<f64> = rows.iter().map(|r| r.p_value).collect();
        // The other cells (effect, rank) are the most significant trigger's.
        let lead = (0..rows.len())
            .min_by(|&a, &b| p[a].total_cmp(&p[b]))
            .expect("not empty");
        let triggers = rows
            .iter()
            .zip(specs)
            .map(|(r, spec)| TriggerResult {
                spec: spec.clone(),
                asr: r.metrics.asr.or(r.metrics.asr_a),
                decision: r.decision,
                p_value: r.p_value,
                effect: r.effect,
                rank: r.rank,
                rank_p: r.rank_p,
                queries: r.queries,
            })
            .collect();
        let withheld = rows
            .iter()
            .filter_map(|r| r.withheld)
            .reduce(|a, b| (a.0 + b.0, a.1 + b.1));
        Self {
            metrics: rows[0].metrics.clone(),
            decision,
            p_value: crate::verify::bonferroni(&p),
            queries: rows.iter().map(|r| r.queries).sum(),
            pairs: rows.iter().map(|r| r.pairs).sum(),
            withheld,
            triggers,
            ..rows[lead].clone()
        }
    }

    /// The first two cells of its lines in a table: the model (kind and index) and the defence.
    fn model_and_defence(&self) -> String {
        format!(
            "{:?} #{} | {}",
            self.kind,
            self.index,
            self.defence.as_deref().unwrap_or("–")
        )
    }

    /// The same row for a model that went through `defence`.
    pub fn defended(self, defence: &str) -> Self {
        Self {
            defence: Some(defence.to_string()),
            ..self
        }
    }
}

/// How one defence fared in a calibration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefenceSummary {
    /// The defence.
    pub defence: String,
    /// Watermarked models still detected after it.
    pub detected: usize,
    /// Watermarked models put through it.
    pub watermarked: usize,
    /// Independent models accused after it (must be 0).
    pub accused: usize,
    /// Independent models put through it.
    pub independent: usize,
    /// Mean change of the watermarked models' benign accuracy (what the defence cost the thief).
    pub accuracy_change: Option<f64>,
    /// Mean attack success (targeted) or triggered misclassification (untargeted) after it.
    pub asr: Option<f64>,
}

/// A whole calibration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// The spec's name.
    pub spec: String,
    /// Settings, for the record.
    pub settings: serde_json::Value,
    /// Every model.
    pub rows: Vec<Row>,
}

impl Calibration {
    /// The calibration an earlier run saved at `path`, to be resumed: `None` when there is none.
    /// It must be of the same spec with the same settings, apart from the number of models;
    /// otherwise the error names the first setting that differs.
    pub fn resumable(
        path: &std::path::Path,
        spec: &str,
        settings: &serde_json::Value,
    ) -> Result<Option<Self>, Invalid> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Invalid(format!("{}: {e}", path.display()))),
        };
        let old: Self = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a calibration: {e}", path.display()))?;
        if old.spec != spec {
            return Err(Invalid(format!(
                "{} calibrates spec `{}`, not `{spec}`",
                path.display(),
                old.spec
            )));
        }
        if let Some(key) = differing_setting(&old.settings, settings) {
            return Err(Invalid(format!(
                "{} was made with another `{key}` ({} there, {} now)",
                path.display(),
                old.settings
                    .pointer(&key)
                    .unwrap_or(&serde_json::Value::Null),
                settings.pointer(&key).unwrap_or(&serde_json::Value::Null),
            )));
        }
        Ok(Some(old))
    }

    /// Whether every model of watermarked index `index` (watermarked, clean, other-trigger, and
    /// other-family when the calibration trains one) has its row.
    pub fn has_index(&self, index: usize) -> bool {
        let other_family = self
            .settings
            .get("other_family")
            .is_some_and(|v| !v.is_null());
        [
            ModelKind::Watermarked,
            ModelKind::Clean,
            ModelKind::OtherTrigger,
        ]
        .iter()
        .chain(other_family.then_some(&ModelKind::OtherFamily))
        .all(|k| {
            self.rows
                .iter()
                .any(|r| r.index == index && r.kind == *k && r.defence.is_none())
        })
    }

    /// Fraction of watermarked models (as trained) detected.
    pub fn true_positive_rate(&self) -> f64 {
        rate(
            self.rows
                .iter()
                .filter(|r| r.kind.should_detect() && r.defence.is_none()),
            |r| r.decision == Decision::Used,
        )
    }

    /// Fraction of independent models (as trained) accused.
    pub fn false_positive_rate(&self) -> f64 {
        rate(
            self.rows
                .iter()
                .filter(|r| !r.kind.should_detect() && r.defence.is_none()),
            |r| r.decision == Decision::Used,
        )
    }

    /// The defences in the table, in order of first appearance.
    pub fn defences(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for d in self.rows.iter().filter_map(|r| r.defence.as_deref()) {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// Per defence: watermarked models detected and of how many, independent models accused and
    /// of how many, and the mean change of benign accuracy of the watermarked models.
    pub fn defence_summary(&self) -> Vec<DefenceSummary> {
        self.defences()
            .into_iter()
            .map(|d| {
                let rows = || {
                    self.rows
                        .iter()
                        .filter(move |r| r.defence.as_deref() == Some(d))
                };
                let used = |r: &Row| r.decision == Decision::Used;
                let marked: Vec<&Row> = rows().filter(|r| r.kind.should_detect()).collect();
                let drops: Vec<f64> = marked
                    .iter()
                    .filter_map(|r| {
                        let before = self.rows.iter().find(|b| {
                            b.defence.is_none() && b.kind == r.kind && b.index == r.index
                        })?;
                        Some(r.metrics.benign_accuracy - before.metrics.benign_accuracy)
                    })
                    .collect();
                let asr: Vec<f64> = marked
                    .iter()
                    .filter_map(|r| r.metrics.asr.or(r.metrics.asr_a))
                    .collect();
                let mean =
                    |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
                DefenceSummary {
                    defence: d.to_string(),
                    detected: marked.iter().filter(|r| used(r)).count(),
                    watermarked: marked.len(),
                    accused: rows()
                        .filter(|r| !r.kind.should_detect() && used(r))
                        .count(),
                    independent: rows().filter(|r| !r.kind.should_detect()).count(),
                    accuracy_change: mean(&drops),
                    asr: mean(&asr),
                }
            })
            .collect()
    }

    /// How every model was verified, from the recorded settings: `None` for a calibration
    /// that recorded none.
    fn verification_line(&self) -> Option<String> {
        let v = self.settings.get("verify")?;
        let (alpha, tau, m) = (
            v.get("alpha")?.as_f64()?,
            v.get("tau")?.as_f64()?,
            v.get("m")?.as_u64()?,
        );
        let design = if v.get("sequential") == Some(&serde_json::Value::Bool(true)) {
            format!("sequential design of at most {m} pairs")
        } else {
            format!("fixed design of {m} pairs")
        };
        let answers = if v.get("label_only") == Some(&serde_json::Value::Bool(true)) {
            "labels only"
        } else {
            "probabilities"
        };
        let alpha = match self.settings.get("also_specs").and_then(|v| v.as_array()) {
            Some(more) if !more.is_empty() => {
                let k = more.len() + 1;
                format!(
                    "{alpha} for the model ({} for each of the release's {k} triggers, \
                     Bonferroni: accused when any trigger's verdict is `used`)",
                    alpha / k as f64
                )
            }
            _ => alpha.to_string(),
        };
        Some(format!(
            "Verified at alpha {alpha}, tau {tau}, {design}, on {answers}.\n\n"
        ))
    }

    /// A Markdown report: how the models were verified, one line per model, then the rates.
    pub fn markdown(&self) -> String {
        let mut s = format!("## Calibration of `{}`\n\n", self.spec);
        if let Some(line) = self.verification_line() {
            s.push_str(&line);
        }
        s.push_str("| model | defence | seed | benign acc. | ASR | ASR-A | ASR-C | D_p | p-value | effect | rank (p) | queries | withheld (benign / triggered) | verdict |\n");
        s.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {:.4} | {} | {} | {} | {} | {:.2e} | {:.4} | {} | {} | {} | {:?} |\n",
                r.model_and_defence(),
                r.seed,
                r.metrics.benign_accuracy,
                opt(r.metrics.asr),
                opt(r.metrics.asr_a),
                opt(r.metrics.asr_c),
                opt(r.metrics.dispersibility),
                r.p_value,
                r.effect,
                match (r.rank, r.rank_p) {
                    // A secret just behind the lead names the controls ahead of it.
                    (Some(k), Some(p)) if k > 1 && k <= 4 && !r.above.is_empty() => {
                        let list: Vec<String> = r.above.iter().map(|j| j.to_string()).collect();
                        format!("{k} ({p:.3}; below {})", list.join(", "))
                    }
                    (Some(k), Some(p)) => format!("{k} ({p:.3})"),
                    _ => "–".into(),
                },
                r.queries,
                r.withheld.map_or("–".into(), |(b, t)| format!("{b} / {t}")),
                r.decision,
            ));
        }
        s.push_str(&format!(
            "\nTrue-positive rate {:.2} ({} watermarked models), false-positive rate {:.2} ({} independent models). ASR counts triggered test images whose true label is not the target.\n",
            self.true_positive_rate(),
            self.rows
                .iter()
                .filter(|r| r.kind.should_detect() && r.defence.is_none())
                .count(),
            self.false_positive_rate(),
            self.rows
                .iter()
                .filter(|r| !r.kind.should_detect() && r.defence.is_none())
                .count()
        ));
        if self.rows.iter().any(|r| !r.triggers.is_empty()) {
            s.push_str("\nEach trigger of a release of several (the model's p-value above is the smallest times their number, its effect and rank that trigger's, its ASR the first trigger's):\n\n| model | defence | trigger | ASR | p-value | effect | rank (p) | queries | verdict |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
            for r in &self.rows {
                for t in &r.triggers {
                    s.push_str(&format!(
                        "| {} | {} | {} | {:.2e} | {:.4} | {} | {} | {:?} |\n",
                        r.model_and_defence(),
                        t.spec,
                        opt(t.asr),
                        t.p_value,
                        t.effect,
                        match (t.rank, t.rank_p) {
                            (Some(k), Some(p)) => format!("{k} ({p:.3})"),
                            _ => "–".into(),
                        },
                        t.queries,
                        t.decision,
                    ));
                }
            }
        }
        let summary = self.defence_summary();
        if !summary.is_empty() {
            s.push_str("\n| defence | watermarked detected | independent accused | benign acc. change | ASR after |\n| --- | --- | --- | --- | --- |\n");
            let opt = |v: Option<f64>, sign: bool| {
                v.map_or("–".to_string(), |v| {
                    if sign {
                        format!("{:+.1} pt", v * 100.0)
                    } else {
                        format!("{v:.3}")
                    }
                })
            };
            for d in summary {
                s.push_str(&format!(
                    "| {} | {}/{} | {}/{} | {} | {} |\n",
                    d.defence,
                    d.detected,
                    d.watermarked,
                    d.accused,
                    d.independent,
                    opt(d.accuracy_change, true),
                    opt(d.asr, false)
                ));
            }
        }
        s
    }

    /// A PNG scatter plot: x = −log10 p (capped at 50), y = effect size; green watermarked, grey
    /// clean, orange other-trigger, purple other-family; the dashed lines are −log10 alpha and
    /// the margin tau. The numbers are in the Markdown and JSON beside it.
    pub fn plot_png(&self, alpha: f64, tau: f64) -> image::RgbImage {
        let (w, h, m) = (640u32, 400u32, 40i64);
        let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
        let x_max = 50.0;
        let to_px = |x: f64, y: f64| -> (i64, i64) {
            let px = m as f64 + (x / x_max).clamp(0.0, 1.0) * (w as f64 - 2.0 * m as f64);
            let py = h as f64
                - m as f64
                - ((y + 1.0) / 2.0).clamp(0.0, 1.0) * (h as f64 - 2.0 * m as f64);
            (px as i64, py as i64)
        };
        let mut put = |x: i64, y: i64, c: [u8; 3]| {
            if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                img.put_pixel(x as u32, y as u32, image::Rgb(c));
            }
        };
        let (x0, y_bottom) = (m, h as i64 - m);
        for x in x0..(w as i64 - m) {
            put(x, y_bottom, [0, 0, 0]);
            let (_, zero) = to_px(0.0, 0.0);
            put(x, zero, [200, 200, 200]);
            let (_, t) = to_px(0.0, tau);
            if x % 8 < 4 {
                put(x, t, [120, 120, 220]);
            }
        }
        for y in m..=y_bottom {
            put(x0, y, [0, 0, 0]);
            let (a, _) = to_px(-alpha.log10(), 0.0);
            if y % 8 < 4 {
                put(a, y, [220, 120, 120]);
            }
        }
        for r in &self.rows {
            let color = match r.kind {
                ModelKind::Watermarked => [30, 160, 60],
                ModelKind::Clean => [110, 110, 110],
                ModelKind::OtherTrigger => [240, 140, 20],
                ModelKind::OtherFamily => [150, 60, 200],
            };
            let (cx, cy) = to_px(-r.p_value.max(1e-300).log10(), r.effect);
            for dx in -4..=4i64 {
                for dy in -4..=4i64 {
                    if dx * dx + dy * dy <= 16 {
                        put(cx + dx, cy + dy, color);
                    }
                }
            }
        }
        img
    }
}

fn rate<'a>(rows: impl Iterator<Item = &'a Row>, hit: impl Fn(&Row) -> bool) -> f64 {
    let (mut n, mut k) = (0, 0);
    for r in rows {
        n += 1;
        k += hit(r) as usize;
    }
    if n == 0 { 0.0 } else { k as f64 / n as f64 }
}

/// The JSON pointer of the first setting in which `old` and `new` differ, the number of models
/// aside (a resumed calibration may train more or fewer).
fn differing_setting(old: &serde_json::Value, new: &serde_json::Value) -> Option<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                keys.into_iter().find_map(|k| {
                    let p = format!("{path}/{k}");
                    if p == "/models" {
                        return None;
                    }
                    let null = serde_json::Value::Null;
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null))
                })
            }
            _ if a == b => None,
            _ => Some(path.to_string()),
        }
    }
    walk("", old, new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(kind: ModelKind, index: usize) -> Row {
        Row {
            kind,
            index,
            seed: index as u64,
            metrics: Metrics {
                benign_accuracy: 0.9,
                asr: Some(0.5),
                asr_a: None,
                asr_c: None,
                dispersibility: None,
            },
            decision: Decision::NotShown,
            p_value: 1.0,
            effect: 0.0,
            queries: 300,
            pairs: 100,
            rank_p: None,
            rank: None,
            above: Vec::new(),
            defence: None,
            withheld: None,
            triggers: Vec::new(),
        }
    }

    #[test]
    fn settings_differ_by_path_but_not_by_model_count() {
        let a = json!({"models": 1, "train": {"epochs": 15, "lr": 0.05}, "attack": "None"});
        let b = json!({"models": 3, "train": {"epochs": 15, "lr": 0.05}, "attack": "None"});
        assert_eq!(differing_setting(&a, &b), None);
        let c = json!({"models": 3, "train": {"epochs": 10, "lr": 0.05}, "attack": "None"});
        assert_eq!(differing_setting(&a, &c).as_deref(), Some("/train/epochs"));
        let d = json!({"models": 3, "train": {"epochs": 15, "lr": 0.05}});
        assert_eq!(differing_setting(&a, &d).as_deref(), Some("/attack"));
    }

    #[test]
    fn resumes_only_a_matching_calibration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.json");
        let settings = json!({"models": 1, "train": {"epochs": 15}});
        assert!(
            Calibration::resumable(&path, "badnets", &settings)
                .unwrap()
                .is_none()
        );
        let cal = Calibration {
            spec: "badnets".into(),
            settings: settings.clone(),
            rows: vec![
                row(ModelKind::Watermarked, 0),
                row(ModelKind::Clean, 0),
                row(ModelKind::OtherTrigger, 0),
                row(ModelKind::Watermarked, 1),
            ],
        };
        std::fs::write(&path, serde_json::to_vec(&cal).unwrap()).unwrap();
        let more = json!({"models": 3, "train": {"epochs": 15}});
        let old = Calibration::resumable(&path, "badnets", &more)
            .unwrap()
            .unwrap();
        assert!(old.has_index(0));
        assert!(!old.has_index(1), "index 1 lacks its independent models");
        let err = Calibration::resumable(&path, "blended", &more).unwrap_err();
        assert!(err.contains("`badnets`"), "{err}");
        let err =
            Calibration::resumable(&path, "badnets", &json!({"train": {"epochs": 2}})).unwrap_err();
        assert!(err.contains("`/train/epochs` (15 there, 2 now)"), "{err}");
        std::fs::write(&path, b"{").unwrap();
        let err = Calibration::resumable(&path, "badnets", &more).unwrap_err();
        assert!(err.contains("not a calibration"), "{err}");
    }

    #[test]
    fn the_table_says_how_its_models_were_verified() {
        let cal = |verify: serde_json::Value| Calibration {
            spec: "s".into(),
            settings: json!({ "models": 1, "verify": verify }),
            rows: vec![row(ModelKind::Watermarked, 0)],
        };
        let md = cal(
            json!({"alpha": 0.01, "tau": 0.1, "m": 100, "sequential": true,
            "label_only": false, "batch_pairs": 4}),
        )
        .markdown();
        assert!(
            md.contains(
                "Verified at alpha 0.01, tau 0.1, sequential design of at most 100 pairs, \
                 on probabilities."
            ),
            "{md}"
        );
        let md = cal(
            json!({"alpha": 0.05, "tau": 0.2, "m": 60, "sequential": false,
            "label_only": true}),
        )
        .markdown();
        assert!(
            md.contains(
                "Verified at alpha 0.05, tau 0.2, fixed design of 60 pairs, on labels only."
            ),
            "{md}"
        );
    }

    #[test]
    fn a_secret_just_behind_the_lead_names_the_controls_ahead_of_it() {
        let mut second = row(ModelKind::Watermarked, 0);
        (second.rank, second.rank_p, second.above) = (Some(2), Some(0.02), vec![65]);
        let mut far = row(ModelKind::Clean, 0);
        (far.rank, far.rank_p, far.above) = (Some(40), Some(0.4), vec![3, 7, 9]);
        let cal = Calibration {
            spec: "s".into(),
            settings: json!({"models": 1}),
            rows: vec![second, far],
        };
        let md = cal.markdown();
        assert!(md.contains("| 2 (0.020; below 65) |"), "{md}");
        assert!(!md.contains("Verified at"), "{md}");
        assert!(md.contains("| 40 (0.400) |"), "{md}");
        // Older calibrations, without the list, still read.
        let mut v = serde_json::to_value(&cal).unwrap();
        v["rows"][0].as_object_mut().unwrap().remove("above");
        let old: Calibration = serde_json::from_value(v).unwrap();
        assert!(old.rows[0].above.is_empty());
        assert!(old.markdown().contains("| 2 (0.020) |"));
    }

    #[test]
    fn an_index_needs_its_other_family_model_when_the_calibration_trains_one() {
        let rows = vec![
            row(ModelKind::Watermarked, 0),
            row(ModelKind::Clean, 0),
            row(ModelKind::OtherTrigger, 0),
        ];
        let plain = Calibration {
            spec: "ubw-p".into(),
            settings: json!({"models": 1}),
            rows: rows.clone(),
        };
        assert!(plain.has_index(0));
        let mut with = Calibration {
            spec: "ubw-p".into(),
            settings: json!({"models": 1, "other_family": "badnets-square-28x28-grey"}),
            rows,
        };
        assert!(!with.has_index(0), "the other-family model is missing");
        with.rows.push(row(ModelKind::OtherFamily, 0));
        assert!(with.has_index(0));
        assert!(with.markdown().contains("OtherFamily #0"));
        // It counts among the independent models.
        with.rows.last_mut().unwrap().decision = Decision::Used;
        assert!((with.false_positive_rate() - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_model_verified_with_two_triggers_is_accused_when_either_is_used_at_half_alpha() {
        let specs = ["patch".to_string(), "blend".to_string()];
        let mut patch = row(ModelKind::Watermarked, 0);
        (patch.p_value, patch.effect, patch.rank, patch.rank_p) = (0.2, 0.05, Some(40), Some(0.2));
        patch.queries = 359;
        let mut blend = row(ModelKind::Watermarked, 0);
        (blend.p_value, blend.effect, blend.rank, blend.rank_p) =
            (0.004, 0.6, Some(1), Some(0.005));
        (blend.decision, blend.queries, blend.withheld) = (Decision::Used, 250, Some((1, 2)));
        blend.metrics.asr = Some(0.9);
        let both = Row::combine(&specs, vec![patch.clone(), blend.clone()]);
        assert_eq!(both.decision, Decision::Used);
        assert!((both.p_value - 0.008).abs() < 1e-12, "{}", both.p_value);
        assert_eq!((both.effect, both.rank), (0.6, Some(1)));
        assert_eq!((both.queries, both.withheld), (609, Some((1, 2))));
        // The model's rates are the first trigger's; each trigger keeps its own.
        assert_eq!(both.metrics.asr, Some(0.5));
        assert_eq!(both.triggers[1].asr, Some(0.9));
        assert_eq!(both.triggers[0].decision, Decision::NotShown);
        // Neither used: not shown, and the adjusted p-value is capped at 1.
        blend.decision = Decision::NotShown;
        blend.p_value = 0.7;
        let neither = Row::combine(&specs, vec![patch.clone(), blend]);
        assert_eq!(neither.decision, Decision::NotShown);
        assert_eq!(neither.p_value, 0.4);
        // One trigger: its row, unchanged.
        let one = Row::combine(&specs[..1], vec![patch.clone()]);
        assert!(one.triggers.is_empty());
        assert_eq!(one.p_value, 0.2);
        let cal = Calibration {
            spec: "patch + blend".into(),
            settings: json!({"models": 1, "also_specs": ["blend"], "verify": {"alpha": 0.01,
                "tau": 0.1, "m": 100, "sequential": true, "label_only": false}}),
            rows: vec![both],
        };
        let md = cal.markdown();
        assert!(
            md.contains(
                "Verified at alpha 0.01 for the model (0.005 for each of the release's 2 triggers"
            ),
            "{md}"
        );
        assert!(
            md.contains("| Watermarked #0 | – | blend | 0.9000 | 4.00e-3 | 0.6000 | 1 (0.005) | 250 | Used |"),
            "{md}"
        );
        // A calibration without triggers reads back without the list.
        let v = serde_json::to_value(row(ModelKind::Clean, 0)).unwrap();
        assert!(v.get("triggers").is_none());
    }

    #[test]
    fn defended_rows_are_summarised_per_defence_and_leave_the_rates_of_the_models_as_trained() {
        let mut cal = Calibration {
            spec: "s".into(),
            settings: json!({"models": 1}),
            rows: vec![
                row(ModelKind::Watermarked, 0),
                row(ModelKind::Clean, 0),
                row(ModelKind::OtherTrigger, 0),
            ],
        };
        cal.rows[0].decision = Decision::Used;
        // A defended copy alone does not complete an index.
        let mut partial = cal.clone();
        partial.rows.remove(1);
        partial.rows.push(row(ModelKind::Clean, 0).defended("nad"));
        assert!(!partial.has_index(0));
        let mut fp = row(ModelKind::Watermarked, 0).defended("fine-pruning");
        fp.metrics.benign_accuracy = 0.88;
        fp.metrics.asr = Some(0.1);
        let mut clean_fp = row(ModelKind::Clean, 0).defended("fine-pruning");
        clean_fp.decision = Decision::Used;
        let mut gate = row(ModelKind::Watermarked, 0).defended("gate-strip");
        gate.decision = Decision::Used;
        gate.withheld = Some((2, 17));
        cal.rows.extend([fp, clean_fp, gate]);
        assert!(cal.has_index(0));
        assert_eq!(cal.true_positive_rate(), 1.0);
        assert_eq!(cal.false_positive_rate(), 0.0);
        assert_eq!(cal.defences(), vec!["fine-pruning", "gate-strip"]);
        let s = cal.defence_summary();
        assert_eq!(s[0].detected, 0);
        assert_eq!((s[0].accused, s[0].independent), (1, 1));
        assert!(
            (s[0].accuracy_change.unwrap() + 0.02).abs() < 1e-12,
            "{s:?}"
        );
        assert_eq!(s[0].asr, Some(0.1));
        assert_eq!(
            (s[1].detected, s[1].watermarked, s[1].independent),
            (1, 1, 0)
        );
        let md = cal.markdown();
        assert!(
            md.contains("| fine-pruning | 0/1 | 1/1 | -2.0 pt | 0.100 |"),
            "{md}"
        );
        assert!(md.contains("| 2 / 17 |"), "{md}");
    }
}
