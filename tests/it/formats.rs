//! Round trips through every format, and clear errors for malformed input.

use hallmark::dataset::{
    self, Dataset, DatasetError, Format, ImageShape, Layout, Split, image_sha256s,
};
use proptest::prelude::*;
use std::fs;
use std::path::Path;

fn no_tick() {}

fn write(ds: &Dataset, layout: &Layout, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    dataset::write_release(ds, layout, dir, &image_sha256s(ds), &no_tick).unwrap();
}

fn read(p: &Path, f: Option<Format>) -> Result<dataset::Loaded, DatasetError> {
    dataset::read(p, f, None, &no_tick)
}

fn arb_dataset(shape: ImageShape, max_classes: u32) -> impl Strategy<Value = Dataset> {
    (1usize..24, 1u32..=max_classes).prop_flat_map(move |(n, k)| {
        (
            proptest::collection::vec(any::<u8>(), n * shape.len()),
            proptest::collection::vec(0..k, n),
        )
            .prop_map(move |(pixels, labels)| {
                let k = labels.iter().max().map_or(1, |m| *m as usize + 1);
                Dataset::new(shape, pixels, labels, k).unwrap()
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn idx_round_trips_raw_and_gzipped(ds in arb_dataset(ImageShape { height: 5, width: 7, channels: 1 }, 10), gzip in any::<bool>()) {
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::Idx { images: "x-images-idx3-ubyte".into(), labels: "x-labels-idx1-ubyte".into(), gzip };
        write(&ds, &layout, t.path());
        let back = read(t.path(), None).unwrap();
        prop_assert_eq!(back.dataset, ds);
        prop_assert_eq!(back.layout, layout);
    }

    #[test]
    fn idx_keeps_rgb_images(ds in arb_dataset(ImageShape { height: 3, width: 2, channels: 3 }, 4)) {
        let t = tempfile::tempdir().unwrap();
        write(&ds, &Layout::for_format(Format::Idx, &ds).unwrap(), t.path());
        prop_assert_eq!(read(t.path(), Some(Format::Idx)).unwrap().dataset, ds);
    }

    #[test]
    fn cifar_round_trips(ds in arb_dataset(ImageShape { height: 32, width: 32, channels: 3 }, 10)) {
        let t = tempfile::tempdir().unwrap();
        let layout = Layout::for_format(Format::Cifar10, &ds).unwrap();
        write(&ds, &layout, t.path());
        let back = read(t.path(), None).unwrap();
        prop_assert_eq!(back.dataset.pixels(), ds.pixels());
        prop_assert_eq!(back.dataset.labels(), ds.labels());
    }

    #[test]
    fn folders_round_trip_as_the_same_multiset(ds in arb_dataset(ImageShape { height: 4, width: 6, channels: 3 }, 5), grey in any::<bool>()) {
        let ds = if grey {
            let s = ImageShape { channels: 1, ..ds.shape() };
            let px: Vec<u8> = ds.pixels().chunks(3).map(|c| c[0]).collect();
            Dataset::new(s, px, ds.labels().to_vec(), ds.num_classes()).unwrap()
        } else { ds };
        // A grey-looking RGB image would come back grey; make every RGB image colourful.
        let ds = if !grey {
            let mut px = ds.pixels().to_vec();
            for img in px.chunks_mut(ds.shape().len()) { img[0] = 1; img[1] = 2; }
            Dataset::new(ds.shape(), px, ds.labels().to_vec(), ds.num_classes()).unwrap()
        } else { ds };
        let t = tempfile::tempdir().unwrap();
        write(&ds, &Layout::Folder(Default::default()), t.path());
        // A release reads back with its manifest (and release.json) beside the class folders,
        // with the format given or detected.
        fs::write(t.path().join("release.json"), b"{}").unwrap();
        let back = read(t.path(), Some(Format::Folder)).unwrap().dataset;
        prop_assert_eq!(read(t.path(), None).unwrap().dataset.sha256(), back.sha256());
        prop_assert_eq!(back.shape(), ds.shape());
        prop_assert_eq!(back.len(), ds.len());
        // Every class folder exists even when empty of images only if used; compare content.
        prop_assert_eq!(back.sha256(), ds.sha256());
    }
}

#[test]
fn cifar100_keeps_coarse_and_fine_labels_through_a_release() {
    let shape = ImageShape {
        height: 32,
        width: 32,
        channels: 3,
    };
    let ds = Dataset::new(shape, vec![9; 3 * 3072], vec![0, 57, 99], 100)
        .unwrap()
        .with_coarse_labels(vec![1, 19, 0])
        .unwrap();
    let t = tempfile::tempdir().unwrap();
    write(
        &ds,
        &Layout::for_format(Format::Cifar100, &ds).unwrap(),
        t.path(),
    );
    let back = read(&t.path().join("train.bin"), Some(Format::Cifar100))
        .unwrap()
        .dataset;
    assert_eq!(back.coarse_labels(), Some(&[1, 19, 0][..]));
    assert_eq!(back.labels(), &[0, 57, 99]);
}

#[test]
fn the_manifest_lists_every_sample_with_its_hash() {
    let shape = ImageShape {
        height: 2,
        width: 2,
        channels: 1,
    };
    let ds = Dataset::new(shape, (0..12).collect(), vec![0, 1, 2], 3).unwrap();
    let t = tempfile::tempdir().unwrap();
    write(
        &ds,
        &Layout::for_format(Format::Idx, &ds).unwrap(),
        t.path(),
    );
    let m = dataset::read_manifest(&t.path().join("manifest.jsonl")).unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m[1].path, "train-images-idx3-ubyte#1");
    assert_eq!(m[1].label, 1);
    assert_eq!(
        m[1].sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest([4u8, 5, 6, 7]))
    );
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn idx_pair(dir: &Path, images: Vec<u8>, labels: Vec<u8>) {
    fs::write(dir.join("train-images-idx3-ubyte"), images).unwrap();
    fs::write(dir.join("train-labels-idx1-ubyte"), labels).unwrap();
}

fn error_text(dir: &Path, f: Option<Format>) -> String {
    read(dir, f).unwrap_err().to_string()
}

#[test]
fn malformed_idx_files_are_named_with_what_is_wrong() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let good_labels = idx_bytes(&[2], &[0, 1]);
    let mut wrong_magic = idx_bytes(&[2, 2, 2], &[0; 8]);
    wrong_magic[0] = 7;
    idx_pair(d, wrong_magic, good_labels.clone());
    let e = error_text(d, Some(Format::Idx));
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("wrong magic"),
        "{e}"
    );

    idx_pair(d, idx_bytes(&[2, 2, 2], &[0; 7]), good_labels.clone());
    let e = error_text(d, None);
    assert!(
        e.contains("truncated") && e.contains("need 8 data bytes") && e.contains("found 7"),
        "{e}"
    );

    idx_pair(d, idx_bytes(&[2, 2, 2], &[0; 9]), good_labels.clone());
    assert!(error_text(d, None).contains("1 trailing bytes"));

    idx_pair(d, idx_bytes(&[3, 2, 2], &[0; 12]), good_labels.clone());
    let e = error_text(d, None);
    assert!(
        e.contains("train-labels-idx1-ubyte") && e.contains("2 labels for 3 images"),
        "{e}"
    );

    idx_pair(d, idx_bytes(&[8], &[0; 8]), good_labels.clone());
    assert!(error_text(d, None).contains("images need dimensions"));

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &idx_bytes(&[2, 2, 2], &[0; 8])).unwrap();
    let mut gz = gz.finish().unwrap();
    gz.truncate(gz.len() - 6);
    fs::remove_file(d.join("train-images-idx3-ubyte")).unwrap();
    fs::write(d.join("train-images-idx3-ubyte.gz"), gz).unwrap();
    let e = error_text(d, None);
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("gzip"),
        "{e}"
    );
}

#[test]
fn a_missing_labels_file_or_an_ambiguous_split_is_explained() {
    let t = tempfile::tempdir().unwrap();
    fs::write(
        t.path().join("train-images-idx3-ubyte"),
        idx_bytes(&[1, 1, 1], &[0]),
    )
    .unwrap();
    assert!(error_text(t.path(), None).contains("no labels file"));
    fs::write(
        t.path().join("train-labels-idx1-ubyte"),
        idx_bytes(&[1], &[0]),
    )
    .unwrap();
    fs::write(
        t.path().join("t10k-images-idx3-ubyte"),
        idx_bytes(&[1, 1, 1], &[0]),
    )
    .unwrap();
    fs::write(
        t.path().join("t10k-labels-idx1-ubyte"),
        idx_bytes(&[1], &[0]),
    )
    .unwrap();
    assert!(error_text(t.path(), None).contains("--split"));
    let test = dataset::read(t.path(), None, Some(Split::Test), &no_tick).unwrap();
    assert_eq!(test.dataset.len(), 1);
}

#[test]
fn malformed_cifar_batches_are_named() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("data_batch_1.bin"), vec![0u8; 3073 + 100]).unwrap();
    let e = error_text(t.path(), Some(Format::Cifar10));
    assert!(
        e.contains("data_batch_1.bin") && e.contains("truncated record 1"),
        "{e}"
    );
    let mut rec = vec![0u8; 3073];
    rec[0] = 12;
    fs::write(t.path().join("data_batch_1.bin"), rec).unwrap();
    assert!(error_text(t.path(), Some(Format::Cifar10)).contains("label 12"));
}

#[test]
fn broken_image_folders_are_explained() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fs::create_dir_all(d.join("a")).unwrap();
    fs::create_dir_all(d.join("b")).unwrap();
    image::GrayImage::new(4, 4).save(d.join("a/1.png")).unwrap();
    image::GrayImage::new(5, 4).save(d.join("b/2.png")).unwrap();
    let e = error_text(d, Some(Format::Folder));
    assert!(
        e.contains("b/2.png") && e.contains("5×4") && e.contains("same size"),
        "{e}"
    );

    image::GrayImage::new(4, 4).save(d.join("b/2.png")).unwrap();
    fs::write(d.join("b/3.png"), b"not a png").unwrap();
    let e = error_text(d, Some(Format::Folder));
    assert!(e.contains("b/3.png") && e.contains("decode"), "{e}");

    fs::write(d.join("b/3.png"), b"").unwrap();
    fs::rename(d.join("b/3.png"), d.join("b/notes.txt")).unwrap();
    assert!(error_text(d, Some(Format::Folder)).contains("not an image file"));

    fs::remove_file(d.join("b/notes.txt")).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))
        .save(d.join("b/3.jpg"))
        .unwrap();
    let ds = read(d, Some(Format::Folder)).unwrap().dataset;
    assert_eq!((ds.shape().channels, ds.len(), ds.num_classes()), (3, 3, 2));
    assert_eq!(
        ds.class_names().unwrap(),
        &["a".to_string(), "b".to_string()]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The same property as the fuzz targets (fuzz/), on every test run: arbitrary bytes are an
    /// error or a consistent array, never a panic.
    #[test]
    fn binary_parsers_never_panic_on_arbitrary_bytes(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), gz in any::<bool>()) {
        use hallmark::dataset::{cifar, idx};
        if gz && bytes.len() > 2 { bytes[0] = 0x1f; bytes[1] = 0x8b; }
        if let Ok(b) = idx::maybe_gunzip(bytes.clone()) && let Ok(a) = idx::parse(b) {
            prop_assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
        }
        // IDX-looking prefixes reach the size checks.
        let mut idxish = vec![0, 0, 8, (bytes.len() % 4) as u8];
        idxish.extend_from_slice(&bytes);
        let _ = idx::parse(idxish);
        let _ = cifar::parse(&bytes, cifar::Variant::Cifar10);
        let _ = cifar::parse(&bytes, cifar::Variant::Cifar100);
        let _ = hallmark::watermark::SecretRecord::from_json(&String::from_utf8_lossy(&bytes));
    }
}

/// An ImageFolder of JPEGs (two qualities) and PNGs, watermarked through the command line: every
/// unchanged file is in the release byte for byte, every poisoned JPEG is a JPEG again at its
/// original's quality, and the record hashes what the release decodes to.
#[test]
fn an_image_folder_release_keeps_its_files_and_its_jpegs() {
    use image::ImageEncoder;
    use sha2::{Digest, Sha256};
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let mut originals = Vec::new();
    for i in 0..24u32 {
        let class = data.join(format!("c{}", i % 3));
        fs::create_dir_all(&class).unwrap();
        let pixels: Vec<u8> = (0..40 * 48 * 3)
            .map(|k| ((k as u32 * 7 + i * 31) % 251) as u8)
            .collect();
        let mut bytes = Vec::new();
        let name = if i % 4 == 3 {
            image::codecs::png::PngEncoder::new(&mut bytes)
                .write_image(&pixels, 48, 40, image::ExtendedColorType::Rgb8)
                .unwrap();
            format!("{i:02}.png")
        } else {
            let q = if i % 2 == 0 { 90 } else { 60 };
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, q)
                .write_image(&pixels, 48, 40, image::ExtendedColorType::Rgb8)
                .unwrap();
            format!("{i:02}.jpg")
        };
        fs::write(class.join(&name), &bytes).unwrap();
        originals.push(bytes);
    }
    let (rel, secret) = (t.path().join("rel"), t.path().join("rel.secret.json"));
    let spec =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/badnets-square-any-size.toml");
    let o = crate::cli::hallmark(&[
        "watermark",
        "--spec",
        spec.to_str().unwrap(),
        "--input",
        data.to_str().unwrap(),
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
    // The release's files, by the sha256 of their bytes.
    let mut files = Vec::new();
    for class in fs::read_dir(&rel).unwrap().flatten() {
        if class.path().is_dir() {
            for f in fs::read_dir(class.path()).unwrap().flatten() {
                files.push(fs::read(f.path()).unwrap());
            }
        }
    }
    assert_eq!(files.len(), originals.len());
    let digest = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
    let released_digests: std::collections::HashSet<[u8; 32]> =
        files.iter().map(|b| digest(b)).collect();
    let kept = originals
        .iter()
        .filter(|b| released_digests.contains(&digest(b)))
        .count();
    let poisoned = record.poisoned_count();
    assert!(poisoned >= 6, "{poisoned} poisoned");
    assert_eq!(kept, originals.len() - poisoned, "unchanged files copied");
    // Every changed file keeps its original's encoding: JPEGs at 90 or 60, PNGs as PNG.
    let original_digests: std::collections::HashSet<[u8; 32]> =
        originals.iter().map(|b| digest(b)).collect();
    let changed: Vec<&Vec<u8>> = files
        .iter()
        .filter(|b| !original_digests.contains(&digest(b)))
        .collect();
    assert_eq!(changed.len(), poisoned);
    let jpegs = changed
        .iter()
        .filter_map(|b| hallmark::dataset::encoding::jpeg_quality(b))
        .collect::<Vec<_>>();
    assert!(!jpegs.is_empty());
    assert!(jpegs.iter().all(|q| *q == 90 || *q == 60), "{jpegs:?}");
    let pngs = changed.iter().filter(|b| b.starts_with(b"\x89PNG")).count();
    assert_eq!(jpegs.len() + pngs, poisoned);
}
