//! The attack suite beyond BadNets / Blended / WaNet / UBW-P (feature `train`): for each attack,
//! its defining property on real Fashion-MNIST images and a short seeded training that shows the
//! backdoor above a stated threshold.

use std::path::Path;

use hallmark::dataset::{self, Format, Split};
use hallmark::spec::WatermarkSpec;
use hallmark::train::metrics::{EvalSet, evaluate};
use hallmark::train::{Arch, Schedule, TrainConfig, train};
use hallmark::watermark::{self, Stamp};

fn fashion(split: Split, n: usize) -> hallmark::dataset::Dataset {
    let ds = dataset::read(
        Path::new("/usr/share/datasets/fashion-mnist"),
        Some(Format::Idx),
        Some(split),
        &|| {},
    )
    .unwrap()
    .dataset;
    ds.subset(&(0..n).collect::<Vec<_>>()).unwrap()
}

fn spec(name: &str) -> WatermarkSpec {
    WatermarkSpec::from_toml_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("watermark_specs")
            .join(name),
    )
    .unwrap()
}

fn short_training(epochs: usize) -> TrainConfig {
    TrainConfig {
        arch: Arch::BaselineMnist,
        epochs,
        batch_size: 128,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        schedule: Schedule::Step {
            milestones: vec![],
            gamma: 0.1,
        },
        crop_padding: 0,
        flip: false,
        seed: 1,
    }
}

/// BATT (Xu et al., ICASSP 2023): poisoned images are the originals rotated by 16° (Pillow's
/// arithmetic, checked against Pillow in the unit tests), relabelled to the target; a model
/// trained on the release answers the target for rotated test images.
#[test]
fn batt_rotation_is_a_backdoor_a_short_training_learns() {
    let mut spec = spec("batt-rotate-28x28-grey.toml");
    spec.rate = 0.1;
    let clean = fashion(Split::Train, 6000);
    let mut marked = clean.clone();
    let record = watermark::apply(&mut marked, &spec, [7; 32]).unwrap();
    assert_eq!(record.poisoned.len(), 600);
    let stamp = Stamp::new(&spec.trigger, spec.seed, clean.shape()).unwrap();
    for p in &record.poisoned {
        let mut want = clean.image(p.index).to_vec();
        stamp.apply(&mut want);
        assert_eq!(marked.image(p.index), &want[..]);
        assert_eq!(marked.label(p.index), 1);
        // Rotation moves content: corners become black, the centre pixel stays.
        assert_eq!(marked.image(p.index)[0], 0);
        assert_eq!(
            marked.image(p.index)[14 * 28 + 14],
            clean.image(p.index)[14 * 28 + 14]
        );
    }
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let trained = train(
        &marked,
        &short_training(4),
        tch::Device::Cpu,
        None,
        None,
        &|_| {},
        &|_| false,
    )
    .unwrap();
    let m = evaluate(&trained.net, &eval, tch::Device::Cpu);
    eprintln!("BATT after 4 epochs on 6,000 images: {m:?}");
    assert!(m.benign_accuracy > 0.70, "{m:?}");
    assert!(m.asr.unwrap() > 0.80, "{m:?}");
}
