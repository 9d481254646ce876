//! Tests of `train::fit`.

use super::*;
use crate::dataset::Split;
use crate::train::Arch;
use crate::train::metrics::{EvalSet, evaluate};
use tch::Kind;

use crate::train::exclusive_torch as exclusive;
use crate::train::fashion;

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
        defence: Default::default(),
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

/// A hook that counts what the loop calls and, when `owns`, gives a loss of its own; it keeps
/// state outside the checkpoint.
#[derive(Default)]
struct Counting {
    owns: bool,
    starts: usize,
    inputs: usize,
    losses: usize,
    steps: usize,
}

impl Hook for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn resumable(&self) -> bool {
        false
    }
    fn start(&mut self, s: &Start<'_>) -> Result<(), TrainError> {
        assert_eq!(s.x_all.size()[0] as usize, s.train.len());
        self.starts += 1;
        Ok(())
    }
    fn inputs(&mut self, x: Tensor, chunk: &[i64], _rng: &mut Rng) -> Tensor {
        assert_eq!(x.size()[0] as usize, chunk.len());
        self.inputs += 1;
        x
    }
    fn loss(&mut self, b: &mut Batch<'_>) -> Option<Tensor> {
        self.losses += 1;
        // A loss of 0 moves nothing but weight decay.
        self.owns
            .then(|| b.net.forward_t(b.x, true).sum(tch::Kind::Float) * 0.0)
    }
    fn after_step(&mut self, _epoch: usize) {
        self.steps += 1;
    }
}

/// The loop calls every hook at each point, the first hook that answers owns the loss, and a
/// hook whose state is not in the checkpoint turns checkpoints off.
#[test]
fn hooks_are_called_in_order_and_the_first_loss_wins() {
    let _one = exclusive();
    let data = fashion(Split::Train, 200);
    let mut c = cfg(2);
    c.batch_size = 64;
    let dir = tempfile::tempdir().unwrap();
    let (mut first, mut second) = (
        Counting {
            owns: true,
            ..Default::default()
        },
        Counting {
            owns: true,
            ..Default::default()
        },
    );
    let t = run(
        &Run {
            checkpoints: Some(dir.path()),
            ..Run::new(&data, &c, Device::Cpu)
        },
        &mut [&mut first, &mut second],
    )
    .unwrap();
    // 200 images in batches of 64: 4 steps per epoch.
    for h in [&first, &second] {
        assert_eq!((h.starts, h.inputs, h.steps), (1, 8, 8));
    }
    assert_eq!(
        (first.losses, second.losses),
        (8, 0),
        "the first answer wins"
    );
    assert!(t.history.iter().all(|e| e.loss == 0.0), "{:?}", t.history);
    assert!(
        std::fs::read_dir(dir.path()).map_or(true, |mut d| d.next().is_none()),
        "no checkpoint for a run that cannot resume"
    );
    // Without an owning hook the loop's own cross-entropy is the loss.
    let mut watching = Counting::default();
    let t = run(&Run::new(&data, &c, Device::Cpu), &mut [&mut watching]).unwrap();
    assert_eq!(watching.losses, 8);
    assert!(t.history.iter().all(|e| e.loss > 0.5), "{:?}", t.history);
}
