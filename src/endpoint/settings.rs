//! What a user may say about a model endpoint, checked in one place: `hallmark verify` builds
//! [`EndpointSettings`] from its flags and the HTTP API takes it as the `endpoint` of a
//! verification, so both accept the same ranges and refuse the same values with the same words.

use std::time::Duration;

use serde::Deserialize;

use super::{
    Datatype, EndpointConfig, NOT_A_SEGMENT, OutputKind, Protocol, TensorLayout, is_path_segment,
};

/// A setting out of its range: which one (its JSON name), and what it may be.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingError {
    /// The setting's name in the HTTP API (`batch_size`, `timeout_secs`, ...).
    pub field: &'static str,
    /// What is wrong, with the allowed range.
    pub message: String,
}

impl SettingError {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    /// The `hallmark verify` flag that gives this setting.
    pub fn flag(&self) -> String {
        match self.field {
            "timeout_secs" => "--timeout".into(),
            "version" => "--model-version".into(),
            f => format!("--{}", f.replace('_', "-")),
        }
    }
}

/// Where the model is and how it speaks.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = EndpointRequest)]
pub struct EndpointSettings {
    /// Base URL of the model server (the full URL for `json`).
    pub url: String,
    /// `v2` (KServe V2, Triton, MLServer), `tfserving`, `kserve-v1`, `torchserve` or `json`.
    #[schema(value_type = String)]
    pub protocol: Protocol,
    /// Model name (not used by `json`).
    #[serde(default)]
    pub model: String,
    /// Model version.
    pub version: Option<String>,
    /// Input tensor name; from the server's metadata when absent.
    pub input_name: Option<String>,
    /// `FP32`, `FP64` or `UINT8`.
    #[schema(value_type = Option<String>)]
    pub datatype: Option<Datatype>,
    /// `nchw`, `nhwc`, `nhw` or `flat`.
    #[schema(value_type = Option<String>)]
    pub layout: Option<TensorLayout>,
    /// Pixels are multiplied by this (default 1/255).
    pub scale: Option<f64>,
    /// Per-channel mean subtracted after scaling.
    #[serde(default)]
    pub mean: Vec<f64>,
    /// Per-channel standard deviation.
    #[serde(default)]
    pub std: Vec<f64>,
    /// Output tensor name or key.
    pub output_name: Option<String>,
    /// `auto` (default: logits or probabilities, from the output's name or first answer),
    /// `probabilities`, `logits` or `labels`.
    #[schema(value_type = Option<String>)]
    pub output: Option<OutputKind>,
    /// Images per request (1 to 1024, default 32).
    pub batch_size: Option<usize>,
    /// Requests in flight (1 to 64, default 4).
    pub concurrency: Option<usize>,
    /// Seconds per request (default 30, at most 600).
    pub timeout_secs: Option<f64>,
    /// Retries after 5xx, 429 or connection errors (at most 10, default 3).
    pub retries: Option<u32>,
    /// `json` protocol: the body, with `"$INSTANCES"` where the batch goes.
    pub template: Option<String>,
    /// `json` protocol: JSON pointer to the predictions.
    pub output_pointer: Option<String>,
}

impl EndpointSettings {
    /// Settings with every optional one left to its default.
    pub fn new(url: impl Into<String>, protocol: Protocol, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            protocol,
            model: model.into(),
            version: None,
            input_name: None,
            datatype: None,
            layout: None,
            scale: None,
            mean: Vec::new(),
            std: Vec::new(),
            output_name: None,
            output: None,
            batch_size: None,
            concurrency: None,
            timeout_secs: None,
            retries: None,
            template: None,
            output_pointer: None,
        }
    }

    /// The endpoint's configuration, every setting in its range and every absent one at
    /// [`EndpointConfig::new`]'s default; `allow_private` lets the endpoint be a private,
    /// loopback or link-local address.
    pub fn into_config(self, allow_private: bool) -> Result<EndpointConfig, SettingError> {
        let segment = |field: &'static str, s: &str| {
            if is_path_segment(s) {
                Ok(())
            } else {
                Err(SettingError::new(field, format!("{s:?} {NOT_A_SEGMENT}")))
            }
        };
        segment("model", &self.model)?;
        if let Some(v) = &self.version {
            segment("version", v)?;
        }
        let mut c = EndpointConfig::new(self.url, self.protocol, self.model);
        c.version = self.version;
        c.input_name = self.input_name;
        c.datatype = self.datatype;
        c.layout = self.layout;
        if let Some(s) = self.scale {
            if !(s.is_finite() && s != 0.0) {
                return Err(SettingError::new(
                    "scale",
                    format!("a finite non-zero number, got {s}"),
                ));
            }
            c.scale = s;
        }
        if self.mean.len() > 4 || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(SettingError::new(
                "mean",
                "at most 4 finite values, one per channel",
            ));
        }
        if self.std.len() > 4 || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(SettingError::new(
                "std",
                format!(
                    "at most 4 positive finite values, one per channel, got {:?}",
                    self.std
                ),
            ));
        }
        c.mean = self.mean;
        c.std = self.std;
        c.output_name = self.output_name;
        c.output = self.output.unwrap_or(c.output);
        c.batch_size = in_range(
            "batch_size",
            self.batch_size.unwrap_or(c.batch_size),
            1,
            1024,
        )?;
        c.concurrency = in_range(
            "concurrency",
            self.concurrency.unwrap_or(c.concurrency),
            1,
            64,
        )?;
        let t = self.timeout_secs.unwrap_or(c.timeout.as_secs_f64());
        if !(t.is_finite() && t > 0.0 && t <= 600.0) {
            return Err(SettingError::new(
                "timeout_secs",
                format!("seconds in (0, 600], got {t}"),
            ));
        }
        c.timeout = Duration::from_secs_f64(t);
        c.retries = in_range("retries", self.retries.unwrap_or(c.retries), 0, 10)?;
        c.template = self.template;
        c.output_pointer = self.output_pointer;
        c.allow_private = allow_private;
        Ok(c)
    }
}

/// `v` when it lies in `lo..=hi`, else an error naming `field` and the range.
pub(crate) fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, SettingError> {
    if lo <= v && v <= hi {
        Ok(v)
    } else {
        Err(SettingError::new(field, format!("{lo} to {hi}, got {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(f: impl FnOnce(&mut EndpointSettings)) -> SettingError {
        let mut s = EndpointSettings::new("http://m", Protocol::V2, "m");
        f(&mut s);
        s.into_config(false).unwrap_err()
    }

    #[test]
    fn defaults_are_in_range_and_every_bad_value_is_named() {
        let c = EndpointSettings::new("http://m", Protocol::V2, "m")
            .into_config(false)
            .unwrap();
        assert_eq!(c.batch_size, 32);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.scale, 1.0 / 255.0);
        let cases: [(&str, SettingError); 11] = [
            ("std", err(|s| s.std = vec![0.0])),
            ("std", err(|s| s.std = vec![f64::NAN])),
            ("mean", err(|s| s.mean = vec![f64::INFINITY])),
            ("mean", err(|s| s.mean = vec![0.0; 5])),
            ("scale", err(|s| s.scale = Some(0.0))),
            ("batch_size", err(|s| s.batch_size = Some(0))),
            ("concurrency", err(|s| s.concurrency = Some(65))),
            ("timeout_secs", err(|s| s.timeout_secs = Some(0.0))),
            ("retries", err(|s| s.retries = Some(11))),
            ("model", err(|s| s.model = "../x".into())),
            ("version", err(|s| s.version = Some("a/b".into()))),
        ];
        for (field, e) in cases {
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().starts_with(&format!("{field}: ")), "{e}");
        }
        assert_eq!(err(|s| s.timeout_secs = Some(-1.0)).flag(), "--timeout");
        assert_eq!(err(|s| s.batch_size = Some(0)).flag(), "--batch-size");
    }
}
