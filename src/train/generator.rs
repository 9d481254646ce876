//! The small encoder–decoder network that ISSBA's encoder ([`super::craft::issba`]) and the
//! learnt triggers of IAD and LIRA ([`super::attack`]) are made of: 3×3 convolutions, one
//! stride-2 step and a nearest upsampling back (without them on odd sizes), trained in libtorch
//! and exported as a [`Network`] that the plain-Rust forward in [`crate::spec::network`]
//! reproduces.

use super::model::conv;
use crate::dataset::ImageShape;
use crate::spec::network::{Layer, Network, encode_f32};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// IAD's epsilon in its pattern and mask normalisation.
pub(crate) const IAD_EPSILON: f64 = 1e-7;

/// One planned layer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Plan {
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
pub(crate) fn body(shape: ImageShape, out_c: i64, width: i64, tail: &[Plan]) -> Vec<Plan> {
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
pub(crate) const NORMALISE: [Plan; 2] = [
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
    pub(crate) fn new(p: nn::Path, in_c: i64, plan: &[Plan], shape: ImageShape) -> Self {
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

pub(crate) fn floats(t: &Tensor) -> Vec<f32> {
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
pub(crate) fn seeded<T>(seed: u64, build: impl FnOnce() -> T) -> T {
    let _rng = super::TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    build()
}
