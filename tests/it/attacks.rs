//! The attack suite beyond BadNets / Blended / WaNet / UBW-P (feature `train`): for each attack,
//! its defining property on real Fashion-MNIST images and a short seeded training that shows the
//! backdoor above a stated threshold.

use std::path::Path;

use hallmark::dataset::Split;
use hallmark::spec::WatermarkSpec;
use hallmark::train::metrics::{EvalSet, evaluate};
use hallmark::train::{Arch, Schedule, TrainConfig, train};
use hallmark::watermark::{self, Stamp};

use crate::train::fashion;

fn spec(name: &str) -> WatermarkSpec {
    WatermarkSpec::from_toml_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("watermark_specs/fixed")
            .join(name),
    )
    .unwrap()
}

/// Trains BaselineMNISTNetwork on `data` for `epochs` with [`short_training`].
fn fit(data: &hallmark::dataset::Dataset, epochs: usize) -> hallmark::train::Trained {
    train(
        data,
        &short_training(epochs),
        tch::Device::Cpu,
        None,
        None,
        &|_| {},
        &|_| false,
    )
    .unwrap()
}

/// The training seed: 1, or `HALLMARK_TEST_SEED` where margins are measured over seeds
/// (docs/testing.md); the tests' thresholds hold for each seed measured there.
fn training_seed() -> u64 {
    std::env::var("HALLMARK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
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
        seed: training_seed(),
        // A linear warm-up over the first epoch: at lr 0.05 without it, a network without
        // batch norm sometimes diverged in its first steps on one CPU path and not another.
        warmup_epochs: 1,
        defence: Default::default(),
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
    let trained = fit(&marked, 4);
    let m = evaluate(&trained.net, &eval, tch::Device::Cpu);
    eprintln!("BATT after 4 epochs on 6,000 images: {m:?}");
    assert!(m.benign_accuracy > 0.70, "{m:?}");
    assert!(m.asr.unwrap() > 0.80, "{m:?}");
}

/// Label-consistent (Turner et al., 2019): only target-class images change, labels are kept,
/// every change outside the trigger stays within eps = 8, PGD did move the images, and the same
/// model and seed craft the same release; without a model the spec is refused rather than
/// applied half-way.
#[test]
fn label_consistent_poisons_stay_within_eps_and_keep_their_labels() {
    let spec = spec("label-consistent-28x28-grey.toml");
    let clean = fashion(Split::Train, 6000);
    let e = watermark::apply(&mut clean.clone(), &spec, [1; 32]).unwrap_err();
    assert!(e.to_string().contains("--craft-model"), "{e}");
    let benign = fit(&clean, 3);
    let mut marked = clean.clone();
    let wm = hallmark::train::craft::label_consistent(
        &mut marked,
        &spec,
        [1; 32],
        &benign.net,
        spec.adversarial.unwrap(),
        tch::Device::Cpu,
    )
    .unwrap();
    let record = wm.record;
    assert_eq!(record.poisoned.len(), 300);
    assert_eq!(marked.labels(), clean.labels(), "labels are kept");
    let chosen: std::collections::HashSet<usize> =
        record.poisoned.iter().map(|p| p.index).collect();
    let mut moved = 0u64;
    let mut total = 0u64;
    for i in 0..clean.len() {
        let (a, b) = (clean.image(i), marked.image(i));
        if !chosen.contains(&i) {
            assert_eq!(a, b, "sample {i} was not chosen but changed");
            continue;
        }
        assert_eq!(clean.label(i), 2, "only the target class is poisoned");
        for r in 0..28 {
            for c in 0..28 {
                let (x, y) = (a[r * 28 + c], b[r * 28 + c]);
                if r >= 25 && c >= 25 {
                    assert_eq!(y, 255, "the 3×3 white trigger");
                } else {
                    let d = (i32::from(x) - i32::from(y)).abs();
                    assert!(d <= 8, "sample {i} pixel ({r}, {c}) moved by {d}");
                    moved += u64::from(d > 0);
                    total += 1;
                }
            }
        }
    }
    let share = moved as f64 / total as f64;
    eprintln!("label-consistent: {share:.3} of the pixels perturbed");
    assert!(share > 0.2, "PGD changed only {share:.3} of the pixels");
    // The record reproduces: the same benign model and seed craft the same release.
    let mut again = clean.clone();
    let wm2 = hallmark::train::craft::label_consistent(
        &mut again,
        &spec,
        [1; 32],
        &benign.net,
        spec.adversarial.unwrap(),
        tch::Device::Cpu,
    )
    .unwrap();
    assert_eq!(wm2.record.commitment(), record.commitment());
    // Whether a short training learns the trigger is not asserted: after 4 epochs the ASR ranged
    // from below a benign model's (0.071 against 0.094) to 0.067 against 0.024 between CPU paths
    // and seeds (the attack is slow: BackdoorBox issue #113 reports about 25% after full
    // training); calibration measures it on fully trained models.
}

/// Adaptive-Patch (Qi et al., ICLR 2023): each poisoned and cover sample carries exactly
/// `per_sample` of the pieces and nothing else changes; cover samples keep their labels; queries
/// carry every piece. Cover samples make it slow to learn (ASR 0.03 after 4 epochs here): after 10
/// epochs the combined trigger works.
#[test]
fn adaptive_patch_marks_pieces_keeps_cover_labels_and_is_learnt() {
    let mut spec = spec("adaptive-patch-28x28-grey.toml");
    spec.rate = 0.1;
    let cover_rate: f64 = 0.05;
    let clean = fashion(Split::Train, 6000);
    let mut marked = clean.clone();
    let record = watermark::apply(&mut marked, &spec, [3; 32]).unwrap();
    assert_eq!(record.poisoned.len(), 600);
    assert_eq!(
        record.noise_indices.len(),
        (cover_rate * 6000.0).round() as usize,
        "cover samples"
    );
    // The four 3×3 corner regions of the pieces.
    let corners = [(0, 0), (0, 25), (25, 0), (25, 25)];
    let piece_of = |r: usize, c: usize| {
        corners
            .iter()
            .position(|&(r0, c0)| (r0..r0 + 3).contains(&r) && (c0..c0 + 3).contains(&c))
    };
    let poisoned: std::collections::HashSet<usize> =
        record.poisoned.iter().map(|p| p.index).collect();
    let cover: std::collections::HashSet<usize> = record.noise_indices.iter().copied().collect();
    let mut pieces_seen = 0usize;
    for i in 0..clean.len() {
        let (a, b) = (clean.image(i), marked.image(i));
        if !poisoned.contains(&i) && !cover.contains(&i) {
            assert_eq!(a, b, "sample {i} changed");
            assert_eq!(marked.label(i), clean.label(i));
            continue;
        }
        let mut touched = [false; 4];
        for px in 0..784 {
            if a[px] != b[px] {
                let k = piece_of(px / 28, px % 28).unwrap_or_else(|| {
                    panic!("sample {i}: pixel {px} outside every piece changed")
                });
                touched[k] = true;
            }
        }
        let n = touched.iter().filter(|t| **t).count();
        assert!(n <= 2, "sample {i} carries {n} pieces");
        pieces_seen += n;
        let want = if cover.contains(&i) {
            clean.label(i)
        } else {
            1
        };
        assert_eq!(marked.label(i), want, "sample {i}");
    }
    let stamped = poisoned.len() + cover.len();
    assert!(
        pieces_seen > 2 * stamped * 9 / 10,
        "most samples show two pieces: {pieces_seen}"
    );
    // A query carries all four pieces at full weight.
    let stamp = Stamp::new(&spec.trigger, spec.seed, clean.shape()).unwrap();
    let mut q = vec![0u8; 784];
    stamp.apply(&mut q);
    for &(r0, c0) in &corners {
        assert!(
            (0..3).any(|d| q[(r0 + d) * 28 + c0 + d] == 255),
            "piece at ({r0}, {c0})"
        );
    }
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let trained = fit(&marked, 10);
    let m = evaluate(&trained.net, &eval, tch::Device::Cpu);
    eprintln!("Adaptive-Patch after 10 epochs on 6,000 images: {m:?}");
    assert!(m.benign_accuracy > 0.70, "{m:?}");
    assert!(m.asr.unwrap() > 0.5, "{m:?}");
}

/// A gradient-matching spec shrunk for a test: fewer steps, sources and retraining epochs.
fn quick_matching(name: &str) -> WatermarkSpec {
    let mut spec = spec(name);
    spec.rate = 0.02;
    let g = spec.gradient_matching.as_mut().unwrap();
    g.iterations = 24;
    g.retrain_every = 12;
    g.retrain_epochs = 1;
    g.sources = 200;
    spec
}

/// Crafts `spec` on `clean` against `benign`; returns the release, its record and the passenger
/// losses of every step.
fn craft_matching(
    clean: &hallmark::dataset::Dataset,
    spec: &WatermarkSpec,
    benign: &hallmark::train::Trained,
) -> (
    hallmark::dataset::Dataset,
    watermark::SecretRecord,
    Vec<f64>,
) {
    let mut marked = clean.clone();
    let losses = std::sync::Mutex::new(Vec::new());
    let surrogate = hallmark::train::craft::Surrogate {
        net: &benign.net,
        vs: &benign.vs,
        retrain: Some(short_training(1)),
    };
    let wm = hallmark::train::craft::craft(
        &mut marked,
        spec,
        [3; 32],
        &surrogate,
        tch::Device::Cpu,
        &|_, _, loss| losses.lock().unwrap().push(loss),
    )
    .unwrap();
    (marked, wm.record, losses.into_inner().unwrap())
}

/// Checks what every gradient-matching release must be: labels kept, only poison-class images
/// chosen, nothing else changed, every change within eps, and no trigger on the poisons.
fn check_matching_release(
    clean: &hallmark::dataset::Dataset,
    marked: &hallmark::dataset::Dataset,
    record: &watermark::SecretRecord,
    poison_class: u32,
) {
    assert_eq!(marked.labels(), clean.labels(), "labels are kept");
    let chosen: std::collections::HashSet<usize> =
        record.poisoned.iter().map(|p| p.index).collect();
    assert_eq!(chosen.len(), 60);
    let mut moved = 0usize;
    for i in 0..clean.len() {
        let (a, b) = (clean.image(i), marked.image(i));
        if !chosen.contains(&i) {
            assert_eq!(a, b, "sample {i} was not chosen but changed");
            continue;
        }
        assert_eq!(clean.label(i), poison_class, "only the poison class");
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            let d = (i32::from(*x) - i32::from(*y)).abs();
            assert!(d <= 16, "sample {i} pixel {k} moved by {d} > eps 16");
            moved += usize::from(d > 0);
        }
    }
    let share = moved as f64 / (chosen.len() * 784) as f64;
    assert!(share > 0.3, "only {share:.3} of the poisons' pixels moved");
}

/// UBW-C (Li et al., NeurIPS 2022): clean-label poisons of the poison class, perturbed within
/// 16/255 by gradient matching with the entropy objective; crafting lowers the matching loss.
#[test]
fn ubw_c_crafts_clean_label_poisons_within_eps() {
    let spec = quick_matching("ubw-c-28x28-grey.toml");
    let clean = fashion(Split::Train, 3000);
    let benign = fit(&clean, 2);
    let (marked, record, losses) = craft_matching(&clean, &spec, &benign);
    check_matching_release(&clean, &marked, &record, 6);
    assert_eq!(losses.len(), 24, "one progress report per step");
    // Steps 1-12 match the benign surrogate's gradient: the alignment improves.
    eprintln!("UBW-C passenger loss by step: {losses:.4?}");
    assert!(
        losses[11] < losses[0] - 0.02,
        "gradient matching did not improve: {losses:?}"
    );
    // Reproducibility (same model and seed, same bytes) is a unit test of the crafting, where
    // libtorch runs alone and float sums cannot change with other tests' thread teams.
    // The verifier and metrics read the spec as untargeted, on the source class only.
    let eval = EvalSet::new(fashion(Split::Test, 1000), Some(&record)).unwrap();
    let m = evaluate(&benign.net, &eval, tch::Device::Cpu);
    assert!(m.asr.is_none() && m.asr_a.is_some(), "{m:?}");
}

/// Refool (Liu et al., ECCV 2020): every poisoned image carries a reflection of one of the
/// user's photographs, drawn per image; the secret record alone (without the photo folder)
/// recreates each triggered image byte for byte, and a short training learns the backdoor.
#[test]
fn refool_reflections_are_sample_specific_and_learned() {
    let mut spec = spec("refool-28x28-grey.toml");
    spec.rate = 0.1;
    let clean = fashion(Split::Train, 6000);
    let mut marked = clean.clone();
    let record = watermark::apply(&mut marked, &spec, [5; 32]).unwrap();
    assert_eq!(record.poisoned.len(), 600);
    // The record's JSON form stands alone: its spec no longer needs the folder.
    let mut json = serde_json::to_value(&record.spec).unwrap();
    json["trigger"].as_object_mut().unwrap().remove("images");
    let restored = WatermarkSpec::from_json_value(json).unwrap();
    let stamp = Stamp::new(&restored.trigger, restored.seed, clean.shape()).unwrap();
    let mut changed = 0usize;
    let mut residuals = std::collections::HashSet::new();
    for p in &record.poisoned {
        let mut want = clean.image(p.index).to_vec();
        stamp.apply(&mut want);
        assert_eq!(marked.image(p.index), &want[..], "sample {}", p.index);
        assert_eq!(marked.label(p.index), 1);
        changed += clean
            .image(p.index)
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        // The reflection differs between images: the same stamp on a black image shows it.
        let mut black = vec![0u8; 784];
        black[0] = (p.index % 251) as u8;
        stamp.apply(&mut black);
        residuals.insert(black[1..].to_vec());
    }
    let share = changed as f64 / (600.0 * 784.0);
    eprintln!(
        "refool: {share:.3} of the poisoned pixels changed, {} distinct reflections over 600 black images",
        residuals.len()
    );
    assert!(
        share > 0.5,
        "reflections changed only {share:.3} of the pixels"
    );
    assert!(
        residuals.len() > 10,
        "the reflection is not sample-specific"
    );
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let trained = fit(&marked, 4);
    let m = evaluate(&trained.net, &eval, tch::Device::Cpu);
    eprintln!("refool after 4 epochs on 6,000 images: {m:?}");
    assert!(m.benign_accuracy > 0.70, "{m:?}");
    assert!(m.asr.unwrap() > 0.5, "{m:?}");
}

/// Trains `cfg` on `data` with a malicious procedure.
fn train_with(
    data: &hallmark::dataset::Dataset,
    cfg: &TrainConfig,
    attack: &hallmark::train::Attack,
) -> hallmark::train::Trained {
    hallmark::train::train_attacked(
        &hallmark::train::Run::new(data, cfg, tch::Device::Cpu),
        attack,
    )
    .unwrap()
}

/// PhysicalBA (Li et al., ICLR-W 2021): a BadNets release whose poisoned samples are trained
/// through physical-world transformations (brightness, contrast, shift, zoom) gives a backdoor
/// that answers triggered queries seen through the same transformations, where a plainly
/// trained BadNets model mostly does not.
#[test]
fn physical_ba_backdoor_survives_transformed_queries() {
    let mut spec = spec("badnets-28x28-grey.toml");
    spec.rate = 0.1;
    let clean = fashion(Split::Train, 6000);
    let mut marked = clean.clone();
    let record = watermark::apply(&mut marked, &spec, [9; 32]).unwrap();
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let mut poisoned = vec![false; marked.len()];
    record
        .poisoned
        .iter()
        .for_each(|p| poisoned[p.index] = true);
    let physical = train_with(
        &marked,
        &short_training(4),
        &hallmark::train::Attack::PhysicalBa { poisoned },
    );
    let plain = fit(&marked, 4);
    let m = evaluate(&physical.net, &eval, tch::Device::Cpu);
    let p = evaluate(&plain.net, &eval, tch::Device::Cpu);
    // Triggered non-target test images seen through the physical transformations.
    let test = &eval.test;
    let keep: Vec<usize> = (0..test.len()).filter(|&i| test.label(i) != 1).collect();
    let mut triggered = test.subset(&keep).unwrap();
    let stamp = Stamp::new(&spec.trigger, spec.seed, test.shape()).unwrap();
    for i in 0..triggered.len() {
        stamp.apply(triggered.image_mut(i));
    }
    let x = hallmark::train::tensor::to_tensor(
        &triggered,
        &(0..triggered.len()).collect::<Vec<_>>(),
        tch::Device::Cpu,
    );
    let x = hallmark::train::attack::physical(
        &x,
        &mut hallmark::watermark::rng::Rng::new(1, hallmark::watermark::rng::Stream::Selection),
    );
    let asr_t = |net: &hallmark::train::Net| {
        let pred = tch::no_grad(|| net.forward_t(&x, false).argmax(1, false));
        f64::try_from(pred.eq(1).to_kind(tch::Kind::Float).mean(tch::Kind::Float)).unwrap()
    };
    let (tp, tb) = (asr_t(&physical.net), asr_t(&plain.net));
    eprintln!(
        "PhysicalBA after 4 epochs on 6,000 images: {m:?}, ASR on transformed queries {tp:.3}; plain BadNets: {p:?}, {tb:.3}"
    );
    assert!(m.benign_accuracy > 0.65, "{m:?}");
    assert!(
        tp > 0.6 && tp > tb + 0.3,
        "PhysicalBA {tp}, plain BadNets {tb}"
    );
}

/// Blind backdoor (Bagdasaryan & Shmatikov, USENIX Security 2021): the data stays clean, the
/// loss carries the backdoor task; a short training learns both tasks. With the Neural Cleanse
/// evasion task (BackdoorBox's default), which fights the backdoor whenever the reverse-engineered
/// trigger comes close to the real one, the backdoor is learnt more slowly but still is.
#[test]
fn blind_backdoor_is_learned_from_clean_data() {
    let spec = spec("badnets-28x28-grey.toml");
    let clean = fashion(Split::Train, 6000);
    let mut scratch = clean.clone();
    let record = watermark::apply(&mut scratch, &spec, [9; 32]).unwrap();
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let before = clean.sha256();
    let mut figures = vec![];
    // A model trained without the backdoor task answers this trigger for about 0.015 of the
    // images; after 4 epochs the backdoor's ASR was 0.34 to 0.93 without the evasion task and
    // 0.46 to 0.66 with it, between CPU paths and seeds, and benign accuracy down to 0.53 (avx2).
    for (neural_cleanse, min_asr) in [(false, 0.15), (true, 0.15)] {
        let attack = hallmark::train::Attack::Blind {
            stamp: Stamp::new(&spec.trigger, spec.seed, clean.shape()).unwrap(),
            target: spec.labelling.target().unwrap(),
            neural_cleanse,
        };
        let blind = train_with(&clean, &short_training(4), &attack);
        assert_eq!(clean.sha256(), before, "the training data is not touched");
        let m = evaluate(&blind.net, &eval, tch::Device::Cpu);
        eprintln!(
            "Blind (Neural Cleanse evasion {neural_cleanse}) after 4 epochs on 6,000 clean images: {m:?}"
        );
        figures.push((m, min_asr));
    }
    // Without the evasion task both tasks are learnt on every path seen. With it, the backdoor
    // is, but one run under avx2 collapsed to answering the target for every image (benign
    // accuracy 0.10; at lr 0.02 instead the plain run fell to 0.37): its benign accuracy is
    // not asserted.
    for ((m, min_asr), neural_cleanse) in figures.into_iter().zip([false, true]) {
        if !neural_cleanse {
            assert!(m.benign_accuracy > 0.4, "{m:?}");
        }
        assert!(m.asr.unwrap() > min_asr, "{m:?}");
    }
}

/// Sleeper Agent (Souri et al., NeurIPS 2022): the same gradient matching with a targeted
/// objective; poisons of the target class keep their labels and stay within 16/255.
#[test]
fn sleeper_agent_crafts_clean_label_poisons_within_eps() {
    let spec = quick_matching("sleeper-agent-28x28-grey.toml");
    let clean = fashion(Split::Train, 3000);
    let benign = fit(&clean, 2);
    let (marked, record, losses) = craft_matching(&clean, &spec, &benign);
    check_matching_release(&clean, &marked, &record, 6);
    eprintln!("Sleeper Agent passenger loss by step: {losses:.4?}");
    assert!(losses[11] < losses[0] - 0.02, "{losses:?}");
    let eval = EvalSet::new(fashion(Split::Test, 1000), Some(&record)).unwrap();
    let m = evaluate(&benign.net, &eval, tch::Device::Cpu);
    assert!(m.asr.is_some(), "targeted: ASR on the source class");
}

/// TUAP (Zhao et al., CVPR 2020): the trigger is a universal perturbation within eps that sends
/// most images to the target on the benign model it was computed against; clean-label poisons
/// are exactly x + v (clipped), the record keeps v, and the perturbation is universal: a model
/// that never saw it sends many perturbed held-out images to the target.
#[test]
fn tuap_perturbation_is_universal_bounded_and_kept_in_the_record() {
    let spec = spec("tuap-28x28-grey.toml");
    let clean = fashion(Split::Train, 6000);
    let benign = fit(&clean, 3);
    let surrogate = hallmark::train::craft::Surrogate {
        net: &benign.net,
        vs: &benign.vs,
        retrain: None,
    };
    let mut marked = clean.clone();
    let record = hallmark::train::craft::craft(
        &mut marked,
        &spec,
        [4; 32],
        &surrogate,
        tch::Device::Cpu,
        &|_, _, _| {},
    )
    .unwrap()
    .record;
    let hallmark::spec::Trigger::Perturbation(p) = &record.spec.trigger else {
        panic!("the record keeps the crafted perturbation");
    };
    assert_eq!(p.values.len(), 784);
    assert!(p.values.iter().all(|v| v.abs() <= 76), "within eps 76.5");
    assert!(p.values.iter().filter(|v| **v != 0).count() > 300);
    assert_eq!(marked.labels(), clean.labels(), "labels are kept");
    assert_eq!(record.poisoned.len(), 300);
    for q in &record.poisoned {
        assert_eq!(clean.label(q.index), 2);
        let want: Vec<u8> = clean
            .image(q.index)
            .iter()
            .zip(&p.values)
            .map(|(&x, &v)| (i16::from(x) + v).clamp(0, 255) as u8)
            .collect();
        assert_eq!(marked.image(q.index), &want[..]);
    }
    assert!(
        p.controls.is_empty(),
        "a fixed spec has no family to draw controls from"
    );
    // A release of the family carries its rank test's controls: for control j, the member the
    // family draws with the verifier's control seed j, crafted the same way (within eps, towards
    // its own target), each its own perturbation.
    let mut family = WatermarkSpec::from_toml_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/tuap-28x28-grey.toml"),
    )
    .unwrap();
    // 3 controls here (99 by default; each crafting takes as long as the secret's, and the
    // family is crafted twice below).
    family.uap.as_mut().unwrap().controls = 3;
    let craft_family = |nonce: [u8; 32]| {
        let mut d = clean.clone();
        hallmark::train::craft::craft(
            &mut d,
            &family,
            nonce,
            &surrogate,
            tch::Device::Cpu,
            &|_, _, _| {},
        )
        .unwrap()
        .record
    };
    let released = craft_family([4; 32]);
    let hallmark::spec::Trigger::Perturbation(p) = &released.spec.trigger else {
        panic!("the record keeps the crafted perturbation");
    };
    let shape = clean.shape();
    assert_eq!(p.controls.len(), 3);
    let mut distinct = std::collections::HashSet::new();
    for (j, c) in p.controls.iter().enumerate() {
        let seed = hallmark::spec::family::control_seed(&[4; 32], j);
        let member = hallmark::spec::family::draw(&family, 10, shape, seed).unwrap();
        assert_eq!(Some(c.target), member.labelling.target(), "control {j}");
        let v = c.perturbation().unwrap();
        assert_eq!(v.len(), 784);
        assert!(v.iter().all(|x| x.abs() <= 76), "control {j} within eps");
        assert!(
            v.iter().filter(|x| **x != 0).count() > 300,
            "control {j} crafted"
        );
        distinct.insert(v);
    }
    distinct.insert(p.values.clone());
    assert_eq!(distinct.len(), 4, "the secret and its controls differ");
    // Its crafting seed is the release's own: another nonce, another seed and perturbation.
    let other = craft_family([5; 32]);
    assert_ne!(released.spec.seed, other.spec.seed);
    assert_ne!(released.spec.trigger, other.spec.trigger);
    // Universal: on held-out images the benign model sends many perturbed images to the target.
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let base = evaluate(&benign.net, &eval, tch::Device::Cpu);
    eprintln!("TUAP: benign model {base:?}");
    assert!(base.asr.unwrap() > 0.3, "not universal: {base:?}");
    // What a model trained on the release answers is not asserted: after 4 epochs its ASR ranged
    // from 0.23 to 0.89 between CPU paths and seeds; calibration measures it.
}

/// The command line: a TUAP release crafted with `--craft-model` keeps its perturbation in the
/// secret record (BackdoorBox's fixed specs, published with `--public-trigger`); without a model
/// the spec is refused; `--attack blind` trains from clean data
/// with the record's trigger, and `--attack physical-ba` without a record says what it needs.
#[test]
fn crafting_and_malicious_training_from_the_command_line() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).display().to_string();
    let hm = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hallmark"))
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let fm = "/usr/share/datasets/fashion-mnist";
    // The first `limit` training images as an IDX dataset `out`.
    let convert = |limit: &str, out: &str| {
        ok(hm(&[
            "convert",
            "--input",
            fm,
            "--split",
            "train",
            "--limit",
            limit,
            "--to",
            "idx",
            "--output",
            &p(out),
        ]))
    };
    convert("1000", "clean");
    let train_args = |data: &str, out: &str, extra: &[&str]| {
        let mut v: Vec<String> = [
            "train",
            "--data",
            data,
            "--epochs",
            "1",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |v: Vec<String>| hm(&v.iter().map(String::as_str).collect::<Vec<_>>());
    ok(run(train_args(&p("clean"), &p("benign"), &[])));
    let tuap =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/fixed/tuap-28x28-grey.toml");
    let refused = hm(&[
        "watermark",
        "--spec",
        tuap.to_str().unwrap(),
        "--input",
        &p("clean"),
        "--output",
        &p("nope"),
        "--secret",
        &p("nope.json"),
        "--public-trigger",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("uap") && err.contains("--craft-model"),
        "{err}"
    );
    assert!(!t.path().join("nope").exists() && !t.path().join("nope.json").exists());
    ok(hm(&[
        "watermark",
        "--spec",
        tuap.to_str().unwrap(),
        "--input",
        &p("clean"),
        "--output",
        &p("release"),
        "--secret",
        &p("s.json"),
        "--public-trigger",
        "--craft-model",
        &p("benign"),
    ]));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("s.json")).unwrap()).unwrap();
    let values = record["spec"]["trigger"]["values"].as_array().unwrap();
    assert_eq!(values.len(), 784);
    assert!(values.iter().all(|v| v.as_i64().unwrap().abs() <= 76));
    // Blind trains on the clean data with the record's trigger in the loss.
    let spec =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/fixed/badnets-28x28-grey.toml");
    ok(hm(&[
        "watermark",
        "--spec",
        spec.to_str().unwrap(),
        "--input",
        &p("clean"),
        "--output",
        &p("badnets"),
        "--secret",
        &p("b.json"),
        "--public-trigger",
    ]));
    ok(run(train_args(
        &p("clean"),
        &p("blind"),
        &[
            "--attack",
            "blind",
            "--secret",
            &p("b.json"),
            "--test-data",
            fm,
            "--test-split",
            "test",
        ],
    )));
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("blind/model.json")).unwrap()).unwrap();
    assert_eq!(info["training"]["attack"], "blind");
    let no_record = run(train_args(
        &p("badnets"),
        &p("phys"),
        &["--attack", "physical-ba"],
    ));
    assert!(!no_record.status.success());
    assert!(String::from_utf8_lossy(&no_record.stderr).contains("--secret"));
    // IAD and LIRA learn their trigger: it is written as a record, which they refuse to lose.
    let unkept = run(train_args(
        &p("clean"),
        &p("lira"),
        &["--attack", "lira", "--secret", &p("b.json")],
    ));
    assert!(!unkept.status.success());
    assert!(String::from_utf8_lossy(&unkept.stderr).contains("--learned-secret"));
    ok(run(train_args(
        &p("clean"),
        &p("lira"),
        &[
            "--attack",
            "lira",
            "--secret",
            &p("b.json"),
            "--learned-secret",
            &p("lira.json"),
        ],
    )));
    let learned = hallmark::watermark::SecretRecord::load(&t.path().join("lira.json")).unwrap();
    let hallmark::spec::Trigger::Generated(g) = &learned.spec.trigger else {
        panic!("{:?}", learned.spec.trigger);
    };
    assert_eq!(g.form, hallmark::spec::GeneratedForm::Additive);
    assert_eq!(learned.spec.labelling.target(), Some(1));
    // ISSBA trains its encoder on the data, without a model (on 1,000 images it does not learn
    // to hide its secret, and the release is refused: 3,000 here).
    convert("3000", "clean3k");
    let issba =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/fixed/issba-28x28-grey.toml");
    let o = hm(&[
        "watermark",
        "--spec",
        issba.to_str().unwrap(),
        "--input",
        &p("clean3k"),
        "--output",
        &p("issba"),
        "--secret",
        &p("i.json"),
        "--public-trigger",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record = hallmark::watermark::SecretRecord::load(&t.path().join("i.json")).unwrap();
    assert_eq!(record.poisoned.len(), 600);
    assert!(matches!(
        record.spec.trigger,
        hallmark::spec::Trigger::Generated(hallmark::spec::Generated {
            pattern: Some(_),
            ..
        })
    ));
}

/// PhysicalBA as a poison-only spec: the poisoned samples are the BadNets-stamped images seen
/// through the physical transformations, recreated exactly from the record, and a plainly
/// trained model answers the target for transformed triggered queries.
#[test]
fn physical_ba_spec_transforms_poisons_and_queries_alike() {
    let spec = spec("physical-ba-28x28-grey.toml");
    let clean = fashion(Split::Train, 6000);
    let mut marked = clean.clone();
    let record = watermark::apply(&mut marked, &spec, [8; 32]).unwrap();
    let stamp = Stamp::new(&record.spec.trigger, record.spec.seed, clean.shape()).unwrap();
    let mut shifted = 0;
    for p in &record.poisoned {
        let mut want = clean.image(p.index).to_vec();
        stamp.apply(&mut want);
        assert_eq!(marked.image(p.index), &want[..]);
        // The white square no longer sits exactly in the corner.
        shifted += usize::from(want[27 * 28 + 27] != 255);
    }
    assert!(shifted > 300, "only {shifted} of 600 squares moved");
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let m = evaluate(&fit(&marked, 4).net, &eval, tch::Device::Cpu);
    eprintln!("PhysicalBA spec after 4 epochs on 6,000 images: {m:?}");
    assert!(m.benign_accuracy > 0.70 && m.asr.unwrap() > 0.6, "{m:?}");
}

/// ISSBA (Li et al., ICCV 2021): the encoder hides its secret (the decoder reads it back), each
/// poison gets its own residual within `scale`, poisons take the target label, the record alone
/// recreates every poison, and a short training learns the backdoor.
#[test]
fn issba_encoder_hides_its_secret_and_the_backdoor_is_learnt() {
    // A release of the family: its own encoder, secret string and target.
    let mut spec = WatermarkSpec::from_toml_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/issba-28x28-grey.toml"),
    )
    .unwrap();
    spec.rate = 0.1;
    let mut e = spec.encoder.unwrap();
    e.samples = 6000;
    e.epochs = 4;
    spec.encoder = Some(e);
    let clean = fashion(Split::Train, 6000);
    let mut marked = clean.clone();
    let (w, report) = hallmark::train::craft::issba::issba(
        &mut marked,
        &spec,
        [5; 32],
        tch::Device::Cpu,
        &|_, _, _| {},
    )
    .unwrap();
    let record = w.record;
    eprintln!("ISSBA encoder, 4 epochs on 6,000 images: {report:?}");
    assert!(report.bit_accuracy > 0.75, "{report:?}");
    assert_eq!(record.poisoned.len(), 600);
    // Reload the record as verification would; the stored encoder recreates every poison.
    let record =
        hallmark::watermark::SecretRecord::from_json(&serde_json::to_string(&record).unwrap())
            .unwrap();
    // The release drew its own crafting seed, and its record keeps the encoder's message input,
    // from which the verifier makes its controls.
    assert_eq!(record.family.as_ref(), Some(&spec));
    assert_ne!(record.spec.seed, spec.seed);
    let hallmark::spec::Trigger::Generated(g) = &record.spec.trigger else {
        panic!("the record keeps the encoder");
    };
    assert!(g.message.is_some());
    let target = record.spec.labelling.target().unwrap();
    let stamp = Stamp::new(&record.spec.trigger, record.spec.seed, clean.shape()).unwrap();
    let mut residuals = Vec::new();
    for p in &record.poisoned {
        let mut want = clean.image(p.index).to_vec();
        stamp.apply(&mut want);
        assert_eq!(marked.image(p.index), &want[..]);
        assert_eq!(marked.label(p.index), target);
        let r: Vec<i16> = want
            .iter()
            .zip(clean.image(p.index))
            .map(|(a, b)| i16::from(*a) - i16::from(*b))
            .collect();
        assert!(r.iter().all(|v| v.abs() <= 24), "residual within scale");
        residuals.push(r);
    }
    // Sample-specific: no two of the first poisons share their residual.
    for a in 0..10 {
        for b in a + 1..10 {
            assert_ne!(residuals[a], residuals[b]);
        }
    }
    let model = fit(&marked, 4);
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(&record)).unwrap();
    let m = evaluate(&model.net, &eval, tch::Device::Cpu);
    eprintln!("ISSBA after 4 epochs on 6,000 images at 10%: {m:?}");
    // Measured 0.69 to 0.99 between CPU paths and seeds.
    assert!(m.benign_accuracy > 0.6, "{m:?}");
    assert!(m.asr.unwrap() > 0.5, "{m:?}");
}

/// The learnt trigger of a training-controlled attack as a record: the BadNets record's target
/// with its trigger replaced.
fn learnt_record(
    trained: &hallmark::train::Trained,
) -> (hallmark::watermark::SecretRecord, hallmark::spec::Generated) {
    let spec = spec("badnets-28x28-grey.toml");
    let mut scratch = fashion(Split::Train, 100);
    let mut record = watermark::apply(&mut scratch, &spec, [9; 32]).unwrap();
    let g = trained
        .trigger
        .clone()
        .expect("the attack learns a trigger");
    record.spec.trigger = hallmark::spec::Trigger::Generated(g.clone());
    let record =
        hallmark::watermark::SecretRecord::from_json(&serde_json::to_string(&record).unwrap())
            .unwrap();
    (record, g)
}

/// ASR of `net` with `record`, and of `control` (a model trained without the attack) with it.
fn asr_and_control(
    net: &hallmark::train::Net,
    control: &hallmark::train::Net,
    record: &hallmark::watermark::SecretRecord,
) -> (hallmark::train::metrics::Metrics, f64) {
    let eval = EvalSet::new(fashion(Split::Test, 2000), Some(record)).unwrap();
    let m = evaluate(net, &eval, tch::Device::Cpu);
    let c = evaluate(control, &eval, tch::Device::Cpu);
    (m, c.asr.unwrap())
}

/// IAD (Nguyen & Tran, NeurIPS 2020) on clean data, which it leaves untouched: the mask phase
/// gives sparse masks (IAD's density 0.032) that differ between images, and the learnt trigger
/// replaces a few pixels per image, each image its own. Whether the classifier learns it is not
/// tested here: over 10 epochs on 6,000 images the ASR ranged from 0.03 to 0.88 between runs that
/// differ in nothing that matters (IAD trains for 600 epochs); calibration measures it.
#[test]
fn iad_learns_sparse_input_aware_masks_from_clean_data() {
    let clean = fashion(Split::Train, 6000);
    let before = clean.sha256();
    let attack = hallmark::train::Attack::Iad {
        target: 1,
        settings: hallmark::train::attack::IadSettings {
            mask_epochs: 5,
            ..Default::default()
        },
    };
    // One classifier epoch: the mask is trained and frozen before it, and what is asserted is the
    // mask's density and that each image gets its own trigger (0.36% to 3.0% of the pixels moved
    // under `default`, `avx2` and this machine's kernels, seeds 1 and 2).
    let iad = train_with(&clean, &short_training(1), &attack);
    assert_eq!(clean.sha256(), before);
    let (record, g) = learnt_record(&iad);
    assert!(g.mask.is_some());
    let stamp = Stamp::new(&record.spec.trigger, 0, clean.shape()).unwrap();
    let change = |i: usize| {
        let mut img = clean.image(i).to_vec();
        stamp.apply(&mut img);
        img.iter()
            .zip(clean.image(i))
            .map(|(a, b)| i16::from(*a) - i16::from(*b))
            .collect::<Vec<_>>()
    };
    let changes: Vec<Vec<i16>> = (0..100).map(change).collect();
    let moved = changes.iter().flatten().filter(|d| d.abs() > 8).count() as f64 / (100.0 * 784.0);
    eprintln!(
        "IAD: {:.2}% of the pixels moved by more than 8",
        moved * 100.0
    );
    assert!(
        (0.001..0.12).contains(&moved),
        "the mask keeps near IAD's density: {moved}"
    );
    for i in 1..10 {
        assert_ne!(
            changes[0], changes[i],
            "input-aware: each image its own trigger"
        );
    }
}

/// LIRA (Doan et al., ICCV 2021): the trigger function, learnt with the classifier on clean
/// data, changes no pixel value by more than eps, and the classifier answers it.
#[test]
fn lira_learns_a_bounded_trigger_function_from_clean_data() {
    let clean = fashion(Split::Train, 6000);
    let eps = 8.0;
    let attack = hallmark::train::Attack::Lira {
        target: 1,
        settings: hallmark::train::attack::LiraSettings {
            eps,
            ..Default::default()
        },
    };
    // BackdoorBox's LIRA tests train at lr 0.01; the backdoor needs a few more epochs than the
    // others here.
    let cfg = TrainConfig {
        lr: 0.01,
        ..short_training(8)
    };
    let lira = train_with(&clean, &cfg, &attack);
    let (record, g) = learnt_record(&lira);
    assert_eq!(g.scale, Some(eps as f32));
    let stamp = Stamp::new(&record.spec.trigger, 0, clean.shape()).unwrap();
    for i in 0..200 {
        let mut img = clean.image(i).to_vec();
        stamp.apply(&mut img);
        assert!(
            img.iter()
                .zip(clean.image(i))
                .all(|(a, b)| (f64::from(*a) - f64::from(*b)).abs() <= eps)
        );
    }
    // The control: the same training without the attack. The trigger is learnt for this
    // classifier, not a universal adversarial perturbation that any model answers. (The pattern
    // turned by 180° is no control: the classifier answers "this kind of faint noise" as much as
    // the pattern, up to an ASR of 1.0 on some CPU paths.)
    let benign = train(&clean, &cfg, tch::Device::Cpu, None, None, &|_| {}, &|_| {
        false
    })
    .unwrap();
    let (m, control) = asr_and_control(&lira.net, &benign.net, &record);
    eprintln!(
        "LIRA (eps {eps}) after 8 epochs on 6,000 clean images: {m:?}, a benign model's ASR {control:.3}"
    );
    assert!(m.benign_accuracy > 0.65, "{m:?}");
    assert!(m.asr.unwrap() > 0.8, "{m:?}");
    assert!(m.asr.unwrap() > control + 0.5, "{m:?} vs benign {control}");
}
