//! WebDataset shards, written by Python's tarfile as `webdataset`'s writers do: reading, a
//! release that keeps every member but the changed ones byte for byte, and errors that name the
//! shard and sample.

use crate::parquet::{python, read, read_error};
use hallmark::dataset::{self, Format, Layout, Split, image_sha256s};
use serde_json::Value;
use std::process::Command;

/// Shards `train-000000.tar` (12 samples), `train-000001.tar` (8) and `test-000000.tar` (5):
/// each sample a JPEG, PNG or WebP image, a `.cls` or `.json` label and a `.txt` member, spoilt
/// as `mode` says.
const MAKE: &str = r#"
import io, json, os, sys, tarfile
from PIL import Image
out, mode = sys.argv[1], sys.argv[2]
def img(i, size=(9, 7)):
    im = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    im.putpixel((i % size[0], i % size[1]), (255, 255, 255))
    b = io.BytesIO()
    fmt = ["JPEG", "PNG", "WEBP"][i % 3]
    im.save(b, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return b.getvalue(), ["jpg", "png", "webp"][i % 3]
def add(t, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1700000000
    t.addfile(ti, io.BytesIO(data))
def shard(name, rows):
    with tarfile.open(out + "/" + name, "w", format=tarfile.GNU_FORMAT) as t:
        late = []
        for i in rows:
            key = "s%04d" % i
            data, ext = img(i, (12, 7) if mode == "mixed-size" and i == 5 else (9, 7))
            if mode == "bad-image" and i == 3:
                data = b"not an image"
            add(t, key + "." + ext, data)
            if mode == "no-label" and i == 4:
                pass
            elif i % 2 == 0:
                add(t, key + ".cls", str(i % 3).encode())
            else:
                add(t, key + ".json", json.dumps({"label": i % 3, "caption": "sample %d" % i}).encode())
            txt = ("text %d" % i).encode()
            if mode == "split-members" and i == 2:
                late.append((key + ".txt", txt))
            else:
                add(t, key + ".txt", txt)
        for n, d in late:
            add(t, n, d)
os.makedirs(out)
shard("train-000000.tar", range(0, 12))
shard("train-000001.tar", range(12, 20))
shard("test-000000.tar", range(20, 25))
"#;

/// Per shard of a release and its original: member names in order and which members' bytes
/// differ, with the changed members' first bytes.
const CHECK: &str = r#"
import json, sys, tarfile
orig, rel = sys.argv[1], sys.argv[2]
out = []
for n in sys.argv[3].split(","):
    a, b = tarfile.open(orig + "/" + n), tarfile.open(rel + "/" + n)
    ma, mb = a.getmembers(), b.getmembers()
    da = {m.name: a.extractfile(m).read() for m in ma}
    db = {m.name: b.extractfile(m).read() for m in mb}
    out.append({
        "names_equal": [m.name for m in ma] == [m.name for m in mb],
        "mtimes_equal": [m.mtime for m in ma] == [m.mtime for m in mb],
        "changed": {k: db[k][:8].hex() if not k.endswith(".json") else json.loads(db[k]) for k in da if da[k] != db.get(k)},
    })
print(json.dumps(out))
"#;

fn make(mode: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let o = Command::new(python())
        .args(["-c", MAKE, t.path().join("wds").to_str().unwrap(), mode])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    t
}

fn no_tick() {}

#[test]
fn shards_read_and_a_release_keeps_every_unchanged_member() {
    let t = make("good");
    let wds = t.path().join("wds");
    assert!(read_error(&wds, None).contains("choose one with --split"));
    assert_eq!(read(&wds, Some(Split::Test)).unwrap().dataset.len(), 5);
    // One shard alone is detected by its tar header.
    let one = read(&wds.join("train-000001.tar"), None).unwrap();
    assert_eq!(one.layout.format(), Format::WebDataset);
    assert_eq!(one.dataset.len(), 8);
    let loaded = read(&wds, Some(Split::Train)).unwrap();
    let ds = &loaded.dataset;
    assert_eq!(ds.len(), 20);
    assert_eq!(
        (ds.shape().height, ds.shape().width, ds.shape().channels),
        (7, 9, 3)
    );
    assert_eq!(ds.labels(), (0..20).map(|i| i % 3).collect::<Vec<u32>>());
    // PNG and lossless WebP rows decode exactly.
    assert_eq!(&ds.image(1)[..3], &[37, 91, 13]);
    assert_eq!(&ds.image(2)[..3], &[74, 182, 26]);
    let Layout::WebDataset(l) = &loaded.layout else {
        panic!("{:?}", loaded.layout.format())
    };
    assert_eq!(
        l.shards,
        [
            ("train-000000.tar".to_string(), 12),
            ("train-000001.tar".to_string(), 8)
        ]
    );

    // A watermark's changes: the images of s0001 (a PNG) and s0003 (a JPEG, encoded again as a
    // JPEG before writing), the label of s0013 (a .json) and of s0014 (a .cls).
    let mut marked = ds.clone();
    marked.image_mut(1)[0] ^= 0xff;
    marked.image_mut(3)[..21].fill(255);
    marked.set_label(13, 2).unwrap();
    marked.set_label(14, 0).unwrap();
    let mut hashes = image_sha256s(&marked);
    let mut layout = loaded.layout.clone();
    assert_eq!(layout.settle_lossy(&mut marked, &mut hashes).unwrap(), 1);
    assert_eq!(hashes, image_sha256s(&marked));
    let rel = tempfile::tempdir().unwrap();
    let info = dataset::write_release(&marked, &layout, rel.path(), &hashes, &no_tick).unwrap();
    assert_eq!(info.format, "webdataset");
    let o = Command::new(python())
        .args([
            "-c",
            CHECK,
            wds.to_str().unwrap(),
            rel.path().to_str().unwrap(),
            "train-000000.tar,train-000001.tar",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    for s in v.as_array().unwrap() {
        assert_eq!(s["names_equal"], true, "{s}");
        assert_eq!(s["mtimes_equal"], true, "{s}");
    }
    // The PNG stays a PNG, the JPEG a JPEG, under their own names.
    let changed = v[0]["changed"].as_object().unwrap();
    assert_eq!(
        changed.keys().collect::<Vec<_>>(),
        ["s0001.png", "s0003.jpg"]
    );
    assert_eq!(changed["s0001.png"], "89504e470d0a1a0a");
    assert!(
        changed["s0003.jpg"].as_str().unwrap().starts_with("ffd8ff"),
        "{changed:?}"
    );
    assert_eq!(
        v[1]["changed"],
        serde_json::json!({"s0013.json": {"label": 2, "caption": "sample 13"}, "s0014.cls": "30"})
    );
    let back = read(rel.path(), None).unwrap();
    assert_eq!(back.dataset, marked);

    // From another format: shards of PNG and .cls members that read back the same.
    let out = tempfile::tempdir().unwrap();
    let layout = Layout::for_format(Format::WebDataset, ds).unwrap();
    dataset::write_release(ds, &layout, out.path(), &image_sha256s(ds), &no_tick).unwrap();
    assert_eq!(read(out.path(), None).unwrap().dataset, *ds);
}

#[test]
fn malformed_shards_are_errors_naming_the_shard_and_sample() {
    let cases = [
        (
            "bad-image",
            "train-000000.tar: s0003.jpg: cannot decode the image",
        ),
        (
            "mixed-size",
            "train-000000.tar: s0005.webp: the image is 12×7",
        ),
        (
            "no-label",
            "train-000000.tar: sample s0004: no label member",
        ),
        (
            "split-members",
            "train-000000.tar: the members of sample s0002 are not together",
        ),
    ];
    for (mode, want) in cases {
        let t = make(mode);
        let e = read_error(&t.path().join("wds"), Some(Split::Train));
        assert!(e.contains(want), "{mode}: {e}");
    }
    let t = make("good");
    let f = t.path().join("wds/train-000001.tar");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 3]).unwrap();
    let e = read_error(&t.path().join("wds"), Some(Split::Train));
    assert!(e.contains("train-000001.tar"), "{e}");
}
