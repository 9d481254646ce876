//! A client of the hallmark service over plain HTTP with reqwest: the publisher flow (register a
//! dataset, watermark it, read the commitment, grant an auditor) and the auditor flow (verify a
//! model endpoint, read the verdict).
//!
//! Start the service, then (docs/service.md walks through it):
//!
//! ```text
//! cargo run --release -- serve --dataset-root $PWD/hallmark-data/imports --allow-private-endpoints
//! cargo run --example client -- --admin-key "$(cat hallmark-data/admin.key)" \
//!     --dataset $PWD/hallmark-data/imports/train --holdout $PWD/hallmark-data/imports/test \
//!     --spec watermark_specs/badnets-square-28x28-grey.toml \
//!     [--endpoint http://127.0.0.1:8081 --model my-model]
//! ```
//!
//! Exit code: 0 when the flows ran (and, with an endpoint, the verdict is `used`), 1 when the
//! verdict is another, 2 on an error.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};

/// Runs the publisher flow, then (with --endpoint) the auditor flow.
#[derive(Parser)]
struct Args {
    /// The service.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin key (to create the publisher and auditor keys of this walk-through).
    #[arg(long)]
    admin_key: String,
    /// A dataset folder below the service's dataset roots, to watermark.
    #[arg(long)]
    dataset: String,
    /// Held-out images for verification (below the dataset roots as well).
    #[arg(long)]
    holdout: String,
    /// The split of the held-out folder, when it holds both (`test`).
    #[arg(long)]
    holdout_split: Option<String>,
    /// A watermark spec (TOML).
    #[arg(long)]
    spec: std::path::PathBuf,
    /// Overrides the spec's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// The record's nonce (64 hex digits), for a reproducible release.
    #[arg(long)]
    nonce: Option<String>,
    /// A model endpoint to verify (Open Inference Protocol V2).
    #[arg(long)]
    endpoint: Option<String>,
    /// The model's name on that endpoint.
    #[arg(long, default_value = "model")]
    model: String,
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// Sends a request and returns the JSON body, or the service's error as an `Err`.
    async fn send(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{path}: no answer from {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        let v: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("{path}: not JSON: {text}"))?
        };
        if !status.is_success() {
            bail!(
                "{path}: {status} {}: {}",
                v["error"]["code"],
                v["error"]["message"]
            );
        }
        Ok(v)
    }

    async fn post(&self, key: &str, path: &str, body: Value) -> Result<Value> {
        self.send(key, reqwest::Method::POST, path, Some(body))
            .await
    }

    async fn get(&self, key: &str, path: &str) -> Result<Value> {
        self.send(key, reqwest::Method::GET, path, None).await
    }

    /// Polls a job until it ends, printing its progress.
    async fn wait(&self, key: &str, job: &Value) -> Result<Value> {
        let id = job["id"].as_str().context("the answer names no job")?;
        loop {
            let j = self.get(key, &format!("/v1/jobs/{id}")).await?;
            eprintln!(
                "  job {id}: {} {}/{}",
                j["state"], j["progress_done"], j["progress_total"]
            );
            match j["state"].as_str() {
                Some("succeeded") => return Ok(j),
                Some("failed") | Some("cancelled") => {
                    bail!(
                        "job {id} {}: {} ({})",
                        j["state"],
                        j["error"],
                        j["error_code"]
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

fn id(v: &Value) -> Result<String> {
    v["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no id in {v}"))
}

async fn run(a: Args) -> Result<bool> {
    let c = Client {
        http: reqwest::Client::new(),
        base: a.url.trim_end_matches('/').to_string(),
    };
    let new_key = |role: &'static str| {
        let c = &c;
        let admin = a.admin_key.clone();
        async move {
            let k = c
                .post(
                    &admin,
                    "/v1/keys",
                    json!({"name": format!("example {role}"), "role": role}),
                )
                .await?;
            k["secret"]
                .as_str()
                .map(str::to_string)
                .context("the new key is missing from the answer")
        }
    };
    let publisher = new_key("publisher").await?;
    let auditor = new_key("auditor").await?;

    // Publisher: register, watermark, read the commitment, grant the auditor.
    let ds = c
        .post(
            &publisher,
            "/v1/datasets",
            json!({"name": "training set", "path": a.dataset}),
        )
        .await?;
    let holdout = c
        .post(
            &publisher,
            "/v1/datasets",
            json!({"name": "held-out set", "path": a.holdout, "split": a.holdout_split}),
        )
        .await?;
    println!(
        "dataset {} ({} images, sha256 {})",
        ds["id"], ds["count"], ds["sha256"]
    );
    let spec = std::fs::read_to_string(&a.spec)
        .with_context(|| format!("cannot read {}", a.spec.display()))?;
    let created = c
        .post(
            &publisher,
            "/v1/watermarks",
            json!({
                "name": "release 1", "dataset_id": ds["id"], "holdout_dataset_id": holdout["id"],
                "spec": spec, "seed": a.seed, "nonce": a.nonce
            }),
        )
        .await?;
    let wm = id(&created["watermark"])?;
    c.wait(&publisher, &created["job"]).await?;
    let w = c.get(&publisher, &format!("/v1/watermarks/{wm}")).await?;
    println!("watermark {wm}: {} samples poisoned", w["poisoned"]);
    println!(
        "commitment (publish it with the release): {}",
        w["commitment"]
    );
    let me = c.get(&auditor, "/v1/keys/me").await?;
    c.post(
        &publisher,
        &format!("/v1/watermarks/{wm}/grants"),
        json!({"auditor_id": me["id"]}),
    )
    .await?;
    println!("granted auditor {}", me["id"]);

    // Auditor: verify a model endpoint and read the verdict.
    let Some(endpoint) = a.endpoint else {
        println!("no --endpoint given: skipping the auditor flow");
        return Ok(true);
    };
    let v = c
        .post(
            &auditor,
            "/v1/verifications",
            json!({
                "watermark_id": wm, "sequential": true,
                "endpoint": {"url": endpoint, "protocol": "v2", "model": a.model}
            }),
        )
        .await?;
    let verification = id(&v["verification"])?;
    c.wait(&auditor, &v["job"]).await?;
    let done = c
        .get(&auditor, &format!("/v1/verifications/{verification}"))
        .await?;
    let verdict = &done["verdict"];
    println!(
        "verdict: {} (p = {}, {} pairs, {} queries; rank {} among {} triggers of its family)",
        done["decision"],
        done["p_value"],
        verdict["pairs"],
        verdict["queries"],
        verdict["rank"]["rank"],
        verdict["rank"]["controls"].as_u64().unwrap_or(0) + 1
    );
    println!("why: {}", verdict["reason"].as_str().unwrap_or_default());
    Ok(done["decision"] == "used")
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
