//! The report as PDF, written here without a browser or a PDF library: A4 pages, the standard
//! Helvetica fonts (every PDF reader has them, so nothing is embedded), text wrapped by the
//! fonts' published character widths, and the plots as vector paths drawn on the same
//! [`Canvas`] as the HTML report's SVG. Uncompressed and without a creation date, so one verdict
//! always gives the same bytes. Every page's footer carries the verdict's sha256.

use super::plot::{self, Anchor, Canvas};
use super::{Block, Document};
use std::fmt::Write;

const PAGE_W: f64 = 595.0;
const PAGE_H: f64 = 842.0;
const MARGIN: f64 = 56.0;
const TEXT_W: f64 = PAGE_W - 2.0 * MARGIN;
const BOTTOM: f64 = 64.0;

#[derive(Clone, Copy, PartialEq)]
enum Font {
    Regular,
    Bold,
}

impl Font {
    fn name(self) -> &'static str {
        match self {
            Font::Regular => "F1",
            Font::Bold => "F2",
        }
    }
}

/// Helvetica's advance widths (per 1000 units of the font size) for ASCII 32 to 126, from the
/// font's metrics as Adobe publishes them for the standard 14 fonts.
const HELVETICA: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, 556, 556, 556,
    556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, 1015, 667, 667, 722, 722, 667,
    611, 778, 722, 278, 500, 667, 556, 833, 722, 778, 667, 778, 722, 667, 611, 722, 667, 944, 667,
    667, 611, 278, 278, 278, 469, 556, 333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500,
    222, 833, 556, 556, 556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584,
];

/// Width of WinAnsi-encoded text in points. Bold is taken 8% wider than regular, which keeps
/// wrapped bold lines inside the margin.
fn width(text: &[u8], font: Font, size: f64) -> f64 {
    let units: f64 = text
        .iter()
        .map(|&b| match b {
            32..=126 => HELVETICA[(b - 32) as usize] as f64,
            _ => 556.0,
        })
        .sum();
    units * size / 1000.0
        * match font {
            Font::Regular => 1.0,
            Font::Bold => 1.08,
        }
}

/// Text in the fonts' WinAnsi encoding; characters it lacks become ASCII spellings.
fn win_ansi(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match c {
            ' '..='~' => out.push(c as u8),
            '–' => out.push(0x96),
            '—' => out.push(0x97),
            '×' => out.push(0xD7),
            '·' => out.push(0xB7),
            '…' => out.push(0x85),
            '‘' => out.push(0x91),
            '’' => out.push(0x92),
            '“' => out.push(0x93),
            '”' => out.push(0x94),
            '•' => out.push(0x95),
            '°' => out.push(0xB0),
            '±' => out.push(0xB1),
            '²' => out.push(0xB2),
            'é' => out.push(0xE9),
            '\u{a0}' => out.push(b' '),
            '−' => out.push(b'-'),
            '₀' => out.push(b'0'),
            '≤' => out.extend_from_slice(b"<="),
            '≥' => out.extend_from_slice(b">="),
            '→' => out.extend_from_slice(b"->"),
            'α' => out.extend_from_slice(b"alpha"),
            'τ' => out.extend_from_slice(b"tau"),
            '\n' | '\t' => out.push(b' '),
            _ => out.push(b'?'),
        }
    }
    out
}

/// The report's HTML fragments as plain text: tags dropped (a superscript becomes `^`),
/// entities decoded.
fn plain(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(i) = rest.find(['<', '&']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if rest.starts_with('<') {
            let end = rest.find('>').map_or(rest.len(), |e| e + 1);
            if rest.starts_with("<sup>") {
                out.push('^');
            }
            rest = &rest[end..];
        } else {
            const ENTITIES: [(&str, &str); 5] = [
                ("&amp;", "&"),
                ("&lt;", "<"),
                ("&gt;", ">"),
                ("&quot;", "\""),
                ("&#39;", "'"),
            ];
            match ENTITIES.iter().find(|(e, _)| rest.starts_with(e)) {
                Some((e, c)) => {
                    out.push_str(c);
                    rest = &rest[e.len()..];
                }
                None => {
                    out.push('&');
                    rest = &rest[1..];
                }
            }
        }
    }
    out.push_str(rest);
    out
}

/// Lines of at most `max` points: breaks at spaces, and inside a word longer than a line (a
/// hash) wherever it must.
fn wrap(text: &[u8], font: Font, size: f64, max: f64) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    for word in text.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let candidate_w = width(&line, font, size)
            + if line.is_empty() {
                0.0
            } else {
                width(b" ", font, size)
            }
            + width(word, font, size);
        if candidate_w <= max {
            if !line.is_empty() {
                line.push(b' ');
            }
            line.extend_from_slice(word);
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        let mut word = word;
        while width(word, font, size) > max {
            let mut n = 1;
            while n < word.len() && width(&word[..n + 1], font, size) <= max {
                n += 1;
            }
            lines.push(word[..n].to_vec());
            word = &word[n..];
        }
        line.extend_from_slice(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    if lines.is_empty() {
        lines.push(Vec::new());
    }
    lines
}

/// A PDF string literal.
fn literal(text: &[u8]) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('(');
    for &b in text {
        match b {
            b'(' | b')' | b'\\' => {
                s.push('\\');
                s.push(b as char);
            }
            32..=126 => s.push(b as char),
            _ => {
                let _ = write!(s, "\\{b:03o}");
            }
        }
    }
    s.push(')');
    s
}

fn rgb(colour: &str) -> (f64, f64, f64) {
    let hex = colour.trim_start_matches('#');
    let c = |i: usize| {
        u8::from_str_radix(hex.get(i..i + 2).unwrap_or("00"), 16).unwrap_or(0) as f64 / 255.0
    };
    (c(0), c(2), c(4))
}

/// Pages under construction: each page's content stream and the cursor's height.
struct Writer {
    pages: Vec<String>,
    page: String,
    y: f64,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            pages: Vec::new(),
            page: String::new(),
            y: PAGE_H - MARGIN,
        }
    }

    fn new_page(&mut self) {
        self.pages.push(std::mem::take(&mut self.page));
        self.y = PAGE_H - MARGIN;
    }

    /// Starts a new page unless `h` points fit above the bottom margin.
    fn room(&mut self, h: f64) {
        if self.y - h < BOTTOM && self.y < PAGE_H - MARGIN {
            self.new_page();
        }
    }

    fn fill(&mut self, colour: &str) {
        let (r, g, b) = rgb(colour);
        let _ = writeln!(self.page, "{r:.3} {g:.3} {b:.3} rg");
    }

    fn show(&mut self, x: f64, y: f64, font: Font, size: f64, text: &[u8]) {
        let _ = writeln!(
            self.page,
            "BT /{} {size} Tf {x:.2} {y:.2} Td {} Tj ET",
            font.name(),
            literal(text)
        );
    }

    /// Wrapped text from the cursor down, `indent` points in.
    fn text(&mut self, html: &str, font: Font, size: f64, indent: f64, colour: &str) {
        let lead = size * 1.35;
        let lines = wrap(&win_ansi(&plain(html)), font, size, TEXT_W - indent);
        self.fill(colour);
        for l in lines {
            self.room(lead);
            self.y -= lead;
            self.show(MARGIN + indent, self.y + size * 0.3, font, size, &l);
        }
    }

    fn gap(&mut self, h: f64) {
        self.y -= h;
    }

    fn heading(&mut self, text: &str) {
        self.room(60.0);
        self.gap(12.0);
        self.text(text, Font::Bold, 13.0, 0.0, "#1a1a1a");
        let _ = writeln!(
            self.page,
            "0.6 0.6 0.6 RG 0.5 w {MARGIN} {y:.2} m {x:.2} {y:.2} l S",
            y = self.y - 3.0,
            x = PAGE_W - MARGIN
        );
        self.gap(6.0);
    }

    /// Rows of cells in columns of `widths` points; `bold_first` heads each row with its first
    /// cell; a header row is bold.
    fn rows(&mut self, widths: &[f64], rows: &[Vec<String>], header: bool, bold_first: bool) {
        let size = 9.0;
        let lead = size * 1.35;
        for (r, row) in rows.iter().enumerate() {
            let cells: Vec<(Font, Vec<Vec<u8>>)> = row
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(i, (cell, w))| {
                    let font = if (header && r == 0) || (bold_first && i == 0) {
                        Font::Bold
                    } else {
                        Font::Regular
                    };
                    (font, wrap(&win_ansi(&plain(cell)), font, size, w - 6.0))
                })
                .collect();
            let n = cells.iter().map(|(_, l)| l.len()).max().unwrap_or(1);
            let h = n as f64 * lead + 4.0;
            self.room(h);
            if header && r == 0 {
                self.fill("#eeeeee");
                let _ = writeln!(self.page, "{MARGIN} {:.2} {TEXT_W} {h:.2} re f", self.y - h);
            }
            self.fill("#1a1a1a");
            let mut x = MARGIN;
            for ((font, lines), w) in cells.iter().zip(widths) {
                for (k, l) in lines.iter().enumerate() {
                    let y = self.y - (k + 1) as f64 * lead + size * 0.3;
                    self.show(x + 3.0, y, *font, size, l);
                }
                x += w;
            }
            self.y -= h;
            let _ = writeln!(
                self.page,
                "0.75 0.75 0.75 RG 0.4 w {MARGIN} {y:.2} m {x:.2} {y:.2} l S",
                y = self.y,
                x = PAGE_W - MARGIN
            );
        }
        self.gap(6.0);
    }

    fn figure(&mut self, p: &super::Plot, caption: &str) {
        let scale = TEXT_W / plot::W;
        let h = plot::H * scale;
        self.room(h + 40.0);
        let top = self.y - 4.0;
        let mut canvas = PdfCanvas {
            out: String::new(),
            x0: MARGIN,
            top,
            scale,
        };
        p.draw(&mut canvas);
        self.page.push_str("q\n");
        self.page.push_str(&canvas.out);
        self.page.push_str("Q\n");
        self.y = top - h - 2.0;
        self.text(caption, Font::Regular, 8.5, 0.0, "#333333");
        self.gap(8.0);
    }

    fn finish(mut self, sha256: &str) -> Vec<String> {
        self.new_page();
        let n = self.pages.len();
        let footer = |i: usize| {
            format!(
                "hallmark verification report, page {} of {n}. Verdict JSON sha256 {sha256}",
                i + 1
            )
        };
        self.pages
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "{p}0.35 0.35 0.35 rg\nBT /F1 7 Tf {MARGIN} 30 Td {} Tj ET\n",
                    literal(&win_ansi(&footer(i)))
                )
            })
            .collect()
    }
}

/// The plots' canvas on a PDF page: plot units scaled by `scale`, y turned up, origin at
/// (`x0`, `top`).
struct PdfCanvas {
    out: String,
    x0: f64,
    top: f64,
    scale: f64,
}

impl PdfCanvas {
    fn at(&self, (x, y): (f64, f64)) -> (f64, f64) {
        (self.x0 + x * self.scale, self.top - y * self.scale)
    }

    fn colour(&mut self, colour: &str, stroke: bool) {
        let (r, g, b) = rgb(colour);
        let op = if stroke { "RG" } else { "rg" };
        let _ = writeln!(self.out, "{r:.3} {g:.3} {b:.3} {op}");
    }

    fn path(&mut self, points: &[(f64, f64)]) {
        for (i, &p) in points.iter().enumerate() {
            let (x, y) = self.at(p);
            let _ = write!(
                self.out,
                "{x:.2} {y:.2} {} ",
                if i == 0 { "m" } else { "l" }
            );
        }
    }
}

impl Canvas for PdfCanvas {
    fn line(&mut self, from: (f64, f64), to: (f64, f64), colour: &str, dashed: bool) {
        self.colour(colour, true);
        let _ = writeln!(
            self.out,
            "0.6 w {}",
            if dashed { "[3 3] 0 d" } else { "[] 0 d" }
        );
        self.path(&[from, to]);
        self.out.push_str("S\n[] 0 d\n");
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, _title: &str) {
        if h <= 0.0 || w <= 0.0 {
            return;
        }
        self.colour(fill, false);
        let (px, py) = self.at((x, y + h));
        let _ = writeln!(
            self.out,
            "{px:.2} {py:.2} {:.2} {:.2} re f",
            w * self.scale,
            h * self.scale
        );
    }

    fn polygon(&mut self, points: &[(f64, f64)], fill: &str, _title: &str) {
        self.colour(fill, false);
        self.path(points);
        self.out.push_str("h f\n");
    }

    fn circle(&mut self, (cx, cy): (f64, f64), r: f64, fill: &str, _title: &str) {
        // Four Bézier quarters (control points at 0.5523 of the radius).
        self.colour(fill, false);
        let (x, y) = self.at((cx, cy));
        let r = r * self.scale;
        let k = 0.5523 * r;
        let _ = writeln!(
            self.out,
            "{:.2} {y:.2} m {:.2} {:.2} {:.2} {:.2} {x:.2} {:.2} c \
             {:.2} {:.2} {:.2} {:.2} {:.2} {y:.2} c \
             {:.2} {:.2} {:.2} {:.2} {x:.2} {:.2} c \
             {:.2} {:.2} {:.2} {:.2} {:.2} {y:.2} c f",
            x + r,
            x + r,
            y + k,
            x + k,
            y + r,
            y + r,
            x - k,
            y + r,
            x - r,
            y + k,
            x - r,
            x - r,
            y - k,
            x - k,
            y - r,
            y - r,
            x + k,
            y - r,
            x + r,
            y - k,
            x + r
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], colour: &str, width: f64) {
        if points.is_empty() {
            return;
        }
        self.colour(colour, true);
        let _ = writeln!(self.out, "{:.2} w", width * self.scale);
        self.path(points);
        self.out.push_str("S\n");
    }

    fn text(
        &mut self,
        at: (f64, f64),
        size: f64,
        anchor: Anchor,
        vertical: bool,
        colour: &str,
        text: &str,
    ) {
        let bytes = win_ansi(text);
        let size = size * self.scale;
        let shift = match anchor {
            Anchor::Start => 0.0,
            Anchor::Middle => width(&bytes, Font::Regular, size) / 2.0,
            Anchor::End => width(&bytes, Font::Regular, size),
        };
        self.colour(colour, false);
        let (x, y) = self.at(at);
        let m = if vertical {
            format!("0 1 -1 0 {x:.2} {:.2}", y - shift)
        } else {
            format!("1 0 0 1 {:.2} {y:.2}", x - shift)
        };
        let _ = writeln!(
            self.out,
            "BT /F1 {size:.2} Tf {m} Tm {} Tj ET",
            literal(&bytes)
        );
    }
}

/// The document as PDF bytes.
pub(super) fn render(d: &Document) -> Vec<u8> {
    let mut w = Writer::new();
    w.text("Verification report", Font::Bold, 18.0, 0.0, "#1a1a1a");
    w.gap(8.0);
    // The decision in a tinted box with a bar on its left.
    let (tint, bar) = match d.decision {
        "used" => ("#fbeaea", "#8a1c1c"),
        "not_shown" => ("#e9f5ec", "#1f5f2e"),
        _ => ("#fbf4dc", "#7a5b00"),
    };
    let size = 11.0;
    let lead = size * 1.35;
    let title = win_ansi(&format!("{}.", d.title));
    let lines = wrap(
        &win_ansi(&plain(&d.headline)),
        Font::Regular,
        size,
        TEXT_W - 24.0,
    );
    let h = (lines.len() + 1) as f64 * lead + 14.0;
    w.room(h);
    w.fill(tint);
    let _ = writeln!(w.page, "{MARGIN} {:.2} {TEXT_W} {h:.2} re f", w.y - h);
    w.fill(bar);
    let _ = writeln!(w.page, "{MARGIN} {:.2} 5 {h:.2} re f", w.y - h);
    w.fill("#1a1a1a");
    let mut y = w.y - 7.0 - lead;
    w.show(MARGIN + 14.0, y + size * 0.3, Font::Bold, size, &title);
    for l in &lines {
        y -= lead;
        w.show(MARGIN + 14.0, y + size * 0.3, Font::Regular, size, l);
    }
    w.y -= h + 4.0;

    for block in &d.blocks {
        match block {
            Block::Heading(h) => w.heading(&super::escape(h)),
            Block::Para(p) => {
                w.text(p, Font::Regular, 10.0, 0.0, "#1a1a1a");
                w.gap(4.0);
            }
            Block::Bullets(items) => {
                for i in items {
                    w.room(14.0);
                    w.fill("#1a1a1a");
                    w.show(MARGIN + 4.0, w.y - 13.5 + 3.0, Font::Regular, 10.0, &[0x95]);
                    w.text(i, Font::Regular, 10.0, 16.0, "#1a1a1a");
                    w.gap(2.0);
                }
                w.gap(2.0);
            }
            Block::Facts(rows) => {
                let rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|(k, v)| vec![k.clone(), v.clone()])
                    .collect();
                w.rows(&[150.0, TEXT_W - 150.0], &rows, false, true);
            }
            Block::Table(head, rows) => {
                let mut all = vec![head.clone()];
                all.extend(rows.iter().cloned());
                // Columns in proportion to their longest cell (at least 40 points).
                let cols = head.len();
                let longest: Vec<f64> = (0..cols)
                    .map(|c| {
                        all.iter()
                            .filter_map(|r| r.get(c))
                            .map(|s| plain(s).chars().count().min(40) as f64)
                            .fold(4.0, f64::max)
                    })
                    .collect();
                let total: f64 = longest.iter().sum();
                let widths: Vec<f64> = longest
                    .iter()
                    .map(|l| (l / total * TEXT_W).max(40.0))
                    .collect();
                let over: f64 = widths.iter().sum::<f64>() / TEXT_W;
                let widths: Vec<f64> = widths.iter().map(|w| w / over).collect();
                w.rows(&widths, &all, true, true);
            }
            Block::Figure(p, caption) => w.figure(p, caption),
        }
    }
    w.heading("This document");
    w.text(
        &format!(
            "It summarises the verdict whose canonical JSON has sha256 {}.",
            d.sha256
        ),
        Font::Regular,
        10.0,
        0.0,
        "#1a1a1a",
    );
    assemble(&w.finish(&d.sha256))
}

/// The file: catalog, page tree, fonts, each page and its content, the cross-reference table.
fn assemble(pages: &[String]) -> Vec<u8> {
    let n = pages.len();
    // Objects: 1 catalog, 2 pages, 3–4 fonts, 5 info, then a page and its content per page.
    let mut objects: Vec<String> = vec![
        "<< /Type /Catalog /Pages 2 0 R >>".into(),
        format!(
            "<< /Type /Pages /Count {n} /Kids [{}] >>",
            (0..n)
                .map(|i| format!("{} 0 R", 6 + 2 * i))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".into(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>"
            .into(),
        "<< /Title (hallmark verification report) /Producer (hallmark) >>".into(),
    ];
    for (i, content) in pages.iter().enumerate() {
        objects.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] \
             /Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> /Contents {} 0 R >>",
            7 + 2 * i
        ));
        objects.push(format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ));
    }
    let mut out: Vec<u8> = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for off in offsets {
        let _ = writeln!(table, "{off:010} 00000 n ");
    }
    let _ = write!(
        table,
        "trailer\n<< /Size {} /Root 1 0 R /Info 5 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    );
    out.extend_from_slice(table.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_reduced_to_plain_win_ansi_and_wrapped_inside_the_line() {
        assert_eq!(
            plain("p = 3.1 × 10<sup>-7</sup> &amp; <code>a&lt;b</code>"),
            "p = 3.1 × 10^-7 & a<b"
        );
        assert_eq!(win_ansi("H₀ – α ≤ τ"), b"H0 \x96 alpha <= tau".to_vec());
        assert_eq!(literal(b"a(b)\\\x96"), "(a\\(b\\)\\\\\\226)");
        let hash = "f".repeat(64);
        let text = win_ansi(&format!("a commitment {hash} and more words after it"));
        let lines = wrap(&text, Font::Regular, 10.0, 120.0);
        assert!(lines.len() > 3, "{lines:?}");
        for l in &lines {
            assert!(width(l, Font::Regular, 10.0) <= 120.0, "{l:?}");
        }
        let unspaced = |b: &[u8]| {
            b.iter()
                .filter(|&&c| c != b' ')
                .copied()
                .collect::<Vec<u8>>()
        };
        assert_eq!(unspaced(&lines.concat()), unspaced(&text), "nothing lost");
    }
}
