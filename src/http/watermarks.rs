//! `/v1/watermarks`: watermarked releases. The spec, trigger, poisoned indices and secret record
//! stay sealed on the server; only the owning publisher may read the secret record back.

use crate::Invalid;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::{AppState, Caller, owns};
use crate::jobs::WatermarkPlan;
use crate::spec::{Trigger, WatermarkSpec};
use crate::store::{Job, JobState, NewWatermark, ReleaseFacts, Role, WatermarkInfo};
use crate::watermark::Secret;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_watermark, list_watermarks))
        .routes(routes!(import_watermark))
        .routes(routes!(get_watermark))
        .routes(routes!(get_secret))
        .routes(routes!(grant, list_grants))
        .routes(routes!(revoke_grant))
}

/// A watermark to write: a spec applied to one of the caller's datasets.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWatermarkRequest {
    /// Display name.
    pub name: String,
    /// The dataset to watermark (the caller's).
    pub dataset_id: String,
    /// Held-out images verifications use by default (the caller's).
    pub holdout_dataset_id: Option<String>,
    /// The spec: TOML text (as in `watermark_specs/`) or the same as a JSON object. Pattern
    /// images must be inline; the server reads no file a spec names.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// Overrides the spec's seed.
    pub seed: Option<u64>,
    /// Overrides the spec's poisoning rate.
    pub rate: Option<f64>,
    /// Publish a trigger that is not drawn in secret from a family (a fixed spec, or a family of
    /// fewer than 12 bits); its verdicts can say at most `inconclusive`.
    #[serde(default)]
    pub public_trigger: bool,
    /// The secret record's nonce (64 hex digits), for a reproducible release; drawn at random
    /// when absent. The secret trigger derives from it: keep it as secret as the record.
    pub nonce: Option<String>,
    /// How many independent secret triggers of the spec's family the release carries (1 to
    /// 16, default 1), each on its own `rate` of the samples. With several, each verification
    /// spends one, so a trigger shown to one endpoint is never used again
    /// (docs/threat-model.md).
    pub triggers: Option<u32>,
    /// Other family specs (each TOML text or a JSON object, like `spec`) of which the release
    /// also carries one secret trigger, on samples of its own, after the spec's `triggers`: a
    /// release with triggers of several families, so that a defence that removes one may leave
    /// another (docs/robustness.md). `seed` and `rate` change `spec` only. A suspect verified
    /// with k of the release's triggers is accused at alpha only if each was verified at
    /// alpha / k (docs/verification.md).
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub also_specs: Vec<serde_json::Value>,
}

/// A watermark and its state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WatermarkView {
    /// Public facts (commitment once written).
    #[serde(flatten)]
    pub watermark: WatermarkInfo,
    /// `queued`, `running`, `succeeded` (ready), `failed` or `cancelled`; imported: `succeeded`.
    pub state: JobState,
    /// How many triggers verifications have spent (releases with several triggers).
    pub triggers_spent: i64,
}

/// A queued watermark and the job writing it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreateWatermarkResponse {
    /// The watermark (commitment once the job succeeds).
    pub watermark: WatermarkInfo,
    /// Poll `/v1/jobs/{id}`.
    pub job: Job,
}

/// A secret record made offline with `hallmark watermark`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportWatermarkRequest {
    /// Display name.
    pub name: String,
    /// Held-out images verifications use by default (the caller's).
    pub holdout_dataset_id: Option<String>,
    /// The secret record's JSON (`hallmark watermark --secret`; a release with several
    /// triggers: the whole set).
    #[schema(value_type = Object)]
    pub secret_record: serde_json::Value,
}

/// An auditor to grant.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// The auditor's key id (it reads it from `/v1/keys/me`).
    pub auditor_id: String,
    /// The model endpoints the auditor may verify, as origins (`https://host:port`); absent for
    /// any endpoint the server's address rules allow. An auditor that chooses the endpoint sees
    /// every triggered query (docs/threat-model.md): naming the suspect's server here keeps the
    /// trigger from being sent to a server the auditor runs.
    pub endpoints: Option<Vec<String>>,
}

/// `scheme://host:port` of an http(s) URL.
pub(super) fn origin(url: &str) -> Result<String, Invalid> {
    let u = url::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(Invalid(format!("{url:?}: not an http or https URL")));
    }
    Ok(u.origin().ascii_serialization())
}

/// Parses a spec given as TOML text or a JSON object, refusing references to server files;
/// `what` names the request field in errors.
fn parse_spec(v: serde_json::Value, what: &str) -> Result<WatermarkSpec, ApiError> {
    let value = match v {
        serde_json::Value::String(text) => {
            let t: toml::Value = toml::from_str(&text)
                .map_err(|e| ApiError::invalid_spec(format!("{what}: {e}")))?;
            serde_json::to_value(t).map_err(|e| ApiError::invalid_spec(format!("{what}: {e}")))?
        }
        serde_json::Value::Object(_) => v,
        _ => {
            return Err(ApiError::invalid_spec(format!(
                "{what}: expected TOML text or a JSON object"
            )));
        }
    };
    let spec = WatermarkSpec::from_user_json(value)
        .map_err(|e| ApiError::invalid_spec(format!("{what}: {e}")))?;
    if matches!(spec.trigger, Trigger::Blend(ref b) if b.pattern.is_none() && b.image.is_some()) {
        return Err(ApiError::invalid_spec(format!(
            "{what}: the blend pattern must be inline"
        )));
    }
    Ok(spec)
}

/// Refuses a trigger that is not drawn in secret from a family of at least
/// [`MIN_ENTROPY_BITS`](crate::spec::family::MIN_ENTROPY_BITS) bits, unless the request says it
/// may be public.
fn check_secrecy(
    spec: &WatermarkSpec,
    ds: &crate::store::DatasetInfo,
    what: &str,
) -> Result<(), ApiError> {
    use crate::spec::family::{MIN_ENTROPY_BITS, entropy_bits};
    if spec.family.is_none() {
        return Err(ApiError::invalid_spec(format!(
            "{what}: no [family] section: the trigger is fixed and public, so a model reacting \
             to it proves nothing about this release; use a family spec, or set public_trigger \
             (its verdicts are then at most inconclusive)"
        )));
    }
    let dims: Vec<usize> = ds.shape.split('x').filter_map(|d| d.parse().ok()).collect();
    let shape = match (spec.image, dims.as_slice()) {
        (Some(s), _) => s,
        (None, [h, w, c]) => crate::dataset::ImageShape {
            height: *h,
            width: *w,
            channels: *c,
        },
        _ => return Err(ApiError::internal("a registered dataset without a shape")),
    };
    let bits = entropy_bits(spec, ds.num_classes.max(1) as usize, shape)
        .map_err(|e| ApiError::invalid_spec(format!("{what}: {e}")))?;
    if bits < MIN_ENTROPY_BITS {
        return Err(ApiError::invalid_spec(format!(
            "{what}: the family draws only {bits:.1} bits of secret (fewer than {MIN_ENTROPY_BITS}): \
             releases would share triggers; let it draw more, or set public_trigger"
        )));
    }
    Ok(())
}

/// A streamed dataset is stamped sample by sample by the keyed rule, one trigger of an
/// any-size family: what cannot be is refused before any work, with the reason.
fn check_streamable(
    spec: &WatermarkSpec,
    ds: &crate::store::DatasetInfo,
    triggers: Option<u32>,
) -> Result<(), ApiError> {
    if triggers.unwrap_or(1) > 1 {
        return Err(ApiError::invalid(
            "triggers: a streamed dataset's release carries one trigger",
        ));
    }
    let classes = ds.num_classes.max(1) as usize;
    let counts = vec![(ds.count.max(0) as usize).div_ceil(classes); classes];
    let channels = match ds.shape.rsplit('x').next() {
        Some("1") => 1,
        _ => 3,
    };
    crate::watermark::keyed::KeyedMarker::new(
        spec,
        [0; 32],
        &counts,
        channels,
        crate::dataset::encoding::MIN_JPEG_QUALITY,
    )
    .map(|_| ())
    .map_err(|e| ApiError::invalid_spec(format!("spec: {e}")))
}

/// A release with triggers of several families (`also_specs`): every spec must be a family
/// (the main one included) whose poisons need no crafting, each secret enough unless the
/// request says the triggers may be public, and the dataset held in memory (a streamed release
/// is stamped by one keyed trigger).
fn check_also_specs(
    spec: &WatermarkSpec,
    also: &[WatermarkSpec],
    ds: &crate::store::DatasetInfo,
    public_trigger: bool,
) -> Result<(), ApiError> {
    if also.is_empty() {
        return Ok(());
    }
    if ds.streamed {
        return Err(ApiError::invalid(
            "also_specs: a streamed dataset's release carries one trigger",
        ));
    }
    let named = std::iter::once(("spec".to_string(), spec)).chain(
        also.iter()
            .enumerate()
            .map(|(i, s)| (format!("also_specs[{i}]"), s)),
    );
    for (what, s) in named {
        if s.family.is_none() {
            return Err(ApiError::invalid_spec(format!(
                "{what}: `{}` has no [family] section; a release with several triggers needs a \
                 family to draw each from",
                s.name
            )));
        }
        if let Some(crafting) = s.crafting() {
            return Err(ApiError::invalid_spec(format!(
                "{what}: `{}` crafts its poisons ([{}]); a release with several triggers needs \
                 specs without crafting",
                s.name,
                crafting.section()
            )));
        }
        if s.encoder.is_some() {
            return Err(ApiError::invalid_spec(format!(
                "{what}: `{}` trains an ISSBA encoder first; craft such a release with `hallmark \
                 watermark` and import its secret record",
                s.name
            )));
        }
        if what != "spec" && !public_trigger {
            check_secrecy(s, ds, &what)?;
        }
    }
    Ok(())
}

/// The caller's dataset `id`; `what` names the request field in the error.
async fn own_dataset(
    s: &AppState,
    caller: &Caller,
    id: &str,
    what: &str,
) -> Result<crate::store::DatasetInfo, ApiError> {
    match s.store.get_dataset(id).await? {
        Some(d) if d.owner_id == caller.id() => Ok(d),
        _ => Err(ApiError::invalid(format!(
            "{what}: no such dataset of yours"
        ))),
    }
}

/// Watermarks a dataset: answers 202 with the job that writes the release.
#[utoipa::path(post, path = "/v1/watermarks", tag = "watermarks", request_body = CreateWatermarkRequest,
    responses((status = 202, body = CreateWatermarkResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_watermark(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateWatermarkRequest>,
) -> Result<(StatusCode, ApiJson<CreateWatermarkResponse>), ApiError> {
    caller.require(&[Role::Publisher], "watermarking")?;
    let name = super::check_name(&req.name)?;
    let mut spec = parse_spec(req.spec, "spec")?;
    if let Some(seed) = req.seed {
        spec.seed = seed;
    }
    if let Some(rate) = req.rate {
        spec.rate = rate;
    }
    spec.validate()
        .map_err(|e| ApiError::invalid_spec(format!("after seed/rate: {e}")))?;
    let also = req
        .also_specs
        .into_iter()
        .enumerate()
        .map(|(i, v)| parse_spec(v, &format!("also_specs[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if spec.needs_model() {
        return Err(ApiError::invalid_spec(
            "crafting this spec's poisons (label-consistent or gradient matching) needs a benign \
             model; craft the release with `hallmark watermark --craft-model DIR` and import its \
             secret record",
        ));
    }
    if spec.encoder.is_some() {
        return Err(ApiError::invalid_spec(
            "an ISSBA spec trains its encoder first (libtorch); craft the release with \
             `hallmark watermark` built with the train feature and import its secret record",
        ));
    }
    let ds = own_dataset(&s, &caller, &req.dataset_id, "dataset_id").await?;
    if !req.public_trigger {
        check_secrecy(&spec, &ds, "spec")?;
    }
    check_also_specs(&spec, &also, &ds, req.public_trigger)?;
    if ds.streamed {
        check_streamable(&spec, &ds, req.triggers)?;
    }
    if let Some(h) = &req.holdout_dataset_id {
        own_dataset(&s, &caller, h, "holdout_dataset_id").await?;
    }
    let triggers = req.triggers.unwrap_or(1) as usize;
    if !(1..=crate::watermark::MAX_TRIGGERS).contains(&triggers) {
        return Err(ApiError::invalid(format!(
            "triggers: 1 to {}",
            crate::watermark::MAX_TRIGGERS
        )));
    }
    if triggers + also.len() > crate::watermark::MAX_TRIGGERS {
        return Err(ApiError::invalid(format!(
            "triggers and also_specs: a release carries at most {} triggers, asked for {} + {}",
            crate::watermark::MAX_TRIGGERS,
            triggers,
            also.len()
        )));
    }
    if triggers > 1 && spec.family.is_none() {
        return Err(ApiError::invalid_spec(
            "triggers: a spec without a [family] section has one fixed trigger; several \
             triggers need a family to draw them from",
        ));
    }
    let plan = WatermarkPlan {
        triggers,
        survey: None,
        spec: serde_json::to_value(&spec).map_err(ApiError::internal)?,
        also_specs: also
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()
            .map_err(ApiError::internal)?,
        nonce: match &req.nonce {
            Some(n) if hex::decode(n).is_ok_and(|b| b.len() == 32) => n.to_lowercase(),
            Some(_) => return Err(ApiError::invalid("nonce: 64 hex digits")),
            None => hex::encode(crate::watermark::random_nonce()),
        },
    };
    let plan = serde_json::to_vec(&plan).map_err(ApiError::internal)?;
    let (watermark, job) = s
        .store
        .create_watermark(
            NewWatermark {
                owner: caller.id(),
                name,
                dataset_id: &req.dataset_id,
                holdout_dataset_id: req.holdout_dataset_id.as_deref(),
                plan: &plan,
                triggers: (triggers + also.len()) as i64,
            },
            s.cfg.job_max_attempts,
        )
        .await?;
    s.wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(CreateWatermarkResponse { watermark, job }),
    ))
}

/// Stores a secret record made offline, so auditors can verify with it.
#[utoipa::path(post, path = "/v1/watermarks/import", tag = "watermarks", request_body = ImportWatermarkRequest,
    responses((status = 201, body = WatermarkView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn import_watermark(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<ImportWatermarkRequest>,
) -> Result<(StatusCode, ApiJson<WatermarkView>), ApiError> {
    caller.require(&[Role::Publisher], "importing watermarks")?;
    let name = super::check_name(&req.name)?;
    if let Some(h) = &req.holdout_dataset_id {
        own_dataset(&s, &caller, h, "holdout_dataset_id").await?;
    }
    let text = req.secret_record.to_string();
    let secret = Secret::from_json(&text)
        .map_err(|e| ApiError::invalid_spec(format!("secret_record: {e}")))?;
    let watermark = s
        .store
        .import_watermark(
            caller.id(),
            name,
            req.holdout_dataset_id.as_deref(),
            &secret.to_json_pretty(),
            &ReleaseFacts {
                commitment: secret.commitment(),
                dataset_sha256: secret.dataset().sha256_after.clone(),
                release_path: None,
                poisoned: secret.poisoned_count() as i64,
            },
            secret.trigger_count() as i64,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        ApiJson(WatermarkView {
            watermark,
            state: JobState::Succeeded,
            triggers_spent: 0,
        }),
    ))
}

async fn view(s: &AppState, w: WatermarkInfo) -> Result<WatermarkView, ApiError> {
    let state = match &w.job_id {
        Some(j) => s
            .store
            .get_job(j)
            .await?
            .map(|j| j.state)
            .unwrap_or(JobState::Failed),
        None => JobState::Succeeded,
    };
    let triggers_spent = s.store.spent_triggers(&w.id).await?;
    Ok(WatermarkView {
        watermark: w,
        state,
        triggers_spent,
    })
}

/// Whether the caller may see (not change) a watermark: owner, admin, or granted auditor.
pub(super) async fn visible(
    s: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<WatermarkInfo, ApiError> {
    let w = s
        .store
        .get_watermark(id)
        .await?
        .ok_or_else(|| ApiError::not_found("watermark"))?;
    if owns(caller, &w.owner_id)
        || (caller.role() == Role::Auditor && s.store.is_granted(id, caller.id()).await?)
    {
        Ok(w)
    } else {
        Err(ApiError::not_found("watermark"))
    }
}

async fn owned(s: &AppState, caller: &Caller, id: &str) -> Result<WatermarkInfo, ApiError> {
    match s.store.get_watermark(id).await? {
        Some(w) if w.owner_id == caller.id() => Ok(w),
        _ => Err(ApiError::not_found("watermark")),
    }
}

/// Watermarks the caller may see: its own (publisher), those granted to it (auditor), all
/// (admin).
#[utoipa::path(get, path = "/v1/watermarks", tag = "watermarks",
    responses((status = 200, body = Vec<WatermarkView>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_watermarks(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<Vec<WatermarkView>>, ApiError> {
    let list = match caller.role() {
        Role::Admin => s.store.list_watermarks(None).await?,
        Role::Publisher => s.store.list_watermarks(Some(caller.id())).await?,
        Role::Auditor => s.store.list_granted(caller.id()).await?,
    };
    let mut out = Vec::with_capacity(list.len());
    for w in list {
        out.push(view(&s, w).await?);
    }
    Ok(ApiJson(out))
}

/// One watermark's public facts and state.
#[utoipa::path(get, path = "/v1/watermarks/{id}", tag = "watermarks", params(("id" = String, Path)),
    responses((status = 200, body = WatermarkView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_watermark(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<WatermarkView>, ApiError> {
    let w = visible(&s, &caller, &id).await?;
    Ok(ApiJson(view(&s, w).await?))
}

/// The secret record (the owning publisher only; never an auditor or admin).
#[utoipa::path(get, path = "/v1/watermarks/{id}/secret", tag = "watermarks", params(("id" = String, Path)),
    responses((status = 200, description = "the secret record", body = Object), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn get_secret(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<serde_json::Value>, ApiError> {
    owned(&s, &caller, &id).await?;
    let record = s
        .store
        .secret_record(&id)
        .await?
        .ok_or_else(|| ApiError::conflict("the release is not written yet"))?;
    Ok(ApiJson(
        serde_json::from_slice(&record).map_err(ApiError::internal)?,
    ))
}

/// Lets an auditor verify against the watermark (owner only).
#[utoipa::path(post, path = "/v1/watermarks/{id}/grants", tag = "watermarks", params(("id" = String, Path)),
    request_body = GrantRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(super) async fn grant(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<GrantRequest>,
) -> Result<StatusCode, ApiError> {
    owned(&s, &caller, &id).await?;
    match s.store.get_key(&req.auditor_id).await? {
        Some(k) if k.role == Role::Auditor && k.revoked_at.is_none() => {}
        _ => return Err(ApiError::invalid("auditor_id: no such live auditor key")),
    }
    let endpoints = req
        .endpoints
        .map(|list| {
            if list.is_empty() || list.len() > 100 {
                return Err(ApiError::invalid("endpoints: 1 to 100 URLs"));
            }
            list.iter()
                .map(|u| origin(u).map_err(|m| ApiError::invalid(format!("endpoints: {m}"))))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    s.store
        .grant(&id, &req.auditor_id, endpoints.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The auditors granted (owner only).
#[utoipa::path(get, path = "/v1/watermarks/{id}/grants", tag = "watermarks", params(("id" = String, Path)),
    responses((status = 200, body = Vec<String>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn list_grants(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<String>>, ApiError> {
    owned(&s, &caller, &id).await?;
    Ok(ApiJson(s.store.list_grants(&id).await?))
}

/// Withdraws a grant (owner only).
#[utoipa::path(delete, path = "/v1/watermarks/{id}/grants/{auditor_id}", tag = "watermarks",
    params(("id" = String, Path), ("auditor_id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_grant(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((id, auditor)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    owned(&s, &caller, &id).await?;
    if s.store.revoke_grant(&id, &auditor).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("grant"))
    }
}
