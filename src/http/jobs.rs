//! `/v1/jobs`: status, progress and cancellation of long work.

use axum::extract::{Query, State};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::{AppState, Caller, owns};
use crate::store::{Job, Role};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
}

/// Paging of job lists.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListJobsQuery {
    /// At most this many, newest first (1 to 1000, default 100).
    pub limit: Option<i64>,
}

/// The caller's jobs (every job for an admin), newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListJobsQuery),
    responses((status = 200, body = Vec<Job>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_jobs(
    State(s): State<AppState>,
    caller: Caller,
    q: Result<Query<ListJobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<Vec<Job>>, ApiError> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit: 1 to 1000"));
    }
    let owner = (caller.role() != Role::Admin).then(|| caller.id().to_string());
    Ok(ApiJson(s.store.list_jobs(owner.as_deref(), limit).await?))
}

async fn visible_job(s: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    match s.store.get_job(id).await? {
        Some(j) if owns(caller, &j.owner_id) => Ok(j),
        _ => Err(ApiError::not_found("job")),
    }
}

/// One job: state, progress, error.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Job>, ApiError> {
    Ok(ApiJson(visible_job(&s, &caller, &id).await?))
}

/// Cancels a job: a queued one at once, a running one within a heartbeat.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn cancel_job(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Job>, ApiError> {
    let job = visible_job(&s, &caller, &id).await?;
    if job.state.is_final() {
        return Err(ApiError::conflict(format!(
            "the job is already {}",
            job.state.as_str()
        )));
    }
    let job = s
        .store
        .cancel_job(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    Ok(ApiJson(job))
}
