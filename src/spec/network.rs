//! Small convolutional networks stored in a secret record: the trigger generators of ISSBA's
//! encoder, IAD's pattern and mask networks and LIRA's trigger function. They are trained with
//! libtorch (feature `train`) and run here, in plain Rust, so that verification builds the
//! triggered queries without libtorch.
//!
//! A network is a sequence of layers on one image, channels first, values in [0, 1] at the
//! input. Convolutions pad by `kernel / 2` with zeros, as `nn.Conv2d(padding = k // 2)`.

use super::SpecError;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// One layer, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Layer {
    /// Appends constant channels, `channels × H × W` float32 values (ISSBA's secret bits, already
    /// projected to image planes by the encoder's dense layer).
    Plane {
        /// Channels appended.
        channels: usize,
        /// Little-endian float32 values, base64.
        values: String,
    },
    /// A 2-D convolution with bias, zero padding `kernel / 2`.
    Conv {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel size (odd).
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Little-endian float32 weights `[out, in, k, k]` then the `out` biases, base64.
        weights: String,
    },
    /// Adds a constant map of the current size (`channels × H × W` float32 values): a learnt,
    /// input-independent part of the output.
    Bias {
        /// Channels of the map (those of the layer's input).
        channels: usize,
        /// Little-endian float32 values, base64.
        values: String,
    },
    /// max(x, 0).
    Relu,
    /// tanh(x).
    Tanh,
    /// Nearest-neighbour upsampling by 2.
    Upsample,
    /// `scale · x + shift`.
    Affine {
        /// Factor.
        scale: f32,
        /// Offset.
        shift: f32,
    },
}

/// A stored network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Layers, in order.
    pub layers: Vec<Layer>,
}

/// Float32 values as little-endian base64.
pub fn encode_f32(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn decode_f32(field: &str, s: &str) -> Result<Vec<f32>, SpecError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| super::field(field, format!("not base64: {e}")))?;
    if bytes.len() % 4 != 0 {
        return Err(super::field(field, "not whole float32 values"));
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(super::field(field, "holds a value that is not finite"));
    }
    Ok(v)
}

/// A layer with its values decoded.
#[derive(Debug, Clone)]
enum Op {
    Plane(usize, Vec<f32>),
    Bias(Vec<f32>),
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        w: Vec<f32>,
        b: Vec<f32>,
    },
    Relu,
    Tanh,
    Upsample,
    Affine(f32, f32),
}

/// A network ready to run on images of one size.
#[derive(Debug, Clone)]
pub struct Compiled {
    ops: Vec<Op>,
    input: (usize, usize, usize),
    output_channels: usize,
}

/// An activation map, channels first.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// `c · h · w` values.
    pub v: Vec<f32>,
}

impl Network {
    /// Decodes and checks the network for inputs of `channels × height × width`; `field` names it
    /// in errors. The output must have the input's height and width.
    pub fn compile(
        &self,
        field: &str,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<Compiled, SpecError> {
        let (mut c, mut h, mut w) = (channels, height, width);
        let mut ops = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let at = format!("{field}.layers[{i}]");
            ops.push(match l {
                Layer::Plane { channels, values } => {
                    let v = decode_f32(&format!("{at}.values"), values)?;
                    if *channels == 0 || Some(v.len()) != map_len(*channels, h, w) {
                        return Err(super::field(
                            &at,
                            format!("{} values for {channels} planes of {h}×{w}", v.len()),
                        ));
                    }
                    c += channels;
                    Op::Plane(*channels, v)
                }
                Layer::Conv {
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    weights,
                } => {
                    if *in_channels != c {
                        return Err(super::field(
                            &at,
                            format!("takes {in_channels} channels, gets {c}"),
                        ));
                    }
                    if kernel % 2 == 0 || *kernel > 7 || !(1..=2).contains(stride) {
                        return Err(super::field(
                            &at,
                            "kernel must be odd and at most 7, stride 1 or 2",
                        ));
                    }
                    if *out_channels == 0 || *out_channels > 256 {
                        return Err(super::field(&at, "out_channels must be 1 to 256"));
                    }
                    let all = decode_f32(&format!("{at}.weights"), weights)?;
                    let n = out_channels * in_channels * kernel * kernel;
                    if all.len() != n + out_channels {
                        return Err(super::field(
                            &at,
                            format!("{} weights, expected {}", all.len(), n + out_channels),
                        ));
                    }
                    let p = kernel / 2;
                    h = (h + 2 * p - kernel) / stride + 1;
                    w = (w + 2 * p - kernel) / stride + 1;
                    c = *out_channels;
                    Op::Conv {
                        cin: *in_channels,
                        cout: *out_channels,
                        k: *kernel,
                        stride: *stride,
                        w: all[..n].to_vec(),
                        b: all[n..].to_vec(),
                    }
                }
                Layer::Bias { channels, values } => {
                    let v = decode_f32(&format!("{at}.values"), values)?;
                    if *channels != c || Some(v.len()) != map_len(c, h, w) {
                        return Err(super::field(
                            &at,
                            format!("{} values for a {c}×{h}×{w} map", v.len()),
                        ));
                    }
                    Op::Bias(v)
                }
                Layer::Relu => Op::Relu,
                Layer::Tanh => Op::Tanh,
                Layer::Upsample => {
                    h *= 2;
                    w *= 2;
                    Op::Upsample
                }
                Layer::Affine { scale, shift } => {
                    if !(scale.is_finite() && shift.is_finite()) {
                        return Err(super::field(&at, "scale and shift must be finite"));
                    }
                    Op::Affine(*scale, *shift)
                }
            });
            // Every map the network computes is bounded before anything is allocated for it.
            if map_len(c, h, w).is_none_or(|n| n > MAX_MAP) {
                return Err(super::field(
                    &at,
                    format!("makes a {c}×{h}×{w} map, over the {MAX_MAP} values allowed"),
                ));
            }
        }
        if (h, w) != (height, width) {
            return Err(super::field(
                field,
                format!("turns {height}×{width} images into {h}×{w} maps"),
            ));
        }
        Ok(Compiled {
            ops,
            input: (channels, height, width),
            output_channels: c,
        })
    }
}

/// The most values one feature map of a generated trigger's network may hold (64 planes of
/// 512×512): more than any image this tool handles needs, and a bound on what a spec can make
/// the service allocate.
pub const MAX_MAP: usize = 64 * 512 * 512;

fn map_len(c: usize, h: usize, w: usize) -> Option<usize> {
    c.checked_mul(h)?.checked_mul(w)
}

impl Compiled {
    /// Channels of the output.
    pub fn output_channels(&self) -> usize {
        self.output_channels
    }

    /// Runs the network on one input map of the compiled size.
    pub fn forward(&self, x: Map) -> Map {
        debug_assert_eq!((x.c, x.h, x.w), self.input);
        let mut x = x;
        for op in &self.ops {
            x = match op {
                Op::Plane(k, v) => {
                    let mut out = x.v;
                    out.extend_from_slice(v);
                    Map {
                        c: x.c + k,
                        h: x.h,
                        w: x.w,
                        v: out,
                    }
                }
                Op::Conv {
                    cin,
                    cout,
                    k,
                    stride,
                    w,
                    b,
                } => conv(&x, *cin, *cout, *k, *stride, w, b),
                Op::Bias(b) => {
                    let mut x = x;
                    for (v, b) in x.v.iter_mut().zip(b) {
                        *v += b;
                    }
                    x
                }
                Op::Relu => map(x, |v| v.max(0.0)),
                Op::Tanh => map(x, f32::tanh),
                Op::Affine(a, s) => map(x, |v| a * v + s),
                Op::Upsample => {
                    let (h, w) = (x.h * 2, x.w * 2);
                    let mut v = vec![0f32; x.c * h * w];
                    for ch in 0..x.c {
                        for y in 0..h {
                            for xx in 0..w {
                                v[(ch * h + y) * w + xx] = x.v[(ch * x.h + y / 2) * x.w + xx / 2];
                            }
                        }
                    }
                    Map { c: x.c, h, w, v }
                }
            };
        }
        x
    }
}

fn map(mut x: Map, f: impl Fn(f32) -> f32) -> Map {
    for v in &mut x.v {
        *v = f(*v);
    }
    x
}

fn conv(x: &Map, cin: usize, cout: usize, k: usize, stride: usize, w: &[f32], b: &[f32]) -> Map {
    let p = k / 2;
    let oh = (x.h + 2 * p - k) / stride + 1;
    let ow = (x.w + 2 * p - k) / stride + 1;
    let mut out = vec![0f32; cout * oh * ow];
    for o in 0..cout {
        let plane = &mut out[o * oh * ow..(o + 1) * oh * ow];
        plane.fill(b[o]);
        for i in 0..cin {
            let input = &x.v[i * x.h * x.w..(i + 1) * x.h * x.w];
            for ky in 0..k {
                for kx in 0..k {
                    let wv = w[((o * cin + i) * k + ky) * k + kx];
                    // Output columns whose input column ox·stride + kx − p lies inside.
                    let lo = p.saturating_sub(kx).div_ceil(stride);
                    let hi = ((x.w + p).saturating_sub(kx + 1) / stride + 1).min(ow);
                    if x.w + p < kx + 1 || lo >= hi {
                        continue;
                    }
                    for oy in 0..oh {
                        let iy = (oy * stride + ky) as isize - p as isize;
                        if iy < 0 || iy >= x.h as isize {
                            continue;
                        }
                        let row = &input[iy as usize * x.w..(iy as usize + 1) * x.w];
                        let orow = &mut plane[oy * ow + lo..oy * ow + hi];
                        let first = lo * stride + kx - p;
                        if stride == 1 {
                            for (o, v) in orow.iter_mut().zip(&row[first..first + (hi - lo)]) {
                                *o += wv * v;
                            }
                        } else {
                            for (o, v) in orow.iter_mut().zip(row[first..].iter().step_by(stride)) {
                                *o += wv * v;
                            }
                        }
                    }
                }
            }
        }
    }
    Map {
        c: cout,
        h: oh,
        w: ow,
        v: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv_layer(cin: usize, cout: usize, k: usize, stride: usize, w: &[f32]) -> Layer {
        Layer::Conv {
            in_channels: cin,
            out_channels: cout,
            kernel: k,
            stride,
            weights: encode_f32(w),
        }
    }

    #[test]
    fn a_3x3_convolution_pads_with_zeros() {
        // Sum of the 3×3 neighbourhood, bias 0.5.
        let mut w = vec![1.0f32; 9];
        w.push(0.5);
        let net = Network {
            layers: vec![conv_layer(1, 1, 3, 1, &w)],
        };
        let c = net.compile("n", 1, 3, 3).unwrap();
        let y = c.forward(Map {
            c: 1,
            h: 3,
            w: 3,
            v: vec![1.0; 9],
        });
        assert_eq!(y.v, vec![4.5, 6.5, 4.5, 6.5, 9.5, 6.5, 4.5, 6.5, 4.5]);
    }

    #[test]
    fn stride_two_then_upsampling_keeps_the_size() {
        let mut w = vec![0.0f32; 9];
        w[4] = 2.0; // the centre tap
        w.push(0.0);
        let net = Network {
            layers: vec![conv_layer(1, 1, 3, 2, &w), Layer::Upsample, Layer::Tanh],
        };
        let c = net.compile("n", 1, 4, 4).unwrap();
        let v: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        let y = c.forward(Map {
            c: 1,
            h: 4,
            w: 4,
            v,
        });
        // Output (r, c) reads input (2·(r/2), 2·(c/2)), doubled, through tanh.
        for r in 0..4 {
            for col in 0..4 {
                let src = (2 * (r / 2) * 4 + 2 * (col / 2)) as f32 / 16.0;
                assert!((y.v[r * 4 + col] - (2.0 * src).tanh()).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn bad_networks_are_refused_with_the_layer_named() {
        let net = Network {
            layers: vec![conv_layer(2, 1, 3, 1, &[0.0; 19])],
        };
        let e = net.compile("trigger.pattern", 1, 4, 4).unwrap_err();
        assert!(e.to_string().contains("trigger.pattern.layers[0]"), "{e}");
        let net = Network {
            layers: vec![conv_layer(1, 1, 3, 2, &[0.0; 10])],
        };
        let e = net.compile("trigger.pattern", 1, 4, 4).unwrap_err();
        assert!(e.to_string().contains("into 2×2"), "{e}");
        let net = Network {
            layers: vec![conv_layer(1, 1, 3, 1, &[0.0; 9])],
        };
        assert!(net.compile("p", 1, 4, 4).is_err());
    }
}
