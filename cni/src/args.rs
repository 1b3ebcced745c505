//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.

use crate::error::{code, Error};

/// Parsed `CNI_ARGS`, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(pub Vec<(String, String)>);

impl CniArgs {
    /// Parses `K=V;K2=V2`; an element without `=` is an error (code 4).
    pub fn parse(s: &str) -> Result<CniArgs, Error> {
        let mut pairs = Vec::new();
        for item in s.split(';').filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(
                    Error::new(code::INVALID_ENVIRONMENT, "invalid CNI_ARGS pair")
                        .with_details(item.to_string()),
                );
            };
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(CniArgs(pairs))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Back to the wire form.
    pub fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p").unwrap();
        assert_eq!(a.get("K8S_POD_NAMESPACE"), Some("ns1"));
        assert_eq!(a.get("nope"), None);
        assert_eq!(CniArgs::parse("").unwrap().0.len(), 0);
        assert_eq!(
            CniArgs::parse("a=b;bad").unwrap_err().code,
            code::INVALID_ENVIRONMENT
        );
        assert_eq!(CniArgs::parse("a=b=c").unwrap().get("a"), Some("b=c"));
        assert_eq!(
            a.encode(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p"
        );
    }
}
