//! `apply` and `delete -f`: each object in the files created, replaced or
//! deleted by name. Apply is last-writer-wins: the file's object replaces the
//! server's, keeping the server's bookkeeping (resourceVersion, uid, creation).

use serde_json::{Map, Value};

use conf::api::Kind;

use super::kinds::{self, label};
use super::manifest::Manifest;
use super::{out, Error};
use crate::client::Client;

/// Metadata only the server sets; dropped from files.
const SERVER_FIELDS: [&str; 5] = [
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "managedFields",
];

/// One object from a file, checked and placed in its namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub name: String,
    pub object: Value,
}

impl Target {
    /// `ippool/p1`.
    pub fn label(&self) -> String {
        label(self.kind, &self.name)
    }
}

/// Checks an object from a file; namespaced ones land in its namespace, else
/// `-n`, else `default`.
pub fn target(m: &Manifest, flag_ns: Option<&str>) -> Result<Target, String> {
    let kind = kinds::of_object(&m.object)?;
    let name = kinds::name(&m.object).to_string();
    if name.is_empty() {
        return Err(format!("{} without metadata.name", kind.kind));
    }
    let mut object = m.object.clone();
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Err(format!("{}: metadata is not a map", label(kind, &name)));
    };
    for f in SERVER_FIELDS {
        meta.remove(f);
    }
    let namespace = if kind.namespaced {
        let own = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
        let ns = match (own, flag_ns) {
            ("", None) => "default",
            ("", Some(flag)) => flag,
            (own, Some(flag)) if own != flag => {
                return Err(format!(
                    "{}: namespace {own} in the file does not match -n {flag}",
                    label(kind, &name)
                ))
            }
            (own, _) => own,
        }
        .to_string();
        meta.insert("namespace".into(), Value::String(ns.clone()));
        Some(ns)
    } else {
        meta.remove("namespace");
        None
    };
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
    Ok(Target {
        kind,
        namespace,
        name,
        object,
    })
}

/// What apply does, given the server's copy.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Create(Value),
    Update(Value),
    Unchanged,
}

/// The plan for a target: create when absent, nothing when the same, else a
/// replacement carrying the server's metadata with the file's labels and annotations.
pub fn plan(t: &Target, current: Option<&Value>) -> Plan {
    let Some(cur) = current else {
        return Plan::Create(t.object.clone());
    };
    if same(&t.object, cur) {
        return Plan::Unchanged;
    }
    let mut meta = cur
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let file_meta = t.object.get("metadata").and_then(Value::as_object);
    for key in ["labels", "annotations", "name", "namespace"] {
        match file_meta.and_then(|m| m.get(key)) {
            Some(v) => meta.insert(key.into(), v.clone()),
            None => meta.remove(key),
        };
    }
    let mut body = t.object.clone();
    if let Some(o) = body.as_object_mut() {
        o.insert("metadata".into(), Value::Object(meta));
    }
    Plan::Update(body)
}

/// Whether the file's object equals the server's in content, labels and annotations.
fn same(file: &Value, server: &Value) -> bool {
    let map = |v: &Value, p: &str| v.pointer(p).cloned().unwrap_or(Value::Object(Map::new()));
    let content = |v: &Value| -> Map<String, Value> {
        v.as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| {
                        !["apiVersion", "kind", "metadata", "status"].contains(&k.as_str())
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    content(file) == content(server)
        && map(file, "/metadata/labels") == map(server, "/metadata/labels")
        && map(file, "/metadata/annotations") == map(server, "/metadata/annotations")
}

/// How an error names the object: `file: kind/name`, or `file: object N`.
fn context(verb: &str, m: &Manifest, t: Option<&Target>) -> String {
    match t {
        Some(t) => format!("{verb} {}: {}", m.file, t.label()),
        None => format!("{verb} {}: object {}", m.file, m.index),
    }
}

/// Applies every object, reporting each; fails if any failed.
pub async fn apply(client: &Client, manifests: &[Manifest], ns: Option<&str>) -> Result<(), Error> {
    let mut failed = 0;
    for m in manifests {
        if let Err(e) = apply_one(client, m, ns).await {
            e.print();
            failed += 1;
        }
    }
    finish(failed, manifests.len())
}

async fn apply_one(client: &Client, m: &Manifest, ns: Option<&str>) -> Result<(), Error> {
    let t = target(m, ns).map_err(|e| Error::new(format!("{}: {e}", context("apply", m, None))))?;
    let at = context("apply", m, Some(&t));
    let ns = t.namespace.as_deref();
    let current = match client.get(t.kind, ns, &t.name).await {
        Ok(v) => Some(v),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(Error::client(&at, &e)),
    };
    let done = match plan(&t, current.as_ref()) {
        Plan::Unchanged => "unchanged",
        Plan::Create(body) => {
            client
                .create(t.kind, ns, &body)
                .await
                .map_err(|e| Error::client(&at, &e))?;
            "created"
        }
        Plan::Update(body) => {
            client
                .update(t.kind, ns, &t.name, &body)
                .await
                .map_err(|e| Error::client(&at, &e))?;
            "configured"
        }
    };
    out(&format!("{} {done}\n", t.label()))
}

/// Deletes every object the files name, reporting each.
pub async fn delete(
    client: &Client,
    manifests: &[Manifest],
    ns: Option<&str>,
    ignore_not_found: bool,
) -> Result<(), Error> {
    let mut failed = 0;
    for m in manifests {
        let result = match target(m, ns) {
            Err(e) => Err(Error::new(format!("{}: {e}", context("delete", m, None)))),
            Ok(t) => {
                let at = context("delete", m, Some(&t));
                delete_one(
                    client,
                    t.kind,
                    t.namespace.as_deref(),
                    &t.name,
                    ignore_not_found,
                )
                .await
                .map_err(|e| Error::client(&at, &e))
            }
        };
        if let Err(e) = result {
            e.print();
            failed += 1;
        }
    }
    finish(failed, manifests.len())
}

/// Deletes one object and says so; a 404 passes silently if `ignore_not_found`.
pub async fn delete_one(
    client: &Client,
    kind: &Kind,
    ns: Option<&str>,
    name: &str,
    ignore_not_found: bool,
) -> Result<(), crate::client::Error> {
    match client.delete(kind, ns, name).await {
        Ok(_) => {
            let _ = out(&format!("{} deleted\n", label(kind, name)));
            Ok(())
        }
        Err(e) if e.is_not_found() && ignore_not_found => Ok(()),
        Err(e) => Err(e),
    }
}

/// The result of a batch whose failures were printed one by one.
pub fn finish(failed: usize, total: usize) -> Result<(), Error> {
    match failed {
        0 => Ok(()),
        1 if total == 1 => Err(Error::reported()),
        n => Err(Error::new(format!("{n} of {total} objects failed"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(object: Value) -> Manifest {
        Manifest {
            file: "f.yaml".into(),
            index: 1,
            object,
        }
    }

    #[test]
    fn namespaces_and_checks() {
        let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                         "metadata": {"name": "data", "resourceVersion": "5"}, "spec": {"config": "{}"}});
        let t = target(&manifest(nad.clone()), None).expect("default ns");
        assert_eq!(
            (t.namespace.as_deref(), t.label().as_str()),
            (Some("default"), "networkattachmentdefinition/data")
        );
        assert_eq!(
            t.object["metadata"],
            json!({"name": "data", "namespace": "default"})
        );
        let t = target(&manifest(nad.clone()), Some("red")).expect("-n");
        assert_eq!(t.namespace.as_deref(), Some("red"));

        let mut own = nad.clone();
        own["metadata"]["namespace"] = json!("blue");
        let e = target(&manifest(own), Some("red")).expect_err("mismatch");
        assert!(
            e.contains("namespace blue in the file does not match -n red"),
            "{e}"
        );

        let pool = json!({"apiVersion": "plexus.io/v1", "kind": "IPPool",
                          "metadata": {"name": "p1", "namespace": "x"}, "status": {}});
        let t = target(&manifest(pool), Some("red")).expect("cluster-scoped");
        assert_eq!(t.namespace, None);
        assert_eq!(
            t.object,
            json!({"apiVersion": "plexus.io/v1", "kind": "IPPool", "metadata": {"name": "p1"}})
        );

        let e = target(
            &manifest(json!({"apiVersion": "plexus.io/v1", "kind": "IPPool"})),
            None,
        );
        assert_eq!(e.expect_err("no name"), "IPPool without metadata.name");
    }

    #[test]
    fn plans() {
        let file = json!({"apiVersion": "plexus.io/v1", "kind": "IPPool",
                          "metadata": {"name": "p1", "labels": {"a": "1"}}, "spec": {"cidrs": ["10.0.0.0/8"]}});
        let t = target(&manifest(file.clone()), None).expect("target");
        assert_eq!(plan(&t, None), Plan::Create(file.clone()));

        let server = json!({"apiVersion": "plexus.io/v1", "kind": "IPPool",
            "metadata": {"name": "p1", "labels": {"a": "1"}, "annotations": {},
                         "resourceVersion": "42", "uid": "u", "creationTimestamp": "t"},
            "spec": {"cidrs": ["10.0.0.0/8"]}});
        assert_eq!(plan(&t, Some(&server)), Plan::Unchanged);

        let mut changed = server.clone();
        changed["spec"]["cidrs"] = json!(["10.1.0.0/16"]);
        changed["metadata"]["annotations"] = json!({"old": "x"});
        let Plan::Update(body) = plan(&t, Some(&changed)) else {
            panic!("expected an update");
        };
        assert_eq!(body["spec"], file["spec"]);
        assert_eq!(
            body["metadata"],
            json!({"name": "p1", "labels": {"a": "1"}, "resourceVersion": "42", "uid": "u", "creationTimestamp": "t"})
        );
    }

    #[test]
    fn batch_results() {
        assert_eq!(finish(0, 3), Ok(()));
        assert_eq!(finish(1, 1), Err(Error::reported()));
        assert_eq!(
            finish(2, 3).expect_err("two").message,
            "2 of 3 objects failed"
        );
    }
}
