//! The console's pages. Each one calls the JSON API's handler with the session's key and renders
//! what it answers; a form builds the same request body the API takes, so its checks and error
//! messages are the API's.

use std::collections::HashMap;

use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::FormRejection;
use axum::extract::{Multipart, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Form, PageError, Session, api_error_page, field, page_error, read_form};
use crate::http::error::{ApiJson, ApiPath};
use crate::http::{AppState, datasets, keys, verifications, watermarks};
use crate::report::{escape, utc};
use crate::store::{JobState, Role};
use crate::verify::Verdict;

/// The shipped family specs a publisher can pick from (their text is embedded).
const SHIPPED: &[(&str, &str)] = &[
    (
        "badnets-square-28x28-grey",
        include_str!("../../../watermark_specs/badnets-square-28x28-grey.toml"),
    ),
    (
        "badnets-square-32x32-rgb",
        include_str!("../../../watermark_specs/badnets-square-32x32-rgb.toml"),
    ),
    (
        "badnets-square-any-size",
        include_str!("../../../watermark_specs/badnets-square-any-size.toml"),
    ),
    (
        "blended-28x28-grey",
        include_str!("../../../watermark_specs/blended-28x28-grey.toml"),
    ),
    (
        "blended-any-size",
        include_str!("../../../watermark_specs/blended-any-size.toml"),
    ),
    (
        "ubw-p-28x28-grey",
        include_str!("../../../watermark_specs/ubw-p-28x28-grey.toml"),
    ),
    (
        "ubw-p-any-size",
        include_str!("../../../watermark_specs/ubw-p-any-size.toml"),
    ),
    (
        "batt-rotate-28x28-grey",
        include_str!("../../../watermark_specs/batt-rotate-28x28-grey.toml"),
    ),
    (
        "batt-rotate-any-size",
        include_str!("../../../watermark_specs/batt-rotate-any-size.toml"),
    ),
    (
        "wanet-28x28-grey",
        include_str!("../../../watermark_specs/wanet-28x28-grey.toml"),
    ),
];

type Page = Result<Response, PageError>;

/// An API answer, or its error as a page whose "back" link is `back`.
fn api<T>(r: Result<T, crate::http::ApiError>, back: &str) -> Result<T, PageError> {
    r.map_err(|e| api_error_page(e, back))
}

/// A request body built from form fields, read as the API reads its JSON.
fn request<T: DeserializeOwned>(body: Value, back: &str) -> Result<T, PageError> {
    serde_json::from_value(body)
        .map_err(|e| page_error(StatusCode::BAD_REQUEST, &e.to_string(), back))
}

/// An optional number field: absent when empty, an error page naming the field when not a number.
fn number<T: std::str::FromStr>(f: &Form, name: &str, back: &str) -> Result<Option<T>, PageError> {
    field(f, name)
        .map(|v| {
            v.parse::<T>().map_err(|_| {
                page_error(
                    StatusCode::BAD_REQUEST,
                    &format!("{name}: {v:?} is not a number"),
                    back,
                )
            })
        })
        .transpose()
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

// ---------------------------------------------------------------------------------------------
// Layout

fn head(title: &str, refresh: Option<u32>) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · hallmark</title><link rel=\"stylesheet\" href=\"/console/style.css\">{}</head>",
        escape(title),
        refresh
            .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
            .unwrap_or_default()
    )
}

/// A page without the signed-in navigation (sign-in, errors).
pub(super) fn bare(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "{}<body><header class=\"top\"><span class=\"brand\">hallmark</span></header>\
         <main id=\"main\"><h1>{}</h1>{body}</main></body></html>",
        head(title, None),
        escape(title)
    ))
}

fn csrf_input(session: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        session.csrf()
    )
}

/// A page with the navigation of the session's role; `current` is the nav entry it belongs to.
fn layout(
    session: &Session,
    title: &str,
    current: &str,
    body: &str,
    refresh: Option<u32>,
) -> Response {
    let key = &session.caller.0;
    let mut nav = vec![
        ("/", "Home"),
        ("/console/datasets", "Datasets"),
        ("/console/watermarks", "Watermarks"),
        ("/console/verifications", "Verifications"),
    ];
    if session.role() == Role::Admin {
        nav.push(("/console/keys", "Keys"));
    }
    let links: String = nav
        .iter()
        .map(|(href, text)| {
            let here = if *href == current {
                " aria-current=\"page\""
            } else {
                ""
            };
            format!("<li><a href=\"{href}\"{here}>{text}</a></li>")
        })
        .collect();
    Html(format!(
        "{}<body><a class=\"skip\" href=\"#main\">Skip to the content</a>\
         <header class=\"top\"><span class=\"brand\">hallmark</span>\
         <nav aria-label=\"Main\"><ul>{links}</ul></nav>\
         <div class=\"who\">Signed in as <strong>{}</strong> ({}) \
         <form method=\"post\" action=\"/console/sign-out\" class=\"inline\">{}\
         <button type=\"submit\">Sign out</button></form></div></header>\
         <main id=\"main\"><h1>{}</h1>{body}</main></body></html>",
        head(title, refresh),
        escape(&key.name),
        role_name(key.role),
        csrf_input(session),
        escape(title),
    ))
    .into_response()
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Admin => "admin",
        Role::Publisher => "publisher",
        Role::Auditor => "auditor",
    }
}

/// A labelled input; `hint` is tied to it with `aria-describedby`.
fn input(label: &str, name: &str, kind: &str, required: bool, value: &str, hint: &str) -> String {
    let id = format!("f-{name}");
    let hint_html = if hint.is_empty() {
        String::new()
    } else {
        format!("<small id=\"{id}-hint\">{hint}</small>")
    };
    let described = if hint.is_empty() {
        String::new()
    } else {
        format!(" aria-describedby=\"{id}-hint\"")
    };
    format!(
        "<div class=\"field\"><label for=\"{id}\">{}</label>\
         <input id=\"{id}\" name=\"{name}\" type=\"{kind}\" value=\"{}\"{}{described}>{hint_html}</div>",
        escape(label),
        escape(value),
        if required { " required" } else { "" },
    )
}

/// A labelled select of `(value, text)` options.
fn select(label: &str, name: &str, options: &[(String, String)], hint: &str) -> String {
    let id = format!("f-{name}");
    let opts: String = options
        .iter()
        .map(|(v, t)| format!("<option value=\"{}\">{}</option>", escape(v), escape(t)))
        .collect();
    let hint_html = if hint.is_empty() {
        String::new()
    } else {
        format!("<small id=\"{id}-hint\">{hint}</small>")
    };
    let described = if hint.is_empty() {
        String::new()
    } else {
        format!(" aria-describedby=\"{id}-hint\"")
    };
    format!(
        "<div class=\"field\"><label for=\"{id}\">{}</label>\
         <select id=\"{id}\" name=\"{name}\"{described}>{opts}</select>{hint_html}</div>",
        escape(label)
    )
}

fn checkbox(label: &str, name: &str, checked: bool, hint: &str) -> String {
    let id = format!("f-{name}");
    format!(
        "<div class=\"field check\"><input id=\"{id}\" name=\"{name}\" type=\"checkbox\" value=\"on\"{} \
         aria-describedby=\"{id}-hint\"><label for=\"{id}\">{}</label><small id=\"{id}-hint\">{hint}</small></div>",
        if checked { " checked" } else { "" },
        escape(label)
    )
}

/// Form controls with ids under `prefix` instead of `f`, for a second form on a page that asks
/// for the same fields (ids stay unique, so each label names its own control).
fn scoped(prefix: &str, html: String) -> String {
    html.replace("\"f-", &format!("\"{prefix}-"))
}

fn table(caption: &str, head: &[&str], rows: &[String], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=\"empty\">{}</p>", escape(empty));
    }
    let th: String = head
        .iter()
        .map(|h| format!("<th scope=\"col\">{h}</th>"))
        .collect();
    format!(
        "<table><caption>{}</caption><thead><tr>{th}</tr></thead><tbody>{}</tbody></table>",
        escape(caption),
        rows.concat()
    )
}

fn short(id: &str) -> String {
    escape(&id.chars().take(8).collect::<String>())
}

// ---------------------------------------------------------------------------------------------
// Sign-in and home

/// The sign-in form, with an error above it.
pub(super) fn sign_in_page(error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    bare(
        "Sign in",
        &format!(
            "{error}<p>Sign in with your API key (it starts with <code>hm_</code>). The console then \
             keeps a session cookie for 8 hours; signing out, or revoking the key, ends it.</p>\
             <form method=\"post\" action=\"/console/sign-in\">{}\
             <button type=\"submit\">Sign in</button></form>",
            input(
                "API key",
                "key",
                "password",
                true,
                "",
                "An administrator creates keys; the first one is in the service's data folder (admin.key)."
            )
        ),
    )
}

pub(super) async fn home(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Page {
    let Some(session) = super::session_of(&s, &headers).await? else {
        return Ok(sign_in_page(None).into_response());
    };
    let caller = session.caller();
    let datasets = api(
        datasets::list_datasets(State(s.clone()), caller.clone()).await,
        "/",
    )?
    .0;
    let wms = api(
        watermarks::list_watermarks(State(s.clone()), caller.clone()).await,
        "/",
    )?
    .0;
    let vs = api(
        verifications::list_verifications(State(s.clone()), caller.clone()).await,
        "/",
    )?
    .0;
    let role = match session.role() {
        Role::Publisher => {
            "As a <strong>publisher</strong> you register datasets, watermark releases with a \
             secret trigger, publish each release's commitment, grant auditors, and verify \
             suspicious models."
        }
        Role::Auditor => {
            "As an <strong>auditor</strong> you verify suspicious models against the watermarks \
             publishers granted you. You never see a trigger or which samples were poisoned."
        }
        Role::Admin => {
            "As an <strong>admin</strong> you create and revoke keys and see every dataset, \
             watermark and verification (never a secret)."
        }
    };
    let body = format!(
        "<p>{role}</p><p>Your key's id is <code id=\"key-id\">{}</code>{}.</p>\
         <ul class=\"counts\"><li><a href=\"/console/datasets\">{} datasets</a></li>\
         <li><a href=\"/console/watermarks\">{} watermarks</a></li>\
         <li><a href=\"/console/verifications\">{} verifications</a></li></ul>\
         <form method=\"post\" action=\"/console/sign-out\">{}\
         <input type=\"hidden\" name=\"everywhere\" value=\"on\">\
         <button type=\"submit\" class=\"secondary\">Sign out everywhere</button></form>",
        escape(caller.id()),
        if session.role() == Role::Auditor {
            ": give it to the publisher who grants you a watermark"
        } else {
            ""
        },
        datasets.len(),
        wms.len(),
        vs.len(),
        csrf_input(&session),
    );
    Ok(layout(&session, "Home", "/", &body, None))
}

// ---------------------------------------------------------------------------------------------
// Datasets

pub(super) async fn datasets(State(s): State<AppState>, session: Session) -> Page {
    let back = "/console/datasets";
    let list = api(
        datasets::list_datasets(State(s.clone()), session.caller()).await,
        back,
    )?
    .0;
    let rows: Vec<String> = list
        .iter()
        .map(|d| {
            format!(
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&d.name),
                escape(&d.id),
                escape(&format!("{:?}", d.format).to_lowercase()),
                d.count,
                escape(&d.shape),
                match (d.uploaded, d.streamed) {
                    (true, _) => "uploaded",
                    (false, true) => "registered, streamed",
                    (false, false) => "registered",
                },
                utc(d.created_at)
            )
        })
        .collect();
    let formats = [
        ("", "detect"),
        ("idx", "IDX (MNIST, Fashion-MNIST)"),
        ("cifar10", "CIFAR-10 binary"),
        ("cifar100", "CIFAR-100 binary"),
        ("folder", "image folder"),
        ("parquet", "Parquet (Hugging Face)"),
        ("webdataset", "WebDataset shards"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    let splits = [("", "–"), ("train", "train"), ("test", "test")]
        .map(|(a, b)| (a.to_string(), b.to_string()));
    let body = format!(
        "{}<section aria-labelledby=\"register\"><h2 id=\"register\">Register a dataset on the server</h2>\
         <form method=\"post\" action=\"/console/datasets\">{}{}{}{}{}{}<button type=\"submit\">Register</button></form></section>\
         <section aria-labelledby=\"upload\"><h2 id=\"upload\">Upload a dataset</h2>\
         <form method=\"post\" action=\"/console/datasets/upload?csrf={}\" enctype=\"multipart/form-data\">{}{}{}\
         <div class=\"field\"><label for=\"u-files\">Files</label><input id=\"u-files\" name=\"files\" type=\"file\" multiple required></div>\
         <button type=\"submit\">Upload</button></form></section>",
        table(
            "Your datasets",
            &[
                "Name",
                "Id",
                "Format",
                "Images",
                "Shape",
                "Source",
                "Added (UTC)"
            ],
            &rows,
            "No datasets yet."
        ),
        csrf_input(&session),
        input("Name", "name", "text", true, "", ""),
        input(
            "Path",
            "path",
            "text",
            true,
            "",
            "A folder or file below one of the server's dataset roots."
        ),
        select("Format", "format", &formats, ""),
        select("Split", "split", &splits, "Where the folder holds both."),
        checkbox(
            "Stream",
            "stream",
            false,
            "Parquet or WebDataset shards, or an image folder, of any size and mixed image sizes: \
             read shard by shard, never whole, and released by one job per shard."
        ),
        session.csrf(),
        scoped("u", input("Name", "name", "text", true, "", "")),
        scoped("u", select("Format", "format", &formats, "")),
        scoped("u", select("Split", "split", &splits, "")),
    );
    Ok(layout(
        &session,
        "Datasets",
        "/console/datasets",
        &body,
        None,
    ))
}

pub(super) async fn register_dataset(
    State(s): State<AppState>,
    session: Session,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Page {
    let back = "/console/datasets";
    let f = read_form(form)?;
    session.check_csrf(field(&f, "csrf"))?;
    let req = request(
        json!({
            "name": field(&f, "name").unwrap_or(""),
            "path": field(&f, "path").unwrap_or(""),
            "format": field(&f, "format"),
            "split": field(&f, "split"),
            "stream": field(&f, "stream").is_some(),
        }),
        back,
    )?;
    api(
        datasets::register_dataset(State(s), session.caller(), ApiJson(req)).await,
        back,
    )?;
    Ok(see_other(back))
}

pub(super) async fn upload_dataset(
    State(s): State<AppState>,
    session: Session,
    Query(q): Query<HashMap<String, String>>,
    form: Result<Multipart, MultipartRejection>,
) -> Page {
    let back = "/console/datasets";
    session.check_csrf(q.get("csrf").map(String::as_str))?;
    api(
        datasets::upload_dataset(State(s), session.caller(), form).await,
        back,
    )?;
    Ok(see_other(back))
}

// ---------------------------------------------------------------------------------------------
// Watermarks

/// A job's state in words; `done` names success (a release is "ready", a verification "done").
fn state_badge(state: JobState, done: &str) -> String {
    let (class, word) = match state {
        JobState::Succeeded => ("ready", done),
        other => (other.as_str(), other.as_str()),
    };
    format!("<span class=\"state {class}\">{word}</span>")
}

pub(super) async fn watermarks(State(s): State<AppState>, session: Session) -> Page {
    let back = "/console/watermarks";
    let list = api(
        watermarks::list_watermarks(State(s.clone()), session.caller()).await,
        back,
    )?
    .0;
    let rows: Vec<String> = list
        .iter()
        .map(|w| {
            let m = &w.watermark;
            format!(
                "<tr><td><a href=\"/console/watermarks/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&m.id),
                escape(&m.name),
                state_badge(w.state, "ready"),
                m.commitment
                    .as_deref()
                    .map(|c| format!("<code>{}…</code>", short(c)))
                    .unwrap_or_else(|| "–".into()),
                m.triggers,
                utc(m.created_at)
            )
        })
        .collect();
    let mut body = table(
        if session.role() == Role::Auditor {
            "Watermarks granted to you"
        } else {
            "Watermarks"
        },
        &["Name", "State", "Commitment", "Triggers", "Created (UTC)"],
        &rows,
        "No watermarks yet.",
    );
    if session.role() == Role::Publisher {
        let own = api(
            datasets::list_datasets(State(s.clone()), session.caller()).await,
            back,
        )?
        .0;
        let ds: Vec<(String, String)> = own
            .iter()
            .map(|d| (d.id.clone(), format!("{} ({} images)", d.name, d.count)))
            .collect();
        let mut holdout = vec![(String::new(), "none".to_string())];
        holdout.extend(ds.iter().cloned());
        let mut specs = vec![(String::new(), "– (paste one below)".to_string())];
        specs.extend(SHIPPED.iter().map(|(n, _)| (n.to_string(), n.to_string())));
        body.push_str(&format!(
            "<section aria-labelledby=\"create\"><h2 id=\"create\">Watermark a release</h2>\
             <p>Each release draws its own secret trigger from the spec's family; only the \
             commitment is public.</p>\
             <form method=\"post\" action=\"/console/watermarks\">{}{}{}{}{}\
             <div class=\"field\"><label for=\"f-spec_text\">Or paste a spec (TOML)</label>\
             <textarea id=\"f-spec_text\" name=\"spec_text\" rows=\"8\" aria-describedby=\"f-spec_text-hint\"></textarea>\
             <small id=\"f-spec_text-hint\">Used instead of the shipped spec when given. Pattern images must be inline.</small></div>\
             {}{}{}<button type=\"submit\">Watermark</button></form></section>",
            csrf_input(&session),
            input("Name", "name", "text", true, "", ""),
            select("Dataset", "dataset_id", &ds, "The release to watermark."),
            select(
                "Held-out images",
                "holdout_dataset_id",
                &holdout,
                "Benign images verifications use by default."
            ),
            select("Shipped spec", "spec", &specs, ""),
            input(
                "Poisoning rate",
                "rate",
                "text",
                false,
                "",
                "Overrides the spec's rate (for example 0.1)."
            ),
            input(
                "Triggers",
                "triggers",
                "number",
                false,
                "1",
                "Independent secret triggers (1 to 16): each verification spends one."
            ),
            checkbox(
                "Publish a public trigger",
                "public_trigger",
                false,
                "Only for fixed or low-entropy specs; their verdicts can say at most inconclusive."
            ),
        ));
        body.push_str(&scoped(
            "i",
            format!(
            "<section aria-labelledby=\"import\"><h2 id=\"import\">Import a secret record</h2>\
             <p>A release watermarked offline with <code>hallmark watermark</code>: its secret \
             record is sealed on the server and never shown again.</p>\
             <form method=\"post\" action=\"/console/watermarks/import?csrf={}\" enctype=\"multipart/form-data\">{}{}\
             <div class=\"field\"><label for=\"f-record\">Secret record (JSON)</label>\
             <input id=\"f-record\" name=\"record\" type=\"file\" accept=\".json,application/json\" required></div>\
             <button type=\"submit\">Import</button></form></section>",
            session.csrf(),
            input("Name", "name", "text", true, "", ""),
            select(
                "Held-out images",
                "holdout_dataset_id",
                &holdout,
                "Benign images verifications use by default."
            ),
        ),
        ));
    }
    Ok(layout(
        &session,
        "Watermarks",
        "/console/watermarks",
        &body,
        None,
    ))
}

pub(super) async fn create_watermark(
    State(s): State<AppState>,
    session: Session,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Page {
    let back = "/console/watermarks";
    let f = read_form(form)?;
    session.check_csrf(field(&f, "csrf"))?;
    let spec = match (field(&f, "spec_text"), field(&f, "spec")) {
        (Some(text), _) => text.to_string(),
        (None, Some(name)) => SHIPPED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.to_string())
            .ok_or_else(|| {
                page_error(
                    StatusCode::BAD_REQUEST,
                    &format!("spec: no shipped spec is called {name:?}"),
                    back,
                )
            })?,
        (None, None) => {
            return Err(page_error(
                StatusCode::BAD_REQUEST,
                "spec: pick a shipped spec or paste one",
                back,
            ));
        }
    };
    let req = request(
        json!({
            "name": field(&f, "name").unwrap_or(""),
            "dataset_id": field(&f, "dataset_id").unwrap_or(""),
            "holdout_dataset_id": field(&f, "holdout_dataset_id"),
            "spec": spec,
            "rate": number::<f64>(&f, "rate", back)?,
            "triggers": number::<u32>(&f, "triggers", back)?,
            "public_trigger": field(&f, "public_trigger").is_some(),
        }),
        back,
    )?;
    let (_, created) = api(
        watermarks::create_watermark(State(s), session.caller(), ApiJson(req)).await,
        back,
    )?;
    Ok(see_other(&format!(
        "/console/watermarks/{}",
        created.0.watermark.id
    )))
}

pub(super) async fn import_watermark(
    State(s): State<AppState>,
    session: Session,
    Query(q): Query<HashMap<String, String>>,
    form: Result<Multipart, MultipartRejection>,
) -> Page {
    let back = "/console/watermarks";
    session.check_csrf(q.get("csrf").map(String::as_str))?;
    let bad = |m: String| page_error(StatusCode::BAD_REQUEST, &m, back);
    let mut form =
        form.map_err(|e| bad(format!("the form could not be read: {}", e.body_text())))?;
    let (mut name, mut holdout, mut record) = (String::new(), String::new(), None);
    while let Some(f) = form
        .next_field()
        .await
        .map_err(|e| bad(format!("the form could not be read: {}", e.body_text())))?
    {
        let field_name = f.name().unwrap_or("").to_string();
        let bytes = f
            .bytes()
            .await
            .map_err(|e| bad(format!("{field_name}: {}", e.body_text())))?;
        match field_name.as_str() {
            "name" => name = String::from_utf8_lossy(&bytes).trim().to_string(),
            "holdout_dataset_id" => holdout = String::from_utf8_lossy(&bytes).trim().to_string(),
            "record" => {
                record = Some(
                    serde_json::from_slice::<Value>(&bytes)
                        .map_err(|e| bad(format!("record: not JSON ({e})")))?,
                )
            }
            _ => {}
        }
    }
    let record = record.ok_or_else(|| bad("record: choose the secret record's file".into()))?;
    let req = request(
        json!({
            "name": name,
            "holdout_dataset_id": (!holdout.is_empty()).then_some(holdout),
            "secret_record": record,
        }),
        back,
    )?;
    let (_, w) = api(
        watermarks::import_watermark(State(s), session.caller(), ApiJson(req)).await,
        back,
    )?;
    Ok(see_other(&format!(
        "/console/watermarks/{}",
        w.0.watermark.id
    )))
}

pub(super) async fn watermark(
    State(s): State<AppState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Page {
    let back = "/console/watermarks";
    let w = api(
        watermarks::get_watermark(State(s.clone()), session.caller(), ApiPath(id.clone())).await,
        back,
    )?
    .0;
    let m = &w.watermark;
    let here = format!("/console/watermarks/{}", m.id);
    let owner = m.owner_id == session.caller.id();
    let working = matches!(w.state, JobState::Queued | JobState::Running);
    let mut body = String::new();
    if working && let Some(job) = &m.job_id {
        let job = api(s.store.get_job(job).await.map_err(Into::into), back)?;
        if let Some(j) = job {
            body.push_str(&progress(
                j.progress_done,
                j.progress_total,
                "Writing the release",
            ));
        }
    }
    body.push_str(&format!(
        "<dl><dt>State</dt><dd>{}</dd><dt>Id</dt><dd><code>{}</code></dd>\
         <dt>Created (UTC)</dt><dd>{}</dd><dt>Triggers</dt><dd>{} ({} spent)</dd>\
         <dt>Poisoned samples</dt><dd>{}</dd><dt>Release sha256</dt><dd><code>{}</code></dd></dl>",
        state_badge(w.state, "ready"),
        escape(&m.id),
        utc(m.created_at),
        m.triggers,
        w.triggers_spent,
        m.poisoned
            .map(|p| p.to_string())
            .unwrap_or_else(|| "–".into()),
        m.dataset_sha256
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "–".into()),
    ));
    if let Some(c) = &m.commitment {
        body.push_str(&format!(
            "<div class=\"field\"><label for=\"commitment\">Commitment</label>\
             <input id=\"commitment\" readonly value=\"{}\" aria-describedby=\"commitment-hint\">\
             <small id=\"commitment-hint\">The sha256 of the secret record: publish it with the \
             release, so a later verdict can be tied to this release.</small></div>",
            escape(c)
        ));
    }
    if session.role() != Role::Admin && m.commitment.is_some() {
        body.push_str(&format!(
            "<p><a class=\"button\" href=\"/console/verifications?watermark={}\">Verify a model with this watermark</a></p>",
            escape(&m.id)
        ));
    }
    if owner {
        let grants = api(
            watermarks::list_grants(State(s.clone()), session.caller(), ApiPath(m.id.clone()))
                .await,
            &here,
        )?
        .0;
        let rows: Vec<String> = grants
            .iter()
            .map(|a| {
                format!(
                    "<tr><td><code>{}</code></td><td><form method=\"post\" action=\"{}/grants/{}/revoke\" class=\"inline\">{}\
                     <button type=\"submit\" class=\"secondary\" aria-label=\"Withdraw the grant of {}\">Withdraw</button></form></td></tr>",
                    escape(a),
                    escape(&here),
                    escape(a),
                    csrf_input(&session),
                    escape(a)
                )
            })
            .collect();
        body.push_str(&format!(
            "<section aria-labelledby=\"grants\"><h2 id=\"grants\">Auditors</h2>{}\
             <form method=\"post\" action=\"{}/grants\">{}{}\
             <div class=\"field\"><label for=\"f-endpoints\">Model endpoints (optional)</label>\
             <textarea id=\"f-endpoints\" name=\"endpoints\" rows=\"3\" aria-describedby=\"f-endpoints-hint\"></textarea>\
             <small id=\"f-endpoints-hint\">One origin per line (<code>https://host:port</code>): the auditor may send the trigger only there.</small></div>\
             <button type=\"submit\">Grant</button></form></section>",
            table(
                "Auditors granted this watermark",
                &["Auditor key id", ""],
                &rows,
                "No auditor is granted this watermark."
            ),
            escape(&here),
            csrf_input(&session),
            input(
                "Auditor's key id",
                "auditor_id",
                "text",
                true,
                "",
                "The auditor finds it on its console home page."
            ),
        ));
    }
    Ok(layout(
        &session,
        &format!("Watermark {}", m.name),
        "/console/watermarks",
        &body,
        working.then_some(2),
    ))
}

fn progress(done: i64, total: i64, what: &str) -> String {
    if total > 0 {
        format!(
            "<p class=\"progress\">{what}: <progress max=\"{total}\" value=\"{done}\">{done} of {total}</progress> \
             {done} of {total}. This page refreshes itself every 2 seconds.</p>"
        )
    } else {
        format!(
            "<p class=\"progress\">{what}: starting. This page refreshes itself every 2 seconds.</p>"
        )
    }
}

pub(super) async fn grant(
    State(s): State<AppState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Page {
    let back = format!("/console/watermarks/{id}");
    let f = read_form(form)?;
    session.check_csrf(field(&f, "csrf"))?;
    let endpoints: Vec<&str> = field(&f, "endpoints")
        .map(|e| e.lines().map(str::trim).filter(|l| !l.is_empty()).collect())
        .unwrap_or_default();
    let req = request(
        json!({
            "auditor_id": field(&f, "auditor_id").unwrap_or(""),
            "endpoints": (!endpoints.is_empty()).then_some(endpoints),
        }),
        &back,
    )?;
    api(
        watermarks::grant(State(s), session.caller(), ApiPath(id), ApiJson(req)).await,
        &back,
    )?;
    Ok(see_other(&back))
}

pub(super) async fn revoke_grant(
    State(s): State<AppState>,
    session: Session,
    axum::extract::Path((id, auditor)): axum::extract::Path<(String, String)>,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Page {
    let back = format!("/console/watermarks/{id}");
    let f = read_form(form)?;
    session.check_csrf(field(&f, "csrf"))?;
    api(
        watermarks::revoke_grant(State(s), session.caller(), ApiPath((id, auditor))).await,
        &back,
    )?;
    Ok(see_other(&back))
}

// ---------------------------------------------------------------------------------------------
// Verifications

pub(super) async fn verifications(
    State(s): State<AppState>,
    session: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Page {
    let back = "/console/verifications";
    let list = api(
        verifications::list_verifications(State(s.clone()), session.caller()).await,
        back,
    )?
    .0;
    let wms = api(
        watermarks::list_watermarks(State(s.clone()), session.caller()).await,
        back,
    )?
    .0;
    let names: HashMap<&str, &str> = wms
        .iter()
        .map(|w| (w.watermark.id.as_str(), w.watermark.name.as_str()))
        .collect();
    let rows: Vec<String> = list
        .iter()
        .rev()
        .map(|v| {
            format!(
                "<tr><td><a href=\"/console/verifications/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&v.id),
                utc(v.created_at),
                escape(names.get(v.watermark_id.as_str()).copied().unwrap_or(v.watermark_id.as_str())),
                v.decision
                    .map(decision_badge)
                    .unwrap_or_else(|| "<span class=\"state running\">pending</span>".into()),
                v.p_value.map(|p| format!("{p:.2e}")).unwrap_or_else(|| "–".into()),
            )
        })
        .collect();
    let mut body = table(
        "Verifications, newest first",
        &["Started (UTC)", "Watermark", "Decision", "p-value"],
        &rows,
        "No verifications yet.",
    );
    if matches!(session.role(), Role::Publisher | Role::Auditor) {
        let chosen = q.get("watermark").map(String::as_str);
        let mut ready: Vec<(String, String)> = wms
            .iter()
            .filter(|w| w.watermark.commitment.is_some())
            .filter(|w| {
                session.role() == Role::Auditor || w.watermark.owner_id == session.caller.id()
            })
            .map(|w| (w.watermark.id.clone(), w.watermark.name.clone()))
            .collect();
        if let Some(c) = chosen
            && let Some(i) = ready.iter().position(|(id, _)| id == c)
        {
            let first = ready.remove(i);
            ready.insert(0, first);
        }
        let own = api(
            datasets::list_datasets(State(s.clone()), session.caller()).await,
            back,
        )?
        .0;
        let mut holdout = vec![(String::new(), "the watermark's held-out set".to_string())];
        holdout.extend(own.iter().map(|d| (d.id.clone(), d.name.clone())));
        let protocols = [
            (
                "v2",
                "Open Inference Protocol V2 (Triton, KServe V2, MLServer)",
            ),
            ("kserve-v1", "KServe V1"),
            ("torchserve", "TorchServe"),
            ("tfserving", "TensorFlow Serving"),
            ("json", "JSON (one URL)"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()));
        body.push_str(&format!(
            "<section aria-labelledby=\"start\"><h2 id=\"start\">Verify a model</h2>\
             <form method=\"post\" action=\"/console/verifications\">{}{}{}{}{}{}{}{}{}{}{}\
             <button type=\"submit\">Start the verification</button></form></section>",
            csrf_input(&session),
            select("Watermark", "watermark_id", &ready, ""),
            input(
                "Model server URL",
                "url",
                "url",
                true,
                "",
                "The suspect model's server, for example http://host:8000."
            ),
            select("Protocol", "protocol", &protocols, ""),
            input(
                "Model name",
                "model",
                "text",
                false,
                "",
                "Not used by JSON."
            ),
            select("Benign images", "holdout_dataset_id", &holdout, ""),
            checkbox(
                "Sequential",
                "sequential",
                true,
                "Stop as soon as the evidence is decisive (fewer queries)."
            ),
            checkbox(
                "Labels only",
                "label_only",
                false,
                "For servers that answer only the predicted class."
            ),
            input("Significance level", "alpha", "text", false, "0.01", ""),
            input("Margin (tau)", "tau", "text", false, "0.2", ""),
            input(
                "Triggers",
                "triggers",
                "number",
                false,
                "1",
                "How many of the release's unspent triggers test this model together, each at \
                 the significance level divided by their number (a release with triggers of \
                 several families)."
            ),
        ));
    }
    Ok(layout(
        &session,
        "Verifications",
        "/console/verifications",
        &body,
        None,
    ))
}

fn decision_badge(d: crate::verify::Decision) -> String {
    use crate::verify::Decision;
    let (class, word) = match d {
        Decision::Used => ("used", "used"),
        Decision::NotShown => ("not_shown", "not shown"),
        Decision::Inconclusive => ("inconclusive", "inconclusive"),
    };
    format!("<span class=\"decision {class}\">{word}</span>")
}

/// A verdict's decision, its sentence and what follows it on the page: what it shows and what
/// not, or, for a model tested with several triggers, each trigger's decision and sentence.
fn verdict_summary(
    verdict: &serde_json::Value,
) -> Result<(crate::verify::Decision, String, String), serde_json::Error> {
    let li = |xs: &[String]| {
        xs.iter()
            .map(|x| format!("<li>{x}</li>"))
            .collect::<String>()
    };
    if verdict.get("verdicts").is_some() {
        let c = serde_json::from_value::<crate::verify::CombinedVerdict>(verdict.clone())?;
        let each: Vec<String> = c
            .verdicts
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "Trigger {}: {} {}",
                    v.trigger.as_ref().map_or(i + 1, |t| t.number),
                    decision_badge(v.decision),
                    crate::report::headline(v)
                )
            })
            .collect();
        return Ok((
            c.decision,
            crate::report::combined_headline(&c),
            format!("<h3>Each trigger</h3><ul>{}</ul>", li(&each)),
        ));
    }
    let parsed = serde_json::from_value::<Verdict>(verdict.clone())?;
    let (proves, not) = crate::report::meaning(&parsed);
    Ok((
        parsed.decision,
        crate::report::headline(&parsed),
        format!(
            "<h3>What it shows</h3><ul>{}</ul><h3>What it does not show</h3><ul>{}</ul>",
            li(&proves),
            li(&not)
        ),
    ))
}

pub(super) async fn create_verification(
    State(s): State<AppState>,
    session: Session,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Page {
    let back = "/console/verifications";
    let f = read_form(form)?;
    session.check_csrf(field(&f, "csrf"))?;
    let req = request(
        json!({
            "watermark_id": field(&f, "watermark_id").unwrap_or(""),
            "holdout_dataset_id": field(&f, "holdout_dataset_id"),
            "endpoint": {
                "url": field(&f, "url").unwrap_or(""),
                "protocol": field(&f, "protocol").unwrap_or("v2"),
                "model": field(&f, "model").unwrap_or(""),
            },
            "sequential": field(&f, "sequential").is_some(),
            "label_only": field(&f, "label_only").is_some(),
            "alpha": number::<f64>(&f, "alpha", back)?,
            "tau": number::<f64>(&f, "tau", back)?,
            "triggers": number::<u32>(&f, "triggers", back)?,
        }),
        back,
    )?;
    let (_, created) = api(
        verifications::create_verification(State(s), session.caller(), ApiJson(req)).await,
        back,
    )?;
    Ok(see_other(&format!(
        "/console/verifications/{}",
        created.0.verification.id
    )))
}

pub(super) async fn verification(
    State(s): State<AppState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Page {
    let back = "/console/verifications";
    let v = api(
        verifications::get_verification(State(s.clone()), session.caller(), ApiPath(id)).await,
        back,
    )?
    .0;
    let job = api(s.store.get_job(&v.job_id).await.map_err(Into::into), back)?;
    let wm_name = watermarks::get_watermark(
        State(s.clone()),
        session.caller(),
        ApiPath(v.watermark_id.clone()),
    )
    .await
    .map(|w| w.0.watermark.name)
    .unwrap_or_else(|_| v.watermark_id.clone());
    let working = v.verdict.is_none()
        && job
            .as_ref()
            .is_some_and(|j| matches!(j.state, JobState::Queued | JobState::Running));
    let endpoint = &v.request["endpoint"];
    let mut body = String::new();
    if working && let Some(j) = &job {
        body.push_str(&progress(
            j.progress_done,
            j.progress_total,
            "Querying the model",
        ));
    }
    if let Some(j) = &job
        && let (JobState::Failed | JobState::Cancelled, Some(e)) = (j.state, &j.error)
    {
        body.push_str(&format!(
            "<p class=\"error\" role=\"alert\">The verification {}: {}</p>",
            j.state.as_str(),
            escape(e)
        ));
    }
    if let Some(verdict) = &v.verdict {
        match verdict_summary(verdict) {
            Ok((decision, headline, details)) => {
                body.push_str(&format!(
                    "<section aria-labelledby=\"verdict\" class=\"verdict\"><h2 id=\"verdict\">Verdict: {}</h2>\
                     <p class=\"headline\">{}</p>{}\
                     <p><a class=\"button\" href=\"/console/verifications/{id}/report\">Open the report</a> \
                     <a href=\"/console/verifications/{id}/report?format=pdf\">the report as PDF</a> · \
                     <a href=\"/console/verifications/{id}/verdict.json\">the verdict as JSON</a> (every query's hashes)</p></section>",
                    decision_badge(decision),
                    headline,
                    details,
                    id = escape(&v.id),
                ));
            }
            Err(e) => body.push_str(&format!(
                "<p class=\"error\">The verdict could not be read: {}</p>",
                escape(&e.to_string())
            )),
        }
    }
    body.push_str(&format!(
        "<h2>Settings</h2><dl><dt>Id</dt><dd><code>{}</code></dd><dt>Started (UTC)</dt><dd>{}</dd>\
         <dt>Watermark</dt><dd><a href=\"/console/watermarks/{}\">{}</a></dd>\
         <dt>Model server</dt><dd><code>{}</code> ({}{})</dd><dt>State</dt><dd>{}</dd></dl>",
        escape(&v.id),
        utc(v.created_at),
        escape(&v.watermark_id),
        escape(&wm_name),
        escape(endpoint["url"].as_str().unwrap_or("")),
        escape(endpoint["protocol"].as_str().unwrap_or("")),
        endpoint["model"]
            .as_str()
            .filter(|m| !m.is_empty())
            .map(|m| format!(", model {}", escape(m)))
            .unwrap_or_default(),
        job.as_ref()
            .map(|j| state_badge(j.state, "done"))
            .unwrap_or_else(|| "–".into()),
    ));
    let title = format!(
        "Verification of {} for {wm_name}",
        endpoint["model"]
            .as_str()
            .filter(|m| !m.is_empty())
            .unwrap_or("a model")
    );
    Ok(layout(
        &session,
        &title,
        "/console/verifications",
        &body,
        working.then_some(2),
    ))
}

pub(super) async fn report(
    State(s): State<AppState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<verifications::ReportQuery>,
) -> Page {
    let back = format!("/console/verifications/{id}");
    api(
        verifications::get_report(State(s), session.caller(), ApiPath(id), Query(q)).await,
        &back,
    )
}

pub(super) async fn verdict_json(
    State(s): State<AppState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Page {
    let back = format!("/console/verifications/{id}");
    let v = api(
        verifications::get_verification(State(s), session.caller(), ApiPath(id.clone())).await,
        &back,
    )?;
    Ok((
        [(
            axum::http::header::CONTENT_DISPOSITION,
            format!(
                "inline; filename=\"verification-{}.json\"",
                id.replace('"', "")
            ),
        )],
        v,
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// Keys (admin)

pub(super) async fn keys(State(s): State<AppState>, session: Session) -> Page {
    keys_page(s, session, None).await
}

async fn keys_page(s: AppState, session: Session, created: Option<(String, String)>) -> Page {
    let back = "/";
    let list = api(keys::list_keys(State(s), session.caller()).await, back)?.0;
    let rows: Vec<String> = list
        .iter()
        .map(|k| {
            let action = if k.revoked_at.is_some() {
                format!("revoked {}", utc(k.revoked_at.unwrap_or(0)))
            } else if k.id == session.caller.id() {
                "this session's key".to_string()
            } else {
                format!(
                    "<form method=\"post\" action=\"/console/keys/{}/revoke\" class=\"inline\">{}\
                     <button type=\"submit\" class=\"secondary\" aria-label=\"Revoke the key of {}\">Revoke</button></form>",
                    escape(&k.id),
                    csrf_input(&session),
                    escape(&k.name)
                )
            };
            format!(
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{action}</td></tr>",
                escape(&k.name),
                role_name(k.role),
                escape(&k.id),
                utc(k.created_at)
            )
        })
        .collect();
    let new_key = created
        .map(|(name, secret)| {
            format!(
                "<div class=\"notice\" role=\"status\"><p>The key for <strong>{}</strong> is shown \
                 this once; it is not stored. Hand it over safely.</p>\
                 <div class=\"field\"><label for=\"new-key\">New key</label>\
                 <input id=\"new-key\" readonly value=\"{}\"></div></div>",
                escape(&name),
                escape(&secret)
            )
        })
        .unwrap_or_default();
    let roles = [
        ("publisher", "publisher"),
        ("auditor", "auditor"),
        ("admin", "admin"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    let body = format!(
        "{new_key}{}<section aria-labelledby=\"create\"><h2 id=\"create\">Create a key</h2>\
         <form method=\"post\" action=\"/console/keys\">{}{}{}<button type=\"submit\">Create</button></form></section>",
        table(
            "API keys",
            &["Holder", "Role", "Id", "Created (UTC)", ""],
            &rows,
            "No keys."
        ),
        csrf_input(&session),
        input("Holder", "name", "text", true, "", "Who will hold the key."),
        select("Role", "role", &roles, ""),
    );
    Ok(layout(&session, "Keys", "/console/keys", &body, None))
}

pub(super) async fn create_key(
    State(s): State<AppState>,
    session: Session,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Page {
    let back = "/console/keys";
    let f = read_form(form)?;
    session.check_csrf(field(&f, "csrf"))?;
    let req = request(
        json!({
            "name": field(&f, "name").unwrap_or(""),
            "role": field(&f, "role").unwrap_or(""),
        }),
        back,
    )?;
    let (_, created) = api(
        keys::create_key(State(s.clone()), session.caller(), ApiJson(req)).await,
        back,
    )?;
    let created = created.0;
    let r = keys_page(s, session, Some((created.key.name, created.secret))).await?;
    Ok((StatusCode::CREATED, r).into_response())
}

pub(super) async fn revoke_key(
    State(s): State<AppState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Page {
    let back = "/console/keys";
    let f = read_form(form)?;
    session.check_csrf(field(&f, "csrf"))?;
    api(
        keys::revoke_key(State(s), session.caller(), ApiPath(id)).await,
        back,
    )?;
    Ok(see_other(back))
}
