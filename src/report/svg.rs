//! The report's plots as inline SVG: a [`Canvas`] that writes SVG elements, each described for
//! screen readers.

use super::escape;
use super::plot::{Anchor, Canvas, H, W};
use std::fmt::Write;

/// A canvas that writes SVG elements.
pub(super) struct Svg(String);

impl Svg {
    fn open(label: &str) -> Svg {
        Svg(format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" \
             height=\"{H}\" role=\"img\" aria-label=\"{0}\"><title>{0}</title>\
             <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fff\"/>",
            escape(label)
        ))
    }

    fn close(mut self) -> String {
        self.0.push_str("</svg>");
        self.0
    }
}

fn points(p: &[(f64, f64)]) -> String {
    p.iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Canvas for Svg {
    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), colour: &str, dashed: bool) {
        let _ = write!(
            self.0,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{colour}\"{}/>",
            if dashed {
                " stroke-dasharray=\"5 4\""
            } else {
                ""
            }
        );
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: &str) {
        let _ = write!(
            self.0,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\" \
             stroke=\"#fff\"><title>{}</title></rect>",
            escape(title)
        );
    }

    fn polygon(&mut self, p: &[(f64, f64)], fill: &str, title: &str) {
        let _ = write!(
            self.0,
            "<polygon points=\"{}\" fill=\"{fill}\"><title>{}</title></polygon>",
            points(p),
            escape(title)
        );
    }

    fn circle(&mut self, (cx, cy): (f64, f64), r: f64, fill: &str, title: &str) {
        let _ = write!(
            self.0,
            "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{r}\" fill=\"{fill}\"><title>{}</title></circle>",
            escape(title)
        );
    }

    fn polyline(&mut self, p: &[(f64, f64)], colour: &str, width: f64) {
        let _ = write!(
            self.0,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"{width}\"/>",
            points(p)
        );
    }

    fn text(
        &mut self,
        (x, y): (f64, f64),
        size: f64,
        anchor: Anchor,
        vertical: bool,
        colour: &str,
        text: &str,
    ) {
        let anchor = match anchor {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        };
        let turn = if vertical {
            format!(" transform=\"rotate(-90 {x:.1} {y:.1})\"")
        } else {
            String::new()
        };
        let _ = write!(
            self.0,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" fill=\"{colour}\" \
             text-anchor=\"{anchor}\"{turn}>{}</text>",
            escape(text)
        );
    }
}

/// A plot as one inline SVG element described by `label`: `draw` draws it on the canvas.
pub(super) fn render(label: &str, draw: impl FnOnce(&mut Svg)) -> String {
    let mut s = Svg::open(label);
    draw(&mut s);
    s.close()
}
