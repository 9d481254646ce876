//! Parquet datasets in the Hugging Face layout, written by pyarrow as `datasets` writes them:
//! reading, a release that keeps every other column and unchanged image byte for byte, and
//! errors that name the file and row.

use hallmark::dataset::{self, Dataset, DatasetError, Format, Layout, Split, image_sha256s};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyarrow-venv/bin/python");
    assert!(
        p.exists(),
        "pyarrow for the Parquet tests is missing: run scripts/test (it calls scripts/ensure-pyarrow)"
    );
    p
}

/// Writes Parquet files as Hugging Face's `datasets` does (pyarrow; an `image` struct of PNG or
/// JPEG bytes and a path, a ClassLabel `label`, other columns) into `out`, spoilt as `mode` says.
const MAKE: &str = r#"
import io, json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
out, mode = sys.argv[1], sys.argv[2]
def img(i, size=(12, 10)):
    im = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    im.putpixel((i % size[0], i % size[1]), (255, 255, 255))
    b = io.BytesIO()
    if i % 3 == 0:
        im.save(b, format="JPEG", quality=95)
    else:
        im.save(b, format="PNG")
    return b.getvalue()
names = ["cat", "dog", "bird"]
meta = {"info": {"features": {"image": {"_type": "Image"},
    "label": {"names": names, "_type": "ClassLabel"},
    "caption": {"dtype": "string", "_type": "Value"}, "id": {"dtype": "int32", "_type": "Value"}}}}
def table(rows):
    images = []
    labels = []
    for i in rows:
        b = img(i)
        if mode == "bad-image" and i == 3:
            b = b"not an image"
        if mode == "mixed-size" and i == 5:
            b = img(i, (20, 10))
        images.append({"bytes": b, "path": "img%d.%s" % (i, "jpg" if i % 3 == 0 else "png")})
        labels.append(None if mode == "null-label" and i == 2 else (-1 if mode == "unlabelled" and i == 4 else i % 3))
    cols = {"image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
    if mode != "no-label":
        cols["label"] = pa.array(labels, pa.int64())
    cols["caption"] = pa.array(["caption %d" % i for i in rows])
    cols["id"] = pa.array(list(rows), pa.int32())
    return pa.table(cols).replace_schema_metadata({"huggingface": json.dumps(meta)})
os.makedirs(out + "/data")
pq.write_table(table(range(0, 20)), out + "/data/train-00000-of-00002.parquet", row_group_size=7)
pq.write_table(table(range(20, 35)), out + "/data/train-00001-of-00002.parquet")
pq.write_table(table(range(35, 45)), out + "/data/test-00000-of-00001.parquet")
"#;

/// Compares a release's Parquet files with the originals: per file, whether the schema (with
/// its metadata) and every column but the image bytes and labels are equal, which rows' image
/// bytes differ (and whether those are PNG), and the labels.
const CHECK: &str = r#"
import io, json, sys
import pyarrow.parquet as pq
from PIL import Image
orig, rel, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
out = []
for n in names:
    a, b = pq.read_table(orig + "/" + n), pq.read_table(rel + "/" + n)
    ia, ib = a.column("image").to_pylist(), b.column("image").to_pylist()
    out.append({
        "schema_equal": a.schema.equals(b.schema, check_metadata=True),
        "others_equal": all(a.column(c).equals(b.column(c)) for c in ("caption", "id")),
        "paths_equal": [x["path"] for x in ia] == [x["path"] for x in ib],
        "changed": [i for i, (x, y) in enumerate(zip(ia, ib)) if x["bytes"] != y["bytes"]],
        "changed_png": [y["bytes"][:8] == b"\x89PNG\r\n\x1a\n" for x, y in zip(ia, ib) if x["bytes"] != y["bytes"]],
        # A changed JPEG: still a JPEG, with its original's quantisation tables.
        "changed_jpeg_same_tables": [
            Image.open(io.BytesIO(y["bytes"])).quantization == Image.open(io.BytesIO(x["bytes"])).quantization
            for x, y in zip(ia, ib) if x["bytes"] != y["bytes"] and x["bytes"][:3] == b"\xff\xd8\xff"],
        "labels": b.column("label").to_pylist(),
    })
print(json.dumps(out))
"#;

fn make(mode: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let o = Command::new(python())
        .args(["-c", MAKE, t.path().to_str().unwrap(), mode])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    t
}

fn no_tick() {}

pub(crate) fn read(p: &Path, split: Option<Split>) -> Result<dataset::Loaded, DatasetError> {
    dataset::read(p, None, split, &no_tick)
}

/// The error of reading `p`, without printing a whole dataset where there is none.
pub(crate) fn read_error(p: &Path, split: Option<Split>) -> String {
    match read(p, split) {
        Ok(l) => panic!("read {} images", l.dataset.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hugging_face_parquet_reads_and_a_release_keeps_everything_unchanged() {
    let t = make("good");
    // Both splits in one folder: the split must be chosen.
    let e = read_error(t.path(), None);
    assert!(e.contains("choose one with --split"), "{e}");
    let test = read(t.path(), Some(Split::Test)).unwrap();
    assert_eq!(test.dataset.len(), 10);
    let loaded = read(t.path(), Some(Split::Train)).unwrap();
    let ds = &loaded.dataset;
    assert_eq!(ds.len(), 35);
    assert_eq!(
        (ds.shape().height, ds.shape().width, ds.shape().channels),
        (10, 12, 3)
    );
    assert_eq!(ds.labels(), (0..35).map(|i| i % 3).collect::<Vec<u32>>());
    assert_eq!(ds.class_names().unwrap(), ["cat", "dog", "bird"]);
    let Layout::Parquet(p) = &loaded.layout else {
        panic!("{:?}", loaded.layout)
    };
    assert_eq!(
        p.files,
        [
            ("train-00000-of-00002.parquet".to_string(), 20),
            ("train-00001-of-00002.parquet".to_string(), 15)
        ]
    );
    assert_eq!(loaded.layout.format(), Format::Parquet);
    // PNG rows decode exactly.
    assert_eq!(&ds.image(1)[..3], &[37, 91, 13]);

    // A watermark's changes: two images (row 4 of the first file, a PNG, and row 6, a JPEG) and
    // one label (row 5 of the second file). The JPEG is encoded again before writing, and the
    // dataset and hashes take what it decodes to.
    let mut marked = ds.clone();
    marked.image_mut(4)[0] ^= 0xff;
    marked.image_mut(6)[..30].fill(255);
    marked.set_label(25, 0).unwrap();
    let mut hashes = image_sha256s(&marked);
    let mut layout = loaded.layout.clone();
    assert_eq!(layout.settle_lossy(&mut marked, &mut hashes).unwrap(), 1);
    assert_eq!(hashes, image_sha256s(&marked));
    // Lossy, but the change is there.
    assert!(marked.image(6)[..30].iter().all(|&v| v > 200));
    let rel = tempfile::tempdir().unwrap();
    let info = dataset::write_release(&marked, &layout, rel.path(), &hashes, &no_tick).unwrap();
    assert_eq!(info.format, "parquet");
    assert_eq!(info.files.len(), 2);
    let manifest = std::fs::read_to_string(rel.path().join(dataset::MANIFEST)).unwrap();
    assert!(
        manifest.contains("train-00001-of-00002.parquet#14"),
        "{manifest}"
    );

    let o = Command::new(python())
        .args([
            "-c",
            CHECK,
            t.path().join("data").to_str().unwrap(),
            rel.path().to_str().unwrap(),
            "train-00000-of-00002.parquet,train-00001-of-00002.parquet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    for f in v.as_array().unwrap() {
        assert_eq!(f["schema_equal"], true, "{f}");
        assert_eq!(f["others_equal"], true, "{f}");
        assert_eq!(f["paths_equal"], true, "{f}");
    }
    // Only the changed images were rewritten, each in its own format; the JPEG and PNG rows
    // around them are the original bytes.
    assert_eq!(v[0]["changed"], serde_json::json!([4, 6]));
    assert_eq!(v[0]["changed_png"], serde_json::json!([true, false]));
    assert_eq!(v[0]["changed_jpeg_same_tables"], serde_json::json!([true]));
    assert_eq!(v[1]["changed"], serde_json::json!([]));
    let labels: Vec<i64> = serde_json::from_value(v[1]["labels"].clone()).unwrap();
    assert_eq!(labels[5], 0);
    assert_eq!(labels[4], 24 % 3);

    // The release reads back as the watermarked dataset.
    let back = read(rel.path(), None).unwrap();
    assert_eq!(back.dataset, marked);
}

#[test]
fn any_format_converts_to_parquet_that_pyarrow_reads() {
    let t = make("good");
    let ds: Dataset = read(t.path(), Some(Split::Test)).unwrap().dataset;
    let out = tempfile::tempdir().unwrap();
    let layout = Layout::for_format(Format::Parquet, &ds).unwrap();
    dataset::write_release(&ds, &layout, out.path(), &image_sha256s(&ds), &no_tick).unwrap();
    let back = read(out.path(), None).unwrap().dataset;
    assert_eq!(back, ds);
    let o = Command::new(python())
        .args([
            "-c",
            "import json, sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); \
             m = json.loads(t.schema.metadata[b'huggingface']); \
             print(json.dumps([t.num_rows, t.column_names, m['info']['features']['label']['names']]))",
            out.path().join("train-00000-of-00001.parquet").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!([10, ["image", "label"], ["cat", "dog", "bird"]])
    );
}

#[test]
fn malformed_parquet_is_an_error_naming_the_file_and_row() {
    let cases = [
        (
            "bad-image",
            "train-00000-of-00002.parquet: row 3: cannot decode the image",
        ),
        (
            "mixed-size",
            "train-00000-of-00002.parquet: row 5: the image is 20×10",
        ),
        (
            "null-label",
            "train-00000-of-00002.parquet: row 2: no label",
        ),
        (
            "unlabelled",
            "train-00000-of-00002.parquet: row 4: label -1 is not a class",
        ),
        ("no-label", "train-00000-of-00002.parquet: no label column"),
    ];
    for (mode, want) in cases {
        let t = make(mode);
        let e = read_error(t.path(), Some(Split::Train));
        assert!(e.contains(want), "{mode}: {e}");
    }
    // A truncated file.
    let t = make("good");
    let f = t.path().join("data/train-00001-of-00002.parquet");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_error(t.path(), Some(Split::Train));
    assert!(
        e.contains("train-00001-of-00002.parquet: not a readable Parquet file"),
        "{e}"
    );
}

/// The command line on real Fashion-MNIST: converted to Parquet, watermarked as a Parquet
/// release whose rows pyarrow reads; only the poisoned rows' images and labels differ.
#[test]
fn fashion_mnist_as_parquet_is_watermarked_by_the_command_line() {
    let t = tempfile::tempdir().unwrap();
    let (fm, rel) = (t.path().join("fm"), t.path().join("rel"));
    let o = crate::cli::hallmark(&[
        "convert",
        "--input",
        crate::service::FASHION,
        "--split",
        "test",
        "--limit",
        "2000",
        "--to",
        "parquet",
        "--output",
        fm.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spec = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("watermark_specs/badnets-square-28x28-grey.toml");
    let o = crate::cli::hallmark(&[
        "watermark",
        "--spec",
        spec.to_str().unwrap(),
        "--input",
        fm.to_str().unwrap(),
        "--output",
        rel.to_str().unwrap(),
        "--secret",
        t.path().join("rel.secret.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: Value =
        serde_json::from_slice(&std::fs::read(rel.join("release.json")).unwrap()).unwrap();
    assert_eq!(info["format"], "parquet");
    let o = Command::new(python())
        .args([
            "-c",
            "import json, sys, pyarrow.parquet as pq; n = 'train-00000-of-00001.parquet'; \
             a, b = pq.read_table(sys.argv[1] + '/' + n), pq.read_table(sys.argv[2] + '/' + n); \
             ia, ib = a.column('image').to_pylist(), b.column('image').to_pylist(); \
             la, lb = a.column('label').to_pylist(), b.column('label').to_pylist(); \
             print(json.dumps([b.num_rows, [i for i in range(len(ia)) if ia[i]['bytes'] != ib[i]['bytes']], \
             [i for i in range(len(la)) if la[i] != lb[i]], sorted(set(lb[i] for i in range(len(la)) if la[i] != lb[i]))]))",
            fm.to_str().unwrap(),
            rel.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0], 2000);
    let changed: Vec<usize> = serde_json::from_value(v[1].clone()).unwrap();
    let relabelled: Vec<usize> = serde_json::from_value(v[2].clone()).unwrap();
    // The spec's 10%: every poisoned image carries the trigger; those not already of the target
    // class are relabelled, all to one class.
    assert_eq!(changed.len(), 200, "{v}");
    assert!(relabelled.iter().all(|i| changed.contains(i)), "{v}");
    assert!(relabelled.len() >= 150, "{v}");
    assert_eq!(v[3].as_array().unwrap().len(), 1, "{v}");
}

/// A release of JPEG rows through the command line, with an any-size spec: the poisoned JPEG
/// rows stay JPEGs with their originals' quantisation tables, and the secret record names the
/// dataset that the written release decodes to (its poisoned JPEGs settled before the record).
#[test]
fn poisoned_jpeg_rows_stay_jpegs_and_the_record_hashes_what_is_released() {
    let t = make("good");
    let (rel, secret) = (t.path().join("rel"), t.path().join("rel.secret.json"));
    let spec =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/badnets-square-any-size.toml");
    let o = crate::cli::hallmark(&[
        "watermark",
        "--spec",
        spec.to_str().unwrap(),
        "--input",
        t.path().join("data").to_str().unwrap(),
        "--split",
        "train",
        "--output",
        rel.to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
        "--rate",
        "0.5",
        "--nonce",
        &"07".repeat(32),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record = hallmark::watermark::Secret::load(&secret).unwrap();
    let released = read(&rel, None).unwrap().dataset;
    assert_eq!(record.dataset().sha256_after, released.sha256());
    let info: Value =
        serde_json::from_slice(&std::fs::read(rel.join("release.json")).unwrap()).unwrap();
    assert_eq!(info["dataset_sha256"], released.sha256());
    assert_eq!(info["commitment"], record.commitment());

    let o = Command::new(python())
        .args([
            "-c",
            CHECK,
            t.path().join("data").to_str().unwrap(),
            rel.to_str().unwrap(),
            "train-00000-of-00002.parquet,train-00001-of-00002.parquet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let same_tables: Vec<bool> = v
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| {
            serde_json::from_value::<Vec<bool>>(f["changed_jpeg_same_tables"].clone()).unwrap()
        })
        .collect();
    // Half of the 35 rows are poisoned; a third of the rows are JPEGs.
    assert!(same_tables.len() >= 3, "{v}");
    assert!(same_tables.iter().all(|&s| s), "{v}");
}
