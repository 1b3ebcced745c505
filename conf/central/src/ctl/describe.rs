//! `describe`: one object as aligned `Key: value` sections.

use serde_json::Value;

use conf::api::{Kind, ATTACHMENT, CLUSTER_NETWORK, IP_POOL, NAD};

use super::columns::{block_sizes, pool_cidrs};
use super::kinds::{strings, text};
use super::table::{age, parse_time};
use super::usage;

/// Lines of `Key: value`, values aligned within a section.
#[derive(Default)]
struct Section {
    indent: usize,
    fields: Vec<(String, Vec<String>)>,
}

impl Section {
    fn new(indent: usize) -> Section {
        Section {
            indent,
            fields: Vec::new(),
        }
    }

    /// A field; several values go one per line, none shows `<none>`.
    fn field(&mut self, key: &str, values: Vec<String>) -> &mut Section {
        self.fields.push((key.to_string(), values));
        self
    }

    fn one(&mut self, key: &str, value: &str) -> &mut Section {
        let v = if value.is_empty() {
            vec![]
        } else {
            vec![value.to_string()]
        };
        self.field(key, v)
    }

    fn render(&self, out: &mut String) {
        let width = self
            .fields
            .iter()
            .map(|(k, _)| k.len() + 1)
            .max()
            .unwrap_or(0)
            + 2;
        let pad = " ".repeat(self.indent);
        for (key, values) in &self.fields {
            let head = format!("{pad}{:<width$}", format!("{key}:"));
            let none = ["<none>".to_string()];
            let values = if values.is_empty() {
                &none[..]
            } else {
                &values[..]
            };
            for (i, v) in values.iter().enumerate() {
                let lead = if i == 0 {
                    head.clone()
                } else {
                    " ".repeat(head.len())
                };
                out.push_str(format!("{lead}{v}").trim_end());
                out.push('\n');
            }
        }
    }
}

/// An object as text; `usage` is a pool's usage, or why it could not be read.
pub fn render(kind: &Kind, o: &Value, usage: Option<Result<Value, String>>, now: i64) -> String {
    let mut out = String::new();
    let mut meta = Section::new(0);
    meta.one("Name", text(o, "/metadata/name"));
    if kind.namespaced {
        meta.one("Namespace", text(o, "/metadata/namespace"));
    }
    meta.one("Kind", &format!("{} ({})", kind.kind, kind.api_version()))
        .field("Labels", pairs(o, "/metadata/labels"))
        .field("Annotations", pairs(o, "/metadata/annotations"));
    let created = text(o, "/metadata/creationTimestamp");
    match parse_time(created) {
        Some(_) => meta.one("Created", &format!("{created} ({} ago)", age(created, now))),
        None => meta.one("Created", created),
    };
    meta.one("Resource Version", text(o, "/metadata/resourceVersion"));
    meta.render(&mut out);

    out.push_str("Spec:\n");
    let mut spec = Section::new(2);
    let list = |p: &str| strings(o, p);
    let config = text(o, "/spec/config");
    if *kind == NAD || *kind == CLUSTER_NETWORK {
        if *kind == CLUSTER_NETWORK {
            spec.field("Allowed Namespaces", list("/spec/allowedNamespaces"));
        }
        spec.render(&mut out);
        out.push_str("  Config:\n");
        out.push_str(&indented(&pretty_config(config), 4));
    } else if *kind == IP_POOL {
        let cidrs = pool_cidrs(o);
        let sizes = block_sizes(o, &cidrs);
        let routes = o
            .pointer("/spec/routes")
            .and_then(Value::as_array)
            .map(|rs| rs.iter().map(route).collect())
            .unwrap_or_default();
        spec.field("CIDRs", cidrs)
            .one("Block Sizes", &sizes)
            .field("Exclude", list("/spec/exclude"))
            .field("Routes", routes)
            .field("Allowed Namespaces", list("/spec/allowedNamespaces"));
        spec.render(&mut out);
    } else if *kind == ATTACHMENT {
        let network = match text(o, "/spec/networkKind") {
            "" => text(o, "/spec/network").to_string(),
            k => format!("{} ({k})", text(o, "/spec/network")),
        };
        spec.one("Pod", text(o, "/spec/pod"))
            .one("Node", text(o, "/spec/node"))
            .one("Container ID", text(o, "/spec/containerId"))
            .one("Interface", text(o, "/spec/interface"))
            .one("Network", &network)
            .field("Addresses", list("/spec/addresses"))
            .one("MAC", text(o, "/spec/mac"))
            .one("Pool", text(o, "/spec/pool"));
        spec.render(&mut out);
    } else {
        let yaml = o.get("spec").map(yaml).unwrap_or_default();
        out.push_str(&indented(&yaml, 2));
    }

    match usage {
        None => {}
        Some(Ok(u)) => {
            out.push_str("Usage:\n");
            out.push_str(&indented(&usage::render(&u), 2));
        }
        Some(Err(e)) => out.push_str(&format!("Usage:  <unavailable: {e}>\n")),
    }
    out
}

/// `key=value` lines of a string map, sorted.
fn pairs(o: &Value, pointer: &str) -> Vec<String> {
    let mut v: Vec<String> = o
        .pointer(pointer)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_string)))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn route(r: &Value) -> String {
    match text(r, "/gw") {
        "" => text(r, "/dst").to_string(),
        gw => format!("{} via {gw}", text(r, "/dst")),
    }
}

/// A CNI config pretty-printed in its own key order; kept as is when it is not JSON.
pub fn pretty_config(config: &str) -> String {
    if config.trim().is_empty() {
        return "<none>\n".into();
    }
    match serde_json::from_str::<Value>(config) {
        Ok(_) => reindent(config) + "\n",
        Err(_) => format!("{}\n", config.trim_end()),
    }
}

/// Re-indents valid JSON text by two spaces per level, token by token, so
/// that keys keep the order the author wrote them in.
fn reindent(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut chars = json.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.extend(chars.next());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

fn yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_else(|e| format!("<{e}>\n"))
}

/// Every non-empty line indented by `n` spaces.
pub fn indented(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("{pad}{l}\n")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn network() {
        let o = json!({"metadata": {"name": "data", "namespace": "red", "resourceVersion": "7",
                                    "creationTimestamp": "1970-01-01T00:00:00Z",
                                    "labels": {"tier": "db", "app": "x"}},
                       "spec": {"config": "{\"cniVersion\":\"1.0.0\",\"type\":\"macvlan\"}"}});
        let got = render(&NAD, &o, None, 30);
        let want = "\
Name:              data
Namespace:         red
Kind:              NetworkAttachmentDefinition (k8s.cni.cncf.io/v1)
Labels:            app=x
                   tier=db
Annotations:       <none>
Created:           1970-01-01T00:00:00Z (30s ago)
Resource Version:  7
Spec:
  Config:
    {
      \"cniVersion\": \"1.0.0\",
      \"type\": \"macvlan\"
    }
";
        assert_eq!(got, want);
    }

    #[test]
    fn pool_with_usage() {
        let o = json!({"metadata": {"name": "p1"},
                       "spec": {"cidrs": ["10.1.0.0/16"], "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]}});
        let got = render(&IP_POOL, &o, Some(Err("403 Forbidden".into())), 0);
        assert!(got.contains("\nSpec:\n  CIDRs:               "), "{got}");
        assert!(
            got.contains("  Routes:              0.0.0.0/0 via 10.1.0.1\n"),
            "{got}"
        );
        assert!(got.contains("  Block Sizes:         /26\n"), "{got}");
        assert!(
            got.ends_with("Usage:  <unavailable: 403 Forbidden>\n"),
            "{got}"
        );
        assert!(!got.contains("Namespace:"));
    }

    #[test]
    fn configs() {
        let c = r#"{"type":"macvlan", "master" : "eth0","ipam":{}, "a":[ ], "s":"x,{\"y\": [1]}", "n":[1,{"k":null}]}"#;
        assert_eq!(
            pretty_config(c),
            "{\n  \"type\": \"macvlan\",\n  \"master\": \"eth0\",\n  \"ipam\": {},\n  \"a\": [],\n  \
             \"s\": \"x,{\\\"y\\\": [1]}\",\n  \"n\": [\n    1,\n    {\n      \"k\": null\n    }\n  ]\n}\n"
        );
        assert_eq!(pretty_config("not json"), "not json\n");
        assert_eq!(pretty_config(""), "<none>\n");
    }
}
