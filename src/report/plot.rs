//! The report's plots, drawn once on a [`Canvas`] that the HTML report renders as inline SVG
//! and the PDF report as vector drawing operators. Fixed size (W × H units, y down), readable
//! without colour: shapes and labels carry the meaning.

pub const W: f64 = 640.0;
pub const H: f64 = 220.0;
const LEFT: f64 = 50.0;
const RIGHT: f64 = 15.0;
const TOP: f64 = 15.0;
const BOTTOM: f64 = 40.0;

/// Where a text's anchor point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

/// What a plot draws on; coordinates in W × H units, y down. `title`s describe a mark for
/// screen readers and tooltips where the format has them.
pub trait Canvas {
    fn line(&mut self, from: (f64, f64), to: (f64, f64), colour: &str, dashed: bool);
    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: &str);
    fn polygon(&mut self, points: &[(f64, f64)], fill: &str, title: &str);
    fn circle(&mut self, centre: (f64, f64), r: f64, fill: &str, title: &str);
    fn polyline(&mut self, points: &[(f64, f64)], colour: &str, width: f64);
    /// Text at `at`; `vertical` turns it a quarter anticlockwise about that point.
    fn text(
        &mut self,
        at: (f64, f64),
        size: f64,
        anchor: Anchor,
        vertical: bool,
        colour: &str,
        text: &str,
    );
}

const INK: &str = "#333333";
const BAR: &str = "#4a6fa5";
const SECRET: &str = "#b22222";

fn x_of(v: f64, lo: f64, hi: f64) -> f64 {
    LEFT + (v - lo) / (hi - lo) * (W - LEFT - RIGHT)
}

fn y_of(v: f64, lo: f64, hi: f64) -> f64 {
    H - BOTTOM - (v - lo) / (hi - lo) * (H - TOP - BOTTOM)
}

fn axes(c: &mut impl Canvas, x_label: &str, y_label: &str) {
    c.line((LEFT, H - BOTTOM), (W - RIGHT, H - BOTTOM), INK, false);
    c.line((LEFT, TOP), (LEFT, H - BOTTOM), INK, false);
    c.text(
        ((LEFT + W - RIGHT) / 2.0, H - 5.0),
        12.0,
        Anchor::Middle,
        false,
        "#000000",
        x_label,
    );
    if !y_label.is_empty() {
        c.text(
            (12.0, (TOP + H - BOTTOM) / 2.0),
            12.0,
            Anchor::Middle,
            true,
            "#000000",
            y_label,
        );
    }
}

fn x_tick(c: &mut impl Canvas, x: f64, label: &str) {
    c.line((x, H - BOTTOM), (x, H - BOTTOM + 4.0), INK, false);
    c.text(
        (x, H - BOTTOM + 16.0),
        11.0,
        Anchor::Middle,
        false,
        "#000000",
        label,
    );
}

fn y_tick(c: &mut impl Canvas, y: f64, label: &str) {
    c.line((LEFT - 4.0, y), (LEFT, y), INK, false);
    c.text(
        (LEFT - 6.0, y + 4.0),
        11.0,
        Anchor::End,
        false,
        "#000000",
        label,
    );
}

/// A histogram of paired differences in [−1, 1] (20 bins), with a dashed line at `tau`.
pub fn histogram(c: &mut impl Canvas, diffs: &[f64], tau: f64) {
    let bins = 20usize;
    let mut counts = vec![0usize; bins];
    for &d in diffs {
        let b = (((d.clamp(-1.0, 1.0) + 1.0) / 2.0 * bins as f64) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    axes(c, "paired difference", "pairs");
    for (b, &n) in counts.iter().enumerate() {
        let lo = -1.0 + 2.0 * b as f64 / bins as f64;
        let hi = lo + 2.0 / bins as f64;
        let (x0, x1) = (x_of(lo, -1.0, 1.0), x_of(hi, -1.0, 1.0));
        let y = y_of(n as f64, 0.0, top);
        c.rect(
            x0,
            y,
            x1 - x0,
            H - BOTTOM - y,
            BAR,
            &format!("{n} pairs in [{lo:.1}, {hi:.1})"),
        );
    }
    for t in [-1.0, -0.5, 0.0, 0.5, 1.0] {
        x_tick(c, x_of(t, -1.0, 1.0), &format!("{t}"));
    }
    y_tick(c, y_of(top, 0.0, top), &format!("{top}"));
    y_tick(c, y_of(0.0, 0.0, top), "0");
    let x = x_of(tau, -1.0, 1.0);
    c.line((x, TOP), (x, H - BOTTOM), "#000000", true);
    c.text(
        (x + 3.0, TOP + 10.0),
        11.0,
        Anchor::Start,
        false,
        "#000000",
        "tau",
    );
}

/// The secret's effect among the controls': one mark per trigger on an effect axis, the
/// controls as grey circles (stacked where they coincide), the secret as a red diamond with its
/// label.
pub fn rank_strip(c: &mut impl Canvas, secret: f64, controls: &[f64]) {
    let lo0 = controls.iter().copied().fold(secret, f64::min).min(0.0);
    let hi0 = controls
        .iter()
        .copied()
        .fold(secret, f64::max)
        .max(lo0 + 1e-9);
    // 5% of room either side, so that no mark sits on the frame.
    let pad = (hi0 - lo0) * 0.05;
    let (lo, hi) = (lo0 - pad, hi0 + pad);
    axes(c, "mean effect of the trigger", "");
    let mut sorted: Vec<f64> = controls.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut last_x = f64::NEG_INFINITY;
    let mut stack = 0;
    for e in sorted {
        let x = x_of(e, lo, hi);
        stack = if x - last_x < 6.0 { stack + 1 } else { 0 };
        last_x = x;
        let y = H - BOTTOM - 10.0 - 7.0 * (stack % 20) as f64;
        c.circle((x, y), 3.0, "#888888", &format!("control {e:.4}"));
    }
    let x = x_of(secret, lo, hi);
    let y = TOP + 30.0;
    c.polygon(
        &[(x, y - 7.0), (x + 7.0, y), (x, y + 7.0), (x - 7.0, y)],
        SECRET,
        &format!("secret {secret:.4}"),
    );
    c.line((x, y + 7.0), (x, H - BOTTOM), SECRET, true);
    // The label on the side with room.
    let (label_x, anchor) = if x > W * 0.75 {
        (x - 9.0, Anchor::End)
    } else {
        (x + 9.0, Anchor::Start)
    };
    c.text((label_x, y - 8.0), 12.0, anchor, false, SECRET, "secret");
    for t in [lo0, (lo0 + hi0) / 2.0, hi0] {
        x_tick(c, x_of(t, lo, hi), &format!("{t:.2}"));
    }
}

/// The sequential test's wealth after each pair (log scale), with a dashed line at `threshold`.
pub fn evidence(c: &mut impl Canvas, wealth: &[f64], threshold: f64) {
    let logs: Vec<f64> = wealth.iter().map(|w| w.max(1e-12).log10()).collect();
    let lo = logs.iter().copied().fold(0.0, f64::min).max(-6.0);
    let hi = logs
        .iter()
        .copied()
        .fold(threshold.log10(), f64::max)
        .max(lo + 1e-9);
    let n = wealth.len().max(1) as f64;
    axes(c, "pairs queried", "wealth (log10)");
    let points: Vec<(f64, f64)> = logs
        .iter()
        .enumerate()
        .map(|(i, &l)| (x_of((i + 1) as f64, 0.0, n), y_of(l.max(lo), lo, hi)))
        .collect();
    c.polyline(&points, BAR, 2.0);
    let y = y_of(threshold.log10(), lo, hi);
    c.line((LEFT, y), (W - RIGHT, y), "#000000", true);
    c.text(
        (LEFT + 4.0, y - 4.0),
        11.0,
        Anchor::Start,
        false,
        "#000000",
        "1/alpha",
    );
    x_tick(c, x_of(0.0, 0.0, n), "0");
    x_tick(c, x_of(n, 0.0, n), &format!("{}", wealth.len()));
    y_tick(c, y_of(0.0, lo, hi), "1");
    y_tick(c, y, &format!("{threshold}"));
}

/// Labelled bars of counts.
pub fn bars(c: &mut impl Canvas, items: &[(&str, usize)]) {
    let top = items.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1) as f64;
    axes(c, "", "pairs");
    let slot = (W - LEFT - RIGHT) / items.len().max(1) as f64;
    for (i, (label, n)) in items.iter().enumerate() {
        let x = LEFT + slot * i as f64 + slot * 0.2;
        let y = y_of(*n as f64, 0.0, top);
        c.rect(
            x,
            y,
            slot * 0.6,
            H - BOTTOM - y,
            BAR,
            &format!("{label}: {n}"),
        );
        c.text(
            (x + slot * 0.3, H - BOTTOM + 16.0),
            12.0,
            Anchor::Middle,
            false,
            "#000000",
            &format!("{label} ({n})"),
        );
    }
}
