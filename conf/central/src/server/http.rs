//! Responses in the Kubernetes API's shape: JSON objects, and failures as
//! `Status` objects with a reason, a code and field causes.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use conf::validate::FieldError;

/// Every response body: whole, or streamed (watch).
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response.
pub fn json(code: StatusCode, v: &Value) -> Response<Body> {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.push(b'\n');
    Response::builder()
        .status(code)
        .header("Content-Type", "application/json")
        .body(full(bytes))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// A JSON response already encoded.
pub fn bytes(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("Content-Type", "application/json")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// A text response (metrics, health).
pub fn text(code: StatusCode, content_type: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("Content-Type", content_type)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// A failed request, answered with a `Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(403, "Forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "NotFound", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, "Conflict", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "ServiceUnavailable", message)
    }

    /// 422 with one cause per faulty field.
    pub fn invalid(kind: &str, name: &str, errors: &[FieldError]) -> ApiError {
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": "FieldValueInvalid", "message": e.message, "field": e.field}))
            .collect();
        let summary: Vec<String> = errors
            .iter()
            .map(|e| {
                if e.field.is_empty() {
                    e.message.clone()
                } else {
                    format!("{}: {}", e.field, e.message)
                }
            })
            .collect();
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{kind} {name:?} is invalid: {}", summary.join(", ")),
            details: json!({"name": name, "kind": kind, "causes": causes}),
        }
    }

    /// With `details.name` and `details.kind` set.
    pub fn about(mut self, kind: &str, name: &str) -> ApiError {
        if self.details.is_null() {
            self.details = json!({"name": name, "kind": kind});
        }
        self
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }

    pub fn response(&self) -> Response<Body> {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = json(code, &self.status());
        if self.code == 401 {
            r.headers_mut().insert(
                "WWW-Authenticate",
                hyper::header::HeaderValue::from_static("Bearer realm=\"plexus\""),
            );
        }
        r
    }
}

impl From<super::store::StoreError> for ApiError {
    fn from(e: super::store::StoreError) -> ApiError {
        use super::store::StoreError as E;
        match e {
            E::Etcd(m) => ApiError::unavailable(format!("etcd: {m}")),
            E::Conflict { .. } => ApiError::conflict(
                "the object has been modified; please apply your changes to the latest version and try again",
            ),
            E::Exists(k) => ApiError::new(409, "AlreadyExists", format!("{k} already exists")),
            E::Missing(k) => ApiError::not_found(format!("{k} not found")),
            E::Guard(k) => ApiError::conflict(format!(
                "what {k} depends on (pools, networks, attachments, addresses) changed while it was checked; try again"
            )),
            E::TooLarge(m) => ApiError::new(413, "RequestEntityTooLarge", m),
        }
    }
}

pub use conf::api::now_rfc3339;

/// A random UUID (version 4) for `metadata.uid`.
pub fn uuid4() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids() {
        let u = uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, uuid4());
    }
}
