//! NetworkAttachmentDefinition-shaped network definitions from a directory.
//!
//! A definition without a namespace (or in one of the cluster namespaces) is a
//! cluster network any pod may use; one with a namespace is a tenant network,
//! usable only by pods of that namespace. A file that does not parse never
//! stops pods that do not ask for what it defines; asking for it gives its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cni::{code, NetConfList};
use serde::Deserialize;
use serde_json::Value;

/// Who may use a network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Any pod.
    Cluster,
    /// Only pods of this namespace.
    Tenant(String),
    /// A ClusterNetwork: pods of the namespaces listed (`*`: every one).
    Allowed(Vec<String>),
}

/// One network, ready to hand to its delegates.
#[derive(Debug, Clone)]
pub struct Definition {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, if any.
    pub namespace: Option<String>,
    pub scope: Scope,
    /// `spec.config`, as a conflist (a single config is promoted).
    pub list: NetConfList,
    /// The file it came from.
    pub source: PathBuf,
    /// Its default security groups (`plexus.io/security-groups`), of the
    /// pod's namespace.
    pub security_groups: Vec<String>,
    /// Whether pods may add groups of their own (`plexus.io/pod-security-groups`).
    pub pod_security_groups: bool,
    /// The device resource its interface needs
    /// (`k8s.v1.cni.cncf.io/resourceName`): the device kubelet allocated to
    /// the pod becomes the delegate's `deviceID`.
    pub resource_name: Option<String>,
}

/// The annotation naming a definition's device resource, as Multus reads it.
pub const RESOURCE_ANNOTATION: &str = "k8s.v1.cni.cncf.io/resourceName";

fn resource_annotation(annotations: &BTreeMap<String, String>) -> Option<String> {
    annotations
        .get(RESOURCE_ANNOTATION)
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
}

/// A definition's security-group annotations.
fn group_annotations(annotations: &BTreeMap<String, String>) -> (Vec<String>, bool) {
    let groups = annotations
        .get(crate::api::SECURITY_GROUPS_ANNOTATION)
        .map(|g| {
            g.split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let pods = annotations
        .get(crate::api::POD_GROUPS_ANNOTATION)
        .is_some_and(|v| v == "true");
    (groups, pods)
}

/// Why a definition cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("network {reference:?} not found for namespace {pod_namespace:?}")]
    NotFound {
        reference: String,
        pod_namespace: String,
        /// Files that did not parse, which may be what was meant.
        broken: Vec<String>,
    },
    #[error("network {reference:?} belongs to namespace {owner:?}; pods of {pod_namespace:?} may not use it")]
    Forbidden {
        reference: String,
        owner: String,
        pod_namespace: String,
    },
    #[error("cluster network {reference:?} allows namespaces {allowed:?}; pods of {pod_namespace:?} may not use it")]
    NotAllowed {
        reference: String,
        allowed: Vec<String>,
        pod_namespace: String,
    },
    #[error("network definition in {source_file}: {reason}")]
    Invalid { source_file: String, reason: String },
    #[error("cannot read network definitions in {dir}: {reason}")]
    Unreadable { dir: String, reason: String },
}

impl From<Error> for cni::Error {
    fn from(e: Error) -> cni::Error {
        let code = match &e {
            Error::Unreadable { .. } => code::IO_FAILURE,
            _ => code::INVALID_NETWORK_CONFIG,
        };
        let details = match &e {
            Error::NotFound { broken, .. } if !broken.is_empty() => {
                format!(
                    "these definition files did not parse: {}",
                    broken.join("; ")
                )
            }
            _ => String::new(),
        };
        cni::Error::new(code, e.to_string()).with_details(details)
    }
}

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct Spec {
    #[serde(default)]
    config: String,
    /// A SecurityGroup's: kept whole.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

type Key = (Option<String>, String);

/// Every definition found in a directory, and every one that failed.
#[derive(Debug, Default)]
pub struct Definitions {
    ok: BTreeMap<Key, Definition>,
    /// Named definitions that are present but unusable.
    bad: BTreeMap<Key, Error>,
    /// Files (or documents) that did not parse far enough to have a name.
    unnamed: Vec<String>,
    /// SecurityGroups by namespace and name; a broken one with its error.
    groups: BTreeMap<(String, String), Result<crate::api::SecurityGroupSpec, String>>,
    /// Namespaces through which a cluster definition may be named, as
    /// Multus users write it (`default/macnet` for a `macnet` without
    /// namespace): the node's `clusterNamespaces`, and `default`.
    cluster_namespaces: Vec<String>,
}

impl Definitions {
    /// Loads `*.yaml`, `*.yml` and `*.json` from `dir` (a missing dir is empty).
    /// Namespaces in `cluster_namespaces` hold cluster networks.
    pub fn load_dir(dir: &Path, cluster_namespaces: &[String]) -> Result<Definitions, Error> {
        let mut defs = Definitions {
            cluster_namespaces: cluster_namespaces.to_vec(),
            ..Definitions::default()
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(defs),
            Err(e) => {
                return Err(Error::Unreadable {
                    dir: dir.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let hidden = p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                !hidden && matches!(ext, "yaml" | "yml" | "json")
            })
            .collect();
        files.sort();
        for file in files {
            defs.load_file(&file, cluster_namespaces);
        }
        Ok(defs)
    }

    /// The definitions a pod of one namespace can see in the central API:
    /// `nads` (NetworkAttachmentDefinition objects) and `cluster_networks`
    /// (ClusterNetwork objects), as stored; `source` names where they were
    /// read, for messages. A ClusterNetwork is found by its bare name.
    pub fn from_api(nads: &[Value], cluster_networks: &[Value], source: &str) -> Definitions {
        let mut defs = Definitions::default();
        let file = Path::new(source);
        for obj in nads {
            defs.add_object(obj.clone(), file, &[]);
        }
        for obj in cluster_networks {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let key: Key = (None, name.clone());
            let spec = crate::api::ClusterNetworkSpec::deserialize(
                obj.get("spec").unwrap_or(&Value::Null),
            );
            let parsed = spec
                .map_err(|e| format!("spec: {e}"))
                .and_then(|s| parse_config(&s.config, &name).map(|l| (s, l)));
            match parsed {
                Ok((spec, list)) => {
                    let annotations: BTreeMap<String, String> = obj
                        .pointer("/metadata/annotations")
                        .and_then(|a| serde_json::from_value(a.clone()).ok())
                        .unwrap_or_default();
                    let (security_groups, pod_security_groups) = group_annotations(&annotations);
                    defs.ok.insert(
                        key,
                        Definition {
                            name,
                            namespace: None,
                            scope: Scope::Allowed(spec.allowed_namespaces),
                            list,
                            source: file.to_path_buf(),
                            security_groups,
                            pod_security_groups,
                            resource_name: resource_annotation(&annotations),
                        },
                    );
                }
                Err(reason) => {
                    let err = Error::Invalid {
                        source_file: source.to_string(),
                        reason: format!("clusternetwork {name}: {reason}"),
                    };
                    defs.bad.insert(key, err);
                }
            }
        }
        defs
    }

    /// The definitions of one file's `text` (JSON when `source` ends in
    /// `.json`, YAML documents otherwise), as [`Definitions::load_dir`]
    /// reads each file.
    pub fn from_text(text: &str, source: &Path, cluster_namespaces: &[String]) -> Definitions {
        let mut defs = Definitions {
            cluster_namespaces: cluster_namespaces.to_vec(),
            ..Definitions::default()
        };
        defs.add_text(text, source, cluster_namespaces);
        defs
    }

    fn load_file(&mut self, file: &Path, cluster_namespaces: &[String]) {
        let where_ = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => return self.unnamed.push(format!("{where_}: {e}")),
        };
        self.add_text(&text, file, cluster_namespaces);
    }

    fn add_text(&mut self, text: &str, file: &Path, cluster_namespaces: &[String]) {
        let where_ = file.display().to_string();
        let docs: Result<Vec<Value>, String> = if where_.ends_with(".json") {
            serde_json::from_str(text)
                .map(|v| vec![v])
                .map_err(|e| e.to_string())
        } else {
            serde_yaml_ng::Deserializer::from_str(text)
                .map(|d| Value::deserialize(d).map_err(|e| e.to_string()))
                .filter(|d| !matches!(d, Ok(Value::Null)))
                .collect()
        };
        match docs {
            Ok(docs) => {
                for doc in docs {
                    self.add_object(doc, file, cluster_namespaces);
                }
            }
            Err(e) => self.unnamed.push(format!("{where_}: does not parse: {e}")),
        }
    }

    fn add_object(&mut self, doc: Value, file: &Path, cluster_namespaces: &[String]) {
        let where_ = file.display().to_string();
        let obj: Object = match serde_json::from_value(doc) {
            Ok(o) => o,
            Err(e) => return self.unnamed.push(format!("{where_}: not an object: {e}")),
        };
        if obj.kind == "List" {
            for item in obj.items {
                self.add_object(item, file, cluster_namespaces);
            }
            return;
        }
        if obj.kind == crate::api::SECURITY_GROUP.kind {
            return self.add_group(obj, &where_);
        }
        if !obj.kind.is_empty() && obj.kind != "NetworkAttachmentDefinition" {
            return self.unnamed.push(format!(
                "{where_}: kind {:?} is not NetworkAttachmentDefinition",
                obj.kind
            ));
        }
        if obj.metadata.name.is_empty() {
            return self
                .unnamed
                .push(format!("{where_}: metadata.name is missing"));
        }
        let key = (obj.metadata.namespace.clone(), obj.metadata.name.clone());
        let invalid = |reason: String| Error::Invalid {
            source_file: where_.clone(),
            reason: format!("{}: {reason}", display_key(&key)),
        };
        if let Some(prev) = self.ok.remove(&key) {
            let reason = format!("defined twice, also in {}", prev.source.display());
            self.bad.insert(key.clone(), invalid(reason));
            return;
        }
        if self.bad.contains_key(&key) {
            return;
        }
        match parse_config(&obj.spec.config, &obj.metadata.name) {
            Ok(list) => {
                let scope = match &obj.metadata.namespace {
                    Some(ns) if !cluster_namespaces.contains(ns) => Scope::Tenant(ns.clone()),
                    _ => Scope::Cluster,
                };
                let (security_groups, pod_security_groups) =
                    group_annotations(&obj.metadata.annotations);
                let def = Definition {
                    name: obj.metadata.name,
                    namespace: obj.metadata.namespace,
                    scope,
                    list,
                    source: file.to_path_buf(),
                    security_groups,
                    pod_security_groups,
                    resource_name: resource_annotation(&obj.metadata.annotations),
                };
                self.ok.insert(key, def);
            }
            Err(reason) => {
                self.bad.insert(key.clone(), invalid(reason));
            }
        }
    }

    /// SecurityGroup objects (of the API, or read elsewhere) from `source`.
    pub fn add_security_groups(&mut self, objects: &[Value], source: &str) {
        for obj in objects {
            match serde_json::from_value::<Object>(obj.clone()) {
                Ok(o) => self.add_group(o, source),
                Err(e) => self.unnamed.push(format!("{source}: not an object: {e}")),
            }
        }
    }

    fn add_group(&mut self, obj: Object, where_: &str) {
        let Some(ns) = obj.metadata.namespace.clone() else {
            return self.unnamed.push(format!(
                "{where_}: SecurityGroup {:?} has no namespace (groups are a namespace's)",
                obj.metadata.name
            ));
        };
        let spec = serde_json::from_value::<crate::api::SecurityGroupSpec>(Value::Object(
            obj.spec.rest.clone(),
        ))
        .map_err(|e| format!("{where_}: SecurityGroup {ns}/{}: {e}", obj.metadata.name));
        self.groups.insert((ns, obj.metadata.name), spec);
    }

    /// The SecurityGroup `name` of `namespace`.
    pub fn security_group(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<&crate::api::SecurityGroupSpec, String> {
        match self.groups.get(&(namespace.to_string(), name.to_string())) {
            Some(Ok(spec)) => Ok(spec),
            Some(Err(e)) => Err(e.clone()),
            None => Err(format!(
                "security group {name:?} not found in namespace {namespace:?}"
            )),
        }
    }

    /// The namespaces (besides `default`) through which a cluster
    /// definition may be named.
    pub fn set_cluster_namespaces(&mut self, namespaces: &[String]) {
        self.cluster_namespaces = namespaces.to_vec();
    }

    /// Finds the network a pod of `pod_namespace` asks for as `namespace/name`
    /// or `name`: its own namespace's first, then cluster networks. A
    /// namespace that is `default` or one of the cluster namespaces also
    /// names a cluster definition without namespace (as Multus resolves
    /// `default/macnet`), when it has no definition of that name itself.
    pub fn resolve(
        &self,
        namespace: Option<&str>,
        name: &str,
        pod_namespace: &str,
    ) -> Result<&Definition, Error> {
        let reference = match namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        let mut candidates: Vec<Key> = Vec::new();
        match namespace {
            Some(ns) => {
                candidates.push((Some(ns.to_string()), name.to_string()));
                if ns == "default" || self.cluster_namespaces.iter().any(|c| c == ns) {
                    candidates.push((None, name.to_string()));
                }
            }
            None => {
                candidates.push((Some(pod_namespace.to_string()), name.to_string()));
                candidates.push((None, name.to_string()));
            }
        }
        for key in &candidates {
            if let Some(def) = self.ok.get(key) {
                return permit(def, reference, pod_namespace);
            }
            if let Some(err) = self.bad.get(key) {
                return Err(err.clone());
            }
        }
        // A namespace-less reference may also name a network in a cluster namespace.
        if namespace.is_none() {
            if let Some(def) = self.in_cluster_namespace(name) {
                return Ok(def);
            }
        }
        Err(self.not_found(reference, pod_namespace))
    }

    /// Finds a cluster network by name (one without a namespace, a
    /// ClusterNetwork, or one in a cluster namespace) for a pod of
    /// `pod_namespace`. A tenant's network of the same name never stands in
    /// for it: the node's default network is the admin's choice.
    pub fn resolve_cluster(&self, name: &str, pod_namespace: &str) -> Result<&Definition, Error> {
        let key: Key = (None, name.to_string());
        if let Some(def) = self.ok.get(&key) {
            return permit(def, name.to_string(), pod_namespace);
        }
        if let Some(err) = self.bad.get(&key) {
            return Err(err.clone());
        }
        self.in_cluster_namespace(name)
            .ok_or_else(|| self.not_found(name.to_string(), pod_namespace))
    }

    fn in_cluster_namespace(&self, name: &str) -> Option<&Definition> {
        self.ok
            .values()
            .find(|d| d.name == name && d.scope == Scope::Cluster)
    }

    fn not_found(&self, reference: String, pod_namespace: &str) -> Error {
        Error::NotFound {
            reference,
            pod_namespace: pod_namespace.to_string(),
            broken: self.unnamed.clone(),
        }
    }

    /// Every usable definition.
    pub fn iter(&self) -> impl Iterator<Item = &Definition> {
        self.ok.values()
    }

    /// Every problem found while loading, for STATUS and logs.
    pub fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self.bad.values().map(|e| e.to_string()).collect();
        p.extend(self.unnamed.iter().cloned());
        p
    }
}

/// `def` if its scope lets pods of `pod_namespace` use it.
fn permit<'a>(
    def: &'a Definition,
    reference: String,
    pod_namespace: &str,
) -> Result<&'a Definition, Error> {
    match &def.scope {
        Scope::Tenant(owner) if owner != pod_namespace => Err(Error::Forbidden {
            reference,
            owner: owner.clone(),
            pod_namespace: pod_namespace.to_string(),
        }),
        Scope::Allowed(allowed) if !crate::api::allows(allowed, pod_namespace) => {
            Err(Error::NotAllowed {
                reference,
                allowed: allowed.clone(),
                pod_namespace: pod_namespace.to_string(),
            })
        }
        _ => Ok(def),
    }
}

fn display_key(key: &Key) -> String {
    match &key.0 {
        Some(ns) => format!("{ns}/{}", key.1),
        None => key.1.clone(),
    }
}

/// `spec.config` must be a CNI config or conflist; a missing `name` is the
/// definition's name.
pub(crate) fn parse_config(config: &str, name: &str) -> Result<NetConfList, String> {
    if config.trim().is_empty() {
        return Err("spec.config is empty".into());
    }
    let mut v: Value =
        serde_json::from_str(config).map_err(|e| format!("spec.config is not JSON: {e}"))?;
    if let Value::Object(m) = &mut v {
        let named = m
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty());
        if !named {
            m.insert("name".into(), Value::String(name.to_string()));
        }
    }
    NetConfList::parse_value(&v).map_err(|e| format!("spec.config: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory of this test's own, removed when dropped
    /// (also when the test fails).
    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("plexus-conf-test-")
            .tempdir()
            .unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const MACVLAN: &str = r#"
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: mv
spec:
  config: '{"cniVersion":"0.3.1","type":"macvlan","master":"eth1","ipam":{"type":"host-local","subnet":"10.9.0.0/24"}}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: private
  namespace: red
spec:
  config: '{"cniVersion":"1.0.0","name":"red-private","plugins":[{"type":"bridge"},{"type":"tuning"}]}'
"#;

    #[test]
    fn loads_yaml_json_and_resolves_by_scope() {
        let json = r#"{"kind":"List","items":[{"metadata":{"name":"blue-net","namespace":"blue"},
            "spec":{"config":"{\"cniVersion\":\"0.4.0\",\"type\":\"ipvlan\"}"}}]}"#;
        let dir = dir_with(&[
            ("10-nets.yaml", MACVLAN),
            ("20-blue.json", json),
            ("README", "x"),
        ]);
        let defs = Definitions::load_dir(dir.path(), &[]).unwrap();
        assert_eq!(defs.iter().count(), 3);
        let mv = defs.resolve(None, "mv", "red").unwrap();
        assert_eq!(mv.scope, Scope::Cluster);
        assert_eq!(mv.list.name, "mv");
        assert_eq!(mv.list.plugin_type(0), "macvlan");
        let p = defs.resolve(None, "private", "red").unwrap();
        assert_eq!(p.list.name, "red-private");
        assert_eq!(p.list.plugins.len(), 2);
        assert!(defs.resolve(Some("red"), "private", "red").is_ok());
        assert!(matches!(
            defs.resolve(Some("red"), "private", "blue"),
            Err(Error::Forbidden { .. })
        ));
        assert!(matches!(
            defs.resolve(None, "private", "blue"),
            Err(Error::NotFound { .. })
        ));
        assert!(defs.resolve(None, "blue-net", "blue").is_ok());
    }

    #[test]
    fn broken_files_are_named_only_when_they_matter() {
        let bad_config = "metadata: {name: bad}\nspec: {config: '{\"type\": '}\n";
        let dir = dir_with(&[
            ("a.yaml", MACVLAN),
            ("b.yaml", bad_config),
            ("c.yaml", ": : :\n\t-"),
        ]);
        let defs = Definitions::load_dir(dir.path(), &[]).unwrap();
        assert!(defs.resolve(None, "mv", "default").is_ok());
        let e = defs.resolve(None, "bad", "default").unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("b.yaml"));
        let e: cni::Error = defs.resolve(None, "other", "default").unwrap_err().into();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
        assert!(e.details.contains("c.yaml"), "{e}");
        assert_eq!(defs.problems().len(), 2);
    }

    #[test]
    fn api_objects_with_allowed_namespaces() {
        let nad: Value = serde_json::json!({"apiVersion": "k8s.cni.cncf.io/v1",
            "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "data", "namespace": "red"},
            "spec": {"config": "{\"cniVersion\":\"1.0.0\",\"type\":\"macvlan\"}"}});
        let cnet: Value = serde_json::json!({"apiVersion": "plexus.io/v1", "kind": "ClusterNetwork",
            "metadata": {"name": "fast"},
            "spec": {"config": "{\"cniVersion\":\"1.0.0\",\"type\":\"plexus-ipvlan\"}",
                     "allowedNamespaces": ["red"]}});
        let broken: Value =
            serde_json::json!({"metadata": {"name": "bad"}, "spec": {"config": "{"}});
        let defs = Definitions::from_api(&[nad], &[cnet, broken], "etcd");
        assert_eq!(defs.resolve(None, "data", "red").unwrap().list.name, "data");
        assert_eq!(defs.resolve(None, "fast", "red").unwrap().list.name, "fast");
        let e = defs.resolve(None, "fast", "blue").unwrap_err();
        assert!(matches!(e, Error::NotAllowed { .. }), "{e}");
        assert!(matches!(
            defs.resolve(Some("red"), "data", "blue"),
            Err(Error::Forbidden { .. })
        ));
        assert!(matches!(
            defs.resolve(None, "bad", "red"),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn a_cluster_network_by_name_is_never_a_tenants() {
        let nad = |ns: &str| {
            serde_json::json!({"metadata": {"name": "pods", "namespace": ns},
                "spec": {"config": "{\"cniVersion\":\"1.0.0\",\"type\":\"ptp\"}"}})
        };
        let cnet = serde_json::json!({"metadata": {"name": "pods"},
            "spec": {"config": "{\"cniVersion\":\"1.0.0\",\"type\":\"plexus-veth\"}",
                     "allowedNamespaces": ["*"]}});
        let defs = Definitions::from_api(&[nad("red")], &[cnet], "etcd");
        let def = defs.resolve_cluster("pods", "red").unwrap();
        assert_eq!(def.list.plugin_type(0), "plexus-veth");
        let tenant_only = Definitions::from_api(&[nad("red")], &[], "etcd");
        assert!(matches!(
            tenant_only.resolve_cluster("pods", "red"),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn cluster_namespaces_and_duplicates() {
        let dup =
            "metadata: {name: mv}\nspec: {config: '{\"cniVersion\":\"1.0.0\",\"type\":\"x\"}'}\n";
        let dir = dir_with(&[("a.yaml", MACVLAN), ("b.yaml", dup)]);
        let defs = Definitions::load_dir(dir.path(), &["red".to_string()]).unwrap();
        assert!(defs.resolve(None, "private", "blue").is_ok());
        let e = defs.resolve(None, "mv", "x").unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
    }

    #[test]
    fn multus_names_of_cluster_definitions() {
        let dir = dir_with(&[("a.yaml", MACVLAN)]);
        let defs = Definitions::load_dir(dir.path(), &["kube-system".to_string()]).unwrap();
        // `mv` has no namespace: `default/mv` and `kube-system/mv` name it
        // for a pod of any namespace, as Multus users write it.
        for ns in ["default", "kube-system"] {
            let def = defs.resolve(Some(ns), "mv", "blue").unwrap();
            assert_eq!(def.list.name, "mv");
        }
        // Any other namespace is that namespace's own.
        assert!(matches!(
            defs.resolve(Some("blue"), "mv", "blue"),
            Err(Error::NotFound { .. })
        ));
        // A tenant's network in `default` comes first, and stays its own.
        let own = "metadata: {name: mv, namespace: default}\nspec: {config: '{\"cniVersion\":\"1.0.0\",\"type\":\"ipvlan\"}'}\n";
        let dir = dir_with(&[("a.yaml", MACVLAN), ("b.yaml", own)]);
        let defs = Definitions::load_dir(dir.path(), &[]).unwrap();
        let def = defs.resolve(Some("default"), "mv", "default").unwrap();
        assert_eq!(def.list.plugin_type(0), "ipvlan");
        assert!(matches!(
            defs.resolve(Some("default"), "mv", "blue"),
            Err(Error::Forbidden { .. })
        ));
        // ClusterNetworks of the API likewise, still only where allowed.
        let cnet = serde_json::json!({"metadata": {"name": "fast"},
            "spec": {"config": "{\"cniVersion\":\"1.0.0\",\"type\":\"plexus-ipvlan\"}",
                     "allowedNamespaces": ["red"]}});
        let api = Definitions::from_api(&[], &[cnet], "etcd");
        assert!(api.resolve(Some("default"), "fast", "red").is_ok());
        assert!(matches!(
            api.resolve(Some("default"), "fast", "blue"),
            Err(Error::NotAllowed { .. })
        ));
    }
}
