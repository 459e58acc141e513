//! The JSON errors of the invalidation API.

use std::fmt;

use super::MAX_BATCH;
use crate::edge::ErrorEnvelope;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// A rejected invalidation request: the status, and the body
/// `{"error": {"code": "...", "message": "..."}}`.
///
/// Codes and statuses:
///
/// | status | code | when |
/// |---|---|---|
/// | 400 | `malformed_json` | the body is not JSON |
/// | 400 | `invalid_request` | not an object, a field of the wrong type, neither or both of `dep_id` / `dep_ids` |
/// | 400 | `unreadable_body` | the body could not be read |
/// | 401 | `unauthorized` | missing or invalid credentials |
/// | 405 | `method_not_allowed` | not `POST` (the response has `Allow: POST`) |
/// | 413 | `payload_too_large` | body over [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES) |
/// | 415 | `unsupported_media_type` | a content type other than JSON |
/// | 422 | `invalid_dep_id` | a dep id is empty, over 512 bytes, or has a control character |
/// | 422 | `invalid_new_hash` | `new_hash` empty, over 256 bytes, or not printable ASCII without white space |
/// | 422 | `empty_batch` | `dep_ids` is `[]` |
/// | 422 | `batch_too_large` | `dep_ids` has over [`MAX_BATCH`] ids |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code, e.g. `invalid_dep_id`.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The human-readable message naming the problem.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Parses an error body (`{"error": {"code", "message"}}`) received with `status`.
    pub fn from_body(status: StatusCode, body: &[u8]) -> Option<Self> {
        let e = ErrorEnvelope::parse(body)?;
        Some(Self::new(status, e.code, e.message))
    }

    pub(crate) fn malformed_json(e: &serde_json::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("body is not valid JSON: {e}"),
        )
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(crate) fn unreadable_body(e: impl fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            format!("could not read the body: {e}"),
        )
    }

    pub(crate) fn unauthorized(e: impl fmt::Display) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }

    pub(crate) fn method_not_allowed(method: &http::Method) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed; use POST"),
        )
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("body is over the limit of {limit} bytes"),
        )
    }

    pub(crate) fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type {content_type:?} is not JSON; send application/json"),
        )
    }

    pub(crate) fn unprocessable(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub(crate) fn batch_too_large(n: usize) -> Self {
        Self::unprocessable(
            "batch_too_large",
            format!("dep_ids has {n} ids; the limit is {MAX_BATCH}"),
        )
    }

    /// The HTTP response for this error.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = ErrorEnvelope::body(&self.code, &self.message);
        let mut res = super::service::json_response(self.status, body);
        match self.status {
            StatusCode::METHOD_NOT_ALLOWED => {
                res.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            StatusCode::UNAUTHORIZED => {
                res.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="cachecore""#),
                );
            }
            _ => {}
        }
        res
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}
