//! Image datasets in memory (`Dataset`), their on-disk formats and their manifests.
//!
//! Pixels are kept as `u8` in height × width × channel order per image, images one after the
//! other, which is the layout that BackdoorBox's triggers operate on (PIL/numpy HWC). Formats whose
//! files are planar (CIFAR) are converted when read and written.

pub mod cifar;
pub mod encoding;
mod error;
pub mod folder;
mod hash;
pub mod idx;
mod layout;
mod manifest;
pub mod parquet;
pub mod stream;
pub mod webdataset;

pub use error::{DatasetError, ParseError};
pub use hash::{dataset_sha256, image_sha256s};
pub use layout::{Format, Layout, Loaded, Split, read, read_limited, write_release};
pub use manifest::{
    MANIFEST, ManifestEntry, RELEASE_JSON, ReleaseFile, ReleaseInfo, StreamInfo, read_manifest,
    write_release_info,
};

use crate::Invalid;
use serde::{Deserialize, Serialize};

/// Bounds on what reading a dataset may allocate, checked against what the files declare (image
/// headers, IDX dimensions, gzip streams) before the memory is taken: a small file that claims
/// a huge dataset is refused, not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest image side.
    pub max_side: usize,
    /// The decoded pixels of the whole dataset, in bytes.
    pub max_bytes: usize,
    /// Image files in an ImageFolder tree.
    pub max_files: usize,
    /// Read every encoded image (ImageFolder, Parquet, WebDataset) at this height × width,
    /// resized (bilinear) where it is another size, as a training pipeline resizes a dataset of
    /// mixed sizes; `None` (the default): every image must have the first one's size.
    pub resize_to: Option<(usize, usize)>,
}

impl Default for Limits {
    /// What the command line reads: sides to 16,384, 64 GiB of pixels, 10 million files.
    fn default() -> Self {
        Self {
            max_side: 16_384,
            max_bytes: 64 << 30,
            max_files: 10_000_000,
            resize_to: None,
        }
    }
}

impl Limits {
    /// Whether `count` images of `shape` fit; the message says what is over.
    pub fn check(&self, count: usize, shape: ImageShape) -> Result<(), Invalid> {
        if shape.height > self.max_side || shape.width > self.max_side {
            return Err(Invalid(format!(
                "images of {}×{} exceed the longest side allowed, {}",
                shape.height, shape.width, self.max_side
            )));
        }
        let bytes = count
            .checked_mul(shape.height)
            .and_then(|n| n.checked_mul(shape.width))
            .and_then(|n| n.checked_mul(shape.channels));
        match bytes {
            Some(b) if b <= self.max_bytes => Ok(()),
            _ => Err(Invalid(format!(
                "{count} images of {shape} exceed the dataset size limit of {} bytes",
                self.max_bytes
            ))),
        }
    }
}

/// Height, width and channel count shared by every image of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
}

impl ImageShape {
    /// Bytes of one image.
    pub fn len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// True when the shape holds no pixel at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}×{}", self.height, self.width, self.channels)
    }
}

/// One HWC image of `shape` resized to `height` × `width` (bilinear), its channels kept.
pub fn resize_image(pixels: &[u8], shape: ImageShape, height: usize, width: usize) -> Vec<u8> {
    use image::imageops::{FilterType, resize};
    let (w0, h0) = (shape.width as u32, shape.height as u32);
    let (w, h) = (width as u32, height as u32);
    let img = pixels.to_vec();
    if shape.channels == 3 {
        let buf = image::RgbImage::from_raw(w0, h0, img).expect("sized by the shape");
        resize(&buf, w, h, FilterType::Triangle).into_raw()
    } else {
        let buf = image::GrayImage::from_raw(w0, h0, img).expect("sized by the shape");
        resize(&buf, w, h, FilterType::Triangle).into_raw()
    }
}

/// A labelled image dataset held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    shape: ImageShape,
    pixels: Vec<u8>,
    labels: Vec<u32>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
    coarse_labels: Option<Vec<u32>>,
}

impl Dataset {
    /// Builds a dataset, checking that pixels, labels and classes agree.
    pub fn new(
        shape: ImageShape,
        pixels: Vec<u8>,
        labels: Vec<u32>,
        num_classes: usize,
    ) -> Result<Self, DatasetError> {
        if shape.is_empty() {
            return Err(DatasetError::Invalid(format!(
                "image shape {shape} has no pixels"
            )));
        }
        if shape.channels != 1 && shape.channels != 3 {
            return Err(DatasetError::Invalid(format!(
                "images have {} channels; only 1 (grey) and 3 (RGB) are supported",
                shape.channels
            )));
        }
        if pixels.len() != labels.len() * shape.len() {
            return Err(DatasetError::Invalid(format!(
                "{} labels need {} pixel bytes of shape {shape}, found {}",
                labels.len(),
                labels.len() * shape.len(),
                pixels.len()
            )));
        }
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= num_classes)
        {
            return Err(DatasetError::Invalid(format!(
                "label {l} of sample {i} is not below the class count {num_classes}"
            )));
        }
        Ok(Self {
            shape,
            pixels,
            labels,
            num_classes,
            class_names: None,
            coarse_labels: None,
        })
    }

    /// Attaches class names (one per class, in label order).
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self, DatasetError> {
        if names.len() != self.num_classes {
            return Err(DatasetError::Invalid(format!(
                "{} class names given for {} classes",
                names.len(),
                self.num_classes
            )));
        }
        self.class_names = Some(names);
        Ok(self)
    }

    /// Attaches CIFAR-100 coarse labels (kept through watermarking untouched).
    pub fn with_coarse_labels(mut self, coarse: Vec<u32>) -> Result<Self, DatasetError> {
        if coarse.len() != self.labels.len() {
            return Err(DatasetError::Invalid(format!(
                "{} coarse labels for {} samples",
                coarse.len(),
                self.labels.len()
            )));
        }
        self.coarse_labels = Some(coarse);
        Ok(self)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the dataset holds no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Shape of every image.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// Number of classes; every label is below it.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Class names, where the format has them.
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// CIFAR-100 coarse labels, where present.
    pub fn coarse_labels(&self) -> Option<&[u32]> {
        self.coarse_labels.as_deref()
    }

    /// All pixels, image after image.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// All pixels, mutable, image after image (each chunk of `shape().len()` bytes is one image).
    pub fn pixels_mut(&mut self) -> &mut [u8] {
        &mut self.pixels
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Pixels of image `i` (HWC).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.shape.len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Mutable pixels of image `i` (HWC).
    pub fn image_mut(&mut self, i: usize) -> &mut [u8] {
        let n = self.shape.len();
        &mut self.pixels[i * n..(i + 1) * n]
    }

    /// Label of sample `i`.
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    /// Changes the label of sample `i`.
    pub fn set_label(&mut self, i: usize, label: u32) -> Result<(), DatasetError> {
        if label as usize >= self.num_classes {
            return Err(DatasetError::Invalid(format!(
                "label {label} is not below the class count {}",
                self.num_classes
            )));
        }
        self.labels[i] = label;
        Ok(())
    }

    /// A new dataset made of the samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Result<Self, DatasetError> {
        let n = self.shape.len();
        let mut pixels = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(DatasetError::Invalid(format!(
                    "index {i} is out of range for {} samples",
                    self.len()
                )));
            }
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        let mut out = Self::new(self.shape, pixels, labels, self.num_classes)?;
        out.class_names = self.class_names.clone();
        out.coarse_labels = self
            .coarse_labels
            .as_ref()
            .map(|c| indices.iter().map(|&i| c[i]).collect());
        Ok(out)
    }

    /// Every image resized to `height` × `width` (bilinear, as torchvision's `Resize` and
    /// Pillow's default), labels and classes kept: held-out images brought to a model's input
    /// size. The channels stay.
    pub fn resized(&self, height: usize, width: usize) -> Result<Self, DatasetError> {
        let to = ImageShape {
            height,
            width,
            channels: self.shape.channels,
        };
        let side = Limits::default().max_side;
        if to.is_empty() || height > side || width > side {
            return Err(DatasetError::Invalid(format!(
                "cannot resize images to {to}"
            )));
        }
        let mut pixels = Vec::with_capacity(self.len() * to.len());
        for i in 0..self.len() {
            pixels.extend_from_slice(&resize_image(self.image(i), self.shape, height, width));
        }
        let mut out = Self::new(to, pixels, self.labels.clone(), self.num_classes)?;
        out.class_names = self.class_names.clone();
        out.coarse_labels = self.coarse_labels.clone();
        Ok(out)
    }

    /// sha256 of the whole dataset in canonical order (see [`dataset_sha256`]).
    pub fn sha256(&self) -> String {
        dataset_sha256(self, &image_sha256s(self))
    }
}
