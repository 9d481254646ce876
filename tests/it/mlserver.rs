//! `hallmark verify` against a real MLServer 1.7.1 (installed by the test command) serving
//! scikit-learn MLPs trained on (a) a BadNets release, (b) a UBW-P release and (c) the clean
//! Fashion-MNIST subset (scripts/prepare-mlserver-models).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts MLServer on three free ports. A port found free can be taken by another test before
/// MLServer binds it; MLServer then fails to bind, and the start is tried again on new ports.
pub fn start() -> Server {
    let venv = root().join("target/mlserver-venv/bin/mlserver");
    assert!(
        venv.exists(),
        "MLServer is missing: run scripts/test (it calls scripts/ensure-mlserver)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut http, grpc, metrics) = (free_port(), free_port(), free_port());
    let status = Command::new(root().join("scripts/prepare-mlserver-models"))
        .args([
            dir.path().to_str().unwrap(),
            &http.to_string(),
            &grpc.to_string(),
            &metrics.to_string(),
        ])
        .env("HALLMARK", env!("CARGO_BIN_EXE_hallmark"))
        .status()
        .unwrap();
    assert!(status.success(), "preparing the models failed");
    for attempt in 1..=5 {
        let d = dir.path();
        let log_path = d.join("mlserver.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(&venv)
            .args(["start", d.join("repo").to_str().unwrap()])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        match wait_ready(&mut child, http, &log_path) {
            Ok(()) => {
                return Server {
                    child,
                    port: http,
                    dir,
                };
            }
            Err(port_taken) => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let _ = child.kill();
                let _ = child.wait();
                assert!(
                    port_taken && attempt < 5,
                    "MLServer did not get ready: {log}"
                );
                eprintln!(
                    "MLServer lost a port to another process (attempt {attempt}); trying other ports"
                );
                http = free_port();
                move_to_ports(&d.join("repo/settings.json"), http);
            }
        }
    }
    unreachable!("the fifth attempt returns or panics")
}

/// Points the settings that scripts/prepare-mlserver-models wrote at `http` and two other free
/// ports.
fn move_to_ports(settings: &Path, http: u16) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(settings).unwrap()).unwrap();
    v["http_port"] = http.into();
    v["grpc_port"] = free_port().into();
    v["metrics_port"] = free_port().into();
    std::fs::write(settings, v.to_string()).unwrap();
}

/// Waits until the three models answer ready. `Err(true)` when MLServer could not bind a port
/// (another process took it after `free_port` found it free), `Err(false)` when it exited for
/// another reason or was not ready after 90 seconds.
fn wait_ready(child: &mut Child, http: u16, log: &Path) -> Result<(), bool> {
    let deadline = Instant::now() + Duration::from_secs(90);
    for model in ["badnets", "ubw", "clean"] {
        let url = format!("http://127.0.0.1:{http}/v2/models/{model}/ready");
        while !ureq_ok(&url) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("address already in use") {
                return Err(true);
            }
            if child.try_wait().ok().flatten().is_some() || Instant::now() >= deadline {
                return Err(false);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    Ok(())
}

fn ureq_ok(url: &str) -> bool {
    Command::new("curl")
        .args(["-sf", "--max-time", "5", "-o", "/dev/null", url])
        .status()
        .is_ok_and(|s| s.success())
}

fn verify(
    s: &Server,
    secret: &str,
    model: &str,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    let report = s
        .dir
        .path()
        .join(format!("report-{model}-{secret}-{}.json", extra.join("")));
    let secret = s.dir.path().join(format!("{secret}.secret.json"));
    let endpoint = format!("http://127.0.0.1:{}", s.port);
    let mut args = vec![
        "verify",
        "--secret",
        secret.to_str().unwrap(),
        "--data",
        "/usr/share/datasets/fashion-mnist",
        "--split",
        "test",
        "--endpoint",
        &endpoint,
        "--model",
        model,
        "--allow-private",
        "--report",
        report.to_str().unwrap(),
        "--force",
    ];
    if !extra.contains(&"--protocol") {
        args.extend(["--protocol", "v2"]);
    }
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_hallmark"))
        .args(&args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let json = if Path::new(&report).exists() {
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
    } else {
        serde_json::Value::Null
    };
    (o.status.code().unwrap_or(-1), json, text)
}

fn summary(v: &serde_json::Value) -> String {
    format!(
        "{} p={:.3e} effect={:.4} pairs={} rank {} p={:.3} queries={}",
        v["decision"],
        v["primary"]["p_value"].as_f64().unwrap(),
        v["primary"]["effect"].as_f64().unwrap(),
        v["pairs"],
        v["rank"]["rank"],
        v["rank"]["p_value"].as_f64().unwrap(),
        v["queries"]
    )
}

#[test]
fn watermarked_models_are_detected_and_the_clean_one_is_not() {
    let s = start();
    for (model, secret, want) in [
        ("badnets", "badnets", 0),
        ("ubw", "ubw", 0),
        ("clean", "badnets", 1),
        ("clean", "ubw", 1),
    ] {
        for extra in [&[][..], &["--label-only"][..], &["--sequential"][..]] {
            let (code, v, text) = verify(&s, secret, model, extra);
            eprintln!(
                "{model} with the {secret} secret {extra:?}: {}",
                if v.is_null() {
                    text.clone()
                } else {
                    summary(&v)
                }
            );
            assert_eq!(code, want, "{model}/{secret} {extra:?}: {text}");
            if want == 0 {
                assert_eq!(v["rank"]["rank"], 1, "not first among its controls: {text}");
            }
            if want == 0 && extra == ["--sequential"] {
                assert!(
                    v["pairs"].as_u64().unwrap() <= 25,
                    "sequential used {} pairs",
                    v["pairs"]
                );
            }
        }
    }
}

#[test]
fn loopback_endpoints_need_an_explicit_allowance() {
    let s = start();
    let secret = s.dir.path().join("badnets.secret.json");
    let o = Command::new(env!("CARGO_BIN_EXE_hallmark"))
        .args([
            "verify",
            "--secret",
            secret.to_str().unwrap(),
            "--data",
            "/usr/share/datasets/fashion-mnist",
            "--split",
            "test",
            "--endpoint",
            &format!("http://127.0.0.1:{}", s.port),
            "--protocol",
            "v2",
            "--model",
            "badnets",
            "--report",
            s.dir.path().join("r.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("loopback"));
    // An unknown model is a clear error, not a verdict.
    let (code, _, text) = verify(&s, "badnets", "nope", &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("404") && text.contains("nope"), "{text}");
}

/// What a user meets on a real V2 server when a setting is off: label-only verification with
/// the model's score output named reads its arg-max (and the report says so); the wrong
/// protocol's 404 names the protocol the server speaks.
#[test]
fn label_only_from_scores_and_the_protocol_hint_on_a_real_server() {
    let s = start();
    let (code, v, text) = verify(
        &s,
        "badnets",
        "badnets",
        &["--label-only", "--output-name", "predict_proba"],
    );
    assert_eq!(code, 0, "{text}");
    let endpoint = v["endpoint"].as_str().unwrap_or_default();
    assert!(
        endpoint.contains("arg-max of output \"predict_proba\""),
        "{endpoint}"
    );
    let (code, v, text) = verify(
        &s,
        "badnets",
        "clean",
        &["--label-only", "--output-name", "predict_proba"],
    );
    assert_eq!(code, 1, "{text}");
    assert_eq!(v["decision"], "not_shown", "{text}");
    for protocol in ["kserve-v1", "torchserve"] {
        let (code, _, text) = verify(&s, "badnets", "badnets", &["--protocol", protocol]);
        assert_eq!(code, 2, "{text}");
        assert!(
            text.contains("404") && text.contains("--protocol v2"),
            "{protocol}: {text}"
        );
    }
}
