//! The HTTP service: one router per resource under `/v1/`, merged here with health, metrics and
//! the OpenAPI document, behind request ids, tracing, body limits, a timeout, a concurrency limit
//! and per-key rate limits. Handlers are thin: extract, check access, call the store or queue a
//! job, map the result.

mod auth;
mod console;
mod datasets;
pub mod error;
mod jobs;
mod keys;
mod metrics;
mod verifications;
mod watermarks;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::{Caller, RateLimiter};
pub use error::{ApiError, ApiJson};

use crate::config::ServeConfig;
use crate::jobs::{Runner, RunnerConfig, RunnerHandle};
use crate::store::{Role, Store};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Storage.
    pub store: Store,
    /// Effective configuration.
    pub cfg: Arc<ServeConfig>,
    /// Per-key rate limits.
    pub limiter: Arc<RateLimiter>,
    /// Request metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Wakes idle job workers when a job is queued.
    pub wake: Arc<Notify>,
    concurrency: Arc<Semaphore>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hallmark",
        description = "Secret backdoor watermarks for image datasets, and black-box verification of suspicious models."
    ),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
    tags(
        (name = "keys", description = "API keys and roles (admin)"),
        (name = "datasets", description = "Datasets registered by path or uploaded"),
        (name = "watermarks", description = "Watermarked releases; secrets stay on the server"),
        (name = "verifications", description = "Verifications of model endpoints"),
        (name = "jobs", description = "Long-running work"),
        (name = "system", description = "Health, metrics and this document")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("an API key: `Authorization: Bearer hm_…`"))
                    .build(),
            ),
        );
    }
}

/// Documents the answers every operation can give from the layers around the handlers: 429
/// (rate limit), 500, 503 (timeout), and for operations with a body 413 and 415.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, ResponseBuilder, content::ContentBuilder};
        let error = |what: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(what)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let r = &mut op.responses.responses;
                r.entry("500".into())
                    .or_insert_with(|| error("internal error"));
                r.entry("503".into())
                    .or_insert_with(|| error("timed out or a dependency is down"));
                if op.security.as_ref().is_none_or(|s| !s.is_empty()) {
                    r.entry("429".into())
                        .or_insert_with(|| error("rate limit of the API key"));
                }
                if op.request_body.is_some() {
                    r.entry("413".into())
                        .or_insert_with(|| error("body larger than the limit"));
                    r.entry("415".into())
                        .or_insert_with(|| error("wrong content type"));
                }
            }
        }
    }
}

/// Health of the service and its database.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HealthResponse {
    /// `ok`.
    pub status: String,
    /// `sqlite` or `postgres`.
    pub database: String,
}

/// Liveness and database check.
#[utoipa::path(get, path = "/health", tag = "system", security(()),
    responses((status = 200, body = HealthResponse), (status = 503, body = error::ErrorBody)))]
async fn health(State(s): State<AppState>) -> Result<ApiJson<HealthResponse>, ApiError> {
    s.store
        .ping()
        .await
        .map_err(|e| ApiError::unavailable(format!("database: {e}")))?;
    Ok(ApiJson(HealthResponse {
        status: "ok".into(),
        database: match s.store.backend() {
            crate::store::Backend::Sqlite => "sqlite".into(),
            crate::store::Backend::Postgres => "postgres".into(),
        },
    }))
}

/// Prometheus metrics: requests by route and status, latency, jobs by state.
#[utoipa::path(get, path = "/metrics", tag = "system", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics_route(State(s): State<AppState>) -> Result<Response, ApiError> {
    let jobs = s.store.job_counts().await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(&jobs),
    )
        .into_response())
}

/// Limits, times and counts every routed request.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let limit = s.cfg.request_timeout;
    let response = match tokio::time::timeout(limit, async {
        let _permit = s.concurrency.acquire().await;
        next.run(req).await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => ApiError::timeout().into_response(),
    };
    s.metrics.observe(
        &method,
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

async fn no_route() -> ApiError {
    ApiError::not_found("route")
}

async fn wrong_method() -> ApiError {
    ApiError::method_not_allowed()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("a handler panicked").into_response()
}

fn api(cfg: &ServeConfig) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(metrics_route))
        .merge(keys::router())
        .merge(datasets::router(cfg))
        .merge(watermarks::router())
        .merge(verifications::router())
        .merge(jobs::router())
}

/// Completes the document once every route is in it.
fn finish(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::Modify as _;
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    CommonResponses.modify(doc);
}

/// The OpenAPI document of every route, without starting anything.
pub fn openapi(cfg: &ServeConfig) -> utoipa::openapi::OpenApi {
    let (_, mut doc) = api(cfg).split_for_parts();
    finish(&mut doc);
    doc
}

/// Every route, with the OpenAPI document served at `/openapi.json`.
pub fn router(state: AppState) -> Router {
    let (api, mut doc) = api(&state.cfg).split_for_parts();
    finish(&mut doc);
    let doc = Arc::new(doc);
    api.route(
        "/openapi.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    )
    .merge(console::router(&state.cfg))
    .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard))
    .fallback(no_route)
    .method_not_allowed_fallback(wrong_method)
    .layer(DefaultBodyLimit::max(state.cfg.body_limit))
    .layer(CatchPanicLayer::custom(panic_response))
    .layer(PropagateRequestIdLayer::x_request_id())
    .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        // The path only: query strings are not logged.
        tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path())
    }))
    .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
    .with_state(state)
}

/// A built service: listening, with its job runner started.
pub struct App {
    listener: TcpListener,
    router: Router,
    runner: RunnerHandle,
    store: Store,
    port: u16,
    /// The admin key created on first start (also written to `<data_dir>/admin.key`).
    pub bootstrap_admin_key: Option<String>,
    /// This process's worker identity.
    pub worker_id: String,
}

impl App {
    /// Connects the database (running migrations), creates the first admin key if there is
    /// none, starts the job workers and binds the listener.
    pub async fn build(cfg: ServeConfig) -> anyhow::Result<App> {
        use anyhow::Context as _;
        crate::fsutil::create_private_dir(&cfg.data_dir)
            .with_context(|| format!("cannot create the data folder {}", cfg.data_dir.display()))?;
        let key = cfg.load_or_create_key()?;
        let store = Store::connect(&cfg.database_url, &key)
            .await
            .with_context(|| {
                format!("cannot open the database {}", redact_url(&cfg.database_url))
            })?;
        let bootstrap_admin_key = if store.count_admins().await? == 0 {
            let (_, key) = store.create_key("bootstrap admin", Role::Admin).await?;
            let path = cfg.data_dir.join("admin.key");
            crate::fsutil::write_file_atomic(&path, format!("{key}\n").as_bytes(), 0o600, true)
                .with_context(|| format!("cannot write {}", path.display()))?;
            tracing::warn!(path = %path.display(), "no admin key existed: created one and wrote it to this file (mode 0600)");
            Some(key)
        } else {
            None
        };
        let runner = Runner::new(
            store.clone(),
            RunnerConfig {
                job_max_attempts: cfg.job_max_attempts,
                data_dir: cfg.data_dir.clone(),
                workers: cfg.workers,
                lease: cfg.job_lease,
                poll: cfg.job_poll,
                shutdown_grace: cfg.shutdown_grace,
                allow_private_endpoints: cfg.allow_private_endpoints,
                dataset_roots: cfg
                    .dataset_roots
                    .iter()
                    .cloned()
                    .chain([cfg.data_dir.join("uploads")])
                    .collect(),
                dataset_limits: cfg.dataset_limits(),
            },
        );
        let worker_id = runner.worker_id().to_string();
        let runner = runner.start();
        let listener = TcpListener::bind(&cfg.bind)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.bind))?;
        let port = listener.local_addr()?.port();
        let state = AppState {
            store: store.clone(),
            limiter: Arc::new(RateLimiter::new(cfg.rate_limit_per_key)),
            metrics: Arc::new(metrics::Metrics::default()),
            wake: runner.waker(),
            concurrency: Arc::new(Semaphore::new(cfg.concurrency_limit)),
            cfg: Arc::new(cfg),
        };
        let router = router(state);
        Ok(App {
            listener,
            router,
            runner,
            store,
            port,
            bootstrap_admin_key,
            worker_id,
        })
    }

    /// The port it listens on (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then stops taking requests, lets running jobs finish
    /// within the grace period (parking the others in the queue) and closes the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(port = self.port, worker = %self.worker_id, "serving");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await?;
        tracing::info!("stopping the job workers");
        self.runner.stop().await;
        self.store.close().await;
        Ok(())
    }
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// A display name: trimmed, 1 to 200 characters.
fn check_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name: 1 to 200 characters"));
    }
    Ok(name)
}

/// The access rule every resource shares: admins and the owner see a thing.
fn owns(caller: &Caller, owner_id: &str) -> bool {
    caller.role() == Role::Admin || caller.id() == owner_id
}
