//! The client's errors: transport failures and the server's `Status` answers.

use serde_json::{json, Value};
use std::time::Duration;

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server URL or the TLS settings are unusable.
    #[error("{0}")]
    Config(String),
    /// TCP or TLS connection failed.
    #[error("connect {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// Connecting or the request took longer than allowed.
    #[error("{what} {addr}: timed out after {after:?}")]
    Timeout {
        what: &'static str,
        addr: String,
        after: Duration,
    },
    /// The HTTP exchange failed (connection reset, malformed response).
    #[error("{0}")]
    Http(String),
    /// A 2xx response whose body is not JSON.
    #[error("decode response: {0}")]
    Decode(String),
    /// The server answered with a non-2xx status.
    #[error("{0}")]
    Api(#[from] ApiError),
}

impl Error {
    /// The server's error, if it answered with one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the server answered 404.
    pub fn is_not_found(&self) -> bool {
        self.api().is_some_and(|e| e.code == 404)
    }
}

/// A non-2xx answer: the HTTP status and the `Status` object (synthesised
/// when the body was not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub status: Value,
}

impl ApiError {
    /// Builds the error from a response's status and body.
    pub fn from_response(code: u16, body: &[u8]) -> ApiError {
        let status = match serde_json::from_slice::<Value>(body) {
            Ok(v) if v.is_object() => v,
            _ => {
                let text = String::from_utf8_lossy(body).trim().to_string();
                let message = if text.is_empty() {
                    canonical_reason(code).to_string()
                } else {
                    text
                };
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": message, "code": code})
            }
        };
        ApiError { code, status }
    }

    /// `reason` (NotFound, Conflict…), else the HTTP reason phrase.
    pub fn reason(&self) -> String {
        match self.status.get("reason").and_then(Value::as_str) {
            Some(r) if !r.is_empty() => r.to_string(),
            _ => canonical_reason(self.code).to_string(),
        }
    }

    /// `message`, else empty.
    pub fn message(&self) -> &str {
        self.status
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// `details.causes` as `(field, message)` pairs.
    pub fn causes(&self) -> Vec<(String, String)> {
        let Some(causes) = self
            .status
            .pointer("/details/causes")
            .and_then(Value::as_array)
        else {
            return Vec::new();
        };
        let text = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        causes
            .iter()
            .map(|c| (text(c, "field"), text(c, "message")))
            .collect()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.reason())?;
        match self.message() {
            "" => Ok(()),
            m => write!(f, ": {m}"),
        }
    }
}

impl std::error::Error for ApiError {}

pub(super) fn canonical_reason(code: u16) -> &'static str {
    hyper::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}
