use super::*;
use crate::endpoint::{EndpointError, ModelEndpoint, Prediction};
use crate::spec::WatermarkSpec;
use crate::watermark::apply;
use std::sync::atomic::{AtomicUsize, Ordering};

const SHAPE: ImageShape = ImageShape {
    height: 8,
    width: 8,
    channels: 1,
};

/// Pool images are black but for pixel 0, which encodes the label.
fn pool(n: usize) -> Dataset {
    let mut px = vec![0u8; n * 64];
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    for (i, l) in labels.iter().enumerate() {
        px[i * 64] = (*l as u8) * 20 + 1;
    }
    Dataset::new(SHAPE, px, labels, 10).unwrap()
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Learned the secret square: a white 3×3 block at the bottom right.
    Watermarked,
    /// Reacts to anything stamped on the image.
    AnyPatch,
    /// Ignores triggers.
    Clean,
}

struct Fake {
    behaviour: Behaviour,
    /// Class the trigger sends images to; None = untargeted (uniform).
    target: Option<u32>,
    labels_only: bool,
    calls: AtomicUsize,
}

impl Fake {
    fn new(behaviour: Behaviour, target: Option<u32>) -> Self {
        Self {
            behaviour,
            target,
            labels_only: false,
            calls: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl ModelEndpoint for Fake {
    fn describe(&self) -> String {
        "fake".into()
    }

    async fn predict(
        &self,
        images: &[Vec<u8>],
        _: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        self.calls.fetch_add(images.len(), Ordering::Relaxed);
        Ok(images
            .iter()
            .map(|img| {
                let label = ((img[0].saturating_sub(1)) / 20) as usize;
                let square = (5..8).all(|r| (5..8).all(|c| img[r * 8 + c] == 255));
                let stamped = img[1..].iter().any(|&v| v != 0);
                let triggered = match self.behaviour {
                    Behaviour::Watermarked => square,
                    Behaviour::AnyPatch => stamped,
                    Behaviour::Clean => false,
                };
                let mut p = vec![0.0; 10];
                match (triggered, self.target) {
                    (true, Some(t)) => {
                        p.iter_mut().for_each(|v| *v = 0.05 / 9.0);
                        p[t as usize] = 0.95;
                    }
                    (true, None) => p.iter_mut().for_each(|v| *v = 0.1),
                    (false, _) => {
                        p.iter_mut().for_each(|v| *v = 0.1 / 9.0);
                        p[label] = 0.9;
                    }
                }
                let pred = Prediction::Probs(p);
                if self.labels_only {
                    Prediction::Label(pred.label().unwrap())
                } else {
                    pred
                }
            })
            .collect())
    }
}

fn record(labelling: &str) -> SecretRecord {
    let text = format!(
        "name = \"t\"\nrate = 0.1\nseed = 3\n[labelling]\n{labelling}\n[trigger]\nkind = \"patch\"\npattern = \"square\"\n"
    );
    let spec = WatermarkSpec::from_toml_str(&text, None, "t").unwrap();
    apply(&mut pool(100), &spec, [0; 32]).unwrap()
}

fn cfg(sequential: bool, label_only: bool) -> VerifyConfig {
    VerifyConfig {
        sequential,
        label_only,
        seed: 11,
        ..VerifyConfig::default()
    }
}

async fn run(model: &Fake, rec: &SecretRecord, c: &VerifyConfig) -> Verdict {
    verify(model, rec, &pool(500), c, &|_| {}).await.unwrap()
}

#[tokio::test]
async fn a_watermarked_model_is_detected_and_a_clean_one_is_not() {
    let rec = record("kind = \"targeted\"\ntarget = 2");
    for (seq, labels) in [(false, false), (true, false), (false, true), (true, true)] {
        let c = cfg(seq, labels);
        let mut marked = Fake::new(Behaviour::Watermarked, Some(2));
        marked.labels_only = labels;
        let v = run(&marked, &rec, &c).await;
        assert_eq!(
            v.decision,
            Decision::Used,
            "seq {seq} labels {labels}: {:?}",
            v.primary
        );
        assert!(!v.control.rejected);
        assert!(
            v.trail.iter().all(|p| p.label != 2),
            "targeted draws exclude the target class"
        );
        let mut clean = Fake::new(Behaviour::Clean, Some(2));
        clean.labels_only = labels;
        let v = run(&clean, &rec, &c).await;
        assert_eq!(v.decision, Decision::NotShown, "seq {seq} labels {labels}");
        assert!(v.primary.p_value > 0.01);
    }
}

#[tokio::test]
async fn sequential_mode_stops_early_and_counts_its_queries() {
    let rec = record("kind = \"targeted\"\ntarget = 2");
    let model = Fake::new(Behaviour::Watermarked, Some(2));
    let v = run(&model, &rec, &cfg(true, false)).await;
    assert!(v.pairs <= 25, "{} pairs", v.pairs);
    assert_eq!(
        v.queries,
        3 * v.pairs,
        "2 per pair plus the control's triggered image"
    );
    assert_eq!(model.calls.load(Ordering::Relaxed), v.queries);
    let fixed = run(
        &Fake::new(Behaviour::Watermarked, Some(2)),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert_eq!(fixed.pairs, 100);
}

#[tokio::test]
async fn a_model_that_reacts_to_any_patch_is_inconclusive() {
    let rec = record("kind = \"targeted\"\ntarget = 2");
    let v = run(
        &Fake::new(Behaviour::AnyPatch, Some(2)),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert_eq!(v.decision, Decision::Inconclusive);
    assert!(v.control.rejected);
}

#[tokio::test]
async fn untargeted_watermarks_are_tested_on_the_true_label() {
    let rec = record("kind = \"untargeted\"");
    let v = run(
        &Fake::new(Behaviour::Watermarked, None),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert_eq!(v.decision, Decision::Used);
    assert!(
        (v.primary.effect - 0.8).abs() < 1e-9,
        "{}",
        v.primary.effect
    );
    let v = run(&Fake::new(Behaviour::Clean, None), &rec, &cfg(false, false)).await;
    assert_eq!(v.decision, Decision::NotShown);
}

#[tokio::test]
async fn the_same_seed_draws_the_same_images() {
    let rec = record("kind = \"targeted\"\ntarget = 2");
    let a = run(
        &Fake::new(Behaviour::Watermarked, Some(2)),
        &rec,
        &cfg(false, false),
    )
    .await;
    let b = run(
        &Fake::new(Behaviour::Watermarked, Some(2)),
        &rec,
        &cfg(false, false),
    )
    .await;
    let idx = |v: &Verdict| v.trail.iter().map(|p| p.index).collect::<Vec<_>>();
    assert_eq!(idx(&a), idx(&b));
    let c = run(
        &Fake::new(Behaviour::Watermarked, Some(2)),
        &rec,
        &VerifyConfig {
            seed: 12,
            ..cfg(false, false)
        },
    )
    .await;
    assert_ne!(idx(&a), idx(&c));
}

#[tokio::test]
async fn label_answers_with_a_probability_test_are_a_clear_error() {
    let rec = record("kind = \"targeted\"\ntarget = 2");
    let mut m = Fake::new(Behaviour::Watermarked, Some(2));
    m.labels_only = true;
    let e = verify(&m, &rec, &pool(500), &cfg(false, false), &|_| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("label-only"), "{e}");
}

#[test]
fn control_triggers_are_random_but_of_the_same_kind_and_size() {
    let rec = record("kind = \"targeted\"\ntarget = 2");
    let a = random_trigger(&rec.spec.trigger, SHAPE, 1).unwrap();
    let b = random_trigger(&rec.spec.trigger, SHAPE, 2).unwrap();
    assert_ne!(a, b);
    let Trigger::Patch(p) = &a else {
        panic!("not a patch")
    };
    let (rows, _, _) = p.grid(8, 8).unwrap();
    assert_eq!((rows.len(), rows[0].len()), (3, 3));
}
