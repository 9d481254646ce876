//! Tests of the attacks' building blocks.

use super::blind::{Cleanse, mgda_weights, min_norm_weights};
use super::physical;
use crate::dataset::Split;
use crate::train::exclusive_torch as exclusive;
use crate::train::fashion;
use crate::train::model::{Arch, Net};
use crate::train::tensor::to_tensor;
use crate::watermark::rng::{Rng, Stream};
use tch::{Device, Kind, Tensor, nn};

#[test]
fn mgda_picks_the_min_norm_combination_of_normalised_gradients() {
    let _one = exclusive();
    let p = Tensor::from_slice(&[1f32, 1.0]).set_requires_grad(true);
    let weights = |losses: &[Tensor]| mgda_weights(losses, &[p.shallow_clone()]);
    let close = |w: Vec<f64>, want: &[f64]| {
        assert!(
            w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-4),
            "{w:?} ≠ {want:?}"
        );
    };
    // Losses 1, gradients [1, 0] and [0, 1]: one half each.
    close(weights(&[p.get(0) * 1.0, p.get(1) * 1.0]), &[0.5, 0.5]);
    // `loss+` divides each gradient by loss · norm: [2, 0] at loss 1 becomes [1, 0] again.
    close(
        weights(&[p.get(0) * 2.0 - 1.0, p.get(1) * 1.0]),
        &[0.5, 0.5],
    );
    // [0, 0.5] at loss 0.5 becomes [0, 2]: 0.8·[1, 0] + 0.2·[0, 2] is the point of the segment
    // closest to the origin.
    close(weights(&[p.get(0) * 1.0, p.get(1) * 0.5]), &[0.8, 0.2]);
    // The divisor is capped at 10: [100, 0] at loss 1 becomes [10, 0], against [0, 1].
    close(
        weights(&[p.get(0) * 100.0 - 99.0, p.get(1) * 1.0]),
        &[1.0 / 101.0, 100.0 / 101.0],
    );
}

#[test]
fn min_norm_weights_of_three_tasks() {
    let close = |w: Vec<f64>, want: &[f64]| {
        assert!(
            w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-9),
            "{w:?} ≠ {want:?}"
        );
    };
    let third = 1.0 / 3.0;
    let eye = vec![
        vec![1.0, 0.0, 0.0],
        vec![0.0, 1.0, 0.0],
        vec![0.0, 0.0, 1.0],
    ];
    close(min_norm_weights(&eye), &[third, third, third]);
    // e1, e2 and [1, 1]: the third lies beyond the segment e1–e2, whose middle is the minimum.
    let g = vec![
        vec![1.0, 0.0, 1.0],
        vec![0.0, 1.0, 1.0],
        vec![1.0, 1.0, 2.0],
    ];
    close(min_norm_weights(&g), &[0.5, 0.5, 0.0]);
    // One-dimensional 1, 2, 3 (a singular Gram matrix): all weight on the shortest.
    let g = vec![
        vec![1.0, 2.0, 3.0],
        vec![2.0, 4.0, 6.0],
        vec![3.0, 6.0, 9.0],
    ];
    close(min_norm_weights(&g), &[1.0, 0.0, 0.0]);
    // 1 and −1 on a line, with an orthogonal third: the origin is reached by the first two.
    let g = vec![
        vec![1.0, -1.0, 0.0],
        vec![-1.0, 1.0, 0.0],
        vec![0.0, 0.0, 4.0],
    ];
    close(min_norm_weights(&g), &[0.5, 0.5, 0.0]);
}

/// Blind's Neural Cleanse evasion: each step moves the reverse-engineered trigger towards the
/// target (Neural Cleanse's loss falls), starts from BackdoorBox's half-transparent mask, is
/// seeded, and leaves no gradient on the network.
#[test]
fn neural_cleanse_steps_reverse_engineer_towards_the_target_only() {
    let _one = exclusive();
    let ds = fashion(Split::Test, 64);
    let shape = ds.shape();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root(), Arch::BaselineMnist, shape, 10);
    let params = vs.trainable_variables();
    let x = to_tensor(&ds, &(0..64).collect::<Vec<_>>(), Device::Cpu);
    let target = Tensor::full([64], 3, (Kind::Int64, Device::Cpu));
    let mut c = Cleanse::new(shape, 7, Device::Cpu).unwrap();
    let again = Cleanse::new(shape, 7, Device::Cpu).unwrap();
    assert!(c.apply(&x).equal(&again.apply(&x)), "seeded");
    let half = f64::try_from((c.mask.tanh() / 2.0 + 0.5).mean(Kind::Float)).unwrap();
    assert!((half - 0.5).abs() < 1e-9, "mask starts at one half: {half}");
    let nc_loss = |c: &Cleanse| {
        tch::no_grad(|| {
            f64::try_from(
                net.forward_t(&c.apply(&x), false)
                    .cross_entropy_for_logits(&target),
            )
            .unwrap()
        })
    };
    let before = nc_loss(&c);
    for _ in 0..30 {
        c.reverse_engineer(&net, &x, &target, &params);
    }
    let after = nc_loss(&c);
    assert!(after < before - 0.1, "{before} → {after}");
    for p in &params {
        let g = p.grad();
        assert!(
            !g.defined() || f64::try_from(g.abs().sum(Kind::Float)).unwrap() == 0.0,
            "the network keeps no gradient of the reverse engineering"
        );
    }
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
