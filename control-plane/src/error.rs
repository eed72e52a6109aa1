//! The one place where every failure gets its HTTP status and stable error code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input the caller can fix: (code, message).
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("{0}")]
    Unauthorized(String),
    /// A password (login or master) was wrong.
    #[error("{0}")]
    InvalidCredentials(String),
    /// Known caller, not allowed: (code, message).
    #[error("{1}")]
    Forbidden(&'static str, String),
    /// Something named does not exist: (code, message).
    #[error("{1}")]
    NotFound(&'static str, String),
    /// The request conflicts with the current state: (code, message).
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// A body that is not declared as JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A batch with more items than a route takes: (limit, what the items are).
    #[error("a batch holds at most {0} {1}")]
    BatchTooLarge(usize, &'static str),
    #[error("{0}")]
    RateLimited(String),
    /// The request's body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// The request's `Host` is not one this server answers for (DNS rebinding).
    #[error("{0}")]
    HostNotAllowed(String),
    /// A per-vault limit is reached (e.g. pending proposals): (code, message).
    #[error("{1}")]
    TooMany(&'static str, String),
    #[error(transparent)]
    Rule(#[from] agent_vault_rules::RuleError),
    /// The store cannot be reached (a PostgreSQL database that is down or refusing):
    /// 503, and the caller may try again.
    #[error("{0}")]
    StoreUnavailable(String),
    /// Storage, crypto or I/O failure: logged in full, answered with a generic 500.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Error {
        Error::BadRequest(code, message.into())
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Error {
        Error::NotFound(code, message.into())
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Error {
        Error::Conflict(code, message.into())
    }

    pub fn forbidden(message: impl Into<String>) -> Error {
        Error::Forbidden("forbidden", message.into())
    }

    pub fn internal(message: impl std::fmt::Display) -> Error {
        Error::Internal(message.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(..) | Error::Rule(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) | Error::InvalidCredentials(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(..) => StatusCode::FORBIDDEN,
            Error::NotFound(..) => StatusCode::NOT_FOUND,
            Error::Conflict(..) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) | Error::BatchTooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::RateLimited(_) | Error::TooMany(..) => StatusCode::TOO_MANY_REQUESTS,
            Error::HostNotAllowed(_) => StatusCode::MISDIRECTED_REQUEST,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(code, _)
            | Error::NotFound(code, _)
            | Error::Conflict(code, _)
            | Error::Forbidden(code, _)
            | Error::TooMany(code, _) => code,
            Error::Rule(rule) => rule.code(),
            Error::Unauthorized(_) => "unauthorized",
            Error::InvalidCredentials(_) => "invalid_credentials",
            Error::PayloadTooLarge(_) | Error::BatchTooLarge(..) => "payload_too_large",
            Error::UnsupportedMediaType(_) => "unsupported_media_type",
            Error::RateLimited(_) => "rate_limited",
            Error::HostNotAllowed(_) => "host_not_allowed",
            Error::RequestTimeout(_) => "request_timeout",
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::Internal(_) => "internal",
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        Error::internal(format!("store: {e}"))
    }
}

impl From<sled::transaction::TransactionError<Error>> for Error {
    fn from(e: sled::transaction::TransactionError<Error>) -> Error {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => e.into(),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::internal(format!("stored record: {e}"))
    }
}

impl From<crate::crypto::CryptoError> for Error {
    fn from(e: crate::crypto::CryptoError) -> Error {
        match e {
            crate::crypto::CryptoError::Busy => Error::TooMany(
                "server_busy",
                "too many password checks at once; try again in a moment".into(),
            ),
            other => Error::internal(other),
        }
    }
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    pub message: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let message = match &self {
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error; see the server log".to_string()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: self.code(),
            message,
        };
        (self.status(), axum::Json(body)).into_response()
    }
}
