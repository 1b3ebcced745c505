//! `plexusd`: the API server. Stateless: any number run against one etcd;
//! each request is authenticated by bearer token, authorised by role, routed
//! by the Kubernetes URL layout, and answered in its conventions.

pub mod auth;
pub mod discovery;
pub mod http;
pub mod metrics;
pub mod objects;
pub mod reclaim;
pub mod store;
pub mod usage;
pub mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{info, warn};

use conf::api::Kind;

use auth::{Tokens, User, Verb};
use http::{ApiError, Body};

/// What the server needs to run (its flags, parsed).
#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: store::EtcdFlags,
    pub bind: SocketAddr,
    /// Certificate and key; without them only a loopback address is served.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub token_file: std::path::PathBuf,
    /// Plugin types nodes have, beyond the built-in and reference ones.
    pub extra_types: Vec<String>,
    pub max_body: usize,
    pub request_timeout: Duration,
    /// How long a node stays gone before its addresses are reclaimed.
    pub node_grace: Duration,
    /// How often gone nodes are looked for.
    pub node_monitor: Duration,
}

/// Shared state of every request.
pub struct App {
    pub store: store::Store,
    pub tokens: Tokens,
    pub types: Vec<String>,
    pub metrics: metrics::Metrics,
    pub max_body: usize,
    pub request_timeout: Duration,
}

/// Runs the server until the process is stopped.
pub async fn run(config: Config) -> Result<(), String> {
    if config.tls.is_none() && !config.bind.ip().is_loopback() {
        return Err(format!(
            "refusing plain HTTP on {}: give --tls-cert-file and --tls-private-key-file, or bind a loopback address",
            config.bind
        ));
    }
    let tokens = Tokens::load(&config.token_file)?;
    let store = store::Store::connect(&config.etcd)
        .await
        .map_err(|e| format!("etcd {}: {e}", config.etcd.servers.join(",")))?;
    let mut types: Vec<String> = conf::validate::NODE_TYPES
        .iter()
        .map(|s| s.to_string())
        .collect();
    types.extend(config.extra_types.iter().cloned());
    let app = Arc::new(App {
        store,
        tokens,
        types,
        metrics: metrics::Metrics::default(),
        max_body: config.max_body,
        request_timeout: config.request_timeout,
    });
    let acceptor = match &config.tls {
        Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
            cert, key,
        )?)),
        None => None,
    };
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|e| format!("listen on {}: {e}", config.bind))?;
    info!(address = %config.bind, tls = acceptor.is_some(), "plexusd serving");
    let reclaim = reclaim::Reclaim {
        etcd: reclaim::ipam_etcd(&config.etcd),
        grace: config.node_grace,
        period: config.node_monitor,
    };
    std::thread::spawn(move || reclaim.run());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("accept: {e}");
                continue;
            }
        };
        let app = Arc::clone(&app);
        let acceptor = acceptor.clone();
        // A client gets this long for the TLS handshake and for its headers.
        let patience = app.request_timeout.min(Duration::from_secs(10));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, std::convert::Infallible>(handle(&app, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(patience);
            let served = match acceptor {
                Some(acc) => match tokio::time::timeout(patience, acc.accept(tcp)).await {
                    Ok(Ok(tls)) => builder.serve_connection(TokioIo::new(tls), service).await,
                    Ok(Err(e)) => return warn!(%peer, "TLS handshake: {e}"),
                    Err(_) => return warn!(%peer, "TLS handshake timed out"),
                },
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

/// The query string as a map (values percent-decoded).
fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bearer(req: &Request<Incoming>) -> Option<&[u8]> {
    let h = req.headers().get(hyper::header::AUTHORIZATION)?;
    let v = h.as_bytes();
    (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
}

/// Reads the body, at most `max` bytes, within the request timeout.
async fn body_bytes(app: &App, body: Incoming) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, app.max_body);
    match tokio::time::timeout(app.request_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            408,
            "Timeout",
            "the request body was not sent in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("the request body is larger than {} bytes", app.max_body),
        )),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("reading the body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Parses a JSON or YAML body.
fn parse_body(content_type: &str, raw: &[u8]) -> Result<Value, ApiError> {
    if content_type.contains("yaml") {
        refuse_yaml_aliases(raw)?;
        serde_yaml_ng::from_slice(raw)
            .map_err(|e| ApiError::bad_request(format!("the body does not parse as YAML: {e}")))
    } else {
        serde_json::from_slice(raw)
            .map_err(|e| ApiError::bad_request(format!("the body does not parse as JSON: {e}")))
    }
}

/// YAML anchors and aliases let a small body expand without bound while it
/// is parsed; no object here needs them, so a body that uses them is refused.
pub fn refuse_yaml_aliases(raw: &[u8]) -> Result<(), ApiError> {
    let text = String::from_utf8_lossy(raw);
    for (n, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in line.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c == '#' && (prev == ' ' || prev == '\t') => break,
                None if (c == '&' || c == '*')
                    && matches!(prev, ' ' | '\t' | '[' | '{' | ',' | ':' | '-') =>
                {
                    return Err(ApiError::bad_request(format!(
                        "line {}: YAML anchors and aliases are not accepted",
                        n + 1
                    )));
                }
                None => {}
            }
            prev = c;
        }
    }
    Ok(())
}

/// A route the URL names.
enum Route<'a> {
    Health,
    Metrics,
    Version,
    Discovery(Value),
    Namespace(Option<&'a str>),
    Objects {
        kind: &'static Kind,
        ns: Option<&'a str>,
        name: Option<&'a str>,
    },
    Usage(&'a str),
}

fn route<'a>(segs: &[&'a str]) -> Result<Route<'a>, ApiError> {
    let nf = || ApiError::not_found("the server could not find the requested resource");
    let kind_of = |g: &str, v: &str, plural: &str| Kind::by_resource(g, v, plural).ok_or_else(nf);
    Ok(match segs {
        ["healthz" | "livez" | "readyz"] => Route::Health,
        ["metrics"] => Route::Metrics,
        ["version"] => Route::Version,
        ["api"] => Route::Discovery(discovery::core_versions()),
        ["api", "v1"] => Route::Discovery(discovery::core_resources()),
        ["api", "v1", "namespaces"] => Route::Namespace(None),
        ["api", "v1", "namespaces", ns] => Route::Namespace(Some(ns)),
        ["apis"] => Route::Discovery(discovery::group_list()),
        ["apis", g] => Route::Discovery(discovery::group_doc(g).ok_or_else(nf)?),
        ["apis", g, v] => Route::Discovery(discovery::resource_list(g, v).ok_or_else(nf)?),
        ["openapi", "v3"] => Route::Discovery(discovery::openapi_index()),
        ["openapi", "v3", "apis", g, v] => {
            Route::Discovery(discovery::openapi_doc(g, v).ok_or_else(nf)?)
        }
        ["openapi", "v3", "api", v] => {
            Route::Discovery(discovery::openapi_doc("", v).ok_or_else(nf)?)
        }
        ["apis", g, v, "namespaces", ns, plural] => Route::Objects {
            kind: kind_of(g, v, plural)?,
            ns: Some(ns),
            name: None,
        },
        ["apis", g, v, "namespaces", ns, plural, name] => Route::Objects {
            kind: kind_of(g, v, plural)?,
            ns: Some(ns),
            name: Some(name),
        },
        ["apis", g, v, plural] => Route::Objects {
            kind: kind_of(g, v, plural)?,
            ns: None,
            name: None,
        },
        ["apis", g, v, plural, name, "usage"] if *plural == conf::api::IP_POOL.plural => {
            kind_of(g, v, plural)?;
            Route::Usage(name)
        }
        ["apis", g, v, plural, name] => Route::Objects {
            kind: kind_of(g, v, plural)?,
            ns: None,
            name: Some(name),
        },
        _ => return Err(nf()),
    })
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (resource, verb, resp) = match route(&segs) {
        Err(e) => ("", "", e.response()),
        Ok(r) => dispatch(app, req, r).await,
    };
    app.metrics
        .observe(resource, verb, resp.status().as_u16(), started.elapsed());
    resp
}

async fn dispatch(
    app: &App,
    req: Request<Incoming>,
    route: Route<'_>,
) -> (&'static str, &'static str, Response<Body>) {
    if matches!(route, Route::Health) {
        return (
            "",
            "get",
            http::text(StatusCode::OK, "text/plain", "ok".into()),
        );
    }
    let Some(user) = bearer(&req).and_then(|t| app.tokens.authenticate(t)) else {
        return ("", "", ApiError::unauthorized().response());
    };
    let plain_get = !matches!(route, Route::Objects { .. });
    if plain_get && req.method() != Method::GET {
        return (
            "",
            "",
            ApiError::new(405, "MethodNotAllowed", "only GET is served here").response(),
        );
    }
    let (resource, verb, r) = match route {
        Route::Objects { kind, ns, name } => {
            let verb = verb_of(req.method(), name.is_some(), &query(&req));
            let r = match verb {
                Some(verb) => objects_request(app, &user, req, kind, ns, name, verb).await,
                None => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
            };
            (kind.plural, verb.map_or("", Verb::as_str), r)
        }
        Route::Usage(name) => {
            let r = if auth::allowed(&user, Verb::Get, &conf::api::IP_POOL, None) {
                usage::read(app, name)
                    .await
                    .map(|u| http::json(StatusCode::OK, &u.to_json()))
            } else {
                Err(forbidden(&user, Verb::Get, &conf::api::IP_POOL, None))
            };
            ("ippools/usage", "get", r)
        }
        Route::Metrics => {
            let r = if auth::may_read_metrics(&user) {
                Ok(http::text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    metrics::render(app).await,
                ))
            } else {
                Err(ApiError::forbidden(format!(
                    "user {:?} cannot read metrics",
                    user.name
                )))
            };
            ("metrics", "get", r)
        }
        Route::Version => (
            "",
            "get",
            Ok(http::json(StatusCode::OK, &discovery::version())),
        ),
        Route::Discovery(doc) => ("", "get", Ok(http::json(StatusCode::OK, &doc))),
        Route::Namespace(ns) if ns.is_none() && !auth::may_list_namespaces(&user) => (
            "namespaces",
            "list",
            Err(ApiError::forbidden(format!(
                "user {:?} cannot list namespaces",
                user.name
            ))),
        ),
        Route::Namespace(ns) => ("namespaces", "get", namespaces(app, ns).await),
        Route::Health => (
            "",
            "get",
            Ok(http::text(StatusCode::OK, "text/plain", "ok".into())),
        ),
    };
    (resource, verb, r.unwrap_or_else(|e| e.response()))
}

fn verb_of(method: &Method, named: bool, q: &HashMap<String, String>) -> Option<Verb> {
    let watch = q
        .get("watch")
        .is_some_and(|w| w == "1" || w.eq_ignore_ascii_case("true"));
    Some(match (method, named) {
        (&Method::GET, false) if watch => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (&Method::GET, true) => Verb::Get,
        (&Method::POST, false) => Verb::Create,
        (&Method::PUT, true) => Verb::Update,
        (&Method::PATCH, true) => Verb::Patch,
        (&Method::DELETE, true) => Verb::Delete,
        _ => return None,
    })
}

fn forbidden(user: &User, verb: Verb, kind: &Kind, ns: Option<&str>) -> ApiError {
    let scope = match ns {
        Some(ns) if kind.namespaced => format!(" in the namespace {ns:?}"),
        _ if kind.namespaced => " at the cluster scope".to_string(),
        _ => String::new(),
    };
    ApiError::forbidden(format!(
        "{}.{} is forbidden: User {:?} cannot {} resource {:?} in API group {:?}{scope}",
        kind.plural,
        kind.group,
        user.name,
        verb.as_str(),
        kind.plural,
        kind.group
    ))
}

async fn objects_request(
    app: &App,
    user: &User,
    req: Request<Incoming>,
    kind: &'static Kind,
    ns: Option<&str>,
    name: Option<&str>,
    verb: Verb,
) -> Result<Response<Body>, ApiError> {
    if !kind.namespaced && ns.is_some() {
        return Err(ApiError::not_found(format!(
            "{} is cluster-scoped",
            kind.plural
        )));
    }
    if kind.namespaced && ns.is_none() && !matches!(verb, Verb::List | Verb::Watch) {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "{} are namespaced: {} them under /namespaces/<namespace>/",
                kind.plural,
                verb.as_str()
            ),
        ));
    }
    if let Some(ns) = ns {
        if !conf::api::is_dns_label(ns) {
            return Err(ApiError::bad_request(format!(
                "{ns:?} is not a namespace name"
            )));
        }
    }
    if !auth::allowed(user, verb, kind, ns) {
        return Err(forbidden(user, verb, kind, ns));
    }
    let q = query(&req);
    objects::check_selectors(
        q.get("labelSelector").map(String::as_str),
        q.get("fieldSelector").map(String::as_str),
    )?;
    let dry_run = q.get("dryRun").is_some_and(|d| d == "All");
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let name_s = name.unwrap_or("");
    // The body is read first, under its own time limit (408), so that the
    // handler's limit (504) measures only the server's own work.
    let raw = if verb.reads() {
        Bytes::new()
    } else {
        body_bytes(app, req.into_body()).await?
    };
    let out = |code: StatusCode, v: Value| Ok(http::json(code, &v));
    let call = async {
        match verb {
            Verb::Get => Ok(http::bytes(
                StatusCode::OK,
                objects::get_bytes(app, kind, ns, name_s).await?,
            )),
            Verb::List if !q.contains_key("labelSelector") && !q.contains_key("fieldSelector") => {
                Ok(http::bytes(
                    StatusCode::OK,
                    objects::list_bytes(app, kind, ns).await?,
                ))
            }
            Verb::List => out(
                StatusCode::OK,
                objects::list(
                    app,
                    kind,
                    ns,
                    q.get("labelSelector").map(String::as_str),
                    q.get("fieldSelector").map(String::as_str),
                )
                .await?,
            ),
            Verb::Watch => {
                let timeout = q
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(1800)
                    .min(3600);
                watch::start(
                    app,
                    kind,
                    ns.map(str::to_string),
                    watch::WatchQuery {
                        resource_version: q.get("resourceVersion").and_then(|r| r.parse().ok()),
                        labels: q.get("labelSelector").cloned(),
                        fields: q.get("fieldSelector").cloned(),
                        timeout: Duration::from_secs(timeout),
                    },
                )
                .await
            }
            Verb::Create => {
                let body = parse_body(&content_type, &raw)?;
                out(
                    StatusCode::CREATED,
                    objects::create(app, kind, ns, body, dry_run).await?,
                )
            }
            Verb::Update => {
                let body = parse_body(&content_type, &raw)?;
                out(
                    StatusCode::OK,
                    objects::update(app, kind, ns, name_s, body, dry_run).await?,
                )
            }
            Verb::Patch => {
                let (v, created) =
                    objects::patch(app, kind, ns, name_s, &content_type, &raw, dry_run).await?;
                out(
                    if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    v,
                )
            }
            Verb::Delete => {
                let precondition = serde_json::from_slice::<Value>(&raw).ok().and_then(|v| {
                    v.pointer("/preconditions/resourceVersion")
                        .and_then(Value::as_str)
                        .and_then(|r| r.parse::<i64>().ok())
                });
                out(
                    StatusCode::OK,
                    objects::delete(app, kind, ns, name_s, precondition, dry_run).await?,
                )
            }
        }
    };
    if verb == Verb::Watch {
        return call.await;
    }
    match tokio::time::timeout(app.request_timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            504,
            "Timeout",
            format!(
                "the request did not finish within {:?}",
                app.request_timeout
            ),
        )),
    }
}

/// Namespaces exist implicitly (as names): kubectl reads one before an apply.
async fn namespaces(app: &App, ns: Option<&str>) -> Result<Response<Body>, ApiError> {
    let obj = |n: &str| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": n}, "status": {"phase": "Active"}})
    };
    match ns {
        Some(n) if conf::api::is_dns_label(n) => Ok(http::json(StatusCode::OK, &obj(n))),
        Some(n) => Err(ApiError::not_found(format!("namespaces {n:?} not found"))),
        None => {
            let mut names = std::collections::BTreeSet::new();
            names.insert("default".to_string());
            for kind in [&conf::api::NAD, &conf::api::ATTACHMENT] {
                let (objs, _) = app.store.list(&kind.prefix(None)).await?;
                for o in objs {
                    if let Some((Some(ns), _)) = kind.parse_key(&o.key) {
                        names.insert(ns.to_string());
                    }
                }
            }
            let items: Vec<Value> = names.iter().map(|n| obj(n)).collect();
            Ok(http::json(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items}),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_whatever_bytes_come() {
        assert_eq!(decode("plexus.io%2Fnode%3Dn1"), "plexus.io/node=n1");
        assert_eq!(decode("a+b%20c"), "a b c");
        // A '%' before a multi-byte character, or at the end, stays as it is.
        assert_eq!(decode("x%€"), "x%€");
        assert_eq!(decode("%"), "%");
        assert_eq!(decode("%4"), "%4");
    }

    #[test]
    fn yaml_anchors_and_aliases_are_refused() {
        assert!(refuse_yaml_aliases(b"a: &x big\nb: [*x, *x]\n").is_err());
        assert!(refuse_yaml_aliases(b"- *x\n").is_err());
        let fine = b"metadata: {name: a}\nspec:\n  config: '{\"a\": \"b&c *d\"}' # & *\n";
        assert!(refuse_yaml_aliases(fine).is_ok());
    }
}
