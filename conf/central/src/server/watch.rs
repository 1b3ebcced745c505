//! `?watch=true` on a collection: newline-delimited JSON events as
//! Kubernetes streams them (`{"type": "ADDED", "object": …}`), from etcd's
//! watch on the collection's prefix.

use std::time::Duration;

use bytes::Bytes;
use etcd_client::EventType;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use conf::api::Kind;

use super::http::{ApiError, Body};
use super::objects::{fields_match, selector_matches};
use super::store::Stored;
use super::App;

fn event(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// An `ERROR` event carrying a `Status`, as Kubernetes ends a watch.
fn error_event(code: u16, reason: &'static str, message: &str) -> Bytes {
    let status = ApiError::new(code, reason, message).status();
    event("ERROR", &status)
}

/// What a watch request asked.
pub struct WatchQuery {
    pub resource_version: Option<i64>,
    pub labels: Option<String>,
    pub fields: Option<String>,
    pub timeout: Duration,
}

/// Starts a watch: current objects first as ADDED (unless a resourceVersion
/// says where to start), then every change until the timeout.
pub async fn start(
    app: &App,
    kind: &'static Kind,
    ns: Option<String>,
    q: WatchQuery,
) -> Result<Response<Body>, ApiError> {
    let prefix = kind.prefix(ns.as_deref());
    let keep = {
        let labels = q.labels.clone();
        let fields = q.fields.clone();
        move |o: &Value| {
            labels.as_deref().is_none_or(|l| selector_matches(l, o))
                && fields.as_deref().is_none_or(|f| fields_match(f, o))
        }
    };
    let (initial, from) = match q.resource_version.filter(|r| *r > 0) {
        Some(rv) => (Vec::new(), rv),
        None => {
            let (items, rev) = app.store.list(&prefix).await?;
            let lines: Vec<Bytes> = items
                .iter()
                .map(super::objects::served)
                .filter(|o| keep(o))
                .map(|o| event("ADDED", &o))
                .collect();
            (lines, rev)
        }
    };
    let stream_ = app.store.watch(&prefix, from).await?;
    let deadline = tokio::time::Instant::now() + q.timeout;
    struct State<F> {
        initial: std::vec::IntoIter<Bytes>,
        etcd: etcd_client::WatchStream,
        pending: Vec<Bytes>,
        deadline: tokio::time::Instant,
        keep: F,
        done: bool,
    }
    let state = State {
        initial: initial.into_iter(),
        etcd: stream_,
        pending: Vec::new(),
        deadline,
        keep,
        done: false,
    };
    let body = stream::unfold(state, |mut st| async move {
        if let Some(b) = st.initial.next() {
            return Some((Ok(Frame::data(b)), st));
        }
        loop {
            if let Some(b) = st.pending.pop() {
                return Some((Ok(Frame::data(b)), st));
            }
            if st.done {
                return None;
            }
            let msg = tokio::time::timeout_at(st.deadline, st.etcd.message()).await;
            let resp = match msg {
                Err(_) | Ok(Ok(None)) => return None,
                Ok(Err(e)) => {
                    st.done = true;
                    return Some((
                        Ok(Frame::data(error_event(
                            500,
                            "InternalError",
                            &format!("etcd watch: {e}"),
                        ))),
                        st,
                    ));
                }
                Ok(Ok(Some(resp))) => resp,
            };
            if resp.canceled() || resp.compact_revision() > 0 {
                // As Kubernetes says it: the resourceVersion is gone; list again.
                st.done = true;
                let why = if resp.compact_revision() > 0 {
                    format!(
                        "too old resource version: compacted to {}",
                        resp.compact_revision()
                    )
                } else {
                    format!("watch cancelled: {}", resp.cancel_reason())
                };
                return Some((Ok(Frame::data(error_event(410, "Expired", &why))), st));
            }
            let mut lines = Vec::new();
            for ev in resp.events() {
                let (kind, kv) = match ev.event_type() {
                    EventType::Put => {
                        let created = ev
                            .kv()
                            .is_some_and(|kv| kv.create_revision() == kv.mod_revision());
                        (if created { "ADDED" } else { "MODIFIED" }, ev.kv())
                    }
                    EventType::Delete => ("DELETED", ev.prev_kv().or(ev.kv())),
                };
                let Some(kv) = kv else { continue };
                let Ok(value) = serde_json::from_slice::<Value>(kv.value()) else {
                    continue;
                };
                let rev = ev.kv().map_or(kv.mod_revision(), |k| k.mod_revision());
                let obj = super::objects::served(&Stored {
                    key: String::new(),
                    value,
                    mod_rev: rev,
                });
                if (st.keep)(&obj) {
                    lines.push(event(kind, &obj));
                }
            }
            lines.reverse();
            st.pending = lines;
        }
    });
    let body: Body = StreamBody::new(body).boxed();
    Response::builder()
        .status(StatusCode::OK)
        .header("Content-Type", "application/json")
        .header("Transfer-Encoding", "chunked")
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}
