//! What Kubernetes clients read before anything else: the API groups and
//! their resources, the version, and OpenAPI v3 documents (kubectl reads the
//! latter to learn that the server validates fields itself).

use serde_json::{json, Map, Value};

use conf::api::{Kind, KINDS};

fn groups() -> Vec<&'static str> {
    let mut g: Vec<&str> = KINDS.iter().map(|k| k.group).collect();
    g.dedup();
    g
}

/// `GET /api`.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})
}

/// `GET /api/v1`: only namespaces, which kubectl reads before an apply.
pub fn core_resources() -> Value {
    json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "namespaces", "singularName": "namespace", "namespaced": false,
         "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]}]})
}

fn group(name: &str) -> Value {
    let gv = format!("{name}/v1");
    json!({"name": name, "versions": [{"groupVersion": gv, "version": "v1"}],
           "preferredVersion": {"groupVersion": gv, "version": "v1"}})
}

/// `GET /apis`.
pub fn group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1",
           "groups": groups().into_iter().map(group).collect::<Vec<_>>()})
}

/// `GET /apis/{group}`.
pub fn group_doc(name: &str) -> Option<Value> {
    groups().contains(&name).then(|| {
        let mut g = group(name);
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        g
    })
}

const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `GET /apis/{group}/{version}`.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let kinds: Vec<&Kind> = KINDS
        .into_iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return None;
    }
    let resources: Vec<Value> = kinds
        .iter()
        .map(|k| {
            json!({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced,
                   "kind": k.kind, "verbs": VERBS, "shortNames": k.short_names,
                   "categories": ["plexus"]})
        })
        .collect();
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": format!("{group}/{version}"), "resources": resources}))
}

/// `GET /version`.
pub fn version() -> Value {
    json!({"major": "1", "minor": "32", "gitVersion": concat!("v1.32.0+plexus-", env!("CARGO_PKG_VERSION")),
           "platform": "linux/amd64", "goVersion": "", "compiler": "rustc"})
}

/// `GET /openapi/v3`: one document per group version.
pub fn openapi_index() -> Value {
    let mut paths = Map::new();
    for g in groups() {
        paths.insert(
            format!("apis/{g}/v1"),
            json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/v1?hash=plexus1")}),
        );
    }
    paths.insert(
        "api/v1".into(),
        json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=plexus1"}),
    );
    json!({"paths": paths})
}

fn schema_name(k: &Kind) -> String {
    let g: Vec<&str> = k.group.split('.').rev().collect();
    format!("{}.{}.{}", g.join("."), k.version, k.kind)
}

fn object_schema(k: &Kind) -> Value {
    let spec = if *k == conf::api::NAD {
        json!({"type": "object", "properties": {"config": {"type": "string"}}})
    } else if *k == conf::api::CLUSTER_NETWORK {
        json!({"type": "object", "required": ["config"], "properties": {
            "config": {"type": "string"},
            "allowedNamespaces": {"type": "array", "items": {"type": "string"}}}})
    } else if *k == conf::api::IP_POOL {
        json!({"type": "object", "properties": {
            "cidrs": {"type": "array", "items": {"type": "string"}},
            "ranges": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            "blockSizes": {"type": "object", "properties": {"ipv4": {"type": "integer"}, "ipv6": {"type": "integer"}}},
            "exclude": {"type": "array", "items": {"type": "string"}},
            "routes": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            "allowedNamespaces": {"type": "array", "items": {"type": "string"}}}})
    } else if *k == conf::api::SECURITY_GROUP {
        json!({"type": "object", "properties": {
            "description": {"type": "string"},
            "rules": {"type": "array", "items": {"type": "object", "properties": {
                "direction": {"type": "string"}, "ethertype": {"type": "string"},
                "protocol": {"type": "string"},
                "portRangeMin": {"type": "integer"}, "portRangeMax": {"type": "integer"},
                "icmpType": {"type": "integer"}, "icmpCode": {"type": "integer"},
                "remoteIpPrefix": {"type": "string"}, "remoteGroup": {"type": "string"}}}}}})
    } else if *k == conf::api::NODE {
        json!({"type": "object", "properties": {
            "agentStarted": {"type": "string"}, "leaseSeconds": {"type": "integer"}}})
    } else {
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
    };
    json!({"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        "spec": spec},
        "x-kubernetes-group-version-kind": [{"group": k.group, "version": k.version, "kind": k.kind}]})
}

/// The write operations of a path, each declaring that the server takes
/// `fieldValidation` (so kubectl leaves validation to the server).
fn operations(k: &Kind, collection: bool) -> Value {
    let param = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                       {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                       {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}]);
    let reference = json!({"$ref": format!("#/components/schemas/{}", schema_name(k))});
    let body = json!({"content": {"application/json": {"schema": reference}}});
    let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
    let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
    let op = |action: &str| {
        json!({"parameters": param, "requestBody": body, "responses": ok,
               "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk})
    };
    if collection {
        json!({"get": {"responses": ok, "x-kubernetes-action": "list",
                       "x-kubernetes-group-version-kind": gvk},
               "post": op("post")})
    } else {
        json!({"get": {"responses": ok, "x-kubernetes-action": "get",
                       "x-kubernetes-group-version-kind": gvk},
               "put": op("put"), "patch": op("patch"), "delete": {"responses": ok,
               "x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk}})
    }
}

/// `GET /openapi/v3/apis/{group}/{version}` (or `api/v1`).
pub fn openapi_doc(group: &str, version: &str) -> Option<Value> {
    let kinds: Vec<&Kind> = KINDS
        .into_iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if group.is_empty() && version == "v1" {
        return Some(json!({"openapi": "3.0.0",
            "info": {"title": "Plexus", "version": "v1"}, "paths": {},
            "components": {"schemas": {}}}));
    }
    if kinds.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for k in kinds {
        let base = format!("/apis/{}/{}", k.group, k.version);
        let collection = if k.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", k.plural)
        } else {
            format!("{base}/{}", k.plural)
        };
        paths.insert(collection.clone(), operations(k, true));
        paths.insert(format!("{collection}/{{name}}"), operations(k, false));
        schemas.insert(schema_name(k), object_schema(k));
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Plexus", "version": version},
                "paths": paths, "components": {"schemas": schemas}}),
    )
}
