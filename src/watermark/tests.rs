//! Tests of `watermark`.

use super::*;
use crate::dataset::{Dataset, ImageShape};
use crate::spec::WatermarkSpec;
use proptest::prelude::*;

fn spec(trigger: &str, labelling: &str, rate: f64, seed: u64) -> WatermarkSpec {
    let text = format!(
        "name = \"t\"\nrate = {rate}\nseed = {seed}\n[labelling]\n{labelling}\n[trigger]\n{trigger}\n"
    );
    WatermarkSpec::from_toml_str(&text, None, "t").unwrap()
}

fn data(n: usize, shape: ImageShape, classes: u32, salt: u8) -> Dataset {
    let pixels = (0..n * shape.len())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect();
    let labels = (0..n as u32).map(|i| i % classes).collect();
    Dataset::new(shape, pixels, labels, classes as usize).unwrap()
}

const GREY: ImageShape = ImageShape {
    height: 8,
    width: 8,
    channels: 1,
};
const RGB: ImageShape = ImageShape {
    height: 8,
    width: 8,
    channels: 3,
};
const SQUARE: &str = "kind = \"patch\"\npattern = \"square\"\nsize = 3";
const TARGETED: &str = "kind = \"targeted\"\ntarget = 1";

#[test]
fn patch_pixels_are_exactly_the_pattern_and_the_rest_is_untouched() {
    let mut ds = data(50, RGB, 5, 0);
    let before = ds.clone();
    let rec = apply(&mut ds, &spec(SQUARE, TARGETED, 0.2, 3), [0; 32]).unwrap();
    assert_eq!(rec.poisoned.len(), 10);
    for p in &rec.poisoned {
        let img = ds.image(p.index);
        for r in 0..8 {
            for c in 0..8 {
                for ch in 0..3 {
                    let o = (r * 8 + c) * 3 + ch;
                    let want = if r >= 5 && c >= 5 {
                        255
                    } else {
                        before.image(p.index)[o]
                    };
                    assert_eq!(img[o], want, "sample {} r{r} c{c}", p.index);
                }
            }
        }
        assert_eq!(ds.label(p.index), 1);
    }
}

#[test]
fn untargeted_labels_are_drawn_over_all_classes() {
    let mut ds = data(2000, GREY, 10, 0);
    let rec = apply(
        &mut ds,
        &spec(SQUARE, "kind = \"untargeted\"", 0.5, 9),
        [0; 32],
    )
    .unwrap();
    let mut counts = [0usize; 10];
    rec.poisoned
        .iter()
        .for_each(|p| counts[p.new_label as usize] += 1);
    assert!(counts.iter().all(|&c| (60..140).contains(&c)), "{counts:?}");
    assert!(
        rec.poisoned
            .iter()
            .all(|p| ds.label(p.index) == p.new_label)
    );
}

#[test]
fn all_to_all_labels_send_each_class_to_its_image_under_the_mapping() {
    // The paper's y + 1 mod C without a seed.
    let mut ds = data(400, GREY, 5, 0);
    let rec = apply(
        &mut ds,
        &spec(SQUARE, "kind = \"all_to_all\"", 0.25, 2),
        [0; 32],
    )
    .unwrap();
    assert_eq!(rec.poisoned.len(), 100);
    for p in &rec.poisoned {
        assert_eq!(p.new_label, (p.original_label + 1) % 5);
        assert_eq!(ds.label(p.index), p.new_label);
    }
    // A drawn π: every class moved, each to its own π(y), and every class poisoned.
    let labelling = "kind = \"all_to_all\"\nmapping_seed = 11";
    let mut ds = data(400, GREY, 5, 0);
    let rec = apply(&mut ds, &spec(SQUARE, labelling, 0.25, 2), [0; 32]).unwrap();
    let pi = rec.spec.labelling.mapping(5).unwrap();
    assert!(pi.iter().enumerate().all(|(y, &t)| t != y as u32), "{pi:?}");
    let mut from = [0usize; 5];
    for p in &rec.poisoned {
        assert_eq!(p.new_label, pi[p.original_label as usize]);
        assert_eq!(ds.label(p.index), p.new_label);
        from[p.original_label as usize] += 1;
    }
    assert!(from.iter().all(|&c| c > 5), "{from:?}");
    // One class cannot be sent elsewhere.
    let e = apply(
        &mut data(20, GREY, 1, 0),
        &spec(SQUARE, labelling, 0.25, 2),
        [0; 32],
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least 2 classes"), "{e}");
}

#[test]
fn clean_label_triggers_only_the_target_class_and_keeps_labels() {
    let mut ds = data(100, GREY, 4, 0);
    let rec = apply(
        &mut ds,
        &spec(SQUARE, "kind = \"clean_label\"\ntarget = 2", 0.1, 1),
        [0; 32],
    )
    .unwrap();
    assert_eq!(rec.poisoned.len(), 10);
    assert!(
        rec.poisoned
            .iter()
            .all(|p| p.original_label == 2 && p.new_label == 2 && ds.label(p.index) == 2)
    );
    let e = apply(
        &mut data(100, GREY, 4, 0),
        &spec(SQUARE, "kind = \"clean_label\"\ntarget = 2", 0.3, 1),
        [0; 32],
    )
    .unwrap_err();
    assert!(e.to_string().contains("only 25 are eligible"), "{e}");
}

#[test]
fn source_classes_restrict_the_choice() {
    let mut s = spec(SQUARE, TARGETED, 0.1, 1);
    s.source_classes = Some(vec![3]);
    let mut ds = data(200, GREY, 5, 0);
    let rec = apply(&mut ds, &s, [0; 32]).unwrap();
    assert!(rec.poisoned.iter().all(|p| p.original_label == 3));
}

/// UBW-C poisons come from its one poison class or, without one, from every class but the
/// source classes; they keep their labels, and the crafter gets exactly the chosen samples.
#[test]
fn ubw_c_poisons_come_from_the_poison_class_or_every_class_but_the_sources() {
    let ubw = |labelling: &str, rate: f64| {
        let text = format!(
            "name = \"t\"\nrate = {rate}\nseed = 1\nsource_classes = [0]\n[labelling]\n\
             kind = \"untargeted_clean_label\"\n{labelling}\n[trigger]\n{SQUARE}\n\
             [gradient_matching]\neps = 16.0\n"
        );
        WatermarkSpec::from_toml_str(&text, None, "t").unwrap()
    };
    let chosen_classes = |spec: &WatermarkSpec| {
        let mut ds = data(200, GREY, 5, 0);
        let mut seen = Vec::new();
        let w = apply_crafted(&mut ds, spec, [0; 32], &mut |d, chosen| {
            seen = chosen.iter().map(|&i| d.label(i)).collect();
            Ok(())
        })
        .unwrap();
        assert!(
            w.record
                .poisoned
                .iter()
                .all(|p| p.new_label == p.original_label)
        );
        let recorded: Vec<u32> = w.record.poisoned.iter().map(|p| p.original_label).collect();
        assert_eq!(recorded, seen, "the crafter gets the recorded samples");
        seen
    };
    let one = chosen_classes(&ubw("poison_class = 2", 0.1));
    assert!(one.len() == 20 && one.iter().all(|&c| c == 2), "{one:?}");
    let spread = chosen_classes(&ubw("", 0.3));
    assert_eq!(spread.len(), 60);
    assert!(
        spread.iter().all(|&c| c != 0),
        "a source class was poisoned: {spread:?}"
    );
    for c in 1..5 {
        assert!(spread.contains(&c), "class {c} never poisoned: {spread:?}");
    }
    // 160 images are outside the source class; 0.9 of 200 asks for more.
    let e = apply_crafted(
        &mut data(200, GREY, 5, 0),
        &ubw("", 0.9),
        [0; 32],
        &mut |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("only 160 are eligible (clean-label: classes other than the source classes"),
        "{e}"
    );
}

#[test]
fn blend_noise_and_warp_change_exactly_the_recorded_samples() {
    let blend = "kind = \"blend\"\nsource = \"noise\"\nalpha = 0.2";
    let warp = "kind = \"warp\"";
    for (trig, extra) in [(blend, 0usize), (warp, 2)] {
        let mut ds = data(300, GREY, 3, 7);
        let before = ds.clone();
        let rec = apply(&mut ds, &spec(trig, TARGETED, 0.1, 5), [0; 32]).unwrap();
        assert_eq!(rec.noise_indices.len(), extra * rec.poisoned.len());
        let touched: std::collections::HashSet<usize> = rec
            .poisoned
            .iter()
            .map(|p| p.index)
            .chain(rec.noise_indices.iter().copied())
            .collect();
        for i in 0..ds.len() {
            if !touched.contains(&i) {
                assert_eq!(ds.image(i), before.image(i));
                assert_eq!(ds.label(i), before.label(i));
            }
        }
        let changed = rec
            .poisoned
            .iter()
            .filter(|p| ds.image(p.index) != before.image(p.index))
            .count();
        assert!(changed >= rec.poisoned.len() * 9 / 10, "{trig}: {changed}");
        assert!(
            rec.noise_indices
                .iter()
                .all(|&i| ds.label(i) == before.label(i))
        );
    }
}

#[test]
fn the_commitment_is_stable_and_binds_every_field() {
    let mut ds = data(100, GREY, 4, 0);
    let rec = apply(&mut ds, &spec(SQUARE, TARGETED, 0.1, 1), [5; 32]).unwrap();
    let back = SecretRecord::from_json(&serde_json::to_string_pretty(&rec).unwrap()).unwrap();
    assert_eq!(back.commitment(), rec.commitment());
    let mut other = rec.clone();
    other.poisoned[0].new_label = 0;
    assert_ne!(other.commitment(), rec.commitment());
    let mut other = rec.clone();
    other.nonce = hex::encode([6u8; 32]);
    assert_ne!(other.commitment(), rec.commitment());
}

#[test]
fn records_that_do_not_add_up_are_refused() {
    let mut ds = data(100, GREY, 4, 0);
    let mut rec = apply(&mut ds, &spec(SQUARE, TARGETED, 0.1, 1), [0; 32]).unwrap();
    rec.poisoned[1].index = 1000;
    let e = SecretRecord::from_json(&serde_json::to_string(&rec).unwrap()).unwrap_err();
    assert!(
        e.to_string().contains("out of order or out of range"),
        "{e}"
    );
    assert!(SecretRecord::from_json("{\"version\": 1}").is_err());
}

#[test]
fn the_record_describes_the_dataset_before_and_after() {
    let mut ds = data(100, GREY, 4, 0);
    let before = ds.sha256();
    let rec = apply(&mut ds, &spec(SQUARE, TARGETED, 0.1, 1), [0; 32]).unwrap();
    assert_eq!(rec.dataset.sha256_before, before);
    assert_eq!(rec.dataset.sha256_after, ds.sha256());
    assert_ne!(before, ds.sha256());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn watermarking_is_deterministic_with_exact_counts(
        n in 1usize..400, rate in 0.01f64..1.0, seed in any::<u64>(), rgb in any::<bool>(), salt in any::<u8>(),
        kind in 0usize..4,
    ) {
        let shape = if rgb { RGB } else { GREY };
        let k = poison_count(rate, n);
        prop_assume!(k > 0);
        let trig = ["kind = \"patch\"\npattern = \"cross\"", "kind = \"blend\"\nsource = \"noise\"\nalpha = 0.3",
                    "kind = \"warp\"\nnoise = false", "kind = \"patch\"\npattern = [[9, 8], [7, 6]]\nposition = [1, 2]\nalpha = 0.5"][kind];
        let s = spec(trig, "kind = \"untargeted\"", rate, seed);
        let mut a = data(n, shape, 3, salt);
        let mut b = a.clone();
        let orig = a.clone();
        let ra = apply(&mut a, &s, [1; 32]).unwrap();
        let rb = apply(&mut b, &s, [1; 32]).unwrap();
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(&ra, &rb);
        prop_assert_eq!(ra.poisoned.len(), k);
        prop_assert!(ra.poisoned.windows(2).all(|w| w[0].index < w[1].index));
        let poisoned: std::collections::HashSet<usize> = ra.poisoned.iter().map(|p| p.index).collect();
        for i in 0..n {
            if !poisoned.contains(&i) {
                prop_assert_eq!(a.image(i), orig.image(i));
                prop_assert_eq!(a.label(i), orig.label(i));
            }
        }
    }

    #[test]
    fn a_different_seed_chooses_differently(seed in any::<u64>()) {
        let s1 = spec(SQUARE, TARGETED, 0.1, seed);
        let s2 = spec(SQUARE, TARGETED, 0.1, seed.wrapping_add(1));
        let r1 = apply(&mut data(1000, GREY, 4, 0), &s1, [0; 32]).unwrap();
        let r2 = apply(&mut data(1000, GREY, 4, 0), &s2, [0; 32]).unwrap();
        prop_assert_ne!(r1.poisoned, r2.poisoned);
    }
}

/// A version 1 record (written before trigger families) as the format wrote it, byte for byte:
/// it still loads, and its commitment is still the sha256 of exactly these bytes.
const V1_RECORD: &str = r#"{"version":1,"nonce":"0000000000000000000000000000000000000000000000000000000000000000","spec":{"name":"golden","rate":0.5,"seed":7,"labelling":{"kind":"targeted","target":1},"trigger":{"kind":"patch","pattern":"square","size":3,"position":"bottom-right","alpha":1.0}},"dataset":{"count":4,"shape":{"height":8,"width":8,"channels":1},"num_classes":2,"sha256_before":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","sha256_after":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"},"poisoned":[{"index":0,"original_label":0,"new_label":1},{"index":2,"original_label":0,"new_label":1}]}"#;

#[test]
fn version_1_records_keep_their_commitments() {
    let rec = SecretRecord::from_json(V1_RECORD).unwrap();
    assert_eq!(rec.version, 1);
    assert!(rec.family.is_none());
    assert_eq!(crate::spec::canonical_json(&rec), V1_RECORD);
    assert_eq!(
        rec.commitment(),
        "4d311baf4640d1f7202a5e8f4e501ab4d5126c3cd669b6fe9c733e845c5762c8"
    );
}

#[test]
fn a_family_release_records_its_family_and_refuses_an_edited_trigger() {
    let text = "name = \"f\"\nrate = 0.2\nseed = 3\n[labelling]\nkind = \"targeted\"\n\
                [family]\n[trigger]\nkind = \"patch\"\npattern = \"square\"\n";
    let family = WatermarkSpec::from_toml_str(text, None, "f").unwrap();
    let mut ds = data(40, GREY, 2, 0);
    let rec = apply(&mut ds, &family, [5; 32]).unwrap();
    assert_eq!(rec.version, 2);
    assert_eq!(rec.family.as_ref(), Some(&family));
    assert!(rec.spec.family.is_none());
    let json = serde_json::to_string(&rec).unwrap();
    assert_eq!(SecretRecord::from_json(&json).unwrap(), rec);
    // Another nonce, another member.
    let other = apply(&mut data(40, GREY, 2, 0), &family, [6; 32]).unwrap();
    assert_ne!(other.spec.trigger, rec.spec.trigger);
    // A record whose target or trigger was edited is not the family's draw.
    let mut edited = rec.clone();
    edited.spec.labelling = crate::spec::Labelling::Targeted {
        target: (rec.spec.labelling.target().unwrap() + 1) % 2,
    };
    let e = SecretRecord::from_json(&serde_json::to_string(&edited).unwrap()).unwrap_err();
    assert!(e.to_string().contains("not the family's draw"), "{e}");
}

fn patch_family() -> WatermarkSpec {
    let text = "name = \"f\"\nrate = 0.1\nseed = 3\n[labelling]\nkind = \"targeted\"\n\
                [family]\n[trigger]\nkind = \"patch\"\npattern = \"square\"\nsize = 3\n";
    WatermarkSpec::from_toml_str(text, None, "f").unwrap()
}

#[test]
fn a_release_with_several_triggers_stamps_each_on_its_own_samples() {
    let family = patch_family();
    let mut ds = data(100, GREY, 4, 0);
    let before = ds.clone();
    let marked = apply_triggers(&mut ds, &family, [9; 32], 3).unwrap();
    let Secret::Set(set) = &marked.secret else {
        panic!("three triggers make a set")
    };
    assert_eq!(set.triggers.len(), 3);
    let mut seen = std::collections::HashSet::new();
    for (i, rec) in set.triggers.iter().enumerate() {
        // Each trigger: its own nonce, its own draw, rate × n samples, none shared.
        assert_eq!(rec.nonce, hex::encode(trigger_nonce(&[9; 32], i)));
        assert_eq!(rec.poisoned.len(), 10);
        assert!(rec.poisoned.iter().all(|p| seen.insert(p.index)));
        assert_eq!(rec.dataset.sha256_before, before.sha256());
        assert_eq!(rec.dataset.sha256_after, ds.sha256());
        // Each poisoned sample carries its own trigger's patch, stamped on the original image.
        let one = record_alone(&before, rec);
        for p in &rec.poisoned {
            assert_eq!(ds.image(p.index), one.image(p.index), "trigger {i}");
            assert_eq!(ds.label(p.index), p.new_label);
        }
    }
    assert_ne!(set.triggers[0].spec.trigger, set.triggers[1].spec.trigger);
    assert_eq!(marked.image_hashes, crate::dataset::image_sha256s(&ds));
    // Untouched samples are byte-identical.
    for i in (0..100).filter(|i| !seen.contains(i)) {
        assert_eq!(ds.image(i), before.image(i));
        assert_eq!(ds.label(i), before.label(i));
    }
    // The same nonce repeats the release; one trigger is the plain record of apply().
    let mut again = before.clone();
    let twice = apply_triggers(&mut again, &family, [9; 32], 3).unwrap();
    assert_eq!(twice.secret, marked.secret);
    let mut single = before.clone();
    let one = apply_triggers(&mut single, &family, [9; 32], 1).unwrap();
    assert_eq!(
        one.secret,
        Secret::One(Box::new(
            apply(&mut before.clone(), &family, [9; 32]).unwrap()
        ))
    );
}

#[test]
fn a_release_may_carry_triggers_of_different_families() {
    let blend = WatermarkSpec::from_toml_str(
        "name = \"b\"\nrate = 0.2\nseed = 5\n[labelling]\nkind = \"all_to_all\"\n\
         [family]\n[trigger]\nkind = \"blend\"\nsource = \"noise\"\nalpha = 0.2\n",
        None,
        "b",
    )
    .unwrap();
    let patch = patch_family();
    let mut ds = data(100, GREY, 4, 2);
    let before = ds.clone();
    let marked = apply_trigger_specs(&mut ds, &[&patch, &blend], [7; 32]).unwrap();
    let Secret::Set(set) = &marked.secret else {
        panic!("two triggers make a set")
    };
    // Each trigger is a member of its own family, on its own rate of samples, none shared.
    assert_eq!(set.triggers[0].family.as_ref().unwrap().name, "f");
    assert_eq!(set.triggers[1].family.as_ref().unwrap().name, "b");
    assert_eq!(set.triggers[0].poisoned.len(), 10);
    assert_eq!(set.triggers[1].poisoned.len(), 20);
    let mut seen = std::collections::HashSet::new();
    for (i, rec) in set.triggers.iter().enumerate() {
        assert_eq!(rec.nonce, hex::encode(trigger_nonce(&[7; 32], i)));
        assert!(rec.poisoned.iter().all(|p| seen.insert(p.index)));
        let one = record_alone(&before, rec);
        for p in &rec.poisoned {
            assert_eq!(ds.image(p.index), one.image(p.index), "trigger {i}");
            assert_eq!(ds.label(p.index), p.new_label);
        }
    }
    // The set reads back as one release, and either trigger can be spent.
    let read =
        Secret::from_json(&String::from_utf8(marked.secret.to_json_pretty()).unwrap()).unwrap();
    assert_eq!(read, marked.secret);
    assert_eq!(read.trigger(Some(2)).unwrap().0, &set.triggers[1]);
    // A fixed spec among them is refused by name; so is a set of one.
    let fixed = spec(SQUARE, TARGETED, 0.1, 1);
    let e = apply_trigger_specs(&mut before.clone(), &[&patch, &fixed], [7; 32])
        .unwrap_err()
        .to_string();
    assert!(e.contains("one fixed trigger"), "{e}");
    assert!(apply_trigger_specs(&mut before.clone(), &[&patch], [7; 32]).is_err());
}

/// The images `rec`'s trigger alone makes of `before`.
fn record_alone(before: &Dataset, rec: &SecretRecord) -> Dataset {
    let mut ds = before.clone();
    let stamp = Stamp::new(&rec.spec.trigger, rec.spec.seed, ds.shape()).unwrap();
    for p in &rec.poisoned {
        stamp.apply(ds.image_mut(p.index));
    }
    ds
}

#[test]
fn a_trigger_set_round_trips_and_ties_every_trigger_to_its_commitment() {
    let mut ds = data(60, GREY, 3, 1);
    let marked = apply_triggers(&mut ds, &patch_family(), [4; 32], 2).unwrap();
    let text = String::from_utf8(marked.secret.to_json_pretty()).unwrap();
    let read = Secret::from_json(&text).unwrap();
    assert_eq!(read, marked.secret);
    let Secret::Set(set) = &read else {
        panic!("a set")
    };
    assert_eq!(read.commitment(), set_commitment(&set.commitments()));
    assert_ne!(read.commitment(), set.triggers[0].commitment());
    // Spending a trigger names it and carries what recomputes the release's commitment.
    let (rec, spent) = read.trigger(Some(2)).unwrap();
    assert_eq!(rec, &set.triggers[1]);
    let spent = spent.unwrap();
    assert_eq!((spent.number, spent.of), (2, 2));
    assert_eq!(set_commitment(&spent.commitments), read.commitment());
    assert_eq!(spent.release_commitment, read.commitment());
    assert_eq!(spent.commitments[1], rec.commitment());
    // A set needs a choice; a number out of range is refused; a single record has trigger 1.
    assert!(
        read.trigger(None)
            .unwrap_err()
            .contains("carries 2 triggers")
    );
    assert!(read.trigger(Some(3)).unwrap_err().contains("1 to 2"));
    let single = Secret::One(Box::new(set.triggers[0].clone()));
    assert!(single.trigger(None).unwrap().1.is_none());
    assert!(single.trigger(Some(2)).is_err());
    // A set is not a record: the single-record reader says what it is.
    let e = SecretRecord::from_json(&text).unwrap_err().to_string();
    assert!(e.contains("several triggers"), "{e}");
}

#[test]
fn a_trigger_set_that_is_not_one_release_is_refused() {
    let mut ds = data(60, GREY, 3, 1);
    let marked = apply_triggers(&mut ds, &patch_family(), [4; 32], 3).unwrap();
    let good: serde_json::Value = serde_json::from_slice(&marked.secret.to_json_pretty()).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value), why: &str| {
        let mut v = good.clone();
        edit(&mut v);
        let e = Secret::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    };
    refused(
        &|v| {
            let first = v["triggers"][0]["poisoned"][0].clone();
            v["triggers"][1]["poisoned"] = serde_json::json!([first]);
        },
        "belongs to two triggers",
    );
    refused(
        &|v| v["triggers"][2]["nonce"] = v["triggers"][0]["nonce"].clone(),
        "",
    );
    refused(
        &|v| v["triggers"][1]["dataset"]["sha256_after"] = "00".into(),
        "not one release",
    );
    refused(
        &|v| {
            let first = v["triggers"][0].clone();
            v["triggers"] = serde_json::json!([first]);
        },
        "2 to 16",
    );
    refused(&|v| v["set_version"] = 9.into(), "version 9");
    // Fixed specs and crafted kinds carry one trigger.
    let fixed = spec(SQUARE, TARGETED, 0.1, 1);
    let e = apply_triggers(&mut ds.clone(), &fixed, [1; 32], 2).unwrap_err();
    assert!(e.to_string().contains("one fixed trigger"), "{e}");
    assert!(apply_triggers(&mut ds.clone(), &patch_family(), [1; 32], 17).is_err());
    // Too many triggers for the samples there are: the error says which trigger ran out.
    let mut dense = patch_family();
    dense.rate = 0.4;
    let e = apply_triggers(&mut ds.clone(), &dense, [1; 32], 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("trigger 3 of 3"), "{e}");
}

/// Every shipped spec's release of one fixed dataset with one fixed nonce, pinned by its public
/// commitment and the release's sha256. A change to a shipped spec, to how a family member is
/// drawn, to a record's fields or their order, or to stamping changes a line: every commitment
/// already published would stop matching, so such a change must come with a new record version
/// (older records keep verifying as they were written) and a deliberate update of the file:
/// `HALLMARK_UPDATE_GOLDEN=1 cargo test --lib shipped_specs_give_the_pinned_commitments`.
/// Crafted specs are pinned with their crafting left out (it needs the trainer), ISSBA and TUAP by
/// their spec (their trigger is made by the trainer first); a release with three triggers pins the set commitment.
#[test]
fn shipped_specs_give_the_pinned_commitments() {
    use std::fmt::Write;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden = root.join("src/watermark/golden-commitments.txt");
    let mut paths: Vec<_> = ["watermark_specs", "watermark_specs/fixed"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut got = String::new();
    for path in &paths {
        let spec = WatermarkSpec::from_toml_file(path).unwrap();
        // Any-size families are pinned on 40×48 colour images.
        let shape = spec.image.unwrap_or(ImageShape {
            height: 40,
            width: 48,
            channels: 3,
        });
        let mut ds = data(200, shape, 10, 7);
        let name = path.strip_prefix(root).unwrap().display().to_string();
        if spec
            .crafting()
            .is_some_and(crate::spec::Crafting::makes_trigger)
        {
            // ISSBA's encoder and TUAP's perturbation are made by the trainer before anything is
            // stamped: only the spec itself is pinned.
            let c = crate::spec::sha256_hex(&crate::spec::canonical_json(&spec));
            writeln!(got, "{name} spec {c}").unwrap();
            continue;
        }
        let w = apply_crafted(&mut ds, &spec, [9; 32], &mut |_, _| Ok(()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(w.record.dataset.sha256_after, ds.sha256());
        writeln!(got, "{name} {} {}", w.record.commitment(), ds.sha256()).unwrap();
        if name == "watermark_specs/badnets-square-28x28-grey.toml" {
            let mut ds = data(200, shape, 10, 7);
            let set = apply_triggers(&mut ds, &spec, [9; 32], 3).unwrap();
            assert!(matches!(set.secret, Secret::Set(_)));
            let c = set.secret.commitment();
            writeln!(got, "{name}@3-triggers {c} {}", ds.sha256()).unwrap();
        }
    }
    assert!(paths.len() >= 40, "only {} shipped specs", paths.len());
    if std::env::var_os("HALLMARK_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    let (got_lines, want_lines): (Vec<_>, Vec<_>) = (got.lines().collect(), want.lines().collect());
    let changed: Vec<_> = got_lines
        .iter()
        .filter(|l| !want_lines.contains(l))
        .chain(want_lines.iter().filter(|l| !got_lines.contains(l)))
        .collect();
    assert!(
        changed.is_empty() && !want_lines.is_empty(),
        "commitments differ from {} (lines only on one side):\n{}",
        golden.display(),
        changed
            .iter()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
}
