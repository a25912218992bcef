//! Every API failure becomes an HTTP status and a JSON body `{"error": code, "message": text}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use cairn_consensus::domain::Rejection;
use cairn_consensus::{ProposeError, ReadError};

use super::types::ErrorBody;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        let (status, code) = match &rejection {
            Rejection::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found"),
            Rejection::AlreadyExists { .. } => (StatusCode::CONFLICT, "already-exists"),
            Rejection::InUse { .. } => (StatusCode::CONFLICT, "in-use"),
            Rejection::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
            Rejection::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            Rejection::Unchanged { .. } => (StatusCode::CONFLICT, "unchanged"),
        };
        ApiError::new(status, code, rejection.to_string())
    }
}

impl From<ProposeError> for ApiError {
    fn from(error: ProposeError) -> ApiError {
        match error {
            ProposeError::Rejected(rejection) => rejection.into(),
            other => ApiError::unavailable(other.to_string()),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> ApiError {
        ApiError::unavailable(error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}
