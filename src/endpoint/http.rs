//! The HTTP client: one configured endpoint, batching, a concurrency limit, timeouts, and retries
//! with jittered exponential backoff on 5xx, 429, timeouts and connection errors (never on other
//! 4xx: those do not get better by asking again).

use super::guard::{AddressPolicy, check_address};
use super::protocol::{self, Encoding};
use super::{
    Datatype, EndpointConfig, EndpointError, ModelEndpoint, OutputKind, Prediction, Protocol,
    TensorLayout,
};
use crate::dataset::ImageShape;
use futures_util::StreamExt;
use serde_json::Value;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A model endpoint reached over HTTP.
pub struct HttpEndpoint {
    cfg: EndpointConfig,
    base: url::Url,
    client: reqwest::Client,
    encoding: Encoding,
    input_name: String,
    output_name: Option<String>,
    requests: AtomicU64,
    jitter: Mutex<crate::watermark::rng::Rng>,
    /// Requests in flight, over every caller of this endpoint.
    in_flight: tokio::sync::Semaphore,
}

impl std::fmt::Debug for HttpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpEndpoint")
            .field("url", &self.cfg.url)
            .field("model", &self.cfg.model)
            .finish()
    }
}

/// Model metadata as the V2 protocol gives it (fields optional: servers differ).
#[derive(Debug, Default, serde::Deserialize)]
struct Metadata {
    #[serde(default)]
    inputs: Option<Vec<TensorMeta>>,
    #[serde(default)]
    outputs: Option<Vec<TensorMeta>>,
}

#[derive(Debug, serde::Deserialize)]
struct TensorMeta {
    name: String,
    #[serde(default)]
    datatype: Option<String>,
    #[serde(default)]
    shape: Option<Vec<i64>>,
}

impl HttpEndpoint {
    /// Checks the address (SSRF rules), builds the client and, for V2, reads the model's
    /// metadata to fill in what the configuration leaves open (input name, datatype, layout,
    /// output name). `seed` seeds the retry jitter.
    pub async fn connect(cfg: EndpointConfig, seed: u64) -> Result<Self, EndpointError> {
        let base = url::Url::parse(&cfg.url)
            .map_err(|e| EndpointError::Config(format!("{}: {e}", cfg.url)))?;
        if cfg.batch_size == 0 || cfg.concurrency == 0 {
            return Err(EndpointError::Config(
                "batch size and concurrency must be at least 1".into(),
            ));
        }
        if cfg.protocol == Protocol::Json
            && cfg
                .template
                .as_deref()
                .is_none_or(|t| !t.contains("\"$INSTANCES\""))
        {
            return Err(EndpointError::Config(
                "the json protocol needs a template containing \"$INSTANCES\"".into(),
            ));
        }
        if cfg.model.is_empty() && cfg.protocol != Protocol::Json {
            return Err(EndpointError::Config("a model name is needed".into()));
        }
        let policy = if cfg.allow_private {
            AddressPolicy::AllowPrivate
        } else {
            AddressPolicy::PublicOnly
        };
        let (host, addr) = check_address(&base, policy).await?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .resolve(&host, addr)
            .pool_max_idle_per_host(cfg.concurrency)
            .build()
            .map_err(|e| EndpointError::Config(e.to_string()))?;
        let mut ep = Self {
            encoding: Encoding {
                layout: cfg.layout.unwrap_or(TensorLayout::Nchw),
                datatype: cfg.datatype.unwrap_or(Datatype::Fp32),
                scale: cfg.scale,
                mean: cfg.mean.clone(),
                std: cfg.std.clone(),
            },
            input_name: cfg.input_name.clone().unwrap_or_else(|| "input-0".into()),
            output_name: cfg.output_name.clone(),
            base,
            client,
            requests: AtomicU64::new(0),
            jitter: Mutex::new(crate::watermark::rng::Rng::new(
                seed,
                crate::watermark::rng::Stream::Noise,
            )),
            in_flight: tokio::sync::Semaphore::new(cfg.concurrency),
            cfg,
        };
        if ep.cfg.protocol == Protocol::V2 {
            ep.apply_metadata().await?;
        }
        Ok(ep)
    }

    fn model_path(&self) -> String {
        let mut p = format!("v2/models/{}", self.cfg.model);
        if let Some(v) = &self.cfg.version {
            p.push_str(&format!("/versions/{v}"));
        }
        p
    }

    fn url(&self, path: &str) -> Result<url::Url, EndpointError> {
        let mut base = self.base.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        base.join(path)
            .map_err(|e| EndpointError::Config(format!("{path}: {e}")))
    }

    async fn apply_metadata(&mut self) -> Result<(), EndpointError> {
        let url = self.url(&self.model_path())?;
        // Metadata is asked for once: a server that cannot give it (any failure but 404, which
        // means the model does not exist) is queried with the configured defaults.
        let (status, body) = match self
            .send_attempts(|| self.client.get(url.clone()), &url, 0)
            .await
        {
            Ok(answer) => answer,
            Err(EndpointError::Status { status, .. }) if status != 404 => return Ok(()),
            Err(e) => return Err(e),
        };
        if status == 404 {
            return Err(EndpointError::Status {
                url: url.to_string(),
                status,
                message: protocol::error_message(&body),
            });
        }
        // Metadata is optional help: a server that will not give it is queried with the defaults.
        let Ok(meta) = serde_json::from_slice::<Metadata>(&body) else {
            return Ok(());
        };
        if !(200..300).contains(&status) {
            return Ok(());
        }
        if let Some(input) = meta.inputs.as_ref().and_then(|i| i.first()) {
            if self.cfg.input_name.is_none() {
                self.input_name = input.name.clone();
            }
            if self.cfg.datatype.is_none() {
                self.encoding.datatype = match input.datatype.as_deref() {
                    Some("FP64") => Datatype::Fp64,
                    Some("UINT8") => Datatype::Uint8,
                    _ => Datatype::Fp32,
                };
            }
            if self.cfg.layout.is_none()
                && let Some(shape) = &input.shape
            {
                let dims = &shape[1.min(shape.len())..];
                self.encoding.layout = match dims {
                    [_] => TensorLayout::Flat,
                    [_, _] => TensorLayout::Nhw,
                    [_, _, c] if *c == 1 || *c == 3 => TensorLayout::Nhwc,
                    _ => TensorLayout::Nchw,
                };
            }
        }
        if self.cfg.output_name.is_none()
            && let Some(outputs) = &meta.outputs
        {
            let want_int = self.cfg.output == OutputKind::Labels;
            self.output_name = outputs
                .iter()
                .find(|o| {
                    let d = o.datatype.as_deref().unwrap_or("");
                    if want_int {
                        d.starts_with("INT") || d.starts_with("UINT") || d == "BYTES"
                    } else {
                        d.starts_with("FP")
                    }
                })
                .map(|o| o.name.clone());
        }
        Ok(())
    }

    /// Sends a request, retrying what may succeed on a second try. Returns status and body.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        url: &url::Url,
    ) -> Result<(u16, Vec<u8>), EndpointError> {
        self.send_attempts(build, url, self.cfg.retries).await
    }

    async fn send_attempts(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        url: &url::Url,
        retries: u32,
    ) -> Result<(u16, Vec<u8>), EndpointError> {
        let mut attempt = 0u32;
        loop {
            let outcome: Result<(), (String, Option<u16>, Option<Duration>)> = match build()
                .send()
                .await
            {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(MAX_BACKOFF));
                    match resp.bytes().await {
                        Ok(body) if status == 429 || status >= 500 => Err((
                            format!("HTTP {status}: {}", protocol::error_message(&body)),
                            Some(status),
                            retry_after,
                        )),
                        Ok(body) => return Ok((status, body.to_vec())),
                        Err(e) => Err((format!("reading the response failed: {e}"), None, None)),
                    }
                }
                Err(e) if e.is_timeout() => Err((
                    format!("timed out after {:?}", self.cfg.timeout),
                    None,
                    None,
                )),
                Err(e) if e.is_connect() || e.is_request() => {
                    Err((format!("connection failed: {e}"), None, None))
                }
                Err(e) => {
                    return Err(EndpointError::Transport {
                        url: url.to_string(),
                        message: e.to_string(),
                    });
                }
            };
            let (message, status, retry_after) = outcome.expect_err("successes returned above");
            if attempt >= retries {
                return Err(match status {
                    Some(status) => EndpointError::Status {
                        url: url.to_string(),
                        status,
                        message: format!("{message} (after {} attempts)", attempt + 1),
                    },
                    None => EndpointError::Transport {
                        url: url.to_string(),
                        message: format!("{message} (after {} attempts)", attempt + 1),
                    },
                });
            }
            let backoff = retry_after.unwrap_or_else(|| {
                let cap = Duration::from_millis(100 * (1u64 << attempt.min(6))).min(MAX_BACKOFF);
                let u = self.jitter.lock().expect("jitter lock").unit_f32() as f64;
                cap.mul_f64(0.5 + 0.5 * u)
            });
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }

    fn invalid(&self, url: &url::Url, message: String) -> EndpointError {
        EndpointError::Invalid {
            url: url.to_string(),
            message,
        }
    }

    async fn post_json(&self, url: &url::Url, body: Vec<u8>) -> Result<Value, EndpointError> {
        // Shared, so that a retry does not copy the body.
        let body = bytes::Bytes::from(body);
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let (status, bytes) = self
            .send(
                || {
                    self.client
                        .post(url.clone())
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone())
                },
                url,
            )
            .await?;
        if !(200..300).contains(&status) {
            return Err(status_error(url, status, &bytes));
        }
        protocol::lenient_json(&bytes).map_err(|m| self.invalid(url, m))
    }

    async fn predict_batch(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        let n = images.len();
        let names = self.cfg.class_names.as_deref();
        let kind = self.cfg.output;
        match self.cfg.protocol {
            Protocol::V2 => {
                let url = self.url(&format!("{}/infer", self.model_path()))?;
                let id = format!("hallmark-{}", self.requests.fetch_add(1, Ordering::Relaxed));
                let body = protocol::v2_request(
                    images,
                    shape,
                    &self.encoding,
                    &self.input_name,
                    self.output_name.as_deref(),
                    &id,
                );
                let v = self.post_json(&url, body).await?;
                protocol::v2_response(&v, n, self.output_name.as_deref(), kind, names)
                    .map_err(|m| self.invalid(&url, m))
            }
            Protocol::Tfserving | Protocol::KserveV1 | Protocol::Json => {
                let instances = protocol::instances(
                    images,
                    shape,
                    &self.encoding,
                    self.cfg.input_name.as_deref(),
                );
                let (url, body, pointer) = if self.cfg.protocol == Protocol::Json {
                    let template = self.cfg.template.as_deref().expect("checked in connect");
                    let body = template.replacen(
                        "\"$INSTANCES\"",
                        std::str::from_utf8(&instances).expect("JSON is UTF-8"),
                        1,
                    );
                    (
                        self.base.clone(),
                        body.into_bytes(),
                        self.cfg
                            .output_pointer
                            .clone()
                            .unwrap_or_else(|| "/predictions".into()),
                    )
                } else {
                    let mut path = format!("v1/models/{}", self.cfg.model);
                    if let Some(v) = &self.cfg.version {
                        path.push_str(&format!("/versions/{v}"));
                    }
                    path.push_str(":predict");
                    let mut body = b"{\"instances\":".to_vec();
                    body.extend(instances);
                    body.push(b'}');
                    (self.url(&path)?, body, "/predictions".into())
                };
                let v = self.post_json(&url, body).await?;
                let preds = v
                    .pointer(&pointer)
                    .or_else(|| v.get("outputs"))
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        self.invalid(&url, format!("no predictions array at {pointer}"))
                    })?;
                if preds.len() != n {
                    return Err(
                        self.invalid(&url, format!("{} predictions for {n} images", preds.len()))
                    );
                }
                preds
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        protocol::instance_prediction(
                            p,
                            self.output_name.as_deref(),
                            kind,
                            names,
                            &format!("image {i}"),
                        )
                        .map_err(|m| self.invalid(&url, m))
                    })
                    .collect()
            }
            Protocol::Torchserve => {
                let mut path = format!("predictions/{}", self.cfg.model);
                if let Some(v) = &self.cfg.version {
                    path.push_str(&format!("/{v}"));
                }
                let url = self.url(&path)?;
                let mut out = Vec::with_capacity(n);
                for img in images {
                    let png = crate::dataset::folder::encode_png(img, shape).map_err(|e| {
                        EndpointError::Config(format!("cannot encode a query image: {e}"))
                    })?;
                    let (status, bytes) = self
                        .send(
                            || {
                                self.client
                                    .post(url.clone())
                                    .header(
                                        reqwest::header::CONTENT_TYPE,
                                        "application/octet-stream",
                                    )
                                    .body(png.clone())
                            },
                            &url,
                        )
                        .await?;
                    if !(200..300).contains(&status) {
                        return Err(status_error(&url, status, &bytes));
                    }
                    let v = protocol::lenient_json(&bytes).map_err(|m| self.invalid(&url, m))?;
                    out.push(
                        protocol::torchserve_prediction(&v, kind, names)
                            .map_err(|m| self.invalid(&url, m))?,
                    );
                }
                Ok(out)
            }
        }
    }

    /// Whether the model is ready, from the status code alone: servers answer readiness with an
    /// empty body (MLServer, Triton), `{"ready": true}` (KServe) or `{"status": "Healthy"}`
    /// (TorchServe), and none of those bodies is needed.
    pub async fn ready(&self) -> Result<bool, EndpointError> {
        let path = match self.cfg.protocol {
            Protocol::V2 => format!("{}/ready", self.model_path()),
            Protocol::Tfserving | Protocol::KserveV1 => format!("v1/models/{}", self.cfg.model),
            Protocol::Torchserve => "ping".into(),
            Protocol::Json => return Ok(true),
        };
        let url = self.url(&path)?;
        match self
            .send_attempts(|| self.client.get(url.clone()), &url, 0)
            .await
        {
            Ok((status, _)) => Ok((200..300).contains(&status)),
            Err(EndpointError::Status { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets the class names the server may answer with (TorchServe keys, BYTES labels).
    pub fn set_class_names(&mut self, names: Option<Vec<String>>) {
        self.cfg.class_names = names;
    }

    /// The configuration with the values read from metadata filled in.
    pub fn effective_config(&self) -> EndpointConfig {
        let mut c = self.cfg.clone();
        c.input_name = Some(self.input_name.clone());
        c.output_name = self.output_name.clone();
        c.layout = Some(self.encoding.layout);
        c.datatype = Some(self.encoding.datatype);
        c
    }
}

fn status_error(url: &url::Url, status: u16, body: &[u8]) -> EndpointError {
    let message = if (300..400).contains(&status) {
        "the server redirects; redirects are not followed (give the final URL)".to_string()
    } else {
        protocol::error_message(body)
    };
    EndpointError::Status {
        url: url.to_string(),
        status,
        message,
    }
}

#[async_trait::async_trait]
impl ModelEndpoint for HttpEndpoint {
    fn describe(&self) -> String {
        format!(
            "{} {:?} model {}",
            self.cfg.url, self.cfg.protocol, self.cfg.model
        )
    }

    async fn predict(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        if let Some(i) = images.iter().position(|img| img.len() != shape.len()) {
            return Err(EndpointError::Config(format!(
                "image {i} has {} bytes, shape {shape} needs {}",
                images[i].len(),
                shape.len()
            )));
        }
        // Collected first: a lazy iterator's closure inside the stream trips the async-trait bounds.
        let batches: Vec<_> = images
            .chunks(self.cfg.batch_size)
            .map(|b| self.predict_batch(b, shape))
            .collect();
        let results: Vec<Result<Vec<Prediction>, EndpointError>> =
            futures_util::stream::iter(batches)
                .buffered(self.cfg.concurrency)
                .collect()
                .await;
        let mut out = Vec::with_capacity(images.len());
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    }
}
