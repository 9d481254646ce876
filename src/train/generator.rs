//! Trigger generators trained with libtorch and exported as [`Network`]s for the secret record:
//!
//! - ISSBA (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021):
//!   a StegaStamp-style encoder hides a secret bit string in a bounded residual and a decoder
//!   reads it back; once trained, the encoder with the release's secret fixed is the trigger.
//! - IAD (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020): a mask network is
//!   trained first for density and diversity, then a pattern generator jointly with the
//!   classifier, with backdoor samples (target label) and cross-trigger samples (another image's
//!   pattern and mask, true label) in every batch; the other image is the batch's next one (IAD
//!   draws it from a second shuffled loader).
//! - LIRA (Doan et al., "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021):
//!   an additive trigger function `x + eps · T(x)` learnt alternately with the classifier
//!   (T towards the target on the current classifier, then the classifier on the mix
//!   `alpha · CE(clean) + (1 − alpha) · CE(triggered → target)`), T frozen for the second half.
//!   LIRA's one-step look-ahead classifier in the trigger step is replaced by the current one,
//!   the trigger step takes a quarter of each batch, and T has a learnt input-independent map
//!   beside its input-aware body (see [`Learner::lira`]).
//!
//! Every network here is the same small encoder–decoder (3×3 convolutions, one stride-2 step
//! and a nearest upsampling back; without them on odd sizes), so the plain-Rust forward in
//! [`crate::spec::network`] reproduces it.

use super::model::{Net, conv, linear};
use crate::dataset::{Dataset, ImageShape};
use crate::spec::network::{Layer, Network, encode_f32};
use crate::spec::{Encoder, Generated, GeneratedForm, Trigger, WatermarkSpec};
use crate::watermark::rng::{Rng, Stream};
use crate::watermark::{self, WatermarkError, Watermarked};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// IAD's epsilon in its pattern and mask normalisation.
const IAD_EPSILON: f64 = 1e-7;

/// Channels of ISSBA's encoder at full resolution.
const ENCODER_WIDTH: i64 = 16;
/// Channels of LIRA's trigger function at full resolution: it runs on every training batch, so it
/// is kept at a quarter of the encoder's cost.
const GENERATOR_WIDTH: i64 = 8;
/// Channels of IAD's pattern and mask networks (at 8, the mask learnt in a few epochs went dark).
const IAD_WIDTH: i64 = 16;

/// LIRA's gain before its final tanh.
const LIRA_GAIN: f32 = 5.0;

/// One planned layer.
#[derive(Debug, Clone, Copy)]
enum Plan {
    Conv {
        out: i64,
        stride: i64,
    },
    Relu,
    Tanh,
    Upsample,
    Affine(f32, f32),
    /// A learnt map of the image's size added (input-independent).
    Bias,
}

/// The shared encoder–decoder body to `out_c` channels, `width` channels at full resolution and
/// twice that at half, then `tail`.
fn body(shape: ImageShape, out_c: i64, width: i64, tail: &[Plan]) -> Vec<Plan> {
    use Plan::*;
    let even = shape.height.is_multiple_of(2) && shape.width.is_multiple_of(2);
    let (w, w2) = (width, 2 * width);
    let mut p = vec![Conv { out: w, stride: 1 }, Relu];
    if even {
        p.extend([
            Conv { out: w2, stride: 2 },
            Relu,
            Conv { out: w2, stride: 1 },
            Relu,
            Upsample,
        ]);
    } else {
        p.extend([Conv { out: w2, stride: 1 }, Relu]);
    }
    p.extend([
        Conv { out: w, stride: 1 },
        Relu,
        Conv {
            out: out_c,
            stride: 1,
        },
    ]);
    p.extend_from_slice(tail);
    p
}

/// IAD's `tanh(x) / (2 + ε) + 0.5`, into [0, 1].
const NORMALISE: [Plan; 2] = [
    Plan::Tanh,
    Plan::Affine((1.0 / (2.0 + IAD_EPSILON)) as f32, 0.5),
];

enum Op {
    Conv(nn::Conv2D, i64, i64, i64),
    Relu,
    Tanh,
    Upsample,
    Affine(f32, f32),
    Bias(Tensor),
}

/// A planned network in libtorch.
pub struct TorchNet {
    ops: Vec<Op>,
}

impl TorchNet {
    fn new(p: nn::Path, in_c: i64, plan: &[Plan], shape: ImageShape) -> Self {
        let mut c = in_c;
        let ops = plan
            .iter()
            .enumerate()
            .map(|(i, l)| match *l {
                Plan::Conv { out, stride } => {
                    let layer = conv(&p / format!("c{i}"), c, out, 3, stride, 1, true);
                    let op = Op::Conv(layer, c, out, stride);
                    c = out;
                    op
                }
                Plan::Relu => Op::Relu,
                Plan::Tanh => Op::Tanh,
                Plan::Upsample => Op::Upsample,
                Plan::Affine(a, b) => Op::Affine(a, b),
                Plan::Bias => Op::Bias(p.var(
                    &format!("b{i}"),
                    &[1, c, shape.height as i64, shape.width as i64],
                    nn::Init::Uniform { lo: -1.0, up: 1.0 },
                )),
            })
            .collect();
        Self { ops }
    }

    /// [n, C, H, W] → the network's output.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for op in &self.ops {
            x = match op {
                Op::Conv(c, ..) => c.forward(&x),
                Op::Relu => x.relu(),
                Op::Tanh => x.tanh(),
                Op::Upsample => {
                    let s = x.size();
                    x.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None)
                }
                Op::Affine(a, b) => x * f64::from(*a) + f64::from(*b),
                Op::Bias(b) => x + b,
            };
        }
        x
    }

    /// The stored form, after `prefix` layers.
    pub fn export(&self, prefix: Vec<Layer>) -> Network {
        let mut layers = prefix;
        for op in &self.ops {
            layers.push(match op {
                Op::Conv(c, cin, cout, stride) => {
                    let mut w = floats(&c.ws);
                    w.extend(floats(c.bs.as_ref().expect("convolutions have a bias")));
                    Layer::Conv {
                        in_channels: *cin as usize,
                        out_channels: *cout as usize,
                        kernel: 3,
                        stride: *stride as usize,
                        weights: encode_f32(&w),
                    }
                }
                Op::Relu => Layer::Relu,
                Op::Tanh => Layer::Tanh,
                Op::Upsample => Layer::Upsample,
                Op::Affine(a, b) => Layer::Affine {
                    scale: *a,
                    shift: *b,
                },
                Op::Bias(b) => Layer::Bias {
                    channels: b.size()[1] as usize,
                    values: encode_f32(&floats(b)),
                },
            });
        }
        Network { layers }
    }
}

fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(
        t.detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1),
    )
    .expect("float tensor")
}

/// `x` rounded to the byte grid in the forward pass, unchanged in the backward pass (straight
/// through), so that training sees the triggered images verification will send.
pub fn quantise(x: &Tensor) -> Tensor {
    let x = x.clamp(0.0, 1.0);
    let q = (&x * 255.0).round() / 255.0;
    &x + (q - &x).detach()
}

/// Runs `build` (which creates variables) with libtorch's generator seeded and held.
fn seeded<T>(seed: u64, build: impl FnOnce() -> T) -> T {
    let _rng = super::TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    build()
}

/// IAD's Adam (lr 0.01, betas 0.5 and 0.9) over `vs`.
fn iad_adam(vs: &nn::VarStore, lr: f64) -> nn::Optimizer {
    nn::Adam {
        beta1: 0.5,
        beta2: 0.9,
        wd: 0.0,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(vs, lr)
    .expect("Adam over the generator's variables")
}

fn bits_tensor(bits: &[f32], n: i64, k: i64, device: Device) -> Tensor {
    Tensor::from_slice(bits).view([n, k]).to_device(device)
}

/// What ISSBA's encoder training reached.
#[derive(Debug, Clone, Copy)]
pub struct IssbaReport {
    /// Fraction of the release secret's bits the decoder reads back from encoded held-in images.
    pub bit_accuracy: f64,
    /// Mean absolute residual, 0–255 scale.
    pub mean_abs_residual: f64,
}

impl IssbaReport {
    /// Refuses an encoder that did not learn: one whose decoder reads fewer than 75% of the
    /// bits, or whose residual is under half a grey level, would publish a release without a
    /// watermark. (In calibration, 1 of 6 encoders trained at the shipped settings collapsed to
    /// a zero residual, its decoder reading 25% of the bits.)
    pub fn check(&self) -> Result<(), String> {
        if self.bit_accuracy < 0.75 || self.mean_abs_residual < 0.5 {
            return Err(format!(
                "the ISSBA encoder did not learn to hide the secret ({self}): the release would \
                 carry no watermark; change the spec's seed or raise [encoder] epochs"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for IssbaReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ISSBA encoder: the decoder reads {:.1}% of the secret's bits; mean |residual| {:.2}/255",
            self.bit_accuracy * 100.0,
            self.mean_abs_residual
        )
    }
}

/// Trains ISSBA's encoder and decoder on `dataset` (seeded by the spec) and returns the trigger:
/// the encoder with the release's secret (drawn from the seed) projected into a fixed plane.
pub fn train_encoder(
    dataset: &Dataset,
    spec: &WatermarkSpec,
    e: Encoder,
    device: Device,
    progress: &super::Progress<'_>,
) -> Result<(Generated, IssbaReport), WatermarkError> {
    let Trigger::Generated(g) = &spec.trigger else {
        return Err(WatermarkError::Craft(
            "an [encoder] spec's trigger must be kind = \"generated\"".into(),
        ));
    };
    let scale = f64::from(g.scale.unwrap_or(0.0)) / 255.0;
    let shape = dataset.shape();
    let (c, h, w) = (
        shape.channels as i64,
        shape.height as i64,
        shape.width as i64,
    );
    let k = e.secret_size as i64;
    let mut rng = Rng::new(spec.seed, Stream::Craft);
    let mut idx: Vec<usize> = (0..dataset.len()).collect();
    let m = e.samples.min(idx.len());
    rng.choose_front(&mut idx, m);
    idx.truncate(m);
    let x_all = super::tensor::to_tensor(dataset, &idx, device);

    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let flat = ((h + 1) / 2 + 1) / 2 * (((w + 1) / 2 + 1) / 2) * 32;
    let (dense, enc, d1, d2, d3, d4) = seeded(spec.seed, || {
        (
            linear(&root / "secret", k, h * w),
            TorchNet::new(
                &root / "enc",
                c + 1,
                &body(shape, c, ENCODER_WIDTH, &[Plan::Tanh]),
                shape,
            ),
            conv(&root / "d1", c, 16, 3, 2, 1, true),
            conv(&root / "d2", 16, 32, 3, 2, 1, true),
            linear(&root / "d3", flat, 128),
            linear(&root / "d4", 128, k),
        )
    });
    let decode = |x: &Tensor| {
        x.apply(&d1)
            .relu()
            .apply(&d2)
            .relu()
            .flatten(1, -1)
            .apply(&d3)
            .relu()
            .apply(&d4)
    };
    let encode = |x: &Tensor, s: &Tensor| {
        let plane = s.apply(&dense).view([-1, 1, h, w]);
        let r = enc.forward(&Tensor::cat(&[x, &plane], 1)) * scale;
        (quantise(&(x + &r)), r)
    };
    let mut opt = nn::Adam::default()
        .build(&vs, e.lr)
        .map_err(|err| WatermarkError::Craft(format!("libtorch: {err}")))?;
    let batch = 64usize;
    let steps = m.div_ceil(batch);
    for epoch in 0..e.epochs {
        let mut order: Vec<i64> = (0..m as i64).collect();
        rng.choose_front(&mut order, m);
        let mut last = 0.0;
        for (step, chunk) in order.chunks(batch).enumerate() {
            let n = chunk.len() as i64;
            let x = x_all.index_select(0, &Tensor::from_slice(chunk).to_device(device));
            let bits: Vec<f32> = (0..n * k).map(|_| rng.below(2) as f32).collect();
            let s = bits_tensor(&bits, n, k, device);
            let (xe, r) = encode(&x, &s);
            let mut loss = decode(&xe).binary_cross_entropy_with_logits::<Tensor>(
                &s,
                None,
                None,
                tch::Reduction::Mean,
            );
            if epoch >= e.secret_only_epochs {
                loss += r.square().mean(Kind::Float) * e.image_weight;
            }
            opt.backward_step(&loss);
            last = loss.double_value(&[]);
            progress(epoch * steps + step + 1, e.epochs * steps, last);
        }
        if !last.is_finite() {
            return Err(WatermarkError::Craft(
                "the encoder's loss is not finite; lower encoder.lr".into(),
            ));
        }
    }
    // The release's secret, and what the decoder reads from encoded images.
    let secret: Vec<f32> = (0..k).map(|_| rng.below(2) as f32).collect();
    let report = tch::no_grad(|| {
        let n = m.min(1000) as i64;
        let x = x_all.narrow(0, 0, n);
        let s = bits_tensor(&secret, 1, k, device).expand([n, k], false);
        let (xe, _) = encode(&x, &s);
        let read = decode(&xe).gt(0.0).to_kind(Kind::Float);
        IssbaReport {
            bit_accuracy: read
                .eq_tensor(&s)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]),
            mean_abs_residual: (&xe - &x).abs().mean(Kind::Float).double_value(&[]) * 255.0,
        }
    });
    let plane = tch::no_grad(|| bits_tensor(&secret, 1, k, device).apply(&dense));
    let mut out = g.clone();
    out.pattern = Some(enc.export(vec![Layer::Plane {
        channels: 1,
        values: encode_f32(&floats(&plane)),
    }]));
    Ok((out, report))
}

/// Watermarks `dataset` with an ISSBA spec: trains the encoder, then stamps the poisons with it.
pub fn issba(
    dataset: &mut Dataset,
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    device: Device,
    progress: &super::Progress<'_>,
) -> Result<(Watermarked, IssbaReport), WatermarkError> {
    let Some(e) = spec.encoder else {
        return Err(WatermarkError::Craft(
            "the spec has no [encoder] section".into(),
        ));
    };
    let (g, report) = train_encoder(dataset, spec, e, device, progress)?;
    report.check().map_err(WatermarkError::Craft)?;
    let mut crafted = spec.clone();
    crafted.trigger = Trigger::Generated(g);
    let marked = watermark::apply_crafted(dataset, &crafted, nonce, &mut |_, _| Ok(()))?;
    Ok((marked, report))
}

/// Settings of IAD's training (BackdoorBox's MNIST test: rates 0.1, lambda_div 1, lambda_norm
/// 100, mask density 0.032).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IadSettings {
    /// Fraction of each batch made backdoor samples.
    pub poisoned_rate: f64,
    /// Fraction of each batch made cross-trigger samples.
    pub cross_rate: f64,
    /// Weight of the diversity loss.
    pub lambda_div: f64,
    /// Weight of the mask's density loss.
    pub lambda_norm: f64,
    /// Mask density the norm loss allows.
    pub mask_density: f64,
    /// Epochs of mask training before the classifier's.
    pub mask_epochs: usize,
}

impl Default for IadSettings {
    fn default() -> Self {
        Self {
            poisoned_rate: 0.1,
            cross_rate: 0.1,
            lambda_div: 1.0,
            lambda_norm: 100.0,
            mask_density: 0.032,
            mask_epochs: 2,
        }
    }
}

/// Settings of LIRA's training (BackdoorBox's defaults: eps 0.01, alpha 0.5; the official
/// code's trigger learning rate is 1e-4; ours is 1e-3, which learns within a CPU's epochs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiraSettings {
    /// Largest change of one pixel value, 0–255 scale.
    pub eps: f64,
    /// Weight of the clean loss in the classifier's mix.
    pub alpha: f64,
    /// Learning rate of the trigger function (Adam).
    pub lr: f64,
}

impl Default for LiraSettings {
    fn default() -> Self {
        Self {
            eps: 2.55,
            alpha: 0.5,
            lr: 1e-3,
        }
    }
}

/// A generator learnt while the classifier trains (IAD or LIRA).
pub(crate) struct Learner {
    // Kept alive with the networks whose variables they hold.
    #[allow(dead_code)]
    vs: nn::VarStore,
    mask_vs: Option<nn::VarStore>,
    pattern: TorchNet,
    mask: Option<TorchNet>,
    opt: nn::Optimizer,
    target: i64,
    kind: LearnerKind,
}

enum LearnerKind {
    Iad(IadSettings),
    Lira(LiraSettings),
}

/// Per-sample root mean square distance of two batches (a tiny floor under the root keeps its
/// gradient finite when two outputs coincide).
fn distance(a: &Tensor, b: &Tensor) -> Tensor {
    ((a - b)
        .square()
        .mean_dim(&[1i64, 2, 3][..], false, Kind::Float)
        + 1e-12)
        .sqrt()
}

impl Learner {
    pub(crate) fn iad(
        s: IadSettings,
        target: u32,
        shape: ImageShape,
        seed: u64,
        device: Device,
    ) -> Self {
        // The mask has its own variables: IAD trains it first and then freezes it.
        let (vs, mask_vs) = (nn::VarStore::new(device), nn::VarStore::new(device));
        let c = shape.channels as i64;
        let (pattern, mask) = seeded(seed ^ 0x1ad, || {
            let pattern = TorchNet::new(
                vs.root() / "pattern",
                c,
                &body(shape, c, IAD_WIDTH, &NORMALISE),
                shape,
            );
            let mut mask_plan = body(shape, 1, IAD_WIDTH, &NORMALISE);
            // IAD's threshold: tanh(20·m − 10) / (2 + ε) + 0.5.
            mask_plan.push(Plan::Affine(20.0, -10.0));
            mask_plan.extend(NORMALISE);
            (
                pattern,
                TorchNet::new(mask_vs.root() / "mask", c, &mask_plan, shape),
            )
        });
        let opt = iad_adam(&vs, 0.01);
        Self {
            vs,
            mask_vs: Some(mask_vs),
            pattern,
            mask: Some(mask),
            opt,
            target: i64::from(target),
            kind: LearnerKind::Iad(s),
        }
    }

    pub(crate) fn lira(
        s: LiraSettings,
        target: u32,
        shape: ImageShape,
        seed: u64,
        device: Device,
    ) -> Self {
        let vs = nn::VarStore::new(device);
        let c = shape.channels as i64;
        // A learnt input-independent map beside the input-aware body, and a gain before tanh: at
        // initialisation the body's outputs are small and tied to each image's own edges, and
        // eps · T(x) would round away on the byte grid, leaving the classifier two labels for
        // one image.
        let pattern = seeded(seed ^ 0x11ea, || {
            TorchNet::new(
                vs.root() / "trigger",
                c,
                &body(
                    shape,
                    c,
                    GENERATOR_WIDTH,
                    &[Plan::Bias, Plan::Affine(LIRA_GAIN, 0.0), Plan::Tanh],
                ),
                shape,
            )
        });
        let opt = nn::Adam::default()
            .build(&vs, s.lr)
            .expect("Adam over the generator's variables");
        Self {
            vs,
            mask_vs: None,
            pattern,
            mask: None,
            opt,
            target: i64::from(target),
            kind: LearnerKind::Lira(s),
        }
    }

    /// IAD's triggered images from the patterns and masks of `src`.
    fn masked(&self, x: &Tensor, src: &Tensor) -> Tensor {
        let m = self.mask.as_ref().expect("IAD has a mask").forward(src);
        let p = self.pattern.forward(src);
        quantise(&(x + m * (p - x)))
    }

    fn additive(&self, x: &Tensor, eps: f64) -> Tensor {
        quantise(&(x + self.pattern.forward(x) * (eps / 255.0)))
    }

    /// IAD's first phase: the mask network alone, for `mask_epochs` over `x_all`.
    pub(crate) fn pretrain(&mut self, x_all: &Tensor, batch: usize, rng: &mut Rng) {
        let LearnerKind::Iad(s) = self.kind else {
            return;
        };
        let (Some(mask), Some(mask_vs)) = (&self.mask, &self.mask_vs) else {
            return;
        };
        let mut opt = iad_adam(mask_vs, 0.01);
        let vars = mask_vs.trainable_variables();
        // Without IAD's batch norm, the mask sometimes goes dark for a while (no pixel on, every
        // mask alike, the diversity ratio in the hundred thousands) and comes back: the phase
        // ends with the last weights whose masks were on (at least a third of the allowed
        // density) and diverse.
        let mut healthy: Option<Vec<Tensor>> = None;
        let n = x_all.size()[0];
        for _ in 0..s.mask_epochs {
            let mut order: Vec<i64> = (0..n).collect();
            rng.choose_front(&mut order, n as usize);
            for chunk in order.chunks(batch) {
                if chunk.len() < 2 {
                    continue;
                }
                let x1 =
                    x_all.index_select(0, &Tensor::from_slice(chunk).to_device(x_all.device()));
                let x2 = x1.roll([1], [0]);
                let (m1, m2) = (mask.forward(&x1), mask.forward(&x2));
                let div = (distance(&x1, &x2) / (distance(&m1, &m2) + IAD_EPSILON))
                    .mean(Kind::Float)
                    * s.lambda_div;
                let on = m1
                    .gt(0.5)
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]);
                if on >= s.mask_density / 3.0 && div.double_value(&[]) < 100.0 * s.lambda_div {
                    healthy = Some(tch::no_grad(|| vars.iter().map(|v| v.copy()).collect()));
                }
                let norm = (m1.mean(Kind::Float) - s.mask_density).relu() * s.lambda_norm;
                opt.zero_grad();
                (div + norm).backward();
                opt.step();
            }
        }
        if let Some(h) = healthy {
            tch::no_grad(|| {
                for (v, h) in vars.iter().zip(&h) {
                    v.shallow_clone().copy_(h);
                }
            });
        }
        if let Some(v) = &mut self.mask_vs {
            v.freeze();
        }
    }

    /// The classifier's loss on a batch with the attack's samples mixed in; backpropagating it
    /// also gives the generator's gradients (IAD). LIRA first takes its trigger step.
    pub(crate) fn loss(
        &mut self,
        net: &Net,
        x: &Tensor,
        y: &Tensor,
        learn_trigger: bool,
    ) -> Tensor {
        let b = x.size()[0];
        let tgt = y.full_like(self.target);
        match self.kind {
            LearnerKind::Iad(s) => {
                let nb = ((b as f64) * s.poisoned_rate).round() as i64;
                let nc = (((b as f64) * s.cross_rate).round() as i64).min(b - nb);
                self.opt.zero_grad();
                let x2 = x.roll([1], [0]);
                let bd = self.masked(&x.narrow(0, 0, nb), &x.narrow(0, 0, nb));
                let cross = self.masked(&x.narrow(0, nb, nc), &x2.narrow(0, nb, nc));
                let xin = Tensor::cat(&[bd, cross, x.narrow(0, nb + nc, b - nb - nc)], 0);
                let yin = Tensor::cat(&[tgt.narrow(0, 0, nb), y.narrow(0, nb, b - nb)], 0);
                let ce = net.forward_t(&xin, true).cross_entropy_for_logits(&yin);
                if nb >= 1 {
                    let (p1, p2) = (
                        self.pattern.forward(&x.narrow(0, 0, nb)),
                        self.pattern.forward(&x2.narrow(0, 0, nb)),
                    );
                    let div = (distance(&x.narrow(0, 0, nb), &x2.narrow(0, 0, nb))
                        / (distance(&p1, &p2) + IAD_EPSILON))
                        .mean(Kind::Float)
                        * s.lambda_div;
                    // The diversity term moves the generator only; the classifier's loss is ce.
                    ce.shallow_clone() + (&div - div.detach())
                } else {
                    ce
                }
            }
            LearnerKind::Lira(s) => {
                if learn_trigger {
                    // The trigger step on a quarter of the batch: it costs a forward and backward
                    // pass through both networks, and the whole batch would triple an epoch's
                    // time on a CPU.
                    let q = (b / 4).max(1);
                    self.opt.zero_grad();
                    let l = net
                        .forward_t(&self.additive(&x.narrow(0, 0, q), s.eps), true)
                        .cross_entropy_for_logits(&tgt.narrow(0, 0, q));
                    l.backward();
                    self.opt.step();
                }
                let xt = self.additive(x, s.eps).detach();
                net.forward_t(x, true).cross_entropy_for_logits(y) * s.alpha
                    + net.forward_t(&xt, true).cross_entropy_for_logits(&tgt) * (1.0 - s.alpha)
            }
        }
    }

    /// After the loss's backward pass: the generator's step (IAD; LIRA steps in [`Self::loss`]).
    pub(crate) fn step(&mut self, learn_trigger: bool) {
        if learn_trigger && matches!(self.kind, LearnerKind::Iad(_)) {
            self.opt.step();
        }
    }

    /// The learnt trigger, for a secret record.
    pub(crate) fn trigger(&self) -> Generated {
        match self.kind {
            LearnerKind::Iad(_) => Generated {
                form: GeneratedForm::Masked,
                scale: None,
                pattern: Some(self.pattern.export(Vec::new())),
                mask: self.mask.as_ref().map(|m| m.export(Vec::new())),
                turned: false,
            },
            LearnerKind::Lira(s) => Generated {
                form: GeneratedForm::Additive,
                scale: Some(s.eps as f32),
                pattern: Some(self.pattern.export(Vec::new())),
                mask: None,
                turned: false,
            },
        }
    }

    /// Triggered images as the trainer makes them (float, quantised), for comparing with the
    /// exported networks run in plain Rust.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn triggered(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| match self.kind {
            LearnerKind::Iad(_) => self.masked(x, x),
            LearnerKind::Lira(s) => self.additive(x, s.eps),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Format, Split};
    use crate::watermark::Stamp;

    #[test]
    fn an_encoder_that_hides_nothing_is_refused() {
        let report = |bit_accuracy, mean_abs_residual| IssbaReport {
            bit_accuracy,
            mean_abs_residual,
        };
        assert!(report(0.995, 8.1).check().is_ok());
        // The collapsed encoder met in calibration: zero residual, 25% of the bits.
        let e = report(0.251, 0.0).check().unwrap_err();
        assert!(
            e.contains("25.1% of the secret's bits") && e.contains("no watermark"),
            "{e}"
        );
        assert!(
            report(0.99, 0.2).check().is_err(),
            "no residual, no watermark"
        );
        assert!(
            report(0.6, 9.0).check().is_err(),
            "a secret the decoder cannot read"
        );
    }

    fn images(n: usize) -> Dataset {
        let ds = crate::dataset::read(
            std::path::Path::new("/usr/share/datasets/fashion-mnist"),
            Some(Format::Idx),
            Some(Split::Test),
            &|| {},
        )
        .expect("Fashion-MNIST is installed by scripts/test")
        .dataset;
        ds.subset(&(0..n).collect::<Vec<_>>()).unwrap()
    }

    /// The exported networks, run in plain Rust on bytes, make the images the trainer makes in
    /// libtorch (to one grey level: float summation order differs).
    fn check_export(l: &Learner, ds: &Dataset) {
        let x =
            super::super::tensor::to_tensor(ds, &(0..ds.len()).collect::<Vec<_>>(), Device::Cpu);
        let want: Vec<f32> = Vec::<f32>::try_from(
            (l.triggered(&x) * 255.0)
                .round()
                .permute([0, 2, 3, 1])
                .contiguous()
                .flatten(0, -1),
        )
        .unwrap();
        let stamp = Stamp::new(&Trigger::Generated(l.trigger()), 0, ds.shape()).unwrap();
        let len = ds.shape().len();
        let mut changed = 0;
        for i in 0..ds.len() {
            let mut img = ds.image(i).to_vec();
            stamp.apply(&mut img);
            for (k, &v) in img.iter().enumerate() {
                let w = want[i * len + k];
                assert!(
                    (f32::from(v) - w).abs() <= 1.0,
                    "image {i} byte {k}: {v} vs {w}"
                );
                changed += usize::from(v != ds.image(i)[k]);
            }
        }
        assert!(changed > ds.len() * 10, "the trigger changes the images");
    }

    #[test]
    fn learnt_generators_run_the_same_in_plain_rust() {
        let _one = crate::train::exclusive_torch();
        let ds = images(16);
        let iad = Learner::iad(IadSettings::default(), 1, ds.shape(), 3, Device::Cpu);
        check_export(&iad, &ds);
        let lira = Learner::lira(
            LiraSettings {
                eps: 40.0,
                ..Default::default()
            },
            1,
            ds.shape(),
            3,
            Device::Cpu,
        );
        check_export(&lira, &ds);
    }

    /// The encoder's export keeps the secret as a plane and bounds the residual by `scale`; the
    /// same seed trains the same encoder.
    #[test]
    fn issba_encoder_export_is_bounded_and_reproducible() {
        let _one = crate::train::exclusive_torch();
        let ds = images(256);
        let mut spec = WatermarkSpec::from_toml_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("watermark_specs/fixed/issba-28x28-grey.toml"),
        )
        .unwrap();
        let e = Encoder {
            epochs: 1,
            secret_only_epochs: 1,
            samples: 256,
            ..spec.encoder.unwrap()
        };
        spec.encoder = Some(e);
        let (g, _) = train_encoder(&ds, &spec, e, Device::Cpu, &|_, _, _| {}).unwrap();
        let (again, _) = train_encoder(&ds, &spec, e, Device::Cpu, &|_, _, _| {}).unwrap();
        assert_eq!(g, again);
        let net = g.pattern.as_ref().unwrap();
        assert!(matches!(net.layers[0], Layer::Plane { channels: 1, .. }));
        let stamp = Stamp::new(&Trigger::Generated(g.clone()), 0, ds.shape()).unwrap();
        let scale = g.scale.unwrap();
        for i in 0..ds.len() {
            let mut img = ds.image(i).to_vec();
            stamp.apply(&mut img);
            for (a, b) in img.iter().zip(ds.image(i)) {
                assert!((f32::from(*a) - f32::from(*b)).abs() <= scale.ceil());
            }
        }
    }
}
