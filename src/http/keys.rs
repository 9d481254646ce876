//! `/v1/keys`: API keys and their roles (admin only, but for `me`).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::{AppState, Caller};
use crate::store::{ApiKey, Role};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(me))
}

/// A key to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// Who will hold it (1 to 200 characters).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// A new key: `secret` is shown once and never stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreateKeyResponse {
    /// The key's facts.
    pub key: ApiKey,
    /// The key itself, for `Authorization: Bearer`.
    pub secret: String,
}

/// Creates a key (admin).
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 201, body = CreateKeyResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn create_key(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> Result<(StatusCode, ApiJson<CreateKeyResponse>), ApiError> {
    caller.require(&[Role::Admin], "creating keys")?;
    let name = super::check_name(&req.name)?;
    let (key, secret) = s.store.create_key(name, req.role).await?;
    Ok((
        StatusCode::CREATED,
        ApiJson(CreateKeyResponse { key, secret }),
    ))
}

/// Lists keys (admin).
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, body = Vec<ApiKey>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn list_keys(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<Vec<ApiKey>>, ApiError> {
    caller.require(&[Role::Admin], "listing keys")?;
    Ok(ApiJson(s.store.list_keys().await?))
}

/// Revokes a key (admin).
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn revoke_key(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Admin], "revoking keys")?;
    if id == caller.id() {
        return Err(ApiError::conflict("an admin cannot revoke its own key"));
    }
    if s.store.revoke_key(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("live key"))
    }
}

/// The calling key (any role): auditors give its id to publishers for grants.
#[utoipa::path(get, path = "/v1/keys/me", tag = "keys",
    responses((status = 200, body = ApiKey), (status = 401, body = ErrorBody)))]
async fn me(caller: Caller) -> ApiJson<ApiKey> {
    ApiJson(caller.0)
}
