//! ImageFolder trees: one sub-folder per class (classes sorted by folder name, as torchvision's
//! `ImageFolder` does), images inside read from PNG, JPEG or BMP and written as PNG (lossless).
//!
//! Written files are named by the sha256 of their pixels, so the names say nothing about where a
//! sample came from (a relabelled, watermarked sample is not given away by an out-of-place name).

use super::{Dataset, DatasetError, ImageShape};
use image::{ColorType, DynamicImage, ImageEncoder};
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
    let mut classes = Vec::new();
    for entry in read_dir_sorted(root)? {
        let name = file_name(&entry);
        if name.starts_with('.') {
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
    for (label, (_, dir)) in classes.iter().enumerate() {
        let before = files.len();
        collect_images(dir, &mut files)?;
        labels.resize(files.len(), label as u32);
        if files.len() == before {
            return Err(DatasetError::input(dir, "class folder holds no image"));
        }
    }
    let images: Vec<DynamicImage> = files
        .par_iter()
        .map(|path| {
            let bytes = fs::read(path).map_err(|e| DatasetError::io(path, e))?;
            let img = image::load_from_memory(&bytes).map_err(|source| DatasetError::Image {
                path: path.clone(),
                action: "decode",
                source,
            })?;
            tick();
            Ok(img)
        })
        .collect::<Result<_, DatasetError>>()?;
    let (width, height) = (images[0].width() as usize, images[0].height() as usize);
    if let Some((img, path)) =
        images.iter().zip(&files).find(|(img, _)| (img.width() as usize, img.height() as usize) != (width, height))
    {
        return Err(DatasetError::input(
            path,
            format!(
                "image is {}×{} but {} is {width}×{height}; every image must have the same size",
                img.width(),
                img.height(),
                files[0].display()
            ),
        ));
    }
    let channels = if images.iter().any(|i| i.color().has_color()) { 3 } else { 1 };
    let shape = ImageShape { height, width, channels };
    let mut pixels = vec![0u8; images.len() * shape.len()];
    pixels.par_chunks_mut(shape.len()).zip(images.par_iter()).for_each(|(out, img)| {
        if channels == 3 {
            out.copy_from_slice(img.to_rgb8().as_raw());
        } else {
            out.copy_from_slice(img.to_luma8().as_raw());
        }
    });
    let names = classes.iter().map(|(n, _)| n.clone()).collect();
    let dataset = Dataset::new(shape, pixels, labels, classes.len())?.with_class_names(names)?;
    let files = files.into_iter().map(|f| f.strip_prefix(root).map(Path::to_path_buf).unwrap_or(f)).collect();
    Ok(Tree { dataset, files })
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
            let ext = entry.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
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
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The class folder names to write: the dataset's own, else the label numbers.
pub fn class_dirs(dataset: &Dataset) -> Vec<String> {
    match dataset.class_names() {
        Some(names) => names.to_vec(),
        None => (0..dataset.num_classes()).map(|c| c.to_string()).collect(),
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
            if *k == 1 { format!("{dir}/{stem}.png") } else { format!("{dir}/{stem}-{}.png", *k - 1) }
        })
        .collect()
}

/// Encodes one image as PNG bytes.
pub fn encode_png(pixels: &[u8], shape: ImageShape) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    let color = if shape.channels == 3 { ColorType::Rgb8 } else { ColorType::L8 };
    image::codecs::png::PngEncoder::new(&mut out).write_image(
        pixels,
        shape.width as u32,
        shape.height as u32,
        color.into(),
    )?;
    Ok(out)
}

/// Writes every sample as `root/<path>` (paths from [`output_paths`]). `tick` per image.
pub fn write(dataset: &Dataset, paths: &[String], root: &Path, tick: &(dyn Fn() + Sync)) -> Result<(), DatasetError> {
    for dir in class_dirs(dataset) {
        if dir.is_empty() || dir.contains(['/', '\\']) || dir == "." || dir == ".." {
            return Err(DatasetError::Invalid(format!("class name {dir:?} cannot be a folder name")));
        }
        let p = root.join(&dir);
        fs::create_dir_all(&p).map_err(|e| DatasetError::io(&p, e))?;
    }
    let shape = dataset.shape();
    (0..dataset.len()).into_par_iter().with_min_len(64).try_for_each(|i| {
        let path = root.join(&paths[i]);
        let png = encode_png(dataset.image(i), shape)
            .map_err(|source| DatasetError::Image { path: path.clone(), action: "encode", source })?;
        fs::write(&path, png).map_err(|e| DatasetError::io(&path, e))?;
        tick();
        Ok(())
    })
}
