//! What is written beside every output: `manifest.jsonl` (one line per sample: index, path, label,
//! sha256 of the pixels) and `release.json` (format, shape, files with their sha256, the dataset's
//! sha256 and, for a watermarked release, the public commitment).

use super::{Dataset, DatasetError, ImageShape};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One line of `manifest.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Position of the sample in the dataset.
    pub index: usize,
    /// File holding it: a relative path, or `file#record` for array formats.
    pub path: String,
    /// Its label.
    pub label: u32,
    /// sha256 (hex) of its HWC pixels.
    pub sha256: String,
}

/// One data file of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseFile {
    /// Name relative to the release folder.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 (hex) of the file's bytes.
    pub sha256: String,
}

/// Contents of `release.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    /// Format the release is written in.
    pub format: String,
    /// Number of samples.
    pub count: usize,
    /// Image shape.
    pub shape: ImageShape,
    /// Number of classes.
    pub num_classes: usize,
    /// sha256 of the dataset's content, in canonical order (see `dataset_sha256`).
    pub dataset_sha256: String,
    /// Data files (array formats; ImageFolder files are listed in the manifest).
    pub files: Vec<ReleaseFile>,
    /// Name of the manifest file.
    pub manifest: String,
    /// Public commitment to the watermark's secret record, for a watermarked release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment: Option<String>,
    /// A streamed release (`hallmark watermark --stream`): its images' sizes, and how it is
    /// hashed (`shape` then holds the largest size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamInfo>,
}

/// What `release.json` says of a streamed release ([`super::stream`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The smallest image (height, width).
    pub min_size: [usize; 2],
    /// The largest image (height, width).
    pub max_size: [usize; 2],
    /// How `dataset_sha256` and the manifest's hashes are taken: `hallmark-stream-v1`, over
    /// each image's stored bytes (not its decoded pixels).
    pub hashing: String,
}

/// Name of the manifest file in every release.
pub const MANIFEST: &str = "manifest.jsonl";
/// Name of the release description in every release.
pub const RELEASE_JSON: &str = "release.json";

pub(crate) fn write_manifest(
    dir: &Path,
    dataset: &Dataset,
    image_hashes: &[[u8; 32]],
    path_of: &(dyn Fn(usize) -> String + Sync),
) -> Result<(), DatasetError> {
    let p = dir.join(MANIFEST);
    let f = std::fs::File::create(&p).map_err(|e| DatasetError::io(&p, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut line = Vec::with_capacity(256);
    for (i, (hash, &label)) in image_hashes.iter().zip(dataset.labels()).enumerate() {
        line.clear();
        let entry = ManifestEntry {
            index: i,
            path: path_of(i),
            label,
            sha256: hex::encode(hash),
        };
        serde_json::to_writer(&mut line, &entry).expect("serialising to memory");
        line.push(b'\n');
        w.write_all(&line).map_err(|e| DatasetError::io(&p, e))?;
    }
    w.flush().map_err(|e| DatasetError::io(&p, e))
}

/// Reads a `manifest.jsonl`, naming the line of any entry that does not parse.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l)
                .map_err(|e| DatasetError::malformed(path, None, format!("line {}: {e}", n + 1)))
        })
        .collect()
}

/// Writes `release.json`.
pub fn write_release_info(dir: &Path, info: &ReleaseInfo) -> Result<(), DatasetError> {
    let p = dir.join(RELEASE_JSON);
    let mut bytes = serde_json::to_vec_pretty(info).expect("serialising to memory");
    bytes.push(b'\n');
    std::fs::write(&p, bytes).map_err(|e| DatasetError::io(&p, e))
}
