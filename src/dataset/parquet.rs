//! Parquet image datasets in the Hugging Face layout: an image column that is a struct of
//! `bytes` (the encoded file: PNG, JPEG or BMP) and `path`, an integer label column, and any
//! other columns. The class names come from the `huggingface` schema metadata (a `ClassLabel`
//! feature's `names`) when it is there.
//!
//! A release keeps its input's files, schemas, row order and every other column: an image whose
//! pixels did not change keeps its original bytes (copied byte for byte), a changed image is
//! encoded again in its original's format (a JPEG as JPEG at its original's quality, see
//! [`super::encoding`]), a changed label is written in the label column's own type.

use super::encoding::{MIN_JPEG_QUALITY, Settled, changed_bytes, settle_lossy};
use super::folder::decode_same_size;
use super::{Dataset, DatasetError, Limits, image_sha256s};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, Int64Array, LargeBinaryArray, RecordBatch, StringArray,
    StructArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a Parquet dataset is laid out: its files (name and rows, in order), its image and label
/// columns, and, for a dataset read from files, what is needed to write them back with only the
/// changed images and labels replaced.
#[derive(Debug, Clone)]
pub struct ParquetLayout {
    /// File names (relative to the dataset's folder) and their row counts, in order.
    pub files: Vec<(String, usize)>,
    /// The image column.
    pub image_column: String,
    /// The label column.
    pub label_column: String,
    /// The lowest quality a changed JPEG image is encoded again at ([`super::encoding`]).
    pub min_jpeg_quality: u8,
    source: Option<Arc<Source>>,
    settled: Settled,
}

impl PartialEq for ParquetLayout {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
            && self.image_column == other.image_column
            && self.label_column == other.label_column
            && self.min_jpeg_quality == other.min_jpeg_quality
            && match (&self.source, &other.source) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for ParquetLayout {}

/// The files as read: each file's batches, and the sha256 of every image's decoded pixels.
#[derive(Debug)]
struct Source {
    batches: Vec<Vec<RecordBatch>>,
    schemas: Vec<SchemaRef>,
    hashes: Vec<[u8; 32]>,
}

impl ParquetLayout {
    /// The stored bytes of row `i`'s image, for a dataset read from files.
    fn original(&self, i: usize) -> Option<&[u8]> {
        let src = self.source.as_ref()?;
        let mut start = 0;
        for (f, (_, rows)) in self.files.iter().enumerate() {
            if i < start + rows {
                let mut row = start;
                for b in src.batches.get(f)? {
                    if i < row + b.num_rows() {
                        return image_bytes(b.column_by_name(&self.image_column)?, i - row);
                    }
                    row += b.num_rows();
                }
                return None;
            }
            start += rows;
        }
        None
    }

    /// [`super::encoding::settle_lossy`] for the images of this layout's files.
    pub fn settle_lossy(
        &mut self,
        dataset: &mut Dataset,
        image_hashes: &mut [[u8; 32]],
    ) -> Result<usize, DatasetError> {
        let Some(src) = self.source.clone() else {
            return Ok(0);
        };
        let q = self.min_jpeg_quality;
        let settled = settle_lossy(dataset, image_hashes, &src.hashes, &|i| self.original(i), q)?;
        let n = settled.len();
        self.settled = settled;
        Ok(n)
    }

    /// One new file, `name`, for a dataset of `rows` images (conversion from another format).
    pub fn new_file(name: &str, rows: usize) -> Self {
        Self {
            files: vec![(name.into(), rows)],
            image_column: "image".into(),
            label_column: "label".into(),
            min_jpeg_quality: MIN_JPEG_QUALITY,
            source: None,
            settled: Settled::new(),
        }
    }
}

/// The Parquet files of a dataset folder (or the file itself), in name order, for `split`.
pub fn files_of(input: &Path, split: Option<super::Split>) -> Result<Vec<PathBuf>, DatasetError> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut dir = input.to_path_buf();
    if parquet_names(&dir)?.is_empty() && input.join("data").is_dir() {
        dir = input.join("data");
    }
    if let Some(s) = split
        && dir.join(s.as_str()).is_dir()
        && parquet_names(&dir)?.is_empty()
    {
        dir = dir.join(s.as_str());
    }
    let names = parquet_names(&dir)?;
    if names.is_empty() {
        return Err(DatasetError::input(input, "no .parquet file in it"));
    }
    let of_split = |s: super::Split| -> Vec<String> {
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
    let chosen = match split {
        Some(s) => {
            let v = of_split(s);
            if v.is_empty() {
                // A folder of one split's files, whatever their names.
                if of_split(super::Split::Train).is_empty()
                    && of_split(super::Split::Test).is_empty()
                {
                    names
                } else {
                    return Err(DatasetError::input(
                        &dir,
                        format!("no {} file (named {}-…) in it", s.as_str(), s.as_str()),
                    ));
                }
            } else {
                v
            }
        }
        None => {
            let (train, test) = (of_split(super::Split::Train), of_split(super::Split::Test));
            if !train.is_empty() && !test.is_empty() {
                return Err(DatasetError::input(
                    &dir,
                    "holds train and test files; choose one with --split",
                ));
            }
            names
        }
    };
    Ok(chosen.into_iter().map(|n| dir.join(n)).collect())
}

fn parquet_names(dir: &Path) -> Result<Vec<String>, DatasetError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| DatasetError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet") && !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Opens the Parquet file `path` for reading, naming it in any error.
pub(super) fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<fs::File>, DatasetError> {
    let f = fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| DatasetError::input(path, format!("not a readable Parquet file: {e}")))
}

/// The batches `builder` reads from the file `path`, an error naming the file and the row after
/// which a row group could not be read.
pub(super) fn read_batches(
    path: &Path,
    builder: ParquetRecordBatchReaderBuilder<fs::File>,
) -> Result<impl Iterator<Item = Result<RecordBatch, DatasetError>> + '_, DatasetError> {
    let reader = builder
        .build()
        .map_err(|e| DatasetError::input(path, format!("cannot read: {e}")))?;
    let mut row = 0usize;
    Ok(reader.map(move |b| {
        let b = b.map_err(|e| {
            DatasetError::input(
                path,
                format!("after row {row}, cannot read a row group: {e}"),
            )
        })?;
        row += b.num_rows();
        Ok(b)
    }))
}

/// Whether `head` (a file's first bytes) is a Parquet file's magic.
pub fn is_parquet(head: &[u8]) -> bool {
    head.starts_with(b"PAR1")
}

/// Reads the Parquet files `paths` (in order) as one dataset. `tick` once per decoded image.
pub fn read(
    paths: &[PathBuf],
    tick: &(dyn Fn() + Sync),
    limits: &Limits,
) -> Result<(Dataset, ParquetLayout), DatasetError> {
    let mut batches = Vec::new();
    let mut schemas = Vec::new();
    let mut files = Vec::new();
    let mut columns: Option<(String, String)> = None;
    let mut names: Option<Vec<String>> = None;
    for path in paths {
        let builder = open(path)?;
        let schema = builder.schema().clone();
        let (image, label) = find_columns(&schema).map_err(|m| DatasetError::input(path, m))?;
        match &columns {
            None => columns = Some((image.clone(), label.clone())),
            Some((i, l)) if *i != image || *l != label => {
                return Err(DatasetError::input(
                    path,
                    format!(
                        "its image and label columns are {image:?} and {label:?}, but {} has {i:?} and {l:?}",
                        paths[0].display()
                    ),
                ));
            }
            Some(_) => {}
        }
        if names.is_none() {
            names = class_names(&schema, &label);
        }
        let mut got = Vec::new();
        let mut rows = 0usize;
        for b in read_batches(path, builder.with_batch_size(1024))? {
            let b = b?;
            rows += b.num_rows();
            got.push(b);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.push((name, rows));
        batches.push(got);
        schemas.push(schema);
    }
    let (image_column, label_column) =
        columns.ok_or_else(|| DatasetError::Invalid("no Parquet file to read".into()))?;
    // Every row's encoded image and label, with the file and row it came from.
    let mut rows: Vec<(&[u8], i64, usize, usize)> = Vec::new();
    for (f, bs) in batches.iter().enumerate() {
        let mut row = 0usize;
        for b in bs {
            let img = b.column_by_name(&image_column).expect("checked column");
            let lab = b.column_by_name(&label_column).expect("checked column");
            for r in 0..b.num_rows() {
                let bytes = image_bytes(img, r).ok_or_else(|| {
                    DatasetError::input(&paths[f], format!("row {}: no image bytes", row + r))
                })?;
                let label = label_value(lab, r).ok_or_else(|| {
                    DatasetError::input(&paths[f], format!("row {}: no label", row + r))
                })?;
                rows.push((bytes, label, f, row + r));
            }
            row += b.num_rows();
        }
    }
    if rows.is_empty() {
        return Err(DatasetError::input(&paths[0], "no rows"));
    }
    if rows.len() > limits.max_files {
        return Err(DatasetError::input(
            &paths[0],
            format!("more than {} images", limits.max_files),
        ));
    }
    let at =
        |f: usize, row: usize, m: String| DatasetError::input(&paths[f], format!("row {row}: {m}"));
    let mut labels = Vec::with_capacity(rows.len());
    for &(_, l, f, row) in &rows {
        labels.push(u32::try_from(l).map_err(|_| {
            at(
                f,
                row,
                format!("label {l} is not a class (unlabelled rows cannot be read)"),
            )
        })?);
    }
    let images: Vec<&[u8]> = rows.iter().map(|r| r.0).collect();
    let (shape, pixels) = decode_same_size(
        &images,
        limits,
        tick,
        &|k, m| at(rows[k].2, rows[k].3, m),
        &paths[0],
    )?;
    let max = labels.iter().copied().max().unwrap_or(0) as usize + 1;
    let classes = names.as_ref().map_or(max, |n| n.len().max(max));
    let mut dataset = Dataset::new(shape, pixels, labels, classes)?;
    if let Some(n) = names
        && n.len() == classes
    {
        dataset = dataset.with_class_names(n)?;
    }
    let hashes = image_sha256s(&dataset);
    let layout = ParquetLayout {
        files,
        image_column,
        label_column,
        min_jpeg_quality: MIN_JPEG_QUALITY,
        source: Some(Arc::new(Source {
            batches,
            schemas,
            hashes,
        })),
        settled: Settled::new(),
    };
    Ok((dataset, layout))
}

/// The image column (a struct with a binary `bytes` field, or a binary column; named `image`
/// or `img` by preference) and the label column (an integer column named `label` or `labels`,
/// else the integer column of a `ClassLabel` feature in the Hugging Face metadata).
pub(super) fn find_columns(schema: &Schema) -> Result<(String, String), String> {
    let is_image = |f: &Field| match f.data_type() {
        DataType::Struct(fields) => fields.iter().any(|g| {
            g.name() == "bytes" && matches!(g.data_type(), DataType::Binary | DataType::LargeBinary)
        }),
        DataType::Binary | DataType::LargeBinary => true,
        _ => false,
    };
    let is_int = |f: &Field| f.data_type().is_integer();
    let pick = |ok: &dyn Fn(&Field) -> bool, preferred: &[&str]| -> Option<String> {
        let fields = schema.fields();
        preferred
            .iter()
            .find_map(|p| fields.iter().find(|f| f.name() == p && ok(f)))
            .or_else(|| fields.iter().find(|f| ok(f)))
            .map(|f| f.name().clone())
    };
    let image = pick(&is_image, &["image", "img"]).ok_or(
        "no image column (a struct with a binary `bytes` field, as Hugging Face writes, or a binary column)",
    )?;
    // A label column by name, or by its Hugging Face feature type; never any integer column
    // (an `id` read as labels would make a dataset of as many classes as rows).
    let named = ["label", "labels"]
        .iter()
        .find_map(|p| schema.fields().iter().find(|f| f.name() == p && is_int(f)));
    let class_label = || {
        let meta: serde_json::Value =
            serde_json::from_str(schema.metadata().get("huggingface")?).ok()?;
        let features = meta.pointer("/info/features")?.as_object()?;
        schema.fields().iter().find(|f| {
            is_int(f)
                && features
                    .get(f.name())
                    .and_then(|v| v.get("_type"))
                    .and_then(|t| t.as_str())
                    == Some("ClassLabel")
        })
    };
    let label = named
        .or_else(class_label)
        .map(|f| f.name().clone())
        .ok_or("no label column (an integer column named `label`, or a ClassLabel feature)")?;
    Ok((image, label))
}

/// The class names of a `ClassLabel` feature in the `huggingface` schema metadata.
pub(super) fn class_names(schema: &Schema, label: &str) -> Option<Vec<String>> {
    let meta: serde_json::Value =
        serde_json::from_str(schema.metadata().get("huggingface")?).ok()?;
    let names = meta
        .pointer(&format!("/info/features/{label}/names"))?
        .as_array()?;
    names.iter().map(|n| n.as_str().map(String::from)).collect()
}

pub(super) fn image_bytes(col: &ArrayRef, row: usize) -> Option<&[u8]> {
    match col.data_type() {
        DataType::Struct(_) => {
            let s = col.as_struct();
            if s.is_null(row) {
                return None;
            }
            binary_value(s.column_by_name("bytes")?.as_ref(), row)
        }
        _ => binary_value(col.as_ref(), row),
    }
}

fn binary_value(a: &dyn Array, row: usize) -> Option<&[u8]> {
    if a.is_null(row) {
        return None;
    }
    match a.data_type() {
        DataType::Binary => Some(a.as_binary::<i32>().value(row)),
        DataType::LargeBinary => Some(a.as_binary::<i64>().value(row)),
        _ => None,
    }
}

pub(super) fn label_value(col: &ArrayRef, row: usize) -> Option<i64> {
    if col.is_null(row) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Int8 => col.as_primitive::<Int8Type>().value(row) as i64,
        DataType::Int16 => col.as_primitive::<Int16Type>().value(row) as i64,
        DataType::Int32 => col.as_primitive::<Int32Type>().value(row) as i64,
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row),
        DataType::UInt8 => col.as_primitive::<UInt8Type>().value(row) as i64,
        DataType::UInt16 => col.as_primitive::<UInt16Type>().value(row) as i64,
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(row) as i64,
        DataType::UInt64 => i64::try_from(col.as_primitive::<UInt64Type>().value(row)).ok()?,
        _ => return None,
    })
}

/// `labels` as an array of the integer type `like`.
pub(super) fn labels_like(labels: &[u32], like: &DataType) -> Result<ArrayRef, String> {
    use arrow_array::PrimitiveArray;
    fn conv<T: arrow_array::ArrowPrimitiveType>(
        labels: &[u32],
        f: impl Fn(u32) -> Option<T::Native>,
    ) -> Result<ArrayRef, String> {
        let v = labels
            .iter()
            .map(|&l| f(l).ok_or_else(|| format!("label {l} does not fit the label column's type")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(PrimitiveArray::<T>::from_iter_values(v)))
    }
    match like {
        DataType::Int8 => conv::<Int8Type>(labels, |l| i8::try_from(l).ok()),
        DataType::Int16 => conv::<Int16Type>(labels, |l| i16::try_from(l).ok()),
        DataType::Int32 => conv::<Int32Type>(labels, |l| i32::try_from(l).ok()),
        DataType::Int64 => conv::<Int64Type>(labels, |l| Some(l as i64)),
        DataType::UInt8 => conv::<UInt8Type>(labels, |l| u8::try_from(l).ok()),
        DataType::UInt16 => conv::<UInt16Type>(labels, |l| u16::try_from(l).ok()),
        DataType::UInt32 => conv::<UInt32Type>(labels, Some),
        DataType::UInt64 => conv::<UInt64Type>(labels, |l| Some(l as u64)),
        other => Err(format!("the label column's type {other} is not an integer")),
    }
}

/// `b` with its image column's bytes replaced by `bytes(binary type)` (inside the image struct
/// or as the column itself) and its label column by `labels` in the column's own type; every
/// other column, and the struct's other fields, as they were.
pub(super) fn with_images_and_labels(
    b: &RecordBatch,
    image_column: &str,
    label_column: &str,
    bytes: &dyn Fn(&DataType) -> ArrayRef,
    labels: &[u32],
) -> Result<RecordBatch, String> {
    let img = b.column_by_name(image_column).expect("read column");
    let lab = b.column_by_name(label_column).expect("read column");
    let new_image: ArrayRef = match img.data_type() {
        DataType::Struct(fields) => {
            let s = img.as_struct();
            let cols = fields
                .iter()
                .zip(s.columns())
                .map(|(fd, c)| {
                    if fd.name() == "bytes" {
                        bytes(fd.data_type())
                    } else {
                        c.clone()
                    }
                })
                .collect();
            Arc::new(
                StructArray::try_new(fields.clone(), cols, s.nulls().cloned())
                    .map_err(|e| e.to_string())?,
            )
        }
        t => bytes(t),
    };
    let new_label = labels_like(labels, lab.data_type())?;
    let schema = b.schema();
    let cols = schema
        .fields()
        .iter()
        .zip(b.columns())
        .map(|(fd, c)| {
            if fd.name() == image_column {
                new_image.clone()
            } else if fd.name() == label_column {
                new_label.clone()
            } else {
                c.clone()
            }
        })
        .collect();
    RecordBatch::try_new(schema, cols).map_err(|e| e.to_string())
}

/// `bytes` as a binary array of the type `like` (Binary or LargeBinary).
pub(super) fn binary_like(bytes: &[Vec<u8>], like: &DataType) -> ArrayRef {
    let refs = bytes.iter().map(|b| Some(b.as_slice()));
    match like {
        DataType::LargeBinary => Arc::new(LargeBinaryArray::from_iter(refs)),
        _ => Arc::new(BinaryArray::from_iter(refs)),
    }
}

/// Writes `dataset` as the Parquet files of `layout` into `dir`; returns each file's bytes by name
/// for the caller to write and hash. Rows of a dataset read from Parquet keep everything but a
/// changed image (in its original's format) or label; a dataset from elsewhere gets `image {bytes, path}` and `label`
/// columns, with its class names in the `huggingface` metadata.
pub fn encode(
    dataset: &Dataset,
    layout: &ParquetLayout,
    image_hashes: &[[u8; 32]],
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<(String, Vec<u8>)>, DatasetError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let total: usize = layout.files.iter().map(|(_, n)| n).sum();
    if total != dataset.len() {
        return Err(DatasetError::Invalid(format!(
            "the Parquet layout holds {total} rows; the dataset has {}",
            dataset.len()
        )));
    }
    let shape = dataset.shape();
    // A row's image: the original bytes where the pixels are unchanged, else encoded again in
    // the original's format (PNG for a new file).
    let image_of =
        |i: usize, original: Option<&[u8]>, same: bool| -> Result<Vec<u8>, DatasetError> {
            tick();
            match original {
                Some(b) if same => Ok(b.to_vec()),
                _ => changed_bytes(
                    &layout.settled,
                    i,
                    &image_hashes[i],
                    original,
                    dataset.image(i),
                    shape,
                    layout.min_jpeg_quality,
                )
                .map_err(|e| DatasetError::Invalid(format!("cannot encode image {i}: {e}"))),
            }
        };
    let mut out = Vec::new();
    let mut start = 0usize;
    for (f, (name, rows)) in layout.files.iter().enumerate() {
        let end = start + rows;
        let mut buf = Vec::new();
        match &layout.source {
            Some(src) if src.hashes.len() == dataset.len() => {
                let schema = src.schemas[f].clone();
                let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props.clone()))
                    .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
                let mut row = start;
                for b in &src.batches[f] {
                    let n = b.num_rows();
                    let img = b.column_by_name(&layout.image_column).expect("read column");
                    let bytes = (row..row + n)
                        .into_par_iter()
                        .map(|i| {
                            let same = src.hashes[i] == image_hashes[i];
                            image_of(i, image_bytes(img, i - row), same)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let labels = &dataset.labels()[row..row + n];
                    let nb = with_images_and_labels(
                        b,
                        &layout.image_column,
                        &layout.label_column,
                        &|t| binary_like(&bytes, t),
                        labels,
                    )
                    .map_err(|m| DatasetError::Invalid(format!("{name}: {m}")))?;
                    w.write(&nb)
                        .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
                    row += n;
                }
                w.close()
                    .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
            }
            _ => {
                let schema = Arc::new(new_schema(dataset));
                let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props.clone()))
                    .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
                for a in (start..end).step_by(1024) {
                    let b = (a + 1024).min(end);
                    let bytes = (a..b)
                        .into_par_iter()
                        .map(|i| image_of(i, None, false))
                        .collect::<Result<Vec<_>, _>>()?;
                    let paths: StringArray = (a..b)
                        .map(|i| Some(format!("{}.png", hex::encode(&image_hashes[i][..10]))))
                        .collect();
                    let DataType::Struct(fields) = schema.field(0).data_type().clone() else {
                        unreachable!("the image column is a struct")
                    };
                    let image = StructArray::try_new(
                        fields,
                        vec![binary_like(&bytes, &DataType::Binary), Arc::new(paths)],
                        None,
                    )
                    .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
                    let labels: Int64Array =
                        dataset.labels()[a..b].iter().map(|&l| l as i64).collect();
                    let nb = RecordBatch::try_new(
                        schema.clone(),
                        vec![Arc::new(image), Arc::new(labels)],
                    )
                    .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
                    w.write(&nb)
                        .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
                }
                w.close()
                    .map_err(|e| DatasetError::Invalid(format!("{name}: {e}")))?;
            }
        }
        out.push((name.clone(), buf));
        start = end;
    }
    Ok(out)
}

/// The Hugging Face schema of a new file: `image {bytes, path}`, `label`, and the features.
fn new_schema(dataset: &Dataset) -> Schema {
    let image = DataType::Struct(
        vec![
            Field::new("bytes", DataType::Binary, true),
            Field::new("path", DataType::Utf8, true),
        ]
        .into(),
    );
    let label = match dataset.class_names() {
        Some(n) => serde_json::json!({"names": n, "_type": "ClassLabel"}),
        None => serde_json::json!({"dtype": "int64", "_type": "Value"}),
    };
    let features = serde_json::json!({"info": {"features": {
        "image": {"_type": "Image"},
        "label": label,
    }}});
    Schema::new(vec![
        Field::new("image", image, true),
        Field::new("label", DataType::Int64, false),
    ])
    .with_metadata(HashMap::from([(
        "huggingface".to_string(),
        features.to_string(),
    )]))
}
