//! Each defence on a small seeded run shows its defining effect.

use super::*;
use crate::dataset::Split;
use crate::train::exclusive_torch as exclusive;
use crate::train::fashion;
use crate::train::fit::Schedule;
use crate::train::serve::{ModelInfo, save_model};
use crate::train::{Arch, train};

fn cfg(arch: Arch, epochs: usize) -> TrainConfig {
    TrainConfig {
        arch,
        epochs,
        batch_size: 64,
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
        schedule: Schedule::Step {
            milestones: vec![],
            gamma: 0.1,
        },
        crop_padding: 0,
        flip: false,
        seed: 7,
        warmup_epochs: 0,
        defence: Default::default(),
    }
}

/// A small model trained on 600 Fashion-MNIST images, loaded as a server would load it.
fn suspect(arch: Arch, dir: &std::path::Path) -> LoadedModel {
    let data = fashion(Split::Train, 600);
    let c = TrainConfig {
        lr: 0.05,
        ..cfg(arch, 2)
    };
    let t = train(&data, &c, Device::Cpu, None, None, &|_| {}, &|_| false).unwrap();
    let info = ModelInfo {
        arch,
        shape: data.shape(),
        classes: data.num_classes(),
        training: serde_json::Value::Null,
        pruned: Vec::new(),
    };
    save_model(&t, &info, dir).unwrap();
    LoadedModel::load(dir, Device::Cpu).unwrap()
}

fn logits(net: &Net, x: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(tch::no_grad(|| net.forward_t(x, false)).flatten(0, -1)).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fine_pruning_removes_the_least_active_channels_and_the_saved_model_keeps_them_removed() {
    let _one = exclusive();
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::BaselineMnist, Arch::SmallCnn] {
        let model = suspect(arch, &dir.path().join(format!("{arch:?}")));
        let clean = fashion(Split::Test, 300);
        let c = RepairConfig {
            prune_rate: 0.25,
            ..RepairConfig::new(Defence::FinePruning, cfg(arch, 1))
        };
        let (t, report) = repair(&model, &clean, &c, Device::Cpu, &|_| {}).unwrap();
        let channels = model.net().channels() as usize;
        assert_eq!(report.activations.len(), channels);
        assert_eq!(report.pruned.len(), channels / 4, "{arch:?}");
        // The pruned channels are exactly the least active ones.
        let max_pruned = report
            .pruned
            .iter()
            .map(|&c| report.activations[c as usize])
            .fold(f64::MIN, f64::max);
        let min_kept = (0..channels as i64)
            .filter(|c| !report.pruned.contains(c))
            .map(|c| report.activations[c as usize])
            .fold(f64::MAX, f64::min);
        assert!(
            max_pruned <= min_kept,
            "{arch:?}: {max_pruned} > {min_kept}"
        );
        assert_eq!(t.net.pruned(), report.pruned.as_slice());
        // They are silent on any input, after the fine-tuning too.
        let x = crate::train::tensor::to_tensor(&clean, &(0..50).collect::<Vec<_>>(), Device::Cpu);
        let (f, _) = tch::no_grad(|| t.net.features_t(&x, false));
        let last = f.last().unwrap();
        for &c in &report.pruned {
            assert_eq!(last.select(1, c).abs().max().double_value(&[]), 0.0);
        }
        assert!(
            (0..channels as i64)
                .filter(|c| !report.pruned.contains(c))
                .any(|c| last.select(1, c).abs().max().double_value(&[]) > 0.0)
        );
        // Saved and loaded, the model answers the same.
        let out = dir.path().join(format!("{arch:?}-repaired"));
        save_model(&t, &model.info, &out).unwrap();
        let back = LoadedModel::load(&out, Device::Cpu).unwrap();
        assert_eq!(back.net().pruned(), report.pruned.as_slice());
        assert!(max_abs_diff(&logits(&t.net, &x), &logits(back.net(), &x)) < 1e-5);
    }
}

#[test]
fn nad_pulls_the_attention_maps_towards_the_teacher() {
    let _one = exclusive();
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    let model = suspect(Arch::SmallCnn, dir.path());
    let clean = fashion(Split::Test, 300);
    let c = RepairConfig {
        teacher_epochs: 2,
        ..RepairConfig::new(Defence::Nad, cfg(Arch::SmallCnn, 3))
    };
    let (_, report) = repair(&model, &clean, &c, Device::Cpu, &|_| {}).unwrap();
    let (first, last) = report.attention_loss.unwrap();
    eprintln!("NAD attention loss {first} → {last}");
    // 3.23 → 0.85 under this machine's kernels, `ATEN_CPU_CAPABILITY=default` and `avx2`.
    assert!(first > 0.0 && last < first * 0.8, "{first} → {last}");
    // The attention of a map is normalised per image.
    let a = nad::attention(&Tensor::rand([2, 4, 3, 3], (Kind::Float, Device::Cpu)));
    let norms = Vec::<f32>::try_from(a.norm_scalaropt_dim(2, [1i64].as_slice(), false)).unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
}

#[test]
fn mcr_curve_ends_are_the_model_and_its_fine_tuned_copy() {
    let _one = exclusive();
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    // No batch norm, so the end points are the weights alone.
    let model = suspect(Arch::BaselineMnist, dir.path());
    let clean = fashion(Split::Test, 300);
    let x = crate::train::tensor::to_tensor(&clean, &(0..50).collect::<Vec<_>>(), Device::Cpu);
    let at = |t: f64| {
        let c = RepairConfig {
            curve_t: t,
            teacher_epochs: 1,
            ..RepairConfig::new(Defence::Mcr, cfg(Arch::BaselineMnist, 1))
        };
        repair(&model, &clean, &c, Device::Cpu, &|_| {}).unwrap().0
    };
    let start = at(0.0);
    assert!(max_abs_diff(&logits(&start.net, &x), &logits(model.net(), &x)) < 1e-5);
    let end = at(1.0);
    let tuned = fine_tune(
        &model,
        &[],
        &clean,
        &cfg(Arch::BaselineMnist, 1),
        Device::Cpu,
        &|_| {},
        &mut [],
    )
    .unwrap();
    assert!(max_abs_diff(&logits(&end.net, &x), &logits(&tuned.net, &x)) < 1e-4);
    let middle = at(0.5);
    assert!(max_abs_diff(&logits(&middle.net, &x), &logits(model.net(), &x)) > 1e-3);
}

#[test]
fn distillation_trains_a_fresh_network_that_answers_like_the_model() {
    let _one = exclusive();
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    let model = suspect(Arch::BaselineMnist, dir.path());
    let clean = fashion(Split::Test, 600);
    let c = RepairConfig::new(
        Defence::Distillation,
        TrainConfig {
            lr: 0.05,
            ..cfg(Arch::BaselineMnist, 3)
        },
    );
    let (t, _) = repair(&model, &clean, &c, Device::Cpu, &|_| {}).unwrap();
    let held = fashion(Split::Train, 1000);
    let held = held.subset(&(600..1000).collect::<Vec<_>>()).unwrap();
    let x = crate::train::tensor::to_tensor(&held, &(0..400).collect::<Vec<_>>(), Device::Cpu);
    let a = tch::no_grad(|| t.net.forward_t(&x, false).argmax(1, false));
    let b = tch::no_grad(|| model.net().forward_t(&x, false).argmax(1, false));
    let agree = a
        .eq_tensor(&b)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    eprintln!("distilled student agrees with the model on {agree}");
    // 0.757 to 0.763 under this machine's kernels, `ATEN_CPU_CAPABILITY=default` and `avx2`.
    assert!(agree > 0.6, "student and teacher agree on {agree}");
    // It did not start from the model's weights.
    let w = |vs: &tch::nn::VarStore| {
        Vec::<f32>::try_from(vs.variables()["fc2.bias"].shallow_clone()).unwrap()
    };
    assert!(max_abs_diff(&w(&t.vs), &w(model.vs())) > 1e-3);
}

#[test]
fn anp_zeroes_exactly_the_neurons_whose_masks_fall_and_repeats_itself() {
    let _one = exclusive();
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    for (arch, neurons) in [
        (Arch::BaselineMnist, 16 + 32 + 512),
        (Arch::SmallCnn, 32 + 64 + 128),
    ] {
        let model = suspect(arch, &dir.path().join(format!("{arch:?}")));
        let clean = fashion(Split::Test, 300);
        let c = RepairConfig {
            anp: anp::AnpConfig {
                iterations: 30,
                threshold: 0.9,
                ..Default::default()
            },
            ..RepairConfig::new(Defence::Anp, cfg(arch, 1))
        };
        let (t, report) = repair(&model, &clean, &c, Device::Cpu, &|_| {}).unwrap();
        let anp = report.anp.unwrap();
        assert_eq!(anp.neurons, neurons, "{arch:?}");
        eprintln!("{arch:?}: ANP pruned {} of {neurons}", anp.pruned);
        // 29 of 560 and 4 of 224 under this machine's kernels, `ATEN_CPU_CAPABILITY=default` and
        // `avx2`.
        assert!(
            anp.pruned > 0 && anp.pruned < neurons,
            "{arch:?}: {}",
            anp.pruned
        );
        // Pruned neurons have zero weights; every other variable is the model's.
        let (new, old) = (t.vs.variables(), model.vs().variables());
        for (name, v) in &old {
            if v.dim() == 0 {
                assert!(new[name].equal(v), "{name}");
                continue;
            }
            let pruned = anp
                .layers
                .iter()
                .find(|(l, _, _)| format!("{l}.weight") == *name)
                .map(|(_, _, p)| p.clone())
                .unwrap_or_default();
            for c in 0..v.size()[0] {
                let (a, b) = (new[name].get(c), v.get(c));
                if pruned.contains(&c) {
                    assert_eq!(a.abs().max().double_value(&[]), 0.0, "{name}[{c}]");
                } else {
                    assert!(a.equal(&b), "{arch:?}: {name}[{c}] changed");
                }
            }
        }
        // The same seed prunes the same neurons.
        let (_, again) = repair(&model, &clean, &c, Device::Cpu, &|_| {}).unwrap();
        assert_eq!(again.anp.unwrap().layers, anp.layers, "{arch:?}");
    }
}
