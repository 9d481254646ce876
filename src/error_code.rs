//! The stable, machine-readable codes that clients read: in every HTTP error body
//! (`{"error": {"code", "message"}}`) and in a failed or cancelled job's `error_code`. One enum,
//! so that a code is written in one place, listed in the OpenAPI document, and never misspelt.

use serde::{Deserialize, Serialize};

/// A stable error code, and the HTTP status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: no or unknown API key.
    Unauthorized,
    /// 403: the key's role may not do this.
    Forbidden,
    /// 403: a per-key quota (datasets, upload bytes) is used up.
    QuotaExceeded,
    /// 404: no such thing, or not one the caller may see. Also a job's: what it works on was
    /// deleted.
    NotFound,
    /// 400: a field out of range or malformed.
    InvalidRequest,
    /// 422: the watermark spec is invalid. Also a job's: the stored spec no longer applies.
    InvalidSpec,
    /// 422: the endpoint is not allowed (address rules) or malformed.
    EndpointRefused,
    /// 409: the resource is not in a state that allows this.
    Conflict,
    /// 409: every trigger of a watermark with several has been spent.
    TriggersSpent,
    /// 405.
    MethodNotAllowed,
    /// 413.
    PayloadTooLarge,
    /// 415.
    UnsupportedMediaType,
    /// 429, with Retry-After.
    RateLimited,
    /// 503: the request took longer than the server allows.
    Timeout,
    /// 503: a dependency is down.
    Unavailable,
    /// 500: logged on the server, never detailed.
    Internal,
    /// A job's: the model endpoint failed or answered what cannot be used.
    Endpoint,
    /// A job's: the request does not fit the data (too few held-out images, say).
    Invalid,
    /// A job's: a registered dataset can no longer be read.
    DatasetUnreadable,
    /// A job's: a registered dataset's files changed since it was registered.
    DatasetChanged,
    /// A job's: reading or writing files failed.
    Io,
    /// A job's: what it needs is not written yet.
    NotReady,
    /// A job cancelled by a client.
    Cancelled,
    /// A job whose worker stopped responding on its last allowed attempt.
    WorkerLost,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 24] = [
        Self::Unauthorized,
        Self::Forbidden,
        Self::QuotaExceeded,
        Self::NotFound,
        Self::InvalidRequest,
        Self::InvalidSpec,
        Self::EndpointRefused,
        Self::Conflict,
        Self::TriggersSpent,
        Self::MethodNotAllowed,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::RateLimited,
        Self::Timeout,
        Self::Unavailable,
        Self::Internal,
        Self::Endpoint,
        Self::Invalid,
        Self::DatasetUnreadable,
        Self::DatasetChanged,
        Self::Io,
        Self::NotReady,
        Self::Cancelled,
        Self::WorkerLost,
    ];

    /// The code as clients and the database see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::QuotaExceeded => "quota_exceeded",
            Self::NotFound => "not_found",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidSpec => "invalid_spec",
            Self::EndpointRefused => "endpoint_refused",
            Self::Conflict => "conflict",
            Self::TriggersSpent => "triggers_spent",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited => "rate_limited",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::Endpoint => "endpoint",
            Self::Invalid => "invalid",
            Self::DatasetUnreadable => "dataset_unreadable",
            Self::DatasetChanged => "dataset_changed",
            Self::Io => "io",
            Self::NotReady => "not_ready",
            Self::Cancelled => "cancelled",
            Self::WorkerLost => "worker_lost",
        }
    }

    /// The code named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status an API error of this code is answered with (a job's codes have the
    /// status that describes them best; they are read from the job, never answered).
    pub fn status(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Forbidden | Self::QuotaExceeded => 403,
            Self::NotFound => 404,
            Self::InvalidRequest | Self::Invalid => 400,
            Self::InvalidSpec | Self::EndpointRefused | Self::DatasetUnreadable => 422,
            Self::Conflict
            | Self::TriggersSpent
            | Self::NotReady
            | Self::Cancelled
            | Self::DatasetChanged => 409,
            Self::MethodNotAllowed => 405,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::RateLimited => 429,
            Self::Timeout | Self::Unavailable | Self::WorkerLost => 503,
            Self::Internal | Self::Io => 500,
            Self::Endpoint => 502,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_name_and_json() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::Value::String(c.as_str().into())
            );
            assert!((400..600).contains(&c.status()), "{c}");
        }
        let names: std::collections::HashSet<_> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }
}
