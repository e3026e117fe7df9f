//! The one error type of the chat layer, and the policy behind it.
//!
//! Storage, bus and domain code return [`ChatError`]; the two edges map it
//! once each: REST handlers to an HTTP status with the contract's
//! `{"code", "message"}` body (`api::error`), WebSocket sessions to an
//! `error` frame or a refusal before the upgrade (`ws`).
//!
//! Policy:
//! - Client mistakes (`BadRequest`, `InvalidMessage`, …) carry a message
//!   written for the client; it never contains a token or a message body.
//! - `Unavailable` means a backend (database, bus) could not be reached; the
//!   operation did not happen and may be retried (with the same `client_id`).
//! - `Internal` is logged with its cause where it is mapped, and answered
//!   with an opaque message: causes never reach clients.

use std::time::Duration;

/// What went wrong, as one of the contract's fixed codes (the same over REST
/// and the WebSocket): `bad_request` (malformed or invalid input), `message_too_long`,
/// `invalid_message` (empty body, or a forbidden control character),
/// `unauthorized` (missing, invalid or expired token), `forbidden`,
/// `not_found`, `conflict` (an id is taken), `payload_too_large`,
/// `rate_limited` (retry later), `unavailable` (a backend is down: nothing
/// happened, retry) and `internal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    MessageTooLong,
    InvalidMessage,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::MessageTooLong => "message_too_long",
            Self::InvalidMessage => "invalid_message",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status this code is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest | Self::MessageTooLong | Self::InvalidMessage => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    MessageTooLong(String),
    #[error("{0}")]
    InvalidMessage(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("too many requests; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    /// A backend could not be reached; nothing was changed.
    #[error("service temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// A bug or an unexpected backend answer.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ChatError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::MessageTooLong(_) => ErrorCode::MessageTooLong,
            Self::InvalidMessage(_) => ErrorCode::InvalidMessage,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The text a client sees. Internal causes are logged here, once, and
    /// never returned.
    pub fn client_message(&self) -> String {
        match self {
            Self::Unavailable(cause) => {
                tracing::warn!(error = %format!("{cause:#}"), "backend unavailable");
            }
            Self::Internal(cause) => {
                tracing::error!(error = %format!("{cause:#}"), "internal error");
            }
            _ => {}
        }
        self.to_string()
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The same error again, for another of the operations it failed
    /// (e.g. every message of a batch whose transaction failed). A backend
    /// cause is carried as its text.
    fn again(&self) -> Self {
        match self {
            Self::BadRequest(m) => Self::BadRequest(m.clone()),
            Self::MessageTooLong(m) => Self::MessageTooLong(m.clone()),
            Self::InvalidMessage(m) => Self::InvalidMessage(m.clone()),
            Self::Unauthorized(m) => Self::Unauthorized(m.clone()),
            Self::Forbidden(m) => Self::Forbidden(m.clone()),
            Self::NotFound(m) => Self::NotFound(m.clone()),
            Self::Conflict(m) => Self::Conflict(m.clone()),
            Self::RateLimited { retry_after } => Self::RateLimited {
                retry_after: *retry_after,
            },
            Self::Unavailable(cause) => Self::Unavailable(anyhow::anyhow!("{cause:#}")),
            Self::Internal(cause) => Self::Internal(anyhow::anyhow!("{cause:#}")),
        }
    }

    /// This error as the result of each of `count` operations it failed.
    pub fn for_each<T>(&self, count: usize) -> Vec<Result<T, Self>> {
        (0..count).map(|_| Err(self.again())).collect()
    }

    pub fn forbidden() -> Self {
        Self::Forbidden("you are not allowed in this room".into())
    }

    pub fn room_not_found() -> Self {
        Self::NotFound("no such room".into())
    }
}

/// Storage errors: a connection problem is `Unavailable`, the rest `Internal`.
impl From<sqlx::Error> for ChatError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(err.into()),
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| {
                    // PostgreSQL: connection exceptions, shutdown, too many
                    // connections; SQLite: busy / locked.
                    c.starts_with("08")
                        || c.starts_with("57P")
                        || c == "53300"
                        || c == "5"
                        || c == "6"
                }) =>
            {
                Self::Unavailable(err.into())
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for ChatError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        Self::Internal(err.into())
    }
}
