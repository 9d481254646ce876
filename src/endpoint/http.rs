//! The HTTP client: one configured endpoint, batching, a concurrency limit, timeouts, and retries
//! with jittered exponential backoff on 5xx, 429, timeouts and connection errors (never on other
//! 4xx: those do not get better by asking again).

use super::guard::{AddressPolicy, check_address};
use super::protocol::{self, Encoding};
use super::{
    Datatype, EndpointConfig, EndpointError, ModelEndpoint, OutputKind, Prediction, Protocol,
    TensorLayout,
};
use crate::Invalid;
use crate::dataset::ImageShape;
use futures_util::StreamExt;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The most a metadata, configuration or probe answer may hold.
const SMALL_ANSWER: usize = 4 << 20;

/// The most an answer for `images` predictions may hold: 1 MiB, plus 256 KiB an image (a
/// thousand-class score vector in JSON takes about 25 KiB), and never more than 512 MiB.
fn answer_cap(images: usize) -> usize {
    (1usize << 20)
        .saturating_add(images.saturating_mul(256 << 10))
        .min(512 << 20)
}

enum ReadError {
    TooLarge,
    Failed(reqwest::Error),
}

/// Reads a response body of at most `cap` bytes: refused at once when its Content-Length says
/// more, and as soon as more than `cap` bytes have arrived otherwise.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Failed)? {
        if body.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

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
    /// Images per request now: the configured size, lowered by the server's published limit or
    /// halved after a refusal.
    batch_size: AtomicUsize,
    /// How the answers were read, for the report: settled by the metadata or the first answer
    /// and fixed for the rest of the run.
    reading: Reading,
    /// The image size of the model's input, from V2 metadata with a fixed height, width and 1
    /// or 3 channels.
    input_shape: Option<ImageShape>,
}

/// What the report says about how answers were read.
#[derive(Debug, Default)]
struct Reading {
    /// Scores read as logits or probabilities (an `auto` output), and why.
    kind: OnceLock<(OutputKind, String)>,
    /// Labels taken as the arg-max of this score output.
    argmax_of: OnceLock<String>,
    /// Why the batch size changed.
    batch: Mutex<Option<String>>,
}

type BatchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Prediction>, EndpointError>> + Send + 'a>>;

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

/// The image size a V2 input shape declares: `[n, h, w, c]` or `[n, c, h, w]` with 1 or 3
/// channels, or `[n, h, w]` (grey); none for flat or variable (−1) sizes.
fn image_shape(shape: &[i64]) -> Option<ImageShape> {
    let dims: Vec<usize> = shape
        .get(1..)?
        .iter()
        .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
        .collect::<Option<_>>()?;
    let s = |height, width, channels| {
        Some(ImageShape {
            height,
            width,
            channels,
        })
    };
    match dims[..] {
        [h, w, c] if c == 1 || c == 3 => s(h, w, c),
        [c, h, w] if c == 1 || c == 3 => s(h, w, c),
        [h, w] => s(h, w, 1),
        _ => None,
    }
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
        super::check_path_segment("model name", &cfg.model)?;
        if let Some(v) = &cfg.version {
            super::check_path_segment("model version", v)?;
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
            batch_size: AtomicUsize::new(cfg.batch_size),
            reading: Reading::default(),
            input_shape: None,
            cfg,
        };
        if ep.cfg.protocol == Protocol::V2 {
            ep.apply_metadata().await?;
            ep.apply_batch_limit().await;
        }
        if let Some(name) = ep.output_name.clone() {
            ep.settle_kind_by_name(&name);
        }
        Ok(ep)
    }

    /// An `auto` output named `logits` (or `probs`, `softmax`) is read as its name says.
    fn settle_kind_by_name(&self, name: &str) {
        if self.cfg.output == OutputKind::Auto
            && let Some(kind) = protocol::kind_from_name(name)
        {
            let _ = self
                .reading
                .kind
                .set((kind, format!("the output is named {name:?}")));
        }
    }

    /// The output kind to read a batch with: the configured one, the settled one, or `Auto`
    /// while an `auto` output is unsettled.
    fn kind(&self) -> OutputKind {
        match self.cfg.output {
            OutputKind::Auto => self
                .reading
                .kind
                .get()
                .map_or(OutputKind::Auto, |(k, _)| *k),
            k => k,
        }
    }

    /// Reads one answer with `read`; an unsettled `auto` output is settled here, by this
    /// answer: probabilities if every row is one, logits if a score lies outside [0, 1], which
    /// no probability can (rows inside [0, 1] that do not sum to 1 stay an error: they may be
    /// broken probabilities). The first answer to settle it wins, so every batch of a run is
    /// read alike.
    fn read_scores<T>(
        &self,
        read: impl Fn(OutputKind) -> Result<T, Invalid>,
    ) -> Result<T, Invalid> {
        let kind = self.kind();
        if kind != OutputKind::Auto {
            return read(kind);
        }
        let settled = match read(OutputKind::Probabilities) {
            Ok(_) => (
                OutputKind::Probabilities,
                "the first answer's rows are probabilities",
            ),
            Err(e) if e.0.contains(protocol::NOT_A_PROBABILITY) => (
                OutputKind::Logits,
                "the first answer holds scores outside [0, 1], which no probability can be",
            ),
            Err(e) => return Err(e),
        };
        let _ = self.reading.kind.set((settled.0, settled.1.to_string()));
        read(self.kind())
    }

    /// Triton publishes its batch limit at `/v2/models/NAME/config` (`max_batch_size`); a
    /// smaller limit than the configured batch size lowers it. Other servers have no such route,
    /// and its absence changes nothing.
    async fn apply_batch_limit(&self) {
        let Ok(url) = self.url(&format!("{}/config", self.model_path())) else {
            return;
        };
        let Ok((200..=299, body)) = self
            .send_attempts(|| self.client.get(url.clone()), &url, 0, SMALL_ANSWER)
            .await
        else {
            return;
        };
        let limit = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("max_batch_size").and_then(Value::as_u64));
        if let Some(limit) = limit.filter(|&l| l > 0).map(|l| l as usize)
            && limit < self.cfg.batch_size
        {
            self.lower_batch_size(
                limit,
                format!(
                    "batch size {limit}, the server's max_batch_size (asked for {})",
                    self.cfg.batch_size
                ),
            );
        }
    }

    fn lower_batch_size(&self, to: usize, why: String) {
        if self.batch_size.fetch_min(to, Ordering::Relaxed) > to {
            *self.reading.batch.lock().expect("batch note lock") = Some(why);
        }
    }

    /// A hint for a 404: which protocol the server does answer, probed with one GET each.
    async fn protocol_hint(&self) -> String {
        let model = &self.cfg.model;
        let probes: [(Protocol, String, &str); 3] = [
            (Protocol::V2, "v2".into(), "v2"),
            (
                Protocol::KserveV1,
                format!("v1/models/{model}"),
                "kserve-v1 or tfserving",
            ),
            (Protocol::Torchserve, "ping".into(), "torchserve"),
        ];
        let mine = |p: Protocol| {
            p == self.cfg.protocol
                || (p == Protocol::KserveV1 && self.cfg.protocol == Protocol::Tfserving)
        };
        let mut speaks_mine = false;
        for (protocol, path, name) in probes {
            let Ok(url) = self.url(&path) else { continue };
            let Ok((status, _)) = self
                .send_attempts(|| self.client.get(url.clone()), &url, 0, SMALL_ANSWER)
                .await
            else {
                continue;
            };
            if !(200..300).contains(&status) {
                continue;
            }
            if mine(protocol) {
                speaks_mine = true;
            } else {
                return format!(
                    "; the server answers GET /{path}: it may speak another protocol (try --protocol {name})"
                );
            }
        }
        if speaks_mine {
            format!(
                "; the server speaks this protocol but has no model {model:?}: check the model name"
            )
        } else {
            "; no protocol's path answers here: check the URL, the model name and --protocol (v2, kserve-v1, tfserving, torchserve)".into()
        }
    }

    /// Adds the protocol hint to a 404.
    async fn explain(&self, e: EndpointError) -> EndpointError {
        match e {
            EndpointError::Status {
                url,
                status: 404,
                message,
            } if self.cfg.protocol != Protocol::Json => {
                let hint = self.protocol_hint().await;
                EndpointError::Status {
                    url,
                    status: 404,
                    message: format!("{message}{hint}"),
                }
            }
            e => e,
        }
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
        // The first contact: retried like every request, and a server that is still starting
        // (connection refused, 503) is waited for up to the request timeout. A server that then
        // cannot give metadata (any failure but 404, which means the model does not exist) is
        // queried with the configured defaults.
        let started = Instant::now();
        let answer = loop {
            match self
                .send_attempts(
                    || self.client.get(url.clone()),
                    &url,
                    self.cfg.retries,
                    SMALL_ANSWER,
                )
                .await
            {
                Err(
                    EndpointError::Transport { .. } | EndpointError::Status { status: 503, .. },
                ) if started.elapsed() + Duration::from_secs(1) < self.cfg.timeout => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(EndpointError::Transport { url, message }) => {
                    break Err(EndpointError::Transport {
                        url,
                        message: format!(
                            "{message}; waited {:.0} s for the server to start (--timeout {:.0} s)",
                            started.elapsed().as_secs_f64(),
                            self.cfg.timeout.as_secs_f64()
                        ),
                    });
                }
                other => break other,
            }
        };
        let (status, body) = match answer {
            Ok(answer) => answer,
            Err(EndpointError::Status { status, .. }) if status != 404 => return Ok(()),
            Err(e) => return Err(self.explain(e).await),
        };
        if status == 404 {
            let e = EndpointError::Status {
                url: url.to_string(),
                status,
                message: protocol::error_message(&body),
            };
            return Err(self.explain(e).await);
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
            if let Some(shape) = &input.shape {
                self.input_shape = image_shape(shape);
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
            let is_int = |o: &&TensorMeta| {
                let d = o.datatype.as_deref().unwrap_or("");
                d.starts_with("INT") || d.starts_with("UINT") || d == "BYTES"
            };
            let is_float = |o: &&TensorMeta| o.datatype.as_deref().unwrap_or("").starts_with("FP");
            // Labels from a label output where there is one, else from the scores' arg-max.
            let label_output = outputs.iter().find(is_int);
            let chosen = if self.cfg.output == OutputKind::Labels {
                label_output.or_else(|| outputs.iter().find(is_float))
            } else {
                outputs.iter().find(is_float)
            };
            self.output_name = chosen.map(|o| o.name.clone());
        }
        Ok(())
    }

    /// Sends a request, retrying what may succeed on a second try. Returns status and body.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        url: &url::Url,
        cap: usize,
    ) -> Result<(u16, Vec<u8>), EndpointError> {
        self.send_attempts(build, url, self.cfg.retries, cap).await
    }

    /// `cap` bounds the response body: a server that answers with more is refused as soon as
    /// it has sent that much (or has announced it), so no answer can exhaust memory.
    async fn send_attempts(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        url: &url::Url,
        retries: u32,
        cap: usize,
    ) -> Result<(u16, Vec<u8>), EndpointError> {
        with_retries(url, retries, &self.jitter, || async {
            match build().send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    match read_capped(resp, cap).await {
                        Ok(body) if status == 429 || status >= 500 => Err(Failure::Retry {
                            message: format!(
                                "HTTP {status}: {}",
                                protocol::error_message(&body)
                            ),
                            status: Some(status),
                            retry_after,
                        }),
                        Ok(body) => Ok((status, body)),
                        Err(ReadError::TooLarge) => Err(Failure::Fatal(EndpointError::Invalid {
                            url: url.to_string(),
                            message: format!(
                                "the response is larger than {cap} bytes, more than an answer to this request can need"
                            ),
                        })),
                        Err(ReadError::Failed(e)) => Err(Failure::Retry {
                            message: format!("reading the response failed: {e}"),
                            status: None,
                            retry_after: None,
                        }),
                    }
                }
                Err(e) if e.is_timeout() => Err(Failure::Retry {
                    message: format!("timed out after {:?}", self.cfg.timeout),
                    status: None,
                    retry_after: None,
                }),
                Err(e) if e.is_connect() || e.is_request() => Err(Failure::Retry {
                    message: format!("connection failed: {e}"),
                    status: None,
                    retry_after: None,
                }),
                Err(e) => Err(Failure::Fatal(EndpointError::Transport {
                    url: url.to_string(),
                    message: e.to_string(),
                })),
            }
        })
        .await
    }

    fn invalid(&self, url: &url::Url, message: Invalid) -> EndpointError {
        EndpointError::Invalid {
            url: url.to_string(),
            message: message.0,
        }
    }

    async fn post_json(
        &self,
        url: &url::Url,
        body: Vec<u8>,
        images: usize,
    ) -> Result<Value, EndpointError> {
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
                answer_cap(images),
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
        match self.cfg.protocol {
            Protocol::V2 => self.predict_v2(images, shape).await,
            Protocol::Tfserving | Protocol::KserveV1 | Protocol::Json => {
                self.predict_instances(images, shape).await
            }
            Protocol::Torchserve => self.predict_torchserve(images, shape).await,
        }
    }

    /// One V2 `infer` request for the batch.
    async fn predict_v2(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        let n = images.len();
        let names = self.cfg.class_names.as_deref();
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
        let v = self.post_json(&url, body, n).await?;
        let answer = self
            .read_scores(|kind| {
                protocol::v2_answer(&v, n, self.output_name.as_deref(), kind, names)
            })
            .map_err(|m| self.invalid(&url, m))?;
        if answer.argmax {
            let _ = self.reading.argmax_of.set(answer.output);
        }
        Ok(answer.predictions)
    }

    /// One `instances` request for the batch (TF Serving, KServe V1, a JSON template).
    async fn predict_instances(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        let n = images.len();
        let names = self.cfg.class_names.as_deref();
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
        let v = self.post_json(&url, body, n).await?;
        let preds = v
            .pointer(&pointer)
            .or_else(|| v.get("outputs"))
            .and_then(Value::as_array)
            .ok_or_else(|| {
                self.invalid(&url, Invalid(format!("no predictions array at {pointer}")))
            })?;
        if preds.len() != n {
            return Err(self.invalid(
                &url,
                Invalid(format!("{} predictions for {n} images", preds.len())),
            ));
        }
        self.read_scores(|kind| {
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
                })
                .collect()
        })
        .map_err(|m| self.invalid(&url, m))
    }

    /// One TorchServe request per image (PNG bodies).
    async fn predict_torchserve(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError> {
        let n = images.len();
        let names = self.cfg.class_names.as_deref();
        let mut path = format!("predictions/{}", self.cfg.model);
        if let Some(v) = &self.cfg.version {
            path.push_str(&format!("/{v}"));
        }
        let url = self.url(&path)?;
        let mut out = Vec::with_capacity(n);
        for img in images {
            let png = crate::dataset::folder::encode_png(img, shape)
                .map_err(|e| EndpointError::Config(format!("cannot encode a query image: {e}")))?;
            let (status, bytes) = self
                .send(
                    || {
                        self.client
                            .post(url.clone())
                            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                            .body(png.clone())
                    },
                    &url,
                    answer_cap(1),
                )
                .await?;
            if !(200..300).contains(&status) {
                return Err(status_error(&url, status, &bytes));
            }
            let v = protocol::lenient_json(&bytes).map_err(|m| self.invalid(&url, m))?;
            out.push(
                self.read_scores(|kind| protocol::torchserve_prediction(&v, kind, names))
                    .map_err(|m| self.invalid(&url, m))?,
            );
        }
        Ok(out)
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
            .send_attempts(|| self.client.get(url.clone()), &url, 0, SMALL_ANSWER)
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
        c.output = self.kind();
        c.batch_size = self.batch_size.load(Ordering::Relaxed);
        c
    }
}

impl HttpEndpoint {
    /// One batch; a batch the server refuses as too large (a 400 that speaks of the batch size,
    /// as Triton's "batch-size must be <= 64") is split in halves, and later batches are made
    /// no larger. A 404 gets the protocol hint.
    fn predict_chunk<'a>(&'a self, images: &'a [Vec<u8>], shape: ImageShape) -> BatchFuture<'a> {
        Box::pin(async move {
            match self.predict_batch(images, shape).await {
                Err(EndpointError::Status {
                    status: 400,
                    message,
                    ..
                }) if images.len() > 1 && message.to_ascii_lowercase().contains("batch") => {
                    let half = images.len().div_ceil(2);
                    let short: String = message.chars().take(120).collect();
                    self.lower_batch_size(
                        half,
                        format!(
                            "batch size halved to {half} after the server refused {} images ({short:?})",
                            images.len()
                        ),
                    );
                    let mut out = self.predict_chunk(&images[..half], shape).await?;
                    out.extend(self.predict_chunk(&images[half..], shape).await?);
                    Ok(out)
                }
                // A gate in front of the model refuses what it finds suspicious: the refused
                // images are found by halving, each recorded as withheld. (An endpoint that
                // refuses everything, a protocol or key problem, is an error of the verification,
                // which needs benign answers.)
                Err(EndpointError::Status { status, .. }) if refusal(status) => {
                    if let [_] = images {
                        return Ok(vec![Prediction::Withheld {
                            status: Some(status),
                        }]);
                    }
                    let half = images.len().div_ceil(2);
                    let mut out = self.predict_chunk(&images[..half], shape).await?;
                    out.extend(self.predict_chunk(&images[half..], shape).await?);
                    Ok(out)
                }
                Err(e) => Err(self.explain(e).await),
                ok => ok,
            }
        })
    }
}

/// Whether a status is a gate's refusal of what a request holds (403 Forbidden, 406 Not
/// Acceptable, 409 Conflict, 451 Unavailable For Legal Reasons). Other client errors stay
/// errors: 400 and 422 are how servers reject a schema or a shape, 401 a missing key, 404 a
/// missing model, 413 a size limit, 429 a rate limit (retried).
fn refusal(status: u16) -> bool {
    matches!(status, 403 | 406 | 409 | 451)
}

/// Why one attempt failed: for good, or in a way a later attempt may not.
enum Failure {
    /// Not worth another try.
    Fatal(EndpointError),
    /// 5xx, 429, a timeout or a failed connection; `retry_after` is the server's Retry-After.
    Retry {
        message: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
}

/// Runs `attempt` until it succeeds, fails for good, or `retries` further tries are spent.
/// Between tries it waits what the server's Retry-After says (at most [`MAX_BACKOFF`]), or else
/// an exponential backoff from 100 ms with jitter from `jitter` (half to all of the step).
async fn with_retries<T, Fut>(
    url: &url::Url,
    retries: u32,
    jitter: &Mutex<crate::watermark::rng::Rng>,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, EndpointError>
where
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut tried = 0u32;
    loop {
        let (message, status, retry_after) = match attempt().await {
            Ok(v) => return Ok(v),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry {
                message,
                status,
                retry_after,
            }) => (message, status, retry_after),
        };
        if tried >= retries {
            let message = format!("{message} ({})", attempts(tried + 1));
            return Err(match status {
                Some(status) => EndpointError::Status {
                    url: url.to_string(),
                    status,
                    message,
                },
                None => EndpointError::Transport {
                    url: url.to_string(),
                    message,
                },
            });
        }
        let backoff = match retry_after {
            Some(d) => d.min(MAX_BACKOFF),
            None => {
                let step = Duration::from_millis(100 * (1u64 << tried.min(6))).min(MAX_BACKOFF);
                let u = jitter.lock().expect("jitter lock").unit_f32() as f64;
                step.mul_f64(0.5 + 0.5 * u)
            }
        };
        tokio::time::sleep(backoff).await;
        tried += 1;
    }
}

fn attempts(n: u32) -> String {
    if n == 1 {
        "after 1 attempt".into()
    } else {
        format!("after {n} attempts")
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
    fn input_shape(&self) -> Option<ImageShape> {
        self.input_shape
    }

    fn describe(&self) -> String {
        let mut d = format!(
            "{} {:?} model {}",
            self.cfg.url, self.cfg.protocol, self.cfg.model
        );
        let output = self.output_name.as_deref().unwrap_or("the scores");
        if let Some(name) = self.reading.argmax_of.get() {
            d.push_str(&format!(
                "; labels are the arg-max of output {name:?} (the model gives no label output)"
            ));
        } else if let Some((kind, why)) = self.reading.kind.get() {
            let kind = match kind {
                OutputKind::Logits => "logits (softmax applied)",
                _ => "probabilities",
            };
            d.push_str(&format!(
                "; output {output:?} read as {kind}, inferred: {why}"
            ));
        }
        if let Some(why) = self.reading.batch.lock().expect("batch note lock").as_ref() {
            d.push_str(&format!("; {why}"));
        }
        d
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
            .chunks(self.batch_size.load(Ordering::Relaxed))
            .map(|b| self.predict_chunk(b, shape))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watermark::rng::{Rng, Stream};
    use tokio::time::Instant;

    #[test]
    fn the_input_size_is_read_from_v2_shapes() {
        let s = |h, w, c| {
            Some(ImageShape {
                height: h,
                width: w,
                channels: c,
            })
        };
        assert_eq!(image_shape(&[-1, 28, 28, 1]), s(28, 28, 1));
        assert_eq!(image_shape(&[-1, 3, 224, 160]), s(224, 160, 3));
        assert_eq!(image_shape(&[8, 32, 32, 3]), s(32, 32, 3));
        assert_eq!(image_shape(&[-1, 28, 28]), s(28, 28, 1));
        // Flat, variable or unclear: the held-out images' size is used.
        assert_eq!(image_shape(&[-1, 784]), None);
        assert_eq!(image_shape(&[-1, -1, -1, 3]), None);
        assert_eq!(image_shape(&[-1, 5, 28, 28]), None);
        assert_eq!(image_shape(&[]), None);
    }

    fn retry(retry_after: Option<u64>) -> Failure {
        Failure::Retry {
            message: "HTTP 429: slow down".into(),
            status: Some(429),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    /// Runs `with_retries` over `answers` (one per attempt) under paused time; the virtual times
    /// of the attempts, from the first, and the result.
    async fn attempts_at(
        retries: u32,
        answers: Vec<Result<u8, Failure>>,
    ) -> (Vec<Duration>, Result<u8, EndpointError>) {
        let url = url::Url::parse("http://model.test/v2/models/m/infer").unwrap();
        let jitter = Mutex::new(Rng::new(7, Stream::Selection));
        let start = Instant::now();
        let times = std::cell::RefCell::new(Vec::new());
        let answers = std::cell::RefCell::new(answers.into_iter());
        let r = with_retries(&url, retries, &jitter, || {
            times.borrow_mut().push(start.elapsed());
            let answer = answers.borrow_mut().next().expect("an answer per attempt");
            async move { answer }
        })
        .await;
        (times.into_inner(), r)
    }

    /// A server's Retry-After of seconds is waited out exactly, by the runtime's clock (paused,
    /// so the test takes no time): a client that ignored it would come back after 50–100 ms.
    #[tokio::test(start_paused = true)]
    async fn retry_after_seconds_are_waited_out() {
        let (t, r) = attempts_at(3, vec![Err(retry(Some(2))), Err(retry(Some(3))), Ok(9)]).await;
        assert_eq!(r.unwrap(), 9);
        assert_eq!(t, [0, 2, 5].map(Duration::from_secs));
        // A Retry-After beyond the cap waits the cap (5 s), not an hour.
        let (t, _) = attempts_at(1, vec![Err(retry(Some(3600))), Ok(1)]).await;
        assert_eq!(t[1], MAX_BACKOFF);
    }

    /// Without Retry-After, the waits double from 100 ms (jittered to half to all of the step),
    /// and after the last retry the error says how many attempts were made.
    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_and_the_last_error_counts_the_attempts() {
        let (t, r) = attempts_at(3, (0..4).map(|_| Err(retry(None))).collect()).await;
        for (i, pair) in t.windows(2).enumerate() {
            let step = Duration::from_millis(100 << i);
            let gap = pair[1] - pair[0];
            assert!(
                gap >= step / 2 && gap <= step,
                "wait {i}: {gap:?} for a step of {step:?}"
            );
        }
        let e = r.unwrap_err().to_string();
        assert!(e.contains("HTTP 429: slow down (after 4 attempts)"), "{e}");
        // A fatal failure ends at once.
        let fatal = Failure::Fatal(EndpointError::Config("no".into()));
        let (t, r) = attempts_at(3, vec![Err(fatal)]).await;
        assert_eq!(t.len(), 1);
        assert!(r.is_err());
    }
}
