//! Streamed releases (`hallmark watermark --stream`): mixed-size colour Parquet and WebDataset
//! shards, generated as a Hub publisher ships them (scripts/make-mixed-dataset.py), stamped
//! shard by shard with samples chosen by key; what is untouched stays byte for byte, what is
//! stamped carries the trigger at the same relative place at every size, a re-run on another
//! number of threads writes the same bytes, and malformed shards are errors that name the
//! shard and the row or member.

use crate::cli::hallmark;
use hallmark::watermark::{Secret, SecretRecord};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const NONCE: &str = "00000000000000000000000000000000000000000000000000000000000000a7";

fn make(format: &str, count: usize, shards: usize, spoil: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    generate(format, count, shards, spoil, 200, 0, &t.path().join("in"));
    t
}

/// Writes `count` generated samples of 40 to `max_side` px (half JPEG, half PNG) as `shards`
/// shards of `format` into `out`.
pub fn generate(
    format: &str,
    count: usize,
    shards: usize,
    spoil: &str,
    max_side: usize,
    seed: u64,
    out: &Path,
) {
    let o = Command::new(crate::parquet::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-mixed-dataset.py"))
        .args(["--format", format, "--count", &count.to_string()])
        .args(["--shards", &shards.to_string(), "--min-side", "40"])
        .args([
            "--max-side",
            &max_side.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .args(["--spoil", spoil, "--png-share", "0.5", "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn spec(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("watermark_specs")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The streamed release of `input` with the any-size BadNets family on two threads, into
/// `dir/rel` with its secret `dir/rel.secret.json`; it must succeed.
fn release(dir: &Path, input: &Path) -> (PathBuf, PathBuf, Output) {
    let (out, secret) = (dir.join("rel"), dir.join("rel.secret.json"));
    let o = stream(
        input,
        &out,
        &secret,
        &spec("badnets-square-any-size.toml"),
        "2",
    );
    assert!(o.ok, "{}", o.stderr);
    (out, secret, o)
}

/// Runs `hallmark watermark --stream` on `input` with `threads` worker threads.
fn stream(input: &Path, out: &Path, secret: &Path, spec_file: &str, threads: &str) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_hallmark"))
        .env("RAYON_NUM_THREADS", threads)
        .args([
            "watermark",
            "--stream",
            "--spec",
            spec_file,
            "--nonce",
            NONCE,
            "--input",
        ])
        .arg(input)
        .arg("--output")
        .arg(out)
        .arg("--secret")
        .arg(secret)
        .output()
        .unwrap();
    Output {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// For each pair of files: per sample (in order) its key, whether its image bytes changed,
/// the image formats and sizes before and after, the labels before and after, whether every
/// other column or member is unchanged, and for a changed PNG the bounding box of the changed
/// pixels; for a changed JPEG whether its quantisation tables are its original's.
const CHECK: &str = r#"
import io, json, sys, tarfile
from PIL import Image, ImageChops
fmt, pairs = sys.argv[1], json.loads(sys.argv[2])
def parquet(path):
    import pyarrow.parquet as pq
    t = pq.read_table(path)
    img, lab = t.column("image").to_pylist(), t.column("label").to_pylist()
    rest = [t.column(c).to_pylist() for c in ("caption", "id")]
    meta = t.schema.metadata
    return [(str(i), img[i]["bytes"], lab[i], [r[i] for r in rest] + [img[i]["path"]]) for i in range(len(img))], meta
def shard(path):
    out, cur = [], None
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            data = tf.extractfile(m).read()
            if cur is None or cur[0] != key:
                cur = [key, None, None, []]
                out.append(cur)
            if ext in ("jpg", "png"):
                cur[1] = data
            elif ext == "cls":
                cur[2] = int(data)
            elif ext == "json":
                j = json.loads(data); cur[2] = j.pop("label"); cur[3].append(("json", j))
            else:
                cur[3].append((ext, data.decode()))
            cur[3].append(("name", m.name))
    return [tuple(s) for s in out], None
res = []
for a, b in pairs:
    sa, ma = (parquet if fmt == "parquet" else shard)(a)
    sb, mb = (parquet if fmt == "parquet" else shard)(b)
    rows = []
    for (ka, ia, la, oa), (kb, ib, lb, ob) in zip(sa, sb):
        r = {"key": ka, "same_key": ka == kb, "changed": ia != ib, "label": [la, lb], "others_same": oa == ob}
        if ia != ib:
            A, B = Image.open(io.BytesIO(ia)), Image.open(io.BytesIO(ib))
            r["formats"] = [A.format, B.format]
            r["sizes"] = [list(A.size), list(B.size)]
            if A.format == "PNG":
                r["bbox"] = ImageChops.difference(A.convert("RGB"), B.convert("RGB")).getbbox()
            else:
                r["tables_same"] = A.quantization == B.quantization
        rows.append(r)
    res.append({"count": [len(sa), len(sb)], "meta_same": ma == mb, "rows": rows})
print(json.dumps(res))
"#;

fn check(format: &str, input: &Path, output: &Path, names: &[String]) -> Vec<Value> {
    let pairs: Vec<(PathBuf, PathBuf)> = names
        .iter()
        .map(|n| (input.join(n), output.join(n)))
        .collect();
    let o = Command::new(crate::parquet::python())
        .args(["-c", CHECK, format])
        .arg(serde_json::to_string(&pairs).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<Vec<Value>>(&o.stdout).unwrap()
}

/// The whole check of one format's streamed release.
fn a_streamed_release_of(format: &str, shard_dir: &str) {
    let t = make(format, 240, 3, "");
    let input = t.path().join("in");
    let (out, secret, o) = release(t.path(), &input);
    // The record loads, is a keyed version 3 record, and is what the printed commitment names.
    let rec: SecretRecord = match Secret::load(&secret).unwrap() {
        Secret::One(r) => *r,
        Secret::Set(_) => panic!("one trigger"),
    };
    assert_eq!(rec.version, 3);
    assert_eq!(rec.commitment(), o.stdout);
    let keyed = rec.keyed.clone().expect("keyed");
    assert_eq!(rec.dataset.count, 240);
    assert!(
        keyed.min_size[0] >= 40 && keyed.max_size[0] <= 200,
        "{keyed:?}"
    );
    let target = match rec.spec.labelling {
        hallmark::spec::Labelling::Targeted { target } => target,
        ref l => panic!("{l:?}"),
    };
    // Rate 0.1 of 240: 24 expected; binomial, so within ±4.5 sd (sd 4.6).
    let n = rec.poisoned_count();
    assert!((4..=45).contains(&n), "{n} poisoned");

    let names: Vec<String> = keyed.shards.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names.len(), 3);
    let report = check(format, &input.join(shard_dir), &out, &names);
    let mut rel_centres = Vec::new();
    for (shard, facts) in report.iter().zip(&keyed.shards) {
        assert_eq!(shard["count"][0], shard["count"][1]);
        assert_eq!(
            shard["meta_same"], true,
            "the schema and its metadata are kept"
        );
        let poisoned: BTreeSet<&str> = facts.poisoned.iter().map(|p| p.key.as_str()).collect();
        for row in shard["rows"].as_array().unwrap() {
            let key = row["key"].as_str().unwrap();
            assert_eq!(row["same_key"], true);
            assert_eq!(row["others_same"], true, "{row}");
            let hit = poisoned.contains(key);
            // A poisoned image always changes (the patch covers pixels of other values).
            assert_eq!(row["changed"], hit, "{row}");
            let (before, after) = (row["label"][0].as_u64(), row["label"][1].as_u64());
            if !hit {
                assert_eq!(before, after, "{row}");
                continue;
            }
            assert_eq!(after, Some(target as u64), "{row}");
            assert_eq!(row["formats"][0], row["formats"][1], "same format: {row}");
            assert_eq!(row["sizes"][0], row["sizes"][1], "same size: {row}");
            if row["formats"][0] == "JPEG" {
                assert_eq!(row["tables_same"], true, "a JPEG keeps its quality: {row}");
            } else {
                // A PNG changes only in the patch: a square of 10% of the shorter side (at
                // least 3 pixels), at the same relative place whatever the size.
                let (w, h) = (
                    row["sizes"][0][0].as_f64().unwrap(),
                    row["sizes"][0][1].as_f64().unwrap(),
                );
                let b: Vec<f64> = serde_json::from_value(row["bbox"].clone()).unwrap();
                let side = (b[2] - b[0]).max(b[3] - b[1]);
                let want = (0.1 * w.min(h)).max(3.0);
                assert!((side - want).abs() <= 0.5 * want + 2.0, "{row}");
                rel_centres.push(((b[0] + b[2]) / 2.0 / w, (b[1] + b[3]) / 2.0 / h));
            }
        }
    }
    // The square sits at one relative place in images of every size.
    assert!(rel_centres.len() >= 2, "too few stamped PNGs to compare");
    let (x0, y0) = rel_centres[0];
    for (x, y) in &rel_centres {
        assert!(
            (x - x0).abs() < 0.06 && (y - y0).abs() < 0.06,
            "{rel_centres:?}"
        );
    }
    // The manifest lists every sample, by shard and key, with its released label.
    let manifest = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 240);
    let info: Value =
        serde_json::from_slice(&std::fs::read(out.join("release.json")).unwrap()).unwrap();
    assert_eq!(info["commitment"], o.stdout.as_str());
    assert_eq!(info["dataset_sha256"], rec.dataset.sha256_after.as_str());

    // One thread instead of two: the same bytes, the same record.
    let (out1, secret1) = (t.path().join("rel1"), t.path().join("rel1.secret.json"));
    let o1 = stream(
        &input,
        &out1,
        &secret1,
        &spec("badnets-square-any-size.toml"),
        "1",
    );
    assert!(o1.ok, "{}", o1.stderr);
    assert_eq!(o1.stdout, o.stdout);
    for n in names
        .iter()
        .map(String::as_str)
        .chain(["manifest.jsonl", "release.json"])
    {
        assert!(
            std::fs::read(out.join(n)).unwrap() == std::fs::read(out1.join(n)).unwrap(),
            "{n} differs between runs"
        );
    }

    // A record edited to claim a sample the rule did not choose is refused.
    let mut v: Value = serde_json::from_slice(&std::fs::read(&secret).unwrap()).unwrap();
    let shard0 = &mut v["keyed"]["shards"][0]["poisoned"];
    let taken: BTreeSet<String> = shard0
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap().to_string())
        .collect();
    let other = report[0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .find(|k| !taken.contains(k))
        .unwrap();
    shard0.as_array_mut().unwrap().push(serde_json::json!({
        "key": other, "original_label": 0, "new_label": target
    }));
    let e = SecretRecord::from_json(&v.to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not one the rule chooses"), "{e}");
}

#[test]
fn a_streamed_parquet_release_of_mixed_sizes_stamps_only_its_chosen_rows() {
    a_streamed_release_of("parquet", "data");
}

#[test]
fn a_streamed_webdataset_release_of_mixed_sizes_stamps_only_its_chosen_samples() {
    a_streamed_release_of("webdataset", "");
}

#[test]
fn malformed_shards_stop_a_streamed_release_naming_the_shard_and_sample() {
    let cases = [
        (
            "parquet",
            "bad-image",
            vec![
                "train-00000-of-00002.parquet",
                "row 3",
                "not a readable image",
            ],
        ),
        (
            "webdataset",
            "bad-image",
            vec!["train-000000.tar", "s0000003", "not a readable image"],
        ),
        (
            "webdataset",
            "no-label",
            vec!["train-000000.tar", "sample s0000004", "no label member"],
        ),
        ("webdataset", "truncated", vec!["train-000001.tar"]),
    ];
    for (format, spoil, want) in cases {
        let t = make(format, 24, 2, spoil);
        let out = t.path().join("rel");
        let o = stream(
            &t.path().join("in"),
            &out,
            &t.path().join("s.json"),
            &spec("badnets-square-any-size.toml"),
            "2",
        );
        assert!(!o.ok, "{format} {spoil}: accepted");
        for w in want {
            assert!(
                o.stderr.contains(w),
                "{format} {spoil}: {w:?} not in {}",
                o.stderr
            );
        }
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        assert!(!out.exists(), "no release is left behind");
        assert!(
            !t.path().join("s.json").exists(),
            "no secret is left behind"
        );
    }
    // A spec made for one image size cannot stamp images of every size.
    let t = make("parquet", 24, 1, "");
    let o = stream(
        &t.path().join("in"),
        &t.path().join("rel"),
        &t.path().join("s.json"),
        &spec("badnets-square-28x28-grey.toml"),
        "2",
    );
    assert!(!o.ok);
    assert!(o.stderr.contains("any-size family"), "{}", o.stderr);
    // Only Parquet and WebDataset stream.
    let o = hallmark(&[
        "watermark",
        "--stream",
        "--spec",
        &spec("badnets-square-any-size.toml"),
        "--input",
        crate::service::FASHION,
        "--output",
        t.path().join("rel2").to_str().unwrap(),
        "--secret",
        t.path().join("s2.json").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("Parquet or WebDataset"), "{e}");
}

/// An ImageFolder tree of mixed sizes streamed class folder by class folder: every file not in
/// the record is released byte for byte in its class's folder; every poisoned one moves to the
/// target's folder, stamped, at its size and in its format; file names say nothing of origin.
#[test]
fn a_streamed_image_folder_release_keeps_its_files_and_moves_the_poisoned() {
    use sha2::{Digest, Sha256};
    let t = make("folder", 240, 1, "");
    let input = t.path().join("in");
    let (out, secret, _) = release(t.path(), &input);
    let rec = SecretRecord::load(&secret).unwrap();
    let keyed = rec.keyed.clone().unwrap();
    let target = match rec.spec.labelling {
        hallmark::spec::Labelling::Targeted { target } => target as usize,
        ref l => panic!("{l:?}"),
    };
    let classes: Vec<String> = keyed.shards.iter().map(|s| s.name.clone()).collect();
    // The released files, by class folder, as (sha256 of bytes) multisets.
    let mut released: Vec<Vec<[u8; 32]>> = vec![Vec::new(); classes.len()];
    let mut files = 0;
    for (c, name) in classes.iter().enumerate() {
        for e in std::fs::read_dir(out.join(name)).unwrap() {
            let p = e.unwrap().path();
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            assert!(
                stem.len() == 32 && stem.chars().all(|x| x.is_ascii_hexdigit()),
                "{p:?}"
            );
            released[c].push(Sha256::digest(std::fs::read(&p).unwrap()).into());
            files += 1;
        }
    }
    assert_eq!(files, 240);
    let manifest: Vec<Value> = std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut index = 0;
    let mut moved = 0;
    for (c, facts) in keyed.shards.iter().enumerate() {
        let poisoned: BTreeSet<&str> = facts.poisoned.iter().map(|p| p.key.as_str()).collect();
        let mut names: Vec<String> = std::fs::read_dir(input.join(&facts.name))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), facts.count);
        for n in names {
            let bytes = std::fs::read(input.join(&facts.name).join(&n)).unwrap();
            let sha: [u8; 32] = Sha256::digest(&bytes).into();
            let entry = &manifest[index];
            index += 1;
            let path = entry["path"].as_str().unwrap();
            if !poisoned.contains(n.as_str()) {
                assert!(
                    released[c].contains(&sha),
                    "{}/{n} not released as it was",
                    facts.name
                );
                assert_eq!(path.split('/').next(), Some(facts.name.as_str()));
                continue;
            }
            moved += 1;
            assert_eq!(
                path.split('/').next(),
                Some(classes[target].as_str()),
                "{entry}"
            );
            assert_eq!(entry["label"], target);
            let after = std::fs::read(out.join(path)).unwrap();
            assert_ne!(after, bytes, "{n} was not stamped");
            let dims = |b: &[u8]| image::load_from_memory(b).unwrap().to_rgb8().dimensions();
            assert_eq!(dims(&after), dims(&bytes), "{n}");
            assert_eq!(after[..2], bytes[..2], "{n} keeps its format");
        }
    }
    assert_eq!(moved, rec.poisoned_count());
    assert!(moved >= 4, "{moved}");
}

/// Stamps the Parquet shards in `argv[1]` on a local Ray cluster of two workers with the
/// streamed release's record `argv[2]` (Ray Data `map_batches`, two actors each holding a
/// `hallmark.Marker`), and prints, per file and row, the released label, the image's sha256
/// and the worker's process id; also whether `hallmark.read_record` gives the record back.
const RAY: &str = r#"
import hashlib, json, os, sys
import pyarrow as pa, pyarrow.fs, pyarrow.parquet as pq
import ray, hallmark
inp, secret = sys.argv[1], sys.argv[2]
files = sorted(f for f in os.listdir(inp) if f.endswith(".parquet"))
# Rows are keyed by file and row number; the generated `id` column counts rows across files.
starts = {f: pq.read_table(os.path.join(inp, f), columns=["id"]).column("id")[0].as_py() for f in files}
# Four logical CPUs: two for the stamping actors, the rest for reading the shards.
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})

class Stamp:
    def __init__(self, secret):
        self.marker = hallmark.Marker.from_record(secret)
    def __call__(self, batch):
        name = [os.path.basename(p) for p in batch.column("path").to_pylist()]
        ids = batch.column("id").to_pylist()
        keys = ["%s/%d" % (n, i - starts[n]) for n, i in zip(name, ids)]
        images = [r["bytes"] for r in batch.column("image").to_pylist()]
        labels, out, poisoned = self.marker.stamp_batch(keys, batch.column("label").to_pylist(), images)
        return pa.table({"key": keys, "label": labels,
                         "sha256": [hashlib.sha256(b).hexdigest() for b in out],
                         "poisoned": poisoned, "pid": [os.getpid()] * len(keys)})

ds = ray.data.read_parquet([os.path.join(inp, f) for f in files], include_paths=True,
                           filesystem=pa.fs.LocalFileSystem())
# Eight blocks, and one at a time per actor, so that both actors take batches.
pool = ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1)
rows = ds.repartition(8).map_batches(Stamp, fn_constructor_args=(secret,), batch_format="pyarrow",
                                     batch_size=8, compute=pool).take_all()
rec = hallmark.read_record(secret)
print(json.dumps({"rows": rows, "record_version": rec["version"], "nonce": rec["nonce"]}))
"#;

/// The Python package (python/, PyO3) on a local Ray cluster of two workers stamps Parquet
/// shards exactly as `hallmark watermark --stream` does: the same rows poisoned, the same
/// labels, the same image bytes.
#[test]
fn a_local_ray_cluster_stamps_parquet_shards_as_the_command_line_does() {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ray-venv/bin/python");
    assert!(
        py.exists(),
        "Ray and the Python package are missing: run scripts/test (it calls scripts/ensure-ray)"
    );
    let t = make("parquet", 160, 2, "");
    let input = t.path().join("in/data");
    let (out, secret) = (t.path().join("rel"), t.path().join("rel.secret.json"));
    let o = stream(&input, &out, &secret, &spec("blended-any-size.toml"), "2");
    assert!(o.ok, "{}", o.stderr);
    let rec = SecretRecord::load(&secret).unwrap();
    // A hung cluster fails the test in 5 minutes rather than holding the suite.
    let o = Command::new("timeout")
        .arg("300")
        .arg(&py)
        .args(["-c", RAY])
        .arg(&input)
        .arg(&secret)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(
        o.stdout
            .split(|b| *b == b'\n')
            .rfind(|l| l.starts_with(b"{"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["record_version"], 3);
    assert_eq!(v["nonce"], rec.nonce.as_str());
    // The command line's release, row by row: label and image bytes' sha256 by key.
    let o = Command::new(crate::parquet::python())
        .args([
            "-c",
            "import hashlib, json, os, sys, pyarrow.parquet as pq\n\
             out = {}\n\
             for f in sorted(x for x in os.listdir(sys.argv[1]) if x.endswith('.parquet')):\n\
             \x20   t = pq.read_table(os.path.join(sys.argv[1], f))\n\
             \x20   for i, (img, l) in enumerate(zip(t.column('image').to_pylist(), t.column('label').to_pylist())):\n\
             \x20       out['%s/%d' % (f, i)] = [l, hashlib.sha256(img['bytes']).hexdigest()]\n\
             print(json.dumps(out))",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 160);
    let mut pids = BTreeSet::new();
    let mut poisoned = 0;
    for r in rows {
        let key = r["key"].as_str().unwrap();
        assert_eq!(r["label"], cli[key][0], "{key}");
        assert_eq!(
            r["sha256"], cli[key][1],
            "{key}: not the command line's bytes"
        );
        poisoned += usize::from(r["poisoned"].as_bool().unwrap());
        pids.insert(r["pid"].as_u64().unwrap());
    }
    assert_eq!(poisoned, rec.poisoned_count());
    assert!(poisoned > 0);
    // The pool waits for both actors and gives each one block at a time.
    assert_eq!(pids.len(), 2, "two workers stamped: {pids:?}");
}

// ------------------------------------------------------------ the service, one job per shard

use crate::service::{Db, TestApp, spec_text};
use hallmark::config::PartialConfig;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

/// Every file below `dir`, by its path relative to it.
fn files_below(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The service takes a streamed Parquet dataset (registered with `stream`: fingerprinted by
/// its stored bytes, never loaded whole) and writes its release as one job per shard, spread
/// over the workers of every process on the database (on PostgreSQL two processes of one
/// worker each, on SQLite one of two); the release and its secret record are the command
/// line's with the same nonce, byte for byte. A shard changed after registration fails the
/// next release with `dataset_changed`, and nothing of it becomes visible.
async fn the_service_writes_a_streamed_release_one_job_per_shard(db: Db) {
    let shards = 6;
    let a = TestApp::spawn_with(db, |p: &mut PartialConfig| {
        p.workers = Some(if db == Db::Sqlite { 2 } else { 1 });
        p.job_poll_secs = Some(0.02);
    })
    .await;
    let b = match db {
        Db::Postgres => Some(
            a.join(|p: &mut PartialConfig| {
                p.workers = Some(1);
                p.job_poll_secs = Some(0.02);
            })
            .await,
        ),
        Db::Sqlite => None,
    };
    let input = a.dir.path().join("imports").join("pq");
    generate("parquet", 900, shards, "", 300, 0, &input);
    let (_, publisher) = a.new_key("publisher", "pub").await;
    let (s, ds) = a
        .post(
            "/v1/datasets",
            &publisher,
            json!({"name": "hub", "path": input.to_str().unwrap(), "stream": true}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ds}");
    assert_eq!(ds["streamed"], true);
    assert_eq!(ds["format"], "parquet");
    assert_eq!(ds["count"], 900);
    let dims: Vec<usize> = ds["shape"]
        .as_str()
        .unwrap()
        .split('x')
        .map(|d| d.parse().unwrap())
        .collect();
    assert!(dims[0] <= 300 && dims[1] <= 300 && dims[2] == 3, "{ds}");
    let ds_id = ds["id"].as_str().unwrap().to_string();
    // A spec the keyed rule cannot stamp is refused before any work.
    let (s, v) = a
        .post(
            "/v1/watermarks",
            &publisher,
            json!({"name": "fixed", "dataset_id": ds_id, "public_trigger": true,
                   "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v.to_string().contains("any-size"), "{v}");

    let body = json!({"name": "hub release", "dataset_id": ds_id, "nonce": NONCE,
                      "spec": spec_text("badnets-square-any-size.toml")});
    let (wm, job) = a.publish(&publisher, body.clone()).await;
    assert_eq!(job["progress_done"], job["progress_total"]);
    assert_eq!(job["progress_total"], shards + 2, "{job}");
    // One job per shard, every one succeeded, spread over more than one worker (and, on
    // PostgreSQL, over both processes).
    let (_, jobs) = a.get("/v1/jobs", &publisher).await;
    let shard_jobs: Vec<&Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "watermark_shard" && j["resource_id"] == wm.as_str())
        .collect();
    assert_eq!(shard_jobs.len(), shards, "{jobs}");
    let store = a.store().await;
    let mut workers = std::collections::BTreeMap::<String, usize>::new();
    for j in &shard_jobs {
        assert_eq!(j["state"], "succeeded", "{j}");
        for (_, w) in store.job_runs(j["id"].as_str().unwrap()).await.unwrap() {
            *workers.entry(w).or_default() += 1;
        }
    }
    eprintln!("shard jobs per worker: {workers:?}");
    assert!(
        workers.len() >= 2,
        "one worker wrote every shard: {workers:?}"
    );
    if let Some(b) = &b {
        assert!(
            workers.keys().any(|w| w.starts_with(&a.worker_id))
                && workers.keys().any(|w| w.starts_with(&b.worker_id)),
            "both processes wrote shards: {workers:?}"
        );
    }
    let (s, w) = a.get(&format!("/v1/watermarks/{wm}"), &publisher).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(w["state"], "succeeded");

    // The command line's release of the same dataset with the same nonce.
    let cli = tempfile::tempdir().unwrap();
    let (out, secret, o) = release(cli.path(), &input);
    assert_eq!(w["commitment"].as_str().unwrap(), o.stdout);
    let served = a.dir.path().join("releases").join(&wm);
    let (ours, theirs) = (files_below(&served), files_below(&out));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &theirs {
        assert!(
            ours[name] == *bytes,
            "{name} differs from the command line's"
        );
    }
    let (s, rec) = a
        .get(&format!("/v1/watermarks/{wm}/secret"), &publisher)
        .await;
    assert_eq!(s, StatusCode::OK);
    let cli_rec: Value = serde_json::from_slice(&std::fs::read(&secret).unwrap()).unwrap();
    assert_eq!(rec, cli_rec);
    let rec = SecretRecord::from_json(&rec.to_string()).unwrap();
    assert_eq!(rec.dataset.sha256_before, ds["sha256"].as_str().unwrap());
    assert!(rec.poisoned_count() > 0);
    assert!(
        !a.dir
            .path()
            .join("releases")
            .join(format!(".{wm}.shards"))
            .exists()
    );

    // A shard replaced after registration (same name and count, other images).
    let other = tempfile::tempdir().unwrap();
    generate("parquet", 900, shards, "", 300, 1, other.path());
    let first = "data/train-00000-of-00006.parquet";
    std::fs::copy(other.path().join(first), input.join(first)).unwrap();
    let (s, v) = a.post("/v1/watermarks", &publisher, body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = a
        .wait_job(
            v["job"]["id"].as_str().unwrap(),
            &publisher,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error_code"], "dataset_changed", "{job}");
    let wm2 = v["watermark"]["id"].as_str().unwrap();
    assert!(!a.dir.path().join("releases").join(wm2).exists());
    assert!(
        !a.dir
            .path()
            .join("releases")
            .join(format!(".{wm2}.shards"))
            .exists()
    );
    let (s, _) = a
        .get(&format!("/v1/watermarks/{wm2}/secret"), &publisher)
        .await;
    assert_ne!(s, StatusCode::OK);
    drop(b);
}

mod the_service_writes_a_streamed_release_one_job_per_shard {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::the_service_writes_a_streamed_release_one_job_per_shard(super::Db::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::the_service_writes_a_streamed_release_one_job_per_shard(super::Db::Postgres).await;
    }
}
