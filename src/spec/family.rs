//! Trigger families: a spec with a `[family]` section describes a distribution over triggers, and
//! every release draws its own secret member from randomness derived from its record's nonce.
//!
//! Why: a fixed trigger is not secret (the shipped specs are public), two publishers of one spec
//! would share it, and a verdict against it proves only that a model reacts to triggers of that
//! shape. With a secret drawn from a family, the verifier can draw K controls from the same family
//! and rank the secret among them: for a model that was not trained with this release, the
//! secret is one more independent draw, so its rank is uniform (the exchangeability argument of
//! the rank test; compare the random-key nulls of Sablayrolles et al., "Radioactive data", ICML
//! 2020, and Bouaziz et al., "Data Taggants", ICLR 2025).
//!
//! What each kind draws:
//! - patches (BadNets, DVBW, UBW-P, label-consistent, Sleeper Agent, UBW-C, PhysicalBA's inner
//!   patch, Adaptive-Patch's pieces): the pattern, each pixel black or white with at least half of
//!   them white, of the template's size, and its position anywhere it fits;
//! - noise blends (Blended, Adaptive-Blend's pieces): the noise;
//! - image blends (Blended with a pattern image): which image of the spec's folder, and a cyclic
//!   shift of it (where its features fall);
//! - warps (WaNet): the random field;
//! - rotations (BATT): the angle, uniform in a range of magnitudes, either direction;
//! - reflections (Refool): which of the candidate photographs are used;
//! - targeted and clean-label kinds: the target class, uniform over the classes the spec allows;
//! - all-to-all kinds: the class mapping π, uniform over the derangements of the classes (20.3
//!   bits for 10 classes, where a target has 3.3: a model that reacts to every member's trigger
//!   alike still tells the secret's π from the controls').
//!
//! Crafted kinds whose crafting makes the trigger (TUAP's perturbation, ISSBA's encoder) draw a
//! crafting seed for each release: TUAP's samples, ISSBA's encoder and its secret bit string.
//! Their controls cannot be drawn by the verifier from the nonce alone, so the release carries
//! them: ISSBA's encoder takes its bit string as an input (the verifier's controls hide other
//! strings with the same encoder), and a TUAP release is crafted with its controls, each the
//! family's member for a control seed crafted exactly as the secret (see `verify`).

use super::{Labelling, Patch, PatchPattern, Position, SpecError, Trigger, WatermarkSpec, field};
use crate::dataset::ImageShape;
use crate::watermark::rng::{Rng, Stream};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Whether a free parameter is drawn for each release or kept as the spec writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    /// Drawn from the release's secret randomness.
    #[default]
    Drawn,
    /// As the spec writes it.
    Pinned,
}

/// Where a drawn patch may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Anywhere the pattern fits.
    #[default]
    Drawn,
    /// Anywhere along the border: the pattern touches an edge of the image (off the object in
    /// most photographs and in Fashion-MNIST, where backdoor patches are learnt fastest).
    Edge,
    /// Where the spec puts it.
    Pinned,
}

/// The `[family]` section of a spec: which free parameters each release draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    /// The target class (targeted and clean-label kinds) or the class mapping (all-to-all). When
    /// drawn, the spec's labelling names no target and no `mapping_seed`.
    #[serde(default)]
    pub target: Choice,
    /// A patch's pattern: black and white pixels of the spec's pattern size, at least half white;
    /// a blend's pattern image: one of the spec's folder.
    #[serde(default)]
    pub pattern: Choice,
    /// A patch's position: anywhere it fits (`drawn`), along the border (`edge`) or as written
    /// (`pinned`); a blend's pattern image is shifted cyclically by a drawn offset unless pinned.
    #[serde(default)]
    pub position: Placement,
    /// Rotations: the angle's magnitude is drawn from this range of degrees, its direction at
    /// random (pinned to the spec's angle when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub angle: Option<[f64; 2]>,
    /// Reflections: how many of the candidate photographs a release uses (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflections: Option<usize>,
}

/// A spec whose trigger is published as is needs `--public-trigger` below this many bits of
/// entropy. The rank test's false-positive rate does not depend on it (another release's
/// trigger, even an identical one, is drawn independently of ours); its power and the trigger's
/// secrecy do: with few members, controls often equal the secret, and a thief can try every
/// member to unlearn them. 12 bits (one chance in 4096 that two releases share a trigger) admits
/// BATT's rotations (the angle in tenths of a degree over [8°, 32°] either way, and the target).
pub const MIN_ENTROPY_BITS: f64 = 12.0;

/// One free parameter of a family and how many values it can take.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entropy {
    /// What is drawn (`target`, `trigger.position`, …).
    pub parameter: String,
    /// log2 of the number of values it can take.
    pub bits: f64,
}

/// What a spec draws for each release, parameter by parameter (empty for a fixed spec).
pub fn entropy(
    spec: &WatermarkSpec,
    num_classes: usize,
    shape: ImageShape,
) -> Result<Vec<Entropy>, SpecError> {
    let Some(f) = &spec.family else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    if f.target == Choice::Drawn && spec.labelling.target().is_some() {
        let n = target_classes(spec, num_classes).len();
        out.push(Entropy {
            parameter: "target".into(),
            bits: (n as f64).log2(),
        });
    }
    if f.target == Choice::Drawn && matches!(spec.labelling, Labelling::AllToAll { .. }) {
        out.push(Entropy {
            parameter: "labelling.mapping".into(),
            bits: log2_derangements(num_classes),
        });
    }
    trigger_entropy(f, &spec.trigger, shape, "trigger", &mut out)?;
    if spec.crafting().is_some_and(super::Crafting::makes_trigger) {
        // TUAP's samples, ISSBA's encoder (initial weights, training order): distinct seeds
        // craft distinct triggers, though for TUAP, perturbations towards one class crafted
        // against one model resemble each other (the rank test's controls measure how much).
        out.push(Entropy {
            parameter: "crafting.seed".into(),
            bits: 64.0,
        });
    }
    if let Some(e) = spec.encoder {
        // ISSBA's hidden secret, drawn per release.
        out.push(Entropy {
            parameter: "encoder.secret".into(),
            bits: e.secret_size as f64,
        });
    }
    Ok(out)
}

/// Total bits of a spec's family.
pub fn entropy_bits(
    spec: &WatermarkSpec,
    num_classes: usize,
    shape: ImageShape,
) -> Result<f64, SpecError> {
    Ok(entropy(spec, num_classes, shape)?
        .iter()
        .map(|e| e.bits)
        .sum())
}

fn trigger_entropy(
    f: &Family,
    t: &Trigger,
    shape: ImageShape,
    at: &str,
    out: &mut Vec<Entropy>,
) -> Result<(), SpecError> {
    let mut push = |p: &str, bits: f64| {
        out.push(Entropy {
            parameter: format!("{at}.{p}"),
            bits,
        })
    };
    match t {
        Trigger::Patch(p) => {
            let rows = p.rows(shape.width)?;
            let (ph, pw) = (rows.len(), rows[0].len());
            if f.pattern == Choice::Drawn {
                push("pattern", log2_patterns(ph * pw));
            }
            if f.position != Placement::Pinned && p.scale.is_some() {
                // A scaled patch is drawn at a relative place; on a small image several places
                // round to the same pixels, so count the distinct ones at this shape.
                let all = RelativePlaces(f.position);
                let mut at = std::collections::HashSet::new();
                for k in 0..all.len() {
                    let mut q = p.clone();
                    q.position = Position::Relative(all.nth(k));
                    let (_, r, c) = q.grid(shape.height, shape.width)?;
                    at.insert((r, c));
                }
                push("position", (at.len() as f64).log2());
            } else if f.position != Placement::Pinned && ph <= shape.height && pw <= shape.width {
                let places = places(f.position, shape, ph, pw).len();
                push("position", (places as f64).log2());
            }
        }
        Trigger::Blend(b) if b.source == super::BlendSource::Noise => push("noise", 64.0),
        Trigger::Blend(b) => {
            if f.pattern == Choice::Drawn && b.candidates.len() > 1 {
                push("image", (b.candidates.len() as f64).log2());
            }
            if f.position != Placement::Pinned {
                // At most: a pattern that repeats itself has fewer distinct shifts.
                let size = b
                    .pattern
                    .as_ref()
                    .or(b.candidates.first())
                    .map_or(shape.height * shape.width, |p| {
                        p.shape.height * p.shape.width
                    });
                push("shift", (size as f64).log2());
            }
        }
        Trigger::Warp(_) => push("field", 64.0),
        Trigger::Rotate(_) => {
            if let Some([lo, hi]) = f.angle {
                // Tenths of a degree, either direction.
                push(
                    "angle",
                    (2.0 * ((hi - lo) * 10.0).round().max(0.0) + 2.0).log2(),
                );
            }
        }
        Trigger::Reflection(r) => {
            if let Some(k) = f.reflections {
                push("reflections", log2_choose(r.candidates.len(), k));
            }
        }
        Trigger::Adaptive(a) => {
            for (k, p) in a.pieces.iter().enumerate() {
                trigger_entropy(f, p, shape, &format!("{at}.pieces[{k}]"), out)?;
            }
        }
        Trigger::Physical(p) => trigger_entropy(f, &p.inner, shape, &format!("{at}.inner"), out)?,
        Trigger::Perturbation(_) | Trigger::Generated(_) => {}
    }
    Ok(())
}

/// The top-left corners a drawn `ph` × `pw` patch may take: how many there are, and the k-th
/// of them (computed, not listed: an image may be 4096 pixels a side).
struct Places {
    placement: Placement,
    rows: usize,
    cols: usize,
}

fn places(placement: Placement, shape: ImageShape, ph: usize, pw: usize) -> Places {
    Places {
        placement,
        rows: shape.height - ph + 1,
        cols: shape.width - pw + 1,
    }
}

impl Places {
    fn len(&self) -> usize {
        let (r, c) = (self.rows, self.cols);
        match self.placement {
            Placement::Edge if r > 2 && c > 1 => 2 * c + 2 * (r - 2),
            _ => r * c,
        }
    }

    fn nth(&self, k: usize) -> (usize, usize) {
        let (r, c) = (self.rows, self.cols);
        match self.placement {
            // The top row, the bottom row, then the left and right ends of the rows between.
            Placement::Edge if r > 2 && c > 1 => {
                if k < c {
                    (0, k)
                } else if k < 2 * c {
                    (r - 1, k - c)
                } else {
                    let j = k - 2 * c;
                    (1 + j / 2, if j.is_multiple_of(2) { 0 } else { c - 1 })
                }
            }
            _ => (k / c, k % c),
        }
    }
}

/// Steps of a drawn relative position along each axis: shares 0, 1/64, …, 1.
const RELATIVE_STEPS: usize = 64;

/// The relative positions a drawn patch of an any-size spec may take (its size is not known
/// until it is stamped): a 65 × 65 grid of shares of the free room, or the grid's border.
struct RelativePlaces(Placement);

impl RelativePlaces {
    fn len(&self) -> usize {
        let n = RELATIVE_STEPS + 1;
        match self.0 {
            Placement::Edge => 4 * n - 4,
            _ => n * n,
        }
    }

    fn nth(&self, k: usize) -> super::trigger::RelativePosition {
        let n = RELATIVE_STEPS + 1;
        let (r, c) = match self.0 {
            // The top row, the bottom row, then the left and right ends of the rows between.
            Placement::Edge => {
                if k < n {
                    (0, k)
                } else if k < 2 * n {
                    (RELATIVE_STEPS, k - n)
                } else {
                    let j = k - 2 * n;
                    (
                        1 + j / 2,
                        if j.is_multiple_of(2) {
                            0
                        } else {
                            RELATIVE_STEPS
                        },
                    )
                }
            }
            _ => (k / n, k % n),
        };
        let share = |i: usize| i as f64 / RELATIVE_STEPS as f64;
        super::trigger::RelativePosition {
            row: share(r),
            col: share(c),
        }
    }
}

/// The fewest white pixels a drawn pattern of `n` pixels has: half of them, rounded up. On the
/// black backgrounds of many images a black pixel is invisible, so a pattern is in effect its
/// white pixels; with at least half of them white, two different (pattern, position) pairs
/// rarely leave the same white pixels, and members stay distinguishable.
fn min_white(n: usize) -> usize {
    n.div_ceil(2)
}

/// log2 of the number of black-and-white patterns of `n` pixels with at least half white.
fn log2_patterns(n: usize) -> f64 {
    if n > 60 {
        // Close to 2^(n − 1): a bit below n − 1 bits, never above.
        return (n - 1) as f64;
    }
    let count: f64 = (min_white(n)..=n).map(|k| log2_choose(n, k).exp2()).sum();
    count.log2()
}

/// log2 of the number of derangements of `n` classes (!n = round(n!/e) for n ≥ 1).
fn log2_derangements(n: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    if n <= 20 {
        // !n = (n − 1)(!(n − 1) + !(n − 2)), exact in u64 up to n = 20.
        let (mut a, mut b) = (1u64, 0u64); // !0, !1
        for k in 2..=n as u64 {
            (a, b) = (b, (k - 1) * (a + b));
        }
        return (b as f64).log2();
    }
    (1..=n).map(|k| (k as f64).log2()).sum::<f64>() - std::f64::consts::LOG2_E
}

fn log2_choose(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    (0..k)
        .map(|i| ((n - i) as f64 / (i + 1) as f64).log2())
        .sum()
}

/// Checks a `[family]` section against the rest of the spec.
pub(super) fn validate(spec: &WatermarkSpec) -> Result<(), SpecError> {
    let Some(f) = &spec.family else {
        return Ok(());
    };
    if let Some([lo, hi]) = f.angle {
        if !matches!(spec.trigger, Trigger::Rotate(_)) {
            return Err(field(
                "family.angle",
                "only rotation triggers have an angle",
            ));
        }
        if !(lo.is_finite() && hi.is_finite() && 1.0 <= lo && lo <= hi && hi <= 180.0) {
            return Err(field(
                "family.angle",
                format!("must be [low, high] degrees with 1 ≤ low ≤ high ≤ 180, got [{lo}, {hi}]"),
            ));
        }
    }
    if let Trigger::Blend(b) = &spec.trigger
        && !b.candidates.is_empty()
        && f.pattern == Choice::Pinned
    {
        return Err(field(
            "family.pattern",
            "a folder of blend images is drawn from: leave family.pattern drawn, or name one \
             image with `image`",
        ));
    }
    if let Some(k) = f.reflections {
        let Trigger::Reflection(r) = &spec.trigger else {
            return Err(field(
                "family.reflections",
                "only reflection triggers draw photographs",
            ));
        };
        if k == 0 || (!r.candidates.is_empty() && k > r.candidates.len()) {
            return Err(field(
                "family.reflections",
                format!(
                    "must be 1 to the {} candidate photographs, got {k}",
                    r.candidates.len()
                ),
            ));
        }
    }
    Ok(())
}

/// The classes a drawn target may be: every class but the source classes (a targeted backdoor
/// sends them elsewhere).
fn target_classes(spec: &WatermarkSpec, num_classes: usize) -> Vec<u32> {
    (0..num_classes as u32)
        .filter(|c| spec.source_classes.as_ref().is_none_or(|s| !s.contains(c)))
        .collect()
}

/// A seed derived from a record's nonce for one purpose (`purpose` and `index` are mixed in), so
/// that the secret draw, each control and the verifier's image order are independent and a
/// re-run repeats them.
pub fn derived_seed(nonce: &[u8], purpose: &str, index: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(b"hallmark/v2/");
    h.update(purpose.as_bytes());
    h.update([0]);
    h.update(nonce);
    h.update(index.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The seed of the verifier's control `j` for a record's nonce. A crafted family (TUAP) crafts
/// the member each seed draws with the release, so the two must agree.
pub fn control_seed(nonce: &[u8], j: usize) -> u64 {
    derived_seed(nonce, "control", j as u64)
}

/// The member of `spec`'s family drawn with `seed`: a spec without a `[family]` section, every
/// free parameter fixed. A spec without a family is returned as it is.
pub fn draw(
    spec: &WatermarkSpec,
    num_classes: usize,
    shape: ImageShape,
    seed: u64,
) -> Result<WatermarkSpec, SpecError> {
    let Some(f) = &spec.family else {
        return Ok(spec.clone());
    };
    let mut rng = Rng::new(seed, Stream::Family);
    let mut out = spec.clone();
    out.family = None;
    if f.target == Choice::Drawn && spec.labelling.target().is_some() {
        let classes = target_classes(spec, num_classes);
        if classes.is_empty() {
            return Err(field("family.target", "no class is left to be the target"));
        }
        let t = classes[rng.below(classes.len() as u64) as usize];
        out.labelling = match spec.labelling {
            Labelling::Targeted { .. } => Labelling::Targeted { target: t },
            Labelling::CleanLabel { .. } => Labelling::CleanLabel { target: t },
            other => other,
        };
    }
    if f.target == Choice::Drawn && matches!(spec.labelling, Labelling::AllToAll { .. }) {
        out.labelling = Labelling::AllToAll {
            mapping_seed: Some(rng.u64()),
        };
    }
    out.trigger = draw_trigger(f, &spec.trigger, shape, &mut rng)?;
    // A crafted trigger's randomness (TUAP's samples, ISSBA's encoder and secret string) is the
    // release's own, not the spec's.
    if spec.crafting().is_some_and(super::Crafting::makes_trigger) {
        out.seed = rng.u64();
    }
    out.validate()?;
    Ok(out)
}

fn draw_trigger(
    f: &Family,
    t: &Trigger,
    shape: ImageShape,
    rng: &mut Rng,
) -> Result<Trigger, SpecError> {
    Ok(match t {
        Trigger::Patch(p) => {
            let rows = p.rows(shape.width)?;
            let (ph, pw) = (rows.len(), rows[0].len());
            // An any-size patch is drawn in cells and shares: its pixels wait for the image.
            if p.scale.is_none() && (ph > shape.height || pw > shape.width) {
                return Err(field(
                    "trigger.pattern",
                    format!("a {ph}×{pw} pattern does not fit {shape} images"),
                ));
            }
            let pattern = if f.pattern == Choice::Drawn {
                loop {
                    let m: Vec<Vec<u8>> = (0..ph)
                        .map(|_| {
                            (0..pw)
                                .map(|_| if rng.below(2) == 1 { 255 } else { 0 })
                                .collect()
                        })
                        .collect();
                    if m.iter().flatten().filter(|&&v| v == 255).count() >= min_white(ph * pw) {
                        break PatchPattern::Matrix(m);
                    }
                }
            } else {
                PatchPattern::Matrix(rows)
            };
            let position = match f.position {
                Placement::Pinned => p.position,
                placement if p.scale.is_some() => {
                    let all = RelativePlaces(placement);
                    Position::Relative(all.nth(rng.below(all.len() as u64) as usize))
                }
                placement => {
                    let all = places(placement, shape, ph, pw);
                    let (r, c) = all.nth(rng.below(all.len() as u64) as usize);
                    Position::At([r as i64, c as i64])
                }
            };
            Trigger::Patch(Patch {
                pattern,
                size: None,
                thickness: None,
                value: None,
                position,
                alpha: p.alpha,
                scale: p.scale,
            })
        }
        Trigger::Blend(b) if b.source == super::BlendSource::Noise => {
            let mut c = b.clone();
            c.noise_seed = Some(rng.u64());
            Trigger::Blend(c)
        }
        Trigger::Blend(b) => {
            // A pattern image: one of the folder's (Blended's image choice) …
            let mut c = b.clone();
            if !b.candidates.is_empty() {
                let i = rng.below(b.candidates.len() as u64) as usize;
                c.pattern = Some(b.candidates[i].clone());
                c.candidates.clear();
                c.images = None;
            }
            // … shifted cyclically by a drawn offset: where its features fall (its position).
            if f.position != Placement::Pinned
                && let Some(p) = &c.pattern
            {
                let (dr, dc) = (
                    rng.below(p.shape.height as u64) as usize,
                    rng.below(p.shape.width as u64) as usize,
                );
                c.pattern = Some(roll(p, dr, dc)?);
            }
            Trigger::Blend(c)
        }
        Trigger::Warp(w) => {
            let mut c = w.clone();
            c.field_seed = Some(rng.u64());
            Trigger::Warp(c)
        }
        Trigger::Rotate(r) => match f.angle {
            Some([lo, hi]) => {
                let steps = ((hi - lo) * 10.0).round().max(0.0) as u64;
                let magnitude = lo + rng.below(steps + 1) as f64 / 10.0;
                let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
                Trigger::Rotate(super::Rotate {
                    angle: sign * magnitude,
                })
            }
            None => Trigger::Rotate(r.clone()),
        },
        Trigger::Reflection(r) => {
            let mut c = r.clone();
            if let Some(k) = f.reflections {
                let mut idx: Vec<usize> = (0..r.candidates.len()).collect();
                rng.choose_front(&mut idx, k);
                let mut chosen = idx[..k.min(idx.len())].to_vec();
                chosen.sort_unstable();
                c.candidates = chosen.iter().map(|&i| r.candidates[i].clone()).collect();
            }
            Trigger::Reflection(c)
        }
        Trigger::Adaptive(a) => {
            let mut c = a.clone();
            for p in &mut c.pieces {
                *p = draw_trigger(f, p, shape, rng)?;
            }
            Trigger::Adaptive(c)
        }
        Trigger::Physical(p) => {
            let mut c = p.clone();
            c.inner = Box::new(draw_trigger(f, &p.inner, shape, rng)?);
            Trigger::Physical(c)
        }
        other => other.clone(),
    })
}

/// `p` shifted cyclically `dr` rows down and `dc` columns right.
fn roll(p: &super::EmbeddedImage, dr: usize, dc: usize) -> Result<super::EmbeddedImage, SpecError> {
    let px = p.pixels()?;
    let (h, w, ch) = (p.shape.height, p.shape.width, p.shape.channels);
    let mut out = vec![0u8; px.len()];
    for r in 0..h {
        for col in 0..w {
            let to = (((r + dr) % h) * w + (col + dc) % w) * ch;
            let from = (r * w + col) * ch;
            out[to..to + ch].copy_from_slice(&px[from..from + ch]);
        }
    }
    Ok(super::EmbeddedImage::from_pixels(p.shape, &out))
}

/// Whether `spec`'s trigger means the same at every image size (an any-size spec: a scaled
/// patch at a corner or a relative place, noise on a cell grid over the whole image, a
/// rotation), so that it may be stamped on images of another size than the release's: the
/// verifier's queries at a model's input size.
pub fn size_independent(spec: &WatermarkSpec) -> bool {
    match &spec.trigger {
        Trigger::Patch(p) => p.scale.is_some() && !matches!(p.position, Position::At(_)),
        Trigger::Blend(b) => {
            b.source == super::BlendSource::Noise && b.cells.is_some() && b.region.is_none()
        }
        Trigger::Rotate(_) => true,
        _ => false,
    }
}

/// Whether the verifier draws this family's members itself, from a seed: every part of the
/// trigger that a query carries is drawn (crafted perturbations and networks are not).
pub fn draws_trigger(spec: &WatermarkSpec) -> bool {
    spec.family.is_some()
        && !matches!(
            spec.trigger,
            Trigger::Perturbation(_) | Trigger::Generated(_)
        )
}

/// Whether controls of this family are exchangeable with the secret: drawn by the verifier, or
/// crafted with the release (TUAP, ISSBA: the record carries them; records written before
/// releases carried them have none).
pub fn has_exchangeable_controls(spec: &WatermarkSpec) -> bool {
    draws_trigger(spec)
        || (spec.family.is_some() && spec.crafting().is_some_and(super::Crafting::makes_trigger))
}

/// With a `[family]` section that draws the target, the labelling names no target: checks that
/// and fills the placeholder the types need, on the parsed document before it becomes a spec.
pub(super) fn prepare_document(doc: &mut serde_json::Value) -> Result<(), SpecError> {
    let Some(obj) = doc.as_object_mut() else {
        return Ok(());
    };
    let Some(fam) = obj.get("family") else {
        return Ok(());
    };
    let pinned = fam.get("target").and_then(|t| t.as_str()) == Some("pinned");
    if pinned {
        return Ok(());
    }
    let Some(lab) = obj.get("labelling").and_then(|l| l.as_object()) else {
        return Ok(());
    };
    let kind = lab.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind == "all_to_all" && lab.contains_key("mapping_seed") {
        return Err(field(
            "labelling.mapping_seed",
            "this spec's family draws the class mapping for each release: leave mapping_seed \
             out, or set family.target = \"pinned\"",
        ));
    }
    if !matches!(kind, "targeted" | "clean_label") {
        return Ok(());
    }
    if lab.contains_key("target") {
        return Err(field(
            "labelling.target",
            "this spec's family draws the target for each release: leave the target out, or \
             set family.target = \"pinned\"",
        ));
    }
    // A placeholder the template's checks accept (not a source class); each release draws its own.
    let sources: Vec<u64> = obj
        .get("source_classes")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|c| c.as_u64()).collect())
        .unwrap_or_default();
    let placeholder = (0u64..).find(|c| !sources.contains(c)).unwrap_or(0);
    if let Some(lab) = obj.get_mut("labelling").and_then(|l| l.as_object_mut()) {
        lab.insert("target".into(), serde_json::Value::from(placeholder));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: ImageShape = ImageShape {
        height: 28,
        width: 28,
        channels: 1,
    };

    fn shipped(name: &str) -> WatermarkSpec {
        WatermarkSpec::from_toml_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("watermark_specs")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn a_patch_family_draws_pattern_position_and_target_reproducibly() {
        let f = shipped("badnets-square-28x28-grey.toml");
        let a = draw(&f, 10, SHAPE, 1).unwrap();
        assert_eq!(
            a,
            draw(&f, 10, SHAPE, 1).unwrap(),
            "the same seed, the same member"
        );
        assert!(a.family.is_none());
        let members: Vec<WatermarkSpec> =
            (0..200).map(|s| draw(&f, 10, SHAPE, s).unwrap()).collect();
        let mut targets = std::collections::BTreeSet::new();
        let mut places = std::collections::BTreeSet::new();
        for m in &members {
            targets.insert(m.labelling.target().unwrap());
            let Trigger::Patch(p) = &m.trigger else {
                panic!("a patch family draws patches")
            };
            let (rows, r, c) = p.grid(28, 28).unwrap();
            assert_eq!((rows.len(), rows[0].len()), (3, 3));
            assert!(rows.iter().flatten().all(|&v| v == 0 || v == 255));
            assert!(
                rows.iter().flatten().filter(|&&v| v == 255).count() >= 5,
                "at least half white"
            );
            places.insert((r, c));
        }
        assert_eq!(targets.len(), 10, "every class can be the target");
        // 100 places along the border.
        assert!(places.len() > 60, "{} positions in 200 draws", places.len());
        for (r, c) in &places {
            assert!(
                *r == 0 || *c == 0 || *r == 25 || *c == 25,
                "({r}, {c}) is off the edge"
            );
        }
        // log2(256 patterns with 5 to 9 white pixels) + log2(100 places on the edge) + log2(10).
        let bits = entropy_bits(&f, 10, SHAPE).unwrap();
        assert!((bits - 17.97).abs() < 0.01, "{bits}");
    }

    #[test]
    fn an_image_blend_family_draws_one_image_of_its_folder_shifted() {
        let f = shipped("blended-image-28x28-grey.toml");
        let Trigger::Blend(t) = &f.trigger else {
            panic!("a blend")
        };
        assert_eq!(t.candidates.len(), 19, "the folder's 19 scenes");
        let candidates: Vec<Vec<u8>> = t.candidates.iter().map(|c| c.pixels().unwrap()).collect();
        let sorted = |v: &[u8]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v
        };
        let at = |v: &[u8], r: usize, c: usize| v[(r % 28) * 28 + c % 28];
        let (mut images, mut shifts) = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        for seed in 0..60 {
            let m = draw(&f, 10, SHAPE, seed).unwrap();
            let Trigger::Blend(b) = &m.trigger else {
                panic!("a blend")
            };
            assert!(b.candidates.is_empty() && b.images.is_none(), "one image");
            let px = b.pattern.as_ref().unwrap().pixels().unwrap();
            // Which image: a shift keeps its pixel values; where: the shift that maps it on px.
            let i = (0..candidates.len())
                .find(|&i| sorted(&candidates[i]) == sorted(&px))
                .expect("one of the folder's images");
            let shift = (0..28 * 28)
                .map(|k| (k / 28, k % 28))
                .find(|&(dr, dc)| {
                    (0..28 * 28).all(|k| {
                        let (r, c) = (k / 28, k % 28);
                        at(&px, r + dr, c + dc) == candidates[i][k]
                    })
                })
                .expect("the image shifted cyclically");
            images.insert(i);
            shifts.insert(shift);
        }
        assert!(
            images.len() >= 12,
            "{} of 19 images in 60 draws",
            images.len()
        );
        assert!(shifts.len() >= 50, "{} shifts in 60 draws", shifts.len());
        // log2(19 images) + log2(784 shifts) + log2(10 targets).
        let e = entropy(&f, 10, SHAPE).unwrap();
        let bits = |p: &str| e.iter().find(|x| x.parameter == p).unwrap().bits;
        assert!((bits("trigger.image") - 19f64.log2()).abs() < 1e-9);
        assert!((bits("trigger.shift") - 784f64.log2()).abs() < 1e-9);
        let total = entropy_bits(&f, 10, SHAPE).unwrap();
        assert!(
            (total - 17.18).abs() < 0.01 && total >= MIN_ENTROPY_BITS,
            "{total}"
        );
    }

    #[test]
    fn a_folder_of_blend_images_is_drawn_from_by_a_family_only() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs");
        let text = std::fs::read_to_string(dir.join("blended-image-28x28-grey.toml")).unwrap();
        let load = |t: &str| WatermarkSpec::from_toml_str(t, Some(&dir), "test");
        let err = |t: &str| load(t).unwrap_err().to_string();
        let fixed = text
            .replace("[family]\n", "")
            .replace("kind = \"targeted\"", "kind = \"targeted\"\ntarget = 1");
        assert!(err(&fixed).contains("a family's"), "{}", err(&fixed));
        let both = text.replace(
            "alpha = 0.2",
            "alpha = 0.2\nimage = \"reflections/scene-00.png\"",
        );
        assert!(err(&both).contains("not both"), "{}", err(&both));
        let pinned = text.replace("[family]\n", "[family]\npattern = \"pinned\"\n");
        assert!(err(&pinned).contains("family.pattern"), "{}", err(&pinned));
        let missing = text.replace("\"reflections\"", "\"no-such-folder\"");
        assert!(
            err(&missing).contains("no-such-folder"),
            "{}",
            err(&missing)
        );
        // One image file in a family: its shift is drawn, nothing else about it.
        let one = text.replace(
            "images = \"reflections\"",
            "image = \"reflections/scene-00.png\"",
        );
        let spec = load(&one).unwrap();
        let e = entropy(&spec, 10, SHAPE).unwrap();
        assert!(e.iter().all(|x| x.parameter != "trigger.image"));
        assert!(e.iter().any(|x| x.parameter == "trigger.shift"));
    }

    #[test]
    fn roll_shifts_rows_down_and_columns_right_cyclically() {
        use base64::Engine as _;
        let enc = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let p = super::super::EmbeddedImage {
            shape: ImageShape {
                height: 2,
                width: 3,
                channels: 1,
            },
            pixels_b64: enc(&[1, 2, 3, 4, 5, 6]),
        };
        assert_eq!(
            roll(&p, 1, 1).unwrap().pixels().unwrap(),
            [6, 4, 5, 3, 1, 2]
        );
        assert_eq!(roll(&p, 0, 0).unwrap(), p);
    }

    #[test]
    fn every_family_draws_what_it_says() {
        let warp = shipped("wanet-28x28-grey.toml");
        let (a, b) = (
            draw(&warp, 10, SHAPE, 1).unwrap(),
            draw(&warp, 10, SHAPE, 2).unwrap(),
        );
        let field = |s: &WatermarkSpec| match &s.trigger {
            Trigger::Warp(w) => w.field_seed,
            _ => None,
        };
        assert!(field(&a).is_some() && field(&a) != field(&b));
        let batt = shipped("batt-rotate-28x28-grey.toml");
        for s in 0..100 {
            let Trigger::Rotate(r) = draw(&batt, 10, SHAPE, s).unwrap().trigger else {
                panic!("a rotation")
            };
            assert!((8.0..=32.0).contains(&r.angle.abs()), "{}", r.angle);
        }
        assert!(entropy_bits(&batt, 10, SHAPE).unwrap() >= MIN_ENTROPY_BITS);
        let blend = shipped("blended-28x28-grey.toml");
        let Trigger::Blend(b) = draw(&blend, 10, SHAPE, 5).unwrap().trigger else {
            panic!("a blend")
        };
        assert!(b.noise_seed.is_some());
        // A single pixel anywhere, to any class: 9.6 + 3.3 bits.
        let pixel = shipped("badnets-28x28-grey.toml");
        assert!((entropy_bits(&pixel, 10, SHAPE).unwrap() - 12.94).abs() < 0.01);
        // TUAP's crafted perturbation draws its target and its crafting seed (its samples).
        let tuap = shipped("tuap-28x28-grey.toml");
        assert!((entropy_bits(&tuap, 10, SHAPE).unwrap() - 67.32).abs() < 0.01);
        let seeds: std::collections::HashSet<u64> = (0..20)
            .map(|s| draw(&tuap, 10, SHAPE, s).unwrap().seed)
            .collect();
        assert_eq!(seeds.len(), 20, "each member its own crafting seed");
        // A patch of 2-pixel blocks (6 × 6) drawn along the border of a 28 × 28 image: its
        // relative places round to the 88 border positions of a 6 × 6 patch, whatever the grid.
        let block = shipped("physical-block-28x28-grey.toml");
        let position = entropy(&block, 10, SHAPE).unwrap();
        let position = position.iter().find(|e| e.parameter.ends_with("position"));
        assert!(
            (position.unwrap().bits - 88f64.log2()).abs() < 1e-9,
            "{position:?}"
        );
        let large = ImageShape {
            height: 1024,
            width: 768,
            channels: 1,
        };
        let position = entropy(&block, 10, large).unwrap();
        let position = position.iter().find(|e| e.parameter.ends_with("position"));
        assert_eq!(
            position.unwrap().bits,
            8.0,
            "256 distinct places on a large image"
        );
        // A fixed spec draws nothing.
        let fixed = shipped("fixed/badnets-square-28x28-grey.toml");
        assert!(entropy(&fixed, 10, SHAPE).unwrap().is_empty());
        assert_eq!(draw(&fixed, 10, SHAPE, 9).unwrap(), fixed);
    }

    #[test]
    fn a_drawn_target_is_never_a_source_class() {
        let text = "name = \"s\"\nrate = 0.1\nseed = 1\nsource_classes = [0, 1, 2]\n\
                    [labelling]\nkind = \"targeted\"\n[family]\n\
                    [trigger]\nkind = \"patch\"\npattern = \"square\"\n";
        let f = WatermarkSpec::from_toml_str(text, None, "s").unwrap();
        for s in 0..100 {
            let t = draw(&f, 10, SHAPE, s).unwrap().labelling.target().unwrap();
            assert!(t >= 3, "{t}");
        }
    }

    #[test]
    fn a_family_that_draws_the_target_refuses_a_written_one() {
        let text = "name = \"s\"\nrate = 0.1\nseed = 1\n[labelling]\nkind = \"targeted\"\n\
                    target = 4\n[family]\n[trigger]\nkind = \"patch\"\npattern = \"square\"\n";
        let e = WatermarkSpec::from_toml_str(text, None, "s").unwrap_err();
        assert!(e.to_string().starts_with("labelling.target:"), "{e}");
        let pinned = text.replace("[family]\n", "[family]\ntarget = \"pinned\"\n");
        let f = WatermarkSpec::from_toml_str(&pinned, None, "s").unwrap();
        assert_eq!(draw(&f, 10, SHAPE, 3).unwrap().labelling.target(), Some(4));
        let e = WatermarkSpec::from_user_json(serde_json::json!({
            "name": "j", "rate": 0.1, "seed": 1,
            "labelling": {"kind": "targeted", "target": 2},
            "family": {},
            "trigger": {"kind": "patch", "pattern": "square"}
        }))
        .unwrap_err();
        assert!(e.to_string().starts_with("labelling.target:"), "{e}");
    }

    #[test]
    fn an_all_to_all_family_draws_a_derangement_for_each_release() {
        let f = shipped("wanet-all-to-all-28x28-grey.toml");
        let mut seen = std::collections::BTreeSet::new();
        let mut firsts = [0usize; 10];
        for s in 0..2000 {
            let m = draw(&f, 10, SHAPE, s).unwrap();
            assert!(matches!(
                m.labelling,
                Labelling::AllToAll {
                    mapping_seed: Some(_)
                }
            ));
            assert_eq!(m, draw(&f, 10, SHAPE, s).unwrap(), "reproducible");
            let pi = m.labelling.mapping(10).unwrap();
            let mut sorted = pi.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..10).collect::<Vec<u32>>(),
                "a permutation: {pi:?}"
            );
            assert!(pi.iter().enumerate().all(|(y, &t)| t != y as u32), "{pi:?}");
            firsts[pi[0] as usize] += 1;
            seen.insert(pi);
        }
        assert!(
            seen.len() > 1990,
            "{} distinct mappings of 2000",
            seen.len()
        );
        // π(0) is uniform over the nine other classes: 2000/9 ≈ 222 each.
        assert_eq!(firsts[0], 0);
        assert!(
            firsts[1..].iter().all(|&c| (150..300).contains(&c)),
            "{firsts:?}"
        );
        // !10 = 1,334,961 derangements, and the warp field.
        let e = entropy(&f, 10, SHAPE).unwrap();
        assert_eq!(e[0].parameter, "labelling.mapping");
        assert!(
            (e[0].bits - 1_334_961f64.log2()).abs() < 1e-9,
            "{}",
            e[0].bits
        );
        assert!((log2_derangements(3) - 1.0).abs() < 1e-12, "!3 = 2");
        assert!((log2_derangements(21) - 18_795_307_255_050_944_540f64.log2()).abs() < 1e-6);
    }

    #[test]
    fn an_all_to_all_spec_refuses_what_would_leave_a_class_unmoved() {
        let base = "name = \"a\"\nrate = 0.1\nseed = 1\n[labelling]\nkind = \"all_to_all\"\n\
                    [trigger]\nkind = \"patch\"\npattern = \"square\"\n";
        // Without a seed, the paper's y + 1 mod C.
        let fixed = WatermarkSpec::from_toml_str(base, None, "a").unwrap();
        assert_eq!(fixed.labelling.mapping(4).unwrap(), vec![1, 2, 3, 0]);
        let with_sources = base.replace("seed = 1\n", "seed = 1\nsource_classes = [1, 2]\n");
        let e = WatermarkSpec::from_toml_str(&with_sources, None, "a").unwrap_err();
        assert!(e.to_string().starts_with("source_classes:"), "{e}");
        let drawn_and_written = base
            .replace(
                "kind = \"all_to_all\"\n",
                "kind = \"all_to_all\"\nmapping_seed = 5\n",
            )
            .replace("[trigger]", "[family]\n[trigger]");
        let e = WatermarkSpec::from_toml_str(&drawn_and_written, None, "a").unwrap_err();
        assert!(e.to_string().starts_with("labelling.mapping_seed:"), "{e}");
        let pinned = drawn_and_written.replace("[family]\n", "[family]\ntarget = \"pinned\"\n");
        let p = WatermarkSpec::from_toml_str(&pinned, None, "a").unwrap();
        let m = draw(&p, 10, SHAPE, 3).unwrap();
        assert_eq!(
            m.labelling,
            Labelling::AllToAll {
                mapping_seed: Some(5)
            }
        );
    }

    #[test]
    fn derived_seeds_differ_by_purpose_index_and_nonce() {
        let n = [7u8; 32];
        let a = derived_seed(&n, "control", 0);
        assert_eq!(a, derived_seed(&n, "control", 0));
        assert_ne!(a, derived_seed(&n, "control", 1));
        assert_ne!(a, derived_seed(&n, "trigger", 0));
        assert_ne!(a, derived_seed(&[8u8; 32], "control", 0));
    }
}

#[cfg(test)]
mod places_tests {
    use super::*;

    #[test]
    fn edge_places_are_every_border_corner_once() {
        for (h, w, ph, pw) in [(28, 28, 3, 3), (8, 12, 3, 2), (5, 5, 4, 4), (4, 6, 3, 3)] {
            let shape = ImageShape {
                height: h,
                width: w,
                channels: 1,
            };
            let p = places(Placement::Edge, shape, ph, pw);
            let got: std::collections::BTreeSet<_> = (0..p.len()).map(|k| p.nth(k)).collect();
            let (rows, cols) = (h - ph + 1, w - pw + 1);
            let want: std::collections::BTreeSet<_> = (0..rows)
                .flat_map(|r| (0..cols).map(move |c| (r, c)))
                .filter(|&(r, c)| r == 0 || c == 0 || r == rows - 1 || c == cols - 1)
                .collect();
            assert_eq!(got, want, "{h}×{w}, {ph}×{pw}");
            assert_eq!(got.len(), p.len());
        }
    }
}
