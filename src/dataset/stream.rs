//! Parquet and WebDataset releases processed shard by shard, with memory bounded by a batch of
//! samples per worker whatever the dataset's size, and shards in parallel over the cores.
//!
//! A first pass ([`survey`]) reads only the labels (the label column of a Parquet file, the
//! `.cls`/`.json` members of a shard) and checks every sample's structure; the second
//! ([`process`]) reads each shard once, asks a callback what becomes of each sample, and writes
//! the shard again: untouched samples byte for byte (never decoded), changed images and labels
//! replaced, every other column or member carried through. Images may be of any size.
//!
//! A streamed release has no pixel hash of the whole dataset (that would decode every image);
//! its samples are hashed by their stored bytes: a shard's sha256 is over its samples in order,
//! each as (key length u64 LE, key, label u32 LE, sha256 of the image's bytes), after the tag
//! `hallmark-shard-v1`, and the release's over its shards in name order, each as (name length
//! u64 LE, name, sample count u64 LE, shard sha256), after `hallmark-stream-v1`.

use super::parquet::{
    class_names, find_columns, image_bytes, label_value, open, read_batches, with_images_and_labels,
};
use super::webdataset::{IMAGE_EXTENSIONS, parse_label, relabel_bytes, split_key};
use super::{DatasetError, Format, Limits, ReleaseFile, Split};
use crate::watermark::keyed::Outcome;
use arrow_array::builder::{BinaryBuilder, LargeBinaryBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Samples a worker holds at a time.
const BATCH: usize = 256;

/// One shard of a streamed dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Its file.
    pub path: PathBuf,
    /// Its file name (the release writes the same name).
    pub name: String,
    /// Samples in it.
    pub count: usize,
}

/// What the label pass found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Survey {
    /// Parquet or WebDataset.
    pub format: Format,
    /// The shards, in name order.
    pub shards: Vec<ShardInfo>,
    /// Samples of each class.
    pub class_counts: Vec<usize>,
    /// Class names (a Hugging Face `ClassLabel` feature), where the files have them.
    pub class_names: Option<Vec<String>>,
    /// 1 when the first image is grey, else 3.
    pub channels: usize,
}

impl Survey {
    /// Samples in all shards.
    pub fn count(&self) -> usize {
        self.shards.iter().map(|s| s.count).sum()
    }
}

/// Lists the shards of `input` (a Parquet or WebDataset folder or file) and reads their labels.
/// `tick` once per sample.
pub fn survey(
    input: &Path,
    format: Option<Format>,
    split: Option<Split>,
    tick: &(dyn Fn() + Sync),
) -> Result<Survey, DatasetError> {
    let format = match format {
        Some(f) => f,
        None => super::layout::detect(input, input.is_dir())?,
    };
    let paths = match format {
        Format::Parquet => super::parquet::files_of(input, split)?,
        Format::WebDataset => super::webdataset::shards_of(input, split)?,
        Format::Folder => return survey_folder(input, split, tick),
        other => {
            return Err(DatasetError::input(
                input,
                format!(
                    "a streamed release reads Parquet or WebDataset shards or an ImageFolder \
                     tree, not {}",
                    other.as_str()
                ),
            ));
        }
    };
    let surveyed = paths
        .par_iter()
        .map(|p| match format {
            Format::Parquet => survey_parquet(p, tick),
            _ => survey_tar(p, tick),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut counts: Vec<usize> = Vec::new();
    let mut names = None;
    let mut channels = None;
    let mut shards = Vec::new();
    for (p, s) in paths.iter().zip(surveyed) {
        if s.count == 0 {
            return Err(DatasetError::input(p, "no samples"));
        }
        for (c, n) in s.counts.iter().enumerate() {
            if counts.len() <= c {
                counts.resize(c + 1, 0);
            }
            counts[c] += n;
        }
        if names.is_none() {
            names = s.names;
        }
        channels = channels.or(s.channels);
        shards.push(ShardInfo {
            path: p.clone(),
            name: file_name(p),
            count: s.count,
        });
    }
    if let Some(n) = &names {
        if n.len() >= counts.len() {
            counts.resize(n.len(), 0);
        } else {
            names = None;
        }
    }
    Ok(Survey {
        format,
        shards,
        class_counts: counts,
        class_names: names,
        channels: channels.unwrap_or(3),
    })
}

/// An ImageFolder tree: each class folder is a shard, its files (recursively, in name order)
/// its samples, keyed by their path in the class folder.
fn survey_folder(
    input: &Path,
    split: Option<Split>,
    tick: &(dyn Fn() + Sync),
) -> Result<Survey, DatasetError> {
    if !input.is_dir() {
        return Err(DatasetError::input(
            input,
            "an ImageFolder dataset is a folder, not a file",
        ));
    }
    let root = super::layout::folder_split_root(input, split)?;
    let classes = super::folder::class_folders(&root)?;
    let mut shards = Vec::new();
    let mut counts = Vec::new();
    let mut channels = None;
    for (name, dir) in &classes {
        let mut files = Vec::new();
        super::folder::collect_images(dir, &mut files)?;
        if channels.is_none()
            && let Some(f) = files.first()
        {
            let bytes = fs::read(f).map_err(|e| DatasetError::io(f, e))?;
            channels = channels_of(&bytes);
        }
        files.iter().for_each(|_| tick());
        counts.push(files.len());
        shards.push(ShardInfo {
            path: dir.clone(),
            name: name.clone(),
            count: files.len(),
        });
    }
    if counts.iter().sum::<usize>() == 0 {
        return Err(DatasetError::input(&root, "no image in any class folder"));
    }
    Ok(Survey {
        format: Format::Folder,
        shards,
        class_counts: counts,
        class_names: Some(classes.into_iter().map(|(n, _)| n).collect()),
        channels: channels.unwrap_or(3),
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct Surveyed {
    count: usize,
    counts: Vec<usize>,
    names: Option<Vec<String>>,
    channels: Option<usize>,
}

fn count_label(counts: &mut Vec<usize>, label: u32) {
    let l = label as usize;
    if counts.len() <= l {
        counts.resize(l + 1, 0);
    }
    counts[l] += 1;
}

/// The channels a stamp of this image is made in: 1 for a grey image, else 3.
fn channels_of(bytes: &[u8]) -> Option<usize> {
    use image::ImageDecoder;
    let r = super::folder::reader(bytes, &Limits::default()).ok()?;
    let d = r.into_decoder().ok()?;
    Some(match d.color_type() {
        image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8 => 1,
        image::ColorType::La16 => 1,
        _ => 3,
    })
}

fn survey_parquet(path: &Path, tick: &(dyn Fn() + Sync)) -> Result<Surveyed, DatasetError> {
    let builder = open(path)?;
    let schema = builder.schema().clone();
    let (image, label) = find_columns(&schema).map_err(|m| DatasetError::input(path, m))?;
    let names = class_names(&schema, &label);
    let root = |name: &str| schema.index_of(name).expect("found column");
    let mask = ProjectionMask::roots(builder.parquet_schema(), [root(&label)]);
    let mut counts = Vec::new();
    let mut row = 0usize;
    for b in read_batches(path, builder.with_projection(mask).with_batch_size(8192))? {
        let b = b?;
        let col = b.column(0);
        for r in 0..b.num_rows() {
            let l = label_value(col, r)
                .ok_or_else(|| DatasetError::input(path, format!("row {}: no label", row + r)))?;
            let l = u32::try_from(l).map_err(|_| {
                DatasetError::input(
                    path,
                    format!(
                        "row {}: label {l} is not a class (unlabelled rows cannot be released)",
                        row + r
                    ),
                )
            })?;
            count_label(&mut counts, l);
            tick();
        }
        row += b.num_rows();
    }
    // The first image says whether the dataset is grey.
    let builder = open(path)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [root(&image)]);
    let first = builder
        .with_projection(mask)
        .with_limit(1)
        .with_batch_size(1);
    let channels = match read_batches(path, first)?.next() {
        Some(Ok(b)) if b.num_rows() > 0 => image_bytes(b.column(0), 0).and_then(channels_of),
        _ => None,
    };
    Ok(Surveyed {
        count: row,
        counts,
        names,
        channels,
    })
}

/// The members of one WebDataset sample as they stream by.
struct Pending {
    key: String,
    members: Vec<(tar::Header, String, Vec<u8>)>,
}

/// Reads a shard's samples one at a time, in order: `each` gets every complete sample (its key
/// and members). Members are read only where `want` says so (by extension); the others'
/// bytes are skipped and left empty.
fn for_each_sample(
    path: &Path,
    want: &dyn Fn(&str) -> bool,
    each: &mut dyn FnMut(Pending) -> Result<(), DatasetError>,
) -> Result<(), DatasetError> {
    let f = fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    let bad =
        |e: std::io::Error| DatasetError::input(path, format!("not a readable tar shard: {e}"));
    let mut seen = std::collections::HashSet::new();
    let mut cur: Option<Pending> = None;
    for entry in ar.entries().map_err(bad)? {
        let mut e = entry.map_err(bad)?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let member = e.path().map_err(bad)?.to_string_lossy().into_owned();
        let (key, ext) = split_key(&member);
        let size = e.header().size().map_err(bad)?;
        let mut data = Vec::new();
        if want(&ext) {
            e.read_to_end(&mut data)
                .map_err(|err| DatasetError::input(path, format!("member {member}: {err}")))?;
            if data.len() as u64 != size {
                return Err(DatasetError::input(
                    path,
                    format!("member {member} is truncated"),
                ));
            }
        } else {
            // Skipping reads through the member; a short read means the shard ends inside it.
            let n = std::io::copy(&mut e, &mut std::io::sink())
                .map_err(|err| DatasetError::input(path, format!("member {member}: {err}")))?;
            if n != size {
                return Err(DatasetError::input(
                    path,
                    format!("member {member} is truncated"),
                ));
            }
        }
        let header = e.header().clone();
        match &mut cur {
            Some(p) if p.key == key => p.members.push((header, member, data)),
            _ => {
                if !seen.insert(key.clone()) {
                    return Err(DatasetError::input(
                        path,
                        format!("the members of sample {key} are not together"),
                    ));
                }
                if let Some(done) = cur.take() {
                    each(done)?;
                }
                cur = Some(Pending {
                    key,
                    members: vec![(header, member, data)],
                });
            }
        }
    }
    if let Some(done) = cur {
        each(done)?;
    }
    Ok(())
}

/// Which member of a sample is its image and which its label, and the label's class.
fn roles(path: &Path, p: &Pending) -> Result<(usize, usize, u32), DatasetError> {
    let ext = |i: usize| split_key(&p.members[i].1).1;
    let at = |m: &str| DatasetError::input(path, format!("sample {}: {m}", p.key));
    let image = (0..p.members.len())
        .find(|&i| IMAGE_EXTENSIONS.contains(&ext(i).as_str()))
        .ok_or_else(|| at("no image member (.jpg, .png, .webp, .bmp)"))?;
    let label = (0..p.members.len())
        .find(|&i| ext(i) == "cls")
        .or_else(|| (0..p.members.len()).find(|&i| ext(i) == "json"))
        .ok_or_else(|| at("no label member (.cls or .json)"))?;
    let (_, name, data) = &p.members[label];
    let class = parse_label(name, data).map_err(|m| at(&m))?;
    Ok((image, label, class))
}

/// Row `r`'s image bytes and class, or what is missing.
fn row_parts<'a>(
    img: &'a ArrayRef,
    lab: &ArrayRef,
    r: usize,
) -> Result<(&'a [u8], u32), &'static str> {
    let bytes = image_bytes(img, r).ok_or("no image bytes")?;
    let label = label_value(lab, r)
        .and_then(|l| u32::try_from(l).ok())
        .ok_or("no class label")?;
    Ok((bytes, label))
}

fn survey_tar(path: &Path, tick: &(dyn Fn() + Sync)) -> Result<Surveyed, DatasetError> {
    let mut counts = Vec::new();
    let mut count = 0usize;
    let mut channels = None;
    let first_image = std::cell::Cell::new(true);
    let want = |ext: &str| {
        ext == "cls" || ext == "json" || (first_image.get() && IMAGE_EXTENSIONS.contains(&ext))
    };
    for_each_sample(path, &want, &mut |p| {
        let (image, _, l) = roles(path, &p)?;
        if first_image.get() {
            channels = channels_of(&p.members[image].2);
            first_image.set(false);
        }
        count_label(&mut counts, l);
        count += 1;
        tick();
        Ok(())
    })?;
    Ok(Surveyed {
        count,
        counts,
        names: None,
        channels,
    })
}

/// What becomes of one sample: its key within the release (`shard/key`), label and image bytes.
pub type Decide<'a> = dyn Fn(&str, u32, &[u8]) -> Result<Outcome, String> + Sync + 'a;

/// One shard as released.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardOutput {
    /// File name.
    pub name: String,
    /// Samples.
    pub count: usize,
    /// sha256 of its samples as read.
    pub sha256_before: String,
    /// sha256 of its samples as released.
    pub sha256_after: String,
    /// The changed samples: key within the shard, label before and after.
    pub poisoned: Vec<(String, u32, u32)>,
    /// The written file (none for an ImageFolder class, whose files the manifest lists).
    pub file: Option<ReleaseFile>,
    /// Smallest (height, width) of its images.
    pub min_size: [usize; 2],
    /// Largest (height, width).
    pub max_size: [usize; 2],
}

/// The sha256 of a release from its shards (the module's definition).
pub fn release_sha256(shards: &[(String, usize, String)]) -> String {
    let mut h = Sha256::new();
    h.update(b"hallmark-stream-v1");
    for (name, count, sha) in shards {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((*count as u64).to_le_bytes());
        h.update(sha.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A shard's running hash.
struct ShardHash(Sha256);

impl ShardHash {
    fn new() -> Self {
        let mut h = Sha256::new();
        h.update(b"hallmark-shard-v1");
        Self(h)
    }
    fn add(&mut self, key: &str, label: u32, image_sha: &[u8; 32]) {
        self.0.update((key.len() as u64).to_le_bytes());
        self.0.update(key.as_bytes());
        self.0.update(label.to_le_bytes());
        self.0.update(image_sha);
    }
    fn hex(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Hashing<W> {
    fn create(path: &Path) -> Result<Hashing<BufWriter<fs::File>>, DatasetError> {
        let f = fs::File::create(path).map_err(|e| DatasetError::io(path, e))?;
        Ok(Hashing {
            inner: BufWriter::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            bytes: 0,
        })
    }
    fn finish(mut self, name: &str, path: &Path) -> Result<ReleaseFile, DatasetError> {
        self.inner.flush().map_err(|e| DatasetError::io(path, e))?;
        Ok(ReleaseFile {
            name: name.to_string(),
            bytes: self.bytes,
            sha256: hex::encode(self.hash.finalize()),
        })
    }
}

/// A streamed dataset as it stands, without writing anything: its sha256 by the module's
/// definition (what a release of it records as `sha256_before`) and the range of its images'
/// sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// sha256 of the dataset's samples as stored (`hallmark-stream-v1`).
    pub sha256: String,
    /// Smallest (height, width).
    pub min_size: [usize; 2],
    /// Largest (height, width).
    pub max_size: [usize; 2],
}

/// Reads every sample of `survey` once (image bytes and label; images only to their headers)
/// and hashes them as a release would before stamping, shards in parallel. An undecodable
/// image is an error naming its shard and sample, as in [`process`]. `tick` once per sample.
pub fn fingerprint(
    survey: &Survey,
    limits: &Limits,
    tick: &(dyn Fn() + Sync),
) -> Result<Fingerprint, DatasetError> {
    let unchanged = |_: &str, _: u32, _: &[u8]| Ok(Outcome::Unchanged);
    let shards = (0..survey.shards.len())
        .into_par_iter()
        .map(|i| {
            let s = &survey.shards[i];
            let mut h = ShardHash::new();
            let (mut min, mut max) = ([usize::MAX; 2], [0usize; 2]);
            let mut count = 0usize;
            let mut add = |key: &str, label: u32, bytes: &[u8]| -> Result<(), String> {
                let d = settle(&unchanged, limits, key, label, bytes)?;
                h.add(key, label, &d.before);
                for k in 0..2 {
                    min[k] = min[k].min(d.size[k]);
                    max[k] = max[k].max(d.size[k]);
                }
                count += 1;
                tick();
                Ok(())
            };
            match survey.format {
                Format::Parquet => {
                    let path = &s.path;
                    let builder = open(path)?;
                    let schema = builder.schema().clone();
                    let (image, label) =
                        find_columns(&schema).map_err(|m| DatasetError::input(path, m))?;
                    let mut row = 0usize;
                    for b in read_batches(path, builder.with_batch_size(BATCH))? {
                        let b = b?;
                        let img = b
                            .column_by_name(&image)
                            .expect("the reader keeps the schema");
                        let lab = b
                            .column_by_name(&label)
                            .expect("the reader keeps the schema");
                        for r in 0..b.num_rows() {
                            let at = |m: &str| {
                                DatasetError::input(path, format!("row {}: {m}", row + r))
                            };
                            let (bytes, l) = row_parts(img, lab, r).map_err(at)?;
                            add(&(row + r).to_string(), l, bytes).map_err(|m| at(&m))?;
                        }
                        row += b.num_rows();
                    }
                }
                Format::Folder => {
                    let mut files = Vec::new();
                    super::folder::collect_images(&s.path, &mut files)?;
                    for f in &files {
                        let bytes = fs::read(f).map_err(|e| DatasetError::io(f, e))?;
                        add(&folder_key(&s.path, f), i as u32, &bytes)
                            .map_err(|m| DatasetError::input(f, m))?;
                    }
                }
                _ => {
                    let path = &s.path;
                    for_each_sample(path, &|_| true, &mut |p| {
                        let (image, _, l) = roles(path, &p)?;
                        let (_, iname, idata) = &p.members[image];
                        add(&p.key, l, idata).map_err(|m| {
                            DatasetError::input(path, format!("sample {}: {iname}: {m}", p.key))
                        })
                    })?;
                }
            }
            Ok((s.name.clone(), count, h.hex(), min, max))
        })
        .collect::<Result<Vec<_>, DatasetError>>()?;
    let sums: Vec<(String, usize, String)> = shards
        .iter()
        .map(|(n, c, h, _, _)| (n.clone(), *c, h.clone()))
        .collect();
    let min = |k: usize| shards.iter().map(|s| s.3[k]).min().unwrap_or(0);
    let max = |k: usize| shards.iter().map(|s| s.4[k]).max().unwrap_or(0);
    Ok(Fingerprint {
        sha256: release_sha256(&sums),
        min_size: [min(0), min(1)],
        max_size: [max(0), max(1)],
    })
}

/// An ImageFolder sample's key: its path within its class folder, `/`-separated.
fn folder_key(class_dir: &Path, f: &Path) -> String {
    f.strip_prefix(class_dir)
        .unwrap_or(f)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// One sample's fate, settled in parallel within a batch.
struct Done {
    before: [u8; 32],
    after: [u8; 32],
    label: u32,
    outcome: Outcome,
    size: [usize; 2],
}

/// Decides and hashes one sample: the header gives its size (an undecodable image is an error
/// here, named by the caller), the callback its fate.
fn settle(
    decide: &Decide<'_>,
    limits: &Limits,
    key: &str,
    label: u32,
    bytes: &[u8],
) -> Result<Done, String> {
    let (w, h) = super::folder::reader(bytes, limits)
        .and_then(|r| r.into_dimensions())
        .map_err(|e| format!("not a readable image: {e}"))?;
    let before: [u8; 32] = Sha256::digest(bytes).into();
    let outcome = decide(key, label, bytes)?;
    let (after, new_label) = match &outcome {
        Outcome::Unchanged => (before, label),
        Outcome::Poisoned {
            new_label, bytes, ..
        } => (Sha256::digest(bytes).into(), *new_label),
    };
    Ok(Done {
        before,
        after,
        label: new_label,
        outcome,
        size: [h as usize, w as usize],
    })
}

/// Everything a shard's pass accumulates besides its file.
struct Tally {
    count: usize,
    before: ShardHash,
    after: ShardHash,
    poisoned: Vec<(String, u32, u32)>,
    min: [usize; 2],
    max: [usize; 2],
    manifest: BufWriter<fs::File>,
    index: usize,
}

impl Tally {
    fn new(manifest: &Path, start: usize) -> Result<Self, DatasetError> {
        let f = fs::File::create(manifest).map_err(|e| DatasetError::io(manifest, e))?;
        Ok(Self {
            count: 0,
            before: ShardHash::new(),
            after: ShardHash::new(),
            poisoned: Vec::new(),
            min: [usize::MAX; 2],
            max: [0; 2],
            manifest: BufWriter::new(f),
            index: start,
        })
    }

    /// Adds sample `key` (released at `path`, as the manifest names it) of class `label`.
    fn add(&mut self, path: String, key: &str, label: u32, d: &Done) -> std::io::Result<()> {
        self.before.add(key, label, &d.before);
        self.after.add(key, d.label, &d.after);
        if matches!(d.outcome, Outcome::Poisoned { .. }) {
            self.poisoned.push((key.to_string(), label, d.label));
        }
        for k in 0..2 {
            self.min[k] = self.min[k].min(d.size[k]);
            self.max[k] = self.max[k].max(d.size[k]);
        }
        let entry = super::ManifestEntry {
            index: self.index,
            path,
            label: d.label,
            sha256: hex::encode(d.after),
        };
        serde_json::to_writer(&mut self.manifest, &entry).map_err(std::io::Error::other)?;
        self.manifest.write_all(b"\n")?;
        self.index += 1;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self, name: &str, file: Option<ReleaseFile>) -> std::io::Result<ShardOutput> {
        self.manifest.flush()?;
        Ok(ShardOutput {
            name: name.to_string(),
            count: self.count,
            sha256_before: self.before.hex(),
            sha256_after: self.after.hex(),
            poisoned: self.poisoned,
            file,
            min_size: self.min,
            max_size: self.max,
        })
    }
}

/// The name of shard `i`'s part of the manifest, in the output folder while it is written.
fn manifest_part(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!(".manifest-part-{i:06}"))
}

/// Writes every shard of `survey` into `dir` (same names) with each sample as `decide` says,
/// shards in parallel, and `manifest.jsonl` (each sample's index, `shard#key`, label, sha256 of
/// its image's stored bytes). `tick` once per sample.
pub fn process(
    survey: &Survey,
    dir: &Path,
    decide: &Decide<'_>,
    limits: &Limits,
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<ShardOutput>, DatasetError> {
    let outputs = (0..survey.shards.len())
        .into_par_iter()
        .map(|i| process_shard(survey, i, dir, decide, limits, tick))
        .collect::<Result<Vec<_>, _>>()?;
    join_manifest(dir, survey.shards.len())?;
    Ok(outputs)
}

/// Writes shard `i` of `survey` into `dir` (its file, or for an ImageFolder class its files in
/// their classes' folders) with each sample as `decide` says, and its part of the manifest.
/// Shards are independent: any process may write any shard, in any order, into one `dir`;
/// [`join_manifest`] ends the release once all are written. Writing a shard again (after a
/// crash) writes the same bytes.
pub fn process_shard(
    survey: &Survey,
    i: usize,
    dir: &Path,
    decide: &Decide<'_>,
    limits: &Limits,
    tick: &(dyn Fn() + Sync),
) -> Result<ShardOutput, DatasetError> {
    let s = survey
        .shards
        .get(i)
        .ok_or_else(|| DatasetError::Invalid(format!("no shard {i}")))?;
    let start: usize = survey.shards[..i].iter().map(|s| s.count).sum();
    let tally = Tally::new(&manifest_part(dir, i), start)?;
    let out = match survey.format {
        Format::Parquet => process_parquet(s, dir, decide, limits, tally, tick),
        Format::Folder => {
            let names = survey.class_names.as_deref().unwrap_or_default();
            for n in names {
                let d = dir.join(n);
                fs::create_dir_all(&d).map_err(|e| DatasetError::io(&d, e))?;
            }
            let folder = Folder {
                label: i as u32,
                classes: names,
            };
            process_folder(s, dir, decide, limits, tally, tick, &folder)
        }
        _ => process_tar(s, dir, decide, limits, tally, tick),
    }?;
    if out.count != s.count {
        return Err(DatasetError::input(
            &s.path,
            format!(
                "held {} samples, then {}: it changed while read",
                s.count, out.count
            ),
        ));
    }
    Ok(out)
}

/// Joins the manifest parts of `shards` shards, written into `dir` by [`process_shard`], into
/// `manifest.jsonl` (each sample's index, `shard#key`, label, sha256 of its image's stored
/// bytes), and removes the parts.
pub fn join_manifest(dir: &Path, shards: usize) -> Result<(), DatasetError> {
    let path = dir.join(super::MANIFEST);
    // Joined already (a retry after the parts were removed).
    if path.is_file() && (0..shards).all(|i| !manifest_part(dir, i).exists()) {
        return Ok(());
    }
    let f = fs::File::create(&path).map_err(|e| DatasetError::io(&path, e))?;
    let mut w = BufWriter::new(f);
    for i in 0..shards {
        let part = manifest_part(dir, i);
        let mut r = fs::File::open(&part).map_err(|e| DatasetError::io(&part, e))?;
        std::io::copy(&mut r, &mut w).map_err(|e| DatasetError::io(&path, e))?;
    }
    w.flush().map_err(|e| DatasetError::io(&path, e))?;
    for i in 0..shards {
        let part = manifest_part(dir, i);
        fs::remove_file(&part).map_err(|e| DatasetError::io(&part, e))?;
    }
    Ok(())
}

fn process_parquet(
    shard: &ShardInfo,
    dir: &Path,
    decide: &Decide<'_>,
    limits: &Limits,
    mut tally: Tally,
    tick: &(dyn Fn() + Sync),
) -> Result<ShardOutput, DatasetError> {
    let path = &shard.path;
    let builder = open(path)?;
    let schema = builder.schema().clone();
    let (image_column, label_column) =
        find_columns(&schema).map_err(|m| DatasetError::input(path, m))?;
    // Row groups as the input's, at most 10,000 rows or 64 MiB (a writer holds one in memory).
    let group = builder
        .metadata()
        .row_groups()
        .first()
        .map_or(BATCH, |g| g.num_rows().max(1) as usize)
        .min(10_000);
    let meta = builder.metadata().clone();
    let reader = read_batches(path, builder.with_batch_size(BATCH))?;
    let out_path = dir.join(&shard.name);
    let mut props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(group))
        .set_max_row_group_bytes(Some(64 << 20));
    // Each column keeps its input's compression; the image bytes (distinct, encoded already)
    // get neither a dictionary nor statistics, which would only cost time.
    if let Some(g) = meta.row_groups().first() {
        for c in g.columns() {
            props = props.set_column_compression(c.column_path().clone(), c.compression());
        }
    }
    let bytes_path = match schema.field_with_name(&image_column).map(|f| f.data_type()) {
        Ok(DataType::Struct(_)) => ColumnPath::new(vec![image_column.clone(), "bytes".into()]),
        _ => ColumnPath::new(vec![image_column.clone()]),
    };
    let props = props
        .set_column_dictionary_enabled(bytes_path.clone(), false)
        .set_column_statistics_enabled(bytes_path, EnabledStatistics::None)
        .build();
    let bad_write = |e: parquet::errors::ParquetError| {
        DatasetError::Invalid(format!("{}: cannot write: {e}", shard.name))
    };
    let mut w = ArrowWriter::try_new(
        Hashing::<BufWriter<fs::File>>::create(&out_path)?,
        schema.clone(),
        Some(props),
    )
    .map_err(bad_write)?;
    let mut row = 0usize;
    for b in reader {
        let b = b?;
        let n = b.num_rows();
        let img = b
            .column_by_name(&image_column)
            .expect("the reader keeps the schema");
        let lab = b
            .column_by_name(&label_column)
            .expect("the reader keeps the schema");
        let at = |r: usize, m: String| DatasetError::input(path, format!("row {}: {m}", row + r));
        let done = (0..n)
            .into_par_iter()
            .map(|r| {
                let (bytes, label) = row_parts(img, lab, r).map_err(|m| at(r, m.into()))?;
                let key = (row + r).to_string();
                let d = settle(
                    decide,
                    limits,
                    &format!("{}/{key}", shard.name),
                    label,
                    bytes,
                )
                .map_err(|m| at(r, m))?;
                tick();
                Ok((key, label, d))
            })
            .collect::<Result<Vec<_>, DatasetError>>()?;
        for (key, label, d) in &done {
            tally
                .add(format!("{}#{key}", shard.name), key, *label, d)
                .map_err(|e| DatasetError::io(dir, e))?;
        }
        let changed = done
            .iter()
            .any(|(_, _, d)| matches!(d.outcome, Outcome::Poisoned { .. }));
        let batch = if changed {
            replaced(&b, &image_column, &label_column, &done)
                .map_err(|m| DatasetError::Invalid(format!("{}: {m}", shard.name)))?
        } else {
            b
        };
        w.write(&batch).map_err(bad_write)?;
        row += n;
    }
    let hashing = w.into_inner().map_err(bad_write)?;
    let file = hashing.finish(&shard.name, &out_path)?;
    tally
        .finish(&shard.name, Some(file))
        .map_err(|e| DatasetError::io(dir, e))
}

/// `b` with the poisoned rows' image bytes and labels replaced, every other column as it was.
fn replaced(
    b: &RecordBatch,
    image_column: &str,
    label_column: &str,
    done: &[(String, u32, Done)],
) -> Result<RecordBatch, String> {
    let img = b.column_by_name(image_column).expect("checked column");
    // Each row's bytes copied once, straight into the new array.
    let row = |r: usize| -> &[u8] {
        match &done[r].2.outcome {
            Outcome::Poisoned { bytes, .. } => bytes,
            Outcome::Unchanged => image_bytes(img, r).unwrap_or_default(),
        }
    };
    let binary = |like: &DataType| -> ArrayRef {
        let total: usize = (0..done.len()).map(|r| row(r).len()).sum();
        match like {
            DataType::LargeBinary => {
                let mut b = LargeBinaryBuilder::with_capacity(done.len(), total);
                (0..done.len()).for_each(|r| b.append_value(row(r)));
                Arc::new(b.finish())
            }
            _ => {
                let mut b = BinaryBuilder::with_capacity(done.len(), total);
                (0..done.len()).for_each(|r| b.append_value(row(r)));
                Arc::new(b.finish())
            }
        }
    };
    let labels: Vec<u32> = done.iter().map(|(_, _, d)| d.label).collect();
    with_images_and_labels(b, image_column, label_column, &binary, &labels)
}

fn process_tar(
    shard: &ShardInfo,
    dir: &Path,
    decide: &Decide<'_>,
    limits: &Limits,
    mut tally: Tally,
    tick: &(dyn Fn() + Sync),
) -> Result<ShardOutput, DatasetError> {
    let path = &shard.path;
    let out_path = dir.join(&shard.name);
    let mut b = tar::Builder::new(Hashing::<BufWriter<fs::File>>::create(&out_path)?);
    let mut pending: Vec<Pending> = Vec::with_capacity(BATCH);
    let mut flush = |pending: &mut Vec<Pending>,
                     b: &mut tar::Builder<Hashing<BufWriter<fs::File>>>|
     -> Result<(), DatasetError> {
        let done = pending
            .par_iter()
            .map(|p| {
                let (image, label, l) = roles(path, p)?;
                let at = |m: String| DatasetError::input(path, format!("sample {}: {m}", p.key));
                let (_, iname, idata) = &p.members[image];
                let d = settle(
                    decide,
                    limits,
                    &format!("{}/{}", shard.name, p.key),
                    l,
                    idata,
                )
                .map_err(|m| at(format!("{iname}: {m}")))?;
                tick();
                Ok((image, label, l, d))
            })
            .collect::<Result<Vec<_>, DatasetError>>()?;
        let io = |e: std::io::Error| DatasetError::io(&out_path, e);
        for (p, (image, label, l, d)) in pending.drain(..).zip(done) {
            let path = format!("{}#{}", shard.name, p.key);
            tally.add(path, &p.key, l, &d).map_err(io)?;
            for (j, (header, name, data)) in p.members.into_iter().enumerate() {
                let data = match (&d.outcome, j) {
                    (Outcome::Poisoned { bytes, .. }, j) if j == image => bytes.clone(),
                    (_, j) if j == label => relabel_bytes(&name, &data, d.label)?,
                    _ => data,
                };
                let mut h = header;
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &name, data.as_slice()).map_err(io)?;
            }
        }
        Ok(())
    };
    for_each_sample(path, &|_| true, &mut |p| {
        pending.push(p);
        if pending.len() >= BATCH {
            flush(&mut pending, &mut b)?;
        }
        Ok(())
    })?;
    flush(&mut pending, &mut b)?;
    let hashing = b.into_inner().map_err(|e| DatasetError::io(&out_path, e))?;
    let file = hashing.finish(&shard.name, &out_path)?;
    tally
        .finish(&shard.name, Some(file))
        .map_err(|e| DatasetError::io(dir, e))
}

/// What an ImageFolder class needs beyond its shard: its label and every class's folder name.
struct Folder<'a> {
    label: u32,
    classes: &'a [String],
}

/// An ImageFolder class: every file read once and written into the folder of its released
/// class, as `class/<name>.<ext>`, the name the first 32 hex digits of sha256(key ‖ the
/// released bytes' sha256), so that a file's name says nothing of its origin or whether it
/// moved (as the in-memory release names its files by their pixels).
fn process_folder(
    shard: &ShardInfo,
    dir: &Path,
    decide: &Decide<'_>,
    limits: &Limits,
    mut tally: Tally,
    tick: &(dyn Fn() + Sync),
    folder: &Folder<'_>,
) -> Result<ShardOutput, DatasetError> {
    let mut files = Vec::new();
    super::folder::collect_images(&shard.path, &mut files)?;
    for chunk in files.chunks(BATCH) {
        let done = chunk
            .par_iter()
            .map(|f| {
                let bytes = fs::read(f).map_err(|e| DatasetError::io(f, e))?;
                let key = folder_key(&shard.path, f);
                let d = settle(
                    decide,
                    limits,
                    &format!("{}/{key}", shard.name),
                    folder.label,
                    &bytes,
                )
                .map_err(|m| DatasetError::input(f, m))?;
                let out: &[u8] = match &d.outcome {
                    Outcome::Poisoned { bytes, .. } => bytes,
                    Outcome::Unchanged => &bytes,
                };
                let class = folder.classes.get(d.label as usize).ok_or_else(|| {
                    DatasetError::input(f, format!("class {} has no folder", d.label))
                })?;
                let mut h = Sha256::new();
                h.update(key.as_bytes());
                h.update([0]);
                h.update(d.after);
                let name = format!(
                    "{class}/{}.{}",
                    &hex::encode(h.finalize())[..32],
                    super::folder::extension(out)
                );
                let path = dir.join(&name);
                fs::write(&path, out).map_err(|e| DatasetError::io(&path, e))?;
                tick();
                Ok((key, name, d))
            })
            .collect::<Result<Vec<_>, DatasetError>>()?;
        for (key, name, d) in &done {
            tally
                .add(name.clone(), key, folder.label, d)
                .map_err(|e| DatasetError::io(dir, e))?;
        }
    }
    tally
        .finish(&shard.name, None)
        .map_err(|e| DatasetError::io(dir, e))
}
