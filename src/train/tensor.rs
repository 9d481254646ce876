//! Dataset images and labels as tensors: the one conversion the trainer, the metrics and the
//! crafting share.

use crate::dataset::Dataset;
use tch::{Device, Kind, Tensor};

/// Pixels of images `indices` as a float tensor [n, C, H, W] in [0, 1] on `device`.
pub fn to_tensor(ds: &Dataset, indices: &[usize], device: Device) -> Tensor {
    let s = ds.shape();
    let mut bytes = Vec::with_capacity(indices.len() * s.len());
    for &i in indices {
        bytes.extend_from_slice(ds.image(i));
    }
    Tensor::from_slice(&bytes)
        .view([
            indices.len() as i64,
            s.height as i64,
            s.width as i64,
            s.channels as i64,
        ])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        .divide_scalar(255.0)
        .contiguous()
        .to_device(device)
}

/// Labels of `indices` as an int64 tensor.
pub fn labels_tensor(ds: &Dataset, indices: &[usize], device: Device) -> Tensor {
    let v: Vec<i64> = indices.iter().map(|&i| i64::from(ds.label(i))).collect();
    Tensor::from_slice(&v).to_device(device)
}
