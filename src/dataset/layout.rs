//! Finding a dataset on disk (format, split, file names), reading it, and writing a release in the
//! same layout.

use super::cifar::{self, Variant};
use super::folder;
use super::hash::dataset_sha256;
use super::idx;
use super::manifest::{MANIFEST, ReleaseFile, ReleaseInfo, write_manifest};
use super::{Dataset, DatasetError, ImageShape, Limits};
use crate::Invalid;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// On-disk dataset formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// IDX images + labels files (MNIST, Fashion-MNIST), gzipped or raw.
    Idx,
    /// CIFAR binary batches; the variant is detected from the files.
    Cifar,
    /// CIFAR-10 binary batches.
    Cifar10,
    /// CIFAR-100 binary batches.
    Cifar100,
    /// An ImageFolder tree.
    Folder,
    /// Parquet files in the Hugging Face layout (an image struct of bytes and path, a label).
    Parquet,
    /// WebDataset tar shards (an image and a `.cls` or `.json` label per sample key).
    #[serde(rename = "webdataset")]
    WebDataset,
}

impl Format {
    /// The format's name, as written in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idx => "idx",
            Self::Cifar => "cifar",
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
            Self::Folder => "folder",
            Self::Parquet => "parquet",
            Self::WebDataset => "webdataset",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "idx" => Ok(Self::Idx),
            "cifar" => Ok(Self::Cifar),
            "cifar10" => Ok(Self::Cifar10),
            "cifar100" => Ok(Self::Cifar100),
            "folder" => Ok(Self::Folder),
            "parquet" => Ok(Self::Parquet),
            "webdataset" => Ok(Self::WebDataset),
            _ => Err(Invalid(format!(
                "unknown format {s:?}: expected idx, cifar, cifar10, cifar100, folder, parquet or webdataset"
            ))),
        }
    }
}

/// Which split to read where a folder holds both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training split (`train-*`, `data_batch_*`, `train/`).
    Train,
    /// Test split (`t10k-*`, `test_batch`, `test/`).
    Test,
}

impl Split {
    /// The split's name, as written in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Self::Train),
            "test" => Ok(Self::Test),
            _ => Err(Invalid(format!(
                "unknown split {s:?}: expected train or test"
            ))),
        }
    }
}

/// How a dataset's files are named and laid out, so a release mirrors its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// IDX: file names of images and labels (without any `.gz`), and whether to gzip them.
    Idx {
        /// Images file name.
        images: String,
        /// Labels file name.
        labels: String,
        /// Write gzipped (`.gz` is appended).
        gzip: bool,
    },
    /// CIFAR batches: file names and the number of records in each.
    Cifar {
        /// CIFAR-10 or CIFAR-100.
        variant: Variant,
        /// Files in order, with record counts.
        files: Vec<(String, usize)>,
    },
    /// ImageFolder tree (PNG files, or the files of the tree that was read).
    Folder(super::folder::FolderLayout),
    /// Parquet files.
    Parquet(super::parquet::ParquetLayout),
    /// WebDataset shards.
    WebDataset(super::webdataset::ShardLayout),
}

impl Layout {
    /// Changed JPEG images of a Parquet, WebDataset or ImageFolder release are encoded again at
    /// no lower quality than `q` (1–100); other formats have no JPEG to keep.
    pub fn set_min_jpeg_quality(&mut self, q: u8) {
        match self {
            Self::Parquet(p) => p.min_jpeg_quality = q,
            Self::WebDataset(w) => w.min_jpeg_quality = q,
            Self::Folder(f) => f.min_jpeg_quality = q,
            Self::Idx { .. } | Self::Cifar { .. } => {}
        }
    }

    /// Settles the changed images that the release will store lossily (JPEG rows, members and
    /// files of a Parquet, WebDataset or ImageFolder input, [`super::encoding::settle_lossy`]): afterwards
    /// `dataset` and `image_hashes` are what the written release decodes to. Returns how many
    /// images changed so; the caller updates whatever it derived from the hashes.
    pub fn settle_lossy(
        &mut self,
        dataset: &mut Dataset,
        image_hashes: &mut [[u8; 32]],
    ) -> Result<usize, DatasetError> {
        match self {
            Self::Parquet(p) => p.settle_lossy(dataset, image_hashes),
            Self::WebDataset(w) => w.settle_lossy(dataset, image_hashes),
            Self::Folder(f) => f.settle_lossy(dataset, image_hashes),
            Self::Idx { .. } | Self::Cifar { .. } => Ok(0),
        }
    }

    /// A layout for writing `dataset` in `format` with default file names.
    pub fn for_format(format: Format, dataset: &Dataset) -> Result<Self, DatasetError> {
        Ok(match format {
            Format::Idx => Self::Idx {
                images: "train-images-idx3-ubyte".into(),
                labels: "train-labels-idx1-ubyte".into(),
                gzip: false,
            },
            Format::Cifar | Format::Cifar10 | Format::Cifar100 => {
                let variant = match format {
                    Format::Cifar100 => Variant::Cifar100,
                    Format::Cifar10 => Variant::Cifar10,
                    _ if dataset.num_classes() > 10 => Variant::Cifar100,
                    _ => Variant::Cifar10,
                };
                let name = if variant == Variant::Cifar10 {
                    "data_batch_1.bin"
                } else {
                    "train.bin"
                };
                Self::Cifar {
                    variant,
                    files: vec![(name.into(), dataset.len())],
                }
            }
            Format::Folder => Self::Folder(Default::default()),
            Format::Parquet => Self::Parquet(super::parquet::ParquetLayout::new_file(
                "train-00000-of-00001.parquet",
                dataset.len(),
            )),
            Format::WebDataset => {
                Self::WebDataset(super::webdataset::ShardLayout::new_shards(dataset.len()))
            }
        })
    }

    /// The format name written to `release.json`.
    pub fn format_name(&self) -> &'static str {
        self.format().as_str()
    }

    /// The format of this layout (CIFAR with its variant).
    pub fn format(&self) -> Format {
        match self {
            Self::Idx { .. } => Format::Idx,
            Self::Cifar {
                variant: Variant::Cifar10,
                ..
            } => Format::Cifar10,
            Self::Cifar {
                variant: Variant::Cifar100,
                ..
            } => Format::Cifar100,
            Self::Folder(_) => Format::Folder,
            Self::Parquet(_) => Format::Parquet,
            Self::WebDataset(_) => Format::WebDataset,
        }
    }
}

/// A dataset read from disk, with the layout it came in.
#[derive(Debug)]
pub struct Loaded {
    /// The samples.
    pub dataset: Dataset,
    /// How its files were laid out.
    pub layout: Layout,
    /// The files read.
    pub files: Vec<PathBuf>,
}

/// Reads the dataset at `input` (a folder holding one split, or the images/batch file itself).
/// `tick` is called once per image decoded (ImageFolder only).
pub fn read(
    input: &Path,
    format: Option<Format>,
    split: Option<Split>,
    tick: &(dyn Fn() + Sync),
) -> Result<Loaded, DatasetError> {
    read_limited(input, format, split, tick, &Limits::default())
}

/// [`read`] within `limits`: what the files declare is checked before it is decoded.
pub fn read_limited(
    input: &Path,
    format: Option<Format>,
    split: Option<Split>,
    tick: &(dyn Fn() + Sync),
    limits: &Limits,
) -> Result<Loaded, DatasetError> {
    let meta = fs::metadata(input).map_err(|e| DatasetError::io(input, e))?;
    let format = match format {
        Some(f) => f,
        None => detect(input, meta.is_dir())?,
    };
    match format {
        Format::Idx => read_idx(input, meta.is_dir(), split, limits),
        Format::Cifar | Format::Cifar10 | Format::Cifar100 => {
            let variant = match format {
                Format::Cifar10 => Some(Variant::Cifar10),
                Format::Cifar100 => Some(Variant::Cifar100),
                _ => None,
            };
            read_cifar(input, meta.is_dir(), variant, split, limits)
        }
        Format::Parquet => {
            let paths = super::parquet::files_of(input, split)?;
            let (dataset, layout) = super::parquet::read(&paths, tick, limits)?;
            Ok(Loaded {
                dataset,
                layout: Layout::Parquet(layout),
                files: paths,
            })
        }
        Format::WebDataset => {
            let paths = super::webdataset::shards_of(input, split)?;
            let (dataset, layout) = super::webdataset::read(&paths, tick, limits)?;
            Ok(Loaded {
                dataset,
                layout: Layout::WebDataset(layout),
                files: paths,
            })
        }
        Format::Folder => {
            if !meta.is_dir() {
                return Err(DatasetError::input(
                    input,
                    "an ImageFolder dataset is a folder, not a file",
                ));
            }
            let root = folder_split_root(input, split)?;
            let tree = folder::read_limited(&root, tick, limits)?;
            Ok(Loaded {
                dataset: tree.dataset,
                layout: Layout::Folder(tree.layout),
                files: tree.files,
            })
        }
    }
}

pub(super) fn detect(input: &Path, is_dir: bool) -> Result<Format, DatasetError> {
    if is_dir {
        let names = list_names(input)?;
        if names
            .iter()
            .any(|n| n.contains("-idx") && n.contains("-ubyte"))
        {
            Ok(Format::Idx)
        } else if names.iter().any(|n| n.ends_with(".bin")) {
            Ok(Format::Cifar)
        } else if names.iter().any(|n| n.ends_with(".parquet"))
            || (input.join("data").is_dir()
                && list_names(&input.join("data"))?
                    .iter()
                    .any(|n| n.ends_with(".parquet")))
        {
            Ok(Format::Parquet)
        } else if names.iter().any(|n| n.ends_with(".tar")) {
            Ok(Format::WebDataset)
        } else {
            Ok(Format::Folder)
        }
    } else {
        let mut head = Vec::with_capacity(512);
        let n = {
            use std::io::Read;
            let f = fs::File::open(input).map_err(|e| DatasetError::io(input, e))?;
            f.take(512)
                .read_to_end(&mut head)
                .map_err(|e| DatasetError::io(input, e))?
        };
        let len = fs::metadata(input)
            .map_err(|e| DatasetError::io(input, e))?
            .len() as usize;
        if n >= 2
            && (idx::is_gzip(&head) || (head[0] == 0 && head[1] == 0 && n >= 3 && head[2] == 8))
        {
            Ok(Format::Idx)
        } else if super::parquet::is_parquet(&head[..n]) {
            Ok(Format::Parquet)
        } else if super::webdataset::is_tar(&head[..n]) {
            Ok(Format::WebDataset)
        } else if Variant::detect(len).is_some() {
            Ok(Format::Cifar)
        } else {
            Err(DatasetError::input(
                input,
                "cannot tell the dataset format; pass --format",
            ))
        }
    }
}

fn list_names(dir: &Path) -> Result<Vec<String>, DatasetError> {
    let mut names = fs::read_dir(dir)
        .map_err(|e| DatasetError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Vec<_>>();
    names.sort();
    Ok(names)
}

pub(super) fn split_prefixes(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train"],
        Split::Test => &["t10k", "test"],
    }
}

fn read_idx(
    input: &Path,
    is_dir: bool,
    split: Option<Split>,
    limits: &Limits,
) -> Result<Loaded, DatasetError> {
    let images_path = if is_dir {
        let names = list_names(input)?;
        let mut candidates: Vec<&String> =
            names.iter().filter(|n| n.contains("images-idx")).collect();
        if let Some(s) = split {
            candidates.retain(|n| split_prefixes(s).iter().any(|p| n.starts_with(p)));
        }
        // The raw and the gzipped copy of the same file count once; the raw one is read.
        candidates.dedup_by(|b, a| b.strip_suffix(".gz") == Some(a.as_str()));
        match candidates.as_slice() {
            [] => {
                return Err(DatasetError::input(
                    input,
                    match split {
                        Some(s) => format!("no IDX images file (*images-idx*) for the {s:?} split"),
                        None => "no IDX images file (*images-idx*) in this folder".into(),
                    },
                ));
            }
            [one] => input.join(one),
            many => {
                return Err(DatasetError::input(
                    input,
                    format!(
                        "holds several IDX images files ({}); choose one with --split or pass the file",
                        many.iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
    } else {
        input.to_path_buf()
    };
    let file = images_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let labels_name = if file.contains("images-idx3") {
        file.replacen("images-idx3", "labels-idx1", 1)
    } else if file.contains("images") {
        file.replacen("images", "labels", 1)
    } else {
        return Err(DatasetError::input(
            &images_path,
            "cannot find the labels file: the images file name should contain 'images' (e.g. train-images-idx3-ubyte.gz)",
        ));
    };
    let mut labels_path = images_path.with_file_name(&labels_name);
    if !labels_path.exists() {
        // Accept a labels file compressed differently from the images file.
        let alt = match labels_name.strip_suffix(".gz") {
            Some(raw) => raw.to_string(),
            None => format!("{labels_name}.gz"),
        };
        let alt_path = images_path.with_file_name(&alt);
        if !alt_path.exists() {
            return Err(DatasetError::input(
                &images_path,
                format!("no labels file beside it (looked for {labels_name} and {alt})"),
            ));
        }
        labels_path = alt_path;
    }
    // A plain file larger than the limit is refused before it is read; a gzipped one is
    // inflated to at most the limit (plus a header).
    let cap = limits.max_bytes.saturating_add(1 << 16);
    for p in [&images_path, &labels_path] {
        let len = fs::metadata(p).map_err(|e| DatasetError::io(p, e))?.len();
        if len > cap as u64 {
            return Err(DatasetError::input(
                p,
                format!(
                    "{len} bytes, over the dataset size limit of {} bytes",
                    limits.max_bytes
                ),
            ));
        }
    }
    let (images_raw, labels_raw) =
        rayon::join(|| fs::read(&images_path), || fs::read(&labels_path));
    let images_raw = images_raw.map_err(|e| DatasetError::io(&images_path, e))?;
    let labels_raw = labels_raw.map_err(|e| DatasetError::io(&labels_path, e))?;
    let gzip = idx::is_gzip(&images_raw);
    // What each file's header declares is checked against the limit before it is inflated, and
    // it is inflated to no more than that.
    let declared = |raw: &[u8], p: &Path| -> Result<usize, DatasetError> {
        let (dims, header_len) = idx::peek_header(raw).map_err(|e| e.at(p))?;
        match dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d)) {
            Some(n) if n <= limits.max_bytes => Ok(header_len + n),
            _ => Err(DatasetError::input(
                p,
                format!(
                    "the header declares dimensions {dims:?}, over the dataset size limit of {} bytes",
                    limits.max_bytes
                ),
            )),
        }
    };
    let images_cap = declared(&images_raw, &images_path)?;
    let labels_cap = declared(&labels_raw, &labels_path)?;
    let (images, labels) = rayon::join(
        || {
            idx::maybe_gunzip_capped(images_raw, images_cap)
                .and_then(idx::parse)
                .map_err(|e| e.at(&images_path))
        },
        || {
            idx::maybe_gunzip_capped(labels_raw, labels_cap)
                .and_then(idx::parse)
                .map_err(|e| e.at(&labels_path))
        },
    );
    let (images, labels) = (images?, labels?);
    let shape = match images.dims.as_slice() {
        [_, h, w] => ImageShape {
            height: *h,
            width: *w,
            channels: 1,
        },
        [_, h, w, c] if *c == 1 || *c == 3 => ImageShape {
            height: *h,
            width: *w,
            channels: *c,
        },
        d => {
            return Err(DatasetError::malformed(
                &images_path,
                Some(3),
                format!(
                    "images need dimensions [count, rows, cols] or [count, rows, cols, 1|3], found {d:?}"
                ),
            ));
        }
    };
    limits
        .check(images.dims[0], shape)
        .map_err(|m| DatasetError::input(&images_path, m.0))?;
    let [n_labels] = labels.dims.as_slice() else {
        return Err(DatasetError::malformed(
            &labels_path,
            Some(3),
            format!("labels need one dimension [count], found {:?}", labels.dims),
        ));
    };
    if *n_labels != images.dims[0] {
        return Err(DatasetError::input(
            &labels_path,
            format!(
                "{n_labels} labels for {} images in {}",
                images.dims[0],
                images_path.display()
            ),
        ));
    }
    if shape.is_empty() {
        return Err(DatasetError::malformed(
            &images_path,
            Some(4),
            "images have no pixels",
        ));
    }
    let labels: Vec<u32> = labels.data.iter().map(|&l| u32::from(l)).collect();
    let num_classes = labels.iter().max().map_or(1, |m| *m as usize + 1);
    let strip = |p: &Path| {
        let n = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        n.strip_suffix(".gz").map(str::to_string).unwrap_or(n)
    };
    Ok(Loaded {
        dataset: Dataset::new(shape, images.data, labels, num_classes)?,
        layout: Layout::Idx {
            images: strip(&images_path),
            labels: strip(&labels_path),
            gzip,
        },
        files: vec![images_path, labels_path],
    })
}

fn read_cifar(
    input: &Path,
    is_dir: bool,
    variant: Option<Variant>,
    split: Option<Split>,
    limits: &Limits,
) -> Result<Loaded, DatasetError> {
    let files: Vec<PathBuf> = if is_dir {
        let names = list_names(input)?;
        let is_train = |n: &str| n.starts_with("data_batch") || n == "train.bin";
        let is_test = |n: &str| n.starts_with("test_batch") || n == "test.bin";
        let train: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with(".bin") && is_train(n))
            .collect();
        let test: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with(".bin") && is_test(n))
            .collect();
        let chosen = match (split, train.is_empty(), test.is_empty()) {
            (Some(Split::Train), false, _) | (None, false, true) => train,
            (Some(Split::Test), _, false) | (None, true, false) => test,
            (None, false, false) => {
                return Err(DatasetError::input(
                    input,
                    "holds both train and test batches; choose one with --split",
                ));
            }
            _ => {
                return Err(DatasetError::input(
                    input,
                    "no CIFAR batch files (data_batch_*.bin, test_batch.bin, train.bin or test.bin) for that split",
                ));
            }
        };
        // data_batch_10 would sort before data_batch_2: order by the number in the name.
        let mut chosen: Vec<&String> = chosen;
        chosen.sort_by_key(|n| (n.len(), n.to_string()));
        chosen.into_iter().map(|n| input.join(n)).collect()
    } else {
        vec![input.to_path_buf()]
    };
    // Records are 3,073 or 3,074 bytes for 3,072 pixels: the files' sizes bound the pixels.
    let mut total = 0u64;
    for p in &files {
        total += fs::metadata(p).map_err(|e| DatasetError::io(p, e))?.len();
        if total > limits.max_bytes as u64 + limits.max_bytes as u64 / 1000 {
            return Err(DatasetError::input(
                p,
                format!(
                    "the batches exceed the dataset size limit of {} bytes",
                    limits.max_bytes
                ),
            ));
        }
    }
    let raws = files
        .par_iter()
        .map(|p| fs::read(p).map_err(|e| DatasetError::io(p, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let variant = match variant {
        Some(v) => v,
        None => Variant::detect(raws[0].len()).ok_or_else(|| {
            DatasetError::malformed(
                &files[0],
                None,
                format!(
                    "size {} is a multiple of neither the CIFAR-10 (3073) nor the CIFAR-100 (3074) record size; pass --format cifar10 or cifar100",
                    raws[0].len()
                ),
            )
        })?,
    };
    let batches = raws
        .par_iter()
        .zip(&files)
        .map(|(raw, p)| cifar::parse(raw, variant).map_err(|e| e.at(p)))
        .collect::<Result<Vec<_>, _>>()?;
    drop(raws);
    let mut pixels = Vec::with_capacity(batches.iter().map(|b| b.pixels.len()).sum());
    let mut labels = Vec::new();
    let mut coarse = Vec::new();
    let mut layout_files = Vec::new();
    for (b, p) in batches.into_iter().zip(&files) {
        layout_files.push((
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            b.labels.len(),
        ));
        pixels.extend_from_slice(&b.pixels);
        labels.extend(b.labels);
        coarse.extend(b.coarse.unwrap_or_default());
    }
    let mut dataset = Dataset::new(cifar::shape(), pixels, labels, variant.num_classes())?;
    if variant == Variant::Cifar100 {
        dataset = dataset.with_coarse_labels(coarse)?;
    }
    Ok(Loaded {
        dataset,
        layout: Layout::Cifar {
            variant,
            files: layout_files,
        },
        files,
    })
}

pub(super) fn folder_split_root(
    input: &Path,
    split: Option<Split>,
) -> Result<PathBuf, DatasetError> {
    let has = |n: &str| input.join(n).is_dir();
    match split {
        Some(s) => split_prefixes(s)
            .iter()
            .map(|p| input.join(p))
            .find(|p| p.is_dir())
            .ok_or_else(|| {
                DatasetError::input(input, format!("no {s:?} folder (train/ or test/) in it"))
            }),
        None if has("train") && has("test") => Err(DatasetError::input(
            input,
            "holds train/ and test/ folders; choose one with --split",
        )),
        None => Ok(input.to_path_buf()),
    }
}

/// Writes `dataset` into the (empty) folder `dir` in `layout`, with `manifest.jsonl`; returns the
/// release description (without commitment) for `release.json`. `image_hashes` are the images'
/// sha256 (from [`super::image_sha256s`], or kept up to date by the caller). `tick` once per image
/// (folders).
pub fn write_release(
    dataset: &Dataset,
    layout: &Layout,
    dir: &Path,
    image_hashes: &[[u8; 32]],
    tick: &(dyn Fn() + Sync),
) -> Result<ReleaseInfo, DatasetError> {
    if image_hashes.len() != dataset.len() {
        return Err(DatasetError::Invalid(format!(
            "{} image hashes for {} images",
            image_hashes.len(),
            dataset.len()
        )));
    }
    let hashes = image_hashes;
    let files = match layout {
        Layout::Idx {
            images,
            labels,
            gzip,
        } => {
            let ext = if *gzip { ".gz" } else { "" };
            let (img_name, lab_name) = (format!("{images}{ext}"), format!("{labels}{ext}"));
            let s = dataset.shape();
            let mut dims = vec![dataset.len(), s.height, s.width];
            if s.channels != 1 {
                dims.push(s.channels);
            }
            let label_bytes = dataset
                .labels()
                .iter()
                .map(|&l| u8::try_from(l))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| {
                    DatasetError::Invalid("IDX labels are bytes: a label is above 255".into())
                })?;
            let path_name = img_name.clone();
            let manifest_path = move |i| format!("{path_name}#{i}");
            // The data files and the manifest are written side by side: hashing a large file is
            // sequential work.
            let ((a, b), m) = rayon::join(
                || {
                    rayon::join(
                        || write_idx_file(dir, &img_name, &dims, dataset.pixels(), *gzip),
                        || write_idx_file(dir, &lab_name, &[dataset.len()], &label_bytes, *gzip),
                    )
                },
                || write_manifest(dir, dataset, hashes, &manifest_path),
            );
            m?;
            vec![a?, b?]
        }
        Layout::Cifar {
            variant,
            files: parts,
        } => {
            let total: usize = parts.iter().map(|(_, n)| n).sum();
            if total != dataset.len() || dataset.shape() != cifar::shape() {
                return Err(DatasetError::Invalid(format!(
                    "CIFAR batches hold {total} 32×32×3 images; the dataset has {} of shape {}",
                    dataset.len(),
                    dataset.shape()
                )));
            }
            let ranges = row_ranges(parts);
            let img = dataset.shape().len();
            let files = ranges
                .par_iter()
                .map(|(name, a, b)| {
                    let bytes = cifar::encode(
                        &dataset.pixels()[a * img..b * img],
                        &dataset.labels()[*a..*b],
                        dataset.coarse_labels().map(|c| &c[*a..*b]),
                        *variant,
                    )
                    .map_err(|e| e.at(dir.join(name)))?;
                    write_plain(dir, name, &[&bytes])
                })
                .collect::<Result<Vec<_>, _>>()?;
            write_manifest(dir, dataset, hashes, &ranged_path(ranges))?;
            files
        }
        Layout::Parquet(p) => {
            let encoded = super::parquet::encode(dataset, p, hashes, tick)?;
            let files = encoded
                .par_iter()
                .map(|(name, bytes)| write_plain(dir, name, &[bytes]))
                .collect::<Result<Vec<_>, _>>()?;
            write_manifest(dir, dataset, hashes, &ranged_path(row_ranges(&p.files)))?;
            files
        }
        Layout::WebDataset(l) => {
            let encoded = super::webdataset::encode(dataset, l, hashes, tick)?;
            let files = encoded
                .par_iter()
                .map(|(name, bytes)| write_plain(dir, name, &[bytes]))
                .collect::<Result<Vec<_>, _>>()?;
            write_manifest(dir, dataset, hashes, &ranged_path(row_ranges(&l.shards)))?;
            files
        }
        Layout::Folder(f) => {
            let paths = folder::write(dataset, hashes, f, dir, tick)?;
            let path = move |i: usize| paths[i].clone();
            write_manifest(dir, dataset, hashes, &path)?;
            Vec::new()
        }
    };
    Ok(ReleaseInfo {
        format: layout.format_name().into(),
        count: dataset.len(),
        shape: dataset.shape(),
        num_classes: dataset.num_classes(),
        dataset_sha256: dataset_sha256(dataset, hashes),
        files,
        manifest: MANIFEST.into(),
        commitment: None,
        stream: None,
    })
}

/// Each file's name with its first and past-the-last sample, from the files' sample counts.
fn row_ranges(parts: &[(String, usize)]) -> Vec<(String, usize, usize)> {
    let mut start = 0;
    parts
        .iter()
        .map(|(name, n)| {
            start += n;
            (name.clone(), start - n, start)
        })
        .collect()
}

/// A sample's manifest path, `file#record`, from [`row_ranges`].
fn ranged_path(ranges: Vec<(String, usize, usize)>) -> impl Fn(usize) -> String + Sync {
    move |i| {
        let (name, a, _) = ranges
            .iter()
            .find(|(_, a, b)| i >= *a && i < *b)
            .expect("in range");
        format!("{name}#{}", i - a)
    }
}

fn write_idx_file(
    dir: &Path,
    name: &str,
    dims: &[usize],
    data: &[u8],
    gzip: bool,
) -> Result<ReleaseFile, DatasetError> {
    let header = idx::header(dims).map_err(|e| e.at(dir.join(name)))?;
    if !gzip {
        return write_plain(dir, name, &[&header, data]);
    }
    // Independent gzip members compressed in parallel; their concatenation is one valid gzip file.
    const CHUNK: usize = 4 << 20;
    let mut parts: Vec<&[u8]> = vec![&header];
    parts.extend(data.chunks(CHUNK));
    let members = parts
        .par_iter()
        .map(|p| {
            let mut e = flate2::write::GzEncoder::new(
                Vec::with_capacity(p.len() / 3),
                flate2::Compression::new(6),
            );
            e.write_all(p)?;
            e.finish()
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| DatasetError::io(dir.join(name), e))?;
    let refs: Vec<&[u8]> = members.iter().map(|m| m.as_slice()).collect();
    write_plain(dir, name, &refs)
}

fn write_plain(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<ReleaseFile, DatasetError> {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).map_err(|e| DatasetError::io(&path, e))?;
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    for p in parts {
        f.write_all(p).map_err(|e| DatasetError::io(&path, e))?;
        h.update(p);
        bytes += p.len() as u64;
    }
    Ok(ReleaseFile {
        name: name.into(),
        bytes,
        sha256: hex::encode(h.finalize()),
    })
}
