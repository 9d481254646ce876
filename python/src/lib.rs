//! The Python extension `hallmark._native`: a streamed release's marker ([`KeyedMarker`]) for
//! data engines that stamp batches where the data lives (Ray Data's `map_batches`, Hugging
//! Face `datasets.map`, Spark). The Python package in `hallmark/` wraps it.

use hallmark_core::dataset::Limits;
use hallmark_core::spec::WatermarkSpec;
use hallmark_core::watermark::SecretRecord;
use hallmark_core::watermark::keyed::{KeyedMarker, Outcome};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A stamped batch: the released labels, images and which samples were poisoned.
type Stamped<'py> = (Vec<u32>, Vec<Bound<'py, PyBytes>>, Vec<bool>);

/// Stamps the samples of one streamed release, batch by batch.
#[pyclass(frozen, module = "hallmark")]
struct Marker {
    inner: KeyedMarker,
}

#[pymethods]
impl Marker {
    /// A new release of the spec at `spec_path` (TOML) with the 32-byte `nonce` (64 hex
    /// digits), for a dataset whose classes hold `class_counts` samples, stamped in `channels`
    /// channels (1 or 3).
    #[new]
    #[pyo3(signature = (spec_path, nonce, class_counts, channels, min_jpeg_quality = 30))]
    fn new(
        spec_path: &str,
        nonce: &str,
        class_counts: Vec<usize>,
        channels: usize,
        min_jpeg_quality: u8,
    ) -> PyResult<Self> {
        let spec =
            WatermarkSpec::from_toml_file(std::path::Path::new(spec_path)).map_err(value_error)?;
        let nonce: [u8; 32] = hex_nonce(nonce)?;
        if channels != 1 && channels != 3 {
            return Err(value_error("channels: 1 (grey) or 3 (RGB)"));
        }
        let inner = KeyedMarker::new(&spec, nonce, &class_counts, channels, min_jpeg_quality)
            .map_err(value_error)?;
        Ok(Self { inner })
    }

    /// The marker of the streamed release whose secret record is at `path`: it stamps what
    /// `hallmark watermark --stream` stamped.
    #[staticmethod]
    #[pyo3(signature = (path, min_jpeg_quality = 30))]
    fn from_record(path: &str, min_jpeg_quality: u8) -> PyResult<Self> {
        let rec = SecretRecord::load(std::path::Path::new(path)).map_err(|e| match e {
            hallmark_core::watermark::WatermarkError::Record { .. } => value_error(e),
            other => PyOSError::new_err(other.to_string()),
        })?;
        let inner = KeyedMarker::from_record(&rec, min_jpeg_quality).map_err(value_error)?;
        Ok(Self { inner })
    }

    /// Whether the sample `key` of class `label` is poisoned.
    fn chooses(&self, key: &str, label: u32) -> bool {
        self.inner.chooses(key, label).is_some()
    }

    /// Stamps a batch: `keys`, `labels` and encoded `images` (bytes), one per sample. Returns
    /// the released labels, images (an untouched image is the same bytes object) and which
    /// samples were poisoned. The work runs without the interpreter lock, over the cores.
    fn stamp_batch<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
        labels: Vec<u32>,
        images: Vec<Bound<'py, PyBytes>>,
    ) -> PyResult<Stamped<'py>> {
        if keys.len() != labels.len() || keys.len() != images.len() {
            return Err(value_error(format!(
                "{} keys, {} labels and {} images: one of each per sample",
                keys.len(),
                labels.len(),
                images.len()
            )));
        }
        let bytes: Vec<&[u8]> = images.iter().map(|b| b.as_bytes()).collect();
        let limits = Limits::default();
        let outcomes = py.allow_threads(|| {
            keys.par_iter()
                .zip(labels.par_iter())
                .zip(bytes.par_iter())
                .map(|((k, l), b)| {
                    self.inner
                        .process(k, *l, b, &limits)
                        .map_err(|m| format!("sample {k}: {m}"))
                })
                .collect::<Result<Vec<_>, String>>()
        });
        let outcomes = outcomes.map_err(value_error)?;
        let mut out_labels = Vec::with_capacity(keys.len());
        let mut out_images = Vec::with_capacity(keys.len());
        let mut poisoned = Vec::with_capacity(keys.len());
        for ((o, l), img) in outcomes.into_iter().zip(labels).zip(images) {
            match o {
                Outcome::Unchanged => {
                    out_labels.push(l);
                    out_images.push(img);
                    poisoned.push(false);
                }
                Outcome::Poisoned {
                    new_label, bytes, ..
                } => {
                    out_labels.push(new_label);
                    out_images.push(PyBytes::new(py, &bytes));
                    poisoned.push(true);
                }
            }
        }
        Ok((out_labels, out_images, poisoned))
    }
}

fn hex_nonce(s: &str) -> PyResult<[u8; 32]> {
    let v = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| value_error("nonce: 64 hex digits"))?;
    v.try_into()
        .map_err(|_| value_error("nonce: 64 hex digits (32 bytes)"))
}

/// The checked secret record at `path`, as JSON text.
#[pyfunction]
fn read_record(path: &str) -> PyResult<String> {
    let rec =
        hallmark_core::watermark::Secret::load(std::path::Path::new(path)).map_err(value_error)?;
    Ok(String::from_utf8(rec.to_json_pretty()).expect("JSON is UTF-8"))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Marker>()?;
    m.add_function(wrap_pyfunction!(read_record, m)?)?;
    Ok(())
}
