//! REST errors: every failure is answered with the contract's
//! `{"code", "message"}` body and the matching status, in one place.
//!
//! [`ApiError`] is what the OpenAPI operations return (so every error status
//! is in the spec); [`into_response`] catches what fails before an operation
//! runs (missing token header, unparsable parameters, oversized bodies,
//! unknown routes) and gives it the same shape.

use poem::{IntoResponse, Response, http::StatusCode};
use poem_openapi::{ApiResponse, Object, payload::Json, types::Example};

use crate::error::{ChatError, ErrorCode};

/// An error: a stable machine-readable code and a human-readable message.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Error", example)]
pub struct ErrorBody {
    // No doc comment on fields of a named schema type: poem-openapi would
    // wrap the reference in an `allOf` to attach it.
    pub code: ErrorCode,
    /// What went wrong, for people; its wording may change.
    pub message: String,
}

impl Example for ErrorBody {
    fn example() -> Self {
        Self {
            code: ErrorCode::NotFound,
            message: "no such room".into(),
        }
    }
}

#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// Invalid input (`bad_request`, `message_too_long`, `invalid_message`).
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// Missing, invalid or expired token.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// Not allowed (also: a private or direct room the caller is not in).
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such room, message or route.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The id is taken.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body is over the size limit.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// Rate limited; retry after the given number of seconds.
    #[oai(status = 429)]
    RateLimited(
        Json<ErrorBody>,
        /// Seconds to wait before retrying (at least 1).
        #[oai(header = "Retry-After")]
        u64,
    ),
    /// Unexpected server error.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// A backend is unavailable or the service is shutting down; retry.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

impl From<ChatError> for ApiError {
    fn from(err: ChatError) -> Self {
        let code = err.code();
        let body = Json(ErrorBody {
            code,
            message: err.client_message(),
        });
        match code {
            ErrorCode::BadRequest | ErrorCode::MessageTooLong | ErrorCode::InvalidMessage => {
                Self::BadRequest(body)
            }
            ErrorCode::Unauthorized => Self::Unauthorized(body),
            ErrorCode::Forbidden => Self::Forbidden(body),
            ErrorCode::NotFound => Self::NotFound(body),
            ErrorCode::Conflict => Self::Conflict(body),
            ErrorCode::PayloadTooLarge => Self::PayloadTooLarge(body),
            ErrorCode::RateLimited => Self::RateLimited(
                body,
                retry_after_secs(err.retry_after().unwrap_or_default()),
            ),
            ErrorCode::Unavailable => Self::Unavailable(body),
            ErrorCode::Internal => Self::Internal(body),
        }
    }
}

/// `Retry-After` is in whole seconds: round up, never 0.
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// The error as an HTTP response (WebSocket refusals use it too).
pub fn error_response(err: &ChatError) -> Response {
    let code = err.code();
    let body = serde_json::json!({ "code": code.as_str(), "message": err.client_message() });
    let mut response = Response::builder()
        .status(
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        )
        .content_type("application/json")
        .body(body.to_string());
    if let Some(wait) = err.retry_after() {
        response
            .headers_mut()
            .insert("retry-after", retry_after_secs(wait).into());
    }
    response
}

/// Gives errors raised outside the operations the contract's shape.
pub async fn into_response(err: poem::Error) -> Response {
    // Keep the operation id for the request metrics (see `observe`).
    let operation = err.data::<poem_openapi::OperationId>().copied();
    let mut response = shape(err);
    if let Some(operation) = operation {
        response.set_data(operation);
    }
    response
}

fn shape(err: poem::Error) -> Response {
    // Our own ApiError responses already have the right shape.
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    let message = err.to_string();
    let chat = match status.as_u16() {
        401 => ChatError::Unauthorized("missing or malformed bearer token".into()),
        403 => ChatError::Forbidden(message),
        404 => ChatError::NotFound("no such route".into()),
        405 => ChatError::BadRequest("method not allowed on this route".into()),
        413 => {
            return error_with_code(ErrorCode::PayloadTooLarge, "request body is too large");
        }
        400..=499 => ChatError::BadRequest(message),
        503 => ChatError::Unavailable(anyhow::anyhow!(message)),
        _ => ChatError::Internal(anyhow::anyhow!(message)),
    };
    error_response(&chat)
}

/// A JSON error response from a code and a message.
pub fn error_with_code(code: ErrorCode, message: &str) -> Response {
    Response::builder()
        .status(
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        )
        .content_type("application/json")
        .body(serde_json::json!({ "code": code.as_str(), "message": message }).to_string())
}

impl IntoResponse for ErrorBody {
    fn into_response(self) -> Response {
        Json(self).into_response()
    }
}
