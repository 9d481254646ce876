//! `hallmark serve-model`: a trained model over the Open Inference Protocol V2 (health, metadata,
//! infer), so that `hallmark verify` and any V2 client can query it over real HTTP.
//!
//! Input: one tensor (any name) of FP32, FP64 or UINT8, shaped [N, C, H, W], [N, H, W, C],
//! [N, H, W] (grey) or [N, C·H·W] (HWC order); floats are pixel / 255, bytes are pixels. Outputs:
//! `probs` (FP32 [N, K], softmax) and `label` (INT64 [N, 1]); a request may ask for either.
//! Errors are V2-style `{"error": "..."}` with 400 (bad request) or 404 (unknown model).

use super::model::{Arch, Net};
use super::{TrainError, metrics};
use crate::Invalid;
use crate::dataset::ImageShape;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor, nn};

/// What `model.json` says about a saved model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Network.
    pub arch: Arch,
    /// Input image shape.
    pub shape: ImageShape,
    /// Number of classes.
    pub classes: usize,
    /// Training settings and results, for the record.
    #[serde(default)]
    pub training: Value,
    /// Channels of the last block that a fine-pruning repair removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<i64>,
}

/// A model loaded for inference.
pub struct LoadedModel {
    /// Its description.
    pub info: ModelInfo,
    net: Net,
    vs: nn::VarStore,
    device: Device,
}

/// Saves a trained model as `model.ot` + `model.json` in `dir` (what [`LoadedModel::load`]
/// reads), each by rename.
pub fn save_model(
    t: &super::Trained,
    info: &ModelInfo,
    dir: &std::path::Path,
) -> Result<(), TrainError> {
    let io = |e| TrainError::Io(dir.display().to_string(), e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join("model.ot.partial");
    t.vs.save(&tmp)?;
    std::fs::rename(&tmp, dir.join("model.ot")).map_err(io)?;
    let info = ModelInfo {
        pruned: t.net.pruned().to_vec(),
        ..info.clone()
    };
    crate::fsutil::write_file_atomic(
        &dir.join("model.json"),
        &serde_json::to_vec_pretty(&info).expect("serialising to memory"),
        0o644,
        true,
    )
    .map_err(io)
}

impl LoadedModel {
    /// Loads `model.ot` and `model.json` from `dir`.
    pub fn load(dir: &std::path::Path, device: Device) -> Result<Self, TrainError> {
        let meta = dir.join("model.json");
        let info: ModelInfo = serde_json::from_slice(
            &std::fs::read(&meta).map_err(|e| TrainError::Io(meta.display().to_string(), e))?,
        )
        .map_err(|e| TrainError::Config(format!("{}: {e}", meta.display())))?;
        let (mut vs, net) = Self::network(&info, &info.pruned, device)
            .map_err(|e| TrainError::Config(format!("{}: {e}", meta.display())))?;
        vs.load(dir.join("model.ot"))?;
        vs.freeze();
        Ok(Self {
            info,
            net,
            vs,
            device,
        })
    }

    /// A network of `info`'s shape with the channels `pruned`, and its fresh variables.
    fn network(
        info: &ModelInfo,
        pruned: &[i64],
        device: Device,
    ) -> Result<(nn::VarStore, Net), Invalid> {
        let vs = nn::VarStore::new(device);
        let mut net = {
            // Making the network draws from libtorch's generator (see `TORCH_RNG`).
            let _rng = super::TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
            Net::new(&vs.root(), info.arch, info.shape, info.classes as i64)
        };
        net.prune(pruned, device)?;
        Ok((vs, net))
    }

    /// A copy of its network (same pruning) with its own variables, which can be trained.
    pub fn trainable_copy(&self) -> Result<(nn::VarStore, Net), TrainError> {
        let (mut vs, net) = Self::network(&self.info, self.net.pruned(), self.device)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        vs.copy(&self.vs)?;
        Ok((vs, net))
    }

    /// A copy with its own variables (and the same pruning).
    pub fn try_clone(&self) -> Result<Self, TrainError> {
        let (mut vs, net) = self.trainable_copy()?;
        vs.freeze();
        Ok(Self {
            info: self.info.clone(),
            net,
            vs,
            device: self.device,
        })
    }

    /// Wraps a freshly trained network.
    pub fn from_trained(t: super::Trained, info: ModelInfo, device: Device) -> Self {
        Self {
            info,
            net: t.net,
            vs: t.vs,
            device,
        }
    }

    /// Benign accuracy and attack success on `eval`.
    pub fn evaluate(&self, eval: &metrics::EvalSet) -> metrics::Metrics {
        metrics::evaluate(&self.net, eval, self.device)
    }

    /// Softmax probabilities for a batch [N, C, H, W] of values in [0, 1].
    pub fn probabilities(&self, x: &Tensor) -> Tensor {
        metrics::probabilities(&self.net, &x.to_device(self.device)).to_device(Device::Cpu)
    }

    /// Logits for a batch [N, C, H, W] of values in [0, 1], on the CPU.
    pub fn logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| {
            self.net
                .forward_t(&x.to_device(self.device), false)
                .to_device(Device::Cpu)
        })
    }

    /// The network.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Its variables.
    pub fn vs(&self) -> &nn::VarStore {
        &self.vs
    }
}

struct Served {
    name: String,
    model: Mutex<LoadedModel>,
    info: ModelInfo,
    gate: Option<super::gate::Gate>,
}

/// The V2 server, bound and ready to run.
pub struct ModelServer {
    listener: tokio::net::TcpListener,
    router: Router,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

impl ModelServer {
    /// Binds `addr` (port 0 for any free port) to serve `model` as `name`.
    pub async fn bind(addr: &str, name: &str, model: LoadedModel) -> std::io::Result<Self> {
        Self::bind_gated(addr, name, model, None).await
    }

    /// [`Self::bind`] with `gate` in front of the model: a request with a flagged image is
    /// refused (HTTP 403), or its flagged images are answered with equal probabilities.
    pub async fn bind_gated(
        addr: &str,
        name: &str,
        model: LoadedModel,
        gate: Option<super::gate::Gate>,
    ) -> std::io::Result<Self> {
        let info = model.info.clone();
        let state = Arc::new(Served {
            name: name.to_string(),
            model: Mutex::new(model),
            info,
            gate,
        });
        let router = Router::new()
            .route("/v2/health/live", get(|| async { StatusCode::OK }))
            .route("/v2/health/ready", get(|| async { StatusCode::OK }))
            .route("/v2", get(|| async { Json(json!({"name": "hallmark", "version": env!("CARGO_PKG_VERSION"), "extensions": []})) }))
            .route("/v2/models/{name}", get(metadata))
            .route("/v2/models/{name}/versions/{version}", get(metadata_version))
            .route("/v2/models/{name}/ready", get(ready))
            .route("/v2/models/{name}/infer", post(infer))
            .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
            .layer(DefaultBodyLimit::max(256 << 20))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(Self { listener, router })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` completes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// `None` when `name` is the served model, else the 404 answer.
fn unknown_model(s: &Served, name: &str) -> Option<Response> {
    (name != s.name).then(|| error(StatusCode::NOT_FOUND, format!("model {name} not found")))
}

async fn metadata(State(s): State<Arc<Served>>, Path(name): Path<String>) -> Response {
    if let Some(r) = unknown_model(&s, &name) {
        return r;
    }
    let sh = s.info.shape;
    Json(json!({
        "name": s.name, "versions": ["1"], "platform": "hallmark-tch",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, sh.channels, sh.height, sh.width]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, s.info.classes]},
                    {"name": "label", "datatype": "INT64", "shape": [-1, 1]}],
    }))
    .into_response()
}

async fn metadata_version(
    state: State<Arc<Served>>,
    Path((name, _v)): Path<(String, String)>,
) -> Response {
    metadata(state, Path(name)).await
}

async fn ready(State(s): State<Arc<Served>>, Path(name): Path<String>) -> Response {
    unknown_model(&s, &name).unwrap_or_else(|| StatusCode::OK.into_response())
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
}

fn flatten_numbers(v: &Value, out: &mut Vec<f64>) -> Result<(), Invalid> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| flatten_numbers(x, out)),
        Value::Number(n) => {
            out.push(n.as_f64().ok_or("a number is out of range")?);
            Ok(())
        }
        other => Err(Invalid(format!("data holds {other}, not a number"))),
    }
}

/// Turns a V2 input into a [N, C, H, W] float tensor in [0, 1].
fn input_tensor(input: &InferInput, shape: ImageShape) -> Result<Tensor, Invalid> {
    let (c, h, w) = (
        shape.channels as i64,
        shape.height as i64,
        shape.width as i64,
    );
    if input.shape.iter().any(|d| *d <= 0) || input.shape.is_empty() {
        return Err(Invalid(format!(
            "input {}: shape {:?} has a non-positive dimension",
            input.name, input.shape
        )));
    }
    let n = input.shape[0];
    let per: i64 = input.shape[1..].iter().product();
    if per != c * h * w {
        return Err(Invalid(format!(
            "input {}: shape {:?} does not hold {}×{}×{} images",
            input.name, input.shape, c, h, w
        )));
    }
    let mut data = Vec::with_capacity((n * per) as usize);
    flatten_numbers(&input.data, &mut data).map_err(|e| format!("input {}: {e}", input.name))?;
    if data.len() as i64 != n * per {
        return Err(Invalid(format!(
            "input {}: shape {:?} needs {} values, data has {}",
            input.name,
            input.shape,
            n * per,
            data.len()
        )));
    }
    if let Some(v) = data.iter().find(|v| !v.is_finite()) {
        return Err(Invalid(format!(
            "input {}: value {v} is not finite",
            input.name
        )));
    }
    let scale = match input.datatype.as_str() {
        "FP32" | "FP64" | "FP16" => 1.0,
        "UINT8" => 1.0 / 255.0,
        other => {
            return Err(Invalid(format!(
                "input {}: datatype {other} is not supported (FP32, FP64, UINT8)",
                input.name
            )));
        }
    };
    let t = Tensor::from_slice(&data).to_kind(Kind::Float) * scale;
    let dims = &input.shape[1..];
    Ok(match dims {
        [a, b, d] if *a == c && *b == h && *d == w => t.view([n, c, h, w]),
        [a, b, d] if *a == h && *b == w && *d == c => {
            t.view([n, h, w, c]).permute([0, 3, 1, 2]).contiguous()
        }
        [a, b] if c == 1 && *a == h && *b == w => t.view([n, 1, h, w]),
        [_] => t.view([n, h, w, c]).permute([0, 3, 1, 2]).contiguous(),
        _ => {
            return Err(Invalid(format!(
                "input {}: layout of shape {:?} not understood",
                input.name, input.shape
            )));
        }
    })
}

async fn infer(
    State(s): State<Arc<Served>>,
    Path(name): Path<String>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    if let Some(r) = unknown_model(&s, &name) {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {}", e.body_text()),
            );
        }
    };
    let [input] = req.inputs.as_slice() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("expected exactly one input, got {}", req.inputs.len()),
        );
    };
    let wanted: Vec<String> = match &req.outputs {
        Some(o) if !o.is_empty() => o.iter().map(|o| o.name.clone()).collect(),
        _ => vec!["probs".into(), "label".into()],
    };
    if let Some(bad) = wanted.iter().find(|n| *n != "probs" && *n != "label") {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown output {bad}; outputs are probs and label"),
        );
    }
    let x = match input_tensor(input, s.info.shape) {
        Ok(x) => x,
        Err(m) => return error(StatusCode::BAD_REQUEST, m.0),
    };
    let state = s.clone();
    let answered = tokio::task::spawn_blocking(move || {
        let model = state.model.lock().expect("model lock");
        match &state.gate {
            Some(g) => {
                let (p, flags) = g.answer(&model, &x);
                (
                    p,
                    flags.iter().any(|f| *f) && g.on_flag == super::gate::OnFlag::Refuse,
                )
            }
            None => (model.probabilities(&x), false),
        }
    })
    .await;
    let Ok((probs, refused)) = answered else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "inference failed");
    };
    if refused {
        return error(StatusCode::FORBIDDEN, "request refused");
    }
    let n = probs.size()[0];
    let k = s.info.classes as i64;
    let mut outputs = Vec::new();
    for w in &wanted {
        if w == "probs" {
            let data = Vec::<f32>::try_from(probs.flatten(0, -1)).unwrap_or_default();
            outputs
                .push(json!({"name": "probs", "datatype": "FP32", "shape": [n, k], "data": data}));
        } else {
            let labels = Vec::<i64>::try_from(probs.argmax(1, false)).unwrap_or_default();
            outputs.push(
                json!({"name": "label", "datatype": "INT64", "shape": [n, 1], "data": labels}),
            );
        }
    }
    let mut resp = json!({"model_name": s.name, "model_version": "1", "outputs": outputs});
    if let Some(id) = req.id {
        resp["id"] = Value::String(id);
    }
    Json(resp).into_response()
}

async fn infer_version(
    state: State<Arc<Served>>,
    Path((name, _v)): Path<(String, String)>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    infer(state, Path(name), body).await
}

/// A local model answers verification queries in-process (offline verification, no HTTP).
/// Inference runs on tokio's blocking pool, off the runtime's worker threads.
pub struct LocalEndpoint {
    model: Arc<Mutex<LoadedModel>>,
    label: String,
}

impl LocalEndpoint {
    /// Wraps a loaded model; `label` names it in reports.
    pub fn new(model: LoadedModel, label: String) -> Self {
        Self {
            model: Arc::new(Mutex::new(model)),
            label,
        }
    }
}

#[async_trait::async_trait]
impl crate::endpoint::ModelEndpoint for LocalEndpoint {
    fn describe(&self) -> String {
        format!("local model {}", self.label)
    }

    fn input_shape(&self) -> Option<ImageShape> {
        self.model.lock().ok().map(|m| m.info.shape)
    }

    async fn predict(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<crate::endpoint::Prediction>, crate::endpoint::EndpointError> {
        let mut bytes = Vec::with_capacity(images.len() * shape.len());
        for img in images {
            bytes.extend_from_slice(img);
        }
        let n = images.len() as i64;
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || {
            let model = model.lock().expect("model lock");
            if shape != model.info.shape {
                return Err(crate::endpoint::EndpointError::Config(format!(
                    "the model takes {} images, not {shape}",
                    model.info.shape
                )));
            }
            let (h, w, c) = (
                shape.height as i64,
                shape.width as i64,
                shape.channels as i64,
            );
            let x = Tensor::from_slice(&bytes)
                .view([n, h, w, c])
                .permute([0, 3, 1, 2])
                .to_kind(Kind::Float)
                .divide_scalar(255.0);
            let probs = model.probabilities(&x);
            let k = model.info.classes;
            let flat =
                Vec::<f32>::try_from(probs.flatten(0, -1).to_kind(Kind::Float)).unwrap_or_default();
            Ok(flat
                .chunks(k)
                .map(|row| {
                    crate::endpoint::Prediction::Probs(row.iter().map(|&v| f64::from(v)).collect())
                })
                .collect())
        })
        .await
        .map_err(|e| {
            crate::endpoint::EndpointError::Config(format!("local inference failed: {e}"))
        })?
    }
}
