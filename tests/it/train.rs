//! The trainer end to end (feature `train`): a served model answering V2 requests over real
//! HTTP, and a small calibration through `hallmark calibrate`.

use hallmark::dataset::{self, Format, Split};
use hallmark::endpoint::{EndpointConfig, HttpEndpoint, ModelEndpoint, Protocol};
use hallmark::train::serve::{LoadedModel, ModelInfo, ModelServer};
use hallmark::train::{Arch, Schedule, TrainConfig, train};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

pub fn fashion(split: Split, n: usize) -> hallmark::dataset::Dataset {
    let ds = dataset::read(
        Path::new("/usr/share/datasets/fashion-mnist"),
        Some(Format::Idx),
        Some(split),
        &|| {},
    )
    .unwrap()
    .dataset;
    ds.subset(&(0..n).collect::<Vec<_>>()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_model_answers_v2_requests_and_rejects_malformed_ones() {
    let data = fashion(Split::Train, 1000);
    let cfg = TrainConfig {
        arch: Arch::BaselineMnist,
        epochs: 1,
        batch_size: 64,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        schedule: Schedule::Cosine,
        crop_padding: 0,
        flip: false,
        seed: 1,
        warmup_epochs: 0,
        defence: Default::default(),
    };
    let t = train(&data, &cfg, tch::Device::Cpu, None, None, &|_| {}, &|_| {
        false
    })
    .unwrap();
    let info = ModelInfo {
        arch: cfg.arch,
        shape: data.shape(),
        classes: 10,
        training: Value::Null,
        pruned: Vec::new(),
    };
    let server = ModelServer::bind(
        "127.0.0.1:0",
        "tiny",
        LoadedModel::from_trained(t, info, tch::Device::Cpu),
    )
    .await
    .unwrap();
    let base = format!("http://127.0.0.1:{}", server.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(server.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();

    assert_eq!(
        http.get(format!("{base}/v2/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let meta: Value = http
        .get(format!("{base}/v2/models/tiny"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 1, 28, 28]));

    let pixels: Vec<f32> = (0..2 * 784).map(|i| (i % 255) as f32 / 255.0).collect();
    let ok: Value = http.post(format!("{base}/v2/models/tiny/infer"))
        .json(&json!({"id": "q1", "inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": pixels}]}))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!(ok["id"], "q1");
    let probs = ok["outputs"][0]["data"].as_array().unwrap();
    assert_eq!(probs.len(), 20);
    let sum: f64 = probs[..10].iter().map(|v| v.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-4, "{sum}");
    assert_eq!(ok["outputs"][1]["shape"], json!([2, 1]));

    for (body, want) in [
        ("{not json".to_string(), "malformed"),
        (json!({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5]}]}).to_string(), "needs 784 values"),
        (json!({"inputs": [{"name": "image", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": []}]}).to_string(), "does not hold"),
        (json!({"inputs": [{"name": "image", "shape": [1, 784], "datatype": "BYTES", "data": vec![0; 784]}]}).to_string(), "not supported"),
        (json!({"inputs": [{"name": "image", "shape": [1, 784], "datatype": "UINT8", "data": vec![0; 784]}], "outputs": [{"name": "logits"}]}).to_string(), "unknown output"),
    ] {
        let r = http.post(format!("{base}/v2/models/tiny/infer")).header("content-type", "application/json").body(body).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains(want), "{e}");
    }
    let r = http
        .post(format!("{base}/v2/models/other/infer"))
        .json(&json!({"inputs": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // hallmark's own client reads the metadata and gets the same answers as the raw request.
    let mut c = EndpointConfig::new(base.clone(), Protocol::V2, "tiny");
    c.allow_private = true;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    let images: Vec<Vec<u8>> = (0..2)
        .map(|k| (0..784).map(|i| ((k * 784 + i) % 255) as u8).collect())
        .collect();
    let preds = ep.predict(&images, data.shape()).await.unwrap();
    let labels = ok["outputs"][1]["data"].as_array().unwrap();
    assert_eq!(preds[0].label(), Some(labels[0].as_u64().unwrap() as u32));
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
}

#[test]
fn a_small_calibration_detects_the_watermarked_model_and_accuses_no_other() {
    let t = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("watermark_specs/badnets-square-28x28-grey.toml");
    let cache = t.path().join("clean-models");
    let calibrate = |out: &Path, models: &str, epochs: &str, more: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hallmark"))
            .args([
                "calibrate",
                "--spec",
                spec.to_str().unwrap(),
                "--data",
                "/usr/share/datasets/fashion-mnist",
                "--split",
                "train",
                "--limit",
                "4000",
                "--test-data",
                "/usr/share/datasets/fashion-mnist",
                "--test-split",
                "test",
                "--models",
                models,
                "--epochs",
                epochs,
                "--threads",
                "2",
                "--device",
                "cpu",
                "--clean-cache",
                cache.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(more)
            .output()
            .unwrap()
    };
    let rows = |out: &Path| -> Vec<Value> {
        let cal: Value =
            serde_json::from_slice(&std::fs::read(out.join("calibration.json")).unwrap()).unwrap();
        cal["rows"].as_array().unwrap().clone()
    };
    let out = t.path().join("first");
    let o = calibrate(&out, "1", "3", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = rows(&out);
    assert_eq!(first.len(), 3);
    // The watermarked model learnt its secret: the margin test rejects and the secret stands
    // out among its family. Whether it beats every one of the 99 controls after 3 epochs on
    // 4,000 images depends on the CPU's floating-point path (rank 1 or 2 seen): a control a pixel
    // away moves such a model almost as much; calibration measures that power. A secret ranked
    // first with the margin test passed is `used`; no independent model ever is.
    for r in &first {
        if r["kind"] == "watermarked" {
            let rank = r["rank"].as_u64().unwrap();
            assert!(
                r["effect"].as_f64().unwrap() > 0.2 && r["p_value"].as_f64().unwrap() < 0.01,
                "{r}"
            );
            assert!(rank <= 10, "{r}");
            assert_eq!(
                r["decision"],
                if rank == 1 { "used" } else { "not_shown" },
                "{r}"
            );
        } else {
            assert_eq!(r["decision"], "not_shown", "{r}");
        }
    }
    assert!(out.join("calibration.png").exists() && out.join("calibration.md").exists());

    // Resuming with more models keeps the three done and trains the next three.
    let o = calibrate(&out, "2", "3", &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming: 3 models of 6 kept"), "{err}");
    let second = rows(&out);
    assert_eq!(second.len(), 6);
    assert_eq!(
        second[..3],
        first[..],
        "the resumed rows are kept as they were"
    );
    assert!(second[3..].iter().all(|r| r["index"] == 1), "{second:?}");
    // ... but not across other settings.
    let o = calibrate(&out, "2", "2", &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("`/train/epochs` (3 there, 2 now)"), "{err}");
    assert_eq!(rows(&out), second, "a refused resume changes nothing");

    // A share of the run, index 1 alone in a folder of its own, trains the models the whole run
    // trained for that index (its seeds and secrets depend on the index only).
    let share = t.path().join("share");
    let o = calibrate(&share, "2", "3", &["--first-index", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        rows(&share),
        second[3..],
        "a share is the run's rows of its indices"
    );
    let o = calibrate(&share, "2", "3", &["--first-index", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("the first index 2 leaves no model to train"),
        "{err}"
    );

    // Another calibration loads the clean models from the cache instead of training them; this
    // one also puts every model through four of a thief's defences (fine-pruning, a STRIP gate
    // that refuses what it flags, a ShrinkPad gate that shifts every query, and MixUp, for which
    // the model is trained again) and verifies it again.
    let other = t.path().join("other");
    let o = calibrate(
        &other,
        "1",
        "3",
        &[
            "--defence",
            "fine-pruning,gate-strip,gate-shrinkpad,mixup",
            "--defence-data",
            "/usr/share/datasets/fashion-mnist",
            "--defence-split",
            "train",
            "--defence-limit",
            "500",
            "--defence-epochs",
            "1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("Clean #0: loaded from"), "{err}");
    let clean = |rows: &[Value]| {
        rows.iter()
            .find(|r| r["kind"] == "clean" && r["index"] == 0 && r["defence"].is_null())
            .unwrap()["metrics"]
            .clone()
    };
    let defended = rows(&other);
    assert_eq!(clean(&defended), clean(&first));
    assert_eq!(
        defended.len(),
        15,
        "3 models, each as trained and after 4 defences"
    );
    assert!(err.contains("Watermarked #0 after mixup: "), "{err}");
    for d in ["fine-pruning", "gate-strip", "gate-shrinkpad", "mixup"] {
        let rs: Vec<&Value> = defended.iter().filter(|r| r["defence"] == d).collect();
        assert_eq!(rs.len(), 3, "{d}: {defended:?}");
        // The gate refused some queries, and only the gate: 5% of the defender's clean images
        // are flagged by construction, but one verification's few hundred queries of a clean
        // model may meet none of them (a clean model behind STRIP under AVX-512: 0 of 353).
        let refused = rs.iter().filter(|r| r["withheld"].is_array()).count();
        if d == "gate-strip" {
            assert!(refused >= 1, "{d}: {rs:?}");
        } else {
            assert_eq!(refused, 0, "{d}: {rs:?}");
        }
        for r in rs {
            // A defence never makes an independent model look guilty.
            if r["kind"] != "watermarked" {
                assert_eq!(r["decision"], "not_shown", "{r}");
            }
            // A flagging gate's accuracy is the model's own; a transforming gate's is measured
            // through it, on 10,000 shifted test images.
            let trained = defended
                .iter()
                .find(|t| t["kind"] == r["kind"] && t["defence"].is_null())
                .unwrap();
            let (gated, own) = (
                r["metrics"]["benign_accuracy"].as_f64().unwrap(),
                trained["metrics"]["benign_accuracy"].as_f64().unwrap(),
            );
            match d {
                "gate-strip" => assert_eq!(gated, own, "{r}"),
                "gate-shrinkpad" => assert_ne!(gated, own, "{r}"),
                _ => {}
            }
        }
    }
    let md = std::fs::read_to_string(other.join("calibration.md")).unwrap();
    assert!(
        md.contains("| defence | watermarked detected | independent accused |")
            && md.contains("| gate-strip | "),
        "{md}"
    );
    // Defences are settings: a resume with others is refused.
    let o = calibrate(&other, "1", "3", &["--resume"]);
    assert!(!o.status.success());

    // Releases with a second watermark of another family: every model is verified with both
    // triggers at alpha / 2 (199 controls each) and accused when either is `used`.
    let two = t.path().join("two");
    let blend = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("watermark_specs/blended-image-all-to-all-28x28-grey.toml");
    let o = calibrate(&two, "1", "3", &["--also-spec", blend.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let both = rows(&two);
    assert_eq!(both.len(), 3);
    assert!(err.contains("Clean #0: loaded from"), "{err}");
    for r in &both {
        let triggers = r["triggers"].as_array().unwrap();
        assert_eq!(triggers.len(), 2, "{r}");
        assert_eq!(triggers[1]["spec"], "blended-image-all-to-all-28x28-grey");
        let used = triggers.iter().any(|t| t["decision"] == "used");
        assert_eq!(r["decision"] == "used", used, "{r}");
        let queries: u64 = triggers
            .iter()
            .map(|t| t["queries"].as_u64().unwrap())
            .sum();
        assert_eq!(r["queries"].as_u64(), Some(queries), "{r}");
        if r["kind"] == "watermarked" {
            // The patch is learnt as with one watermark; each rank is among 200 triggers.
            assert!(triggers[0]["effect"].as_f64().unwrap() > 0.2, "{r}");
            assert!(triggers[0]["rank"].as_u64().unwrap() <= 20, "{r}");
        } else {
            assert_eq!(r["decision"], "not_shown", "{r}");
        }
    }
    let secret =
        hallmark::watermark::Secret::load(&two.join("secrets/watermarked-0.secret.json")).unwrap();
    assert_eq!(secret.trigger_count(), 2);
    let md = std::fs::read_to_string(two.join("calibration.md")).unwrap();
    assert!(
        md.contains(
            "Verified at alpha 0.01 for the model (0.005 for each of the release's 2 triggers"
        ) && md.contains("| blended-image-all-to-all-28x28-grey |"),
        "{md}"
    );
}

/// The whole path through a Parquet release in the Hugging Face layout: converted, watermarked,
/// trained on, served, verified (the same pixels and labels as the IDX files it came from).
#[test]
fn hallmark_train_then_offline_verify_of_the_local_model() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).display().to_string();
    let fm = "/usr/share/datasets/fashion-mnist";
    fashion_train_subset("parquet", &p("clean"));
    let spec = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("watermark_specs/badnets-square-28x28-grey.toml");
    let o = hm(&[
        "watermark",
        "--spec",
        spec.to_str().unwrap(),
        "--input",
        &p("clean"),
        "--output",
        &p("release"),
        "--secret",
        &p("s.json"),
        // A fixed nonce: the release draws the same member of the family on every run.
        "--nonce",
        "0303030303030303030303030303030303030303030303030303030303030303",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (data, out) in [("release", "marked"), ("clean", "plain")] {
        let o = hm(&[
            "train",
            "--data",
            &p(data),
            "--test-data",
            fm,
            "--test-split",
            "test",
            "--secret",
            &p("s.json"),
            "--epochs",
            "5",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--out",
            &p(out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let history: Value = serde_json::from_slice(
            &std::fs::read(t.path().join(out).join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(history.as_array().unwrap().len(), 5);
        assert!(history[4]["metrics"]["asr"].is_number());
    }
    for (model, want) in [("marked", 0), ("plain", 1)] {
        let o = hm(&[
            "verify",
            "--secret",
            &p("s.json"),
            "--data",
            fm,
            "--split",
            "test",
            "--local-model",
            &p(model),
            "--report",
            &p(&format!("{model}.json")),
        ]);
        assert_eq!(
            o.status.code(),
            Some(want),
            "{model}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // The same models served behind a gate that refuses what it flags (STRIP, 5% of clean
    // images flagged), or flattens it: a thief dodging verification. Each verification
    // ends in a verdict, not an error, with the withheld answers counted: the watermarked model
    // is still caught (its triggered queries are the ones refused), the clean one never accused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gate_data = fashion(Split::Test, 1000);
    // Serves `model` behind `gate` on a loopback port and verifies it, the report in `report`,
    // with `more` of verify's arguments.
    let behind_with =
        |model: &str, gate: hallmark::train::gate::Gate, report: &str, more: &[&str]| {
            let loaded = LoadedModel::load(&t.path().join(model), tch::Device::Cpu).unwrap();
            let server = rt
                .block_on(ModelServer::bind_gated(
                    "127.0.0.1:0",
                    "m",
                    loaded,
                    Some(gate),
                ))
                .unwrap();
            let port = server.port();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let handle = rt.spawn(server.run_until_stopped(async {
                let _ = stopped.await;
            }));
            let (endpoint, secret) = (format!("http://127.0.0.1:{port}"), p("s.json"));
            let mut args = vec![
                "verify",
                "--secret",
                &secret,
                "--data",
                fm,
                "--split",
                "test",
                "--endpoint",
                &endpoint,
                "--protocol",
                "v2",
                "--model",
                "m",
                "--allow-private",
                "--report",
                report,
            ];
            args.extend_from_slice(more);
            let o = hm(&args);
            let _ = stop.send(());
            rt.block_on(handle).unwrap().unwrap();
            o
        };
    let behind = |model: &str, gate, report: &str| behind_with(model, gate, report, &[]);
    for on_flag in [
        hallmark::train::gate::OnFlag::Refuse,
        hallmark::train::gate::OnFlag::Uniform,
    ] {
        for (model, want) in [("marked", 0), ("plain", 1)] {
            let dir = t.path().join(model);
            let loaded = LoadedModel::load(&dir, tch::Device::Cpu).unwrap();
            let gate = hallmark::train::gate::Gate::calibrate(
                hallmark::train::gate::GateKind::Strip,
                &loaded,
                &gate_data,
                0.05,
                on_flag,
            )
            .unwrap();
            let report = p(&format!("{model}-{on_flag:?}.json"));
            let o = behind(model, gate, &report);
            let out = format!(
                "{model} behind {on_flag:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(o.status.code(), Some(want), "{out}");
            let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
            if model == "marked" {
                let w = &v["withheld"];
                // Of 100 pairs, 13 to 24 triggered and 1 to 3 benign answers were withheld under this
                // machine's kernels, `ATEN_CPU_CAPABILITY=default` and `avx2`.
                let (tw, bw) = (
                    w["triggered"].as_u64().unwrap(),
                    w["benign"].as_u64().unwrap(),
                );
                eprintln!(
                    "{model} behind {on_flag:?}: {tw} triggered and {bw} benign answers withheld, \
                     decision {}",
                    v["decision"]
                );
                assert!(tw >= 8 && bw * 3 < tw, "{out}");
                assert!(w["test"]["p_value"].as_f64().unwrap() < 0.05, "{out}");
                let refused = w["refused"].as_u64().unwrap();
                match on_flag {
                    hallmark::train::gate::OnFlag::Refuse => assert!(refused > 0, "{out}"),
                    _ => assert_eq!(refused, 0, "{out}"),
                }
                // The verdict as a document: the decision, the plots (differences, rank,
                // withheld answers) and the sha256 of the verdict it reports.
                let html = p(&format!("{model}-{on_flag:?}.html"));
                let o = hm(&["report", &report, "--format", "html", "--out", &html]);
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let doc = std::fs::read_to_string(&html).unwrap();
                assert!(doc.contains("class=\"decision used\""), "{out}");
                assert!(doc.contains(&hallmark::report::verdict_sha256(&v)));
                assert_eq!(doc.matches("<svg").count(), 3, "{out}");
                assert!(doc.contains(&format!("{} triggered", w["triggered"])));
            }
        }
    }

    // The other gates: SCALE-UP and IBD-PSC refusing what they flag, STRIP answering a random
    // class, and ShrinkPad and JPEG changing every query. Each verification ends in a verdict; the clean
    // model is never accused.
    let mut figures = Vec::new();
    for (kind, on_flag) in [
        (
            hallmark::train::gate::GateKind::ScaleUp,
            hallmark::train::gate::OnFlag::Refuse,
        ),
        (
            hallmark::train::gate::GateKind::IbdPsc,
            hallmark::train::gate::OnFlag::Refuse,
        ),
        (
            hallmark::train::gate::GateKind::Strip,
            hallmark::train::gate::OnFlag::RandomLabel,
        ),
        (
            hallmark::train::gate::GateKind::Shrinkpad,
            hallmark::train::gate::OnFlag::Refuse,
        ),
        (
            hallmark::train::gate::GateKind::Jpeg,
            hallmark::train::gate::OnFlag::Refuse,
        ),
    ] {
        for model in ["marked", "plain"] {
            let loaded = LoadedModel::load(&t.path().join(model), tch::Device::Cpu).unwrap();
            let gate =
                hallmark::train::gate::Gate::calibrate(kind, &loaded, &gate_data, 0.05, on_flag)
                    .unwrap();
            let report = p(&format!("{model}-{kind:?}.json"));
            let o = behind(model, gate, &report);
            let out = format!(
                "{model} behind {kind:?}/{on_flag:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(matches!(o.status.code(), Some(0 | 1)), "{out}");
            let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
            figures.push(format!(
                "{model} behind {kind:?}/{on_flag:?}: {} (effect {:.3}, withheld {})",
                v["decision"], v["primary"]["effect"], v["withheld"]
            ));
            if model == "plain" {
                assert_eq!(v["decision"], "not_shown", "{out}");
            }
        }
    }
    eprintln!("{}", figures.join("\n"));

    // The lying STRIP gate again, each model asked twice: the gate's lies are drawn from the
    // query's bytes, so an echo with 4 pixels one grey level off gets another lie, and those
    // answers count as withheld: the watermarked model is caught as behind the refusing gate,
    // the clean one is not accused. (Measured: `used`, 10 to 15 unsteady answers, under this
    // machine's kernels, `ATEN_CPU_CAPABILITY=default` and `avx2`; asked once, `not_shown`.)
    for (model, want) in [("marked", 0), ("plain", 1)] {
        let loaded = LoadedModel::load(&t.path().join(model), tch::Device::Cpu).unwrap();
        let gate = hallmark::train::gate::Gate::calibrate(
            hallmark::train::gate::GateKind::Strip,
            &loaded,
            &gate_data,
            0.05,
            hallmark::train::gate::OnFlag::RandomLabel,
        )
        .unwrap();
        let report = p(&format!("{model}-lying-twice.json"));
        let o = behind_with(model, gate, &report, &["--ask-twice"]);
        let out = format!(
            "{model} behind lying STRIP, asked twice: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        eprintln!(
            "{model} behind lying STRIP, asked twice: {} (withheld {}, echoes {})",
            v["decision"], v["withheld"], v["echoes"]
        );
        assert_eq!(o.status.code(), Some(want), "{out}");
        assert_eq!(v["echoes"], v["queries"], "{out}");
        if model == "marked" {
            assert!(
                v["withheld"]["unsteady"].as_u64().unwrap_or(0) >= 5,
                "{out}"
            );
        }
    }

    // The thief repairs the watermarked model: half the last block's channels pruned, then
    // fine-tuned on 1,000 clean training images. The repaired model is written with its pruning,
    // metrics before and after, and verifies to a verdict.
    let repair = |defence: &str, clean: &str, out: &str, more: &[&str]| {
        let (model, secret, out) = (p("marked"), p("s.json"), p(out));
        let mut args = vec![
            "repair",
            "--model",
            &model,
            "--defence",
            defence,
            "--prune-rate",
            "0.5",
            "--clean-data",
            clean,
            "--clean-split",
            "train",
            "--clean-limit",
            "1000",
            "--epochs",
            "2",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--test-data",
            fm,
            "--test-split",
            "test",
            "--secret",
            &secret,
            "--out",
            &out,
        ];
        args.extend_from_slice(more);
        hm(&args)
    };
    let o = repair("fine-pruning", fm, "repaired", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("pruned 16 of 32 channels"), "{err}");
    eprintln!("fine-pruning: {err}");
    let r: Value =
        serde_json::from_slice(&std::fs::read(t.path().join("repaired/repair.json")).unwrap())
            .unwrap();
    assert_eq!(r["report"]["pruned"].as_array().unwrap().len(), 16, "{r}");
    for when in ["before", "after"] {
        assert!(r[when]["benign_accuracy"].as_f64().unwrap() > 0.5, "{r}");
        assert!(r[when]["asr"].is_number(), "{r}");
    }
    let info: Value =
        serde_json::from_slice(&std::fs::read(t.path().join("repaired/model.json")).unwrap())
            .unwrap();
    assert_eq!(info["pruned"], r["report"]["pruned"]);
    assert_eq!(
        info["training"]["repair"]["config"]["defence"],
        "fine-pruning"
    );
    // ANP, 300 batches of mask optimisation: its pruned neurons are in the record.
    let o = repair("anp", fm, "anp", &["--anp-iterations", "300"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    eprintln!("anp: {err}");
    assert!(err.contains("of 560 neurons"), "{err}");
    let r: Value =
        serde_json::from_slice(&std::fs::read(t.path().join("anp/repair.json")).unwrap()).unwrap();
    assert_eq!(r["report"]["anp"]["neurons"], 560, "{r}");
    assert_eq!(
        r["report"]["anp"]["layers"].as_array().unwrap().len(),
        3,
        "{r}"
    );
    let o = hm(&[
        "verify",
        "--secret",
        &p("s.json"),
        "--data",
        fm,
        "--split",
        "test",
        "--local-model",
        &p("repaired"),
        "--report",
        &p("repaired.json"),
    ]);
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "a verdict, not an error: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Clean data that is not a dataset is an error naming it, and nothing is written.
    let o = repair("fine-tuning", &p("nowhere"), "not-written", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nowhere"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!t.path().join("not-written").exists());
}

/// Runs the hallmark binary.
fn hm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hallmark"))
        .args(args)
        .output()
        .unwrap()
}

/// `hallmark convert` of Fashion-MNIST's first 4,000 training images to `format` in `out`.
fn fashion_train_subset(format: &str, out: &str) {
    ok(&hm(&[
        "convert",
        "--input",
        "/usr/share/datasets/fashion-mnist",
        "--split",
        "train",
        "--limit",
        "4000",
        "--to",
        format,
        "--output",
        out,
    ]));
}

/// Asserts that a command succeeded, showing its output otherwise.
fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `hallmark watermark --stream` of `input` with the any-size BadNets family and `nonce`,
/// the release in `output` and its secret in `secret`.
fn stream_release(input: &str, output: &str, secret: &str, nonce: &str) {
    let spec =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("watermark_specs/badnets-square-any-size.toml");
    ok(&hm(&[
        "watermark",
        "--stream",
        "--spec",
        spec.to_str().unwrap(),
        "--input",
        input,
        "--output",
        output,
        "--secret",
        secret,
        "--nonce",
        nonce,
    ]));
}

/// A streamed release (`watermark --stream`, samples chosen by key, record version 3) of
/// Fashion-MNIST as Parquet, with the any-size BadNets family: the trainer reads it, and the
/// model trained on it is found `used` from the version 3 record.
#[test]
fn a_model_trained_on_a_streamed_parquet_release_is_found_used() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).display().to_string();
    let fm = "/usr/share/datasets/fashion-mnist";
    fashion_train_subset("parquet", &p("clean"));
    stream_release(&p("clean"), &p("release"), &p("s.json"), &"05".repeat(32));
    let rec: Value = serde_json::from_slice(&std::fs::read(p("s.json")).unwrap()).unwrap();
    assert_eq!(rec["version"], 3);
    ok(&hm(&[
        "train",
        "--data",
        &p("release"),
        "--test-data",
        fm,
        "--test-split",
        "test",
        "--secret",
        &p("s.json"),
        "--epochs",
        "5",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--out",
        &p("marked"),
    ]));
    let o = hm(&[
        "verify",
        "--secret",
        &p("s.json"),
        "--data",
        fm,
        "--split",
        "test",
        "--local-model",
        &p("marked"),
        "--report",
        &p("marked.json"),
    ]);
    let v: Value = serde_json::from_slice(&std::fs::read(p("marked.json")).unwrap()).unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        v["decision"]
    );
    // Effect 0.994 to 0.997, rank 1 of 100 (p 0.01) under this machine's kernels,
    // `ATEN_CPU_CAPABILITY=default` and `avx2`.
    eprintln!(
        "streamed release: decision {}, secret effect {}, rank {} of {}",
        v["decision"], v["rank"]["secret"]["effect"], v["rank"]["rank"], v["rank"]["controls"]
    );
    assert_eq!(v["decision"], "used");
    assert_eq!(v["rank"]["rank"], 1);
}

/// Fashion-MNIST's images upscaled each to its own size (28 to 84 px a side, not square) and
/// saved as JPEG (quality 90) or PNG in a Hugging Face Parquet file: a dataset of mixed sizes.
const MIXED_FASHION: &str = r#"
import gzip, io, json, os, random, struct, sys
import pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
fm, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with gzip.open(fm + "/train-images-idx3-ubyte.gz") as f:
    f.read(16); pixels = f.read(n * 784)
with gzip.open(fm + "/train-labels-idx1-ubyte.gz") as f:
    f.read(8); labels = list(f.read(n))
rng = random.Random(1)
images = []
for i in range(n):
    im = Image.frombytes("L", (28, 28), pixels[i * 784:(i + 1) * 784])
    im = im.resize((rng.randint(28, 84), rng.randint(28, 84)), Image.BILINEAR)
    b = io.BytesIO()
    if i % 4:
        im.save(b, format="JPEG", quality=90); ext = "jpg"
    else:
        im.save(b, format="PNG"); ext = "png"
    images.append({"bytes": b.getvalue(), "path": "%d.%s" % (i, ext)})
t = pa.table({"image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
              "label": pa.array(labels, pa.int64())})
os.makedirs(out)
pq.write_table(t, out + "/train-00000-of-00001.parquet", row_group_size=1000)
"#;

/// A thief trains at its own input size: a streamed release of images of mixed sizes (28 to
/// 84 px, the any-size BadNets family stamped at each image's own size), read at 28×28
/// (`--resize`, bilinear as torchvision's `Resize`). The model trained on the release is found
/// `used`; one trained on the same images without the watermark is not accused.
#[test]
fn a_model_trained_at_its_own_size_on_a_mixed_size_release_is_found_used() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).display().to_string();
    let fm = "/usr/share/datasets/fashion-mnist";
    let o = Command::new(crate::parquet::python())
        .args(["-c", MIXED_FASHION, fm, &p("clean"), "4000"])
        .output()
        .unwrap();
    ok(&o);
    // Read without --resize, the mixed sizes are refused, with what to do.
    let o = hm(&[
        "train",
        "--data",
        &p("clean"),
        "--epochs",
        "1",
        "--out",
        &p("x"),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--resize"), "{e}");
    stream_release(&p("clean"), &p("release"), &p("s.json"), &"06".repeat(32));
    let mut effects = Vec::new();
    for (data, model, want) in [("release", "marked", 0), ("clean", "plain", 1)] {
        ok(&hm(&[
            "train",
            "--data",
            &p(data),
            "--resize",
            "28x28",
            "--test-data",
            fm,
            "--test-split",
            "test",
            "--epochs",
            "5",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--out",
            &p(model),
        ]));
        let report = p(&format!("{model}.json"));
        let o = hm(&[
            "verify",
            "--secret",
            &p("s.json"),
            "--data",
            fm,
            "--split",
            "test",
            "--local-model",
            &p(model),
            "--report",
            &report,
        ]);
        let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        eprintln!(
            "{model}: decision {}, secret effect {}, rank {} of {}",
            v["decision"], v["rank"]["secret"]["effect"], v["rank"]["rank"], v["rank"]["controls"]
        );
        assert_eq!(
            o.status.code(),
            Some(want),
            "{model}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        effects.push(v["rank"]["secret"]["effect"].as_f64().unwrap());
    }
    // Measured: effects 0.92 to 0.96 (rank 1 of 100) and −0.003 to −0.001 (rank 83 to 89)
    // under this machine's kernels, `ATEN_CPU_CAPABILITY=default` and `avx2`.
    assert!(effects[0] > 0.5 && effects[1] < 0.2, "{effects:?}");
}

/// A release with triggers of two families (BadNets square and a noise blend, `--also-spec`):
/// the model trained on it is verified with both triggers at once (`verify --trigger 1,2`),
/// each at alpha / 2 with its own 199 controls, and accused; the same model verified with the
/// two triggers of another release of the same families is not.
#[test]
fn a_model_verified_with_both_triggers_of_a_two_family_release() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).display().to_string();
    let fm = "/usr/share/datasets/fashion-mnist";
    fashion_train_subset("idx", &p("clean"));
    let spec = |name: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("watermark_specs")
            .join(name)
            .display()
            .to_string()
    };
    let (badnets, blend) = (
        spec("badnets-square-28x28-grey.toml"),
        spec("blended-28x28-grey.toml"),
    );
    // Fixed nonces: every run draws the same members of the two families.
    for (release, secret, nonce) in [("release", "s.json", "05"), ("other", "o.json", "06")] {
        ok(&hm(&[
            "watermark",
            "--spec",
            &badnets,
            "--also-spec",
            &blend,
            "--input",
            &p("clean"),
            "--output",
            &p(release),
            "--secret",
            &p(secret),
            "--nonce",
            &nonce.repeat(32),
        ]));
    }
    ok(&hm(&[
        "train",
        "--data",
        &p("release"),
        "--epochs",
        "5",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--out",
        &p("marked"),
    ]));
    for (secret, want) in [("s.json", 0), ("o.json", 1)] {
        let report = p(&format!("{secret}.verdict"));
        let o = hm(&[
            "verify",
            "--secret",
            &p(secret),
            "--trigger",
            "1,2",
            "--data",
            fm,
            "--split",
            "test",
            "--local-model",
            &p("marked"),
            "--sequential",
            "--report",
            &report,
        ]);
        let out = format!(
            "{secret}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        eprintln!("{out}");
        assert_eq!(o.status.code(), Some(want), "{out}");
        let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let verdicts = v["verdicts"].as_array().unwrap();
        assert_eq!(verdicts.len(), 2, "{out}");
        for (i, each) in verdicts.iter().enumerate() {
            assert_eq!(each["trigger"]["number"], i + 1, "{out}");
            assert_eq!(each["config"]["alpha"], 0.005, "{out}");
            assert_eq!(each["rank"]["controls"], 199, "{out}");
        }
        let decisions: Vec<&str> = verdicts
            .iter()
            .map(|each| each["decision"].as_str().unwrap())
            .collect();
        let p_min = verdicts
            .iter()
            .map(|each| {
                let primary = each["primary"]["p_value"].as_f64().unwrap();
                primary.max(each["rank"]["p_value"].as_f64().unwrap())
            })
            .fold(1.0, f64::min);
        assert_eq!(v["alpha"], 0.01, "{out}");
        assert_eq!(
            v["p_value"].as_f64().unwrap(),
            (2.0 * p_min).min(1.0),
            "{out}"
        );
        if want == 0 {
            assert_eq!(v["decision"], "used", "{out}");
            assert!(decisions.contains(&"used"), "{out}");
            assert!(
                out.contains("USED with 2 triggers, each at alpha 0.005"),
                "{out}"
            );
            // `hallmark report` reads the model's verdict with each trigger's.
            ok(&hm(&["report", &report, "--out", &p("report.html")]));
            let html = std::fs::read_to_string(t.path().join("report.html")).unwrap();
            assert!(html.contains("<h2>Trigger 2: "), "{html}");
        } else {
            assert_eq!(v["decision"], "not_shown", "{out}");
            assert!(!decisions.contains(&"used"), "{out}");
        }
    }
    // The same through the service: the release's two triggers spent by one verification
    // (`"triggers": 2`) of the model served over HTTP; the other release's, `not_shown`.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use crate::service::{Db, TestApp};
        use reqwest::StatusCode;
        let loaded = LoadedModel::load(&t.path().join("marked"), tch::Device::Cpu).unwrap();
        let server = ModelServer::bind("127.0.0.1:0", "m", loaded).await.unwrap();
        let port = server.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(server.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let app = TestApp::spawn(Db::Sqlite).await;
        let (publisher, (auditor_id, auditor), holdout) = app.publisher_auditor_and_holdout().await;
        for (secret, want) in [("s.json", "used"), ("o.json", "not_shown")] {
            let record: Value =
                serde_json::from_slice(&std::fs::read(t.path().join(secret)).unwrap()).unwrap();
            let wm = app
                .import_and_grant(&publisher, secret, &holdout, record, &auditor_id)
                .await;
            let body = |triggers: u32| {
                json!({"watermark_id": wm, "sequential": true, "triggers": triggers,
                       "endpoint": {"url": format!("http://127.0.0.1:{port}"),
                                    "protocol": "v2", "model": "m"}})
            };
            let (s, v) = app.post("/v1/verifications", &auditor, body(3)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
            let (s, v) = app.post("/v1/verifications", &auditor, body(2)).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{v}");
            assert_eq!(
                (
                    &v["verification"]["spent_trigger"],
                    &v["verification"]["spent_count"]
                ),
                (&json!(1), &json!(2)),
                "{v}"
            );
            let id = v["verification"]["id"].as_str().unwrap().to_string();
            let job = app
                .wait_job(
                    v["job"]["id"].as_str().unwrap(),
                    &auditor,
                    std::time::Duration::from_secs(300),
                )
                .await;
            assert_eq!(job["state"], "succeeded", "{job}");
            let (_, full) = app
                .get(&format!("/v1/verifications/{id}"), &publisher)
                .await;
            let (_, seen) = app.get(&format!("/v1/verifications/{id}"), &auditor).await;
            eprintln!(
                "service, {secret}: {} p={}",
                full["decision"], full["p_value"]
            );
            assert_eq!(full["decision"], want, "{full}");
            let verdicts = full["verdict"]["verdicts"].as_array().unwrap();
            assert_eq!(verdicts.len(), 2);
            for (i, each) in verdicts.iter().enumerate() {
                assert_eq!(each["trigger"]["number"], i + 1);
                assert_eq!(each["config"]["alpha"], 0.005);
            }
            assert_eq!(full["verdict"]["alpha"], 0.01);
            // The auditor sees each trigger's statistics, not what the secret gave.
            assert_eq!(seen["verdict"]["verdicts"].as_array().unwrap().len(), 2);
            assert!(!seen["verdict"].to_string().contains("triggered_sha256"));
            assert!(full["verdict"].to_string().contains("triggered_sha256"));
            let (s, _, doc) = app
                .get_text(&format!("/v1/verifications/{id}/report"), &auditor)
                .await;
            assert_eq!(s, StatusCode::OK);
            assert!(doc.contains("<h2>Trigger 2: "), "{doc}");
            // Both triggers are spent.
            let (s, v) = app.post("/v1/verifications", &auditor, body(1)).await;
            assert_eq!(s, StatusCode::CONFLICT, "{v}");
        }
        app.stop().await;
        let _ = stop.send(());
        served.await.unwrap().unwrap();
    });
    // The choice is made once: a trigger named twice is refused before any query.
    let o = hm(&[
        "verify",
        "--secret",
        &p("s.json"),
        "--trigger",
        "2,2",
        "--data",
        fm,
        "--split",
        "test",
        "--local-model",
        &p("marked"),
        "--report",
        &p("twice.json"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--trigger 2 is given twice"));
    assert!(!t.path().join("twice.json").exists());
}
