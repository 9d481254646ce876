//! The real binary, run as a user would.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn hallmark(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hallmark"))
        .args(args)
        .output()
        .expect("hallmark runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn spec_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("watermark_specs")
        .join(name)
        .display()
        .to_string()
}

/// A small IDX dataset (28×28 grey, 10 classes) in `dir`.
fn small_idx(dir: &Path, n: usize) -> PathBuf {
    use hallmark::dataset::{Dataset, ImageShape, Layout, image_sha256s, write_release};
    let shape = ImageShape {
        height: 28,
        width: 28,
        channels: 1,
    };
    let pixels = (0..n * 784).map(|i| (i * 7 % 200) as u8).collect();
    let ds = Dataset::new(shape, pixels, (0..n as u32).map(|i| i % 10).collect(), 10).unwrap();
    let layout = Layout::Idx {
        images: "train-images-idx3-ubyte".into(),
        labels: "train-labels-idx1-ubyte".into(),
        gzip: true,
    };
    fs::create_dir_all(dir).unwrap();
    write_release(&ds, &layout, dir, &image_sha256s(&ds), &|| {}).unwrap();
    dir.to_path_buf()
}

#[test]
fn watermark_writes_release_secret_and_commitment() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 200);
    let out = t.path().join("rel");
    let secret = t.path().join("secret.json");
    let o = hallmark(&[
        "watermark",
        "--spec",
        &spec_path("dvbw-cross-28x28-grey.toml"),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let commitment = String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(commitment.len(), 64);
    assert!(out.join("train-images-idx3-ubyte.gz").exists() && out.join("manifest.jsonl").exists());
    let release: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("release.json")).unwrap()).unwrap();
    assert_eq!(release["commitment"], commitment.as_str());
    let again = hallmark(&["spec", "commitment", secret.to_str().unwrap()]);
    assert_eq!(String::from_utf8(again.stdout).unwrap().trim(), commitment);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // No temporary folder or file is left beside the outputs.
    let names: Vec<String> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn existing_outputs_are_kept_unless_forced() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 50);
    let out = t.path().join("rel");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep"), b"precious").unwrap();
    let secret = t.path().join("s.json");
    let args = [
        "watermark",
        "--spec",
        &spec_path("badnets-28x28-grey.toml"),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
    ];
    let o = hallmark(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(fs::read(out.join("keep")).unwrap(), b"precious");
    assert!(!secret.exists());
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(hallmark(&forced).status.success());
    assert!(!out.join("keep").exists() && out.join("manifest.jsonl").exists());
}

#[test]
fn a_secret_inside_the_release_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 20);
    let out = t.path().join("rel");
    let o = hallmark(&[
        "watermark",
        "--spec",
        &spec_path("badnets-28x28-grey.toml"),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--secret",
        out.join("secret.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("must never be published"), "{}", text(&o));
    assert!(!out.exists());
}

#[test]
fn a_failed_run_leaves_no_release_and_no_secret() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 20);
    let spec = t.path().join("bad.toml");
    // Valid on its own, but class 42 does not exist in the dataset.
    fs::write(
        &spec,
        fs::read_to_string(spec_path("fixed/badnets-28x28-grey.toml"))
            .unwrap()
            .replace("target = 1", "target = 42"),
    )
    .unwrap();
    let out = t.path().join("rel");
    let secret = t.path().join("s.json");
    let o = hallmark(&[
        "watermark",
        "--spec",
        spec.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
        "--public-trigger",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("labelling.target") && text(&o).contains("10 classes"),
        "{}",
        text(&o)
    );
    assert!(!out.exists() && !secret.exists());
    assert_eq!(
        fs::read_dir(t.path()).unwrap().count(),
        2,
        "only the input and the spec remain"
    );
}

#[test]
fn spec_check_names_the_bad_field() {
    let t = tempfile::tempdir().unwrap();
    let ok = hallmark(&["spec", "check", &spec_path("wanet-32x32-rgb.toml")]);
    assert!(
        ok.status.success() && text(&ok).contains("warp"),
        "{}",
        text(&ok)
    );
    let bad = t.path().join("bad.toml");
    fs::write(&bad, "name = \"x\"\nrate = 0\nseed = 1\n[labelling]\nkind = \"untargeted\"\n[trigger]\nkind = \"patch\"\npattern = \"cross\"\n").unwrap();
    let o = hallmark(&["spec", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("rate: must be in (0, 1]"), "{}", text(&o));
}

/// `spec check` says what a family draws and how much secret that is; `watermark` refuses a
/// fixed (public) trigger unless told `--public-trigger`, and says why.
#[test]
fn families_show_their_entropy_and_fixed_triggers_need_consent() {
    let o = hallmark(&[
        "spec",
        "check",
        &spec_path("badnets-square-28x28-grey.toml"),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("18.0 bits of secret per release"), "{t}");
    for part in ["target", "trigger.pattern", "trigger.position"] {
        assert!(t.contains(part), "{part}: {t}");
    }
    let o = hallmark(&[
        "spec",
        "check",
        &spec_path("fixed/badnets-square-28x28-grey.toml"),
    ]);
    assert!(text(&o).contains("family     none"), "{}", text(&o));

    let dir = tempfile::tempdir().unwrap();
    let input = small_idx(&dir.path().join("in"), 40);
    let run = |spec: &str, extra: &[&str]| {
        let out = dir.path().join(format!("rel-{}", extra.len()));
        let secret = dir.path().join(format!("s-{}.json", extra.len()));
        let mut args = vec![
            "watermark",
            "--spec",
            spec,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--secret",
            secret.to_str().unwrap(),
            "--force",
        ];
        args.extend_from_slice(extra);
        (hallmark(&args), out, secret)
    };
    let fixed = spec_path("fixed/badnets-square-28x28-grey.toml");
    let (o, out, secret) = run(&fixed, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no [family] section") && text(&o).contains("--public-trigger"),
        "{}",
        text(&o)
    );
    assert!(!out.exists() && !secret.exists());
    let (o, out, _) = run(&fixed, &["--public-trigger"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("release.json").exists());
    // A family that draws only its target (pattern and place pinned) is too little to publish.
    let pinned = dir.path().join("pinned.toml");
    std::fs::write(
        &pinned,
        "name = \"pinned\"\nrate = 0.1\nseed = 1\n[labelling]\nkind = \"targeted\"\n\
         [family]\npattern = \"pinned\"\nposition = \"pinned\"\n[trigger]\nkind = \"patch\"\n\
         pattern = \"square\"\n",
    )
    .unwrap();
    let (o, _, _) = run(pinned.to_str().unwrap(), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("bits of secret"), "{}", text(&o));
    // TUAP's family draws its crafting seed too (its samples), and its controls are crafted with
    // the release: `spec check` says so.
    let o = hallmark(&["spec", "check", &spec_path("tuap-28x28-grey.toml")]);
    let t = text(&o);
    assert!(
        o.status.success() && t.contains("67.3 bits of secret"),
        "{t}"
    );
    assert!(
        t.contains("seed") && !t.contains("cannot draw controls"),
        "{t}"
    );
}

/// An all-to-all family through the CLI: `spec check` names the drawn class mapping, and the
/// release sends every poisoned sample of class y to π(y), the secret's derangement.
#[test]
fn an_all_to_all_release_sends_each_class_where_its_secret_mapping_does() {
    let spec = spec_path("badnets-square-all-to-all-28x28-grey.toml");
    let o = hallmark(&["spec", "check", &spec]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("all_to_all, the class mapping drawn for each release"),
        "{t}"
    );
    assert!(t.contains("labelling.mapping            20.3 bits"), "{t}");
    let dir = tempfile::tempdir().unwrap();
    let input = small_idx(&dir.path().join("in"), 300);
    let (out, secret) = (dir.path().join("rel"), dir.path().join("s.json"));
    let o = hallmark(&[
        "watermark",
        "--spec",
        &spec,
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let rec = hallmark::watermark::SecretRecord::load(&secret).unwrap();
    let pi = rec.spec.labelling.mapping(10).unwrap();
    assert!(pi.iter().enumerate().all(|(y, &t)| t != y as u32), "{pi:?}");
    let raw = fs::read(out.join("train-labels-idx1-ubyte.gz")).unwrap();
    let labels = hallmark::dataset::idx::parse(hallmark::dataset::idx::maybe_gunzip(raw).unwrap())
        .unwrap()
        .data;
    assert_eq!(rec.poisoned.len(), 30);
    let mut moved = std::collections::BTreeSet::new();
    for p in &rec.poisoned {
        assert_eq!(p.original_label, p.index as u32 % 10);
        assert_eq!(p.new_label, pi[p.original_label as usize]);
        assert_eq!(u32::from(labels[p.index]), p.new_label);
        moved.insert(p.original_label);
    }
    assert!(
        moved.len() >= 8,
        "poisoned samples come from every class: {moved:?}"
    );
    let untouched = (0..300)
        .filter(|i| rec.poisoned.iter().all(|p| p.index != *i))
        .all(|i| u32::from(labels[i]) == i as u32 % 10);
    assert!(untouched, "other samples keep their labels");
}

#[test]
fn spec_controls_lists_the_verifiers_controls_but_not_the_secret() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 200);
    let secret = t.path().join("secret.json");
    let o = hallmark(&[
        "watermark",
        "--spec",
        &spec_path("badnets-square-28x28-grey.toml"),
        "--input",
        input.to_str().unwrap(),
        "--output",
        t.path().join("rel").to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let list = |extra: &[&str]| {
        let mut args = vec!["spec", "controls", secret.to_str().unwrap()];
        args.extend_from_slice(extra);
        hallmark(&args)
    };
    let lines = |o: &Output| -> Vec<serde_json::Value> {
        assert!(o.status.success(), "{}", text(o));
        String::from_utf8(o.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let o = list(&[]);
    let all = lines(&o);
    assert_eq!(all.len(), 99, "⌈1/alpha⌉ − 1 at alpha 0.01");
    assert!(String::from_utf8_lossy(&o.stderr).contains("drawn from the secret's family"));
    // Control j is the family's member drawn with the record's j-th control seed: the triggers
    // `hallmark verify` ranks the secret among.
    let rec = hallmark::watermark::SecretRecord::load(&secret).unwrap();
    let nonce = hex::decode(&rec.nonce).unwrap();
    let family = rec.family.as_ref().unwrap();
    for (j, line) in all.iter().enumerate() {
        let c = hallmark::spec::family::draw(
            family,
            rec.dataset.num_classes,
            rec.dataset.shape,
            hallmark::spec::family::control_seed(&nonce, j),
        )
        .unwrap();
        assert_eq!(line["control"], j);
        assert_eq!(line["trigger"], serde_json::to_value(&c.trigger).unwrap());
        assert_eq!(
            line["labelling"],
            serde_json::to_value(c.labelling).unwrap()
        );
    }
    // Neither the secret trigger nor the record's nonce is printed.
    let printed = text(&o);
    assert!(!printed.contains(&rec.nonce));
    let secret_trigger = serde_json::to_value(&rec.spec.trigger).unwrap();
    assert!(all.iter().all(|l| l["trigger"] != secret_trigger));
    // The list is the record's: the same on a re-run; K and a research seed change it as they
    // change a verification's.
    assert_eq!(list(&[]).stdout, o.stdout);
    assert_eq!(
        lines(&list(&["--alpha", "0.2", "--controls", "5"]))[..],
        all[..5]
    );
    assert_eq!(lines(&list(&["--alpha", "0.05"])).len(), 19);
    let seeded = lines(&list(&["--seed", "7"]));
    assert_eq!(seeded.len(), 99);
    assert_ne!(seeded, all);
    // Too few controls for alpha are refused by name.
    let o = list(&["--controls", "3"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("controls"), "{}", text(&o));
}

#[test]
fn a_tampered_secret_record_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("s.json");
    fs::write(&p, "{\"version\": 1, \"nonce\": \"00\"}").unwrap();
    let o = hallmark(&["spec", "commitment", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("s.json") && text(&o).contains("not a secret record"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_release_with_several_triggers_needs_one_chosen_to_verify() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 300);
    let (out, secret) = (t.path().join("rel"), t.path().join("secret.json"));
    let args = |spec: &str, triggers: &str| {
        hallmark(&[
            "watermark",
            "--spec",
            &spec_path(spec),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--secret",
            secret.to_str().unwrap(),
            "--triggers",
            triggers,
            "--force",
        ])
    };
    let o = args("badnets-square-28x28-grey.toml", "3");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("90 poisoned by 3 independent triggers"),
        "{}",
        text(&o)
    );
    let commitment = String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    let set = hallmark::watermark::Secret::load(&secret).unwrap();
    assert_eq!(
        (set.trigger_count(), set.commitment()),
        (3, commitment.clone())
    );
    let again = hallmark(&["spec", "commitment", secret.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), commitment);
    assert_eq!(
        String::from_utf8_lossy(&again.stderr)
            .matches("trigger ")
            .count(),
        3
    );
    // Verifying needs the trigger to spend, and one that exists.
    let verify = |trigger: Option<&str>| {
        let mut a = vec![
            "verify",
            "--secret",
            secret.to_str().unwrap(),
            "--data",
            input.to_str().unwrap(),
            "--endpoint",
            "http://127.0.0.1:9",
            "--protocol",
            "v2",
            "--allow-private",
            "--retries",
            "0",
            "--report",
        ];
        let report = t.path().join("v.json");
        let report = report.to_str().unwrap().to_string();
        a.push(&report);
        if let Some(k) = trigger {
            a.extend(["--trigger", k]);
        }
        text(&hallmark(&a))
    };
    let e = verify(None);
    assert!(e.contains("carries 3 triggers: choose"), "{e}");
    let e = verify(Some("4"));
    assert!(e.contains("triggers 1 to 3"), "{e}");
    // A fixed spec has one trigger to give.
    let o = args("fixed/badnets-square-28x28-grey.toml", "2");
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("one fixed trigger"), "{}", text(&o));
}

/// `--also-spec` stamps a trigger of another family beside the spec's, each on its own samples,
/// into one set whose triggers verify one by one.
#[test]
fn a_release_may_carry_watermarks_of_two_families() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 300);
    let (out, secret) = (t.path().join("rel"), t.path().join("secret.json"));
    let args = |spec: &str, also: &str, extra: &[&str]| {
        let (input, out, secret) = (
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            secret.to_str().unwrap(),
        );
        let (spec, also) = (spec_path(spec), spec_path(also));
        let mut a = vec![
            "watermark",
            "--spec",
            &spec,
            "--also-spec",
            &also,
            "--input",
            input,
            "--output",
            out,
            "--secret",
            secret,
            "--force",
        ];
        a.extend(extra);
        hallmark(&a)
    };
    let o = args(
        "badnets-square-all-to-all-28x28-grey.toml",
        "blended-image-all-to-all-28x28-grey.toml",
        &["--triggers", "2"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(
            "badnets-square-all-to-all-28x28-grey + badnets-square-all-to-all-28x28-grey + \
             blended-image-all-to-all-28x28-grey): 90 poisoned by 3 independent triggers"
        ),
        "{}",
        text(&o)
    );
    let set = hallmark::watermark::Secret::load(&secret).unwrap();
    let families: Vec<String> = set
        .records()
        .map(|r| r.family.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(
        families[1..],
        [
            "badnets-square-all-to-all-28x28-grey",
            "blended-image-all-to-all-28x28-grey"
        ]
    );
    let mut seen = std::collections::HashSet::new();
    assert!(
        set.records()
            .flat_map(|r| &r.poisoned)
            .all(|p| seen.insert(p.index)),
        "the triggers share no sample"
    );
    // The blend trigger is spent like any other of the set.
    let (blend, spent) = set.trigger(Some(3)).unwrap();
    assert_eq!(blend.spec.trigger.kind(), "blend");
    assert_eq!(spent.unwrap().release_commitment, set.commitment());
    // A fixed spec beside a family is refused by name, and nothing is written.
    fs::remove_file(&secret).unwrap();
    let o = args(
        "badnets-square-all-to-all-28x28-grey.toml",
        "fixed/badnets-square-28x28-grey.toml",
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("--also-spec") && text(&o).contains("no [family] section"),
        "{}",
        text(&o)
    );
    assert!(!secret.exists());
}

/// `hallmark verify` checks its endpoint and test settings as the HTTP API does (the same ranges,
/// the same words, the flag's name in place of the field's) before it contacts anything: a zero
/// standard deviation would otherwise divide every pixel by zero and send infinities.
#[test]
fn verify_refuses_settings_out_of_range_by_flag() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 100);
    let (out, secret) = (t.path().join("rel"), t.path().join("secret.json"));
    let o = hallmark(&[
        "watermark",
        "--spec",
        &spec_path("badnets-square-28x28-grey.toml"),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--secret",
        secret.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report = t.path().join("v.json");
    for (flag, value, says) in [
        ("--std", "0", "--std: at most 4 positive finite values"),
        (
            "--std",
            "0.5,nan",
            "--std: at most 4 positive finite values",
        ),
        ("--mean", "inf", "--mean: at most 4 finite values"),
        ("--scale", "0", "--scale: a finite non-zero number"),
        ("--batch-size", "0", "--batch-size: 1 to 1024, got 0"),
        ("--concurrency", "100", "--concurrency: 1 to 64, got 100"),
        ("--timeout", "0", "--timeout: seconds in (0, 600]"),
        ("--retries", "11", "--retries: 0 to 10, got 11"),
        ("--m", "1", "--m: 2 to 10000, got 1"),
        ("--tau", "1", "--tau: in [0, 1), got 1"),
        ("--alpha", "0", "--alpha: in (0, 1), got 0"),
        ("--round", "0", "--round: 1 to 1000, got 0"),
        ("--controls", "9", "--controls: with 9 controls"),
        (
            "--model",
            "../x",
            "--model: \"../x\" is not one plain path segment",
        ),
    ] {
        let o = hallmark(&[
            "verify",
            "--secret",
            secret.to_str().unwrap(),
            "--data",
            input.to_str().unwrap(),
            "--endpoint",
            "http://127.0.0.1:9",
            "--protocol",
            "v2",
            "--allow-private",
            "--report",
            report.to_str().unwrap(),
            flag,
            value,
        ]);
        assert!(!o.status.success());
        assert!(text(&o).contains(says), "{flag} {value}: {}", text(&o));
        assert!(!report.exists());
    }
}

#[test]
fn image_folders_are_watermarked_into_png_trees() {
    let t = tempfile::tempdir().unwrap();
    let input = small_idx(&t.path().join("in"), 60);
    let tree = t.path().join("tree");
    let o = hallmark(&[
        "convert",
        "--input",
        input.to_str().unwrap(),
        "--to",
        "folder",
        "--output",
        tree.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    fs::remove_file(tree.join("manifest.jsonl")).unwrap();
    fs::remove_file(tree.join("release.json")).unwrap();
    let out = t.path().join("rel");
    let o = hallmark(&[
        "watermark",
        "--spec",
        &spec_path("blended-28x28-grey.toml"),
        "--input",
        tree.to_str().unwrap(),
        "--format",
        "folder",
        "--output",
        out.to_str().unwrap(),
        "--secret",
        t.path().join("s.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let pngs = walk(&out)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .count();
    assert_eq!(pngs, 60);
    let secret: serde_json::Value =
        serde_json::from_slice(&fs::read(t.path().join("s.json")).unwrap()).unwrap();
    assert_eq!(secret["poisoned"].as_array().unwrap().len(), 6);
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path))
        } else {
            out.push(path)
        }
    }
    out
}

/// Output piped into a reader that stops early ends the command quietly: no panic, no
/// "Broken pipe" message.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hallmark"))
        .args(["openapi"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the document (tens of kilobytes) is written.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

/// `hallmark report` refuses what is not a verdict with an error naming the file, and writes
/// nothing.
#[test]
fn report_names_a_file_that_is_not_a_verdict() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("report.html");
    let missing = t.path().join("missing.json");
    let o = hallmark(&[
        "report",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("missing.json"), "{}", text(&o));
    let not = t.path().join("spec.json");
    fs::write(&not, r#"{"decision": "used", "reason": "forged"}"#).unwrap();
    let o = hallmark(&[
        "report",
        not.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a hallmark verdict"), "{}", text(&o));
    assert!(!out.exists());
}
