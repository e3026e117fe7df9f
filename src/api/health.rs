//! Probes and metrics, outside `/api/v1`.

use poem::{IntoResponse, Response, handler, web::Data};

use super::error::error_with_code;
use crate::{app::AppState, error::ErrorCode};

/// Alive: the process answers.
#[handler]
pub fn healthz() -> &'static str {
    "ok"
}

/// Ready: not shutting down, and the database and bus answer.
#[handler]
pub async fn readyz(Data(state): Data<&AppState>) -> Response {
    if state.is_shutting_down() {
        return not_ready("shutting down");
    }
    if let Err(err) = state.chat.store.ping().await {
        tracing::warn!(error = %err, "readiness: database unreachable");
        return not_ready("database unreachable");
    }
    if let Err(err) = state.chat.bus.ping().await {
        tracing::warn!(error = %err, "readiness: bus unreachable");
        return not_ready("bus unreachable");
    }
    "ready".into_response()
}

fn not_ready(why: &str) -> Response {
    error_with_code(ErrorCode::Unavailable, why)
}

/// Prometheus text format.
#[handler]
pub fn metrics(Data(state): Data<&AppState>) -> Response {
    Response::builder()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
