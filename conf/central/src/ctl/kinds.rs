//! Kinds as people type them, and the parts of an object every command reads.

use serde_json::Value;

use conf::api::{Kind, KINDS, NAD};

use super::Error;

/// The kind a word names: plural, singular, short name or Kind, any case,
/// optionally qualified by its group (`ippools.plexus.io`); `nad` too.
pub fn resolve(word: &str) -> Result<&'static Kind, Error> {
    let w = word.to_ascii_lowercase();
    let matches = |k: &Kind, w: &str| {
        w == k.plural
            || w == k.singular
            || w == k.kind.to_ascii_lowercase()
            || k.short_names.contains(&w)
            || (*k == NAD && (w == "nad" || w == "nads"))
    };
    for k in KINDS {
        let bare = w
            .strip_suffix(k.group)
            .and_then(|s| s.strip_suffix('.'))
            .unwrap_or(&w);
        if matches(k, bare) {
            return Ok(k);
        }
    }
    let known: Vec<String> = KINDS
        .iter()
        .map(|k| format!("{} ({})", k.plural, k.short_names.join(", ")))
        .collect();
    Err(Error::usage(format!(
        "unknown kind {word:?}; known: {}",
        known.join(", ")
    )))
}

/// How messages name an object of a kind: `ippool/p1`.
pub fn label(kind: &Kind, name: &str) -> String {
    format!("{}/{name}", kind.kind.to_ascii_lowercase())
}

/// A string at a JSON pointer, or "".
pub fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// `metadata.name`.
pub fn name(obj: &Value) -> &str {
    text(obj, "/metadata/name")
}

/// `metadata.namespace`.
pub fn namespace(obj: &Value) -> &str {
    text(obj, "/metadata/namespace")
}

/// The strings of an array at a JSON pointer.
pub fn strings(obj: &Value, pointer: &str) -> Vec<String> {
    obj.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The kind an object declares by `apiVersion` and `kind`.
pub fn of_object(obj: &Value) -> Result<&'static Kind, String> {
    let api_version = text(obj, "/apiVersion");
    let kind = text(obj, "/kind");
    if api_version.is_empty() || kind.is_empty() {
        return Err("object without apiVersion and kind".into());
    }
    Kind::by_kind(api_version, kind).ok_or_else(|| format!("unknown kind {kind} in {api_version}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use conf::api::{ATTACHMENT, CLUSTER_NETWORK, IP_POOL};
    use serde_json::json;

    #[test]
    fn kind_words() {
        let cases: [(&str, &Kind); 14] = [
            ("nad", &NAD),
            ("NADs", &NAD),
            ("net-attach-def", &NAD),
            ("network-attachment-definitions", &NAD),
            ("NetworkAttachmentDefinition", &NAD),
            ("network-attachment-definitions.k8s.cni.cncf.io", &NAD),
            ("cnet", &CLUSTER_NETWORK),
            ("ClusterNetworks", &CLUSTER_NETWORK),
            ("pool", &IP_POOL),
            ("ippool", &IP_POOL),
            ("IPPool", &IP_POOL),
            ("ippools.plexus.io", &IP_POOL),
            ("att", &ATTACHMENT),
            ("Attachments", &ATTACHMENT),
        ];
        for (word, kind) in cases {
            assert_eq!(resolve(word).map(|k| k.kind), Ok(kind.kind), "{word}");
        }
        let e = resolve("pods").expect_err("unknown");
        assert_eq!(e.code, 2);
        assert!(e.message.contains("ippools (pool)"), "{}", e.message);
        assert!(resolve("ippools.k8s.cni.cncf.io").is_err());
    }

    #[test]
    fn object_parts() {
        let o = json!({"apiVersion": "plexus.io/v1", "kind": "IPPool",
                       "metadata": {"name": "p1"}, "spec": {"cidrs": ["10.0.0.0/8", 5]}});
        assert_eq!(of_object(&o).map(|k| k.plural), Ok("ippools"));
        assert_eq!((name(&o), namespace(&o)), ("p1", ""));
        assert_eq!(strings(&o, "/spec/cidrs"), ["10.0.0.0/8", "5"]);
        assert_eq!(label(&IP_POOL, "p1"), "ippool/p1");
        let e = of_object(&json!({"apiVersion": "v1", "kind": "Pod"})).expect_err("pod");
        assert_eq!(e, "unknown kind Pod in v1");
    }
}
