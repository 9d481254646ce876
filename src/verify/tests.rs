//! Tests of `verify`.

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

/// Pool images are uniform grey, their level encoding the label (10 + 20 × label), so that a
/// trigger anywhere leaves the label readable and every trigger pixel is visible.
fn pool(n: usize) -> Dataset {
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    let px: Vec<u8> = labels
        .iter()
        .flat_map(|&l| std::iter::repeat_n(level(l as u8), 64))
        .collect();
    Dataset::new(SHAPE, px, labels, 10).unwrap()
}

fn level(label: u8) -> u8 {
    10 + 20 * label
}

/// The label a model reads: from the most frequent grey level.
fn label_of(img: &[u8]) -> usize {
    let mut counts = [0usize; 256];
    img.iter().for_each(|&v| counts[v as usize] += 1);
    let mode = (0..256).max_by_key(|&v| counts[v]).unwrap();
    (mode.saturating_sub(10) / 20).min(9)
}

fn fnv(img: &[u8]) -> u64 {
    img.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// How a simulated model answers.
#[derive(Clone)]
enum Behaviour {
    /// Learnt the secret trigger of this record: an image that the secret's stamp leaves
    /// unchanged carries it.
    Learnt(Box<Stamp>),
    /// Reacts to every member of the family: anything stamped on the image.
    AnyMember,
    /// Reacts to each of these triggers by sending its image to the trigger's own class: a model
    /// to which every member of a crafted family transfers (the secret and every control).
    EachMember(Vec<(Stamp, u32)>),
    /// Ignores triggers, with answers that vary from image to image.
    Blind,
}

/// Where a reacting model sends the image.
#[derive(Clone, Copy)]
enum Send {
    /// To this class.
    Class(u32),
    /// To a class that depends on the image (an untargeted watermark's scatter).
    Scatter,
    /// Class y to entry y (all-to-all).
    Map([u8; 10]),
}

/// An all-to-all record's π as a `Send`.
fn map_of(rec: &SecretRecord) -> Send {
    let m = rec.spec.labelling.mapping(10).unwrap();
    Send::Map(std::array::from_fn(|y| m[y] as u8))
}

/// Where a simulated gate's flags and lies come from.
#[derive(Clone, Copy, PartialEq)]
enum LieFrom {
    /// Drawn afresh for every query.
    Draw,
    /// Flags from what the model sees, lies from a hash of the query's bytes (as
    /// `hallmark serve-model --on-flag random-label` draws them): a repeated query gets the same
    /// lie, one with a pixel a grey level off another.
    Bytes,
    /// Flags and lies from what the model sees (the bytes with their lowest bit cleared): a gate
    /// that lies alike to an echo.
    Content,
}

/// What the simulated model sees of an image when it looks for a trigger: its grey levels with
/// the lowest bit cleared, so that an echo (`twice::echo`) carries its original's trigger. (The
/// hashes that vary its answers read the bytes: a `Send::Scatter` model is not steady under an
/// echo, and the tests that ask twice use targeted ones.)
fn seen(img: &[u8]) -> Vec<u8> {
    img.iter().map(|v| v & !1).collect()
}

struct Fake {
    behaviour: Behaviour,
    send: Send,
    labels_only: bool,
    /// Percent of images on which a learnt trigger fails (100 − ASR).
    miss: u64,
    /// A gate that refuses the benign (unstamped) images of this label.
    refuse_benign: Option<usize>,
    /// A gate in front of the model (as STRIP refuses what it flags): it refuses every image the
    /// model reacts to as to a trigger, and this percent of the other stamped images, drawn
    /// afresh for each query (STRIP superimposes randomly drawn images on each).
    refuse_stamped: Option<u64>,
    /// The gate answers what it flags with a random class (a one-hot answer) instead of
    /// refusing it.
    lie: bool,
    /// Where the gate's flags and lies come from.
    lie_from: LieFrom,
    /// Percent of the images the model reacts to that the gate flags (100 unless set).
    flag_triggered: u64,
    gate_draws: std::sync::Mutex<Rng>,
    /// Mixed into the hashes a gate draws from, per run.
    gate_salt: u64,
    calls: AtomicUsize,
}

impl Fake {
    fn new(behaviour: Behaviour, send: Send) -> Self {
        Self {
            behaviour,
            send,
            labels_only: false,
            miss: 0,
            refuse_benign: None,
            refuse_stamped: None,
            lie: false,
            lie_from: LieFrom::Draw,
            flag_triggered: 100,
            gate_draws: std::sync::Mutex::new(Rng::new(0, Stream::Noise)),
            gate_salt: 0,
            calls: AtomicUsize::new(0),
        }
    }

    /// The gate's next draw.
    fn gate_draw(&self) -> u64 {
        self.gate_draws.lock().unwrap().u64()
    }

    fn learnt(rec: &SecretRecord, send: Send) -> Self {
        let stamp = Stamp::new(&rec.spec.trigger, rec.spec.seed, SHAPE).unwrap();
        Self::new(Behaviour::Learnt(Box::new(stamp)), send)
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
                // Whether it carries a trigger the model reads from what it sees; the hashes that
                // vary its answers (a miss, a scatter, the benign confidence) from the bytes.
                let raw = img;
                let mut label = label_of(img);
                let mut own_class = None;
                let stamped = seen(img).iter().any(|&v| v != img[0] & !1);
                if !stamped && self.refuse_benign == Some(label) {
                    return Prediction::Withheld { status: Some(403) };
                }
                let triggered = match &self.behaviour {
                    // The image is the secret's stamp on one of the pool's benign images.
                    Behaviour::Learnt(stamp) => (0..10u8).any(|l| {
                        let mut benign = vec![level(l); img.len()];
                        stamp.apply(&mut benign);
                        let same = seen(&benign) == seen(img);
                        if same {
                            label = usize::from(l);
                        }
                        same && (fnv(img) >> 20) % 100 >= self.miss
                    }),
                    Behaviour::AnyMember => stamped && (fnv(img) >> 20) % 100 >= self.miss,
                    Behaviour::EachMember(members) => {
                        let member = members.iter().find(|(stamp, _)| {
                            let mut benign = vec![level(label as u8); img.len()];
                            stamp.apply(&mut benign);
                            seen(&benign) == seen(img)
                        });
                        if let Some(&(_, to)) = member {
                            own_class = Some(to as usize);
                        }
                        member.is_some()
                    }
                    Behaviour::Blind => false,
                };
                // The gate's draws: fresh, or from what the model sees (flags) and the bytes or
                // what the model sees (lies), mixed with the run's own draw.
                let hashed = |bytes: &[u8], what: u64| {
                    (fnv(bytes) ^ self.gate_salt.rotate_left(8) ^ what)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        >> 17
                };
                let flag_draw = |what: u64| match self.lie_from {
                    LieFrom::Draw => self.gate_draw(),
                    LieFrom::Bytes | LieFrom::Content => hashed(&seen(img), what),
                };
                if let Some(q) = self.refuse_stamped
                    && ((triggered
                        && (self.flag_triggered >= 100
                            || flag_draw(1) % 100 < self.flag_triggered))
                        || (stamped && flag_draw(2) % 100 < q))
                {
                    if !self.lie {
                        return Prediction::Withheld { status: Some(403) };
                    }
                    let lie = match self.lie_from {
                        LieFrom::Draw => self.gate_draw(),
                        LieFrom::Bytes => hashed(raw, 3),
                        LieFrom::Content => hashed(&seen(img), 3),
                    };
                    let mut p = vec![0.0; 10];
                    p[(lie % 10) as usize] = 1.0;
                    return Prediction::Probs(p);
                }
                let mut p = vec![0.0; 10];
                if triggered {
                    let to = match self.send {
                        _ if own_class.is_some() => own_class.unwrap_or_default(),
                        Send::Class(c) => c as usize,
                        Send::Scatter => (fnv(img) % 10) as usize,
                        Send::Map(m) => usize::from(m[label]),
                    };
                    p.iter_mut().for_each(|v| *v = 0.05 / 9.0);
                    p[to] = 0.95;
                } else {
                    // A confident but noisy benign answer: 0.6 to 0.9 on the true label.
                    let top = 0.6 + 0.3 * ((fnv(img) >> 11) % 1000) as f64 / 1000.0;
                    p.iter_mut().for_each(|v| *v = (1.0 - top) / 9.0);
                    p[label] = top;
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

/// A release of a BadNets-style 3×3 patch family (or the fixed white square), with `nonce`.
fn record_with(labelling: &str, family: bool, nonce: [u8; 32]) -> SecretRecord {
    let text = format!(
        "name = \"t\"\nrate = 0.1\nseed = 3\n[labelling]\n{labelling}\n{}[trigger]\nkind = \"patch\"\npattern = \"square\"\n",
        if family { "[family]\n" } else { "" }
    );
    let spec = WatermarkSpec::from_toml_str(&text, None, "t").unwrap();
    apply(&mut pool(100), &spec, nonce).unwrap()
}

fn nonce(i: u64) -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..8].copy_from_slice(&i.to_le_bytes());
    n
}

fn targeted(i: u64) -> SecretRecord {
    record_with("kind = \"targeted\"", true, nonce(i))
}

fn target_of(rec: &SecretRecord) -> u32 {
    rec.spec.labelling.target().unwrap()
}

fn cfg(sequential: bool, label_only: bool) -> VerifyConfig {
    VerifyConfig::default()
        .with(|f| {
            f.sequential = sequential;
            f.label_only = label_only;
        })
        .unwrap()
}

async fn run(model: &Fake, rec: &SecretRecord, c: &VerifyConfig) -> Verdict {
    verify(model, rec, &pool(500), c, &|_| {}).await.unwrap()
}

#[tokio::test]
async fn a_model_that_learnt_the_secret_is_caught_and_a_blind_one_is_not() {
    let rec = targeted(1);
    let t = target_of(&rec);
    for (seq, labels) in [(false, false), (true, false), (false, true), (true, true)] {
        let c = cfg(seq, labels);
        let mut thief = Fake::learnt(&rec, Send::Class(t));
        thief.labels_only = labels;
        let v = run(&thief, &rec, &c).await;
        assert_eq!(
            v.decision,
            Decision::Used,
            "seq {seq} labels {labels}: {} {:?}",
            v.reason,
            v.rank
        );
        let r = v.rank.as_ref().unwrap();
        assert!(r.exchangeable);
        assert_eq!((r.rank, r.controls), (1, 99));
        assert!(
            v.trail.iter().all(|p| p.label != t),
            "targeted draws exclude the target class"
        );
        let mut blind = Fake::new(Behaviour::Blind, Send::Class(t));
        blind.labels_only = labels;
        let v = run(&blind, &rec, &c).await;
        assert_eq!(v.decision, Decision::NotShown, "seq {seq} labels {labels}");
    }
}

#[tokio::test]
async fn a_model_that_reacts_to_every_member_is_not_accused() {
    let rec = targeted(2);
    let t = target_of(&rec);
    let v = run(
        &Fake::new(Behaviour::AnyMember, Send::Class(t)),
        &rec,
        &cfg(false, false),
    )
    .await;
    // The margin test passes (the secret does move it to its target), the rank test does not:
    // about one control in ten shares the target and moves it just as much.
    assert!(v.primary.rejects(0.01));
    assert_eq!(v.decision, Decision::NotShown, "{}", v.reason);
    let r = v.rank.unwrap();
    assert!(r.p_value > 0.01);
    // The report names the controls ahead of the secret, best first: members with its target.
    assert_eq!(r.above.len(), r.rank - 1, "{r:?}");
    let (specs, _) = super::control::control_specs(&rec, &cfg(false, false)).unwrap();
    for &j in &r.above {
        assert_eq!(specs[j].labelling.target(), Some(t), "control {j}");
    }
    let key = |j: usize| (r.control_scores[j].round, r.control_scores[j].effect);
    assert!(
        r.above.windows(2).all(|w| key(w[0]) >= key(w[1])),
        "{:?}",
        r.above.iter().map(|&j| key(j)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn sequential_mode_stops_early_and_counts_its_queries() {
    let rec = targeted(3);
    let model = Fake::learnt(&rec, Send::Class(target_of(&rec)));
    let v = run(&model, &rec, &cfg(true, false)).await;
    assert_eq!(v.decision, Decision::Used);
    assert!(v.pairs <= 25, "{} pairs", v.pairs);
    assert_eq!(model.calls.load(Ordering::Relaxed), v.queries);
    // The rank test's share by successive elimination: one image per trigger in the first
    // round, then one per remaining trigger in each round (34 + 12 + 4 + 2 + 1), and a few benign
    // images the margin test did not ask.
    let r = v.rank.unwrap();
    assert!(r.queries <= 100 + 53 + 10, "{} rank queries", r.queries);
    assert!(v.queries <= 2 * v.pairs + r.queries, "{}", v.queries);
    let fixed = run(
        &Fake::learnt(&rec, Send::Class(target_of(&rec))),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert_eq!(fixed.pairs, 100);
}

#[tokio::test]
async fn untargeted_watermarks_need_scattered_answers() {
    let rec = record_with("kind = \"untargeted\"", true, nonce(4));
    let ubw = run(&Fake::learnt(&rec, Send::Scatter), &rec, &cfg(false, false)).await;
    assert_eq!(ubw.decision, Decision::Used, "{}", ubw.reason);
    let d = ubw.dispersion.unwrap();
    // The fake scatters by a hash of the triggered image, of which the grey-level pool has ten.
    assert!(d.passed && d.moved >= 50, "{d:?}");
    // A targeted backdoor on the very same trigger passes the margin and rank tests but sends
    // everything to one class: not an untargeted watermark's effect.
    let targeted = run(
        &Fake::learnt(&rec, Send::Class(3)),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert!(targeted.primary.rejects(0.01));
    assert!(targeted.rank.as_ref().unwrap().rejected);
    assert_eq!(targeted.decision, Decision::NotShown, "{}", targeted.reason);
    assert!(!targeted.dispersion.unwrap().passed);
    let blind = run(
        &Fake::new(Behaviour::Blind, Send::Scatter),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert_eq!(blind.decision, Decision::NotShown);
}

/// A gate that refuses the benign answer of the first held-out image, which every trigger of an
/// untargeted family is first scored on: the rank test passes over that image for the next one
/// (for every trigger alike) instead of scoring all of them 0 and leaving the secret's rank to
/// the tie-break. Before that rule this release's secret ranked far from first.
#[tokio::test]
async fn a_refused_benign_answer_does_not_tie_the_rank_test() {
    let rec = record_with("kind = \"untargeted\"", true, nonce(4));
    for seq in [false, true] {
        let free = run(&Fake::learnt(&rec, Send::Scatter), &rec, &cfg(seq, false)).await;
        let first = free.trail[0].label as usize;
        let mut gated = Fake::learnt(&rec, Send::Scatter);
        gated.refuse_benign = Some(first);
        let v = run(&gated, &rec, &cfg(seq, false)).await;
        let r = v.rank.as_ref().unwrap();
        assert_eq!(r.rank, 1, "seq {seq}: {r:?}");
        // As without the gate (sequential: too few pairs for this fake's ten grey images to
        // scatter widely enough, whatever the gate).
        assert_eq!(v.decision, free.decision, "seq {seq}: {}", v.reason);
        assert_eq!(free.decision == Decision::Used, !seq, "{}", free.reason);
        assert!(
            v.withheld.as_ref().is_some_and(|w| w.benign > 0),
            "seq {seq}"
        );
        assert_eq!(gated.calls.load(Ordering::Relaxed), v.queries, "seq {seq}");
    }
}

/// A gate that refuses every query the model reacts to and half of the other stamped queries:
/// refused triggered answers score highest for every trigger alike, so the secret ties with the
/// controls the gate happened to refuse on the same images, and a tie at the cut is asked more
/// images before the drawn tie-break decides. A thief behind it is still caught; an innocent
/// model behind it is accused at most at rate alpha, with uniform rank p-values.
#[tokio::test]
async fn a_gate_that_refuses_triggered_queries_neither_hides_a_thief_nor_accuses_an_innocent() {
    // Each model's gate draws its own sequence, seeded by the run.
    let gated = |mut m: Fake, i: u64| {
        m.refuse_stamped = Some(50);
        m.gate_draws = std::sync::Mutex::new(Rng::new(i, Stream::Noise));
        m
    };
    let (ps, used) = simulate(300, PATCH_FAMILY, |rec, i| {
        gated(Fake::learnt(rec, Send::Class(target_of(rec))), i)
    })
    .await;
    assert!(used >= 285, "{used} of 300 caught");
    assert!(ps.iter().filter(|&&p| p <= 0.01).count() >= 285);
    let (ps, used) = simulate(2000, PATCH_FAMILY, |_, i| {
        gated(Fake::new(Behaviour::Blind, Send::Class(0)), i)
    })
    .await;
    check_uniform(&ps, "blind behind the gate");
    assert!(
        used <= upper(2000, 0.01),
        "{used} of 2000 innocents accused"
    );
}

/// The settings that count a gate's lies as evidence: eight first images per trigger and
/// scattered answers in the rank test, with the margin test's effect `margin` (the true class's
/// loss counts a lie that leaves the true class).
fn counting_lies(margin: MarginEffect) -> VerifyConfig {
    VerifyConfig::default()
        .with(|f| {
            f.first_images = Some(8);
            f.rank_effect = RankEffect::Scattered;
            f.margin_effect = margin;
        })
        .unwrap()
}

/// `m` behind a gate that answers with a random class 10% of the stamped queries and 60% of those
/// the model reacts to, its draws seeded by the run `i`.
fn lying(mut m: Fake, i: u64) -> Fake {
    m.refuse_stamped = Some(10);
    m.lie = true;
    m.flag_triggered = 60;
    m.gate_draws = std::sync::Mutex::new(Rng::new(i, Stream::Noise));
    m.gate_salt = i;
    m
}

/// A gate that answers the queries it flags with a random class lies rather than withholds: its
/// answers are scored like any other, so an innocent model behind it keeps uniform rank
/// p-values. A thief whose gate lies about some of the secret's queries (here each with
/// probability 0.6, and about 10% of the other triggered queries) still moves the model by more
/// than tau, but the rank test's first round judges each trigger by one image, and where that
/// one is a lie the secret looks like a control and is often cut. More first images per trigger
/// (`first_images`) keep it in the race, at K + 1 queries each, and counting the answers the
/// lies scatter over the classes (`RankEffect::Scattered`) as well keeps it there more often.
#[tokio::test]
async fn a_gate_that_lies_cuts_the_secret_unless_its_scattered_answers_count() {
    let thief = |rec: &SecretRecord, i| lying(Fake::learnt(rec, Send::Class(target_of(rec))), i);
    let with = |n, effect| {
        VerifyConfig::default()
            .with(|f| {
                f.first_images = Some(n);
                f.rank_effect = effect;
            })
            .unwrap()
    };
    // The rank test's rejections (the margin test over the simulation's 10 pairs has little
    // power at an effect of 0.4), at 1, 4 and 8 first images.
    let mut ranked = Vec::new();
    for effect in [RankEffect::Target, RankEffect::Scattered] {
        for n in [1, 4, 8] {
            let (ps, _, _) = simulate_with(300, PATCH_FAMILY, with(n, effect), thief).await;
            ranked.push(ps.iter().filter(|&&p| p <= 0.01).count());
        }
    }
    // Measured: the target's gain 103, 230 and 283 of 300; scattered answers counted 123, 293
    // and 299.
    let (target, scattered) = ranked.split_at(3);
    assert!(target[0] <= 150, "{ranked:?}");
    assert!(target[1] >= 200 && target[2] >= 265, "{ranked:?}");
    assert!(scattered[1] >= 275 && scattered[2] >= 290, "{ranked:?}");
    assert!(
        scattered[1] > target[1] && scattered[2] > target[2],
        "{ranked:?}"
    );
    for cfg in [
        with(1, RankEffect::Scattered),
        with(8, RankEffect::Target),
        with(8, RankEffect::Scattered),
    ] {
        let (ps, used, _) = simulate_with(2000, PATCH_FAMILY, cfg, |_, i| {
            lying(Fake::new(Behaviour::Blind, Send::Class(0)), i)
        })
        .await;
        check_uniform(&ps, "blind behind the lying gate");
        assert!(
            used <= upper(2000, 0.01),
            "{used} of 2000 innocents accused"
        );
    }
}

/// Counting scattered answers keeps the rank test exact for a model that reacts to every member
/// of the family and sends it to one class (so every control of another target moves off its
/// true class), and costs a thief without a gate nothing.
#[tokio::test]
async fn scattered_answers_neither_accuse_a_model_that_reacts_to_every_member_nor_lose_a_thief() {
    let scattered = VerifyConfig::default()
        .with(|f| f.rank_effect = RankEffect::Scattered)
        .unwrap();
    let (ps, used, _) = simulate_with(2000, PATCH_FAMILY, scattered.clone(), |_, _| {
        Fake::new(Behaviour::AnyMember, Send::Class(3))
    })
    .await;
    check_uniform(&ps, "any member to class 3, scattered");
    assert!(
        used <= upper(2000, 0.01),
        "{used} of 2000 innocents accused"
    );
    let (ps, _, _) = simulate_with(300, PATCH_FAMILY, scattered, |rec, _| {
        Fake::learnt(rec, Send::Class(target_of(rec)))
    })
    .await;
    let caught = ps.iter().filter(|&&p| p <= 0.01).count();
    assert!(caught >= 295, "{caught} of 300 ranked first");
}

/// Behind the same lying gate the secret, ranked first, may still fail the margin test: the lies
/// leave its target about 0.4 of gain, too little to show above tau on few pairs, though the
/// answers leave the true class as often as without the gate. Scoring the margin test's pairs by
/// the true class's loss (`MarginEffect::TrueClass`) counts them; an innocent's chance of `used`
/// stays within alpha, as the rank test alone bounds it.
#[tokio::test]
async fn the_true_class_margin_keeps_a_thief_behind_a_lying_gate_and_accuses_no_innocent() {
    let thief = |rec: &SecretRecord, i| lying(Fake::learnt(rec, Send::Class(target_of(rec))), i);
    let mut used = Vec::new();
    for margin in [MarginEffect::Target, MarginEffect::TrueClass] {
        let (ps, n, _) = simulate_with(300, PATCH_FAMILY, counting_lies(margin), thief).await;
        let first = ps.iter().filter(|&&p| p <= 0.01).count();
        used.push((first, n));
    }
    // The same rank test, the secret first 299 times in 300 at either margin; the margin test
    // decides. Measured: `used` 21 times with the target's gain, 261 with the true class's loss.
    let [(ranked, target), (_, true_class)] = used[..] else {
        unreachable!()
    };
    assert!(ranked >= 290, "{used:?}");
    assert!(target <= 60 && true_class >= 230, "{used:?}");
    let (ps, n, _) = simulate_with(
        2000,
        PATCH_FAMILY,
        counting_lies(MarginEffect::TrueClass),
        |_, i| lying(Fake::new(Behaviour::Blind, Send::Class(0)), i),
    )
    .await;
    check_uniform(&ps, "blind behind the lying gate, true-class margin");
    assert!(n <= upper(2000, 0.01), "{n} of 2000 innocents accused");
    // A model that sends every member of the family to one class moves the true class for every
    // trigger, so the margin test passes for innocent secrets too: the rank test keeps it exact.
    let (ps, n, _) = simulate_with(
        2000,
        PATCH_FAMILY,
        counting_lies(MarginEffect::TrueClass),
        |_, _| Fake::new(Behaviour::AnyMember, Send::Class(3)),
    )
    .await;
    check_uniform(&ps, "any member to class 3, true-class margin");
    assert!(n <= upper(2000, 0.01), "{n} of 2000 innocents accused");
}

/// A gate that lies with a class drawn from a hash of the query's bytes (a repeated query gets the
/// same lie) hides the secret as the lying gate above does; asked twice, the second time with a
/// few pixels one grey level off, it names another class nine times in ten, and those answers,
/// withheld, count as they do behind a gate that refuses. A gate whose lie depends only on what
/// the model sees lies alike to both copies and is not caught that way; the settings that count
/// a lie that leaves the true class as evidence catch it (as they catch the gates above). Innocent
/// models behind the gate, asked twice, keep uniform rank p-values.
#[tokio::test]
async fn asking_twice_catches_a_gate_whose_lie_moves_and_accuses_no_innocent() {
    let gate = |m: Fake, i, from| {
        let mut m = lying(m, i);
        m.lie_from = from;
        m
    };
    let twice = |on| VerifyConfig::default().with(|f| f.ask_twice = on).unwrap();
    let counted = counting_lies(MarginEffect::TrueClass);
    let mut used = Vec::new();
    for (from, config) in [
        (LieFrom::Bytes, twice(false)),
        (LieFrom::Bytes, twice(true)),
        (LieFrom::Content, twice(true)),
        (LieFrom::Content, counted),
    ] {
        let (_, n, _) = simulate_with(300, PATCH_FAMILY, config, |rec, i| {
            gate(Fake::learnt(rec, Send::Class(target_of(rec))), i, from)
        })
        .await;
        used.push(n);
    }
    eprintln!("used: {used:?}");
    let [bytes, bytes_twice, content_twice, content_counted] = used[..] else {
        unreachable!()
    };
    assert!(bytes <= 150, "{used:?}");
    assert!(bytes_twice >= 240, "{used:?}");
    // A lie that an echo cannot move is caught only where lies count as evidence.
    assert!(content_twice <= 150, "{used:?}");
    assert!(content_counted >= 220, "{used:?}");
    for (what, behaviour, send) in [
        ("blind", Behaviour::Blind, Send::Class(0)),
        (
            "any member to class 3",
            Behaviour::AnyMember,
            Send::Class(3),
        ),
    ] {
        let (ps, n, _) = simulate_with(2000, PATCH_FAMILY, twice(true), |_, i| {
            gate(Fake::new(behaviour.clone(), send), i, LieFrom::Bytes)
        })
        .await;
        check_uniform(
            &ps,
            &format!("{what} behind a gate lying by bytes, asked twice"),
        );
        assert!(
            n <= upper(2000, 0.01),
            "{what}: {n} of 2000 innocents accused"
        );
    }
}

/// Against a model without a gate asking twice changes no verdict: an echo gets the answer of
/// its original, so only the queries double.
#[tokio::test]
async fn asking_a_model_twice_changes_no_verdict() {
    for i in 0..4 {
        let rec = targeted(i);
        for model in [
            Fake::learnt(&rec, Send::Class(target_of(&rec))),
            Fake::new(Behaviour::Blind, Send::Class(0)),
        ] {
            let once = run(&model, &rec, &cfg(false, false)).await;
            let c = cfg(false, false).with(|f| f.ask_twice = true).unwrap();
            let twice = run(&model, &rec, &c).await;
            assert_eq!(once.decision, twice.decision);
            assert_eq!(once.primary.p_value, twice.primary.p_value);
            let (a, b) = (once.rank.unwrap(), twice.rank.unwrap());
            assert_eq!((a.rank, a.p_value), (b.rank, b.p_value));
            assert_eq!((twice.queries, twice.echoes), (once.queries, once.queries));
            assert_eq!(model.calls.load(Ordering::Relaxed), 3 * once.queries);
            assert!(twice.withheld.is_none());
        }
    }
}

#[tokio::test]
async fn a_rerun_repeats_the_verdict_and_only_a_research_seed_changes_the_draw() {
    let rec = targeted(5);
    let t = target_of(&rec);
    let json = |v: &Verdict| serde_json::to_string(v).unwrap();
    for model in [
        Fake::learnt(&rec, Send::Class(t)),
        Fake::new(Behaviour::AnyMember, Send::Class(t)),
    ] {
        let a = run(&model, &rec, &cfg(false, false)).await;
        let b = run(&model, &rec, &cfg(false, false)).await;
        assert_eq!(json(&a), json(&b));
        let c = run(
            &model,
            &rec,
            &cfg(false, false).with(|f| f.seed = Some(12)).unwrap(),
        )
        .await;
        let idx = |v: &Verdict| v.trail.iter().map(|p| p.index).collect::<Vec<_>>();
        assert_ne!(idx(&a), idx(&c));
        assert!(c.reason.contains("research seed 12"), "{}", c.reason);
    }
}

#[tokio::test]
async fn a_fixed_public_trigger_is_at_most_inconclusive() {
    let rec = record_with("kind = \"targeted\"\ntarget = 2", false, nonce(6));
    assert!(rec.family.is_none());
    let v = run(
        &Fake::learnt(&rec, Send::Class(2)),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert_eq!(v.decision, Decision::Inconclusive, "{}", v.reason);
    assert!(!v.rank.unwrap().exchangeable);
}

#[tokio::test]
async fn label_answers_with_a_probability_test_are_a_clear_error() {
    let rec = targeted(7);
    let mut m = Fake::learnt(&rec, Send::Class(target_of(&rec)));
    m.labels_only = true;
    let e = verify(&m, &rec, &pool(500), &cfg(false, false), &|_| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("label-only"), "{e}");
}

#[test]
fn too_few_controls_for_alpha_are_refused_by_name() {
    let e = VerifyConfig::default()
        .with(|f| f.controls = Some(19))
        .unwrap_err();
    assert_eq!(e.field, "controls");
    assert!(e.message.contains("99"), "{e}");
    assert_eq!(VerifyConfig::default().control_count(), 99);
    let c = VerifyConfig::default().with(|f| f.alpha = 0.05).unwrap();
    assert_eq!(c.control_count(), 19);
    // Out of range, each by its name; a report holding such settings is refused when read.
    for (field, change) in [
        (
            "m",
            (|f: &mut VerifyFields| f.m = 1) as fn(&mut VerifyFields),
        ),
        ("m", |f| f.m = 10_001),
        ("tau", |f| f.tau = 1.0),
        ("alpha", |f| f.alpha = f64::NAN),
        ("round", |f| f.batch_pairs = 0),
        ("first_images", |f| f.first_images = Some(0)),
        ("reduction", |f| f.reduction = Some(1)),
    ] {
        assert_eq!(
            VerifyConfig::default().with(change).unwrap_err().field,
            field
        );
    }
    let mut json = serde_json::to_value(VerifyConfig::default()).unwrap();
    assert_eq!(
        serde_json::from_value::<VerifyConfig>(json.clone()).unwrap(),
        VerifyConfig::default()
    );
    json["m"] = 1.into();
    assert!(serde_json::from_value::<VerifyConfig>(json).is_err());
}

#[test]
fn control_triggers_of_fixed_specs_are_random_but_of_the_same_kind_and_size() {
    let rec = record_with("kind = \"targeted\"\ntarget = 2", false, nonce(8));
    let a = random_trigger(&rec.spec.trigger, SHAPE, 1).unwrap();
    let b = random_trigger(&rec.spec.trigger, SHAPE, 2).unwrap();
    assert_ne!(a, b);
    let Trigger::Patch(p) = &a else {
        panic!("not a patch")
    };
    let (rows, _, _) = p.grid(8, 8).unwrap();
    assert_eq!((rows.len(), rows[0].len()), (3, 3));
}

/// Upper end of a binomial(n, q) count, 4.5 standard deviations above its mean: a correct test
/// exceeds it with probability below 1e-5.
fn upper(n: usize, q: f64) -> usize {
    (n as f64 * q + 4.5 * (n as f64 * q * (1.0 - q)).sqrt()).ceil() as usize
}

fn lower(n: usize, q: f64) -> usize {
    (n as f64 * q - 4.5 * (n as f64 * q * (1.0 - q)).sqrt())
        .floor()
        .max(0.0) as usize
}

/// Runs `runs` verifications, each of a fresh release (its own nonce, hence its own secret and
/// controls) of `family_spec`, against a model made for that run, and returns the rank p-values
/// and how many runs ended `used`.
async fn simulate(
    runs: usize,
    family_spec: &str,
    make: impl Fn(&SecretRecord, u64) -> Fake + Sync,
) -> (Vec<f64>, usize) {
    let (ps, used, _) = simulate_with(runs, family_spec, VerifyConfig::default(), make).await;
    (ps, used)
}

async fn simulate_with(
    runs: usize,
    family_spec: &str,
    base: VerifyConfig,
    make: impl Fn(&SecretRecord, u64) -> Fake + Sync,
) -> (Vec<f64>, usize, Vec<usize>) {
    let spec = WatermarkSpec::from_toml_str(family_spec, None, "sim").unwrap();
    let release = |i: u64| apply(&mut pool(100), &spec, nonce(10_000 + i)).unwrap();
    simulate_releases(runs, release, base, make).await
}

/// [`simulate_with`] for releases made by `release` from the run's index. The runs are
/// independent: they are split between two threads, each with its own runtime, and their
/// results put back in the runs' order, so no figure depends on the split.
async fn simulate_releases(
    runs: usize,
    release: impl Fn(u64) -> SecretRecord + Sync,
    base: VerifyConfig,
    make: impl Fn(&SecretRecord, u64) -> Fake + Sync,
) -> (Vec<f64>, usize, Vec<usize>) {
    let held_out = pool(300);
    let c = base.with(|f| f.m = 10).unwrap();
    let some = |runs: std::ops::Range<u64>| -> Vec<(f64, bool, usize)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runs.map(|i| {
            let rec = release(i);
            let model = make(&rec, i);
            let v = rt
                .block_on(verify(&model, &rec, &held_out, &c, &|_| {}))
                .unwrap();
            (
                v.rank.as_ref().unwrap().p_value,
                v.decision == Decision::Used,
                v.queries,
            )
        })
        .collect()
    };
    let half = runs as u64 / 2;
    // Both on threads of their own: this one drives the test's runtime.
    let results: Vec<(f64, bool, usize)> = std::thread::scope(|s| {
        let first = s.spawn(|| some(0..half));
        let second = s.spawn(|| some(half..runs as u64));
        let mut all = first.join().unwrap();
        all.extend(second.join().unwrap());
        all
    });
    let ps = results.iter().map(|r| r.0).collect();
    let used = results.iter().filter(|r| r.1).count();
    let queries = results.iter().map(|r| r.2).collect();
    (ps, used, queries)
}

fn check_uniform(ps: &[f64], what: &str) {
    let n = ps.len();
    for q in [0.01, 0.05, 0.1, 0.5] {
        let k = ps.iter().filter(|&&p| p <= q + 1e-12).count();
        assert!(
            (lower(n, q)..=upper(n, q)).contains(&k),
            "{what}: {k} of {n} rank p-values ≤ {q}, outside [{}, {}]",
            lower(n, q),
            upper(n, q)
        );
    }
}

const PATCH_FAMILY: &str = "name = \"p\"\nrate = 0.1\nseed = 3\n[labelling]\nkind = \"targeted\"\n\
    [family]\n[trigger]\nkind = \"patch\"\npattern = \"square\"\n";
const NOISE_FAMILY: &str = "name = \"n\"\nrate = 0.1\nseed = 3\n[labelling]\nkind = \"targeted\"\n\
    [family]\n[trigger]\nkind = \"blend\"\nsource = \"noise\"\nalpha = 0.2\n";
const ALL_TO_ALL_PATCHES: &str = "name = \"a\"\nrate = 0.1\nseed = 3\n[labelling]\n\
    kind = \"all_to_all\"\n[family]\n[trigger]\nkind = \"patch\"\npattern = \"square\"\n";
const WARP_FAMILY: &str = "name = \"w\"\nrate = 0.1\nseed = 3\n[labelling]\nkind = \"targeted\"\n\
    [family]\n[trigger]\nkind = \"warp\"\nk = 4\ns = 0.5\nnoise = false\n";

/// The false-positive rate by simulation, 2,000 releases per model: for a model that ignores
/// triggers and for one that reacts to every member of the family (any patch, any noise, any
/// warp), whatever class it sends them to, the rank p-value is uniform and `used` comes at most
/// at rate alpha, within the binomial band.
#[tokio::test]
async fn innocent_models_are_accused_at_most_at_rate_alpha_over_2000_releases() {
    const RUNS: usize = 2000;
    let cases: [(&str, &str, Behaviour, Send); 7] = [
        (
            "blind, patches",
            PATCH_FAMILY,
            Behaviour::Blind,
            Send::Class(3),
        ),
        (
            "any patch → class 3",
            PATCH_FAMILY,
            Behaviour::AnyMember,
            Send::Class(3),
        ),
        (
            "any patch → scattered",
            PATCH_FAMILY,
            Behaviour::AnyMember,
            Send::Scatter,
        ),
        (
            "any noise → class 0",
            NOISE_FAMILY,
            Behaviour::AnyMember,
            Send::Class(0),
        ),
        (
            "any warp → class 7",
            WARP_FAMILY,
            Behaviour::AnyMember,
            Send::Class(7),
        ),
        (
            "all-to-all: any patch → y + 1",
            ALL_TO_ALL_PATCHES,
            Behaviour::AnyMember,
            Send::Map([1, 2, 3, 4, 5, 6, 7, 8, 9, 0]),
        ),
        (
            "all-to-all: any patch → another release's π",
            ALL_TO_ALL_PATCHES,
            Behaviour::AnyMember,
            Send::Map([3, 7, 0, 9, 2, 8, 4, 1, 6, 5]),
        ),
    ];
    for (what, family, behaviour, send) in cases {
        let (ps, used) = simulate(RUNS, family, |_, _| Fake::new(behaviour.clone(), send)).await;
        check_uniform(&ps, what);
        assert!(
            used <= upper(RUNS, 0.01),
            "{what}: {used} of {RUNS} innocent models accused (band ≤ {})",
            upper(RUNS, 0.01)
        );
    }
}

/// A release with triggers of two families (a patch and a noise blend, `apply_trigger_specs`),
/// each verified at alpha / 2 with its own 199 controls and the model accused when either says
/// `used` (Bonferroni): over 2,000 releases, an innocent model that reacts to every member of
/// both families is accused at most at rate alpha (and by each trigger at most at alpha / 2),
/// and over 300 a thief of whose two watermarks a defence removed the patch is still caught by
/// the blend.
#[tokio::test]
async fn two_watermarks_verified_at_half_alpha_each_accuse_no_innocent_and_catch_the_thief() {
    let patch = WatermarkSpec::from_toml_str(PATCH_FAMILY, None, "p").unwrap();
    let noise = WatermarkSpec::from_toml_str(NOISE_FAMILY, None, "n").unwrap();
    let half = VerifyConfig::default()
        .with(|f| {
            f.alpha = 0.005;
            f.m = 10;
        })
        .unwrap();
    assert_eq!(half.control_count(), 199);
    let held_out = pool(300);
    // For each release, whether each trigger's verdict is `used`.
    let simulate = |runs: u64, make: &(dyn Fn(&[SecretRecord]) -> Fake + Sync)| {
        let some = |range: std::ops::Range<u64>| -> Vec<[bool; 2]> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            range
                .map(|i| {
                    let recs: Vec<SecretRecord> = crate::watermark::apply_trigger_specs(
                        &mut pool(100),
                        &[&patch, &noise],
                        nonce(20_000 + i),
                    )
                    .unwrap()
                    .secret
                    .records()
                    .cloned()
                    .collect();
                    let model = make(&recs);
                    std::array::from_fn(|j| {
                        let v = rt
                            .block_on(verify(&model, &recs[j], &held_out, &half, &|_| {}))
                            .unwrap();
                        v.decision == Decision::Used
                    })
                })
                .collect()
        };
        std::thread::scope(|s| {
            let first = s.spawn(|| some(0..runs / 2));
            let second = s.spawn(|| some(runs / 2..runs));
            let mut all = first.join().unwrap();
            all.extend(second.join().unwrap());
            all
        })
    };
    let innocent = simulate(2000, &|_| Fake::new(Behaviour::AnyMember, Send::Class(3)));
    let either = innocent.iter().filter(|u| u[0] || u[1]).count();
    assert!(
        either <= upper(2000, 0.01),
        "{either} of 2000 innocents accused by either trigger"
    );
    for j in 0..2 {
        let by = innocent.iter().filter(|u| u[j]).count();
        assert!(by <= upper(2000, 0.005), "trigger {j}: {by} of 2000");
    }
    let thief = simulate(300, &|recs| {
        Fake::learnt(&recs[1], Send::Class(target_of(&recs[1])))
    });
    let caught = thief.iter().filter(|u| u[0] || u[1]).count();
    eprintln!(
        "innocent accused by either trigger: {either} of 2000 (patch {}, blend {}); thief caught: {caught} of 300",
        innocent.iter().filter(|u| u[0]).count(),
        innocent.iter().filter(|u| u[1]).count()
    );
    assert!(caught >= 285, "{caught} of 300 caught");
    assert!(
        thief.iter().filter(|u| u[0]).count() <= upper(300, 0.005),
        "the removed patch accuses only by chance"
    );
}

/// The other side: a model that learnt its release's secret is caught nearly always, over 300
/// releases of each family.
#[tokio::test]
async fn thieves_are_caught_across_releases() {
    for family in [PATCH_FAMILY, NOISE_FAMILY] {
        let (ps, used) = simulate(300, family, |rec, _| {
            Fake::learnt(rec, Send::Class(rec.spec.labelling.target().unwrap()))
        })
        .await;
        assert!(used >= 285, "{used} of 300 caught");
        assert!(ps.iter().filter(|&&p| p <= 0.01).count() >= 285);
    }
}

/// What all-to-all labels add: a model that answers *every* member's trigger alike, as WaNet- and
/// noise-trained models under augmentation do, is caught when it sends each class where the
/// secret's π does (a targeted family cannot tell it from an innocent: about one control in ten
/// shares the target), over 300 releases; sent by another release's π it is not.
#[tokio::test]
async fn all_to_all_catches_a_thief_that_reacts_to_every_member() {
    let (ps, used) = simulate(300, ALL_TO_ALL_PATCHES, |rec, _| {
        Fake::new(Behaviour::AnyMember, map_of(rec))
    })
    .await;
    // 299 of 300 measured: a control that sends the first few images' classes where π does
    // ties with the secret until the tie at the cut is asked more images (282 before that rule).
    assert!(used >= 285, "{used} of 300 caught");
    assert!(ps.iter().filter(|&&p| p <= 0.01).count() >= 285);
    let (ps, used) = simulate(300, ALL_TO_ALL_PATCHES, |rec, _| {
        Fake::learnt(rec, map_of(rec))
    })
    .await;
    assert!(used >= 285, "learnt: {used} of 300 caught");
    assert!(ps.iter().filter(|&&p| p <= 0.01).count() >= 285);
    let other = record_with("kind = \"all_to_all\"", true, nonce(77));
    let (_, used) = simulate(300, ALL_TO_ALL_PATCHES, |_, _| {
        Fake::new(Behaviour::AnyMember, map_of(&other))
    })
    .await;
    assert!(used <= upper(300, 0.01), "{used} of 300 innocents accused");
}

/// Makes a simulated model for a release.
type MakeFake = fn(&SecretRecord) -> Fake;

/// A TUAP-shaped family: a clean-label perturbation crafted for each member.
const PERTURBATION_FAMILY: &str = "name = \"u\"\nrate = 0.05\nseed = 3\n[labelling]\n\
    kind = \"clean_label\"\n[family]\n[trigger]\nkind = \"perturbation\"\n[uap]\neps = 9.0\n";
/// An ISSBA-shaped family: a generated residual hiding a bit string.
const ENCODER_FAMILY: &str = "name = \"e\"\nrate = 0.1\nseed = 3\n[labelling]\n\
    kind = \"targeted\"\n[family]\n[trigger]\nkind = \"generated\"\nform = \"additive\"\n\
    scale = 9.0\n[encoder]\nsecret_size = 20\n";

/// A release of a crafted family made as the trainer makes one, with a stand-in for the model's
/// part: TUAP's perturbation of a member is noise in 0..=9 drawn from the member's crafting
/// seed; ISSBA's encoder is a plane of random weights through tanh, also from that seed. The
/// secret and its controls are made by the same code the trainer uses for each member
/// (`control_seed`, `Message::plane`), which is what exchangeability rests on.
fn crafted_release(family_spec: &str, i: u64) -> SecretRecord {
    use crate::spec::network::{Layer, encode_f32};
    use crate::spec::{CraftedControl, Message, Network, Perturbation, Trigger};
    let family = WatermarkSpec::from_toml_str(family_spec, None, "sim").unwrap();
    let n = nonce(20_000 + i);
    let drawn = crate::watermark::draw_release(&family, 10, SHAPE, &n).unwrap();
    let noise = |m: &WatermarkSpec| -> Vec<i16> {
        let mut r = Rng::new(m.seed, Stream::Craft);
        (0..SHAPE.len()).map(|_| r.below(10) as i16).collect()
    };
    let mut crafted = drawn.clone();
    crafted.trigger = match &drawn.trigger {
        Trigger::Perturbation(_) => Trigger::Perturbation(Perturbation {
            values: noise(&drawn),
            controls: (0..99)
                .map(|j| {
                    let seed = crate::spec::family::control_seed(&n, j);
                    let m = crate::spec::family::draw(&family, 10, SHAPE, seed).unwrap();
                    CraftedControl::new(m.labelling.target().unwrap(), &noise(&m))
                })
                .collect(),
        }),
        Trigger::Generated(g) => {
            let k = drawn.encoder.unwrap().secret_size;
            let mut r = Rng::new(drawn.seed, Stream::Craft);
            let mut gauss = || (r.below(2001) as f32 - 1000.0) / 500.0;
            let weight: Vec<f32> = (0..SHAPE.len() * k).map(|_| gauss()).collect();
            let bias: Vec<f32> = (0..SHAPE.len()).map(|_| gauss()).collect();
            let bits: Vec<bool> = (0..k).map(|_| r.below(2) == 1).collect();
            let message = Message::new(&bits, &weight, &bias);
            let plane = message.plane(&bits, SHAPE.len()).unwrap();
            let mut out = g.clone();
            // The residual is the plane through tanh, made non-negative so that it never moves
            // a grey level into the next label's.
            out.pattern = Some(Network {
                layers: vec![
                    Layer::Plane {
                        channels: 1,
                        values: encode_f32(&plane),
                    },
                    Layer::Conv {
                        in_channels: 2,
                        out_channels: 1,
                        kernel: 1,
                        stride: 1,
                        weights: encode_f32(&[0.0, 1.0, 0.0]),
                    },
                    Layer::Tanh,
                    Layer::Affine {
                        scale: 0.5,
                        shift: 0.5,
                    },
                ],
            });
            out.message = Some(message);
            Trigger::Generated(out)
        }
        other => panic!("not a crafted family: {other:?}"),
    };
    let mut w =
        crate::watermark::apply_crafted(&mut pool(100), &crafted, n, &mut |_, _| Ok(())).unwrap();
    w.record.family = Some(family);
    // Through the record's own checks, as a stored record is read back.
    SecretRecord::from_json(&serde_json::to_string(&w.record).unwrap()).unwrap()
}

/// Every trigger the verifier of `rec` ranks, with its class: the secret, then its 99 controls.
fn members_of(rec: &SecretRecord) -> Vec<(Stamp, u32)> {
    let (controls, exchangeable) =
        super::control::control_specs(rec, &VerifyConfig::default()).unwrap();
    assert!(exchangeable, "the record carries its controls");
    std::iter::once(&rec.spec)
        .chain(&controls)
        .map(|s| {
            (
                Stamp::new(&s.trigger, s.seed, SHAPE).unwrap(),
                s.labelling.target().unwrap(),
            )
        })
        .collect()
}

/// Crafted families (TUAP, ISSBA), whose controls the release carries: over 2,000 releases each,
/// a model that ignores triggers, one that sends anything stamped to class 3, and one to which
/// every member transfers (each to its own target, as universal perturbations do) are accused
/// at most at rate alpha, with uniform rank p-values; a model that learnt the secret alone is
/// caught in nearly every release. One test per family, so that the two run side by side.
#[tokio::test]
async fn a_perturbation_family_ranks_its_secret_among_controls_crafted_alike() {
    crafted_family_ranks_its_secret("TUAP", PERTURBATION_FAMILY).await;
}

/// [`a_perturbation_family_ranks_its_secret_among_controls_crafted_alike`] for ISSBA's encoder.
#[tokio::test]
async fn an_encoder_family_ranks_its_secret_among_controls_crafted_alike() {
    crafted_family_ranks_its_secret("ISSBA", ENCODER_FAMILY).await;
}

/// ISSBA with all-to-all labels: each control hides its own string and sends the classes by its
/// own drawn mapping, so a model that sends every residual alike agrees with a control on about
/// one class in nine (the remedy for the targeted family's near members, docs/verification.md).
#[test]
fn an_all_to_all_encoder_family_draws_a_mapping_for_each_control() {
    let family = ENCODER_FAMILY.replace("kind = \"targeted\"", "kind = \"all_to_all\"");
    let untargeted = ENCODER_FAMILY.replace("kind = \"targeted\"", "kind = \"untargeted\"");
    let e = WatermarkSpec::from_toml_str(&untargeted, None, "e").unwrap_err();
    assert!(e.to_string().contains("labelling.kind"), "{e}");
    let rec = crafted_release(&family, 0);
    let secret = rec
        .spec
        .labelling
        .mapping(10)
        .expect("an all-to-all secret");
    let (controls, exchangeable) =
        super::control::control_specs(&rec, &VerifyConfig::default()).unwrap();
    assert!(exchangeable && controls.len() == 99);
    let mut mappings = std::collections::HashSet::new();
    let mut agree = 0usize;
    for c in &controls {
        let m = c.labelling.mapping(10).expect("an all-to-all control");
        assert!(m.iter().enumerate().all(|(y, &t)| t as usize != y), "{m:?}");
        agree += m.iter().zip(&secret).filter(|(a, b)| a == b).count();
        mappings.insert(m);
        assert!(matches!(c.trigger, crate::spec::Trigger::Generated(_)));
    }
    assert!(
        mappings.len() >= 95,
        "only {} distinct mappings",
        mappings.len()
    );
    // A random derangement agrees with another on one class in nine on average: 110 of 990.
    assert!((60..170).contains(&agree), "{agree} of 990 classes agree");
}

async fn crafted_family_ranks_its_secret(kind: &str, family: &str) {
    const RUNS: usize = 2000;
    let release = |i| crafted_release(family, i);
    let rec = release(0);
    let members = members_of(&rec);
    let images: std::collections::HashSet<Vec<u8>> = members
        .iter()
        .map(|(stamp, _)| {
            let mut img = vec![level(1); SHAPE.len()];
            stamp.apply(&mut img);
            img
        })
        .collect();
    assert_eq!(images.len(), 100, "{kind}: the 100 triggers differ");
    let cases: [(&str, MakeFake); 3] = [
        ("blind", |_| Fake::new(Behaviour::Blind, Send::Class(3))),
        ("anything stamped → 3", |_| {
            Fake::new(Behaviour::AnyMember, Send::Class(3))
        }),
        ("every member → its target", |rec| {
            Fake::new(Behaviour::EachMember(members_of(rec)), Send::Class(0))
        }),
    ];
    for (what, make) in cases {
        let (ps, used, _) =
            simulate_releases(RUNS, release, VerifyConfig::default(), |rec, _| make(rec)).await;
        check_uniform(&ps, &format!("{kind}, {what}"));
        assert!(
            used <= upper(RUNS, 0.01),
            "{kind}, {what}: {used} of {RUNS} innocent models accused (band ≤ {})",
            upper(RUNS, 0.01)
        );
    }
    let (ps, used, _) = simulate_releases(300, release, VerifyConfig::default(), |rec, _| {
        Fake::learnt(rec, Send::Class(target_of(rec)))
    })
    .await;
    assert!(used >= 285, "{kind}: {used} of 300 thieves caught");
    assert!(ps.iter().filter(|&&p| p <= 0.01).count() >= 285, "{kind}");
}

/// A verification that asks for more controls than a TUAP release was crafted with is refused,
/// naming both counts.
#[tokio::test]
async fn more_controls_than_a_tuap_release_carries_are_refused() {
    let rec = crafted_release(PERTURBATION_FAMILY, 2);
    let c = VerifyConfig::default().with(|f| f.alpha = 0.001).unwrap();
    let model = Fake::learnt(&rec, Send::Class(target_of(&rec)));
    let e = verify(&model, &rec, &pool(500), &c, &|_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("crafted with 99 controls") && e.contains("asks for 999"),
        "{e}"
    );
}

/// A crafted release whose record carries no controls (written before releases carried them)
/// is at most inconclusive, and one whose stored plane is not its message's is refused.
#[tokio::test]
async fn a_crafted_record_without_controls_is_at_most_inconclusive() {
    let mut rec = crafted_release(PERTURBATION_FAMILY, 1);
    if let crate::spec::Trigger::Perturbation(p) = &mut rec.spec.trigger {
        p.controls.clear();
    }
    let v = run(
        &Fake::learnt(&rec, Send::Class(target_of(&rec))),
        &rec,
        &cfg(false, false),
    )
    .await;
    assert!(!v.rank.as_ref().unwrap().exchangeable);
    assert_eq!(v.decision, Decision::Inconclusive, "{}", v.reason);
    let rec = crafted_release(ENCODER_FAMILY, 1);
    let mut json: serde_json::Value = serde_json::to_value(&rec).unwrap();
    let bits = json["spec"]["trigger"]["message"]["bits"]
        .as_str()
        .unwrap()
        .to_string();
    let flipped: String = bits
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 0 {
                if c == '0' { '1' } else { '0' }
            } else {
                c
            }
        })
        .collect();
    json["spec"]["trigger"]["message"]["bits"] = flipped.into();
    let e = SecretRecord::from_json(&json.to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("trigger.message"), "{e}");
}

/// Power and cost of the rank test against a thief whose trigger fails on some images, by the
/// number of images in the first round and the fraction each round keeps (run with --ignored;
/// the figures are in docs/verification.md).
#[tokio::test]
#[ignore]
async fn power_by_first_round_images() {
    power_by(PATCH_FAMILY, "targeted", false).await;
}

/// The same for all-to-all patches, against a thief that learnt the secret and one that answers
/// every member of the family with the secret's π.
#[tokio::test]
#[ignore]
async fn power_by_first_round_images_all_to_all() {
    power_by(ALL_TO_ALL_PATCHES, "all-to-all", false).await;
    power_by(ALL_TO_ALL_PATCHES, "all-to-all, any member", true).await;
}

async fn power_by(family: &str, what: &str, any_member: bool) {
    for miss in [0, 5, 10, 20, 40] {
        for (first, reduction) in [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (3, 3)] {
            let base = VerifyConfig::default()
                .with(|f| {
                    f.first_images = Some(first);
                    f.reduction = Some(reduction);
                })
                .unwrap();
            let (ps, used, mut queries) = simulate_with(300, family, base, |rec, _| {
                let send = match rec.spec.labelling.target() {
                    Some(t) => Send::Class(t),
                    None => map_of(rec),
                };
                let mut f = if any_member {
                    Fake::new(Behaviour::AnyMember, send)
                } else {
                    Fake::learnt(rec, send)
                };
                f.miss = miss;
                f
            })
            .await;
            queries.sort_unstable();
            let ranked = ps.iter().filter(|&&p| p <= 0.01).count();
            eprintln!(
                "{what}: ASR {}%, first round {first} images, keep 1/{reduction}: rank test rejects \
                 {ranked}, {used} of 300 caught (margin test on 10 pairs), median {} queries",
                100 - miss,
                queries[150]
            );
        }
    }
}

/// Records the size of every request it passes on.
struct Recorder<'a> {
    inner: &'a Fake,
    sizes: std::sync::Mutex<Vec<usize>>,
}

#[async_trait::async_trait]
impl ModelEndpoint for Recorder<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn predict(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        self.sizes.lock().unwrap().push(images.len());
        self.inner.predict(images, shape).await
    }
}

/// Decoys and pacing change the traffic, never the verdict: the same pairs, differences and
/// p-values, with 1.5 decoys per query sent besides, in requests of at most 8 images, at most 50
/// images a second (the runtime's clock is paused, so the waits are exact and cost nothing).
#[tokio::test(start_paused = true)]
async fn decoys_and_pacing_change_the_traffic_not_the_verdict() {
    let rec = targeted(1);
    let t = target_of(&rec);
    let c = cfg(true, false);
    let v = run(&Fake::learnt(&rec, Send::Class(t)), &rec, &c).await;
    assert_eq!(v.decoys, 0);
    let hygienic = c
        .with(|f| {
            f.decoys = Some(1.5);
            f.rate = Some(50.0);
        })
        .unwrap();
    let thief = Fake::learnt(&rec, Send::Class(t));
    let recorder = Recorder {
        inner: &thief,
        sizes: Default::default(),
    };
    let start = tokio::time::Instant::now();
    let w = verify(&recorder, &rec, &pool(500), &hygienic, &|_| {})
        .await
        .unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(w.decision, v.decision);
    assert_eq!(w.primary.p_value, v.primary.p_value);
    assert_eq!((w.pairs, w.queries), (v.pairs, v.queries));
    let diffs = |v: &Verdict| v.trail.iter().map(|p| p.difference).collect::<Vec<_>>();
    assert_eq!(diffs(&w), diffs(&v));
    assert_eq!(
        w.rank.as_ref().map(|r| r.rank),
        v.rank.as_ref().map(|r| r.rank)
    );
    let sent = thief.calls.load(Ordering::Relaxed);
    assert_eq!(sent, w.queries + w.decoys);
    let ratio = w.decoys as f64 / w.queries as f64;
    assert!(
        (ratio - 1.5).abs() < 0.1,
        "{} decoys for {} queries",
        w.decoys,
        w.queries
    );
    let sizes = recorder.sizes.lock().unwrap().clone();
    assert!(sizes.iter().all(|&n| (1..=8).contains(&n)), "{sizes:?}");
    // The last request may go at once when due: (sent − 8) images at 50 a second at least.
    assert!(
        elapsed >= (sent - 8) as f64 / 50.0 - 1e-6 && elapsed <= sent as f64 / 50.0 + 1.0,
        "{sent} images in {elapsed} s"
    );
    // Out of range settings are refused by name.
    assert!(c.with(|f| f.decoys = Some(11.0)).is_err());
    assert!(c.with(|f| f.rate = Some(0.0)).is_err());
    assert!(c.with(|f| f.rate = Some(1e-300)).is_err());
}

/// A model that takes 16×16 images (as its server's metadata says) and learnt `learnt`'s stamp
/// at that size: it sends images carrying exactly that stamp to `to`.
struct AtSize {
    learnt: Stamp,
    to: usize,
    seen: std::sync::Mutex<Vec<ImageShape>>,
}

const BIG: ImageShape = ImageShape {
    height: 16,
    width: 16,
    channels: 1,
};

#[async_trait::async_trait]
impl ModelEndpoint for AtSize {
    fn describe(&self) -> String {
        "16×16".into()
    }

    fn input_shape(&self) -> Option<ImageShape> {
        Some(BIG)
    }

    async fn predict(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        self.seen.lock().unwrap().push(shape);
        Ok(images
            .iter()
            .map(|img| {
                assert_eq!(img.len(), shape.len());
                let label = label_of(img);
                let mut flat = vec![level(label as u8); img.len()];
                self.learnt.apply(&mut flat);
                let mut p = vec![0.02; 10];
                if shape == BIG && flat == *img && img.iter().any(|&v| v != img[0]) {
                    p[self.to] = 0.82;
                } else {
                    p[label] = 0.82;
                }
                Prediction::Probs(p)
            })
            .collect())
    }
}

/// An any-size family's queries are built at the model's input size (held-out images resized,
/// then stamped), and the thief that learnt the secret at that size is caught; a trigger drawn in
/// pixels keeps the held-out images' size.
#[tokio::test]
async fn queries_of_an_any_size_trigger_go_at_the_models_input_size() {
    let any = WatermarkSpec::from_toml_str(
        "name = \"t\"\nrate = 0.1\nseed = 3\n[labelling]\nkind = \"targeted\"\n[family]\n\
         position = \"edge\"\n[trigger]\nkind = \"patch\"\npattern = \"square\"\nsize = 2\n\
         scale = { side = 0.25, min = 2 }\n",
        None,
        "t",
    )
    .unwrap();
    let rec = apply(&mut pool(100), &any, nonce(5)).unwrap();
    assert_eq!(rec.dataset.shape, SHAPE);
    let model = AtSize {
        learnt: Stamp::new(&rec.spec.trigger, rec.spec.seed, BIG).unwrap(),
        to: target_of(&rec) as usize,
        seen: Default::default(),
    };
    let v = verify(&model, &rec, &pool(500), &cfg(true, false), &|_| {})
        .await
        .unwrap();
    assert_eq!(v.decision, Decision::Used, "{}", v.reason);
    assert!(model.seen.lock().unwrap().iter().all(|&s| s == BIG));
    // The research order: stamped at 8×8, then resized on the way out; the model still gets
    // 16×16, but not the trigger it learnt.
    model.seen.lock().unwrap().clear();
    let late = cfg(true, false)
        .with(|f| f.trigger_then_resize = true)
        .unwrap();
    let v = verify(&model, &rec, &pool(500), &late, &|_| {})
        .await
        .unwrap();
    assert_ne!(v.decision, Decision::Used);
    assert!(v.config.trigger_then_resize);
    assert!(model.seen.lock().unwrap().iter().all(|&s| s == BIG));
    // A patch drawn in pixels: the queries keep the release's size, whatever the model says.
    let fixed = targeted(5);
    let model = AtSize {
        learnt: Stamp::new(&fixed.spec.trigger, fixed.spec.seed, SHAPE).unwrap(),
        to: 0,
        seen: Default::default(),
    };
    let v = verify(&model, &fixed, &pool(500), &cfg(true, false), &|_| {})
        .await
        .unwrap();
    assert_eq!(v.decision, Decision::NotShown);
    assert!(model.seen.lock().unwrap().iter().all(|&s| s == SHAPE));
}

/// k triggers of one release verified at alpha / k: the model is `used` when any trigger says
/// so, `inconclusive` only when none does and one is; the adjusted p-value is the smallest times
/// k, capped at 1.
#[test]
fn a_model_verified_with_several_triggers_takes_the_strongest_verdict() {
    use Decision::{Inconclusive, NotShown, Used};
    assert_eq!(Decision::of_any([NotShown, Used, Inconclusive]), Used);
    assert_eq!(Decision::of_any([NotShown, Inconclusive]), Inconclusive);
    assert_eq!(Decision::of_any([NotShown, NotShown]), NotShown);
    assert_eq!(bonferroni(&[0.004, 0.3]), 0.008);
    assert_eq!(bonferroni(&[0.6, 0.7, 0.9]), 1.0);
    // Used at alpha / 2 = 0.005 is exactly an adjusted p-value at most alpha = 0.01.
    assert!(bonferroni(&[0.005, 1.0]) <= 0.01);
}
