//! Tests of `spec`.

use super::*;

fn parse(text: &str) -> Result<WatermarkSpec, SpecError> {
    WatermarkSpec::from_toml_str(text, None, "test.toml")
}

const BASE: &str = r#"
name = "t"
rate = 0.1
seed = 1
[labelling]
kind = "targeted"
target = 1
"#;

fn with_trigger(trigger: &str) -> String {
    format!("{BASE}\n[trigger]\n{trigger}\n")
}

fn field_of(e: SpecError) -> String {
    match e {
        SpecError::Field { field, .. } => field,
        other => panic!("expected a field error, got {other}"),
    }
}

/// The shipped specs: the families in `watermark_specs/` and the fixed originals in
/// `watermark_specs/fixed/`, in name order.
fn shipped_spec_paths() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs");
    let mut names: Vec<_> = [root.clone(), root.join("fixed")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    names.sort();
    names
}

#[test]
fn every_shipped_spec_loads_and_validates() {
    let mut n = 0;
    for path in shipped_spec_paths() {
        {
            let spec = WatermarkSpec::from_toml_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Any-size specs name no shape; they are checked at two very different ones.
            let shapes = match spec.image {
                Some(shape) => vec![shape],
                None => vec![rgb(64, 80), rgb(1024, 768)],
            };
            for shape in shapes {
                if let Trigger::Patch(p) = &spec.trigger {
                    p.grid(shape.height, shape.width).unwrap();
                }
            }
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} specs found");
}

fn rgb(height: usize, width: usize) -> crate::dataset::ImageShape {
    crate::dataset::ImageShape {
        height,
        width,
        channels: 3,
    }
}

/// The any-size families (`watermark_specs/*-any-size.toml`): one drawn member stamps a 64×80
/// and a 1024×768 image alike: a patch covers the same share of the shorter side at the same
/// relative place, a blend's noise has the same value at the same relative place, and the
/// member itself (what the secret record keeps) does not depend on the size.
#[test]
fn any_size_families_stamp_small_and_large_images_alike() {
    use crate::watermark::Stamp;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs");
    let (small, large) = (rgb(64, 80), rgb(1024, 768));
    let mut kinds = Vec::new();
    for name in ["badnets-square", "ubw-p", "blended", "batt-rotate"] {
        let path = root.join(format!("{name}-any-size.toml"));
        let spec = WatermarkSpec::from_toml_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            spec.image.is_none(),
            "{name}: an any-size spec names no shape"
        );
        assert!(spec.family.is_some(), "{name}: a family");
        for seed in 0..5 {
            let member = family::draw(&spec, 10, small, seed).unwrap();
            assert_eq!(
                member,
                family::draw(&spec, 10, large, seed).unwrap(),
                "{name}: the drawn member depends on the image size"
            );
            // Stamp a mid-grey image of each size; the changed pixels are the trigger.
            let changed = |shape: crate::dataset::ImageShape| {
                let stamp = Stamp::new(&member.trigger, member.seed, shape).unwrap();
                let mut img = vec![128u8; shape.len()];
                stamp.apply(&mut img);
                img
            };
            let (a, b) = (changed(small), changed(large));
            match &member.trigger {
                Trigger::Patch(p) => {
                    let (ra, ya, xa) = p.grid(small.height, small.width).unwrap();
                    let (rb, yb, xb) = p.grid(large.height, large.width).unwrap();
                    // A tenth of the shorter side, in whole cells of 3: 6 and 75 pixels.
                    assert_eq!((ra.len(), rb.len()), (6, 75), "{name}");
                    // The same place: shares of the free room within a pixel's rounding.
                    let share = |at: usize, len: usize, side: usize| {
                        if side == len {
                            0.0
                        } else {
                            at as f64 / (side - len) as f64
                        }
                    };
                    assert!(
                        (share(ya, 6, 64) - share(yb, 75, 1024)).abs() < 0.02,
                        "{name}"
                    );
                    assert!(
                        (share(xa, 6, 80) - share(xb, 75, 768)).abs() < 0.02,
                        "{name}"
                    );
                    // Each cell is a block: the cell's top-left pixel and its last agree.
                    for (cy, cx) in [(0, 0), (1, 2), (2, 1)] {
                        let px = |img: &[u8], y0: usize, x0: usize, w: usize, cell: usize, end| {
                            let (y, x) = (y0 + cy * cell + end, x0 + cx * cell + end);
                            img[(y * w + x) * 3]
                        };
                        let v = px(&a, ya, xa, 80, 2, 0);
                        assert_eq!(v, px(&a, ya, xa, 80, 2, 1), "{name}");
                        assert_eq!(v, px(&b, yb, xb, 768, 25, 0), "{name}");
                        assert_eq!(v, px(&b, yb, xb, 768, 25, 24), "{name}");
                    }
                    // Nothing outside the patch changed.
                    let outside = a.iter().enumerate().filter(|&(i, &v)| {
                        let (y, x) = (i / 3 / 80, i / 3 % 80);
                        let inside = (ya..ya + 6).contains(&y) && (xa..xa + 6).contains(&x);
                        v != 128 && !inside
                    });
                    assert_eq!(outside.count(), 0, "{name}");
                }
                Trigger::Blend(_) => {
                    // The value at the centre of each of the 32 × 32 cells is the same.
                    for (gy, gx) in [(0, 0), (5, 17), (31, 31), (16, 3)] {
                        let at = |img: &[u8], s: crate::dataset::ImageShape| {
                            let y = (2 * gy + 1) * s.height / 64;
                            let x = (2 * gx + 1) * s.width / 64;
                            img[(y * s.width + x) * 3..(y * s.width + x) * 3 + 3].to_vec()
                        };
                        assert_eq!(at(&a, small), at(&b, large), "{name} cell ({gy}, {gx})");
                    }
                    assert!(a.iter().any(|&v| v != 128), "{name}");
                }
                Trigger::Rotate(r) => {
                    assert!((8.0..=32.0).contains(&r.angle.abs()), "{name}: {}", r.angle);
                    // Rotating a flat image leaves its centre and blackens its corners.
                    for (img, s) in [(&a, small), (&b, large)] {
                        let centre = (s.height / 2 * s.width + s.width / 2) * 3;
                        assert_eq!(img[centre], 128, "{name}");
                        assert_eq!(img[0], 0, "{name}");
                    }
                }
                other => panic!("{name}: unexpected trigger {other:?}"),
            }
            kinds.push(member.trigger.kind());
        }
    }
    assert_eq!(kinds.len(), 20);
}

#[test]
fn unknown_fields_are_rejected_by_name() {
    let e = parse(&with_trigger(
        "kind = \"patch\"\npattern = \"square\"\nalpah = 0.2",
    ))
    .unwrap_err();
    assert!(e.to_string().contains("alpah"), "{e}");
}

#[test]
fn out_of_range_values_name_their_field() {
    let e = parse(
        &with_trigger("kind = \"patch\"\npattern = \"square\"").replace("rate = 0.1", "rate = 1.5"),
    )
    .unwrap_err();
    assert_eq!(field_of(e), "rate");
    let e = parse(&with_trigger(
        "kind = \"patch\"\npattern = \"square\"\nalpha = 0.0",
    ))
    .unwrap_err();
    assert_eq!(field_of(e), "trigger.alpha");
    let e = parse(&with_trigger("kind = \"patch\"\npattern = \"star\"")).unwrap_err();
    assert_eq!(field_of(e), "trigger.pattern");
    let e = parse(&with_trigger("kind = \"patch\"\npattern = [[1, 2], [3]]")).unwrap_err();
    assert_eq!(field_of(e), "trigger.pattern");
    let e = parse(&with_trigger(
        "kind = \"patch\"\npattern = \"cross\"\nsize = 4",
    ))
    .unwrap_err();
    assert_eq!(field_of(e), "trigger.size");
    let e = parse(&with_trigger("kind = \"warp\"\nk = 1")).unwrap_err();
    assert_eq!(field_of(e), "trigger.k");
    let e = parse(&with_trigger(
        "kind = \"blend\"\nsource = \"image\"\nalpha = 0.2",
    ))
    .unwrap_err();
    assert_eq!(field_of(e), "trigger.image");
}

#[test]
fn presets_render_the_published_patterns() {
    let spec = parse(&with_trigger("kind = \"patch\"\npattern = \"cross\"")).unwrap();
    let Trigger::Patch(p) = &spec.trigger else {
        unreachable!()
    };
    let (rows, r, c) = p.grid(32, 32).unwrap();
    assert_eq!(
        rows,
        vec![vec![255, 0, 255], vec![0, 255, 0], vec![255, 0, 255]]
    );
    assert_eq!((r, c), (29, 29));
    let spec = parse(&with_trigger(
        "kind = \"patch\"\npattern = \"line\"\nposition = \"top-left\"",
    ))
    .unwrap();
    let Trigger::Patch(p) = &spec.trigger else {
        unreachable!()
    };
    let (rows, r, c) = p.grid(28, 28).unwrap();
    assert_eq!(
        (rows.len(), rows[0].len(), rows[0][0], r, c),
        (2, 28, 0, 0, 0)
    );
    let spec = parse(&with_trigger(
        "kind = \"patch\"\npattern = \"pixel\"\nposition = [-2, -2]",
    ))
    .unwrap();
    let Trigger::Patch(p) = &spec.trigger else {
        unreachable!()
    };
    assert_eq!(p.grid(28, 28).unwrap(), (vec![vec![255]], 26, 26));
}

#[test]
fn a_patch_that_does_not_fit_is_caught_against_the_dataset() {
    let spec = parse(&with_trigger(
        "kind = \"patch\"\npattern = \"square\"\nsize = 3\nposition = [27, 0]",
    ))
    .unwrap();
    let ds = Dataset::new(
        ImageShape {
            height: 28,
            width: 28,
            channels: 1,
        },
        vec![0; 784 * 2],
        vec![0, 1],
        2,
    )
    .unwrap();
    assert_eq!(
        field_of(spec.check_fits(&ds).unwrap_err()),
        "trigger.position"
    );
    let spec = parse(&with_trigger("kind = \"patch\"\npattern = \"square\"")).unwrap();
    let ds1 = Dataset::new(
        ImageShape {
            height: 28,
            width: 28,
            channels: 1,
        },
        vec![0; 784],
        vec![0],
        1,
    )
    .unwrap();
    assert_eq!(
        field_of(spec.check_fits(&ds1).unwrap_err()),
        "labelling.target"
    );
}

#[test]
fn a_blend_image_is_inlined_so_the_json_form_stands_alone() {
    let dir = tempfile::tempdir().unwrap();
    let img = image::GrayImage::from_fn(4, 3, |x, y| image::Luma([(x * 10 + y) as u8]));
    img.save(dir.path().join("p.png")).unwrap();
    let text = with_trigger("kind = \"blend\"\nsource = \"image\"\nimage = \"p.png\"\nalpha = 0.2");
    let spec = WatermarkSpec::from_toml_str(&text, Some(dir.path()), "t").unwrap();
    let Trigger::Blend(b) = &spec.trigger else {
        unreachable!()
    };
    let p = b.pattern.as_ref().unwrap();
    assert_eq!(
        p.shape,
        ImageShape {
            height: 3,
            width: 4,
            channels: 1
        }
    );
    assert_eq!(p.pixels().unwrap()[5], 11);
    let back = WatermarkSpec::from_json_value(serde_json::to_value(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
    assert_eq!(back.sha256(), spec.sha256());
}

#[test]
fn json_form_round_trips_for_every_shipped_spec() {
    for path in shipped_spec_paths() {
        let spec = WatermarkSpec::from_toml_file(&path).unwrap();
        let json = canonical_json(&spec);
        let back = WatermarkSpec::from_json_value(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(canonical_json(&back), json, "{}", path.display());
    }
}

#[test]
fn gradient_matching_specs_are_checked_as_a_whole() {
    let gm = |labelling: &str, sources: &str, extra: &str| {
        parse(&format!(
            "name = \"t\"\nrate = 0.01\nseed = 1\n{sources}\n[labelling]\n{labelling}\n\
             [trigger]\nkind = \"patch\"\npattern = \"square\"\n{extra}"
        ))
    };
    let ubw = "kind = \"untargeted_clean_label\"\npoison_class = 6";
    let ok = gm(
        ubw,
        "source_classes = [0]",
        "[gradient_matching]\neps = 16.0",
    )
    .unwrap();
    let g = ok.gradient_matching.unwrap();
    assert_eq!((g.beta, g.iterations, g.retrain_every), (2.0, 250, 50));
    assert!(ok.needs_model());
    // UBW-C without its crafting, crafting with changed labels, no source class, the poison
    // class as a source, eps out of range: each names its field.
    assert_eq!(
        field_of(gm(ubw, "source_classes = [0]", "").unwrap_err()),
        "labelling"
    );
    let e = gm(
        "kind = \"targeted\"\ntarget = 1",
        "source_classes = [0]",
        "[gradient_matching]\neps = 16.0",
    )
    .unwrap_err();
    assert_eq!(field_of(e), "gradient_matching");
    let e = gm(ubw, "", "[gradient_matching]\neps = 16.0").unwrap_err();
    assert_eq!(field_of(e), "source_classes");
    let e = gm(
        ubw,
        "source_classes = [6]",
        "[gradient_matching]\neps = 16.0",
    )
    .unwrap_err();
    assert_eq!(field_of(e), "source_classes");
    let e = gm(
        ubw,
        "source_classes = [0]",
        "[gradient_matching]\neps = 0.0",
    )
    .unwrap_err();
    assert_eq!(field_of(e), "gradient_matching.eps");
    // Without a poison class, UBW-C poisons every class but the sources; the canonical form
    // of a spec with one is unchanged (its commitments stay pinned).
    let spread = gm(
        "kind = \"untargeted_clean_label\"",
        "source_classes = [0, 3]",
        "[gradient_matching]\neps = 16.0",
    )
    .unwrap();
    assert_eq!(spread.labelling.poison_class(), None);
    let may: Vec<u32> = (0..5)
        .filter(|&c| {
            spread
                .labelling
                .may_poison(c, spread.source_classes.as_deref())
        })
        .collect();
    assert_eq!(may, [1, 2, 4]);
    assert!(!canonical_json(&spread).contains("poison_class"));
    assert!(canonical_json(&ok).contains("\"poison_class\":6"));
    // A release cannot be stamped without the model.
    let mut ds = crate::dataset::Dataset::new(
        crate::dataset::ImageShape {
            height: 4,
            width: 4,
            channels: 1,
        },
        vec![0; 200 * 16],
        (0..200u32).map(|i| i % 10).collect(),
        10,
    )
    .unwrap();
    let e = crate::watermark::apply(&mut ds, &ok, [0; 32]).unwrap_err();
    assert!(e.to_string().contains("gradient_matching"), "{e}");
}

/// Every number of every shipped spec, by JSON pointer.
fn numeric_leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Number(_) => out.push(at),
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(8) {
                numeric_leaves(x, format!("{at}/{i}"), out);
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                numeric_leaves(x, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

/// Read once: the Refool spec inlines 200 photographs.
fn shipped_specs_as_json() -> &'static [serde_json::Value] {
    static SPECS: std::sync::OnceLock<Vec<serde_json::Value>> = std::sync::OnceLock::new();
    SPECS.get_or_init(read_shipped_specs_as_json)
}

fn read_shipped_specs_as_json() -> Vec<serde_json::Value> {
    shipped_spec_paths()
        .iter()
        .map(|p| serde_json::to_value(WatermarkSpec::from_toml_file(p).unwrap()).unwrap())
        .collect()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// The spec parser's contract, as the `spec` fuzz target checks it at length: a shipped spec
    /// with any one number replaced by an extreme value (a size of 2^32 - 1, a negative count,
    /// 1e308) is refused with an error, or is a spec whose trigger stamps an image of its shape
    /// without a panic and without a huge allocation (sizes are checked before they allocate).
    #[test]
    fn specs_with_extreme_numbers_are_refused_or_stamp_safely(
        which in 0usize..64,
        leaf in 0usize..4096,
        value in proptest::sample::select(vec![
            serde_json::json!(0), serde_json::json!(-1), serde_json::json!(4_294_967_295u64),
            serde_json::json!(u64::MAX), serde_json::json!(100_000), serde_json::json!(1e308),
            serde_json::json!(-1e308), serde_json::json!(4097), serde_json::json!(65_536),
            serde_json::json!(0.5), serde_json::json!(1e-12), serde_json::json!(i64::MIN),
        ]),
    ) {
        let specs = shipped_specs_as_json();
        let mut v = specs[which % specs.len()].clone();
        let mut leaves = Vec::new();
        numeric_leaves(&v, String::new(), &mut leaves);
        if let Some(at) = leaves.get(leaf % leaves.len().max(1)) {
            *v.pointer_mut(at).unwrap() = value;
        }
        if let Ok(spec) = WatermarkSpec::from_json_value(v) {
            let shape = spec.image.unwrap_or(ImageShape { height: 28, width: 28, channels: 1 });
            if let Ok(stamp) = crate::watermark::Stamp::new(&spec.trigger, spec.seed, shape) {
                let mut img = vec![0u8; shape.len()];
                stamp.apply(&mut img);
            }
        }
    }
}
