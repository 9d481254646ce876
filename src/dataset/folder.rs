//! ImageFolder trees: one sub-folder per class (classes sorted by folder name, as torchvision's
//! `ImageFolder` does), images inside read from PNG, JPEG or BMP and written as PNG (lossless).
//!
//! Written files are named by the sha256 of their pixels, so the names say nothing about where a
//! sample came from (a relabelled, watermarked sample is not given away by an out-of-place name).

use super::{Dataset, DatasetError, ImageShape, Limits};
use image::{ColorType, ImageDecoder, ImageEncoder};
use rayon::prelude::*;
use std::fs;
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

/// A dataset read from a tree, with each sample's path relative to the root.
#[derive(Debug)]
pub struct Tree {
    /// The samples, class by class, in path order within a class.
    pub dataset: Dataset,
    /// Relative path of each sample's file.
    pub files: Vec<PathBuf>,
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
    Ok(Tree { dataset, files })
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
    let Some(&((width, height), _)) = headers.first() else {
        return Err(DatasetError::input(whole, "no images"));
    };
    if let Some((k, ((w, h), _))) = headers
        .iter()
        .enumerate()
        .find(|(_, (d, _))| *d != (width, height))
    {
        return Err(at(
            k,
            format!(
                "the image is {w}×{h} but the first is {width}×{height}; every image must have the same size (mixed sizes are not read yet)"
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
            decode_into(bytes, limits, channels, out)
                .map_err(|e| at(k, format!("cannot decode the image: {e}")))?;
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

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DatasetError> {
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

/// The relative file path each sample gets when written: `class/<pixel sha256 prefix>.png`,
/// with a numeric suffix for identical images of the same class.
pub fn output_paths(dataset: &Dataset, image_hashes: &[[u8; 32]]) -> Vec<String> {
    let dirs = class_dirs(dataset);
    let mut seen = std::collections::HashMap::new();
    (0..dataset.len())
        .map(|i| {
            let stem = hex::encode(&image_hashes[i][..10]);
            let dir = &dirs[dataset.label(i) as usize];
            let k = seen.entry((dir.clone(), stem.clone())).or_insert(0usize);
            *k += 1;
            if *k == 1 {
                format!("{dir}/{stem}.png")
            } else {
                format!("{dir}/{stem}-{}.png", *k - 1)
            }
        })
        .collect()
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

/// Writes every sample as `root/<path>` (paths from [`output_paths`]). `tick` per image.
pub fn write(
    dataset: &Dataset,
    paths: &[String],
    root: &Path,
    tick: &(dyn Fn() + Sync),
) -> Result<(), DatasetError> {
    for dir in class_dirs(dataset) {
        if dir.is_empty() || dir.contains(['/', '\\']) || dir == "." || dir == ".." {
            return Err(DatasetError::Invalid(format!(
                "class name {dir:?} cannot be a folder name"
            )));
        }
        let p = root.join(&dir);
        fs::create_dir_all(&p).map_err(|e| DatasetError::io(&p, e))?;
    }
    let shape = dataset.shape();
    (0..dataset.len())
        .into_par_iter()
        .with_min_len(64)
        .try_for_each(|i| {
            let path = root.join(&paths[i]);
            let png =
                encode_png(dataset.image(i), shape).map_err(|source| DatasetError::Image {
                    path: path.clone(),
                    action: "encode",
                    source,
                })?;
            fs::write(&path, png).map_err(|e| DatasetError::io(&path, e))?;
            tick();
            Ok(())
        })
}
