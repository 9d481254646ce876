//! The report's plots as inline SVG: drawn here, no library, fixed size, readable without
//! colour (shapes and labels carry the meaning) and described for screen readers.

use super::escape;
use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 220.0;
const LEFT: f64 = 50.0;
const RIGHT: f64 = 15.0;
const TOP: f64 = 15.0;
const BOTTOM: f64 = 40.0;

fn open(label: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" \
         height=\"{H}\" role=\"img\" aria-label=\"{0}\"><title>{0}</title>\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fff\"/>",
        escape(label)
    )
}

fn x_of(v: f64, lo: f64, hi: f64) -> f64 {
    LEFT + (v - lo) / (hi - lo) * (W - LEFT - RIGHT)
}

fn y_of(v: f64, lo: f64, hi: f64) -> f64 {
    H - BOTTOM - (v - lo) / (hi - lo) * (H - TOP - BOTTOM)
}

fn axes(o: &mut String, x_label: &str, y_label: &str) {
    let _ = write!(
        o,
        "<line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#333\"/>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{0}\" stroke=\"#333\"/>\
         <text x=\"{2}\" y=\"{3}\" font-size=\"12\" text-anchor=\"middle\">{4}</text>\
         <text x=\"12\" y=\"{5}\" font-size=\"12\" text-anchor=\"middle\" \
         transform=\"rotate(-90 12 {5})\">{6}</text>",
        H - BOTTOM,
        W - RIGHT,
        (LEFT + W - RIGHT) / 2.0,
        H - 5.0,
        escape(x_label),
        (TOP + H - BOTTOM) / 2.0,
        escape(y_label)
    );
}

fn x_tick(o: &mut String, x: f64, label: &str) {
    let _ = write!(
        o,
        "<line x1=\"{x:.1}\" y1=\"{0}\" x2=\"{x:.1}\" y2=\"{1}\" stroke=\"#333\"/>\
         <text x=\"{x:.1}\" y=\"{2}\" font-size=\"11\" text-anchor=\"middle\">{3}</text>",
        H - BOTTOM,
        H - BOTTOM + 4.0,
        H - BOTTOM + 16.0,
        escape(label)
    );
}

fn y_tick(o: &mut String, y: f64, label: &str) {
    let _ = write!(
        o,
        "<line x1=\"{0}\" y1=\"{y:.1}\" x2=\"{LEFT}\" y2=\"{y:.1}\" stroke=\"#333\"/>\
         <text x=\"{1}\" y=\"{2:.1}\" font-size=\"11\" text-anchor=\"end\">{3}</text>",
        LEFT - 4.0,
        LEFT - 6.0,
        y + 4.0,
        escape(label)
    );
}

/// A histogram of paired differences in [−1, 1] (20 bins), with a dashed line at `tau`.
pub fn histogram(diffs: &[f64], tau: f64) -> String {
    let bins = 20usize;
    let mut counts = vec![0usize; bins];
    for &d in diffs {
        let b = (((d.clamp(-1.0, 1.0) + 1.0) / 2.0 * bins as f64) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let mut o = open(&format!(
        "Histogram of {} paired differences between -1 and 1; margin tau {tau}",
        diffs.len()
    ));
    axes(&mut o, "paired difference", "pairs");
    for (b, &c) in counts.iter().enumerate() {
        let lo = -1.0 + 2.0 * b as f64 / bins as f64;
        let hi = lo + 2.0 / bins as f64;
        let (x0, x1) = (x_of(lo, -1.0, 1.0), x_of(hi, -1.0, 1.0));
        let y = y_of(c as f64, 0.0, top);
        let _ = write!(
            o,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a6fa5\" \
             stroke=\"#fff\"><title>{c} pairs in [{lo:.1}, {hi:.1})</title></rect>",
            x0,
            x1 - x0,
            H - BOTTOM - y
        );
    }
    for t in [-1.0, -0.5, 0.0, 0.5, 1.0] {
        x_tick(&mut o, x_of(t, -1.0, 1.0), &format!("{t}"));
    }
    y_tick(&mut o, y_of(top, 0.0, top), &format!("{top}"));
    y_tick(&mut o, y_of(0.0, 0.0, top), "0");
    let x = x_of(tau, -1.0, 1.0);
    let _ = write!(
        o,
        "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{0}\" stroke=\"#000\" \
         stroke-dasharray=\"5 4\"/><text x=\"{1:.1}\" y=\"{2}\" font-size=\"11\">tau</text></svg>",
        H - BOTTOM,
        x + 3.0,
        TOP + 10.0
    );
    o
}

/// The secret's effect among the controls': one mark per trigger on an effect axis, the
/// controls as grey circles, the secret as a red diamond with its label.
pub fn rank_strip(secret: f64, controls: &[f64]) -> String {
    let lo0 = controls.iter().copied().fold(secret, f64::min).min(0.0);
    let hi0 = controls
        .iter()
        .copied()
        .fold(secret, f64::max)
        .max(lo0 + 1e-9);
    // 5% of room either side, so that no mark sits on the frame.
    let pad = (hi0 - lo0) * 0.05;
    let (lo, hi) = (lo0 - pad, hi0 + pad);
    let mut o = open(&format!(
        "Effect of the secret trigger, {secret:.3}, among {} controls of its family",
        controls.len()
    ));
    axes(&mut o, "mean effect of the trigger", "");
    // Controls stacked in rows by effect so that equal effects stay visible.
    let mut sorted: Vec<f64> = controls.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut last_x = f64::NEG_INFINITY;
    let mut stack = 0;
    for c in sorted {
        let x = x_of(c, lo, hi);
        stack = if x - last_x < 6.0 { stack + 1 } else { 0 };
        last_x = x;
        let y = H - BOTTOM - 10.0 - 7.0 * (stack % 20) as f64;
        let _ = write!(
            o,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#888\"><title>control {c:.4}</title></circle>"
        );
    }
    let x = x_of(secret, lo, hi);
    let y = TOP + 30.0;
    // The label on the side with room.
    let (label_x, anchor) = if x > W * 0.75 {
        (x - 9.0, "end")
    } else {
        (x + 9.0, "start")
    };
    let _ = write!(
        o,
        "<path d=\"M{x:.1} {0:.1} L{1:.1} {y:.1} L{x:.1} {2:.1} L{3:.1} {y:.1} Z\" fill=\"#b22222\">\
         <title>secret {secret:.4}</title></path>\
         <line x1=\"{x:.1}\" y1=\"{2:.1}\" x2=\"{x:.1}\" y2=\"{4}\" stroke=\"#b22222\" stroke-dasharray=\"3 3\"/>\
         <text x=\"{5:.1}\" y=\"{6:.1}\" font-size=\"12\" fill=\"#b22222\" \
         text-anchor=\"{anchor}\">secret</text>",
        y - 7.0,
        x + 7.0,
        y + 7.0,
        x - 7.0,
        H - BOTTOM,
        label_x,
        y - 8.0
    );
    for t in [lo0, (lo0 + hi0) / 2.0, hi0] {
        x_tick(&mut o, x_of(t, lo, hi), &format!("{t:.2}"));
    }
    o.push_str("</svg>");
    o
}

/// The sequential test's wealth after each pair (log scale), with a dashed line at `threshold`.
pub fn evidence(wealth: &[f64], threshold: f64) -> String {
    let logs: Vec<f64> = wealth.iter().map(|w| w.max(1e-12).log10()).collect();
    let lo = logs.iter().copied().fold(0.0, f64::min).max(-6.0);
    let hi = logs
        .iter()
        .copied()
        .fold(threshold.log10(), f64::max)
        .max(lo + 1e-9);
    let n = wealth.len().max(1) as f64;
    let mut o = open(&format!(
        "Wealth of the sequential test over {} pairs; it decides at {threshold}",
        wealth.len()
    ));
    axes(&mut o, "pairs queried", "wealth (log10)");
    let points: Vec<String> = logs
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            format!(
                "{:.1},{:.1}",
                x_of((i + 1) as f64, 0.0, n),
                y_of(l.max(lo), lo, hi)
            )
        })
        .collect();
    let _ = write!(
        o,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#4a6fa5\" stroke-width=\"2\"/>",
        points.join(" ")
    );
    let y = y_of(threshold.log10(), lo, hi);
    let _ = write!(
        o,
        "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{0}\" y2=\"{y:.1}\" stroke=\"#000\" \
         stroke-dasharray=\"5 4\"/><text x=\"{1}\" y=\"{2:.1}\" font-size=\"11\">1/alpha</text>",
        W - RIGHT,
        LEFT + 4.0,
        y - 4.0
    );
    x_tick(&mut o, x_of(0.0, 0.0, n), "0");
    x_tick(&mut o, x_of(n, 0.0, n), &format!("{}", wealth.len()));
    y_tick(&mut o, y_of(0.0, lo, hi), "1");
    y_tick(&mut o, y, &format!("{threshold}"));
    o.push_str("</svg>");
    o
}

/// Labelled bars of counts.
pub fn bars(items: &[(&str, usize)]) -> String {
    let top = items.iter().map(|(_, c)| *c).max().unwrap_or(0).max(1) as f64;
    let mut o = open(
        &items
            .iter()
            .map(|(l, c)| format!("{l}: {c}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    axes(&mut o, "", "pairs");
    let slot = (W - LEFT - RIGHT) / items.len().max(1) as f64;
    for (i, (label, c)) in items.iter().enumerate() {
        let x = LEFT + slot * i as f64 + slot * 0.2;
        let y = y_of(*c as f64, 0.0, top);
        let _ = write!(
            o,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a6fa5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{} ({c})</text>",
            slot * 0.6,
            H - BOTTOM - y,
            x + slot * 0.3,
            H - BOTTOM + 16.0,
            escape(label)
        );
    }
    o.push_str("</svg>");
    o
}
