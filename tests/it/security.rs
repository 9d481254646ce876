//! The attacks of a careful client with a publisher or auditor key (docs/threat-model.md), each
//! against the real service: nothing taken from a secret reaches an auditor or an admin, every
//! oversized or decompression-bomb request ends in a 4xx while the server lives, links do not lead
//! out of the dataset roots, and a grant can be held to the suspect's endpoints.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use hallmark::dataset::{self, Format, Split};
use hallmark::spec::WatermarkSpec;
use hallmark::watermark::{self, SecretRecord};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::service::{Db, FASHION, TestApp, register_subset, spec_text};

fn shipped(name: &str) -> WatermarkSpec {
    WatermarkSpec::from_toml_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("watermark_specs")
            .join(name),
    )
    .unwrap()
}

/// A secret record of every trigger kind, made on 300 Fashion-MNIST training images.
fn records_of_every_kind() -> Vec<(&'static str, SecretRecord)> {
    let clean = dataset::read(
        Path::new(FASHION),
        Some(Format::Idx),
        Some(Split::Train),
        &|| {},
    )
    .unwrap()
    .dataset
    .subset(&(0..300).collect::<Vec<_>>())
    .unwrap();
    let make = |spec: &WatermarkSpec| {
        let mut ds = clean.clone();
        watermark::apply(&mut ds, spec, [7; 32]).unwrap()
    };
    let mut out = vec![];
    for (kind, file) in [
        ("patch", "badnets-28x28-grey.toml"),
        ("blend", "blended-28x28-grey.toml"),
        ("warp", "wanet-28x28-grey.toml"),
        ("rotate", "batt-rotate-28x28-grey.toml"),
        ("adaptive", "adaptive-patch-28x28-grey.toml"),
        ("physical", "physical-ba-28x28-grey.toml"),
        ("reflection", "refool-28x28-grey.toml"),
    ] {
        let r = make(&shipped(file));
        assert_eq!(r.spec.trigger.kind(), kind);
        out.push((kind, r));
    }
    // A crafted perturbation and a generated trigger, put in a BadNets record's place: what the
    // verdict may show does not depend on how they were made.
    let mut base = serde_json::to_value(make(&shipped("badnets-28x28-grey.toml"))).unwrap();
    // Without the family: the trigger put in its place is not the family's draw.
    base.as_object_mut().unwrap().remove("family");
    let values: Vec<i64> = (0..784).map(|i| ((i * 37) % 153) as i64 - 76).collect();
    let weights: Vec<f32> = (0..10).map(|i| 0.05 * i as f32 - 0.2).collect();
    for (kind, trigger) in [
        (
            "perturbation",
            json!({"kind": "perturbation", "values": values}),
        ),
        (
            "generated",
            json!({"kind": "generated", "form": "additive", "scale": 8.0, "pattern": {"layers": [
                {"op": "conv", "in_channels": 1, "out_channels": 1, "kernel": 3, "stride": 1,
                 "weights": hallmark::spec::network::encode_f32(&weights)},
                {"op": "tanh"}]}}),
        ),
    ] {
        let mut v = base.clone();
        v["spec"]["trigger"] = trigger;
        let r = SecretRecord::from_json(&v.to_string()).unwrap();
        assert_eq!(r.spec.trigger.kind(), kind);
        out.push((kind, r));
    }
    out
}

/// Byte sequences taken from a record that must never reach anyone but its owner: the nonce,
/// every long string of the trigger (images, networks), every list of numbers in it (patterns,
/// perturbations), the poisoned indices and the target.
fn fragments(r: &SecretRecord) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) if s.len() >= 16 => out.push(s.clone()),
            Value::Array(a) if a.len() >= 3 && a.iter().all(Value::is_number) => {
                out.push(Value::Array(a[..a.len().min(12)].to_vec()).to_string());
                out.push(
                    a[..a.len().min(12)]
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = vec![r.nonce.clone()];
    walk(&serde_json::to_value(&r.spec.trigger).unwrap(), &mut out);
    let idx: Vec<String> = r
        .poisoned
        .iter()
        .take(4)
        .map(|p| p.index.to_string())
        .collect();
    out.push(format!("[{}", idx.join(",")));
    if let Some(t) = r.spec.labelling.target() {
        out.push(format!("(target {t})"));
    }
    out
}

/// Signs `key` in to the console at `url` as a browser would: the session cookie to send back.
async fn console_cookie(browser: &reqwest::Client, url: &str, key: &str) -> String {
    let r = browser
        .post(format!("{url}/console/sign-in"))
        .form(&[("key", key)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    r.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// A watermark of every trigger kind is verified through the service against a real model
/// server; then every route an auditor or an admin can read is read, and every console page,
/// report and verdict they can open, and none of the bytes that each record's secret is made of
/// appears in any answer, nor in the database unsealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_shows_an_auditor_or_admin_anything_taken_from_the_secret() {
    let ml = tokio::task::spawn_blocking(crate::mlserver::start)
        .await
        .unwrap();
    let records = tokio::task::spawn_blocking(records_of_every_kind)
        .await
        .unwrap();
    let app = TestApp::spawn(Db::Sqlite).await;
    let (publisher, (auditor_id, auditor), holdout) = app.publisher_auditor_and_holdout().await;
    let endpoint = format!("http://127.0.0.1:{}", ml.port);
    let mut ids = vec![];
    for (kind, record) in &records {
        let record = serde_json::to_value(record).unwrap();
        let wm = app
            .import_and_grant(&publisher, kind, &holdout, record, &auditor_id)
            .await;
        let (s, v) = app
            .post(
                "/v1/verifications",
                &auditor,
                json!({"watermark_id": wm, "m": 12,
                       "endpoint": {"url": endpoint, "protocol": "v2", "model": "badnets"}}),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{kind}: {v}");
        let job = app
            .wait_job(
                v["job"]["id"].as_str().unwrap(),
                &auditor,
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(job["state"], "succeeded", "{kind}: {job}");
        ids.push((
            wm,
            v["verification"]["id"].as_str().unwrap().to_string(),
            v["job"]["id"].as_str().unwrap().to_string(),
        ));
    }
    let mut answers = vec![];
    answers.push((
        "/v1/keys".to_string(),
        app.get("/v1/keys", &app.admin).await,
    ));
    for key in [&auditor, &app.admin] {
        for path in ["/v1/verifications", "/v1/watermarks", "/v1/jobs"] {
            answers.push((path.to_string(), app.get(path, key).await));
        }
        for (wm, v, job) in &ids {
            for path in [
                format!("/v1/verifications/{v}"),
                format!("/v1/watermarks/{wm}"),
                format!("/v1/jobs/{job}"),
            ] {
                answers.push((path.clone(), app.get(&path, key).await));
            }
            let (s, _) = app.get(&format!("/v1/watermarks/{wm}/secret"), key).await;
            assert_eq!(s, StatusCode::NOT_FOUND);
        }
    }
    // The console's pages for the same keys: signed in as a browser would, every page, report
    // (HTML and PDF) and verdict the auditor and the admin can open.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut pages: Vec<(String, String)> = vec![];
    for key in [&auditor, &app.admin] {
        let cookie = console_cookie(&browser, &app.url, key).await;
        let mut paths: Vec<String> = [
            "/",
            "/console/datasets",
            "/console/watermarks",
            "/console/verifications",
        ]
        .map(String::from)
        .to_vec();
        for (wm, v, _) in &ids {
            paths.extend([
                format!("/console/watermarks/{wm}"),
                format!("/console/verifications/{v}"),
                format!("/console/verifications/{v}/report"),
                format!("/console/verifications/{v}/report?format=pdf"),
                format!("/console/verifications/{v}/verdict.json"),
            ]);
        }
        for path in paths {
            let r = browser
                .get(format!("{}{path}", app.url))
                .header(reqwest::header::COOKIE, &cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let body = r.bytes().await.unwrap();
            pages.push((path, String::from_utf8_lossy(&body).into_owned()));
        }
    }
    // The search can find what it looks for: the owner's console shows its own verdict whole.
    let owner_cookie = console_cookie(&browser, &app.url, &publisher).await;
    let own = browser
        .get(format!(
            "{}/console/verifications/{}/verdict.json",
            app.url, ids[0].1
        ))
        .header(reqwest::header::COOKIE, owner_cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        fragments(&records[0].1)
            .iter()
            .any(|f| own.contains(f.as_str())),
        "the owner's verdict: {own:.300}"
    );
    // The auditor's verdict still carries what it needs: decisions, statistics and the rank test
    // against the controls, for every kind.
    let (_, list) = app.get("/v1/verifications", &auditor).await;
    let kinds: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert!(v["verdict"]["primary"]["p_value"].is_number(), "{v}");
            assert!(
                v["verdict"]["protocol"]
                    .as_str()
                    .unwrap()
                    .starts_with("targeted")
            );
            assert!(v["verdict"]["rank"]["p_value"].is_number(), "{v}");
            v["verdict"]["rank"]["kind"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        kinds,
        records.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        "one verification of each kind"
    );
    for (kind, record) in &records {
        let secret = fragments(record);
        assert!(secret.len() >= 3, "{kind}: {secret:?}");
        for (path, (status, body)) in &answers {
            assert!(status.is_success(), "{path}: {status} {body}");
            let text = body.to_string();
            for f in &secret {
                assert!(
                    !text.contains(f.as_str()),
                    "{kind}: {path} shows {f:?} from the secret record"
                );
            }
        }
        for (path, text) in &pages {
            for f in &secret {
                assert!(
                    !text.contains(f.as_str()),
                    "{kind}: the console's {path} shows {f:?} from the secret record"
                );
            }
        }
    }
    // At rest the verdicts are sealed.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&app.database_url).await.unwrap();
    let rows: Vec<(String,)> = sqlx::query_as("SELECT verdict FROM verifications")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), records.len());
    for (raw,) in rows {
        assert!(
            raw.starts_with("v1:") && !raw.contains("trail"),
            "{raw:.80}"
        );
    }
    // The owner still reads the whole verdict.
    let (_, full) = app
        .get(&format!("/v1/verifications/{}", ids[0].1), &publisher)
        .await;
    assert!(full["verdict"]["trail"][0]["triggered_sha256"].is_string());
    assert!(
        full["verdict"]["protocol"]
            .as_str()
            .unwrap()
            .contains("(target 1)")
    );
    app.stop().await;
}

/// A grant held to named endpoints lets the auditor verify those only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_limited_to_endpoints_refuses_others() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let (_, publisher) = app.new_key("publisher", "pub").await;
    let (auditor_id, auditor) = app.new_key("auditor", "aud").await;
    let ds = register_subset(&app, &publisher, 100).await;
    let (s, v) = app
        .post(
            "/v1/watermarks",
            &publisher,
            json!({"name": "w", "dataset_id": ds, "holdout_dataset_id": ds,
                   "spec": spec_text("badnets-square-28x28-grey.toml")}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let wm = v["watermark"]["id"].as_str().unwrap().to_string();
    app.wait_job(
        v["job"]["id"].as_str().unwrap(),
        &publisher,
        Duration::from_secs(60),
    )
    .await;
    let grants = format!("/v1/watermarks/{wm}/grants");
    for bad in [json!([]), json!(["ftp://x/"]), json!(["not a url"])] {
        let (s, v) = app
            .post(
                &grants,
                &publisher,
                json!({"auditor_id": auditor_id, "endpoints": bad}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (s, _) = app
        .post(
            &grants,
            &publisher,
            json!({"auditor_id": auditor_id, "endpoints": ["http://127.0.0.1:7001/v2/"]}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let verify = |url: &str| {
        json!({"watermark_id": wm, "m": 4,
               "endpoint": {"url": url, "protocol": "v2", "model": "m", "retries": 0}})
    };
    for other in [
        "http://127.0.0.1:7002",
        "http://localhost:7001",
        "https://127.0.0.1:7001",
    ] {
        let (s, v) = app.post("/v1/verifications", &auditor, verify(other)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{other}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("approved"),
            "{v}"
        );
    }
    let (s, v) = app
        .post(
            "/v1/verifications",
            &auditor,
            verify("http://127.0.0.1:7001/"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // The owner is not held to its own grant's list.
    let (s, v) = app
        .post(
            "/v1/verifications",
            &publisher,
            verify("http://127.0.0.1:7002"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    app.stop().await;
}

/// A PNG whose header claims `width` × `height` grey pixels, with a little data.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(vec![], flate2::Compression::fast());
    z.write_all(&vec![0u8; 1 << 20]).unwrap();
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A gzipped IDX images file whose header declares `count` 28×28 images, followed by
/// `zeros` bytes of data, and a labels file to go with it.
fn idx_bomb(count: u32, zeros: usize) -> (Vec<u8>, Vec<u8>) {
    let mut z = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    z.write_all(&[0, 0, 8, 3]).unwrap();
    for d in [count, 28, 28] {
        z.write_all(&d.to_be_bytes()).unwrap();
    }
    let block = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(block.len());
        z.write_all(&block[..n]).unwrap();
        left -= n;
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(count.min(10).to_be_bytes());
    labels.extend(vec![0u8; count.min(10) as usize]);
    (z.finish().unwrap(), labels)
}

pub async fn upload(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    files: Vec<(String, Vec<u8>)>,
) -> (StatusCode, Value) {
    let mut form = reqwest::multipart::Form::new().text("name", "attack");
    for (name, bytes) in files {
        form = form.part(
            "files",
            reqwest::multipart::Part::bytes(bytes).file_name(name),
        );
    }
    let r = client
        .post(url)
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The attacks the issue names, each ending in a clear 4xx with the server alive and unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_bomb_requests_end_in_4xx_and_the_server_lives() {
    let app = TestApp::spawn_with(Db::Sqlite, |c| {
        c.max_dataset_bytes = Some(64 << 20);
        c.max_upload_files = Some(20);
        c.max_datasets_per_key = Some(3);
        c.max_upload_bytes_per_key = Some(4 << 20);
    })
    .await;
    let (_, p) = app.new_key("publisher", "p").await;
    let ds = register_subset(&app, &p, 100).await;
    // A square of side 2^32 - 1 (103 GB) and one of 100,000 (10 GB): refused before allocation.
    for size in ["4294967295", "100000"] {
        let spec = spec_text("badnets-square-28x28-grey.toml")
            .replace("size = 3", &format!("size = {size}"));
        for route in ["/v1/watermarks"] {
            let (s, v) = app
                .post(
                    route,
                    &p,
                    json!({"name": "x", "dataset_id": ds, "spec": spec}),
                )
                .await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{size}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("trigger.size"),
                "{v}"
            );
        }
    }
    let uploads = format!("{}/v1/datasets/upload", app.url);
    // Decompression bombs: PNGs claiming 60000² and 20000² pixels, a gzip IDX claiming 5.48
    // million images, and one that claims less than it holds.
    let (big, _) = idx_bomb(5_480_000, 4 << 20);
    let (liar, labels) = idx_bomb(10, 32 << 20);
    for (what, files, want) in [
        (
            "60000² PNG",
            vec![
                ("a/1.png".to_string(), png_claiming(60000, 60000)),
                ("a/2.png".to_string(), png_claiming(60000, 60000)),
            ],
            "",
        ),
        (
            "20000² PNG",
            vec![("a/1.png".to_string(), png_claiming(20000, 20000))],
            "",
        ),
        (
            "IDX claiming 5.48 million images",
            vec![
                ("train-images-idx3-ubyte.gz".to_string(), big),
                ("train-labels-idx1-ubyte".to_string(), labels.clone()),
            ],
            "over the dataset size limit",
        ),
        (
            "IDX holding more than it claims",
            vec![
                ("train-images-idx3-ubyte.gz".to_string(), liar),
                ("train-labels-idx1-ubyte".to_string(), labels),
            ],
            "inflates to more than",
        ),
    ] {
        let (s, v) = upload(&app.client, &uploads, &p, files).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(want), "{what}: {m}");
        // The message names files within the upload, not the server's folders or process.
        let data = app.dir.path().to_string_lossy().into_owned();
        assert!(!m.contains(&data) && !m.contains(".partial"), "{what}: {m}");
    }
    // Quotas: files in one upload, bytes a key keeps, datasets a key has.
    let many: Vec<_> = (0..21)
        .map(|i| (format!("c/{i}.png"), png_claiming(2, 2)))
        .collect();
    let (s, v) = upload(&app.client, &uploads, &p, many).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let (s, v) = upload(
        &app.client,
        &uploads,
        &p,
        vec![("c/big.png".into(), vec![7u8; 5 << 20])],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("quota_exceeded")),
        "{v}"
    );
    // A file and a folder of one name: a clear 400, not a 500.
    let (s, v) = upload(
        &app.client,
        &uploads,
        &p,
        vec![
            ("a".into(), vec![1]),
            ("a/b.png".into(), png_claiming(2, 2)),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("clashes"),
        "{v}"
    );
    register_subset(&app, &p, 50).await;
    register_subset(&app, &p, 60).await;
    let (s, v) = app
        .post(
            "/v1/datasets",
            &p,
            json!({"name": "one too many", "path": FASHION, "format": "idx", "split": "test"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("quota_exceeded")),
        "{v}"
    );
    let (s, _) = app.get("/health", &p).await;
    assert_eq!(s, StatusCode::OK, "the server lives");
    app.stop().await;
}

/// Links inside a dataset root do not lead out of it; missing and outside paths get one answer;
/// errors do not quote the files they read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_do_not_lead_out_of_the_roots_and_errors_quote_no_file() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let (_, p) = app.new_key("publisher", "p").await;
    let outside = app.dir.path().join("outside");
    crate::service::write_fashion_subset(&outside, Split::Train, 20);
    std::fs::write(outside.join("secret.key"), "SECRET-KEY-0123456789abcdef\n").unwrap();
    let imports = app.dir.path().join("imports");
    // A folder whose files are links to files outside the roots.
    let linked = imports.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        std::os::unix::fs::symlink(outside.join(f), linked.join(f)).unwrap();
    }
    // A folder linked as a whole.
    std::os::unix::fs::symlink(&outside, imports.join("whole")).unwrap();
    let register =
        |path: &Path| json!({"name": "x", "path": path.to_str().unwrap(), "format": "idx"});
    let (s, v) = app.post("/v1/datasets", &p, register(&linked)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("link"),
        "{v}"
    );
    let (s1, outside_answer) = app
        .post("/v1/datasets", &p, register(&imports.join("whole")))
        .await;
    let (s2, missing_answer) = app
        .post(
            "/v1/datasets",
            &p,
            register(&imports.join("no-such-folder")),
        )
        .await;
    let (s3, elsewhere) = app
        .post("/v1/datasets", &p, register(Path::new("/etc")))
        .await;
    assert_eq!(
        (s1, s2, s3),
        (
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN
        )
    );
    assert_eq!(outside_answer, missing_answer);
    assert_eq!(missing_answer, elsewhere);
    // A key file read as IDX: the error says what is wrong, not what the file holds.
    let keyish = imports.join("keyish");
    std::fs::create_dir_all(&keyish).unwrap();
    std::fs::copy(
        outside.join("secret.key"),
        keyish.join("train-images-idx3-ubyte"),
    )
    .unwrap();
    std::fs::copy(
        outside.join("train-labels-idx1-ubyte"),
        keyish.join("train-labels-idx1-ubyte"),
    )
    .unwrap();
    let (s, v) = app.post("/v1/datasets", &p, register(&keyish)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("magic number"), "{m}");
    let hex = hex::encode(b"SECR");
    assert!(!m.contains(&hex) && !m.contains("SECR"), "{m}");
    app.stop().await;
}

/// Peak resident memory of a process, bytes (VmHWM).
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// The attacks above against a real `hallmark serve` process with a 64 MiB dataset limit, and a
/// model server whose answer never ends: each ends in a 4xx or a failed job, the server answers
/// afterwards, and its peak resident memory stays under the budget docs/threat-model.md states
/// (256 MiB plus twice the dataset limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_on_a_real_server_process_stay_under_its_memory_budget() {
    use crate::service_process::Server;
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let imports = t.path().join("imports");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&imports).unwrap();
    let limit: u64 = 64 << 20;
    let config = t.path().join("hallmark.toml");
    std::fs::write(
        &config,
        format!("max_dataset_bytes = {limit}\nmax_upload_files = 10000\nallow_private_endpoints = true\n"),
    )
    .unwrap();
    let db = format!("sqlite://{}?mode=rwc", data.join("hallmark.db").display());
    let server = Server::start_with(
        &data,
        &db,
        &[&imports, Path::new(FASHION)],
        "server.log",
        &["--config", config.to_str().unwrap()],
    );
    // The database holds sealed secrets and key hashes: its owner's only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(data.join("hallmark.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "hallmark.db mode {mode:o}");
    let client = reqwest::Client::new();
    let admin = std::fs::read_to_string(data.join("admin.key")).unwrap();
    let call = |method: reqwest::Method, path: &str, key: &str, body: Option<Value>| {
        let mut r = client
            .request(method, server.url(path))
            .bearer_auth(key.trim());
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let r = r.send().await.unwrap();
            let s = r.status();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (_, k) = call(
        reqwest::Method::POST,
        "/v1/keys",
        &admin,
        Some(json!({"name": "p", "role": "publisher"})),
    )
    .await;
    let p = k["secret"].as_str().unwrap().to_string();
    let (s, holdout) = call(
        reqwest::Method::POST,
        "/v1/datasets",
        &p,
        Some(json!({"name": "held out", "path": FASHION, "format": "idx", "split": "test"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{holdout}");
    // A square of side 2^32 - 1.
    let spec = spec_text("badnets-square-28x28-grey.toml").replace("size = 3", "size = 4294967295");
    let (s, v) = call(
        reqwest::Method::POST,
        "/v1/watermarks",
        &p,
        Some(json!({"name": "x", "dataset_id": holdout["id"], "spec": spec})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // Decompression bombs and a 10,001-file upload.
    let uploads = server.url("/v1/datasets/upload");
    let (big, labels) = idx_bomb(5_480_000, 4 << 20);
    let (liar, _) = idx_bomb(80_000, 200 << 20);
    let many: Vec<_> = (0..10_001)
        .map(|i| (format!("c/{i}.png"), png_claiming(2, 2)))
        .collect();
    for (what, files, want) in [
        (
            "two 60000² PNGs",
            vec![
                ("a/1.png".to_string(), png_claiming(60000, 60000)),
                ("a/2.png".to_string(), png_claiming(60000, 60000)),
            ],
            StatusCode::BAD_REQUEST,
        ),
        (
            "an IDX claiming 5.48 million images",
            vec![
                ("train-images-idx3-ubyte.gz".to_string(), big),
                ("train-labels-idx1-ubyte".to_string(), labels.clone()),
            ],
            StatusCode::BAD_REQUEST,
        ),
        (
            "an IDX holding more than it claims",
            vec![
                ("train-images-idx3-ubyte.gz".to_string(), liar),
                ("train-labels-idx1-ubyte".to_string(), labels),
            ],
            StatusCode::BAD_REQUEST,
        ),
        ("10,001 files", many, StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let (s, v) = upload(&client, &uploads, &p, files).await;
        assert_eq!(s, want, "{what}: {v}");
    }
    // A verification against a model whose answer never ends fails its job.
    let record = tokio::task::spawn_blocking(|| records_of_every_kind().remove(0).1)
        .await
        .unwrap();
    let (s, w) = call(
        reqwest::Method::POST,
        "/v1/watermarks/import",
        &p,
        Some(json!({"name": "w", "holdout_dataset_id": holdout["id"],
                    "secret_record": serde_json::to_value(&record).unwrap()})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{w}");
    let endless = crate::endpoint::endless_server(None).await;
    let (s, v) = call(
        reqwest::Method::POST,
        "/v1/verifications",
        &p,
        Some(json!({"watermark_id": w["id"], "m": 8,
                    "endpoint": {"url": endless, "protocol": "v2", "model": "m", "retries": 0,
                                 "input_name": "x", "layout": "flat", "output": "probabilities"}})),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let job = loop {
        let (_, j) = call(reqwest::Method::GET, &format!("/v1/jobs/{job}"), &p, None).await;
        if ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or("")) {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("larger than"),
        "{job}"
    );
    let (s, _) = call(reqwest::Method::GET, "/health", &p, None).await;
    assert_eq!(s, StatusCode::OK, "the server lives");
    let peak = peak_memory(server.pid());
    let budget = (256 << 20) + 2 * limit;
    eprintln!(
        "server peak resident memory through the attacks: {} MiB (budget {} MiB)",
        peak >> 20,
        budget >> 20
    );
    assert!(peak < budget, "peak {} MiB", peak >> 20);
}
