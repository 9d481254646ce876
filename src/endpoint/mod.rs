//! Clients for model servers: send a batch of images, get back per-image probabilities or labels.
//!
//! One [`ModelEndpoint`] trait, one [`HttpEndpoint`] speaking the protocol its [`EndpointConfig`]
//! names: Open Inference Protocol V2 (KServe, Triton, MLServer), TensorFlow Serving `:predict`,
//! KServe V1, TorchServe `/predictions` (PNG bodies, top-k answers) and a configurable JSON
//! template. Responses are validated strictly: a response that fails (wrong shape, non-finite
//! numbers, probabilities that do not sum to 1) is an error, never silently used.

mod guard;
mod http;
mod protocol;
mod settings;

pub use guard::{AddressPolicy, check_address};
pub use http::HttpEndpoint;
pub(crate) use settings::in_range;
pub use settings::{EndpointSettings, SettingError};

use crate::dataset::ImageShape;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a model answered for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// A full probability vector.
    Probs(Vec<f64>),
    /// The k most probable classes with their probabilities, most probable first (TorchServe).
    TopK(Vec<(u32, f64)>),
    /// Only a label.
    Label(u32),
    /// No answer: the server refused this image's request (its HTTP status) while it answers
    /// others sent alike, or flattened the answer (every class equally likely, as a gate that
    /// answers all-zero logits does; `status` is then absent). A verification records it and
    /// counts it as evidence (docs/verification.md), never as a failure.
    Withheld {
        /// The refusal's HTTP status.
        status: Option<u16>,
    },
    /// No answer to trust: asked twice, the second time with a few pixels one grey level off,
    /// the server named two classes, at least once decisively (a gate's made-up answer moves, a
    /// model's does not unless it was a near tie). Counted as withheld.
    Unsteady {
        /// The classes named the first and the second time.
        labels: [u32; 2],
    },
}

impl Prediction {
    /// The predicted label (arg max).
    pub fn label(&self) -> Option<u32> {
        match self {
            Self::Probs(p) => p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32),
            Self::TopK(v) => v.first().map(|(c, _)| *c),
            Self::Label(l) => Some(*l),
            Self::Withheld { .. } | Self::Unsteady { .. } => None,
        }
    }

    /// Whether the answer was withheld: refused, flattened to equal scores for every class, or
    /// unsteady.
    pub fn is_withheld(&self) -> bool {
        match self {
            Self::Withheld { .. } | Self::Unsteady { .. } => true,
            Self::Probs(p) => {
                p.len() > 1
                    && p.iter()
                        .all(|v| (v - p[0]).abs() <= 1e-9 * p[0].abs().max(1.0))
            }
            Self::TopK(v) => v.len() > 1 && v.iter().all(|(_, p)| (p - v[0].1).abs() <= 1e-9),
            Self::Label(_) => false,
        }
    }

    /// Bounds on the probability of `class`: exact for a full vector; for a top-k answer that
    /// does not list the class, between 0 and the smallest listed probability. `None` when the
    /// answer carries no probability.
    pub fn prob_bounds(&self, class: u32) -> Option<(f64, f64)> {
        match self {
            Self::Probs(p) => p.get(class as usize).map(|&v| (v, v)),
            Self::TopK(v) => Some(match v.iter().find(|(c, _)| *c == class) {
                Some((_, p)) => (*p, *p),
                None => (0.0, v.iter().map(|(_, p)| *p).fold(1.0, f64::min)),
            }),
            Self::Label(_) | Self::Withheld { .. } | Self::Unsteady { .. } => None,
        }
    }
}

/// Why a model endpoint could not answer.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The configuration cannot work.
    #[error("endpoint configuration: {0}")]
    Config(String),
    /// The address is private, loopback, link-local or a metadata service, and that is not allowed.
    #[error("refused to contact {url}: {reason} (allow private addresses explicitly to use it)")]
    Refused {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The server could not be reached (after retries).
    #[error("{url}: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The server answered something that is not a valid prediction.
    #[error("{url}: invalid response: {message}")]
    Invalid {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
}

/// The wire protocol of a model server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Open Inference Protocol V2 (KServe V2, Triton, MLServer).
    V2,
    /// TensorFlow Serving REST `:predict`.
    Tfserving,
    /// KServe V1 (`instances` / `predictions`).
    KserveV1,
    /// TorchServe `/predictions/{model}` with a PNG body.
    Torchserve,
    /// A JSON template with the batch in place of `"$INSTANCES"`.
    Json,
}

/// How image tensors are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TensorLayout {
    /// [N, C, H, W].
    Nchw,
    /// [N, H, W, C].
    Nhwc,
    /// [N, H, W] (grey images without a channel axis).
    Nhw,
    /// [N, H·W·C] in HWC order.
    Flat,
}

/// Numeric type of the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Datatype {
    /// 32-bit float (scaled and normalised pixels).
    #[value(name = "FP32")]
    #[serde(rename = "FP32")]
    Fp32,
    /// 64-bit float.
    #[value(name = "FP64")]
    #[serde(rename = "FP64")]
    Fp64,
    /// Raw 0–255 bytes (no scaling).
    #[value(name = "UINT8")]
    #[serde(rename = "UINT8")]
    Uint8,
}

impl Datatype {
    fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Uint8 => "UINT8",
        }
    }
}

/// What the model's output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Scores of either kind, settled once per run: logits when the output's name says so
    /// (`logits`), probabilities when it says so (`prob`, `softmax`), otherwise by the first
    /// answer (probabilities if every row is one, logits if not). The report says which.
    Auto,
    /// Probabilities (each row sums to 1 within 1e-3).
    Probabilities,
    /// Logits, turned into probabilities with a softmax.
    Logits,
    /// Labels only.
    Labels,
}

/// Everything needed to talk to one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointConfig {
    /// Base URL of the server (the full URL for `json`).
    pub url: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Model name (not used by `json`).
    pub model: String,
    /// Model version.
    pub version: Option<String>,
    /// Input tensor name (V2; TF Serving / KServe V1 named instances). From metadata when absent.
    pub input_name: Option<String>,
    /// Input datatype.
    pub datatype: Option<Datatype>,
    /// Tensor layout. From metadata when absent, else NCHW.
    pub layout: Option<TensorLayout>,
    /// Pixels are multiplied by this (default 1/255).
    pub scale: f64,
    /// Per-channel mean subtracted after scaling.
    pub mean: Vec<f64>,
    /// Per-channel standard deviation divided by after the mean.
    pub std: Vec<f64>,
    /// Output tensor name (V2) or key (named predictions).
    pub output_name: Option<String>,
    /// What the output holds.
    pub output: OutputKind,
    /// Images per request: lowered to the server's published limit (Triton's `max_batch_size`)
    /// or halved when the server refuses a batch as too large.
    pub batch_size: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Time limit of one request, and how long the first contact waits for a server that is
    /// still starting (connections refused, 503).
    pub timeout: Duration,
    /// Retries after a 5xx, 429, timeout or connection error (never after another 4xx).
    pub retries: u32,
    /// Allow private, loopback, link-local and metadata addresses.
    pub allow_private: bool,
    /// Class names that a server may use instead of indices (TorchServe keys, BYTES labels).
    pub class_names: Option<Vec<String>>,
    /// `json` protocol: the request body, with the string `"$INSTANCES"` where the batch goes.
    pub template: Option<String>,
    /// `json` protocol: JSON pointer to the predictions array in the response.
    pub output_pointer: Option<String>,
}

impl EndpointConfig {
    /// A configuration with the defaults: FP32, pixels / 255, scores read as `auto`, batch 32, 4 in
    /// flight, 30 s timeout, 3 retries, public addresses only.
    pub fn new(url: impl Into<String>, protocol: Protocol, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            protocol,
            model: model.into(),
            version: None,
            input_name: None,
            datatype: None,
            layout: None,
            scale: 1.0 / 255.0,
            mean: Vec::new(),
            std: Vec::new(),
            output_name: None,
            output: OutputKind::Auto,
            batch_size: 32,
            concurrency: 4,
            timeout: Duration::from_secs(30),
            retries: 3,
            allow_private: false,
            class_names: None,
            template: None,
            output_pointer: None,
        }
    }
}

/// Checks that a model name or version is one plain segment of a URL path, so that it cannot
/// take the request elsewhere on the server (`../`, `?`, `#`, `%2f`). Model servers name models
/// with letters, digits and `._-` (and `:` or `+` in some); anything else is refused.
pub fn check_path_segment(what: &str, s: &str) -> Result<(), EndpointError> {
    if is_path_segment(s) {
        Ok(())
    } else {
        Err(EndpointError::Config(format!(
            "{what} {s:?} {NOT_A_SEGMENT}"
        )))
    }
}

/// What [`check_path_segment`] refuses.
const NOT_A_SEGMENT: &str = "is not one plain path segment (letters, digits and ._-:+ only)";

/// Whether `s` is empty or one plain path segment (at most 256 of letters, digits and ._-:+,
/// not `.` or `..`).
fn is_path_segment(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 256
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:+".contains(c)))
}

/// A model that answers batches of images.
#[async_trait::async_trait]
pub trait ModelEndpoint: Send + Sync {
    /// A short description for reports (URL and model).
    fn describe(&self) -> String;

    /// The image size the model takes, where the server says (V2 metadata, a local model):
    /// verification then builds its queries at that size.
    fn input_shape(&self) -> Option<ImageShape> {
        None
    }

    /// Predictions for each image (HWC bytes of `shape`), in order.
    async fn predict(
        &self,
        images: &[Vec<u8>],
        shape: ImageShape,
    ) -> Result<Vec<Prediction>, EndpointError>;
}
