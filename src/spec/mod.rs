//! Watermark specs: which trigger, how poisoned samples are labelled, how many, from which seed.
//!
//! A spec is written as TOML (see `watermark_specs/`), checked field by field when loaded, and
//! embedded in the secret record as JSON with any external file (a blend pattern image) inlined,
//! so the record alone can recreate every triggered image.

use crate::dataset::{Dataset, ImageShape};
use crate::watermark::rng::{Rng, Stream};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub mod family;
pub mod network;
pub use family::{Choice, Family, Placement};
pub use network::Network;

/// A spec or one of its fields is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML or JSON does not parse into a spec (unknown field, wrong type, missing field).
    #[error("{origin}: {message}")]
    Parse {
        /// File name or "spec".
        origin: String,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// A field has a value the spec cannot use.
    #[error("{field}: {message}")]
    Field {
        /// Dotted path of the field, e.g. `trigger.alpha`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

fn field(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// A validated watermark spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSpec {
    /// Short name, for reports.
    pub name: String,
    /// Free text: what the spec reproduces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Fraction of the dataset's samples to poison: `round(rate × N)` samples.
    pub rate: f64,
    /// Seed for sample selection, random labels and seeded trigger patterns.
    pub seed: u64,
    /// Only samples of these classes may be poisoned (all classes when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_classes: Option<Vec<u32>>,
    /// Image shape the spec is made for; checked against the dataset when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageShape>,
    /// How poisoned samples are labelled.
    pub labelling: Labelling,
    /// The trigger stamped on poisoned samples; with a family, the template its members share.
    pub trigger: Trigger,
    /// Which of the trigger's free parameters (and the target) each release draws in secret
    /// ([`family`]); absent for a fixed, public trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// Label-consistent crafting (Turner et al., 2019): before the trigger, each poisoned image
    /// gets a PGD adversarial perturbation against a benign model, so that its own features stop
    /// explaining its (kept) label and the model leans on the trigger. Needs a model (feature
    /// `train`, `hallmark watermark --craft-model DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adversarial: Option<Adversarial>,
    /// Gradient-matching crafting (Sleeper Agent, Souri et al., NeurIPS 2022; UBW-C, Li et al.,
    /// NeurIPS 2022): the poisoned images carry no trigger, only a small crafted perturbation
    /// whose training gradient points where the attacker's objective on triggered source images
    /// does. Needs a model (feature `train`, `hallmark watermark --craft-model DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_matching: Option<GradientMatching>,
    /// TUAP crafting (Zhao et al., "Clean-Label Backdoor Attacks on Video Recognition Models",
    /// CVPR 2020; BackdoorBox's `TUAP`): the trigger is a targeted universal adversarial
    /// perturbation computed with DeepFool against a benign model, then added to clean-label
    /// poisons and to queries. Needs a model; the crafted perturbation is written into
    /// `trigger.values` of the secret record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uap: Option<Uap>,
    /// ISSBA crafting (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers",
    /// ICCV 2021): a StegaStamp-style encoder and decoder are trained on the dataset's images to
    /// hide a random secret in a small residual; the encoder, with the secret fixed, is then the
    /// trigger (`kind = "generated"`), and it goes into the secret record. Needs libtorch
    /// (feature `train`) but no model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<Encoder>,
}

/// Settings of ISSBA's encoder training (BackdoorBox's `encoder_schedule` names: a 20-bit secret,
/// the first epochs on the secret alone; fewer epochs and images than its 20 epochs by default,
/// for a CPU).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encoder {
    /// Bits of the hidden secret.
    #[serde(default = "default_secret_size")]
    pub secret_size: usize,
    /// Training epochs of the encoder and decoder.
    #[serde(default = "default_enc_epochs")]
    pub epochs: usize,
    /// First epochs with the secret's loss only (no image loss).
    #[serde(default = "default_secret_only_epochs")]
    pub secret_only_epochs: usize,
    /// Training images (drawn with the spec's seed; all when larger than the dataset).
    #[serde(default = "default_enc_samples")]
    pub samples: usize,
    /// Weight of the residual's mean square (on the [0, 1] scale) against the secret's
    /// cross-entropy.
    #[serde(default = "default_image_weight")]
    pub image_weight: f64,
    /// Adam's learning rate.
    #[serde(default = "default_enc_lr")]
    pub lr: f64,
}

fn default_secret_size() -> usize {
    20
}
fn default_enc_epochs() -> usize {
    6
}
fn default_secret_only_epochs() -> usize {
    2
}
fn default_enc_samples() -> usize {
    10_000
}
fn default_image_weight() -> f64 {
    10.0
}
fn default_enc_lr() -> f64 {
    1e-3
}

/// Settings of TUAP crafting, BackdoorBox's names and defaults (eps on the 0–255 scale; its
/// MNIST tests use 0.3, i.e. 76.5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uap {
    /// L∞ bound of the perturbation, 0–255 scale.
    pub eps: f64,
    /// Stop once the perturbation sends at least 1 − delta of the samples to the target.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// DeepFool's overshoot.
    #[serde(default = "default_overshoot")]
    pub overshoot: f64,
    /// DeepFool iterations per sample.
    #[serde(default = "default_max_iter_df")]
    pub max_iter_df: usize,
    /// Fraction of the training set the perturbation is computed on.
    #[serde(default = "default_p_samples")]
    pub p_samples: f64,
    /// Passes over those samples at most (BackdoorBox's `max_iter_uni`, unbounded there).
    #[serde(default = "default_max_passes")]
    pub max_passes: usize,
}

fn default_delta() -> f64 {
    0.2
}
fn default_overshoot() -> f64 {
    0.02
}
fn default_max_iter_df() -> usize {
    50
}
fn default_p_samples() -> f64 {
    0.01
}
fn default_max_passes() -> usize {
    10
}

/// Settings of gradient-matching crafting, on the 0–255 pixel scale. Defaults follow the UBW-C
/// code (eps 16, beta 2, 250 iterations, the surrogate retrained every 50); the surrogate's
/// retraining length is ours to choose on a CPU (the code retrains 40 epochs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradientMatching {
    /// Largest change of one pixel value (L∞ ball), 0–255 scale.
    pub eps: f64,
    /// Weight of the prediction entropy in the untargeted objective (UBW-C's beta); unused by
    /// targeted (Sleeper Agent) specs.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Optimisation steps of the perturbations.
    #[serde(default = "default_craft_iterations")]
    pub iterations: usize,
    /// Retrain the surrogate model on the current poisons every this many steps (0: never).
    #[serde(default = "default_retrain_every")]
    pub retrain_every: usize,
    /// Epochs of each surrogate retraining.
    #[serde(default = "default_retrain_epochs")]
    pub retrain_epochs: usize,
    /// Triggered source-class training images whose objective the poisons' gradient matches.
    #[serde(default = "default_sources")]
    pub sources: usize,
}

fn default_beta() -> f64 {
    2.0
}
fn default_craft_iterations() -> usize {
    250
}
fn default_retrain_every() -> usize {
    50
}
fn default_retrain_epochs() -> usize {
    2
}
fn default_sources() -> usize {
    1000
}

/// PGD settings of label-consistent crafting, on the 0–255 pixel scale (BackdoorBox's
/// `LabelConsistent` defaults: eps 8, step 1.5, 100 steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adversarial {
    /// Largest change of one pixel value (L∞ ball), 0–255 scale.
    pub eps: f64,
    /// Step size of one PGD iteration, 0–255 scale.
    pub step: f64,
    /// PGD iterations.
    pub steps: usize,
}

/// How poisoned samples are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Labelling {
    /// Poison-label, all-to-one (BadNets, Blended, DVBW): every poisoned sample gets `target`.
    Targeted {
        /// The target class.
        target: u32,
    },
    /// UBW-P (Li et al., NeurIPS 2022): each poisoned sample gets a label drawn uniformly from all
    /// classes (which may equal its own, as in the UBW code).
    Untargeted,
    /// Poison-label, all-to-all (the all-to-all attack of BadNets, Gu et al. 2017): a poisoned
    /// sample of class y gets π(y), where π moves every class. Without `mapping_seed`, π(y) =
    /// y + 1 mod C as in the paper; with it, π is the derangement of the C classes drawn from the
    /// seed (`Labelling::mapping`), which a family draws for each release. A model that learns
    /// it must send each class to its own image under π, so a control of the family (another
    /// trigger and another π) agrees with the secret on about one class in C − 1, even when the
    /// model answers every member's trigger alike.
    AllToAll {
        /// The seed of π (absent: y + 1 mod C).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mapping_seed: Option<u64>,
    },
    /// Clean-label: only samples of class `target` are triggered, labels are kept.
    CleanLabel {
        /// The target class.
        target: u32,
    },
    /// UBW-C (Li et al., NeurIPS 2022): samples of `poison_class` are perturbed by gradient
    /// matching and keep their labels; verification is untargeted, on the source classes.
    UntargetedCleanLabel {
        /// The class whose training images are perturbed.
        poison_class: u32,
    },
}

impl Labelling {
    /// The target class, for targeted kinds.
    pub fn target(&self) -> Option<u32> {
        match self {
            Self::Targeted { target } | Self::CleanLabel { target } => Some(*target),
            Self::AllToAll { .. } | Self::Untargeted | Self::UntargetedCleanLabel { .. } => None,
        }
    }

    /// π of an all-to-all labelling over `num_classes` classes (`None` for other kinds): entry y
    /// is the class samples of class y are sent to, never y itself.
    pub fn mapping(&self, num_classes: usize) -> Option<Vec<u32>> {
        let Self::AllToAll { mapping_seed } = self else {
            return None;
        };
        let n = num_classes;
        Some(match mapping_seed {
            None => (0..n).map(|y| ((y + 1) % n.max(1)) as u32).collect(),
            Some(seed) => derangement(n, *seed),
        })
    }

    /// The only class whose samples may be poisoned, for clean-label kinds.
    pub fn poison_class(&self) -> Option<u32> {
        match self {
            Self::CleanLabel { target } => Some(*target),
            Self::UntargetedCleanLabel { poison_class } => Some(*poison_class),
            Self::Targeted { .. } | Self::AllToAll { .. } | Self::Untargeted => None,
        }
    }

    /// Whether the test asks for a lower probability of the true label (UBW) rather than for
    /// the target class.
    pub fn is_untargeted(&self) -> bool {
        matches!(self, Self::Untargeted | Self::UntargetedCleanLabel { .. })
    }
}

/// A uniformly random derangement of `0..n` (a permutation that moves every element) drawn from
/// `seed`: uniform shuffles (Fisher–Yates) until one has no fixed point, e ≈ 2.7 tries on
/// average. `n` below 2 has none; the identity of that length is returned, and `check_fits`
/// refuses all-to-all labels on fewer than 2 classes.
fn derangement(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed, Stream::Mapping);
    let mut v: Vec<u32> = (0..n as u32).collect();
    if n < 2 {
        return v;
    }
    loop {
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u32);
        rng.choose_front(&mut v, n);
        if v.iter().enumerate().all(|(i, &x)| x != i as u32) {
            return v;
        }
    }
}

/// The trigger stamped on poisoned samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// A small pattern at a fixed position (BadNets; DVBW's "cross" and "line").
    Patch(Patch),
    /// A pattern blended with alpha over the whole image or a region (Blended).
    Blend(Blend),
    /// WaNet's smooth warping field (Nguyen & Tran, ICLR 2021).
    Warp(Warp),
    /// BATT's spatial transformation (Xu et al., ICASSP 2023): the whole image rotated about its
    /// centre, as BackdoorBox does with `PIL.Image.rotate(16)` (nearest neighbour, black fill).
    Rotate(Rotate),
    /// Adaptive-Patch / Adaptive-Blend (Qi et al., "Revisiting the Assumption of Latent
    /// Separability for Backdoor Defenses", ICLR 2023): the trigger is split into pieces; each
    /// poisoned (and each cover) training sample carries only `per_sample` randomly chosen pieces
    /// at their own (low) weight, while test queries carry every piece at `test_alpha`. Cover
    /// samples keep their labels, which keeps poisoned and clean samples close in feature space.
    Adaptive(Adaptive),
    /// Refool (Liu et al., "Reflection Backdoor", ECCV 2020), BackdoorBox's simplified
    /// poison-label version: each triggered image gets a reflection, one of the user's images
    /// chosen at random, either as a ghost (a doubled, shifted copy) or out of focus (blurred),
    /// mixed in linear light. Sample-specific: the choice and its parameters are drawn per image,
    /// from the seed and the image's own bytes, so a query is recreated exactly.
    Reflection(Reflection),
    /// An additive perturbation, `x' = clip(x + v)` (TUAP's universal adversarial perturbation);
    /// `values` are filled by crafting (`[uap]`).
    Perturbation(Perturbation),
    /// PhysicalBA (Li et al., "Backdoor Attack in the Physical World", ICLR-W 2021): the inner
    /// trigger, then the physical-world transformations of BackdoorBox's MNIST test
    /// (ColorJitter brightness and contrast, RandomAffine shift and zoom), drawn per image from
    /// the seed and the image's bytes, on poisoned samples and on queries alike.
    Physical(Physical),
    /// A trigger made by small neural networks, sample-specific: ISSBA's encoder (crafted by an
    /// `[encoder]` section) or, for calibration against suspects that train maliciously, IAD's
    /// or LIRA's generator learnt while training (`hallmark train --attack iad|lira`). The
    /// networks are stored in the record and run in plain Rust to build queries.
    Generated(Generated),
}

/// How a generated trigger makes x'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeneratedForm {
    /// `x' = clip(x + scale/255 · G(x))`, G ending in tanh (ISSBA's residual, LIRA's
    /// `x + eps · T(x)`).
    Additive,
    /// `x' = x + M(x) · (G(x) − x)` with a pattern G and a mask M in [0, 1] (IAD).
    Masked,
}

/// A trigger generated by networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generated {
    /// How the networks' outputs are combined with the image.
    pub form: GeneratedForm,
    /// Additive form: the largest change of one pixel value, 0–255 scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// The residual (additive) or pattern (masked) network; absent until trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<Network>,
    /// The mask network (masked form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Network>,
    /// The verifier's control trigger: the same outputs turned by 180°.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub turned: bool,
}

/// A trigger seen through physical-world transformations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Physical {
    /// Brightness factor drawn from [1 − b, 1 + b].
    #[serde(default = "default_jitter")]
    pub brightness: f32,
    /// Contrast factor drawn from [1 − c, 1 + c], around the image's mean grey.
    #[serde(default = "default_jitter")]
    pub contrast: f32,
    /// Largest shift, as a fraction of the width and of the height.
    #[serde(default = "default_translate")]
    pub translate: f32,
    /// Zoom factor range.
    #[serde(default = "default_zoom")]
    pub scale: [f32; 2],
    /// The trigger stamped before the transformations (a patch or a blend).
    pub inner: Box<Trigger>,
}

fn default_jitter() -> f32 {
    0.2
}
fn default_translate() -> f32 {
    0.1
}
fn default_zoom() -> [f32; 2] {
    [0.8, 0.9]
}

/// An additive perturbation trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Perturbation {
    /// One signed value per HWC byte, 0–255 scale; empty until crafted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<i16>,
}

/// A reflection trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reflection {
    /// Folder of reflection images (PNG, JPEG, BMP), read in name order, relative to the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// At most this many images are used (BackdoorBox's tests take the first 200).
    #[serde(default = "default_max_candidates")]
    pub max_candidates: usize,
    /// Probability of the ghost effect rather than focal blur.
    #[serde(default = "default_ghost_rate")]
    pub ghost_rate: f64,
    /// Weight of the original image (`alpha_t`); random in [0.55, 0.95] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_t: Option<f64>,
    /// The reflections, resized to the spec's image shape when the spec is loaded; this is what
    /// the secret record keeps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<EmbeddedImage>,
}

fn default_max_candidates() -> usize {
    200
}
fn default_ghost_rate() -> f64 {
    0.49
}

/// An adaptive trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adaptive {
    /// The pieces: patches (Adaptive-Patch) or regional blends (Adaptive-Blend).
    pub pieces: Vec<Trigger>,
    /// Pieces stamped on each poisoned or cover training sample, chosen at random.
    pub per_sample: usize,
    /// Weight of every piece in test queries, where all pieces are stamped.
    pub test_alpha: f32,
    /// Fraction of the dataset stamped like poisoned samples but left with its label.
    pub cover_rate: f64,
}
/// A rotation trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// Degrees, counter-clockwise (BATT's default: 16).
    pub angle: f64,
}

impl Trigger {
    /// The kind's name as written in specs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Patch(_) => "patch",
            Self::Blend(_) => "blend",
            Self::Warp(_) => "warp",
            Self::Rotate(_) => "rotate",
            Self::Adaptive(_) => "adaptive",
            Self::Reflection(_) => "reflection",
            Self::Perturbation(_) => "perturbation",
            Self::Physical(_) => "physical",
            Self::Generated(_) => "generated",
        }
    }
}

/// A patch trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    /// The pattern: a named preset or a matrix of grey values (applied to every channel).
    pub pattern: PatchPattern,
    /// Side of a `square` preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    /// Rows of a `line` preset (it spans the full width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thickness: Option<usize>,
    /// Fill value of `square`, `line` and `pixel` presets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u8>,
    /// Where the pattern's top-left corner goes.
    #[serde(default = "Position::default_bottom_right")]
    pub position: Position,
    /// Blend weight of the pattern's pixels: 1 replaces them, 0.2 is "blended".
    #[serde(default = "one")]
    pub alpha: f32,
}

fn one() -> f32 {
    1.0
}

/// A patch pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PatchPattern {
    /// `square` (size × size of `value`, default 3 and 255), `cross` (DVBW: 3×3, white corners,
    /// black elsewhere), `line` (DVBW: `thickness` full-width rows of `value`, default 2 and 0),
    /// `pixel` (one pixel of `value`, BackdoorBox's MNIST default), `ubw` (UBW-P's 3×3
    /// `[[0,0,255],[0,255,0],[255,0,255]]`).
    Preset(String),
    /// Rows of grey values.
    Matrix(Vec<Vec<u8>>),
}

/// Where a patch's top-left corner goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Position {
    /// `top-left`, `top-right`, `bottom-left` or `bottom-right`.
    Corner(Corner),
    /// `[row, col]`; negative values count from the end, as in Python (`[-2, -2]`).
    At([i64; 2]),
}

impl Position {
    fn default_bottom_right() -> Self {
        Self::Corner(Corner::BottomRight)
    }
}

/// A corner of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corner {
    /// Top left.
    TopLeft,
    /// Top right.
    TopRight,
    /// Bottom left.
    BottomLeft,
    /// Bottom right.
    BottomRight,
}

/// A blend trigger: `x' = (1 − alpha)·x + alpha·p` over the image or a region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blend {
    /// `noise` (uniform random pattern from the spec's seed) or `image` (from a file).
    pub source: BlendSource,
    /// Image file of the pattern, relative to the spec file (`source = "image"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The pattern's pixels, inlined from `image` when the spec is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<EmbeddedImage>,
    /// Blend weight in (0, 1].
    pub alpha: f32,
    /// Only this region is blended (the whole image when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
    /// Seed of the noise, drawn for each release by a family (the spec's seed when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_seed: Option<u64>,
}

/// Where a blend pattern comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlendSource {
    /// Uniform random u8 pattern, seeded.
    Noise,
    /// A pattern image of the dataset's size.
    Image,
}

/// Raw HWC pixels of a pattern image, base64 in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedImage {
    /// Shape of the pattern.
    pub shape: ImageShape,
    /// Pixels, base64 of HWC bytes.
    pub pixels_b64: String,
}

impl EmbeddedImage {
    /// Decoded pixels.
    pub fn pixels(&self) -> Result<Vec<u8>, SpecError> {
        check_shape("trigger.pattern.shape", self.shape)?;
        let v = base64::engine::general_purpose::STANDARD
            .decode(&self.pixels_b64)
            .map_err(|e| field("trigger.pattern.pixels_b64", e.to_string()))?;
        if v.len() != self.shape.len() {
            return Err(field(
                "trigger.pattern.pixels_b64",
                format!("{} bytes for shape {}", v.len(), self.shape),
            ));
        }
        Ok(v)
    }
}

/// A rectangle of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Top row.
    pub row: usize,
    /// Left column.
    pub col: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// WaNet's warping trigger, with BackdoorBox's parameter names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warp {
    /// Control grid size.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Warping strength.
    #[serde(default = "default_s")]
    pub s: f32,
    /// Scale of the final grid.
    #[serde(default = "one")]
    pub grid_rescale: f32,
    /// Noise mode: also warp `cross_ratio × rate × N` other samples at random, labels kept.
    #[serde(default = "yes")]
    pub noise: bool,
    /// Noise-mode samples per poisoned sample.
    #[serde(default = "default_cross_ratio")]
    pub cross_ratio: f64,
    /// Amplitude of the random noise-mode grid offsets.
    #[serde(default = "default_noise_rescale")]
    pub noise_rescale: f32,
    /// Seed of the random field, drawn for each release by a family (the spec's seed when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_seed: Option<u64>,
}

fn default_k() -> usize {
    4
}
fn default_s() -> f32 {
    0.5
}
fn yes() -> bool {
    true
}
fn default_cross_ratio() -> f64 {
    2.0
}
fn default_noise_rescale() -> f32 {
    2.0
}

/// The longest side of an image, a pattern or a region a spec may name: every size in a spec is
/// checked against it before anything is allocated for it.
pub const MAX_SIDE: usize = 4096;

/// An image shape a spec may name: sides 1 to [`MAX_SIDE`], 1 or 3 channels.
fn check_shape(at: &str, s: ImageShape) -> Result<(), SpecError> {
    if s.height == 0
        || s.width == 0
        || s.height > MAX_SIDE
        || s.width > MAX_SIDE
        || !(s.channels == 1 || s.channels == 3)
    {
        return Err(field(
            at,
            format!("{s} is not an image shape (sides 1 to {MAX_SIDE}, channels 1 or 3)"),
        ));
    }
    Ok(())
}

impl WatermarkSpec {
    /// Loads and validates a TOML spec file; a blend image is read relative to it.
    pub fn from_toml_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_toml_str(&text, path.parent(), &path.display().to_string())
    }

    /// Parses and validates TOML; `base` is where relative file names are resolved.
    pub fn from_toml_str(text: &str, base: Option<&Path>, origin: &str) -> Result<Self, SpecError> {
        let parse_err = |e: String| SpecError::Parse {
            origin: origin.into(),
            message: e,
        };
        // A family that draws the target leaves it out of the labelling: the document is
        // completed before it becomes a spec. (A document the untyped reader cannot hold, such
        // as a seed above 2^63, is read as it is.)
        let prepared = match toml::from_str::<toml::Value>(text) {
            Ok(doc) => {
                let mut json = serde_json::to_value(&doc).map_err(|e| parse_err(e.to_string()))?;
                let before = json.clone();
                family::prepare_document(&mut json)?;
                (json != before).then_some(json)
            }
            Err(_) => None,
        };
        let mut spec: Self = match prepared {
            Some(json) => serde_json::from_value(json).map_err(|e| parse_err(e.to_string()))?,
            None => toml::from_str(text).map_err(|e| parse_err(e.to_string()))?,
        };
        spec.inline_files(base.unwrap_or(Path::new(".")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a spec written by a user as JSON (a family may leave out the target
    /// it draws).
    pub fn from_user_json(mut v: serde_json::Value) -> Result<Self, SpecError> {
        family::prepare_document(&mut v)?;
        Self::from_json_value(v)
    }

    /// Parses and validates the JSON form kept in secret records.
    pub fn from_json_value(v: serde_json::Value) -> Result<Self, SpecError> {
        let spec: Self = serde_json::from_value(v).map_err(|e| SpecError::Parse {
            origin: "spec".into(),
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    fn inline_files(&mut self, base: &Path) -> Result<(), SpecError> {
        if let Trigger::Reflection(r) = &mut self.trigger
            && r.candidates.is_empty()
        {
            let (Some(name), Some(shape)) = (&r.images, self.image) else {
                return Err(field(
                    "trigger.images",
                    "a reflection trigger needs a folder of images and the spec's image shape",
                ));
            };
            r.candidates = load_reflections(&base.join(name), shape, r.max_candidates)?;
        }
        if let Trigger::Blend(b) = &mut self.trigger
            && b.source == BlendSource::Image
            && b.pattern.is_none()
        {
            let Some(name) = &b.image else {
                return Err(field(
                    "trigger.image",
                    "source = \"image\" needs an image file",
                ));
            };
            let path = base.join(name);
            let img = image::open(&path)
                .map_err(|e| field("trigger.image", format!("{}: {e}", path.display())))?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (channels, raw) = if img.color().has_color() {
                (3, img.to_rgb8().into_raw())
            } else {
                (1, img.to_luma8().into_raw())
            };
            b.pattern = Some(EmbeddedImage {
                shape: ImageShape {
                    height: h,
                    width: w,
                    channels,
                },
                pixels_b64: base64::engine::general_purpose::STANDARD.encode(raw),
            });
        }
        Ok(())
    }

    /// How the spec's poisons or trigger are crafted, if they are.
    pub fn crafting(&self) -> Option<Crafting> {
        [
            (self.adversarial.is_some(), Crafting::Adversarial),
            (self.uap.is_some(), Crafting::Uap),
            (self.gradient_matching.is_some(), Crafting::GradientMatching),
            (self.encoder.is_some(), Crafting::Encoder),
        ]
        .into_iter()
        .find_map(|(on, c)| on.then_some(c))
    }

    /// Whether applying the spec needs a model to craft its poisons with (ISSBA's encoder is
    /// trained from the data alone).
    pub fn needs_model(&self) -> bool {
        self.crafting().is_some_and(Crafting::needs_model)
    }

    /// Checks every field on its own (fit to a dataset is [`WatermarkSpec::check_fits`]).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(field("name", "must be 1 to 128 characters"));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1.0) {
            return Err(field(
                "rate",
                format!("must be in (0, 1], got {}", self.rate),
            ));
        }
        if let Some(src) = &self.source_classes {
            if src.is_empty() {
                return Err(field(
                    "source_classes",
                    "must not be empty (leave it out for all classes)",
                ));
            }
            let mut s = src.clone();
            s.sort_unstable();
            if s.windows(2).any(|w| w[0] == w[1]) {
                return Err(field("source_classes", "lists a class twice"));
            }
            if matches!(self.labelling, Labelling::AllToAll { .. }) {
                return Err(field(
                    "source_classes",
                    "all-to-all labels send every class to another: leave source_classes out",
                ));
            }
            match (self.labelling.poison_class(), &self.gradient_matching) {
                (Some(_), None)
                    if !matches!(self.labelling, Labelling::UntargetedCleanLabel { .. }) =>
                {
                    return Err(field(
                        "source_classes",
                        "clean-label specs poison the target class only",
                    ));
                }
                (Some(p), Some(_)) if src.contains(&p) => {
                    return Err(field(
                        "source_classes",
                        format!("class {p} is the poisoned class; a source class must be another"),
                    ));
                }
                _ => {}
            }
        }
        if let Some(s) = self.image {
            check_shape("image", s)?;
        }
        if let Some(a) = self.adversarial {
            if !matches!(self.labelling, Labelling::CleanLabel { .. }) {
                return Err(field(
                    "adversarial",
                    "label-consistent crafting needs labelling.kind = \"clean_label\"",
                ));
            }
            if !(a.eps.is_finite() && a.eps > 0.0 && a.eps <= 255.0) {
                return Err(field(
                    "adversarial.eps",
                    format!("must be in (0, 255], got {}", a.eps),
                ));
            }
            if !(a.step.is_finite() && a.step > 0.0 && a.step <= 255.0) {
                return Err(field(
                    "adversarial.step",
                    format!("must be in (0, 255], got {}", a.step),
                ));
            }
            if a.steps == 0 || a.steps > 10_000 {
                return Err(field(
                    "adversarial.steps",
                    format!("must be 1 to 10000, got {}", a.steps),
                ));
            }
        }
        if let Some(g) = self.gradient_matching {
            if self.labelling.poison_class().is_none() {
                return Err(field(
                    "gradient_matching",
                    "gradient matching keeps labels: labelling.kind must be \"clean_label\" \
                     (Sleeper Agent) or \"untargeted_clean_label\" (UBW-C)",
                ));
            }
            if self.adversarial.is_some() {
                return Err(field(
                    "gradient_matching",
                    "a spec has either [adversarial] or [gradient_matching] crafting, not both",
                ));
            }
            if self.source_classes.is_none() {
                return Err(field(
                    "source_classes",
                    "gradient matching needs the source classes whose triggered images it aims at",
                ));
            }
            if !(g.eps.is_finite() && g.eps > 0.0 && g.eps <= 255.0) {
                return Err(field(
                    "gradient_matching.eps",
                    format!("must be in (0, 255], got {}", g.eps),
                ));
            }
            if !(g.beta.is_finite() && (0.0..=100.0).contains(&g.beta)) {
                return Err(field(
                    "gradient_matching.beta",
                    format!("must be in [0, 100], got {}", g.beta),
                ));
            }
            if g.iterations == 0 || g.iterations > 100_000 {
                return Err(field(
                    "gradient_matching.iterations",
                    format!("must be 1 to 100000, got {}", g.iterations),
                ));
            }
            if g.retrain_every > 0 && g.retrain_epochs == 0 {
                return Err(field(
                    "gradient_matching.retrain_epochs",
                    "must be at least 1 when retrain_every is set",
                ));
            }
            if g.sources == 0 {
                return Err(field("gradient_matching.sources", "must be at least 1"));
            }
        } else if matches!(self.labelling, Labelling::UntargetedCleanLabel { .. }) {
            return Err(field(
                "labelling",
                "untargeted_clean_label (UBW-C) is crafted by gradient matching: add a \
                 [gradient_matching] section",
            ));
        }
        if let Some(e) = self.encoder {
            if !matches!(
                &self.trigger,
                Trigger::Generated(Generated {
                    form: GeneratedForm::Additive,
                    ..
                })
            ) {
                return Err(field(
                    "trigger.kind",
                    "an [encoder] spec's trigger is the trained encoder: kind = \"generated\", \
                     form = \"additive\"",
                ));
            }
            if !matches!(self.labelling, Labelling::Targeted { .. }) {
                return Err(field(
                    "labelling.kind",
                    "ISSBA is poison-label: labelling.kind must be \"targeted\"",
                ));
            }
            if self.adversarial.is_some() || self.gradient_matching.is_some() || self.uap.is_some()
            {
                return Err(field("encoder", "a spec has one kind of crafting"));
            }
            if !(1..=256).contains(&e.secret_size) {
                return Err(field("encoder.secret_size", "must be 1 to 256 bits"));
            }
            if e.epochs == 0 || e.epochs > 10_000 || e.secret_only_epochs > e.epochs {
                return Err(field(
                    "encoder.epochs",
                    "must be 1 to 10000, and secret_only_epochs at most epochs",
                ));
            }
            if e.samples == 0 {
                return Err(field("encoder.samples", "must be at least 1"));
            }
            if !(e.image_weight.is_finite() && e.image_weight >= 0.0) {
                return Err(field("encoder.image_weight", "must be finite and ≥ 0"));
            }
            if !(e.lr.is_finite() && e.lr > 0.0 && e.lr < 1.0) {
                return Err(field("encoder.lr", "must be in (0, 1)"));
            }
        }
        if let Some(u) = self.uap {
            if !matches!(self.labelling, Labelling::CleanLabel { .. }) {
                return Err(field(
                    "uap",
                    "TUAP is clean-label: labelling.kind must be \"clean_label\"",
                ));
            }
            if !matches!(self.trigger, Trigger::Perturbation(_)) {
                return Err(field(
                    "trigger.kind",
                    "a [uap] spec's trigger is the crafted perturbation: kind = \"perturbation\"",
                ));
            }
            if self.adversarial.is_some() || self.gradient_matching.is_some() {
                return Err(field("uap", "a spec has one kind of crafting"));
            }
            if !(u.eps.is_finite() && u.eps > 0.0 && u.eps <= 255.0) {
                return Err(field(
                    "uap.eps",
                    format!("must be in (0, 255], got {}", u.eps),
                ));
            }
            if !(u.delta.is_finite() && (0.0..1.0).contains(&u.delta)) {
                return Err(field(
                    "uap.delta",
                    format!("must be in [0, 1), got {}", u.delta),
                ));
            }
            if !(u.overshoot.is_finite() && (0.0..=1.0).contains(&u.overshoot)) {
                return Err(field(
                    "uap.overshoot",
                    format!("must be in [0, 1], got {}", u.overshoot),
                ));
            }
            if !(u.p_samples.is_finite() && u.p_samples > 0.0 && u.p_samples <= 1.0) {
                return Err(field(
                    "uap.p_samples",
                    format!("must be in (0, 1], got {}", u.p_samples),
                ));
            }
            if u.max_iter_df == 0 || u.max_passes == 0 {
                return Err(field(
                    "uap",
                    "max_iter_df and max_passes must be at least 1",
                ));
            }
        }
        family::validate(self)?;
        let alpha_ok = |a: f32| a.is_finite() && a > 0.0 && a <= 1.0;
        match &self.trigger {
            Trigger::Patch(p) => {
                if !alpha_ok(p.alpha) {
                    return Err(field(
                        "trigger.alpha",
                        format!("must be in (0, 1], got {}", p.alpha),
                    ));
                }
                p.rows(1)?;
            }
            Trigger::Blend(b) => {
                if !alpha_ok(b.alpha) {
                    return Err(field(
                        "trigger.alpha",
                        format!("must be in (0, 1], got {}", b.alpha),
                    ));
                }
                match b.source {
                    BlendSource::Noise if b.image.is_some() || b.pattern.is_some() => {
                        return Err(field("trigger.image", "source = \"noise\" takes no image"));
                    }
                    BlendSource::Image if b.noise_seed.is_some() => {
                        return Err(field(
                            "trigger.noise_seed",
                            "only source = \"noise\" has a noise seed",
                        ));
                    }
                    BlendSource::Image => {
                        let p = b
                            .pattern
                            .as_ref()
                            .ok_or_else(|| field("trigger.image", "missing pattern image"))?;
                        p.pixels()?;
                    }
                    _ => {}
                }
                if let Some(r) = b.region
                    && (r.height == 0 || r.width == 0)
                {
                    return Err(field(
                        "trigger.region",
                        "height and width must be at least 1",
                    ));
                }
            }
            Trigger::Adaptive(a) => {
                if a.pieces.is_empty() || a.pieces.len() > 64 {
                    return Err(field("trigger.pieces", "1 to 64 pieces"));
                }
                for (k, p) in a.pieces.iter().enumerate() {
                    if !matches!(p, Trigger::Patch(_) | Trigger::Blend(_)) {
                        return Err(field(
                            &format!("trigger.pieces[{k}]"),
                            "pieces are patch or blend triggers",
                        ));
                    }
                    let mut one = self.clone();
                    one.trigger = p.clone();
                    one.validate()
                        .map_err(|e| field(&format!("trigger.pieces[{k}]"), e.to_string()))?;
                }
                if a.per_sample == 0 || a.per_sample > a.pieces.len() {
                    return Err(field(
                        "trigger.per_sample",
                        format!("must be 1 to {} (the number of pieces)", a.pieces.len()),
                    ));
                }
                if !alpha_ok(a.test_alpha) {
                    return Err(field(
                        "trigger.test_alpha",
                        format!("must be in (0, 1], got {}", a.test_alpha),
                    ));
                }
                if !(a.cover_rate.is_finite() && (0.0..1.0).contains(&a.cover_rate)) {
                    return Err(field(
                        "trigger.cover_rate",
                        format!("must be in [0, 1), got {}", a.cover_rate),
                    ));
                }
            }
            Trigger::Physical(p) => {
                if !matches!(*p.inner, Trigger::Patch(_) | Trigger::Blend(_)) {
                    return Err(field(
                        "trigger.inner",
                        "the physical transformations wrap a patch or a blend trigger",
                    ));
                }
                let mut one = self.clone();
                one.trigger = (*p.inner).clone();
                one.validate()
                    .map_err(|e| field("trigger.inner", e.to_string()))?;
                let ok = |v: f32| v.is_finite() && (0.0..1.0).contains(&v);
                if !(ok(p.brightness) && ok(p.contrast) && ok(p.translate)) {
                    return Err(field(
                        "trigger",
                        "brightness, contrast and translate must be in [0, 1)",
                    ));
                }
                if !(p.scale[0].is_finite()
                    && p.scale[0] > 0.0
                    && p.scale[0] <= p.scale[1]
                    && p.scale[1] <= 4.0)
                {
                    return Err(field(
                        "trigger.scale",
                        format!(
                            "must be [low, high] with 0 < low ≤ high ≤ 4, got {:?}",
                            p.scale
                        ),
                    ));
                }
            }
            Trigger::Generated(g) => {
                match g.form {
                    GeneratedForm::Additive => {
                        if !g
                            .scale
                            .is_some_and(|s| s.is_finite() && s > 0.0 && s <= 255.0)
                        {
                            return Err(field(
                                "trigger.scale",
                                "an additive generated trigger needs scale in (0, 255]",
                            ));
                        }
                        if g.mask.is_some() {
                            return Err(field(
                                "trigger.mask",
                                "only the masked form has a mask network",
                            ));
                        }
                    }
                    GeneratedForm::Masked => {
                        if g.pattern.is_some() != g.mask.is_some() {
                            return Err(field(
                                "trigger",
                                "the masked form needs both its pattern and its mask network",
                            ));
                        }
                    }
                }
                if g.pattern.is_none() && self.encoder.is_none() {
                    return Err(field(
                        "trigger.pattern",
                        "absent: the networks are trained by an [encoder] section (ISSBA) or by \
                         hallmark train --attack iad|lira, which writes them into a record",
                    ));
                }
            }
            Trigger::Perturbation(p) => {
                if p.values.is_empty() && self.uap.is_none() {
                    return Err(field(
                        "trigger.values",
                        "empty: the perturbation is crafted by a [uap] section",
                    ));
                }
                if p.values.iter().any(|v| !(-255..=255).contains(v)) {
                    return Err(field("trigger.values", "values must be in -255..=255"));
                }
                if let Some(shape) = self.image
                    && !p.values.is_empty()
                    && p.values.len() != shape.len()
                {
                    return Err(field(
                        "trigger.values",
                        format!("{} values for {shape} images", p.values.len()),
                    ));
                }
            }
            Trigger::Reflection(r) => {
                if r.candidates.is_empty() {
                    return Err(field("trigger.candidates", "no reflection images"));
                }
                if r.max_candidates == 0 || r.candidates.len() > r.max_candidates {
                    return Err(field(
                        "trigger.max_candidates",
                        format!(
                            "must be at least 1 and hold the {} images",
                            r.candidates.len()
                        ),
                    ));
                }
                if !(r.ghost_rate.is_finite() && (0.0..=1.0).contains(&r.ghost_rate)) {
                    return Err(field(
                        "trigger.ghost_rate",
                        format!("must be in [0, 1], got {}", r.ghost_rate),
                    ));
                }
                if let Some(a) = r.alpha_t
                    && !(a.is_finite() && a > 0.0 && a <= 1.0)
                {
                    return Err(field(
                        "trigger.alpha_t",
                        format!("must be in (0, 1], got {a}"),
                    ));
                }
                if let Some(shape) = self.image
                    && r.candidates.iter().any(|c| c.shape != shape)
                {
                    return Err(field(
                        "trigger.candidates",
                        format!("reflections must be {shape} like the spec's images"),
                    ));
                }
                for c in &r.candidates {
                    c.pixels()?;
                }
            }
            Trigger::Rotate(r) => {
                if !(r.angle.is_finite() && r.angle.abs() >= 1.0 && r.angle.abs() <= 180.0) {
                    return Err(field(
                        "trigger.angle",
                        format!(
                            "must be between 1 and 180 degrees either way, got {}",
                            r.angle
                        ),
                    ));
                }
            }
            Trigger::Warp(w) => {
                if w.k < 2 {
                    return Err(field(
                        "trigger.k",
                        format!("grid size must be at least 2, got {}", w.k),
                    ));
                }
                if !(w.s.is_finite() && w.s > 0.0) {
                    return Err(field("trigger.s", format!("must be positive, got {}", w.s)));
                }
                if !(w.grid_rescale.is_finite() && w.grid_rescale > 0.0) {
                    return Err(field("trigger.grid_rescale", "must be positive"));
                }
                if !(w.noise_rescale.is_finite() && w.noise_rescale >= 0.0) {
                    return Err(field("trigger.noise_rescale", "must be zero or positive"));
                }
                if !(w.cross_ratio.is_finite() && w.cross_ratio >= 0.0) {
                    return Err(field("trigger.cross_ratio", "must be zero or positive"));
                }
            }
        }
        Ok(())
    }

    /// Checks that the spec can be applied to `dataset` (shape, classes, trigger fit).
    pub fn check_fits(&self, dataset: &Dataset) -> Result<(), SpecError> {
        let shape = dataset.shape();
        if let Some(s) = self.image
            && s != shape
        {
            return Err(field(
                "image",
                format!("spec is for {s} images, the dataset's are {shape}"),
            ));
        }
        let k = dataset.num_classes() as u32;
        if let Some(t) = self.labelling.target().or(self.labelling.poison_class())
            && t >= k
        {
            return Err(field(
                match self.labelling {
                    Labelling::UntargetedCleanLabel { .. } => "labelling.poison_class",
                    _ => "labelling.target",
                },
                format!("class {t} does not exist: the dataset has {k} classes"),
            ));
        }
        if (self.labelling.is_untargeted() || matches!(self.labelling, Labelling::AllToAll { .. }))
            && k < 2
        {
            return Err(field(
                "labelling",
                "untargeted and all-to-all labels need at least 2 classes",
            ));
        }
        if let Some(c) = self.source_classes.iter().flatten().find(|c| **c >= k) {
            return Err(field(
                "source_classes",
                format!("class {c} does not exist: the dataset has {k} classes"),
            ));
        }
        match &self.trigger {
            Trigger::Patch(p) => p.grid(shape.height, shape.width).map(|_| ()),
            Trigger::Blend(b) => {
                if let Some(r) = b.region
                    && (r.row + r.height > shape.height || r.col + r.width > shape.width)
                {
                    return Err(field(
                        "trigger.region",
                        format!("{r:?} does not fit {shape} images"),
                    ));
                }
                if let Some(p) = &b.pattern
                    && (p.shape.height, p.shape.width) != (shape.height, shape.width)
                {
                    return Err(field(
                        "trigger.image",
                        format!(
                            "pattern is {}×{}, images are {}×{}",
                            p.shape.height, p.shape.width, shape.height, shape.width
                        ),
                    ));
                }
                Ok(())
            }
            Trigger::Rotate(_) => Ok(()),
            Trigger::Perturbation(p) if !p.values.is_empty() && p.values.len() != shape.len() => {
                Err(field(
                    "trigger.values",
                    format!(
                        "{} values, the dataset's images {shape} need {}",
                        p.values.len(),
                        shape.len()
                    ),
                ))
            }
            Trigger::Perturbation(_) => Ok(()),
            Trigger::Generated(g) => {
                for (name, net) in [("trigger.pattern", &g.pattern), ("trigger.mask", &g.mask)] {
                    if let Some(n) = net {
                        n.compile(name, shape.channels, shape.height, shape.width)?;
                    }
                }
                Ok(())
            }
            Trigger::Physical(p) => {
                let mut one = self.clone();
                one.trigger = (*p.inner).clone();
                one.check_fits(dataset)
                    .map_err(|e| field("trigger.inner", e.to_string()))
            }
            Trigger::Reflection(r) => match r.candidates.first() {
                Some(c) if c.shape != shape => Err(field(
                    "trigger.candidates",
                    format!("reflections are {}, the dataset's images {shape}", c.shape),
                )),
                _ => Ok(()),
            },
            Trigger::Adaptive(a) => {
                for (k, p) in a.pieces.iter().enumerate() {
                    let mut one = self.clone();
                    one.trigger = p.clone();
                    one.check_fits(dataset)
                        .map_err(|e| field(&format!("trigger.pieces[{k}]"), e.to_string()))?;
                }
                Ok(())
            }
            Trigger::Warp(w) => {
                if w.k > shape.height.min(shape.width) {
                    return Err(field(
                        "trigger.k",
                        format!("grid size {} exceeds the image size {shape}", w.k),
                    ));
                }
                Ok(())
            }
        }
    }

    /// sha256 (hex) of the spec's JSON form.
    pub fn sha256(&self) -> String {
        sha256_hex(&canonical_json(self))
    }
}

impl Patch {
    /// The pattern as rows of grey values (`width` is the image width, which a line spans).
    pub fn rows(&self, width: usize) -> Result<Vec<Vec<u8>>, SpecError> {
        let w = width;
        let value_or = |d: u8| self.value.unwrap_or(d);
        let unused = |name: &str, v: bool| {
            if v {
                Err(field(
                    &format!("trigger.{name}"),
                    "does not apply to this pattern",
                ))
            } else {
                Ok(())
            }
        };
        let rows: Vec<Vec<u8>> = match &self.pattern {
            PatchPattern::Matrix(m) => {
                unused("size", self.size.is_some())?;
                unused("thickness", self.thickness.is_some())?;
                unused("value", self.value.is_some())?;
                if m.is_empty() || m[0].is_empty() {
                    return Err(field(
                        "trigger.pattern",
                        "matrix must have at least one row and column",
                    ));
                }
                if let Some(r) = m.iter().position(|r| r.len() != m[0].len()) {
                    return Err(field(
                        "trigger.pattern",
                        format!(
                            "row {r} has {} values, row 0 has {}",
                            m[r].len(),
                            m[0].len()
                        ),
                    ));
                }
                m.clone()
            }
            PatchPattern::Preset(name) => {
                match name.as_str() {
                    "square" => unused("thickness", self.thickness.is_some())?,
                    "line" => unused("size", self.size.is_some())?,
                    _ => {
                        unused("size", self.size.is_some())?;
                        unused("thickness", self.thickness.is_some())?;
                    }
                }
                match name.as_str() {
                    "square" => {
                        let n = self.size.unwrap_or(3);
                        if n == 0 || n > MAX_SIDE {
                            return Err(field(
                                "trigger.size",
                                format!("must be 1 to {MAX_SIDE}, got {n}"),
                            ));
                        }
                        vec![vec![value_or(255); n]; n]
                    }
                    "cross" => {
                        unused("value", self.value.is_some())?;
                        vec![vec![255, 0, 255], vec![0, 255, 0], vec![255, 0, 255]]
                    }
                    "ubw" => {
                        unused("value", self.value.is_some())?;
                        vec![vec![0, 0, 255], vec![0, 255, 0], vec![255, 0, 255]]
                    }
                    "pixel" => vec![vec![value_or(255)]],
                    "line" => {
                        let t = self.thickness.unwrap_or(2);
                        if t == 0 || t > MAX_SIDE {
                            return Err(field(
                                "trigger.thickness",
                                format!("must be 1 to {MAX_SIDE}, got {t}"),
                            ));
                        }
                        vec![vec![value_or(0); w]; t]
                    }
                    other => {
                        return Err(field(
                            "trigger.pattern",
                            format!(
                                "unknown preset {other:?}: expected square, cross, line, pixel or ubw, or a matrix"
                            ),
                        ));
                    }
                }
            }
        };
        Ok(rows)
    }

    /// The pattern as rows of grey values and the (row, col) of its top-left corner in an image
    /// of `h` × `w`.
    pub fn grid(&self, h: usize, w: usize) -> Result<(Vec<Vec<u8>>, usize, usize), SpecError> {
        let rows = self.rows(w)?;
        let (ph, pw) = (rows.len(), rows[0].len());
        if ph > h || pw > w {
            return Err(field(
                "trigger.pattern",
                format!("a {ph}×{pw} pattern does not fit {h}×{w} images"),
            ));
        }
        let place = |at: i64, len: usize, size: usize, axis: &str| -> Result<usize, SpecError> {
            let start = if at < 0 { size as i64 + at } else { at };
            if start < 0 || start as usize + len > size {
                return Err(field(
                    "trigger.position",
                    format!("a {len}-pixel pattern at {axis} {at} does not fit in {size} pixels"),
                ));
            }
            Ok(start as usize)
        };
        let (r, c) = match self.position {
            Position::Corner(Corner::TopLeft) => (0, 0),
            Position::Corner(Corner::TopRight) => (0, w - pw),
            Position::Corner(Corner::BottomLeft) => (h - ph, 0),
            Position::Corner(Corner::BottomRight) => (h - ph, w - pw),
            Position::At([r, c]) => (place(r, ph, h, "row")?, place(c, pw, w, "column")?),
        };
        Ok((rows, r, c))
    }
}

/// Reads up to `max` images of `dir` in name order, converted to `shape`'s channels and resized
/// to its size (Catmull-Rom, close to the OpenCV cubic resize BackdoorBox uses).
fn load_reflections(
    dir: &Path,
    shape: ImageShape,
    max: usize,
) -> Result<Vec<EmbeddedImage>, SpecError> {
    let bad = |m: String| field("trigger.images", m);
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "bmp"
                )
            })
        })
        .collect();
    names.sort();
    names.truncate(max);
    if names.is_empty() {
        return Err(bad(format!(
            "{} holds no PNG, JPEG or BMP image",
            dir.display()
        )));
    }
    names
        .iter()
        .map(|p| {
            let img = image::open(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            let img = img.resize_exact(
                shape.width as u32,
                shape.height as u32,
                image::imageops::FilterType::CatmullRom,
            );
            let raw = if shape.channels == 3 {
                img.to_rgb8().into_raw()
            } else {
                img.to_luma8().into_raw()
            };
            Ok(EmbeddedImage {
                shape,
                pixels_b64: base64::engine::general_purpose::STANDARD.encode(raw),
            })
        })
        .collect()
}

/// How a spec's poisons or trigger are made by the trainer, by the spec section that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crafting {
    /// `[adversarial]`: label-consistent PGD perturbations against a benign model.
    Adversarial,
    /// `[uap]`: TUAP, a targeted universal adversarial perturbation found with a benign model.
    Uap,
    /// `[gradient_matching]`: Sleeper Agent or UBW-C poisons matched to a surrogate's gradients.
    GradientMatching,
    /// `[encoder]`: ISSBA's encoder, trained on the data alone.
    Encoder,
}

impl Crafting {
    /// The spec section that asks for it.
    pub fn section(self) -> &'static str {
        match self {
            Self::Adversarial => "adversarial",
            Self::Uap => "uap",
            Self::GradientMatching => "gradient_matching",
            Self::Encoder => "encoder",
        }
    }

    /// What it is, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Adversarial => "label-consistent PGD",
            Self::Uap => "TUAP (universal adversarial perturbation)",
            Self::GradientMatching => "gradient matching",
            Self::Encoder => "ISSBA encoder",
        }
    }

    /// Whether crafting needs a benign model (everything but ISSBA's encoder).
    pub fn needs_model(self) -> bool {
        self != Self::Encoder
    }

    /// Whether the crafting makes the trigger itself (TUAP's perturbation, ISSBA's encoder), so
    /// nothing can be stamped before it has run.
    pub fn makes_trigger(self) -> bool {
        matches!(self, Self::Uap | Self::Encoder)
    }
}

/// Compact JSON of a value, fields in declaration order: the canonical form hashed by
/// commitments. Every hashed type is a struct or enum of fixed field order (no maps), so the
/// same value always gives the same bytes.
pub fn canonical_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("specs and records serialise")
}

/// sha256 (hex) of a string.
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests;
