//! A client of the hallmark service, over plain HTTP with reqwest: the publisher flow (register
//! a dataset, watermark it, read the commitment, grant an auditor) and the auditor flow (verify a
//! model endpoint, read the verdict).
//!
//! Start the service, then:
//!
//! ```text
//! cargo run --release -- serve --dataset-root $PWD/hallmark-data/imports --allow-private-endpoints
//! cargo run --example client -- --admin-key "$(cat hallmark-data/admin.key)" \
//!     --dataset $PWD/hallmark-data/imports/train --holdout $PWD/hallmark-data/imports/test \
//!     --spec watermark_specs/badnets-square-28x28-grey.toml \
//!     [--endpoint http://127.0.0.1:8081 --model my-model]
//! ```

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
    /// An admin key (to create the publisher and auditor keys of this demonstration).
    #[arg(long)]
    admin_key: String,
    /// A dataset folder below the service's dataset roots, to watermark.
    #[arg(long)]
    dataset: String,
    /// Held-out images for verification (below the dataset roots as well).
    #[arg(long)]
    holdout: String,
    /// A watermark spec (TOML).
    #[arg(long)]
    spec: std::path::PathBuf,
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
            .with_context(|| format!("{path}: no answer"))?;
        let status = resp.status();
        let text = resp.text().await?;
        let v: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
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
    async fn wait(&self, key: &str, job: &str) -> Result<Value> {
        loop {
            let j = self.get(key, &format!("/v1/jobs/{job}")).await?;
            eprintln!(
                "  job {job}: {} {}/{}",
                j["state"], j["progress_done"], j["progress_total"]
            );
            match j["state"].as_str() {
                Some("succeeded") => return Ok(j),
                Some("failed") | Some("cancelled") => {
                    bail!(
                        "job {job} {}: {} ({})",
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

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let c = Client {
        http: reqwest::Client::new(),
        base: a.url.trim_end_matches('/').to_string(),
    };
    let key = |v: &Value| v["secret"].as_str().unwrap_or_default().to_string();
    let publisher = key(&c
        .post(
            &a.admin_key,
            "/v1/keys",
            json!({"name": "example publisher", "role": "publisher"}),
        )
        .await?);
    let auditor_key = c
        .post(
            &a.admin_key,
            "/v1/keys",
            json!({"name": "example auditor", "role": "auditor"}),
        )
        .await?;
    let auditor = key(&auditor_key);

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
            json!({"name": "held-out set", "path": a.holdout}),
        )
        .await?;
    println!(
        "dataset {} ({} images, sha256 {})",
        ds["id"], ds["count"], ds["sha256"]
    );
    let spec = std::fs::read_to_string(&a.spec)
        .with_context(|| format!("cannot read {}", a.spec.display()))?;
    let created = c
        .post(&publisher, "/v1/watermarks", json!({
            "name": "release 1", "dataset_id": ds["id"], "holdout_dataset_id": holdout["id"], "spec": spec
        }))
        .await?;
    let wm = created["watermark"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.wait(
        &publisher,
        created["job"]["id"].as_str().unwrap_or_default(),
    )
    .await?;
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
        return Ok(());
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
    let id = v["verification"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.wait(&auditor, v["job"]["id"].as_str().unwrap_or_default())
        .await?;
    let done = c.get(&auditor, &format!("/v1/verifications/{id}")).await?;
    let verdict = &done["verdict"];
    println!(
        "verdict: {} (p = {}, {} pairs, {} queries; control fired: {})",
        done["decision"],
        done["p_value"],
        verdict["pairs"],
        verdict["queries"],
        verdict["control"]["rejected"]
    );
    Ok(())
}
