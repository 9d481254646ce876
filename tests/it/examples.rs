//! The examples as a user runs them: the Rust client, the Python client and the curl
//! walk-through each drive the publisher and auditor flows against the real `hallmark serve`
//! and a real MLServer; and every file and link the documentation names exists.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::service::FASHION;
use crate::service_process::Server;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The example binary that `cargo build --examples` (run by scripts/test) built beside
/// the hallmark binary.
fn rust_client() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_hallmark"));
    let client = exe.parent().unwrap().join("examples").join("client");
    assert!(
        client.exists(),
        "{} is missing: build the examples first (cargo build --features train --examples; scripts/test does)",
        client.display()
    );
    client
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The three clients watermark the MLServer models' training subset with the spec and seed
/// those models were trained on (so the service's release is that training set, byte for byte),
/// grant an auditor, and verify the model trained on it: each flow ends in `used`.
const NONCE7: &str = "0707070707070707070707070707070707070707070707070707070707070707";

#[test]
fn every_example_client_walks_both_flows_to_a_verdict() {
    let ml = crate::mlserver::start();
    let data = tempfile::tempdir().unwrap();
    let (server, admin) = Server::beside(&ml, data.path());
    let admin = admin.as_str();
    let url = server.url("");
    let endpoint = format!("http://127.0.0.1:{}", ml.port);
    let dataset = ml.dir.path().join("clean");
    let spec = root().join("watermark_specs/badnets-square-28x28-grey.toml");
    let args = [
        ("--url", url.as_str()),
        ("--admin-key", admin),
        ("--dataset", dataset.to_str().unwrap()),
        ("--holdout", FASHION),
        ("--holdout-split", "test"),
        ("--spec", spec.to_str().unwrap()),
        ("--seed", "7"),
        // The nonce of scripts/prepare-mlserver-models' release: the service's release draws
        // the same trigger, the one the served model learnt.
        ("--nonce", NONCE7),
        ("--endpoint", &endpoint),
        ("--model", "badnets"),
    ];
    let flags = |c: &mut Command| {
        for (k, v) in args {
            c.args([k, v]);
        }
    };
    let mut rust = Command::new(rust_client());
    flags(&mut rust);
    let python = root().join("target/examples-venv/bin/python");
    assert!(
        python.exists(),
        "requests for the Python client is missing: run scripts/test (it calls scripts/ensure-requests)"
    );
    let mut py = Command::new(&python);
    py.arg(root().join("examples/client.py"));
    flags(&mut py);
    let mut curl = Command::new(root().join("examples/curl-walkthrough.sh"));
    for (k, v) in args {
        let name = k.trim_start_matches("--").replace('-', "_").to_uppercase();
        let name = match name.as_str() {
            "URL" => "HALLMARK_URL".to_string(),
            _ => name,
        };
        curl.env(name, v);
    }
    for (name, mut command) in [("rust", rust), ("python", py), ("curl", curl)] {
        let out = command.current_dir(root()).output().unwrap();
        let text = show(&out);
        eprintln!("{name} client: {text}");
        assert_eq!(out.status.code(), Some(0), "{name} client: {text}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("commitment"), "{name}: {text}");
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("verdict:") && l.contains("used")),
            "{name}: {text}"
        );
    }
    // Without a service the clients fail with exit code 2 and say where they looked.
    let mut rust = Command::new(rust_client());
    for (k, v) in args {
        rust.arg(k).arg(if k == "--url" {
            "http://127.0.0.1:9"
        } else {
            v
        });
    }
    let out = rust.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer from http://127.0.0.1:9"),
        "{}",
        show(&out)
    );
}

/// Markdown files of the repository: README.md and everything under docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut stack = vec![root().join("docs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    out
}

/// Every relative link of README.md and docs/ resolves to a file or folder of the repository
/// (never outside it), and every repository path named in a command (`scripts/…`,
/// `examples/…`, `watermark_specs/…`, `docs/…`) exists.
#[test]
fn documentation_links_and_named_files_exist() {
    let repo = root().canonicalize().unwrap();
    let mut missing = Vec::new();
    let mut links = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        let name = file
            .strip_prefix(&repo)
            .unwrap_or(&file)
            .display()
            .to_string();
        // Markdown links: ](target)
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap().trim();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            links += 1;
            let path = dir.join(target);
            match path.canonicalize() {
                Ok(p) if p.starts_with(&repo) => {}
                Ok(p) => missing.push(format!(
                    "{name}: {target} leaves the repository ({})",
                    p.display()
                )),
                Err(_) => missing.push(format!("{name}: link {target} does not exist")),
            }
        }
        // Paths of the repository named in commands and text.
        for prefix in [
            "scripts/",
            "examples/",
            "watermark_specs/",
            "docs/",
            "tests/",
            "src/",
        ] {
            for (i, _) in text.match_indices(prefix) {
                let before = text[..i].chars().next_back();
                if before.is_some_and(|c| {
                    c.is_alphanumeric() || c == '/' || c == '_' || c == '-' || c == '.'
                }) {
                    continue;
                }
                let path: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || "/_-.".contains(*c))
                    .collect();
                let path = path.trim_end_matches('.');
                // Globs and placeholders (`badnets-*`, `docs/calibration/KIND`) name no one file.
                if path.ends_with('/') && path.len() == prefix.len() || path.ends_with('-') {
                    continue;
                }
                if !repo.join(path).exists() {
                    missing.push(format!("{name}: names {path}, which does not exist"));
                }
            }
        }
    }
    assert!(links > 5, "README and docs link into docs/ ({links} links)");
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
