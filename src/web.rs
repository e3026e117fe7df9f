//! The web client: a few static files from `web/`, compiled into the binary
//! (no build step, nothing to deploy beside it) and served at `/`, and the
//! development token endpoint that only `--dev-tokens` turns on.
//!
//! Every file is answered with a strict Content-Security-Policy (scripts and
//! styles from this origin only, connections to this origin and its
//! WebSocket), `nosniff`, and `Cache-Control: no-cache` with a strong
//! `ETag`: file names carry no version, so browsers revalidate on each load
//! and get a 304 while the binary is the same.
//!
//! `POST /dev/token` is deliberately not an OpenAPI operation: it is a
//! local convenience, absent from the product's API and its SDKs. While the
//! flag is off (the default) it answers 404 like any unknown route, and the
//! page hides its "mint" button.

use std::time::Duration;

use poem::{
    Body, Endpoint, IntoResponse, Request, Response, Route, get, handler,
    http::{HeaderMap, StatusCode, header},
    web::Data,
};
use serde::Deserialize;

use crate::{
    api::error::{error_response, error_with_code},
    app::AppState,
    domain::{MAX_NAME_CHARS, UserId, clean_name},
    error::{ChatError, ErrorCode},
    protocol::format_time,
};

/// Lifetime of a development token: short, since anyone who can reach the
/// service can mint one. The page mints a new one before it runs out.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Largest `POST /dev/token` body.
const MAX_DEV_TOKEN_BODY: usize = 4 * 1024;

/// One embedded file.
#[derive(Clone)]
struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    etag: String,
}

impl Asset {
    fn new(content_type: &'static str, body: &'static [u8]) -> Self {
        Self {
            content_type,
            body,
            etag: format!("\"{:016x}\"", fnv1a(body)),
        }
    }
}

/// The files of `web/`, by the path they are served at.
fn assets() -> [(&'static str, Asset); 4] {
    let html = Asset::new(
        "text/html; charset=utf-8",
        include_bytes!("../web/index.html"),
    );
    [
        ("/", html),
        (
            "/app.js",
            Asset::new(
                "text/javascript; charset=utf-8",
                include_bytes!("../web/app.js"),
            ),
        ),
        (
            "/style.css",
            Asset::new(
                "text/css; charset=utf-8",
                include_bytes!("../web/style.css"),
            ),
        ),
        (
            "/favicon.svg",
            Asset::new("image/svg+xml", include_bytes!("../web/favicon.svg")),
        ),
    ]
}

/// The web client's routes, added beside the service's own.
pub fn routes(route: Route) -> Route {
    let mut route = route
        .at("/dev/token", get(dev_token_status).post(mint_dev_token))
        .at("/index.html", get(serve(assets()[0].1.clone())));
    for (path, asset) in assets() {
        route = route.at(path, get(serve(asset)));
    }
    route
}

fn serve(asset: Asset) -> impl Endpoint<Output = Response> {
    poem::endpoint::make_sync(move |req: Request| {
        let fresh = req
            .headers()
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|tags| {
                tags.split(',')
                    .any(|tag| tag.trim() == asset.etag || tag.trim() == "*")
            });
        let mut response = if fresh {
            Response::builder()
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
        } else {
            Response::builder()
                .content_type(asset.content_type)
                .body(asset.body)
        };
        let headers = response.headers_mut();
        security_headers(headers, req.headers());
        headers.insert(header::CACHE_CONTROL, "no-cache".parse().expect("valid"));
        if let Ok(etag) = asset.etag.parse() {
            headers.insert(header::ETAG, etag);
        }
        response
    })
}

/// The page may load its own scripts, styles and images, and talk to this
/// origin over HTTP and WebSocket; nothing inline, no frames, no forms
/// posted elsewhere.
fn security_headers(headers: &mut HeaderMap, request: &HeaderMap) {
    let sockets = request
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|host| is_plain_host(host))
        .map(|host| format!(" ws://{host} wss://{host}"))
        .unwrap_or_default();
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    if let Ok(value) = csp.parse() {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("valid"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        "no-referrer".parse().expect("valid"),
    );
}

/// A `Host` header we may repeat inside the policy: a name or address and
/// an optional port, nothing that could end the directive.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// FNV-1a: a stable content hash for the `ETag` (not a security measure).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn dev_tokens_off() -> Response {
    error_with_code(
        ErrorCode::NotFound,
        "no such route (development tokens are off; start the service with --dev-tokens)",
    )
}

/// `GET /dev/token`: 200 when development tokens can be minted, 404 when not.
#[handler]
fn dev_token_status(Data(state): Data<&AppState>) -> Response {
    if !state.config.dev_tokens {
        return dev_tokens_off();
    }
    poem::web::Json(serde_json::json!({
        "enabled": true,
        "ttl_seconds": DEV_TOKEN_TTL.as_secs(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct DevTokenRequest {
    /// The user id (`sub`).
    sub: String,
    /// The display name; the user id when absent.
    name: Option<String>,
}

/// `POST /dev/token` `{"sub", "name"?}`: a token for any user, without
/// roles, signed with the configured secret (what `chat-service token`
/// prints). Only with `--dev-tokens`.
#[handler]
async fn mint_dev_token(Data(state): Data<&AppState>, body: Body) -> Response {
    if !state.config.dev_tokens {
        return dev_tokens_off();
    }
    match mint(state, body).await {
        Ok(response) => response,
        Err(err) => error_response(&err),
    }
}

async fn mint(state: &AppState, body: Body) -> Result<Response, ChatError> {
    let bad = |why: &str| ChatError::BadRequest(why.to_owned());
    let bytes = body
        .into_bytes_limit(MAX_DEV_TOKEN_BODY)
        .await
        .map_err(|_| bad("expected a small JSON body"))?;
    let request: DevTokenRequest = serde_json::from_slice(&bytes)
        .map_err(|_| bad("expected a JSON object {\"sub\": \"…\", \"name\": \"…\"}"))?;
    let user_id = UserId::parse(request.sub.trim())?;
    let name = request
        .name
        .map(|n| clean_name(&n, MAX_NAME_CHARS))
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| user_id.to_string());
    let token = state
        .keys
        .mint(user_id.as_str(), Some(&name), &[], DEV_TOKEN_TTL)
        .map_err(ChatError::Internal)?;
    let expires_at = format_time(time::OffsetDateTime::now_utc() + DEV_TOKEN_TTL);
    tracing::info!(user_id = %user_id, "development token minted");
    Ok(poem::web::Json(serde_json::json!({
        "token": token,
        "user": { "id": user_id.as_str(), "name": name },
        "expires_at": expires_at,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_hosts_enter_the_policy() {
        assert!(is_plain_host("127.0.0.1:8001"));
        assert!(is_plain_host("chat.example.com"));
        assert!(is_plain_host("[::1]:8001"));
        assert!(!is_plain_host(""));
        assert!(!is_plain_host("evil; script-src *"));
        assert!(!is_plain_host("a b"));
    }

    #[test]
    fn etags_follow_content() {
        assert_eq!(Asset::new("x", b"a").etag, Asset::new("y", b"a").etag);
        assert_ne!(Asset::new("x", b"a").etag, Asset::new("x", b"b").etag);
    }
}
