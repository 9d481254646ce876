//! WebDataset shards: tar files in which the members that share a key (the path up to the first
//! dot of the file name) form one sample: an image (`.jpg`, `.jpeg`, `.png`, `.webp`, `.bmp`), a
//! label (`.cls`: the class number as text, or `.json` with an integer `label`), and any other
//! members.
//!
//! A release keeps its input's shards, member order, names and headers: an unchanged image and
//! every other member are copied byte for byte, a changed image is encoded again in its
//! original's format under its own member name (a JPEG as JPEG at its original's quality, see
//! [`super::encoding`]), a changed label is rewritten in its `.cls` or `.json` member.

use super::encoding::{MIN_JPEG_QUALITY, Settled, changed_bytes, settle_lossy};
use super::folder::{decode_same_size, encode_png};
use super::{Dataset, DatasetError, Limits, image_sha256s};
use rayon::prelude::*;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(super) const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];
/// Samples per shard of a dataset converted from another format.
const SHARD_SAMPLES: usize = 10_000;

/// How a WebDataset is laid out: its shards (name and samples, in order) and, for one read from
/// shards, every member of every sample, to write them back with only the changes replaced.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    /// Shard file names and their sample counts, in order.
    pub shards: Vec<(String, usize)>,
    /// The lowest quality a changed JPEG image is encoded again at ([`super::encoding`]).
    pub min_jpeg_quality: u8,
    source: Option<Arc<Source>>,
    settled: Settled,
}

impl PartialEq for ShardLayout {
    fn eq(&self, other: &Self) -> bool {
        self.shards == other.shards
            && self.min_jpeg_quality == other.min_jpeg_quality
            && match (&self.source, &other.source) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for ShardLayout {}

/// One member of a shard: its header, path and bytes.
#[derive(Debug)]
struct Member {
    header: tar::Header,
    path: String,
    data: Vec<u8>,
}

/// A sample: its members in shard order, and which of them hold the image and the label.
#[derive(Debug)]
struct Sample {
    key: String,
    members: Vec<Member>,
    image: usize,
    label: usize,
}

#[derive(Debug)]
struct Source {
    samples: Vec<Sample>,
    hashes: Vec<[u8; 32]>,
}

impl ShardLayout {
    /// [`super::encoding::settle_lossy`] for the images of this layout's shards.
    pub fn settle_lossy(
        &mut self,
        dataset: &mut Dataset,
        image_hashes: &mut [[u8; 32]],
    ) -> Result<usize, DatasetError> {
        let Some(src) = self.source.clone() else {
            return Ok(0);
        };
        let original = |i: usize| {
            let s = src.samples.get(i)?;
            s.members.get(s.image).map(|m| m.data.as_slice())
        };
        let settled = settle_lossy(
            dataset,
            image_hashes,
            &src.hashes,
            &original,
            self.min_jpeg_quality,
        )?;
        let n = settled.len();
        self.settled = settled;
        Ok(n)
    }

    /// Shards of at most 10,000 samples, `train-000000.tar` and on, for `n` samples converted
    /// from another format.
    pub fn new_shards(n: usize) -> Self {
        let shards = (0..n.div_ceil(SHARD_SAMPLES).max(1))
            .map(|s| {
                (
                    format!("train-{s:06}.tar"),
                    SHARD_SAMPLES.min(n - s * SHARD_SAMPLES),
                )
            })
            .collect();
        Self {
            shards,
            min_jpeg_quality: MIN_JPEG_QUALITY,
            source: None,
            settled: Settled::new(),
        }
    }
}

/// The shards of a dataset folder (or the shard itself), in name order, for `split`.
pub fn shards_of(input: &Path, split: Option<super::Split>) -> Result<Vec<PathBuf>, DatasetError> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut names: Vec<String> = fs::read_dir(input)
        .map_err(|e| DatasetError::io(input, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar") && !n.starts_with('.'))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(DatasetError::input(input, "no .tar shard in it"));
    }
    let of = |s: super::Split| -> Vec<String> {
        names
            .iter()
            .filter(|n| {
                super::layout::split_prefixes(s)
                    .iter()
                    .any(|p| n.starts_with(p))
            })
            .cloned()
            .collect()
    };
    let (train, test) = (of(super::Split::Train), of(super::Split::Test));
    let chosen = match split {
        Some(s) if !train.is_empty() || !test.is_empty() => {
            let v = of(s);
            if v.is_empty() {
                return Err(DatasetError::input(
                    input,
                    format!("no {} shard (named {}-…) in it", s.as_str(), s.as_str()),
                ));
            }
            v
        }
        None if !train.is_empty() && !test.is_empty() => {
            return Err(DatasetError::input(
                input,
                "holds train and test shards; choose one with --split",
            ));
        }
        _ => names,
    };
    Ok(chosen.into_iter().map(|n| input.join(n)).collect())
}

/// Whether `head` (a file's first 512 bytes) is a tar header (POSIX or GNU magic).
pub fn is_tar(head: &[u8]) -> bool {
    head.len() >= 262 && &head[257..262] == b"ustar"
}

/// The sample key and extension of a member path: the key is the path up to the first dot of
/// its file name, the extension what follows, lower-cased.
pub(super) fn split_key(path: &str) -> (String, String) {
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    match path[name_start..].find('.') {
        Some(d) => (
            path[..name_start + d].to_string(),
            path[name_start + d + 1..].to_ascii_lowercase(),
        ),
        None => (path.to_string(), String::new()),
    }
}

/// Reads the shards `paths` (in order) as one dataset. `tick` once per decoded image.
pub fn read(
    paths: &[PathBuf],
    tick: &(dyn Fn() + Sync),
    limits: &Limits,
) -> Result<(Dataset, ShardLayout), DatasetError> {
    let mut samples: Vec<Sample> = Vec::new();
    let mut shards = Vec::new();
    let mut shard_of = Vec::new();
    for (s, path) in paths.iter().enumerate() {
        let f = fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
        let mut ar = tar::Archive::new(f);
        let bad =
            |e: std::io::Error| DatasetError::input(path, format!("not a readable tar shard: {e}"));
        let first = samples.len();
        for entry in ar.entries().map_err(bad)? {
            let mut e = entry.map_err(bad)?;
            if !e.header().entry_type().is_file() {
                continue;
            }
            let member = e.path().map_err(bad)?.to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data)
                .map_err(|err| DatasetError::input(path, format!("member {member}: {err}")))?;
            if data.len() as u64 != e.header().size().map_err(bad)? {
                return Err(DatasetError::input(
                    path,
                    format!("member {member} is truncated"),
                ));
            }
            let (key, _) = split_key(&member);
            let m = Member {
                header: e.header().clone(),
                path: member,
                data,
            };
            // Members of one sample are consecutive (WebDataset writes them so).
            let here = samples.len() > first;
            match samples.last_mut() {
                Some(last) if here && last.key == key => last.members.push(m),
                _ => {
                    if samples[first..].iter().any(|x| x.key == key) {
                        return Err(DatasetError::input(
                            path,
                            format!("the members of sample {key} are not together"),
                        ));
                    }
                    samples.push(Sample {
                        key,
                        members: vec![m],
                        image: usize::MAX,
                        label: usize::MAX,
                    });
                }
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        shards.push((name, samples.len() - first));
        shard_of.resize(samples.len(), s);
        if samples.len() > limits.max_files {
            return Err(DatasetError::input(
                path,
                format!("more than {} samples", limits.max_files),
            ));
        }
    }
    if samples.is_empty() {
        return Err(DatasetError::input(&paths[0], "no samples"));
    }
    let mut labels = Vec::with_capacity(samples.len());
    for (sample, &s) in samples.iter_mut().zip(&shard_of) {
        let at = |m: String| DatasetError::input(&paths[s], format!("sample {}: {m}", sample.key));
        let ext = |i: usize| split_key(&sample.members[i].path).1;
        sample.image = (0..sample.members.len())
            .find(|&i| IMAGE_EXTENSIONS.contains(&ext(i).as_str()))
            .ok_or_else(|| at("no image member (.jpg, .png, .webp, .bmp)".into()))?;
        sample.label = (0..sample.members.len())
            .find(|&i| ext(i) == "cls")
            .or_else(|| (0..sample.members.len()).find(|&i| ext(i) == "json"))
            .ok_or_else(|| at("no label member (.cls or .json)".into()))?;
        let m = &sample.members[sample.label];
        let label = parse_label(&m.path, &m.data).map_err(at)?;
        labels.push(label);
    }
    let at = |k: usize, m: String| {
        DatasetError::input(
            &paths[shard_of[k]],
            format!("{}: {m}", samples[k].members[samples[k].image].path),
        )
    };
    let images: Vec<&[u8]> = samples
        .iter()
        .map(|s| s.members[s.image].data.as_slice())
        .collect();
    let (shape, pixels) = decode_same_size(&images, limits, tick, &at, &paths[0])?;
    let classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
    let dataset = Dataset::new(shape, pixels, labels, classes)?;
    let hashes = image_sha256s(&dataset);
    Ok((
        dataset,
        ShardLayout {
            shards,
            min_jpeg_quality: MIN_JPEG_QUALITY,
            source: Some(Arc::new(Source { samples, hashes })),
            settled: Settled::new(),
        },
    ))
}

/// Writes `dataset` as the shards of `layout`; returns each shard's bytes by name. Samples of a
/// dataset read from shards keep every member but a changed image (PNG) or label; a dataset
/// from elsewhere gets `<index>.png` and `<index>.cls` members.
// The sample index reads the dataset, the source and the hashes alike.
#[allow(clippy::needless_range_loop)]
pub fn encode(
    dataset: &Dataset,
    layout: &ShardLayout,
    image_hashes: &[[u8; 32]],
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<(String, Vec<u8>)>, DatasetError> {
    let total: usize = layout.shards.iter().map(|(_, n)| n).sum();
    if total != dataset.len() {
        return Err(DatasetError::Invalid(format!(
            "the shards hold {total} samples; the dataset has {}",
            dataset.len()
        )));
    }
    let shape = dataset.shape();
    let png = |i: usize| {
        encode_png(dataset.image(i), shape)
            .map_err(|e| DatasetError::Invalid(format!("cannot encode image {i} as PNG: {e}")))
    };
    let mut starts = Vec::new();
    let mut start = 0;
    for (_, n) in &layout.shards {
        starts.push(start);
        start += n;
    }
    layout
        .shards
        .par_iter()
        .zip(starts)
        .map(|((name, n), start)| {
            let io = |e: std::io::Error| DatasetError::Invalid(format!("{name}: {e}"));
            let mut b = tar::Builder::new(Vec::new());
            for i in start..start + n {
                let label = dataset.label(i);
                match &layout.source {
                    Some(src) if src.hashes.len() == dataset.len() => {
                        let s = &src.samples[i];
                        for (j, m) in s.members.iter().enumerate() {
                            let mut data = std::borrow::Cow::Borrowed(&m.data);
                            if j == s.image && src.hashes[i] != image_hashes[i] {
                                data = std::borrow::Cow::Owned(
                                    changed_bytes(
                                        &layout.settled,
                                        i,
                                        &image_hashes[i],
                                        Some(&m.data),
                                        dataset.image(i),
                                        shape,
                                        layout.min_jpeg_quality,
                                    )
                                    .map_err(|e| {
                                        DatasetError::Invalid(format!(
                                            "{name}: cannot encode {}: {e}",
                                            m.path
                                        ))
                                    })?,
                                );
                            }
                            if j == s.label {
                                data = std::borrow::Cow::Owned(relabel(m, label)?);
                            }
                            let mut h = m.header.clone();
                            h.set_size(data.len() as u64);
                            b.append_data(&mut h, &m.path, data.as_slice())
                                .map_err(io)?;
                        }
                    }
                    _ => {
                        let key = format!("{i:06}");
                        for (ext, data) in
                            [("png", png(i)?), ("cls", label.to_string().into_bytes())]
                        {
                            let mut h = tar::Header::new_gnu();
                            h.set_mode(0o644);
                            h.set_mtime(0);
                            h.set_entry_type(tar::EntryType::Regular);
                            h.set_size(data.len() as u64);
                            b.append_data(&mut h, format!("{key}.{ext}"), data.as_slice())
                                .map_err(io)?;
                        }
                    }
                }
                tick();
            }
            Ok((name.clone(), b.into_inner().map_err(io)?))
        })
        .collect()
}

/// The class of a label member (`.cls`: the number as text; `.json`: an integer `label`).
pub(super) fn parse_label(path: &str, data: &[u8]) -> Result<u32, String> {
    if split_key(path).1 == "cls" {
        std::str::from_utf8(data)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .ok_or_else(|| format!("{path} does not hold a class number"))
    } else {
        serde_json::from_slice::<serde_json::Value>(data)
            .ok()
            .and_then(|v| v.get("label")?.as_u64())
            .and_then(|l| u32::try_from(l).ok())
            .ok_or_else(|| format!("{path} has no integer \"label\""))
    }
}

/// The label member `m` holding `label`: unchanged bytes where it already does.
fn relabel(m: &Member, label: u32) -> Result<Vec<u8>, DatasetError> {
    relabel_bytes(&m.path, &m.data, label)
}

/// The bytes of label member `path` (now `data`) holding `label`: unchanged where it already
/// does.
pub(super) fn relabel_bytes(path: &str, data: &[u8], label: u32) -> Result<Vec<u8>, DatasetError> {
    if parse_label(path, data).ok() == Some(label) {
        return Ok(data.to_vec());
    }
    if split_key(path).1 == "cls" {
        return Ok(label.to_string().into_bytes());
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| DatasetError::Invalid(format!("{path}: {e}")))?;
    v["label"] = label.into();
    serde_json::to_vec(&v).map_err(|e| DatasetError::Invalid(format!("{path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_end_at_the_first_dot_of_the_file_name() {
        assert_eq!(
            split_key("a/b.c/x001.seg.png"),
            ("a/b.c/x001".into(), "seg.png".into())
        );
        assert_eq!(split_key("x001.JPG"), ("x001".into(), "jpg".into()));
        assert_eq!(split_key("noext"), ("noext".into(), String::new()));
    }

    #[test]
    fn converted_datasets_are_cut_into_shards_of_10000() {
        let l = ShardLayout::new_shards(25_000);
        assert_eq!(
            l.shards,
            [
                ("train-000000.tar".to_string(), 10_000),
                ("train-000001.tar".to_string(), 10_000),
                ("train-000002.tar".to_string(), 5_000)
            ]
        );
    }
}
