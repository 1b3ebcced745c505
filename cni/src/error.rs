//! The CNI error object and the spec's codes.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::version::Version;

/// The error codes the spec reserves (1–99), plus the generic internal one.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin is available with limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// Anything else (the reference library's catch-all).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: what a plugin prints on stdout when it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct Error {
    /// The spec's code (1–99) or a plugin-specific one (100+).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Longer, more specific detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl Error {
    /// An error with a code and a message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Error {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Prefixes the message with what was being done, keeping code and details.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    /// The error object as the spec prints it, for a given version.
    pub fn to_json(&self, version: Version) -> Value {
        let mut v = json!({
            "cniVersion": version.as_str(),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// Several failures from one best-effort operation (DEL, GC), reported together.
pub fn combine(errors: Vec<Error>) -> Result<(), Error> {
    let mut iter = errors.into_iter();
    let Some(first) = iter.next() else {
        return Ok(());
    };
    let rest: Vec<String> = iter.map(|e| e.to_string()).collect();
    if rest.is_empty() {
        return Err(first);
    }
    let code = first.code;
    let mut all = vec![first.to_string()];
    all.extend(rest);
    Err(Error::new(code, format!("{} failures", all.len())).with_details(all.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = Error::new(code::INVALID_NETWORK_CONFIG, "bad").with_details("why");
        let v = e.to_json(Version::V1_0_0);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad");
        assert_eq!(v["details"], "why");
        let v = Error::new(4, "x").to_json(Version::V0_4_0);
        assert!(v.get("details").is_none());
    }

    #[test]
    fn combine_keeps_every_failure() {
        assert!(combine(vec![]).is_ok());
        let one = combine(vec![Error::new(5, "a")]).unwrap_err();
        assert_eq!(one.msg, "a");
        let two = combine(vec![Error::new(5, "a"), Error::new(7, "b")]).unwrap_err();
        assert_eq!(two.code, 5);
        assert!(two.details.contains('a') && two.details.contains('b'));
    }
}
