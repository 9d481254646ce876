//! One error shape for every response: `{"error": {"code", "message"}}` with a stable code.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::ErrorCode;
use crate::store::StoreError;

/// The error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (the HTTP status follows from it).
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

/// An error a handler returns.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 401: no or unknown key.
    pub fn unauthorized() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "missing or unknown API key: send `Authorization: Bearer <key>`",
        )
    }
    /// 403: the key's role may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    /// 404 (also for things that exist but the caller may not see).
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no such {what}"))
    }
    /// 400 with a field or reason.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
    /// 422: the watermark spec is invalid.
    pub fn invalid_spec(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidSpec, message)
    }
    /// 422: the endpoint is not allowed (SSRF rules) or malformed.
    pub fn endpoint_refused(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::EndpointRefused, message)
    }
    /// 409: the resource is not in a state that allows this.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    /// 409: every trigger of a watermark with several has been spent by a verification.
    pub fn triggers_spent(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TriggersSpent, message)
    }
    /// 403: a per-key quota (datasets, upload bytes) is used up.
    pub fn quota(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::QuotaExceeded, message)
    }
    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            ErrorCode::MethodNotAllowed,
            "this route does not take that method",
        )
    }
    /// 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PayloadTooLarge, message)
    }
    /// 429 with Retry-After.
    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(ErrorCode::RateLimited, "too many requests for this API key");
        e.retry_after = Some(retry_after.max(1));
        e
    }
    /// 503: the request took longer than the configured timeout.
    pub fn timeout() -> Self {
        Self::new(
            ErrorCode::Timeout,
            "the request took longer than the server allows",
        )
    }
    /// 503: a dependency is down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    /// 500: logged here once, never detailed to the client.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(ErrorCode::Internal, "internal error (logged on the server)")
    }
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
    /// What went wrong, as the client is told.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(r.body_text()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "expected `Content-Type: application/json`",
            ),
            _ => ApiError::invalid(r.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::invalid(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid(r.body_text())
    }
}

/// `Json` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `Path` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);
