use super::*;
use crate::dataset::{Format, Split};
use crate::train::metrics::{EvalSet, evaluate};

use crate::train::exclusive_torch as exclusive;

fn fashion(split: Split, n: usize) -> Dataset {
    let ds = crate::dataset::read(
        Path::new("/usr/share/datasets/fashion-mnist"),
        Some(Format::Idx),
        Some(split),
        &|| {},
    )
    .expect("Fashion-MNIST is installed by scripts/test")
    .dataset;
    ds.subset(&(0..n).collect::<Vec<_>>()).unwrap()
}

fn cfg(epochs: usize) -> TrainConfig {
    TrainConfig {
        arch: Arch::BaselineMnist,
        epochs,
        batch_size: 128,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        schedule: Schedule::Step {
            milestones: vec![1],
            gamma: 0.1,
        },
        crop_padding: 2,
        flip: true,
        seed: 42,
        warmup_epochs: 0,
    }
}

fn weights(t: &Trained) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> =
        t.vs.variables()
            .into_iter()
            .map(|(n, t)| {
                (
                    n,
                    Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap(),
                )
            })
            .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_short_run_learns_fashion_mnist() {
    let _one = exclusive();
    tch::set_num_threads(2);
    let train_set = fashion(Split::Train, 3000);
    let eval = EvalSet::new(fashion(Split::Test, 1000), None).unwrap();
    let t = train(
        &train_set,
        &cfg(2),
        Device::Cpu,
        Some(&eval),
        None,
        &|_| {},
        &|_| false,
    )
    .unwrap();
    assert_eq!(t.history.len(), 2);
    assert!(t.history[1].loss < t.history[0].loss, "{:?}", t.history);
    let acc = evaluate(&t.net, &eval, Device::Cpu).benign_accuracy;
    assert!(acc > 0.65, "benign accuracy {acc}: {:?}", t.history);
    assert!(
        (t.history[1].lr - 0.005).abs() < 1e-15,
        "the step schedule applies from epoch 2"
    );
}

#[test]
fn training_is_deterministic_from_the_seed_and_an_interrupted_run_resumes_exactly() {
    let _one = exclusive();
    tch::set_num_threads(2);
    let data = fashion(Split::Train, 1200);
    let a = train(&data, &cfg(2), Device::Cpu, None, None, &|_| {}, &|_| false).unwrap();
    let b = train(&data, &cfg(2), Device::Cpu, None, None, &|_| {}, &|_| false).unwrap();
    assert_eq!(weights(&a), weights(&b), "same seed, same weights");
    let c = train(
        &data,
        &TrainConfig { seed: 43, ..cfg(2) },
        Device::Cpu,
        None,
        None,
        &|_| {},
        &|_| false,
    )
    .unwrap();
    assert_ne!(weights(&a), weights(&c));

    let dir = tempfile::tempdir().unwrap();
    let e = train(
        &data,
        &cfg(2),
        Device::Cpu,
        None,
        Some(dir.path()),
        &|_| {},
        &|done| done == 1,
    )
    .err()
    .unwrap();
    assert!(
        matches!(e, TrainError::Interrupted { epochs_done: 1 }),
        "{e}"
    );
    let resumed = train(
        &data,
        &cfg(2),
        Device::Cpu,
        None,
        Some(dir.path()),
        &|_| {},
        &|_| false,
    )
    .unwrap();
    assert_eq!(resumed.history.len(), 2);
    assert_eq!(
        weights(&resumed),
        weights(&a),
        "resumed weights equal the uninterrupted run's"
    );
    // A checkpoint of other settings is refused, not silently mixed in.
    let e = train(
        &data,
        &TrainConfig { lr: 0.02, ..cfg(2) },
        Device::Cpu,
        None,
        Some(dir.path()),
        &|_| {},
        &|_| false,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("another run"), "{e}");
}

#[test]
fn mgda_picks_the_min_norm_combination() {
    let _one = exclusive();
    let p = Tensor::from_slice(&[1f32, 1.0]).set_requires_grad(true);
    // Loss values 1, gradients [1, 0] and [0, 1]: the balance is one half.
    let a = p.get(0) * 1.0;
    let b = p.get(1) * 1.0;
    assert!((mgda_weight(&a, &b, &[p.shallow_clone()]) - 0.5).abs() < 1e-6);
    // Gradients [2, 0] and [0, 1] (losses 1): 0.2·[2, 0] + 0.8·[0, 1] = [0.4, 0.8] is the point
    // of the segment closest to the origin (orthogonal to the segment's direction [-2, 1]).
    let a = p.get(0) * 2.0 - 1.0;
    let b = p.get(1) * 1.0;
    assert!((mgda_weight(&a, &b, &[p.shallow_clone()]) - 0.2).abs() < 1e-6);
}

#[test]
fn physical_transformations_are_seeded_and_stay_images() {
    let _one = exclusive();
    let x = fashion(Split::Test, 8);
    let t = to_tensor(&x, &(0..8).collect::<Vec<_>>(), Device::Cpu);
    let a = physical(&t, &mut Rng::new(3, Stream::Selection));
    let b = physical(&t, &mut Rng::new(3, Stream::Selection));
    let c = physical(&t, &mut Rng::new(4, Stream::Selection));
    assert_eq!(a.size(), t.size());
    assert!(a.equal(&b), "same seed, same transformation");
    assert!(!a.equal(&c), "another seed, another transformation");
    assert!(f64::try_from(a.min()).unwrap() >= 0.0 && f64::try_from(a.max()).unwrap() <= 1.0);
    // Zoomed out (scale 0.8-0.9) and shifted: each image moves a lot.
    let moved = f64::try_from((&a - &t).abs().mean(Kind::Float)).unwrap();
    assert!(moved > 0.05, "mean change {moved}");
}
