//! The web console at `/`: server-rendered pages for the people behind the API keys.
//!
//! A person signs in with an API key; the console then keeps a random session token in a cookie
//! (HttpOnly, SameSite=Strict; only its hash is stored, and revoking the key ends its sessions).
//! Every page calls the same handlers as the JSON API with the session's key, so a page shows
//! exactly what the API would answer that key and refuses what it would refuse: an auditor never
//! sees a secret. Forms post with a per-session CSRF token (and a foreign `Origin` is refused);
//! pages carry no script at all, a page of running work refreshes itself with a meta refresh, and
//! the stylesheet is embedded in the binary.

mod pages;

use std::collections::HashMap;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};

use super::{AppState, Caller};
use crate::report::escape;
use crate::store::Role;

/// The session cookie's name.
pub const COOKIE: &str = "hallmark_session";
/// How long a session lasts: 8 hours.
const SESSION_MS: i64 = 8 * 3600 * 1000;

/// The console's pages and form targets.
pub(super) fn router(cfg: &crate::config::ServeConfig) -> Router<AppState> {
    Router::new()
        .route("/", get(pages::home))
        .route("/console/style.css", get(style))
        .route("/console/sign-in", post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route(
            "/console/datasets",
            get(pages::datasets).post(pages::register_dataset),
        )
        .route(
            "/console/datasets/upload",
            post(pages::upload_dataset).layer(DefaultBodyLimit::max(cfg.upload_limit)),
        )
        .route(
            "/console/watermarks",
            get(pages::watermarks).post(pages::create_watermark),
        )
        .route("/console/watermarks/import", post(pages::import_watermark))
        .route("/console/watermarks/{id}", get(pages::watermark))
        .route("/console/watermarks/{id}/grants", post(pages::grant))
        .route(
            "/console/watermarks/{id}/grants/{auditor}/revoke",
            post(pages::revoke_grant),
        )
        .route(
            "/console/verifications",
            get(pages::verifications).post(pages::create_verification),
        )
        .route("/console/verifications/{id}", get(pages::verification))
        .route("/console/verifications/{id}/report", get(pages::report))
        .route(
            "/console/verifications/{id}/verdict.json",
            get(pages::verdict_json),
        )
        .route("/console/keys", get(pages::keys).post(pages::create_key))
        .route("/console/keys/{id}/revoke", post(pages::revoke_key))
        .layer(axum::middleware::from_fn(headers))
}

/// Security headers on every console answer (a handler's own `Content-Security-Policy`, the
/// report's, is kept).
async fn headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, name: HeaderName, value: &'static str| {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // Not `no-referrer`: with it a browser sends `Origin: null` on form posts, which the origin check
    // refuses.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::CACHE_CONTROL, "no-store");
    r
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("style.css"),
    )
        .into_response()
}

/// A signed-in browser: the key behind its session and the session token.
pub(super) struct Session {
    caller: Caller,
    token: String,
}

impl Session {
    /// The key, as the API's handlers take it.
    pub(super) fn caller(&self) -> Caller {
        self.caller.clone()
    }
    fn role(&self) -> Role {
        self.caller.role()
    }
    /// The session's CSRF token: derived from the session token, so it needs no storage and
    /// dies with the session.
    fn csrf(&self) -> String {
        csrf_of(&self.token)
    }
    /// Fails unless `token` is this session's CSRF token.
    fn check_csrf(&self, token: Option<&str>) -> Result<(), PageError> {
        let want = self.csrf();
        match token {
            Some(t) if constant_time_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
            _ => Err(page_error(
                StatusCode::FORBIDDEN,
                "This form has expired or did not come from this console. Go back, reload the \
                 page and send it again.",
                "/",
            )),
        }
    }
}

fn csrf_of(token: &str) -> String {
    hex::encode(Sha256::digest(format!("hallmark console csrf\0{token}")))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session token a request's cookies carry.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The session of a request, if it has a live one.
async fn session_of(s: &AppState, headers: &HeaderMap) -> Result<Option<Session>, PageError> {
    let Some(token) = cookie_token(headers) else {
        return Ok(None);
    };
    let key = s
        .store
        .session_key(&token)
        .await
        .map_err(|e| api_error_page(super::ApiError::from(e), "/"))?;
    match key {
        Some(key) => {
            s.limiter
                .check(&key.id)
                .map_err(|e| api_error_page(e, "/"))?;
            Ok(Some(Session {
                caller: Caller(key),
                token,
            }))
        }
        None => Ok(None),
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = PageError;

    /// A page that needs a session sends a browser without one to the sign-in page.
    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, PageError> {
        check_origin(&parts.method, &parts.headers)?;
        match session_of(s, &parts.headers).await? {
            Some(session) => Ok(session),
            None => Err(PageError::SignIn),
        }
    }
}

/// Refuses a form posted from another site: when a browser sends `Origin`, its host must be the
/// console's own.
fn check_origin(method: &Method, headers: &HeaderMap) -> Result<(), PageError> {
    if method != Method::POST {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (None, _) => Ok(()),
        (Some(o), Some(h))
            if o.split_once("://")
                .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(h)) =>
        {
            Ok(())
        }
        _ => Err(page_error(
            StatusCode::FORBIDDEN,
            "This form was posted from another site.",
            "/",
        )),
    }
}

/// A form's fields.
pub(super) type Form = HashMap<String, String>;

/// A trimmed, non-empty field.
fn field<'a>(f: &'a Form, name: &str) -> Option<&'a str> {
    f.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
}

async fn sign_in(
    State(s): State<AppState>,
    headers: HeaderMap,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Result<Response, PageError> {
    check_origin(&Method::POST, &headers)?;
    let form = read_form(form)?;
    let key = field(&form, "key").unwrap_or("");
    let found = if key.len() <= 256 {
        s.store
            .authenticate(key)
            .await
            .map_err(|e| api_error_page(super::ApiError::from(e), "/"))?
    } else {
        None
    };
    let Some(key) = found else {
        return Ok((
            StatusCode::UNAUTHORIZED,
            pages::sign_in_page(Some("That key is unknown or was revoked.")),
        )
            .into_response());
    };
    let token = s
        .store
        .create_session(&key.id, SESSION_MS)
        .await
        .map_err(|e| api_error_page(super::ApiError::from(e), "/"))?;
    tracing::info!(key = %key.id, "console sign-in");
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_MS / 1000
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
}

async fn sign_out(
    State(s): State<AppState>,
    session: Session,
    form: Result<axum::extract::Form<Form>, FormRejection>,
) -> Result<Response, PageError> {
    let form = read_form(form)?;
    session.check_csrf(field(&form, "csrf"))?;
    let r = if field(&form, "everywhere").is_some() {
        s.store
            .end_sessions_of(session.caller.id())
            .await
            .map(|_| ())
    } else {
        s.store.end_session(&session.token).await.map(|_| ())
    };
    r.map_err(|e| api_error_page(super::ApiError::from(e), "/"))?;
    Ok((
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/"),
    )
        .into_response())
}

/// An url-encoded form's fields, or a page that says why it could not be read.
fn read_form(form: Result<axum::extract::Form<Form>, FormRejection>) -> Result<Form, PageError> {
    form.map(|f| f.0).map_err(|e| {
        page_error(
            StatusCode::BAD_REQUEST,
            &format!("The form could not be read: {}", e.body_text()),
            "/",
        )
    })
}

/// Why a page could not be shown: no session (the browser goes to the sign-in page), or an
/// error shown as a page with a way back.
pub(super) enum PageError {
    /// No live session.
    SignIn,
    /// An error page.
    Page {
        status: StatusCode,
        message: String,
        back: String,
    },
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn => Redirect::to("/").into_response(),
            PageError::Page {
                status,
                message,
                back,
            } => {
                let body = format!(
                    "<p class=\"error\" role=\"alert\">{}</p><p><a href=\"{}\">Back</a></p>",
                    escape(&message),
                    escape(&back)
                );
                (status, pages::bare("Something went wrong", &body)).into_response()
            }
        }
    }
}

/// An error as a page with a way back.
fn page_error(status: StatusCode, message: &str, back: &str) -> PageError {
    PageError::Page {
        status,
        message: message.to_string(),
        back: back.to_string(),
    }
}

/// An API error as a page, with the status the API would answer.
fn api_error_page(e: super::ApiError, back: &str) -> PageError {
    let status = StatusCode::from_u16(e.code().status()).unwrap_or(StatusCode::BAD_REQUEST);
    page_error(status, e.message(), back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others_and_junk_is_refused() {
        let token = "ab".repeat(32);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=1; {COOKIE}={token}; b=2")).unwrap(),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some(token.as_str()));
        for junk in ["x", "zz".repeat(32).as_str(), &"ab".repeat(33)] {
            let mut h = HeaderMap::new();
            h.insert(
                header::COOKIE,
                HeaderValue::from_str(&format!("{COOKIE}={junk}")).unwrap(),
            );
            assert_eq!(cookie_token(&h), None, "{junk}");
        }
    }

    /// WCAG 2 relative luminance of `#rrggbb`.
    fn luminance(hex: &str) -> f64 {
        let c = |i: usize| {
            let v = u8::from_str_radix(&hex[1 + i..3 + i], 16).unwrap() as f64 / 255.0;
            if v <= 0.04045 {
                v / 12.92
            } else {
                ((v + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * c(0) + 0.7152 * c(2) + 0.0722 * c(4)
    }

    #[test]
    fn the_stylesheet_s_text_colours_meet_wcag_aa_contrast() {
        let css = include_str!("style.css");
        let var = |name: &str| -> String {
            let at = css.find(&format!("--{name}: ")).unwrap() + name.len() + 4;
            css[at..at + 7].to_string()
        };
        let contrast = |a: &str, b: &str| {
            let (x, y) = (luminance(a), luminance(b));
            (x.max(y) + 0.05) / (x.min(y) + 0.05)
        };
        let header = "#14213d";
        assert!(css.contains(&format!("background: {header}")));
        let mut pairs: Vec<(String, String)> = [
            ("ink", "bg"),
            ("ink", "panel"),
            ("muted", "bg"),
            ("muted", "panel"),
            ("accent", "bg"),
            ("ok", "bg"),
            ("bad", "bg"),
            ("warn", "bg"),
        ]
        .iter()
        .map(|(f, b)| (var(f), var(b)))
        .collect();
        // Buttons and the header: white text.
        pairs.push(("#ffffff".into(), var("accent")));
        pairs.push(("#ffffff".into(), header.into()));
        for (fg, bg) in pairs {
            let r = contrast(&fg, &bg);
            assert!(r >= 4.5, "{fg} on {bg}: {r:.2}");
        }
    }

    #[test]
    fn the_csrf_token_depends_on_the_session_and_is_compared_whole() {
        let a = csrf_of(&"ab".repeat(32));
        let b = csrf_of(&"cd".repeat(32));
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(constant_time_eq(a.as_bytes(), a.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), b.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), &a.as_bytes()[..63]));
    }
}
