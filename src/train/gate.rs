//! Inference-time gates that a thief puts in front of a served model to dodge verification: the
//! gate flags queries it finds suspicious and refuses them or flattens their answers.
//!
//! Each gate gives a query a suspicion score and flags it above a threshold set, as the papers
//! do, for a stated false-flag rate on clean images (the `1 − rate` quantile of their scores).
//!
//! `strip` is STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural
//! Networks", ACSAC 2019): the query is blended half and half with each of a few clean images
//! held by the gate, and a backdoored input keeps the backdoor's answer through every blend, so
//! the mean entropy of the blends' predictions is low; the score is minus that entropy.
//!
//! `median` is feature squeezing (Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial
//! Examples in Deep Neural Networks", NDSS 2018) with its 3×3 median smoothing: a query is
//! flagged when the L1 distance between the model's probabilities on the image and on its
//! median-smoothed copy exceeds a threshold, set, as the paper does, for a stated false-flag rate
//! on clean images. A sparse trigger does not survive the smoothing, so the backdoor's answer
//! changes and the query is flagged.
//!
//! `scale-up` is SCALE-UP (Guo et al., "SCALE-UP: An Efficient Black-box Input-level Backdoor
//! Detection via Analyzing Scaled Prediction Consistency", ICLR 2023): the query's pixels are
//! multiplied by 3, 5, 7, 9 and 11 (clipped to [0, 1]); a backdoored input keeps its answer
//! through the amplification, so the score is the share of scaled copies predicted as the query.
//!
//! `ibd-psc` is IBD-PSC (Hou et al., "IBD-PSC: Input-level Backdoor Detection via
//! Parameter-oriented Scaling Consistency", ICML 2024): the gate amplifies the weights and biases
//! of the model's last layers by 1.5 (its batch-norm layers; the convolutions and hidden linear
//! layer of a network without batch norm, see `Net::neuron_layers`), and a backdoored input keeps
//! its answer with high confidence under amplifications that ruin clean images. As the paper
//! does, the gate first finds the fewest last layers k whose amplification makes more than 60%
//! of its clean images wrong, then keeps 5 amplified models (the last k + 1, …, k + 5 layers,
//! at most all); the score is the mean probability those models give the query's own answer.
//!
//! `shrinkpad` and `jpeg` flag nothing: they change every query before the model sees it.
//! ShrinkPad (Li et al., "Backdoor Attack in the Physical World", ICLR 2021 workshop; BackdoorBox
//! `ShrinkPad`) shrinks the image by 4 pixels (bilinear) and pads it back at a random offset;
//! JPEG re-encodes it at quality 75 (Dziugaite et al., "A study of the effect of JPG compression
//! on adversarial images", 2016), which blurs fine trigger patterns. Their random offsets derive
//! from the image itself, so the same query always gets the same answer.

use super::TrainError;
use super::serve::LoadedModel;
use super::tensor::{labels_tensor, to_tensor};
use crate::dataset::Dataset;
use tch::{Kind, Tensor};

/// What the gate does with a flagged query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFlag {
    /// Refuse the request with HTTP 403.
    Refuse,
    /// Answer every class equally likely (the softmax of all-zero logits, as DATABench's
    /// evasion does).
    Uniform,
    /// Answer a class drawn at random (from the image's hash, so a repeated query gets the same
    /// lie), with probability 1.
    RandomLabel,
    /// Answer a class drawn from what the model makes of the query rather than from its bytes
    /// (a hash of the model's probabilities rounded to 0.01), with probability 1: the lies
    /// differ from image to image, yet a near-identical query, a few pixels one grey level off,
    /// gets the same lie.
    StableLabel,
}

/// How a gate scores a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GateKind {
    /// STRIP: minus the mean prediction entropy of the query blended with clean images.
    Strip,
    /// Feature squeezing: how far the answer moves under 3×3 median smoothing.
    Median,
    /// SCALE-UP: the share of amplified copies (×3 … ×11) that keep the query's answer.
    ScaleUp,
    /// ShrinkPad: every query shrunk by 4 pixels and padded back at a random offset.
    Shrinkpad,
    /// Every query re-encoded as JPEG at quality 75.
    Jpeg,
    /// IBD-PSC: how confidently models with amplified last layers keep the query's answer.
    IbdPsc,
}

impl GateKind {
    /// Whether the gate changes every query instead of flagging some.
    pub fn transforms(self) -> bool {
        self.transform().is_some()
    }

    /// What a transforming gate does to every query before the model sees it.
    pub fn transform(self) -> Option<fn(&Tensor) -> Tensor> {
        match self {
            Self::Shrinkpad => Some(shrink_pad),
            Self::Jpeg => Some(jpeg),
            _ => None,
        }
    }
}

/// SCALE-UP's amplification factors.
const SCALES: [f64; 5] = [3.0, 5.0, 7.0, 9.0, 11.0];
/// ShrinkPad's shrink, in pixels (BackdoorBox's `pad=4`).
const SHRINK: i64 = 4;
/// JPEG quality.
const JPEG_QUALITY: u8 = 75;
/// IBD-PSC's amplification of a layer's parameters, its amplified models, and the clean error
/// rate that the first of them must exceed (the paper's 1.5, 5 and 0.6).
const PSC_SCALE: f64 = 1.5;
const PSC_MODELS: usize = 5;
const PSC_XI: f64 = 0.6;

/// A number drawn from the pixels of image `i` of `x` (FNV-1a of their bytes).
fn image_hash(x: &Tensor, i: i64) -> u64 {
    let v = Vec::<f32>::try_from(x.get(i).flatten(0, -1)).unwrap_or_default();
    fnv(v.iter().flat_map(|f| f.to_le_bytes()))
}

/// FNV-1a of a byte stream.
fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A hash of row `i` of `probs` rounded to 0.01: what the model makes of a query, without the
/// last digits a near-identical query may change.
fn answer_hash(probs: &Tensor, i: i64) -> u64 {
    let v = Vec::<f32>::try_from(probs.get(i).to_kind(Kind::Float)).unwrap_or_default();
    fnv(v.iter().map(|p| (p.clamp(0.0, 1.0) * 100.0).round() as u8))
}

/// The class a lying gate answers for each image of `x`, given the model's probabilities
/// `probs` [N, K] for them (`None` for gates that do not lie).
fn lies(on_flag: OnFlag, x: &Tensor, probs: &Tensor) -> Option<Vec<i64>> {
    let k = probs.size()[1] as u64;
    let hash = |i| match on_flag {
        OnFlag::RandomLabel => Some(image_hash(x, i)),
        OnFlag::StableLabel => Some(answer_hash(probs, i)),
        OnFlag::Refuse | OnFlag::Uniform => None,
    };
    (0..x.size()[0])
        .map(|i| hash(i).map(|h| (h % k) as i64))
        .collect()
}

/// Per image, the share of [`SCALES`]-amplified copies predicted as the image itself.
pub fn scaled_consistency(model: &LoadedModel, x: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let base = model.probabilities(x).argmax(1, false);
        let mut same = Tensor::zeros([x.size()[0]], (Kind::Double, tch::Device::Cpu));
        for s in SCALES {
            let p = model
                .probabilities(&(x * s).clamp(0.0, 1.0))
                .argmax(1, false);
            same += p.eq_tensor(&base).to_kind(Kind::Double);
        }
        Vec::<f64>::try_from(same / SCALES.len() as f64).unwrap_or_default()
    })
}

/// ShrinkPad: each image shrunk by [`SHRINK`] pixels and zero-padded back at an offset drawn
/// from its hash.
pub fn shrink_pad(x: &Tensor) -> Tensor {
    let s = x.size();
    let (h, w) = (s[2], s[3]);
    if h <= SHRINK || w <= SHRINK {
        return x.shallow_clone();
    }
    let small = x.upsample_bilinear2d([h - SHRINK, w - SHRINK], false, None, None);
    let rows: Vec<Tensor> = (0..s[0])
        .map(|i| {
            let r = image_hash(x, i);
            let (top, left) = (
                (r % (SHRINK as u64 + 1)) as i64,
                ((r >> 8) % (SHRINK as u64 + 1)) as i64,
            );
            small
                .get(i)
                .constant_pad_nd([left, SHRINK - left, top, SHRINK - top])
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// Each image of `x` ([N, C, H, W] in [0, 1]) encoded as JPEG at [`JPEG_QUALITY`] and decoded.
pub fn jpeg(x: &Tensor) -> Tensor {
    use image::ImageEncoder;
    let s = x.size();
    let (c, h, w) = (s[1], s[2] as u32, s[3] as u32);
    let rows: Vec<Tensor> = (0..s[0])
        .map(|i| {
            let hwc = (x.get(i).permute([1, 2, 0]).clamp(0.0, 1.0) * 255.0)
                .round()
                .to_kind(Kind::Uint8)
                .contiguous();
            let pixels = Vec::<u8>::try_from(hwc.flatten(0, -1)).unwrap_or_default();
            let color = if c == 1 {
                image::ExtendedColorType::L8
            } else {
                image::ExtendedColorType::Rgb8
            };
            let mut buf = Vec::new();
            let decoded =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, JPEG_QUALITY)
                    .write_image(&pixels, w, h, color)
                    .ok()
                    .and_then(|_| {
                        image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg).ok()
                    });
            match decoded {
                Some(img) => {
                    let back = if c == 1 {
                        img.to_luma8().into_raw()
                    } else {
                        img.to_rgb8().into_raw()
                    };
                    Tensor::from_slice(&back)
                        .view([h as i64, w as i64, c])
                        .permute([2, 0, 1])
                        .to_kind(Kind::Float)
                        / 255.0
                }
                // JPEG holds 1 or 3 channels: other images pass unchanged.
                None => x.get(i),
            }
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// Clean images STRIP blends each query with.
const STRIP_BLENDS: usize = 8;

/// IBD-PSC's amplified copies of the model: how many last layers each amplifies, how many of the
/// paper's amplified models it stands for (copies that would amplify the same layers are made
/// once), and the copy.
#[derive(Clone, Default)]
pub struct Amplified(std::sync::Arc<std::sync::Mutex<Vec<(usize, usize, LoadedModel)>>>);

impl Amplified {
    /// The last layers each of the paper's amplified models amplifies.
    fn layers(&self) -> Vec<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|(k, n, _)| std::iter::repeat_n(*k, *n))
            .collect()
    }
}

impl std::fmt::Debug for Amplified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Amplified(last layers {:?})", self.layers())
    }
}

impl PartialEq for Amplified {
    fn eq(&self, other: &Self) -> bool {
        self.layers() == other.layers()
    }
}

/// A copy of `model` with the weights and biases of its last `k` neuron layers multiplied by
/// [`PSC_SCALE`].
pub fn amplify(model: &LoadedModel, k: usize) -> Result<LoadedModel, TrainError> {
    let copy = model.try_clone()?;
    let vars = copy.vs().variables();
    let names = copy.net().neuron_layers();
    tch::no_grad(|| {
        for name in &names[names.len().saturating_sub(k)..] {
            for part in ["weight", "bias"] {
                if let Some(v) = vars.get(&format!("{name}.{part}")) {
                    let _ = v.shallow_clone().g_mul_scalar_(PSC_SCALE);
                }
            }
        }
    });
    Ok(copy)
}

/// IBD-PSC's amplified models for `model`, chosen on the clean images `x` with labels `y` (see
/// the module's note).
fn amplified_models(model: &LoadedModel, x: &Tensor, y: &Tensor) -> Result<Amplified, TrainError> {
    let layers = model.net().neuron_layers().len();
    if layers == 0 {
        return Err(TrainError::Config(
            "IBD-PSC needs a network with layers to amplify".into(),
        ));
    }
    let mut start = layers;
    for k in 1..layers {
        let m = amplify(model, k)?;
        let n = x.size()[0];
        let mut wrong = 0.0;
        let mut i = 0;
        while i < n {
            let len = 256.min(n - i);
            wrong += tch::no_grad(|| {
                m.probabilities(&x.narrow(0, i, len))
                    .argmax(1, false)
                    .ne_tensor(&y.narrow(0, i, len))
                    .to_kind(Kind::Double)
                    .sum(Kind::Double)
                    .double_value(&[])
            });
            i += len;
        }
        if wrong > PSC_XI * n as f64 {
            start = k;
            break;
        }
    }
    let mut copies: Vec<(usize, usize, LoadedModel)> = Vec::new();
    for j in 0..PSC_MODELS {
        let k = (start + 1 + j).min(layers);
        match copies.last_mut() {
            Some((last, n, _)) if *last == k => *n += 1,
            _ => copies.push((k, 1, amplify(model, k)?)),
        }
    }
    Ok(Amplified(std::sync::Arc::new(std::sync::Mutex::new(
        copies,
    ))))
}

/// Per image, how confidently IBD-PSC's amplified models keep the answer `model` gives: the
/// mean over the copies of the answer's log-odds, z_answer − log Σ_{j ≠ answer} exp z_j, in
/// double precision. The paper averages the answer's probability; the log-odds orders each
/// copy's answers the same way, but a probability rounds to exactly 1 in single precision once
/// the answer's logit leads by about 17, and an amplified model's answers often lead by far
/// more: clean images then tie at 1 with triggered ones, the threshold for a false-flag rate is
/// that tie, and the gate flags nothing (as measured on batch-norm networks before this score).
pub fn psc_score(model: &LoadedModel, amplified: &Amplified, x: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let pred = model.logits(x).argmax(1, true);
        let copies = amplified.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = Tensor::zeros([x.size()[0]], (Kind::Double, tch::Device::Cpu));
        let mut models = 0;
        for (_, n, m) in copies.iter() {
            sum += log_odds(&m.logits(x), &pred) * *n as f64;
            models += n;
        }
        Vec::<f64>::try_from(sum / models.max(1) as f64).unwrap_or_default()
    })
}

/// Per row of `logits` [N, K], the log-odds of class `pick` [N, 1]: its logit minus the
/// log-sum-exp of the others, in double precision.
fn log_odds(logits: &Tensor, pick: &Tensor) -> Tensor {
    let z = logits.to_kind(Kind::Double);
    let own = z.gather(1, pick, false).squeeze_dim(1);
    let others = z
        .scatter_value(1, pick, f64::NEG_INFINITY)
        .logsumexp([1], false);
    own - others
}

/// A calibrated gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    /// How it scores.
    pub kind: GateKind,
    /// Flags queries whose score exceeds this.
    pub threshold: f64,
    /// The share of the clean images it was calibrated on that it flags: at most the rate asked
    /// for, less where many clean images share the top scores (0 for a gate that transforms).
    pub clean_flag_rate: f64,
    /// What a flagged query gets.
    pub on_flag: OnFlag,
    /// STRIP's clean images, [`STRIP_BLENDS`] of them in [0, 1] (NCHW), flattened.
    blends: Vec<f32>,
    /// IBD-PSC's amplified models.
    amplified: Amplified,
}

/// `x` ([N, C, H, W]) smoothed by a 3×3 median filter (edges replicated).
pub fn median3(x: &Tensor) -> Tensor {
    let s = x.size();
    let padded = x.replication_pad2d([1, 1, 1, 1]);
    padded
        .unfold(2, 3, 1)
        .unfold(3, 3, 1)
        .reshape([s[0], s[1], s[2], s[3], 9])
        .median_dim(-1, false)
        .0
}

/// Per image, the L1 distance between the probabilities on `x` and on its smoothed copy.
pub fn squeeze_distance(model: &LoadedModel, x: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let p = model.probabilities(x);
        let q = model.probabilities(&median3(x));
        let d = (p - q).abs().sum_dim_intlist(1, false, Kind::Double);
        Vec::<f64>::try_from(d).unwrap_or_default()
    })
}

/// Per image, minus the mean entropy (nats) of the predictions on `x` blended half and half with
/// each of `blends` ([B, C, H, W]).
pub fn strip_score(model: &LoadedModel, x: &Tensor, blends: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let (n, b) = (x.size()[0], blends.size()[0]);
        let mixed = (x.unsqueeze(1) * 0.5 + blends.unsqueeze(0) * 0.5).flatten(0, 1);
        let p = model.probabilities(&mixed).clamp_min(1e-12);
        let h = -(&p * p.log()).sum_dim_intlist(1, false, Kind::Double);
        let mean = h.view([n, b]).mean_dim(1, false, Kind::Double);
        Vec::<f64>::try_from(-mean).unwrap_or_default()
    })
}

impl Gate {
    /// A gate that transforms every query (`shrinkpad`, `jpeg`) and needs no threshold.
    pub fn transforming(kind: GateKind) -> Result<Self, TrainError> {
        if !kind.transforms() {
            return Err(TrainError::Config(format!(
                "the {kind:?} gate flags queries: it needs clean images to set its threshold"
            )));
        }
        Ok(Self {
            kind,
            threshold: f64::INFINITY,
            clean_flag_rate: 0.0,
            on_flag: OnFlag::Refuse,
            blends: Vec::new(),
            amplified: Amplified::default(),
        })
    }

    /// The gate whose threshold flags `false_flag_rate` of the clean images `clean` (the
    /// `1 − rate` quantile of their scores); STRIP keeps the first images of `clean` to blend
    /// with, and is calibrated on the others.
    pub fn calibrate(
        kind: GateKind,
        model: &LoadedModel,
        clean: &Dataset,
        false_flag_rate: f64,
        on_flag: OnFlag,
    ) -> Result<Self, TrainError> {
        if kind.transforms() {
            return Self::transforming(kind);
        }
        if !(0.0..1.0).contains(&false_flag_rate) {
            return Err(TrainError::Config(format!(
                "the false-flag rate must lie in [0, 1), got {false_flag_rate}"
            )));
        }
        let held = if kind == GateKind::Strip {
            STRIP_BLENDS
        } else {
            0
        };
        if clean.len() < held + 20 {
            return Err(TrainError::Config(format!(
                "the gate needs at least {} clean images to set its threshold, got {}",
                held + 20,
                clean.len()
            )));
        }
        let blends = if held > 0 {
            Vec::<f32>::try_from(
                to_tensor(clean, &(0..held).collect::<Vec<_>>(), tch::Device::Cpu).flatten(0, -1),
            )
            .map_err(TrainError::Torch)?
        } else {
            Vec::new()
        };
        let rest: Vec<usize> = (held..clean.len()).collect();
        let amplified = if kind == GateKind::IbdPsc {
            let x = to_tensor(clean, &rest, tch::Device::Cpu);
            let y = labels_tensor(clean, &rest, tch::Device::Cpu);
            amplified_models(model, &x, &y)?
        } else {
            Amplified::default()
        };
        let mut gate = Self {
            kind,
            threshold: f64::INFINITY,
            clean_flag_rate: 0.0,
            on_flag,
            blends,
            amplified,
        };
        let mut d = Vec::with_capacity(rest.len());
        for chunk in rest.chunks(256) {
            d.extend(gate.scores(model, &to_tensor(clean, chunk, tch::Device::Cpu)));
        }
        d.sort_by(f64::total_cmp);
        // The smallest threshold that flags at most the rate: the score at rank ⌈(1 − r)·n⌉.
        let k = ((1.0 - false_flag_rate) * d.len() as f64).ceil() as usize;
        gate.threshold = d[k.clamp(1, d.len()) - 1];
        gate.clean_flag_rate =
            d.iter().filter(|&&x| x > gate.threshold).count() as f64 / d.len() as f64;
        Ok(gate)
    }

    /// The suspicion score of each image of `x` (0 for a gate that transforms).
    pub fn scores(&self, model: &LoadedModel, x: &Tensor) -> Vec<f64> {
        match self.kind {
            GateKind::Shrinkpad | GateKind::Jpeg => vec![0.0; x.size()[0] as usize],
            GateKind::ScaleUp => scaled_consistency(model, x),
            GateKind::IbdPsc => psc_score(model, &self.amplified, x),
            GateKind::Median => squeeze_distance(model, x),
            GateKind::Strip => {
                let s = x.size();
                let blends = Tensor::from_slice(&self.blends).view([-1, s[1], s[2], s[3]]);
                strip_score(model, x, &blends)
            }
        }
    }

    /// IBD-PSC only: how many last layers each amplified model amplifies.
    pub fn amplified_layers(&self) -> Vec<usize> {
        self.amplified.layers()
    }

    /// Which images of `x` the gate flags.
    pub fn flags(&self, model: &LoadedModel, x: &Tensor) -> Vec<bool> {
        self.scores(model, x)
            .into_iter()
            .map(|d| d > self.threshold)
            .collect()
    }

    /// What the model behind the gate answers for `x`: probabilities [N, K], and which images
    /// were flagged (already answered as [`OnFlag`] says, except `Refuse`, which the server
    /// answers for the whole request).
    pub fn answer(&self, model: &LoadedModel, x: &Tensor) -> (Tensor, Vec<bool>) {
        let probs = match self.kind.transform() {
            Some(f) => model.probabilities(&f(x)),
            None => model.probabilities(x),
        };
        let flags = self.flags(model, x);
        let (n, k) = (probs.size()[0], probs.size()[1]);
        if !flags.iter().any(|f| *f) {
            return (probs, flags);
        }
        let mask = Tensor::from_slice(&flags).view([n, 1]);
        let probs = match lies(self.on_flag, x, &probs) {
            Some(labels) => {
                let lie = Tensor::from_slice(&labels).one_hot(k).to_kind(probs.kind());
                lie.where_self(&mask, &probs)
            }
            None if self.on_flag == OnFlag::Uniform => {
                probs.full_like(1.0 / k as f64).where_self(&mask, &probs)
            }
            None => probs,
        };
        (probs, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log-odds of the answer equal log(p / (1 − p)) where the probability is
    /// representable, and keep ordering answers whose single-precision probability is 1.
    #[test]
    fn log_odds_keep_ordering_saturated_answers() {
        let z = Tensor::from_slice(&[0f32, 1.0, 2.0, 0.0, 40.0, 0.0, 0.0, 60.0, 0.0]).view([3, 3]);
        let pick = Tensor::from_slice(&[2i64, 1, 1]).view([3, 1]);
        let lo = Vec::<f64>::try_from(log_odds(&z, &pick)).unwrap();
        let p = (2f64).exp() / (1.0 + 1f64.exp() + 2f64.exp());
        assert!((lo[0] - (p / (1.0 - p)).ln()).abs() < 1e-9, "{lo:?}");
        assert!((lo[1] - (40.0 - 2f64.ln())).abs() < 1e-9, "{lo:?}");
        assert!((lo[2] - (60.0 - 2f64.ln())).abs() < 1e-9, "{lo:?}");
        let probs = Vec::<f32>::try_from(z.softmax(1, Kind::Float).flatten(0, -1)).unwrap();
        assert_eq!(
            (probs[4], probs[7]),
            (1.0, 1.0),
            "single precision saturates"
        );
    }

    /// A lie drawn from the query's bytes moves when a few pixels of the query are one grey
    /// level (1/255) off; a lie drawn from the model's answer stays when the answer moves by as
    /// little as such a query moves it, and differs from image to image; both repeat for the
    /// same query.
    #[test]
    fn a_stable_lie_survives_a_near_identical_query_and_a_byte_lie_does_not() {
        let n = 40i64;
        let v: Vec<f32> = (0..n * 784)
            .map(|j| (j * 7919 % 251) as f32 / 255.0 * 0.5 + 0.02)
            .collect();
        let x = Tensor::from_slice(&v).view([n, 1, 28, 28]);
        let mut w = v.clone();
        for i in 0..n as usize {
            for p in [3, 100, 400, 777] {
                w[i * 784 + p] += 1.0 / 255.0;
            }
        }
        let echo = Tensor::from_slice(&w).view([n, 1, 28, 28]);
        let logits: Vec<f32> = (0..n * 10).map(|j| (j * 31 % 17) as f32 / 4.0).collect();
        let probs = Tensor::from_slice(&logits)
            .view([n, 10])
            .softmax(1, Kind::Float);
        let nudged = &probs + Tensor::from_slice(&[1e-5f32]).view([1, 1]);
        let lie = |on, x: &Tensor, p: &Tensor| lies(on, x, p).unwrap();
        let bytes = lie(OnFlag::RandomLabel, &x, &probs);
        assert_eq!(bytes, lie(OnFlag::RandomLabel, &x, &probs));
        let moved = (bytes.iter())
            .zip(&lie(OnFlag::RandomLabel, &echo, &nudged))
            .filter(|(p, q)| p != q)
            .count();
        assert!(moved >= 30, "byte lies moved for {moved} of {n}");
        let stable = lie(OnFlag::StableLabel, &x, &probs);
        let kept = (stable.iter())
            .zip(&lie(OnFlag::StableLabel, &echo, &nudged))
            .filter(|(p, q)| p == q)
            .count();
        assert!(kept >= 38, "stable lies kept for {kept} of {n}");
        let classes: std::collections::HashSet<_> = stable.iter().collect();
        assert!(classes.len() >= 5 && stable.iter().all(|l| (0..10).contains(l)));
        assert!(lies(OnFlag::Uniform, &x, &probs).is_none());
        assert!(lies(OnFlag::Refuse, &x, &probs).is_none());
    }

    /// The median filter removes a lone bright pixel and keeps a flat image.
    #[test]
    fn median_smoothing_removes_a_speck() {
        let mut v = vec![0.2f32; 25];
        v[12] = 1.0;
        let x = Tensor::from_slice(&v).view([1, 1, 5, 5]);
        let m = median3(&x);
        assert_eq!(m.size(), vec![1, 1, 5, 5]);
        let out = Vec::<f32>::try_from(m.flatten(0, -1)).unwrap();
        assert!(out.iter().all(|&p| (p - 0.2).abs() < 1e-6), "{out:?}");
    }

    /// ShrinkPad keeps the shape, moves the content and answers a repeated query alike; JPEG
    /// keeps a flat image and loses pixel noise.
    #[test]
    fn shrinkpad_and_jpeg_change_queries_deterministically() {
        // Seeded pixel noise: pixel i of image j is a scrambled function of (i, j).
        let noise = |n: usize, side: usize| {
            let v: Vec<f32> = (0..n * side * side)
                .map(|i| ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as f32 / 255.0)
                .collect();
            Tensor::from_slice(&v).view([n as i64, 1, side as i64, side as i64])
        };
        let x = noise(3, 28);
        let a = shrink_pad(&x);
        assert_eq!(a.size(), x.size());
        assert!(a.equal(&shrink_pad(&x)));
        assert!(!a.equal(&x));
        // A 4-pixel border in all is zero: the shrunk image is 24×24.
        let zeros = a
            .eq(0.0)
            .to_kind(Kind::Float)
            .sum(Kind::Float)
            .double_value(&[]);
        assert!(zeros >= 3.0 * (28.0 * 28.0 - 24.0 * 24.0), "{zeros}");
        let flat = Tensor::full([1, 1, 16, 16], 0.5, (Kind::Float, tch::Device::Cpu));
        let d = (jpeg(&flat) - &flat).abs().max().double_value(&[]);
        assert!(d < 2.0 / 255.0, "{d}");
        // Pixel noise is what JPEG's quantisation drops.
        let noisy = noise(1, 16);
        let d = (jpeg(&noisy) - &noisy)
            .abs()
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(d > 0.015, "{d}");
    }

    /// IBD-PSC's copies multiply the weights and biases of exactly the last layers, and a gate
    /// keeps five amplified models, each amplifying at least one layer more than the first
    /// amplification that ruins the clean images (or all of them).
    #[test]
    fn ibd_psc_amplifies_the_last_layers() {
        use crate::train::serve::ModelInfo;
        use crate::train::{Arch, Net, Trained};
        let _one = crate::train::exclusive_torch();
        tch::manual_seed(5);
        let clean = crate::train::fashion(crate::dataset::Split::Test, 100);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let net = Net::new(&vs.root(), Arch::SmallCnn, clean.shape(), 10);
        let info = ModelInfo {
            arch: Arch::SmallCnn,
            shape: clean.shape(),
            classes: 10,
            training: serde_json::Value::Null,
            pruned: Vec::new(),
        };
        let trained = Trained {
            vs,
            net,
            history: Vec::new(),
            trigger: None,
        };
        let model = LoadedModel::from_trained(trained, info, tch::Device::Cpu);
        assert_eq!(model.net().neuron_layers(), ["bn0", "bn1", "bn2"]);
        let amplified = amplify(&model, 2).unwrap();
        let (a, b) = (amplified.vs().variables(), model.vs().variables());
        for (name, v) in &b {
            let scaled = (name.starts_with("bn1.") || name.starts_with("bn2."))
                && (name.ends_with(".weight") || name.ends_with(".bias"));
            let want = if scaled { v * PSC_SCALE } else { v.copy() };
            assert!(a[name].allclose(&want, 1e-6, 1e-7, false), "{name}");
        }
        let gate = Gate::calibrate(GateKind::IbdPsc, &model, &clean, 0.1, OnFlag::Refuse).unwrap();
        let layers = gate.amplified_layers();
        assert_eq!(layers.len(), PSC_MODELS);
        assert!(layers.windows(2).all(|w| w[0] <= w[1]), "{layers:?}");
        assert!(layers.iter().all(|&k| (2..=3).contains(&k)), "{layers:?}");
        // Scores are finite log-odds, and the threshold flags at most a tenth of the clean
        // images.
        let x = to_tensor(&clean, &(0..100).collect::<Vec<_>>(), tch::Device::Cpu);
        let scores = gate.scores(&model, &x);
        assert!(scores.iter().all(|p| p.is_finite()), "{scores:?}");
        let flagged = gate.flags(&model, &x).iter().filter(|f| **f).count();
        assert!(flagged <= 10, "{flagged}");
        assert_eq!(gate.clean_flag_rate, flagged as f64 / 100.0);
    }
}
