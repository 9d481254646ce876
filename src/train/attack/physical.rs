//! PhysicalBA's hook: the poisoned training images go through physical-world transformations
//! each time they are drawn (Li et al., "Backdoor Attack in the Physical World", ICLR-W 2021).

use crate::dataset::Dataset;
use crate::train::TrainError;
use crate::train::fit::Hook;
use crate::watermark::rng::Rng;
use tch::{Kind, Tensor};

/// The hook: which training samples are poisoned.
pub(super) struct PhysicalBa<'a> {
    poisoned: &'a [bool],
}

impl<'a> PhysicalBa<'a> {
    pub(super) fn new(poisoned: &'a [bool], train: &Dataset) -> Result<Self, TrainError> {
        if poisoned.len() != train.len() {
            return Err(TrainError::Config(format!(
                "PhysicalBA marks {} samples as poisoned or not, the training set has {}",
                poisoned.len(),
                train.len()
            )));
        }
        Ok(Self { poisoned })
    }
}

impl Hook for PhysicalBa<'_> {
    fn name(&self) -> &'static str {
        "physical-ba"
    }

    fn inputs(&mut self, x: Tensor, chunk: &[i64], rng: &mut Rng) -> Tensor {
        let mask: Vec<bool> = chunk.iter().map(|&i| self.poisoned[i as usize]).collect();
        if !mask.iter().any(|m| *m) {
            return x;
        }
        let m = Tensor::from_slice(&mask)
            .to_device(x.device())
            .view([chunk.len() as i64, 1, 1, 1]);
        physical(&x, rng).where_self(&m, &x)
    }
}

/// PhysicalBA's transformations of a batch [n, C, H, W] in [0, 1], drawn from `rng`: brightness
/// and contrast factors in [0.8, 1.2] (contrast around the image's mean grey, as torchvision),
/// then a shift of up to 10% each way and a zoom of 0.8–0.9 (bilinear, zero fill).
pub fn physical(x: &Tensor, rng: &mut Rng) -> Tensor {
    let n = x.size()[0];
    let mut u = || f64::from(rng.unit_f32());
    let mut b = Vec::with_capacity(n as usize);
    let mut c = Vec::with_capacity(n as usize);
    let mut theta = Vec::with_capacity(6 * n as usize);
    for _ in 0..n {
        b.push((0.8 + 0.4 * u()) as f32);
        c.push((0.8 + 0.4 * u()) as f32);
        let scale = 0.8 + 0.1 * u();
        // affine_grid maps output to input coordinates in [-1, 1]: the inverse of the zoom and
        // of a shift of up to 10% of the size (0.2 in normalised units).
        let (tx, ty) = (0.2 * (2.0 * u() - 1.0), 0.2 * (2.0 * u() - 1.0));
        theta.extend(
            [1.0 / scale, 0.0, -tx / scale, 0.0, 1.0 / scale, -ty / scale].map(|v| v as f32),
        );
    }
    let dev = x.device();
    let col = |v: Vec<f32>| Tensor::from_slice(&v).to_device(dev).view([n, 1, 1, 1]);
    let x = (x * col(b)).clamp(0.0, 1.0);
    let grey = if x.size()[1] == 3 {
        let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114])
            .to_device(dev)
            .view([1, 3, 1, 1]);
        (&x * w).sum_dim_intlist(1, true, Kind::Float)
    } else {
        x.shallow_clone()
    };
    let mean = grey.mean_dim(&[1i64, 2, 3][..], true, Kind::Float);
    let cf = col(c);
    let x = (&x * &cf + mean * (-cf + 1.0)).clamp(0.0, 1.0);
    let theta = Tensor::from_slice(&theta).to_device(dev).view([n, 2, 3]);
    let grid = Tensor::affine_grid_generator(&theta, x.size(), false);
    x.grid_sampler(&grid, 0, 0, false)
}
