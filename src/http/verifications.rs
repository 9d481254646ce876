//! `/v1/verifications`: verify a model endpoint against a watermark (its owner or a granted
//! auditor). The job sends benign and triggered images built on the server; the client never
//! sees the trigger.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::{AppState, Caller, owns};
use crate::endpoint::{AddressPolicy, EndpointSettings, OutputKind, check_address};
use crate::jobs::VerifyPlan;
use crate::store::{Job, Role, VerificationInfo};
use crate::verify::{MarginEffect, RankEffect, VerifySettings};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_verification, list_verifications))
        .routes(routes!(get_verification))
        .routes(routes!(get_report))
}

/// The report's format.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// `html` (the default): one self-contained document, inline CSS and SVG plots, no script;
    /// `pdf`: the same content as a PDF (A4, vector plots).
    pub format: Option<String>,
}

/// A verification to run.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVerificationRequest {
    /// The watermark (owned by the caller or granted to it).
    pub watermark_id: String,
    /// Benign images (the caller's dataset); the watermark's held-out set when absent.
    pub holdout_dataset_id: Option<String>,
    /// The model.
    pub endpoint: EndpointSettings,
    /// Pairs (fixed design) or the most pairs (sequential); default 100, at most 10000.
    pub m: Option<usize>,
    /// Margin of the null hypothesis (default 0.2).
    pub tau: Option<f64>,
    /// Significance level (default 0.01).
    pub alpha: Option<f64>,
    /// Use only predicted labels (exact binomial test).
    pub label_only: Option<bool>,
    /// Stop as soon as the evidence is decisive (betting e-process).
    pub sequential: Option<bool>,
    /// Pairs per round in sequential mode (default 4).
    pub round: Option<usize>,
    /// Research override of the seed the image order and the controls derive from (they derive
    /// from the secret record when absent, so a re-run repeats the verdict); written in the
    /// verdict.
    pub seed: Option<u64>,
    /// Controls drawn from the trigger's family for the rank test (default ⌈1/alpha⌉ − 1).
    pub controls: Option<usize>,
    /// Images each trigger is queried on in the rank test's first round (1 to 100, default 1).
    pub first_images: Option<usize>,
    /// What the rank test scores a trigger with a target by: `target` (default), its target's
    /// gain; `scattered`, also the triggered answers sent off the true class to scattered
    /// classes (against a gate that answers flagged queries with a random class).
    pub rank_effect: Option<RankEffect>,
    /// What the margin test scores a pair by: `target` (default), its target's gain;
    /// `true-class`, the true class's loss, so that triggered answers a gate sent to a random
    /// class count.
    pub margin_effect: Option<MarginEffect>,
    /// Ask every image twice, the second time with 4 pixels one grey level off, and count an
    /// answer that names another class the second time (unless both were near ties) as withheld
    /// (default false; twice the queries).
    #[serde(default)]
    pub ask_twice: bool,
    /// Benign decoys sent per image the tests ask for (0 to 10, default 0; their answers are
    /// dropped), so that the audit's traffic looks like use.
    pub decoys: Option<f64>,
    /// At most this many images a second (0.01 to 100000), decoys included, in requests of 8
    /// (default: no pacing).
    pub rate: Option<f64>,
    /// How many of the watermark's unspent triggers this verification tests the model with
    /// (1 to 16, default 1; at most the release's): with k, each at alpha / k, the model
    /// accused when any says `used` (Bonferroni), the verdict the model's with each trigger's
    /// under `verdicts`. For a release with triggers of several families (`also_specs`),
    /// chosen before the first verification.
    pub triggers: Option<u32>,
}

/// A queued verification and its job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreateVerificationResponse {
    /// The verification; its verdict appears when the job succeeds.
    pub verification: VerificationInfo,
    /// Poll `/v1/jobs/{id}`.
    pub job: Job,
}

/// Verifies a model endpoint: answers 202 with the job that queries it.
#[utoipa::path(post, path = "/v1/verifications", tag = "verifications", request_body = CreateVerificationRequest,
    responses((status = 202, body = CreateVerificationResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_verification(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateVerificationRequest>,
) -> Result<(StatusCode, ApiJson<CreateVerificationResponse>), ApiError> {
    caller.require(&[Role::Publisher, Role::Auditor], "verifying")?;
    let w = super::watermarks::visible(&s, &caller, &req.watermark_id).await?;
    if caller.role() == Role::Publisher && w.owner_id != caller.id() {
        return Err(ApiError::not_found("watermark"));
    }
    let spend = i64::from(req.triggers.unwrap_or(1));
    if !(1..=crate::watermark::MAX_TRIGGERS as i64).contains(&spend) {
        return Err(ApiError::invalid(format!(
            "triggers: 1 to {}, got {spend}",
            crate::watermark::MAX_TRIGGERS
        )));
    }
    if spend > w.triggers {
        return Err(ApiError::invalid(format!(
            "triggers: the watermark's release carries {} trigger{}, fewer than {spend}",
            w.triggers,
            if w.triggers == 1 { "" } else { "s" }
        )));
    }
    if w.commitment.is_none() {
        return Err(ApiError::conflict(
            "the watermark's release is not written yet; wait for its job",
        ));
    }
    let holdout = match (&req.holdout_dataset_id, &w.holdout_dataset_id) {
        (Some(h), _) => match s.store.get_dataset(h).await? {
            Some(d) if d.owner_id == caller.id() || w.holdout_dataset_id.as_deref() == Some(h) => {
                h.clone()
            }
            _ => {
                return Err(ApiError::invalid(
                    "holdout_dataset_id: no such dataset of yours",
                ));
            }
        },
        (None, Some(h)) => h.clone(),
        (None, None) => {
            return Err(ApiError::invalid(
                "holdout_dataset_id: the watermark has no held-out set; give one",
            ));
        }
    };
    let endpoint = req
        .endpoint
        .into_config(s.cfg.allow_private_endpoints)
        .map_err(|e| ApiError::invalid(format!("endpoint.{e}")))?;
    if w.owner_id != caller.id()
        && let Some(Some(allowed)) = s.store.grant_endpoints(&w.id, caller.id()).await?
    {
        let asked = super::watermarks::origin(&endpoint.url)
            .map_err(|m| ApiError::endpoint_refused(format!("endpoint.url: {m}")))?;
        if !allowed.contains(&asked) {
            return Err(ApiError::forbidden(format!(
                "endpoint.url: {asked} is not among the endpoints the publisher approved for this grant"
            )));
        }
    }
    let url = url::Url::parse(&endpoint.url)
        .map_err(|e| ApiError::endpoint_refused(format!("endpoint.url: {e}")))?;
    let policy = if s.cfg.allow_private_endpoints {
        AddressPolicy::AllowPrivate
    } else {
        AddressPolicy::PublicOnly
    };
    check_address(&url, policy)
        .await
        .map_err(|e| ApiError::endpoint_refused(format!("endpoint.url: {e}")))?;
    let config = VerifySettings {
        m: req.m,
        tau: req.tau,
        alpha: req.alpha,
        label_only: req.label_only.unwrap_or(false),
        sequential: req.sequential.unwrap_or(false),
        round: req.round,
        seed: req.seed,
        controls: req.controls,
        first_images: req.first_images,
        decoys: req.decoys,
        rate: req.rate,
        rank_effect: req.rank_effect,
        margin_effect: req.margin_effect,
        ask_twice: req.ask_twice,
    }
    .into_config()
    // With k triggers, each is verified at alpha / k (its controls follow that level).
    .and_then(|c| c.with(|f| f.alpha /= spend as f64))
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    if config.label_only {
        let mut e = endpoint;
        e.output = OutputKind::Labels;
        return queue(
            s,
            caller,
            (w.id, w.triggers, spend),
            holdout,
            VerifyPlan {
                endpoint: e,
                config,
            },
        )
        .await;
    }
    queue(
        s,
        caller,
        (w.id, w.triggers, spend),
        holdout,
        VerifyPlan { endpoint, config },
    )
    .await
}

async fn queue(
    s: AppState,
    caller: Caller,
    (watermark, triggers, spend): (String, i64, i64),
    holdout: String,
    plan: VerifyPlan,
) -> Result<(StatusCode, ApiJson<CreateVerificationResponse>), ApiError> {
    let request = serde_json::to_value(&plan).map_err(ApiError::internal)?;
    let created = s
        .store
        .create_verification(
            caller.id(),
            &watermark,
            &holdout,
            &request,
            (triggers, spend),
            s.cfg.job_max_attempts,
        )
        .await?;
    let Some((verification, job)) = created else {
        let left = triggers - s.store.spent_triggers(&watermark).await?;
        return Err(ApiError::triggers_spent(if left <= 0 {
            format!(
                "every one of the watermark's {triggers} triggers has been spent by a \
                 verification; a spent trigger was shown to its endpoint, so it is not used again"
            )
        } else {
            format!(
                "{left} of the watermark's {triggers} triggers are left unspent, fewer than the \
                 {spend} asked for; a spent trigger was shown to its endpoint, so it is not used \
                 again"
            )
        }));
    };
    s.wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(CreateVerificationResponse { verification, job }),
    ))
}

/// The verdict as anyone but the watermark's owner sees it: decisions, statistics and hashes,
/// nothing taken from the secret. An allow-list, so a field added to the verdict later stays
/// hidden until it is judged safe here. Removed: the target class (from the protocol) and the
/// hashes of the triggered images (with the benign image known, a hash is an oracle for guessed
/// triggers), in the trail and in the control's trail.
fn redact(mut v: VerificationInfo) -> VerificationInfo {
    v.verdict = v.verdict.map(|verdict| redact_verdict(&verdict));
    v
}

fn redact_verdict(verdict: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Map, Value};
    fn pick(from: &Value, keys: &[&str]) -> Map<String, Value> {
        keys.iter()
            .filter_map(|k| from.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect()
    }
    fn trail(pairs: Option<&Value>) -> Value {
        let keep = [
            "index",
            "label",
            "benign_sha256",
            "benign_response_sha256",
            "triggered_response_sha256",
            "difference",
        ];
        Value::Array(
            pairs
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|p| Value::Object(pick(p, &keep))).collect())
                .unwrap_or_default(),
        )
    }
    // A model tested with several triggers: its decision, and each trigger's verdict redacted.
    if let Some(each) = verdict.get("verdicts") {
        let mut out = pick(verdict, &["decision", "p_value", "alpha", "queries"]);
        out.insert(
            "verdicts".into(),
            Value::Array(
                each.as_array()
                    .map(|a| a.iter().map(redact_verdict).collect())
                    .unwrap_or_default(),
            ),
        );
        return Value::Object(out);
    }
    let mut out = pick(
        verdict,
        &[
            "decision",
            "reason",
            "commitment",
            "endpoint",
            "config",
            "primary",
            "secondary",
            "pairs",
            "queries",
            "decoys",
            "echoes",
            "withheld",
            "rank",
            "dispersion",
            "trigger",
        ],
    );
    if let Some(protocol) = verdict.get("protocol").and_then(Value::as_str) {
        out.insert(
            "protocol".into(),
            Value::String(protocol_without_target(protocol)),
        );
    }
    out.insert("trail".into(), trail(verdict.get("trail")));
    if let Some(control) = verdict.get("control") {
        let mut c = pick(control, &["kind", "result", "rejected"]);
        c.insert("trail".into(), trail(control.get("trail")));
        out.insert("control".into(), Value::Object(c));
    }
    Value::Object(out)
}

/// "targeted (target 3), probabilities" → "targeted, probabilities".
fn protocol_without_target(protocol: &str) -> String {
    match (protocol.find(" (target "), protocol.find(')')) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &protocol[..start], &protocol[end + 1..])
        }
        _ => protocol.to_string(),
    }
}

async fn shown(
    s: &AppState,
    caller: &Caller,
    v: VerificationInfo,
) -> Result<Option<VerificationInfo>, ApiError> {
    let wm_owner = s
        .store
        .get_watermark(&v.watermark_id)
        .await?
        .map(|w| w.owner_id)
        .unwrap_or_default();
    if wm_owner == caller.id() {
        Ok(Some(v))
    } else if owns(caller, &v.owner_id) {
        Ok(Some(redact(v)))
    } else {
        Ok(None)
    }
}

/// The caller's verifications (every one for an admin), oldest first.
#[utoipa::path(get, path = "/v1/verifications", tag = "verifications",
    responses((status = 200, body = Vec<VerificationInfo>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_verifications(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<Vec<VerificationInfo>>, ApiError> {
    let owner = (caller.role() != Role::Admin).then(|| caller.id().to_string());
    let mut out = Vec::new();
    for v in s.store.list_verifications(owner.as_deref()).await? {
        if let Some(v) = shown(&s, &caller, v).await? {
            out.push(v);
        }
    }
    Ok(ApiJson(out))
}

/// One verification with, once done, its verdict and audit trail.
#[utoipa::path(get, path = "/v1/verifications/{id}", tag = "verifications", params(("id" = String, Path)),
    responses((status = 200, body = VerificationInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_verification(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<VerificationInfo>, ApiError> {
    let v = s
        .store
        .get_verification(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("verification"))?;
    shown(&s, &caller, v)
        .await?
        .map(ApiJson)
        .ok_or_else(|| ApiError::not_found("verification"))
}

/// The verdict as a document for readers who are not statisticians: the decision in one
/// sentence, what it shows and does not, the settings, every test, plots and a digest of the
/// audit trail, with the sha256 of the verdict JSON the caller sees (an auditor's is redacted as
/// in `GET /v1/verifications/{id}`). The same document as `hallmark report`.
#[utoipa::path(get, path = "/v1/verifications/{id}/report", tag = "verifications",
    params(("id" = String, Path), ReportQuery),
    responses((status = 200, description = "the report",
            content((String = "text/html"), (String = "application/pdf"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn get_report(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    axum::extract::Query(q): axum::extract::Query<ReportQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let pdf = match q.format.as_deref() {
        None | Some("html") => false,
        Some("pdf") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "format: html or pdf, got {other:?}"
            )));
        }
    };
    let v = s
        .store
        .get_verification(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("verification"))?;
    let v = shown(&s, &caller, v)
        .await?
        .ok_or_else(|| ApiError::not_found("verification"))?;
    let verdict = v
        .verdict
        .as_ref()
        .ok_or_else(|| ApiError::conflict("the verification has no verdict yet"))?;
    let imported = s
        .store
        .get_watermark(&v.watermark_id)
        .await?
        .map(|w| w.created_at);
    let finished = s
        .store
        .get_job(&v.job_id)
        .await?
        .and_then(|j| j.finished_at);
    let ctx = crate::report::Context {
        verification_id: Some(v.id.clone()),
        finished_at: finished.map(crate::report::utc),
        record_imported_at: imported.map(crate::report::utc),
        json_link: Some(format!("/v1/verifications/{}", v.id)),
    };
    let csp = (
        axum::http::header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    );
    if pdf {
        let doc = crate::report::pdf(verdict, &ctx).map_err(ApiError::internal)?;
        return Ok((
            [
                (axum::http::header::CONTENT_TYPE, "application/pdf"),
                csp,
                (
                    axum::http::header::CONTENT_DISPOSITION,
                    "inline; filename=\"verification-report.pdf\"",
                ),
            ],
            doc,
        )
            .into_response());
    }
    let doc = crate::report::html(verdict, &ctx).map_err(ApiError::internal)?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            csp,
        ],
        doc,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redacted_verdict_keeps_statistics_and_drops_what_the_secret_gave() {
        let verdict = serde_json::json!({
            "decision": "used",
            "protocol": "targeted (target 3), probabilities, sequential",
            "commitment": "c0ffee",
            "primary": {"p_value": 1e-9},
            "control": {
                "kind": "patch",
                "trigger": {"patch": {"pattern": [255, 0, 255]}},
                "rejected": false,
                "trail": [{"index": 4, "triggered_sha256": "aa", "difference": 0.5}]
            },
            "trail": [{"index": 7, "benign_sha256": "bb", "triggered_sha256": "cc"}],
            "added_later": {"secret": [1, 2, 3]}
        });
        let shown = redact_verdict(&verdict);
        assert_eq!(shown["protocol"], "targeted, probabilities, sequential");
        assert_eq!(shown["decision"], "used");
        assert_eq!(shown["primary"]["p_value"], 1e-9);
        assert_eq!(shown["control"]["kind"], "patch");
        assert_eq!(shown["control"]["trail"][0]["difference"], 0.5);
        assert_eq!(shown["trail"][0]["benign_sha256"], "bb");
        let text = shown.to_string();
        for hidden in [
            "trigger",
            "pattern",
            "triggered_sha256",
            "added_later",
            "target 3",
        ] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
        assert_eq!(
            protocol_without_target("untargeted, labels"),
            "untargeted, labels"
        );
        // A model tested with two triggers: each trigger's verdict is redacted alike.
        let combined = serde_json::json!({"decision": "used", "p_value": 0.01, "alpha": 0.01,
            "queries": 700, "added_later": 1, "verdicts": [verdict.clone(), verdict]});
        let shown = redact_verdict(&combined);
        assert_eq!(shown["p_value"], 0.01);
        assert_eq!(shown["verdicts"][1]["trail"][0]["benign_sha256"], "bb");
        let text = shown.to_string();
        for hidden in ["pattern", "triggered_sha256", "added_later", "target 3"] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
    }
}
