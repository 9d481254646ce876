//! The real Fashion-MNIST training set (Debian's dataset-fashion-mnist, installed by the test
//! command), watermarked in full with the BadNets spec.

use super::cli::{hallmark, spec_path};
use hallmark::dataset::{self, Format, Split};
use hallmark::watermark::SecretRecord;
use std::path::Path;

const FM: &str = "/usr/share/datasets/fashion-mnist";

#[test]
fn the_full_training_set_is_watermarked_exactly() {
    assert!(
        Path::new(FM).join("train-images-idx3-ubyte.gz").exists(),
        "Fashion-MNIST is missing: run scripts/test, which installs dataset-fashion-mnist"
    );
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("release");
    let secret = t.path().join("secret.json");
    let o = hallmark(&[
        "watermark",
        "--spec",
        &spec_path("fixed/badnets-28x28-grey.toml"),
        "--input",
        FM,
        "--split",
        "train",
        "--output",
        out.to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
        "--public-trigger",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let commitment = String::from_utf8(o.stdout).unwrap().trim().to_string();

    let original = dataset::read(Path::new(FM), Some(Format::Idx), Some(Split::Train), &|| {})
        .unwrap()
        .dataset;
    let release = dataset::read(&out, None, None, &|| {}).unwrap();
    let marked = release.dataset;
    let record = SecretRecord::load(&secret).unwrap();
    assert_eq!(record.commitment(), commitment);
    assert_eq!((original.len(), marked.len()), (60_000, 60_000));
    assert_eq!(record.poisoned.len(), 6_000);
    assert_eq!(record.dataset.sha256_before, original.sha256());
    assert_eq!(record.dataset.sha256_after, marked.sha256());

    // BackdoorBox's MNIST default: pixel (-2, -2) = 255 with weight 1, target 1.
    let trigger_at = 26 * 28 + 26;
    let mut is_poisoned = vec![false; 60_000];
    for p in &record.poisoned {
        is_poisoned[p.index] = true;
        assert_eq!(p.original_label, original.label(p.index));
        assert_eq!((p.new_label, marked.label(p.index)), (1, 1));
        let (a, b) = (original.image(p.index), marked.image(p.index));
        assert_eq!(b[trigger_at], 255);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if i != trigger_at {
                assert_eq!(x, y, "sample {} pixel {i} changed", p.index);
            }
        }
    }
    for i in (0..60_000).filter(|&i| !is_poisoned[i]) {
        assert_eq!(
            original.image(i),
            marked.image(i),
            "untouched sample {i} differs"
        );
        assert_eq!(original.label(i), marked.label(i));
    }
    let m = dataset::read_manifest(&out.join("manifest.jsonl")).unwrap();
    assert_eq!(m.len(), 60_000);
    assert_eq!(m[record.poisoned[0].index].label, 1);
}
