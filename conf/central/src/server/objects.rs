//! Create, read, update, patch and delete of the API's objects, each write
//! validated before anything is stored and guarded against what is in use.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp};
use ipam::block::{pool_blocks_prefix, Block};
use ipam::pool::overlaps;
use ipam::Pool;
use serde_json::{json, Map, Value};

use conf::api::{self, Kind};
use conf::validate::{self, FieldError};

use super::http::{now_rfc3339, uuid4, ApiError};
use super::store::{delete_op, put_op, unchanged_since, Stored};
use super::App;

/// The IPAM keys' prefix (`plexus-ipam`'s default).
pub const IPAM_PREFIX: &str = ipam::config::DEFAULT_PREFIX;

/// An object as served: the stored value with `metadata.resourceVersion`.
pub fn served(s: &Stored) -> Value {
    let mut v = s.value.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(s.mod_rev.to_string()));
    }
    v
}

/// The stored bytes with `metadata.resourceVersion` spliced in, without
/// decoding the object. Stored values are written by `serde_json` from a
/// validated object with no `status` (whose keys are sorted), so the first
/// `"metadata":{` is the object's own.
pub fn served_bytes(raw: &[u8], rev: i64) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"\"metadata\":{";
    let at = raw.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let mut out = Vec::with_capacity(raw.len() + 32);
    out.extend_from_slice(&raw[..at]);
    out.extend_from_slice(format!("\"resourceVersion\":\"{rev}\"").as_bytes());
    if raw.get(at) != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(&raw[at..]);
    Some(out)
}

/// `GET` one object, as bytes to send.
pub async fn get_bytes(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    name: &str,
) -> Result<Vec<u8>, ApiError> {
    match app.store.get_bytes(&kind.key(ns, name)).await? {
        Some((raw, rev)) => match served_bytes(&raw, rev) {
            Some(b) => Ok(b),
            None => serde_json::to_vec(&get(app, kind, ns, name).await?)
                .map_err(|e| ApiError::internal(e.to_string())),
        },
        None => Err(not_found(kind, name)),
    }
}

/// `GET` a collection without selectors, as bytes to send: the stored
/// objects are not decoded.
pub async fn list_bytes(app: &App, kind: &Kind, ns: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let (items, rev) = app.store.list_bytes(&kind.prefix(ns)).await?;
    let mut out = Vec::with_capacity(items.iter().map(|(r, _)| r.len() + 40).sum::<usize>() + 160);
    out.extend_from_slice(
        format!("{{\"apiVersion\":\"{}\",\"items\":[", kind.api_version()).as_bytes(),
    );
    for (i, (raw, mod_rev)) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match served_bytes(raw, *mod_rev) {
            Some(b) => out.extend_from_slice(&b),
            None => return Err(ApiError::internal("a stored object has no metadata")),
        }
    }
    out.extend_from_slice(
        format!(
            "],\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{rev}\"}}}}\n",
            kind.kind
        )
        .as_bytes(),
    );
    Ok(out)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn not_found(kind: &Kind, name: &str) -> ApiError {
    ApiError::not_found(format!("{}.{} {name:?} not found", kind.plural, kind.group))
        .about(kind.plural, name)
}

/// `GET` one object.
pub async fn get(app: &App, kind: &Kind, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
    match app.store.get(&kind.key(ns, name)).await? {
        Some(s) => Ok(served(&s)),
        None => Err(not_found(kind, name)),
    }
}

/// A label selector of equalities, inequalities and existence tests.
pub fn selector_matches(selector: &str, obj: &Value) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k.trim()) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                label(k.trim()).is_none()
            } else {
                label(term).is_some()
            }
        })
}

/// A field selector: `metadata.name` and `metadata.namespace` equalities.
pub fn fields_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => {
                let v = v.trim_start_matches('=');
                match k.trim_end_matches('!') {
                    "metadata.name" => (meta_str(obj, "name") == Some(v)) != k.ends_with('!'),
                    "metadata.namespace" => {
                        (meta_str(obj, "namespace") == Some(v)) != k.ends_with('!')
                    }
                    _ => true,
                }
            }
            None => true,
        })
}

/// Refuses selectors this server does not evaluate (set-based label terms,
/// field selectors other than `metadata.name` and `metadata.namespace`),
/// rather than matching nothing or everything.
pub fn check_selectors(labels: Option<&str>, fields: Option<&str>) -> Result<(), ApiError> {
    if let Some(l) = labels {
        if l.contains('(') || l.contains(" in ") || l.contains(" notin ") {
            return Err(ApiError::bad_request(format!(
                "labelSelector {l:?}: only equality (=, ==, !=) and existence (key, !key) are supported"
            )));
        }
    }
    for term in fields.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        let key = term.split(['=', '!']).next().unwrap_or("");
        if !matches!(key, "metadata.name" | "metadata.namespace") || !term.contains('=') {
            return Err(ApiError::bad_request(format!(
                "fieldSelector {term:?}: only metadata.name and metadata.namespace are supported"
            )));
        }
    }
    Ok(())
}

/// `GET` a collection (one namespace, or all).
pub async fn list(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    labels: Option<&str>,
    fields: Option<&str>,
) -> Result<Value, ApiError> {
    let (items, rev) = app.store.list(&kind.prefix(ns)).await?;
    let items: Vec<Value> = items
        .iter()
        .map(served)
        .filter(|o| labels.is_none_or(|l| selector_matches(l, o)))
        .filter(|o| fields.is_none_or(|f| fields_match(f, o)))
        .collect();
    Ok(json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.kind),
        "metadata": {"resourceVersion": rev.to_string()},
        "items": items,
    }))
}

/// `metadata.<field>` as the URL gives it: filled when absent, refused when
/// the body says otherwise.
fn set_from_url(meta: &mut Map<String, Value>, field: &str, url: &str) -> Result<(), ApiError> {
    match meta.get(field).and_then(Value::as_str) {
        Some(v) if v != url => Err(ApiError::bad_request(format!(
            "the {field} of the object ({v}) does not match the {field} on the request ({url})"
        ))),
        _ => {
            meta.insert(field.into(), json!(url));
            Ok(())
        }
    }
}

/// Checks a body against the URL it was sent to and the kind's rules, and
/// fills what the server owns (namespace, uid, timestamp).
fn prepare(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    name: Option<&str>,
    body: &mut Value,
) -> Result<validate::Valid, ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    };
    // kubectl may leave these for the server to fill.
    obj.entry("apiVersion")
        .or_insert_with(|| json!(kind.api_version()));
    obj.entry("kind").or_insert_with(|| json!(kind.kind));
    // The server owns status; none of these kinds has one yet.
    obj.remove("status");
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else {
        return Err(ApiError::bad_request("metadata is not an object"));
    };
    if kind.namespaced {
        set_from_url(meta, "namespace", ns.unwrap_or("default"))?;
    } else {
        meta.remove("namespace");
    }
    // Fields only the server may set; a client's are dropped.
    for owned in [
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    ] {
        meta.remove(owned);
    }
    let unnamed = meta
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    if unnamed && name.is_none() {
        if let Some(base) = meta.get("generateName").and_then(Value::as_str) {
            let suffix: String = uuid4()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(5)
                .collect();
            meta.insert("name".into(), json!(format!("{base}{suffix}")));
        }
    }
    if let Some(url_name) = name {
        set_from_url(meta, "name", url_name)?;
    }
    let obj_name = meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    validate::validate(kind, body, &app.types)
        .map_err(|errs| ApiError::invalid(kind.kind, &obj_name, &errs))
}

/// Store-side checks of a network's config: every pool it names exists and
/// lets its namespaces draw from it.
async fn check_pools(
    app: &App,
    kind: &Kind,
    body: &Value,
    valid: &validate::Valid,
    guards: &mut Vec<Compare>,
) -> Result<(), Vec<FieldError>> {
    let mut errs = Vec::new();
    if *kind == api::NAD {
        for field in &valid.node_owned {
            errs.push(FieldError {
                field: field.clone(),
                message: "this is the node's to set; a tenant's network may not".into(),
            });
        }
        for (field, why) in &valid.inline_pools {
            errs.push(FieldError {
                field: field.clone(),
                message: format!(
                    "{why}: a tenant's network draws from an IPPool an admin defined; name it with \"pool\" alone"
                ),
            });
        }
    }
    let users: Vec<String> = if *kind == api::NAD {
        meta_str(body, "namespace")
            .map(|n| vec![n.to_string()])
            .unwrap_or_default()
    } else {
        validate::allowed_namespaces(body)
    };
    for (pool, field) in &valid.pools_named {
        let pool_key = api::IP_POOL.key(None, pool);
        match app.store.get(&pool_key).await {
            Ok(Some(p)) => {
                // Stored only if the pool is still as read.
                guards.push(Compare::mod_revision(pool_key, CompareOp::Equal, p.mod_rev));
                let allowed = validate::allowed_namespaces(&p.value);
                if allowed.is_empty() {
                    continue;
                }
                for ns in &users {
                    if !api::allows(&allowed, ns) {
                        errs.push(FieldError {
                            field: field.clone(),
                            message: format!(
                                "pool {pool:?} does not allow namespace {ns:?} (it allows {})",
                                allowed.join(", ")
                            ),
                        });
                    }
                }
            }
            Ok(None) => errs.push(FieldError {
                field: field.clone(),
                message: format!("IPPool {pool:?} does not exist"),
            }),
            Err(e) => errs.push(FieldError {
                field: field.clone(),
                message: e.to_string(),
            }),
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Every address in use in `pool`'s blocks, and how many blocks are claimed.
pub async fn pool_addresses(app: &App, pool: &str) -> Result<(Vec<IpAddr>, usize), ApiError> {
    let prefix = format!("{IPAM_PREFIX}{}", pool_blocks_prefix(pool));
    let mut used = Vec::new();
    let mut blocks = 0;
    for (key, value) in app.store.raw(&prefix).await? {
        let Some(cidr) = ipam::block::block_cidr(&key) else {
            continue;
        };
        blocks += 1;
        // A node's reserve is held by no pod: it goes with the pool.
        if let Ok(b) = serde_json::from_slice::<Block>(&value) {
            used.extend(
                b.used()
                    .filter(|o| !b.is_reserved(*o))
                    .map(|o| cidr.nth(u128::from(o))),
            );
        }
    }
    Ok((used, blocks))
}

/// Store-side checks of a pool: no overlap with another pool, and an update
/// neither drops an address in use nor changes block sizes under claims.
async fn check_pool(
    app: &App,
    pool: &Pool,
    old: Option<&Pool>,
    allowed: &[String],
) -> Result<(), Vec<FieldError>> {
    let mut errs = Vec::new();
    if old.is_some() && !allowed.is_empty() {
        for net in networks_naming(app, &pool.name).await.map_err(|e| {
            vec![FieldError {
                field: "spec".into(),
                message: e.message,
            }]
        })? {
            let outside: Vec<&String> = net
                .namespaces
                .iter()
                .filter(|ns| !api::allows(allowed, ns))
                .collect();
            if !outside.is_empty() {
                errs.push(FieldError {
                    field: "spec.allowedNamespaces".into(),
                    message: format!(
                        "{} draws from this pool for namespace(s) {}, which the list leaves out",
                        net.name,
                        outside
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
    }
    let others = app
        .store
        .raw(&format!("{IPAM_PREFIX}pools/"))
        .await
        .map_err(|e| {
            vec![FieldError {
                field: "spec".into(),
                message: e.to_string(),
            }]
        })?;
    for (key, value) in others {
        let Ok(other) = serde_json::from_slice::<Pool>(&value) else {
            continue;
        };
        if other.name == pool.name {
            continue;
        }
        for a in &pool.ranges {
            for b in &other.ranges {
                if overlaps(a.subnet, b.subnet) {
                    errs.push(FieldError {
                        field: "spec.cidrs".into(),
                        message: format!(
                            "{} overlaps {} of pool {:?} ({key})",
                            a.subnet, b.subnet, other.name
                        ),
                    });
                }
            }
        }
    }
    if let Some(old) = old {
        let (used, blocks) = pool_addresses(app, &pool.name).await.map_err(|e| {
            vec![FieldError {
                field: "spec".into(),
                message: e.message,
            }]
        })?;
        let lost: Vec<String> = used
            .iter()
            .filter(|ip| !pool.usable(**ip))
            .map(IpAddr::to_string)
            .collect();
        if !lost.is_empty() {
            errs.push(FieldError {
                field: "spec.cidrs".into(),
                message: format!(
                    "the pool would no longer hold {} address(es) in use: {}",
                    lost.len(),
                    lost.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if blocks > 0 && old.block_sizes != pool.block_sizes {
            errs.push(FieldError {
                field: "spec.blockSizes".into(),
                message: format!("cannot change while {blocks} block(s) are claimed"),
            });
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Guards that hold while no block or claim of pool `name` changed after `rev`.
fn pool_ipam_guards(name: &str, rev: i64) -> [Compare; 2] {
    [
        unchanged_since(&format!("{IPAM_PREFIX}{}", pool_blocks_prefix(name)), rev),
        unchanged_since(
            &format!("{IPAM_PREFIX}{}", ipam::block::claim_prefix(name)),
            rev,
        ),
    ]
}

/// The writes beside an IPPool object: the pool `plexus-ipam` reads.
fn pool_ops(valid: &validate::Valid) -> Vec<etcd_client::TxnOp> {
    valid
        .pool
        .iter()
        .filter_map(|p| {
            let key = format!("{IPAM_PREFIX}{}", ipam::block::pool_key(&p.name));
            serde_json::to_vec(p).ok().map(|v| put_op(&key, v))
        })
        .collect()
}

/// The checks that read the store, and the guards that make the write
/// fail if what they read changes before it lands.
async fn store_checks(
    app: &App,
    kind: &Kind,
    body: &Value,
    valid: &validate::Valid,
    old: Option<&Value>,
) -> Result<Vec<Compare>, ApiError> {
    let name = meta_str(body, "name").unwrap_or("");
    // Taken before the reads: a write after it fails the guards.
    let rev = app.store.revision().await?;
    let mut guards = Vec::new();
    let res = if let Some(pool) = &valid.pool {
        let ipam_key = format!("{IPAM_PREFIX}{}", ipam::block::pool_key(&pool.name));
        if old.is_none() && app.store.get_bytes(&ipam_key).await?.is_some() {
            let by = if app.store.get(&kind.key(None, name)).await?.is_some() {
                format!("{}.{} {name:?} already exists", kind.plural, kind.group)
            } else {
                format!("a pool named {name:?} is already defined by a network's ipam config")
            };
            return Err(ApiError::new(409, "AlreadyExists", by).about(kind.plural, name));
        }
        let old_pool = old
            .and_then(|o| o.get("spec"))
            .and_then(|s| serde_json::from_value::<validate::PoolSpec>(s.clone()).ok())
            .and_then(|s| s.into_pool(name).ok());
        let allowed = validate::allowed_namespaces(body);
        guards.push(unchanged_since(&format!("{IPAM_PREFIX}pools/"), rev));
        // Addresses assigned meanwhile matter only when the pool loses some.
        let shrinks = old_pool.as_ref().is_some_and(|o| {
            !o.ranges.iter().all(|r| pool.ranges.contains(r))
                || !pool.exclude.iter().all(|x| o.exclude.contains(x))
                || o.block_sizes != pool.block_sizes
        });
        if shrinks {
            guards.extend(pool_ipam_guards(name, rev));
        }
        if old.is_some() {
            guards.push(unchanged_since(&api::NAD.prefix(None), rev));
            guards.push(unchanged_since(&api::CLUSTER_NETWORK.prefix(None), rev));
        }
        check_pool(app, pool, old_pool.as_ref(), &allowed).await
    } else {
        check_pools(app, kind, body, valid, &mut guards).await
    };
    res.map_err(|errs| ApiError::invalid(kind.kind, name, &errs))?;
    Ok(guards)
}

/// `POST` to a collection.
pub async fn create(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    mut body: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let valid = prepare(app, kind, ns, None, &mut body)?;
    let guards = store_checks(app, kind, &body, &valid, None).await?;
    let name = meta_str(&body, "name").unwrap_or("").to_string();
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.insert("uid".into(), json!(uuid4()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
    }
    let key = kind.key(ns, &name);
    if dry_run {
        return Ok(body);
    }
    let rev = app
        .store
        .put(&key, &body, 0, pool_ops(&valid), guards)
        .await
        .map_err(|e| match e {
            super::store::StoreError::Exists(_) => ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} {name:?} already exists", kind.plural, kind.group),
            )
            .about(kind.plural, &name),
            other => ApiError::from(other).about(kind.plural, &name),
        })?;
    Ok(served(&Stored {
        key,
        value: body,
        mod_rev: rev,
    }))
}

/// `PUT` of a whole object: its `metadata.resourceVersion` must be current.
pub async fn update(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    name: &str,
    body: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let key = kind.key(ns, name);
    let Some(current) = app.store.get(&key).await? else {
        return Err(not_found(kind, name));
    };
    let rv = meta_str(&body, "resourceVersion").map(str::to_string);
    let expected = match rv.as_deref() {
        None | Some("") => {
            return Err(ApiError::invalid(
                kind.kind,
                name,
                &[FieldError {
                    field: "metadata.resourceVersion".into(),
                    message: "must be specified for an update".into(),
                }],
            ))
        }
        Some(rv) => rv.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("metadata.resourceVersion {rv:?} is not a revision"))
        })?,
    };
    let target = Target {
        ns,
        name,
        key: &key,
        expected,
        dry_run,
    };
    check_and_replace(app, kind, body, &current, target).await
}

/// Which object an update or patch writes, over which revision.
struct Target<'a> {
    ns: Option<&'a str>,
    name: &'a str,
    key: &'a str,
    expected: i64,
    dry_run: bool,
}

/// Validates and checks `body` as the new state of `current`, then writes it.
async fn check_and_replace(
    app: &App,
    kind: &Kind,
    mut body: Value,
    current: &Stored,
    t: Target<'_>,
) -> Result<Value, ApiError> {
    let valid = prepare(app, kind, t.ns, Some(t.name), &mut body)?;
    let guards = store_checks(app, kind, &body, &valid, Some(&current.value)).await?;
    let write = Write {
        key: t.key,
        expected: t.expected,
        valid: &valid,
        guards,
        dry_run: t.dry_run,
    };
    replace(app, kind, body, current, write).await
}

/// How `replace` writes.
struct Write<'a> {
    key: &'a str,
    expected: i64,
    valid: &'a validate::Valid,
    guards: Vec<Compare>,
    dry_run: bool,
}

/// Writes `body` over `current` (if still at `expected`), keeping what the
/// server owns.
async fn replace(
    app: &App,
    kind: &Kind,
    mut body: Value,
    current: &Stored,
    w: Write<'_>,
) -> Result<Value, ApiError> {
    let Write {
        key,
        expected,
        valid,
        guards,
        dry_run,
    } = w;
    let name = meta_str(&body, "name").unwrap_or("").to_string();
    if expected != current.mod_rev {
        return Err(ApiError::conflict(format!(
            "Operation cannot be fulfilled on {}.{} {name:?}: the object has been modified; \
             please apply your changes to the latest version and try again",
            kind.plural, kind.group
        ))
        .about(kind.plural, &name));
    }
    let old_meta = current.value.get("metadata").cloned().unwrap_or(json!({}));
    let spec_changed = body.get("spec") != current.value.get("spec");
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        for owned in ["uid", "creationTimestamp"] {
            if let Some(v) = old_meta.get(owned) {
                meta.insert(owned.into(), v.clone());
            }
        }
        let gen = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        meta.insert(
            "generation".into(),
            json!(if spec_changed { gen + 1 } else { gen }),
        );
    }
    if dry_run {
        return Ok(body);
    }
    let rev = app
        .store
        .put(key, &body, expected, pool_ops(valid), guards)
        .await
        .map_err(|e| ApiError::from(e).about(kind.plural, &name))?;
    Ok(served(&Stored {
        key: key.to_string(),
        value: body,
        mod_rev: rev,
    }))
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `PATCH`: a merge patch, or a server-side apply (created when absent).
pub async fn patch(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    name: &str,
    content_type: &str,
    raw: &[u8],
    dry_run: bool,
) -> Result<(Value, bool), ApiError> {
    let apply = content_type.starts_with("application/apply-patch");
    let patch: Value = if apply {
        super::refuse_yaml_aliases(raw)?;
        serde_yaml_ng::from_slice(raw)
            .map_err(|e| ApiError::bad_request(format!("the body does not parse as YAML: {e}")))?
    } else if content_type.starts_with("application/merge-patch+json") {
        serde_json::from_slice(raw)
            .map_err(|e| ApiError::bad_request(format!("the body does not parse as JSON: {e}")))?
    } else {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the patch type {content_type:?} is not supported: use application/merge-patch+json or application/apply-patch+yaml"
            ),
        ));
    };
    let key = kind.key(ns, name);
    let Some(current) = app.store.get(&key).await? else {
        if apply {
            let mut patch = patch;
            if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                set_from_url(m, "name", name)?;
            }
            return create(app, kind, ns, patch, dry_run)
                .await
                .map(|v| (v, true));
        }
        return Err(not_found(kind, name));
    };
    let mut body = served(&current);
    merge_patch(&mut body, &patch);
    let expected = match meta_str(&patch, "resourceVersion") {
        Some(rv) => rv.parse::<i64>().unwrap_or(-1),
        None => current.mod_rev,
    };
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(expected.to_string()));
    }
    let target = Target {
        ns,
        name,
        key: &key,
        expected,
        dry_run,
    };
    check_and_replace(app, kind, body, &current, target)
        .await
        .map(|v| (v, false))
}

/// Who holds a network or pool: `namespace/pod` of each attachment that names it.
async fn holders(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    name: &str,
) -> Result<Vec<String>, ApiError> {
    let (atts, _) = app.store.list(&api::ATTACHMENT.prefix(None)).await?;
    let network = match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    let mut pods: Vec<String> = atts
        .iter()
        .filter_map(|a| {
            let spec: api::AttachmentSpec =
                serde_json::from_value(a.value.get("spec")?.clone()).ok()?;
            let hit = if *kind == api::IP_POOL {
                spec.pool == name
            } else if *kind == api::CLUSTER_NETWORK {
                spec.network == network && spec.network_kind != api::NAD.kind
            } else {
                spec.network == network
            };
            let pod_ns = meta_str(&a.value, "namespace").unwrap_or("");
            hit.then(|| format!("{pod_ns}/{}", spec.pod))
        })
        .collect();
    pods.sort();
    pods.dedup();
    Ok(pods)
}

/// A network that names a pool, and the namespaces whose pods use it.
struct Naming {
    name: String,
    namespaces: Vec<String>,
}

/// Networks whose config names `pool`.
async fn networks_naming(app: &App, pool: &str) -> Result<Vec<Naming>, ApiError> {
    let mut out = Vec::new();
    for kind in [&api::NAD, &api::CLUSTER_NETWORK] {
        let (objs, _) = app.store.list(&kind.prefix(None)).await?;
        for o in objs {
            let config = o
                .value
                .pointer("/spec/config")
                .and_then(Value::as_str)
                .unwrap_or("");
            let v: Value = serde_json::from_str(config).unwrap_or(Value::Null);
            let plugins = v
                .get("plugins")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_else(|| vec![v.clone()]);
            if plugins
                .iter()
                .any(|p| p.pointer("/ipam/pool").and_then(Value::as_str) == Some(pool))
            {
                let ns = meta_str(&o.value, "namespace");
                let n = meta_str(&o.value, "name").unwrap_or("");
                out.push(match ns {
                    Some(ns) => Naming {
                        name: format!("{}/{ns}/{n}", kind.singular),
                        namespaces: vec![ns.to_string()],
                    },
                    None => Naming {
                        name: format!("{}/{n}", kind.singular),
                        namespaces: validate::allowed_namespaces(&o.value),
                    },
                });
            }
        }
    }
    Ok(out)
}

/// `DELETE`: refused (409) while pods are attached to the network or hold
/// addresses of the pool.
pub async fn delete(
    app: &App,
    kind: &Kind,
    ns: Option<&str>,
    name: &str,
    precondition: Option<i64>,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let key = kind.key(ns, name);
    let Some(current) = app.store.get(&key).await? else {
        return Err(not_found(kind, name));
    };
    // Taken before the in-use reads: a pod attached or an address assigned
    // after it makes the delete fail rather than pass unseen.
    let rev = app.store.revision().await?;
    let mut guards = Vec::new();
    if !kind.node_written {
        guards.push(unchanged_since(&api::ATTACHMENT.prefix(None), rev));
        let pods = holders(app, kind, ns, name).await?;
        if !pods.is_empty() {
            return Err(ApiError::conflict(format!(
                "{} {name:?} is in use by {} pod(s): {}",
                kind.kind,
                pods.len(),
                pods.join(", ")
            ))
            .about(kind.plural, name));
        }
    }
    let mut also = Vec::new();
    if *kind == api::IP_POOL {
        guards.extend(pool_ipam_guards(name, rev));
        guards.push(unchanged_since(&api::NAD.prefix(None), rev));
        guards.push(unchanged_since(&api::CLUSTER_NETWORK.prefix(None), rev));
        let (used, _) = pool_addresses(app, name).await?;
        if !used.is_empty() {
            return Err(ApiError::conflict(format!(
                "IPPool {name:?} still has {} address(es) in use",
                used.len()
            ))
            .about(kind.plural, name));
        }
        let nets: Vec<String> = networks_naming(app, name)
            .await?
            .into_iter()
            .map(|n| n.name)
            .collect();
        if !nets.is_empty() {
            return Err(ApiError::conflict(format!(
                "IPPool {name:?} is named by {}",
                nets.join(", ")
            ))
            .about(kind.plural, name));
        }
        also.push(delete_op(&format!(
            "{IPAM_PREFIX}{}",
            ipam::block::pool_key(name)
        )));
        // Its blocks and claims hold no address: a pool made again under
        // this name starts clean.
        also.push(super::store::delete_prefix_op(&format!(
            "{IPAM_PREFIX}{}",
            ipam::block::claim_prefix(name)
        )));
        also.push(super::store::delete_prefix_op(&format!(
            "{IPAM_PREFIX}{}",
            pool_blocks_prefix(name)
        )));
    }
    let expected = precondition.unwrap_or(current.mod_rev);
    if dry_run {
        return Ok(served(&current));
    }
    app.store
        .delete(&key, expected, also, guards)
        .await
        .map_err(|e| ApiError::from(e).about(kind.plural, name))?;
    Ok(served(&current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1]});
        merge_patch(&mut t, &json!({"a": [2, 3], "b": {"x": 1}}));
        assert_eq!(t, json!({"a": [2, 3], "b": {"x": 1}}));
    }

    #[test]
    fn resource_version_is_spliced_into_stored_bytes() {
        for obj in [
            json!({"apiVersion": "v", "kind": "K", "metadata": {"name": "a"}, "spec": {"config": "\"metadata\":{"}}),
            json!({"kind": "K", "metadata": {}}),
        ] {
            let raw = serde_json::to_vec(&obj).expect("encode");
            let spliced: Value =
                serde_json::from_slice(&served_bytes(&raw, 42).expect("spliced")).expect("JSON");
            let mut want = obj.clone();
            want["metadata"]["resourceVersion"] = json!("42");
            assert_eq!(spliced, want);
        }
        assert!(served_bytes(b"{}", 1).is_none());
    }

    #[test]
    fn unsupported_selectors_are_refused() {
        assert!(check_selectors(Some("a=b,c!=d,e,!f"), Some("metadata.name=x")).is_ok());
        assert!(check_selectors(Some("env in (a,b)"), None).is_err());
        assert!(check_selectors(None, Some("spec.node=n1")).is_err());
        assert!(check_selectors(None, Some("metadata.namespace!=red")).is_ok());
    }

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"name": "a", "namespace": "red",
                                    "labels": {"plexus.io/node": "n1", "tier": "x"}}});
        assert!(selector_matches("plexus.io/node=n1", &o));
        assert!(selector_matches("plexus.io/node==n1,tier", &o));
        assert!(!selector_matches("plexus.io/node=n2", &o));
        assert!(selector_matches("tier!=y,!gone", &o));
        assert!(fields_match("metadata.name=a", &o));
        assert!(!fields_match("metadata.namespace=blue", &o));
        assert!(fields_match("metadata.namespace!=blue", &o));
    }
}
