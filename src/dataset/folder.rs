//! ImageFolder trees: one sub-folder per class (classes sorted by folder name, as torchvision's
//! `ImageFolder` does), images inside read from PNG, JPEG or BMP. A release of a tree that was
//! read keeps every unchanged image's file byte for byte and encodes a changed one again in its
//! original's format (a JPEG as JPEG at its original's quality, [`super::encoding`]); a tree
//! written from another format is written as PNG (lossless).
//!
//! Written files are named by the sha256 of their pixels, so the names say nothing about where a
//! sample came from (a relabelled, watermarked sample is not given away by an out-of-place name).

use super::encoding::{self, Encoding, MIN_JPEG_QUALITY, Settled};
use super::{Dataset, DatasetError, ImageShape, Limits};
use image::{ColorType, ImageDecoder, ImageEncoder};
use rayon::prelude::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How an ImageFolder release is written: for a tree that was read, every image's original
/// bytes (and the sha256 of the pixels they decode to), so that unchanged images are copied and
/// changed ones encoded like their originals.
#[derive(Debug, Clone)]
pub struct FolderLayout {
    /// The lowest quality a changed JPEG image is encoded again at ([`super::encoding`]).
    pub min_jpeg_quality: u8,
    source: Option<Arc<Source>>,
    settled: Settled,
}

#[derive(Debug)]
struct Source {
    bytes: Vec<Vec<u8>>,
    hashes: Vec<[u8; 32]>,
}

impl PartialEq for FolderLayout {
    fn eq(&self, other: &Self) -> bool {
        self.min_jpeg_quality == other.min_jpeg_quality
            && match (&self.source, &other.source) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for FolderLayout {}

impl Default for FolderLayout {
    /// A tree written from another format: every image as PNG.
    fn default() -> Self {
        Self {
            min_jpeg_quality: MIN_JPEG_QUALITY,
            source: None,
            settled: Settled::new(),
        }
    }
}

impl FolderLayout {
    /// The source of a dataset of `n` images, if it is the tree that was read.
    fn source(&self, n: usize) -> Option<&Source> {
        self.source.as_deref().filter(|s| s.bytes.len() == n)
    }

    /// The file bytes image `i` was read from, for a dataset read from a tree of `n` images.
    fn original(&self, n: usize, i: usize) -> Option<&[u8]> {
        self.source(n).map(|s| s.bytes[i].as_slice())
    }

    /// Encodes again, now, each changed image whose original was a JPEG, so that the record's
    /// hashes are of what the release decodes to ([`encoding::settle_lossy`]); returns how many.
    pub fn settle_lossy(
        &mut self,
        dataset: &mut Dataset,
        image_hashes: &mut [[u8; 32]],
    ) -> Result<usize, DatasetError> {
        let n = dataset.len();
        let Some(src) = self.source.clone().filter(|s| s.bytes.len() == n) else {
            return Ok(0);
        };
        let original = |i: usize| Some(src.bytes[i].as_slice());
        let settled = encoding::settle_lossy(
            dataset,
            image_hashes,
            &src.hashes,
            &original,
            self.min_jpeg_quality,
        )?;
        let k = settled.len();
        self.settled = settled;
        Ok(k)
    }

    /// The bytes written for image `i` and their file extension: the original file when the
    /// pixels are unchanged, else the image encoded like its original (PNG when there is none).
    fn bytes_of(
        &self,
        dataset: &Dataset,
        i: usize,
        hash: &[u8; 32],
    ) -> Result<(std::borrow::Cow<'_, [u8]>, &'static str), image::ImageError> {
        let n = dataset.len();
        let original = self.original(n, i);
        if let (Some(bytes), Some(src)) = (original, self.source(n))
            && src.hashes[i] == *hash
        {
            return Ok((bytes.into(), extension(bytes)));
        }
        let bytes = encoding::changed_bytes(
            &self.settled,
            i,
            hash,
            original,
            dataset.image(i),
            dataset.shape(),
            self.min_jpeg_quality,
        )?;
        let ext = extension(&bytes);
        Ok((bytes.into(), ext))
    }
}

/// The extension of a file holding `bytes`.
pub(super) fn extension(bytes: &[u8]) -> &'static str {
    match Encoding::of(bytes) {
        Encoding::Jpeg => "jpg",
        Encoding::Webp => "webp",
        Encoding::Other if bytes.starts_with(b"BM") => "bmp",
        Encoding::Other => "png",
    }
}

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

/// A dataset read from a tree, with each sample's path relative to the root.
#[derive(Debug)]
pub struct Tree {
    /// The samples, class by class, in path order within a class.
    pub dataset: Dataset,
    /// Relative path of each sample's file.
    pub files: Vec<PathBuf>,
    /// How to write it back with its files' bytes kept.
    pub layout: FolderLayout,
}

/// Reads an ImageFolder tree. `tick` is called once per decoded image.
pub fn read(root: &Path, tick: &(dyn Fn() + Sync)) -> Result<Tree, DatasetError> {
    read_limited(root, tick, &Limits::default())
}

/// [`read`] within `limits`: the files are counted, and every image's size is taken from its
/// header and checked before any is decoded; decoders run with the image crate's limits too.
pub fn read_limited(
    root: &Path,
    tick: &(dyn Fn() + Sync),
    limits: &Limits,
) -> Result<Tree, DatasetError> {
    let classes = class_folders(root)?;
    let mut files = Vec::new();
    let mut labels = Vec::new();
    // An empty class folder keeps its class index (unlike torchvision, which refuses it), so
    // labels survive a round trip through a release in which a class has no sample.
    for (label, (_, dir)) in classes.iter().enumerate() {
        collect_images(dir, &mut files)?;
        labels.resize(files.len(), label as u32);
        if files.len() > limits.max_files {
            return Err(DatasetError::input(
                root,
                format!("more than {} image files", limits.max_files),
            ));
        }
    }
    if files.is_empty() {
        return Err(DatasetError::input(root, "no image in any class folder"));
    }
    let bytes = files
        .par_iter()
        .map(|path| fs::read(path).map_err(|e| DatasetError::io(path, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    let (shape, pixels) = decode_same_size(
        &refs,
        limits,
        tick,
        &|k, message| DatasetError::input(&files[k], message),
        root,
    )?;
    let names = classes.iter().map(|(n, _)| n.clone()).collect();
    let dataset = Dataset::new(shape, pixels, labels, classes.len())?.with_class_names(names)?;
    let files = files
        .into_iter()
        .map(|f| f.strip_prefix(root).map(Path::to_path_buf).unwrap_or(f))
        .collect();
    let layout = FolderLayout {
        source: Some(Arc::new(Source {
            hashes: super::image_sha256s(&dataset),
            bytes,
        })),
        ..FolderLayout::default()
    };
    Ok(Tree {
        dataset,
        files,
        layout,
    })
}

/// Decodes encoded images that must share one size into one buffer of pixels, grey unless any
/// is in colour: every header is read and the size checked against `limits` before anything is
/// decoded. `at(k, message)` names image `k`'s place in an error; `whole` the dataset's.
pub(super) fn decode_same_size(
    images: &[&[u8]],
    limits: &Limits,
    tick: &(dyn Fn() + Sync),
    at: &(dyn Fn(usize, String) -> DatasetError + Sync),
    whole: &Path,
) -> Result<(ImageShape, Vec<u8>), DatasetError> {
    let headers = images
        .par_iter()
        .enumerate()
        .map(|(k, bytes)| {
            let d = reader(bytes, limits)
                .and_then(|r| r.into_decoder())
                .map_err(|e| at(k, format!("cannot decode the image: {e}")))?;
            Ok((d.dimensions(), d.color_type().has_color()))
        })
        .collect::<Result<Vec<_>, DatasetError>>()?;
    let Some(&((first_w, first_h), _)) = headers.first() else {
        return Err(DatasetError::input(whole, "no images"));
    };
    let (width, height) = match limits.resize_to {
        Some((h, w)) => (w as u32, h as u32),
        None => (first_w, first_h),
    };
    if limits.resize_to.is_none()
        && let Some((k, ((w, h), _))) = headers
            .iter()
            .enumerate()
            .find(|(_, (d, _))| *d != (width, height))
    {
        return Err(at(
            k,
            format!(
                "the image is {w}×{h} but the first is {width}×{height}; every image must have \
                 the same size (a dataset of mixed sizes is read at one size with --resize HxW, \
                 and released at every size with hallmark watermark --stream)"
            ),
        ));
    }
    let channels = if headers.iter().any(|(_, c)| *c) {
        3
    } else {
        1
    };
    let shape = ImageShape {
        height: height as usize,
        width: width as usize,
        channels,
    };
    limits
        .check(images.len(), shape)
        .map_err(|m| DatasetError::input(whole, m.0))?;
    let mut pixels = vec![0u8; images.len() * shape.len()];
    pixels
        .par_chunks_mut(shape.len())
        .zip(images.par_iter().enumerate())
        .try_for_each(|(out, (k, bytes))| {
            let fail = |e: image::ImageError| at(k, format!("cannot decode the image: {e}"));
            if headers[k].0 == (width, height) {
                decode_into(bytes, limits, channels, out).map_err(fail)?;
            } else {
                let (pixels, own) = decode_any(bytes, limits, channels).map_err(fail)?;
                out.copy_from_slice(&super::resize_image(
                    &pixels,
                    own,
                    shape.height,
                    shape.width,
                ));
            }
            tick();
            Ok::<_, DatasetError>(())
        })?;
    Ok((shape, pixels))
}

/// Decodes an image file's `bytes` into `out` as `channels` (1: grey, 3: RGB) channels.
pub(super) fn decode_into(
    bytes: &[u8],
    limits: &Limits,
    channels: usize,
    out: &mut [u8],
) -> Result<(), image::ImageError> {
    let img = reader(bytes, limits)?.decode()?;
    if channels == 3 {
        out.copy_from_slice(img.to_rgb8().as_raw());
    } else {
        out.copy_from_slice(img.to_luma8().as_raw());
    }
    Ok(())
}

/// Decodes an image file's `bytes` at its own size as `channels` (1: grey, 3: RGB) channels,
/// within `limits`.
pub(crate) fn decode_any(
    bytes: &[u8],
    limits: &Limits,
    channels: usize,
) -> Result<(Vec<u8>, ImageShape), image::ImageError> {
    let img = reader(bytes, limits)?.decode()?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let pixels = if channels == 3 {
        img.to_rgb8().into_raw()
    } else {
        img.to_luma8().into_raw()
    };
    let shape = ImageShape {
        height: h,
        width: w,
        channels,
    };
    Ok((pixels, shape))
}

pub(super) fn reader<'a>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<image::ImageReader<std::io::Cursor<&'a [u8]>>, image::ImageError> {
    let mut r = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(image::ImageError::IoError)?;
    let side = u32::try_from(limits.max_side).unwrap_or(u32::MAX);
    let mut l = image::Limits::default();
    l.max_image_width = Some(side);
    l.max_image_height = Some(side);
    // One image decoded as RGBA at the longest side, at most.
    l.max_alloc = Some((limits.max_side as u64).pow(2) * 4 + (1 << 20));
    r.limits(l);
    Ok(r)
}

/// The class folders of an ImageFolder tree (name and path, in name order), each class's
/// index its place.
pub(super) fn class_folders(root: &Path) -> Result<Vec<(String, PathBuf)>, DatasetError> {
    let mut classes = Vec::new();
    for entry in read_dir_sorted(root)? {
        let name = file_name(&entry);
        if name.starts_with('.') {
            continue;
        }
        // A release written by hallmark keeps its description beside the class folders.
        if !entry.is_dir() && (name == "manifest.jsonl" || name == "release.json") {
            continue;
        }
        if entry.is_dir() {
            classes.push((name, entry));
        } else {
            return Err(DatasetError::input(
                &entry,
                "a file lies directly in the dataset root; an ImageFolder tree holds one folder per class",
            ));
        }
    }
    if classes.is_empty() {
        return Err(DatasetError::input(root, "no class folders found"));
    }
    Ok(classes)
}

/// The image files under `dir` (recursively, in name order).
pub(super) fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DatasetError> {
    for entry in read_dir_sorted(dir)? {
        let name = file_name(&entry);
        if name.starts_with('.') {
            continue;
        }
        if entry.is_dir() {
            collect_images(&entry, out)?;
        } else {
            let ext = entry
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if !EXTENSIONS.contains(&ext.as_str()) {
                return Err(DatasetError::input(
                    &entry,
                    "not an image file: expected .png, .jpg, .jpeg or .bmp",
                ));
            }
            out.push(entry);
        }
    }
    Ok(())
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut v = fs::read_dir(dir)
        .map_err(|e| DatasetError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| DatasetError::io(dir, e)))
        .collect::<Result<Vec<_>, _>>()?;
    v.sort();
    Ok(v)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The class folder names to write: the dataset's own, else the label numbers.
pub fn class_dirs(dataset: &Dataset) -> Vec<String> {
    match dataset.class_names() {
        Some(names) => names.to_vec(),
        // Zero-padded so that folder names sort in label order (torchvision sorts names).
        None => {
            let width = (dataset.num_classes().saturating_sub(1)).to_string().len();
            (0..dataset.num_classes())
                .map(|c| format!("{c:0width$}"))
                .collect()
        }
    }
}

/// A file of a release: its path relative to the root and its bytes.
type OutputFile<'a> = (String, std::borrow::Cow<'a, [u8]>);

/// The relative file path each sample gets when written, `class/<pixel sha256 prefix>.<ext>`
/// (a numeric suffix for identical images of the same class), and the bytes to write there.
fn output_files<'a>(
    dataset: &Dataset,
    image_hashes: &[[u8; 32]],
    layout: &'a FolderLayout,
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<OutputFile<'a>>, DatasetError> {
    let dirs = class_dirs(dataset);
    let encoded = (0..dataset.len())
        .into_par_iter()
        .with_min_len(64)
        .map(|i| {
            let r = layout
                .bytes_of(dataset, i, &image_hashes[i])
                .map_err(|e| DatasetError::Invalid(format!("cannot encode image {i}: {e}")));
            tick();
            r
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::HashMap::new();
    Ok(encoded
        .into_iter()
        .enumerate()
        .map(|(i, (bytes, ext))| {
            let stem = hex::encode(&image_hashes[i][..10]);
            let dir = &dirs[dataset.label(i) as usize];
            let k = seen.entry((dir.clone(), stem.clone())).or_insert(0usize);
            *k += 1;
            let path = if *k == 1 {
                format!("{dir}/{stem}.{ext}")
            } else {
                format!("{dir}/{stem}-{}.{ext}", *k - 1)
            };
            (path, bytes)
        })
        .collect())
}

/// Encodes one image as PNG bytes.
pub fn encode_png(pixels: &[u8], shape: ImageShape) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    let color = if shape.channels == 3 {
        ColorType::Rgb8
    } else {
        ColorType::L8
    };
    image::codecs::png::PngEncoder::new(&mut out).write_image(
        pixels,
        shape.width as u32,
        shape.height as u32,
        color.into(),
    )?;
    Ok(out)
}

/// Writes every sample under `root` (one folder per class, files named by their pixels' hash)
/// and returns each sample's relative path. `tick` per image.
pub fn write(
    dataset: &Dataset,
    image_hashes: &[[u8; 32]],
    layout: &FolderLayout,
    root: &Path,
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<String>, DatasetError> {
    for dir in class_dirs(dataset) {
        if dir.is_empty() || dir.contains(['/', '\\']) || dir == "." || dir == ".." {
            return Err(DatasetError::Invalid(format!(
                "class name {dir:?} cannot be a folder name"
            )));
        }
        let p = root.join(&dir);
        fs::create_dir_all(&p).map_err(|e| DatasetError::io(&p, e))?;
    }
    let files = output_files(dataset, image_hashes, layout, tick)?;
    files.par_iter().try_for_each(|(rel, bytes)| {
        let path = root.join(rel);
        fs::write(&path, bytes).map_err(|e| DatasetError::io(&path, e))
    })?;
    Ok(files.into_iter().map(|(p, _)| p).collect())
}
